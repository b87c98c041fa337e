"""Streaming shards: WebDataset-format tar files, read in order, one shard after another.

A shard is a plain tar whose members are grouped into samples by key (the member name up to
its first dot): ``000123.jpg`` (or .png, .webp, ...) and optionally ``000123.cls`` (the class
index as text), the layout WebDataset, timm and OpenCLIP read. ``--data`` names them with a
brace pattern, ``DIR/train-{000000..000127}.tar``, or streams them from a command:
``pipe:aws s3 cp s3://bucket/train-{000000..000127}.tar -`` (each shard's command's standard
output is read). ``cmae shards SRC OUT`` writes them from a folder (``write_shards``), with an
``index.json`` of the per-shard sample counts beside them.

Pretraining (``ShardStream``) under DDP and data-loader workers:
- every epoch the shard list is shuffled (seed, epoch); rank r's worker w of W reads shards
  ``perm[r * W + w :: world * W]``: distinct shards for every rank and worker;
- each of those streams gives exactly ``m * B`` samples (B the per-rank batch, m the smallest
  number of whole batches any stream holds), so all ranks take the same ``W * m`` steps; the
  samples beyond that in a richer stream are left out of this epoch (a new shuffle next epoch
  deals other ones out); with shards of equal size nothing is left out;
- a resume at step s of the epoch skips, in each stream, the batches it had given in the first
  s steps (the loader takes batches from the workers in turn), without decoding them, and
  rotates the workers so the next batch comes from the stream that was next: the sample order
  after a resume is that of an uninterrupted run (with the same number of workers);
- each sample's views are seeded by (seed, epoch, shard, position in the shard);
- an undecodable image, or the samples a corrupt or truncated shard fails to give (its index
  count says how many), are replaced by the stream's last good sample (the next one at a
  stream's start) and flagged bad, so ``data.max_bad_fraction`` applies as to a bad file.
Within a shard the order is the written one (``cmae shards`` writes a seeded shuffle of the
folder); the order of the shards changes every epoch.

The evaluation commands: kNN and the fast linear probe stream the shards once
(``ShardImages``); fine-tuning, the full linear probe and ``cmae features`` index their items,
so they read local shards with random access (``ShardFiles``) and refuse ``pipe:`` ones.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from cmae.data.datasets import (
    IMAGE_EXTENSIONS,
    DataError,
    decode_bytes,
    list_images,
)

INDEX_NAME = "index.json"
IMAGE_KEYS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar, a-001.tar, a-002.tar`` (zero padding kept; several
    ranges multiply out)."""
    m = _BRACES.search(pattern)
    if m is None:
        return [pattern]
    lo, hi = int(m.group(1)), int(m.group(2))
    if hi < lo:
        raise DataError(f"shard pattern {pattern!r}: empty range {m.group(0)}")
    width = len(m.group(1))
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [s for i in range(lo, hi + 1) for s in expand(f"{head}{i:0{width}d}{tail}")]


@dataclass
class ShardSet:
    urls: list[str]  # local paths or pipe: commands, one per shard
    counts: list[int]  # samples per shard
    classes: list[str]

    @property
    def total(self) -> int:
        return sum(self.counts)


