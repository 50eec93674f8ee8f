"""The second pass of two-pass clipping (PrivacyConfig.two_pass): the backward replayed with the
loss gradient weighted per sample.

Every grad site is linear in the gradient flowing into the backward (the tangents), and a sample's
share of a tangent is its rows along the tangent's batch dim. Scaling those rows by w_i (the clip
factor, loss scale and denominator of `clip_factors.flat_weights`) and running the original backward
again gives Σ_i w_i g_i at every parameter output: the clipped sum, with no operand of the first
pass kept past the norms. That is what activation checkpointing needs: its recomputed activations
live for one layer's backward in each pass, never across the barrier.
"""

from __future__ import annotations

from typing import Any

import sympy
import torch
import torch.fx as fx

from grapefx.analysis.layout import BatchLayout, LayoutResult
from grapefx.config import PrivacyConfig
from grapefx.errors import GrapefxError
from grapefx.passes.interp import call_node


def weighted_tangents(
    tangents: list[fx.Node], values: list[torch.Tensor], layouts: LayoutResult, w: torch.Tensor
) -> dict[fx.Node, torch.Tensor]:
    """Each tangent with its batch rows scaled by `w` [B]."""
    out = {}
    for node, value in zip(tangents, values):
        lay = layouts.layouts.get(node)
        if value is None:
            continue
        if not isinstance(lay, BatchLayout) or not sympy.sympify(lay.outer * lay.inner).is_Integer:
            raise GrapefxError(
                f"two_pass=True weights the loss gradient per sample, but the backward input {node.name} "
                "has no per-sample layout (a loss reduced inside the compiled module?). Compute the loss "
                "outside the compiled module, or use two_pass=False."
            )
        outer, inner = int(lay.outer), int(lay.inner)
        per_row = w.reshape(1, -1, 1).expand(outer, -1, inner).reshape(-1)
        shape = [1] * value.dim()
        shape[lay.dim] = -1
        out[node] = value * per_row.reshape(shape).to(value.dtype)
    return out


def weighted_replay(gm: fx.GraphModule, env: dict[fx.Node, Any], scaled: dict[fx.Node, torch.Tensor]) -> dict:
    """The whole backward again, from its inputs in `env` with the tangents of `scaled` swapped in;
    returns every node's value (dead ones are dropped when the rewrite is traced)."""
    second: dict[fx.Node, Any] = {n: env[n] for n in gm.graph.nodes if n.op == "placeholder"}
    second.update(scaled)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            second[node] = getattr(gm, node.target)
        elif node.op == "call_function":
            second[node] = call_node(node, second.__getitem__)
    return second


# single-pass clipping holding more than this multiple of the non-private backward's estimated peak,
# in a graph that recomputes checkpointed activations, earns the two-pass hint
HINT_PEAK_RATIO = 1.5


def recomputes(original: fx.GraphModule) -> bool:
    """The backward recomputes checkpointed activations (AOTAutograd tags those nodes)."""
    return any("recompute" in n.meta for n in original.graph.nodes)


def wants_two_passes(original: fx.GraphModule, config: PrivacyConfig, one_pass_peak: int) -> bool:
    """Whether the memory planner should also try two passes: activation checkpointing under
    memory_policy="min-memory", or a memory_budget one pass does not meet."""
    if config.two_pass or config.clipping == "per_layer" or config.strategy == "grape":
        return False
    over_budget = config.memory_budget is not None and one_pass_peak > config.memory_budget
    return (config.memory_policy == "min-memory" or over_budget) and recomputes(original)


def checkpointing_hint(original: fx.GraphModule, peak: int, original_peak: int, two_pass: bool, clipping: str) -> str:
    """A warning for activation checkpointing under single-pass flat clipping, where the rewrite
    keeps every layer's recomputed operands until all norms are known; empty when it does not apply."""
    if not recomputes(original) or two_pass or clipping == "per_layer" or peak <= HINT_PEAK_RATIO * original_peak:
        return ""
    return (
        "grapefx: this model uses activation checkpointing, and single-pass flat clipping holds every "
        "layer's recomputed operands until all per-sample norms are known: the private backward's "
        f"estimated peak is {peak / 2**20:.1f} MB against {original_peak / 2**20:.1f} MB non-private. "
        "two_pass=True (or memory_policy='min-memory', which plans it) keeps checkpointing's savings "
        "at the cost of a second backward; clipping='per_layer' keeps them in one pass."
    )
