"""Rule registry: one rule per kind of grad site (the op that sums a gradient over the batch).

A rule knows, for its site: the per-sample values (instantiate), the per-sample squared norm by the
cheapest method its cost model allows (ghost / instantiate), and the site recomputed with per-sample
weights (the book-kept weighted contraction). Rule math is plain torch code, traced into the graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from grapefx.analysis.layout import UNKNOWN, BatchLayout, LayoutResult, shape_of
from grapefx.passes.interp import make_lookup
from grapefx.rules.gram import gram_fraction


@dataclass
class SiteContext:
    """What a rule sees of one site while the private backward is being traced."""

    node: fx.Node
    kind: str
    layouts: LayoutResult
    env: dict[fx.Node, Any]
    batch_size: Any  # traced SymInt / int
    strategy: str  # auto / ghost / instantiate
    gm: fx.GraphModule | None = None  # the backward graph: batch-free operands computed on demand

    def value(self, arg: Any) -> Any:
        """The traced value of a site operand. A batch-free one the backward computes later than
        this site's norm is needed (ids sliced from a buffer, recomputed next to their lookup) is
        computed now; batched values must already exist."""
        if not isinstance(arg, fx.Node):
            return arg
        if arg not in self.env and self.gm is not None and self.layouts.layouts.get(arg) is None:
            return make_lookup(self.gm, self.env)(arg)
        return self.env[arg]

    @property
    def fresh_weight(self) -> float:
        """Flop-equivalents per element of a fresh per-sample buffer on this site's device."""
        val = self.node.meta.get("val")
        return fresh_memory_weight(val.device if isinstance(val, torch.Tensor) else "cpu")

    def layout(self, arg: Any) -> BatchLayout | None:
        lay = self.layouts.layouts.get(arg) if isinstance(arg, fx.Node) else None
        if lay is UNKNOWN:
            raise AssertionError(f"site operand {arg} has an unknown layout")
        return lay


@dataclass(frozen=True)
class NormChoice:
    method: str  # "ghost" | "instantiate"
    ghost_flops: float
    instantiate_flops: float
    reason: str
    tokens: int = 0  # rows per sample of the factored form (T), when the rule has one


class SiteRule:
    """Base class; subclasses implement the three operations for one site kind."""

    kind: str = ""

    def per_sample(self, site: SiteContext) -> torch.Tensor:
        """[B, *site_shape]: each sample's contribution to the site's value."""
        raise NotImplementedError

    def choose(self, site: SiteContext) -> NormChoice:
        return NormChoice("instantiate", float("inf"), 0.0, "only instantiation is implemented")

    def norm_sq(self, site: SiteContext, choice: NormChoice) -> torch.Tensor:
        """[B] squared Frobenius norm of each sample's contribution."""
        return keep_and_norm(site, self.per_sample(site))

    def weighted(self, site: SiteContext, weights: torch.Tensor) -> torch.Tensor:
        """The site's value with sample i's contribution multiplied by weights[i], from its operands."""
        raise NotImplementedError

    def weighted_sum(self, site: SiteContext, weights: torch.Tensor) -> torch.Tensor:
        """Σ_i w_i · (sample i's contribution): from the per-sample values kept by an instantiated
        norm when there are any (a [B]·[B, numel] product instead of a second contraction over the
        operands, which can then be freed right after the norm), else recomputed from the operands."""
        kept = site.env.pop(("per_sample", site.node), None)
        if kept is None:
            return self.weighted(site, weights)
        return combine_per_sample(site, kept, weights)


