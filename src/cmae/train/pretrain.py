"""``cmae pretrain``: CMAE / MAE pretraining, one process or many under torchrun (DDP).

The step (``train_one_step``), the epoch-end monitor (kNN, pictures) and the end-of-run outputs
(encoder, kNN against a random init, summary) are this command's; the run's lifecycle (lock,
stop signals, checkpoints, resume, non-finite steps, log, progress) is ``cmae.train.lifecycle``'s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from cmae.config import Config, ConfigError, TrainConfig, to_dict
from cmae.data.datasets import DataError, InMemory, build_datasets, is_shards, loader_workers
from cmae.data.pipeline import (
    build_device_color,
    build_device_views,
    build_views,
    shard_pipeline,
    to_device,
)
from cmae.data.sampling import BadImages, EpochSampler, SeededSamples
from cmae.data.views import DeviceTargetColor, DeviceViews, collate_boxes, eval_transform
from cmae.eval.knn import knn_eval
from cmae.interop.export import encoder_format
from cmae.models.cmae import CMAE, CMAEOutput, build_encoder, build_model
from cmae.models.losses import gather_keys
from cmae.models.vit import set_fused_attention, use_fused_attention
from cmae.runtime.checkpoint import save_encoder, save_text, warn
from cmae.runtime.device import keep_freed_memory, resolve_amp, resolve_device, seed_everything
from cmae.runtime.distributed import (
    build_sampler,
    is_main,
    local_batch_size,
    no_sync,
    rank,
    setup_distributed,
    world_size,
    wrap_model,
)
from cmae.runtime.faults import (
    BadSteps,
    grads_finite,
    keep_buffers_unless,
    poison_nonfinite,
    step_unless_bad,
    weights_finite,
    worker_options,
)
from cmae.runtime.optim import cosine_lr, momentum_at, param_groups, set_lr
from cmae.runtime.resume import set_deterministic, training_state
from cmae.train.lifecycle import TrainingJob
from cmae.train.monitor import contrastive_health
from cmae.viz.plot import LOSSES, read_log, write_summary
from cmae.viz.visualize import RunVisuals


def train_one_step(
    model: CMAE,
    optimizer: torch.optim.Optimizer,
    views: list[torch.Tensor],
    *,
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
    update, no EMA, BatchNorm statistics kept; ``bad_steps`` counts it (cmae.runtime.faults).
    """
    wrapped = model if wrapped is None else wrapped
    if not (math.isfinite(lr) and math.isfinite(momentum)):  # host floats: free to check
        raise ConfigError(f"non-finite lr {lr} or EMA momentum {momentum} (check train.*)")
    set_lr(optimizer, lr)
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
    t = cfg.train
    with TrainingJob(
        t.out,
        "cmae pretrain",
        key_prefix="train.",
        keep_last=t.keep_last,
        keep_every_epochs=t.keep_every_epochs,
        max_bad_steps=t.max_bad_steps,
    ) as job:
        return train(cfg, job)


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


class Learner(NamedTuple):
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


# ---------------------------------------------------------------------------------------------
# setup: each step returns what the loop needs, in the order the random streams depend on


def setup_process(cfg: Config) -> torch.device:
    """Join the process group (under torchrun; only rank 0 prints and writes files), set
    threads, allocator, determinism and seeds."""
    t = cfg.train
    device = setup_distributed(resolve_device(t.device), t.dist_timeout)
    if t.threads is not None:
        torch.set_num_threads(t.threads)
    keep_freed_memory()
    set_deterministic(t.deterministic)
    seed_everything(t.seed)
    return device


