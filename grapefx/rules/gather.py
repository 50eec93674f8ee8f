"""`index_put(zeros, [ids], rows, accumulate=True)`: the backward of a parameter used as a lookup
table with per-sample ids (`table[ids]`, analysis/indexing_layout.py).

Only instantiation: sample b's gradient is its rows scattered into a zero table, built for all
samples at once by one index_put into [B, *table] with arange(B) as the leading index. For large
tables prefer nn.Embedding, whose rule has a ghost norm that never builds the table.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from grapefx.rules.registry import SiteContext, SiteRule, expose_batch, register_rule, weights_like

aten = torch.ops.aten


@register_rule("index_put")
class GatherRule(SiteRule):
    def per_sample(self, site: SiteContext) -> torch.Tensor:
        base, indices, values = site.node.args[:3]
        b = site.batch_size
        if all(site.layout(t) is None for t in indices if isinstance(t, fx.Node)):
            # ids shared by all samples, expanded to the batch: they line up with the values' leading
            # batch dim as they are (the layout analysis admits this form only)
            rows = site.value(values)
        else:
            rows = expose_batch(site.value(values), site.layout(values), b)
        index = []
        for t in indices:
            lay = site.layout(t) if isinstance(t, fx.Node) else None
            index.append(expose_batch(site.value(t), lay, b) if lay is not None else site.value(t))
        # the batched index tensors now lead with B; a batch-free one broadcasts against them from
        # the right, so it is padded to their rank first
        rank = max(t.dim() for t in index if t is not None)
        index = [t.reshape([1] * (rank - t.dim()) + list(t.shape)) if t is not None else None for t in index]
        samples = torch.arange(b, device=rows.device).reshape([b] + [1] * (rank - 1))
        out = rows.new_zeros([b] + list(site.node.meta["val"].shape))
        return aten.index_put(out, [samples] + index, rows, True)

    def weighted(self, site: SiteContext, weights: torch.Tensor) -> torch.Tensor:
        base, indices, values, *rest = site.node.args
        rows = site.value(values)
        rows = rows * weights_like(weights, rows, site.layout(values))
        return site.node.target(site.value(base), [site.value(t) for t in indices], rows, *rest)
