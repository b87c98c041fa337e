"""Streaming shards: writing, reading per rank and worker, exact resume, bad data."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.v2.functional import pil_to_tensor

from cmae.cli import main
from cmae.config import load_config
from cmae.data.datasets import DataError
from cmae.data.pipeline import shard_pipeline
from cmae.data.sampling import BadImages
from cmae.data.shards import (
    ShardStream,
    expand,
    iter_samples,
    open_shards,
    parse_size,
    shard_splits,
    write_shards,
)
from tests.helpers import tiny_overrides


def write_folder(root, classes=("a", "b"), per_class=12, size=8, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / c / f"{i:03d}.png")
    return root


def to_tensor(img):
    return pil_to_tensor(img)


@pytest.fixture
def shards(tmp_path):
    """24 labelled 8 px images in 6 shards of 4 (shard size = 4 PNGs' tar records)."""
    write_folder(tmp_path / "src")
    sizes = [len(p.read_bytes()) for p in (tmp_path / "src").rglob("*.png")]
    assert max(sizes) <= 512  # so each sample is 3 records (png, cls, txt) of 1024 bytes
    limit = 4 * 3 * 1024
    written = write_shards(tmp_path / "src", tmp_path / "sh", limit, prefix="train")
    assert written.counts == [4] * 6, written.counts
    return tmp_path / "sh" / "train-{000000..000005}.tar"


def test_expand_and_sizes():
    assert expand("d/x-{08..10}.tar") == ["d/x-08.tar", "d/x-09.tar", "d/x-10.tar"]
    assert expand("{0..1}-{0..1}") == ["0-0", "0-1", "1-0", "1-1"]
    assert parse_size("256MB") == 256 << 20 and parse_size("1.5G") == 3 << 29
    with pytest.raises(DataError, match="256MB"):
        parse_size("lots")


def test_written_shards_hold_every_image_once_with_labels(tmp_path, shards):
    s = open_shards(str(shards))
    assert s.total == 24 and s.classes == ["a", "b"]
    seen = {}
    for url in s.urls:
        for sample in iter_samples(url):
            seen[sample["txt"].decode()] = int(sample["cls"])
            src = tmp_path / "src" / sample["txt"].decode()
            assert sample["png"] == src.read_bytes()  # bytes as they were, not re-encoded
    assert len(seen) == 24 and all(seen[k] == (k[0] == "b") for k in seen)
    # the order is a seeded shuffle: the first shard mixes the classes
    first = [int(x["cls"]) for x in iter_samples(s.urls[0])]
    assert 0 < sum(first) < 4 or first != sorted(first)
    # without index.json the counts come from the tar headers
    (tmp_path / "sh" / "index.json").unlink()
    assert open_shards(str(shards)).counts == [4] * 6


def epoch_batches(stream, workers, batch):
    loader = DataLoader(stream, batch_size=batch, num_workers=workers, drop_last=True)
    return [(b[0], b[1], b[2]) for b in loader]


def images(batches):
    return [img for b in batches for img in b[0]]


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_read_distinct_shards_and_take_equal_steps(shards, workers):
    s = open_shards(str(shards))
    per_rank = []
    for rank in range(2):
        stream = ShardStream(
            s, to_tensor, seed=0, batch_size=2, workers=workers, rank=rank, world=2
        )
        stream.set_epoch(1)
        batches = epoch_batches(stream, workers, 2)
        assert len(batches) == len(stream) // 2  # the steps the loop plans with
        per_rank.append(images(batches))
    assert len(per_rank[0]) == len(per_rank[1])  # every rank, the same number of steps
    keys = [{bytes(x.numpy()) for x in imgs} for imgs in per_rank]
    assert not keys[0] & keys[1]  # distinct shards, so distinct images
    # 6 shards of 4: 2 readers get 3 shards each, nothing is left out; 4 readers get 2, 2, 1
    # and 1: each stream gives the smallest one's 4 samples, the rest waits for other deals
    assert len(keys[0] | keys[1]) == (24 if workers == 0 else 16)
    # the deal changes with the epoch
    stream = ShardStream(s, to_tensor, 0, 2, workers, 0, 2)
    stream.set_epoch(2)
    assert {bytes(x.numpy()) for x in images(epoch_batches(stream, workers, 2))} != keys[0]


def test_too_few_shards_for_the_readers_is_an_error(shards):
    s = open_shards(str(shards))
    with pytest.raises(DataError, match="6 shards for 2 ranks x 4 loader workers"):
        ShardStream(s, to_tensor, 0, 2, workers=4, rank=0, world=2)


@pytest.mark.parametrize("stop", [1, 2, 5])
def test_resume_continues_at_the_next_sample_exactly(shards, stop):
    s = open_shards(str(shards))

    def run(start):
        stream = ShardStream(s, to_tensor, seed=0, batch_size=2, workers=2)
        stream.set_epoch(3, start=start)
        return epoch_batches(stream, 2, 2)

    full, resumed = run(0), run(stop * 2)
    assert len(resumed) == len(full) - stop
    for a, b in zip(full[stop:], resumed, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def corrupt(path, keep_bytes):
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes])


