"""One full training step (forward, backward, AdamW, EMA) on random inputs; one JSON line each.

    python benchmarks/bench_step.py              # the issue's two reference configurations,
                                                 # MAE and CMAE mode, CPU fp32 (a few minutes)
    python benchmarks/bench_step.py --preset ref_tiny --mode cmae --threads 2
    python benchmarks/bench_step.py --preset tiny --batch 64      # any config preset
    python benchmarks/bench_step.py --device cuda --dtype bf16 --compile \
        --preset ref_vit_b16 --batch 256
    python benchmarks/bench_step.py --preset seg_vit_b16_512 --preset seg_vit_b16_256
                                                 # `cmae segment`: UperNet ViT-B/16, batch 2

The step is ``cmae.train.pretrain.train_one_step``, the training loop's own step (with its
non-finite guard), so what is measured is what ``cmae pretrain`` runs. Each (config, mode) runs
in a fresh process (its own peak memory, allocator and thread pool). Per measurement: median step
time of ``--steps`` steps after ``--warmup`` steps, img/s, GFLOP per step (matmul + attention,
counted by torch.utils.flop_counter on the eager model), achieved GFLOP/s, the dense matmul rate
measured in the same process just before (fp32 2048^3 on CPU, the chosen dtype on CUDA), MFU =
achieved / that peak, peak memory (CPU: the process's peak RSS; CUDA: peak allocated) and
``other_cpu``, the cores other processes used meanwhile (a shared machine's noise). The counted
step runs its attention on the math backend, whose matmuls the counter sees (it counts the CPU's
fused attention kernel as 0 FLOPs). A last line per config compares the CMAE/MAE step-time ratio
with their FLOP ratio. Speed next to the official CMAE code counts only from the same run:
``bench_reference.py`` (this script's records carry no ratio to a figure of another day).

Toggles to measure one optimisation against its absence in the same run: ``--optimizer``
(AdamW implementation: fused, as ``cmae pretrain`` uses, foreach or the per-parameter loop),
``--compile``, ``--malloc default`` (glibc's own allocation policy instead of
``keep_freed_memory``). Older code: run this script with ``PYTHONPATH=<checkout>/src``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from op_floor import capture, replay  # this directory (sys.path[0] when run as a script)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cmae.config import load_config
from cmae.models.cmae import build_model
from cmae.models.vit import set_fused_attention, use_fused_attention
from cmae.runtime.device import keep_freed_memory
from cmae.runtime.optim import param_groups
from cmae.train.pretrain import train_one_step

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# The two reference configurations of issue 7, every field pinned (not read from the YAML
# presets, which may change): name -> (batch, overrides). Masking per mode: MODE_MASK.
BENCH_PRESETS: dict[str, tuple[int, list[str]]] = {
    "ref_vit_b16": (
        8,
        [
            "model.encoder=vit_base",
            "model.img_size=224",
            "model.patch_size=16",
            "model.decoder_dim=512",
            "model.decoder_depth=8",
            "model.decoder_heads=16",
            "model.feature_decoder=true",
            "model.feature_decoder_depth=2",
            "model.proj_hidden_dim=1536",
            "model.proj_dim=256",
        ],
    ),
    "ref_tiny": (
        128,
        [
            "model.encoder=vit_tiny",
            "model.img_size=32",
            "model.patch_size=4",
            "model.decoder_dim=128",
            "model.decoder_depth=4",
            "model.decoder_heads=4",
            "model.feature_decoder=true",
            "model.feature_decoder_depth=2",
            "model.proj_hidden_dim=1536",
            "model.proj_dim=256",
            "data.max_shift=8",  # the data pipeline is not run; only valid for 32 px
        ],
    ),
}
# Segmentation (`cmae segment`): one training step of UperNet on ViT-B/16 (the reference
# ADE20K model: 150 classes, UperNet width 768, FCN auxiliary head 256, drop path 0.1, AdamW
# with layer decay), random images and labels: name -> (batch, crop). Mode "seg".
SEG_PRESETS: dict[str, tuple[int, int]] = {"seg_vit_b16_512": (2, 512), "seg_vit_b16_256": (2, 256)}
# mmsegmentation 1.2.2 mae-base_upernet, one training step at batch 2, torch FlopCounterMode
# (docs: MEASUREMENTS of 2026-11-30)
REFERENCE_GFLOP = {"seg_vit_b16_512": 7279.0, "seg_vit_b16_256": 1777.0}
# the reference code's masking: CMAE 2x2 blocks at 0.65, MAE per patch at 0.75
MODE_MASK = {"cmae": (0.65, 2), "mae": (0.75, 1)}
DEFAULT_PRESETS = ["ref_tiny", "ref_vit_b16"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    device: torch.device, dtype: torch.dtype | None, n: int = 2048, reps: int = 5
) -> float:
    """Measured dense matmul GFLOP/s (the MFU denominator): the best of ``reps``."""
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


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, of this process) so far; machine NaN off Linux.

    Their difference over the timed steps is the CPU time other processes took: a shared
    machine's noise, reported with each measurement (``other_cpu``)."""
    own = sum(os.times()[:2])
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except OSError:
        return float("nan"), own
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), own


