"""The evaluate stage: the teacher and its students measured, the report written
(:func:`m3distill.evaluation.evaluate.evaluate_models`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m3distill.atomic import write_json_atomic
from m3distill.config import M3DistillConfig, settings_record
from m3distill.errors import M3DistillError
from m3distill.layout import REPORT_INPUTS_FILE, REPORT_JSON_FILE
from m3distill.fingerprint import CONTENTS, Fingerprint, StageStatus, flatten, read_json
from m3distill.stages.base import Stage, check_device
from m3distill.stages.fingerprint import dataset_fingerprint, teacher_identity
from m3distill.students.folder import (
    check_student_contents,
    compare_student_contents,
    finished_students,
    holds_students,
)

if TYPE_CHECKING:
    from m3distill.report import Report

logger = logging.getLogger(__name__)

# Evaluation settings that change how results are fetched, not what they are.
_EVALUATION_LOGISTICS = ("qdrant_api_key_env",)
# Settings added after reports were first written, with the value that reproduces those reports: at that value they
# are left out of the fingerprint, so upgrading m3distill does not make every finished report look stale.
_ADDED_LATER = {"evaluation.onnx_variants": True, "evaluation.speed.max_tokens_per_batch": None,
                "evaluation.speed.precision": "auto"}


@dataclass
class EvaluationResult:
    """What the evaluate stage did.

    Attributes:
        report_dir: the folder holding report.json, report.md and the plots.
        report: the report (the content of report.json).
        skipped: student folders left out, with why (unfinished, not a student).
        teacher_from_cache: whether the teacher's embeddings came from the teacher cache.
    """

    report_dir: Path
    report: Report
    skipped: dict[str, str] = field(default_factory=dict)
    teacher_from_cache: bool = False


class EvaluateStage(Stage):
    """The report on the teacher and the students.

    ``students`` names the models: folders, or models held in memory by name. When it is None, every finished
    student in ``students_dir`` is evaluated and the others are named in one line of the log. The teacher's
    embeddings come from ``cache_dir`` when that cache was made by the same teacher, in float32.
    """

    name = "evaluate"

    def __init__(
        self,
        config: M3DistillConfig,
        dataset_dir: str | Path,
        out_dir: str | Path,
        *,
        students_dir: str | Path | None = None,
        students: Sequence[str | Path] | Mapping[str, Any] | None = None,
        cache_dir: str | Path | None = None,
        teacher_model: Any = None,
    ) -> None:
        self.config = config
        self.dataset_dir = Path(dataset_dir)
        self.out_dir = Path(out_dir)
        self.students_dir = Path(students_dir) if students_dir is not None else None
        self.students = students
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.teacher_model = teacher_model

    @property
    def inputs(self) -> dict[str, Path | str | None]:
        return {"dataset": self.dataset_dir, "teacher": self.config.teacher.model, "students": self.students_dir,
                "teacher_cache": self.cache_dir}

    @property
    def outputs(self) -> dict[str, Path]:
        return {"report": self.out_dir}

    @cached_property
    def selection(self) -> tuple[list[Path], dict[str, Any], dict[str, str]]:
        """(student folders, students in memory by name, skipped folder -> why)."""
        if isinstance(self.students, Mapping):
            folders = [Path(value) for value in self.students.values() if isinstance(value, (str, Path))]
            in_memory = {name: value for name, value in self.students.items() if not isinstance(value, (str, Path))}
            return folders, in_memory, {}
        if self.students is not None:
            folders, skipped = [], {}
            for path in map(Path, self.students):
                if holds_students(path):  # a students folder given where one student was expected: take its students
                    finished, left_out = finished_students(path)
                    folders += finished
                    skipped.update(left_out)
                else:
                    folders.append(path)
            return folders, {}, skipped
        finished, skipped = finished_students(self.students_dir)
        return finished, {}, skipped

    def fingerprint(self) -> Fingerprint:
        from m3distill.data.real_questions import real_questions_digest
        from m3distill.evaluation.onnx_variants import export_record_digest

        folders, in_memory, _ = self.selection
        students: dict[str, Any] = {}
        for folder in folders:
            # What the report measured: the students' files (weights, heads, tokenizer), so that new weights, from a
            # retrain or copied in, make it stale.
            contents = compare_student_contents(folder)[0] if folder.is_dir() else None
            students[f"students.{folder.name}" + CONTENTS] = contents
            # The report measures a student's ONNX exports too: exporting it, or exporting it again, is news.
            export = export_record_digest(folder) if self.config.evaluation.onnx_variants else None
            if export is not None:
                students[f"students.{folder.name}.onnx_export" + CONTENTS] = export
        for name in in_memory:
            students[f"students.{name}"] = "in memory"
        teacher = teacher_identity(self.config.teacher) if self.teacher_model is None else {"teacher": "in memory"}
        settings = settings_record(self.config.evaluation, exclude=set(_EVALUATION_LOGISTICS))
        settings = {key: value for key, value in flatten("evaluation", settings).items()
                    if key not in _ADDED_LATER or value != _ADDED_LATER[key]}
        # The real questions count by their contents, not by where the file lies; without them, nothing is added
        # (reports from before they existed stay current).
        real_questions = settings.pop("evaluation.real_questions", None)
        if real_questions is not None:
            settings["evaluation.real_questions" + CONTENTS] = real_questions_digest(real_questions)
        return Fingerprint({"dataset" + CONTENTS: dataset_fingerprint(self.dataset_dir), **teacher, **students,
                            **settings})

    def status(self) -> StageStatus:
        if not (self.out_dir / REPORT_JSON_FILE).is_file():
            return StageStatus("missing")
        recorded = read_json(self.out_dir / REPORT_INPUTS_FILE) or {}
        fingerprint = self.fingerprint()
        if recorded.get("fingerprint") == fingerprint.digest:
            return StageStatus("current")
        return StageStatus("stale", fingerprint.change(recorded.get("inputs")))

    def check_inputs(self) -> None:
        from m3distill.data.dataset import require_complete_dataset
        from m3distill.data.real_questions import load_real_questions

        if self.students is None and self.students_dir is not None and not self.students_dir.is_dir():
            raise M3DistillError(f"no students in {self.students_dir}: train some with `m3distill train` or pass "
                                 "--students")
        require_complete_dataset(self.dataset_dir)
        if self.config.evaluation.real_questions:
            load_real_questions(self.config.evaluation.real_questions)
        check_device(self.config.evaluation.device)

    def run(self, *, replace_stale: bool = True, force: bool = False, show_progress: bool = True) -> EvaluationResult:
        """Evaluate and write the report; the old report is replaced only once the new one is complete.

        An evaluation is always run when asked for: its output is a measurement, and the old one stays whole
        until the new one is written, so there is nothing to refuse.
        """
        from m3distill.evaluation.evaluate import InMemory, evaluate_models

        self.check_inputs()
        self.check_outputs_writable()
        with self.holding_outputs():  # a second command writing the same output is refused
            folders, in_memory, skipped = self.selection
            for folder in folders:  # a student damaged since it was trained is no measurement of it
                if folder.is_dir():
                    check_student_contents(folder)
            if skipped:
                logger.warning("evaluating %d finished student(s); skipped %s", len(folders),
                               "; ".join(f"{name} ({why})" for name, why in skipped.items()))
            if not folders and not in_memory:
                logger.warning("no finished student to evaluate: the report covers the teacher alone")
            fingerprint = self.fingerprint()
            used_cache: list[bool] = []

            def teacher_embeddings(texts: list[str]):
                found = self._cached_teacher_embeddings(texts)
                used_cache.append(found is not None)
                return found

            report = evaluate_models(
                self.dataset_dir, self.config.teacher, folders, self.config.evaluation, self.out_dir,
                show_progress=show_progress, in_memory=InMemory(teacher=self.teacher_model, students=in_memory,
                                                                teacher_embeddings=teacher_embeddings),
            )
            write_json_atomic(self.out_dir / REPORT_INPUTS_FILE, fingerprint.to_record())
            return EvaluationResult(report_dir=self.out_dir, report=report, skipped=skipped,
                                    teacher_from_cache=any(used_cache))

    def _cached_teacher_embeddings(self, texts: list[str]):
        """The teacher stage's embeddings of ``texts``, or None so that the evaluation encodes them itself.

        Used only when the cache records the same teacher as this evaluation's (files, revision, sequence length)
        and float32 storage: the evaluation must see exactly what the teacher computes.
        """
        from m3distill.teacher.cache import TeacherCache, read_cache_manifest

        if self.cache_dir is None or self.teacher_model is not None:
            return None
        manifest = read_cache_manifest(self.cache_dir)
        if manifest is None:
            return None
        recorded = manifest.get("inputs") or {}
        wanted = {**teacher_identity(self.config.teacher), "teacher.dtype": "float32"}
        if any(recorded.get(name) != value for name, value in wanted.items()):
            logger.info("evaluating without the teacher cache %s: it was made by another teacher or dtype",
                        self.cache_dir)
            return None
        try:
            return TeacherCache.open(self.cache_dir).get(texts)
        except M3DistillError as error:
            logger.info("evaluating without the teacher cache: %s", error)
            return None