def combine_per_sample(site: SiteContext, per_sample: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_i weights[i] · per_sample[i], shaped and typed like the site: one [1, B]·[B, numel] product."""
    shape = list(site.node.meta["val"].shape)
    flat = per_sample.reshape(per_sample.shape[0], math.prod(int(s) for s in shape))
    out = torch.mm(weights.to(flat.dtype)[None, :], flat).reshape(shape)
    return out.to(site.node.meta["val"].dtype)


def keep_and_norm(site: SiteContext, per_sample: torch.Tensor) -> torch.Tensor:
    """Squared norms of instantiated per-sample values, which are kept for the weighted sum."""
    site.env[("per_sample", site.node)] = per_sample
    return squared_norms(per_sample)


def accumulated(t: torch.Tensor) -> torch.Tensor:
    """`t` in the dtype per-sample norms accumulate in: float32 (from bf16 / fp16 / float32), or
    float64 for a float64 model, whose clipping is then exact to float64 rounding."""
    return t if t.dtype == torch.float64 else t.float()


def squared_norms(per_sample: torch.Tensor) -> torch.Tensor:
    """[B] squared norms of [B, ...] per-sample values (float32, or float64 for float64 values)."""
    ps = accumulated(per_sample)
    if ps.dim() <= 1:
        return ps * ps
    # A batched dot product of each sample with itself: no squared copy of the per-sample tensor.
    flat = ps.reshape(ps.shape[0], 1, -1)
    return torch.bmm(flat, flat.transpose(1, 2)).reshape(ps.shape[0])


# -- cost model (per sample, flop-equivalents) -----------------------------------------------------
# Memory-bound element traffic (zero-fill, scatter, square-and-sum of an instantiated gradient) costs
# many times a flop of a matmul on CPU; weighting it keeps e.g. a [B, V, d] embedding gradient from
# looking cheap just because it needs few flops. Measured on this project's CPU, one thread, M3 at
# B=16 (a ~100 GFLOP/s matmul): instantiating the qkv Linear's [B, 768, 256] gradient cost ~1 ns
# (~100 flops) per element over the weight-gradient matmul it replaces, i.e. ~32 per pass of the
# three; zero-fill + scatter + norm + weighted sum of the positions' [16, 512, 256] gradient ~4 ns.
MEMORY_WEIGHT = 32.0

# An instantiated per-sample gradient is a fresh multi-MB buffer every step. On CPU, glibc serves
# blocks that large with mmap and returns them on free, so the first touch of each page faults:
# ~1.6 ns per float32 element on this project's CPU (a 64 MB fill: 28 ms fresh vs 1.8 ms reused),
# ~160 flop-equivalents. On M3 (B=16) instantiating qkv/proj/fc1 measured ~40 ms slower per step than
# ghost norms, and equal once page faults were switched off (MALLOC_MMAP_THRESHOLD_), so the cost is
# the faults. CUDA's caching allocator reuses its blocks: no such cost there. The Gram blocks of ghost
# norms are small ([B, T/k, T/k]) and come from the reused heap.
FRESH_MEMORY_WEIGHT = {"cpu": 160.0}


def fresh_memory_weight(device: torch.device | str) -> float:
    return FRESH_MEMORY_WEIGHT.get(torch.device(device).type, 0.0)


def mm_costs(T: int, M: int, N: int) -> tuple[float, float]:
    """(ghost, instantiate) cost of the norm of Σ_t L_t ⊗ R_t with L [T, M], R [T, N]."""
    ghost = (2.0 * T * T * (M + N) + MEMORY_WEIGHT * 2 * T * T) * gram_fraction(T, M + N)
    inst = 2.0 * T * M * N + MEMORY_WEIGHT * 2 * M * N
    return ghost, inst


# An instantiated [B, M, N] per-sample gradient lets the operands a [B, T, N] and g [B, T, M] go right
# after the norm (the weighted sum reuses it); it may be at most this much larger than they are.
INSTANTIATE_MEMORY_FACTOR = 1.5


def mm_extra_costs(T: int, M: int, N: int, fresh: float = 0.0) -> tuple[float, float, bool]:
    """Costs *beyond* non-private training of the two methods for one mm site, per sample, and
    whether instantiation fits the memory rule. Ghost adds its Gram products; instantiation replaces
    the weight-gradient matmul by the per-sample bmm (same flops) and adds only memory traffic and,
    `fresh` per element, the device's cost of a newly allocated buffer (`fresh_memory_weight`)."""
    ghost = (2.0 * T * T * (M + N) + MEMORY_WEIGHT * 2 * T * T) * gram_fraction(T, M + N)
    inst = (MEMORY_WEIGHT * 3 + fresh) * M * N  # square-and-sum, weighted sum, write; fresh pages
    fits = M * N <= INSTANTIATE_MEMORY_FACTOR * T * (M + N)
    return ghost, inst, fits


def pick(strategy: str, ghost: float, inst: float) -> str:
    if strategy in ("ghost", "instantiate"):
        return strategy
    return "ghost" if ghost <= inst else "instantiate"


_RULES: dict[str, SiteRule] = {}


def register_rule(kind: str) -> Callable[[type[SiteRule]], type[SiteRule]]:
    def deco(cls: type[SiteRule]) -> type[SiteRule]:
        if kind in _RULES:
            raise RuntimeError(f"a grapefx rule for site kind {kind!r} is already registered")
        inst = cls()
        inst.kind = kind
        _RULES[kind] = inst
        return cls

    return deco


def rule_for(kind: str) -> SiteRule:
    from grapefx.rules import conv, embedding, embedding_bag, gather, generic, mm, norm, reduce  # noqa: F401

    return _RULES[kind]


def registered_kinds() -> list[str]:
    rule_for("mm")
    return sorted(_RULES)


# -- shared tensor helpers (traced into the graph) ----------------------------------------------


def expose_batch(x: torch.Tensor, lay: BatchLayout, batch_size: Any) -> torch.Tensor:
    """Move the batch factor of `x` to a new leading dim: [B, ..., outer*inner, ...]."""
    d, outer, inner = lay.dim, int(lay.outer), int(lay.inner)
    if outer == 1 and inner == 1:  # the batch is dim d: the same view, without three symbolic reshapes
        return (x if d == 0 else x.movedim(d, 0)).unsqueeze(d + 1)
    shape = list(x.shape)
    split = shape[:d] + [outer, batch_size, inner] + shape[d + 1 :]
    y = x.reshape(split).movedim(d + 1, 0)
    return y.reshape([batch_size] + shape[:d] + [outer * inner] + shape[d + 1 :])


def weights_like(weights: torch.Tensor, x: torch.Tensor, lay: BatchLayout) -> torch.Tensor:
    """Per-element weights, broadcastable to `x`, giving every element its sample's weight."""
    d, outer, inner = lay.dim, int(lay.outer), int(lay.inner)
    b = weights.shape[0]
    w = weights.to(x.dtype).reshape(1, b, 1).expand(outer, b, inner).reshape(outer * b * inner)
    view = [1] * x.dim()
    view[d] = outer * b * inner
    return w.reshape(view)


def site_shape(node: fx.Node) -> list[Any]:
    return shape_of(node)