def make_config(preset: str, method: str):
    """The model config of a bench preset (pinned) or of a config preset / YAML file."""
    if preset in BENCH_PRESETS:
        ratio, block = MODE_MASK[method]
        mask = [f"model.mask_ratio={ratio}", f"model.mask_block={block}"]
        return load_config(None, [*BENCH_PRESETS[preset][1], f"model.method={method}", *mask])
    return load_config(preset, [f"model.method={method}"])


def make_optimizer(model: torch.nn.Module, kind: str) -> torch.optim.Optimizer:
    groups = param_groups(model, 0.05)
    kwargs = {"fused": True} if kind == "fused" else {"foreach": kind == "foreach"}
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), **kwargs)


def seg_step(preset: str, batch: int, device: torch.device, dtype: torch.dtype | None, kind: str):
    """(step function, description) of one `cmae segment` training step of ``preset``."""
    from cmae.interop.encoders import load_encoder_weights, segmentor_for
    from cmae.runtime.optim import layer_decay_groups
    from cmae.train.segment import seg_loss

    crop = SEG_PRESETS[preset][1]
    torch.manual_seed(0)
    weights = load_encoder_weights("random", "vit_base")
    model = segmentor_for(weights, 150, crop, channels=768, aux_channels=256, drop_path=0.1).to(
        device
    )
    kwargs = {"fused": True} if kind == "fused" else {"foreach": kind == "foreach"}
    opt = torch.optim.AdamW(
        layer_decay_groups(model, 0.05, 0.65), lr=1e-4, betas=(0.9, 0.999), **kwargs
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, crop, crop, generator=g).to(device)
    y = torch.randint(0, 150, (batch, crop, crop), generator=g).to(device)
    model.train()

    def step(module: torch.nn.Module) -> None:
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
            logits, aux = module(x)
        loss, _ = seg_loss(logits, aux, y, 0.4, avg_non_ignore=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    n_params = sum(p.numel() for p in model.parameters())
    info = {"encoder": "vit_base", "img_size": crop, "patch": 16, "params_m": n_params / 1e6}
    return model, step, info


def compiled(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    if not args.compile:
        return model
    mode = None if args.compile_mode == "default" else args.compile_mode
    return torch.compile(model, mode=mode, dynamic=False if args.dynamic == "false" else None)


def bench(args: argparse.Namespace, preset: str, method: str, batch: int) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if method == "seg":
        model, step, info = seg_step(preset, batch, device, dtype, args.optimizer)
        wrapped = compiled(model, args)
        return timed(args, preset, method, batch, device, dtype, step, wrapped, info)
    cfg = make_config(preset, method)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    set_fused_attention(model, use_fused_attention(args.attention, device))
    opt = make_optimizer(model, args.optimizer)
    wrapped = compiled(model, args)
    s = cfg.model.img_size
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(batch, 3, s, s, generator=g).to(device)]
    if method == "cmae":
        views.append(torch.randn(batch, 3, s, s, generator=g).to(device))

    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def step(module: torch.nn.Module) -> None:
        train_one_step(
            model, opt, views, lr=1e-4, momentum=0.996, wrapped=module, amp=dtype, scaler=scaler
        )

    ratio, block = cfg.model.resolved_mask()
    info = {
        "encoder": cfg.model.encoder,
        "img_size": s,
        "patch": cfg.model.patch_size,
        "mask_ratio": ratio,
        "mask_block": block,
    }
    return timed(args, preset, method, batch, device, dtype, step, wrapped, info)


def timed(
    args: argparse.Namespace,
    preset: str,
    method: str,
    batch: int,
    device: torch.device,
    dtype: torch.dtype | None,
    step,
    wrapped: torch.nn.Module,
    info: dict,
) -> dict:
    """FLOPs of one eager step, then ``args.steps`` timed steps after ``args.warmup``."""
    model = wrapped._orig_mod if args.compile else wrapped
    # FLOPs of one eager step (the compiled one runs the same matmuls). The attention runs on
    # the math backend here: FlopCounterMode has no formula for the CPU's fused kernel
    # (_scaled_dot_product_flash_attention_for_cpu) and would count its attention as 0 FLOPs
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        step(model)
    flops = counter.get_total_flops()
    for _ in range(args.warmup):
        step(wrapped)
    sync(device)
    peak = matmul_peak(device, dtype if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    busy0, own0 = cpu_seconds()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step(wrapped)
        sync(device)
        times.append(time.perf_counter() - t0)
    busy1, own1 = cpu_seconds()
    other_cpu = max(0.0, (busy1 - busy0) - (own1 - own0)) / sum(times)
    ms = statistics.median(times) * 1e3
    achieved = flops / (ms / 1e3) / 1e9
    if device.type == "cuda":
        mem_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        mem_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS
    rec = {
        "bench": "step",
        "preset": preset,
        "mode": method,
        **info,
        "batch": batch,
        "device": str(device),
        "dtype": args.dtype,
        "compile": args.compile and f"{args.compile_mode}/dynamic={args.dynamic}",
        "optimizer": args.optimizer,
        "attention": args.attention,
        "malloc": args.malloc,
        "threads": torch.get_num_threads(),
        "step_ms": round(ms, 2),
        "step_ms_min": round(min(times) * 1e3, 2),
        "step_ms_max": round(max(times) * 1e3, 2),
        "img_per_s": round(batch / (ms / 1e3), 2),
        "gflop_per_step": round(flops / 1e9, 3),
        "achieved_gflops": round(achieved, 2),
        "peak_gflops": round(peak, 2),
        "mfu": round(achieved / peak, 3),
        "peak_mem_mb": round(mem_mb, 1),
        "other_cpu": round(other_cpu, 2),  # cores used by other processes while timing
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    if args.floor:  # after the timing: the replay must not warm or cool what was timed
        rec.update(replay(capture(lambda: step(model))))
        rec["beyond_floor_ms"] = round(ms - rec["dense_floor_ms"], 2)
    if preset in REFERENCE_GFLOP:
        rec["ref_gflop_per_step"] = REFERENCE_GFLOP[preset]
        rec["gflop_over_ref"] = round(flops / 1e9 / REFERENCE_GFLOP[preset], 4)
    return rec


def child_args(args: argparse.Namespace, preset: str, method: str, batch: int) -> list[str]:
    out = [sys.executable, __file__, "--one", preset, method, str(batch)]
    out += ["--device", args.device, "--dtype", args.dtype, "--optimizer", args.optimizer]
    out += ["--attention", args.attention]
    out += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--malloc", args.malloc]
    if args.threads:
        out += ["--threads", str(args.threads)]
    if args.compile:
        out += ["--compile", "--compile-mode", args.compile_mode, "--dynamic", args.dynamic]
    if args.floor:
        out.append("--floor")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--preset",
        action="append",
        help=f"bench preset ({', '.join([*BENCH_PRESETS, *SEG_PRESETS])}) or config preset / "
        "YAML (repeatable)",
    )
    p.add_argument("--batch", type=int, help="batch size (default: the preset's, else 8)")
    p.add_argument("--mode", choices=["cmae", "mae", "both"], default="both")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument(
        "--compile-mode",
        default="default",
        choices=["default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"],
        help="torch.compile mode (with --compile)",
    )
    p.add_argument(
        "--dynamic",
        choices=["auto", "false"],
        default="auto",
        help="torch.compile dynamic= (auto: None, what train.compile uses; false: static shapes)",
    )
    p.add_argument(
        "--attention",
        choices=["auto", "fused", "explicit"],
        default="auto",
        help="attention kernel (cmae.models.vit.set_fused_attention); auto: what cmae pretrain "
        "picks for the device",
    )
    p.add_argument("--optimizer", choices=["fused", "foreach", "for-loop"], default="fused")
    p.add_argument(
        "--malloc",
        choices=["keep", "default"],
        default="keep",
        help="keep: cmae.runtime.device.keep_freed_memory() as cmae pretrain does; "
        "default: glibc's",
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--floor",
        action="store_true",
        help="also time each matmul / attention / conv call of one step alone (op_floor.py)",
    )
    p.add_argument("--one", nargs=3, metavar=("PRESET", "MODE", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:  # a single measurement, in this (child) process
        if args.malloc == "keep":
            keep_freed_memory()
        preset, method, batch = args.one
        print(json.dumps(bench(args, preset, method, int(batch))), flush=True)
        return
    for preset in args.preset or DEFAULT_PRESETS:
        modes = ["mae", "cmae"] if args.mode == "both" else [args.mode]
        if preset in SEG_PRESETS:
            modes = ["seg"]
        batch = args.batch or {**BENCH_PRESETS, **SEG_PRESETS}.get(preset, (8,))[0]
        recs = {}
        for method in modes:
            res = subprocess.run(
                child_args(args, preset, method, batch), stdout=subprocess.PIPE, text=True
            )
            if res.returncode:
                sys.exit(f"bench_step: {preset} {method} failed (exit {res.returncode})")
            line = res.stdout.strip().splitlines()[-1]
            recs[method] = json.loads(line)
            print(line, flush=True)
        if len(recs) == 2:
            mae, cmae = recs["mae"], recs["cmae"]
            summary = {
                "bench": "ratio",
                "preset": preset,
                "batch": batch,
                "cmae_over_mae_time": round(cmae["step_ms"] / mae["step_ms"], 3),
                "cmae_over_mae_flops": round(cmae["gflop_per_step"] / mae["gflop_per_step"], 3),
            }
            print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
