"""``cmae segment``: semantic segmentation with UperNet on a pretrained encoder (the MAE / CMAE
ADE20K protocol; ``cmae.models.upernet`` for the model, ``cmae.data.segmentation`` for the
data).

AdamW with the fine-tuning code's layer-wise lr decay groups, linear warmup from lr x 1e-6 then
poly decay per iteration, cross-entropy with the ignore index on the logits upsampled to the
labels (+ the auxiliary head's, weighted). Evaluation: sliding windows over each validation
image rescaled to fit ``data.scale``, the averaged logits resized to the original labels, one
confusion matrix over the whole split (reduced across ranks) -> mIoU, mAcc, aAcc and per-class
IoU / accuracy. Checkpoints, ``resume=auto`` (bitwise on CPU), SIGTERM and torchrun as
``cmae pretrain``.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Subset
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
from cmae.interop.encoders import load_encoder_weights
from cmae.models.upernet import UperNet, build_segmentor
from cmae.runtime.checkpoint import RunCheckpoints, remove_stale_temps
from cmae.runtime.device import keep_freed_memory, resolve_amp, resolve_device, seed_everything
from cmae.runtime.distributed import (
    build_sampler,
    is_distributed,
    is_main,
    rank,
    setup_distributed,
    teardown_distributed,
    world_size,
    wrap_model,
)
from cmae.train.faults import Preempted, StopSignals, ignore_stop_signals
from cmae.train.resume import find_resume, restore_training, training_state

WARMUP_START = 1e-6  # the warmup's first lr factor (mmengine LinearLR start_factor)


def lr_at(step: int, cfg: SegmentConfig) -> float:
    """Linear warmup from lr x 1e-6 over warmup_iters, then poly(power) to min_lr at iters."""
    if step < cfg.warmup_iters:
        return cfg.lr * (WARMUP_START + (1 - WARMUP_START) * step / cfg.warmup_iters)
    span = max(cfg.iters - cfg.warmup_iters, 1)
    frac = min((step - cfg.warmup_iters) / span, 1.0)
    return (cfg.lr - cfg.min_lr) * (1 - frac) ** cfg.power + cfg.min_lr


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
        return F.cross_entropy(x.float(), labels, ignore_index=IGNORE, reduction="sum") / (
            labels.numel()
        )

    loss = ce(logits)
    if aux is None:
        return loss, None
    aux_loss = ce(aux)
    return loss + aux_weight * aux_loss, aux_loss


# ---------------------------------------------------------------------------------------------
# inference and metrics


def _pad_to(x: Tensor, h: int, w: int) -> Tensor:
    ph, pw = h - x.shape[-2], w - x.shape[-1]
    return F.pad(x, (0, pw, 0, ph), value=0.0) if ph or pw else x


def predict_logits(model: UperNet, x: Tensor) -> Tensor:
    """Logits at the input's size; the input is padded (bottom / right, 0 after normalisation)
    to a multiple of the model's coarsest stride and the logits cropped back."""
    h, w = x.shape[-2:]
    m = model.pad_multiple
    logits = model(_pad_to(x, math.ceil(h / m) * m, math.ceil(w / m) * m))[0]
    size = (math.ceil(h / m) * m, math.ceil(w / m) * m)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[..., :h, :w]


@torch.no_grad()
def slide_logits(model: UperNet, img: Tensor, crop: int, stride: int, batch: int = 4) -> Tensor:
    """[1, 3, H, W] -> [1, C, H, W]: ``crop`` windows every ``stride`` pixels (the last flush
    with the border; a side under ``crop`` is padded), each window's logits resized to it, the
    overlaps averaged (mmsegmentation's slide inference)."""
    h, w = img.shape[-2:]
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    out = img.new_zeros(1, model.num_classes, h, w)
    count = img.new_zeros(1, 1, h, w)
    for i in range(0, len(boxes), batch):
        part = boxes[i : i + batch]
        windows = torch.cat([_pad_to(img[..., a:b, c:d], crop, crop) for a, b, c, d in part])
        logits = predict_logits(model, windows).float()
        for j, (a, b, c, d) in enumerate(part):
            out[..., a:b, c:d] += logits[j : j + 1, :, : b - a, : d - c]
            count[..., a:b, c:d] += 1
    return out / count


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int) -> Tensor:
    """[C, C] int64 counts, rows = true class, columns = predicted; IGNORE pixels left out."""
    valid = label != IGNORE
    idx = label[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes**2).view(num_classes, num_classes)


