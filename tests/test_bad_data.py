"""Bad data: convertible images are converted, undecodable ones skipped (replaced, warned,
counted in log.jsonl as bad_images), a flood of them is an error, and unusable data paths fail
before training, naming the path."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from cmae.cli import main
from cmae.config import load_config
from cmae.data import datasets as data
from cmae.data.datasets import DataError, load_rgb
from cmae.train.pretrain import run
from tests.helpers import tiny_overrides


def jpeg_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


def rgb(w: int = 20, h: int = 20, seed: int = 0) -> Image.Image:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a, "RGB")


def write_convertible(root) -> dict[str, tuple[int, int]]:
    """Files that must load, with the (w, h) they must load as."""
    root.mkdir(parents=True, exist_ok=True)
    rgb().save(root / "rgb.png")
    rgb().convert("L").save(root / "gray.png")
    rgb().convert("LA").save(root / "gray_alpha.png")
    rgb().convert("RGBA").save(root / "rgba.png")
    rgb().convert("P").save(root / "palette.png")
    pal = rgb().convert("P")
    pal.info["transparency"] = 0
    pal.save(root / "palette_transparent.png", transparency=0)
    rgb().convert("1").save(root / "bilevel.png")
    Image.fromarray(np.full((20, 20), 65535, np.uint16)).save(root / "gray16.png")
    Image.new("CMYK", (20, 20), (0, 255, 0, 0)).save(root / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 0.5, np.float32), "F").save(root / "float.tif")
    rgb(3, 3).save(root / "smaller_than_crop.png")  # upscaled by the random resized crop
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    (root / "rotated.jpg").write_bytes(jpeg_bytes(rgb(12, 20), exif=exif))
    sizes = {p.name: (20, 20) for p in root.iterdir()}
    return {**sizes, "smaller_than_crop.png": (3, 3), "rotated.jpg": (20, 12)}


def write_broken(root) -> list[str]:
    """Files that cannot be decoded, one of each kind."""
    (root / "empty.jpg").write_bytes(b"")
    whole = jpeg_bytes(rgb(64, 64))
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "notes.png").write_text("not an image")
    (root / "dangling.jpg").symlink_to(root / "missing-target.jpg")
    rgb(1, 20).save(root / "one_pixel_wide.png")
    rgb(64, 64).save(root / "bomb.png")  # over the bomb limit set below
    return ["empty.jpg", "truncated.jpg", "notes.png", "dangling.jpg", "one_pixel_wide.png"] + [
        "bomb.png"
    ]


@pytest.fixture
def small_bomb_limit(monkeypatch):
    # PIL refuses images over 2 x MAX_IMAGE_PIXELS; the good images have 400 pixels at most
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)


def test_convertible_images_load_as_upright_rgb(tmp_path, small_bomb_limit):
    sizes = write_convertible(tmp_path)
    for name, size in sizes.items():
        img = load_rgb(tmp_path / name)
        assert img.mode == "RGB" and img.size == size, name
    # 16-bit grey is rescaled (PIL alone would clip 65535 to 255 for every value above 255)
    assert load_rgb(tmp_path / "gray16.png").getpixel((0, 0)) == (255, 255, 255)
    assert load_rgb(tmp_path / "float.tif").getpixel((0, 0)) == (128, 128, 128)


def test_broken_images_raise_naming_file_and_reason(tmp_path, small_bomb_limit):
    reasons = {
        "empty.jpg": "cannot identify",
        "truncated.jpg": "truncated",
        "notes.png": "cannot identify",
        "dangling.jpg": "No such file",
        "one_pixel_wide.png": "too small",
        "bomb.png": "decompression-bomb limit",
    }
    for name in write_broken(tmp_path):
        with pytest.raises(DataError, match=reasons[name]) as e:
            load_rgb(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)


def test_large_jpeg_is_decoded_in_draft_mode(tmp_path, monkeypatch):
    (tmp_path / "big.jpg").write_bytes(jpeg_bytes(rgb(64, 48)))
    assert load_rgb(tmp_path / "big.jpg").size == (64, 48)
    monkeypatch.setattr(data, "LARGE_IMAGE_PIXELS", 1000)
    monkeypatch.setattr(data, "DRAFT_SIDE", 12)  # short side 48 -> 1/4 scale, 12 px
    assert load_rgb(tmp_path / "big.jpg").size == (16, 12)


def pretrain_on(path, out, **extra) -> None:
    base = {
        "model.encoder": "vit_micro",
        "data.path": str(path),
        "data.num_workers": 1,
        "train.batch_size": 6,
        "train.epochs": 1,
        "train.warmup_epochs": 1,
        "train.log_every": 1,
        "train.knn_at_end": "false",
        "train.threads": 1,
        "train.out": str(out),
    }
    run(load_config(None, tiny_overrides(**{**base, **extra})))


@pytest.mark.slow
def test_training_skips_and_counts_every_bad_file(tmp_path, small_bomb_limit):
    root = tmp_path / "images"
    good = write_convertible(root)
    broken = write_broken(root)
    assert (len(good) + len(broken)) % 6 == 0  # one epoch reads every file once
    # 1 worker: the flags come back from the worker process with the samples
    pretrain_on(root, tmp_path / "run", **{"data.max_bad_fraction": 0.5})
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert records[-1]["bad_images"] == len(broken)
    assert records[-1]["step"] == (len(good) + len(broken)) // 6


@pytest.mark.slow
def test_a_flood_of_bad_files_is_a_clear_error(tmp_path, small_bomb_limit):
    root = tmp_path / "images"
    write_convertible(root)
    write_broken(root)
    with pytest.raises(DataError, match=r"unreadable images .* data.max_bad_fraction=0.1"):
        pretrain_on(root, tmp_path / "run", **{"data.max_bad_fraction": 0.1})


def test_unusable_data_paths_fail_before_training(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "readme.txt").write_text("x")
    (tmp_path / "all_broken").mkdir()
    (tmp_path / "all_broken" / "a.jpg").write_bytes(b"")
    (tmp_path / "all_broken" / "b.png").write_text("no")
    cases = {
        "missing": "does not exist",
        "empty": "no images found",
        "no_images": "no images found",
        "all_broken": "none of the 2 images checked",
    }
    for name, reason in cases.items():
        with pytest.raises(DataError, match=reason) as e:
            pretrain_on(tmp_path / name, tmp_path / f"run_{name}")
        assert str(tmp_path / name) in str(e.value)
        assert not (tmp_path / f"run_{name}" / "log.jsonl").exists()  # no training step


def finetune_on(root, out, max_bad: float) -> int:
    args = ["finetune", "--checkpoint", "random", "--data", str(root), "--out", str(out)]
    return main(
        [
            *args,
            "encoder.preset=quick",
            "data.num_workers=1",
            "batch_size=6",
            "epochs=2",
            "warmup_epochs=1",
            f"max_bad_fraction={max_bad}",
        ]
    )


@pytest.mark.slow
def test_finetune_substitutes_and_counts_bad_train_images(tmp_path, small_bomb_limit, capsys):
    root = tmp_path / "images"
    good = write_convertible(root / "train" / "a")
    write_convertible(root / "train" / "b")
    broken = write_broken(root / "train" / "b")
    write_convertible(root / "val" / "a")
    write_convertible(root / "val" / "b")
    assert finetune_on(root, tmp_path / "ft", 0.5) == 0
    log = [json.loads(x) for x in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    assert (2 * len(good) + len(broken)) % 6 == 0  # an epoch reads every file once
    assert [r["bad_images"] for r in log] == [len(broken), 2 * len(broken)]
    # a flood: one line naming the key to raise
    assert finetune_on(root, tmp_path / "ft2", 0.05) == 2
    err = capsys.readouterr().err
    assert "unreadable images" in err and "max_bad_fraction=0.05" in err
