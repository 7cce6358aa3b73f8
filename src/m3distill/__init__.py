"""m3distill: distil a large text-embedding teacher (BAAI/bge-m3 by default) into small layer-reduced students.

The Python API: each stage is one function taking the run's config (optionally other folders than the run
directory's), deciding exactly as the ``m3distill`` commands do, and returning a typed result::

    import m3distill

    config = m3distill.demo_config("my-run")      # or m3distill.load_config("run.yaml")
    m3distill.synth(config)                       # -> SynthSummary
    m3distill.teacher_cache(config)               # -> CacheSummary
    trained = m3distill.train(config)             # -> TrainResult
    result = m3distill.evaluate(config)           # -> EvaluationResult
    m3distill.run_pipeline(config)                # all four, skipping what is current -> PipelineResult

bge-m3's three outputs (dense, sparse, ColBERT) of any M3 model folder, a teacher or a student of one::

    model = SentenceTransformer(folder)
    out = m3distill.encode_m3(model, m3distill.load_m3_heads(model, folder), texts)   # -> M3Embeddings

A student exported for serving (ONNX float32 and int8, see :mod:`m3distill.export`), and loaded with onnxruntime
alone::

    m3distill.export_student(folder, config.export)                  # -> ExportResult
    m3distill.onnx_encoder(folder, "int8").encode(texts)             # float32 (n, dim), no torch
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("m3distill")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from m3distill.config import M3DistillConfig, load_config
from m3distill.errors import M3DistillError
from m3distill.layout import RunLayout
from m3distill.pipeline import PipelineResult, demo_config, run_pipeline
from m3distill.stages import (
    EvaluateStage,
    EvaluationResult,
    SynthStage,
    TeacherStage,
    TrainResult,
    TrainStage,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from m3distill.data.synth import SynthSummary
    from m3distill.teacher.cache import CacheSummary

PathLike = str | Path


def synth(config: M3DistillConfig, *, out_dir: PathLike | None = None, overwrite: bool = False,
          show_progress: bool = True) -> SynthSummary:
    """Build the dataset (contexts, questions, splits) from ``config.synth.corpus``.

    Args:
        config: the run's settings.
        out_dir: the dataset folder (default: ``RUN_DIR/dataset``).
        overwrite: redo the dataset, also one made from other inputs (refused without it, naming what changed).
        show_progress: show progress bars.
    """
    out_dir = out_dir if out_dir is not None else RunLayout(config.run_dir).dataset
    return SynthStage(config, out_dir).run(force=overwrite, show_progress=show_progress)


def teacher_cache(config: M3DistillConfig, *, dataset_dir: PathLike | None = None, out_dir: PathLike | None = None,
                  force: bool = False, show_progress: bool = True) -> CacheSummary:
    """Embed every dataset text with ``config.teacher`` into the teacher cache (built, resumed or extended).

    Args:
        config: the run's settings.
        dataset_dir: the dataset (default: ``RUN_DIR/dataset``).
        out_dir: the cache folder (default: ``RUN_DIR/teacher_cache``).
        force: rebuild from scratch, also a cache made by another teacher (refused without it).
        show_progress: show progress bars.
    """
    layout = RunLayout(config.run_dir)
    return TeacherStage(config, dataset_dir or layout.dataset, out_dir or layout.teacher_cache).run(
        force=force, show_progress=show_progress)


def train(config: M3DistillConfig, *, dataset_dir: PathLike | None = None, cache_dir: PathLike | None = None,
          out_dir: PathLike | None = None, resume: bool = True, force: bool = False,
          show_progress: bool = True) -> TrainResult:
    """Train the students of ``config.students`` with ``config.training`` on the teacher cache.

    Args:
        config: the run's settings.
        dataset_dir: the dataset (default: ``RUN_DIR/dataset``).
        cache_dir: the teacher cache (default: ``RUN_DIR/teacher_cache``).
        out_dir: the students folder (default: ``RUN_DIR/students``).
        resume: continue unfinished students from their latest checkpoint.
        force: retrain finished students, also those trained with other settings (refused without it).
        show_progress: show progress bars.
    """
    layout = RunLayout(config.run_dir)
    stage = TrainStage(config, dataset_dir or layout.dataset, cache_dir or layout.teacher_cache,
                       out_dir or layout.students, resume=resume)
    return stage.run(force=force, show_progress=show_progress)


def evaluate(
    config: M3DistillConfig,
    *,
    students: Sequence[PathLike] | Mapping[str, SentenceTransformer | PathLike] | None = None,
    teacher: SentenceTransformer | None = None,
    dataset_dir: PathLike | None = None,
    cache_dir: PathLike | None = None,
    out_dir: PathLike | None = None,
    show_progress: bool = True,
) -> EvaluationResult:
    """Measure the teacher and its students and write the report (report.json, report.md, plots).

    Args:
        config: the run's settings (``config.evaluation``: k, index, speed...).
        students: student folders, or models by name (SentenceTransformer objects held in memory or folders);
            default: the finished students in ``RUN_DIR/students`` (the others are skipped and named in the log).
        teacher: the teacher held in memory, instead of loading ``config.teacher.model``.
        dataset_dir: the dataset (default: ``RUN_DIR/dataset``).
        cache_dir: a teacher cache whose embeddings are used when the same teacher made it (default:
            ``RUN_DIR/teacher_cache``).
        out_dir: the report folder (default: ``RUN_DIR/report``).
        show_progress: show progress bars.
    """
    layout = RunLayout(config.run_dir)
    stage = EvaluateStage(config, dataset_dir or layout.dataset, out_dir or layout.report,
                          students_dir=layout.students, students=students,
                          cache_dir=cache_dir or layout.teacher_cache, teacher_model=teacher)
    return stage.run(show_progress=show_progress)


def run(config: M3DistillConfig, *, force: Iterable[str] = (), show_progress: bool = True,
        on_stage: Callable[[str, str], None] | None = None) -> PipelineResult:
    """Every stage in ``config.run_dir``, skipping the current ones: the same as :func:`run_pipeline`."""
    return run_pipeline(config, force=force, show_progress=show_progress, on_stage=on_stage)


_M3_NAMES = ("M3Embeddings", "encode_m3", "load_m3_heads")
_EXPORT_NAMES = ("ExportResult", "export_student")


def __getattr__(name: str):
    # The M3 helpers need torch, the ONNX encoder onnxruntime; importing them only when asked keeps
    # `import m3distill` light.
    if name in _M3_NAMES:
        from m3distill import m3

        return getattr(m3, name)
    if name in _EXPORT_NAMES:
        from m3distill import export

        return getattr(export, name)
    if name == "onnx_encoder":
        from m3distill.onnx_serving import onnx_encoder

        return onnx_encoder
    raise AttributeError(f"module 'm3distill' has no attribute {name!r}")


__all__ = [
    "EvaluationResult",
    "ExportResult",
    "M3Embeddings",
    "M3DistillConfig",
    "M3DistillError",
    "PipelineResult",
    "TrainResult",
    "__version__",
    "demo_config",
    "encode_m3",
    "evaluate",
    "export_student",
    "load_config",
    "load_m3_heads",
    "onnx_encoder",
    "run",
    "run_pipeline",
    "synth",
    "teacher_cache",
    "train",
]