def test_bad_images_and_broken_shards_follow_the_bad_data_policy(tmp_path, shards, capsys):
    s = open_shards(str(shards))
    # an undecodable image inside a shard: replaced and flagged
    broken = tmp_path / "sh" / "train-000001.tar"
    members = list(iter_samples(str(broken)))
    with tarfile.open(broken, "w") as tar:
        for i, sample in enumerate(members):
            for ext in ("png", "cls"):
                payload = b"not an image" if (i == 2 and ext == "png") else sample[ext]
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    # a shard cut off in the middle of a member: the samples it owes are bad
    corrupt(tmp_path / "sh" / "train-000004.tar", 1500)
    stream = ShardStream(s, to_tensor, seed=0, batch_size=4, workers=0)
    batches = epoch_batches(stream, 0, 4)
    flags = torch.cat([b[2] for b in batches])
    assert len(flags) == 24 and int(flags.sum()) == 1 + 3  # 1 image + 3 owed by the cut shard
    err = capsys.readouterr().err
    assert "not an image" in err or "cannot" in err
    assert "train-000004.tar is corrupt or truncated" in err
    # the training loop's counter then applies data.max_bad_fraction
    BadImages(0.25, 24).add(flags, "shards")
    with pytest.raises(DataError, match="max_bad_fraction"):
        BadImages(0.1, 24).add(flags, "shards")


def test_shards_command_and_evaluation_splits(tmp_path, capsys):
    write_folder(tmp_path / "ds" / "train")
    write_folder(tmp_path / "ds" / "val", per_class=4, seed=1)
    args = ["--shard-size", "2KB"]
    assert (
        main(
            [
                "shards",
                str(tmp_path / "ds" / "train"),
                str(tmp_path / "sh"),
                *args,
                "--prefix",
                "train",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    pattern = out.split("--data '")[1].rstrip("'\n")
    assert (
        main(
            ["shards", str(tmp_path / "ds" / "val"), str(tmp_path / "sh"), *args, "--prefix", "val"]
        )
        == 0
    )
    index = json.loads((tmp_path / "sh" / "index.json").read_text())
    assert sum(index["shards"].values()) == 24 + 8  # one index for both prefixes
    train, held, classes = shard_splits(pattern, to_tensor)
    assert classes == ["a", "b"] and len(train) == 24 and len(held) == 8
    labels = [y for _, y in held]
    assert sorted(labels) == [0] * 4 + [1] * 4
    assert main(["shards", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert "not a directory" in capsys.readouterr().err
    # commands that need random access name the problem with streamed shards
    out = str(tmp_path / "f.safetensors")
    argv = ["features", "--checkpoint", "quick", "--data", f"pipe:cat {pattern}", "--out", out]
    assert main(argv) == 2
    assert "copy the shards to a local disk" in capsys.readouterr().err


def test_pipe_shards_read_through_a_command(shards):
    pattern = f"pipe:cat {shards}"
    s = open_shards(pattern)
    assert (
        s.total == 24
        and s.urls[0] == f"pipe:cat {str(shards).replace('{000000..000005}', '000000')}"
    )
    assert len(list(iter_samples(s.urls[0]))) == 4


def test_shard_loader_leaves_the_global_rng_alone(shards):
    """A new epoch's loader iterator must not draw from torch's global generator (the masks'
    stream): a resumed run would then mask differently from an uninterrupted one."""
    cfg = load_config(None, tiny_overrides(**{"data.path": str(shards), "data.num_workers": 1}))
    stream, loader, first = shard_pipeline(cfg, torch.device("cpu"), 2, rank=0, world=1)
    assert len(first) == 4 and len(loader) == len(stream) // 2
    torch.manual_seed(0)
    before = torch.get_rng_state()
    next(iter(loader))
    assert torch.equal(before, torch.get_rng_state())


def test_pretrain_and_knn_from_shards(tmp_path, capsys):
    write_folder(tmp_path / "ds" / "train", per_class=16, size=20)
    write_folder(tmp_path / "ds" / "val", per_class=4, size=20, seed=1)
    for split, prefix in (("train", "train"), ("val", "val")):
        argv = ["shards", str(tmp_path / "ds" / split), str(tmp_path / "sh"), "--prefix", prefix]
        assert main([*argv, "--shard-size", "8KB"]) == 0
    pattern = capsys.readouterr().out.split("--data '")[1].split("'")[0]
    run = tmp_path / "run"
    args = ["pretrain", "--data", pattern, "--out", str(run), *tiny_overrides()]
    more = ["data.num_workers=0", "train.batch_size=8", "train.max_steps=2", "train.knn_every=0"]
    assert main([*args, *more, "train.knn_at_end=false"]) == 0
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r][-1] == 2
    out = tmp_path / "knn"
    knn = ["knn", "--checkpoint", str(run / "checkpoint.pt"), "--data", pattern]
    assert main([*knn, "--out", str(out), "data.num_workers=0", "k=3"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["n_train"] == 32 and res["n_val"] == 8
    lp = [
        "linprobe",
        "--checkpoint",
        str(run / "checkpoint.pt"),
        "--data",
        pattern,
        "mode=full",
        "batch_size=8",
        "epochs=1",
        "warmup_epochs=0",
        "data.num_workers=0",
    ]
    assert main([*lp, "--out", str(tmp_path / "lp")]) == 0  # local shards: random access
    assert json.loads((tmp_path / "lp" / "results.json").read_text())["n_train"] == 32
