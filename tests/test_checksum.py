"""Checkpoints carry a CRC-32 of their state: one flipped bit inside a tensor's bytes on disk
is refused on load, skipped on resume (the previous good checkpoint is used) and refused in
one line by the commands that read checkpoints."""

import zipfile
from pathlib import Path

import pytest
import torch

from cmae.cli import main
from cmae.config import load_config
from cmae.runtime.checkpoint import (
    CHECKSUM_KEY,
    CheckpointError,
    RunCheckpoints,
    latest_checkpoint,
    load_checkpoint,
    state_crc32,
)
from cmae.runtime.resume import RESUME_KEYS
from cmae.train.pretrain import run
from tests.helpers import tiny_overrides


def state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {
        "model": {"w": torch.randn(64, 64, generator=g), "b": torch.zeros(3, dtype=torch.bfloat16)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]},
        "step": step,
        "rng": [],
        "config": {},
    }


def flip_bit_in_largest_tensor(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor record of a torch zip file."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    assert info.compress_type == zipfile.ZIP_STORED  # torch stores tensors uncompressed
    raw = bytearray(path.read_bytes())
    name_len = int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def test_a_flipped_bit_is_refused_and_resume_uses_the_previous_checkpoint(tmp_path, capsys):
    checkpoints = RunCheckpoints(tmp_path, keep_last=3, keep_every_epochs=0)
    good = checkpoints.save(state(5), 5)
    newest = checkpoints.save(state(10), 10)
    loaded = load_checkpoint(newest)  # weights_only, and the checksum holds
    assert isinstance(loaded[CHECKSUM_KEY]["crc32"], int)
    assert torch.equal(loaded["model"]["w"], state(10)["model"]["w"])

    flip_bit_in_largest_tensor(newest)
    # torch itself loads the changed file without complaint
    changed = torch.load(newest, weights_only=True)["model"]["w"]
    assert not torch.equal(changed, state(10)["model"]["w"])
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(newest)
    path, resumed = latest_checkpoint(tmp_path, RESUME_KEYS)
    assert path == good and resumed["step"] == 5
    err = capsys.readouterr().err
    assert str(newest) in err and "checksum" in err


def test_the_checksum_covers_keys_dtypes_and_values():
    base = state(1)
    crc = state_crc32(base)
    assert state_crc32(state(1)) == crc  # deterministic
    renamed = {**base, "model": {"v": base["model"]["w"], "b": base["model"]["b"]}}
    recast = {**base, "model": {**base["model"], "b": base["model"]["b"].half()}}
    for changed in (renamed, recast, {**base, "step": 2}):
        assert state_crc32(changed) != crc


@pytest.mark.slow  # a short pretraining run: ~25 s on the shared 2-core machine
def test_commands_refuse_a_corrupt_checkpoint_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    small = {
        "model.encoder": "vit_micro",
        "data.synthetic_train": 8,
        "data.synthetic_val": 8,
        "data.knn_bank": 8,
        "data.knn_queries": 8,
        "data.num_workers": 0,
        "train.batch_size": 4,
        "train.epochs": 1,
        "train.warmup_epochs": 1,
        "train.knn_at_end": "false",
        "train.threads": 1,
        "train.out": str(out),
    }
    run(load_config(None, tiny_overrides(**small)))
    final = out / "checkpoint.pt"
    assert main(["export", str(final), "--out", str(tmp_path / "enc.safetensors")]) == 0
    flip_bit_in_largest_tensor(final)
    capsys.readouterr()
    assert main(["export", str(final), "--out", str(tmp_path / "enc2.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is corrupt" in err[0] and str(final) in err[0]
    assert not (tmp_path / "enc2.safetensors").exists()
