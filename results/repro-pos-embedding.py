"""grapefx fails on a learned positional embedding written nanoGPT-style, nn.Embedding(arange(T)):
ConstraintViolationError, "You marked L['ids'].size()[0] as dynamic but your code specialized it to be a
constant (3)". The guard Eq(B, 3) is added inside grapefx/passes/batched_post.py `_vmap_fallback`
(torch.vmap over the pos embedding's post nodes, called from per_sample_norms.per_sample_norm_sq) while
privatize_backward retraces with make_fx. A positional nn.Parameter sliced to T works. Run:
    .venv/bin/python results/repro-pos-embedding.py
Status: failed with grapefx at f645505..7f3f887 + uncommitted edits (13:15-13:45);
passes with the working tree at 56cd90d + uncommitted edits (14:13). Kept as a regression check.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import grapefx


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(16, 8)
        self.pos = nn.Embedding(4, 8)
        self.head = nn.Linear(8, 16)

    def forward(self, ids):
        return self.head(self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device)))


m = M()
ids = torch.randint(0, 16, (3, 4))
cm = grapefx.compile(m, codegen="eager")
F.cross_entropy(cm(ids).reshape(-1, 16), ids.reshape(-1)).backward()
print("ok", all(bool(torch.isfinite(p.grad).all()) for p in m.parameters()))
