"""Data-parallel private training on torch.distributed (DDP); see `wrap.py` for the wrapping order."""

from grapefx.distributed.wrap import RIGHT_ORDER, DistributedSetupError

__all__ = ["RIGHT_ORDER", "DistributedSetupError"]
