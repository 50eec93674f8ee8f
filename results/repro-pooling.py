"""grapefx refuses a conv followed by 2x2 pooling (max or avg): UnsupportedOpError on `getitem`.
Without pooling (or with strided slicing instead) the same model compiles. Run:
    .venv/bin/python results/repro-pooling.py
Status: failed with grapefx at f645505..7f3f887 + uncommitted edits (13:15-13:45);
passes with the working tree at 56cd90d + uncommitted edits (14:13). Kept as a regression check.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import grapefx


class D(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.pool = pool
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        h = F.relu(self.c(x))
        if self.pool == "max":
            h = F.max_pool2d(h, 2)
        elif self.pool == "avg":
            h = F.avg_pool2d(h, 2)
        elif self.pool == "slice":
            h = h[:, :, ::2, ::2]
        return self.fc(h.flatten(1))


for pool in ("max", "avg", "slice"):
    m = D(pool)
    x, y = torch.randn(5, 3, 8, 8), torch.randint(0, 4, (5,))
    try:
        cm = grapefx.compile(m, codegen="eager")
        F.cross_entropy(cm(x), y).backward()
        print(pool, "ok")
    except Exception as e:
        print(pool, "FAIL", type(e).__name__, e)
