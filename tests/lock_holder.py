"""Another m3distill process holding a lock, for the tests of one writer per output and per run directory.

A test helper, not part of the shipped package: tests import it as ``lock_holder`` (pytest puts tests/ on
``sys.path``).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def held_by_another_process(hold: str, *args: str) -> Iterator[int]:
    """A lock held by another process until the block ends; yields that process's id.

    ``hold`` is the context manager the process enters, an expression over ``Path``, ``hold_outputs``,
    ``hold_run_dir`` and ``args`` (the strings ``args``): ``"hold_run_dir(args[0])"``.
    """
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path\n"
         "from m3distill.locks import hold_outputs, hold_run_dir\n"
         f"args = sys.argv[1:]\nwith {hold}:\n    print('held', flush=True); sys.stdin.read()", *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
