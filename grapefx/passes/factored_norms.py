"""Ghost norms with cross terms for a parameter used at several sites (tied / shared weights).

When every site's per-sample value is a sum of outer products Σ_t L_t ⊗ R_t in the parameter's
own orientation (mm sites; embedding sites with L = onehot(ids)), and the post nodes only transpose,
reshape to the parameter's shape and add, the squared norm of the summed gradient is

    ‖Σ_a G_a‖² = Σ_{a,b} Σ_{t,s} (L_a,t · L_b,s)(R_a,t · R_b,s)

which needs [B, T_a, T_b] Gram matrices only — never the [B, V, d] per-sample gradient of a tied
embedding. Returns None (caller instantiates) when a site or post node does not fit this form.

The same form covers a broadcast lookup (`lookup_norm_sq`): positions embedded once, nn.Embedding(
arange(T)), and added to every sample. The backward sums the positions' gradient over the batch (a
reduce site) and scatters it with batch-free ids, so sample i's gradient is Σ_t onehot(id_t) ⊗ x_i,t:
an embedding ghost norm, without the [B, max_positions, d] per-sample gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from grapefx.analysis.grad_sites import ParamGrad
from grapefx.rules import embedding, mm
from grapefx.rules.gram import BlockGram, dense_blocks, same_id_blocks, symmetric_gram_dot
from grapefx.rules.registry import SiteContext, accumulated

aten = torch.ops.aten
_IDENTITY = {aten.view, aten._unsafe_view, aten.reshape, aten.alias, aten.clone, aten.contiguous, aten.detach}


@dataclass
class Factor:
    """Per-sample rows of one side: dense [B, T, m], or one-hot token ids [B, T] over m classes."""

    dense: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    keep: torch.Tensor | None = None  # [B, T] bool: tokens that count (padding_idx excluded)

    @property
    def length(self) -> int:
        return (self.dense if self.dense is not None else self.ids).shape[1]

    @property
    def width(self) -> int:
        """Multiply-adds per pair of rows in its Gram (an id comparison counts one)."""
        return int(self.dense.shape[2]) if self.dense is not None else 1


def gram(x: Factor, y: Factor) -> torch.Tensor:
    """[B, Tx, Ty] inner products of every row of x with every row of y."""
    if x.dense is not None and y.dense is not None:
        return torch.bmm(accumulated(x.dense), accumulated(y.dense).transpose(1, 2))
    if x.dense is None and y.dense is None:
        g = (x.ids[:, :, None] == y.ids[:, None, :]).float()
    elif x.dense is None:  # onehot(ids_t) · y_s = y_s[ids_t]
        g = torch.gather(accumulated(y.dense), 2, x.ids[:, None, :].expand(-1, y.length, -1)).transpose(1, 2)
    else:
        g = torch.gather(accumulated(x.dense), 2, y.ids[:, None, :].expand(-1, x.length, -1))
    if x.keep is not None:
        g = g * x.keep[:, :, None].float()
    if y.keep is not None:
        g = g * y.keep[:, None, :].float()
    return g


def _self_blocks(x: Factor) -> BlockGram:
    return dense_blocks(accumulated(x.dense)) if x.dense is not None else same_id_blocks(x.ids, x.keep)


def _site_factors(site: SiteContext) -> tuple[Factor, Factor] | None:
    if site.kind == "mm":
        L, R = mm.factors(site)
        return Factor(dense=L), Factor(dense=R)
    if site.kind == "embedding_dense_backward":
        ids, g = embedding.tokens(site)
        pad = site.node.args[3]
        keep = (ids != pad) if pad is not None and pad >= 0 else None
        return Factor(ids=ids, keep=keep), Factor(dense=g)
    return None


def _orientation(site: fx.Node, grad: ParamGrad) -> bool | None:
    """Whether the site reaches the output transposed; None if the path is not transpose/reshape/add."""
    param_shape = list(grad.out_node.meta["val"].shape)
    if len(param_shape) != 2:
        return None
    swapped, node = False, site
    while node is not grad.out_node:
        users = [u for u in node.users if u in grad.post_nodes or u is grad.out_node]
        if len(users) != 1:
            return None
        node = users[0]
        packet = getattr(node.target, "overloadpacket", None)
        if packet in (aten.t,) or (packet is aten.permute and list(node.args[1]) == [1, 0]):
            swapped = not swapped
        elif packet in _IDENTITY:
            if list(node.meta["val"].shape) not in (param_shape, param_shape[::-1]):
                return None
        elif packet is aten.add:
            sources = set(grad.post_nodes) | set(grad.sites)
            if not all(isinstance(a, fx.Node) and a in sources for a in node.args[:2]) or node.kwargs:
                return None
        else:
            return None
    return swapped


_RESHAPES = _IDENTITY | {aten.squeeze, aten.unsqueeze}  # element order kept: no transposes


def broadcast_lookup(grad: ParamGrad, sites: list[SiteContext]) -> fx.Node | None:
    """The `embedding_dense_backward` node when the gradient is one reduce site's per-sample values
    scattered by batch-free ids, reached through reshapes only (no transposes: the per-sample rows
    must stay in token order); None otherwise."""
    if len(sites) != 1 or sites[0].kind != "reduce":
        return None
    lookups = [n for n in grad.post_nodes if getattr(n.target, "overloadpacket", None) is aten.embedding_dense_backward]
    if len(lookups) != 1:
        return None
    (lookup,) = lookups
    grad_in, ids, _, _, scale_by_freq = lookup.args
    if scale_by_freq or not isinstance(ids, fx.Node) or sites[0].layout(ids) is not None:
        return None
    if any(getattr(n.target, "overloadpacket", None) not in _RESHAPES for n in grad.post_nodes - {lookup}):
        return None
    # Every post node depends on the site, and only reshapes are not the lookup: its gradient input
    # is the site's value, reshaped.
    if grad_in is not sites[0].node and grad_in not in grad.post_nodes:
        return None
    return lookup


def lookup_norm_sq(site: SiteContext, lookup: fx.Node, per_sample: torch.Tensor) -> torch.Tensor:
    """[B] squared norms of the scattered per-sample values ([B, *site shape]) of `broadcast_lookup`."""
    ids = site.value(lookup.args[1]).reshape(1, -1)
    padding_idx = lookup.args[3]
    b, n = per_sample.shape[0], ids.shape[1]
    rows = accumulated(per_sample.reshape(b, n, -1))
    ids = ids.expand(b, n)
    keep = (ids != padding_idx) if padding_idx is not None and padding_idx >= 0 else None
    return symmetric_gram_dot(same_id_blocks(ids, keep), dense_blocks(rows), n, rows.shape[2] + 1)


def factored_norm_sq(grad: ParamGrad, sites: list[SiteContext]) -> torch.Tensor | None:
    terms: list[tuple[Factor, Factor]] = []
    for site in sites:
        swapped = _orientation(site.node, grad)
        pair = _site_factors(site) if swapped is not None else None
        if pair is None:
            return None
        terms.append(pair[::-1] if swapped else pair)
    total = None
    for a, (la, ra) in enumerate(terms):
        for b in range(a, len(terms)):
            lb, rb = terms[b]
            if a == b:  # symmetric Grams: half of them suffices
                part = symmetric_gram_dot(_self_blocks(la), _self_blocks(ra), la.length, la.width + ra.width)
            else:
                part = 2 * (gram(la, lb) * gram(ra, rb)).sum(dim=(1, 2))
            total = part if total is None else total + part
    return total
