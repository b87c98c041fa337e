import importlib.util
import json
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from cmae.cli import main
from cmae.config import to_dict
from cmae.data.datasets import DataError, SyntheticShapes
from cmae.models.cmae import patchify
from cmae.runtime.checkpoint import save_checkpoint
from cmae.viz.plot import (
    PLOT_SIZE,
    MissingDependencyError,
    plot_run,
    read_log,
    series,
    write_summary,
)
from cmae.viz.visualize import (
    COLUMNS,
    HEADER,
    RunVisuals,
    reconstruction_rows,
    render_grid,
    unnormalize_patches,
)
from tests.helpers import small_run_args

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
# the dev extra installs matplotlib, so these run in CI; a bare install skips them
needs_mpl = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed"
)


def grid_size(cols, rows, tile, pad=4):
    return cols * tile + (cols + 1) * pad, HEADER + rows * tile + (rows + 1) * pad


def uint8_views(n, two=True):
    g = torch.Generator().manual_seed(0)
    make = lambda: torch.randint(0, 256, (3, 16, 16), generator=g, dtype=torch.uint8)
    return [(make(), make()) if two else (make(),) for _ in range(n)]


def test_unnormalize_patches_inverts_norm_pix():
    x = torch.randn(2, 5, 12) * 3 + 1
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
    normed = (x - mean) / (var + 1e-6).sqrt()  # the norm-pix target of losses.masked_pixel_loss
    assert torch.allclose(unnormalize_patches(normed, x), x, atol=1e-5)


def test_reconstruction_rows_columns(tiny_model):
    model = tiny_model()
    views = uint8_views(3)
    rows = reconstruction_rows(model, views, MEAN, STD, seed=1)
    assert len(rows) == 3 and all(len(r) == 5 for r in rows)
    original, masked, rec, pasted, target = rows[0]
    assert torch.equal(original, views[0][0]) and torch.equal(target, views[0][1])
    assert all(t.dtype == torch.uint8 and t.shape == (3, 16, 16) for t in rows[0])
    # masked tile: grey where masked, original where visible; pasted: the reverse from rec
    p = 4
    pm, po, pr, pp = (patchify(t[None].float(), p)[0] for t in (masked, original, rec, pasted))
    is_grey = (pm == 128).all(dim=1)
    visible = (pm == po).all(dim=1) & ~is_grey
    assert is_grey.sum() == 12 and visible.sum() == 4  # 16 px, patch 4, 2x2 blocks at 0.65
    assert torch.equal(pp[visible], po[visible]) and torch.equal(pp[is_grey], pr[is_grey])
    # same seed, same mask; and the mask follows the seed
    again = reconstruction_rows(model, views, MEAN, STD, seed=1)
    assert torch.equal(again[0][1], masked)
    other = reconstruction_rows(model, views, MEAN, STD, seed=2)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(rows, other, strict=True))
    # MAE: no target view, four columns
    mae_rows = reconstruction_rows(
        tiny_model(**{"model.method": "mae"}), uint8_views(2, two=False), MEAN, STD
    )
    assert all(len(r) == 4 for r in mae_rows)


def test_render_grid_size():
    tiles = [[torch.zeros(3, 16, 16, dtype=torch.uint8)] * 5] * 3
    img = render_grid(tiles, COLUMNS, tile=40)
    assert img.size == grid_size(5, 3, 40)
    assert img.getextrema() != ((255, 255),) * 3  # not a blank sheet


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    shapes = SyntheticShapes(3, size=24, seed=5)
    for i in range(3):
        shapes[i][0].save(d / f"{i}.png")
    return d


