"""A static, liveness-based ESTIMATE of a graph's peak memory (not a measurement).

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

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from grapefx.inspect.graphs import nbytes, tensor_vals

aten = torch.ops.aten

_VIEW_OPS = {
    "view",
    "_unsafe_view",
    "reshape",
    "permute",
    "expand",
    "alias",
    "slice",
    "select",
    "squeeze",
    "unsqueeze",
    "t",
    "transpose",
    "as_strided",
    "unfold",
    "narrow",
    "diagonal",
    "detach",
    "view_as",
    "expand_as",
    "_reshape_alias",
    "movedim",
    "split",
    "split_with_sizes",
    "unbind",
    "chunk",
    "tensor_split",
}


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


def _is_alias(node: fx.Node) -> bool:
    t = node.target
    if not isinstance(t, torch._ops.OpOverload):
        return False
    name = t._opname
    if name in _VIEW_OPS:
        return True
    # Views (`Tensor(a)`) and in-place / out= ops (`Tensor(a!)`) return an alias of an input.
    returns = t._schema.returns
    return bool(returns) and all(r.alias_info is not None for r in returns)


def estimate_peak(gm: fx.GraphModule, free_inputs: bool = True) -> MemoryEstimate:
    """Peak bytes of running `gm` in order; `free_inputs=False`: the caller keeps the inputs alive."""
    nodes = list(gm.graph.nodes)
    storages: dict[fx.Node, list[int]] = {}  # node -> storage ids of its tensor outputs
    elems: dict[fx.Node, list[list[int]]] = {}  # multi-output node -> storage ids per element
    size: dict[int, int] = {}
    born: dict[int, int] = {}
    last: dict[int, int] = {}

    def new_storage(t: torch.Tensor, at: int) -> int:
        sid = len(size)
        size[sid] = nbytes(t)
        born[sid] = at
        last[sid] = at
        return sid

    input_bytes = 0
    for i, n in enumerate(nodes):
        if n.op == "output":
            continue
        val = n.meta.get("val")
        first = next((a for a in n.all_input_nodes if storages.get(a)), None)
        if n.op == "call_function" and n.target is operator.getitem and n.args[0] in elems:
            parts = elems[n.args[0]]
            storages[n] = list(parts[n.args[1]]) if n.args[1] < len(parts) else []
        elif n.op == "call_function" and first is not None and _is_alias(n):
            base = storages[first]
            storages[n] = list(base)
            if isinstance(val, (list, tuple)):
                elems[n] = [list(base) for _ in val]
        elif isinstance(val, (list, tuple)):
            parts = [[new_storage(v, i)] if isinstance(v, torch.Tensor) else [] for v in val]
            elems[n] = parts
            storages[n] = [s for p in parts for s in p]
        else:
            storages[n] = [new_storage(t, i) for t in tensor_vals(val)]
        if n.op == "placeholder":
            input_bytes += sum(size[s] for s in storages[n])
        for a in n.all_input_nodes:
            for s in storages.get(a, []):
                last[s] = max(last[s], i)

    end = len(nodes)
    if not free_inputs:
        for n in nodes:
            if n.op == "placeholder":
                for s in storages.get(n, []):
                    last[s] = end
    output_bytes = 0
    out = gm.graph.output_node()
    counted: set[int] = set()
    for a in out.all_input_nodes:
        for s in storages.get(a, []):
            last[s] = end
            if s not in counted:
                counted.add(s)
                output_bytes += size[s]

    alloc_at: dict[int, list[int]] = {}
    free_at: dict[int, list[int]] = {}
    for s in size:
        alloc_at.setdefault(born[s], []).append(s)
        free_at.setdefault(last[s], []).append(s)
    live = peak = 0
    peak_node = ""
    for i, n in enumerate(nodes):
        live += sum(size[s] for s in alloc_at.get(i, []))
        if live > peak:
            peak, peak_node = live, n.name
        live -= sum(size[s] for s in free_at.get(i, []))
    return MemoryEstimate(peak, peak_node, input_bytes, output_bytes)


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
