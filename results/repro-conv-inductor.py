"""grapefx codegen="inductor" fails on a Conv2d at the first backward:
AssertionError: expected size 3==3, stride 9==1 at dim=1; ... Error in op: torch.ops.grapefx.add_gaussian_noise.default
("This error most often comes from a incorrect fake (aka meta) kernel for a custom op").
Cause (read, not fixed): grapefx/privacy/noise.py `add_gaussian_noise` returns a contiguous tensor
(state.standard_normal(grad.shape) ...), but its register_fake returns torch.empty_like(grad), which keeps
grad's strides; the conv rule's weight gradient is non-contiguous ((27, 1, 9, 3) for [32, 3, 3, 3]),
so Inductor's assert_size_stride on the op's output fails. codegen="eager" runs. Run:
    .venv/bin/python results/repro-conv-inductor.py
Status: failed with grapefx at f645505..7f3f887 + uncommitted edits (13:15-13:45);
passes with the working tree at 56cd90d + uncommitted edits (14:13). Kept as a regression check.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import grapefx

torch.manual_seed(0)
m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
x, y = torch.randn(5, 3, 8, 8), torch.randint(0, 4, (5,))
for codegen in ("eager", "inductor"):
    try:
        cm = grapefx.compile(m, codegen=codegen)
        F.cross_entropy(cm(x), y).backward()
        print(codegen, "ok")
    except Exception as e:
        print(codegen, "FAIL", type(e).__name__, str(e).splitlines()[0])