def build_data(cfg: Config, device: torch.device, worker_init_fn: Callable[[int], None]) -> Data:
    """``worker_init_fn``: ``TrainingJob.worker_init_fn`` (the workers ignore stop signals
    until the run ends)."""
    t, d = cfg.train, cfg.data
    if is_shards(d.path):  # streamed tar shards: no kNN monitor, no index sampler
        batch = local_batch_size(
            t.batch_size, world_size(), t.accum_steps, cfg.model.method == "cmae"
        )
        stream, loader, first = shard_pipeline(
            cfg, device, batch, rank(), world_size(), worker_init_fn
        )
        color, views = build_device_color(cfg), build_device_views(cfg)
        return Data(stream, None, None, first, stream, loader, color, views)
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
        pin_memory=device.type == "cuda",
        persistent_workers=d.num_workers > 0,
        generator=torch.Generator().manual_seed(t.seed + rank()),  # worker seeds, per rank
        **worker_options(loader_workers(d.num_workers), worker_init_fn),
        collate_fn=collate_boxes if device_views is not None else None,
    )
    return Data(
        train_set, bank_set, query_set, samples, sampler, loader, device_color, device_views
    )


def build_learner(cfg: Config, device: torch.device) -> Learner:
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
    # docs/PERFORMANCE.md), and it reads the skip-step flag on the device (cmae.runtime.faults)
    optimizer = torch.optim.AdamW(
        param_groups(model, t.weight_decay, t.wd_exempt), lr=base_lr, betas=t.betas, fused=True
    )
    return Learner(model, wrapped, optimizer, scaler, amp, base_lr)


def plan_steps(t: TrainConfig, steps_per_epoch: int) -> Plan:
    total_steps = t.epochs * steps_per_epoch
    last_step = min(total_steps, t.max_steps) if t.max_steps else total_steps
    return Plan(steps_per_epoch, total_steps, int(t.warmup_epochs * steps_per_epoch), last_step)


def announce(cfg: Config, data: Data, learner: Learner, plan: Plan, device: torch.device) -> None:
    if not is_main():
        return
    m, t = cfg.model, cfg.train
    n_params = sum(p.numel() for p in learner.model.parameters() if p.requires_grad)
    print(
        f"cmae pretrain: {m.method} {m.encoder} {m.img_size}px, "
        f"{n_params / 1e6:.2f}M trainable params, {len(data.train_set)} images, "
        f"{plan.steps_per_epoch} steps/epoch x {t.epochs} epochs, lr {learner.base_lr:.3g}, "
        f"device {device} x {world_size()} process(es), amp {learner.amp}, out {t.out}"
    )
    if t.knn_every and data.bank_set is None:
        print("train.knn_every: the data has no labelled held-out split, kNN monitor off")


def open_visuals(cfg: Config, data: Data, out_dir: Path) -> RunVisuals:
    t, d = cfg.train, cfg.data
    tensorboard = t.tensorboard and is_main()
    return RunVisuals(
        out_dir, tensorboard, t.vis_every, data.samples, d.mean, d.std, t.seed, data.device_views
    )


# ---------------------------------------------------------------------------------------------
# the loop