def open_shard(url: str) -> tuple[Any, subprocess.Popen | None]:
    """A binary stream of the shard and the process behind it (pipe:), to close after."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)
        return proc.stdout, proc
    try:
        return open(url, "rb"), None
    except OSError as e:
        raise DataError(f"cannot open shard {url}: {e}") from e


def _close(stream, proc: subprocess.Popen | None) -> None:
    stream.close()
    if proc is not None:
        proc.kill()  # a stream left early: the command's rest is not wanted
        proc.wait()


def _key_ext(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    stem, _, ext = base.partition(".")
    prefix = name[: len(name) - len(base)]
    return prefix + stem, ext.lower()


def iter_samples(url: str, skip: int = 0) -> Iterator[dict[str, bytes]]:
    """The samples of one shard in order, ``{"__key__": key, ext: bytes}``; the first ``skip``
    are read past without keeping their bytes. A corrupt or truncated tar ends the iteration
    with a DataError (the samples before it have been given)."""
    stream, proc = open_shard(url)
    n = 0
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            sample: dict[str, Any] = {}
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _key_ext(member.name)
                if sample and key != sample["__key__"]:
                    if n >= skip:
                        yield sample
                    n += 1
                    sample = {}
                if not sample:
                    sample = {"__key__": key}
                data = tar.extractfile(member).read() if n >= skip else b""
                if n >= skip and len(data) != member.size:
                    raise DataError(f"shard {url}: member {member.name} is truncated")
                sample[ext] = data
            if sample and n >= skip:
                yield sample
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"shard {url} is corrupt or truncated after {n} samples: {e}") from e
    finally:
        _close(stream, proc)


def _count(url: str) -> int:
    stream, proc = open_shard(url)
    keys, last = 0, None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if member.isfile():
                    key = _key_ext(member.name)[0]
                    if key != last:
                        keys, last = keys + 1, key
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"shard {url} is unreadable while counting its samples: {e}") from e
    finally:
        _close(stream, proc)
    return keys


def open_shards(pattern: str) -> ShardSet:
    """The shards ``pattern`` names with their sample counts: from ``index.json`` beside them
    (``cmae shards`` writes it; for ``pipe:`` shards it is fetched by the same command with
    the shard's file name replaced), else, for local shards, by reading their tar headers."""
    urls = expand(pattern)
    index = _read_index(pattern)
    if urls and not urls[0].startswith("pipe:"):
        missing = [u for u in urls if not Path(u).expanduser().is_file()]
        if missing:
            raise DataError(f"{len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}")
        urls = [str(Path(u).expanduser()) for u in urls]
    if index is not None:
        names = index.get("shards", {})
        try:
            counts = [int(names[_basename(u)]) for u in urls]
        except KeyError as e:
            raise DataError(f"{INDEX_NAME} beside {pattern} has no count for shard {e}") from e
        classes = list(index.get("classes", []))
    elif urls[0].startswith("pipe:"):
        raise DataError(
            f"{pattern}: pipe: shards need an {INDEX_NAME} beside them (its command with "
            "the shard name replaced by index.json printed nothing usable); `cmae shards` "
            "writes one"
        )
    else:
        counts, classes = [_count(u) for u in urls], []
    if not sum(counts):
        raise DataError(f"{pattern}: the shards hold no samples")
    return ShardSet(urls, counts, classes)


def _listed_range(pattern: str) -> str | None:
    """``pattern`` with its brace range set to the shards of that name that the index lists
    (a held-out split usually has fewer shards than the train one); None without an index."""
    index = _read_index(pattern)
    token = next((t for t in pattern.split() if ".tar" in t), pattern)
    name = token.rsplit("/", 1)[-1]
    m = _BRACES.search(name)
    if index is None or m is None:
        return None
    rx = re.compile(re.escape(name[: m.start()]) + r"(\d+)" + re.escape(name[m.end() :]) + "$")
    found = sorted(int(g.group(1)) for n in index.get("shards", {}) if (g := rx.match(n)))
    if not found:
        return None
    width = len(m.group(1))
    braces = f"{{{found[0]:0{width}d}..{found[-1]:0{width}d}}}"
    return pattern.replace(
        token, token[: len(token) - len(name)] + name[: m.start()] + braces + name[m.end() :]
    )


def _basename(url: str) -> str:
    """The shard's file name: of the path, or of the token naming a .tar in a pipe: command."""
    if url.startswith("pipe:"):
        url = next((t for t in url.split() if ".tar" in t), url)
    return url.rsplit("/", 1)[-1]


def _read_index(pattern: str) -> dict | None:
    if pattern.startswith("pipe:"):
        token = next((t for t in pattern.split() if ".tar" in t), None)
        if token is None:
            return None
        cmd = pattern[5:].replace(token, token.rsplit("/", 1)[0] + "/" + INDEX_NAME)
        try:
            out = subprocess.run(cmd, shell=True, capture_output=True, timeout=120).stdout
            return json.loads(out) if out else None
        except (subprocess.SubprocessError, json.JSONDecodeError):
            return None
    path = Path(pattern).expanduser().parent / INDEX_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable index: {e}") from e


# ---------------------------------------------------------------------------------------------
# pretraining stream


def shard_seed(seed: int, epoch: int, shard: int, offset: int, attempt: int = 0) -> int:
    state = np.random.SeedSequence([seed, epoch, shard, offset, attempt]).generate_state(
        2, np.uint64
    )
    return int(state[0] >> np.uint64(1))


def _image(sample: dict[str, bytes]) -> tuple[str, bytes] | None:
    return next(((k, v) for k, v in sample.items() if k in IMAGE_KEYS), None)


def _label(sample: dict[str, bytes]) -> int:
    try:
        return int(sample["cls"].decode().strip()) if "cls" in sample else -1
    except ValueError:
        return -1


class ShardStream(IterableDataset):
    """The pretraining samples of ``shards`` for this rank: ``(views, label, bad)`` items, as
    ``SeededSamples`` gives (see the module docstring for the order, DDP, resume and bad data).

    ``batch_size``: this rank's batch; ``workers``: the loader's worker count (0: one stream in
    the main process). ``set_epoch(epoch, start)`` as ``EpochSampler``'s: ``start`` samples of
    the epoch already trained on this rank. ``len()``: this rank's samples per epoch.
    """

    def __init__(
        self,
        shards: ShardSet,
        transform: Callable,
        seed: int,
        batch_size: int,
        workers: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.shards, self.transform, self.seed = shards, transform, seed
        self.batch_size, self.streams = batch_size, max(1, workers)
        self.rank, self.world = rank, world
        self.as_tensor = bool(getattr(transform, "takes_tensor", False))
        self.classes = shards.classes
        self.epoch = self.start = 0
        n_streams = self.world * self.streams
        if len(shards.urls) < n_streams:
            raise DataError(
                f"{len(shards.urls)} shards for {world} ranks x {self.streams} loader workers: "
                "every worker of every rank needs a shard of its own (write smaller shards, "
                "or use fewer workers)"
            )
        self.batches_per_stream = self._batches_per_stream()
        if self.batches_per_stream == 0:
            raise DataError(
                f"the smallest share of shards holds fewer than {batch_size} samples (one batch) "
                f"for {n_streams} readers: write bigger shards or use fewer workers"
            )

    def _plan(self, epoch: int) -> list[list[int]]:
        """Shard indices of every stream (rank-major) in epoch ``epoch``."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards.urls))
        n = self.world * self.streams
        return [perm[i::n].tolist() for i in range(n)]

    def _batches_per_stream(self) -> int:
        # the smallest stream over all epochs' deals is unknowable ahead; the deal of epoch 0
        # fixes it, and later epochs take the same number (a richer deal leaves more out;
        # a poorer one is topped up with repeats, flagged as neither new nor bad)
        sizes = [sum(self.shards.counts[i] for i in s) for s in self._plan(0)]
        return min(sizes) // self.batch_size

    def __len__(self) -> int:
        return self.streams * self.batches_per_stream * self.batch_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[Any, int, int]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        done = self.start // self.batch_size  # batches this rank trained on in this epoch
        stream = (worker + done) % self.streams  # the stream that was next plays worker 0
        given = len(range(stream, done, self.streams))  # its batches in those steps
        quota = (self.batches_per_stream - given) * self.batch_size
        shard_ids = self._plan(self.epoch)[self.rank * self.streams + stream]
        yield from self._samples(shard_ids, given * self.batch_size, quota)

    def _samples(self, shard_ids: list[int], skip: int, quota: int) -> Iterator[tuple]:
        last_good: tuple | None = None
        pending = 0  # bad samples waiting for a good one to stand in (at a stream's start)
        emitted = 0
        for sid, offset, sample in self._raw(shard_ids, skip):
            if emitted >= quota:
                return
            item = None
            if sample is not None:
                item = self._decode(sample, sid, offset)
            if item is None:
                if last_good is None:
                    pending += 1
                    continue
                views = self._views(last_good, sid, offset, attempt=1)
                yield views, last_good[1], 1
                emitted += 1
                continue
            last_good = item
            while pending and emitted < quota:
                yield self._views(item, sid, offset, attempt=1 + pending), item[1], 1
                pending -= 1
                emitted += 1
            if emitted < quota:
                yield self._views(item, sid, offset), item[1], 0
                emitted += 1
        if emitted < quota:
            if last_good is None:
                raise DataError("no readable sample in this worker's shards")
            while emitted < quota:  # a poorer deal than epoch 0's: repeats, new views
                yield self._views(last_good, -1, emitted, attempt=1), last_good[1], 0
                emitted += 1

    def _raw(self, shard_ids: list[int], skip: int) -> Iterator[tuple[int, int, dict | None]]:
        """(shard, offset, sample or None for a sample a corrupt shard failed to give)."""
        for sid in shard_ids:
            count = self.shards.counts[sid]
            if skip >= count:
                skip -= count
                continue
            offset = skip
            try:
                for sample in iter_samples(self.shards.urls[sid], skip):
                    yield sid, offset, sample
                    offset += 1
            except DataError as e:
                print(f"cmae: {e}", file=sys.stderr, flush=True)
            else:
                if offset < count:
                    print(
                        f"cmae: shard {self.shards.urls[sid]} is corrupt or truncated: it gave "
                        f"{offset} of the {count} samples its index counts",
                        file=sys.stderr,
                        flush=True,
                    )
            while offset < count:  # what the index promised and the shard did not give
                yield sid, offset, None
                offset += 1
            skip = 0

    def _decode(self, sample: dict, sid: int, offset: int) -> tuple | None:
        found = _image(sample)
        if found is None:
            where = f"{self.shards.urls[sid]}: sample {sample['__key__']}"
            print(f"cmae: shard {where} has no image", file=sys.stderr, flush=True)
            return None
        ext, data = found
        try:
            img = decode_bytes(
                data, f"{self.shards.urls[sid]}:{sample['__key__']}.{ext}", self.as_tensor
            )
        except DataError as e:
            print(f"cmae: skipping unreadable image: {e}", file=sys.stderr, flush=True)
            return None
        return img, _label(sample), sid, offset

    def _views(self, item: tuple, sid: int, offset: int, attempt: int = 0) -> Any:
        img, _, orig_sid, orig_offset = item
        key = (sid, offset) if attempt else (orig_sid, orig_offset)
        seed = shard_seed(self.seed, self.epoch, *key, attempt)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.transform(img)


# ---------------------------------------------------------------------------------------------
# evaluation: every sample once, in shard order


class ShardImages(IterableDataset):
    """All samples of ``shards`` once, ``(image, label)`` after ``transform`` (kNN / linear
    probe features); the loader's workers take every W-th shard. ``len()``: all samples."""

    def __init__(self, shards: ShardSet, transform: Callable | None = None) -> None:
        self.shards, self.transform = shards, transform
        self.as_tensor = bool(getattr(transform, "takes_tensor", False))
        self.classes = shards.classes
        self.labels = None

    def __len__(self) -> int:
        return self.shards.total

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for url in self.shards.urls[w::n]:
            for sample in iter_samples(url):
                found = _image(sample)
                if found is None:
                    raise DataError(f"shard {url}: sample {sample['__key__']} has no image")
                img = decode_bytes(found[1], f"{url}:{sample['__key__']}", self.as_tensor)
                yield (self.transform(img) if self.transform else img), _label(sample)


# ---------------------------------------------------------------------------------------------
# writing


def parse_size(text: str) -> int:
    """``256MB`` / ``1GB`` / ``500KB`` / bytes -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, flags=re.I)
    if m is None:
        raise DataError(f"--shard-size: expected e.g. 256MB or 1GB, got {text!r}")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def write_shards(
    src: str | Path,
    out: str | Path,
    shard_size: int = 256 << 20,
    prefix: str = "shard",
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> ShardSet:
    """Shards of the images below ``src`` (a folder: class folders give ``.cls`` labels) in
    ``out``: ``{prefix}-000000.tar``, ... of at most ``shard_size`` bytes each (one image more
    when a single image is larger), the files in a seeded random order (a shard then mixes
    classes); the image bytes as they are (no re-encoding). Writes ``index.json`` (counts per
    shard, classes) last; returns what it wrote."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.is_dir():
        raise DataError(f"shards: source is not a directory: {src}")
    files = list_images(src)
    if not files:
        raise DataError(f"shards: no images found under {src}")
    rel = [f.relative_to(src) for f in files]
    classes = sorted({r.parts[0] for r in rel if len(r.parts) > 1})
    labelled = len(classes) >= 2
    index = {c: i for i, c in enumerate(classes)}
    order = np.random.default_rng(seed).permutation(len(files))
    out.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(len(files))))
    urls, counts = [], []
    tar, size, n = None, 0, 0

    def close() -> None:
        if tar is not None:
            tar.close()
            counts.append(n)

    for j, i in enumerate(order):
        members = {files[i].suffix.lower().lstrip("."): files[i].read_bytes()}
        if labelled:
            members["cls"] = str(index[rel[i].parts[0]]).encode()
        members["txt"] = rel[i].as_posix().encode()  # where it came from
        # a tar record: a 512-byte header, the data padded to 512 bytes
        record = sum(512 + math.ceil(len(v) / 512) * 512 for v in members.values())
        if tar is None or (size + record > shard_size and n):
            close()
            path = out / f"{prefix}-{len(urls):06d}.tar"
            tar, size, n = tarfile.open(path, "w"), 0, 0
            urls.append(str(path))
        key = f"{j:0{width}d}"
        for ext, payload in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        size += record
        n += 1
        if progress is not None:
            progress(1)
    close()
    names = {Path(u).name: c for u, c in zip(urls, counts, strict=True)}
    classes = classes if labelled else []
    # one index per folder: the shards of other prefixes (train-*, val-*) keep their counts
    old = _read_index(str(out / "x.tar")) or {}
    if old.get("classes") and classes and old["classes"] != classes:
        raise DataError(f"{out / INDEX_NAME} lists other classes than {src}'s class folders")
    merged = {**old.get("shards", {}), **names}
    meta = {"shards": merged, "classes": classes or old.get("classes", [])}
    tmp = out / f".{INDEX_NAME}.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    tmp.replace(out / INDEX_NAME)
    return ShardSet(urls, counts, classes)


