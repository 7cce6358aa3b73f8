"""The processes of ``torchrun --nproc_per_node N m3distill ...``: which one this is, and waiting for the others.

torchrun starts N copies of the command and tells each its place in ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``:
read here alone (:func:`process_rank`, :func:`process_count`, :func:`local_rank`).
Two stages use the group this module opens: the teacher cache splits its shards among the processes (see
:mod:`m3distill.teacher.cache`), and the train stage lets process 0 alone set a student aside before retraining it
(the Trainer then joins the processes in a group of its own). They only need to wait for each other and to check
that they planned the same work, so the group is gloo's, on GPUs too: no tensor crosses a GPU, gloo needs no GPU
bound to each process, and its waits are not cut short by NCCL's watchdog while one process still embeds its last
shard. A group someone else opened (a script that called ``init_process_group``) is used as it is and left open.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from m3distill.errors import M3DistillError

logger = logging.getLogger(__name__)

# A process that finished its shards waits for the slowest one, which can be a shard of the longest texts of a large
# model on a CPU. torchrun stops every process as soon as one fails, so a long wait never outlives a crash.
_WAIT_TIMEOUT = timedelta(hours=24)


def process_rank() -> int:
    """This process's number among the processes torchrun started (0 when not under torchrun)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int | None:
    """This process's number among the processes torchrun started on this machine (``None`` when not under
    torchrun): the GPU it takes."""
    found = os.environ.get("LOCAL_RANK")
    return int(found) if found is not None else None


def process_count() -> int:
    """How many processes torchrun started (1 when not under torchrun)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


@dataclass(frozen=True)
class ProcessGroup:
    """The processes of one command (a teacher cache, a train stage): this one's ``rank`` among ``world_size``.

    With one process every method returns at once.
    """

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this is process 0, the one that writes what all processes share (the cache's manifest, a
        student set aside)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Return once every process has called it."""
        if self.world_size > 1:
            torch.distributed.barrier()

    def agree(self, value: Any) -> bool:
        """Whether every process passed an equal ``value`` (JSON-serialisable); also a barrier."""
        if self.world_size == 1:
            return True
        digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, digest)
        return len(set(gathered)) == 1


@contextlib.contextmanager
def process_group() -> Iterator[ProcessGroup]:
    """The processes torchrun started, joined in a group for the block (one process: a group of one).

    Opens a gloo group when none is open and closes it after the block, so whatever runs next (the Trainer) starts
    from a clean slate; an open group is used and left open.

    Raises:
        M3DistillError: several processes were started but this torch cannot join them (no torch.distributed).
    """
    world_size = process_count()
    if world_size == 1:
        yield ProcessGroup()
        return
    if not torch.distributed.is_available():
        raise M3DistillError(
            f"{world_size} processes were started (torchrun), but this torch build has no torch.distributed; "
            "run one process"
        )
    opened = False
    if not torch.distributed.is_initialized():
        _open_group(world_size)
        opened = True
        logger.debug("process %d of %d joined the group", torch.distributed.get_rank(), world_size)
    try:
        yield ProcessGroup(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size())
    finally:
        # Closing also releases the others from a wait if this process failed, instead of leaving them to time out.
        if opened and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# Groups this process has opened: each gets its own key prefix in the launcher's store (every process opens them in
# the same order, so they agree on the prefix).
_groups_opened = 0


def _open_group(world_size: int) -> None:
    """Join the processes in a gloo group whose keys in torchrun's store cannot be mistaken for a later group's.

    A default group opened after another one was closed (the Trainer's, after the train stage's) reuses the same
    keys in the store, and gloo then reads the closed group's addresses and fails with "Connection refused". Our
    groups keep their keys under a prefix of their own instead.
    """
    global _groups_opened
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not address or not port:  # not a torchrun-style launch: let torch say what is missing
        torch.distributed.init_process_group(backend="gloo", timeout=_WAIT_TIMEOUT)
        return
    rank = process_rank()
    # Under torchrun its agent hosts the store; otherwise process 0 does, shared with any later group (multi-tenant).
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = torch.distributed.TCPStore(
        host_name=address, port=int(port), world_size=world_size, is_master=rank == 0 and not agent_hosts,
        timeout=_WAIT_TIMEOUT, multi_tenant=True,
    )
    _groups_opened += 1
    torch.distributed.init_process_group(
        backend="gloo", store=torch.distributed.PrefixStore(f"m3distill/{_groups_opened}", store), rank=rank,
        world_size=world_size, timeout=_WAIT_TIMEOUT,
    )
