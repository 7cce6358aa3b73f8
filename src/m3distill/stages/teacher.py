"""The teacher stage: every dataset text embedded once (:func:`m3distill.teacher.cache.build_teacher_cache`)."""

from __future__ import annotations

import logging
import shutil
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from m3distill.atomic import refuse_files_not_ours
from m3distill.config import M3DistillConfig, TeacherConfig
from m3distill.errors import M3DistillError
from m3distill.fingerprint import CONTENTS, Fingerprint, StageStatus
from m3distill.stages.base import Stage, check_device
from m3distill.stages.fingerprint import dataset_fingerprint, teacher_identity, teacher_made_by

if TYPE_CHECKING:
    from m3distill.teacher.cache import CacheSummary

logger = logging.getLogger(__name__)

_DATASET_PART = "dataset" + CONTENTS


class TeacherStage(Stage):
    """The teacher cache of a dataset.

    The fingerprint is the dataset's plus the teacher's identity (its files, or hub id and revision), its maximum
    sequence length, the storage dtype and, when it is not fp32, the precision the teacher computes in on this
    machine (``teacher.precision`` resolved: ``auto`` is bf16 on a GPU, so a cache made in fp32 on a CPU is stale
    on a GPU machine and the other way round; caches made before precision was recorded are fp32 and stay
    current). Batching (``batch_size``, ``max_tokens_per_batch``) moves the embeddings by float error only and is
    not part of it. A cache behind only on the dataset is extended (the texts it already holds stay valid); a cache
    of another teacher or precision is cleared first (pipeline) or refused (standalone).

    Under torchrun every process runs the stage: they decide alike from the same files, process 0 alone clears
    the cache, and :func:`~m3distill.teacher.cache.build_teacher_cache` shares out the shards.
    """

    name = "teacher"

    def __init__(self, config: M3DistillConfig | TeacherConfig, dataset_dir: str | Path, out_dir: str | Path) -> None:
        self.teacher = config.teacher if isinstance(config, M3DistillConfig) else config
        self.dataset_dir = Path(dataset_dir)
        self.out_dir = Path(out_dir)

    @property
    def inputs(self) -> dict[str, Path | str | None]:
        return {"dataset": self.dataset_dir, "teacher": self.teacher.model}

    @property
    def outputs(self) -> dict[str, Path]:
        return {"teacher_cache": self.out_dir}

    @cached_property
    def teacher_parts(self) -> dict:
        """The teacher's identity parts (its files hashed once per stage object)."""
        parts = {**teacher_identity(self.teacher), "teacher.dtype": self.teacher.dtype}
        precision = self._precision()
        if precision != "fp32":  # absent for fp32, so caches made before precision was recorded stay current
            parts["teacher.precision"] = precision
        return parts

    def _precision(self) -> str:
        """The precision the teacher computes in on this machine (``teacher.precision`` resolved)."""
        import torch

        from m3distill.encoding import resolve_precision
        from m3distill.models import process_device, resolve_device

        device = process_device(self.teacher.device)
        try:
            device = resolve_device(device)
        except M3DistillError as error:
            try:
                torch.device(device)
            except (RuntimeError, ValueError):
                raise error from None  # not a device name at all: the one line resolve_device gave
            # a device this machine lacks (cuda:7): running says so; its kind is all the precision needs
        return resolve_precision(self.teacher.precision, device or "cpu")

    def fingerprint(self) -> Fingerprint:
        return Fingerprint({_DATASET_PART: dataset_fingerprint(self.dataset_dir), **self.teacher_parts})

    def status(self) -> StageStatus:
        from m3distill.teacher.cache import damaged_shards, read_cache_manifest

        manifest = read_cache_manifest(self.out_dir)
        if manifest is None:
            # Unfinished: resumed, unless another teacher (dtype, precision) began it.
            change = self._teacher_change()
            return StageStatus("missing") if change is None else StageStatus("stale", change)
        fingerprint = self.fingerprint()
        if manifest.get("fingerprint") != fingerprint.digest:
            recorded = manifest.get("inputs")
            # A cache from before the stage's record: what its teacher.json says, when the teacher changed.
            why = fingerprint.change(recorded) if isinstance(recorded, dict) else self._teacher_change()
            return StageStatus("stale", why or fingerprint.change(None))
        damaged = damaged_shards(self.out_dir)
        if damaged:
            # Unfinished, not stale: the run embeds the damaged shards' texts again and keeps the rest.
            logger.warning("teacher cache %s is damaged (%s); embedding those texts again", self.out_dir,
                           "; ".join(f"shard {name} {why}" for name, why in damaged.items()))
            return StageStatus("missing")
        return StageStatus("current")

    def _teacher_change(self) -> str | None:
        """What differs between this teacher (files or hub id and revision, sequence length, dtype, precision) and
        the one whose embeddings the cache holds, finished or not; None when they are the same or the folder holds
        no cache: only then may the cache be extended (a cache behind on the dataset alone gets the new texts)."""
        from m3distill.teacher.cache import read_cache_manifest, read_cache_owner

        recorded = (read_cache_manifest(self.out_dir) or {}).get("inputs")
        if isinstance(recorded, dict):
            made_by = {name: value for name, value in recorded.items() if name.startswith("teacher.")}
        else:
            # A cache made before the stage's record, or not finished: its teacher.json says who began it.
            owner = read_cache_owner(self.out_dir)
            if owner is None:
                return None
            made_by = {**teacher_made_by(self.teacher_parts, owner["fingerprint"]), "teacher.dtype": owner["dtype"]}
            if owner["precision"] != "fp32":
                made_by["teacher.precision"] = owner["precision"]
        # Both ways: a part recorded then and absent now (precision back to fp32) is a change too.
        return None if made_by == self.teacher_parts else Fingerprint(self.teacher_parts).change(made_by)

    def check_inputs(self) -> None:
        from m3distill.data.dataset import require_complete_dataset

        require_complete_dataset(self.dataset_dir)
        check_device(self.teacher.device)

    def check_clearable(self) -> None:
        """Raise :class:`M3DistillError` unless the cache may be removed to be rebuilt: it carries m3distill's
        marker and holds nothing m3distill did not write (those files are named)."""
        from m3distill.teacher.cache import CACHE_FILES, CACHE_TEACHER_FILE

        if not self.out_dir.exists():
            return
        # teacher.json is written before any shard; a "manifest.json" alone is too common a name to prove anything.
        if not (self.out_dir / CACHE_TEACHER_FILE).is_file():
            raise M3DistillError(
                f"{self.out_dir} is not a teacher cache m3distill wrote (no {CACHE_TEACHER_FILE}); it is left alone: "
                "move it away or choose another output folder"
            )
        refuse_files_not_ours(self.out_dir, CACHE_FILES, replacing="rebuilding the teacher cache")

    def clear(self) -> None:
        """Remove the cache so that it is rebuilt, only when :meth:`check_clearable` allows it."""
        self.check_clearable()
        if self.out_dir.exists():
            logger.info("removing %s to rebuild the teacher cache", self.out_dir)
            shutil.rmtree(self.out_dir)

    def run(self, *, replace_stale: bool = False, force: bool = False, show_progress: bool = True) -> CacheSummary:
        """Build, resume or extend the cache; returns :class:`m3distill.teacher.cache.CacheSummary`."""
        from m3distill.distributed import process_group
        from m3distill.teacher.cache import build_teacher_cache

        self.check_inputs()
        self.check_outputs_writable()
        with self.holding_outputs():  # a second command writing the same output is refused
            with process_group() as group:
                # Every process decides from the files as they are now, before process 0 may clear them.
                replace = force or self._teacher_change() is not None
                if replace:
                    self.refuse_if_stale(self.status(), replace_stale=replace_stale, force=force)
                    self.check_clearable()  # in every process: a refusal must end all of them, not leave them waiting
                group.barrier()
                if replace and group.is_main:
                    self.clear()
                group.barrier()
                # Shards are keyed by text: a dataset that changed only gets its new texts embedded.
                return build_teacher_cache(self.dataset_dir, self.teacher, self.out_dir, show_progress=show_progress,
                                           inputs=self.fingerprint().to_record())
