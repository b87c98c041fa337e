"""The device, precision, seeds and allocator of a process: training and evaluation set them up."""

from __future__ import annotations

import ctypes
import random
import sys

import numpy as np
import torch

from cmae.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but CUDA is not available")
    return torch.device(name)


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """``train.amp`` -> the autocast dtype, None for fp32. auto: bf16 on CUDA, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[name]


def keep_freed_memory() -> bool:
    """glibc: serve tensors up to 32 MiB from the heap and keep freed memory for reuse, instead
    of mapping fresh pages for each activation and unmapping them when it is freed: a ViT-Tiny
    CMAE step took ~160-200k page faults and 8-18% longer on this project's CPU machine
    (docs/PERFORMANCE.md). The process's memory then stays near its peak, which training
    reaches every step anyway. Returns whether it applied (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
