"""``cmae pretrain``: CMAE / MAE pretraining, single process on CPU or one GPU."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from cmae.checkpoint import save_checkpoint, save_encoder
from cmae.config import Config, ConfigError, to_dict
from cmae.data import build_datasets
from cmae.knn import knn_eval
from cmae.model import CMAE, build_encoder, build_model
from cmae.optim import cosine_lr, momentum_at, param_groups
from cmae.views import (
    PixelShiftViews,
    SingleView,
    eval_transform,
    normalize,
    target_color_transform,
)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} requested but CUDA is not available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_views(cfg: Config):
    m, d = cfg.model, cfg.data
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
        color if d.target_color_aug else None,
    )


def train_one_step(
    model: CMAE,
    optimizer: torch.optim.Optimizer,
    views: list[torch.Tensor],
    lr: float,
    momentum: float,
):
    for group in optimizer.param_groups:
        group["lr"] = lr
    out = model(*views)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    optimizer.step()
    model.update_target(momentum)  # after the optimizer step, once per step
    return out


def run(cfg: Config) -> dict:
    t, d = cfg.train, cfg.data
    out_dir = Path(t.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    device = resolve_device(t.device)
    if t.threads is not None:
        torch.set_num_threads(t.threads)
    seed_everything(t.seed)

    synthetic = {
        "train": d.synthetic_train,
        "val": d.synthetic_val,
        "size": d.synthetic_size,
        "seed": d.synthetic_seed,
    }
    train_set, bank_set, query_set = build_datasets(
        d.path,
        build_views(cfg),
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
    loader = DataLoader(
        train_set,
        batch_size=t.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=d.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=d.num_workers > 0,
        generator=torch.Generator().manual_seed(t.seed),
    )

    model = build_model(cfg.model).to(device)
    base_lr = t.lr if t.lr is not None else t.blr * t.batch_size / 256
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=base_lr, betas=t.betas)
    steps_per_epoch = len(loader)
    total_steps = t.epochs * steps_per_epoch
    warmup_steps = t.warmup_epochs * steps_per_epoch
    last_step = min(total_steps, t.max_steps) if t.max_steps else total_steps
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"cmae pretrain: {cfg.model.method} {cfg.model.encoder} {cfg.model.img_size}px, "
        f"{n_params / 1e6:.2f}M trainable params, {len(train_set)} images, "
        f"{steps_per_epoch} steps/epoch x {t.epochs} epochs, lr {base_lr:.3g}, device {device}, "
        f"out {out_dir}"
    )

    log_file = open(out_dir / "log.jsonl", "a")
    step, start = 0, time.perf_counter()
    tick, tick_step = start, 0
    bar = tqdm(total=last_step, desc="pretrain", dynamic_ncols=True)
    model.train()
    for epoch in range(t.epochs):
        for views, _ in loader:
            views = [normalize(v.to(device, non_blocking=True), d.mean, d.std) for v in views]
            lr = cosine_lr(step, total_steps, warmup_steps, base_lr, t.min_lr)
            momentum = momentum_at(step, total_steps, t.momentum, t.momentum_end)
            out = train_one_step(model, optimizer, views, lr, momentum)
            step += 1
            bar.update(1)
            if step % t.log_every == 0 or step == last_step:
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
                }
                tick, tick_step = now, step
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
                bar.set_postfix(
                    loss=f"{rec['loss']:.4f}",
                    pix=f"{rec['loss_pixel']:.4f}",
                    con=f"{rec['loss_contrast']:.4f}",
                )
            if step >= last_step:
                break
        if step >= last_step:
            break
    bar.close()
    log_file.close()
    wall = time.perf_counter() - start

    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "epoch": epoch,
        "config": to_dict(cfg),
    }
    save_checkpoint(state, out_dir / "checkpoint.pt")
    save_encoder(
        model,
        out_dir / "encoder.safetensors",
        metadata={
            "format": "timm.VisionTransformer",
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
                num_workers=min(d.num_workers, 2),
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
    return summary
