"""The dense-op floor of a training step: how long its matmuls, attention kernels and
convolutions take when each runs alone, with nothing else in the step.

Used by ``bench_step.py --floor`` (cmae's step) and ``reference_step.py --floor`` (the
official code's), so both sides are measured by the same code. ``capture(fn)`` runs ``fn`` once
under a TorchDispatchMode that records every dense op (name, argument shapes, strides, dtypes and
non-tensor arguments) of the forward, the backward and the optimizer step; ``replay`` then runs
each distinct call alone on fresh random tensors of the same layout (one warm-up call, then the
best of ``reps``) and multiplies by how often the step makes it. The sum is a floor for the step
in the sense that a step doing these ops cannot be faster than running them back to back on a
warm cache: whatever the step spends beyond it is elementwise work, copies, the optimizer,
allocation and Python. Dividing another implementation's step time by this floor bounds the
speed-up any rewrite could reach without doing fewer FLOPs.

Pure torch: imports nothing from either package called ``cmae``.
"""

from __future__ import annotations

import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
DENSE_OPS = {
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "convolution",
    "convolution_backward",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_backward",
}


def _layout(a):
    if isinstance(a, torch.Tensor):
        return ("T", tuple(a.shape), tuple(a.stride()), str(a.dtype), a.device.type)
    if isinstance(a, (list, tuple)):
        return ("L", tuple(_layout(x) for x in a))
    return ("V", a)


def _build(layout):
    kind = layout[0]
    if kind == "T":
        _, shape, stride, dtype, device = layout
        dt = getattr(torch, dtype.split(".")[-1])
        t = torch.empty_strided(shape, stride, dtype=dt, device=device)
        if t.is_floating_point():
            t.normal_()
        return t
    if kind == "L":
        return [_build(x) for x in layout[1]]
    return layout[1]


class _Record(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in DENSE_OPS:
            key = (func, tuple(_layout(a) for a in args), tuple(sorted(kwargs.items())))
            self.calls[key] += 1
        return func(*args, **kwargs)


def capture(fn) -> Counter:
    """Run ``fn()`` once; return {(op, argument layouts, kwargs): calls} of its dense ops."""
    with _Record() as rec:
        fn()
    return rec.calls


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def replay(calls: Counter, reps: int = 5) -> dict:
    """Time each recorded dense call alone; returns the floor in ms, per op name and in total."""
    per_op: Counter = Counter()
    n_calls = 0
    for (func, arg_layouts, kw), count in calls.items():
        args = [_build(a) for a in arg_layouts]
        device = next((a[4] for a in arg_layouts if a[0] == "T"), "cpu")
        with torch.no_grad():
            func(*args, **dict(kw))  # warm-up: caches, thread pool, allocator
            times = []
            for _ in range(reps):
                _sync(device)
                t0 = time.perf_counter()
                func(*args, **dict(kw))
                _sync(device)
                times.append(time.perf_counter() - t0)
        per_op[func.overloadpacket.__name__] += min(times) * count * 1e3
        n_calls += count
    return {
        "dense_floor_ms": round(sum(per_op.values()), 2),
        "dense_calls": n_calls,
        "dense_ms_by_op": {k: round(v, 2) for k, v in per_op.most_common()},
    }
