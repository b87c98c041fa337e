"""``cmae pretrain``: CMAE / MAE pretraining, one process or many under torchrun (DDP)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, NoReturn

import torch
import torch.nn as nn
import yaml
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cmae.config import Config, ConfigError, TrainConfig, to_dict
from cmae.data.datasets import DataError, InMemory, build_datasets, loader_workers
from cmae.data.pipeline import build_device_color, build_device_views, build_views, to_device
from cmae.data.sampling import BadImages, EpochSampler, SeededSamples
from cmae.data.views import DeviceTargetColor, DeviceViews, collate_boxes, eval_transform
from cmae.eval.knn import knn_eval
from cmae.interop.export import encoder_format
from cmae.models.cmae import CMAE, CMAEOutput, build_encoder, build_model
from cmae.models.losses import gather_keys
from cmae.models.vit import set_fused_attention, use_fused_attention
from cmae.runtime.checkpoint import (
    RunCheckpoints,
    RunLog,
    remove_stale_temps,
    save_encoder,
    save_text,
    warn,
)
from cmae.runtime.device import keep_freed_memory, resolve_amp, resolve_device, seed_everything
from cmae.runtime.distributed import (
    build_sampler,
    is_main,
    local_batch_size,
    no_sync,
    rank,
    setup_distributed,
    teardown_distributed,
    world_size,
    wrap_model,
)
from cmae.runtime.optim import cosine_lr, momentum_at, param_groups
from cmae.runtime.runlock import lock_run_dir
from cmae.train.faults import (
    BadSteps,
    StopSignals,
    grads_finite,
    keep_buffers_unless,
    poison_nonfinite,
    step_unless_bad,
    weights_finite,
)
from cmae.train.monitor import contrastive_health
from cmae.train.resume import find_resume, restore_training, set_deterministic, training_state
from cmae.viz.plot import LOSSES, read_log, write_summary
from cmae.viz.visualize import RunVisuals


def train_one_step(
    model: CMAE,
    optimizer: torch.optim.Optimizer,
    views: list[torch.Tensor],
    lr: float,
    momentum: float,
    wrapped: torch.nn.Module | None = None,
    accum_steps: int = 1,
    amp: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    bad_steps: BadSteps | None = None,
) -> CMAEOutput:
    """One optimizer step on this rank's batch ``views``, in ``accum_steps`` micro-batches.

    ``wrapped``: what runs the forward (DDP / torch.compile around ``model``; default model).
    With accumulation the keys of all micro-batches are computed first (no gradient) and
    gathered across ranks, so each micro-batch's queries see the keys of the whole global
    batch: loss and gradient equal one large batch's, BatchNorm statistics aside (they are
    per micro-batch). The returned losses are the micro-batch mean.

    A step with a non-finite loss or gradient is skipped on the device (no host sync): no
    update, no EMA, BatchNorm statistics kept; ``bad_steps`` counts it (cmae.train.faults).
    """
    wrapped = model if wrapped is None else wrapped
    if not (math.isfinite(lr) and math.isfinite(momentum)):  # host floats: free to check
        raise ConfigError(f"non-finite lr {lr} or EMA momentum {momentum} (check train.*)")
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    buffers = list(model.buffers())
    before = [b.clone() for b in buffers]  # BatchNorm statistics, put back if the step is bad
    autocast = torch.autocast(views[0].device.type, dtype=amp) if amp is not None else nullcontext()
    micro = list(zip(*(v.chunk(accum_steps) for v in views), strict=True))
    keys = None
    if accum_steps > 1 and model.contrastive:
        with autocast:
            keys, offset = gather_keys(torch.cat([model.forward_key(mb[1]) for mb in micro]))
    outs = []
    for i, mb in enumerate(micro):
        # gradients are all-reduced once, in the last micro-batch's backward
        with no_sync(wrapped, skip=i < accum_steps - 1):
            with autocast:
                if keys is None:
                    out = wrapped(*mb)
                else:
                    out = wrapped(mb[0], keys=keys, key_offset=offset + i * mb[0].shape[0])
            loss = poison_nonfinite(out.loss) / accum_steps  # NaN/Inf -> NaN grads, skipped
            (scaler.scale(loss) if scaler is not None else loss).backward()
        outs.append(CMAEOutput(*(x if x is None else x.detach() for x in out)))
    if scaler is not None:
        scaler.unscale_(optimizer)
    ok = grads_finite(model.parameters())  # all ranks agree: the gradients are all-reduced
    if scaler is not None:
        scaler.step(optimizer)  # skips non-finite gradients itself
        scaler.update()
    else:
        step_unless_bad(optimizer, ok)
    # after the optimizer step, once per step; momentum 1 leaves the target of a bad step
    model.update_target(torch.where(ok, momentum, 1.0))
    keep_buffers_unless(buffers, before, ok)
    if bad_steps is not None:
        # finite gradients can still give non-finite weights (an lr too large for them); no
        # later step repairs them, so the run stops at the next check (one fused norm, no sync)
        weights_ok = weights_finite(p for p in model.parameters() if p.requires_grad)
        bad_steps.update(ok & weights_ok, weights_ok)
    if len(outs) == 1:
        return outs[0]
    fields = list(zip(*outs, strict=True))  # the losses are averaged, the tensors concatenated
    return CMAEOutput(
        *(torch.stack(f).mean() for f in fields[:3]),
        *(None if f[0] is None else torch.cat(f) for f in fields[3:]),
    )


def run(cfg: Config) -> dict:
    # SIGTERM / SIGUSR1: finish the step, save, raise Preempted (`cmae pretrain` exits 75);
    # one run per directory: a second one is refused, naming the first (cmae.runtime.runlock)
    with lock_run_dir(cfg.train.out), StopSignals() as stop:
        return train(cfg, stop)


class Data(NamedTuple):
    """The training data, its loader, and the labelled kNN splits (None without labels)."""

    train_set: Dataset
    bank_set: Dataset | None
    query_set: Dataset | None
    samples: SeededSamples
    sampler: EpochSampler
    loader: DataLoader
    device_color: DeviceTargetColor | None  # None: the data workers do the colour ops
    device_views: DeviceViews | None  # None: the data workers resize the crops


class Trainee(NamedTuple):
    """The model and what steps it."""

    model: CMAE
    wrapped: nn.Module  # DDP / torch.compile around model; what runs the forward
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    amp: torch.dtype | None
    base_lr: float


class Plan(NamedTuple):
    steps_per_epoch: int
    total_steps: int  # the schedules' length
    warmup_steps: int
    last_step: int  # where this run stops (train.max_steps or the end)


class Resumed(NamedTuple):
    step: int
    bad_counts: tuple[int, int]  # unreadable images: run total, this epoch
    path: str | None


@dataclass
class RunOutputs:
    """What the run writes as it goes (rank 0; the other ranks hold no log file)."""

    out_dir: Path
    visuals: RunVisuals
    checkpoints: RunCheckpoints
    log_file: RunLog | None
    bar: tqdm
    batch_size: int  # global: img_per_s
    start: float
    start_step: int  # after a resume, the summary's speed counts the steps trained since
    tick: float
    tick_step: int

    def write(self, rec: dict) -> None:
        self.log_file.write(rec)
        self.visuals.log(rec)

    def log_step(
        self,
        step: int,
        epoch: int,
        out: CMAEOutput,
        lr: float,
        momentum: float,
        bad_images: int,
        skipped: int,
    ) -> None:
        # .item() is a host-device sync point: only on logging steps
        now = time.perf_counter()
        rec = {
            "step": step,
            "epoch": epoch,
            "loss": out.loss.item(),
            "loss_pixel": out.loss_pixel.item(),
            "loss_contrast": out.loss_contrast.item(),
            "lr": lr,
            "momentum": momentum,
            "img_per_s": (step - self.tick_step) * self.batch_size / (now - self.tick),
            "bad_images": bad_images,  # unreadable files replaced, run total
            "skipped_steps": skipped,  # non-finite steps since the last record
        }
        if out.q is not None:  # contrastive health: pos_cos, neg_cos, key_std
            rec.update(contrastive_health(out.q, out.k))
        self.tick, self.tick_step = now, step
        self.write(rec)
        self.bar.set_postfix(
            loss=f"{rec['loss']:.4f}",
            pix=f"{rec['loss_pixel']:.4f}",
            con=f"{rec['loss_contrast']:.4f}",
        )


# ---------------------------------------------------------------------------------------------
# setup: each step returns what the loop needs, in the order the random streams depend on


def setup_process(cfg: Config) -> tuple[torch.device, Path]:
    """Join the process group (under torchrun; only rank 0 prints and writes files), set
    threads, allocator, determinism and seeds."""
    t = cfg.train
    device = setup_distributed(resolve_device(t.device), t.dist_timeout)
    out_dir = Path(t.out)
    if is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
    if t.threads is not None:
        torch.set_num_threads(t.threads)
    keep_freed_memory()
    set_deterministic(t.deterministic)
    seed_everything(t.seed)
    return device, out_dir


def build_data(cfg: Config, device: torch.device, worker_init_fn: Callable[[int], None]) -> Data:
    """``worker_init_fn``: ``StopSignals.worker_init_fn`` (the workers ignore stop signals
    until the run ends)."""
    t, d = cfg.train, cfg.data
    train_set, bank_set, query_set = build_datasets(
        d.path,
        build_views(cfg, workers_part=True),
        eval_transform(cfg.model.img_size),
        d.synthetic(),
        d.knn_bank,
        d.knn_queries,
        seed=t.seed,
    )
    if len(train_set) < t.batch_size:
        raise ConfigError(
            f"train.batch_size: {t.batch_size} is larger than the data set ({len(train_set)} "
            f"images in {d.path or 'the built-in data'})"
        )
    contrastive = cfg.model.method == "cmae"
    device_color = build_device_color(cfg)
    device_views = build_device_views(cfg)
    sampler = EpochSampler(build_sampler(train_set, t.seed))  # (epoch, index); can skip ahead
    samples = SeededSamples(train_set, t.seed)  # seeds each sample's views, replaces bad ones
    loader = DataLoader(
        samples,
        batch_size=local_batch_size(t.batch_size, world_size(), t.accum_steps, contrastive),
        sampler=sampler,
        drop_last=True,
        num_workers=loader_workers(d.num_workers),
        pin_memory=device.type == "cuda",
        persistent_workers=d.num_workers > 0,
        generator=torch.Generator().manual_seed(t.seed + rank()),  # worker seeds, per rank
        worker_init_fn=worker_init_fn,
        collate_fn=collate_boxes if device_views is not None else None,
    )
    return Data(
        train_set, bank_set, query_set, samples, sampler, loader, device_color, device_views
    )


def build_trainee(cfg: Config, device: torch.device) -> Trainee:
    t = cfg.train
    model = build_model(cfg.model).to(device)
    set_fused_attention(model, use_fused_attention(t.attention, device))
    wrapped = wrap_model(model, device, t.compile)  # DDP (+ SyncBatchNorm) across ranks
    # the weights above are identical on all ranks; masks and augmentations must differ
    seed_everything(t.seed + rank())
    amp = resolve_amp(t.amp, device)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    base_lr = t.lr if t.lr is not None else t.blr * t.batch_size / 256  # global batch
    # fused: one kernel for all parameters, on CPU too (faster than the per-parameter loop,
    # docs/PERFORMANCE.md), and it reads the skip-step flag on the device (cmae.train.faults)
    optimizer = torch.optim.AdamW(
        param_groups(model, t.weight_decay, t.wd_exempt), lr=base_lr, betas=t.betas, fused=True
    )
    return Trainee(model, wrapped, optimizer, scaler, amp, base_lr)


def plan_steps(t: TrainConfig, steps_per_epoch: int) -> Plan:
    total_steps = t.epochs * steps_per_epoch
    last_step = min(total_steps, t.max_steps) if t.max_steps else total_steps
    return Plan(steps_per_epoch, total_steps, int(t.warmup_epochs * steps_per_epoch), last_step)


def announce(cfg: Config, data: Data, net: Trainee, plan: Plan, device: torch.device) -> None:
    if not is_main():
        return
    m, t = cfg.model, cfg.train
    n_params = sum(p.numel() for p in net.model.parameters() if p.requires_grad)
    print(
        f"cmae pretrain: {m.method} {m.encoder} {m.img_size}px, "
        f"{n_params / 1e6:.2f}M trainable params, {len(data.train_set)} images, "
        f"{plan.steps_per_epoch} steps/epoch x {t.epochs} epochs, lr {net.base_lr:.3g}, "
        f"device {device} x {world_size()} process(es), amp {net.amp}, out {t.out}"
    )
    if t.knn_every and data.bank_set is None:
        print("train.knn_every: the data has no labelled held-out split, kNN monitor off")


def open_visuals(cfg: Config, data: Data, out_dir: Path) -> RunVisuals:
    t, d = cfg.train, cfg.data
    tensorboard = t.tensorboard and is_main()
    return RunVisuals(
        out_dir, tensorboard, t.vis_every, data.samples, d.mean, d.std, t.seed, data.device_views
    )


def resume_training(cfg: Config, net: Trainee, out_dir: Path, device: torch.device) -> Resumed:
    """Model, optimizer, scaler, step (-> schedules, sampler position) and RNG states of the
    checkpoint ``train.resume`` names (auto: the newest valid one in the run directory)."""
    if is_main():
        remove_stale_temps(out_dir)
    found = find_resume(cfg.train.resume, out_dir)
    if found is None:
        return Resumed(0, (0, 0), None)
    model_cfg = to_dict(cfg)["model"]
    step, bad_counts = restore_training(
        *found, net.model, net.optimizer, net.scaler, model_cfg, rank(), device
    )
    if is_main():
        print(f"resuming from {found[0]} at step {step}")
    return Resumed(step, bad_counts, str(found[0]))


def open_outputs(
    cfg: Config, out_dir: Path, visuals: RunVisuals, resumed: Resumed, plan: Plan
) -> RunOutputs:
    t = cfg.train
    if is_main():  # only now: a refused run (another model, already trained) leaves it as is
        save_text(out_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    log_file = RunLog(out_dir / "log.jsonl") if is_main() else None  # appended on resume
    if is_main() and resumed.step:
        log_file.write({"step": resumed.step, "resumed_from": resumed.path})
    start = time.perf_counter()
    bar = tqdm(
        total=plan.last_step,
        initial=resumed.step,
        desc="pretrain",
        dynamic_ncols=True,
        disable=not is_main(),
    )
    checkpoints = RunCheckpoints(out_dir, t.keep_last, t.keep_every_epochs)
    return RunOutputs(
        out_dir,
        visuals,
        checkpoints,
        log_file,
        bar,
        t.batch_size,
        start,
        resumed.step,
        start,
        resumed.step,
    )


# ---------------------------------------------------------------------------------------------
# the loop


def train(cfg: Config, stop: StopSignals) -> dict:
    t, d = cfg.train, cfg.data
    device, out_dir = setup_process(cfg)
    data = build_data(cfg, device, stop.worker_init_fn)
    net = build_trainee(cfg, device)
    plan = plan_steps(t, len(data.loader))
    announce(cfg, data, net, plan, device)
    visuals = open_visuals(cfg, data, out_dir)
    resumed = resume_training(cfg, net, out_dir, device)
    if resumed.step >= plan.last_step:
        return already_trained(cfg, data, net.model, resumed.step, visuals, device)
    run = open_outputs(cfg, out_dir, visuals, resumed, plan)
    bad_steps = BadSteps(device)
    bad_images = BadImages(d.max_bad_fraction, len(data.sampler), *resumed.bad_counts)
    step = resumed.step
    net.model.train()
    for epoch in range(step // plan.steps_per_epoch, t.epochs):
        done = max(0, step - epoch * plan.steps_per_epoch)  # batches trained before the resume
        # a new shuffle every epoch, the same on all ranks; skips the done batches unloaded
        data.sampler.set_epoch(epoch, start=done * data.loader.batch_size)
        if done == 0:
            bad_images.new_epoch()
        for views, _, bad in data.loader:
            bad_images.add(bad, d.path or "the built-in data")
            views = to_device(views, device, d.mean, d.std, data.device_color, data.device_views)
            lr = cosine_lr(step, plan.total_steps, plan.warmup_steps, net.base_lr, t.min_lr)
            momentum = momentum_at(step, plan.total_steps, t.momentum, t.momentum_end)
            out = train_one_step(
                net.model,
                net.optimizer,
                views,
                lr,
                momentum,
                net.wrapped,
                t.accum_steps,
                net.amp,
                net.scaler,
                bad_steps,
            )
            step += 1
            run.bar.update(1)
            if step % t.log_every == 0 or step == plan.last_step:
                # every rank; reads the device counters (a sync) at log steps only
                skipped = bad_steps.check(t.max_bad_steps, step)
                if is_main():
                    run.log_step(step, epoch, out, lr, momentum, bad_images.total, skipped)
            # every rank, every step, so all stop at the same one; the last step just finishes
            if step < plan.last_step and stop.requested():
                state = snapshot(cfg, net, step, epoch, bad_images, device)
                stop_run(run, state, step, stop)
            every_steps = t.save_every_steps and step % t.save_every_steps == 0
            if every_steps and step % plan.steps_per_epoch and step < plan.last_step:
                save_periodic(run, snapshot(cfg, net, step, epoch, bad_images, device), step)
            if step >= plan.last_step:
                break
        monitor_epoch(cfg, run, data, net.model, step, epoch, device)
        if epoch_save_due(t, plan, step, epoch):
            state = snapshot(cfg, net, step, epoch, bad_images, device)
            save_periodic(run, state, step, epoch + 1)
        if step >= plan.last_step:
            break
    run.bar.close()
    state = snapshot(cfg, net, step, epoch, bad_images, device)
    if not is_main():  # rank 0 alone writes the checkpoint, summary and kNN results
        teardown_distributed()
        return {}
    return finish(cfg, run, data, net.model, state, out, step, epoch, device)


# ---------------------------------------------------------------------------------------------
# what the loop calls: checkpoints, stopping, the epoch-end monitor, the end of the run


def snapshot(
    cfg: Config, net: Trainee, step: int, epoch: int, bad_images: BadImages, device: torch.device
) -> dict:
    """The training state now; every rank calls it (their RNG states are gathered)."""
    counts = (bad_images.total, bad_images.in_epoch)
    return training_state(
        net.model, net.optimizer, net.scaler, step, epoch, to_dict(cfg), counts, device
    )


def save_periodic(
    run: RunOutputs, state: dict, step: int, epoch_end: int | None = None
) -> Path | None:
    """A periodic checkpoint in OUT/checkpoints/, written by rank 0."""
    return run.checkpoints.save(state, step, epoch_end) if is_main() else None


def epoch_save_due(t: TrainConfig, plan: Plan, step: int, epoch: int) -> bool:
    """A checkpoint at this epoch's end (not the run's last step: the final save covers it)."""
    epoch_done = step == (epoch + 1) * plan.steps_per_epoch
    every_epochs = t.save_every_epochs and (epoch + 1) % t.save_every_epochs == 0
    every_steps = t.save_every_steps and step % t.save_every_steps == 0
    return bool(epoch_done and (every_epochs or every_steps) and step < plan.last_step)


def stop_run(run: RunOutputs, state: dict, step: int, stop: StopSignals) -> NoReturn:
    """Save, close the outputs and raise Preempted (`cmae pretrain` exits 75)."""
    path = save_periodic(run, state, step)
    run.bar.close()
    if is_main():
        run.log_file.close()
        run.visuals.close()
    stop.stop_here(path, step, resume_key="train.resume")


def knn_of(cfg: Config, data: Data, encoder: nn.Module, device: torch.device) -> dict:
    d, t = cfg.data, cfg.train
    return knn_eval(
        encoder,
        data.bank_set,
        data.query_set,
        device,
        d.mean,
        d.std,
        t.knn_k,
        t.knn_t,
        # sets held in memory (the generated ones) need no loader process forked per evaluation
        num_workers=0
        if isinstance(data.bank_set, InMemory)
        else min(loader_workers(d.num_workers), 2),
        # its workers, like the training loader's, outlive a stop signal sent to the whole
        # process group (`pkill -f`, a scheduler) while this process finishes and saves
        worker_init_fn=data.loader.worker_init_fn,
    )


def monitor_epoch(
    cfg: Config,
    run: RunOutputs,
    data: Data,
    model: CMAE,
    step: int,
    epoch: int,
    device: torch.device,
) -> None:
    """Rank 0, at an epoch's end: the kNN monitor (train.knn_every) and the pictures."""
    if not is_main():
        return
    t, start = cfg.train, time.perf_counter()
    if t.knn_every and (epoch + 1) % t.knn_every == 0 and data.bank_set is not None:
        # forked RNG: the monitor leaves the training run's random stream untouched
        with torch.random.fork_rng(devices=[]):
            res = knn_of(cfg, data, model.encoder, device)
        rec = {"step": step, "epoch": epoch, "knn_top1": res["top1"], "knn_top5": res["top5"]}
        run.write(rec)
        run.bar.set_postfix(knn_top1=f"{res['top1']:.2f}")
    run.visuals.epoch_end(model, epoch + 1, step)
    run.tick += time.perf_counter() - start  # the logged img/s is the training's alone


