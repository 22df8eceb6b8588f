"""Data parallelism: this process's rank and world size, and how to wait for the others."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Dist:
    rank: int
    world_size: int
    barrier: Callable[[], None] | None


def _dist_context(rank: int | None, world_size: int | None) -> _Dist:
    if (rank is None) != (world_size is None):
        raise ValueError("pass both rank and world_size, or neither")
    initialised = False
    try:
        import torch.distributed as dist

        initialised = dist.is_available() and dist.is_initialized()
    except ImportError:  # pragma: no cover
        dist = None  # type: ignore[assignment]
    if rank is not None and world_size is not None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
        return _Dist(
            rank, world_size, dist.barrier if initialised and dist.get_world_size() == world_size else None
        )
    if initialised:
        return _Dist(dist.get_rank(), dist.get_world_size(), dist.barrier)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState()
        return _Dist(state.process_index, state.num_processes, state.wait_for_everyone)
    return _Dist(0, 1, None)
