"""Atomic file writing: every file m3distill writes appears whole or not at all, and nothing of the user's is removed.

Write to a temporary name in the same directory, flush and fsync, then rename over the target. A location that
cannot be written (a read-only or full disk, no permission, a file where a folder should be) is an
:class:`M3DistillError` naming the path and the reason, raised before anything is written; a disk that fills up
while a stage writes is one such error too, naming the folder and the space the stage needs
(:func:`disk_space_for`).

A folder m3distill replaces or removes is one it wrote, and it holds only files it wrote: a stage that would
replace a folder holding anything else (the user's notes, an ``onnx/`` folder of their own) refuses first and names
those files (:func:`refuse_files_not_ours`); the user moves them out. Should files appear in the folder while the
stage runs, the old folder is kept beside the new one as ``NAME.replaced-<time>`` instead of being removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from m3distill.errors import M3DistillError

logger = logging.getLogger(__name__)

# Errors that come from where the user asked us to write (or read), not from a bug: the CLI turns these into one
# line. ENOENT is left out on purpose: a file of ours vanishing mid-run is worth a traceback.
USER_PATH_ERRNOS = frozenset(
    code for code in (
        errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.ENOTDIR,
        errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP,
    ) if code is not None
)


def describe_os_error(error: OSError, target: str | os.PathLike[str] | None = None) -> str:
    """One line saying why ``target`` (default: the path in ``error``) could not be written or read, and what to do.

    Args:
        error: the error the file system gave.
        target: the path the caller wanted to write, when it differs from the one in ``error`` (a temp file).
    """
    path = Path(target if target is not None else error.filename or "?")
    blocker = _file_in_the_way(path)
    if blocker is not None:
        return f"cannot write {path}: {blocker} is a file, not a folder; choose another location"
    elsewhere = "choose another location"
    reason = {
        errno.EROFS: f"the file system is read-only; {elsewhere}",
        errno.EACCES: f"permission denied; {elsewhere} or change its permissions",
        errno.EPERM: f"permission denied; {elsewhere} or change its permissions",
        errno.ENOSPC: f"no space left on the device; free some space or {elsewhere}",
        getattr(errno, "EDQUOT", -1): f"disk quota exceeded; free some space or {elsewhere}",
    }.get(error.errno or 0)
    if reason is not None:
        return f"cannot write {path}: {reason}"
    return f"cannot use {path}: {error.strerror or error}"


def ensure_writable_dir(folder: str | os.PathLike[str]) -> Path:
    """Create ``folder`` (and its parents) if needed and check that files can be written in it.

    Stages call it before they remove or change anything, so an unwritable output location ends the run with one
    line instead of half-way through. Raises :class:`M3DistillError` naming the folder and the reason.
    """
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".m3distill-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise M3DistillError(describe_os_error(error, folder)) from error
    return folder


def check_can_create(target: str | os.PathLike[str]) -> None:
    """Check, creating nothing, that ``target`` can be written: its nearest existing folder takes a new file.

    Stages call it for their outputs before any work, so that a read-only or mistyped location ends the stage at
    its start. Raises :class:`M3DistillError` naming ``target`` and the reason.
    """
    target = Path(target).expanduser().absolute()
    blocker = _file_in_the_way(target / "_")
    if blocker is not None:
        raise M3DistillError(f"cannot write {target}: {blocker} is a file, not a folder; choose another location")
    # Outputs are written beside themselves and renamed into place: it is the folder that holds them that must take
    # new files, or its nearest existing ancestor, where the missing folders would be made.
    existing = next(folder for folder in target.parents if folder.exists())
    try:
        fd, probe = tempfile.mkstemp(prefix=".m3distill-write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise M3DistillError(describe_os_error(error, target)) from error


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` (or ``path`` itself) when it is a file rather than a folder."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            if candidate != path and not candidate.is_dir():
                return candidate
            return None
    return None


def _make_parent(target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise M3DistillError(describe_os_error(error, target)) from error


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it to ``target``, on error delete it.

    Use it for writers that want a filename (``pyarrow.parquet.write_table``, ``np.save``, ``savefig``).
    Raises :class:`M3DistillError` when ``target``'s folder cannot be created or written.
    """
    target = Path(target)
    _make_parent(target)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + "".join(target.suffixes),
                                        dir=target.parent)
    except OSError as error:
        raise M3DistillError(describe_os_error(error, target)) from error
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        # mkstemp makes private (0600) files; give the result the mode a plain open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _open_up_private_modes(root: Path) -> None:
    """Give files and folders under ``root`` that were created private (0600/0700, as ``tempfile`` and some
    writers such as transformers' ``save_pretrained`` make them) the mode a plain ``open``/``mkdir`` would give.

    Modes someone chose on purpose (any group or other bit set) are left alone.
    """
    umask = _umask()
    for folder, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = os.path.join(folder, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode) or stat.S_IMODE(mode) & 0o077:
                continue
            executable = stat.S_ISDIR(mode) or mode & stat.S_IXUSR
            os.chmod(path, (0o777 if executable else 0o666) & ~umask)


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    write_bytes_atomic(target, text.encode("utf-8"))


