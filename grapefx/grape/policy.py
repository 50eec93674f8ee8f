"""Which weights DP-GRAPE projects (default: Linear-type weights whose smaller side exceeds the rank).

Not projected by default: biases, norms, embeddings (their gradients are sparse or small), and the
output head (by name, and the model's last Linear): they are privatized densely, as in Book-Keeping.
Override with name patterns (fnmatch) or module types.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatch

import torch.nn as nn

DEFAULT_EXCLUDE = ("*head*", "*classifier*", "*embed*", "*wte*", "*wpe*")


def grape_parameters(
    model: nn.Module,
    rank: int,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    module_types: tuple[type[nn.Module], ...] = (nn.Linear,),
) -> tuple[str, ...]:
    """Names (as in model.named_parameters()) of the weights to project."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, module_types)]
    last_linear = linears[-1][0] if linears and include is None else None
    chosen = []
    for mod_name, mod in linears:
        w = getattr(mod, "weight", None)
        if not isinstance(w, nn.Parameter) or not w.requires_grad or w.dim() != 2 or min(w.shape) <= rank:
            continue
        name = f"{mod_name}.weight" if mod_name else "weight"
        if include is not None and not any(fnmatch(name, p) for p in include):
            continue
        if any(fnmatch(name, p) for p in exclude) or mod_name == last_linear:
            continue
        chosen.append(name)
    return tuple(chosen)
