"""Measuring what data-parallel private training communicates per step.

`count_ddp_bytes(ddp)` registers a DDP communication hook that does DDP's default all-reduce
(sum, then divide by the world size) and counts the bytes of every bucket it reduces; grapefx's own
collectives (DP-GRAPE's projected gradients, the global batch size for an actual-size "mean") are
counted in `privacy_state.comm_bytes`. Payload bytes per rank per step; a ring all-reduce moves about
2(N-1)/N times that over each rank's link.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class CommCounter:
    bytes: int = 0
    buckets: int = 0


# No `from __future__ import annotations`: DDP checks these annotations as objects.
def _counting_allreduce(counter: CommCounter, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buf = bucket.buffer()
    counter.bytes += buf.numel() * buf.element_size()
    counter.buckets += 1
    buf.div_(dist.get_world_size())
    fut = dist.all_reduce(buf, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def count_ddp_bytes(ddp: torch.nn.Module) -> CommCounter:
    """Count the bytes `ddp` (a DistributedDataParallel) all-reduces; call before its first forward."""
    counter = CommCounter()
    ddp.register_comm_hook(counter, _counting_allreduce)
    return counter
