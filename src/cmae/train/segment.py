"""``cmae segment``: semantic segmentation with UperNet on a pretrained encoder, the MAE / CMAE
ADE20K protocol (``cmae.models.upernet`` the model, ``cmae.data.segmentation`` the data,
``cmae.eval.segment`` the sliding-window evaluation and metrics).

AdamW with the fine-tuning code's layer-wise lr decay groups, linear warmup from lr x 1e-6 then
poly decay per iteration, cross-entropy with the ignore index on the logits upsampled to the
labels (+ the auxiliary head's, weighted). The run's lifecycle (lock, stop signals, checkpoints,
``resume=auto``, bitwise on CPU, non-finite steps, log) is ``cmae.train.lifecycle``'s; torchrun
as ``cmae pretrain``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from cmae.config import ConfigError, SegmentConfig, to_dict
from cmae.data.datasets import loader_workers
from cmae.data.sampling import EpochSampler
from cmae.data.segmentation import (
    IGNORE,
    SegTrainSet,
    SegValSet,
    TrainPipeline,
    segmentation_splits,
)
from cmae.eval.frozen import eval_normalization
from cmae.eval.segment import evaluate, seg_metrics, write_predictions
from cmae.interop.encoders import EncoderWeights, load_encoder_weights, segmentor_for
from cmae.models.upernet import UperNet
from cmae.runtime.device import keep_freed_memory, resolve_amp, resolve_device, seed_everything
from cmae.runtime.distributed import (
    build_sampler,
    is_main,
    rank,
    setup_distributed,
    world_size,
    wrap_model,
)
from cmae.runtime.faults import (
    BadSteps,
    buffer_values,
    poison_nonfinite,
    skip_nonfinite_step,
    worker_options,
)
from cmae.runtime.optim import layer_decay_groups, poly_lr, set_lr
from cmae.runtime.resume import training_state
from cmae.train.lifecycle import TrainingJob
from cmae.viz.plot import dense_curves

METRICS = ("step", "mIoU", "mAcc", "aAcc")  # an evaluation's line in log.jsonl


def seg_loss(
    logits: Tensor,
    aux: Tensor | None,
    labels: Tensor,
    aux_weight: float,
    avg_non_ignore: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """(total loss, auxiliary loss or None): cross-entropy of the logits upsampled (bilinear) to
    the labels, ignoring ``IGNORE``; averaged over the labelled pixels, or with
    ``avg_non_ignore=False`` over all pixels (mmsegmentation's default)."""

    def ce(x: Tensor) -> Tensor:
        x = F.interpolate(x, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        if avg_non_ignore:
            return F.cross_entropy(x.float(), labels, ignore_index=IGNORE)
        total = F.cross_entropy(x.float(), labels, ignore_index=IGNORE, reduction="sum")
        return total / labels.numel()

    loss = ce(logits)
    if aux is None:
        return loss, None
    aux_loss = ce(aux)
    return loss + aux_weight * aux_loss, aux_loss


# ---------------------------------------------------------------------------------------------
# setup


class SegData(NamedTuple):
    loader: DataLoader
    sampler: EpochSampler
    val_base: Dataset  # the raw validation split (pictures)
    val_set: SegValSet
    classes: list[str]
    n_train: int


def build_data(
    cfg: SegmentConfig,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    worker_init_fn: Callable[[int], None],
) -> SegData:
    """``worker_init_fn``: ``StopSignals.worker_init_fn`` (the workers ignore stop signals
    until the run ends, then Python's exit can terminate them)."""
    d = cfg.data
    train_base, val_base, classes = segmentation_splits(
        d.path, d.num_classes, d.reduce_zero_label and d.path is not None, d.synthetic()
    )
    pipeline = TrainPipeline(
        d.scale, d.ratio_range, d.crop, d.cat_max_ratio, d.hflip, d.photometric, mean, std
    )
    train_set = SegTrainSet(train_base, pipeline, cfg.seed)
    if cfg.batch_size % world_size():
        raise ConfigError(
            f"batch_size: {cfg.batch_size} must be divisible by the world size ({world_size()})"
        )
    sampler = EpochSampler(build_sampler(train_set, cfg.seed))
    workers = loader_workers(d.num_workers)
    loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size // world_size(),
        sampler=sampler,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        **worker_options(workers, worker_init_fn),
        # its own generator: starting an epoch's iterator must not draw from the global one,
        # which a resumed run restores (drop path, dropout)
        generator=torch.Generator().manual_seed(cfg.seed + rank()),
    )
    if len(loader) == 0:
        raise ConfigError(
            f"batch_size: {cfg.batch_size} is larger than the training split "
            f"({len(train_set)} images)"
        )
    val_set = SegValSet(val_base, d.scale, mean, std)
    return SegData(loader, sampler, val_base, val_set, classes, len(train_set))


def build_model(
    cfg: SegmentConfig, weights: EncoderWeights, num_classes: int, device: torch.device
) -> UperNet:
    m, crop = cfg.model, cfg.data.crop
    try:
        model = segmentor_for(
            weights,
            num_classes,
            crop,
            channels=m.channels,
            aux_channels=m.aux_channels,
            pool_scales=m.pool_scales,
            dropout=m.dropout,
            drop_path=m.drop_path,
            out_indices=m.out_indices,
            rel_pos_bias=m.rel_pos_bias,
            layer_scale=m.layer_scale,
        )
    except ValueError as e:
        raise ConfigError(f"model: {e}") from e
    if crop % model.pad_multiple:
        raise ConfigError(
            f"data.crop: {crop} must be a multiple of {model.pad_multiple} (the coarsest "
            "pyramid level's stride)"
        )
    return model.to(device)


class Evaluations:
    """The last evaluation (in full) and the best one so far (its summary)."""

    def __init__(self, best: dict | None) -> None:
        self.best, self.last = best, None

    def add(self, res: dict) -> dict:
        """Keep ``res``; return its line for log.jsonl."""
        self.last = res
        summary = {k: res[k] for k in METRICS}
        if self.best is None or (res["mIoU"] or 0) > (self.best["mIoU"] or 0):
            self.best = summary
        return {**summary, "eval": True}


# ---------------------------------------------------------------------------------------------
# the command


def run(cfg: SegmentConfig) -> dict:
    with TrainingJob(
        cfg.out,
        "cmae segment",
        unit="iteration",
        keep_last=cfg.keep_last,
        max_bad_steps=cfg.max_bad_steps,
    ) as job:
        return train(cfg, job)


def train(cfg: SegmentConfig, job: TrainingJob) -> dict:
    device = setup_distributed(resolve_device(cfg.device))
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()
    seed_everything(cfg.seed)
    weights = load_encoder_weights(cfg.encoder.checkpoint, cfg.encoder.preset, cfg.seed)
    mean, std = eval_normalization(cfg.data.mean, cfg.data.std, weights)
    data = build_data(cfg, mean, std, device, job.worker_init_fn)
    model = build_model(cfg, weights, len(data.classes), device)
    wrapped = wrap_model(model, device, compile=False)
    seed_everything(cfg.seed + rank())  # drop path and dropout differ across ranks
    amp = resolve_amp(cfg.amp, device)
    groups = layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
    last = min(cfg.iters, cfg.max_iters) if cfg.max_iters else cfg.iters
    announce(cfg, weights, model, data, amp, device)
    config = to_dict(cfg)
    resumed = job.resume(cfg.resume, model, optimizer, None, config["model"], device)
    step = resumed.step
    evaluations = Evaluations(resumed.state.get("best"))
    if job.already_trained(step, last) and not job.missing_outputs("results.json"):
        return job.read_json("results.json")
    # else train to ``last``; a run killed before its results were written only evaluates
    job.begin(
        config,
        total=last,
        initial=step,
        batch_size=cfg.batch_size,
        device=device,
        resumed_from=resumed.path,
    )
    steps_per_epoch = len(data.loader)

    def snapshot() -> dict:  # every rank: their RNG states are gathered
        state = training_state(
            model, optimizer, None, step, step // steps_per_epoch, config, (0, 0), device
        )
        return {**state, "best": evaluations.best}

    def evaluate_now() -> None:
        with job.paused():  # evaluation time is not training throughput
            res = evaluate_model(cfg, model, data, step, amp, device, job.worker_init_fn)
            job.log(evaluations.add(res), mIoU=f"{res['mIoU'] or 0:.2f}")

    model.train()
    while step < last:
        epoch = step // steps_per_epoch
        done = step - epoch * steps_per_epoch  # batches trained before a resume
        data.sampler.set_epoch(epoch, start=done * data.loader.batch_size)
        for imgs, labels in data.loader:
            lr = poly_lr(step, cfg.lr, cfg.warmup_iters, cfg.iters, cfg.power, cfg.min_lr)
            loss, aux_loss = train_step(
                wrapped=wrapped,
                optimizer=optimizer,
                imgs=imgs,
                labels=labels,
                lr=lr,
                aux_weight=cfg.model.aux_weight,
                avg_non_ignore=cfg.model.avg_non_ignore,
                amp=amp,
                device=device,
                bad_steps=job.bad_steps,
            )
            step += 1
            job.advance()
            if step % cfg.log_every == 0 or step == last:
                skipped = job.check_bad_steps(step)  # every rank: a host sync, at log steps only
                rec = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": lr}
                if aux_loss is not None:
                    rec["loss_aux"] = aux_loss.item()
                rec["img_per_s"] = job.img_per_s(step)
                rec["skipped_steps"] = skipped  # non-finite steps since the last record
                job.log(rec, loss=rec["loss"])
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == last:
                evaluate_now()
            if step < last and job.stop_requested():  # every rank, every step: all stop together
                job.stop(snapshot(), step)
            if cfg.save_every and step % cfg.save_every == 0 and step < last:
                job.save(snapshot(), step)
            if step >= last:
                break
    if evaluations.last is None:  # resumed at the end of a run that has no results yet
        evaluate_now()
    state = snapshot()
    job.close()
    if not is_main():
        return {}
    job.save_final(state)
    return finish(cfg, job, model, data, evaluations, step, weights, device)


def announce(
    cfg: SegmentConfig,
    weights: EncoderWeights,
    model: UperNet,
    data: SegData,
    amp: torch.dtype | None,
    device: torch.device,
) -> None:
    if is_main():
        print(
            f"cmae segment: {weights.encoder} UperNet "
            f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), "
            f"{len(data.classes)} classes, {data.n_train} train / {len(data.val_set)} val images, "
            f"crop {cfg.data.crop}, {cfg.iters} iterations x batch {cfg.batch_size}, lr "
            f"{cfg.lr:g}, device {device} x {world_size()} process(es), amp {amp}, out {cfg.out}"
        )


