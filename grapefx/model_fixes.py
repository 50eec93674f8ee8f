"""Make a model DP-compatible before compiling it: BatchNorm → GroupNorm.

BatchNorm in training mode normalizes each sample with statistics of the whole batch, so one sample
changes every other sample's output and per-sample gradients do not exist: grapefx refuses it
(`BatchMixingError`). The usual fix in DP training (Opacus' `ModuleValidator.fix` does the same) is
GroupNorm, which normalizes each sample on its own. This replaces the modules; the model must then
be trained (or fine-tuned) with GroupNorm: BatchNorm's running statistics are dropped.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _refuse_flat_input(name: str, module: nn.GroupNorm, args: tuple) -> None:
    """A GroupNorm with one channel per group turns a [N, C] input (a BatchNorm1d over features)
    into its bias: every group is a single value, normalized to zero."""
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 2:
        raise ValueError(
            f"`{name}` was a BatchNorm1d and is now a GroupNorm with one channel per group; on its "
            f"[N, {module.num_channels}] input that normalizes every value to zero (the output would be "
            "the bias). Call grapefx.replace_batch_norm(model, max_groups=1) (a LayerNorm over the "
            "channels) or with a max_groups that leaves several channels per group."
        )


def replace_batch_norm(model: nn.Module, max_groups: int = 32) -> list[str]:
    """Replace every BatchNorm{1,2,3}d / SyncBatchNorm in `model` (in place) by a GroupNorm over the
    same channels with gcd(max_groups, C) groups, keeping `eps`, `affine` and the parameter's device
    and dtype. Returns the names of the replaced modules (empty if there were none). Subclasses of
    BatchNorm (timm's BatchNormAct2d) are refused, naming the module: they may do more than normalize.

    Frozen BatchNorm in eval mode (`bn.eval()` with its parameters' `requires_grad` off) does not mix
    samples; replace it anyway only if you mean to train the model with GroupNorm.
    """
    if max_groups < 1:
        raise ValueError(f"max_groups must be at least 1, got {max_groups}")
    replaced = []
    for name, child in list(model.named_modules()):  # model order
        if not isinstance(child, _BATCH_NORMS):
            continue
        if type(child) not in _BATCH_NORMS:  # e.g. timm's BatchNormAct2d: normalization + activation
            raise ValueError(
                f"`{name}` is a {type(child).__name__}, a BatchNorm subclass that may do more than "
                "normalize (an activation, a drop layer): a plain GroupNorm would change the model. Build "
                "the model with a GroupNorm norm layer instead (timm: norm_layer=GroupNormAct)."
            )
        if not name:
            raise ValueError("the model itself is a BatchNorm: build a GroupNorm instead")
        parent_name, _, attr = name.rpartition(".")
        channels = child.num_features
        gn = nn.GroupNorm(math.gcd(max_groups, channels), channels, eps=child.eps, affine=child.affine)
        if child.affine:
            gn.to(device=child.weight.device, dtype=child.weight.dtype)
            gn.weight.requires_grad_(child.weight.requires_grad)
            gn.bias.requires_grad_(child.bias.requires_grad)
        gn.train(child.training)
        if isinstance(child, nn.BatchNorm1d) and gn.num_groups == channels:
            gn.register_forward_pre_hook(functools.partial(_refuse_flat_input, name))
        setattr(model.get_submodule(parent_name), attr, gn)
        replaced.append(name)
    return replaced
