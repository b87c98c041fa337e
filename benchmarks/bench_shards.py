"""Reading CIFAR-10 from tar shards vs the image folder; one JSON line per measurement.

    python benchmarks/bench_shards.py [--data ~/.cache/cmae-data/cifar10/train] [--n 5000]

Images/s one data-loader worker delivers (in one process, one thread) for the ``tiny``
preset's CMAE views (decode -> master crop -> two 32 px views -> target colour ops), and the
peak resident memory of that process, for:

- ``folder``: ``ImageFiles`` + ``SeededSamples`` in a seeded random order (cmae's default path);
- ``cmae_shards``: ``cmae.data.shards.ShardStream`` over shards ``write_shards`` made of the
  same images (one stream: the first worker of rank 0);
- ``webdataset``: the webdataset library's ``WebDataset(urls).decode("pil")`` pipeline on the
  same shards, the same views (when webdataset is installed);
- ``litdata``: litdata's ``StreamingDataset`` over an ``optimize``d copy (when installed).

Each reader runs in its own subprocess (``--one NAME``), so the memory figures do not mix.
``--n`` images spread evenly over ``--data`` (all classes) are copied to a temporary folder
and sharded (1 MB shards) before timing; ``--rounds`` repeats the readers in turn (the
machine's load varies). ``baseline`` is the memory of the process with everything imported
and nothing read.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cmae.config import load_config
from cmae.data.datasets import ImageFiles, decode_bytes, list_images
from cmae.data.pipeline import build_views
from cmae.data.sampling import SeededSamples
from cmae.data.shards import ShardStream, open_shards, shard_pattern, write_shards


def views():
    return build_views(load_config("tiny"), workers_part=True)


def run_folder(root: Path, n: int) -> int:
    ds = SeededSamples(ImageFiles(root, views()), seed=0)
    order = np.random.default_rng(0).permutation(len(ds))[:n]
    for i in order:
        ds[(0, int(i))]
    return len(order)


def run_cmae_shards(pattern: str, n: int) -> int:
    stream = ShardStream(open_shards(pattern), views(), seed=0, batch_size=1, workers=1)
    count = 0
    for _ in stream:
        count += 1
    return count


def run_webdataset(pattern: str, n: int) -> int:
    import webdataset as wds  # noqa: PLC0415 - optional: measured only when installed

    transform = views()
    shards = open_shards(pattern)
    ds = wds.WebDataset(shards.urls, shardshuffle=False).decode("pil").to_tuple("png;jpg", "cls")
    count = 0
    for img, _ in ds:
        transform(img)
        count += 1
    return count


def run_litdata(root: Path, n: int) -> int:
    import litdata as ld  # noqa: PLC0415 - optional: measured only when installed

    transform = views()
    ds = ld.StreamingDataset(str(root))
    count = 0
    for item in ds:
        transform(decode_bytes(item["image"], "litdata"))
        count += 1
    return count


def _litdata_item(path: str) -> dict:
    return {"image": Path(path).read_bytes()}


def prepare(data: Path, n: int, tmp: Path) -> dict[str, str]:
    every = list_images(data)
    files = [every[i] for i in np.linspace(0, len(every) - 1, n).round().astype(int)]
    folder = tmp / "folder"
    for f in files:  # class folders kept, so the folder reader sees the same images
        dst = folder / f.relative_to(data)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst)
    written = write_shards(folder, tmp / "shards", 1 << 20, prefix="train")
    paths = {"folder": str(folder), "shards": shard_pattern(written)}
    try:
        import litdata as ld  # noqa: PLC0415 - optional

        ld.optimize(
            fn=_litdata_item,
            inputs=[str(f) for f in list_images(folder)],
            output_dir=str(tmp / "litdata"),
            chunk_bytes="1MB",
            num_workers=1,
        )
        paths["litdata"] = str(tmp / "litdata")
    except ImportError:
        pass
    return paths


def one(name: str, paths: dict[str, str], n: int) -> None:
    torch.set_num_threads(1)
    runner = {
        "baseline": lambda: 0,
        "folder": lambda: run_folder(Path(paths["folder"]), n),
        "cmae_shards": lambda: run_cmae_shards(paths["shards"], n),
        "webdataset": lambda: run_webdataset(paths["shards"], n),
        "litdata": lambda: run_litdata(Path(paths["litdata"]), n),
    }[name]
    start = time.perf_counter()
    count = runner()
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(
        json.dumps(
            {
                "bench": "shards",
                "reader": name,
                "images": count,
                "img_per_s_per_worker": round(count / wall, 1) if count else None,
                "peak_rss_mib": round(rss, 1),
            }
        ),
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(Path.home() / ".cache/cmae-data/cifar10/train"))
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--paths", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        one(args.one, json.loads(args.paths), args.n)
        return
    data = Path(args.data).expanduser()
    if not data.is_dir():
        sys.exit(f"bench_shards: {data} is not a directory (CIFAR-10 as class folders)")
    with tempfile.TemporaryDirectory(prefix="cmae-bench-shards-") as tmp:
        paths = prepare(data, args.n, Path(tmp))
        names = ["baseline", "folder", "cmae_shards"]
        try:
            import webdataset  # noqa: F401, PLC0415 - optional

            names.append("webdataset")
        except ImportError:
            pass
        if "litdata" in paths:
            names.append("litdata")
        for name in names * args.rounds:
            cmd = [sys.executable, __file__, "--one", name, "--n", str(args.n)]
            subprocess.run([*cmd, "--paths", json.dumps(paths)], check=True)


if __name__ == "__main__":
    main()
