"""The synth stage: a corpus -> the dataset directory (:func:`m3distill.data.synth.write_dataset`)."""

from __future__ import annotations

import logging
import time
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from m3distill.config import M3DistillConfig, SynthConfig
from m3distill.errors import M3DistillError
from m3distill.fingerprint import CONTENTS, Fingerprint, StageStatus, flatten, read_json
from m3distill.layout import DATASET_MANIFEST_FILE
from m3distill.stages.base import Stage

if TYPE_CHECKING:
    from m3distill.data.synth import SynthInputs, SynthSummary

logger = logging.getLogger(__name__)


def _parts(inputs: dict) -> dict:
    """synth's recorded inputs (corpus and tokenizer hashes, settings) as fingerprint parts."""
    return {
        "synth.corpus" + CONTENTS: inputs.get("corpus"),
        "synth.general" + CONTENTS: inputs.get("general"),
        "tokenizer" + CONTENTS: inputs.get("tokenizer"),
        **flatten("synth", inputs.get("settings") or {}),
    }


class SynthStage(Stage):
    """Contexts, questions and splits from ``config.synth.corpus``, written to ``out_dir``.

    The fingerprint is the dataset manifest's ``input_hash``: the corpus and general contents, the tokenizer's
    vocabulary and the synth settings, never the paths they were read from. The inputs are read once, for the
    fingerprint, and handed to the worker.

    Args:
        config: the run's settings, or the synth settings alone (then ``tokenizer`` is needed unless
            ``synth.tokenizer`` is set).
        out_dir: the dataset folder.
        tokenizer: the model whose tokenizer counts tokens (default: ``synth.tokenizer``, else the teacher).
    """

    name = "synth"
    redo_flag = "--overwrite"

    def __init__(self, config: M3DistillConfig | SynthConfig, out_dir: str | Path, *,
                 tokenizer: str | Path | None = None) -> None:
        self.synth = config.synth if isinstance(config, M3DistillConfig) else config
        teacher = config.teacher.model if isinstance(config, M3DistillConfig) else None
        self.tokenizer = str(tokenizer or self.synth.tokenizer or teacher or "")
        if not self.tokenizer:
            raise ValueError("SynthStage needs a tokenizer: pass one, set synth.tokenizer, or give the whole config")
        self.out_dir = Path(out_dir)

    @property
    def inputs(self) -> dict[str, Path | str | None]:
        return {"corpus": self.synth.corpus, "general": self.synth.general, "tokenizer": self.tokenizer}

    @property
    def outputs(self) -> dict[str, Path]:
        return {"dataset": self.out_dir}

    @cached_property
    def _read(self) -> SynthInputs:
        # Reading the corpus is the expensive part: once per stage object, for the fingerprint and the worker.
        from m3distill.data.synth import read_synth_inputs

        return read_synth_inputs(self.synth, tokenizer=self.tokenizer)

    def fingerprint(self) -> Fingerprint:
        return Fingerprint(_parts(self._read.record), digest=self._read.input_hash)

    def check_inputs(self) -> None:
        from m3distill.data.synth import NO_CORPUS

        if self.synth.corpus is None:
            raise M3DistillError(NO_CORPUS)

    def status(self) -> StageStatus:
        from m3distill.data.dataset import is_complete_dataset

        if not is_complete_dataset(self.out_dir):
            return StageStatus("missing")
        self.check_inputs()
        manifest = read_json(self.out_dir / DATASET_MANIFEST_FILE) or {}
        fingerprint = self.fingerprint()
        if manifest.get("input_hash") == fingerprint.digest:
            return StageStatus("current")
        recorded = manifest.get("inputs")
        return StageStatus("stale", fingerprint.change(_parts(recorded) if isinstance(recorded, dict) else None))

    def run(self, *, replace_stale: bool = False, force: bool = False, show_progress: bool = True) -> SynthSummary:
        """Write the dataset, or find it current; returns :class:`m3distill.data.synth.SynthSummary`."""
        from m3distill.data.synth import read_dataset_summary, write_dataset

        started = time.perf_counter()
        self.check_inputs()
        self.check_outputs_writable()
        with self.holding_outputs():  # a second command writing the same output is refused
            status = self.status()
            if status.current and not force:
                logger.info("%s is up to date (same inputs and settings)", self.out_dir)
                return read_dataset_summary(self.out_dir, time.perf_counter() - started)
            self.refuse_if_stale(status, replace_stale=replace_stale, force=force)
            # The dataset is replaced only once the new one is complete, and only a folder with its manifest. Inputs
            # already read for the fingerprint are handed on (a missing dataset's are read by the worker, after it
            # has checked the output folder and the question generator).
            return write_dataset(self.synth, self.out_dir, tokenizer=self.tokenizer,
                                 overwrite=force or status.state == "stale" or replace_stale,
                                 show_progress=show_progress, inputs=self.__dict__.get("_read"))


def synthesize(config: SynthConfig, out_dir: str | Path, *, tokenizer: str | Path, overwrite: bool = False,
               show_progress: bool = True) -> SynthSummary:
    """The dataset of ``config`` in ``out_dir``, decided as ``m3distill synth`` does (see :class:`SynthStage`): a
    current dataset is returned as up to date, a missing one written, and one made from other inputs refused unless
    ``overwrite``.

    Args:
        config: the synth settings; ``config.corpus`` must be set.
        out_dir: the dataset directory (usually ``<run_dir>/dataset``).
        tokenizer: model folder or hub id whose tokenizer counts context tokens (the teacher's).
        overwrite: redo the dataset, also one made from other inputs.
        show_progress: show progress bars.
    """
    return SynthStage(config, out_dir, tokenizer=tokenizer).run(force=overwrite, show_progress=show_progress)
