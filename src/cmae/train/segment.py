"""``cmae segment``: semantic segmentation with UperNet on a pretrained encoder, the MAE / CMAE
ADE20K protocol (``cmae.models.upernet`` the model, ``cmae.data.segmentation`` the data,
``cmae.eval.segment`` the sliding-window evaluation and metrics).

AdamW with the fine-tuning code's layer-wise lr decay groups, linear warmup from lr x 1e-6 then
poly decay per iteration, cross-entropy with the ignore index on the logits upsampled to the
labels (+ the auxiliary head's, weighted). Checkpoints, ``resume=auto`` (bitwise on CPU),
SIGTERM and torchrun as ``cmae pretrain``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple, NoReturn

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

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
from cmae.eval.finetune import layer_decay_groups
from cmae.eval.frozen import eval_normalization
from cmae.eval.segment import evaluate, seg_metrics, write_predictions
from cmae.interop.encoders import EncoderWeights, load_encoder_weights
from cmae.models.upernet import UperNet, build_segmentor
from cmae.runtime.checkpoint import RunCheckpoints, remove_stale_temps
from cmae.runtime.device import keep_freed_memory, resolve_amp, resolve_device, seed_everything
from cmae.runtime.distributed import (
    build_sampler,
    is_main,
    rank,
    setup_distributed,
    teardown_distributed,
    world_size,
    wrap_model,
)
from cmae.train.faults import StopSignals
from cmae.train.resume import find_resume, restore_training, training_state

WARMUP_START = 1e-6  # the warmup's first lr factor (mmengine LinearLR start_factor)
METRICS = ("step", "mIoU", "mAcc", "aAcc")  # an evaluation's line in log.jsonl


def lr_at(step: int, lr: float, warmup: int, iters: int, power: float, min_lr: float) -> float:
    """Linear warmup from lr x 1e-6 over ``warmup`` iterations, then poly(``power``) decay to
    ``min_lr`` at ``iters`` (mmsegmentation's LinearLR + PolyLR, per iteration)."""
    if step < warmup:
        return lr * (WARMUP_START + (1 - WARMUP_START) * step / warmup)
    frac = min((step - warmup) / max(iters - warmup, 1), 1.0)
    return (lr - min_lr) * (1 - frac) ** power + min_lr


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
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=worker_init_fn,
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
        model = build_segmentor(
            weights,
            num_classes,
            crop,
            m.channels,
            m.aux_channels,
            m.pool_scales,
            m.dropout,
            m.drop_path,
            m.out_indices,
            m.rel_pos_bias,
            m.layer_scale,
        )
    except ValueError as e:
        raise ConfigError(f"model: {e}") from e
    if crop % model.pad_multiple:
        raise ConfigError(
            f"data.crop: {crop} must be a multiple of {model.pad_multiple} (the coarsest "
            "pyramid level's stride)"
        )
    return model.to(device)


class RunLog:
    """OUT/log.jsonl (rank 0 only), the best evaluation so far and the last one."""

    def __init__(self, path: Path, best: dict | None) -> None:
        self.file = open(path, "a") if is_main() else None
        self.best, self.last_eval = best, None

    def write(self, rec: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()

    def evaluation(self, res: dict) -> None:
        self.last_eval = res
        summary = {k: res[k] for k in METRICS}
        self.write({**summary, "eval": True})
        if self.best is None or (res["mIoU"] or 0) > (self.best["mIoU"] or 0):
            self.best = summary

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# ---------------------------------------------------------------------------------------------
# the command


def run(cfg: SegmentConfig) -> dict:
    # SIGTERM / SIGUSR1: finish the iteration, save, raise Preempted (exit code 75)
    with StopSignals() as stop:
        return train(cfg, stop)


def train(cfg: SegmentConfig, stop: StopSignals) -> dict:
    device = setup_distributed(resolve_device(cfg.device))
    out_dir, config = Path(cfg.out), to_dict(cfg)
    if is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()
    seed_everything(cfg.seed)
    weights = load_encoder_weights(cfg.encoder.checkpoint, cfg.encoder.preset, cfg.seed)
    mean, std = eval_normalization(cfg.data.mean, cfg.data.std, weights)
    data = build_data(cfg, mean, std, device, stop.worker_init_fn)
    model = build_model(cfg, weights, len(data.classes), device)
    wrapped = wrap_model(model, device, compile=False)
    seed_everything(cfg.seed + rank())  # drop path and dropout differ across ranks
    amp = resolve_amp(cfg.amp, device)
    groups = layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
    last = min(cfg.iters, cfg.max_iters) if cfg.max_iters else cfg.iters
    loss_args = (cfg.model.aux_weight, cfg.model.avg_non_ignore)
    if is_main():
        print(
            f"cmae segment: {weights.encoder} UperNet "
            f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), "
            f"{len(data.classes)} classes, {data.n_train} train / {len(data.val_set)} val images, "
            f"crop {cfg.data.crop}, {cfg.iters} iterations x batch {cfg.batch_size}, lr "
            f"{cfg.lr:g}, device {device} x {world_size()} process(es), amp {amp}, out {out_dir}"
        )
        remove_stale_temps(out_dir)
    step, best = resume(cfg.resume, out_dir, model, optimizer, config["model"], device)
    if step >= last and (out_dir / "results.json").is_file():
        if is_main():
            print(f"{out_dir} is already trained to iteration {step} (resume=never restarts)")
        teardown_distributed()
        return json.loads((out_dir / "results.json").read_text())
    checkpoints = RunCheckpoints(out_dir, cfg.keep_last, 0)
    log = RunLog(out_dir / "log.jsonl", best)
    spe = len(data.loader)

    def snapshot() -> dict:  # every rank: their RNG states are gathered
        state = training_state(model, optimizer, None, step, step // spe, config, (0, 0), device)
        return {**state, "best": log.best}

    def eval_now() -> None:
        workers = min(loader_workers(cfg.data.num_workers), 2)
        stops = data.loader.worker_init_fn  # the group-signal-proof workers, as in training
        val = data.val_set
        conf = evaluate(model, val, cfg.data.crop, cfg.data.stride, device, amp, workers, stops)
        log.evaluation(
            {"step": step, **seg_metrics(conf, data.classes), "confusion": conf.tolist()}
        )

    start = tick = time.perf_counter()
    tick_step = step
    bar = tqdm(total=last, initial=step, desc="segment", dynamic_ncols=True, disable=not is_main())
    model.train()
    while step < last:
        epoch = step // spe
        data.sampler.set_epoch(epoch, start=(step - epoch * spe) * data.loader.batch_size)
        for imgs, labels in data.loader:
            lr = lr_at(step, cfg.lr, cfg.warmup_iters, cfg.iters, cfg.power, cfg.min_lr)
            loss, aux_loss = train_step(
                wrapped, optimizer, imgs, labels, lr, *loss_args, amp, device
            )
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == last:
                now = time.perf_counter()
                rec = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": lr}
                if aux_loss is not None:
                    rec["loss_aux"] = aux_loss.item()
                rec["img_per_s"] = (step - tick_step) * cfg.batch_size / (now - tick)
                log.write(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
                tick, tick_step = now, step
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == last:
                eval_now()
                bar.set_postfix(loss=f"{loss.item():.4f}", mIoU=f"{log.last_eval['mIoU'] or 0:.2f}")
                tick = time.perf_counter()  # evaluation time is not training throughput
            if step < last and stop.requested():  # every rank, every step: all stop together
                bar.close()
                preempt(stop, snapshot(), checkpoints, step, log)
            if cfg.save_every and step % cfg.save_every == 0 and step < last:
                state = snapshot()
                if is_main():
                    checkpoints.save(state, step)
            if step >= last:
                break
    bar.close()
    if log.last_eval is None:  # resumed at the end of a run that has no results yet
        eval_now()
    state = snapshot()
    log.close()
    if not is_main():
        teardown_distributed()
        return {}
    checkpoints.save_final(state)
    results = finish(cfg, model, data, log, step, time.perf_counter() - start, weights, device)
    teardown_distributed()
    return results


def train_step(
    wrapped: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    imgs: Tensor,
    labels: Tensor,
    lr: float,
    aux_weight: float,
    avg_non_ignore: bool,
    amp: torch.dtype | None,
    device: torch.device,
) -> tuple[Tensor, Tensor | None]:
    """One optimizer step at ``lr`` (times each group's layer-decay scale); the losses."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    x = imgs.to(device, non_blocking=True)
    y = labels.to(device, non_blocking=True).long()
    with torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext():
        logits, aux = wrapped(x)
    loss, aux_loss = seg_loss(logits, aux, y, aux_weight, avg_non_ignore)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), None if aux_loss is None else aux_loss.detach()


def resume(
    setting: str,
    out_dir: Path,
    model: UperNet,
    optimizer: torch.optim.Optimizer,
    model_config: dict,
    device: torch.device,
) -> tuple[int, dict | None]:
    """(iteration, best evaluation so far) of the checkpoint ``resume`` picks, or (0, None)."""
    found = find_resume(setting, out_dir, "cmae segment", "")
    if found is None:
        return 0, None
    step, _ = restore_training(
        *found, model, optimizer, None, model_config, rank(), device, prefix=""
    )
    if is_main():
        print(f"resuming from {found[0]} at iteration {step}")
    return step, found[1].get("best")


def preempt(
    stop: StopSignals, state: dict, checkpoints: RunCheckpoints, step: int, log: RunLog
) -> NoReturn:
    """Save ``state`` (rank 0), close the log and raise Preempted (``cmae`` exits 75)."""
    path = checkpoints.save(state, step) if is_main() else None
    log.close()
    stop.stop_here(path, step, unit="iteration")


def finish(
    cfg: SegmentConfig,
    model: UperNet,
    data: SegData,
    log: RunLog,
    step: int,
    wall: float,
    weights: EncoderWeights,
    device: torch.device,
) -> dict:
    """OUT/results.json (the last evaluation in full, the best one, the run's facts) and
    OUT/predictions.png; rank 0."""
    out_dir, last = Path(cfg.out), log.last_eval
    results = {
        **{k: last[k] for k in METRICS[1:]},
        "iteration": step,
        "best": log.best,
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
    config = to_dict(cfg)
    (out_dir / "results.json").write_text(json.dumps({**results, "config": config}, indent=2))
    n = min(cfg.data.vis_images, len(data.val_base))
    if n:
        picks = sorted({round(i * (len(data.val_base) - 1) / max(n - 1, 1)) for i in range(n)})
        crop, stride = cfg.data.crop, cfg.data.stride
        path = out_dir / "predictions.png"
        write_predictions(model, data.val_base, data.val_set, picks, crop, stride, device, path)
    best = log.best
    print(
        f"cmae segment: mIoU {fmt(results['mIoU'])} mAcc {fmt(results['mAcc'])} aAcc "
        f"{fmt(results['aAcc'])} at iteration {step} (best mIoU {fmt(best['mIoU'])} at "
        f"{best['step']}); {wall:.0f}s; wrote {out_dir / 'results.json'}"
    )
    return results


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"
