"""`grapefx.prepare(model)`: what `grapefx.compile` does to a model before tracing it, for users of
the plain path, `torch.compile(model, backend=grapefx.backend(...), fullgraph=True)`.

Dynamo traces the model before any backend sees it, so the backend cannot undo what would break
the single graph grapefx needs: that has to happen to the model (and Dynamo's config) up front.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from grapefx.buffer_markers import drop_buffer_markers
from grapefx.transformers_compat import apply_for_good


def prepare(model: nn.Module) -> nn.Module:
    """Make `model` traceable in one graph by Dynamo for the grapefx backend, in place; returns it.

    - Hugging Face transformers models (`grapefx/transformers_compat.py`): installs the
      output-capturing hooks now, switches mixture-of-experts layers to grapefx's
      "grapefx_masked_rows" experts (`grapefx/moe_experts.py`) and clears speech feature encoders'
      `_requires_grad` flag, for good. `grapefx.compile` does the last two only while its compiled
      model runs. Parameters, routing and outputs are unchanged; an eager call of the model no
      longer makes the feature encoder's output require grad, which only gradient checkpointing
      over a frozen encoder relied on.
    - Buffers: drops nn.Buffer's marker attributes from the registered tensors, so a forward that
      reassigns a buffer (`self.table = self.table.to(x.dtype)`, CTRL) traces in one graph
      (`grapefx/buffer_markers.py`).
    - nn.RNN / GRU / LSTM: sets `torch._dynamo.config.allow_rnn = True` (process-wide), so Dynamo
      unrolls them instead of breaking the graph.

    Nothing else is changed, so calling it on every model is safe.
    """
    apply_for_good(model)
    drop_buffer_markers(model)
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        torch._dynamo.config.allow_rnn = True
    return model