def test_visualize_cli_writes_png_of_expected_size(tmp_path, tiny_cfg, tiny_model, image_dir):
    ckpt = tmp_path / "checkpoint.pt"
    save_checkpoint({"model": tiny_model().state_dict(), "config": to_dict(tiny_cfg())}, ckpt)
    out = tmp_path / "vis.png"
    args = ["visualize", str(ckpt), "--images", str(image_dir), "--out", str(out), "--tile", "32"]
    assert main(args) == 0
    with Image.open(out) as im:
        assert im.size == grid_size(5, 3, 32) and im.mode == "RGB"
    assert out.stat().st_size > 1000
    # same seed, same picture
    assert main(args[:-2] + ["--tile", "32", "--out", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").read_bytes() == out.read_bytes()
    assert main(["visualize", str(ckpt), "--images", str(tmp_path / "no"), "--out", str(out)]) == 2


def write_log(run_dir, with_knn=True):
    run_dir.mkdir(exist_ok=True)
    recs = []
    for step in range(1, 21):
        recs.append(
            {
                "step": step,
                "epoch": step // 10,
                "loss": 2.0 / step,
                "loss_pixel": 1.0 / step,
                "loss_contrast": 1.0 / step,
                "lr": 1e-3 * step / 20,
                "momentum": 0.996,
                "img_per_s": 100.0,
            }
        )
        if with_knn and step % 10 == 0:
            recs.append({"step": step, "epoch": step // 10, "knn_top1": 20.0 + step})
    (run_dir / "log.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")


@needs_mpl
@pytest.mark.parametrize("with_knn", [True, False])
def test_plot_png_of_expected_size(tmp_path, with_knn):
    write_log(tmp_path / "run", with_knn)
    out = plot_run(tmp_path / "run")
    assert out == tmp_path / "run" / "curves.png"
    with Image.open(out) as im:
        assert im.size == PLOT_SIZE
    assert out.stat().st_size > 10_000


@needs_mpl
def test_plot_draws_the_random_init_baseline_from_the_summary(tmp_path):
    from cmae.viz.plot import random_init_knn

    run = tmp_path / "run"
    write_log(run, True)
    assert random_init_knn(run) is None  # no summary.json yet
    plain = np.asarray(Image.open(plot_run(run, tmp_path / "plain.png")).convert("L"))
    (run / "summary.json").write_text(json.dumps({"knn_random_init": {"top1": 25.0}}))
    assert random_init_knn(run) == 25.0
    with_line = np.asarray(Image.open(plot_run(run, tmp_path / "line.png")).convert("L"))
    h, w = plain.shape  # the kNN panel is the bottom-right quarter; elsewhere nothing changes
    assert (plain[: h // 2] == with_line[: h // 2]).all()
    assert (plain[h // 2 :, w // 2 :] != with_line[h // 2 :, w // 2 :]).sum() > 500
    (run / "summary.json").write_text("{not json")
    assert random_init_knn(run) is None


@needs_mpl
def test_plot_cli_and_errors(tmp_path, capsys, monkeypatch):
    write_log(tmp_path / "run")
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").is_file()
    assert main(["plot", str(tmp_path)]) == 2
    assert "no log.jsonl" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"cmae\[vis\]"):
        plot_run(tmp_path / "run")
    assert main(["plot", str(tmp_path / "run")]) == 2
    assert "matplotlib" in capsys.readouterr().err


@needs_mpl
def test_plot_several_runs_on_shared_axes(tmp_path, capsys):
    from cmae.viz.plot import _x_of, plot_runs, read_log, training_seconds

    for name in ("mae", "cmae"):
        write_log(tmp_path / name)
        (tmp_path / name / "config.yaml").write_text("train:\n  batch_size: 10\n")
    recs = read_log(tmp_path / "cmae")
    knn = [r for r in recs if "knn_top1" in r]
    # wall: 10 images a step at 100 img/s -> 0.1 s a step; epoch: the monitor's epoch + 1
    assert [_x_of(recs, "wall", tmp_path / "cmae")(r) for r in knn] == pytest.approx([1.0, 2.0])
    assert [_x_of(recs, "epoch", tmp_path / "cmae")(r) for r in knn] == [2, 3]
    # a loss record sits at its step's fraction of the epochs (the first kNN: step 10, epoch 2)
    assert _x_of(recs, "epoch", tmp_path / "cmae")(recs[0]) == pytest.approx(0.2)
    assert _x_of(recs, "epoch", tmp_path / "cmae")(knn[0]) == 2
    no_knn = [r for r in recs if "knn_top1" not in r]  # nothing tells the steps per epoch
    assert _x_of(no_knn, "epoch", tmp_path / "cmae")(no_knn[0]) is None
    # an interval spanning the monitor (its rate lowered by the monitor's time in older logs)
    # is timed at the rate before it: the wall axis is training time
    slow = [dict(r, img_per_s=5.0) if r.get("step") == 11 and "loss" in r else r for r in recs]
    assert [_x_of(slow, "wall", tmp_path / "cmae")(r) for r in knn] == pytest.approx([1.0, 2.0])
    slow = [dict(r, img_per_s=5.0) if r.get("step") == 12 else r for r in recs]  # not spanning
    assert _x_of(slow, "wall", tmp_path / "cmae")(knn[1]) == pytest.approx(2.0 - 0.1 + 2.0)
    assert training_seconds(tmp_path / "cmae") == pytest.approx(2.0)  # 20 steps of 0.1 s
    runs = [str(tmp_path / "mae"), str(tmp_path / "cmae")]
    for x in ("step", "epoch", "wall"):
        out = tmp_path / f"cmp_{x}.png"
        assert main(["plot", *runs, "--x", x, "--labels", "MAE", "CMAE", "--out", str(out)]) == 0
        with Image.open(out) as im:
            assert im.size == (PLOT_SIZE[0], PLOT_SIZE[1] // 2)
    with pytest.raises(ValueError, match="2 labels for 1 runs"):
        plot_runs(runs[:1], tmp_path / "x.png", labels=["a", "b"])
    (tmp_path / "mae" / "config.yaml").unlink()
    with pytest.raises(DataError, match="needs config.yaml"):
        plot_runs(runs, tmp_path / "x.png", "wall")


@needs_mpl
def test_summary_md(tmp_path, tiny_cfg):
    run = tmp_path / "run"
    write_log(run)
    summary = {"steps": 20, "wall_s": 3.5, "img_per_s": 91.4, "loss": 0.5, "loss_pixel": 0.4}
    summary |= {"loss_contrast": 0.1, "knn": {"top1": 40.0}, "knn_random_init": {"top1": 20.0}}
    text = write_summary(run, to_dict(tiny_cfg()), summary).read_text()
    for part in ("3.5 s", "91.4 images/s", "pixel 0.4000", "40.00 %", "random init 20.00 %"):
        assert part in text, part
    assert "last 40.00 %" in text and "![curves](curves.png)" in text
    assert (run / "curves.png").is_file() and "encoder: vit_tiny" in text


def test_summary_md_without_matplotlib(tmp_path, tiny_cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    run = tmp_path / "run"
    write_log(run)
    summary = {"steps": 20, "wall_s": 3.5, "img_per_s": 91.4, "loss": 0.5, "loss_pixel": 0.4}
    text = write_summary(run, to_dict(tiny_cfg()), summary).read_text()
    assert "91.4 images/s" in text and "curves.png" not in text
    assert not (run / "curves.png").exists()


def run_visuals(tmp_path, **kw):
    data = [(v, 0) for v in uint8_views(4)]
    return RunVisuals(tmp_path, dataset=data, mean=MEAN, std=STD, **kw)


def test_vis_every_draws_grids(tmp_path, tiny_model):
    model = tiny_model()
    off = run_visuals(tmp_path / "off", tensorboard=False, vis_every=0)
    on = run_visuals(tmp_path / "on", tensorboard=False, vis_every=2)
    for epoch in (1, 2, 3, 4):
        off.epoch_end(model, epoch, step=10 * epoch)
        on.epoch_end(model, epoch, step=10 * epoch)
    assert sorted(p.name for p in (tmp_path / "on").glob("*.png")) == [
        "recon_step000020.png",
        "recon_step000040.png",
    ]
    assert off.last_png is None and not list((tmp_path / "off").glob("*.png"))
    off.epoch_end(model, 4, step=45, last=True)  # the end of the run always draws
    on.epoch_end(model, 4, step=40, last=True)  # already drawn at this step
    assert off.last_png.name == "recon_step000045.png"
    assert len(list((tmp_path / "on").glob("*.png"))) == 2
    with Image.open(on.last_png) as im:
        assert im.size == grid_size(5, 4, 96)


def test_tensorboard_flag(tmp_path, tiny_model, monkeypatch):
    pytest.importorskip("tensorboard")
    off = run_visuals(tmp_path / "off", tensorboard=False, vis_every=1)
    off.log({"step": 1, "loss": 1.0})
    assert not (tmp_path / "off" / "tensorboard").exists()
    on = run_visuals(tmp_path / "on", tensorboard=True, vis_every=1)
    on.log({"step": 1, "epoch": 0, "loss": 1.0, "knn_top1": 12.5})
    on.epoch_end(tiny_model(), 1, step=1)
    on.close()
    events = list((tmp_path / "on" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 1000  # scalars + one image


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(MissingDependencyError, match="train.tensorboard"):
        run_visuals(tmp_path, tensorboard=True, vis_every=0)


@needs_mpl
@pytest.mark.slow
def test_pretrain_run_writes_pictures_and_summary(tmp_path):
    out = tmp_path / "run"
    args = small_run_args(out) + ["train.vis_every=1", "train.epochs=2", "train.max_steps=8"]
    assert main(args) == 0  # 64 images / batch 16: 4 steps per epoch
    assert sorted(p.name for p in out.glob("recon_*.png")) == [
        "recon_step000004.png",
        "recon_step000008.png",
    ]
    text = (out / "summary.md").read_text()
    assert "![curves](curves.png)" in text and "![reconstructions](recon_step000008.png)" in text
    assert (out / "curves.png").is_file() and "kNN top-1 at the end" in text
    png = tmp_path / "v.png"
    assert (
        main(["visualize", str(out / "checkpoint.pt"), "--images", str(out), "--out", str(png)])
        == 0
    )


def test_vis_every_is_validated():
    from cmae.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.vis_every"):
        load_config(None, ["train.vis_every=-1"])


def test_resumed_steps_are_drawn_once(tmp_path):
    # killed after step 6, resumed from the step-4 checkpoint: steps 5-6 were trained again
    recs = [{"step": s, "loss": 1.0} for s in range(1, 7)]
    recs += [{"step": 4, "resumed_from": "checkpoints/step-000000004.pt"}]
    recs += [{"step": s, "loss": 2.0} for s in range(5, 9)]
    recs += [{"step": 8, "epoch": 1, "knn_top1": 50.0}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    steps, losses = series(read_log(tmp_path), "loss")
    assert steps == list(range(1, 9))
    assert losses == [1.0] * 4 + [2.0] * 4  # the retrained steps' values, not the lost ones
    assert series(read_log(tmp_path), "knn_top1") == ([8], [50.0])


def test_monitor_time_is_kept_out_of_the_logged_speed(tmp_path):
    """The epoch-end monitor (kNN, pictures) is kept out of the logged speed: 10 images with a
    0.2 s monitor between would be at most 50 img/s if the monitor counted."""
    from types import SimpleNamespace

    from cmae.train.lifecycle import TrainingJob
    from cmae.train.pretrain import monitor_epoch

    visuals = SimpleNamespace(epoch_end=lambda *a: time.sleep(0.2))
    cfg = SimpleNamespace(train=SimpleNamespace(knn_every=0))
    job = TrainingJob(tmp_path, "cmae pretrain")
    job.begin({}, total=10, initial=0, batch_size=1, device=torch.device("cpu"))
    data = SimpleNamespace(bank_set=None)
    monitor_epoch(cfg, job, visuals, data, None, step=10, epoch=0, device=None)
    assert job.img_per_s(10) > 100
    job.close()
