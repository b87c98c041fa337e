"""The run-directory lock: one live run per directory, stale locks of dead runs taken over."""

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import cmae
from cmae.runtime.checkpoint import remove_stale_temps
from cmae.runtime.runlock import LOCK_NAME, RunDirBusy, RunLock

SRC = str(Path(cmae.__file__).resolve().parents[1])

HOLD = """
import sys, time
from cmae.runtime.runlock import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def holder(run_dir: Path) -> subprocess.Popen:
    """A live process holding the lock of ``run_dir``."""
    env = {**os.environ, "PYTHONPATH": SRC}
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_run_is_refused_naming_the_holder(tmp_path):
    p = holder(tmp_path)
    try:
        with pytest.raises(RunDirBusy) as e:
            RunLock(tmp_path).acquire()
        msg = str(e.value)
        assert f"pid {p.pid}" in msg and socket.gethostname() in msg and "\n" not in msg
    finally:
        p.kill()
        p.wait()


def test_lock_of_a_killed_run_is_taken_over(tmp_path):
    p = holder(tmp_path)
    p.send_signal(signal.SIGKILL)  # no chance to release: the lock file stays behind
    p.wait()
    assert (tmp_path / LOCK_NAME).is_file()
    with RunLock(tmp_path) as lock:
        assert f"pid {os.getpid()}" in lock.holder()
    assert not (tmp_path / LOCK_NAME).exists()  # released on exit


def test_lock_is_released_for_the_next_run(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirBusy):  # a second lock, even in the same process
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):
        pass


def test_temp_cleanup_keeps_a_live_writers_temp_files(tmp_path):
    p = holder(tmp_path / "other")
    try:
        (tmp_path / "checkpoints").mkdir()
        live = tmp_path / "checkpoints" / f".step-000000004.pt.{p.pid}.abc123.tmp"
        dead = tmp_path / "checkpoints" / ".step-000000002.pt.999999999.xyz789.tmp"
        old_style = tmp_path / ".checkpoint.pt.k2j3h4.tmp"
        for f in (live, dead, old_style):
            f.write_bytes(b"partial")
        remove_stale_temps(tmp_path)
        assert live.exists() and not dead.exists() and not old_style.exists()
    finally:
        p.kill()
        p.wait()


def test_removing_and_recreating_the_run_dir_keeps_the_lock(tmp_path):
    run = tmp_path / "run"
    p = holder(run)
    try:
        shutil.rmtree(run)  # the live run's RUN/.lock goes with it
        run.mkdir()
        with pytest.raises(RunDirBusy) as e:
            RunLock(run).acquire()
        assert f"pid {p.pid}" in str(e.value)
        assert not (run / LOCK_NAME).exists()  # the refused run left nothing behind
    finally:
        p.kill()
        p.wait()
    with RunLock(run):  # the holder's death released both locks
        pass
