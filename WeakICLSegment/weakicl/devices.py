"""Which PyTorch device to run on: CUDA, Apple's MPS or the CPU.

A device that was asked for but is missing falls back to the CPU with a warning rather than an
error: the result is the same, only slower, and a batch started on the wrong machine should not die.
The session logs the device actually used once its weights are loaded, so a user knows what to expect
of the speed (and a bad input still gets a one-line answer).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("weakicl")

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
DEVICE_HELP = "auto (default): CUDA, else Apple MPS, else CPU; a missing device falls back to the CPU with a warning"


def mps_available() -> bool:
    """True on Apple silicon with a PyTorch built for Metal (the backend is absent from older builds)."""
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: str = "auto") -> str:
    """The torch device ("cuda", "mps" or "cpu") for a request of auto, cpu, cuda or mps."""
    import torch

    from .errors import InputError

    if device not in DEVICE_CHOICES:
        raise InputError(f"device must be one of {', '.join(DEVICE_CHOICES)}, not {device!r}")
    available = {"cuda": torch.cuda.is_available(), "mps": mps_available(), "cpu": True}
    if device == "auto":
        resolved = next(name for name in ("cuda", "mps", "cpu") if available[name])
    elif available[device]:
        resolved = device
    else:
        logger.warning("device %r asked for, but PyTorch sees no %s device here: running on the CPU (slower)",
                       device, device.upper())
        resolved = "cpu"
    return resolved


def device_name(device: str) -> str:
    """A human name for a resolved device: the GPU's model, "Apple GPU (MPS)" or "CPU"."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return "Apple GPU (MPS)" if device == "mps" else "CPU"
