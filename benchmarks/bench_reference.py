"""cmae's training step next to the official CMAE code's, timed in alternating rounds.

    python benchmarks/bench_reference.py --repo PATH/TO/ZhichengHuang-CMAE \
        --ref-python PATH/TO/venv-with-mmengine/bin/python [--preset ref_tiny] [--mode both] \
        [--rounds 3] [--threads 2] [--steps 8] [--compile]

Each round runs, one after the other, the official step (``reference_step.py`` under
``--ref-python``: its model from its registry, ``train_step`` + momentum update) and cmae's
(``bench_step.py``: ``cmae.train.pretrain.train_one_step``), each in a fresh process on the same
preset, batch, threads and random inputs, and prints their JSON lines. The order alternates
between rounds (official first in odd rounds), so a drift of the machine's speed hits both sides.
A last line per (preset, mode) gives the per-round ratios cmae / official img/s, their median
and spread: the only speed comparison with the official code that counts (never divide by a
figure from another run). The official code is never imported here; both packages are named
``cmae``, so the two sides cannot share a process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_json(cmd: list[str], what: str) -> dict:
    res = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode or not lines:
        err = (res.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"bench_reference: {what} failed (exit {res.returncode}): {err}")
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", required=True, help="checkout of the official CMAE code")
    p.add_argument("--ref-python", required=True, help="interpreter with mmengine + mmcv-lite")
    p.add_argument("--preset", action="append", choices=["ref_tiny", "ref_vit_b16"])
    p.add_argument("--mode", choices=["cmae", "mae", "both"], default="both")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, help="default: the preset's")
    p.add_argument("--compile", action="store_true", help="cmae side with train.compile")
    p.add_argument(
        "--floor",
        action="store_true",
        help="both sides also time their dense ops alone (op_floor.py); the summary adds the "
        "ratio a cmae step at its floor would reach",
    )
    args = p.parse_args()
    common = ["--threads", str(args.threads), "--steps", str(args.steps)]
    common += ["--floor"] if args.floor else []
    common += ["--warmup", str(args.warmup)]
    if args.batch:
        common += ["--batch", str(args.batch)]
    modes = ["mae", "cmae"] if args.mode == "both" else [args.mode]
    for preset in args.preset or ["ref_tiny"]:
        for mode in modes:
            ours_cmd = [sys.executable, str(HERE / "bench_step.py"), "--preset", preset]
            ours_cmd += ["--mode", mode, *common] + (["--compile"] if args.compile else [])
            ref_cmd = [args.ref_python, str(HERE / "reference_step.py"), "--repo", args.repo]
            ref_cmd += ["--preset", preset, "--mode", mode, *common]
            ratios, ceilings = [], []
            for r in range(args.rounds):
                sides = [("official", ref_cmd), ("cmae", ours_cmd)]
                if r % 2:
                    sides.reverse()
                got = {}
                for name, cmd in sides:
                    rec = run_json(cmd, f"{name} {preset} {mode}")
                    rec.update(impl=name, round=r + 1)
                    print(json.dumps(rec), flush=True)
                    got[name] = rec
                ratios.append(got["cmae"]["img_per_s"] / got["official"]["img_per_s"])
                if args.floor:  # the official step's time over cmae's dense-op floor
                    ceilings.append(got["official"]["step_s"] * 1e3 / got["cmae"]["dense_floor_ms"])
            extra = {}
            if ceilings:
                extra["ceiling_ratios"] = [round(x, 3) for x in ceilings]
                extra["ceiling_median"] = round(statistics.median(ceilings), 3)
            print(
                json.dumps(
                    {
                        "bench": "reference_ratio",
                        "preset": preset,
                        "mode": mode,
                        "compile": args.compile,
                        "threads": args.threads,
                        "ratios": [round(x, 3) for x in ratios],
                        "median": round(statistics.median(ratios), 3),
                        "min": round(min(ratios), 3),
                        "max": round(max(ratios), 3),
                        **extra,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