def write_json_atomic(target: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``target`` atomically (byte-identical for equal objects)."""
    write_text_atomic(target, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], *, overwrite: bool = False,
               ours: Iterable[str] | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success rename it to ``target``.

    An interrupted writer leaves no ``target`` (only a hidden temp dir that the next call removes).
    With ``overwrite`` an existing ``target`` is replaced; without it an existing ``target`` is an error.
    ``ours`` are the patterns of what m3distill writes in ``target`` (see :func:`files_not_ours`): a replaced
    ``target`` that holds anything else by then is kept as ``NAME.replaced-<time>`` (:func:`remove_our_folder`).
    Callers refuse such a folder before their work (:func:`refuse_files_not_ours`); this covers files added while
    it ran. Files the writer created private (0600) get the mode a plain ``open`` gives before the rename.
    Raises :class:`M3DistillError` when ``target``'s folder cannot be created or written.
    """
    target = Path(target)
    _make_parent(target)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as error:
        raise M3DistillError(describe_os_error(error, target)) from error
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        _open_up_private_modes(tmp)
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} already exists")
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            remove_our_folder(old, ours if ours is not None else ["**"], kept_as=target)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# What m3distill's writers leave for a moment in any folder they write (and a run killed mid-write leaves behind):
# temporary files of atomic writes and write probes.
_OUR_LEFTOVERS = (".*.tmp*", ".m3distill-write-check-*")


def files_not_ours(folder: str | os.PathLike[str], ours: Iterable[str]) -> list[str]:
    """What ``folder`` holds that m3distill did not write: paths relative to ``folder``, ``/``-separated, a folder
    none of whose contents m3distill wrote named once with a trailing ``/``. Empty for a missing folder.

    Args:
        folder: a folder m3distill wrote (a dataset, a teacher cache, a student, an export, a report).
        ours: what m3distill writes there, as patterns relative to ``folder`` (``fnmatch``, ``/``-separated,
            e.g. ``shards/shard-*.npy``); a pattern ending in ``/**`` covers a whole folder, ``**`` everything.
    """
    patterns = [pattern.split("/") for pattern in ours]
    found: list[str] = []

    def visit(directory: str, parts: list[str]) -> None:
        for entry in sorted(os.scandir(directory), key=lambda entry: entry.name):
            here = [*parts, entry.name]
            owned = _owned(here, patterns)
            if owned is True or any(fnmatchcase(entry.name, leftover) for leftover in _OUR_LEFTOVERS):
                continue
            is_folder = entry.is_dir(follow_symlinks=False)
            if is_folder and owned is None:
                visit(entry.path, here)
            else:
                found.append("/".join(here) + ("/" if is_folder else ""))

    if Path(folder).is_dir():
        visit(os.fspath(folder), [])
    return found


def _owned(parts: list[str], patterns: list[list[str]]) -> bool | None:
    """True when a pattern covers the path ``parts``; None when a pattern may cover something inside it (a folder
    m3distill writes into, to look inside); False otherwise."""
    inside = False
    for pattern in patterns:
        whole = pattern[:-1] if pattern[-1] == "**" else None
        if whole is not None and len(parts) >= len(whole) and _matches(parts[: len(whole)], whole):
            return True
        if len(parts) == len(pattern) and _matches(parts, pattern):
            return True
        if len(pattern) > len(parts) and _matches(parts, pattern[: len(parts)]):
            inside = True
    return None if inside else False


def _matches(parts: list[str], pattern: list[str]) -> bool:
    return all(fnmatchcase(part, glob) for part, glob in zip(parts, pattern, strict=True))


