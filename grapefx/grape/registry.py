"""Which privacy state and name a projected parameter belongs to.

Keyed by id(parameter) with a weak reference to check identity (tensors cannot be keys of a
WeakKeyDictionary: their == is elementwise), so a freed parameter's id reused later does not match.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

_OWNERS: dict[int, tuple[weakref.ref, Any, str]] = {}


def register(param: torch.Tensor, state: Any, name: str) -> None:
    _OWNERS[id(param)] = (weakref.ref(param), state, name)


def owner(param: torch.Tensor) -> tuple[Any, str] | None:
    entry = _OWNERS.get(id(param))
    if entry is None or entry[0]() is not param:
        return None
    return entry[1], entry[2]
