"""The export stage: every student as ONNX (float32) and dynamic int8 in its own ``onnx/`` folder
(:func:`m3distill.exporting.write_export`).

It runs between train and evaluate, in the pipeline only when ``export.enabled``. Each student's export records
its fingerprint (the student's model files and the export settings) in ``onnx/m3distill_export.json``, and this
stage alone compares it: a current export is skipped, a stale one is redone by the pipeline and with ``force`` and
refused otherwise. Nothing the student's own fingerprints hash changes (``onnx/`` and the model card are outside
them), so the train stage still sees the student as current; the evaluation, which measures the exports too, sees a
new export.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from m3distill.config import ExportConfig, M3DistillConfig, settings_record
from m3distill.errors import M3DistillError
from m3distill.fingerprint import CONTENTS, Fingerprint, StageStatus, flatten, hash_model_files
from m3distill.stages.base import Stage
from m3distill.students.folder import check_student_contents, finished_students, holds_students

if TYPE_CHECKING:
    from m3distill.exporting import ExportResult

logger = logging.getLogger(__name__)


@dataclass
class ExportStageResult:
    """What the export stage did: one :class:`~m3distill.exporting.ExportResult` per student (skipped ones too)."""

    students: list[ExportResult] = field(default_factory=list)


def export_fingerprint(student_dir: str | Path, config: ExportConfig) -> Fingerprint:
    """What an export of ``student_dir`` is made from: the student's model files (its config, tokenizer and
    weights; not its card, its heads nor ``onnx/`` itself) and the settings that shape the files."""
    settings = settings_record(config, include={"variants", "opset", "graph_fusions", "quantization"})
    if "int8" not in config.variants:
        settings.pop("quantization")
    return Fingerprint({"student" + CONTENTS: hash_model_files(student_dir), **flatten("export", settings)})


def export_status(student_dir: str | Path, config: ExportConfig) -> StageStatus:
    """Whether ``student_dir``'s export is missing, current or stale (made from another student or settings).

    An ``onnx/`` folder m3distill did not write is reported stale with the reason: exporting refuses to touch it.
    """
    from m3distill.onnx_serving import ONNX_DIR, read_export_record

    student_dir = Path(student_dir)
    if not (student_dir / ONNX_DIR).exists():
        return StageStatus("missing")
    record = read_export_record(student_dir)
    if record is None:
        return StageStatus("stale", f"{student_dir / ONNX_DIR} holds files m3distill did not write")
    listed = record.get("variants") or {}
    if any(variant not in listed or not all((student_dir / name).is_file() for name in listed[variant].get("files", []))
           for variant in config.variants):
        return StageStatus("missing")
    from m3distill.exporting import EXPORT_RECORD_FORMAT

    if record.get("format") != EXPORT_RECORD_FORMAT:  # format 1 left an M3 student's sparse and ColBERT outputs out
        return StageStatus("stale", f"the export was made by an earlier m3distill (record format {record.get('format')})")
    fingerprint = export_fingerprint(student_dir, config)
    if record.get("fingerprint") == fingerprint.digest:
        return StageStatus("current")
    return StageStatus("stale", fingerprint.change(record.get("inputs")))


class ExportStage(Stage):
    """The ONNX and int8 exports of ``students`` (student folders), verified on ``dataset_dir``'s test texts.

    Args:
        config: the run's settings (``config.export``), or the export settings alone.
        students: the student folders to export.
        dataset_dir: the dataset whose test texts verify the exports; the bundled sample corpus when it holds none.
        texts: the verification texts themselves, instead of the dataset's.
    """

    name = "export"
    redo_words = "export it again"

    def __init__(self, config: M3DistillConfig | ExportConfig, students: Sequence[str | Path], *,
                 dataset_dir: str | Path | None = None, texts: Sequence[str] | None = None) -> None:
        self.export = config.export if isinstance(config, M3DistillConfig) else config
        self.students = [Path(path) for path in students]
        self.dataset_dir = Path(dataset_dir) if dataset_dir is not None else None
        self.texts = list(texts) if texts is not None else None

    @property
    def inputs(self) -> dict[str, Path | str | None]:
        return {"students": self.students[0].parent if self.students else None, "dataset": self.dataset_dir}

    @property
    def outputs(self) -> dict[str, Path]:
        return {student.name: student / "onnx" for student in self.students}

    def lock_targets(self) -> list[Path]:
        # A student belongs to its students folder, whose lock train holds while it writes: never both at once.
        return [student.parent for student in self.students]

    def fingerprint(self) -> Fingerprint:
        return Fingerprint({student.name: export_fingerprint(student, self.export).digest
                            for student in self.students if student.is_dir()})

    def student_statuses(self) -> dict[Path, StageStatus]:
        """Each student's export: missing (also when the student is not there yet), current or stale."""
        return {student: export_status(student, self.export) if _is_model(student) else StageStatus("missing")
                for student in self.students}

    def status(self) -> StageStatus:
        statuses = self.student_statuses()
        stale = [f"{student.name}: {status.reason}" for student, status in statuses.items() if status.state == "stale"]
        if stale:
            return StageStatus("stale", "; ".join(stale))
        return StageStatus("current" if all(status.current for status in statuses.values()) else "missing")

    def check_inputs(self) -> None:
        for student in self.students:
            if not student.exists():
                raise M3DistillError(f"student folder not found: {student}")
            if not _is_model(student):
                raise M3DistillError(f"{student} is not a sentence-transformers folder (no modules.json)")
            check_student_contents(student)  # a student damaged since it was trained gives no export

    def run(self, *, replace_stale: bool = False, force: bool = False,
            show_progress: bool = True) -> ExportStageResult:
        """Export the missing and stale students (all with ``force``); current ones are reported as skipped.

        A stale export (of an older student, or made with other settings) is replaced by the pipeline and with
        ``force``, and refused otherwise; an ``onnx/`` folder m3distill did not write is refused always.
        """
        from m3distill.exporting import check_onnx_dir_is_ours, read_export_result, verification_texts, write_export

        self.check_inputs()
        self.check_outputs_writable()
        with self.holding_outputs():  # a second command writing the same output is refused
            statuses = self.student_statuses()
            for student, status in statuses.items():
                if status.state != "current" or force:  # every export to replace, before the first is made
                    check_onnx_dir_is_ours(student)
                self.refuse_if_stale(status, replace_stale=replace_stale, force=force,
                                     where=f"the export in {student / 'onnx'}")
            texts = self.texts
            results = []
            for student, status in statuses.items():
                if status.current and not force:
                    logger.info("%s: export up to date, skipped", student.name)
                    results.append(read_export_result(student))
                    continue
                if status.state == "stale":
                    logger.info("%s: re-exporting (%s)", student.name, status.reason)
                texts = texts if texts is not None else verification_texts(self.export, self.dataset_dir)
                results.append(write_export(student, self.export, export_fingerprint(student, self.export),
                                            texts=texts, show_progress=show_progress))
            return ExportStageResult(students=results)


def _is_model(folder: Path) -> bool:
    return (folder / "modules.json").is_file()


def export_targets(paths: Sequence[str | Path]) -> list[Path]:
    """The student folders that ``paths`` name: each a student (any sentence-transformers folder) or a folder of
    students, whose finished students are taken (the others are named in one line of the log, as evaluate does).

    Raises :class:`M3DistillError` for a path that does not exist, is neither, or holds no finished student.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise M3DistillError(f"not found: {path}")
        if _is_model(path):
            found.append(path)
            continue
        if not holds_students(path):
            raise M3DistillError(f"{path} is neither a sentence-transformers folder (no modules.json) nor a folder of "
                                 "students")
        finished, skipped = finished_students(path)
        if skipped:
            logger.warning("exporting %d finished student(s) of %s; skipped %s", len(finished), path,
                           "; ".join(f"{name} ({why})" for name, why in skipped.items()))
        if not finished:
            raise M3DistillError(f"no finished student in {path}; train some with `m3distill train`")
        found += finished
    return list(dict.fromkeys(found))
