"""Helpers shared by the test files; the fixtures in conftest.py build on them. No test file
imports another."""

import json
import os
import signal
import socket
import time
from pathlib import Path

import timm
import torch
from torch.utils.data import Dataset, get_worker_info

from cmae.interop.export import safetensors_metadata

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CIFAR_TAR = SHARED_DATA / "cifar10-jpeg.tar.gz"


def tiny_overrides(**extra) -> list[str]:
    """A very small CMAE for unit tests: 16 px, patch 4 (4x4 grid), 2 blocks of width 32."""
    base = {
        "model.encoder": "vit_tiny",
        "model.img_size": 16,
        "model.patch_size": 4,
        "model.decoder_dim": 32,
        "model.decoder_depth": 1,
        "model.decoder_heads": 2,
        "model.feature_decoder_depth": 1,
        "model.proj_hidden_dim": 32,
        "model.proj_dim": 16,
        "data.max_shift": 4,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def small_run_args(out):
    """`cmae pretrain` of a 16 px CMAE for 3 steps on a little generated data, into ``out``."""
    return [
        "pretrain",
        "--out",
        str(out),
        "model.img_size=16",
        "model.patch_size=4",
        "model.decoder_dim=32",
        "model.decoder_depth=1",
        "model.decoder_heads=2",
        "model.proj_hidden_dim=64",
        "model.proj_dim=32",
        "data.max_shift=4",
        "data.synthetic_train=64",
        "data.synthetic_val=32",
        "data.synthetic_size=20",
        "data.num_workers=0",
        "data.knn_bank=64",
        "data.knn_queries=32",
        "train.batch_size=16",
        "train.max_steps=3",
        "train.log_every=1",
    ]


# `cmae segment` on a little generated data, at 32 px
SEGMENT_SMALL = [
    "data.synthetic_train=32",
    "data.synthetic_val=8",
    "data.synthetic_size=32",
    "data.crop=32",
    "data.scale=[64,32]",
    "data.stride=21",
    "data.num_workers=0",
    "data.vis_images=2",
    "model.channels=16",
    "model.aux_channels=8",
    "batch_size=8",
    "threads=1",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timm_from_file(path, **overrides):
    kwargs = {**json.loads(safetensors_metadata(path)["timm_kwargs"]), **overrides}
    return timm.create_model(
        "vit_base_patch16_224",
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay=dict(file=str(path)),
        **kwargs,
    ).eval()


class SignalGroupOnRead(Dataset):
    """Wraps a data set; a loader worker reading item 0 sends SIGTERM to its process group
    (itself, the main process, the training loader's workers) and goes on loading."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        if i == 0 and get_worker_info() is not None:
            os.killpg(os.getpgrp(), signal.SIGTERM)
            time.sleep(0.5)  # the signal is delivered while this worker is still at work
        return self.base[i]


# ---------------------------------------------------------------------------------------------
# the official MAE and CMAE checkpoint layouts, synthetic (test_official_import.py says how)

D, DEPTH, P, GRID = 192, 12, 8, 4  # encoder width/depth, patch, grid -> 32 px
DD, DEC_DEPTH, FEAT_DEPTH = 32, 2, 1  # decoder width, pixel / feature decoder depth
PH, PO = 64, 16  # projector hidden / out
L = GRID * GRID
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def timm_block(prefix, d):
    return {
        f"{prefix}norm1.weight": (d,),
        f"{prefix}norm1.bias": (d,),
        f"{prefix}attn.qkv.weight": (3 * d, d),
        f"{prefix}attn.qkv.bias": (3 * d,),
        f"{prefix}attn.proj.weight": (d, d),
        f"{prefix}attn.proj.bias": (d,),
        f"{prefix}norm2.weight": (d,),
        f"{prefix}norm2.bias": (d,),
        f"{prefix}mlp.fc1.weight": (4 * d, d),
        f"{prefix}mlp.fc1.bias": (4 * d,),
        f"{prefix}mlp.fc2.weight": (d, 4 * d),
        f"{prefix}mlp.fc2.bias": (d,),
    }


def mm_block(prefix, d):
    return {
        f"{prefix}ln1.weight": (d,),
        f"{prefix}ln1.bias": (d,),
        f"{prefix}attn.qkv.weight": (3 * d, d),
        f"{prefix}attn.qkv.bias": (3 * d,),
        f"{prefix}attn.proj.weight": (d, d),
        f"{prefix}attn.proj.bias": (d,),
        f"{prefix}ln2.weight": (d,),
        f"{prefix}ln2.bias": (d,),
        f"{prefix}ffn.layers.0.0.weight": (4 * d, d),
        f"{prefix}ffn.layers.0.0.bias": (4 * d,),
        f"{prefix}ffn.layers.1.weight": (d, 4 * d),
        f"{prefix}ffn.layers.1.bias": (d,),
    }


def mae_encoder_shapes():
    shapes = {
        "cls_token": (1, 1, D),
        "pos_embed": (1, L + 1, D),
        "patch_embed.proj.weight": (D, 3, P, P),
        "patch_embed.proj.bias": (D,),
        "norm.weight": (D,),
        "norm.bias": (D,),
    }
    for i in range(DEPTH):
        shapes |= timm_block(f"blocks.{i}.", D)
    return shapes


def mae_shapes():
    shapes = mae_encoder_shapes() | {
        "mask_token": (1, 1, DD),
        "decoder_pos_embed": (1, L + 1, DD),
        "decoder_embed.weight": (DD, D),
        "decoder_embed.bias": (DD,),
        "decoder_norm.weight": (DD,),
        "decoder_norm.bias": (DD,),
        "decoder_pred.weight": (P * P * 3, DD),
        "decoder_pred.bias": (P * P * 3,),
    }
    for i in range(DEC_DEPTH):
        shapes |= timm_block(f"decoder_blocks.{i}.", DD)
    return shapes


def mm_vit(prefix, final_norm):
    shapes = {
        f"{prefix}cls_token": (1, 1, D),
        f"{prefix}pos_embed": (1, L + 1, D),
        f"{prefix}patch_embed.projection.weight": (D, 3, P, P),
        f"{prefix}patch_embed.projection.bias": (D,),
    }
    if final_norm:
        shapes |= {f"{prefix}ln1.weight": (D,), f"{prefix}ln1.bias": (D,)}
    for i in range(DEPTH):
        shapes |= mm_block(f"{prefix}layers.{i}.", D)
    return shapes


def mm_decoder(prefix, depth):
    shapes = {
        f"{prefix}mask_token": (1, 1, DD),
        f"{prefix}decoder_pos_embed": (1, L + 1, DD),
        f"{prefix}decoder_embed.weight": (DD, D),
        f"{prefix}decoder_embed.bias": (DD,),
        f"{prefix}ln1.weight": (DD,),
        f"{prefix}ln1.bias": (DD,),
        f"{prefix}decoder_pred.weight": (P * P * 3, DD),
        f"{prefix}decoder_pred.bias": (P * P * 3,),
    }
    for i in range(depth):
        shapes |= mm_block(f"{prefix}decoder_blocks.{i}.", DD)
    return shapes


def mm_neck(prefix, cin):
    # NonLinearNeck(with_bias=True, with_last_bn=False): fc0 -> bn0 (SyncBN) -> relu -> fc1
    return {
        f"{prefix}fc0.weight": (PH, cin),
        f"{prefix}fc0.bias": (PH,),
        f"{prefix}bn0.weight": (PH,),
        f"{prefix}bn0.bias": (PH,),
        f"{prefix}bn0.running_mean": (PH,),
        f"{prefix}bn0.running_var": (PH,),
        f"{prefix}bn0.num_batches_tracked": (),
        f"{prefix}fc1.weight": (PO, PH),
    }


def cmae_shapes():
    return (
        mm_vit("backbone.", final_norm=True)
        | mm_vit("target_backbone.", final_norm=False)
        | mm_decoder("pixel_decoder.", DEC_DEPTH)
        | mm_decoder("feature_decoder.", FEAT_DEPTH)
        | mm_neck("projector.", P * P * 3)
        | mm_neck("target_projector.", P * P * 3)
        | mm_neck("head.predictor.", PO)
    )


def synthetic(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(1000)
        elif k.endswith("running_var"):
            out[k] = torch.rand(s, generator=g) + 0.5
        else:
            out[k] = 0.05 * torch.randn(s, generator=g)
    return out
