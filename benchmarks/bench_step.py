"""One full training step (forward, backward, AdamW, EMA) on random inputs; one JSON line each.

    python benchmarks/bench_step.py                       # the default CPU configurations
    python benchmarks/bench_step.py --preset tiny --mode cmae --batch 128 --threads 2
    python benchmarks/bench_step.py --device cuda --dtype bf16 --compile \
        --preset vit_base --batch 256

MFU = (matmul + attention FLOPs of the step, counted by torch.utils.flop_counter) / step time /
(the dense matmul rate measured in the same run: fp32 2048^3 on CPU, the chosen dtype on CUDA).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from cmae.config import load_config
from cmae.model import build_model
from cmae.optim import param_groups

# name -> (preset, batch) for the default run: the two reference configurations
DEFAULT_RUNS = [("tiny", 128), ("vit_base", 8)]
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    device: torch.device, dtype: torch.dtype | None, n: int = 2048, reps: int = 5
) -> float:
    """Measured dense matmul GFLOP/s (the MFU denominator)."""
    dt = dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    for _ in range(2):
        a @ b
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def bench(
    preset: str,
    method: str,
    batch: int,
    device: torch.device,
    dtype: torch.dtype | None,
    compile_: bool,
    steps: int,
    warmup: int,
    peak: float,
) -> dict:
    overrides = [f"model.method={method}"]
    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    opt = torch.optim.AdamW(
        param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda"
    )
    fwd = torch.compile(model) if compile_ else model
    s = cfg.model.img_size
    online = torch.randn(batch, 3, s, s, device=device)
    target = torch.randn(batch, 3, s, s, device=device) if method == "cmae" else None

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = fwd(online, target)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        model.update_target(0.996)
        return out.loss

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    achieved = flops / (ms / 1e3) / 1e9
    if device.type == "cuda":
        mem_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        mem_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS
    ratio, block = cfg.model.resolved_mask()
    return {
        "bench": "step",
        "preset": preset,
        "mode": method,
        "encoder": cfg.model.encoder,
        "img_size": s,
        "patch": cfg.model.patch_size,
        "mask_ratio": ratio,
        "mask_block": block,
        "batch": batch,
        "device": str(device),
        "dtype": "fp32" if dtype is None else str(dtype),
        "compile": compile_,
        "threads": torch.get_num_threads(),
        "step_ms": round(ms, 2),
        "img_per_s": round(batch / (ms / 1e3), 2),
        "gflop_per_step": round(flops / 1e9, 3),
        "achieved_gflops": round(achieved, 2),
        "peak_gflops": round(peak, 2),
        "mfu": round(achieved / peak, 3),
        "peak_mem_mb": round(mem_mb, 1),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", action="append", help="config preset (repeatable)")
    p.add_argument("--batch", type=int, help="batch size (default: 128 tiny, 8 otherwise)")
    p.add_argument("--mode", choices=["cmae", "mae", "both"], default="both")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    runs = (
        [(name, args.batch or dict(DEFAULT_RUNS).get(name, 8)) for name in args.preset]
        if args.preset
        else [(n, args.batch or b) for n, b in DEFAULT_RUNS]
    )
    peak = matmul_peak(device, dtype if device.type == "cuda" else None)
    modes = ["mae", "cmae"] if args.mode == "both" else [args.mode]
    for preset, batch in runs:
        for method in modes:
            rec = bench(
                preset, method, batch, device, dtype, args.compile, args.steps, args.warmup, peak
            )
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
