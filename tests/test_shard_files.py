"""Local tar shards with random access (`ShardFiles`): `cmae finetune`, `cmae linprobe
mode=full` and `cmae features` read them as they read the folder they were written from;
damaged members follow the bad-image policy; `pipe:` shards are refused in one line."""

import json
import tarfile

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from cmae.cli import main
from cmae.config import load_config, to_dict
from cmae.data.datasets import DataError, ImageFiles
from cmae.data.sampling import SeededSamples
from cmae.data.shards import ShardFiles, index_shard, open_shards, write_shards
from cmae.eval.features import load_features
from cmae.models.cmae import build_model
from cmae.runtime.checkpoint import latest_checkpoint, save_checkpoint
from tests.helpers import tiny_overrides


def write_folder(root, classes=("a", "b"), per_class=8, size=20, seed=0):
    """JPEGs (a folder decodes those with torchvision, a shard with PIL: the same pixels), one
    in a nested folder, so the folder order is a walk's, not a plain string sort's."""
    rng = np.random.default_rng(seed)
    for c in classes:
        for i in range(per_class):
            sub = root / c / "z" if i == 0 else root / c
            sub.mkdir(parents=True, exist_ok=True)
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(img).save(sub / f"{i:03d}.jpg", quality=90)


def pattern_of(folder, prefix) -> str:
    n = len(list(folder.glob(f"{prefix}-*.tar")))
    return str(folder / f"{prefix}-{{000000..{n - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """ds/{train,val} and the same images as shards sh/{train,val}-*.tar (several each)."""
    root = tmp_path_factory.mktemp("shardfiles")
    write_folder(root / "ds" / "train")
    write_folder(root / "ds" / "val", per_class=4, seed=1)
    for split in ("train", "val"):
        write_shards(root / "ds" / split, root / "sh", 4 << 10, prefix=split, seed=3)
    pattern = pattern_of(root / "sh", "train")
    assert len(open_shards(pattern).urls) >= 3  # the shards' order is not the folder's
    return root, pattern


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("preset") / "micro16.yaml"
    cfg = load_config(None, tiny_overrides(**{"model.encoder": "vit_micro"}))
    path.write_text(yaml.safe_dump({"model": to_dict(cfg.model), "data": to_dict(cfg.data)}))
    return path


def test_shards_give_the_folders_items_at_the_same_indices(data):
    root, pattern = data
    folder, shards = ImageFiles(root / "ds" / "train"), ShardFiles(open_shards(pattern))
    assert shards.names == folder.names and shards.labels == folder.labels
    assert shards.classes == folder.classes == ["a", "b"]
    assert "a/z/000.jpg" in shards.names  # the nested file, where the walk puts it
    for i in range(len(folder)):
        (a, ya), (b, yb) = folder[i], shards[i]
        assert ya == yb and np.array_equal(np.asarray(a), np.asarray(b))
    # as tensors (the views' fast path): torchvision's JPEG decoder vs PIL's
    tens = ImageFiles(root / "ds" / "train", pil_to_tensor_marked)
    tsh = ShardFiles(open_shards(pattern), pil_to_tensor_marked)
    assert all(torch.equal(tens[i][0], tsh[i][0]) for i in range(len(tens)))


def pil_to_tensor_marked(x):
    return x if isinstance(x, torch.Tensor) else pil_to_tensor(x)


pil_to_tensor_marked.takes_tensor = True


def finetune(out, preset, data_path, *extra):
    args = ["finetune", "--checkpoint", "random", "--out", str(out), f"encoder.preset={preset}"]
    train = ["data.num_workers=0", "batch_size=8", "epochs=2", "warmup_epochs=1"]
    return main([*args, "--data", data_path, *train, *extra])


def test_finetune_on_shards_equals_finetune_on_the_folder(data, preset, tmp_path):
    root, pattern = data
    assert finetune(tmp_path / "folder", preset, str(root / "ds")) == 0
    assert finetune(tmp_path / "shards", preset, pattern) == 0
    res = [json.loads((tmp_path / r / "results.json").read_text()) for r in ("folder", "shards")]
    for key in ("top1", "final_loss", "best_top1", "num_classes"):
        assert res[0][key] == res[1][key], key
    states = [latest_checkpoint(tmp_path / r, ("model",))[1]["model"] for r in ("folder", "shards")]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_linprobe_full_and_features_read_shards(data, tmp_path, capsys):
    root, pattern = data
    cfg = load_config(None, tiny_overrides(**{"model.encoder": "vit_64x2h2"}))
    torch.manual_seed(0)
    ckpt = tmp_path / "checkpoint.pt"
    save_checkpoint({"model": build_model(cfg.model).state_dict(), "config": to_dict(cfg)}, ckpt)
    lp = ["linprobe", "--checkpoint", str(ckpt), "--data", pattern, "mode=full"]
    lp += ["batch_size=8", "epochs=2", "warmup_epochs=1", "blrs=[0.1]", "data.num_workers=0"]
    assert main([*lp, "--out", str(tmp_path / "lp")]) == 0
    lp[4] = str(root / "ds")  # the same images as a folder: the same probe
    assert main([*lp, "--out", str(tmp_path / "lp_folder"), "cache=false"]) == 0
    res = [json.loads((tmp_path / r / "results.json").read_text()) for r in ("lp", "lp_folder")]
    assert (res[0]["n_train"], res[0]["n_val"]) == (16, 8)
    assert res[0]["heads"] == res[1]["heads"]
    feats = []
    for name, src in (("folder", str(root / "ds" / "train")), ("shards", pattern)):
        out = tmp_path / f"{name}.safetensors"
        args = ["features", "--checkpoint", str(ckpt), "--data", src, "--out", str(out)]
        assert main([*args, "--workers", "0", "--batch-size", "4"]) == 0
        feats.append(load_features(out))
    assert feats[1].names == feats[0].names and len(feats[1].names) == 16
    assert torch.equal(feats[1].labels, feats[0].labels)
    assert (feats[1].features - feats[0].features).abs().max() < 1e-5


def test_truncated_and_undecodable_members_are_bad_images(tmp_path, capsys):
    write_folder(tmp_path / "src", per_class=4)
    write_shards(tmp_path / "src", tmp_path / "sh", 1 << 20, prefix="train")
    shard = tmp_path / "sh" / "train-000000.tar"
    entries = index_shard(str(shard))
    assert len(entries) == 8
    data = bytearray(shard.read_bytes())
    garbled = entries[2].image
    data[garbled.offset : garbled.offset + garbled.size] = b"\0" * garbled.size
    cut = entries[-1].image
    shard.write_bytes(bytes(data[: cut.offset + cut.size // 2]))  # the last image cut short
    ds = ShardFiles(open_shards(str(shard)))
    assert len(ds) == 8  # index.json's count
    by_key = {k: i for i, k in enumerate(ds.keys)}
    bad = {by_key[entries[2].key]: "cannot read image", by_key[entries[-1].key]: "truncated"}
    for i in range(len(ds)):
        if i in bad:
            with pytest.raises(DataError, match=bad[i]):
                ds[i]
        else:
            assert ds[i][0].size == (20, 20)
    # the fine-tuning loader's policy: a seeded substitute, flagged bad
    seeded = SeededSamples(ds, seed=0)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        item = seeded[(0, min(bad))]
    assert item[-1] == 1 and item[0].size == (20, 20)
    assert seeded[(0, 1 if 1 not in bad else 0)][-1] == 0
    # a tar cut inside a header: the index still counts its samples, which read as bad
    shard.write_bytes(bytes(data[: entries[4].image.offset - 300]))
    ds = ShardFiles(open_shards(str(shard)))
    assert len(ds) == 8
    assert sum(k is None for k in ds.keys) >= 4
    missing = ds.keys.index(None)
    with pytest.raises(DataError, match="missing from its corrupt shard"):
        ds[missing]
    assert "corrupt" in capsys.readouterr().err


def test_compressed_shards_are_refused_in_one_line(tmp_path):
    write_folder(tmp_path / "src", per_class=2)
    (tmp_path / "sh").mkdir()
    with tarfile.open(tmp_path / "sh" / "x.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "a" / "001.jpg", "000.jpg")
    with pytest.raises(DataError, match="compressed") as e:
        ShardFiles(open_shards(str(tmp_path / "sh" / "x.tar.gz")))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("command", ["finetune", "linprobe", "features"])
def test_pipe_shards_are_refused_in_one_line(data, preset, tmp_path, capsys, command):
    root, pattern = data
    pipe = f"pipe:cat {pattern}"
    if command == "finetune":
        rc = finetune(tmp_path / "ft", preset, pipe)
    elif command == "linprobe":
        args = ["linprobe", "--checkpoint", "random", f"encoder.preset={preset}", "mode=full"]
        rc = main([*args, "--data", pipe, "--out", str(tmp_path / "lp"), "data.num_workers=0"])
    else:
        args = ["features", "--checkpoint", "random", "--data", pipe]
        rc = main([*args, "--out", str(tmp_path / "f.safetensors"), "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "needs random access" in err and "copy the shards to a local disk" in err
