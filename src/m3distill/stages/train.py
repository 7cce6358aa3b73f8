"""The train stage: one distilled student per layer plan (:func:`m3distill.training.train_students`)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from m3distill.atomic import refuse_files_not_ours, remove_our_folder
from m3distill.config import M3DistillConfig
from m3distill.errors import M3DistillError
from m3distill.stages.base import Stage, StageStatus, check_device
from m3distill.stages.fingerprint import (
    Fingerprint,
    dataset_fingerprint,
    plan_spec,
    student_fingerprint,
)

logger = logging.getLogger(__name__)

# A stale student waits here, beside its folder, until its replacement is complete.
_ASIDE_SUFFIX = ".replaced"


@dataclass
class TrainResult:
    """What the train stage did: one :class:`~m3distill.training.StudentResult` per planned student."""

    out_dir: Path
    students: list = field(default_factory=list)


class TrainStage(Stage):
    """Students of ``config.students`` trained with ``config.training`` on a dataset and its teacher cache.

    Each student's fingerprint (the dataset's, the cache's teacher, the training settings and its own plan) is
    written into its metadata (``m3distill_student.json``), with the hashes of the files it was saved with; a
    finished student whose fingerprint differs, or whose files changed since (a truncated or replaced
    ``model.safetensors``), is retrained (pipeline, or ``--force``) and refused otherwise. The old student stays
    whole beside the new one until the new one is complete.
    """

    name = "train"

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

    def planned(self) -> dict[str, dict]:
        """The students the config asks for: folder name -> plan as the fingerprint sees it."""
        from m3distill.layout import student_name

        students = self.config.students
        if students.explicit:
            return {student_name(layers): plan_spec(len(layers), "explicit", layers, students)
                    for layers in students.explicit}
        return {student_name(tuple(range(count))): plan_spec(count, students.strategy, None, students)
                for count in students.layers}

    def student_fingerprints(self) -> dict[str, Fingerprint]:
        """The fingerprint each planned student must record to be current."""
        from m3distill.teacher.cache import TeacherCache

        from m3distill.m3 import head_files_sha256
        from m3distill.models import local_model_folder

        manifest = TeacherCache.read_manifest(self.cache_dir)
        dataset = dataset_fingerprint(self.dataset_dir)
        teacher = self.config.teacher
        heads = head_files_sha256(local_model_folder(teacher.model, teacher.revision))
        return {name: student_fingerprint(dataset, manifest, self.config.training, spec, heads)
                for name, spec in self.planned().items()}

    def fingerprint(self) -> Fingerprint:
        return Fingerprint({name: fingerprint.digest for name, fingerprint in self.student_fingerprints().items()})

    def student_statuses(self) -> dict[str, StageStatus]:
        """Each planned student's status: missing (absent or unfinished), current or stale."""
        from m3distill.teacher.cache import is_complete_cache
        from m3distill.training import is_trained_student, read_student_metadata
        from m3distill.training.distill import compare_student_contents

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
                statuses[name] = StageStatus("stale", f"{name}: {fingerprint.change(metadata.get('inputs'))}")
                continue
            _, change = compare_student_contents(folder)
            statuses[name] = (StageStatus("current") if change is None else
                              StageStatus("stale", f"{name}: its files changed since it was trained ({change})"))
        return statuses

    def status(self) -> StageStatus:
        statuses = self.student_statuses().values()
        stale = [status for status in statuses if status.state == "stale"]
        if stale:
            return StageStatus("stale", "; ".join(status.reason for status in stale))
        return StageStatus("current" if all(status.current for status in statuses) else "missing")

    def check_inputs(self) -> None:
        from m3distill.data.dataset import require_complete_dataset
        from m3distill.teacher.cache import is_complete_cache

        require_complete_dataset(self.dataset_dir)
        if not is_complete_cache(self.cache_dir):
            raise M3DistillError(f"the teacher cache {self.cache_dir} is missing or incomplete; run teacher first")
        check_device(self.config.training.device or self.config.teacher.device)

    def run(self, *, replace_stale: bool = False, force: bool = False, show_progress: bool = True) -> TrainResult:
        """Train the missing and stale students (all with ``force``); current ones are reported as skipped."""
        from m3distill.distributed import process_group, process_rank
        from m3distill.training import is_trained_student, train_students
        from m3distill.training.distill import student_files

        self.check_inputs()
        self.check_outputs_writable()
        with self.holding_outputs():  # a second command writing the same output is refused
            with process_group() as group:
                # Every process decides from the folders as they are now, before process 0 moves any of them.
                statuses = self.student_statuses()
                for name, status in statuses.items():
                    if status.state == "stale" and not (replace_stale or force):
                        raise M3DistillError(
                            f"{self.out_dir / name} is out of date: {status.reason.split(': ', 1)[1]}; pass "
                            f"{self.redo_flag} to retrain it, or choose another --out"
                        )
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
            try:
                results = train_students(
                    self.dataset_dir, self.cache_dir, teacher=self.config.teacher, students=self.config.students,
                    training=self.config.training, out_dir=self.out_dir, resume=self.resume,
                    show_progress=show_progress,
                )
            except BaseException:
                for name, old in aside.items():
                    if not (self.out_dir / name).exists():  # nothing of the new one yet: the old one goes back
                        os.replace(old, self.out_dir / name)
                raise
            for result in results:
                if result.skipped and "contents" not in result.metadata:
                    logger.info("%s was trained by an earlier m3distill, which did not record the hashes of its files: "
                                "a damaged or replaced file cannot be noticed (--force retrains it with them)",
                                result.name)
            # The replaced students, including any an interrupted earlier retrain left aside, go once the new are
            # whole.
            for name in statuses if process_rank() == 0 else ():
                old = self._aside_path(self.out_dir / name)
                if old.exists() and is_trained_student(self.out_dir / name):
                    _remove_our_student(old, kept_as=self.out_dir / name)
            return TrainResult(out_dir=self.out_dir, students=results)

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
    from m3distill.training.distill import is_m3distill_student_dir, student_files

    if not is_m3distill_student_dir(folder):
        raise M3DistillError(f"{folder} is in the way of a retrain but m3distill did not write it; move it away")
    remove_our_folder(folder, student_files(folder), kept_as=kept_as)


def trained_student_record(training_fingerprint: Fingerprint) -> dict:
    """The fields a finished student's metadata carries for the train stage: its fingerprint (what it was made
    from). What it is, the hashes of its files, is added when it is saved (the evaluation's fingerprint of it)."""
    return training_fingerprint.to_record()
