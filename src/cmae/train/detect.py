"""``cmae detect``: object detection and instance segmentation with ViTDet's Mask R-CNN on a
pretrained encoder, the ViTDet COCO protocol (``cmae.models.vitdet`` the model,
``cmae.data.coco`` the data, ``cmae.eval.detect`` the COCO evaluation).

AdamW with layer-wise lr decay (no weight decay on norms, biases, position embeddings), linear
warmup from lr x warmup_factor then x lr_gamma at each of lr_steps (detectron2's multi-step
schedule, per iteration), the sum of torchvision's Mask R-CNN losses (RPN objectness and box,
box classifier and regression, mask). The run's lifecycle (lock, stop signals, checkpoints,
``resume=auto``, bitwise on CPU, non-finite steps, log) is ``cmae.train.lifecycle``'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from typing import NamedTuple

import torch
from pycocotools.coco import COCO
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.models.detection.anchor_utils import AnchorGenerator

from cmae.config import to_dict
from cmae.config.detect import DetectConfig
from cmae.data.coco import (
    Categories,
    DetTrainSet,
    DetValSet,
    LargeScaleJitter,
    collate,
    detection_splits,
)
from cmae.data.datasets import loader_workers
from cmae.data.sampling import EpochSampler
from cmae.errors import ConfigError
from cmae.eval.detect import (
    STAT_NAMES,
    evaluate,
    ground_truth,
    write_predictions,
)
from cmae.eval.frozen import eval_normalization
from cmae.interop.encoders import EncoderWeights, load_encoder_weights
from cmae.models.cmae import make_encoder
from cmae.models.vitdet import ViTDetMaskRCNN, build_detector
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
from cmae.runtime.optim import layer_decay_groups, multistep_lr, set_lr
from cmae.runtime.resume import training_state
from cmae.train.lifecycle import TrainingJob
from cmae.viz.plot import dense_curves

IOU_TYPES = ("bbox", "segm")


# ---------------------------------------------------------------------------------------------
# setup


class DetData(NamedTuple):
    loader: DataLoader
    sampler: EpochSampler
    val_set: DetValSet
    gt: COCO  # the validation ground truth as kept (crowd regions included)
    categories: Categories
    n_train: int
    bad: dict[str, dict[str, int]]  # per split: images / annotations left out


def build_data(
    cfg: DetectConfig,
    mean: tuple[float, ...],
    device: torch.device,
    worker_init_fn: Callable[[int], None],
) -> DetData:
    d = cfg.data
    train_base, val_base = detection_splits(d.path, d.synthetic(), d.max_bad_fraction)
    train_set = DetTrainSet(
        train_base, LargeScaleJitter(d.size, d.scale_range, d.hflip, mean), cfg.seed
    )
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
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        **worker_options(workers, worker_init_fn),
        # its own generator: starting an epoch's iterator must not draw from the global one,
        # which a resumed run restores (drop path)
        generator=torch.Generator().manual_seed(cfg.seed + rank()),
    )
    if len(loader) == 0:
        raise ConfigError(
            f"batch_size: {cfg.batch_size} is larger than the training split "
            f"({len(train_set)} images)"
        )
    val_set = DetValSet(val_base, d.size, mean)
    bad = {"train": train_base.bad, "val": val_base.bad}
    gt = ground_truth(val_base.coco_json())
    return DetData(loader, sampler, val_set, gt, train_base.categories, len(train_set), bad)


def build_model(
    cfg: DetectConfig,
    weights: EncoderWeights,
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
) -> ViTDetMaskRCNN:
    """The detector on the loaded encoder; ``num_classes`` without the background."""
    m, size = cfg.model, cfg.data.size
    encoder = make_encoder(weights.encoder, weights.img_size, weights.patch_size)
    encoder.load_state_dict(weights.state)
    window = m.window_size or default_window(size, weights.patch_size)
    try:
        model = build_detector(
            encoder,
            num_classes=num_classes + 1,
            img_size=size,
            image_mean=mean,
            image_std=std,
            window_size=window,
            global_blocks=m.global_blocks,
            rel_pos_bias=m.rel_pos_bias,
            drop_path=m.drop_path,
            num_rois=m.rois_per_image,
            rpn_post_nms_train=m.proposals,
            rpn_post_nms_test=m.proposals,
            detections_per_img=m.detections_per_image,
            out_channels=m.channels,
        )
    except ValueError as e:
        raise ConfigError(f"model: {e}") from e
    if m.anchor_sizes is not None:
        ratios = model.rpn.anchor_generator.aspect_ratios
        sizes = tuple((a,) for a in m.anchor_sizes)
        model.rpn.anchor_generator = AnchorGenerator(sizes, ratios)
    return model.to(device)


def default_window(size: int, patch: int) -> int:
    """ViTDet's window, 14 tokens of a 64-token grid (1024 px, patch 16), at this grid."""
    return max(1, round(14 * size / patch / 64))


