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

import torch
import torch.nn.functional as F

NAME = "grapefx_masked_rows"


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """x @ weightᵀ (+ bias): `weight` is [out, in], or [in, out] when the module stores it transposed."""
    out = x @ weight if transposed else F.linear(x, weight)
    return out if bias is None else out + bias


def _pieces(t: torch.Tensor | None, count: int) -> list[torch.Tensor | None]:
    return list(t.unbind(0)) if t is not None else [None] * count


def masked_rows_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """hidden_states [tokens, d]; top_k_index / top_k_weights [tokens, k]: each token's experts and
    routing weights. Returns [tokens, d], Σ_j weight_j · expert_{index_j}(token)."""
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError(f"{NAME} does not support expert parallelism")
    count = self.num_experts
    gated = self.has_gate
    up = _pieces(self.gate_up_proj if gated else self.up_proj, count)
    up_bias = _pieces((self.gate_up_proj_bias if gated else self.up_proj_bias) if self.has_bias else None, count)
    down = _pieces(self.down_proj, count)
    down_bias = _pieces(self.down_proj_bias if self.has_bias else None, count)
    out = torch.zeros_like(hidden_states)
    for e in range(count):
        hit = top_k_index == e  # [tokens, k]
        mask = hit.any(dim=-1)
        rows = _linear(hidden_states[mask], up[e], up_bias[e], self.is_transposed)
        rows = self._apply_gate(rows) if gated else self.act_fn(rows)
        rows = _linear(rows, down[e], down_bias[e], self.is_transposed)
        if self.has_post_expert_norm:
            rows = self.post_expert_norm(rows)
        weight = (top_k_weights * hit).sum(dim=-1)[mask]
        out = out.index_put((mask,), (rows * weight[:, None]).to(out.dtype), accumulate=True)
    return out


def register() -> str:
    """Register the implementation in transformers' ExpertsInterface (idempotent); returns its name."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NAME, masked_rows_experts_forward)
    return NAME
