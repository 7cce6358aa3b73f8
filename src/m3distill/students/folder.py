"""What a student folder is: recognising one, reading its metadata, whether it is finished, what m3distill wrote
in it, and whether its files are still the ones it was saved with.

    STUDENTS_DIR/<student_name>/     one sentence-transformers folder per student (see m3distill.layout)
      modules.json, model.safetensors, ...   loads with plain SentenceTransformer(path)
      README.md                      model card
      logs/                          TensorBoard events
      sparse_linear.pt, colbert_linear.pt    M3 teachers only: the student's own (trained) bge-m3 heads
      onnx/                          an export for serving (m3distill export), with its record
      m3distill_student.json         the metadata; its presence marks the student finished

While a student trains its folder holds ``run.json`` (the layers chosen: the marker of an unfinished student),
``checkpoints/`` and ``logs/``. Training (:mod:`m3distill.training`) writes the folder; the train, export and
evaluate stages, the export and the evaluation read it through this room alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m3distill.errors import M3DistillError
from m3distill.fingerprint import CONTENTS, combine_file_digests, model_file_digests
from m3distill.layout import HEAD_FILES, STUDENT_METADATA_FILE
from m3distill.layout import STUDENT_RUN_FILE as RUN_FILE
from m3distill.students.layer_plan import planned_student_names

if TYPE_CHECKING:
    from m3distill.config import M3DistillConfig

CHECKPOINTS_DIRNAME = "checkpoints"
LOGS_DIRNAME = "logs"
# What a student folder saved by an earlier m3distill (whose metadata lists no files) holds besides the files
# student_files names for every student: sentence-transformers' files and module folders, the M3 heads.
_SAVED_BEFORE_FILES_WERE_RECORDED = ("*.json", "*.safetensors", "*.bin", "*.model", "*.pt", "*.tiktoken", "vocab.txt",
                                     "merges.txt", "[0-9]_*/**")
# What marks a model folder, or one that holds a student on its way (run.json).
_MODEL_MARKERS = ("modules.json", "config.json", RUN_FILE)


def is_trained_student(path: str | Path) -> bool:
    """True when ``path`` holds a finished student (its metadata file exists)."""
    return (Path(path) / STUDENT_METADATA_FILE).is_file()


def read_student_metadata(path: str | Path) -> dict[str, Any]:
    """The ``m3distill_student.json`` of a finished student folder."""
    file = Path(path) / STUDENT_METADATA_FILE
    if not file.is_file():
        raise M3DistillError(
            f"{path} is not a finished m3distill student ({STUDENT_METADATA_FILE} is missing); run `m3distill train`"
        )
    return json.loads(file.read_text(encoding="utf-8"))


def is_m3distill_student_dir(path: str | Path) -> bool:
    """True when ``path`` carries m3distill's marker: a finished student's metadata, or the ``run.json`` that
    training writes into a student folder before anything else. Only such a folder is ever replaced or removed."""
    path = Path(path)
    if is_trained_student(path):
        return True
    try:
        return "layers" in json.loads((path / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return False


def student_contents(student_dir: str | Path) -> dict[str, str]:
    """The SHA-256 of each file a student computes with, by name: its model files (config, tokenizer, weights, as
    :func:`~m3distill.fingerprint.hash_model_files` sees them) and a student of an M3 teacher's two head files; not
    its metadata, card, logs or exports.

    Recorded in the metadata when the student is saved, so that a file damaged or replaced later is noticed by
    whatever reads the student (:func:`check_student_contents`): a student's identity is its contents.
    """
    return model_file_digests(student_dir, leave_out=(STUDENT_METADATA_FILE,), also=HEAD_FILES)


def compare_student_contents(student_dir: str | Path) -> tuple[str, str | None]:
    """The digest of a student's files (:func:`student_contents`), and what changed in them since it was saved
    (``"model.safetensors changed"``), None when nothing did or the student records nothing to compare with (it
    was trained by an earlier m3distill, or elsewhere)."""
    student_dir = Path(student_dir)
    current = student_contents(student_dir)
    digest = combine_file_digests(current)
    try:
        recorded = read_student_metadata(student_dir).get("contents") if is_trained_student(student_dir) else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        recorded = None
    if not isinstance(recorded, dict):
        return digest, None
    changes = [*(f"{name} changed" for name in recorded if name in current and current[name] != recorded[name]),
               *(f"{name} is missing" for name in recorded if name not in current),
               *(f"{name} was added" for name in current if name not in recorded)]
    return digest, ", ".join(changes) or None


def check_student_contents(student_dir: str | Path) -> str:
    """The digest of a student's files, once they are checked against the ones it was saved with.

    Raises :class:`M3DistillError` naming the files that changed (a truncated or replaced ``model.safetensors``)
    and how to retrain the student.
    """
    digest, change = compare_student_contents(student_dir)
    if change is not None:
        raise M3DistillError(
            f"{student_dir} was changed or damaged since it was trained ({change}); retrain it with `m3distill train "
            "--force` (`m3distill run` retrains it by itself)"
        )
    return digest


def student_files(student_dir: str | Path) -> list[str]:
    """What m3distill wrote in a student folder, as patterns for :func:`m3distill.atomic.files_not_ours`: the files
    the finished student was saved with (listed in its metadata), what training writes (run.json, checkpoints/,
    logs/) and an export m3distill made (``onnx/`` with its record). Anything else there is the user's."""
    from m3distill.onnx_serving import ONNX_DIR, export_files  # here: onnxruntime only when a folder is replaced

    student_dir = Path(student_dir)
    saved: list[str] = []
    if is_trained_student(student_dir):
        try:
            recorded = read_student_metadata(student_dir).get("files")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            recorded = None
        saved = recorded if isinstance(recorded, list) else list(_SAVED_BEFORE_FILES_WERE_RECORDED)
    return [*saved, STUDENT_METADATA_FILE, "README.md", RUN_FILE, f"{CHECKPOINTS_DIRNAME}/**", f"{LOGS_DIRNAME}/**",
            *(f"{ONNX_DIR}/{name}" for name in export_files(student_dir))]