def seg_metrics(conf: Tensor, classes: list[str]) -> dict:
    """mIoU, mAcc, aAcc (percent) and per-class IoU / accuracy from one confusion matrix.

    A class absent from the labels has no accuracy (None) and no IoU unless it was predicted
    (then IoU 0); the means skip the None entries (mmsegmentation's nanmean)."""
    conf = conf.double()
    tp, gt, pred = conf.diag(), conf.sum(1), conf.sum(0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.nan) * 100
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.nan) * 100
    total = conf.sum()

    def value(x: Tensor) -> float | None:
        return None if math.isnan(x.item()) else x.item()

    return {
        "mIoU": value(iou.nanmean()),
        "mAcc": value(acc.nanmean()),
        "aAcc": value(tp.sum() / total * 100) if total > 0 else None,
        "per_class": {
            name: {"iou": value(iou[i]), "acc": value(acc[i])} for i, name in enumerate(classes)
        },
    }


@torch.no_grad()
def evaluate(
    model: UperNet,
    val_set: SegValSet,
    crop: int,
    stride: int,
    device: torch.device,
    amp: torch.dtype | None,
    workers: int,
) -> Tensor:
    """The confusion matrix over the whole validation split; each rank takes every
    world_size-th image and the counts are summed across ranks."""
    was_training = model.training
    model.eval()
    mine = Subset(val_set, list(range(rank(), len(val_set), world_size())))
    loader = DataLoader(mine, batch_size=1, num_workers=workers, generator=torch.Generator())
    conf = torch.zeros(model.num_classes, model.num_classes, dtype=torch.long, device=device)
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
    for img, label, _ in loader:
        with autocast:
            logits = slide_logits(model, img.to(device), crop, stride)
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
        conf += confusion_matrix(logits.argmax(1)[0], label[0].to(device), model.num_classes)
    if is_distributed():
        dist.all_reduce(conf)
    model.train(was_training)
    return conf.cpu()


# ---------------------------------------------------------------------------------------------
# pictures

# distinct colours for the first classes, then fixed random ones; black is the ignore colour
BASE_PALETTE = [
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
    (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0),
    (0, 128, 192), (230, 25, 75), (60, 180, 75), (255, 225, 25), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
]  # fmt: skip


def palette(num_classes: int) -> np.ndarray:
    """[num_classes, 3] uint8: BASE_PALETTE, then colours from a fixed seed (never black)."""
    extra = np.random.default_rng(0).integers(16, 256, (max(num_classes - 20, 0), 3))
    return np.concatenate([np.array(BASE_PALETTE, np.int64), extra])[:num_classes].astype(np.uint8)


def colorize(label: Tensor, num_classes: int) -> np.ndarray:
    """[H, W] labels -> [H, W, 3] uint8 with the palette, IGNORE black."""
    lut = np.zeros((256, 3), np.uint8)
    lut[:num_classes] = palette(num_classes)
    return lut[label.numpy().astype(np.uint8)]


@torch.no_grad()
def write_predictions(
    model: UperNet,
    base,
    val_set: SegValSet,
    indices: list[int],
    crop: int,
    stride: int,
    device: torch.device,
    path: Path,
    height: int = 160,
) -> Path:
    """image | ground truth | prediction rows for the validation images ``indices``."""
    was_training = model.training
    model.eval()
    rows = []
    for i in indices:
        raw, _ = base.raw(i)
        img, label, _ = val_set[i]
        logits = slide_logits(model, img[None].to(device).float(), crop, stride)
        logits = F.interpolate(logits, size=label.shape, mode="bilinear", align_corners=False)
        pred = logits.argmax(1)[0].cpu()
        tiles = [
            raw.permute(1, 2, 0).numpy(),
            colorize(label, model.num_classes),
            colorize(pred, model.num_classes),
        ]
        h, w = label.shape
        size = (max(1, round(w * height / h)), height)
        rows.append(
            np.concatenate(
                [
                    np.asarray(Image.fromarray(t).resize(size, Image.Resampling.NEAREST))
                    for t in tiles
                ],
                axis=1,
            )
        )
    model.train(was_training)
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    Image.fromarray(np.concatenate(rows)).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# the command


