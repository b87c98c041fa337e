import numpy as np
import pytest
import torch
from PIL import Image

from cmae.data import DataError, ImageFiles, SyntheticShapes, build_datasets
from cmae.views import eval_transform


def test_synthetic_is_deterministic_and_labelled():
    a, b = SyntheticShapes(20, 32, seed=3), SyntheticShapes(20, 32, seed=3)
    for i in (0, 7, 19):
        ia, la = a[i]
        ib, lb = b[i]
        assert la == lb == i % 10
        assert np.array_equal(np.asarray(ia), np.asarray(ib))
        assert ia.size == (32, 32) and ia.mode == "RGB"
    other = SyntheticShapes(20, 32, seed=4)
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(other[0][0]))
    assert a.labels == [i % 10 for i in range(20)]


def write_tree(root, layout):
    for rel, size in layout.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(path)


def test_image_files_recursive_with_labels(tmp_path):
    write_tree(tmp_path, {"cat/a.jpg": 8, "cat/deep/b.png": 8, "dog/c.JPEG": 8, "loose.bmp": 8})
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFiles(tmp_path)
    assert len(ds) == 4
    assert ds.classes == ["cat", "dog"]
    labels = dict(zip([f.name for f in ds.files], ds.labels, strict=True))
    assert labels == {"a.jpg": 0, "b.png": 0, "c.JPEG": 1, "loose.bmp": -1}
    img, _ = ds[0]
    assert img.mode == "RGB"


def test_missing_and_empty_dirs_fail_with_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFiles(tmp_path / "nope")
    with pytest.raises(DataError, match=f"no images found under {tmp_path}"):
        ImageFiles(tmp_path)


def test_build_datasets_splits(tmp_path):
    t = eval_transform(8)
    syn = {"train": 50, "val": 20, "size": 16, "seed": 0}
    train, bank, queries = build_datasets(None, t, t, syn, knn_bank=30, knn_queries=10)
    assert (len(train), len(bank), len(queries)) == (50, 30, 10)
    # held-out queries are different images from the bank
    assert not torch.equal(bank[0][0], queries[0][0])

    write_tree(
        tmp_path / "tv",
        {f"train/{c}/{i}.png": 8 for c in "ab" for i in range(5)}
        | {f"val/{c}/{i}.png": 8 for c in "ab" for i in range(2)},
    )
    train, bank, queries = build_datasets(str(tmp_path / "tv"), t, t, syn, 100, 100)
    assert (len(train), len(bank), len(queries)) == (10, 10, 4)

    write_tree(tmp_path / "cf", {f"{c}/{i}.png": 8 for c in "ab" for i in range(10)})
    train, bank, queries = build_datasets(str(tmp_path / "cf"), t, t, syn, 100, 100)
    assert len(train) == 20 and len(queries) == 2 and len(bank) == 18
    bank_files = {bank.base.files[i] for i in bank.indices}
    assert not bank_files & {queries.base.files[i] for i in queries.indices}

    write_tree(tmp_path / "flat", {f"{i}.png": 8 for i in range(4)})
    train, bank, queries = build_datasets(str(tmp_path / "flat"), t, t, syn, 100, 100)
    assert len(train) == 4 and bank is None and queries is None


def test_loader_workers_capped_at_usable_cpus(monkeypatch):
    from cmae import data

    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert [data.loader_workers(n) for n in (0, 1, 2, 8)] == [0, 1, 2, 2]
