"""Multi-process faults: a stop signal while Python imports, the process-group timeout, and a
torchrun job with --max-restarts that loses a rank and ends bitwise equal to an uninterrupted
one (a small version of benchmarks/chaos_soak.py)."""

import datetime
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import cmae
from cmae.runtime import distributed

SRC = str(Path(cmae.__file__).resolve().parents[1])
ROOT = Path(SRC).parent


def test_a_stop_signal_while_importing_exits_75_with_the_message(tmp_path):
    # a module the cli imports, made slow: the signal lands inside the imports, every time
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "tqdm.py").write_text(
        "import sys, time\nprint('importing', flush=True)\ntime.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{slow}{os.pathsep}{SRC}"}
    p = subprocess.Popen(
        [sys.executable, "-m", "cmae", "pretrain", "--out", str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert p.stdout.readline().strip() == "importing"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 75
    assert err.strip() == (
        "cmae pretrain: stopped by SIGTERM during start-up, before training (nothing to save); "
        "run the same command again"
    )


def test_dist_timeout_reaches_the_process_group(monkeypatch):
    seen = {}

    def rendezvous(url, timeout):
        seen["rendezvous"] = timeout
        yield dist.HashStore(), 0, 2

    def init_process_group(backend, **kwargs):
        seen.update(kwargs, backend=backend)

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "3")
    monkeypatch.setattr(dist, "rendezvous", rendezvous)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(distributed, "_register", lambda store, rank: None)
    monkeypatch.setattr(distributed, "_store", None)  # put back after the test
    distributed.setup_distributed(torch.device("cpu"), 42.0)
    assert seen["timeout"] == seen["rendezvous"] == datetime.timedelta(seconds=42)
    assert seen["backend"] == "gloo" and seen["rank"] == 0 and seen["world_size"] == 2
    # each restart attempt reads its own keys, not the previous attempt's
    store = seen["store"]
    store.set("k", "v")
    assert isinstance(store, dist.PrefixStore)


@pytest.mark.slow
def test_torchrun_restarts_after_a_killed_rank_and_ends_bitwise_equal(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC}
    small = [
        "model.encoder=vit_micro",
        "model.img_size=16",
        "model.patch_size=4",
        "data.max_shift=4",
        "data.synthetic_train=96",
        "data.synthetic_val=16",
        "data.knn_bank=16",
        "data.knn_queries=16",
        "data.num_workers=1",
        "train.batch_size=8",
        "train.epochs=1",
        "train.warmup_epochs=1",
    ]
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "chaos_soak.py"),
            "--work",
            str(tmp_path),
            "--faults",
            "1",
            "--plan",
            "step/SIGKILL/1",
            "--steps-per-epoch",
            "12",
            *small,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    result = lines[-1]
    assert r.returncode == 0, (r.stdout, r.stderr[-2000:])
    assert lines[0]["fault"]["injected"]
    assert result["restarts"] == 1 and result["bitwise_equal"] and result["bytes_lost"] == 0
    out = (tmp_path / "chaos.out").read_text()
    # the survivor's one line, no traceback of its own
    assert "cmae pretrain: rank 1 stopped (killed); the run saved at step" in out
    assert "[rank0]: Traceback" not in out


@pytest.mark.slow
def test_one_process_soak_killed_during_an_evaluation_ends_bitwise_equal(tmp_path):
    # benchmarks/chaos_soak.py's one-process path (finetune, segment): killed inside the
    # held-out evaluation, rerun, the end equals an uninterrupted run's
    env = {**os.environ, "PYTHONPATH": SRC}
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "chaos_soak.py"),
            "--command",
            "finetune",
            "--work",
            str(tmp_path),
            "--faults",
            "1",
            "--plan",
            "evaluation/SIGKILL/0",
            "data.synthetic_train=16",
            "data.synthetic_val=8",
            "data.num_workers=1",
            "batch_size=8",
            "epochs=5",
            "warmup_epochs=1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.returncode == 0, (r.stdout, r.stderr[-2000:])
    assert lines[0]["fault"]["injected"] and lines[0]["fault"]["moment"] == "evaluation"
    result = lines[-1]
    assert result["restarts"] == 1 and result["bitwise_equal"] and result["bytes_lost"] == 0
    assert "[soak] attempt exited -9" in (tmp_path / "chaos.out").read_text()