def evaluate_model(
    cfg: SegmentConfig,
    model: UperNet,
    data: SegData,
    step: int,
    amp: torch.dtype | None,
    device: torch.device,
    worker_init_fn: Callable[[int], None],
) -> dict:
    """The sliding-window evaluation of the validation split (every rank; counts summed)."""
    d = cfg.data
    confusion = evaluate(
        model,
        data.val_set,
        d.crop,
        d.stride,
        device,
        amp,
        workers=min(loader_workers(d.num_workers), 2),
        worker_init_fn=worker_init_fn,  # its workers outlive a group-wide stop signal, too
    )
    return {"step": step, **seg_metrics(confusion, data.classes), "confusion": confusion.tolist()}


def train_step(
    *,
    wrapped: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    imgs: Tensor,
    labels: Tensor,
    lr: float,
    aux_weight: float,
    avg_non_ignore: bool,
    amp: torch.dtype | None,
    device: torch.device,
    bad_steps: BadSteps,
) -> tuple[Tensor, Tensor | None]:
    """One optimizer step at ``lr`` (times each group's layer-decay scale); the losses. A step
    with a non-finite loss or gradient is skipped and counted (``skip_nonfinite_step``)."""
    set_lr(optimizer, lr)
    buffers = buffer_values(wrapped)  # BatchNorm statistics, put back after a bad step
    x = imgs.to(device, non_blocking=True)
    y = labels.to(device, non_blocking=True).long()
    with torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext():
        logits, aux = wrapped(x)
    loss, aux_loss = seg_loss(logits, aux, y, aux_weight, avg_non_ignore)
    optimizer.zero_grad(set_to_none=True)
    poison_nonfinite(loss).backward()
    skip_nonfinite_step(wrapped, optimizer, buffers, bad_steps)
    return loss.detach(), None if aux_loss is None else aux_loss.detach()


