"""The ranks of a torchrun / ``accelerate launch`` run, which succeed or fail together.

Work between two synchronisation points is a *phase*. At the end of a phase every rank reports
whether it failed (``all_gather_object``), so when one rank raises, every other rank learns it at
its next synchronisation point instead of waiting there until the process group times out, and all
of them stop with the same one-line :class:`RankFailedError`. The failing rank logs its own
traceback first when the failure is not a user error (a bug must stay visible).

With one process (``world == 1``) a phase is a plain block.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from embstore.errors import EmbstoreError, RankFailedError

__all__ = ["Ranks", "dist_env"]

log = logging.getLogger(__name__)


def dist_env() -> tuple[int, int]:
    """(rank, world size) when started by ``accelerate launch`` / torchrun, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


@dataclass
class Ranks:
    """This process's rank in the run and the run's size."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> "Ranks":
        """Join the process group the launcher set up (gloo on CPU, nccl on GPUs) when there are several ranks."""
        rank, world = dist_env()
        if world > 1:
            import torch
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
            if torch.cuda.is_available():  # nccl collectives need each rank on its own device
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return cls(rank=rank, world=world)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def check(self, error: BaseException | None) -> None:
        """Synchronise: every rank says whether it failed; if any did, every rank raises the same error."""
        if self.world == 1:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        mine = None if error is None else (str(error).splitlines()[0] if str(error) else type(error).__name__)
        reports: list[str | None] = [None] * self.world
        dist.all_gather_object(reports, mine)
        failed = [(r, m) for r, m in enumerate(reports) if m is not None]
        if failed:
            rank, message = failed[0]
            raise RankFailedError(f"{message} (rank {rank} of {self.world} failed; every rank stopped)") from error

    def share(self, value: object) -> object:
        """Rank 0's ``value`` on every rank (a decision only rank 0 could make, e.g. after taking the lock)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Run a block; at its end all ranks synchronise and fail together (see the module docstring)."""
        error: BaseException | None = None
        try:
            yield
        except Exception as exc:  # reported to the other ranks, then re-raised as the shared error
            if self.world > 1 and not isinstance(exc, EmbstoreError):
                log.exception("rank %d failed during %s", self.rank, name)
            error = exc
        self.check(error)