def completed_student_dirs(students_dir: str | Path) -> list[Path]:
    """Finished student folders directly inside ``students_dir``, sorted by name.

    Hidden folders are left out: they are students on their way in or out (a temporary copy being written, or a
    stale student kept aside until its retrained replacement is complete).
    """
    root = Path(students_dir)
    if not root.is_dir():
        return []
    return sorted(path for path in root.iterdir()
                  if path.is_dir() and not path.name.startswith(".") and is_trained_student(path))


def planned_students_complete(config: M3DistillConfig, students_dir: str | Path) -> bool:
    """True when every student that ``config.students`` asks for is finished in ``students_dir``."""
    return all(is_trained_student(Path(students_dir) / name) for name in planned_student_names(config.students))


def holds_students(path: Path) -> bool:
    """True for a folder that is not a model itself but holds models or students (``students/``, not
    ``student-2L/``)."""
    if not path.is_dir() or any((path / marker).is_file() for marker in _MODEL_MARKERS):
        return False
    return any(child.is_dir() and any((child / marker).is_file() for marker in _MODEL_MARKERS)
               for child in path.iterdir())


def finished_students(students_dir: Path | None) -> tuple[list[Path], dict[str, str]]:
    """The finished students in ``students_dir``, and every other visible folder there with why it is left out."""
    if students_dir is None or not students_dir.is_dir():
        return [], {}
    finished = completed_student_dirs(students_dir)
    skipped = {}
    for folder in sorted(students_dir.iterdir()):
        if folder.is_dir() and not folder.name.startswith(".") and folder not in finished:
            skipped[folder.name] = ("unfinished: rerun train with --resume" if (folder / RUN_FILE).is_file()
                                    else "not an m3distill student")
    return finished, skipped


def learnt_test_contexts(student_dir: str | Path, dataset: str | None) -> bool | None:
    """Whether an m3distill student learnt the test split's contexts of the dataset whose contents ``dataset``
    identifies (``training.all_contexts``): None when its folder does not say, or when it was trained on another
    dataset."""
    try:
        metadata = read_student_metadata(student_dir)
        learnt = metadata["data"]["all_contexts"]
        trained_on = metadata["inputs"]["dataset" + CONTENTS]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(learnt, bool) or dataset is None or trained_on != dataset:
        return None
    return learnt
