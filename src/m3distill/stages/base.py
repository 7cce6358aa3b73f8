"""What every stage is: inputs, outputs, one fingerprint, ``status()`` / ``is_current()`` and ``run()``.

The pipeline and the standalone commands hold the same stage objects, so they decide alike: a current output is
reused, a missing one is made, and a stale one (outputs present, fingerprint different) is redone by the pipeline
and refused by a standalone command with one line naming what changed and the flag that redoes it. While a stage
runs it holds the lock of what it writes (:mod:`m3distill.locks`): a second command on the same output, alone or in
a pipeline, is refused in one line naming the process that runs the first.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from m3distill.atomic import check_can_create
from m3distill.errors import M3DistillError
from m3distill.locks import hold_outputs
from m3distill.fingerprint import Fingerprint, StageStatus

logger = logging.getLogger(__name__)

__all__ = ["Stage", "StageStatus", "check_device"]


def check_device(device: str | None) -> None:
    """Raise :class:`M3DistillError` when ``device`` (a stage's setting; under torchrun, this process's) is not one
    this machine has, so that the stage ends at its start, having touched nothing."""
    from m3distill.models import process_device, resolve_device  # here: m3distill imports without torch

    resolve_device(process_device(device))


class Stage(ABC):
    """One step of the pipeline, reading and writing folders of the run directory."""

    name: ClassVar[str]
    redo_flag: ClassVar[str] = "--force"
    # What the refusal of a stale output says the flag does.
    redo_words: ClassVar[str] = "redo it, or choose another output"

    @property
    @abstractmethod
    def inputs(self) -> dict[str, Path | str | None]:
        """What the stage reads, by name."""

    @property
    @abstractmethod
    def outputs(self) -> dict[str, Path]:
        """What the stage writes, by name."""

    @abstractmethod
    def fingerprint(self) -> Fingerprint:
        """Its own settings and the fingerprints or contents of what it reads (computed now, from the inputs)."""

    @abstractmethod
    def status(self) -> StageStatus:
        """Whether the outputs are missing, current or stale, compared with the fingerprint they record."""

    def is_current(self) -> bool:
        """True when the outputs exist and were made from the current inputs and settings."""
        return self.status().current

    def check_inputs(self) -> None:
        """Raise :class:`M3DistillError` when an input is missing or a device is not on this machine; called before
        any output is touched (or locked)."""

    def check_outputs_writable(self) -> None:
        """Raise :class:`M3DistillError` when a folder the stage writes into cannot be written.

        Called before any work, so a read-only or blocked output location ends the stage in one line at its start
        rather than after hours of teacher or training time. Creates nothing.
        """
        for output in self.outputs.values():
            check_can_create(output)

    def lock_targets(self) -> list[Path]:
        """The folders whose locks the stage holds while it runs: its outputs."""
        return list(self.outputs.values())

    @contextmanager
    def holding_outputs(self) -> Iterator[None]:
        """Hold the lock of every folder of :meth:`lock_targets` (see :func:`m3distill.locks.hold_outputs`), or
        raise :class:`M3DistillError` naming the process that holds one."""
        with hold_outputs(self.lock_targets(), doing=self.name):
            yield

    @abstractmethod
    def run(self, *, replace_stale: bool = False, force: bool = False, show_progress: bool = True) -> Any:
        """Bring the outputs up to date and return the stage's typed result.

        Args:
            replace_stale: redo outputs made from other inputs (the pipeline); without it they are refused.
            force: redo the outputs even when they are current.
            show_progress: show progress bars.
        """

    def refuse_if_stale(self, status: StageStatus, *, replace_stale: bool, force: bool,
                        where: str | Path | None = None) -> None:
        """The standalone rule: a stale output is never silently reused nor silently replaced.

        Raises :class:`M3DistillError` for a ``stale`` status unless the pipeline (``replace_stale``) or ``force``
        redoes it, naming ``where`` (the stage's first output when None), what changed and the flag that redoes it.
        """
        if status.state == "stale" and not (replace_stale or force):
            where = where if where is not None else next(iter(self.outputs.values()))
            raise M3DistillError(f"{where} is out of date: {status.reason}; pass {self.redo_flag} to {self.redo_words}")
