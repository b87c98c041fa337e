"""The CMAE input pipeline's throughput on ImageNet-like JPEGs; one JSON line per measurement.

    python benchmarks/bench_data.py                         # 224 px, 1 process, then loaders
    python benchmarks/bench_data.py --workers 1 2 4 --batch 64

JPEGs of ``--image-size`` (default 500x375, ImageNet's typical size and file size, ~100 KB at
quality 90) are generated into a temporary directory at run time and deleted afterwards. The
pipelines are cmae.train.pretrain's own (``build_views`` on the ``vit_base`` preset: decode ->
RandomResizedCrop to the 256 px master -> flip -> two 224 px windows -> colour jitter /
grayscale / blur on the target -> uint8 tensors), timed

- ``per_worker``: in this process with one thread, i.e. images/s one data-loader worker
  delivers: the full CMAE pipeline (``cmae_cpu_color``), the same without the colour ops
  (``cmae_device_color``: what the workers do under ``data.target_aug_device=true``), MAE's
  single view, and decoding alone (``decode_only``: PIL; ``decode_tensor``: the uint8 tensor
  the 224 px views get, ``cmae.data.load_image``);
- ``device_color``: the batched target colour ops (``DeviceTargetColor``) on ``--device``;
- ``per_worker`` ``cmae_resize_device`` and ``device_views``: ``data.resize_device``, the
  workers' part (decode + crop box) and the device's (resize, flip, windows: ``DeviceViews``);
- ``loader``: a DataLoader as ``cmae pretrain`` builds it, at each ``--workers`` count.

``--decode pil`` decodes every image with PIL as cmae did before the tensor decode (the
"before" of docs/PERFORMANCE.md in the same tree).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cmae.config import load_config
from cmae.data import datasets as cmae_data
from cmae.data.datasets import ImageFiles, load_image, load_rgb
from cmae.data.pipeline import build_device_color, build_device_views, build_views
from cmae.data.sampling import SeededSamples
from cmae.data.views import collate_boxes


def write_jpegs(root: Path, n: int, size: tuple[int, int], quality: int) -> float:
    """n photo-like JPEGs (smooth colour fields, edges, texture noise); returns the mean KB."""
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    total = 0
    for i in range(n):
        img = np.zeros((h, w, 3), np.float32)
        for _ in range(6):  # overlapping soft blobs of colour
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(40, 200)
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
            img += blob * rng.uniform(0, 255, 3)
        img = img / max(float(img.max()), 1.0) * 220
        img += rng.normal(0, 14, (h, w, 1)) + rng.normal(0, 6, (h, w, 3))  # texture, chroma
        path = root / f"img_{i:04d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=quality)
        total += path.stat().st_size
    return total / n / 1024


def per_image_rate(fn, files: list[Path], seconds: float) -> float:
    """Images/s of ``fn(path)`` in this thread, cycling over ``files`` for ~``seconds``."""
    for f in files[:4]:
        fn(f)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(files[done % len(files)])
        done += 1
    return done / (time.perf_counter() - t0)


def batch_rate(op, batch: int, seconds: float, device: torch.device) -> float:
    """Images/s of ``op()`` on a batch of ``batch``, for ~``seconds`` after one warm-up."""
    op()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or reps < 2:
        op()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        reps += 1
    return reps * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="vit_base", help="config preset (img_size, shift, ops)")
    p.add_argument("--images", type=int, default=128, help="distinct JPEGs generated")
    p.add_argument("--image-size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--seconds", type=float, default=8.0, help="per single-process measurement")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=12, help="timed loader batches")
    p.add_argument("--device", default="cpu", help="for the batched colour ops")
    p.add_argument("--decode", choices=["auto", "pil"], default="auto", help="pil: PIL only")
    args = p.parse_args()
    if args.decode == "pil":
        cmae_data.decode_jpeg = None  # load_image falls back to PIL + conversion
    device = torch.device(args.device)
    threads = torch.get_num_threads()

    with tempfile.TemporaryDirectory(prefix="cmae_bench_data_") as tmp:
        root = Path(tmp)
        kb = write_jpegs(root, args.images, tuple(args.image_size), args.quality)
        files = sorted(root.glob("*.jpg"))
        cfgs = {
            "cmae_cpu_color": load_config(args.preset, ["model.method=cmae"]),
            "cmae_device_color": load_config(
                args.preset, ["model.method=cmae", "data.target_aug_device=true"]
            ),
            "cmae_resize_device": load_config(
                args.preset,
                ["model.method=cmae", "data.target_aug_device=true", "data.resize_device=true"],
            ),
            "mae": load_config(args.preset, ["model.method=mae"]),
        }
        s = cfgs["mae"].model.img_size
        common = {
            "decode": args.decode,
            "img_size": s,
            "jpeg": f"{args.image_size[0]}x{args.image_size[1]}",
            "jpeg_kb": round(kb, 1),
        }

        torch.set_num_threads(1)  # as in a data-loader worker
        decoders = {
            "decode_only": load_rgb,
            "decode_tensor": lambda f: load_image(f, as_tensor=True),
        }
        for name, decode in decoders.items():
            rate = per_image_rate(decode, files, args.seconds)
            rec = {"bench": "per_worker", "pipeline": name, **common}
            print(json.dumps({**rec, "img_per_s": round(rate, 1)}), flush=True)
        for name, cfg in cfgs.items():
            views = build_views(cfg, workers_part=True)

            def pipeline(f, v=views, pack=cfg.data.resize_device):  # as ImageFiles.__getitem__
                out = v(load_image(f, v.takes_tensor))
                return collate_boxes([(out,)]) if pack else out  # + the box's one copy

            rate = per_image_rate(pipeline, files, args.seconds)
            rec = {"bench": "per_worker", "pipeline": name, **common, "img_per_s": round(rate, 1)}
            print(json.dumps(rec), flush=True)

        torch.set_num_threads(threads)
        # the training device's share: colour ops on uint8 views; resize + windows of boxes
        color = build_device_color(cfgs["cmae_device_color"])
        x = torch.randint(0, 256, (args.batch, 3, s, s), dtype=torch.uint8).to(device)
        boxes_of = build_views(cfgs["cmae_resize_device"], workers_part=True)
        batch = [(boxes_of(load_image(files[i % len(files)], True)),) for i in range(args.batch)]
        packed = collate_boxes(batch)[0]  # (buffer, sizes, params), as the loader delivers it
        if device.type == "cuda":
            packed = (packed[0].pin_memory(), *packed[1:])
        finish = build_device_views(cfgs["cmae_resize_device"])
        device_ops = {
            "device_color": lambda: color(x),
            "device_views": lambda: finish(*packed, device),
        }
        for name, op in device_ops.items():
            rate = batch_rate(op, args.batch, args.seconds, device)
            rec = {"bench": name, "device": str(device), "batch": args.batch, **common}
            rec |= {"threads": threads, "img_per_s": round(rate, 1)}
            print(json.dumps(rec), flush=True)

        for name in ("cmae_cpu_color", "cmae_device_color", "cmae_resize_device"):
            cfg = cfgs[name]
            views = build_views(cfg, workers_part=True)
            samples = SeededSamples(ImageFiles(root, views), seed=0)
            for workers in args.workers:
                loader = DataLoader(
                    samples,
                    batch_size=args.batch,
                    shuffle=True,
                    drop_last=True,
                    num_workers=workers,
                    pin_memory=device.type == "cuda",
                    persistent_workers=workers > 0,
                    collate_fn=collate_boxes if cfg.data.resize_device else None,
                )
                n_batches, t0 = 0, None
                while n_batches < args.batches:
                    for _ in loader:
                        if t0 is None:  # from the first batch on: workers started and busy
                            t0 = time.perf_counter()
                            continue
                        n_batches += 1
                        if n_batches == args.batches:
                            break
                rate = n_batches * args.batch / (time.perf_counter() - t0)
                rec = {"bench": "loader", "pipeline": name, "workers": workers, **common}
                rec |= {"batch": args.batch, "img_per_s": round(rate, 1)}
                rec["img_per_s_per_worker"] = round(rate / workers, 1)
                print(json.dumps(rec), flush=True)
                del loader


if __name__ == "__main__":
    main()
