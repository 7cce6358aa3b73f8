"""Training: distillation of layer-reduced students on the cached teacher embeddings (see :mod:`.losses`)."""

from m3distill.training.distill import (
    STUDENT_METADATA_FILE,
    StudentResult,
    completed_student_dirs,
    is_trained_student,
    planned_students_complete,
    read_student_metadata,
    train_students,
)

__all__ = [
    "STUDENT_METADATA_FILE",
    "StudentResult",
    "completed_student_dirs",
    "is_trained_student",
    "planned_students_complete",
    "read_student_metadata",
    "train_students",
]
