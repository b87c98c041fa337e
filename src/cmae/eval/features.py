"""``cmae features``: a folder (or list file) of images -> one safetensors file of features.

The file holds ``features`` ([N, D] for the cls / mean pool, [N, L, D] for the patch tokens;
float32), ``labels`` ([N] int64: the class index of ``ImageFiles`` / ``ImageList``, -1 when
unlabelled) and ``names``: the images' names (path relative to the folder, or the list
file's entry) in row order, stored as one uint8 tensor of NUL-separated UTF-8 (a JSON list in
the metadata header would be capped by safetensors' 100 MB header limit, a few million
names). ``load_features`` reads all three back. The metadata says how they were made.

Large folders: rows are computed in chunks of ``save_every`` images, each written to
``OUT.partial/`` as it completes; a rerun of the same command (same weights, data, size and
pool: checked) continues after the last complete chunk. The final file appears at once
(written aside, then renamed) and the partial folder is removed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from cmae.data.datasets import DataError, loader_workers
from cmae.data.shards import refuse_streamed
from cmae.data.sources import open_images
from cmae.data.views import eval_transform
from cmae.interop.api import Encoder, load_encoder
from cmae.runtime.checkpoint import CheckpointError, _atomic_write
from cmae.runtime.device import resolve_device
from cmae.runtime.progress import Progress

FORMAT = "cmae.features"
SEP = b"\0"  # no file name or URL contains NUL


class Features(NamedTuple):
    features: Tensor  # [N, D] or [N, L, D]
    labels: Tensor  # [N]
    names: list[str]
    metadata: dict[str, str]


def encode_names(names: list[str]) -> Tensor:
    data = SEP.join(n.encode("utf-8") for n in names)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0)


def decode_names(t: Tensor) -> list[str]:
    return (
        [b.decode("utf-8") for b in bytes(t.to(torch.uint8).numpy()).split(SEP)] if len(t) else []
    )


def load_features(path: str | Path) -> Features:
    """The features, labels, names and metadata of a ``cmae features`` file."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cmae features file (format {meta.get('format')!r})")
    return Features(tensors["features"], tensors["labels"], decode_names(tensors["names"]), meta)


class _Tolerant(Dataset):
    """(image, label, ok): an unreadable image gives a blank one with ok=False; its row is
    left out of the file and its name reported, instead of ending a long run."""

    def __init__(self, base: Dataset, img_size: int) -> None:
        self.base, self.img_size = base, img_size

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Tensor, int, bool]:
        try:
            img, y = self.base[i]
            return img, y, True
        except DataError as e:
            print(f"cmae features: skipped: {e}", file=sys.stderr, flush=True)
            return torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8), -1, False


def run_key(source: str, names: list[str], img_size: int, pool: str, crop_pct: float) -> str:
    """What the rows depend on: the exact weights (path, size, mtime), the image list, the
    view and the pool. A partial folder with another key is not continued."""
    path = Path(source).expanduser()
    weights: list = [source]
    if path.exists():
        target = path / "checkpoint.pt" if (path / "checkpoint.pt").is_file() else path
        st = target.stat()
        weights = [str(target.resolve()), st.st_size, st.st_mtime_ns]
    digest = hashlib.sha256(SEP.join(n.encode() for n in names)).hexdigest()
    return json.dumps([weights, len(names), digest, img_size, pool, crop_pct])


