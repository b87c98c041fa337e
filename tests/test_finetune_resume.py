"""`cmae finetune` stopped by a signal (mid-epoch or at an epoch's end) saves, exits 75, and the
same command resumes to exactly the weights and accuracies of an uninterrupted run, with
RandAugment, random erasing, mixup / cutmix and drop path on (their draws come from Python's,
NumPy's and torch's generators, in the loader workers and the main process)."""

import json

import pytest
import torch
import yaml

from cmae.cli import main
from cmae.config import load_config, to_dict
from cmae.runtime.checkpoint import latest_checkpoint, save_checkpoint
from cmae.runtime.faults import EXIT_PREEMPTED, StopSignals
from tests.helpers import tiny_overrides

# 40 train images / batch 8 = 5 steps per epoch x 3 epochs; evaluated after epochs 2 and 3
DATA = ["data.synthetic_train=40", "data.synthetic_val=20", "data.synthetic_size=16"]
TRAIN = ["batch_size=8", "epochs=3", "warmup_epochs=1", "eval_every=2", "drop_path=0.1"]


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("preset") / "micro16.yaml"
    cfg = load_config(None, tiny_overrides(**{"model.encoder": "vit_micro"}))
    path.write_text(yaml.safe_dump({"model": to_dict(cfg.model), "data": to_dict(cfg.data)}))
    return path


def args(out, preset, workers, *extra):
    return [
        "finetune",
        "--checkpoint",
        "random",
        "--out",
        str(out),
        f"encoder.preset={preset}",
        *DATA,
        f"data.num_workers={workers}",
        *TRAIN,
        *extra,
    ]


def final_state(out) -> dict:
    path, state = latest_checkpoint(out, ("model", "step"))
    assert state["step"] == 15, path
    return state


def evaluations(out) -> list[dict]:
    """The evaluated epochs' records, without their speed (a time, not a result)."""
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "img_per_s"} for r in lines if "top1" in r]


@pytest.fixture(scope="module")
def reference(preset, tmp_path_factory):
    """An uninterrupted run, for each number of loader workers."""
    runs = {}
    for workers in (0, 1):
        out = tmp_path_factory.mktemp(f"ref{workers}")
        assert main(args(out, preset, workers)) == 0
        runs[workers] = out
    return runs


@pytest.mark.slow
@pytest.mark.parametrize(
    "workers, stop_call, stopped_at",
    [(0, 7, 7), (1, 5, 5)],  # a mid-epoch step; the end of epoch 1 (the 5th check)
)
def test_stopped_finetune_resumes_exactly(
    tmp_path, preset, reference, monkeypatch, capsys, workers, stop_call, stopped_at
):
    calls = [0]

    def requested(self) -> bool:  # a SIGTERM that lands before the stop_call-th check
        calls[0] += 1
        return calls[0] >= stop_call

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(StopSignals, "requested", requested)
        assert main(args(out, preset, workers)) == EXIT_PREEMPTED
    printed = capsys.readouterr().out
    assert f"at step {stopped_at}; saved" in printed and "resume=auto" in printed
    assert not (out / "results.json").exists()
    assert main(args(out, preset, workers)) == 0
    assert "resuming from" in capsys.readouterr().out

    ref = reference[workers]
    got, want = final_state(out), final_state(ref)
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), k
    assert evaluations(out) == evaluations(ref)
    res, ref_res = (json.loads((d / "results.json").read_text()) for d in (out, ref))
    assert {k: res[k] for k in ("top1", "top5", "best_top1", "final_loss")} == {
        k: ref_res[k] for k in ("top1", "top5", "best_top1", "final_loss")
    }


@pytest.mark.slow
def test_rerun_of_a_finished_finetune_trains_nothing(preset, reference, capsys):
    out = reference[0]
    before = (out / "results.json").read_text()
    assert main(args(out, preset, 0)) == 0
    assert "already trained to step 15" in capsys.readouterr().out
    assert (out / "results.json").read_text() == before


@pytest.mark.slow
def test_resume_into_another_model_is_refused(tmp_path, preset, reference, capsys):
    out = tmp_path / "run"
    path, _ = latest_checkpoint(reference[0], ("model",))
    # another head size (trainable_blocks changes what the checkpoint is of)
    assert main(args(out, preset, 0, f"resume={path}", "trainable_blocks=1")) == 2
    err = capsys.readouterr().err
    assert "trainable_blocks" in err and "Traceback" not in err and len(err.splitlines()) == 1
    # the message names finetune's own keys, not pretraining's
    assert "use another out or resume=never" in err and "train." not in err
    # a checkpoint that is not a training checkpoint (an exported model): a one-line exit 2
    save_checkpoint({"model": {}, "config": {}}, tmp_path / "exported.pt")
    assert main(args(out, preset, 0, f"resume={tmp_path / 'exported.pt'}")) == 2
    err = capsys.readouterr().err
    assert err.startswith("cmae finetune: error: resume: ") and len(err.splitlines()) == 1
    assert "`cmae finetune`" in err and "train." not in err
