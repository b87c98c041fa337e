"""The issue-17 data splits of CIFAR-10 (JPEG), as symlinks (no copies).

    python benchmarks/evidence/split.py ~/.cache/cmae-data/cifar10 SPLIT_DIR [--val 500]
    python benchmarks/evidence/split.py ~/.cache/cmae-data/cifar10 FT_DIR --finetune 500

Validation split (default): per class, the train images sorted by file name: the first ones go
to OUT/train/<class>/, the last ``--val`` to OUT/val/<class>/ (4,500 / 500 for CIFAR-10).
Pretraining on OUT reads train/; the kNN monitor queries val/. The test split is not touched.

Fine-tuning set (``--finetune N``): the first N train images per class (inside the validation
split's train part) in OUT/train/<class>/, and the whole test split in OUT/val/<class>/, for
the study's fine-tuning protocol (a fixed recipe, scored once on test: nothing is chosen on it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def link_all(files: list[Path], d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for f in files:
        link = d / f.name
        if not link.exists():
            link.symlink_to(f.resolve())


def class_files(split: Path) -> dict[str, list[Path]]:
    classes = sorted(d for d in split.iterdir() if d.is_dir()) if split.is_dir() else []
    if not classes:
        sys.exit(f"split: no class folders in {split}")
    return {c.name: sorted(f for f in c.iterdir() if f.is_file()) for c in classes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("cifar", type=Path, help="CIFAR-10 (JPEG) root with train/<class>/")
    p.add_argument("out", type=Path)
    p.add_argument("--val", type=int, default=500, help="validation images per class")
    p.add_argument("--finetune", type=int, help="build the fine-tuning set: N train per class")
    args = p.parse_args()
    root = args.cifar.expanduser()
    train = class_files(root / "train")
    if args.finetune is not None:
        test = class_files(root / "test")
        if sorted(test) != sorted(train):
            sys.exit(f"split: the class folders of {root}/test differ from train's")
        for cls, files in train.items():
            if len(files) - args.val < args.finetune:
                sys.exit(f"split: {cls}: fewer than {args.finetune} images outside --val")
            link_all(files[: args.finetune], args.out / "train" / cls)
            link_all(test[cls], args.out / "val" / cls)
        n_test = sum(map(len, test.values()))
        print(f"{args.out}: {len(train)} classes, {args.finetune} train per class, {n_test} test")
        return
    for cls, files in train.items():
        if len(files) <= args.val:
            sys.exit(f"split: {cls} has {len(files)} images, not more than --val {args.val}")
        link_all(files[: -args.val], args.out / "train" / cls)
        link_all(files[-args.val :], args.out / "val" / cls)
    print(f"{args.out}: {len(train)} classes, {args.val} val images per class")


if __name__ == "__main__":
    main()
