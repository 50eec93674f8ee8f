"""The torch.func oracle: per-sample gradients in float64, clipped and summed by hand."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap


def oracle_grads(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    per_sample_loss: Callable[..., torch.Tensor],
    max_grad_norm: float,
    loss_reduction: str = "mean",
    clipping: str = "flat",
    expected_batch_size: int | None = None,
    gamma: float = 0.01,
    groups: list[list[str]] | None = None,
    shares: list[float] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Σ_i c_i g_i / denom for every trainable parameter, float64; also the per-sample norms.

    per_sample_loss(model_output_for_one_sample, *other_inputs_for_one_sample) -> scalar, called
    on a batch of one (inputs keep a leading dim of 1). clipping="group": `groups` lists the
    parameter names clipped together, to C·s_g/‖s‖ with `shares` s (equal if None).
    """
    m = reference_copy(model)
    params = {k: v.detach() for k, v in m.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in m.named_buffers()}
    ins = tuple(x.double() if x.is_floating_point() else x for x in inputs)

    def loss_one(p: dict, *xs: torch.Tensor) -> torch.Tensor:
        batch = tuple(x.unsqueeze(0) for x in xs)
        out = functional_call(m, (p, buffers), (batch[0],))
        return per_sample_loss(out, *batch[1:])

    per_sample = per_sample_grads(m, loss_one, params, ins)
    B = inputs[0].shape[0]
    flat = torch.cat([per_sample[k].reshape(B, -1) for k in params], dim=1) if B else torch.zeros(0, 1)
    norms = flat.norm(dim=1)
    C = max_grad_norm
    if clipping == "flat":
        c = {k: (C / (norms + 1e-6)).clamp(max=1.0) for k in params}
    elif clipping == "automatic":
        c = {k: C / (norms + gamma) for k in params}
    elif clipping == "group":
        assert groups is not None and sorted(n for g in groups for n in g) == sorted(params), groups
        s = shares or [1.0] * len(groups)
        c = {}
        for g, share in zip(groups, s):
            bound = C * share / math.sqrt(sum(x * x for x in s))
            norm = torch.cat([per_sample[k].reshape(B, -1) for k in g], dim=1).norm(dim=1)
            c.update(dict.fromkeys(g, (bound / (norm + 1e-6)).clamp(max=1.0)))
    else:
        cp = C / math.sqrt(len(params))
        c = {k: (cp / (per_sample[k].reshape(B, -1).norm(dim=1) + 1e-6)).clamp(max=1.0) for k in params}
    denom = 1.0
    if loss_reduction == "mean":
        denom = float(expected_batch_size or max(B, 1))
    out = {}
    for k in params:
        ps = per_sample[k]
        out[k] = (ps * c[k].reshape(-1, *[1] * (ps.dim() - 1))).sum(0) / denom
    return out, norms


def reference_copy(model: nn.Module) -> nn.Module:
    """A float64 copy of `model` that torch.func can differentiate per sample."""
    m = copy.deepcopy(model).double()
    for mod in m.modules():  # transformers MoE: the reference loop over experts (grouped_mm has no float64)
        if hasattr(getattr(mod, "config", None), "_experts_implementation"):
            mod.config._experts_implementation = "eager"
        if getattr(mod, "gradient_checkpointing", False):  # torch.func cannot run checkpoint's hooks;
            mod.gradient_checkpointing = False  # recomputing activations changes no gradient
        if getattr(mod, "_require_grads_hook", None) is not None:  # set with checkpointing: requires_grad_()
            mod.disable_input_require_grads()  # on the embeddings' output, which torch.func refuses
    return m


def per_sample_grads(
    m: nn.Module, loss_one: Callable[..., torch.Tensor], params: dict, ins: tuple
) -> dict[str, torch.Tensor]:
    """{name: [B, *shape]} gradients of loss_one(params, *sample_i) for each sample i of `ins`: vmap,
    or one sample at a time where vmap cannot run the model."""
    if any(isinstance(mod, nn.RNNBase) for mod in m.modules()):
        return _loop_per_sample(loss_one, params, ins)  # torch's RNN modules cannot run under vmap
    try:
        return vmap(grad(loss_one), in_dims=(None,) + (0,) * len(ins))(params, *ins)
    except RuntimeError as e:  # x[bool mask], a loop over experts: data-dependent, vmap cannot batch it
        # an autograd.Function torch.func cannot run (DeBERTa's XSoftmax); a module moved with .to()
        # inside its forward (Switch Transformers' router), which sets .data
        if "setup_context" in str(e) or "inside functorch transform" in str(e):
            return _autograd_per_sample(loss_one, params, ins)
        if "dynamic shape" not in str(e) and "data-dependent" not in str(e):
            raise
        return _loop_per_sample(loss_one, params, ins)


def _loop_per_sample(loss_one: Callable[..., torch.Tensor], params: dict, ins: tuple) -> dict[str, torch.Tensor]:
    """The same per-sample gradients as vmap(grad(...)), one sample at a time."""
    B = ins[0].shape[0]
    names = list(params)
    rows = [grad(loss_one)(params, *(x[i] for x in ins)) for i in range(B)]
    return {k: torch.stack([r[k] for r in rows]) if B else params[k].new_zeros(0, *params[k].shape) for k in names}


def _autograd_per_sample(loss_one: Callable[..., torch.Tensor], params: dict, ins: tuple) -> dict[str, torch.Tensor]:
    """The same per-sample gradients with plain autograd, one sample at a time (no torch.func)."""
    B = ins[0].shape[0]
    names = list(params)
    rows = []
    for i in range(B):
        p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        gs = torch.autograd.grad(loss_one(p, *(x[i] for x in ins)), [p[k] for k in names], allow_unused=True)
        rows.append({k: torch.zeros_like(p[k]) if g is None else g for k, g in zip(names, gs)})
    return {k: torch.stack([r[k] for r in rows]) if B else params[k].new_zeros(0, *params[k].shape) for k in names}


def assert_grads_match(model: nn.Module, ref: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    """Relative error of every parameter gradient vs the oracle, scaled by the gradient's norm."""
    seen = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen parameter {name} received a gradient"
            continue
        seen += 1
        assert p.grad is not None, f"parameter {name} has no gradient"
        r = ref[name]
        err = (p.grad.double() - r).norm().item()
        scale = max(r.norm().item(), 1e-3)
        assert err <= rtol * scale + 1e-7, f"{name}: |err|={err:.3e} vs |ref|={scale:.3e}"
    assert seen == len(ref)
