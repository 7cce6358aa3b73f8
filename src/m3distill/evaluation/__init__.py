"""Evaluation of a teacher and its students: alignment, Qdrant retrieval, ground truth and speed.

The entry point is :func:`m3distill.evaluation.evaluate.evaluate_models` (also importable from here).
"""

from __future__ import annotations

from typing import Any

__all__ = ["evaluate_models"]


def __getattr__(name: str) -> Any:
    # Imported lazily: the report package imports the metric names defined in this package's modules, and
    # evaluate.py imports the report package, so an eager import here would be circular.
    if name == "evaluate_models":
        from m3distill.evaluation.evaluate import evaluate_models

        return evaluate_models
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
