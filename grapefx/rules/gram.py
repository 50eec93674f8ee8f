"""Ghost norms from two symmetric Gram matrices, computing only their lower block triangle.

A ghost norm is Σ_{t,s} X[t,s]·Y[t,s] where X and Y are [B, T, T] Gram matrices of one sample's rows
(X = L Lᵀ, Y = R Rᵀ for an mm site; X = [id_t = id_s] for an embedding). Both are symmetric, so with
the T rows split into k blocks, block column j needs only rows 0..end_j: the blocks above the
diagonal count twice, the diagonal block once. That is (k+1)/2k of the full Gram products' flops
(measured on this project's CPU at T=128: 15-30% less time for the pair of products, with k=4).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# [B, rows, cols] inner products of the sample's rows `rows` with its rows `cols`.
BlockGram = Callable[[slice, slice], torch.Tensor]


# Below this many multiply-adds per sample (T²·width) and up to UNBLOCKED_ROWS rows, the Gram
# products are too small for blocking to pay: one block is as fast (tools/gram_blocks.py) and a
# block column costs ~15 more ops to run (host time: the eager codegen's Python, a GPU's launches)
# and to trace. Past UNBLOCKED_ROWS the blocks also keep the [B, T, T] temporaries at T/k columns.
SMALL_GRAM_MACS = 2_000_000
UNBLOCKED_ROWS = 64


def block_count(T: int, width: int) -> int:
    """Row blocks per sample for Gram products of rows `width` wide in all (M + N for two dense
    factors): small T or small products gain nothing from more, smaller products."""
    if T <= UNBLOCKED_ROWS and T * T * width < SMALL_GRAM_MACS:
        return 1
    return 4 if T >= 64 else 2 if T >= 16 else 1


def gram_fraction(T: int, width: int) -> float:
    """The share of the full T×T Gram products that the blocked form computes."""
    k = block_count(T, width)
    return (k + 1) / (2 * k)


def rows_of(x: torch.Tensor, rows: slice) -> torch.Tensor:
    """x[:, rows] through `narrow`: the same slice, but indexing with a tuple of slices costs ~3× as
    much to trace under a symbolic batch size (seconds of a deep model's compile)."""
    if rows.start == 0 and rows.stop == x.shape[1]:
        return x
    return x.narrow(1, rows.start, rows.stop - rows.start)


def dense_blocks(x: torch.Tensor) -> BlockGram:
    """Block Gram of dense rows x [B, T, m]."""
    return lambda rows, cols: torch.bmm(rows_of(x, rows), rows_of(x, cols).transpose(1, 2))


def same_id_blocks(ids: torch.Tensor, keep: torch.Tensor | None = None) -> BlockGram:
    """Block Gram of one-hot rows: [id_t = id_s] for token ids [B, T], rows where `keep` is False
    (padding) counting as zero."""

    def block(rows: slice, cols: slice) -> torch.Tensor:
        same = ids[:, rows, None] == ids[:, None, cols]
        if keep is not None:
            same = same & keep[:, rows, None] & keep[:, None, cols]
        return same.float()

    return block


def symmetric_gram_dot(left: BlockGram, right: BlockGram, T: int, width: int) -> torch.Tensor:
    """[B] Σ_{t,s} left[t,s]·right[t,s] for two symmetric [B, T, T] Gram matrices given by blocks,
    of rows `width` wide in all (block_count)."""
    k = block_count(T, width)
    bounds = [T * j // k for j in range(k + 1)]
    total: torch.Tensor | None = None
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        rows, cols = slice(0, hi), slice(lo, hi)
        prod = left(rows, cols) * right(rows, cols)  # [B, hi, hi - lo]: block column j
        part = prod.sum(dim=(1, 2))
        if lo > 0:  # rows above the diagonal block are mirrored below it: count them twice
            part = 2 * part - rows_of(prod, slice(lo, hi)).sum(dim=(1, 2))
        total = part if total is None else total + part
    assert total is not None
    return total


def ghost_norm_sq(L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """[B] ‖Σ_t L_t ⊗ R_t‖² = Σ_{t,s} (L_t·L_s)(R_t·R_s) for L [B, T, M], R [B, T, N]."""
    if L.shape[1] == 1:  # one row per sample (a 2-D linear): ‖L‖²‖R‖², no [B, 1, 1] batched products
        return L.square().sum(dim=(1, 2)) * R.square().sum(dim=(1, 2))
    return symmetric_gram_dot(dense_blocks(L), dense_blocks(R), L.shape[1], L.shape[2] + R.shape[2])
