"""grapefx: differentially private training as a torch.compile backend."""

from grapefx.api import PrivateModule, compile
from grapefx.config import PrivacyConfig
from grapefx.dynamo_backend import GrapefxBackend, backend
from grapefx.errors import (
    BatchMixingError,
    ConfigError,
    GrapefxError,
    GraphBreakError,
    UnsupportedOpError,
)

__all__ = [
    "BatchMixingError",
    "ConfigError",
    "GrapefxBackend",
    "GrapefxError",
    "GraphBreakError",
    "PrivacyConfig",
    "PrivateModule",
    "UnsupportedOpError",
    "backend",
    "compile",
]
__version__ = "0.1.0"
