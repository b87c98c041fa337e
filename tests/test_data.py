import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from cmae.data import datasets as data_module
from cmae.data.datasets import (
    DataError,
    ImageFiles,
    SyntheticShapes,
    build_datasets,
    load_image,
    load_rgb,
)
from cmae.data.views import PixelShiftViews, eval_transform


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


def test_grey_shapes_are_grey_and_differ_from_the_colour_ones():
    grey, colour = SyntheticShapes(30, 32, colors="grey"), SyntheticShapes(30, 32)
    spreads = []
    for i in range(30):
        g = np.asarray(grey[i][0]).astype(int)
        assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all(), i
        assert g.std() > 10  # a visible shape, not a flat image
        c = np.asarray(colour[i][0]).astype(int)
        spreads.append(np.abs(c[..., 0] - c[..., 1]).mean())
    assert np.mean(spreads) > 20  # the colour set really is coloured
    with pytest.raises(ValueError, match="colors must be one of"):
        SyntheticShapes(3, colors="blue")


def test_generated_knn_sets_follow_the_colour_scheme_and_are_rendered_once(monkeypatch):
    calls = []
    real = data_module.render_shape

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(data_module, "render_shape", counting)
    synthetic = {"train": 40, "val": 20, "size": 32, "seed": 0, "colors": "grey"}
    train, bank, queries = build_datasets(None, None, eval_transform(32), synthetic, 30, 10)
    assert len(calls) == 30 + 10  # rendered once, at build time
    first = [bank[i][0] for i in range(len(bank))] + [queries[i][0] for i in range(10)]
    assert len(calls) == 40  # not again
    direct = SyntheticShapes(30, 32, 0, eval_transform(32), colors="grey")
    assert all(torch.equal(first[i], direct[i][0]) for i in range(30))
    assert train.colors == "grey" and bank[3][1] == 3


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
    from cmae.data import datasets as data

    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert [data.loader_workers(n) for n in (0, 1, 2, 8)] == [0, 1, 2, 2]


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients plus noise: JPEG-typical content."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    phase = rng.uniform(0, 6.28, 3)
    a = np.stack([np.sin(5 * xx + 3 * yy + p) for p in phase], -1) * 90 + 128
    a = a + rng.normal(0, 8, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture
def decode_calls(monkeypatch):
    """Counts the fast (torchvision) JPEG decodes."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    real = data_module.decode_jpeg
    monkeypatch.setattr(data_module, "decode_jpeg", counting)
    return calls


def test_plain_jpegs_decode_to_the_same_tensor_as_pil(tmp_path, decode_calls):
    """The fast JPEG path gives exactly PIL's pixels for the usual kinds of JPEG."""
    kinds = {
        "444.jpg": dict(subsampling=0, quality=95),
        "422.jpg": dict(subsampling=1, quality=90),
        "420.jpg": dict(subsampling=2, quality=75),
        "progressive.jpg": dict(progressive=True, quality=85),
        "optimized.jpg": dict(optimize=True, quality=60),
    }
    for i, (name, kwargs) in enumerate(kinds.items()):
        photo(101 + 10 * i, 67 + 3 * i, seed=i).save(tmp_path / name, **kwargs)  # odd sizes
    photo(90, 70).convert("L").save(tmp_path / "grey.jpg")
    for f in sorted(tmp_path.iterdir()):
        fast = load_image(f, as_tensor=True)
        assert fast.dtype == torch.uint8 and fast.shape[0] == 3, f.name
        assert torch.equal(fast, pil_to_tensor(load_rgb(f))), f.name
    assert len(decode_calls) == len(kinds) + 1  # every one took the fast path


def test_without_torchvision_decoder_pil_decodes(tmp_path, monkeypatch):
    """A torchvision that has dropped decode_jpeg: the same tensors, from PIL."""
    photo(50, 30).save(tmp_path / "a.jpg")
    fast = load_image(tmp_path / "a.jpg", as_tensor=True)
    monkeypatch.setattr(data_module, "decode_jpeg", None)
    assert torch.equal(load_image(tmp_path / "a.jpg", as_tensor=True), fast)


def test_other_images_take_the_pil_path_as_tensors(tmp_path, decode_calls):
    """Rotated, CMYK, non-JPEG, truncated: the PIL path converts or names the problem."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    photo(40, 24).save(tmp_path / "rotated.jpg", exif=exif)
    photo(30, 20).convert("CMYK").save(tmp_path / "cmyk.jpg")
    photo(30, 20).save(tmp_path / "plain.png")
    shapes = {"rotated.jpg": (40, 24), "cmyk.jpg": (20, 30), "plain.png": (20, 30)}  # (H, W)
    for name, size in shapes.items():
        x = load_image(tmp_path / name, as_tensor=True)
        assert tuple(x.shape) == (3, *size), name
        assert torch.equal(x, pil_to_tensor(load_rgb(tmp_path / name))), name
    photo(64, 64).save(tmp_path / "whole.jpg")
    whole = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=f"{tmp_path / 'truncated.jpg'}.*truncated"):
        load_image(tmp_path / "truncated.jpg", as_tensor=True)
    assert len(decode_calls) == 1  # only truncated.jpg was tried, then refused


def test_image_files_give_tensors_to_views_that_take_them(tmp_path):
    """Views of 64 px and more get decoded tensors and compute what they compute from PIL."""
    for i in range(3):
        photo(200, 150, seed=i).save(tmp_path / f"{i}.jpg", quality=90)
    big, small = PixelShiftViews(96, 16), PixelShiftViews(32, 8)
    assert ImageFiles(tmp_path, big).as_tensor and not ImageFiles(tmp_path, small).as_tensor
    assert ImageFiles(tmp_path, eval_transform(64)).as_tensor
    assert not ImageFiles(tmp_path).as_tensor
    ds = ImageFiles(tmp_path, big)
    for i, f in enumerate(ds.files):
        torch.manual_seed(i)
        (online, target), _ = ds[i]
        torch.manual_seed(i)
        online_pil, target_pil = big(load_rgb(f))
        assert torch.equal(online, online_pil) and torch.equal(target, target_pil)
