"""Evaluation of a teacher and its students: alignment, Qdrant retrieval, ground truth and speed.

The entry point is :func:`m3distill.evaluation.evaluate.evaluate_models` (also importable from here, with
:class:`~m3distill.evaluation.evaluate.InMemory`). Its rooms: ``evaluate`` (the phases), ``retrieval`` (search
backends), ``speed`` (timing), ``real_questions``, ``onnx_variants`` (the students' ONNX exports as models) and
``embeddings_cache`` (what an interrupted evaluation resumes from).
"""

from __future__ import annotations

from typing import Any

__all__ = ["InMemory", "evaluate_models"]


def __getattr__(name: str) -> Any:
    # Imported when asked: a part of the evaluation (the speed or retrieval measurement, which benchmarks use alone)
    # imports without the whole of it.
    if name in __all__:
        from m3distill.evaluation import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
