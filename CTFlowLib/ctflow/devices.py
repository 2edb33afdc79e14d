"""Which torch device a run uses: one name rule for the library, every --device and the worker."""

from __future__ import annotations

import re

import torch

from .errors import DeviceError

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
    return torch.device(name)
