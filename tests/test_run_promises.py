"""The promises every training command keeps (``cmae.train.lifecycle``), checked per command on
the built-in data: a second run on the same ``--out`` is refused with one line and no
traceback; SIGTERM (sent to the whole process group, as a scheduler does, data workers
included) saves and exits 75 within seconds; the same command again resumes and finishes;
non-finite steps are skipped, and ``max_bad_steps`` of them in a row stop the run with one
line, nothing non-finite saved.

A new training command keeps them by being added to ``COMMANDS``."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cmae.cli import main
from cmae.runtime.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    nonfinite_tensors,
    periodic_checkpoints,
)
from cmae.runtime.faults import EXIT_PREEMPTED
from cmae.runtime.runlock import RunLock
from tests.helpers import tiny_overrides

# each a tiny run of 12-15 optimizer steps with one data worker; (arguments, steps in all)
# pretraining's keys are under train.; the other commands' at the top
COMMANDS = {
    "pretrain": (
        [
            "--config",
            "tiny",
            *tiny_overrides(**{"model.encoder": "vit_micro"}),
            "data.synthetic_train=32",
            "data.num_workers=1",
            "train.batch_size=8",
            "train.epochs=3",
            "train.warmup_epochs=1",
            "train.knn_at_end=false",
            "train.threads=1",
        ],
        12,
    ),
    "finetune": (
        [
            "--checkpoint",
            "random",
            "encoder.preset=quick",
            "data.synthetic_train=40",
            "data.synthetic_val=8",
            "data.num_workers=1",
            "batch_size=8",
            "epochs=3",
            "warmup_epochs=1",
        ],
        15,
    ),
    "segment": (
        [
            "--checkpoint",
            "random",
            "data.synthetic_train=16",
            "data.synthetic_val=2",
            "data.synthetic_size=32",
            "data.crop=32",
            "data.scale=[64,32]",
            "data.stride=21",
            "data.num_workers=1",
            "data.vis_images=0",
            "model.channels=16",
            "model.aux_channels=8",
            "batch_size=4",
            "iters=12",
            "warmup_iters=2",
            "eval_every=0",
            "threads=1",
        ],
        12,
    ),
    "detect": (
        [
            "--checkpoint",
            "random",
            "encoder.preset=quick",
            "data.size=32",
            "data.synthetic_size=32",
            "data.synthetic_train=16",
            "data.synthetic_val=2",
            "data.num_workers=1",
            "data.vis_images=0",
            "model.channels=16",
            "model.rois_per_image=8",
            "model.proposals=20",
            "model.detections_per_image=5",
            "batch_size=2",
            "iters=12",
            "warmup_iters=2",
            "eval_every=0",
            "threads=1",
        ],
        12,
    ),
}
KEY_PREFIX = {"pretrain": "train."}
RESULTS = {"pretrain": "summary.json"}  # the end-of-run results file; else results.json
START_S = 300  # start-up (imports, data, model) on a busy machine
STOP_S = 30  # from the signal to the exit: finish the step, save, leave


def argv(command: str, out: Path) -> list[str]:
    return [command, "--out", str(out), *COMMANDS[command][0]]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_second_run_on_the_same_out_is_refused(tmp_path, capsys, command):
    out = tmp_path / "run"
    with RunLock(out):  # what a first run holds while it trains
        assert main(argv(command, out)) == 2
    err = capsys.readouterr().err
    assert "is in use by another run" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "config.yaml").exists()  # the refused run wrote nothing


@pytest.fixture(scope="module", params=list(COMMANDS))
def stopped(request, tmp_path_factory):
    """A run of the command in its own process group, sent SIGTERM (the whole group) once it
    trains (``config.yaml`` is written just before the first step): (command, out, exit
    status, seconds from the signal to the exit, output)."""
    command = request.param
    out = tmp_path_factory.mktemp(command) / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cmae", *argv(command, out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: the signal reaches only this run
    )
    deadline = time.monotonic() + START_S
    while not (out / "config.yaml").is_file() and proc.poll() is None:
        assert time.monotonic() < deadline, "the run did not start training"
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    try:
        output, _ = proc.communicate(timeout=STOP_S * 4)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return command, out, proc.returncode, time.monotonic() - sent, output


def test_sigterm_saves_and_exits_75_within_seconds(stopped):
    command, out, status, seconds, output = stopped
    assert status == EXIT_PREEMPTED, output[-3000:]
    assert seconds < STOP_S, f"{command} took {seconds:.1f}s to stop"
    assert "stopped by SIGTERM" in output and "Traceback" not in output, output[-3000:]
    saved = periodic_checkpoints(out)
    assert saved and 0 < saved[-1][0] < COMMANDS[command][1]  # mid-run


def test_the_same_command_resumes_and_finishes(stopped, capsys):
    command, out, status, _, _ = stopped
    assert status == EXIT_PREEMPTED
    assert main(argv(command, out)) == 0
    assert "resuming from" in capsys.readouterr().out
    assert '"resumed_from"' in (out / "log.jsonl").read_text()  # the log says where it resumed
    _, state = latest_checkpoint(out, ("step",))
    assert state["step"] == COMMANDS[command][1]


def test_a_trained_run_writes_only_its_missing_outputs(stopped, capsys):
    """A rerun of a finished run trains nothing; one whose results a kill or a full disk kept
    from being written writes them."""
    command, out, _, _, _ = stopped
    assert main(argv(command, out)) == 0  # finishes the run, if the test above did not
    results = out / RESULTS.get(command, "results.json")
    assert results.is_file()
    results.unlink()
    capsys.readouterr()
    assert main(argv(command, out)) == 0
    said = capsys.readouterr().out
    assert "is already trained to" in said and "writing the missing end-of-run outputs" in said
    assert results.is_file()


@pytest.mark.parametrize("command", COMMANDS)
def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, capsys, monkeypatch, command):
    """Every loss NaN: each step is skipped (no update), and the check after the 2nd in a row
    (``max_bad_steps=2``) ends the run with one line; the checkpoints saved hold finite values."""
    monkeypatch.setattr(f"cmae.train.{command}.poison_nonfinite", lambda loss: loss * torch.nan)
    key = f"{KEY_PREFIX.get(command, '')}max_bad_steps"
    out = tmp_path / "run"
    assert main([*argv(command, out), f"{key}=2"]) == 2
    err = capsys.readouterr().err
    last_line = err.strip().splitlines()[-1]  # after the progress bar
    assert last_line.startswith(f"cmae {command}: error: ") and f"({key}=2)" in last_line, err
    assert "Traceback" not in err, err
    for _, _, path in periodic_checkpoints(out):
        assert not nonfinite_tensors(load_checkpoint(path)), path