class Evaluations:
    """The last evaluation (in full) and the best one so far (by box AP; its summary)."""

    def __init__(self, best: dict | None) -> None:
        self.best, self.last = best, None

    def add(self, step: int, res: dict) -> dict:
        """Keep ``res``; return its line for log.jsonl (``bbox_AP``, ``segm_AP50``, ...)."""
        self.last = {"step": step, **res}
        summary = {"step": step}
        summary.update({f"{t}_{k}": res[t][k] for t in IOU_TYPES for k in STAT_NAMES})
        if self.best is None or res["bbox"]["AP"] > self.best["bbox_AP"]:
            self.best = summary
        return {**summary, "eval": True}


# ---------------------------------------------------------------------------------------------
# the command


def run(cfg: DetectConfig) -> dict:
    with TrainingJob(
        cfg.out,
        "cmae detect",
        unit="iteration",
        keep_last=cfg.keep_last,
        max_bad_steps=cfg.max_bad_steps,
    ) as job:
        return train(cfg, job)


def train(cfg: DetectConfig, job: TrainingJob) -> dict:
    device = setup_distributed(resolve_device(cfg.device))
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()
    seed_everything(cfg.seed)
    weights = load_encoder_weights(cfg.encoder.checkpoint, cfg.encoder.preset, cfg.seed)
    mean, std = eval_normalization(cfg.data.mean, cfg.data.std, weights)
    data = build_data(cfg, mean, device, job.worker_init_fn)
    model = build_model(cfg, weights, len(data.categories.ids), mean, std, device)
    wrapped = wrap_model(model, device, compile=False)
    seed_everything(cfg.seed + rank())  # drop path differs across ranks
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
            res = evaluate(
                model,
                data.val_set,
                data.gt,
                data.categories,
                device,
                amp,
                workers=min(loader_workers(cfg.data.num_workers), 2),
                worker_init_fn=job.worker_init_fn,  # its workers outlive a group-wide signal
            )
            if is_main():
                job.log(evaluations.add(step, res), AP=f"{res['bbox']['AP']:.2f}")

    model.train()
    while step < last:
        epoch = step // steps_per_epoch
        done = step - epoch * steps_per_epoch  # batches trained before a resume
        data.sampler.set_epoch(epoch, start=done * data.loader.batch_size)
        for imgs, targets in data.loader:
            lr = multistep_lr(
                step, cfg.lr, cfg.warmup_iters, cfg.warmup_factor, cfg.lr_steps, cfg.lr_gamma
            )
            losses = train_step(
                wrapped=wrapped,
                optimizer=optimizer,
                imgs=imgs,
                targets=targets,
                lr=lr,
                amp=amp,
                device=device,
                bad_steps=job.bad_steps,
            )
            step += 1
            job.advance()
            if step % cfg.log_every == 0 or step == last:
                skipped = job.check_bad_steps(step)  # every rank: a host sync, at log steps only
                rec = {"step": step, "epoch": epoch, **{k: v.item() for k, v in losses.items()}}
                rec.update(lr=lr, img_per_s=job.img_per_s(step), skipped_steps=skipped)
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
    cfg: DetectConfig,
    weights: EncoderWeights,
    model: nn.Module,
    data: DetData,
    amp: torch.dtype | None,
    device: torch.device,
) -> None:
    if not is_main():
        return
    print(
        f"cmae detect: {weights.encoder} ViTDet Mask R-CNN "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), "
        f"{len(data.categories.ids)} classes, {data.n_train} train / {len(data.val_set)} val "
        f"images, size {cfg.data.size}, {cfg.iters} iterations x batch {cfg.batch_size}, lr "
        f"{cfg.lr:g}, device {device} x {world_size()} process(es), amp {amp}, out {cfg.out}"
    )
    for split, bad in data.bad.items():
        if bad["images"] or bad["annotations"]:
            print(
                f"{split}: left out {bad['images']} bad image(s) and {bad['annotations']} bad "
                "annotation(s) (data.max_bad_fraction)"
            )


