"""Exact resume: a training process killed (SIGKILL) or stopped (SIGTERM) at some step and then
resumed ends with the same weights, optimizer state and RNG state as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cmae.data.datasets import SyntheticShapes
from cmae.data.sampling import EpochSampler, SeededSamples
from cmae.data.views import PixelShiftViews
from cmae.runtime.checkpoint import load_checkpoint
from cmae.runtime.faults import EXIT_PREEMPTED
from cmae.runtime.resume import rng_state, set_deterministic, set_rng_state
from tests.helpers import free_port, tiny_overrides

# 32 images / batch 8 = 4 steps per epoch x 3 epochs; checkpoints every 3 steps and at epoch
# ends, so a kill lands before, on or between checkpoints
RUN = tiny_overrides(
    **{
        "model.encoder": "vit_micro",
        "data.synthetic_train": 32,
        "data.num_workers": 0,
        "train.batch_size": 8,
        "train.epochs": 3,
        "train.warmup_epochs": 1,
        "train.log_every": 1,
        "train.save_every_steps": 3,
        "train.knn_at_end": "false",
        "train.threads": 1,
        "train.deterministic": "true",
    }
)


def start(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cmae", "pretrain", "--config", "tiny", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*cmd, *RUN, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def finish(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    return output


def logged_step(out: Path) -> int:
    path = out / "log.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=0)


def final_state(out: Path) -> dict:
    state = load_checkpoint(out / "checkpoint.pt")
    return {"model": state["model"], "optimizer": state["optimizer"], "rng": state["rng"]}


def assert_bitwise_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a} != {b}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    finish(start(out))
    return final_state(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, workers, at_step",
    [(signal.SIGKILL, 0, 5), (signal.SIGKILL, 1, 4), (signal.SIGTERM, 0, 7)],
    ids=["sigkill", "sigkill-1-worker", "sigterm"],
)
def test_interrupted_run_resumes_bitwise(tmp_path, reference, sig, workers, at_step):
    out = tmp_path / "run"
    proc = start(out, f"data.num_workers={workers}")
    deadline = time.monotonic() + 240
    while logged_step(out) < at_step:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the run never reached the step"
        time.sleep(0.01)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert not (out / "summary.json").exists(), "the run ended before the signal"
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # the clean path: the step is finished, saved, and the message says how to go on
        assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
        assert "stopped by SIGTERM" in output and "to resume" in output
    log_before = (out / "log.jsonl").read_text()

    output = finish(start(out, f"data.num_workers={workers}"))
    assert "resuming from" in output
    log_after = (out / "log.jsonl").read_text()
    assert log_after.startswith(log_before), "the log was truncated on resume"
    assert '"resumed_from"' in log_after[len(log_before) :]
    # with 1 worker the result equals the 0-worker reference: augmentation is per-sample seeded
    assert_bitwise_equal(final_state(out), reference)


def test_epoch_sampler_starts_at_offset_without_loading_skipped_samples():
    loaded = []

    class Probe(torch.utils.data.Dataset):
        def __len__(self):
            return 20

        def __getitem__(self, i):
            loaded.append(i)
            return torch.zeros(1), 0

    base = torch.utils.data.DistributedSampler(Probe(), num_replicas=1, rank=0, seed=3)
    sampler = EpochSampler(base)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start=8)
    assert list(sampler) == full[8:] and len(sampler) == 12
    assert {e for e, _ in full} == {2}
    loader = torch.utils.data.DataLoader(SeededSamples(Probe(), 0), batch_size=4, sampler=sampler)
    assert len(list(loader)) == 3
    assert sorted(loaded) == sorted(i for _, i in full[8:])


def test_sample_views_depend_only_on_seed_epoch_index():
    views = PixelShiftViews(16, 4, (0.2, 1.0), (3 / 4, 4 / 3), 0.5)
    samples = SeededSamples(SyntheticShapes(8, 16, 0, views), seed=5)
    torch.manual_seed(1)
    a = samples[(3, 2)]
    before = torch.get_rng_state()
    torch.manual_seed(2)  # another process history: same views
    b = samples[(3, 2)]
    assert_bitwise_equal(a, b)
    torch.set_rng_state(before)
    samples[(3, 2)]
    assert torch.equal(torch.get_rng_state(), before), "the main RNG was consumed"
    assert not torch.equal(samples[(4, 2)][0][0], a[0][0]), "a new epoch must give new views"


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    import random

    import numpy as np

    state = rng_state(torch.device("cpu"))
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(load_checkpoint(tmp_path / "rng.pt"), torch.device("cpu"))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == got[:2] and torch.equal(expected[2], got[2])


def test_deterministic_flag_switches_torch_to_deterministic_kernels():
    was = torch.are_deterministic_algorithms_enabled()
    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        set_deterministic(False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(was)


# ---------------------------------------------------------------------------------------------
# stop signals


@pytest.mark.slow
def test_sigterm_in_process_saves_raises_preempted_and_restores_handlers(tmp_path, monkeypatch):
    from cmae.config import load_config
    from cmae.models.cmae import CMAE
    from cmae.runtime.faults import Preempted
    from cmae.train.pretrain import run

    calls = {"n": 0}
    forward = CMAE.forward

    def forward_then_signal(self, *args, **kwargs):  # the signal arrives during step 3
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(CMAE, "forward", forward_then_signal)
    handler = signal.getsignal(signal.SIGTERM)
    overrides = [o for o in RUN if not o.startswith("train.deterministic")]
    cfg = load_config(None, [*overrides, f"train.out={tmp_path}"])
    with pytest.raises(Preempted, match="stopped by SIGTERM at step 3") as e:
        run(cfg)
    assert signal.getsignal(signal.SIGTERM) is handler
    assert load_checkpoint(e.value.checkpoint)["step"] == 3  # the step was finished, then saved


def _stop_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from cmae.runtime.faults import StopSignals

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2"
    )
    dist.init_process_group("gloo")
    with StopSignals() as stop:
        for step in range(1, 6):
            if rank == 1 and step == 3:  # only rank 1 is told to stop
                os.kill(os.getpid(), signal.SIGUSR1)
            if stop.requested():
                break
    Path(out, f"rank{rank}").write_text(f"{step} {stop.name}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_all_ranks_stop_at_the_same_step(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_stop_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [(tmp_path / f"rank{r}").read_text() for r in range(2)]
    assert got == ["3 a stop signal on another rank", "3 SIGUSR1"]
