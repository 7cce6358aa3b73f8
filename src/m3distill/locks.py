"""Locks: one process at a time writes a run directory or an output folder.

Every command that writes takes the lock of what it writes, ``run`` and ``demo`` the run directory's too: a second
command on the same output is refused at its start, in one line naming the process that holds it, instead of both
writing the same folder (two ``train`` on one ``--out`` gave a corrupt student). The lock of an output folder is a
hidden file beside it (``.NAME.lock``, with ``.NAME.lock.owner`` naming the holder), since the folder itself is
replaced when the output is redone; the run directory's is ``RUN_DIR/.lock``. The operating system releases a lock
whose process died, so a killed run never leaves its output locked.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from m3distill.atomic import describe_os_error
from m3distill.errors import M3DistillError

RUN_DIR_LOCK_FILE = ".lock"


@contextmanager
def hold_lock(lock_file: str | os.PathLike[str], *, holds: str, instead: str, doing: str = "") -> Iterator[None]:
    """Hold ``lock_file`` while the block runs, or raise :class:`M3DistillError` naming the process holding it.

    Args:
        lock_file: the lock file (created, with its folder, when missing).
        holds: what the lock stands for, for the message: ``"run directory runs/x"``, ``"runs/x/students"``.
        instead: what to do instead, for the message: ``"use another run directory"``.
        doing: what this process does, recorded for a refused one to read (``"train"``).
    """
    lock_file = Path(lock_file)
    owner = lock_file.with_name(lock_file.name + ".owner")
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_file)
        lock.acquire(timeout=0)
    except Timeout:
        try:
            holder = owner.read_text(encoding="utf-8").strip()
        except OSError:
            holder = ""
        raise M3DistillError(
            f"{holds} is in use by {holder or 'another m3distill process'}; wait for it to finish or {instead}"
        ) from None
    except OSError as error:
        raise M3DistillError(describe_os_error(error, lock_file.parent)) from error
    try:
        owner.write_text(f"m3distill process {os.getpid()}{f' ({doing})' if doing else ''}", encoding="utf-8")
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


def output_lock_file(output: str | os.PathLike[str]) -> Path:
    """The lock file of an output folder: hidden, beside it (the folder itself is replaced when redone)."""
    output = Path(output).expanduser().absolute()
    return output.with_name(f".{output.name}.lock")


@contextmanager
def hold_outputs(outputs: list[Path], *, doing: str) -> Iterator[None]:
    """Hold the lock of each folder in ``outputs`` while the block runs (see :func:`hold_lock`).

    Under torchrun only process 0 takes them: the processes of one run write the same output together.
    """
    from m3distill.distributed import process_rank  # here: m3distill imports without torch (the ONNX encoder)

    if process_rank() != 0:
        yield
        return
    with ExitStack() as stack:
        for output in dict.fromkeys(Path(output).expanduser().absolute() for output in outputs):
            stack.enter_context(hold_lock(output_lock_file(output), holds=str(output),
                                          instead="choose another output folder", doing=doing))
        yield


@contextmanager
def hold_run_dir(root: str | os.PathLike[str]) -> Iterator[None]:
    """Hold a run directory for this process: two runs in one directory would delete each other's outputs."""
    with hold_lock(Path(root) / RUN_DIR_LOCK_FILE, holds=f"run directory {root}", instead="use another run directory",
                   doing="run"):
        yield
