"""`grapefx::pad_masked_rows`: the rows of x[mask] put back where the mask took them from.

A leaf module (no grapefx imports): the layout analysis registers a rule for the op, and the pass
that inserts it (`pad_masked_rows.py`) imports the analysis.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("grapefx::pad_masked_rows", mutates_args=())
def pad_masked_rows(rows: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """`rows` (x[mask]'s rows along `dim`) scattered back to the positions `mask` selected them
    from, zeros elsewhere, the mask's dims flattened into `dim`: size mask.numel() there."""
    moved = rows.movedim(dim, 0)
    out = moved.new_zeros((*mask.shape, *moved.shape[1:]))
    out[mask] = moved
    return out.reshape(mask.numel(), *moved.shape[1:]).movedim(0, dim).contiguous()


@pad_masked_rows.register_fake
def _(rows: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    shape = list(rows.shape)
    shape[dim] = mask.numel()
    return rows.new_empty(shape)
