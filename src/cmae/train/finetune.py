"""``cmae finetune``: end-to-end fine-tuning with the MAE / CMAE recipe (``cmae.eval.finetune``).

AdamW with layer-wise lr decay, drop path, RandAugment, random erasing, mixup / cutmix, label
smoothing, warmup + cosine per iteration; the held-out split evaluated every ``eval_every``
epochs and after the last. A checkpoint every ``save_every`` epochs and on SIGTERM / SIGUSR1
(exit 75); the same command resumes from the newest (``resume=auto``), with the same images
and augmentations as an uninterrupted run (each sample's draws are seeded by its (epoch,
index), the main process's RNG states are in the checkpoint). The lifecycle (lock, signals,
checkpoints, resume, non-finite steps, log) is ``cmae.train.lifecycle``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cmae.config import ConfigError, FinetuneConfig, to_dict
from cmae.data.datasets import loader_workers
from cmae.data.sampling import BadImages, EpochSampler, SeededSamples
from cmae.data.sources import labelled_splits
from cmae.data.views import eval_transform, normalize
from cmae.eval.finetune import BETAS, build_mixup, evaluate, freeze_for_partial, train_transform
from cmae.eval.frozen import eval_normalization
from cmae.interop.encoders import EncoderWeights, build_classifier, load_encoder_weights
from cmae.runtime.device import keep_freed_memory, resolve_device, seed_everything
from cmae.runtime.distributed import build_sampler
from cmae.runtime.faults import (
    BadSteps,
    buffer_values,
    poison_nonfinite,
    skip_nonfinite_step,
    worker_options,
)
from cmae.runtime.optim import cosine_lr, layer_decay_groups, set_lr
from cmae.runtime.resume import training_state
from cmae.train.lifecycle import TrainingJob


class BatchAugment(NamedTuple):
    """What the main process does to a batch: normalisation, random erasing, mixup / cutmix."""

    device: torch.device
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eraser: RandomErasing | None
    mixup: Mixup | None


def train_step(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    imgs: Tensor,
    labels: Tensor,
    lr: float,
    aug: BatchAugment,
    bad_steps: BadSteps,
) -> Tensor:
    """One optimizer step at ``lr`` (times each group's layer-decay scale); the detached loss.
    A step with a non-finite loss or gradient is skipped and counted (``skip_nonfinite_step``)."""
    set_lr(optimizer, lr)
    buffers = buffer_values(model)
    x = normalize(imgs.to(aug.device, non_blocking=True), aug.mean, aug.std)
    y = labels.to(aug.device, non_blocking=True)
    if aug.eraser is not None:
        x = aug.eraser(x)  # on normalised pixels, before mixing (timm's order)
    if aug.mixup is not None:
        x, y = aug.mixup(x, y)  # y: soft targets [B, C]
    loss = criterion(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    poison_nonfinite(loss).backward()
    skip_nonfinite_step(model, optimizer, buffers, bad_steps)
    return loss.detach()


def run(cfg: FinetuneConfig) -> dict:
    with TrainingJob(
        cfg.out, "cmae finetune", keep_last=cfg.keep_last, max_bad_steps=cfg.max_bad_steps
    ) as job:
        return train(cfg, job)


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
        "fine-tuning",
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
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed),
        **worker_options(workers, worker_init_fn),
    )
    val_loader = DataLoader(
        val_set, batch_size=cfg.batch_size, **worker_options(workers, worker_init_fn)
    )
    return FinetuneData(loader, sampler, val_loader, classes, len(train_set), len(val_set))


def train(cfg: FinetuneConfig, job: TrainingJob) -> dict:
    device = resolve_device(cfg.device)
    keep_freed_memory()  # as pretraining: no page faults for each step's activations
    seed_everything(cfg.seed)
    weights = load_encoder_weights(cfg.encoder.checkpoint, cfg.encoder.preset, cfg.seed)
    mean, std = eval_normalization(cfg.data.mean, cfg.data.std, weights)
    data = build_data(cfg, weights, mean, std, device, job.worker_init_fn)
    num_classes = len(data.classes)
    model, optimizer, base_lr = build_model(cfg, weights, num_classes, device)
    aug, criterion = batch_augment(cfg, num_classes, mean, std, device)
    steps_per_epoch = len(data.loader)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"cmae finetune: {weights.encoder} {weights.img_size}px, {n_trainable / 1e6:.2f}M "
        f"trainable params, {data.n_train} train / {data.n_val} val images, {num_classes} "
        f"classes, {steps_per_epoch} steps/epoch x {cfg.epochs} epochs, lr {base_lr:.3g}, "
        f"device {device}"
    )
    # what a checkpoint must match to be resumed here (the initial weights do not matter)
    config = {**to_dict(cfg), "model": model_identity(cfg, weights, num_classes)}
    resumed = job.resume(cfg.resume, model, optimizer, None, config["model"], device)
    step = resumed.step
    history = list(resumed.state.get("history", []))  # the evaluated epochs' records
    if job.already_trained(step, total_steps) and not job.missing_outputs("results.json"):
        return job.read_json("results.json")
    job.begin(
        to_dict(cfg),
        total=total_steps,
        initial=step,
        batch_size=cfg.batch_size,
        device=device,
        resumed_from=resumed.path,
    )
    bad_images = BadImages(
        cfg.max_bad_fraction, len(data.sampler), *resumed.bad_images, "max_bad_fraction"
    )
    # the running epoch's loss, summed on the device (no sync per step), and its steps
    epoch_loss, n_loss = resumed.state.get("epoch_loss", (0.0, 0))
    loss_sum, n_loss = torch.tensor(float(epoch_loss), device=device), int(n_loss)

    def snapshot(epoch: int) -> dict:
        counts = (bad_images.total, bad_images.in_epoch)
        state = training_state(model, optimizer, None, step, epoch, config, counts, device)
        return {**state, "history": history, "epoch_loss": [loss_sum.item(), n_loss]}

    for epoch in range(step // steps_per_epoch, cfg.epochs):
        done = step - epoch * steps_per_epoch  # batches trained before a resume
        data.sampler.set_epoch(epoch, start=done * cfg.batch_size)
        if done == 0:
            bad_images.new_epoch()
            loss_sum.zero_()
            n_loss = 0
        model.train()
        for imgs, labels, bad in data.loader:
            bad_images.add(bad, cfg.data.path or "the built-in data")
            loss_sum += train_step(
                model=model,
                optimizer=optimizer,
                criterion=criterion,
                imgs=imgs,
                labels=labels,
                lr=cosine_lr(step, total_steps, warmup_steps, base_lr, cfg.min_lr),
                aug=aug,
                bad_steps=job.bad_steps,
            )
            n_loss += 1
            step += 1
            job.advance()
            if step % steps_per_epoch and job.stop_requested():  # at an epoch's end: below
                job.stop(snapshot(epoch), step)
        rec = {"epoch": epoch, "step": step, "loss": loss_sum.item() / max(n_loss, 1)}
        rec["bad_images"] = bad_images.total  # unreadable train images substituted so far
        rec["skipped_steps"] = job.check_bad_steps(step)  # non-finite steps in this epoch
        rec["img_per_s"] = job.img_per_s(step)
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            with job.paused():
                top1, top5 = evaluate(model, data.val_loader, device, mean, std)
            rec.update(top1=top1, top5=top5)
            history.append(rec)
        job.log(rec, **({"top1": f"{rec['top1']:.2f}"} if "top1" in rec else {}))
        last = epoch + 1 == cfg.epochs
        if not last and job.stop_requested():
            job.stop(snapshot(epoch + 1), step, epoch + 1)
        if last or (cfg.save_every and (epoch + 1) % cfg.save_every == 0):
            job.save(snapshot(epoch + 1), step, epoch + 1)
    job.close()
    return finish(cfg, job, data, history, n_trainable, mean, std)


def build_model(
    cfg: FinetuneConfig, weights: EncoderWeights, num_classes: int, device: torch.device
) -> tuple[nn.Module, torch.optim.Optimizer, float]:
    """The classifier on the pretrained encoder (partially frozen with ``trainable_blocks``),
    AdamW with layer-wise lr decay, and the base lr (``blr`` x batch / 256)."""
    model = build_classifier(weights, num_classes, cfg.encoder.pool, cfg.drop_path).to(device)
    freeze_for_partial(model, cfg.trainable_blocks)
    base_lr = cfg.blr * cfg.batch_size / 256
    optimizer = torch.optim.AdamW(
        layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay), lr=base_lr, betas=BETAS
    )
    return model, optimizer, base_lr


def batch_augment(
    cfg: FinetuneConfig,
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
) -> tuple[BatchAugment, nn.Module]:
    """What the main process does to each batch, and the loss that fits it (soft targets
    with mixup / cutmix)."""
    mixup = build_mixup(cfg.mixup, cfg.cutmix, cfg.smoothing, num_classes)
    criterion = (
        SoftTargetCrossEntropy()
        if mixup is not None
        else nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)
    )
    eraser = RandomErasing(cfg.reprob, mode="pixel", device=str(device)) if cfg.reprob > 0 else None
    return BatchAugment(device, mean, std, eraser, mixup), criterion


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


def finish(
    cfg: FinetuneConfig,
    job: TrainingJob,
    data: FinetuneData,
    history: list[dict],
    n_trainable: int,
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
        "trainable_params": n_trainable,
        "mean": mean,
        "std": std,
    }
    job.write_json("results.json", {**results, "config": to_dict(cfg)})
    print(
        f"cmae finetune: last top-1 {results['top1']:.2f}% (top-5 {results['top5']:.2f}%), best "
        f"top-1 {best['top1']:.2f}% at epoch {best['epoch']}; wrote {job.out_dir / 'results.json'}"
    )
    return results
