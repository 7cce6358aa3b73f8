"""The run-directory layout: where each pipeline stage reads and writes. Written here once, imported everywhere.

    RUN_DIR/
      config.yaml          the resolved configuration the run used
      m3distill.log        every run's full log (m3distill run / demo), appended
      dataset/             m3distill synth     (see m3distill.data.dataset for the files inside)
      teacher_cache/       m3distill teacher   (see m3distill.teacher.cache)
      students/<name>/     m3distill train     one sentence-transformers folder per student
      report/              m3distill evaluate  report.json, report.md, *.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DATASET_DIRNAME = "dataset"
TEACHER_CACHE_DIRNAME = "teacher_cache"
STUDENTS_DIRNAME = "students"
REPORT_DIRNAME = "report"
CONFIG_FILENAME = "config.yaml"
RUN_LOG_FILENAME = "m3distill.log"

# Files inside a dataset directory (written by m3distill.data.synth, read by m3distill.data.dataset).
CONTEXTS_FILE = "contexts.parquet"
QUESTIONS_FILE = "questions.parquet"
GENERAL_FILE = "general.parquet"
CROPS_FILE = "crops.parquet"
DATASET_MANIFEST_FILE = "manifest.json"

# The metadata file of a finished student folder (written by m3distill.training, read by evaluation and export).
STUDENT_METADATA_FILE = "m3distill_student.json"

# Files inside a report directory.
REPORT_JSON_FILE = "report.json"
REPORT_MD_FILE = "report.md"

SPLITS = ("train", "dev", "test")


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """True when ``path`` is ``folder`` or lies somewhere below it (symlinks and ``..`` resolved first).

    Used to refuse inputs that lie inside an output m3distill replaces: replacing the output would delete them.
    """
    return Path(path).expanduser().resolve().is_relative_to(Path(folder).expanduser().resolve())


def student_name(layers: list[int] | tuple[int, ...]) -> str:
    """Folder name of the student that keeps ``layers`` of the teacher, e.g. ``student-3L`` for three layers."""
    return f"student-{len(layers)}L"


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run directory."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILENAME

    @property
    def log(self) -> Path:
        return self.root / RUN_LOG_FILENAME

    @property
    def dataset(self) -> Path:
        return self.root / DATASET_DIRNAME

    @property
    def teacher_cache(self) -> Path:
        return self.root / TEACHER_CACHE_DIRNAME

    @property
    def students(self) -> Path:
        return self.root / STUDENTS_DIRNAME

    def student(self, name: str) -> Path:
        return self.students / name

    @property
    def report(self) -> Path:
        return self.root / REPORT_DIRNAME
