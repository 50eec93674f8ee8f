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
from grapefx.distributed.ops import reduce_projected
from grapefx.passes.clip_factors import add_noise, clip_bound, clip_weights, loss_scale_and_denom, recorded_norms
from grapefx.passes.grape_project import projection_index
from grapefx.passes.interp import ViewTolerantInterpreter
from grapefx.passes.tracing import retrace
from grapefx.rules.registry import accumulated


def _projected(names: set[str], params: list[tuple[int, str]]) -> dict[int, str]:
    return {i: n for i, n in params if n in names}


def _project(grad: torch.Tensor, name: str, config: PrivacyConfig, state_id: int) -> tuple[torch.Tensor, Any]:
    """Ĝ = P G (rows, m <= n) or G Pᵀ, with the same P the B>=2 graph uses for this parameter."""
    index = projection_index(name, config)
    m, n = grad.shape
    rows = m <= n
    P = torch.ops.grapefx.projection(grad, config.rank, m if rows else n, index, state_id)
    return (P @ grad if rows else grad @ P.t()), (P, rows)


def _back_project(ghat: torch.Tensor, name: str, proj: tuple[torch.Tensor, bool], state_id: int) -> torch.Tensor:
    ghat = torch.ops.grapefx.stash_projected(ghat.contiguous(), name, state_id)
    P, rows = proj
    return P.t() @ ghat if rows else ghat @ P


def _finish_projected(
    outs: list[Any],
    ghats: dict[int, torch.Tensor],
    projections: dict[int, tuple[torch.Tensor, bool]],
    projected: dict[int, str],
    config: PrivacyConfig,
    state_id: int,
) -> None:
    """Back-project every Ĝ into outs (distributed: after one all-reduce of all of them, as B>=2 does)."""
    if config.distributed and ghats:  # keyed by the stable index: the same order as every other graph
        by_index = {projection_index(projected[i], config): i for i in ghats}
        reduced = reduce_projected({k: ghats[i] for k, i in by_index.items()}, state_id)
        ghats = {by_index[k]: g for k, g in reduced.items()}
    for i, ghat in ghats.items():
        outs[i] = _back_project(ghat, projected[i], projections[i], state_id)


def empty_batch_backward(
    gm: fx.GraphModule, inputs: list[Any], params: list[tuple[int, str]], config: PrivacyConfig, state_id: int
) -> fx.GraphModule:
    """B=0: every parameter gradient is noise / denom (denom = expected_batch_size or 1 for mean)."""
    projected = _projected(set(config.grape_params or ()), params)

    def fn(*args: Any) -> Any:
        outs = list(ViewTolerantInterpreter(gm).run(*args))
        present = [i for i, _ in params if outs[i] is not None]
        denom: Any = 1.0
        if config.distributed and present:  # run-time global denominator (other ranks may hold samples)
            like = next(outs[i] for i in present)
            _, denom = loss_scale_and_denom(0, config, state_id, like)
        elif not config.distributed:
            denom = float(config.expected_batch_size or 1) if config.loss_reduction == "mean" else 1.0
        # an empty batch is still a logical step: publish its (empty) norms (an op with a side
        # effect: kept though its output is unused)
        recorded = recorded_norms([outs[i].new_zeros(0) for i in present], 1, 0, len(present), state_id)
        C = clip_bound(config, recorded, state_id)
        ghats, projections = {}, {}
        for i in present:
            zero = torch.zeros_like(outs[i])
            if i in projected:
                ghat, projections[i] = _project(zero, projected[i], config, state_id)
                ghats[i] = add_noise(ghat, config, state_id, denom, C)
            else:
                outs[i] = add_noise(zero, config, state_id, denom, C)
        _finish_projected(outs, ghats, projections, projected, config, state_id)
        return tuple(outs)

    return retrace(fn, inputs)


def single_sample_backward(
    gm: fx.GraphModule, inputs: list[Any], params: list[tuple[int, str]], config: PrivacyConfig, state_id: int
) -> fx.GraphModule:
    projected = _projected(set(config.grape_params or ()), params)
    names = dict(params)

    def fn(*args: Any) -> Any:
        outs = list(ViewTolerantInterpreter(gm).run(*args))
        present = [i for i, _ in params if outs[i] is not None]
        projections = {}
        for i in present:
            if i in projected:
                outs[i], projections[i] = _project(outs[i], projected[i], config, state_id)
        norm_sq = [accumulated(outs[i]).pow(2).sum().reshape(1) for i in present]
        weights, denom, C = clip_weights(norm_sq, [names[i] for i in present], 1, config, state_id)
        ghats = {}
        for i, w in zip(present, weights):
            outs[i] = add_noise(outs[i] * w.to(outs[i].dtype), config, state_id, denom, C)
            if i in projections:
                ghats[i] = outs[i]
        _finish_projected(outs, ghats, projections, projected, config, state_id)
        return tuple(outs)

    return retrace(fn, inputs)
