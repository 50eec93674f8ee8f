"""Buffers reassigned inside forward: `self.table = self.table.to(x.dtype)` (CTRL's positional table).

`nn.Buffer(t)` and `register_buffer` leave two Python attributes on the registered tensor,
`_is_buffer` and `persistent`. Assigning that tensor back to the module (or anything `.to()`
returns it unchanged, as when the dtype already matches) makes `Module.__setattr__` read
`value.persistent` and branch on it, which Dynamo cannot trace: a graph break. Once a buffer is
registered, the module keeps its persistence in `_non_persistent_buffers_set`; the markers only
matter when the tensor is registered again, on another module, without saying whether it is
persistent. Dropping them changes nothing else: same tensors, same state_dict.
"""

from __future__ import annotations

import torch.nn as nn

_MARKERS = ("_is_buffer", "persistent")


def drop_buffer_markers(model: nn.Module) -> list[str]:
    """Remove nn.Buffer's marker attributes from every registered buffer of `model`, in place;
    returns the names of the buffers that had them."""
    dropped = []
    for name, buf in model.named_buffers(remove_duplicate=False):
        state = getattr(buf, "__dict__", {})
        if state.get("_is_buffer"):  # set with `persistent` by nn.Buffer; a tensor's own attributes stay
            for m in _MARKERS:
                state.pop(m, None)
            dropped.append(name)
    return dropped
