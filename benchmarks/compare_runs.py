"""Are two runs of a training command (``cmae pretrain``, ``finetune``, ``segment``, ...) the
same program's output? Bitwise, not approximately.

``python benchmarks/compare_runs.py RUN_A RUN_B`` compares the values of every log.jsonl record
(the losses and the evaluations' metrics: every key of ``VALUES`` a record holds, by step; a
resumed run's later record of a step replaces its earlier one) and every tensor of the final
checkpoint (model, optimizer state, RNG states: any tensor anywhere in the file): checkpoint.pt,
or where a command writes none (``cmae finetune``) the newest of checkpoints/. Prints one JSON
line and exits 1 on any difference. Times (img_per_s) and paths are not compared.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

# pretrain: the losses, kNN; finetune: epoch loss, accuracies; segment: losses, metrics
VALUES = (
    "loss",
    "loss_pixel",
    "loss_contrast",
    "loss_aux",
    "knn_top1",
    "top1",
    "top5",
    "mIoU",
    "mAcc",
    "aAcc",
)


def losses(run: Path) -> dict[tuple[int, str], tuple]:
    """(step, the record's value keys) -> the values, of every record with one of ``VALUES``."""
    out = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        keys = tuple(k for k in VALUES if k in rec)
        if keys:
            out[rec["step"], ",".join(keys)] = tuple(rec[k] for k in keys)
    return out


def final_checkpoint(run: Path) -> Path:
    """RUN/checkpoint.pt, else the periodic checkpoint of the highest step."""
    if (run / "checkpoint.pt").is_file():
        return run / "checkpoint.pt"
    periodic = (run / "checkpoints").glob("step-*.pt")
    return max(periodic, key=lambda p: int(p.stem.split("-")[1]))


def tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested checkpoint, by its path (``model/encoder.cls_token``)."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if not isinstance(obj, dict | list | tuple):
        return {}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    out = {}
    for k, v in items:
        out.update(tensors(v, f"{prefix}/{k}" if prefix else str(k)))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    args = p.parse_args()
    la, lb = losses(args.run_a), losses(args.run_b)
    loss_diff = sorted(s for s in la.keys() | lb.keys() if la.get(s) != lb.get(s))
    loss_diff = [f"{step}:{keys}" for step, keys in loss_diff]
    load = lambda run: torch.load(final_checkpoint(run), map_location="cpu", weights_only=True)
    ta, tb = tensors(load(args.run_a)), tensors(load(args.run_b))
    missing = sorted(ta.keys() ^ tb.keys())
    differ = sorted(
        k
        for k in ta.keys() & tb.keys()
        if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k])
    )
    same = not loss_diff and not missing and not differ
    result = {
        "same": same,
        "log_steps": len(la),
        "steps_differing": loss_diff[:10],
        "tensors": len(ta),
        "tensors_only_in_one": missing[:10],
        "tensors_differing": differ[:10],
    }
    print(json.dumps(result))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
