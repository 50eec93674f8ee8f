"""A static, liveness-based ESTIMATE of a graph's peak memory (not a measurement); the model lives
in grapefx/schedule/liveness.py (checked against torch.profiler there).

Model: nodes run in graph order; each node's tensor output is allocated when it runs (bytes from
`meta["val"]`, the batch symbol replaced by the example batch size) and freed right after its last
use. Views share their base's storage (view / reshape / permute / expand / alias / slice / select /
squeeze / unsqueeze / t / transpose / _unsafe_view / as_strided / split / unbind / ... and in-place
ops), so a storage lives until the last use of any of its aliases. Graph inputs (saved activations,
tangents) are live from the start and freed after their last use, as AOTAutograd clears the saved
tensors before running the backward (inputs that are parameters really stay alive, held by the
module: the same for both backward graphs of a model); graph outputs (the gradients) live to the
end. Not modelled: allocator caching and fragmentation, kernel workspaces, temporaries inside an
op, Inductor fusion (which removes many intermediates), parameters and optimizer state outside the
graph. Use it to compare two graphs of the same model, not as an absolute number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from grapefx.schedule.liveness import MemoryModel


@dataclass(frozen=True)
class MemoryEstimate:
    peak_bytes: int
    peak_node: str  # the node at which the peak is reached
    input_bytes: int  # graph inputs (saved activations + tangents), live at the start
    output_bytes: int  # graph outputs

    def as_dict(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak_bytes,
            "peak_at": self.peak_node,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
        }


def estimate_peak(gm: fx.GraphModule, free_inputs: bool = True) -> MemoryEstimate:
    """Peak bytes of running `gm` in order; `free_inputs=False`: the caller keeps the inputs alive."""
    live = MemoryModel.of(gm, free_inputs=free_inputs).simulate()
    return MemoryEstimate(live.peak_bytes, live.peak_node, live.input_bytes, live.output_bytes)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def compare(original: fx.GraphModule | None, private: fx.GraphModule | None) -> dict[str, Any]:
    """Estimated peaks of the non-private and private backward, for reports."""
    result: dict[str, Any] = {
        "kind": "static liveness estimate (not measured); see grapefx/inspect/memory.py",
    }
    est = {}
    for key, gm in (("backward_original", original), ("backward_private", private)):
        if gm is not None:
            est[key] = estimate_peak(gm)
            result[key] = est[key].as_dict()
    if len(est) == 2 and est["backward_original"].peak_bytes > 0:
        result["ratio"] = round(est["backward_private"].peak_bytes / est["backward_original"].peak_bytes, 4)
    return result
