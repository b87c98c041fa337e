"""A held-out classification set built from CamVid: labelled crops of road scenes.

    python benchmarks/camvid_crops.py ~/.cache/cmae-data/camvid /work/data/camvid_crops \
        [--size 32] [--per-image 150] [--min-share 0.6] [--seed 0]

For the transfer linear probe of docs/RESULTS.md (issue 17): encoders pretrained on CIFAR-10
are probed on images of another source. From every CamVid image (ADE20K layout: images/ and
annotations/ with training/ and validation/) it draws ``--per-image`` square crops of random
side (1/6 to 1/3 of the image height) and position; a crop is kept when one class covers at
least ``--min-share`` of its labelled pixels (void ignored, and at most 10 % void), is labelled
with that class, and is resized to ``--size`` (bicubic, antialiased). Crops of the training
images form train/, those of the validation images val/ (CamVid's own split, so no image
contributes to both). Classes with fewer than ``--min-count`` crops in train/ (a quarter of it
in val/) are dropped, and each class is capped at ``--cap`` crops in train/ and ``--val-cap``
in val/ (the first ones drawn), so a few large classes (road, building, sky) do not swamp the
rest. Output: an ImageFolder tree of PNGs plus
counts.json. Deterministic for a given seed. The images stay outside the repository: they are
CamVid's (research and personal use only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def crops_of(
    img: Image.Image,
    ann: np.ndarray,
    rng: np.random.Generator,
    n: int,
    min_share: float,
    size: int,
) -> list[tuple[int, Image.Image]]:
    h, w = ann.shape
    out = []
    for _ in range(n):
        side = int(rng.integers(h // 6, h // 3 + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        patch = ann[y : y + side, x : x + side]
        labelled = patch[patch > 0]
        if labelled.size < 0.9 * patch.size:
            continue
        counts = np.bincount(labelled, minlength=256)
        cls = int(counts.argmax())
        if counts[cls] < min_share * labelled.size:
            continue
        crop = img.crop((x, y, x + side, y + side)).resize(
            (size, size), Image.Resampling.BICUBIC, reducing_gap=None
        )
        out.append((cls, crop))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("camvid", type=Path, help="CamVid in ADE20K layout (images/, annotations/)")
    p.add_argument("out", type=Path)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--per-image", type=int, default=150)
    p.add_argument("--min-share", type=float, default=0.6)
    p.add_argument("--min-count", type=int, default=100)
    p.add_argument("--cap", type=int, default=1500, help="most crops per class in train/")
    p.add_argument("--val-cap", type=int, default=400, help="most crops per class in val/")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    root = args.camvid.expanduser()
    names_file = root / "classes.txt"
    if not names_file.is_file():
        sys.exit(f"camvid_crops: {names_file} not found (expected CamVid in ADE20K layout)")
    names = names_file.read_text().split()
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"camvid_crops: {args.out} exists and is not empty")
    rng = np.random.default_rng(args.seed)
    kept: dict[str, dict[int, list[Image.Image]]] = {}
    for split, sub in (("train", "training"), ("val", "validation")):
        per_class: dict[int, list[Image.Image]] = {}
        for img_path in sorted((root / "images" / sub).glob("*.jpg")):
            ann_path = root / "annotations" / sub / (img_path.stem + ".png")
            ann = np.asarray(Image.open(ann_path))
            img = Image.open(img_path).convert("RGB")
            for cls, crop in crops_of(img, ann, rng, args.per_image, args.min_share, args.size):
                per_class.setdefault(cls, []).append(crop)
        kept[split] = per_class
    classes = [
        c
        for c in sorted(kept["train"])
        if len(kept["train"][c]) >= args.min_count
        and len(kept["val"].get(c, [])) >= args.min_count // 4
    ]
    counts = {}
    for split, per_class in kept.items():
        counts[split] = {}
        for c in classes:
            imgs = per_class[c][: args.cap if split == "train" else args.val_cap]
            d = args.out / split / names[c - 1]
            d.mkdir(parents=True, exist_ok=True)
            for i, im in enumerate(imgs):
                im.save(d / f"{i:05d}.png")
            counts[split][names[c - 1]] = len(imgs)
    (args.out / "counts.json").write_text(json.dumps(counts, indent=1) + "\n")
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
