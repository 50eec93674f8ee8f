"""The types every batch-layout module shares (kept apart from layout.py, which imports the modules
with more rules: indexing_layout, selection_layout, bag_layout)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


# Boolean-mask selections x[mask] whose row count is checked at run time to be the same for every
# sample (indexing_layout.py): {unbacked row count u: B·c_u}, c_u a positive integer symbol. Set by
# `equal_count_rows` for the duration of one graph's propagation; shapes are read through it, so
# u // B reads as c_u and a view [u, d] -> [B, u // B, d] as a plain split of the batch.
_ROW_COUNTS: dict[Any, Any] = {}


@contextlib.contextmanager
def equal_count_rows(counts: dict[Any, Any]) -> Iterator[None]:
    saved = dict(_ROW_COUNTS)
    _ROW_COUNTS.clear()
    _ROW_COUNTS.update(counts)
    try:
        yield
    finally:
        _ROW_COUNTS.clear()
        _ROW_COUNTS.update(saved)


def to_sym(x: Any) -> Any:
    if isinstance(x, torch.SymInt):
        expr = sympy.sympify(x.node.expr)
        # xreplace: the keys are symbols, so a plain substitution (`subs` is ~10× slower)
        return expr.xreplace(_ROW_COUNTS) if _ROW_COUNTS and expr.free_symbols & _ROW_COUNTS.keys() else expr
    return sympy.Integer(int(x))


def shape_of(node: Any) -> list[Any] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return [to_sym(s) for s in val.shape]
    return None
