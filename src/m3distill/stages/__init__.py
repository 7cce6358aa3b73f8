"""The pipeline's stages as objects: synth -> teacher -> train -> evaluate.

Each stage declares its inputs and outputs, computes one fingerprint (its own settings plus the fingerprints or
contents of what it reads), records it in its output (dataset manifest, teacher-cache manifest, each student's
metadata, the report's inputs.json), answers ``status()`` / ``is_current()`` and ``run()``s. The pipeline
(:mod:`m3distill.pipeline`) is a loop over :func:`run_stages`; the standalone commands call the same objects.
"""

from __future__ import annotations

from m3distill.config import M3DistillConfig
from m3distill.layout import RunLayout
from m3distill.stages.base import Stage, StageStatus
from m3distill.stages.evaluate import EvaluateStage, EvaluationResult
from m3distill.stages.fingerprint import Fingerprint
from m3distill.stages.synth import SynthStage
from m3distill.stages.teacher import TeacherStage
from m3distill.stages.train import TrainResult, TrainStage

STAGE_NAMES = ("synth", "teacher", "train", "evaluate")


def run_stages(config: M3DistillConfig) -> list[Stage]:
    """The four stages of a run, in order, reading and writing ``config.run_dir``."""
    layout = RunLayout(config.run_dir)
    train = TrainStage(config, layout.dataset, layout.teacher_cache, layout.students, resume=True)
    return [
        SynthStage(config, layout.dataset),
        TeacherStage(config, layout.dataset, layout.teacher_cache),
        train,
        # The run's own students: ones an earlier config asked for and this one does not are not its report's.
        EvaluateStage(config, layout.dataset, layout.report, students_dir=layout.students,
                      students=[layout.student(name) for name in train.planned()], cache_dir=layout.teacher_cache),
    ]


__all__ = [
    "STAGE_NAMES",
    "EvaluateStage",
    "EvaluationResult",
    "Fingerprint",
    "Stage",
    "StageStatus",
    "SynthStage",
    "TeacherStage",
    "TrainResult",
    "TrainStage",
    "run_stages",
]
