"""Time one training step of the official CMAE code (its CMAE or MAE algorithm); one JSON line.

Run by ``bench_reference.py`` in its own process, under an interpreter that has the official
code's dependencies (mmengine, mmcv-lite) and nothing of cmae imported (both packages are named
``cmae``):

    REF_PY benchmarks/reference_step.py --repo PATH/TO/ZhichengHuang-CMAE --preset ref_tiny \
        --mode cmae --threads 2 --steps 8

The official modules are built from their registry with the settings of ``bench_step.py``'s
preset (widths, depths, masking); one step is what its runner does per iteration: the
``train_step`` of the model (data preprocessor, forward, loss, backward, AdamW with the
config's paramwise decay rules) followed by the momentum hook's EMA update (CMAE).
Nothing of the official code is copied here: it is imported from ``--repo``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

# the official code's settings for the presets of bench_step.py (facts from its configs, sized
# like cmae's presets): encoder (width, depth, heads), patch, image, decoder width/depth/heads,
# feature decoder depth, projector hidden/out, batch
PRESETS = {
    "ref_tiny": dict(
        enc=(192, 12, 3),
        patch=4,
        img=32,
        dec=(128, 4, 4),
        feat_depth=2,
        proj=(1536, 256),
        batch=128,
    ),
    "ref_vit_b16": dict(
        enc=(768, 12, 12),
        patch=16,
        img=224,
        dec=(512, 8, 16),
        feat_depth=2,
        proj=(1536, 256),
        batch=8,
    ),
}


def decoder_cfg(p: dict, depth: int, out_width: int | None = None) -> dict:
    """The official decoder predicts patch * patch * in_chans values per token: 3 channels for
    pixels; for the feature decoder in_chans is chosen so the output is ``out_width`` wide (the
    encoder width, as cmae's feature decoder; 768 = 16 * 16 * 3 is the official ViT-B case)."""
    width, _, heads = p["dec"]
    return dict(
        type="MAEPretrainDecoder",
        num_patches=(p["img"] // p["patch"]) ** 2,
        patch_size=p["patch"],
        in_chans=3 if out_width is None else out_width // p["patch"] ** 2,
        embed_dim=p["enc"][0],
        decoder_embed_dim=width,
        decoder_depth=depth,
        decoder_num_heads=heads,
        mlp_ratio=4.0,
    )


def projector_cfg(in_ch: int, hid: int, out: int) -> dict:
    return dict(
        type="NonLinearNeck",
        in_channels=in_ch,
        hid_channels=hid,
        out_channels=out,
        num_layers=2,
        with_bias=True,
        with_last_bn=False,
        with_avg_pool=False,
        # the official default is SyncBN (eps 1e-6), which needs a GPU; in one process it is
        # this BatchNorm
        norm_cfg=dict(type="BN1d", eps=1e-6),
    )


def model_cfg(p: dict, mode: str) -> dict:
    width, depth, heads = p["enc"]
    arch = dict(embed_dims=width, num_layers=depth, num_heads=heads, feedforward_channels=4 * width)
    vit = dict(arch=arch, img_size=p["img"], patch_size=p["patch"])
    if mode == "mae":
        return dict(
            type="MAE",
            backbone=dict(type="MAEViT", mask_ratio=0.75, **vit),
            neck=decoder_cfg(p, p["dec"][1]),
            head=dict(type="MAEPretrainHead", norm_pix=True, patch_size=p["patch"]),
            init_cfg=[
                dict(type="Xavier", layer="Linear", distribution="uniform"),
                dict(type="Constant", layer="LayerNorm", val=1.0, bias=0.0),
            ],
        )
    hid, out = p["proj"]
    return dict(
        type="CMAE",
        backbone=dict(
            online=dict(type="CMAEViT", mask_ratio=0.65, **vit),
            target=dict(type="CMAEViT", mask_ratio=0.0, final_norm=False, **vit),
        ),
        neck=dict(
            pixel=decoder_cfg(p, p["dec"][1]),
            feature=decoder_cfg(p, p["feat_depth"], out_width=width),
            projector=projector_cfg(width, hid, out),
        ),
        head=dict(
            type="CMAEPretrainHead",
            predictor=projector_cfg(out, hid, out),
            temperature=0.07,
            norm_pix=True,
            patch_size=p["patch"],
            ct_weight=1.0,
            rc_weight=1.0,
        ),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", required=True, help="checkout of the official CMAE code")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="ref_tiny")
    ap.add_argument("--mode", choices=["cmae", "mae"], default="cmae")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--floor", action="store_true", help="also the dense-op floor (op_floor.py)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, args.repo)
    import cmae.models  # noqa: F401, I001  (the official package: registers its modules)
    from cmae.registry import MODELS
    from mmengine.optim import build_optim_wrapper

    # the official CMAE head gathers keys with all_gather: a one-process group, as its
    # launcher would start
    # its head moves the contrastive labels with .cuda(); on a CPU machine they stay put
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    p = PRESETS[args.preset]
    batch = args.batch or p["batch"]
    torch.manual_seed(0)
    model = MODELS.build(model_cfg(p, args.mode))
    model.init_weights()
    model.train()
    # the official pretraining config's optimizer: AdamW (0.9, 0.95), wd 0.05, no decay on
    # ln / bias / pos_embed / mask_token / cls_token (fp32 here: OptimWrapper, not Amp)
    optim = build_optim_wrapper(
        model,
        dict(
            type="OptimWrapper",
            optimizer=dict(type="AdamW", lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05),
            paramwise_cfg=dict(
                custom_keys={
                    k: dict(decay_mult=0.0)
                    for k in ("ln", "bias", "pos_embed", "mask_token", "cls_token")
                }
            ),
        ),
    )
    shape = (batch, 3, p["img"], p["img"])
    data = {"img": torch.randn(shape)}
    if args.mode == "cmae":
        data["img_t"] = torch.randn(shape)

    def step() -> None:
        model.train_step(data, optim)
        if args.mode == "cmae":
            model.momentum_update()  # the MomentumUpdateHook's after_train_iter

    with FlopCounterMode(display=False) as counter:  # matmul + attention, as bench_step counts
        step()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    floor = {}
    if args.floor:
        from op_floor import capture, replay  # this directory; pure torch

        floor = replay(capture(step))
        floor["beyond_floor_ms"] = round(step_s * 1e3 - floor["dense_floor_ms"], 2)
    print(
        json.dumps(
            {
                "impl": "official",
                "preset": args.preset,
                "mode": args.mode,
                "batch": batch,
                "threads": args.threads,
                "step_s": step_s,
                "img_per_s": batch / step_s,
                "gflop_per_step": round(counter.get_total_flops() / 1e9, 3),
                "steps": args.steps,
                **floor,
            }
        )
    )


if __name__ == "__main__":
    main()