def run(cfg: SegmentConfig) -> dict:
    # SIGTERM / SIGUSR1: finish the iteration, save, raise Preempted (exit code 75)
    with StopSignals() as stop:
        return train(cfg, stop)


def train(cfg: SegmentConfig, stop: StopSignals) -> dict:
    d, m = cfg.data, cfg.model
    device = setup_distributed(resolve_device(cfg.device))
    out_dir = Path(cfg.out)
    config = to_dict(cfg)
    if is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()
    seed_everything(cfg.seed)
    weights = load_encoder_weights(cfg.encoder.checkpoint, cfg.encoder.preset, cfg.seed)
    mean, std = eval_normalization(d.mean, d.std, weights)
    train_base, val_base, classes = segmentation_splits(
        d.path, d.num_classes, d.reduce_zero_label and d.path is not None, d.synthetic()
    )
    pipeline = TrainPipeline(
        d.scale, d.ratio_range, d.crop, d.cat_max_ratio, d.hflip, d.photometric, mean, std
    )
    train_set = SegTrainSet(train_base, pipeline, cfg.seed)
    val_set = SegValSet(val_base, d.scale, mean, std)
    if cfg.batch_size % world_size():
        raise ConfigError(
            f"batch_size: {cfg.batch_size} must be divisible by the world size ({world_size()})"
        )
    local_batch = cfg.batch_size // world_size()
    sampler = EpochSampler(build_sampler(train_set, cfg.seed))
    workers = loader_workers(d.num_workers)
    loader = DataLoader(
        train_set,
        batch_size=local_batch,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=ignore_stop_signals,
        # its own generator: starting an epoch's iterator must not draw from the global one,
        # which the resumed run restores (drop path, dropout)
        generator=torch.Generator().manual_seed(cfg.seed + rank()),
    )
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size: {cfg.batch_size} is larger than the training split "
            f"({len(train_set)} images)"
        )
    try:
        model = build_segmentor(
            weights,
            len(classes),
            d.crop,
            m.channels,
            m.aux_channels,
            m.pool_scales,
            m.dropout,
            m.drop_path,
            m.out_indices,
            m.rel_pos_bias,
            m.layer_scale,
        ).to(device)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if d.crop % model.pad_multiple:
        raise ConfigError(
            f"data.crop: {d.crop} must be a multiple of {model.pad_multiple} (the coarsest "
            "pyramid level's stride)"
        )
    wrapped = wrap_model(model, device, compile=False)
    seed_everything(cfg.seed + rank())  # drop path and dropout differ across ranks
    amp = resolve_amp(cfg.amp, device)
    optimizer = torch.optim.AdamW(
        layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay),
        lr=cfg.lr,
        betas=cfg.betas,
        fused=True,
    )
    last = min(cfg.iters, cfg.max_iters) if cfg.max_iters else cfg.iters
    n_params = sum(p.numel() for p in model.parameters())
    if is_main():
        print(
            f"cmae segment: {weights.encoder} UperNet ({n_params / 1e6:.2f}M params), "
            f"{len(classes)} classes, {len(train_set)} train / {len(val_set)} val images, crop "
            f"{d.crop}, {cfg.iters} iterations x batch {cfg.batch_size}, lr {cfg.lr:g}, device "
            f"{device} x {world_size()} process(es), amp {amp}, out {out_dir}"
        )

    step, best = 0, None
    if is_main():
        remove_stale_temps(out_dir)
    resumed = find_resume(cfg.resume, out_dir)
    if resumed is not None:
        step, _ = restore_training(
            *resumed, model, optimizer, None, config["model"], rank(), device
        )
        best = resumed[1].get("best")
        if is_main():
            print(f"resuming from {resumed[0]} at iteration {step}")
    del resumed
    if step >= last and (out_dir / "results.json").is_file():
        if is_main():
            print(f"{out_dir} is already trained to iteration {step} (resume=never restarts)")
        teardown_distributed()
        return json.loads((out_dir / "results.json").read_text())
    checkpoints = RunCheckpoints(out_dir, cfg.keep_last, 0)
    log = open(out_dir / "log.jsonl", "a") if is_main() else None

    def write(rec: dict) -> None:
        if log is not None:
            log.write(json.dumps(rec) + "\n")
            log.flush()

    def snapshot() -> dict:
        state = training_state(
            model, optimizer, None, step, step // steps_per_epoch, config, (0, 0), device
        )
        state["best"] = best
        return state

    def eval_now() -> dict:
        conf = evaluate(model, val_set, d.crop, d.stride, device, amp, min(workers, 2))
        res = seg_metrics(conf, classes)
        return {"step": step, **res, "confusion": conf.tolist()}

    start = time.perf_counter()
    tick, tick_step = start, step
    bar = tqdm(total=last, initial=step, desc="segment", dynamic_ncols=True, disable=not is_main())
    model.train()
    last_eval = None
    while step < last:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch, start=(step - epoch * steps_per_epoch) * local_batch)
        for imgs, labels in loader:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            x = imgs.to(device, non_blocking=True)
            y = labels.to(device, non_blocking=True).long()
            with torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext():
                logits, aux = wrapped(x)
            loss, aux_loss = seg_loss(logits, aux, y, m.aux_weight, m.avg_non_ignore)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == last:
                now = time.perf_counter()
                rec = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": lr}
                if aux_loss is not None:
                    rec["loss_aux"] = aux_loss.item()
                rec["img_per_s"] = (step - tick_step) * cfg.batch_size / (now - tick)
                tick, tick_step = now, step
                write(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == last:
                last_eval = eval_now()
                summary = {k: last_eval[k] for k in ("step", "mIoU", "mAcc", "aAcc")}
                write({**summary, "eval": True})
                if best is None or (last_eval["mIoU"] or 0) > (best["mIoU"] or 0):
                    best = summary
                bar.set_postfix(loss=f"{loss.item():.4f}", mIoU=f"{last_eval['mIoU'] or 0:.2f}")
                tick = time.perf_counter()  # evaluation time is not training throughput
            if step < last and stop.requested():
                state = snapshot()
                path = checkpoints.save(state, step) if is_main() else None
                bar.close()
                if log is not None:
                    log.close()
                if is_main():
                    saved = f"saved {path}" if path else "its save failed (see above)"
                    print(
                        f"stopped by {stop.name} at iteration {step}; {saved}. Run the same "
                        "command again to resume (resume=auto)"
                    )
                teardown_distributed()
                raise Preempted(f"stopped by {stop.name} at iteration {step}", path and str(path))
            if cfg.save_every and step % cfg.save_every == 0 and step < last:
                state = snapshot()
                if is_main():
                    checkpoints.save(state, step)
            if step >= last:
                break
    bar.close()
    wall = time.perf_counter() - start
    if last_eval is None:  # resumed at the end without results: evaluate once
        last_eval = eval_now()
        best = best or {k: last_eval[k] for k in ("step", "mIoU", "mAcc", "aAcc")}
    state = snapshot()
    if not is_main():
        teardown_distributed()
        return {}
    log.close()
    checkpoints.save_final(state)
    results = {
        "mIoU": last_eval["mIoU"],
        "mAcc": last_eval["mAcc"],
        "aAcc": last_eval["aAcc"],
        "iteration": step,
        "best": best,
        "per_class": last_eval["per_class"],
        "classes": classes,
        "confusion": last_eval["confusion"],
        "n_train": len(train_set),
        "n_val": len(val_set),
        "params": n_params,
        "encoder": weights.encoder,
        "wall_s": wall,
        "mean": list(mean),
        "std": list(std),
    }
    (out_dir / "results.json").write_text(json.dumps({**results, "config": config}, indent=2))
    if d.vis_images:
        n = min(d.vis_images, len(val_base))
        picks = sorted({round(i * (len(val_base) - 1) / max(n - 1, 1)) for i in range(n)})
        write_predictions(
            model, val_base, val_set, picks, d.crop, d.stride, device, out_dir / "predictions.png"
        )
    teardown_distributed()
    print(
        f"cmae segment: mIoU {fmt(results['mIoU'])} mAcc {fmt(results['mAcc'])} aAcc "
        f"{fmt(results['aAcc'])} at iteration {step} (best mIoU {fmt(best['mIoU'])} at "
        f"{best['step']}); {wall:.0f}s; wrote {out_dir / 'results.json'}"
    )
    return results


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"