def shard_pattern(shards: ShardSet) -> str:
    """The brace pattern naming ``shards`` as written by ``write_shards``."""
    first = Path(shards.urls[0])
    stem = first.name.rsplit("-", 1)[0]
    last = len(shards.urls) - 1
    return str(first.parent / f"{stem}-{{{0:06d}..{last:06d}}}.tar")


class FirstSamples(Dataset):
    """The first ``n`` samples of the first shard as a map-style set, ``(views,)`` after
    ``transform`` (the fixed reconstruction grid of a pretraining run on shards)."""

    def __init__(self, shards: ShardSet, transform: Callable, n: int = 8) -> None:
        self.transform = transform
        as_tensor = bool(getattr(transform, "takes_tensor", False))
        self.images = []
        for sample in iter_samples(shards.urls[0]):
            found = _image(sample)
            if found is not None:
                try:
                    self.images.append(decode_bytes(found[1], sample["__key__"], as_tensor))
                except DataError:
                    continue
            if len(self.images) >= n:
                break

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any]:
        return (self.transform(self.images[i]),)


def shard_splits(pattern: str, transform: Callable) -> tuple[ShardImages, ShardImages, list[str]]:
    """(train, held-out, classes) for the evaluation commands: ``pattern`` names the train
    shards and has "train" in it; the held-out ones are its twin with "val" (or "test")."""
    train, held = _split_sets(pattern)
    return ShardImages(train, transform), ShardImages(held, transform), train.classes


