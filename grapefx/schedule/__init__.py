"""Memory planning for the private backward: liveness, peak estimates, reordering, buffer plans."""

from grapefx.schedule.liveness import Liveness, MemoryModel, peak_envelope

__all__ = ["Liveness", "MemoryModel", "peak_envelope"]
