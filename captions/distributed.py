"""Process groups under torchrun, in one place for extraction and training."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from captions.runtime import resolve_device


@dataclass
class Distributed:
    """This process's place in a (possibly one-process) run.

    ``rank``/``world``/``local_rank`` from torchrun's environment (0, 1, 0 without it); ``device``
    the one this rank computes on; ``owns_group``: ``join`` created the process group, so
    ``leave`` destroys it.
    """

    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that merges, writes the shared outputs and logs."""
        return self.rank == 0


def launch_rank() -> int:
    """This process's rank as torchrun set it (``RANK``); 0 outside torchrun. Readable before the
    process group exists (locks, logging and output are rank 0's from the start)."""
    return int(os.environ.get("RANK", 0))


def join(device: str | torch.device) -> Distributed:
    """Resolve ``device`` and join torchrun's process group (RANK, WORLD_SIZE, LOCAL_RANK).

    ``device``: a torch device, or ``auto``|``cpu``|``cuda`` (``captions.runtime.resolve_device``,
    which raises ``CaptionsError`` for an unknown or unavailable one). With WORLD_SIZE > 1 and no
    group initialised yet, it creates one (nccl on CUDA, gloo otherwise; this blocks until every
    rank has joined) and sets ``owns_group``; a group the caller made is used as it is. On CUDA
    with WORLD_SIZE > 1 each rank takes ``cuda:LOCAL_RANK``.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    rank, world = launch_rank(), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    owns_group = world > 1 and not torch.distributed.is_initialized()
    if owns_group:
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", local_rank)
    return Distributed(rank, world, local_rank, dev, owns_group)


def leave(dist: Distributed) -> None:
    """Destroy the process group if ``join`` created it; otherwise nothing.

    Call it only after success: destroying the group while another rank is still inside a
    collective hangs that rank. Do call it then: left to interpreter exit, gloo's worker threads
    can abort the process with SIGABRT ("terminate called without an active exception",
    pytorch#190489) after a finished run.
    """
    if dist.owns_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        dist.owns_group = False


class _RankPrefix(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.prefix = f"rank {rank}: "

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.prefix + str(record.msg)
        return True


@contextmanager
def main_rank_logs() -> Iterator[None]:
    """Within it, a process that is not rank 0 of torchrun's run (``RANK`` > 0) logs only warnings
    and errors, each led by ``rank N:``: its info lines would repeat rank 0's, once per rank."""
    rank = launch_rank()
    if rank == 0:
        yield
        return
    logger, prefix = logging.getLogger("captions"), _RankPrefix(rank)
    level = logger.level
    logger.setLevel(max(logging.WARNING, level))
    logger.addFilter(prefix)
    try:
        yield
    finally:
        logger.setLevel(level)
        logger.removeFilter(prefix)


def barrier(dist: Distributed) -> None:
    """Wait until every rank reaches this point; a no-op in a one-process run."""
    if dist.world > 1:
        torch.distributed.barrier()


def average_gradients(dist: Distributed, parameters) -> None:
    """All-reduce the gradients of ``parameters`` to their mean over the ranks (for losses computed
    outside DistributedDataParallel's hooks, such as self-critical sampling); a no-op in a
    one-process run."""
    if dist.world == 1:
        return
    for p in parameters:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= dist.world
