"""Run-time check behind boolean-mask selections read per sample (x[mask], analysis/indexing_layout).

x[mask] lists the selected rows sample by sample. The layout analysis reads them as per sample,
rows i·c..i·c+c-1 being sample i's, which holds only when every sample selects the same number c of
rows (BART's classification head: one EOS token per sequence, `h[ids == eos].view(B, -1, d)`).
Otherwise a later `view(B, -1, d)` would cut rows of two samples into one and their gradients
would mix. Only the data can tell, so this pass routes each such selection in the forward graph
through a check op that raises on a step where the counts differ.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from grapefx.errors import BatchMixingError, describe_node
from grapefx.passes.loss_checks import route_through_check

RETURNED_HINT = (
    " These rows (or values computed from them row by row) are returned by the compiled model, so "
    "grapefx cannot see the loss computed from them: compute the loss inside the compiled module "
    "(a forward that returns it), where a sum of one term per row is accepted whatever the counts."
)


@torch.library.custom_op("grapefx::require_equal_counts", mutates_args=())
def require_equal_counts(rows: torch.Tensor, mask: torch.Tensor, where: str, lead: int, hint: str) -> torch.Tensor:
    """A copy of `rows` if every sample selects as many rows; raises otherwise. Sample i owns `lead`
    consecutive entries of the mask's dim 0 (1 for a [B, T] mask, T for a flattened [B·T] one);
    `hint` ends the message. One host synchronization per step on a GPU."""
    counts = mask.reshape(mask.shape[0] // lead, -1).sum(dim=1)
    if counts.numel() and bool((counts != counts[0]).any()):
        listed = ", ".join(str(int(c)) for c in counts[:8]) + (", ..." if counts.numel() > 8 else "")
        raise BatchMixingError(
            f"{where} selects rows with a boolean mask, and grapefx reads them as per sample only "
            f"when every sample selects as many; this batch's samples select {listed}. Make every "
            "sample select the same number of rows (e.g. exactly one EOS token per sequence for a "
            "BART-style classification head), or pool each sample on its own, e.g. with "
            "h[torch.arange(B), index] where index holds one position per sample. A loss over the "
            "selected rows needs no equal counts when it is a sum of one term per row "
            "(`F.cross_entropy(logits[mask], labels[mask], reduction='sum')`, divided by a constant "
            "if you like): a mean over the rows divides by the count of the whole batch." + hint
        )
    return rows.clone()


@require_equal_counts.register_fake
def _(rows: torch.Tensor, mask: torch.Tensor, where: str, lead: int, hint: str) -> torch.Tensor:
    return torch.empty_like(rows)


def guard_masked_rows(
    gm: fx.GraphModule,
    masked_rows: dict[fx.Node, tuple[fx.Node, object]],
    layouts: dict[fx.Node, Any],
    returned: set[fx.Node] | None = None,
) -> int:
    """Route every selection of `masked_rows` (node -> (mask, row count), the forward's layout
    analysis; `layouts`: its batch layouts) through `require_equal_counts`; returns how many.
    `returned`: selections checked only because their rows reach the caller (their message says so)."""
    guarded = 0
    for node, (mask, _) in masked_rows.items():
        if node.graph is not gm.graph:
            continue
        lead = int(layouts[mask].inner)  # indexing_layout accepts masks whose dim 0 is B·lead, lead static
        check = torch.ops.grapefx.require_equal_counts.default
        hint = RETURNED_HINT if returned and node in returned else ""
        route_through_check(gm, node, check, (mask, describe_node(node), lead, hint))
        guarded += 1
    if guarded:
        gm.recompile()
    return guarded
