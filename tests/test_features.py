"""``cmae features``, list files as a data source, and progress lines."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cmae import load_encoder
from cmae.cli import main
from cmae.config import load_config, to_dict
from cmae.data.datasets import (
    DataError,
    ImageList,
    build_datasets,
)
from cmae.data.sources import labelled_splits, open_images
from cmae.data.views import eval_transform
from cmae.eval.features import extract_to_file, load_features, run_key
from cmae.models.cmae import build_model
from cmae.runtime.checkpoint import save_checkpoint
from cmae.runtime.progress import GRACE_SECONDS, Progress
from cmae.train.lifecycle import TrainingJob
from tests.helpers import tiny_overrides

SMALL = {"model.encoder": "vit_64x2h2"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = load_config(None, tiny_overrides(**SMALL))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    save_checkpoint({"model": build_model(cfg.model).state_dict(), "config": to_dict(cfg)}, path)
    return path


def write_images(root, classes=("cat", "dog"), per_class=5, size=20, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            p = root / c / f"{i:03d}.png"
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(p)
            paths.append(p)
    return paths


def reference(ckpt, root, pool="cls", img_size=None):
    """The features of load_encoder on the images of ``root`` through the same view."""
    enc = load_encoder(ckpt, pool, img_size=img_size)
    ds = open_images(root, eval_transform(enc.img_size))
    with torch.no_grad():
        return enc(torch.stack([ds[i][0] for i in range(len(ds))]))


def test_features_command_writes_features_names_labels(ckpt, tmp_path, capsys):
    paths = write_images(tmp_path / "imgs")
    out = tmp_path / "f.safetensors"
    args = ["features", "--checkpoint", str(ckpt), "--data", str(tmp_path / "imgs")]
    assert main([*args, "--out", str(out), "--workers", "0", "--batch-size", "4"]) == 0
    f = load_features(out)
    assert f.names == [p.relative_to(tmp_path / "imgs").as_posix() for p in paths]
    assert f.labels.tolist() == [0] * 5 + [1] * 5
    assert json.loads(f.metadata["classes"]) == ["cat", "dog"]
    assert f.features.shape == (10, 64)
    assert (f.features - reference(ckpt, tmp_path / "imgs")).abs().max() < 1e-5
    assert not (tmp_path / "f.safetensors.partial").exists()
    assert "wrote" in capsys.readouterr().out
    # another size and the patch tokens: the position embedding is resampled
    out2 = tmp_path / "tok.safetensors"
    more = ["--img-size", "24", "--pool", "tokens", "--workers", "0"]
    assert main([*args, "--out", str(out2), *more]) == 0
    tok = load_features(out2).features
    assert tok.shape == (10, 36, 64)
    assert (tok - reference(ckpt, tmp_path / "imgs", "tokens", 24)).abs().max() < 1e-5


class FailingAt(torch.utils.data.Dataset):
    """The images of ``base``, but item ``bad`` raises: a run killed part-way."""

    def __init__(self, base, bad):
        self.base, self.bad = base, bad

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if i == self.bad:
            raise KeyboardInterrupt
        return self.base[i]


def test_features_resume_after_interruption(ckpt, tmp_path, capsys):
    write_images(tmp_path / "imgs")
    enc = load_encoder(ckpt)
    ds = open_images(tmp_path / "imgs", eval_transform(16))
    key = run_key(str(ckpt), ds.names, 16, "cls", 1.0)
    out = tmp_path / "f.safetensors"
    with pytest.raises(KeyboardInterrupt):
        extract_to_file(enc, FailingAt(ds, 6), ds.names, out, key, "cls", 2, save_every=4)
    partial = tmp_path / "f.safetensors.partial"
    assert sorted(p.name for p in partial.glob("chunk-*")) == ["chunk-000000000000.safetensors"]
    assert not out.exists()
    capsys.readouterr()
    extract_to_file(enc, ds, ds.names, out, key, "cls", 2, save_every=4)
    assert "continuing after 4 of 10" in capsys.readouterr().err
    resumed = load_features(out)
    fresh = extract_to_file(enc, ds, ds.names, tmp_path / "g.safetensors", key, "cls", 3)
    assert torch.equal(resumed.features, load_features(fresh).features)
    assert resumed.names == ds.names
    # a partial run of other settings is not continued
    with pytest.raises(KeyboardInterrupt):
        extract_to_file(enc, FailingAt(ds, 6), ds.names, out, key, "cls", 2, save_every=4)
    extract_to_file(enc, ds, ds.names, out, key + "x", "cls", 2, save_every=4)
    assert "starting over" in capsys.readouterr().err


def test_features_skip_unreadable_images(ckpt, tmp_path, capsys):
    paths = write_images(tmp_path / "imgs", per_class=3)
    paths[1].write_bytes(b"not a png")
    out = tmp_path / "f.safetensors"
    args = ["features", "--checkpoint", str(ckpt), "--data", str(tmp_path / "imgs")]
    assert main([*args, "--out", str(out), "--workers", "0"]) == 0
    f = load_features(out)
    assert len(f.names) == 5 and "cat/001.png" not in f.names and f.metadata["skipped"] == "1"
    err = capsys.readouterr().err
    assert "cat/001.png" in err and "1 unreadable images left out" in err


def test_list_file_paths_urls_and_labels(tmp_path):
    paths = write_images(tmp_path / "imgs", per_class=2)
    lst = tmp_path / "lists" / "all.txt"
    lst.parent.mkdir()
    lst.write_text(
        "# a comment, then a blank line\n\n"
        f"../imgs/cat/000.png\n{paths[1]}\n"  # relative to the list file, absolute
        f"{paths[2].as_uri()}\n"  # a URL (file:// here; http(s) the same way)
        f"../imgs/dog/001.png\tbird\n"  # a class after a tab wins over the folder name
    )
    ds = ImageList(lst)
    assert ds.classes == ["bird", "cat", "dog"] and ds.labels == [1, 1, 2, 0]
    assert ds.names[0] == str(lst.parent / "../imgs/cat/000.png")
    for i in range(4):
        assert np.array_equal(np.asarray(ds[i][0]), np.asarray(Image.open(paths[i])))
    # a URL that cannot be fetched is a bad image (the bad-data policy applies), named
    lst.write_text(f"{paths[0]}\n{(tmp_path / 'gone.png').as_uri()}\n")
    with pytest.raises(DataError, match="gone.png"):
        ImageList(lst)[1]
    lst.write_text("../imgs/cat/000.png\n../imgs/cat/nope.png\n")
    with pytest.raises(DataError, match="1 of 2 local paths do not exist"):
        ImageList(lst)
    lst.write_text("# nothing\n")
    with pytest.raises(DataError, match="names no images"):
        ImageList(lst)


def test_list_files_for_pretraining_and_evaluation(ckpt, tmp_path, capsys):
    paths = write_images(tmp_path / "imgs", per_class=6)
    (tmp_path / "train.txt").write_text(
        "".join(f"imgs/{p.parent.name}/{p.name}\n" for p in paths[::2])
    )
    (tmp_path / "val.txt").write_text(
        "".join(f"imgs/{p.parent.name}/{p.name}\n" for p in paths[1::2])
    )
    train, held, classes = labelled_splits(str(tmp_path / "train.txt"), None, None, {})
    assert classes == ["cat", "dog"] and len(train) == len(held) == 6
    pre, bank, queries = build_datasets(str(tmp_path / "train.txt"), None, None, {}, 4, 2)
    assert len(pre) == 6 and len(queries) == 2 and len(bank) == 4
    out = tmp_path / "knn"
    args = ["knn", "--checkpoint", str(ckpt), "--data", str(tmp_path / "train.txt")]
    assert main([*args, "--out", str(out), "data.num_workers=0", "k=3"]) == 0
    assert json.loads((out / "results.json").read_text())["n_train"] == 6
    (tmp_path / "val.txt").unlink()
    assert main([*args, "--out", str(out)]) == 2
    assert "twin" in capsys.readouterr().err


def test_progress_plain_lines_and_grace():
    t = [0.0]
    buf = io.StringIO()
    with Progress(1000, "x", stream=buf, tty=False, clock=lambda: t[0]) as p:
        for _ in range(100):
            t[0] += 0.25
            p.update(10)
    # silent for the first GRACE_SECONDS (5 s: 200 images), then a line per 10 %, and the end
    assert GRACE_SECONDS == 5
    assert buf.getvalue().splitlines() == [
        "x 200/1000 img (20%), 40.0 img/s, 5s elapsed, ETA 20s",
        *(
            f"x {n}/1000 img ({n // 10}%), 40.0 img/s, {round(n / 40)}s elapsed, "
            f"ETA {round((1000 - n) / 40)}s"
            for n in range(300, 1000, 100)
        ),
        "x 1000/1000 img (100%), 40.0 img/s, 25s elapsed, done",
    ]
    # a short pass says nothing; a stream of unknown length shows count and rate every 30 s
    buf = io.StringIO()
    with Progress(None, "y", stream=buf, tty=False, clock=lambda: t[0]) as p:
        p.update(5)
    assert buf.getvalue() == ""
    with Progress(None, "y", stream=buf, tty=False, clock=lambda: t[0]) as p:
        t[0] += 40
        p.update(4)
    assert buf.getvalue().splitlines()[0] == "y 4 img, 0.1 img/s, 40s elapsed"
    # interrupted: the last line does not say done
    buf = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        with Progress(10, "z", stream=buf, tty=False, clock=lambda: t[0]) as p:
            t[0] += 6
            p.update(1)
            raise KeyboardInterrupt
    assert buf.getvalue().splitlines()[-1] == "z 1/10 img (10%), 0.2 img/s, 6s elapsed, ETA 54s"


def test_progress_shows_the_postfix_in_plain_lines():
    t = [0.0]
    buf = io.StringIO()
    with Progress(100, "pretrain", unit="step", stream=buf, tty=False, clock=lambda: t[0]) as p:
        t[0] += 6
        p.set_postfix(loss="0.5000")
        p.update(10)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "pretrain 10/100 step (10%), loss 0.5000, 1.7 step/s, 6s elapsed, ETA 54s"
    assert "\r" not in buf.getvalue()


def test_training_progress_in_a_log_is_plain_lines(tmp_path):
    """A training command whose stderr is a file writes progress lines with an ETA, not a
    bar's carriage returns (GRACE_SECONDS of silence first, so a slow-enough run)."""
    buf = io.StringIO()
    with TrainingJob(tmp_path / "run", "cmae test", keep_last=1, max_bad_steps=1) as job:
        job.begin({}, total=4, initial=0, batch_size=1, device=torch.device("cpu"))
        job.bar.stream, job.bar.t0 = buf, job.bar.t0 - 10  # as if 10 s had passed
        job.advance()
        job.log({"step": 1, "loss": 0.25}, loss=0.25)
        job.advance()
        job.close()
    text = buf.getvalue()
    assert "\r" not in text and "test 1/4 step (25%)" in text and "ETA" in text, text
    assert "loss 0.2500" in text.splitlines()[-1] and not text.rstrip().endswith("done")


def test_a_cut_short_pass_does_not_repeat_its_last_line():
    t = [0.0]
    buf = io.StringIO()
    p = Progress(10, "z", stream=buf, tty=False, clock=lambda: t[0])
    t[0] += 6
    p.update(1)  # the first line after the grace
    p.close(done=False)  # stopped with nothing new since
    assert buf.getvalue().splitlines() == ["z 1/10 img (10%), 0.2 img/s, 6s elapsed, ETA 54s"]
