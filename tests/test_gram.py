"""The blocked symmetric Gram products of ghost norms equal the full products (rules/gram.py)."""

from __future__ import annotations

import pytest
import torch
from torch.ops import aten

import grapefx
from grapefx.rules.gram import (
    block_count,
    dense_blocks,
    ghost_norm_sq,
    gram_fraction,
    same_id_blocks,
    symmetric_gram_dot,
)

# The width is only a cost hint: a huge one forces the blocked form the T-based rule picks for
# large products, so every block count is checked on small tensors.
LARGE = 10**9


@pytest.mark.parametrize("T", [1, 3, 16, 17, 64, 130])
def test_ghost_norm_equals_the_instantiated_norm(T: int) -> None:
    g = torch.Generator().manual_seed(T)
    L = torch.randn(3, T, 5, generator=g, dtype=torch.float64)
    R = torch.randn(3, T, 7, generator=g, dtype=torch.float64)
    expected = torch.einsum("btm,btn->bmn", L, R).pow(2).sum(dim=(1, 2))
    torch.testing.assert_close(ghost_norm_sq(L, R), expected, rtol=1e-12, atol=0)
    blocked = symmetric_gram_dot(dense_blocks(L), dense_blocks(R), T, LARGE)
    torch.testing.assert_close(blocked, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("T", [2, 16, 33, 64, 100])
def test_same_id_blocks_give_the_embedding_norm(T: int) -> None:
    """Σ_{t,s} [id_t = id_s](g_t·g_s) with padding excluded is the norm of the scattered gradient."""
    g = torch.Generator().manual_seed(T)
    V, pad = 6, 0
    ids = torch.randint(0, V, (4, T), generator=g)
    grads = torch.randn(4, T, 3, generator=g, dtype=torch.float64)
    keep = ids != pad
    per_sample = torch.zeros(4, V, 3, dtype=torch.float64).scatter_add(
        1, ids[..., None].expand_as(grads), grads * keep[..., None]
    )
    for width in (3 + 1, LARGE):
        got = symmetric_gram_dot(same_id_blocks(ids, keep), dense_blocks(grads), T, width)
        torch.testing.assert_close(got.double(), per_sample.pow(2).sum(dim=(1, 2)), rtol=1e-6, atol=1e-9)


def test_blocking_computes_the_stated_share_of_the_products() -> None:
    calls: list[tuple[int, int]] = []

    def counting(rows: slice, cols: slice) -> torch.Tensor:
        n_rows, n_cols = rows.stop - rows.start, cols.stop - cols.start
        calls.append((n_rows, n_cols))
        return torch.ones(1, n_rows, n_cols)

    T, width = 128, 1280  # M3's MLP: 21M multiply-adds per sample
    assert block_count(T, width) == 4
    symmetric_gram_dot(counting, counting, T, width)
    entries = sum(r * c for r, c in calls) / 2  # both sides are called once per block
    assert entries == gram_fraction(T, width) * T * T
    # all ones: Σ_{t,s} 1·1 = T²
    assert symmetric_gram_dot(counting, counting, T, width).item() == T * T


def test_small_products_take_one_block() -> None:
    """A mixture-of-experts layer's expert (T=64, 128 -> 256) or a short sequence: one product."""
    assert block_count(64, 128 + 256) == 1
    assert block_count(32, 256 + 256) == 1
    assert gram_fraction(64, 128 + 256) == 1.0
    assert block_count(64, 256 + 1024) == 4
    assert block_count(32, 256 + 8192) == 2
    assert block_count(128, 64 + 64) == 4  # measured 15% faster blocked (results/gram-blocks-cpu-2c.md)
    assert block_count(96, 32 + 32) == 4  # past 64 rows: blocks keep the Gram temporaries small


def test_a_compiled_backward_takes_one_product_per_small_gram() -> None:
    """End to end: ghost norms of two 16-wide layers on T=32 tokens (T²·(M+N) = 32k multiply-adds
    per sample) compute each Gram in one bmm: two per weight, none of the block slices."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    cm = grapefx.compile(model, max_grad_norm=1.0, noise_multiplier=0.0, loss_reduction="sum", strategy="ghost")
    cm(torch.randn(3, 32, 16)).sum().backward()
    nodes = cm.grapefx_backend.graphs["backward"].graph.nodes
    norm_bmms: dict[str, int] = {}
    for n in nodes:
        meta = n.meta.get("grapefx") or {}
        if n.target == aten.bmm.default and meta.get("role") == "norm" and meta["param"].endswith("weight"):
            norm_bmms[meta["param"]] = norm_bmms.get(meta["param"], 0) + 1
    assert norm_bmms == {"0.weight": 2, "2.weight": 2}, norm_bmms
