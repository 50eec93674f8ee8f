"""Backwards for batches Dynamo specializes: B=0 (pure noise) and B=1 (the batch is one sample).

With one sample the graph's own parameter gradients are that sample's gradients, so the per-sample
norm is the norm of the graph's outputs and clipping scales them: exact with no layout analysis
(Dynamo may drop the size-1 batch dim with a view, leaving no batch reduction to find).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from grapefx.config import PrivacyConfig
from grapefx.passes.clip_factors import add_noise, clip_weights
from grapefx.passes.tracing import retrace


def empty_batch_backward(
    gm: fx.GraphModule, inputs: list[Any], params: list[tuple[int, str]], config: PrivacyConfig, state_id: int
) -> fx.GraphModule:
    """B=0: every parameter gradient is noise / denom (denom = expected_batch_size or 1 for mean)."""
    denom = float(config.expected_batch_size or 1) if config.loss_reduction == "mean" else 1.0
    param_idx = [i for i, _ in params]

    def fn(*args: Any) -> Any:
        outs = list(torch.fx.Interpreter(gm).run(*args))
        for i in param_idx:
            if outs[i] is not None:
                outs[i] = add_noise(torch.zeros_like(outs[i]), config, state_id, denom)
        return tuple(outs)

    return retrace(fn, inputs)


def single_sample_backward(
    gm: fx.GraphModule, inputs: list[Any], params: list[tuple[int, str]], config: PrivacyConfig, state_id: int
) -> fx.GraphModule:
    param_idx = [i for i, _ in params]

    def fn(*args: Any) -> Any:
        outs = list(torch.fx.Interpreter(gm).run(*args))
        present = [i for i in param_idx if outs[i] is not None]
        norm_sq = [outs[i].float().pow(2).sum().reshape(1) for i in present]
        weights, denom = clip_weights(norm_sq, 1, config, state_id)
        for i, w in zip(present, weights):
            outs[i] = add_noise(outs[i] * w.to(outs[i].dtype), config, state_id, denom)
        return tuple(outs)

    return retrace(fn, inputs)
