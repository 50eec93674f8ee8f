"""Find, for every trainable parameter, the backward nodes that sum its gradient over the batch.

A *grad site* is the node where the batch disappears on the way to a parameter gradient (an `mm`
contracting `B*T`, a `sum` over batch dims, `convolution_backward`, `embedding_dense_backward`, the
fused layer / group norm backwards).
Everything between the sites and the gradient output is batch-free and linear in the site values
("post nodes": views, permutes, the `add` of a tied weight's two uses, ...). The DP rewrite replaces
each site by its per-sample-weighted version and leaves the post nodes as they are.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from grapefx.analysis.layout import MASKED_ROWS_SITE, UNKNOWN, LayoutResult
from grapefx.errors import BatchMixingError, UnsupportedOpError, describe_node

aten = torch.ops.aten

_SUPPORTED_KINDS = {
    "mm",
    "bmm",
    "reduce",
    "convolution_backward",
    "embedding_dense_backward",
    "embedding_bag",
    "index_put",
    "norm_backward",
}
# Multi-output backward ops whose outputs 1 and 2 (weight, bias gradient) are the grad sites; output
# 0 (the input gradient) keeps the batch.
MULTI_OUTPUT_SITES = ("convolution_backward", "norm_backward")


@dataclass
class ParamGrad:
    name: str
    out_index: int
    out_node: fx.Node
    sites: list[fx.Node]
    post_nodes: set[fx.Node] = field(default_factory=set)

    @property
    def isometric(self) -> bool:
        """One site, reaching the output through reshapes / permutes only: norm(site) == norm(grad)."""
        if len(self.sites) != 1:
            return False
        from grapefx.passes.batched_post import is_isometric_post

        return all(is_isometric_post(n) for n in self.post_nodes)

    @property
    def disjoint_pieces(self) -> bool:
        """Several sites, each reaching its own input of one `cat` through reshapes / permutes only,
        and the cat reaching the gradient the same way: the backward of a parameter split into pieces
        used apart (`W.unbind(0)`, `W.split(n)`: the experts of a fused mixture-of-experts weight, the
        q / k / v parts of a fused projection). The pieces fill disjoint slices of the gradient, so its
        squared norm is the sum of the sites' squared norms, each by its rule's cheapest method."""
        from grapefx.passes.batched_post import is_isometric_post

        cats = [n for n in self.post_nodes if n.target is aten.cat.default]
        if len(self.sites) < 2 or len(cats) != 1:
            return False
        seen: set[fx.Node] = set()

        def walk(n: fx.Node, stop: set[fx.Node]) -> fx.Node | None:
            """Follow isometric post nodes down their tensor input until a node of `stop`."""
            while n not in stop:
                if n not in self.post_nodes or not is_isometric_post(n) or not isinstance(n.args[0], fx.Node):
                    return None
                seen.add(n)
                n = n.args[0]
            return n

        cat = cats[0]
        if walk(self.out_node, {cat}) is None:
            return False
        reached = [walk(x, set(self.sites)) if isinstance(x, fx.Node) else None for x in cat.args[0]]
        if any(r is None for r in reached) or len(set(reached)) != len(reached) or set(reached) != set(self.sites):
            return False
        return seen | {cat} == self.post_nodes


def site_kind(node: fx.Node, layouts: LayoutResult) -> str | None:
    kind = layouts.batch_reductions.get(node)
    if kind is not None:
        return kind
    if node.target is operator.getitem and node.args[0] in layouts.batch_reductions:
        kind = layouts.batch_reductions[node.args[0]]
        if kind in MULTI_OUTPUT_SITES and node.args[1] in (1, 2):
            return kind
    return None


def find_grad_sites(
    gm: fx.GraphModule, layouts: LayoutResult, params: list[tuple[int, str]], forward_culprits: tuple[str, ...] = ()
) -> list[ParamGrad]:
    """`forward_culprits`: the forward graph's ops without a batch-layout rule (described), named
    when a backward failure traces back to a forward output of unknown layout."""
    outputs = gm.graph.output_node().args[0]
    placeholders = {n for n in gm.graph.nodes if n.op == "placeholder"}
    tangents = {n for n in placeholders if n.name.startswith("tangents")}
    result: list[ParamGrad] = []
    for out_index, name in params:
        out = outputs[out_index]
        if out is None:
            continue
        grad = ParamGrad(name, out_index, out, [])
        stack, seen = [out], set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            kind = site_kind(n, layouts)
            if kind is not None:
                if kind not in _SUPPORTED_KINDS or not _linear_reduction(n):
                    raise UnsupportedOpError(
                        f"The gradient of parameter `{name}` is reduced over the batch by "
                        f"{describe_node(n)}, which grapefx cannot split per sample. Please report "
                        "this model; as a workaround, express the layer with standard modules."
                    )
                if n not in grad.sites:
                    grad.sites.append(n)
                continue
            lay = layouts.layouts.get(n)
            if lay is UNKNOWN or lay is not None:
                raise _unknown_error(name, n, layouts, forward_culprits)
            if n in tangents:
                raise UnsupportedOpError(
                    f"Part of the gradient of parameter `{name}` does not depend on any sample "
                    "(e.g. a weight-decay or regularization term inside the compiled loss). "
                    "Per-sample clipping cannot attribute it to samples: add such terms to the "
                    "gradient outside the compiled model (e.g. optimizer weight_decay)."
                )
            if n is not out or n.op == "call_function":
                grad.post_nodes.add(n)
            stack.extend(n.all_input_nodes)
        grad.post_nodes -= placeholders
        grad.post_nodes = {n for n in grad.post_nodes if _depends_on_any(n, grad.sites)}
        if not grad.sites:
            raise UnsupportedOpError(
                f"The gradient of parameter `{name}` does not depend on the batch, so it has no "
                "per-sample decomposition. Freeze it (requires_grad_(False)) or use it on the data."
            )
        result.append(grad)
    _check_site_users(result, layouts)
    return result


def _linear_reduction(node: fx.Node) -> bool:
    if node.target is operator.getitem:
        return True
    packet = getattr(node.target, "overloadpacket", None)
    if packet is aten.sum:
        return True
    if packet in (aten.mm, aten.bmm):
        return True
    if packet is aten.embedding_dense_backward:
        return not node.args[4]  # scale_grad_by_freq counts tokens over the whole batch
    if packet is aten._embedding_bag_backward:
        return True  # its layout rule admits sum / mean bags of one sample each only
    if packet in (aten.index_put, aten._unsafe_index_put):
        return True  # its layout rule admits accumulation into zeros only (a sum over samples)
    return packet is aten.convolution_backward


def _depends_on_any(node: fx.Node, sites: list[fx.Node]) -> bool:
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in sites:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _check_site_users(grads: list[ParamGrad], layouts: LayoutResult) -> None:
    allowed: set[fx.Node] = set()
    for g in grads:
        allowed |= g.post_nodes
    for g in grads:
        for site in g.sites:
            for user in site.users:
                if user.op == "output" or user in allowed:
                    continue
                raise BatchMixingError(
                    f"{describe_node(site)} sums over the batch and the result is used by "
                    f"{describe_node(user)}, not only by parameter gradients: the model mixes "
                    "samples (e.g. BatchNorm in training mode, statistics over the batch)."
                )


def _unknown_error(
    name: str, node: fx.Node, layouts: LayoutResult, forward_culprits: tuple[str, ...] = ()
) -> UnsupportedOpError:
    culprit: str | None = None
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in layouts.unknown_ops:
            if layouts.unknown_ops[n] == MASKED_ROWS_SITE:
                return UnsupportedOpError(
                    f"Cannot derive per-sample gradients for parameter `{name}`: {describe_node(n)} "
                    "is applied to rows selected with a boolean mask (x[mask]), and the backward "
                    "graph holds no mask to tell which sample owns each row (it keeps the mask only "
                    "when the selected tensor needs a gradient: a trainable layer before the "
                    "selection). Apply the layer before the selection (e.g. `head(h)[mask]` instead "
                    "of `head(h[mask])`)."
                )
            culprit = describe_node(n)
            break
        stack.extend(a for a in n.all_input_nodes if layouts.layouts.get(a) is UNKNOWN)
    if culprit is None:  # the unknown layout came in through a saved activation or a tangent
        culprit = f"{forward_culprits[0]} (forward pass)" if forward_culprits else describe_node(node)
    return UnsupportedOpError(
        f"Cannot derive per-sample gradients for parameter `{name}`: {culprit} "
        "may mix samples (no batch-layout rule, or its rule found that an output reads several "
        "samples, e.g. indexing or reshaping across the batch dimension). Rewrite that step so each "
        "sample is processed independently (index the batch dim only with torch.arange(B)), or "
        "freeze the parameter."
    )
