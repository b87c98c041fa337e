"""``cmae finetune``: end-to-end fine-tuning with the MAE / CMAE recipe (``cmae.eval.finetune``).

AdamW with layer-wise lr decay, drop path, RandAugment, random erasing, mixup / cutmix, label
smoothing, warmup + cosine per iteration; the held-out split evaluated every ``eval_every``
epochs and after the last. A checkpoint every ``save_every`` epochs and on SIGTERM / SIGUSR1
(exit 75); the same command resumes from the newest (``resume=auto``), with the same images
and augmentations as an uninterrupted run (each sample's draws are seeded by its (epoch,
index), the main process's RNG states are in the checkpoint). One run per OUT (a lock).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, NoReturn

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cmae.config import ConfigError, FinetuneConfig, to_dict
from cmae.data.datasets import labelled_splits, loader_workers
from cmae.data.sampling import BadImages, EpochSampler, SeededSamples
from cmae.data.views import eval_transform, normalize
from cmae.eval.finetune import (
    BETAS,
    build_mixup,
    evaluate,
    freeze_for_partial,
    layer_decay_groups,
    train_transform,
)
from cmae.eval.frozen import eval_normalization, write_results
from cmae.interop.encoders import EncoderWeights, build_classifier, load_encoder_weights
from cmae.runtime.checkpoint import RunCheckpoints, remove_stale_temps
from cmae.runtime.device import keep_freed_memory, resolve_device, seed_everything
from cmae.runtime.distributed import build_sampler
from cmae.runtime.optim import cosine_lr
from cmae.runtime.runlock import lock_run_dir
from cmae.train.faults import StopSignals
from cmae.train.resume import find_resume, restore_training, training_state


class BatchAugment(NamedTuple):
    """What the main process does to a batch: normalisation, random erasing, mixup / cutmix."""

    device: torch.device
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eraser: RandomErasing | None
    mixup: Mixup | None


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    imgs: Tensor,
    y: Tensor,
    lr: float,
    aug: BatchAugment,
) -> Tensor:
    """One optimizer step at ``lr`` (times each group's layer-decay scale); the detached loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    x = normalize(imgs.to(aug.device, non_blocking=True), aug.mean, aug.std)
    y = y.to(aug.device, non_blocking=True)
    if aug.eraser is not None:
        x = aug.eraser(x)  # on normalised pixels, before mixing (timm's order)
    if aug.mixup is not None:
        x, y = aug.mixup(x, y)  # y: soft targets [B, C]
    loss = criterion(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def run(cfg: FinetuneConfig) -> dict:
    # one run per OUT; SIGTERM / SIGUSR1: finish the step, save, raise Preempted (`cmae` exits
    # 75) and the same command resumes (resume=auto)
    with lock_run_dir(cfg.out), StopSignals() as stop:
        return train(cfg, stop)


class FinetuneData(NamedTuple):
    loader: DataLoader
    sampler: EpochSampler
    val_loader: DataLoader
    classes: list[str]
    n_train: int
    n_val: int


def build_data(
    cfg: FinetuneConfig,
    weights: EncoderWeights,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    worker_init_fn: Callable[[int], None],
) -> FinetuneData:
    """The train loader draws ``(epoch, index)`` keys and seeds every sample's augmentation
    from them (so a resumed run sees the same images and views) and substitutes unreadable
    images; its workers and the val loader's ignore stop signals while the run goes on."""
    d = cfg.data
    train_set, val_set, classes = labelled_splits(
        d.path,
        train_transform(weights.img_size, cfg.rand_augment, mean, std),
        eval_transform(weights.img_size, d.crop_pct),
        d.synthetic(),
    )
    if cfg.batch_size > len(train_set):
        raise ConfigError(
            f"batch_size: {cfg.batch_size} is larger than the train split ({len(train_set)})"
        )
    workers = loader_workers(d.num_workers)
    sampler = EpochSampler(build_sampler(train_set, cfg.seed))
    loader = DataLoader(
        SeededSamples(train_set, cfg.seed, global_rngs=True),  # timm's views draw from those
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=True,  # mixup pairs samples: the batch must stay even
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed),
        worker_init_fn=worker_init_fn,
    )
    val_loader = DataLoader(
        val_set, batch_size=cfg.batch_size, num_workers=workers, worker_init_fn=worker_init_fn
    )
    return FinetuneData(loader, sampler, val_loader, classes, len(train_set), len(val_set))


def train(cfg: FinetuneConfig, stop: StopSignals) -> dict:
    out_dir = Path(cfg.out)
    device = resolve_device(cfg.device)
    keep_freed_memory()  # as pretraining: no page faults for each step's activations
    seed_everything(cfg.seed)
    weights = load_encoder_weights(cfg.encoder.checkpoint, cfg.encoder.preset, cfg.seed)
    mean, std = eval_normalization(cfg.data.mean, cfg.data.std, weights)
    data = build_data(cfg, weights, mean, std, device, stop.worker_init_fn)
    classes = data.classes
    model = build_classifier(weights, len(classes), cfg.encoder.pool, cfg.drop_path).to(device)
    freeze_for_partial(model, cfg.trainable_blocks)
    base_lr = cfg.blr * cfg.batch_size / 256
    optimizer = torch.optim.AdamW(
        layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay), lr=base_lr, betas=BETAS
    )
    mixup = build_mixup(cfg.mixup, cfg.cutmix, cfg.smoothing, len(classes))
    criterion = (
        SoftTargetCrossEntropy()
        if mixup is not None
        else nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)
    )
    eraser = RandomErasing(cfg.reprob, mode="pixel", device=str(device)) if cfg.reprob > 0 else None
    aug = BatchAugment(device, mean, std, eraser, mixup)
    spe = len(data.loader)
    total_steps = cfg.epochs * spe
    warmup_steps = cfg.warmup_epochs * spe

    def lr_at(step: int) -> float:
        return cosine_lr(step, total_steps, warmup_steps, base_lr, cfg.min_lr)

    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"cmae finetune: {weights.encoder} {weights.img_size}px, {n_train / 1e6:.2f}M trainable "
        f"params, {data.n_train} train / {data.n_val} val images, {len(classes)} classes, "
        f"{spe} steps/epoch x {cfg.epochs} epochs, lr {base_lr:.3g}, device {device}"
    )
    remove_stale_temps(out_dir)
    # what a checkpoint must match to be resumed here (the initial weights do not matter)
    config = {**to_dict(cfg), "model": model_identity(cfg, weights, len(classes))}
    state = resume_point(cfg.resume, out_dir, model, optimizer, config["model"], device)
    step, history = state.step, state.history
    if step >= total_steps and (out_dir / "results.json").is_file():
        print(f"{out_dir} is already fine-tuned to step {step} (resume=never restarts)")
        return json.loads((out_dir / "results.json").read_text())
    checkpoints = RunCheckpoints(out_dir, cfg.keep_last, 0)
    bad = BadImages(cfg.max_bad_fraction, len(data.sampler), *state.bad_images, "max_bad_fraction")
    loss_sum = torch.tensor(state.epoch_loss[0], device=device)  # summed on the device: no sync
    n_loss = state.epoch_loss[1]

    def snapshot(epoch: int) -> dict:
        ckpt = training_state(
            model, optimizer, None, step, epoch, config, (bad.total, bad.in_epoch), device
        )
        return {**ckpt, "history": history, "epoch_loss": [loss_sum.item(), n_loss]}

    with open(out_dir / "log.jsonl", "a") as log:
        if state.path is not None:
            log.write(json.dumps({"step": step, "resumed_from": str(state.path)}) + "\n")
        bar = tqdm(total=total_steps, initial=step, desc="finetune", dynamic_ncols=True)
        for epoch in range(step // spe, cfg.epochs):
            done = step - epoch * spe  # batches trained before a resume
            data.sampler.set_epoch(epoch, start=done * cfg.batch_size)
            if done == 0:
                bad.new_epoch()
                loss_sum.zero_()
                n_loss = 0
            model.train()
            for imgs, y, flags in data.loader:
                bad.add(flags, cfg.data.path or "the built-in data")
                loss_sum += train_step(model, optimizer, criterion, imgs, y, lr_at(step), aug)
                n_loss += 1
                step += 1
                bar.update(1)
                if step % spe and stop.requested():  # mid-epoch; at an epoch's end: below
                    stopped(stop, checkpoints, snapshot(epoch), step, None, bar)
            rec = {"epoch": epoch, "step": step, "loss": loss_sum.item() / max(n_loss, 1)}
            rec["bad_images"] = bad.total  # unreadable train images substituted so far
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                top1, top5 = evaluate(model, data.val_loader, device, mean, std)
                rec.update(top1=top1, top5=top5)
                history.append(rec)
                bar.set_postfix(top1=f"{top1:.2f}")
            log.write(json.dumps(rec) + "\n")
            log.flush()
            last = epoch + 1 == cfg.epochs
            if not last and stop.requested():
                stopped(stop, checkpoints, snapshot(epoch + 1), step, epoch + 1, bar)
            if last or (cfg.save_every and (epoch + 1) % cfg.save_every == 0):
                checkpoints.save(snapshot(epoch + 1), step, epoch + 1)
        bar.close()
    return finish(cfg, out_dir, data, history, n_train, mean, std)


def model_identity(cfg: FinetuneConfig, weights: EncoderWeights, num_classes: int) -> dict:
    """The architecture a checkpoint of this run holds: a resume must find the same."""
    return {
        "encoder": weights.encoder,
        "img_size": weights.img_size,
        "pool": str(cfg.encoder.pool),  # a plain str: checkpoints load with weights_only
        "num_classes": num_classes,
        "drop_path": cfg.drop_path,
        "trainable_blocks": cfg.trainable_blocks,
    }


class ResumePoint(NamedTuple):
    path: Path | None  # None: a fresh start
    step: int
    history: list[dict]  # the evaluated epochs' records
    bad_images: tuple[int, int]
    epoch_loss: tuple[float, int]  # the running epoch's loss sum and steps so far


def resume_point(
    setting: str,
    out_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    identity: dict,
    device: torch.device,
) -> ResumePoint:
    """Load the checkpoint ``resume`` picks (auto: the newest in OUT/checkpoints) into the run."""
    found = find_resume(setting, out_dir, "cmae finetune", "")
    if found is None:
        return ResumePoint(None, 0, [], (0, 0), (0.0, 0))
    path, state = found
    step, bad = restore_training(
        path, state, model, optimizer, None, identity, 0, device, prefix=""
    )
    print(f"resuming from {path} at step {step}")
    loss_sum, n = state.get("epoch_loss", (0.0, 0))
    return ResumePoint(path, step, list(state.get("history", [])), bad, (float(loss_sum), int(n)))


def stopped(
    stop: StopSignals,
    checkpoints: RunCheckpoints,
    state: dict,
    step: int,
    epoch: int | None,
    bar: tqdm,
) -> NoReturn:
    """Save ``state`` (``epoch``: the epochs it completes, when at an epoch's end) and raise
    Preempted (``cmae`` exits 75)."""
    bar.close()
    stop.stop_here(checkpoints.save(state, step, epoch), step)


def finish(
    cfg: FinetuneConfig,
    out_dir: Path,
    data: FinetuneData,
    history: list[dict],
    n_train: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> dict:
    """OUT/results.json: the last evaluated epoch's accuracies, the best one, the run's facts."""
    best = max(history, key=lambda r: r["top1"])  # of the evaluated epochs
    results = {
        "top1": history[-1]["top1"],  # last epoch
        "top5": history[-1]["top5"],
        "best_top1": best["top1"],
        "best_epoch": best["epoch"],
        "final_loss": history[-1]["loss"],
        "n_train": data.n_train,
        "n_val": data.n_val,
        "num_classes": len(data.classes),
        "trainable_params": n_train,
        "mean": mean,
        "std": std,
    }
    write_results(out_dir, results, to_dict(cfg))
    print(
        f"cmae finetune: last top-1 {results['top1']:.2f}% (top-5 {results['top5']:.2f}%), best "
        f"top-1 {best['top1']:.2f}% at epoch {best['epoch']}; wrote {out_dir / 'results.json'}"
    )
    return results