OUTPUTS = ("encoder.safetensors", "summary.json")  # written after checkpoint.pt


def already_trained(
    cfg: Config, data: Data, model: CMAE, step: int, visuals: RunVisuals, device: torch.device
) -> dict:
    """A run at its last step: write the outputs that a kill or a full disk kept it from
    writing after ``checkpoint.pt`` (``model`` holds its weights); return the summary."""
    visuals.close()
    summary = {}
    out_dir = Path(cfg.train.out)
    if is_main():
        print(f"{out_dir} is already trained to step {step} (train.resume=never restarts)")
        missing = [name for name in OUTPUTS if not (out_dir / name).is_file()]
        if missing:
            print(f"{out_dir}: writing the missing end-of-run outputs ({', '.join(missing)})")
            summary = write_outputs(cfg, data, model, last_losses(out_dir, step), device)
        else:
            summary = json.loads((out_dir / "summary.json").read_text())
    teardown_distributed()
    return summary


def last_losses(out_dir: Path, step: int) -> dict:
    """``steps`` and the losses logged at ``step``: the process that trained it is gone."""
    try:
        last = [r for r in read_log(out_dir) if "loss" in r and r.get("step") == step]
    except DataError:
        last = []
    return {"steps": step, **{k: last[-1][k] for k, _ in LOSSES if last and k in last[-1]}}


