"""`cmae pretrain` faults around the run directory: a second run on the same --out, a refused
run, a kill after checkpoint.pt, a full disk (file-size limit) during and at the end of the
run, a stop signal during start-up."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import cmae
from cmae import cli
from cmae.runtime.checkpoint import load_checkpoint, periodic_checkpoints
from cmae.runtime.runlock import RunLock
from tests.helpers import tiny_overrides

SRC = str(Path(cmae.__file__).resolve().parents[1])


def args(out: Path, *extra: str) -> list[str]:
    return [
        "pretrain",
        "--out",
        str(out),
        *tiny_overrides(),
        "model.encoder=vit_micro",
        "data.synthetic_train=16",
        "data.synthetic_val=8",
        "data.knn_bank=16",
        "data.knn_queries=8",
        "data.num_workers=0",
        "train.batch_size=4",
        "train.epochs=2",
        "train.warmup_epochs=1",
        "train.log_every=1",
        "train.threads=1",
        *extra,
    ]


def test_second_run_on_the_same_out_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    with RunLock(out):  # a live run holds the directory
        assert cli.main(args(out)) == 2
    err = capsys.readouterr().err.strip()
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in err and "\n" not in err
    assert not (out / "config.yaml").exists() and not (out / "log.jsonl").exists()


@pytest.mark.slow
def test_refused_run_leaves_config_yaml(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(args(out, "train.max_steps=2", "train.knn_at_end=false")) == 0
    before = (out / "config.yaml").read_text()
    assert cli.main(args(out, "train.max_steps=4", "model.proj_dim=8")) == 2
    assert "different model" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == before


@pytest.mark.slow
def test_rerun_after_a_kill_before_the_end_outputs_writes_them(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(args(out)) == 0
    first = json.loads((out / "summary.json").read_text())
    # a kill after checkpoint.pt: the encoder, the end-of-run kNN and the summaries are missing
    for name in ("encoder.safetensors", "summary.json", "summary.md"):
        (out / name).unlink()
    capsys.readouterr()
    assert cli.main(args(out)) == 0
    assert "writing the missing end-of-run outputs" in capsys.readouterr().out
    again = json.loads((out / "summary.json").read_text())
    assert (out / "encoder.safetensors").is_file() and (out / "summary.md").is_file()
    assert again["steps"] == first["steps"] == 8 and again["loss"] == first["loss"]
    assert again["knn"] == first["knn"]  # the same weights, the same kNN


FULL_DISK = """
import resource, signal, sys
from cmae import cli
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_full_disk_during_and_at_the_end(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": SRC}
    cmd = [sys.executable, "-c", FULL_DISK]
    extra = ["train.save_every_steps=2", "train.knn_at_end=false", "data.num_workers=1"]
    # a checkpoint of this model is ~1.4 MB: every save fails, the log (small) is written
    p = subprocess.run(
        [*cmd, "500000", *args(out, *extra)], capture_output=True, text=True, env=env, timeout=300
    )
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    warnings = [x for x in p.stderr.splitlines() if x.startswith("warning: step")]  # own lines
    assert len(warnings) == 3 and all("training goes on" in x for x in warnings)  # 2, 4, 6
    error = p.stderr.strip().splitlines()[-1]
    assert error.startswith("cmae pretrain: error: could not write") and "checkpoint.pt" in error
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()][-1] == 8
    assert not list(out.rglob(".*.tmp"))
    # space freed: the same command trains from scratch (nothing was saved) and finishes
    p = subprocess.run(
        [*cmd, "100000000", *args(out, *extra)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 8
    assert periodic_checkpoints(out)[-1][0] == 6


def test_stop_signal_during_start_up(tmp_path, capsys, monkeypatch):
    real = cli.load_config

    def slow_start(*a, **kw):  # SIGTERM arrives while the config is read
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    monkeypatch.setattr(cli, "load_config", slow_start)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(args(tmp_path / "run")) == 75
    err = capsys.readouterr().err
    assert "stopped by SIGTERM during start-up" in err and "run the same command again" in err
    assert signal.getsignal(signal.SIGTERM) == before
