"""Random Gaussian projections P (r × d, i.i.d. N(0, 1/r)), regenerated from a seed, never stored.

P for parameter `index` in resampling block `block` is a pure function of (seed, block, index), so the
backward graph, the optimizer and anyone checking a result against a dense reference get the same
matrix without keeping it. The block advances every `resample_every` logical steps (backward passes
that add noise, i.e. once per logical batch under gradient accumulation).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from grapefx.privacy.noise import get_state


def _seed_for(seed: int, block: int, index: int) -> int:
    digest = hashlib.sha256(f"grapefx-projection/{seed}/{block}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def projection_matrix(
    seed: int, block: int, index: int, rank: int, dim: int, device: Any = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The r × dim projection with i.i.d. N(0, 1/r) entries for (seed, block, parameter index)."""
    gen = torch.Generator(device="cpu").manual_seed(_seed_for(seed, block, index))
    p = torch.randn(rank, dim, generator=gen, dtype=torch.float32) / rank**0.5
    return p.to(device=device, dtype=dtype)


@torch.library.custom_op("grapefx::projection", mutates_args=())
def projection_op(like: torch.Tensor, rank: int, dim: int, index: int, state_id: int) -> torch.Tensor:
    """P for the current resampling block of the model's privacy state (`like` gives device/dtype)."""
    state = get_state(state_id)
    block = state.completed_steps // max(state.resample_every, 1)
    state.projection_blocks[index] = block
    return projection_matrix(state.projection_seed, block, index, rank, dim, like.device, like.dtype)


@projection_op.register_fake
def _(like: torch.Tensor, rank: int, dim: int, index: int, state_id: int) -> torch.Tensor:
    return like.new_empty(rank, dim)


def current_projection(model: Any, name: str) -> torch.Tensor:
    """The projection used for parameter `name` in the last backward of a grapefx-compiled model.

    For a weight W (m × n) with m <= n the privatized gradient is Ĝ = P G (P: r × m, Ĝ: r × n);
    otherwise Ĝ = G Pᵀ (P: r × n, Ĝ: m × r). `grapefx.grape.projected_grad(model, name)` returns Ĝ.
    """
    state = model.privacy_state
    info = state.projected.get(name)
    if info is None:
        raise KeyError(f"parameter {name!r} is not projected; projected: {sorted(state.projected)}")
    index, rank, dim = info["index"], info["rank"], info["dim"]
    block = state.projection_blocks.get(index, state.completed_steps // max(state.resample_every, 1))
    return projection_matrix(state.projection_seed, block, index, rank, dim)
