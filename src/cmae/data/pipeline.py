"""The pretraining input pipeline a ``Config`` describes: the views the data workers compute,
the parts that run on the training device, and the batch's way onto it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from cmae.config import Config
from cmae.data.datasets import loader_workers
from cmae.data.shards import FirstSamples, ShardStream, open_shards
from cmae.data.views import (
    CropBoxes,
    DeviceTargetColor,
    DeviceViews,
    PixelShiftViews,
    SingleView,
    collate_boxes,
    normalize,
    target_color_transform,
)
from cmae.runtime.faults import worker_options


def build_views(cfg: Config, workers_part: bool = False):
    """The training views; ``workers_part``: what the data workers compute of them (all of
    it, or under ``data.resize_device`` the crop boxes that ``build_device_views`` finishes)."""
    m, d = cfg.model, cfg.data
    if workers_part and d.resize_device:
        return CropBoxes(m.img_size, crop_shift(cfg), d.crop_scale, d.crop_ratio, d.hflip)
    if m.method == "mae":
        return SingleView(m.img_size, d.crop_scale, d.crop_ratio, d.hflip, crop_shift(cfg))
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


def crop_shift(cfg: Config) -> int:
    """The master crop's extra side s (views are S x S windows of an S + s crop): CMAE's pixel
    shift, and MAE's too under ``data.mae_same_crop``; 0 for MAE's own crop."""
    if cfg.model.method == "cmae" or cfg.data.mae_same_crop:
        return cfg.data.max_shift
    return 0


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
    return DeviceViews(m.img_size, crop_shift(cfg), two_views=m.method == "cmae")


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


def shard_pipeline(
    cfg: Config,
    device: torch.device,
    batch_size: int,
    rank: int,
    world: int,
    worker_init_fn: Callable[[int], None] | None = None,
) -> tuple[ShardStream, DataLoader, FirstSamples]:
    """Pretraining from streamed shards (``data.path`` a shard pattern, cmae.data.shards):
    (the stream, which is also the loader's epoch / resume handle like ``EpochSampler``, its
    loader of ``batch_size`` per rank, the first samples for the reconstruction grid)."""
    d, seed = cfg.data, cfg.train.seed
    shards = open_shards(d.path)
    views = build_views(cfg, workers_part=True)
    workers = loader_workers(d.num_workers)
    stream = ShardStream(shards, views, seed, batch_size, workers, rank, world)
    loader = DataLoader(
        stream,
        batch_size=batch_size,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=False,  # each epoch's deal and resume offset reach fresh workers
        # the workers' base seed from a generator of its own: drawn from the global one, each
        # epoch's new iterator would shift the masking stream, and a resume would differ
        generator=torch.Generator().manual_seed(seed + rank),
        collate_fn=collate_boxes if d.resize_device else None,
        **worker_options(workers, worker_init_fn),
    )
    return stream, loader, FirstSamples(shards, views)