def shard_file_splits(
    pattern: str, train_transform: Callable, eval_transform: Callable, command: str
) -> tuple[ShardFiles, ShardFiles, list[str]]:
    """``shard_splits`` with random access (``ShardFiles``) for the commands that index their
    data (fine-tuning, the full linear probe); ``pipe:`` shards are refused (``command``: what
    needs the random access, for the message)."""
    refuse_streamed(pattern, command)
    train, held = _split_sets(pattern)
    return ShardFiles(train, train_transform), ShardFiles(held, eval_transform), train.classes


def _split_sets(pattern: str) -> tuple[ShardSet, ShardSet]:
    token = next((t for t in pattern.split() if ".tar" in t), pattern)
    head, _, name = token.rpartition("/")
    if "train" not in name:
        raise DataError(
            f"{pattern}: evaluation on shards needs 'train' in the pattern and a twin with "
            "'val' (or 'test') in its place"
        )
    train = open_shards(pattern)
    held = None
    for split in ("val", "test"):
        # only the file name changes: a folder called e.g. "pretrain" stays as it is
        twin = pattern.replace(token, f"{head}/" * bool(head) + name.replace("train", split))
        for candidate in (twin, _listed_range(twin)):
            try:
                held = open_shards(candidate) if candidate else None
            except DataError:
                continue
            if held is not None:
                break
        if held is not None:
            break
    if held is None:
        raise DataError(f"{pattern}: no 'val' or 'test' twin of these shards was found")
    if len(train.classes) < 2 or held.classes != train.classes:
        raise DataError(
            f"{pattern}: evaluation needs the class names in {INDEX_NAME} (as `cmae shards` "
            "writes from class folders), the same for both splits"
        )
    return train, held


