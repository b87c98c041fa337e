"""Saves on a really full file system: torch.save then raises RuntimeError ("unexpected pos"),
safetensors a SafetensorError, not OSError. Simulated with a file-size limit (RLIMIT_FSIZE,
any Linux) and, where the test may mount one, a small tmpfs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import cmae

SRC = str(Path(cmae.__file__).resolve().parents[1])

SAVES = """
import resource, shutil, signal, sys, torch
from torch import nn
from cmae.runtime.checkpoint import CheckpointWriteError, RunCheckpoints, save_encoder
run, limit = sys.argv[1], int(sys.argv[2])
small = {"model": {"w": torch.ones(10)}, "step": 1}
big = {"model": {"w": torch.ones(400_000)}, "step": 2}  # 1.6 MB
model = nn.Module()
model.encoder = nn.Linear(1000, 400)  # 1.6 MB
ckpts = RunCheckpoints(run, keep_last=1, keep_every_epochs=0)
print("good", ckpts.save(small, step=1), flush=True)
if limit:  # a write past the limit fails with EFBIG instead of killing us with SIGXFSZ
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
free = shutil.disk_usage(run).free
print("periodic", ckpts.save(big, step=2), flush=True)
print("space kept by the failed save", free - shutil.disk_usage(run).free)
for name, save in [("final", lambda: ckpts.save_final(big)),
                   ("encoder", lambda: save_encoder(model, run + "/e.safetensors"))]:
    try:
        save()
        print(name, "saved")
    except CheckpointWriteError as e:
        print(name, "error:", e)
"""


def run_saves(run_dir: Path, limit: int) -> list[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run(
        [sys.executable, "-c", SAVES, str(run_dir), str(limit)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines() + out.stderr.splitlines()


def check(lines: list[str], run_dir: Path) -> None:
    good = run_dir / "checkpoints" / "step-000000001.pt"
    assert f"good {good}" in lines
    assert "periodic None" in lines  # reported, training would go on
    warning = next(x for x in lines if x.startswith("warning: step 2"))
    assert f"the last good checkpoint is {good}" in warning and "training goes on" in warning
    final = next(x for x in lines if x.startswith("final error:"))
    assert str(good) in final and "run the same command again" in final
    assert good.is_file() and not (run_dir / "checkpoint.pt").exists()
    encoder = next(x for x in lines if x.startswith("encoder"))
    assert encoder.startswith(f"encoder error: could not write {run_dir / 'e.safetensors'}")
    assert not list(run_dir.rglob(".*.tmp")), "a failed save left its temp file"


def test_file_size_limit(tmp_path):
    lines = run_saves(tmp_path, limit=1_000_000)
    check(lines, tmp_path)
    assert "file-size limit" in next(x for x in lines if x.startswith("final error:"))
    assert "File too large" in next(x for x in lines if x.startswith("encoder error:"))


def test_full_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)], capture_output=True
        ).returncode
    ):
        pytest.skip("cannot mount a tmpfs here (needs root); test_file_size_limit covers it")
    try:
        lines = run_saves(mnt, limit=0)
        check(lines, mnt)
        # the failed save's temp file is gone and its space free while the process goes on
        assert "space kept by the failed save 0" in lines
        final = next(x for x in lines if x.startswith("final error:"))
        assert "disk full" in final and "MiB free on its file system" in final
        assert "No space left" in next(x for x in lines if x.startswith("encoder error:"))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
