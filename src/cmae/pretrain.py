"""``cmae pretrain``: CMAE / MAE pretraining, one process or many under torchrun (DDP)."""

from __future__ import annotations

import ctypes
import json
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from cmae.checkpoint import RunCheckpoints, remove_stale_temps, save_encoder
from cmae.config import Config, ConfigError, to_dict
from cmae.data import build_datasets, loader_workers
from cmae.distributed import (
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
from cmae.export import encoder_format
from cmae.faults import (
    BadSteps,
    Preempted,
    StopSignals,
    grads_finite,
    ignore_stop_signals,
    keep_buffers_unless,
    poison_nonfinite,
    step_unless_bad,
)
from cmae.knn import knn_eval
from cmae.losses import gather_keys
from cmae.model import CMAE, CMAEOutput, build_encoder, build_model
from cmae.monitor import contrastive_health
from cmae.optim import cosine_lr, momentum_at, param_groups
from cmae.plot import write_summary
from cmae.resume import find_resume, restore_training, set_deterministic, training_state
from cmae.sampling import BadImages, EpochSampler, SeededSamples
from cmae.views import (
    CropBoxes,
    DeviceTargetColor,
    DeviceViews,
    PixelShiftViews,
    SingleView,
    collate_boxes,
    eval_transform,
    normalize,
    target_color_transform,
)
from cmae.visualize import RunVisuals


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but CUDA is not available")
    return torch.device(name)


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """``train.amp`` -> the autocast dtype, None for fp32. auto: bf16 on CUDA, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[name]


def keep_freed_memory() -> bool:
    """glibc: serve tensors up to 32 MiB from the heap and keep freed memory for reuse, instead
    of mapping fresh pages for each activation and unmapping them when it is freed: a ViT-Tiny
    CMAE step took ~160-200k page faults and 8-18% longer on this project's CPU machine
    (docs/PERFORMANCE.md). The process's memory then stays near its peak, which training
    reaches every step anyway. Returns whether it applied (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_views(cfg: Config, workers_part: bool = False):
    """The training views; ``workers_part``: what the data workers compute of them (all of
    it, or under ``data.resize_device`` the crop boxes that ``build_device_views`` finishes)."""
    m, d = cfg.model, cfg.data
    if workers_part and d.resize_device:
        shift = d.max_shift if m.method == "cmae" else 0
        return CropBoxes(m.img_size, shift, d.crop_scale, d.crop_ratio, d.hflip)
    if m.method == "mae":
        return SingleView(m.img_size, d.crop_scale, d.crop_ratio, d.hflip)
    color = target_color_transform(
        d.brightness,
        d.contrast,
        d.saturation,
        d.hue,
        d.color_jitter_p,
        d.grayscale_p,
        d.blur_p,
        d.blur_sigma,
    )
    return PixelShiftViews(
        m.img_size,
        d.max_shift,
        d.crop_scale,
        d.crop_ratio,
        d.hflip,
        color if d.target_color_aug and not d.target_aug_device else None,
    )


def build_device_color(cfg: Config) -> DeviceTargetColor | None:
    """The target view's colour ops for the training device (``data.target_aug_device``)."""
    m, d = cfg.model, cfg.data
    if m.method == "mae" or not (d.target_color_aug and d.target_aug_device):
        return None
    return DeviceTargetColor(
        d.brightness,
        d.contrast,
        d.saturation,
        d.hue,
        d.color_jitter_p,
        d.grayscale_p,
        d.blur_p,
        d.blur_sigma,
    )


def build_device_views(cfg: Config) -> DeviceViews | None:
    """The views' resize on the training device (``data.resize_device``), else None."""
    m, d = cfg.model, cfg.data
    if not d.resize_device:
        return None
    cmae = m.method == "cmae"
    return DeviceViews(m.img_size, d.max_shift if cmae else 0, two_views=cmae)


def to_device(
    views: list[torch.Tensor],
    device: torch.device,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    target_color: DeviceTargetColor | None = None,
    device_views: DeviceViews | None = None,
) -> list[torch.Tensor]:
    """uint8 views from the loader -> normalised float32 on ``device`` (4x less to copy than
    float); ``target_color`` first colour-augments the target view (views[1]) there. With
    ``device_views`` the loader's ``views`` are ``collate_boxes``' (buffer, sizes, params),
    made into views on ``device`` first."""
    if device_views is not None:
        views = device_views(*views, device)
    else:
        views = [v.to(device, non_blocking=True) for v in views]
    if target_color is not None:
        views[1] = target_color(views[1])
    return [normalize(v, mean, std) for v in views]


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
    update, no EMA, BatchNorm statistics kept; ``bad_steps`` counts it (cmae.faults).
    """
    wrapped = model if wrapped is None else wrapped
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
        bad_steps.update(ok)
    if len(outs) == 1:
        return outs[0]
    fields = list(zip(*outs, strict=True))  # the losses are averaged, the tensors concatenated
    return CMAEOutput(
        *(torch.stack(f).mean() for f in fields[:3]),
        *(None if f[0] is None else torch.cat(f) for f in fields[3:]),
    )


def run(cfg: Config) -> dict:
    # SIGTERM / SIGUSR1: finish the step, save, raise Preempted (`cmae pretrain` exits 75)
    with StopSignals() as stop:
        return train(cfg, stop)


def train(cfg: Config, stop: StopSignals) -> dict:
    t, d = cfg.train, cfg.data
    # under torchrun: join the process group first; only rank 0 prints and writes files
    device = setup_distributed(resolve_device(t.device))
    out_dir = Path(t.out)
    if is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if t.threads is not None:
        torch.set_num_threads(t.threads)
    keep_freed_memory()
    set_deterministic(t.deterministic)
    seed_everything(t.seed)

    synthetic = {
        "train": d.synthetic_train,
        "val": d.synthetic_val,
        "size": d.synthetic_size,
        "seed": d.synthetic_seed,
    }
    train_set, bank_set, query_set = build_datasets(
        d.path,
        build_views(cfg, workers_part=True),
        eval_transform(cfg.model.img_size),
        synthetic,
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
    device_color = build_device_color(cfg)  # None: the data workers do the colour ops
    device_views = build_device_views(cfg)  # None: the data workers resize the crops
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
        worker_init_fn=ignore_stop_signals,
        collate_fn=collate_boxes if device_views is not None else None,
    )

    model = build_model(cfg.model).to(device)
    wrapped = wrap_model(model, device, t.compile)  # DDP (+ SyncBatchNorm) across ranks
    # the weights above are identical on all ranks; masks and augmentations must differ
    seed_everything(t.seed + rank())
    amp = resolve_amp(t.amp, device)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    base_lr = t.lr if t.lr is not None else t.blr * t.batch_size / 256  # global batch
    # fused: one kernel for all parameters, on CPU too (faster than the per-parameter loop,
    # docs/PERFORMANCE.md), and it reads the skip-step flag on the device (cmae.faults)
    optimizer = torch.optim.AdamW(
        param_groups(model, t.weight_decay, t.wd_exempt), lr=base_lr, betas=t.betas, fused=True
    )
    steps_per_epoch = len(loader)
    total_steps = t.epochs * steps_per_epoch
    warmup_steps = int(t.warmup_epochs * steps_per_epoch)
    last_step = min(total_steps, t.max_steps) if t.max_steps else total_steps
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if is_main():
        print(
            f"cmae pretrain: {cfg.model.method} {cfg.model.encoder} {cfg.model.img_size}px, "
            f"{n_params / 1e6:.2f}M trainable params, {len(train_set)} images, "
            f"{steps_per_epoch} steps/epoch x {t.epochs} epochs, lr {base_lr:.3g}, "
            f"device {device} x {world_size()} process(es), amp {amp}, out {out_dir}"
        )

    if t.knn_every and bank_set is None and is_main():
        print("train.knn_every: the data has no labelled held-out split, kNN monitor off")
    visuals = RunVisuals(
        out_dir,
        t.tensorboard and is_main(),
        t.vis_every,
        samples,
        d.mean,
        d.std,
        t.seed,
        device_views,
    )
    # resume: model, optimizer, scaler, step (-> schedules, sampler position), RNG states
    step, bad_counts = 0, (0, 0)
    if is_main():
        remove_stale_temps(out_dir)
    resumed = find_resume(t.resume, out_dir)
    if resumed is not None:
        step, bad_counts = restore_training(
            *resumed, model, optimizer, scaler, to_dict(cfg)["model"], rank(), device
        )
        if is_main():
            print(f"resuming from {resumed[0]} at step {step}")
    resumed_from = resumed and str(resumed[0])
    del resumed  # the loaded state: free its memory
    if step >= last_step:
        if is_main():
            print(f"{out_dir} is already trained to step {step} (train.resume=never restarts)")
        visuals.close()
        teardown_distributed()
        summary_file = out_dir / "summary.json"
        return json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    checkpoints = RunCheckpoints(out_dir, t.keep_last, t.keep_every_epochs)
    bad_steps = BadSteps(device)
    bad_images = BadImages(d.max_bad_fraction, len(sampler), *bad_counts)
    log_file = open(out_dir / "log.jsonl", "a") if is_main() else None  # appended on resume
    if is_main() and step:
        log_file.write(json.dumps({"step": step, "resumed_from": resumed_from}) + "\n")

    def snapshot() -> dict:
        """The training state now; every rank calls it (their RNG states are gathered)."""
        counts = (bad_images.total, bad_images.in_epoch)
        cfg_dict = to_dict(cfg)
        return training_state(model, optimizer, scaler, step, epoch, cfg_dict, counts, device)

    def save(epoch_end: int | None) -> Path | None:
        """A periodic checkpoint in OUT/checkpoints/, written by rank 0."""
        state = snapshot()
        return checkpoints.save(state, step, epoch_end) if is_main() else None

    start = time.perf_counter()
    tick, tick_step = start, step
    bar = tqdm(
        total=last_step, initial=step, desc="pretrain", dynamic_ncols=True, disable=not is_main()
    )
    model.train()
    epoch = (step - 1) // steps_per_epoch if step else 0
    for epoch in range(step // steps_per_epoch, t.epochs):
        done = max(0, step - epoch * steps_per_epoch)  # batches trained before the resume
        # a new shuffle every epoch, the same on all ranks; skips the done batches unloaded
        sampler.set_epoch(epoch, start=done * loader.batch_size)
        if done == 0:
            bad_images.new_epoch()
        for views, _, bad in loader:
            bad_images.add(bad, d.path or "the built-in data")
            views = to_device(views, device, d.mean, d.std, device_color, device_views)
            lr = cosine_lr(step, total_steps, warmup_steps, base_lr, t.min_lr)
            momentum = momentum_at(step, total_steps, t.momentum, t.momentum_end)
            out = train_one_step(
                model,
                optimizer,
                views,
                lr,
                momentum,
                wrapped,
                t.accum_steps,
                amp,
                scaler,
                bad_steps,
            )
            step += 1
            bar.update(1)
            if step % t.log_every == 0 or step == last_step:
                # every rank; reads the device counters (a sync) at log steps only
                skipped = bad_steps.check(t.max_bad_steps, step)
            if is_main() and (step % t.log_every == 0 or step == last_step):
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
                    "img_per_s": (step - tick_step) * t.batch_size / (now - tick),
                    "bad_images": bad_images.total,  # unreadable files replaced, run total
                    "skipped_steps": skipped,  # non-finite steps since the last record
                }
                if out.q is not None:  # contrastive health: pos_cos, neg_cos, key_std
                    rec.update(contrastive_health(out.q, out.k))
                tick, tick_step = now, step
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
                visuals.log(rec)
                bar.set_postfix(
                    loss=f"{rec['loss']:.4f}",
                    pix=f"{rec['loss_pixel']:.4f}",
                    con=f"{rec['loss_contrast']:.4f}",
                )
            # every rank, every step, so all stop at the same one; the last step just finishes
            if step < last_step and stop.requested():
                path = save(None)
                bar.close()
                if is_main():
                    log_file.close()
                    visuals.close()
                    saved = f"saved {path}" if path else "its save failed (see above)"
                    print(
                        f"stopped by {stop.name} at step {step}; {saved}. Run the same command "
                        "again to resume (train.resume=auto)"
                    )
                teardown_distributed()
                raise Preempted(f"stopped by {stop.name} at step {step}", path and str(path))
            every_steps = t.save_every_steps and step % t.save_every_steps == 0
            if every_steps and step % steps_per_epoch and step < last_step:  # epoch ends: below
                save(None)
            if step >= last_step:
                break
        if t.knn_every and (epoch + 1) % t.knn_every == 0 and bank_set is not None and is_main():
            # forked RNG: the monitor leaves the training run's random stream untouched
            with torch.random.fork_rng(devices=[]):
                res = knn_eval(
                    model.encoder,
                    bank_set,
                    query_set,
                    device,
                    d.mean,
                    d.std,
                    t.knn_k,
                    t.knn_t,
                    num_workers=min(loader_workers(d.num_workers), 2),
                )
            rec = {"step": step, "epoch": epoch, "knn_top1": res["top1"], "knn_top5": res["top5"]}
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
            bar.set_postfix(knn_top1=f"{res['top1']:.2f}")
            visuals.log(rec)
        if is_main():
            visuals.epoch_end(model, epoch + 1, step)
        epoch_done = step == (epoch + 1) * steps_per_epoch
        every_epochs = t.save_every_epochs and (epoch + 1) % t.save_every_epochs == 0
        every_steps = t.save_every_steps and step % t.save_every_steps == 0
        if epoch_done and (every_epochs or every_steps) and step < last_step:  # last: final
            save(epoch + 1)
        if step >= last_step:
            break
    bar.close()
    state = snapshot()
    if not is_main():  # rank 0 alone writes the checkpoint, summary and kNN results
        teardown_distributed()
        return {}
    visuals.epoch_end(model, epoch + 1, step, last=True)
    visuals.close()
    log_file.close()
    wall = time.perf_counter() - start

    checkpoints.save_final(state)  # a full training state: a longer run can resume from it
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
    summary = {
        "steps": step,
        "wall_s": wall,
        "img_per_s": step * t.batch_size / wall,
        "loss": out.loss.item(),
        "loss_pixel": out.loss_pixel.item(),
        "loss_contrast": out.loss_contrast.item(),
    }
    print(
        f"trained {step} steps in {wall:.1f}s ({summary['img_per_s']:.1f} img/s); final loss "
        f"{summary['loss']:.4f} (pixel {summary['loss_pixel']:.4f}, "
        f"contrast {summary['loss_contrast']:.4f}); wrote {out_dir / 'checkpoint.pt'} and "
        f"{out_dir / 'encoder.safetensors'}"
    )

    if t.knn_at_end and bank_set is not None:

        def knn(encoder):
            return knn_eval(
                encoder,
                bank_set,
                query_set,
                device,
                d.mean,
                d.std,
                t.knn_k,
                t.knn_t,
                num_workers=min(loader_workers(d.num_workers), 2),
            )

        torch.manual_seed(t.seed)
        summary["knn"] = knn(model.encoder)
        summary["knn_random_init"] = knn(build_encoder(cfg.model).to(device))
        print(
            f"kNN top-1 on held-out data ({summary['knn']['n_query']} images, k={t.knn_k}): "
            f"pretrained {summary['knn']['top1']:.2f}% vs random init "
            f"{summary['knn_random_init']['top1']:.2f}%"
        )
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    write_summary(out_dir, to_dict(cfg), summary, visuals.last_png)
    teardown_distributed()
    return summary
