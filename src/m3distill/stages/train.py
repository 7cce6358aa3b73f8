"""The train stage: one distilled student per layer plan (:func:`m3distill.training.distil_students`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from m3distill.atomic import refuse_files_not_ours, remove_our_folder
from m3distill.config import DEFAULT_TEACHER, M3DistillConfig, StudentsConfig, TeacherConfig, TrainingConfig
from m3distill.errors import M3DistillError
from m3distill.fingerprint import Fingerprint, StageStatus
from m3distill.layout import student_name
from m3distill.stages.base import Stage, check_device
from m3distill.stages.fingerprint import dataset_fingerprint, teacher_identity, teacher_made_by
from m3distill.students.folder import (
    compare_student_contents,
    is_m3distill_student_dir,
    is_trained_student,
    read_student_metadata,
    student_files,
)

if TYPE_CHECKING:
    from m3distill.training import StudentResult

logger = logging.getLogger(__name__)

# A stale student waits here, beside its folder, until its replacement is complete.
_ASIDE_SUFFIX = ".replaced"


@dataclass
class TrainResult:
    """What the train stage did: one :class:`~m3distill.training.StudentResult` per planned student (those found
    current with ``skipped=True``)."""

    out_dir: Path
    students: list[StudentResult] = field(default_factory=list)


class TrainStage(Stage):
    """Students of ``config.students`` trained with ``config.training`` on a dataset and its teacher cache.

    Each student's fingerprint (the dataset's, the cache's teacher, the training settings and its own plan) is
    written into its metadata (``m3distill_student.json``), with the hashes of the files it was saved with; a
    finished student whose fingerprint differs, or whose files changed since (a truncated or replaced
    ``model.safetensors``), is retrained (pipeline, or ``--force``) and refused otherwise. The old student stays
    whole beside the new one until the new one is complete. Only the missing and stale students (all with
    ``force``) are handed to the training; the current ones are read from their folders.
    """

    name = "train"
    redo_words = "retrain it, or choose another --out"

    def __init__(self, config: M3DistillConfig, dataset_dir: str | Path, cache_dir: str | Path, out_dir: str | Path,
                 *, resume: bool = True) -> None:
        self.config = config
        self.dataset_dir = Path(dataset_dir)
        self.cache_dir = Path(cache_dir)
        self.out_dir = Path(out_dir)
        self.resume = resume

    @property
    def inputs(self) -> dict[str, Path | str | None]:
        return {"dataset": self.dataset_dir, "teacher_cache": self.cache_dir}

    @property
    def outputs(self) -> dict[str, Path]:
        return {"students": self.out_dir}

    @property
    def teacher(self) -> TeacherConfig:
        """The teacher the students learn from: the config's, or, when ``teacher.model`` is left at its default,
        the teacher that made the cache (so that ``m3distill train --cache DIR`` needs no ``--teacher``)."""
        from m3distill.teacher.cache import read_cache_manifest

        teacher = self.config.teacher
        manifest = read_cache_manifest(self.cache_dir) if teacher.model == DEFAULT_TEACHER else None
        if manifest is not None and isinstance(manifest.get("teacher"), dict):
            teacher = teacher.model_copy(update={"model": manifest["teacher"]["name"]})
        return teacher

    def planned(self) -> dict[str, dict]:
        """The students the config asks for: folder name -> plan as the fingerprint sees it."""
        from m3distill.training.record import plan_spec

        students = self.config.students
        if students.explicit:
            return {student_name(layers): plan_spec(len(layers), "explicit", layers, students)
                    for layers in students.explicit}
        return {student_name(tuple(range(count))): plan_spec(count, students.strategy, None, students)
                for count in students.layers}

    def student_fingerprints(self) -> dict[str, Fingerprint]:
        """The fingerprint each planned student must record to be current."""
        from m3distill.m3 import head_files_sha256
        from m3distill.models import local_model_folder
        from m3distill.teacher.cache import TeacherCache
        from m3distill.training.record import student_fingerprint

        manifest = TeacherCache.read_manifest(self.cache_dir)
        dataset = dataset_fingerprint(self.dataset_dir)
        teacher = self.teacher
        heads = head_files_sha256(local_model_folder(teacher.model, teacher.revision))
        return {name: student_fingerprint(dataset, manifest, self.config.training, spec, heads)
                for name, spec in self.planned().items()}

    def fingerprint(self) -> Fingerprint:
        return Fingerprint({name: fingerprint.digest for name, fingerprint in self.student_fingerprints().items()})

    def student_statuses(self) -> dict[str, StageStatus]:
        """Each planned student's status: missing (absent or unfinished), current or stale (the reason without the
        student's name)."""
        from m3distill.teacher.cache import is_complete_cache

        if not is_complete_cache(self.cache_dir):
            return {name: StageStatus("missing") for name in self.planned()}
        statuses = {}
        for name, fingerprint in self.student_fingerprints().items():
            folder = self.out_dir / name
            if not is_trained_student(folder):
                statuses[name] = StageStatus("missing")
                continue
            metadata = read_student_metadata(folder)
            if metadata.get("fingerprint") != fingerprint.digest:
                statuses[name] = StageStatus("stale", fingerprint.change(metadata.get("inputs")))
                continue
            _, change = compare_student_contents(folder)
            statuses[name] = (StageStatus("current") if change is None else
                              StageStatus("stale", f"its files changed since it was trained ({change})"))
        return statuses

    def status(self) -> StageStatus:
        statuses = self.student_statuses()
        stale = [f"{name}: {status.reason}" for name, status in statuses.items() if status.state == "stale"]
        if stale:
            return StageStatus("stale", "; ".join(stale))
        return StageStatus("current" if all(status.current for status in statuses.values()) else "missing")

    def check_inputs(self) -> None:
        from m3distill.data.dataset import require_complete_dataset
        from m3distill.teacher.cache import TeacherCache

        require_complete_dataset(self.dataset_dir)
        TeacherCache.read_manifest(self.cache_dir)  # raises, naming what is missing: run teacher first
        self._check_cache_teacher()
        check_device(self.config.training.device or self.teacher.device)

    def _check_cache_teacher(self) -> None:
        """Raise :class:`M3DistillError` when the cache was made by another teacher than :attr:`teacher` (its
        files, or hub id and revision, and a maximum sequence length set in the config)."""
        from m3distill.models import check_model_found
        from m3distill.teacher.cache import read_cache_manifest

        check_model_found(self.teacher.model)
        identity = teacher_identity(self.teacher)
        made_by = teacher_made_by(identity, (read_cache_manifest(self.cache_dir) or {}).get("teacher") or {})
        if any(made_by.get(name) != value for name, value in identity.items()):
            raise M3DistillError(
                f"teacher cache {self.cache_dir} was made by another teacher: {Fingerprint(identity).change(made_by)}; "
                "use the teacher that made it (--teacher), or build a cache of this one with `m3distill teacher`"
            )

    def run(self, *, replace_stale: bool = False, force: bool = False, show_progress: bool = True) -> TrainResult:
        """Train the missing and stale students (all with ``force``); current ones are reported as skipped."""
        from m3distill.distributed import process_group, process_rank

        self.check_inputs()
        self.check_outputs_writable()
        with self.holding_outputs():  # a second command writing the same output is refused
            with process_group() as group:
                # Every process decides from the folders as they are now, before process 0 moves any of them.
                statuses = self.student_statuses()
                for name, status in statuses.items():
                    self.refuse_if_stale(status, replace_stale=replace_stale, force=force, where=self.out_dir / name)
                redo = [name for name, status in statuses.items()
                        if status.state == "stale" or (force and status.current)]
                for name in redo:  # in every process: a refusal must end all of them, not leave them waiting
                    refuse_files_not_ours(self.out_dir / name, student_files(self.out_dir / name),
                                          replacing="retraining the student")
                group.barrier()
                # Under torchrun only process 0 sets old students aside (and later restores or removes them): a
                # second process would find the folder gone, or take the copy just set aside for a leftover and
                # delete it.
                aside = {name: self._set_aside(self.out_dir / name) for name in redo} if group.is_main else {}
                group.barrier()
            to_train = [name for name, status in statuses.items() if not status.current or name in redo]
            trained = self._train(to_train, aside, show_progress=show_progress)
            # The replaced students, including any an interrupted earlier retrain left aside, go once the new are
            # whole.
            for name in statuses if process_rank() == 0 else ():
                old = self._aside_path(self.out_dir / name)
                if old.exists() and is_trained_student(self.out_dir / name):
                    _remove_our_student(old, kept_as=self.out_dir / name)
            return TrainResult(out_dir=self.out_dir,
                               students=[trained.get(name) or self._current(name) for name in statuses])

    def _train(self, names: list[str], aside: dict[str, Path], *, show_progress: bool) -> dict[str, StudentResult]:
        """Train the students ``names`` (none: the teacher is not even loaded); on failure, each set-aside student
        whose replacement has not begun goes back."""
        from m3distill.training import distil_students

        if not names:
            return {}
        try:
            results = distil_students(
                self.dataset_dir, self.cache_dir, teacher=self.teacher, students=self._students_named(names),
                training=self.config.training, out_dir=self.out_dir, resume=self.resume, show_progress=show_progress,
            )
        except BaseException:
            for name, old in aside.items():
                if not (self.out_dir / name).exists():  # nothing of the new one yet: the old one goes back
                    os.replace(old, self.out_dir / name)
            raise
        return {result.name: result for result in results}

    def _students_named(self, names: list[str]) -> StudentsConfig:
        """``config.students`` narrowed to the students ``names`` (the search settings kept)."""
        students = self.config.students
        if students.explicit:
            return students.model_copy(update={"explicit": [layers for layers in students.explicit
                                                            if student_name(layers) in names]})
        return students.model_copy(update={"layers": [count for count in students.layers
                                                      if student_name(tuple(range(count))) in names]})

    def _current(self, name: str) -> StudentResult:
        """A current student, read from its folder."""
        from m3distill.training import StudentResult

        folder = self.out_dir / name
        metadata = read_student_metadata(folder)
        if "contents" not in metadata:
            logger.info("%s was trained by an earlier m3distill, which did not record the hashes of its files: a "
                        "damaged or replaced file cannot be noticed (--force retrains it with them)", name)
        logger.info("%s is already trained; skipping it", folder)
        return StudentResult.from_metadata(folder, metadata, skipped=True)

    @staticmethod
    def _aside_path(folder: Path) -> Path:
        return folder.with_name(f".{folder.name}{_ASIDE_SUFFIX}")

    def _set_aside(self, folder: Path) -> Path:
        """Move a finished student out of the way of its replacement (it has m3distill's marker: it is ours)."""
        aside = self._aside_path(folder)
        if aside.exists():
            # An older stale copy of the same student, left by an interrupted retrain.
            _remove_our_student(aside, kept_as=folder)
        logger.info("retraining %s; the old student stays in %s until the new one is complete", folder.name, aside)
        os.replace(folder, aside)
        return aside


