"""What every launcher needs besides its plan: the planner's description of the inputs' device, and a
guard that makes that device current while the kernel launches (Triton launches on the current CUDA
device, not on the tensors' device)."""

from __future__ import annotations

import contextlib
import functools

import torch

from . import interpreted
from .plan import INTERPRETER, Device

__all__ = ["device_guard", "device_of"]


@functools.cache
def _cuda_device(index: int) -> Device:
    props = torch.cuda.get_device_properties(index)
    shared = getattr(props, "shared_memory_per_block_optin", 0) or 227 * 1024
    return Device(sms=props.multi_processor_count, shared_bytes=shared)


def device_of(t: torch.Tensor) -> Device:
    """The planner's description of the device ``t`` lives on (the interpreter's for CPU tensors)."""
    if t.device.type != "cuda" or interpreted():
        return INTERPRETER
    return _cuda_device(t.device.index if t.device.index is not None else torch.cuda.current_device())


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)`` for a CUDA device (launch there), a no-op otherwise."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