def _listing(paths: list[str], limit: int = 6) -> str:
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def refuse_files_not_ours(folder: str | os.PathLike[str], ours: Iterable[str], *, replacing: str) -> None:
    """Raise :class:`M3DistillError` naming what ``folder`` holds that m3distill did not write, when it holds any.

    The one rule for files of the user's inside a folder m3distill would replace or remove (``synth --overwrite``,
    ``teacher --force``, ``train --force``, ``export --force``, ``evaluate``, a stale stage of ``run``): the stage
    refuses before its work and lists them; they are never removed.

    Args:
        folder: the folder about to be replaced or removed.
        ours: the patterns of what m3distill writes there (see :func:`files_not_ours`).
        replacing: what would remove them, for the message, e.g. ``"retraining the student"``.
    """
    found = files_not_ours(folder, ours)
    if found:
        raise M3DistillError(
            f"{folder} holds files m3distill did not write ({_listing(found)}); {replacing} would remove them: move "
            "them out of that folder, then run the command again"
        )


def remove_our_folder(folder: str | os.PathLike[str], ours: Iterable[str], *,
                      kept_as: str | os.PathLike[str] | None = None) -> None:
    """Delete ``folder``, an output m3distill wrote and has replaced, unless it holds files m3distill did not write
    (they appeared while the stage ran): then it is kept, as ``<kept_as or folder>.replaced-<time>``, and one
    warning names them.

    Args:
        folder: the old output (often set aside under a hidden name).
        ours: the patterns of what m3distill writes there (see :func:`files_not_ours`).
        kept_as: the output's own path, whose name the kept folder takes.
    """
    folder = Path(folder)
    found = files_not_ours(folder, ours)
    if not found:
        shutil.rmtree(folder, ignore_errors=True)
        return
    name = Path(kept_as if kept_as is not None else folder)
    kept = name.with_name(f"{name.name.lstrip('.')}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(folder, kept)
    logger.warning("kept the replaced %s as %s: it holds files m3distill did not write (%s)", name, kept,
                   _listing(found))


# The words a full disk is reported with by the libraries that write for m3distill: Python and numpy raise OSError
# ENOSPC, pyarrow an OSError whose text carries errno 28, safetensors a SafetensorError, sqlite (the LLM answers'
# cache) an OperationalError.
_DISK_FULL_ERRNOS = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code is not None)
_DISK_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "[Errno 28]", "[errno 28]",
                    "database or disk is full")


def is_disk_full(error: BaseException) -> bool:
    """True when ``error``, or an error that caused it, says the disk (or the user's quota) is full."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return True
        if any(words in str(current) for words in _DISK_FULL_WORDS):
            return True
        current = current.__cause__ or current.__context__
    return False


class SpaceNeeded:
    """What a stage will write, in bytes, for the message of a full disk; set once it is known."""

    def __init__(self, nbytes: int | None = None) -> None:
        self.bytes = nbytes


@contextlib.contextmanager
def disk_space_for(folder: str | os.PathLike[str], needed: int | None = None) -> Iterator[SpaceNeeded]:
    """Turn a full disk while the block writes ``folder`` into one :class:`M3DistillError` naming ``folder``, the
    space the stage needs and the space free there; the writers' temporary files are removed by then.

    Args:
        folder: the output being written.
        needed: bytes the stage writes there; the block may set (or refine) it on the yielded :class:`SpaceNeeded`.
    """
    space = SpaceNeeded(needed)
    try:
        yield space
    except Exception as error:
        if not is_disk_full(error):
            raise
        raise M3DistillError(disk_full_message(folder, space.bytes)) from error


def disk_full_message(folder: str | os.PathLike[str], needed: int | None = None) -> str:
    """One line: ``folder`` cannot be written for lack of space, with the space needed (when known) and free."""
    path = Path(folder)
    existing = next((candidate for candidate in (path, *path.parents) if candidate.exists()), None)
    free = shutil.disk_usage(existing).free if existing is not None else None
    figures = [f"about {_size(needed)} needed" if needed else "", "" if free is None else f"{_size(free)} free there"]
    shown = ", ".join(figure for figure in figures if figure)
    return (f"cannot write {path}: no space left on the device{f' ({shown})' if shown else ''}; free some space or "
            "choose another location")


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"
