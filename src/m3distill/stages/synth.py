"""The synth stage: a corpus -> the dataset directory (:func:`m3distill.data.synth.synthesize`)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from m3distill.config import M3DistillConfig
from m3distill.errors import M3DistillError
from m3distill.layout import DATASET_MANIFEST_FILE
from m3distill.stages.base import Stage, StageStatus
from m3distill.stages.fingerprint import CONTENTS, Fingerprint, flatten, read_json


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
    vocabulary and the synth settings, never the paths they were read from.
    """

    name = "synth"
    redo_flag = "--overwrite"

    def __init__(self, config: M3DistillConfig, out_dir: str | Path) -> None:
        self.config = config
        self.out_dir = Path(out_dir)

    @property
    def tokenizer(self) -> str:
        return self.config.synth.tokenizer or self.config.teacher.model

    @property
    def inputs(self) -> dict[str, Path | str | None]:
        return {"corpus": self.config.synth.corpus, "general": self.config.synth.general, "tokenizer": self.tokenizer}

    @property
    def outputs(self) -> dict[str, Path]:
        return {"dataset": self.out_dir}

    @cached_property
    def _fingerprint(self) -> Fingerprint:
        from m3distill.data.synth import hash_synth_inputs, synth_inputs

        inputs = synth_inputs(self.config.synth, tokenizer=self.tokenizer)
        return Fingerprint(_parts(inputs), digest=hash_synth_inputs(inputs))

    def fingerprint(self) -> Fingerprint:
        # Reading the corpus is the expensive part: once per stage object.
        return self._fingerprint

    def check_inputs(self) -> None:
        if self.config.synth.corpus is None:
            raise M3DistillError("no corpus configured: set synth.corpus in the config (a file, folder or dataset id)")

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

    def run(self, *, replace_stale: bool = False, force: bool = False, show_progress: bool = True):
        """Write the dataset (or find it current); returns :class:`m3distill.data.synth.SynthSummary`."""
        from m3distill.data.synth import synthesize

        self.check_inputs()
        self.check_outputs_writable()
        with self.holding_outputs():  # a second command writing the same output is refused
            status = self.status()
            self.refuse_if_stale(status, replace_stale=replace_stale, force=force)
            # synthesize replaces the dataset only once the new one is complete, and only a folder with its manifest.
            return synthesize(self.config.synth, self.out_dir, tokenizer=self.tokenizer,
                              overwrite=force or status.state == "stale" or replace_stale, show_progress=show_progress)
