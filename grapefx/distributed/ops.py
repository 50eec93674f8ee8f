"""Custom ops the rewritten backward calls in distributed mode (`PrivacyConfig(distributed=True)`).

Both read run-time values (world size, this step's global denominator) so nothing recompiles:

* `grapefx::distributed_denom` — the 0-d denominator a rank divides its local result by:
  global denom / world size, so that DDP's gradient *averaging* over N ranks yields
  (Σ_all c_i g_i + σCξ) / global denom (set by `PrivateModule` before each forward);
* `grapefx::all_reduce_projected` — DP-GRAPE's projected gradients Ĝ (r-dimensional), averaged over
  the default process group in one flat all-reduce, in parameter-index order, so that every rank
  issues the same collective whatever graph (B=0, B=1, B>=2) it ran this step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from grapefx.privacy.noise import get_state


@torch.library.custom_op("grapefx::distributed_denom", mutates_args=())
def distributed_denom(like: torch.Tensor, state_id: int) -> torch.Tensor:
    """This rank's denominator (a fresh 0-d float32 tensor on `like`'s device)."""
    return torch.tensor(get_state(state_id).dist_denom, dtype=torch.float32, device=like.device)


@distributed_denom.register_fake
def _(like: torch.Tensor, state_id: int) -> torch.Tensor:
    return torch.empty((), dtype=torch.float32, device=like.device)


@torch.library.custom_op("grapefx::all_reduce_projected", mutates_args=())
def all_reduce_projected(tensors: list[torch.Tensor], state_id: int) -> list[torch.Tensor]:
    """The mean over ranks of each tensor (one all-reduce of their concatenation)."""
    state = get_state(state_id)
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        state.comm_bytes += flat.numel() * flat.element_size()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(dist.get_world_size())
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].reshape(t.shape).clone())
        start += t.numel()
    return out


@all_reduce_projected.register_fake
def _(tensors: list[torch.Tensor], state_id: int) -> list[torch.Tensor]:
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]


def reduce_projected(ghats: dict[int, torch.Tensor], state_id: int) -> dict[int, torch.Tensor]:
    """Average Ĝ (keyed by parameter index) over ranks; called once per backward by every graph."""
    order = sorted(ghats)
    reduced = torch.ops.grapefx.all_reduce_projected([ghats[i].contiguous() for i in order], state_id)
    return dict(zip(order, reduced))