def train(cfg: Config, job: TrainingJob) -> dict:
    t, d = cfg.train, cfg.data
    device = setup_process(cfg)
    data = build_data(cfg, device, job.worker_init_fn)
    learner = build_learner(cfg, device)
    model = learner.model
    plan = plan_steps(t, len(data.loader))
    announce(cfg, data, learner, plan, device)
    visuals = job.closing(open_visuals(cfg, data, job.out_dir))
    model_config = to_dict(cfg)["model"]
    resumed = job.resume(t.resume, model, learner.optimizer, learner.scaler, model_config, device)
    if job.already_trained(resumed.step, plan.last_step):
        return outputs_of_trained_run(cfg, job, data, model, resumed.step, device)
    job.begin(
        to_dict(cfg),
        total=plan.last_step,
        initial=resumed.step,
        batch_size=t.batch_size,
        device=device,
        resumed_from=resumed.path,
    )
    bad_images = BadImages(d.max_bad_fraction, len(data.sampler), *resumed.bad_images)
    step = resumed.step

    def snapshot() -> dict:  # every rank: their RNG states are gathered
        counts = (bad_images.total, bad_images.in_epoch)
        return training_state(
            model, learner.optimizer, learner.scaler, step, epoch, to_dict(cfg), counts, device
        )

    model.train()
    for epoch in range(step // plan.steps_per_epoch, t.epochs):
        done = max(0, step - epoch * plan.steps_per_epoch)  # batches trained before the resume
        # a new shuffle every epoch, the same on all ranks; skips the done batches unloaded
        data.sampler.set_epoch(epoch, start=done * data.loader.batch_size)
        if done == 0:
            bad_images.new_epoch()
        for views, _, bad in data.loader:
            bad_images.add(bad, d.path or "the built-in data")
            views = to_device(views, device, d.mean, d.std, data.device_color, data.device_views)
            lr = cosine_lr(step, plan.total_steps, plan.warmup_steps, learner.base_lr, t.min_lr)
            momentum = momentum_at(step, plan.total_steps, t.momentum, t.momentum_end)
            out = train_one_step(
                model,
                learner.optimizer,
                views,
                lr=lr,
                momentum=momentum,
                wrapped=learner.wrapped,
                accum_steps=t.accum_steps,
                amp=learner.amp,
                scaler=learner.scaler,
                bad_steps=job.bad_steps,
            )
            step += 1
            job.advance()
            if step % t.log_every == 0 or step == plan.last_step:
                # every rank; reads the device counters (a sync) at log steps only
                skipped = job.check_bad_steps(step)
                if is_main():
                    record = step_record(job, out, step=step, epoch=epoch, lr=lr)
                    record.update(momentum=momentum, bad_images=bad_images.total)
                    record["skipped_steps"] = skipped  # non-finite steps since the last record
                    log(job, visuals, record, out)
            # every rank, every step, so all stop at the same one; the last step just finishes
            if step < plan.last_step and job.stop_requested():
                job.stop(snapshot(), step)
            every_steps = t.save_every_steps and step % t.save_every_steps == 0
            if every_steps and step % plan.steps_per_epoch and step < plan.last_step:
                job.save(snapshot(), step)
            if step >= plan.last_step:
                break
        monitor_epoch(cfg, job, visuals, data, model, step=step, epoch=epoch, device=device)
        if epoch_save_due(t, plan, step, epoch):
            job.save(snapshot(), step, epoch + 1)
        if step >= plan.last_step:
            break
    state = snapshot()
    if not is_main():  # rank 0 alone writes the checkpoint, summary and kNN results
        return {}
    return finish(cfg, job, visuals, data, model, state, out, step=step, epoch=epoch, device=device)


# ---------------------------------------------------------------------------------------------
# what the loop calls: the log, the epoch-end monitor, the end of the run


def step_record(job: TrainingJob, out: CMAEOutput, *, step: int, epoch: int, lr: float) -> dict:
    """A logging step's record: losses (.item(): a host-device sync point, so only on logging
    steps), contrastive health, speed."""
    record = {
        "step": step,
        "epoch": epoch,
        "loss": out.loss.item(),
        "loss_pixel": out.loss_pixel.item(),
        "loss_contrast": out.loss_contrast.item(),
        "lr": lr,
        "img_per_s": job.img_per_s(step),
    }
    if out.q is not None:  # contrastive health: pos_cos, neg_cos, key_std
        record.update(contrastive_health(out.q, out.k))
    return record


def log(job: TrainingJob, visuals: RunVisuals, record: dict, out: CMAEOutput | None) -> None:
    """log.jsonl, TensorBoard and the progress bar (rank 0)."""
    if out is None:
        job.log(record)
    else:
        pix, con = record["loss_pixel"], record["loss_contrast"]
        job.log(record, loss=record["loss"], pix=pix, con=con)
    visuals.log(record)


def epoch_save_due(t: TrainConfig, plan: Plan, step: int, epoch: int) -> bool:
    """A checkpoint at this epoch's end (not the run's last step: the final save covers it)."""
    epoch_done = step == (epoch + 1) * plan.steps_per_epoch
    every_epochs = t.save_every_epochs and (epoch + 1) % t.save_every_epochs == 0
    every_steps = t.save_every_steps and step % t.save_every_steps == 0
    return bool(epoch_done and (every_epochs or every_steps) and step < plan.last_step)


def evaluate_knn(cfg: Config, data: Data, encoder: nn.Module, device: torch.device) -> dict:
    """Weighted kNN of ``encoder``'s features: the labelled held-out split against the bank."""
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
    job: TrainingJob,
    visuals: RunVisuals,
    data: Data,
    model: CMAE,
    *,
    step: int,
    epoch: int,
    device: torch.device,
) -> None:
    """Rank 0, at an epoch's end: the kNN monitor (train.knn_every) and the pictures; their
    time is kept out of the logged speed."""
    if not is_main():
        return
    t = cfg.train
    with job.paused():
        if t.knn_every and (epoch + 1) % t.knn_every == 0 and data.bank_set is not None:
            # forked RNG: the monitor leaves the training run's random stream untouched
            with torch.random.fork_rng(devices=[]):
                res = evaluate_knn(cfg, data, model.encoder, device)
            record = {"step": step, "epoch": epoch}
            record.update(knn_top1=res["top1"], knn_top5=res["top5"])
            job.log(record, knn_top1=f"{res['top1']:.2f}")
            visuals.log(record)
        visuals.epoch_end(model, epoch + 1, step)


