"""keep_freed_memory: with glibc, tensors up to 32 MiB come from the heap and freed memory stays
there for the next step, instead of fresh pages mapped for each activation and unmapped when it
is freed (page faults every step; docs/PERFORMANCE.md)."""

import ctypes
import platform
import subprocess
import sys

import pytest

ONE_ACTIVATION = """
import ctypes, sys, torch
from cmae.runtime.device import keep_freed_memory
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = libc.mallinfo2().hblkhd
x = torch.ones(6 << 20)  # a 24 MiB activation
mapped = libc.mallinfo2().hblkhd - before  # bytes in mmap()ed blocks
del x
print(mapped >> 20, libc.mallinfo2().fordblks >> 20)  # MiB mapped, MiB free in the heap
"""


def one_activation(policy: str) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", ONE_ACTIVATION, policy], capture_output=True, text=True, check=True
    )
    mapped, free = out.stdout.split()[-2:]
    return int(mapped), int(free)


def has_mallinfo2() -> bool:
    try:
        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018 - glibc >= 2.33
    except (OSError, AttributeError):
        return False
    return True


@pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or platform.libc_ver()[0] != "glibc"
    or not has_mallinfo2(),
    reason="glibc's mallopt and mallinfo2",
)
def test_activations_come_from_the_heap_and_stay_there():
    mapped, free = one_activation("default")
    assert mapped >= 24 and free < 24  # glibc's own policy: mapped, and unmapped at free
    mapped, free = one_activation("keep")
    assert mapped == 0 and free >= 24  # kept: the next step reuses it without page faults
