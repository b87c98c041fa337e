"""A stop signal sent to the whole process group (Slurm, Kubernetes, ``kill -- -PGID``) while
a data-loader worker is starting must not kill it: until the run's ``worker_init_fn`` has
installed its handler, a forked worker runs torch's own SIGTERM handler, which dies of a
SIGTERM that does not come from its parent. The run then ended with "DataLoader worker
exited unexpectedly" (exit 1) instead of saving and exiting 75. ``worker_options`` starts the
workers with the stop signals blocked, so the signal waits for the handler that ignores it.

The window is widened on purpose: the worker writes a marker and sleeps before the run's
``worker_init_fn`` runs; the test signals the group while it sleeps."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cmae

SRC = str(Path(cmae.__file__).resolve().parents[1])
ROOT = str(Path(__file__).resolve().parents[1])

SCRIPT = """
import sys, time
from pathlib import Path
import torch
from torch.utils.data import DataLoader
from cmae.runtime.faults import StopSignals, worker_options

marker = Path(sys.argv[1])
paired = sys.argv[2] == "paired"


class SlowStart:
    # a worker whose start is slow (imports, a cold file system) before the run's handler
    def __init__(self, init):
        self.init = init

    def __call__(self, worker_id):
        (marker.parent / f"{marker.name}.{worker_id}").write_text("started")
        time.sleep(2.0)
        self.init(worker_id)


with StopSignals() as signals:
    init = signals.worker_init_fn
    options = worker_options(2, init)
    if not paired:  # the handler without the blocked start: the old window
        options.pop("multiprocessing_context", None)
    options["worker_init_fn"] = SlowStart(init)
    loader = DataLoader(torch.arange(8.0), batch_size=2, **options)
    total = sum(float(b.sum()) for b in loader)
    print("total", total, "stop requested", signals.received is not None, flush=True)
"""


def run_and_signal(tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    marker = tmp_path / "worker"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, ROOT]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(marker), mode],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a job under a scheduler
    )
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"worker.{i}").exists() for i in range(2)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGTERM)  # both workers are inside their slow start
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_group_sigterm_during_worker_start_reaches_the_ignoring_handler(tmp_path):
    done = run_and_signal(tmp_path, "paired")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "total 28.0 stop requested True" in done.stdout, done.stdout + done.stderr[-2000:]


def test_without_the_blocked_start_the_worker_dies(tmp_path):
    # the window this guards against is real: the same run without the context loses a worker
    done = run_and_signal(tmp_path, "unpaired")
    assert done.returncode != 0
    assert "exited unexpectedly" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("workers", [0, 2])
def test_worker_options_pair_the_context_with_the_handler(workers):
    from cmae.runtime.faults import StopSignals, worker_options

    plain = worker_options(workers, None)
    assert "multiprocessing_context" not in plain
    with StopSignals() as signals:
        opts = worker_options(workers, signals.worker_init_fn)
    assert opts["worker_init_fn"] is signals.worker_init_fn
    assert ("multiprocessing_context" in opts) == (workers > 0)  # DataLoader refuses it at 0