# ---------------------------------------------------------------------------------------------
# random access: local shards as a map-style data set

_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gzip bz2 xz zstd


def refuse_streamed(pattern: str, command: str, other: str = "") -> None:
    """A one-line DataError for ``pipe:`` shards where ``command`` (what needs random
    access, e.g. "fine-tuning") reads them; ``other``: a further way out, if any."""
    if str(pattern).startswith("pipe:"):
        raise DataError(
            f"--data: {command} needs random access to the images, which pipe: shards (a "
            "stream) cannot give; copy the shards to a local disk and pass their local "
            f"pattern{other}"
        )


@dataclass
class _Member:
    offset: int  # of the data in the shard file
    size: int


@dataclass
class _Entry:
    shard: int
    key: str
    image: _Member | None  # None: no image member in the sample
    ext: str
    cls: _Member | None
    txt: _Member | None


def index_shard(path: str) -> list[_Entry]:
    """The samples of one local, uncompressed tar with each member's data offset and size
    (headers only: tarfile seeks past the data). A corrupt or truncated tail ends the list
    (the samples before it are kept); a member cut short keeps its full size, so reading it
    finds the missing bytes."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head.startswith(_COMPRESSED):
        raise DataError(
            f"shard {path} is compressed: random access needs plain .tar shards "
            "(`cmae shards` writes those)"
        )
    entries: list[_Entry] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = _key_ext(m.name)
                if not entries or entries[-1].key != key:
                    entries.append(_Entry(-1, key, None, "", None, None))
                e, member = entries[-1], _Member(m.offset_data, m.size)
                if ext in IMAGE_KEYS and e.image is None:
                    e.image, e.ext = member, ext
                elif ext == "cls":
                    e.cls = member
                elif ext == "txt":
                    e.txt = member
    except (tarfile.TarError, EOFError, OSError) as e:
        print(f"cmae: shard {path} is corrupt after {len(entries)} samples: {e}", file=sys.stderr)
    return entries


class ShardFiles(Dataset):
    """Local shards with random access: ``(image, label)`` items like ``ImageFiles``, read by
    a seek into the shard (``index_shard`` lists every member's offset once, when built; the
    offsets are kept in NumPy arrays, a few bytes a sample, which loader workers share).

    The order is the source folder's (each sample's ``.txt``, the path ``cmae shards`` stores,
    sorted as ``list_images`` sorts) when every sample has one, so a folder and its shards give
    the same items at the same indices (the same fine-tuning run for the same seeds); else the
    shards' order. A sample the index counts but the shard lacks, a member cut short or an
    undecodable image raises DataError from ``__getitem__``: the bad-image policy of a folder.
    ``names``: the ``.txt`` paths (else ``shard-name:key``); ``keys``: the sample keys (None
    for a missing sample).
    """

    def __init__(self, shards: ShardSet, transform: Callable | None = None) -> None:
        self.urls, self.transform = list(shards.urls), transform
        self.as_tensor = bool(getattr(transform, "takes_tensor", False))
        self.classes = list(shards.classes)
        self._fds: dict[int, int] = {}
        entries: list[_Entry | None] = []
        for sid, (url, count) in enumerate(zip(shards.urls, shards.counts, strict=True)):
            found = index_shard(url)
            for e in found:
                e.shard = sid
            # the index's count rules: samples missing from a damaged shard read as bad
            entries += found[:count] + [None] * max(0, count - len(found))
        labels = [self._label(e) for e in entries]
        names = [self._name(i, e) for i, e in enumerate(entries)]
        order = list(range(len(entries)))
        if entries and all(e is not None and e.txt is not None for e in entries):
            order.sort(key=lambda i: _folder_key(names[i]))
        entries = [entries[i] for i in order]
        self.labels = [labels[i] for i in order]
        self._names = [names[i] for i in order]
        self.keys = [e.key if e is not None else None for e in entries]
        self._exts = [sys.intern(e.ext) if e is not None else "" for e in entries]
        # shard -1: missing from its shard; size -1: a sample without an image
        self._shard = np.array([e.shard if e is not None else -1 for e in entries], np.int32)
        img = [e.image if e is not None and e.image is not None else None for e in entries]
        self._offset = np.array([m.offset if m else 0 for m in img], np.int64)
        self._size = np.array([m.size if m else -1 for m in img], np.int64)

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def __len__(self) -> int:
        return len(self._shard)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}}  # a worker opens its own files

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def _read(self, sid: int, member: _Member, what: str) -> bytes:
        fd = self._fds.get(sid)
        if fd is None:
            try:
                fd = self._fds[sid] = os.open(self.urls[sid], os.O_RDONLY)
            except OSError as e:
                raise DataError(f"cannot open shard {self.urls[sid]}: {e}") from e
        data = os.pread(fd, member.size, member.offset)  # no shared file position
        if len(data) != member.size:
            raise DataError(f"shard {self.urls[sid]}: {what} is truncated")
        return data

    def _label(self, e: _Entry | None) -> int:
        if e is None or e.cls is None:
            return -1
        try:
            return int(self._read(e.shard, e.cls, f"{e.key}.cls").decode().strip())
        except (DataError, ValueError, UnicodeDecodeError):
            return -1

    def _name(self, i: int, e: _Entry | None) -> str:
        if e is not None and e.txt is not None:
            try:
                return self._read(e.shard, e.txt, f"{e.key}.txt").decode()
            except (DataError, UnicodeDecodeError):
                pass
        shard = self.urls[e.shard if e is not None else 0].rsplit("/", 1)[-1]
        return f"{shard}:{e.key if e is not None else f'#{i}'}"

    def __getitem__(self, i: int) -> tuple[Any, int]:
        sid, size = int(self._shard[i]), int(self._size[i])
        if sid < 0:
            raise DataError(f"sample {self._names[i]} is missing from its corrupt shard")
        key, url = self.keys[i], self.urls[sid]
        if size < 0:
            raise DataError(f"shard {url}: sample {key} has no image")
        what = f"{key}.{self._exts[i]}"
        data = self._read(sid, _Member(int(self._offset[i]), size), what)
        img = decode_bytes(data, f"{url}:{what}", self.as_tensor)
        return (self.transform(img) if self.transform else img), self.labels[i]


def _folder_key(name: str) -> tuple[tuple[str, ...], str]:
    """``list_images``'s order (a walk with sorted folders, a folder's files before its
    subfolders') as a sort key of a relative path."""
    parts = tuple(name.split("/"))
    return parts[:-1], parts[-1]


def open_shard_files(pattern: str, transform: Callable | None, command: str) -> ShardFiles:
    """One local shard pattern as a ``ShardFiles`` (``cmae features``)."""
    refuse_streamed(pattern, command)
    return ShardFiles(open_shards(pattern), transform)