def finish(
    cfg: Config,
    run: RunOutputs,
    data: Data,
    model: CMAE,
    state: dict,
    out: CMAEOutput,
    step: int,
    epoch: int,
    device: torch.device,
) -> dict:
    """Rank 0 after the last step: pictures, checkpoint.pt, then ``write_outputs``."""
    t, out_dir = cfg.train, run.out_dir
    run.visuals.epoch_end(model, epoch + 1, step, last=True)
    run.visuals.close()
    run.log_file.close()
    wall = time.perf_counter() - run.start

    run.checkpoints.save_final(state)  # a full training state: a longer run can resume from it
    summary = {
        "steps": step,
        "wall_s": wall,
        "img_per_s": (step - run.start_step) * t.batch_size / wall,
        "loss": out.loss.item(),
        "loss_pixel": out.loss_pixel.item(),
        "loss_contrast": out.loss_contrast.item(),
    }
    print(
        f"trained {step} steps in {wall:.1f}s ({summary['img_per_s']:.1f} img/s); final loss "
        f"{summary['loss']:.4f} (pixel {summary['loss_pixel']:.4f}, "
        f"contrast {summary['loss_contrast']:.4f}); wrote {out_dir / 'checkpoint.pt'}"
    )
    summary = write_outputs(cfg, data, model, summary, device, run.visuals.last_png)
    teardown_distributed()
    return summary


