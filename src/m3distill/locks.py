"""Locks: one process at a time writes a run directory or an output folder.

Every command that writes takes the lock of what it writes, and of the run directory when what it writes lies in
its config's run directory (``run`` and ``demo`` always): a second command on the same output, or in the same run
directory, is refused at its start, in one line naming the process that holds it, instead of both writing the same
folder (two ``train`` on one ``--out`` gave a corrupt student). One mechanism serves both: a folder's lock lives in
the system's temporary folder (``m3distill-locks/``), named by a hash of the folder's resolved path: not in the
folder, which is replaced when the output is redone, nor beside it, where a command that fails at once would leave
a file (and the folders above it) behind. The operating system releases a lock whose process died, so a killed run
never leaves its output locked. Under torchrun only process 0 takes them: the processes of one run write together.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from m3distill.atomic import describe_os_error
from m3distill.errors import M3DistillError

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
        lock = FileLock(lock_file, mode=0o666)  # another user's command on the same output must open it too
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
    """The lock file of an output folder: in the system's temporary folder, named by the folder's resolved path
    (the same for every way of naming the folder), shared by every user of the machine."""
    folder = Path(tempfile.gettempdir()) / "m3distill-locks"
    if not folder.is_dir():
        folder.mkdir(exist_ok=True)
        folder.chmod(0o1777)  # like /tmp itself: anyone's commands lock here, and none removes another's lock
    key = hashlib.sha256(str(Path(output).expanduser().resolve()).encode("utf-8")).hexdigest()[:32]
    return folder / f"{key}.lock"


@contextmanager
def hold_outputs(outputs: list[Path], *, doing: str) -> Iterator[None]:
    """Hold the lock of each folder in ``outputs`` while the block runs (see :func:`hold_lock`)."""
    with _hold_folders([(Path(output), str(output), "choose another output folder") for output in outputs], doing):
        yield


@contextmanager
def hold_run_dir(root: str | os.PathLike[str], *, doing: str = "run") -> Iterator[None]:
    """Hold a run directory for this process: two commands writing one run directory would delete each other's
    outputs."""
    with _hold_folders([(Path(root), f"run directory {root}", "use another run directory")], doing):
        yield


@contextmanager
def _hold_folders(folders: list[tuple[Path, str, str]], doing: str) -> Iterator[None]:
    """Hold the lock of each (folder, what it is called, what to do instead) while the block runs; in process 0
    alone under torchrun."""
    from m3distill.distributed import process_rank  # here: m3distill imports without torch (the ONNX encoder)

    if process_rank() != 0:
        yield
        return
    with ExitStack() as stack:
        for folder, holds, instead in dict.fromkeys(folders):
            try:
                lock_file = output_lock_file(folder)
            except OSError as error:
                raise M3DistillError(describe_os_error(error)) from error
            stack.enter_context(hold_lock(lock_file, holds=holds, instead=instead, doing=doing))
        yield
