"""A timm / Hugging Face model folder: ``config.json`` + ``model.safetensors``.

``timm.create_model("local-dir:DIR", pretrained=True)`` builds and loads it with no further
arguments, and after a push ``timm.create_model("hf-hub:USER/REPO", pretrained=True)`` does
the same from the Hub. The config follows what timm's ``load_model_config_from_path`` reads
(timm 1.x): ``architecture`` (a registered timm model function), ``num_classes``,
``model_args`` (keyword arguments that override the architecture's defaults: our width, depth,
heads, patch, image size, and the pooling) and ``pretrained_cfg`` (input size, mean / std,
interpolation: what ``timm.data.resolve_data_config`` gives to build the transform).

The pooling is fixed in the folder, as timm's classifier-free models do: ``pool="cls"``
(``global_pool="token"``: the cls token after the final norm) or ``"mean"``
(``global_pool="avg"`` with ``fc_norm=False``: the mean of the patch tokens after the final
norm, as ``cmae.load_encoder(pool="mean")``). A ConvViT has no timm architecture: it is an
error here; ``--format onnx`` or ``--format timm`` (its own state dict) carry it instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import timm

from cmae.config import ConfigError
from cmae.interop.export import _write_encoder, load_pretraining_state
from cmae.models.sizes import CONVVIT_SIZES, vit_size
from cmae.runtime.checkpoint import CheckpointError

WEIGHTS_NAME = "model.safetensors"  # the names timm's local-dir / hf-hub loaders look for
CONFIG_NAME = "config.json"
HF_POOLS = {"cls": "token", "mean": "avg"}


def timm_architecture(encoder: str, patch_size: int, img_size: int) -> str:
    """A registered timm model name for our ViT: the exact one when timm has it (e.g.
    ``vit_base_patch16_224``), else ``vit_base_patch16_224`` (``model_args`` set every size)."""
    exact = f"{encoder}_patch{patch_size}_{img_size}"
    return exact if timm.is_model(exact) else "vit_base_patch16_224"


def hf_config(
    encoder: str,
    img_size: int,
    patch_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    pool: str = "cls",
) -> dict:
    """``config.json`` of a ViT encoder folder (see the module docstring)."""
    if pool not in HF_POOLS:
        raise ConfigError(f"--pool: expected one of {sorted(HF_POOLS)}, got {pool!r}")
    dim, depth, heads = vit_size(encoder)
    model_args = {
        "img_size": img_size,
        "patch_size": patch_size,
        "embed_dim": dim,
        "depth": depth,
        "num_heads": heads,
        "num_classes": 0,
        "global_pool": HF_POOLS[pool],
        # avg: keep the final norm on every token (ours), not timm's fresh fc_norm after pooling
        "fc_norm": False,
    }
    return {
        "architecture": timm_architecture(encoder, patch_size, img_size),
        "num_classes": 0,
        "num_features": dim,
        "global_pool": HF_POOLS[pool],
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, img_size, img_size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(mean),
            "std": list(std),
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": "apache-2.0",
            "description": f"cmae {encoder} encoder (CMAE / MAE self-supervised pretraining)",
        },
    }


def export_hf(
    ckpt: str | Path,
    out_dir: str | Path,
    img_size: int | None = None,
    branch: str = "online",
    pool: str = "cls",
) -> Path:
    """``cmae export --format hf``: ``out_dir`` with ``config.json`` and ``model.safetensors``
    (timm names; the safetensors metadata is that of ``--format timm``, so ``cmae.load_encoder``
    reads the folder too). ``img_size``: the position embedding resampled for that size."""
    if pool not in HF_POOLS:
        raise ConfigError(f"--pool: expected one of {sorted(HF_POOLS)}, got {pool!r}")
    state, cfg = load_pretraining_state(ckpt)
    m = cfg.model
    if m.encoder in CONVVIT_SIZES:
        raise CheckpointError(
            f"{ckpt}: {m.encoder} is a hybrid ConvViT, which has no timm architecture, so no "
            "timm / Hugging Face folder can describe it; use --format onnx (runs anywhere) or "
            "--format timm (its own state dict, for cmae.load_encoder)"
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out: {out_dir} exists and is not a directory (--format hf: a folder)")
    size = img_size or m.img_size
    _write_encoder(state, cfg, out_dir / WEIGHTS_NAME, size, branch, ckpt)
    config = hf_config(m.encoder, size, m.patch_size, cfg.data.mean, cfg.data.std, pool)
    tmp = out_dir / f".{CONFIG_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out_dir / CONFIG_NAME)  # never a half-written config beside the weights
    return out_dir


def push_to_hub(out_dir: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload an ``export_hf`` folder to the Hugging Face Hub (the ``hub`` extra; the token of
    ``huggingface-cli login`` or HF_TOKEN). Returns the repository's URL."""
    try:
        from huggingface_hub import HfApi  # optional extra: only this command needs it
    except ImportError as e:
        raise ConfigError("--push-to-hub needs huggingface_hub: pip install 'cmae[hub]'") from e
    out_dir = Path(out_dir)
    if not (out_dir / CONFIG_NAME).is_file() or not (out_dir / WEIGHTS_NAME).is_file():
        raise ConfigError(f"{out_dir}: not an export_hf folder (config.json, model.safetensors)")
    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(out_dir), repo_id=repo_id, repo_type="model")
    return str(url)
