"""PoissonBatchSampler: the sampling distribution the accountant assumes, reproducibility, empty batches."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader, Dataset, TensorDataset

from grapefx.privacy.sampling import PoissonBatchSampler, collate_with_empty, poisson_loader


def test_batch_sizes_follow_binomial() -> None:
    n, q, steps = 1000, 0.05, 3000
    sizes = np.array([len(b) for b in PoissonBatchSampler(n, q, steps=steps, seed=0)])
    # mean within 4 standard errors of N*q
    assert abs(sizes.mean() - n * q) <= 4 * np.sqrt(n * q * (1 - q) / steps)
    # chi-square goodness of fit against Binomial(N, q), tails merged so every bin expects >= 5
    lo, hi = int(stats.binom.ppf(0.01, n, q)), int(stats.binom.ppf(0.99, n, q))
    observed = [np.sum(sizes < lo)] + [np.sum(sizes == k) for k in range(lo, hi + 1)] + [np.sum(sizes > hi)]
    probs = [stats.binom.cdf(lo - 1, n, q)] + [stats.binom.pmf(k, n, q) for k in range(lo, hi + 1)]
    probs.append(stats.binom.sf(hi, n, q))
    expected = np.array(probs) * steps
    assert expected.min() >= 5
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_each_index_included_independently_with_rate_q() -> None:
    n, q, steps = 500, 0.1, 2000
    counts = np.zeros(n)
    for batch in PoissonBatchSampler(n, q, steps=steps, seed=1):
        assert batch == sorted(set(batch)) and all(0 <= i < n for i in batch)
        counts[batch] += 1
    # overall inclusion rate
    assert abs(counts.mean() / steps - q) <= 4 * np.sqrt(q * (1 - q) / (n * steps))
    # per-index counts ~ Binomial(steps, q): dispersion statistic ~ chi2(n)
    dispersion = np.sum((counts - steps * q) ** 2) / (steps * q * (1 - q))
    assert stats.chi2.sf(dispersion, n) > 1e-3 and stats.chi2.cdf(dispersion, n) > 1e-3


def test_empty_batches_occur_for_tiny_q() -> None:
    batches = list(PoissonBatchSampler(10, 0.001, steps=200, seed=2))
    assert len(batches) == 200
    assert sum(b == [] for b in batches) > 150  # P(empty) = 0.999**10 ~ 0.99


def test_reproducible_by_seed() -> None:
    a = list(PoissonBatchSampler(100, 0.1, seed=7))
    assert a == list(PoissonBatchSampler(100, 0.1, seed=7))
    assert a == list(PoissonBatchSampler(100, 0.1, generator=torch.Generator().manual_seed(7)))
    assert a != list(PoissonBatchSampler(100, 0.1, seed=8))
    torch.manual_seed(3)
    b = list(PoissonBatchSampler(100, 0.1))
    torch.manual_seed(3)
    assert b == list(PoissonBatchSampler(100, 0.1))


def test_epochs_differ_and_default_steps() -> None:
    sampler = PoissonBatchSampler(100, 0.01, seed=0)
    assert len(sampler) == 100  # 1 / q steps: one epoch in expectation
    assert len(PoissonBatchSampler(100, 0.3, seed=0)) == 3
    assert list(sampler) != list(sampler)


def test_state_dict_resumes_mid_epoch_and_across_epochs() -> None:
    sampler = PoissonBatchSampler(50, 0.2, steps=8, seed=4)
    it = iter(sampler)
    head = [next(it) for _ in range(3)]
    state = sampler.state_dict()
    tail = list(it)
    next_epoch = list(sampler)
    resumed = PoissonBatchSampler(50, 0.2, steps=8, seed=999)
    resumed.load_state_dict(state)
    assert len(head) + len(tail) == 8
    assert list(resumed) == tail
    assert list(resumed) == next_epoch
    # a snapshot taken at an epoch boundary resumes with a full new epoch
    end_state = sampler.state_dict()
    expected = list(sampler)
    resumed.load_state_dict(end_state)
    assert list(resumed) == expected


def test_data_loader_yields_empty_tensors() -> None:
    ds = TensorDataset(torch.randn(10, 3), torch.arange(10))
    loader = poisson_loader(ds, 0.001, steps=20, seed=0)
    batches = list(loader)
    assert len(batches) == 20
    empty = [b for b in batches if b[1].numel() == 0]
    assert empty, "expected B=0 batches with q=0.001, N=10"
    x, y = empty[0]
    assert x.shape == (0, 3) and x.dtype == torch.float32
    assert y.shape == (0,) and y.dtype == torch.int64
    # a model step on an empty batch is well defined: the gradient sum is zero
    model = torch.nn.Linear(3, 2)
    model(x).sum().backward()
    assert torch.count_nonzero(model.weight.grad) == 0


class _DictDataset(Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict:
        return {"x": np.ones((2, 2), dtype=np.float32) * i, "label": i, "meta": ("name", 0.5)}


def test_collate_with_empty_mirrors_default_collate() -> None:
    ds = _DictDataset()
    collate = collate_with_empty(ds[0])
    full, empty = collate([ds[1], ds[2]]), collate([])
    assert empty.keys() == full.keys()
    assert empty["x"].shape == (0, 2, 2) and empty["x"].dtype == full["x"].dtype
    assert empty["label"].shape == (0,) and empty["label"].dtype == full["label"].dtype
    assert empty["meta"][0] == [] and empty["meta"][1].shape == (0,)
    point = collections.namedtuple("point", "a b")
    empty_nt = collate_with_empty(point(torch.zeros(4), 1))([])
    assert isinstance(empty_nt, point) and empty_nt.a.shape == (0, 4)


def test_works_as_batch_sampler_with_workers() -> None:
    ds = TensorDataset(torch.arange(40.0).unsqueeze(1))
    sampler = PoissonBatchSampler(len(ds), 0.05, steps=30, seed=5)
    expected = list(PoissonBatchSampler(len(ds), 0.05, steps=30, seed=5))
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_with_empty(ds[0]), num_workers=2)
    got = [b[0].flatten().long().tolist() for b in loader]
    assert got == expected


@pytest.mark.parametrize(
    "args,match",
    [
        ((0, 0.1), "num_samples"),
        ((10, 0.0), "sample_rate"),
        ((10, 1.5), "sample_rate"),
        ((10, 0.1, -1), "steps"),
    ],
)
def test_validates(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PoissonBatchSampler(*args)
    with pytest.raises(ValueError, match="either"):
        PoissonBatchSampler(10, 0.1, generator=torch.Generator(), seed=1)
