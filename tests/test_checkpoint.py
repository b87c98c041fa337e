"""Checkpoints of a run: atomic writes, retention, discovery of the newest valid one, disk
errors that never cost the last good checkpoint, and the save / resume config flags."""

import errno
import json
import os
import stat

import pytest
import torch

from cmae.config import load_config
from cmae.runtime import checkpoint
from cmae.runtime.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    RunCheckpoints,
    latest_checkpoint,
    load_checkpoint,
    periodic_checkpoints,
    periodic_name,
    remove_stale_temps,
    save_checkpoint,
    save_encoder,
)
from cmae.runtime.resume import RESUME_KEYS, find_resume
from cmae.train.pretrain import run
from tests.helpers import tiny_overrides


def state(step: int, value: float = 1.0) -> dict:
    return {
        "model": {"w": torch.full((4,), value)},
        "optimizer": {},
        "step": step,
        "rng": [],
        "config": {},
    }


def failing_save(obj, f, *args, **kwargs):
    """torch.save on a full disk: part of the file is written, then ENOSPC."""
    with open(f, "wb") as fh:
        fh.write(b"PK\x03\x04 half a checkpoint")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_failed_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    ckpts = RunCheckpoints(tmp_path, keep_last=1, keep_every_epochs=0)
    good = ckpts.save(state(4), step=4)
    monkeypatch.setattr(torch, "save", failing_save)
    assert ckpts.save(state(8, 2.0), step=8) is None
    err = capsys.readouterr().err
    assert "No space left on device" in err and str(good) in err and "training goes on" in err
    assert [p for _, _, p in periodic_checkpoints(tmp_path)] == [good]  # not pruned
    assert torch.equal(load_checkpoint(good)["model"]["w"], torch.ones(4))
    assert not list((tmp_path / "checkpoints").glob(".*.tmp")), "temp file left behind"
    with pytest.raises(CheckpointWriteError, match=str(good)):  # the final one raises
        ckpts.save_final(state(8))


def test_nonfinite_state_is_never_saved(tmp_path):
    ckpts = RunCheckpoints(tmp_path, keep_last=2, keep_every_epochs=0)
    ckpts.save(state(1), step=1)
    bad = state(2)
    bad["model"]["w"][1] = float("nan")
    with pytest.raises(CheckpointError, match=r"non-finite values in model\.w"):
        ckpts.save(bad, step=2)
    with pytest.raises(CheckpointError, match="non-finite"):
        ckpts.save_final(bad)
    assert [s for s, _, _ in periodic_checkpoints(tmp_path)] == [1]


