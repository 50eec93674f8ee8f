"""Poisson sampling for DP-SGD: the sampling the privacy accountant assumes.

The accountant (:mod:`grapefx.privacy.accounting`) models every step as the Poisson-subsampled
Gaussian mechanism. That analysis holds only if each example joins each batch on its own with
probability ``q``, so batch sizes vary, and a batch may be empty. Shuffled fixed-size batches
do not meet it. :class:`PoissonBatchSampler` does this sampling for a ``DataLoader``.

An empty batch comes out as an empty list of indices, ``[]``. The step still has to happen:
noise is added to a zero gradient sum. ``DataLoader``'s default collate fails on ``[]``
(it reads ``batch[0]``), so use :func:`collate_with_empty` or :func:`poisson_loader`. They give
tensors of shape ``(0, ...)`` with the dtype and trailing shape a real batch would have.

The RNG is a ``torch.Generator``, seeded for reproducibility. It is not cryptographically secure
(no secure mode). This is usual for research DP-SGD, but a deployment with formal guarantees
should feed a generator from a CSPRNG.
"""

from __future__ import annotations

import collections.abc as abc
import numbers
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data import default_collate as _default_collate


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields ``steps`` batches per epoch. Each index in ``range(num_samples)`` is kept with prob. ``sample_rate``.

    ``steps`` defaults to ``round(1 / sample_rate)``, about one pass over the data in expectation.
    Randomness comes from ``generator`` if given. Otherwise a new generator is seeded with ``seed``,
    or, when ``seed`` is None, from torch's global RNG, so ``torch.manual_seed`` controls it.
    The generator carries on across epochs, so every epoch draws new batches.
    ``state_dict()`` saves the RNG state and the position inside the epoch, so a resumed run draws
    the same batches it would have drawn. Take the snapshot with ``num_workers=0``, or at an epoch
    boundary: with worker prefetching, the sampler runs a few batches ahead of training.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if steps is None:
            steps = max(1, round(1.0 / sample_rate))
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        if generator is not None and seed is not None:
            raise ValueError("pass either generator or seed, not both")
        if generator is None:
            if seed is None:
                seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
            generator = torch.Generator().manual_seed(seed)
        self.num_samples, self.sample_rate, self.steps = int(num_samples), float(sample_rate), int(steps)
        self.generator = generator
        self._step = 0  # batches already drawn in the current epoch
        self._resume = False

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        if not self._resume or self._step >= self.steps:  # after load_state_dict, finish the saved epoch
            self._step = 0
        self._resume = False
        while self._step < self.steps:
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            self._step += 1
            yield mask.nonzero().flatten().tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "step": self._step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._step, self._resume = int(state["step"]), True


def _empty_like_batch(example: Any) -> Any:
    """The ``default_collate`` structure of a batch of ``example``s, with batch size 0."""
    if isinstance(example, (str, bytes)):
        return []
    if isinstance(example, abc.Mapping):
        return {key: _empty_like_batch(value) for key, value in example.items()}
    if isinstance(example, tuple) and hasattr(example, "_fields"):  # namedtuple stays a namedtuple
        return type(example)(*(_empty_like_batch(value) for value in example))
    if isinstance(example, abc.Sequence):  # default_collate turns tuples and lists into lists
        return [_empty_like_batch(value) for value in example]
    return _default_collate([example])[:0]  # tensors, numpy arrays, python numbers


class collate_with_empty:  # noqa: N801 - a picklable closure (DataLoader workers may be spawned)
    """A collate function like ``collate_fn``. For an empty batch, it returns 0-row tensors shaped like ``example``.

    ``example`` is one dataset item, e.g. ``dataset[0]``. It fixes the dtypes and trailing shapes.
    """

    def __init__(self, example: Any, collate_fn: Callable[[list[Any]], Any] = _default_collate) -> None:
        self.example, self.collate_fn = example, collate_fn

    def __call__(self, batch: list[Any]) -> Any:
        return _empty_like_batch(self.example) if len(batch) == 0 else self.collate_fn(batch)


def poisson_loader(
    dataset: Dataset,
    sample_rate: float,
    *,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    **loader_kwargs: Any,
) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` that samples Poisson batches and handles empty ones."""
    sampler = PoissonBatchSampler(len(dataset), sample_rate, steps=steps, generator=generator, seed=seed)
    loader_kwargs.setdefault("collate_fn", collate_with_empty(dataset[0]))
    return DataLoader(dataset, batch_sampler=sampler, **loader_kwargs)