def _remove_our_student(folder: Path, *, kept_as: Path | None = None) -> None:
    """Delete a set-aside student, only when it carries m3distill's student marker; anything else is the user's,
    and so are files in it that m3distill did not write (the folder is then kept, see remove_our_folder)."""
    if not is_m3distill_student_dir(folder):
        raise M3DistillError(f"{folder} is in the way of a retrain but m3distill did not write it; move it away")
    remove_our_folder(folder, student_files(folder), kept_as=kept_as)


def train_students(
    dataset_dir: str | Path,
    cache_dir: str | Path,
    *,
    teacher: TeacherConfig,
    students: StudentsConfig | Sequence[Sequence[int]],
    training: TrainingConfig,
    out_dir: str | Path,
    resume: bool = True,
    show_progress: bool = True,
) -> list[StudentResult]:
    """The students of ``students`` in ``out_dir``, decided as ``m3distill train`` does (see :class:`TrainStage`): a
    current student is read from its folder, a missing or unfinished one trained (resumed with ``resume``), and one
    trained from other inputs or settings refused.

    Args:
        dataset_dir: dataset directory from ``m3distill synth``.
        cache_dir: teacher cache from ``m3distill teacher`` made by ``teacher``.
        teacher: the teacher settings.
        students: the ``students`` config section, or explicit layer lists.
        training: the training settings.
        out_dir: folder receiving one sub-folder per student.
        resume: continue each unfinished student from its latest checkpoint.
        show_progress: show progress bars.
    """
    if not isinstance(students, StudentsConfig):
        students = StudentsConfig(explicit=[list(layers) for layers in students])
    config = M3DistillConfig(teacher=teacher, students=students, training=training)
    return TrainStage(config, dataset_dir, cache_dir, out_dir, resume=resume).run(show_progress=show_progress).students
