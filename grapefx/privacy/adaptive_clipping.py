"""Adaptive clipping at run time: the bound the graphs read, and its update after each logical step.

The private backward reads the bound through `grapefx::clip_bound` (a 0-d tensor from the privacy
state) instead of a constant, so a new bound never recompiles. The op takes the recorded per-sample
norms as input: that data dependency orders it after `grapefx::record_norms`, whose publication
(`noise._publish`) is where the bound changes hands:

* the first publication of a logical step makes the bound computed after the previous step current;
* every publication adds Σ_i (1[‖g_i‖ ≤ C] − ½) of its samples (a virtual batch's micro-batches
  add up), with the C they are clipped to;
* the publication that ends the logical step (noise on) draws the count's noise and computes the next
  bound, which the next step's first publication makes current. An empty batch publishes too, so
  every logical step releases its count: whether the bound moved never depends on the batch.

Data-parallel: each rank counts its own samples; at the end of the step the counts are summed over
the ranks in one all-reduce (with the noise, which only the rank drawing the step's gradient noise
adds), so every rank computes the same bound. Every rank publishes once per backward (B=0 too), so
the collective is issued in the same order everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from grapefx.config import PrivacyConfig
    from grapefx.privacy.noise import PrivacyState


@dataclass
class ClipBoundState:
    """The adaptive bound of one compiled model (`PrivacyState.clip`)."""

    current: float
    target_quantile: float
    learning_rate: float
    count_noise_std: float
    expected_batch_size: int
    min_clip: float = 0.0
    max_clip: float = math.inf
    distributed: bool = False
    unclipped: float = 0.0  # Σ (1[‖g_i‖ ≤ C] − ½) of the logical step so far
    next: float | None = None  # computed at the end of a logical step, current from the next one
    history: list[float] | None = None  # the bound of every completed logical step

    @classmethod
    def from_config(cls, config: PrivacyConfig) -> ClipBoundState | None:
        ada = config.adaptive_clipping
        if ada is None:
            return None
        return cls(
            current=float(config.max_grad_norm),
            target_quantile=ada.target_quantile,
            learning_rate=ada.learning_rate,
            count_noise_std=config.count_noise_std,
            expected_batch_size=int(config.expected_batch_size or 1),
            min_clip=ada.min_clip,
            max_clip=ada.max_clip,
            distributed=config.distributed,
            history=[],
        )

    def for_next_step(self) -> float:
        """The bound the next logical step clips to."""
        return self.next if self.next is not None else self.current

    def publish(self, norms: torch.Tensor, state: PrivacyState) -> None:
        """A backward's per-sample norms ([B], of the user's loss) were recorded."""
        if self.next is not None:  # the first backward of a new logical step
            self.current, self.next = self.next, None
        self.unclipped += float((norms <= self.current).sum()) - 0.5 * norms.shape[0]
        if state.noise_enabled:  # the logical step ends with this backward
            self._end_step(state, norms.device)

    def _end_step(self, state: PrivacyState, device: torch.device) -> None:
        count = self.unclipped
        if self.count_noise_std > 0 and state.noise_local:  # distributed: one rank draws it
            count += self.count_noise_std * float(state.fill_standard_normal_(torch.empty(1, dtype=torch.float64)))
        if self.distributed:
            count = _sum_over_ranks(count, device, state)
        fraction = count / self.expected_batch_size + 0.5
        bound = self.current * math.exp(-self.learning_rate * (fraction - self.target_quantile))
        self.next = min(max(bound, self.min_clip), self.max_clip)
        self.unclipped = 0.0
        if self.history is not None:
            self.history.append(self.current)

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current, "next": self.next, "unclipped": self.unclipped, "history": self.history}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.current, self.next = float(saved["current"]), saved["next"]
        self.unclipped, self.history = float(saved["unclipped"]), saved["history"]


def _sum_over_ranks(value: float, device: torch.device, state: PrivacyState) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    # float64 on the gradients' device (NCCL reduces CUDA tensors only)
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    state.comm_bytes += t.numel() * t.element_size()
    return float(t.item())


@torch.library.custom_op("grapefx::clip_bound", mutates_args=())
def clip_bound(after: torch.Tensor, state_id: int) -> torch.Tensor:
    """The current clip bound (a fresh 0-d float32 tensor on `after`'s device). `after`: the recorded
    norms, so that the bound is read after this backward's publication."""
    from grapefx.privacy.noise import get_state

    clip = get_state(state_id).clip
    if clip is None:
        raise RuntimeError("grapefx::clip_bound read by a model compiled without adaptive clipping")
    return torch.tensor(clip.current, dtype=torch.float32, device=after.device)


@clip_bound.register_fake
def _(after: torch.Tensor, state_id: int) -> torch.Tensor:
    return torch.empty((), dtype=torch.float32, device=after.device)