def finish(
    cfg: SegmentConfig,
    job: TrainingJob,
    model: UperNet,
    data: SegData,
    evaluations: Evaluations,
    step: int,
    weights: EncoderWeights,
    device: torch.device,
) -> dict:
    """OUT/results.json (the last evaluation in full, the best one, the run's facts),
    OUT/predictions.png and OUT/curves.png (losses and validation mIoU; with matplotlib);
    rank 0."""
    last, best, wall = evaluations.last, evaluations.best, job.wall_s
    results = {
        **{k: last[k] for k in METRICS[1:]},
        "iteration": step,
        "best": best,
        "per_class": last["per_class"],
        "classes": data.classes,
        "confusion": last["confusion"],
        "n_train": data.n_train,
        "n_val": len(data.val_set),
        "params": sum(p.numel() for p in model.parameters()),
        "encoder": weights.encoder,
        "wall_s": wall,
        "mean": list(data.val_set.mean),
        "std": list(data.val_set.std),
    }
    job.write_json("results.json", {**results, "config": to_dict(cfg)})
    n = min(cfg.data.vis_images, len(data.val_base))
    if n:
        picks = sorted({round(i * (len(data.val_base) - 1) / max(n - 1, 1)) for i in range(n)})
        crop, stride = cfg.data.crop, cfg.data.stride
        path = job.out_dir / "predictions.png"
        write_predictions(model, data.val_base, data.val_set, picks, crop, stride, device, path)
    log = [json.loads(line) for line in (job.out_dir / "log.jsonl").read_text().splitlines()]
    metrics = (("mIoU", "o-"), ("mAcc", "s--"), ("aAcc", "^:"))
    title = str(job.out_dir)
    dense_curves(
        log, job.out_dir / "curves.png", title, ("loss", "loss_aux"), metrics, "validation (%)"
    )
    print(
        f"cmae segment: mIoU {percent(results['mIoU'])} mAcc {percent(results['mAcc'])} aAcc "
        f"{percent(results['aAcc'])} at iteration {step} (best mIoU {percent(best['mIoU'])} at "
        f"{best['step']}); {wall:.0f}s; wrote {job.out_dir / 'results.json'}"
    )
    return results


def percent(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"
