"""keep_freed_memory: with glibc, activations are served from memory the process keeps, so a
training step stops paying page faults for fresh pages (docs/PERFORMANCE.md)."""

import platform
import subprocess
import sys

import pytest

STEPS = """
import resource, sys, torch
from cmae.pretrain import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.set_num_threads(1)
torch.manual_seed(0)
layers = [torch.nn.Linear(64, 512), torch.nn.GELU(), torch.nn.Linear(512, 64)] * 2
net = torch.nn.Sequential(*layers)
faults = []
for n in (2048,) * 8:  # the same shapes every step, as in training
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net(torch.randn(n, 64)).square().mean().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(sum(faults[-4:]))  # after the first steps, which grow the heap
"""


def faults_per_steps(policy: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", STEPS, policy], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's mallopt",
)
def test_kept_memory_removes_the_page_faults_of_later_steps():
    default, keep = faults_per_steps("default"), faults_per_steps("keep")
    assert keep < max(50, default // 10), (keep, default)
