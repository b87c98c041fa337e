"""Scale-out: DDP on CPU (gloo, 2 processes on 127.0.0.1) equals one process on the whole batch;
gradient accumulation equals one large batch; mixed precision and compile switches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import cmae.models.cmae
from cmae.config import ConfigError, from_dict, load_config
from cmae.models.cmae import build_model
from cmae.models.losses import gather_keys
from cmae.runtime.checkpoint import load_checkpoint
from cmae.runtime.device import resolve_amp
from cmae.runtime.distributed import (
    build_sampler,
    local_batch_size,
    setup_distributed,
    teardown_distributed,
    wrap_model,
)
from cmae.runtime.optim import param_groups
from cmae.train.pretrain import train_one_step
from tests.helpers import free_port, tiny_overrides

WORLD = 2
B = 4  # per-rank batch; the single-process reference runs the global batch WORLD * B
LR, MOMENTUM = 0.5, 0.9  # SGD: the update is -lr * grad, so equal updates mean equal gradients
CPU = torch.device("cpu")


def global_batch() -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """The views of the global batch and its masks (drawn once, rows split across ranks)."""
    g = torch.Generator().manual_seed(7)
    views = [torch.randn(WORLD * B, 3, 16, 16, generator=g) for _ in range(2)]
    masks = cmae.models.cmae.random_masking(WORLD * B, 4, 0.5, 1, generator=g)
    return views, masks


@contextmanager
def fixed_masks(masks: tuple[torch.Tensor, ...], start: int):
    """Each ``random_masking`` call takes the next rows of ``masks`` from row ``start``: the
    masks of a rank's (micro-)batches are then its rows of the global batch's masks."""
    original, pos = cmae.models.cmae.random_masking, [start]

    def take(n, *args, **kwargs):
        rows = slice(pos[0], pos[0] + n)
        pos[0] += n
        return tuple(m[rows] for m in masks)

    cmae.models.cmae.random_masking = take
    try:
        yield
    finally:
        cmae.models.cmae.random_masking = original


def one_step(method: str, rows: slice, accum_steps: int = 1) -> dict:
    """One SGD step of a tiny model on ``rows`` of the global batch (DDP when a process group
    exists). BatchNorm uses fixed statistics (eval mode): on CPU each rank normalises with its
    own batch, which cannot equal the whole batch's."""
    torch.manual_seed(0)
    cfg = load_config(None, tiny_overrides(**{"model.method": method, "model.mask_ratio": 0.5}))
    model = build_model(cfg.model).train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.eval()
    wrapped = wrap_model(model, CPU, compile=False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    views, masks = global_batch()
    views = [v[rows] for v in views]
    with fixed_masks(masks, rows.start):
        out = train_one_step(
            model, opt, views, lr=LR, momentum=MOMENTUM, wrapped=wrapped, accum_steps=accum_steps
        )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return {"loss": out.loss, "loss_contrast": out.loss_contrast, "state": state}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    assert setup_distributed(CPU) == CPU
    res: dict = {}
    # DDP broadcasts rank 0's weights, the frozen target branch included
    torch.manual_seed(100 + rank)
    model = build_model(load_config(None, tiny_overrides()).model)
    wrap_model(model, CPU, compile=False)
    res["broadcast"] = {k: v.clone() for k, v in model.state_dict().items()}
    res["sync_bn"] = any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    keys, offset = gather_keys(torch.full((B, 2), float(rank)))
    res["gather"] = (keys, offset)
    rows = slice(rank * B, (rank + 1) * B)
    res["mae"] = one_step("mae", rows)
    res["cmae"] = one_step("cmae", rows)
    res["cmae_accum"] = one_step("cmae", rows, accum_steps=2)
    sampler = build_sampler(list(range(20)), seed=3)
    res["sampler"] = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        res["sampler"].append(list(sampler))
    teardown_distributed()
    torch.save(res, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """The results of both ranks of one 2-process gloo group (spawned once for all tests)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def max_state_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
def test_ddp_broadcasts_all_weights_from_rank0(ranks):
    torch.manual_seed(100)
    rank0 = build_model(load_config(None, tiny_overrides()).model).state_dict()
    assert any(k.startswith("target_encoder.") for k in rank0)
    for res in ranks:
        assert max_state_diff(res["broadcast"], rank0) == 0.0
    assert not ranks[0]["sync_bn"]  # no SyncBatchNorm kernel on CPU: BatchNorm stays per rank


@pytest.mark.slow
def test_gather_keys_concatenates_ranks_with_offsets(ranks):
    for r, res in enumerate(ranks):
        keys, offset = res["gather"]
        assert keys.shape == (WORLD * B, 2) and offset == r * B
        assert torch.equal(keys[:, 0], torch.arange(WORLD).repeat_interleave(B).float())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mae", "cmae", "cmae_accum"])
def test_two_ranks_equal_one_process_on_the_whole_batch(ranks, name):
    """2 ranks x B (and, for cmae_accum, 2 micro-batches of B/2 per rank) == 1 x 2B: the mean
    of the ranks' losses and the weights after one step (online and EMA target)."""
    method = "mae" if name == "mae" else "cmae"
    ref = one_step(method, slice(0, WORLD * B))
    loss = torch.stack([r[name]["loss"] for r in ranks]).mean()
    d_loss = (loss - ref["loss"]).abs().item()
    d_state = max(max_state_diff(r[name]["state"], ref["state"]) for r in ranks)
    print(f"{name}: max abs diff loss {d_loss:.2e}, weights after the step {d_state:.2e}")
    assert d_loss < 1e-5 and d_state < 1e-5
    if method == "cmae":
        # every query saw all 2B keys: ~ 2 tau ln(2B) at init, not 2 tau ln(B)
        contrast = torch.stack([r[name]["loss_contrast"] for r in ranks]).mean()
        assert (contrast - ref["loss_contrast"]).abs().item() < 1e-5
    # the step moved the weights, so the comparison is not vacuous
    torch.manual_seed(0)
    init = build_model(
        load_config(None, tiny_overrides(**{"model.method": method})).model
    ).state_dict()
    assert max_state_diff(init, ref["state"]) > 1e-3


@pytest.mark.slow
def test_sampler_shards_are_disjoint_and_reshuffled_per_epoch(ranks):
    for epoch in (0, 1):
        shards = [res["sampler"][epoch] for res in ranks]
        assert len(shards[0]) == len(shards[1]) == 10
        assert sorted(shards[0] + shards[1]) == list(range(20))
    assert ranks[0]["sampler"][0] != ranks[0]["sampler"][1]


def test_accumulation_equals_one_large_batch_and_ema_runs_once(monkeypatch):
    """One process: accum_steps=2 on 2B == one batch of 2B (fixed BatchNorm statistics)."""
    ref = one_step("cmae", slice(0, WORLD * B))
    calls = {"forward": 0, "update_target": 0}
    for name in calls:
        original = getattr(cmae.models.cmae.CMAE, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cmae.models.cmae.CMAE, name, spy)
    acc = one_step("cmae", slice(0, WORLD * B), accum_steps=2)
    assert calls == {"forward": 2, "update_target": 1}
    d_loss = (acc["loss"] - ref["loss"]).abs().item()
    d_state = max_state_diff(acc["state"], ref["state"])
    print(f"accum 2 x {B} vs 1 x {2 * B}: max abs diff loss {d_loss:.2e}, weights {d_state:.2e}")
    assert d_loss < 1e-5 and d_state < 1e-5


def test_precomputed_keys_give_the_same_loss(tiny_model):
    model = tiny_model().train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.eval()
    views, masks = global_batch()
    with fixed_masks(masks, 0):
        plain = model(*views)
    with fixed_masks(masks, 0):
        keys = model.forward_key(views[1])
        shifted = torch.cat([torch.randn(3, keys.shape[1]), keys])  # 3 other keys first
        pre = model(views[0], keys=shifted, key_offset=3)
    assert torch.equal(pre.k, plain.k)
    assert pre.loss_pixel == plain.loss_pixel
    assert pre.loss_contrast != plain.loss_contrast  # 3 more negatives
    model.symmetric = True
    with pytest.raises(ValueError, match="symmetric"):
        model(views[0], keys=keys)


def test_amp_switch_changes_numerics_and_fp16_uses_a_scaler(tiny_model):
    assert resolve_amp("auto", CPU) is None
    assert resolve_amp("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_amp("fp16", CPU) is torch.float16 and resolve_amp("none", CPU) is None
    views, masks = global_batch()
    losses = {}
    for amp in (None, torch.bfloat16, torch.float16):
        model = tiny_model()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
        scaler = torch.amp.GradScaler("cpu") if amp is torch.float16 else None
        with fixed_masks(masks, 0):
            out = train_one_step(
                model, opt, views, lr=LR, momentum=MOMENTUM, amp=amp, scaler=scaler
            )
        assert out.loss.dtype == torch.float32  # losses reduce in fp32 under autocast
        losses[amp] = out.loss.item()
        if scaler is not None:
            assert scaler.get_scale() > 1.0  # the loss was scaled before backward
    assert losses[None] != losses[torch.bfloat16]
    assert abs(losses[None] - losses[torch.bfloat16]) < 0.05
    assert abs(losses[None] - losses[torch.float16]) < 0.05


def test_compile_switch_wraps_the_module(tiny_model):
    model = tiny_model()
    assert wrap_model(model, CPU, compile=False) is model  # one process: no DDP
    compiled = wrap_model(model, CPU, compile=True)  # lazy: nothing is compiled until called
    assert compiled is not model and isinstance(compiled, nn.Module)
    assert [id(p) for p in compiled.parameters()] == [id(p) for p in model.parameters()]


def test_sync_batchnorm_keeps_the_ema_pairing(tiny_model):
    """What ``wrap_model`` does on CUDA with several ranks: the projector, predictor and target
    projector become SyncBatchNorm with the same parameter names, so the EMA still pairs them."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(tiny_model())
    for name in ("projector", "predictor", "target_projector"):
        assert isinstance(getattr(model, name)[1], nn.SyncBatchNorm)
    before = model.target_projector[0].weight.clone()
    with torch.no_grad():
        model.projector[0].weight.add_(1.0)
    model.update_target(0.5)
    assert torch.allclose(model.target_projector[0].weight, before + 0.5)


def test_batch_size_errors_name_the_key():
    assert local_batch_size(64, 4, 2, contrastive=True) == 16
    with pytest.raises(ConfigError, match="train.batch_size"):
        local_batch_size(64, 3, 1, contrastive=True)
    with pytest.raises(ConfigError, match="train.batch_size.*BatchNorm"):
        local_batch_size(8, 4, 2, contrastive=True)
    assert local_batch_size(8, 4, 2, contrastive=False) == 2
    base = {"model": {"img_size": 16, "patch_size": 4}, "data": {"max_shift": 4}}
    for train, key in (
        ({"batch_size": 10, "accum_steps": 4}, "train.batch_size"),
        ({"accum_steps": 0}, "train.accum_steps"),
        ({"amp": "fp8"}, "train.amp"),
    ):
        with pytest.raises(ConfigError, match=key):
            from_dict({**base, "train": train})
    with pytest.raises(ConfigError, match="train.accum_steps.*symmetric"):
        from_dict({"model": {"symmetric": True}, "train": {"accum_steps": 2}})


@pytest.mark.slow
def test_torchrun_two_processes_checkpoint_continues_in_one_process(tmp_path):
    """``torchrun --nproc_per_node=2 -m cmae pretrain``: rank 0 alone writes the run directory;
    its checkpoint loads into a single-process model and optimizer and trains on."""
    out = tmp_path / "run"
    overrides = tiny_overrides(
        **{
            "train.max_steps": 2,
            "train.log_every": 1,
            "train.batch_size": 8,
            "train.knn_at_end": "false",
            "data.num_workers": 0,
            "data.synthetic_train": 32,
        }
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    cmd += ["-m", "cmae", "pretrain", "--config", "tiny", "--out", str(out), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("cmae pretrain:") == 1  # rank 0 prints, rank 1 does not
    assert "x 2 process(es)" in proc.stdout
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # one writer

    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 2 and not any(k.startswith("module.") for k in state["model"])
    cfg = from_dict(state["config"])
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), betas=cfg.train.betas)
    opt.load_state_dict(state["optimizer"])
    before = model.encoder.blocks[0].attn.qkv.weight.clone()
    views = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    out1 = train_one_step(model.train(), opt, views, lr=1e-3, momentum=cfg.train.momentum)
    assert torch.isfinite(out1.loss)
    assert not torch.equal(before, model.encoder.blocks[0].attn.qkv.weight)
