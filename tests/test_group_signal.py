"""A stop signal sent to a run's whole process group (`pkill -f "cmae pretrain"`, a
scheduler signalling the job) reaches its data-loader workers too. The run must still stop
the clean way (save, "stopped by SIGTERM", exit 75), whether the signal lands while it trains
or while an evaluation inside the run (pretraining's epoch-end kNN monitor, segmentation's
validation) reads images through a loader of its own. Those loaders' workers once died of it
and the run ended with a traceback and lost the work since its last checkpoint."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cmae
from tests.helpers import SEGMENT_SMALL, tiny_overrides

SRC = str(Path(cmae.__file__).resolve().parents[1])
ROOT = str(Path(__file__).resolve().parents[1])  # so that the workers can import this module
LIMIT_S = 180

RUN = """
import sys
from cmae import cli
from cmae.train import pretrain, segment
from tests.helpers import SignalGroupOnRead

# the evaluation's loader signals the group from its worker
if sys.argv[1] == "monitor":
    real_knn = pretrain.evaluate_knn

    def evaluate_knn(cfg, data, encoder, device):
        data = data._replace(bank_set=SignalGroupOnRead(data.bank_set))
        return real_knn(cfg, data, encoder, device)

    pretrain.evaluate_knn = evaluate_knn
if sys.argv[1] == "segment":
    real_eval = segment.evaluate

    def evaluate(model, val_set, *args, **kwargs):
        return real_eval(model, SignalGroupOnRead(val_set), *args, **kwargs)

    segment.evaluate = evaluate
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """train/ and val/ with two class folders of small PNGs: the monitor reads them through a
    loader with a worker (the generated sets are read in-process)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 4)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(px).save(root / split / cls / f"{i}.png")
    return root


def start(mode: str, out: Path, data: Path | None = None) -> subprocess.Popen:
    args = SEGMENT_ARGS if mode == "segment" else PRETRAIN_ARGS
    args = [args[0], "--out", str(out), *args[1:]] + ([f"data.path={data}"] if data else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, ROOT])}
    return subprocess.Popen(
        [sys.executable, "-c", RUN, mode, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: the signal reaches the run alone
    )


PRETRAIN_ARGS = [
    "pretrain",
    *tiny_overrides(),
    "model.encoder=vit_micro",
    "data.num_workers=1",
    "train.batch_size=4",
    "train.epochs=3",
    "train.knn_every=1",
    "train.knn_at_end=false",
    "train.log_every=1",
    "train.threads=1",
]
# validation at iteration 2 of 4 (its loader has a worker even on the generated data)
SEGMENT_ARGS = [
    "segment",
    "--checkpoint",
    "random",
    *[a for a in SEGMENT_SMALL if not a.startswith("data.num_workers=")],
    "data.num_workers=1",
    "data.vis_images=0",
    "iters=4",
    "warmup_iters=1",
    "eval_every=2",
]


def finish(p: subprocess.Popen) -> tuple[int, str]:
    try:
        out, err = p.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"the run did not end within {LIMIT_S} s")
    return p.returncode, out + err


def assert_stopped_cleanly(rc: int, output: str, out: Path) -> None:
    assert rc == 75, output[-3000:]
    assert "stopped by SIGTERM at" in output and "Traceback" not in output, output[-3000:]
    assert list((out / "checkpoints").glob("step-*.pt")), "no checkpoint was saved"


@pytest.mark.slow
def test_group_sigterm_during_the_knn_monitor_stops_cleanly(tmp_path, folder):
    out = tmp_path / "run"
    rc, output = finish(start("monitor", out, folder))
    assert_stopped_cleanly(rc, output, out)
    log = (out / "log.jsonl").read_text()
    assert '"knn_top1"' in log  # the monitor finished its evaluation before the stop


@pytest.mark.slow
def test_group_sigterm_during_training_stops_cleanly(tmp_path, folder):
    out = tmp_path / "run"
    p = start("train", out, folder)
    log, deadline = out / "log.jsonl", time.monotonic() + LIMIT_S
    while not (log.is_file() and '"loss"' in log.read_text()):  # a step was trained
        if p.poll() is not None or time.monotonic() > deadline:
            os.killpg(p.pid, signal.SIGKILL)
            pytest.fail(f"the run did not start training: {p.communicate()[1][-2000:]}")
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGTERM)  # the main process and its loader workers alike
    rc, output = finish(p)
    assert_stopped_cleanly(rc, output, out)


@pytest.mark.slow
def test_group_sigterm_during_segmentation_validation_stops_cleanly(tmp_path):
    out = tmp_path / "seg"
    rc, output = finish(start("segment", out))
    assert_stopped_cleanly(rc, output, out)
    assert '"mIoU"' in (out / "log.jsonl").read_text()  # the validation finished first
