"""Three habits of Hugging Face transformers models that break Dynamo's single graph, undone for grapefx.

1. Output-capturing hooks (transformers 5.x, `utils/output_capturing.py`) are installed lazily, on
   the first forward that asks for hidden states or attentions, under a `threading.Lock` that Dynamo
   cannot trace. Models that always ask (Wav2Vec2, HuBERT, WavLM) then stop with a graph break.
   `install_output_hooks` installs them up front, exactly as transformers' first eager call would;
   the hooks do nothing unless an output is requested. Hooks an earlier eager call installed are
   removed first: installing on top of them would capture every hidden state twice.
2. Mixture-of-experts layers (Mixtral, Qwen-MoE, ...) dispatch tokens to experts either with a
   Python loop over the experts that hold tokens (a graph break) or with `grouped_mm`, an opaque
   op over the rows of all samples sorted by expert. `masked_row_experts` switches them to
   grapefx's "grapefx_masked_rows" implementation (`grapefx/moe_experts.py`) while the compiled model
   runs: the same experts and routing, each expert applied to the rows routed to it, x[mask]. The
   experts modules of DBRX and Switch Transformers, which only have the loop, get the same form as
   their forward (`moe_experts.LOOP_EXPERTS`).
3. Speech feature encoders (Wav2Vec2FeatureEncoder and its copies) set `hidden_states.requires_grad
   = True` in training mode, for gradient checkpointing; Dynamo cannot trace setting the flag.
   `input_grad_flags_off` clears their `_requires_grad` while the compiled model runs. Only the
   input's own gradient depended on it, which grapefx does not compute: parameter gradients, and so
   the clipped and noised ones, are unchanged.

`grapefx.compile` applies all three, the last two only while its compiled model runs. Users of the
plain path, `torch.compile(model, backend=grapefx.backend(...))`, call `grapefx.prepare(model)` once
before compiling: Dynamo traces before any backend sees the model, so the backend cannot do it for them.

Nothing here imports transformers: models that do not come from it are left alone.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch.nn as nn

from grapefx import moe_experts


def _is_transformers_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


def install_output_hooks(model: nn.Module) -> None:
    """Install transformers' output-capturing hooks on every pretrained (sub)model of `model` now,
    instead of lazily inside the first (compiled) forward. A no-op without transformers 5.x."""
    capturing = sys.modules.get("transformers.utils.output_capturing")
    install = getattr(capturing, "maybe_install_capturing_hooks", None)
    registry = getattr(capturing, "_CAN_RECORD_REGISTRY", None)
    if install is None or registry is None:
        return
    _remove_capturing_hooks(model, capturing.__name__)
    for module in model.modules():
        # A pretrained model installs on its own submodules (nested pretrained models included) and
        # marks itself done; models without recordable outputs have nothing to install.
        if _is_transformers_module(module) and hasattr(module, "config") and registry.get(module):
            install(module)


def _remove_capturing_hooks(model: nn.Module, hooks_module: str) -> None:
    """Remove the output-capturing hooks an earlier eager forward installed lazily. They sit on the
    submodel that ran (DPT's inner DPTModel) and mark only it as done: installing on the outer model
    would then hook its layers twice, every hidden state would be captured twice, and a model that
    picks hidden states by index (DPT's neck) would silently read the wrong layers."""
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "") == "output_capturing_hook" and hook.__module__ == hooks_module:
                module._forward_hooks.pop(key)
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
        if getattr(module, "_output_capturing_hooks_installed", False):
            module._output_capturing_hooks_installed = False


def feature_encoders(model: nn.Module) -> list[nn.Module]:
    """transformers modules that make their input require grad in training mode (`_requires_grad`)."""
    flagged = (m for m in model.modules() if isinstance(getattr(m, "_requires_grad", None), bool))
    return [m for m in flagged if _is_transformers_module(m)]


def expert_configs(model: nn.Module) -> list[object]:
    """The configs of transformers MoE experts modules (those with switchable implementations)."""
    configs: dict[int, object] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if _is_transformers_module(m) and hasattr(m, "_is_expert_parallel") and hasattr(cfg, "_experts_implementation"):
            configs.setdefault(id(cfg), cfg)
    return list(configs.values())


def apply_for_good(model: nn.Module) -> None:
    """All three fixes, permanently (`grapefx.prepare`, for the plain torch.compile backend)."""
    install_output_hooks(model)
    configs = expert_configs(model)
    if configs:
        name = moe_experts.register()
        for cfg in configs:
            cfg._experts_implementation = name
    for m, forward in loop_expert_forwards(model):
        m.forward = forward
    for encoder in feature_encoders(model):
        encoder._requires_grad = False


def unprepared_hint(module_classes: list[object]) -> str:
    """A sentence telling the user to call `grapefx.prepare` when the op grapefx refuses sits in a
    transformers mixture-of-experts layer that still dispatches tokens its own (per-batch) way.
    `module_classes`: classes from fx `nn_module_stack` metadata (types, or their qualified names)."""
    names = [f"{c.__module__}.{c.__qualname__}" if isinstance(c, type) else str(c) for c in module_classes]
    if any(n.startswith("transformers.") and n.endswith("Experts") for n in names):
        return (
            " This is a transformers mixture-of-experts layer: with the plain torch.compile backend, call "
            "grapefx.prepare(model) before compiling (it switches the experts to an implementation grapefx "
            "splits per sample; grapefx.compile does this for you)."
        )
    return ""


def loop_expert_forwards(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """(module, its masked-row forward) for experts modules of `model` that only loop over the
    experts hit (`moe_experts.LOOP_EXPERTS`), bound once: the same objects on every call keep
    Dynamo's guards stable."""
    return [(m, moe_experts.masked_rows_forward(m)) for m in moe_experts.loop_experts(model)]


@contextlib.contextmanager
def masked_row_experts(configs: list[object], forwards: list[tuple[nn.Module, object]] = ()) -> Iterator[None]:
    """Run MoE experts with grapefx's "grapefx_masked_rows" implementation for the duration: the
    experts of `configs` through transformers' ExpertsInterface, the modules of `forwards`
    (`loop_expert_forwards`) through an instance-level forward."""
    saved = [cfg._experts_implementation for cfg in configs]
    saved_forwards = [m.__dict__.get("forward") for m, _ in forwards]
    name = moe_experts.register() if configs else ""
    try:
        for cfg in configs:
            cfg._experts_implementation = name
        for m, forward in forwards:
            m.forward = forward
        yield
    finally:
        for cfg, value in zip(configs, saved):
            cfg._experts_implementation = value
        for (m, _), value in zip(forwards, saved_forwards):
            if value is None:
                del m.forward
            else:
                m.forward = value


@contextlib.contextmanager
def input_grad_flags_off(modules: list[nn.Module]) -> Iterator[None]:
    """Clear `_requires_grad` on `modules` for the duration, restoring each one's value after."""
    saved = [m._requires_grad for m in modules]
    try:
        for m in modules:
            m._requires_grad = False
        yield
    finally:
        for m, value in zip(modules, saved):
            m._requires_grad = value