@pytest.mark.parametrize("keep_every, kept", [(0, {9, 10}), (2, {4, 8, 9, 10})])
def test_retention_keeps_last_k_plus_every_n_epochs(tmp_path, keep_every, kept):
    ckpts = RunCheckpoints(tmp_path, keep_last=2, keep_every_epochs=keep_every)
    for step in range(1, 11):  # an epoch is 2 steps; epoch-end saves at the even steps
        ckpts.save(state(step), step, epoch=step // 2 if step % 2 == 0 else None)
    assert {s for s, _, _ in periodic_checkpoints(tmp_path)} == kept


def test_latest_checkpoint_skips_corrupt_and_incomplete_files(tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    save_checkpoint(state(3), folder / periodic_name(3))
    save_checkpoint({"model": {}, "step": 5}, folder / periodic_name(5))  # no optimizer/rng
    newest = folder / periodic_name(7, epoch=2)
    save_checkpoint(state(7), newest)
    newest.write_bytes(newest.read_bytes()[:200])  # truncated by a crash of the disk
    (folder / ".step-000000009.pt.abc.tmp").write_bytes(b"partial")
    path, loaded = latest_checkpoint(tmp_path, RESUME_KEYS)
    assert path == folder / periodic_name(3) and loaded["step"] == 3
    err = capsys.readouterr().err
    assert str(newest) in err and "corrupt or truncated" in err
    assert "not a resumable training checkpoint" in err
    remove_stale_temps(tmp_path)
    assert not list(folder.glob(".*.tmp"))
    # the final checkpoint.pt competes by the step inside it
    save_checkpoint(state(4), tmp_path / "checkpoint.pt")
    assert latest_checkpoint(tmp_path, RESUME_KEYS)[0] == tmp_path / "checkpoint.pt"
    assert find_resume("never", tmp_path) is None


def test_resume_path_must_be_a_training_checkpoint(tmp_path):
    save_checkpoint({"model": {}, "config": {}}, tmp_path / "exported.pt")
    with pytest.raises(CheckpointError, match="train.resume: .* is not a training checkpoint"):
        find_resume(str(tmp_path / "exported.pt"), tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        find_resume(str(tmp_path / "missing.pt"), tmp_path)
    # finetune / segment name their own key and command
    with pytest.raises(CheckpointError, match=r"^resume: .* of `cmae segment`$"):
        find_resume(str(tmp_path / "exported.pt"), tmp_path, "cmae segment", "")


# ---------------------------------------------------------------------------------------------
# in a training run (in-process, 4 steps per epoch)


def train(out, **extra) -> dict:
    base = {
        "model.encoder": "vit_micro",
        "data.synthetic_train": 16,
        "data.num_workers": 0,
        "train.batch_size": 4,
        "train.epochs": 2,
        "train.warmup_epochs": 1,
        "train.log_every": 1,
        "train.knn_at_end": "false",
        "train.threads": 1,
        "train.out": str(out),
    }
    return run(load_config(None, tiny_overrides(**{**base, **extra})))


def steps_logged(out) -> list[int]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.slow
def test_save_flags_choose_which_checkpoints_are_written(tmp_path):
    # epoch ends at steps 4, 8, 12 (16 is the final checkpoint.pt): the newest + epoch 2
    train(tmp_path / "a", **{"train.epochs": 4, "train.keep_last": 1, "train.keep_every_epochs": 2})
    assert [(s, e) for s, e, _ in periodic_checkpoints(tmp_path / "a")] == [(8, 2), (12, 3)]
    train(tmp_path / "b", **{"train.save_every_epochs": 0, "train.save_every_steps": 3})
    assert [(s, e) for s, e, _ in periodic_checkpoints(tmp_path / "b")] == [(3, None), (6, None)]


@pytest.mark.slow
def test_resume_auto_continues_and_never_restarts(tmp_path, capsys):
    out = tmp_path / "run"
    train(out, **{"train.max_steps": 3})
    summary = train(out, **{"train.max_steps": 6})  # resume=auto: from checkpoint.pt at step 3
    assert "resuming from" in capsys.readouterr().out
    # the speed of this segment: its 3 steps of 4 images over its own wall time
    assert summary["steps"] == 6
    assert summary["img_per_s"] * summary["wall_s"] == pytest.approx(3 * 4)
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]
    train(out, **{"train.max_steps": 2, "train.resume": "never"})
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6, 1, 2]  # appended, from scratch
    with pytest.raises(CheckpointError, match="model.proj_dim"):  # another model, same dir
        train(out, **{"train.max_steps": 4, "model.proj_dim": 8})


@pytest.mark.slow
def test_disk_full_during_training_loses_nothing(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real_save = torch.save

    def flaky_save(obj, f, *args, **kwargs):  # the 2nd and 3rd saves hit a full disk
        calls["n"] += 1
        if calls["n"] in (2, 3):
            return failing_save(obj, f)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", flaky_save)
    out = tmp_path / "run"
    summary = train(out, **{"train.save_every_steps": 2, "train.keep_last": 1})
    assert summary["steps"] == 8
    err = capsys.readouterr().err
    assert err.count("No space left on device") == 2
    # step 2 was saved, 4 (the epoch end) and 6 failed: step 2 stays, and the final one
    assert [s for s, _, _ in periodic_checkpoints(out)] == [2]
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 8


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_encoder_file_mode_follows_the_umask_like_checkpoints(tmp_path, umask):
    model = torch.nn.Module()
    model.encoder = torch.nn.Linear(2, 2)
    old = os.umask(umask)
    try:
        save_checkpoint(state(1), tmp_path / "checkpoint.pt")
        save_encoder(model, tmp_path / "encoder.safetensors")
    finally:
        os.umask(old)
    modes = {
        stat.S_IMODE((tmp_path / f).stat().st_mode)
        for f in ("checkpoint.pt", "encoder.safetensors")
    }
    assert modes == {0o666 & ~umask}
