"""A mixture-of-experts implementation for transformers' experts modules that grapefx can split per
sample at the cost of the grouped one.

transformers 5.x lets an experts module (Mixtral, Qwen-MoE, OLMoE, GPT-OSS, ...) run through any
function registered in its `ExpertsInterface`. Its own choices do not suit per-sample clipping:
- "grouped_mm" sorts the tokens of the whole batch by expert and multiplies each expert's run of rows
  in one opaque op: the rows of all samples are mixed, and no rule sees which sample each came from;
- "batched_mm" gathers each token's expert weights, `W[ids]` ([tokens·k, out, in]), and applies them
  with batched matmuls: per sample, but that gathered copy is saved for the backward and its gradient
  materialized, which costs ~40× the time and ~12× the memory of "grouped_mm" on a small Mixtral
  (`results/session18.md`);
- "eager" loops over the experts that received tokens: a loop over data, a graph break.
Some models' experts modules have only such a loop (DBRX, Switch Transformers): `LOOP_EXPERTS`
replaces their forward by the same masked-row form.

"grapefx_masked_rows" (this file) loops over all experts, a fixed count, and applies expert e to the
rows of the tokens routed to it, `x[mask_e]`, with plain matmuls, then adds the results back through
the same mask. The flops are those of the grouped implementation. For grapefx each expert is then a
layer applied to masked rows (`passes/pad_masked_rows.py` reads its weight gradient per sample), and
the fused expert weights are unbound into one piece per expert, whose gradients fill disjoint slices
(`ParamGrad.disjoint_pieces`: each piece gets its own ghost or instantiated norm). Routing, weights
and outputs are those of the module's own implementations (the oracle tests compare against
transformers' eager loop).
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

NAME = "grapefx_masked_rows"


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """x @ weightᵀ (+ bias): `weight` is [out, in], or [in, out] when the module stores it transposed."""
    out = x @ weight if transposed else F.linear(x, weight)
    return out if bias is None else out + bias


def _pieces(t: torch.Tensor | None, count: int) -> list[torch.Tensor | None]:
    return list(t.unbind(0)) if t is not None else [None] * count


def _route(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    count: int,
    expert: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Σ_j weight_j · expert(index_j, token) for every token: hidden_states [tokens, d], top_k_index /
    top_k_weights [tokens, k]. Expert e runs on the rows routed to it, x[mask_e] (a fixed loop over
    all `count` experts, however many tokens each gets)."""
    out = torch.zeros_like(hidden_states)
    for e in range(count):
        hit = top_k_index == e  # [tokens, k]
        mask = hit.any(dim=-1)
        rows = expert(e, hidden_states[mask])
        weight = (top_k_weights * hit).sum(dim=-1)[mask]
        out = out.index_put((mask,), (rows * weight[:, None]).to(out.dtype), accumulate=True)
    return out


def masked_rows_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The ExpertsInterface form: hidden_states [tokens, d]; top_k_index / top_k_weights [tokens, k]:
    each token's experts and routing weights. Returns [tokens, d]."""
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError(f"{NAME} does not support expert parallelism")
    count = self.num_experts
    gated = self.has_gate
    up = _pieces(self.gate_up_proj if gated else self.up_proj, count)
    up_bias = _pieces((self.gate_up_proj_bias if gated else self.up_proj_bias) if self.has_bias else None, count)
    down = _pieces(self.down_proj, count)
    down_bias = _pieces(self.down_proj_bias if self.has_bias else None, count)

    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        rows = _linear(rows, up[e], up_bias[e], self.is_transposed)
        rows = self._apply_gate(rows) if gated else self.act_fn(rows)
        rows = _linear(rows, down[e], down_bias[e], self.is_transposed)
        return self.post_expert_norm(rows) if self.has_post_expert_norm else rows

    return _route(hidden_states, top_k_index, top_k_weights, count, expert)


# -- experts modules that loop over the experts hit and take no ExpertsInterface implementation --


def _dbrx_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """DbrxExperts: w1 / v1 / w2 are [experts·ffn, d], each expert a [ffn, d] block (a GLU)."""
    batch_size = hidden_states.shape[0]
    flat = hidden_states.reshape(-1, self.hidden_size)
    shape = (self.num_experts, self.ffn_hidden_size, self.hidden_size)
    w1, v1, w2 = (w.view(shape).unbind(0) for w in (self.mlp.w1, self.mlp.v1, self.mlp.w2))
    out = _route(flat, top_k_index, top_k_weights, self.num_experts, lambda e, x: self.mlp(x, w1[e], v1[e], w2[e]))
    return out.view(batch_size, -1, self.hidden_size)


def _switch_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, selected_experts: torch.Tensor, routing_weights: torch.Tensor
) -> torch.Tensor:
    """SwitchTransformersExperts: one module per expert; selected_experts [tokens, 1, experts] one-hot
    (all zeros for a token over an expert's capacity), routing_weights [tokens, 1]."""
    index = torch.where(selected_experts.any(dim=-1), selected_experts.argmax(dim=-1), -1)  # [tokens, 1]
    return _route(hidden_states, index, routing_weights, self.num_experts, lambda e, x: self[f"expert_{e}"](x))


# class -> forward, for transformers' experts modules whose own forward loops over the experts hit
LOOP_EXPERTS: dict[tuple[str, str], Callable[..., torch.Tensor]] = {
    ("transformers.models.dbrx.modeling_dbrx", "DbrxExperts"): _dbrx_experts_forward,
    ("transformers.models.switch_transformers.modeling_switch_transformers", "SwitchTransformersExperts"): (
        _switch_experts_forward
    ),
}


def loop_experts(model: nn.Module) -> list[nn.Module]:
    """The experts modules of `model` whose forward `LOOP_EXPERTS` replaces."""
    return [m for m in model.modules() if (type(m).__module__, type(m).__name__) in LOOP_EXPERTS]


def masked_rows_forward(module: nn.Module) -> Callable[..., torch.Tensor]:
    """`module`'s forward as masked rows, bound to it (for a module of `loop_experts`)."""
    return types.MethodType(LOOP_EXPERTS[type(module).__module__, type(module).__name__], module)


def register() -> str:
    """Register the implementation in transformers' ExpertsInterface (idempotent); returns its name."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NAME, masked_rows_experts_forward)
    return NAME
