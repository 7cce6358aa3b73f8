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

import json
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

# The dataset manifest's "created_by": the marker of a dataset m3distill synth wrote.
DATASET_CREATED_BY = "m3distill synth"
# What m3distill writes in a dataset directory, as patterns for m3distill.atomic.files_not_ours.
DATASET_FILES = (CONTEXTS_FILE, QUESTIONS_FILE, GENERAL_FILE, CROPS_FILE, DATASET_MANIFEST_FILE)

# The marker of a teacher cache: written by m3distill.teacher.cache before any shard.
CACHE_TEACHER_FILE = "teacher.json"

# The metadata file of a finished student folder (written by m3distill.training, read by evaluation and export).
STUDENT_METADATA_FILE = "m3distill_student.json"
# What training writes into a student folder before anything else (the layers chosen): the marker of an unfinished one.
STUDENT_RUN_FILE = "run.json"

# bge-m3's two head files beside a model's sentence-transformers files: their presence makes an M3 model (see
# m3distill.m3).
SPARSE_HEAD_FILE = "sparse_linear.pt"
COLBERT_HEAD_FILE = "colbert_linear.pt"
HEAD_FILES = (SPARSE_HEAD_FILE, COLBERT_HEAD_FILE)
# Inside an M3 student: a sentence-transformers MultiVectorEncoder folder of its ColBERT output (m3distill.m3).
MULTI_VECTOR_DIRNAME = "multi_vector"
# A student with a trimmed vocabulary (m3distill.students.vocabulary): the teacher's id of each of its token ids.
VOCABULARY_MAP_FILE = "m3distill_vocabulary.json"

# Files inside a report directory.
REPORT_JSON_FILE = "report.json"
REPORT_MD_FILE = "report.md"
REPORT_INPUTS_FILE = "inputs.json"  # what the report was made from (the evaluate stage's fingerprint)
P_AT_K_PLOT = "p_at_k.png"
QUALITY_VS_SPEED_PLOT = "quality_vs_speed.png"
EMBEDDINGS_CACHE_DIRNAME = ".embeddings-cache"  # the models' embeddings of an unfinished evaluation
# What m3distill writes in a report directory, as patterns for m3distill.atomic.files_not_ours (p_at_k_<output>.png
# are an M3 teacher's plots).
REPORT_FILES = (REPORT_JSON_FILE, REPORT_MD_FILE, REPORT_INPUTS_FILE, P_AT_K_PLOT, "p_at_k_*.png",
                QUALITY_VS_SPEED_PLOT, f"{EMBEDDINGS_CACHE_DIRNAME}/**")

SPLITS = ("train", "dev", "test")


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """True when ``path`` is ``folder`` or lies somewhere below it (symlinks and ``..`` resolved first).

    Used to refuse inputs that lie inside an output m3distill replaces: replacing the output would delete them.
    """
    return Path(path).expanduser().resolve().is_relative_to(Path(folder).expanduser().resolve())


def folder_kind(path: str | Path) -> str | None:
    """What m3distill made of the folder ``path``, read from the marker it left there: ``"a teacher cache"``,
    ``"a student"``, ``"a report"``, ``"a dataset"``, ``"a run directory"``; None for a folder without one.

    A folder is only ever replaced by the stage whose marker it carries; the others name what it is when they refuse.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / CACHE_TEACHER_FILE).is_file():
        return "a teacher cache"
    if (path / STUDENT_METADATA_FILE).is_file() or (path / STUDENT_RUN_FILE).is_file():
        return "a student"
    if (path / REPORT_JSON_FILE).is_file():
        return "a report"
    if _is_synth_manifest(path / DATASET_MANIFEST_FILE) or all(
            (path / name).is_file() for name in (CONTEXTS_FILE, QUESTIONS_FILE, GENERAL_FILE, DATASET_MANIFEST_FILE)):
        return "a dataset"
    if (path / CONFIG_FILENAME).is_file() and (path / RUN_LOG_FILENAME).is_file():
        return "a run directory"
    return None


def _is_synth_manifest(file: Path) -> bool:
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("created_by") == DATASET_CREATED_BY


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
