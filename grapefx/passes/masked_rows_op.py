"""`grapefx::pad_masked_rows`: the rows of x[mask] put back where the mask took them from.

A leaf module (no grapefx imports): the layout analysis registers a rule for the op, and the pass
that inserts it (`pad_masked_rows.py`) imports the analysis.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("grapefx::pad_masked_rows", mutates_args=())
def pad_masked_rows(rows: torch.Tensor, mask: torch.Tensor, dim: int, group: int) -> torch.Tensor:
    """`rows` (x[mask]'s rows along `dim`, each row's entries there flattened into `group`
    consecutive ones: [N·group]) scattered back to the positions `mask` selected them from, zeros
    elsewhere, the mask's dims flattened into `dim`: size mask.numel()·group there."""
    moved = rows.movedim(dim, 0)
    grouped = moved.reshape(moved.shape[0] // group, group, *moved.shape[1:])
    out = grouped.new_zeros((*mask.shape, *grouped.shape[1:]))
    out[mask] = grouped
    # no copy back to `dim`'s place: the consumers (a contraction over `dim`) take the strided view
    return out.reshape(mask.numel() * group, *moved.shape[1:]).movedim(0, dim)


@pad_masked_rows.register_fake
def _(rows: torch.Tensor, mask: torch.Tensor, dim: int, group: int) -> torch.Tensor:
    moved = list(rows.movedim(dim, 0).shape)
    moved[0] = mask.numel() * group
    return rows.new_empty(moved).movedim(0, dim)
