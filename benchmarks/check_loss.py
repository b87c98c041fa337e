"""Same maths before and after an optimisation: the losses of a few training steps on fixed inputs.

    python benchmarks/check_loss.py --save /tmp/before.json                 # one variant
    python benchmarks/check_loss.py --compile --against /tmp/before.json    # another, compared

Builds the ``ref_tiny`` bench configuration (batch 16 by default), seeds everything, and runs
``--steps`` steps of ``cmae.train.pretrain.train_one_step`` in MAE and CMAE mode; prints one JSON
line per mode with the per-step losses and a checksum of the trained parameters. With ``--against``
it also prints the largest relative difference to a saved run and exits 1 above ``--rtol``.
Run it with ``PYTHONPATH=<other checkout>/src`` to check code changes (it only uses APIs that
are older than them). Under ``--compile`` inductor is told to draw random numbers as eager
does (``fallback_random``), so both variants mask the same patches.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from cmae.config import load_config
from cmae.models.cmae import build_model
from cmae.models.vit import set_fused_attention
from cmae.runtime.optim import param_groups
from cmae.train.pretrain import train_one_step

sys.path.insert(0, str(Path(__file__).parent))
from bench_step import BENCH_PRESETS, MODE_MASK  # noqa: E402


def run(method: str, args: argparse.Namespace) -> dict:
    ratio, block = MODE_MASK[method]
    overrides = [*BENCH_PRESETS[args.preset][1], f"model.method={method}"]
    cfg = load_config(None, [*overrides, f"model.mask_ratio={ratio}", f"model.mask_block={block}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    set_fused_attention(model, args.attention == "fused")
    kwargs = (
        {"fused": True} if args.optimizer == "fused" else {"foreach": args.optimizer == "foreach"}
    )
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95), **kwargs)
    wrapped = torch.compile(model) if args.compile else model
    s, g = cfg.model.img_size, torch.Generator().manual_seed(1)
    losses = []
    for _ in range(args.steps):
        views = [torch.randn(args.batch, 3, s, s, generator=g) for _ in range(2)]
        views = views[:1] if method == "mae" else views
        out = train_one_step(model, opt, views, lr=1e-3, momentum=0.99, wrapped=wrapped)
        losses.append([out.loss.item(), out.loss_pixel.item(), out.loss_contrast.item()])
    checksum = sum(p.double().abs().sum().item() for p in model.parameters())
    return {"mode": method, "losses": losses, "param_abs_sum": checksum}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=list(BENCH_PRESETS), default="ref_tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--optimizer", choices=["fused", "foreach", "for-loop"], default="fused")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--attention", choices=["fused", "explicit"], default="fused")
    p.add_argument("--save", type=Path)
    p.add_argument("--against", type=Path)
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True  # eager's random stream: the same masks
    results = [run(method, args) for method in ("mae", "cmae")]
    for r in results:
        print(json.dumps(r), flush=True)
    if args.save:
        args.save.write_text(json.dumps(results))
    if args.against:
        ref = json.loads(args.against.read_text())
        per_step = [0.0] * args.steps  # largest relative difference of the 3 losses, per step
        params = 0.0
        for a, b in zip(results, ref, strict=True):
            for i, (la, lb) in enumerate(zip(a["losses"], b["losses"], strict=True)):
                diffs = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(la, lb, strict=True)]
                per_step[i] = max(per_step[i], *diffs)
            params = max(params, abs(a["param_abs_sum"] / b["param_abs_sum"] - 1))
        worst = max(per_step)
        rec = {"check": "same_loss", "max_rel_diff_per_step": per_step, "params_rel_diff": params}
        print(json.dumps({**rec, "rtol": args.rtol}))
        if worst > args.rtol:
            sys.exit(1)


if __name__ == "__main__":
    main()
