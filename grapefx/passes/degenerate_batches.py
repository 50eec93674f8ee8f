"""Backwards for batches Dynamo specializes: B=0 (pure noise) and B=1 (the batch is one sample).

With one sample the graph's own parameter gradients are that sample's gradients, so the per-sample
norm is the norm of the graph's outputs and clipping scales them: exact with no layout analysis
(Dynamo may drop the size-1 batch dim with a view, leaving no batch reduction to find).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

import grapefx.grape.projection  # noqa: F401 - registers grapefx::projection
from grapefx.config import PrivacyConfig
from grapefx.passes.clip_factors import add_noise, clip_weights, recorded_norms
from grapefx.passes.tracing import retrace


def _projected(names: set[str], params: list[tuple[int, str]]) -> dict[int, str]:
    return {i: n for i, n in params if n in names}


def _project(grad: torch.Tensor, index: int, config: PrivacyConfig, state_id: int) -> tuple[torch.Tensor, Any]:
    """Ĝ = P G (rows, m <= n) or G Pᵀ, with the same P the B>=2 graph uses for this parameter."""
    m, n = grad.shape
    rows = m <= n
    P = torch.ops.grapefx.projection(grad, config.rank, m if rows else n, index, state_id)
    return (P @ grad if rows else grad @ P.t()), (P, rows)


def _back_project(ghat: torch.Tensor, name: str, proj: tuple[torch.Tensor, bool], state_id: int) -> torch.Tensor:
    ghat = torch.ops.grapefx.stash_projected(ghat.contiguous(), name, state_id)
    P, rows = proj
    return P.t() @ ghat if rows else ghat @ P


def empty_batch_backward(
    gm: fx.GraphModule, inputs: list[Any], params: list[tuple[int, str]], config: PrivacyConfig, state_id: int
) -> fx.GraphModule:
    """B=0: every parameter gradient is noise / denom (denom = expected_batch_size or 1 for mean)."""
    denom = float(config.expected_batch_size or 1) if config.loss_reduction == "mean" else 1.0
    projected = _projected(set(config.grape_params or ()), params)

    def fn(*args: Any) -> Any:
        outs = list(torch.fx.Interpreter(gm).run(*args))
        present = [i for i, _ in params if outs[i] is not None]
        # an empty batch is still a logical step: publish its (empty) norms
        recorded_norms([outs[i].new_zeros(0) for i in present], 1, 0, len(present), state_id)
        for i in present:
            zero = torch.zeros_like(outs[i])
            if i in projected:
                ghat, proj = _project(zero, i, config, state_id)
                outs[i] = _back_project(add_noise(ghat, config, state_id, denom), projected[i], proj, state_id)
            else:
                outs[i] = add_noise(zero, config, state_id, denom)
        return tuple(outs)

    return retrace(fn, inputs)


def single_sample_backward(
    gm: fx.GraphModule, inputs: list[Any], params: list[tuple[int, str]], config: PrivacyConfig, state_id: int
) -> fx.GraphModule:
    projected = _projected(set(config.grape_params or ()), params)

    def fn(*args: Any) -> Any:
        outs = list(torch.fx.Interpreter(gm).run(*args))
        present = [i for i, _ in params if outs[i] is not None]
        projections = {}
        for i in present:
            if i in projected:
                outs[i], projections[i] = _project(outs[i], i, config, state_id)
        norm_sq = [outs[i].float().pow(2).sum().reshape(1) for i in present]
        weights, denom = clip_weights(norm_sq, 1, config, state_id)
        for i, w in zip(present, weights):
            outs[i] = add_noise(outs[i] * w.to(outs[i].dtype), config, state_id, denom)
            if i in projections:
                outs[i] = _back_project(outs[i], projected[i], projections[i], state_id)
        return tuple(outs)

    return retrace(fn, inputs)
