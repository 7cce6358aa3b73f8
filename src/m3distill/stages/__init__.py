"""The pipeline's stages as objects: synth -> teacher -> train -> (export) -> evaluate.

Each stage declares its inputs and outputs, computes one fingerprint (its own settings plus the fingerprints or
contents of what it reads), records it in its output (dataset manifest, teacher-cache manifest, each student's
metadata, the report's inputs.json), answers ``status()`` / ``is_current()`` and ``run()``s. The pipeline
(:mod:`m3distill.pipeline`) is a loop over :func:`run_stages`; the standalone commands call the same objects.
"""

from __future__ import annotations

from m3distill.config import M3DistillConfig
from m3distill.fingerprint import Fingerprint, StageStatus
from m3distill.layout import RunLayout
from m3distill.stages.base import Stage
from m3distill.stages.evaluate import EvaluateStage, EvaluationResult
from m3distill.stages.export import ExportStage, ExportStageResult
from m3distill.stages.synth import SynthStage
from m3distill.stages.teacher import TeacherStage
from m3distill.stages.train import TrainResult, TrainStage

# The stages every run has, in order.
STAGE_NAMES = ("synth", "teacher", "train", "evaluate")
# Every stage in the order they run, with those a run has only when its config switches them on (export).
ALL_STAGE_NAMES = ("synth", "teacher", "train", "export", "evaluate")


def stage_names(config: M3DistillConfig) -> tuple[str, ...]:
    """The stages a run of ``config`` has, in order: :data:`STAGE_NAMES`, plus export when ``export.enabled``."""
    return tuple(name for name in ALL_STAGE_NAMES if name != "export" or config.export.enabled)


def run_stages(config: M3DistillConfig) -> list[Stage]:
    """The stages of a run (see :func:`stage_names`), in order, reading and writing ``config.run_dir``."""
    layout = RunLayout(config.run_dir)
    train = TrainStage(config, layout.dataset, layout.teacher_cache, layout.students, resume=True)
    # The run's own students: ones an earlier config asked for and this one does not are not its exports nor its
    # report's.
    students = [layout.student(name) for name in train.planned()]
    stages: list[Stage] = [
        SynthStage(config, layout.dataset),
        TeacherStage(config, layout.dataset, layout.teacher_cache),
        train,
        ExportStage(config, students, dataset_dir=layout.dataset),
        EvaluateStage(config, layout.dataset, layout.report, students_dir=layout.students, students=students,
                      cache_dir=layout.teacher_cache),
    ]
    return [stage for stage in stages if stage.name in stage_names(config)]


__all__ = [
    "ALL_STAGE_NAMES",
    "STAGE_NAMES",
    "EvaluateStage",
    "EvaluationResult",
    "ExportStage",
    "ExportStageResult",
    "Fingerprint",
    "Stage",
    "StageStatus",
    "SynthStage",
    "TeacherStage",
    "TrainResult",
    "TrainStage",
    "run_stages",
    "stage_names",
]
