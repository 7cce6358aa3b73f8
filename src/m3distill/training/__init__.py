"""Training: distillation of layer-reduced students on the cached teacher embeddings (see :mod:`.losses`).

:func:`distil_students` trains the students it is given; which students need training is the train stage's question
(:func:`m3distill.stages.train.train_students`). What a student folder is (finished or not, its metadata) lives in
:mod:`m3distill.students.folder`; its names are re-exported here for the scripts that import them from training.
"""

from m3distill.layout import STUDENT_METADATA_FILE
from m3distill.students.folder import (
    completed_student_dirs,
    is_trained_student,
    planned_students_complete,
    read_student_metadata,
)
from m3distill.training.distill import StudentResult, distil_students

__all__ = [
    "STUDENT_METADATA_FILE",
    "StudentResult",
    "completed_student_dirs",
    "distil_students",
    "is_trained_student",
    "planned_students_complete",
    "read_student_metadata",
]
