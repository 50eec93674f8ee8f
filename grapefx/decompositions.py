"""The decomposition table AOTAutograd traces with: core aten, minus the fused ops grapefx's rules
need whole, plus `_trilinear` (nn.Bilinear) as mm contractions, so its weight gradient is an mm grad site."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch._decomp import core_aten_decompositions

aten = torch.ops.aten


def decomposition_table() -> dict[Any, Any]:
    table = dict(core_aten_decompositions())
    # Keep these whole: their rules (embedding ghost norm, per-sample conv) need the fused op.
    # adaptive_avg_pool2d: its decomposition goes through as_strided on non-contiguous input
    # (torchvision's Swin pools a permuted tensor), which no layout rule can follow.
    table.pop(aten.adaptive_avg_pool2d.default, None)
    table.pop(aten.embedding_dense_backward.default, None)
    table.pop(aten.convolution_backward.default, None)
    # The fused norm backwards too (rules/norm.py): decomposed, a CNN's GroupNorm backwards cost 4x.
    table.pop(aten.native_group_norm_backward.default, None)
    table.pop(aten.native_layer_norm_backward.default, None)
    # Trap found on torch 2.13 CPU: the core-aten decomposition of CPU flash attention gives wrong
    # gradients for causal attention with a dynamic batch (86 abs error on a 1-layer GPT). Keep
    # the fused kernel; its layout rule treats it as per-sample over the leading dims.
    table.pop(aten._scaled_dot_product_flash_attention_for_cpu.default, None)
    # Keep the fused pointwise activation backwards (threshold_backward, gelu_backward, ...): the
    # layout analysis treats them like any pointwise op, and decomposed they cost the eager codegen
    # a chain of full-size temporaries (relu's `where` ran 4x slower than threshold_backward on M1).
    for op in [k for k in table if isinstance(k, torch._ops.OpOverload)]:
        if op.overloadpacket.__name__.endswith("_backward") and torch.Tag.pointwise in op.tags:
            table.pop(op)
    table[aten._trilinear.default] = trilinear_as_contractions
    return table


def trilinear_as_contractions(
    i1: torch.Tensor,
    i2: torch.Tensor,
    i3: torch.Tensor,
    expand1: Sequence[int],
    expand2: Sequence[int],
    expand3: Sequence[int],
    sumdim: Sequence[int],
    unroll_dim: int = 1,
) -> torch.Tensor:
    """aten::_trilinear (the kernel of nn.Bilinear and of its backward): each input, unsqueezed at its
    `expand` dims, multiplied with the others and summed over `sumdim`. Done as two pairwise
    contractions (mm / bmm, no [B, out, in1, in2] product), so the weight gradient of nn.Bilinear
    is an mm over the batch, which the generic mm rule splits per sample (a ghost norm)."""
    total = i1.dim() + len(expand1)
    labelled = []
    for t, expand in ((i1, expand1), (i2, expand2), (i3, expand3)):
        labelled.append((t, tuple(d for d in range(total) if d not in set(expand))))
    # size-1 dims broadcast against the others (as in aten's kernel): expand them first (a view)
    sizes: dict[int, Any] = {}
    for t, labels in labelled:
        for d, n in zip(labels, t.shape):
            if not (isinstance(n, int) and n == 1):
                sizes[d] = n
    labelled = [(t.expand([sizes.get(d, n) for d, n in zip(labels, t.shape)]), labels) for t, labels in labelled]
    out = tuple(d for d in range(total) if d not in set(sumdim))
    (a, la), (b, lb), (c, lc) = labelled
    ab, lab = _contract(a, la, b, lb, keep=set(out) | set(lc))
    abc, labc = _contract(ab, lab, c, lc, keep=set(out))
    return abc.permute([labc.index(d) for d in out])


def _contract(
    a: torch.Tensor, la: tuple[int, ...], b: torch.Tensor, lb: tuple[int, ...], keep: set[int]
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Σ over the labels not in `keep` of a * b (labelled dims): one mm (bmm when labels kept from
    both sides remain). Returns the result and its labels (batch, a's own, b's own)."""
    a, la = _sum_own(a, la, set(lb) | keep)
    b, lb = _sum_own(b, lb, set(la) | keep)
    batch = [d for d in la if d in lb and d in keep]
    summed = [d for d in la if d in lb and d not in keep]
    left = [d for d in la if d not in lb]
    right = [d for d in lb if d not in la]
    size = dict(zip(la, a.shape)) | dict(zip(lb, b.shape))

    def flat(t: torch.Tensor, labels: tuple[int, ...], groups: list[list[int]]) -> torch.Tensor:
        t = t.permute([labels.index(d) for g in groups for d in g])
        return t.reshape([math.prod(size[d] for d in g) for g in groups])

    if batch:
        r = torch.bmm(flat(a, la, [batch, left, summed]), flat(b, lb, [batch, summed, right]))
    else:
        r = torch.mm(flat(a, la, [left, summed]), flat(b, lb, [summed, right]))
    labels = (*batch, *left, *right)
    return r.reshape([size[d] for d in labels]), labels


def _sum_own(t: torch.Tensor, labels: tuple[int, ...], needed: set[int]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Sum the dims no one else needs (summed labels only this operand has)."""
    own = [i for i, d in enumerate(labels) if d not in needed]
    if not own:
        return t, labels
    return t.sum(own), tuple(d for d in labels if d in needed)