def train_step(
    *,
    wrapped: nn.Module,
    optimizer: torch.optim.Optimizer,
    imgs: list[Tensor],
    targets: list[dict[str, Tensor]],
    lr: float,
    amp: torch.dtype | None,
    device: torch.device,
    bad_steps: BadSteps,
) -> dict[str, Tensor]:
    """One optimizer step at ``lr`` (times each group's layer-decay scale); the losses
    (detached), their sum as ``loss``. A step with a non-finite loss or gradient is skipped and
    counted (``skip_nonfinite_step``)."""
    set_lr(optimizer, lr)
    buffers = buffer_values(wrapped)
    x = [img.to(device, non_blocking=True) for img in imgs]
    t = [{k: v.to(device, non_blocking=True) for k, v in tgt.items()} for tgt in targets]
    with torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext():
        losses = wrapped(x, t)
    loss = sum(v.float() for v in losses.values())
    optimizer.zero_grad(set_to_none=True)
    poison_nonfinite(loss).backward()
    skip_nonfinite_step(wrapped, optimizer, buffers, bad_steps)
    return {"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}}


def finish(
    cfg: DetectConfig,
    job: TrainingJob,
    model: nn.Module,
    data: DetData,
    evaluations: Evaluations,
    step: int,
    weights: EncoderWeights,
    device: torch.device,
) -> dict:
    """OUT/results.json (the last evaluation in full, the best one, the run's facts) and
    OUT/predictions.png; rank 0."""
    last, wall = evaluations.last, job.wall_s
    results = {
        "bbox": last["bbox"],
        "segm": last["segm"],
        "per_category": last["per_category"],
        "detections": last["detections"],
        "iteration": step,
        "best": evaluations.best,
        "categories": list(data.categories.names),
        "n_train": data.n_train,
        "n_val": len(data.val_set),
        "bad": data.bad,
        "params": sum(p.numel() for p in model.parameters()),
        "encoder": weights.encoder,
        "wall_s": wall,
    }
    job.write_json("results.json", {**results, "config": to_dict(cfg)})
    n = min(cfg.data.vis_images, len(data.val_set))
    if n:
        total = len(data.val_set)
        picks = sorted({round(i * (total - 1) / max(n - 1, 1)) for i in range(n)})
        path = job.out_dir / "predictions.png"
        write_predictions(model, data.val_set, picks, data.categories.names, device, path)
    log = [json.loads(line) for line in (job.out_dir / "log.jsonl").read_text().splitlines()]
    losses = ("loss", "loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
              "loss_mask")  # fmt: skip
    metrics = (("bbox_AP50", "o-"), ("bbox_AP", "o--"), ("segm_AP50", "s-"), ("segm_AP", "s--"))
    title = str(job.out_dir)
    dense_curves(log, job.out_dir / "curves.png", title, losses, metrics, "validation AP (%)")
    box, mask = results["bbox"], results["segm"]
    print(
        f"cmae detect: box AP {box['AP']:.2f} (AP50 {box['AP50']:.2f}), mask AP {mask['AP']:.2f} "
        f"(AP50 {mask['AP50']:.2f}) at iteration {step}; {wall:.0f}s; wrote "
        f"{job.out_dir / 'results.json'}"
    )
    return results
