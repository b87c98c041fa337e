"""The issue-17 validation split of CIFAR-10 (JPEG) train, as symlinks (no copies).

    python benchmarks/evidence/split.py ~/.cache/cmae-data/cifar10 /work/data/cifar_tv [--val 500]
    python benchmarks/evidence/split.py CROPS CROPS_TV --val-frac 0.2   (camvid_crops.py output)

Per class, the train images sorted by file name: the first ones go to OUT/train/<class>/, the
last ``--val`` (or the last ``--val-frac`` of them) to OUT/val/<class>/ (4,500 / 500 for
CIFAR-10). Pretraining on OUT reads train/; the kNN monitor queries val/; evaluate.py chooses
the linear probe's learning rate on it. The source's held-out split is not touched. camvid_crops.py
numbers its crops in the order of their source images, so val/ holds the crops of the last
images (one image may straddle the cut).
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
    p.add_argument("--val-frac", type=float, help="instead of --val: this fraction per class")
    args = p.parse_args()
    train = args.cifar.expanduser() / "train"
    classes = sorted(d for d in train.iterdir() if d.is_dir()) if train.is_dir() else []
    if not classes:
        sys.exit(f"split: no class folders in {train}")
    for cls in classes:
        files = sorted(f for f in cls.iterdir() if f.is_file())
        n_val = round(len(files) * args.val_frac) if args.val_frac else args.val
        if not 0 < n_val < len(files):
            sys.exit(f"split: {cls} has {len(files)} images, cannot hold out {n_val}")
        for part, chunk in (("train", files[:-n_val]), ("val", files[-n_val:])):
            d = args.out / part / cls.name
            d.mkdir(parents=True, exist_ok=True)
            for f in chunk:
                link = d / f.name
                if not link.exists():
                    link.symlink_to(f.resolve())
    held = f"{args.val_frac:.0%} of" if args.val_frac else f"{args.val}"
    print(f"{args.out}: {len(classes)} classes, {held} images per class in val/")


if __name__ == "__main__":
    main()
