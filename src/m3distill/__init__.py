"""m3distill: distil a large text-embedding teacher (BAAI/bge-m3 by default) into small layer-reduced students.

The Python API: each stage is one function taking the run's config (optionally other folders than the run
directory's), deciding exactly as the ``m3distill`` commands do, and returning a typed result::

    import m3distill

    config = m3distill.demo_config("my-run")      # or m3distill.load_config("run.yaml")
    m3distill.synth(config)                       # -> SynthSummary
    m3distill.teacher_cache(config)               # -> CacheSummary
    trained = m3distill.train(config)             # -> TrainResult
    m3distill.export(config)                      # ONNX and int8 copies of the students -> ExportStageResult
    result = m3distill.evaluate(config)           # -> EvaluationResult
    m3distill.run_pipeline(config)                # every stage, skipping what is current -> PipelineResult

bge-m3's three outputs (dense, sparse, ColBERT) of any M3 model folder, a teacher or a student of one::

    model = SentenceTransformer(folder)
    out = m3distill.encode_m3(model, m3distill.load_m3_heads(model, folder), texts)   # -> M3Embeddings

A student exported for serving (ONNX float32 and int8, see :mod:`m3distill.exporting`), and loaded with onnxruntime
alone::

    m3distill.export_student(folder, config.export)                  # -> ExportResult
    m3distill.onnx_encoder(folder, "int8").encode(texts)             # float32 (n, dim), no torch
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m3distill._version import __version__
from m3distill.config import ExportConfig, M3DistillConfig, load_config
from m3distill.errors import M3DistillError
from m3distill.layout import RunLayout, is_inside
from m3distill.locks import hold_run_dir
from m3distill.pipeline import PipelineResult, StageRun, demo_config, run_pipeline
from m3distill.stages import (
    EvaluateStage,
    EvaluationResult,
    ExportStage,
    ExportStageResult,
    Stage,
    SynthStage,
    TeacherStage,
    TrainResult,
    TrainStage,
)
from m3distill.stages.export import export_targets

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from m3distill.data.synth import SynthSummary
    from m3distill.exporting import ExportResult
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
    stage = SynthStage(config, out_dir if out_dir is not None else RunLayout(config.run_dir).dataset)
    return _run_alone(config, stage, force=overwrite, show_progress=show_progress)


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
    stage = TeacherStage(config, dataset_dir or layout.dataset, out_dir or layout.teacher_cache)
    return _run_alone(config, stage, force=force, show_progress=show_progress)


def train(config: M3DistillConfig, *, dataset_dir: PathLike | None = None, cache_dir: PathLike | None = None,
          out_dir: PathLike | None = None, resume: bool = True, force: bool = False,
          show_progress: bool = True) -> TrainResult:
    """Train the students of ``config.students`` with ``config.training`` on the teacher cache.

    The teacher is the one that made the cache when ``config.teacher.model`` is left at its default (see
    :attr:`m3distill.stages.TrainStage.teacher`).

    Args:
        config: the run's settings.
        dataset_dir: the dataset (default: ``RUN_DIR/dataset``).
        cache_dir: the teacher cache (default: ``RUN_DIR/teacher_cache``).
        out_dir: the students folder (default: ``RUN_DIR/students``).
        resume: continue unfinished students from their latest checkpoint (without it, an unfinished student with
            checkpoints is refused).
        force: retrain finished students, also those trained with other settings (refused without it).
        show_progress: show progress bars.
    """
    layout = RunLayout(config.run_dir)
    stage = TrainStage(config, dataset_dir or layout.dataset, cache_dir or layout.teacher_cache,
                       out_dir or layout.students, resume=resume)
    return _run_alone(config, stage, force=force, show_progress=show_progress)


def export(config: M3DistillConfig, *, students: Sequence[PathLike] | None = None,
           dataset_dir: PathLike | None = None, force: bool = False, show_progress: bool = True) -> ExportStageResult:
    """Export students as ONNX (float32) and dynamic int8 with ``config.export``, verified against the torch students.

    Args:
        config: the run's settings.
        students: student folders, or folders of students whose finished students are taken (default:
            ``RUN_DIR/students``).
        dataset_dir: the dataset whose test texts verify the exports; it must be complete when given (default:
            ``RUN_DIR/dataset`` when complete, else the bundled sample corpus).
        force: export again, also students whose export is current or was made with other settings (refused
            without it).
        show_progress: show progress bars.
    """
    from m3distill.data.dataset import require_complete_dataset

    layout = RunLayout(config.run_dir)
    targets = export_targets(list(students) if students else [layout.students])
    if dataset_dir is not None:
        require_complete_dataset(dataset_dir)
    stage = ExportStage(config, targets, dataset_dir=dataset_dir or layout.dataset)
    return _run_alone(config, stage, force=force, show_progress=show_progress)


def export_student(student_dir: PathLike, config: ExportConfig, *, texts: Sequence[str] | None = None,
                   force: bool = False, show_progress: bool = True) -> ExportResult:
    """Export one student folder as :func:`export` does (the export stage's decision: a current export is skipped,
    a stale one refused without ``force``), verified on ``texts`` (default: ``config.verify_texts`` texts of the
    bundled sample corpus)."""
    stage = ExportStage(config, [Path(student_dir)], texts=texts)
    return stage.run(force=force, show_progress=show_progress).students[0]


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
            default: the finished students in ``RUN_DIR/students`` (the others are skipped and named in the log;
            a run without that folder is refused).
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
    return _run_alone(config, stage, show_progress=show_progress)


def run(config: M3DistillConfig, *, force: Iterable[str] = (), show_progress: bool = True,
        on_stage: Callable[[str, str], None] | None = None) -> PipelineResult:
    """Every stage in ``config.run_dir``, skipping the current ones: the same as :func:`run_pipeline`."""
    return run_pipeline(config, force=force, show_progress=show_progress, on_stage=on_stage)


def _run_alone(config: M3DistillConfig, stage: Stage, **options: Any) -> Any:
    """Run one stage as its command does: holding the run directory's lock, with the pipeline's refusal, while the
    stage writes into ``config.run_dir``."""
    with _holding_run_dir(config, stage):
        return stage.run(**options)


@contextmanager
def _holding_run_dir(config: M3DistillConfig, stage: Stage) -> Iterator[None]:
    root = Path(config.run_dir)
    if any(is_inside(target, root) for target in stage.lock_targets()):
        with hold_run_dir(root, doing=stage.name):
            yield
    else:
        yield


_M3_NAMES = ("M3Embeddings", "encode_m3", "load_m3_heads")
_EXPORT_NAMES = ("ExportResult",)


def __getattr__(name: str):
    # The M3 helpers need torch, the ONNX encoder onnxruntime; importing them only when asked keeps
    # `import m3distill` light.
    if name in _M3_NAMES:
        from m3distill import m3

        return getattr(m3, name)
    if name in _EXPORT_NAMES:
        from m3distill import exporting

        return getattr(exporting, name)
    if name == "onnx_encoder":
        from m3distill.onnx_serving import onnx_encoder

        return onnx_encoder
    raise AttributeError(f"module 'm3distill' has no attribute {name!r}")


__all__ = [
    "EvaluationResult",
    "ExportResult",
    "ExportStageResult",
    "M3Embeddings",
    "M3DistillConfig",
    "M3DistillError",
    "PipelineResult",
    "StageRun",
    "TrainResult",
    "__version__",
    "demo_config",
    "encode_m3",
    "evaluate",
    "export",
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
