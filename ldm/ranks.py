"""Which share of a stage's work this process does, on which device.

A stage launched by torchrun (the rule's `launcher`: one process per GPU, srun + torchrun across nodes) reads
its rank and world size from torchrun's RANK / WORLD_SIZE and runs on `cuda:LOCAL_RANK`; a plain process is
rank 0 of 1 on `cuda` when there is one, else the CPU. Work is split into contiguous shares of whole groups
(`share`): sampling's forward groups, so every image goes through the same floating-point operations as in one
process and N processes write the same bytes as one (`ldm.sampling`, "Reproducibility").

Ranks exchange results through files (parts written atomically, merged by rank 0) and meet at `barrier`. The
process group is gloo even on GPU nodes: only the barrier and small CPU tensors go through it, never images,
so NCCL's device pinning buys nothing here. Its timeout is long: a resumed job's ranks can have very unequal
work left (one finished its share before the kill, another not).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from .errors import ConfigError

#: how long a rank waits at a barrier for the others (a resumed rank may wait a whole share's sampling)
BARRIER_TIMEOUT = timedelta(hours=48)


def default_device(local_rank: int | None = None) -> torch.device:
    """`cuda:LOCAL_RANK` under torchrun, `cuda` for a plain process, the CPU without a GPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank) if local_rank is not None else torch.device("cuda")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls, device: str | None = None) -> "Ranks":
        """torchrun's RANK / WORLD_SIZE / LOCAL_RANK (absent: one process); `device` overrides the default."""
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if not 0 <= rank < world:
            raise ConfigError(f"rank {rank} not in [0, world size {world}) (RANK / WORLD_SIZE)")
        local = os.environ.get("LOCAL_RANK")
        chosen = torch.device(device) if device else default_device(None if local is None else int(local))
        if chosen.type == "cuda" and chosen.index is not None:
            if chosen.index >= torch.cuda.device_count():
                raise ConfigError(f"rank {rank}: LOCAL_RANK {chosen.index} but this node has "
                                  f"{torch.cuda.device_count()} visible GPU(s): launch one process per GPU")
            torch.cuda.set_device(chosen)  # libraries that use "the current device" use this rank's
        return cls(rank, world, chosen)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, count: int, unit: int = 1) -> tuple[int, int]:
        """Items [lo, hi) of this rank: contiguous, boundaries on multiples of `unit`, the ceil(count / unit)
        groups dealt as evenly as whole groups allow (rank r: groups [G*r // W, G*(r+1) // W))."""
        groups = -(-count // unit)
        lo, hi = groups * self.rank // self.world, groups * (self.rank + 1) // self.world
        return min(lo * unit, count), min(hi * unit, count)

    def _join(self) -> None:
        if not dist.is_initialized():
            # torchrun exported MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE: the env:// rendezvous
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world, timeout=BARRIER_TIMEOUT)

    def barrier(self) -> None:
        """Wait until every rank got here (nothing to wait for in one process)."""
        if self.world > 1:
            self._join()
            dist.barrier()

    def gather(self, mine) -> list:
        """Every rank's `mine` (any picklable object), in rank order, on every rank."""
        if self.world == 1:
            return [mine]
        self._join()
        out = [None] * self.world
        dist.all_gather_object(out, mine)
        return out

    def per_item(self, fn, items, unit: int = 1):
        """`fn(items)` computed in shares (`share`, whole groups of `unit`) and concatenated in item order on every
        rank. `fn` returns an array, or a tuple / dict of arrays, with one row per item; with `unit` the batch size
        `fn` works in, every item is in the same batch as in one process, so the result is the same bits."""
        if self.world == 1:
            return fn(items)
        lo, hi = self.share(len(items), unit)
        return _concatenate(self.gather(fn(items[lo:hi])))

    def close(self) -> None:
        """Leave the process group (torch warns at exit about one never destroyed)."""
        if dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> "Ranks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _concatenate(parts: list):
    """Row-wise concatenation of the per-rank results of `Ranks.per_item` (arrays, tuples or dicts of them)."""
    first = parts[0]
    if isinstance(first, tuple):
        return tuple(_concatenate([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _concatenate([p[k] for p in parts]) for k in first}
    return np.concatenate(parts)
