"""Issue-17 final evaluation: every finished study run (and random init) on held-out data.

    python benchmarks/evidence/evaluate.py --runs RUNS/study --out RUNS/eval \\
        --cifar ~/.cache/cmae-data/cifar10 --crops CROPS [--finetune FT] [--py PYTHON] \\
        [--only cmae_e1_s1 ...]

For each encoder (a study run's encoder.safetensors, or ``random`` with seeds 0 and 1):

- kNN (k=20, T=0.07, fixed): bank = CIFAR-10 train (50,000), queries = CIFAR-10 test;
- linear probe (fast mode, ``lr_from=train``): the learning rate is the best of 7 on a 10 %
  stratified hold-out of CIFAR-10 train; that one lr is retrained on all of train and scored
  once on test, so the test split picks nothing. Same features as the kNN (one extraction);
- the same probe on the CamVid crops (``--crops``: train / val from CamVid's own splits);
- with ``--finetune FT`` (``split.py --finetune 500``: 5,000 train images, the 10,000 test
  images), the encoders of the longest runs (``--finetune-epochs``, default the longest
  finished length) and random init (the first random seed) are fine-tuned with one fixed
  recipe (``FINETUNE_ARGS``: the `cmae finetune` defaults, 10 epochs of batch 128, one warmup
  epoch) and scored after the last epoch: nothing is chosen on the test split.

Each command is skipped when its results.json exists (idempotent, resumable). Prints one JSON
line per encoder and a markdown table (mean and standard error over seeds) at the end; a run's
time there is its training time from log.jsonl (``cmae.viz.plot.training_seconds``: every
segment of a resumed run, the kNN monitor and start-up left out).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from cmae.viz.plot import training_seconds

PROBE_ARGS: list[str] = []  # --probe-args: extra `cmae linprobe` overrides
FINETUNE_ARGS = [  # the recipe's defaults otherwise (AdamW, layer decay, RandAugment, mixup...)
    "epochs=10", "warmup_epochs=1", "batch_size=128", "eval_every=5", "data.num_workers=1",
]  # fmt: skip
RUN_NAME = re.compile(r"(?P<method>cmae|mae)_e(?P<epochs>\d+)_s(?P<seed>\d+)$")


def cmae(py: str, args: list[str], out: Path) -> dict:
    """``cmae ARGS --out OUT`` unless OUT/results.json exists; its metrics."""
    results = out / "results.json"
    if not results.is_file():
        cmd = [py, "-m", "cmae", *args, "--out", str(out)]
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
        if subprocess.run(cmd).returncode:
            sys.exit(f"evaluate: failed: {' '.join(cmd)}")
    return json.loads(results.read_text())


def probe(py: str, encoder: list[str], data: Path, out: Path, cache: Path) -> dict:
    """The lr chosen on a hold-out of train, then scored once on data's held-out split."""
    args = ["linprobe", *encoder, "--data", str(data), f"cache_dir={cache}", "lr_from=train"]
    return cmae(py, [*args, *PROBE_ARGS], out)


def evaluate(args: argparse.Namespace, name: str, encoder: list[str]) -> dict:
    out, cache = args.out / name, args.out / "features"
    knn = cmae(
        args.py,
        ["knn", *encoder, "--data", str(args.cifar), f"cache_dir={cache}"],
        out / "knn",
    )
    lp = probe(args.py, encoder, args.cifar, out / "lp_cifar", cache)
    cv = probe(args.py, encoder, args.crops, out / "lp_crops", cache)
    return {"name": name, "knn": knn["top1"], "linear": lp["top1"], "linear_blr": lp["best_blr"],
            "crops": cv["top1"], "crops_blr": cv["best_blr"]}  # fmt: skip


def finetune(args: argparse.Namespace, name: str, encoder: list[str]) -> dict:
    """The fine-tuning protocol's last-epoch top-1 on the test split."""
    ft = cmae(args.py, ["finetune", *encoder, "--data", str(args.finetune), *FINETUNE_ARGS],
              args.out / name / "finetune")  # fmt: skip
    return {"finetune": ft["top1"]}


def mean_se(values: list[float]) -> str:
    m = sum(values) / len(values)
    if len(values) < 2:
        return f"{m:.2f}"
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return f"{m:.2f} ± {sd / math.sqrt(len(values)):.2f}"


def table(rows: list[dict], walls: dict[str, float]) -> str:
    groups = defaultdict(list)
    for r in rows:
        m = RUN_NAME.match(r["name"])
        key = (m["method"].upper(), int(m["epochs"])) if m else ("random init", 0)
        groups[key].append(r)
    lines = [
        "| encoder | epochs | seeds | kNN top-1 | linear top-1 | CamVid-crops linear | "
        "fine-tune top-1 | training time (min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (method, epochs), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        wall = [walls[r["name"]] / 60 for r in rs if r["name"] in walls]
        ft = [r["finetune"] for r in rs if "finetune" in r]
        lines.append(
            f"| {method} | {epochs or '-'} | {len(rs)} | {mean_se([r['knn'] for r in rs])} | "
            f"{mean_se([r['linear'] for r in rs])} | {mean_se([r['crops'] for r in rs])} | "
            f"{f'{mean_se(ft)} ({len(ft)})' if ft else '-'} | {mean_se(wall) if wall else '-'} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=Path, required=True, help="the study's run directories")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cifar", type=Path, required=True, help="CIFAR-10 root with train/, test/")
    p.add_argument("--crops", type=Path, required=True, help="camvid_crops.py's output")
    p.add_argument("--py", default=sys.executable)
    p.add_argument("--only", nargs="*", help="run names to evaluate (default: all finished)")
    p.add_argument("--random-seeds", type=int, nargs="*", default=[0, 1])
    p.add_argument("--probe-args", nargs="*", default=[], help="e.g. batch_size=256")
    p.add_argument("--finetune", type=Path, help="split.py --finetune's output: fine-tune too")
    p.add_argument("--finetune-epochs", type=int, help="the runs of this length (default: longest)")
    args = p.parse_args()
    PROBE_ARGS.extend(args.probe_args)
    for a in ("cifar", "crops", "finetune"):
        if getattr(args, a) is not None:
            setattr(args, a, getattr(args, a).expanduser())

    runs = sorted(d for d in args.runs.iterdir() if (d / "summary.json").is_file())
    runs = [d for d in runs if RUN_NAME.match(d.name) and (not args.only or d.name in args.only)]
    longest = max((int(RUN_NAME.match(d.name)["epochs"]) for d in runs), default=0)
    ft_epochs = args.finetune_epochs or longest
    rows, walls = [], {}
    for i, seed in enumerate(args.random_seeds):
        enc = ["--checkpoint", "random", "encoder.preset=tiny", f"seed={seed}"]
        rows.append(evaluate(args, f"random_s{seed}", enc))
        if args.finetune and i == 0:
            rows[-1].update(finetune(args, f"random_s{seed}", enc))
        print(json.dumps(rows[-1]), flush=True)
    for d in runs:
        walls[d.name] = training_seconds(d)  # all segments of a resumed run, monitor left out
        enc = ["--checkpoint", str(d / "encoder.safetensors")]
        rows.append(evaluate(args, d.name, enc))
        if args.finetune and int(RUN_NAME.match(d.name)["epochs"]) == ft_epochs:
            rows[-1].update(finetune(args, d.name, enc))
        print(json.dumps({**rows[-1], "training_s": round(walls[d.name], 1)}), flush=True)
    print(table(rows, walls))


if __name__ == "__main__":
    main()
