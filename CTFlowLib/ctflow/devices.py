"""Which torch device a run uses (one name rule for the library, every --device and the worker), and what running
out of its memory looks like."""

from __future__ import annotations

import re

import torch

from .errors import DeviceError, OutOfMemory

DEVICES = "auto, cpu, cuda or cuda:N"  # what select_device (and every --device) accepts


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise DeviceError(f"unknown device {name!r}: use {DEVICES}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(
            f"CUDA was requested but this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu "
            "or install a CUDA build of torch"
        )
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        names = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise DeviceError(f"there is no {name}: this machine has {count} CUDA GPU{'s' if count > 1 else ''} ({names})")
    return device


# torch's CPU allocator reports a failed allocation as a plain RuntimeError with this text, not as OutOfMemoryError
_CPU_ALLOCATOR_FAILED = re.compile(r"DefaultCPUAllocator: (can't allocate|not enough) memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is a device running out of memory: CUDA's OutOfMemoryError, numpy's MemoryError, or the
    RuntimeError of torch's CPU allocator."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and bool(_CPU_ALLOCATOR_FAILED.search(str(exc)))


def out_of_memory(device: torch.device, doing: str, smaller: str = "") -> OutOfMemory:
    """The error for running out of `device`'s memory while `doing`, saying what to try (`smaller`: a smaller request
    that would fit better, when there is one)."""
    advice = ["close other programs using its memory", *(["use --device cpu"] if device.type == "cuda" else []),
              *([smaller] if smaller else [])]
    return OutOfMemory(f"out of {device.type} memory while {doing}; {', '.join(advice[:-1])}"
                       f"{' or ' if len(advice) > 1 else ''}{advice[-1]}")