def extract_to_file(
    encoder: Encoder,
    dataset: Dataset,
    names: list[str],
    out: Path,
    key: str,
    pool: str,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | None = None,
    save_every: int = 4096,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Features of every image of ``dataset`` into ``out`` (see the module docstring)."""
    device = device or torch.device("cpu")
    encoder = encoder.to(device).eval()
    n = len(dataset)
    partial = out.with_name(out.name + ".partial")
    done = _resume_point(partial, key, save_every, n)
    tolerant = _Tolerant(dataset, encoder.img_size)
    with Progress(n, f"cmae features: {out.name}", initial=done) as bar:
        for start in range(done, n, save_every):
            part = Subset(tolerant, range(start, min(n, start + save_every)))
            loader = DataLoader(part, batch_size=batch_size, num_workers=num_workers)
            feats, labels, ok = [], [], []
            with torch.no_grad():
                for imgs, y, good in loader:
                    feats.append(encoder(imgs.to(device), pool).float().cpu())
                    labels.append(torch.as_tensor(y))
                    ok.append(torch.as_tensor(good))
                    bar.update(len(y))
            chunk = {
                "features": torch.cat(feats).contiguous(),
                "labels": torch.cat(labels),
                "ok": torch.cat(ok).to(torch.uint8),
            }
            path = partial / f"chunk-{start:012d}.safetensors"
            _atomic_write(path, lambda tmp, c=chunk: save_file(c, tmp))
    return _assemble(partial, out, names, n, save_every, metadata or {})


def _resume_point(partial: Path, key: str, save_every: int, n: int) -> int:
    manifest = partial / "manifest.json"
    if partial.is_dir():
        try:
            same = json.loads(manifest.read_text()) == {"key": key, "save_every": save_every}
        except (OSError, json.JSONDecodeError):
            same = False
        if same:
            starts = range(0, n, save_every)
            done = 0
            for start in starts:
                if not (partial / f"chunk-{start:012d}.safetensors").is_file():
                    break
                done = min(n, start + save_every)
            if done:
                print(
                    f"cmae features: continuing after {done} of {n} images ({partial})",
                    file=sys.stderr,
                )
            return done
        print(
            f"cmae features: {partial} is from another checkpoint, data, size or pool: "
            "starting over",
            file=sys.stderr,
        )
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    manifest.write_text(json.dumps({"key": key, "save_every": save_every}))
    return 0


def _assemble(
    partial: Path, out: Path, names: list[str], n: int, save_every: int, meta: dict[str, str]
) -> Path:
    parts = [
        load_file(str(partial / f"chunk-{s:012d}.safetensors")) for s in range(0, n, save_every)
    ]
    ok = torch.cat([p["ok"] for p in parts]).bool()
    if not ok.any():
        raise DataError(f"none of the {n} images could be read")
    keep = ok.nonzero().flatten().tolist()
    tensors = {
        "features": torch.cat([p["features"] for p in parts])[ok].contiguous(),
        "labels": torch.cat([p["labels"] for p in parts])[ok].to(torch.int64),
        "names": encode_names([names[i] for i in keep]),
    }
    skipped = n - len(keep)
    meta = {**meta, "format": FORMAT, "count": str(len(keep)), "skipped": str(skipped)}
    _atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=meta))
    shutil.rmtree(partial)
    if skipped:
        print(f"cmae features: {skipped} unreadable images left out", file=sys.stderr)
    return out


def run(
    checkpoint: str,
    data: str,
    out: str,
    img_size: int | None = None,
    pool: str = "cls",
    crop_pct: float = 1.0,
    batch_size: int = 64,
    num_workers: int = 4,
    device: str = "auto",
    save_every: int = 4096,
) -> Path:
    """``cmae features``: load the encoder (``cmae.load_encoder``), list the images, extract."""
    if batch_size <= 0 or save_every <= 0:
        raise DataError("--batch-size and --save-every must be positive")
    if not 0 < crop_pct <= 1:
        raise DataError(f"--crop-pct: must be in (0, 1], got {crop_pct}")
    refuse_streamed(data, "feature extraction")  # before the encoder is loaded
    encoder = load_encoder(checkpoint, pool, img_size=img_size)
    dataset = open_images(data, eval_transform(encoder.img_size, crop_pct), "feature extraction")
    names = dataset.names
    out_path = Path(out)
    if out_path.suffix != ".safetensors":
        raise DataError(f"--out: expected a .safetensors file, got {out_path}")
    key = run_key(checkpoint, names, encoder.img_size, pool, crop_pct)
    meta = {
        "checkpoint": str(checkpoint),
        "data": str(data),
        "pool": pool,
        "img_size": str(encoder.img_size),
        "crop_pct": str(crop_pct),
        "mean": json.dumps(list(encoder.mean)),
        "std": json.dumps(list(encoder.std)),
        "classes": json.dumps(list(getattr(dataset, "classes", []))),
    }
    path = extract_to_file(
        encoder,
        dataset,
        names,
        out_path,
        key,
        pool,
        batch_size,
        loader_workers(num_workers),
        resolve_device(device),
        save_every,
        meta,
    )
    with safe_open(str(path), framework="pt") as f:
        shape = f.get_slice("features").get_shape()
    print(f"cmae features: wrote {path} ({' x '.join(map(str, shape))}, {pool} pool)")
    return path