OUTPUTS = ("encoder.safetensors", "summary.json")  # written after checkpoint.pt


def outputs_of_trained_run(
    cfg: Config, job: TrainingJob, data: Data, model: CMAE, step: int, device: torch.device
) -> dict:
    """A run at its last step: write the outputs that a kill or a full disk kept it from
    writing after ``checkpoint.pt`` (``model`` holds its weights); return the summary."""
    if not is_main():
        return {}
    if job.missing_outputs(*OUTPUTS):
        return write_outputs(cfg, data, model, last_losses(job.out_dir, step), device)
    return job.read_json("summary.json")


def last_losses(out_dir: Path, step: int) -> dict:
    """``steps`` and the losses logged at ``step``: the process that trained it is gone."""
    try:
        last = [r for r in read_log(out_dir) if "loss" in r and r.get("step") == step]
    except DataError:
        last = []
    return {"steps": step, **{k: last[-1][k] for k, _ in LOSSES if last and k in last[-1]}}


def finish(
    cfg: Config,
    job: TrainingJob,
    visuals: RunVisuals,
    data: Data,
    model: CMAE,
    state: dict,
    out: CMAEOutput,
    *,
    step: int,
    epoch: int,
    device: torch.device,
) -> dict:
    """Rank 0 after the last step: pictures, checkpoint.pt, then ``write_outputs``."""
    visuals.epoch_end(model, epoch + 1, step, last=True)
    job.close()  # the log, the progress bar, the pictures' writer
    wall = job.wall_s
    job.save_final(state)  # a full training state: a longer run can resume from it
    summary = {
        "steps": step,
        "wall_s": wall,
        "img_per_s": job.run_img_per_s(step, wall),
        "loss": out.loss.item(),
        "loss_pixel": out.loss_pixel.item(),
        "loss_contrast": out.loss_contrast.item(),
    }
    print(
        f"trained {step} steps in {wall:.1f}s ({summary['img_per_s']:.1f} img/s); final loss "
        f"{summary['loss']:.4f} (pixel {summary['loss_pixel']:.4f}, "
        f"contrast {summary['loss_contrast']:.4f}); wrote {job.out_dir / 'checkpoint.pt'}"
    )
    return write_outputs(cfg, data, model, summary, device, visuals.last_png)


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
    they were all written calls it again (``outputs_of_trained_run``)."""
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
        summary["knn"] = evaluate_knn(cfg, data, model.encoder, device)
        random_init = build_encoder(cfg.model).to(device)
        summary["knn_random_init"] = evaluate_knn(cfg, data, random_init, device)
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
