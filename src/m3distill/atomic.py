"""Atomic file writing: every file m3distill writes appears whole or not at all.

Write to a temporary name in the same directory, flush and fsync, then rename over the target. A location that
cannot be written (a read-only or full disk, no permission, a file where a folder should be) is an
:class:`M3DistillError` naming the path and the reason, raised before anything is written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from m3distill.errors import M3DistillError

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
def atomic_dir(target: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success rename it to ``target``.

    An interrupted writer leaves no ``target`` (only a hidden temp dir that the next call removes).
    With ``overwrite`` an existing ``target`` is replaced; without it an existing ``target`` is an error.
    Files the writer created private (0600) get the mode a plain ``open`` gives before the rename.
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
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
