"""The types every batch-layout module shares (kept apart from layout.py, which imports the modules
with more rules: indexing_layout, selection_layout, bag_layout)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx as fx


@dataclass(frozen=True)
class BatchLayout:
    dim: int
    outer: Any  # sympy integer: product of the factors before B inside `dim`
    inner: Any  # sympy integer: product of the factors after B inside `dim`

    def moved(self, dim: int) -> BatchLayout:
        return BatchLayout(dim, self.outer, self.inner)

    @property
    def plain(self) -> bool:
        return self.outer == 1 and self.inner == 1


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = _Unknown()


def to_sym(x: Any) -> Any:
    if isinstance(x, torch.SymInt):
        return sympy.sympify(x.node.expr)
    return sympy.Integer(int(x))


def shape_of(node: Any) -> list[Any] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return [to_sym(s) for s in val.shape]
    return None
