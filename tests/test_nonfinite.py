"""Non-finite losses: the step is skipped on the device (no update, no EMA, BatchNorm statistics
kept), counted, logged; M bad steps in a row stop the run; checkpoints stay finite."""

import json

import pytest
import torch

from cmae.config import ConfigError, load_config
from cmae.data.views import normalize
from cmae.models.cmae import CMAE
from cmae.runtime.checkpoint import load_checkpoint, nonfinite_tensors, periodic_checkpoints
from cmae.runtime.faults import BadSteps, NonFiniteError
from cmae.runtime.optim import param_groups
from cmae.train.pretrain import run, train_one_step
from tests.helpers import tiny_overrides


def batch(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    views = [torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g) for _ in "ot"]
    return [normalize(v, (0.5,) * 3, (0.25,) * 3) for v in views]


def snapshot(model, opt) -> dict:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "opt": {
            i: {k: v.clone() for k, v in s.items()}
            for i, s in enumerate(opt.state_dict()["state"].values())
        },
    }


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        equal(a[k], b[k]) if isinstance(a[k], dict) else torch.equal(a[k], b[k]) for k in a
    )


@pytest.mark.parametrize("kind", ["fused", "foreach", "fp16-scaler"])
def test_nan_loss_skips_update_ema_and_batchnorm_stats(tiny_model, kind):
    model = tiny_model().train()
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, fused=kind == "fused")
    amp = torch.float16 if kind == "fp16-scaler" else None
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if amp else None
    bad = BadSteps(torch.device("cpu"))
    train_one_step(
        model, opt, batch(0), lr=1e-3, momentum=0.9, amp=amp, scaler=scaler, bad_steps=bad
    )
    before = snapshot(model, opt)

    forward = model.forward

    def nan_forward(*args, **kwargs):  # NaN in a term without a gradient path
        out = forward(*args, **kwargs)
        return out._replace(loss=out.loss + float("nan"))

    model.forward = nan_forward
    out = train_one_step(
        model, opt, batch(1), lr=1e-3, momentum=0.9, amp=amp, scaler=scaler, bad_steps=bad
    )
    assert out.loss.isnan()
    assert equal(snapshot(model, opt), before), "a skipped step changed the state"
    assert (bad.run.item(), bad.total.item()) == (1, 1)

    del model.forward
    train_one_step(
        model, opt, batch(2), lr=1e-3, momentum=0.9, amp=amp, scaler=scaler, bad_steps=bad
    )
    after = snapshot(model, opt)
    assert not equal(after["model"], before["model"]), "a good step must train again"
    assert bad.run.item() == 0 and bad.check(max_bad=3, step=3) == 1


def test_bad_steps_stop_after_m_in_a_row_even_between_checks(capsys):
    bad = BadSteps(torch.device("cpu"))
    ok, nan = torch.tensor(True), torch.tensor(False)
    for flag in (nan, nan, ok, nan):  # longest run 2 < 3
        bad.update(flag)
    assert bad.check(max_bad=3, step=4) == 3
    assert "3 step(s) skipped" in capsys.readouterr().out
    for flag in (nan, nan, ok, ok):  # with the open run of 1 before: 3 in a row, then good
        bad.update(flag)
    with pytest.raises(
        NonFiniteError, match=r"3 consecutive steps .checked at step 8.*train.max_bad_steps=3"
    ):
        bad.check(max_bad=3, step=8)


def train_with_nan_at(monkeypatch, out, bad_calls, **extra) -> dict:
    """A tiny in-process run whose forward returns a NaN loss on the calls in ``bad_calls``."""
    calls = {"n": 0}
    forward = CMAE.forward

    def flaky_forward(self, *args, **kwargs):
        calls["n"] += 1
        out = forward(self, *args, **kwargs)
        return out._replace(loss=out.loss * float("nan")) if calls["n"] in bad_calls else out

    monkeypatch.setattr(CMAE, "forward", flaky_forward)
    base = {
        "model.encoder": "vit_micro",
        "data.synthetic_train": 16,
        "data.num_workers": 0,
        "train.batch_size": 4,
        "train.epochs": 2,
        "train.warmup_epochs": 1,
        "train.log_every": 1,
        "train.save_every_steps": 1,
        "train.keep_last": 8,
        "train.knn_at_end": "false",
        "train.threads": 1,
        "train.out": str(out),
    }
    return run(load_config(None, tiny_overrides(**{**base, **extra})))


@pytest.mark.slow
def test_one_nan_step_is_skipped_and_logged(tmp_path, monkeypatch, capsys):
    train_with_nan_at(monkeypatch, tmp_path, bad_calls={3})
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["skipped_steps"] for r in records}
    assert skipped == {s: int(s == 3) for s in range(1, 9)}
    assert "step 3: 1 step(s) skipped" in capsys.readouterr().out
    # the skipped step left the weights as they were: checkpoints of steps 2 and 3 are equal
    ckpts = {s: load_checkpoint(p) for s, _, p in periodic_checkpoints(tmp_path)}
    for a, b in zip(ckpts[2]["model"].values(), ckpts[3]["model"].values(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(
        ckpts[3]["model"]["encoder.cls_token"], ckpts[4]["model"]["encoder.cls_token"]
    )
    assert not nonfinite_tensors(load_checkpoint(tmp_path / "checkpoint.pt"))


@pytest.mark.slow
def test_m_bad_steps_in_a_row_stop_with_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(NonFiniteError, match="train.max_bad_steps=3"):
        train_with_nan_at(monkeypatch, tmp_path, set(range(2, 99)), **{"train.max_bad_steps": 3})
    saved = periodic_checkpoints(tmp_path)
    assert [s for s, _, _ in saved] == [1, 2, 3]  # stopped at the check of step 4
    assert not (tmp_path / "checkpoint.pt").exists()
    for _, _, path in saved:
        assert not nonfinite_tensors(load_checkpoint(path))


def test_step_leaving_non_finite_weights_is_a_bad_step(tiny_model):
    model = tiny_model().train()
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, fused=True)
    bad = BadSteps(torch.device("cpu"))
    weight = model.encoder.blocks[0].mlp.fc1.weight
    real_step = opt.step

    def overflowing_step(*args, **kwargs):  # finite gradients in, a non-finite weight out
        real_step(*args, **kwargs)
        with torch.no_grad():
            weight[0, 0] = float("inf")

    opt.step = overflowing_step
    out = train_one_step(model, opt, batch(0), lr=1e-3, momentum=0.9, bad_steps=bad)
    assert torch.isfinite(out.loss)
    assert bad.total.item() == 1, "not counted as a bad step"
    with pytest.raises(NonFiniteError, match="weights became non-finite.*up to step 1"):
        bad.check(max_bad=20, step=1)


@pytest.mark.parametrize("lr, momentum", [(float("inf"), 0.9), (1e-3, float("nan"))])
def test_non_finite_lr_or_momentum_is_refused_before_the_step(tiny_model, lr, momentum):
    model = tiny_model().train()
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, fused=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="non-finite lr"):
        train_one_step(model, opt, batch(0), lr=lr, momentum=momentum)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_infinite_lr_in_the_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.lr: must be a finite number"):
        load_config(None, tiny_overrides(**{"train.lr": ".inf"}))
