"""Merge nodes of the private backward that compute the same pure aten op on the same inputs.

The rules trace one grad site at a time, so layers that read the same tensor each build their own
products of it: the q, k and v projections of one hidden state (Llama, BERT, Mistral) each compute
the Gram blocks of that input for their ghost norms, gate and up of a SwiGLU MLP likewise (and
float copies of it for norms of low-precision models). After the merge such a product is computed
once per step; the value of every output is unchanged (same op on the same inputs). A merged value
lives until its last reader; the memory scheduler plans the merged graph.

Only ops that cannot observe the difference are merged: aten operators whose schema writes nothing
and that draw no random numbers. grapefx's own operators (noise, norm records, collectives) are
never merged, nor is any node whose storage is a graph output's (two gradients must not become one
tensor), so the order and count of side effects stay as traced.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

_UNHASHABLE = object()
_NO_STORAGE = "no storage"  # a value without a checkable storage: never merged


def merge_common_subexpressions(gm: fx.GraphModule) -> int:
    """Merge duplicate pure nodes in place (first occurrence kept); returns how many were removed."""
    protected = _output_storages(gm)
    first: dict[Any, fx.Node] = {}
    merged = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not _is_pure(node.target) or _storages(node) & protected:
            continue
        # two-pass clipping recomputes on purpose: its second pass must not read the first's values
        second_pass = node.meta.get("grapefx", {}).get("pass") == "two_pass"
        key = (node.target, _freeze(node.args), _freeze(node.kwargs), second_pass)
        if _contains(key, _UNHASHABLE):
            continue
        kept = first.setdefault(key, node)
        if kept is not node:
            node.replace_all_uses_with(kept)
            gm.graph.erase_node(node)
            merged += 1
    if merged:
        gm.recompile()
    return merged


def _is_pure(target: Any) -> bool:
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return False
    if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return not any(r.alias_info is not None and r.alias_info.is_write for r in target._schema.returns)


def _storages(node: fx.Node) -> set[Any]:
    """Storages of the node's tensor value, or of each tensor of a multi-output op (split, unbind)."""
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else [val]
    out: set[Any] = set()
    for v in vals:
        if isinstance(v, torch.Tensor):
            try:
                out.add(StorageWeakRef(v.untyped_storage()))
            except (NotImplementedError, RuntimeError):
                out.add(_NO_STORAGE)
    return out


def _output_storages(gm: fx.GraphModule) -> set[Any]:
    out: set[Any] = {_NO_STORAGE}
    for n in gm.graph.output_node().all_input_nodes:
        out |= _storages(n)
    return out


def _freeze(value: Any) -> Any:
    """A hashable stand-in for node arguments (lists become tuples); _UNHASHABLE marks the rest."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    plain = (fx.Node, int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)
    if isinstance(value, plain):
        return (type(value), value)  # 1, 1.0 and True stay distinct
    return _UNHASHABLE


def _contains(key: Any, marker: object) -> bool:
    if key is marker:
        return True
    return isinstance(key, tuple) and any(_contains(k, marker) for k in key)
