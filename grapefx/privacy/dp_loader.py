"""The data side of `make_private`: Poisson logical batches, split into micro-batches, with exact resume.

`DPDataLoader` draws one Poisson batch per *logical* step (the step the accountant counts) and hands
it to the training loop as one or more *micro-batches*. For each micro-batch it tells its
`PrivacyEngine` whether it is the last of its logical batch, so that the engine can turn noise on for
that backward only and let the optimizer step only after it (see `engine.py`).

It also remembers, for every logical batch it hands out, the sampler state right after that batch
was drawn. A checkpoint then stores the state after the last batch the *training loop* received,
not after the last batch a prefetching worker pool drew, so resuming draws exactly the batches an
uninterrupted run would have drawn, with any `num_workers`.
"""

from __future__ import annotations

import collections
import math
import numbers
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from grapefx.privacy.sampling import PoissonBatchSampler
from grapefx.privacy.secure_rng import secure_bernoulli_mask

if TYPE_CHECKING:  # pragma: no cover
    from grapefx.privacy.engine import PrivacyEngine


class SecurePoissonBatchSampler(PoissonBatchSampler):
    """`PoissonBatchSampler` whose membership draws come from the OS CSPRNG (`secure_mode=True`).

    Not reproducible by design; `state_dict()` keeps only the position inside the epoch.
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int | None = None) -> None:
        super().__init__(num_samples, sample_rate, steps=steps, seed=0)  # the seeded generator is unused

    def __iter__(self) -> Iterator[list[int]]:
        if not self._resume or self._step >= self.steps:
            self._step = 0
        self._resume = False
        while self._step < self.steps:
            mask = secure_bernoulli_mask(self.num_samples, self.sample_rate)
            self._step += 1
            yield mask.nonzero().flatten().tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": None, "step": self._step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._step, self._resume = int(state["step"]), True


class _TrackingBatchSampler(Sampler[list[int]]):
    """Passes the Poisson sampler's batches through and queues its state after each one."""

    def __init__(self, sampler: PoissonBatchSampler) -> None:
        self.sampler = sampler
        self.snapshots: collections.deque[dict[str, Any]] = collections.deque()

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        self.snapshots.clear()
        for indices in self.sampler:
            self.snapshots.append(self.sampler.state_dict())
            yield indices


# -- splitting a collated batch into micro-batches -------------------------------------------------
def _is_leaf_sequence(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and all(isinstance(e, (str, bytes, numbers.Number)) for e in x)


def batch_size_of(batch: Any) -> int:
    """The number of samples in a collated batch (dim 0 of its tensors; they must agree)."""
    sizes: set[int] = set()

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            if x.dim() == 0:
                raise ValueError("a collated batch holds a 0-d tensor; cannot tell its batch size")
            sizes.add(x.shape[0])
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)) and not _is_leaf_sequence(x):
            for v in x:
                visit(v)

    visit(batch)
    if len(sizes) != 1:
        raise ValueError(
            f"cannot split this batch into micro-batches: its tensors have batch sizes {sorted(sizes)} in dim 0 "
            "(need exactly one). Use a collate_fn that returns tensors with the batch in dim 0."
        )
    return sizes.pop()


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a collated batch (tensors, and lists of str/numbers, sliced in dim 0)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, dict):
        return type(batch)((k, slice_batch(v, start, stop)) for k, v in batch.items())
    if _is_leaf_sequence(batch):
        return batch[start:stop]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(slice_batch(v, start, stop) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_batch(v, start, stop) for v in batch)
    return batch  # anything else (e.g. a constant) is shared by every micro-batch


