"""The export stage: every student as ONNX (float32) and dynamic int8 in its own ``onnx/`` folder
(:func:`m3distill.export.export_student`).

It runs between train and evaluate, in the pipeline only when ``export.enabled``. Each student's export records
its fingerprint (the student's model files and the export settings) in ``onnx/m3distill_export.json``. Nothing
the student's own fingerprints hash changes (``onnx/`` and the model card are outside them), so the train stage still
sees the student as current; the evaluation, which measures the exports too, sees a new export.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from m3distill.config import M3DistillConfig
from m3distill.errors import M3DistillError
from m3distill.stages.base import Stage, StageStatus
from m3distill.stages.fingerprint import Fingerprint

logger = logging.getLogger(__name__)


@dataclass
class ExportStageResult:
    """What the export stage did: one :class:`~m3distill.export.ExportResult` per student (skipped ones too)."""

    students: list = field(default_factory=list)


class ExportStage(Stage):
    """The ONNX and int8 exports of ``students`` (student folders), verified on ``dataset_dir``'s test texts.

    Args:
        config: the run's settings (``config.export``).
        students: the student folders to export.
        dataset_dir: the dataset whose test texts verify the exports; the bundled sample corpus when it holds none.
    """

    name = "export"

    def __init__(self, config: M3DistillConfig, students: Sequence[str | Path], *,
                 dataset_dir: str | Path | None = None) -> None:
        self.config = config
        self.students = [Path(path) for path in students]
        self.dataset_dir = Path(dataset_dir) if dataset_dir is not None else None

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
        from m3distill.export import export_fingerprint

        return Fingerprint({student.name: export_fingerprint(student, self.config.export).digest
                            for student in self.students if student.is_dir()})

    def student_statuses(self) -> dict[Path, StageStatus]:
        """Each student's export: missing (also when the student is not there yet), current or stale."""
        from m3distill.export import student_export_status

        return {student: student_export_status(student, self.config.export) if _is_model(student)
                else StageStatus("missing") for student in self.students}

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

    def run(self, *, replace_stale: bool = False, force: bool = False,
            show_progress: bool = True) -> ExportStageResult:
        """Export the missing and stale students (all with ``force``); current ones are reported as skipped.

        A stale export (of an older student, or made with other settings) is replaced by the pipeline and with
        ``force``, and refused otherwise; an ``onnx/`` folder m3distill did not write is refused always.
        """
        from m3distill.export import check_onnx_dir_is_ours, export_student, verification_texts

        self.check_inputs()
        self.check_outputs_writable()
        with self.holding_outputs():  # a second command writing the same output is refused
            statuses = self.student_statuses()
            for student, status in statuses.items():
                if status.state != "current" or force:  # every export to replace, before the first is made
                    check_onnx_dir_is_ours(student)
                if status.state == "stale" and not (replace_stale or force):
                    raise M3DistillError(
                        f"the export in {student / 'onnx'} is out of date: {status.reason}; pass {self.redo_flag} to "
                        "export it again"
                    )
            texts = None
            results = []
            for student, status in statuses.items():
                if status.state != "current" or force:
                    texts = texts if texts is not None else verification_texts(self.config.export, self.dataset_dir)
                results.append(export_student(student, self.config.export, texts=texts, show_progress=show_progress,
                                              force=force))
            return ExportStageResult(students=results)


def _is_model(folder: Path) -> bool:
    return (folder / "modules.json").is_file()


def export_targets(paths: Sequence[str | Path]) -> list[Path]:
    """The student folders that ``paths`` name: each a student (any sentence-transformers folder) or a folder of
    students, whose finished students are taken (the others are named in one line of the log, as evaluate does).

    Raises :class:`M3DistillError` for a path that does not exist, is neither, or holds no finished student.
    """
    from m3distill.stages.evaluate import _finished_students, _holds_students

    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise M3DistillError(f"not found: {path}")
        if _is_model(path):
            found.append(path)
            continue
        if not _holds_students(path):
            raise M3DistillError(f"{path} is neither a sentence-transformers folder (no modules.json) nor a folder of "
                                 "students")
        finished, skipped = _finished_students(path)
        if skipped:
            logger.warning("exporting %d finished student(s) of %s; skipped %s", len(finished), path,
                           "; ".join(f"{name} ({why})" for name, why in skipped.items()))
        if not finished:
            raise M3DistillError(f"no finished student in {path}; train some with `m3distill train`")
        found += finished
    return list(dict.fromkeys(found))
