"""The issue-17 validation split of CIFAR-10 (JPEG) train, as symlinks (no copies).

    python benchmarks/evidence/split.py ~/.cache/cmae-data/cifar10 /work/data/cifar_tv [--val 500]

Per class, the train images sorted by file name: the first ones go to OUT/train/<class>/, the
last ``--val`` to OUT/val/<class>/ (4,500 / 500 for CIFAR-10). Pretraining on OUT reads
train/; the kNN monitor queries val/. The test split is not touched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("cifar", type=Path, help="CIFAR-10 (JPEG) root with train/<class>/")
    p.add_argument("out", type=Path)
    p.add_argument("--val", type=int, default=500, help="validation images per class")
    args = p.parse_args()
    train = args.cifar.expanduser() / "train"
    classes = sorted(d for d in train.iterdir() if d.is_dir()) if train.is_dir() else []
    if not classes:
        sys.exit(f"split: no class folders in {train}")
    for cls in classes:
        files = sorted(f for f in cls.iterdir() if f.is_file())
        if len(files) <= args.val:
            sys.exit(f"split: {cls} has {len(files)} images, not more than --val {args.val}")
        for part, chunk in (("train", files[: -args.val]), ("val", files[-args.val :])):
            d = args.out / part / cls.name
            d.mkdir(parents=True, exist_ok=True)
            for f in chunk:
                link = d / f.name
                if not link.exists():
                    link.symlink_to(f.resolve())
    print(f"{args.out}: {len(classes)} classes, {args.val} val images per class")


if __name__ == "__main__":
    main()