def write_outputs(
    cfg: Config,
    data: Data,
    model: CMAE,
    summary: dict,
    device: torch.device,
    recon_png: Path | None = None,
) -> dict:
    """What follows ``checkpoint.pt``: ``encoder.safetensors``, the end-of-run kNN against a
    random-init encoder, ``summary.json`` and ``summary.md``. A rerun of a run killed before
    they were all written calls it again (``already_trained``)."""
    t, out_dir = cfg.train, Path(cfg.train.out)
    save_encoder(
        model,
        out_dir / "encoder.safetensors",
        metadata={
            "format": encoder_format(cfg.model.encoder),
            "encoder": cfg.model.encoder,
            "img_size": str(cfg.model.img_size),
            "patch_size": str(cfg.model.patch_size),
        },
    )
    print(f"wrote {out_dir / 'encoder.safetensors'}")
    if t.knn_at_end and data.bank_set is not None:
        torch.manual_seed(t.seed)
        summary["knn"] = knn_of(cfg, data, model.encoder, device)
        summary["knn_random_init"] = knn_of(cfg, data, build_encoder(cfg.model).to(device), device)
        print(
            f"kNN top-1 on held-out data ({summary['knn']['n_query']} images, k={t.knn_k}): "
            f"pretrained {summary['knn']['top1']:.2f}% vs random init "
            f"{summary['knn_random_init']['top1']:.2f}%"
        )
    save_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    try:
        write_summary(out_dir, to_dict(cfg), summary, recon_png)
    except OSError as e:  # the readable copy of summary.json; the run's results are saved
        warn(f"could not write {out_dir / 'summary.md'} or its pictures: {e}")
    return summary