def micro_batch_bounds(
    n: int, accumulation_steps: int, max_physical_batch_size: int | None, parts: int | None = None
) -> list[tuple[int, int]]:
    """Split ``n`` samples into ``accumulation_steps`` near-equal parts (fewer if ``n`` is smaller, none
    empty), more if a part would exceed ``max_physical_batch_size``; an empty batch stays one part.
    ``parts`` forces the number of parts (some may be empty): ranks must run the same number."""
    if parts is None:
        if n == 0:
            return [(0, 0)]
        parts = min(accumulation_steps, n)
        if max_physical_batch_size is not None:
            parts = max(parts, math.ceil(n / max_physical_batch_size))
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for j in range(parts):
        stop = start + base + (1 if j < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _max_over_ranks(value: int) -> int:
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


class DPDataLoader:
    """Iterates micro-batches of Poisson-sampled logical batches; built by `make_private`.

    Each pass over it is one epoch of `steps_per_epoch` logical batches (each example joins each one
    independently with probability `sample_rate`; a logical batch may be empty and is then one empty
    micro-batch, which still has to be trained on: its gradient is pure noise). Without
    `accumulation_steps` / `max_physical_batch_size` every logical batch is a single micro-batch.

    Breaking out of the loop in the middle of a logical batch discards that batch's partial
    (un-noised) gradient: the optimizer's gradients are zeroed, so they cannot leak into a later step.
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: PoissonBatchSampler,
        engine: PrivacyEngine,
        *,
        accumulation_steps: int = 1,
        max_physical_batch_size: int | None = None,
        distributed: bool = False,
        **loader_kwargs: Any,
    ) -> None:
        self.dataset = dataset
        self.distributed = distributed  # ranks agree on the number of micro-batches of each batch
        self.batch_sampler = sampler
        self.sample_rate = sampler.sample_rate
        self.accumulation_steps = accumulation_steps
        self.max_physical_batch_size = max_physical_batch_size
        self._engine = engine
        self._tracker = _TrackingBatchSampler(sampler)
        # DataLoader draws its workers' base seed from `generator` (torch's global RNG by default) each
        # time an iterator starts; a generator of its own keeps the global RNG stream (dropout) the same
        # whether or not a run was resumed in the middle of an epoch.
        loader_kwargs.setdefault("generator", torch.Generator().manual_seed(int(sampler.num_samples)))
        self._loader = DataLoader(dataset, batch_sampler=self._tracker, **loader_kwargs)
        self._consumed_state = sampler.state_dict()  # sampler state after the last batch handed out

    @property
    def splits(self) -> bool:
        return self.accumulation_steps > 1 or self.max_physical_batch_size is not None

    @property
    def steps_per_epoch(self) -> int:
        """Logical batches (optimizer steps) per pass over the loader."""
        return len(self.batch_sampler)

    def __len__(self) -> int:
        if self.splits:
            raise TypeError(
                "a DPDataLoader that splits logical batches into micro-batches has no fixed length "
                f"(batch sizes are random); it makes engine.steps_per_epoch={self.steps_per_epoch} logical steps"
            )
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[Any]:
        engine = self._engine
        position = None  # (micro-batch index, number of micro-batches) of the batch last handed out
        try:
            for batch in self._loader:
                self._consumed_state = self._tracker.snapshots.popleft()
                engine._begin_logical_batch()
                bounds: list[Any] = [None]
                if self.splits:
                    n = batch_size_of(batch)
                    bounds = micro_batch_bounds(n, self.accumulation_steps, self.max_physical_batch_size)
                    if self.distributed:  # every rank must run as many forward/backward passes
                        parts = _max_over_ranks(len(bounds))
                        if parts != len(bounds):
                            bounds = micro_batch_bounds(n, self.accumulation_steps, None, parts=parts)
                for j, bound in enumerate(bounds):
                    last = j == len(bounds) - 1
                    engine._begin_micro_batch(last)
                    position = (j, len(bounds))
                    yield batch if bound is None else slice_batch(batch, *bound)
                position = None
        finally:
            if position is not None and position[0] < position[1] - 1:
                engine._abandon_logical_batch()

    def state_dict(self) -> dict[str, Any]:
        """The sampler state after the last logical batch handed to the training loop."""
        return dict(self._consumed_state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_sampler.load_state_dict(state)
        self._consumed_state = dict(state)
