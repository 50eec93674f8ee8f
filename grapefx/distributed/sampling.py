"""Poisson sampling across ranks: each rank samples its own shard of the dataset with the global rate.

Rank r owns the examples r, r + N, r + 2N, ... (N = world size) and keeps each one with probability q,
independently, from a generator of its own. The union over ranks is then exactly a Poisson sample of
the whole dataset with rate q (every example joins on its own with probability q), which is what the
accountant assumes; no communication is needed, and each rank's sampler is seeded (reproducible for
a given seed and world size). Every rank draws the same number of batches per epoch (round(1/q)), so
the ranks step together.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import Sampler

from grapefx.privacy.sampling import PoissonBatchSampler


def shard_size(num_samples: int, rank: int, world_size: int) -> int:
    return len(range(rank, num_samples, world_size))


class ShardedPoissonBatchSampler(Sampler[list[int]]):
    """Maps the batches of `inner` (a Poisson sampler over this rank's shard, same rate q) to dataset
    indices. Same interface as `PoissonBatchSampler` (`sample_rate`, `num_samples`, `steps`,
    `state_dict`), so `DPDataLoader` uses it unchanged."""

    def __init__(self, inner: PoissonBatchSampler, rank: int, world_size: int, num_samples: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if inner.num_samples != shard_size(num_samples, rank, world_size):
            raise ValueError(
                f"inner sampler covers {inner.num_samples} examples, rank {rank}'s shard a different number"
            )
        self.inner, self.rank, self.world_size = inner, rank, world_size
        self.num_samples = num_samples
        self.sample_rate, self.steps = inner.sample_rate, inner.steps

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.inner:
            yield [self.rank + self.world_size * k for k in batch]

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
