"""Interop: export our weights for timm or for further pretraining, import the official layouts.

Export formats (safetensors, metadata says which):

- ``timm``: the online encoder with timm ``VisionTransformer`` key names (a key filter, since our
  encoder names equal timm's), position embeddings resampled when a new image size is asked for.
  ``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=FILE))`` loads it.
- ``cmae.ConvViT``: what the ``timm`` export writes for a hybrid ConvViT encoder
  (cmae.models.convvit), which is not a timm ``VisionTransformer``: the encoder's own state
  dict and names, for
  ``cmae.interop.api.load_encoder`` and the evaluation commands.
- ``full``: every tensor of the model (decoders, projector/predictor, target branch, BN buffers)
  plus the config as JSON metadata and a YAML file beside it, so pretraining can go on.

Import: the official MAE checkpoint (facebookresearch/mae ``models_mae.py``, ``{"model": ...}``)
and the official CMAE one (github.com/ZhichengHuang/CMAE, mmengine, ``{"state_dict": ...}``).
Key names of the CMAE code, read from its modules (its nn.Module attribute names, which is what
its checkpoints hold): ``backbone`` / ``target_backbone`` (mm ViT: ``patch_embed.projection``,
``layers.N.{ln1, attn.qkv, attn.proj, ln2, ffn.layers.0.0, ffn.layers.1}``, final norm ``ln1``;
the target has no final norm), ``pixel_decoder`` / ``feature_decoder`` (``decoder_embed``,
``mask_token``, ``decoder_pos_embed``, ``decoder_blocks.N`` with the same layer names, norm
``ln1``, ``decoder_pred``), ``projector`` / ``target_projector`` / ``head.predictor``
(``fc0``, ``bn0``, ``fc1``). Its ``tools/extract_backbone_weights.py`` writes the backbone alone
without the ``backbone.`` prefix; that file is accepted too.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from torch import Tensor

from cmae.config import Config, ConfigError, ModelConfig, from_dict, to_dict, validate
from cmae.models.cmae import CMAE, build_model
from cmae.models.sizes import CONVVIT_SIZES, ENCODER_SIZES, vit_name, vit_size
from cmae.models.vit import sincos_pos_embed
from cmae.runtime.checkpoint import (
    CheckpointError,
    _atomic_write,
    check_weights,
    load_checkpoint,
    save_checkpoint,
)

FORMAT_TIMM = "timm.VisionTransformer"
FORMAT_CONVVIT = "cmae.ConvViT"
FORMAT_FULL = "cmae.full"


def encoder_format(encoder: str) -> str:
    """The format of an encoder-only file of the size ``encoder`` (safetensors metadata)."""
    return FORMAT_CONVVIT if encoder in CONVVIT_SIZES else FORMAT_TIMM


# ---------------------------------------------------------------------------------------------
# our checkpoints


def load_pretraining_state(path: str | Path) -> tuple[dict[str, Tensor], Config]:
    """(model state dict, config) of a ``cmae pretrain`` checkpoint.pt or a ``full`` export."""
    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        state, meta = _read_safetensors(path)
        if meta.get("format") != FORMAT_FULL or "config" not in meta:
            raise CheckpointError(
                f"{path}: not a full cmae export (format {meta.get('format')!r}); an encoder-only "
                "file has no decoders (use `cmae export CKPT --format full`)"
            )
        config = json.loads(meta["config"])
    else:
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
            raise CheckpointError(f"{path}: not a cmae checkpoint (needs 'model' and 'config')")
        state, config = ckpt["model"], ckpt["config"]
    try:
        cfg = from_dict(config)
    except ConfigError as e:
        raise CheckpointError(f"{path}: its config is invalid: {e}") from e
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        expected = build_model(cfg.model).state_dict()
    check_weights(path, state, expected, f"the {cfg.model.encoder} model its config describes")
    return state, cfg


def load_model(path: str | Path) -> tuple[CMAE, Config]:
    """The whole CMAE (target branch included) of a checkpoint.pt or a ``full`` export, strictly."""
    state, cfg = load_pretraining_state(path)
    model = build_model(cfg.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: weights do not fit the model its config describes: {e}"
        ) from e
    return model, cfg


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file, without reading its tensors."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e


# ---------------------------------------------------------------------------------------------
# export


def timm_kwargs(encoder: str, img_size: int, patch_size: int) -> dict[str, int]:
    """Keyword arguments that make ``timm.create_model("vit_base_patch16_224", **kw)`` our ViT."""
    dim, depth, heads = vit_size(encoder)
    return {
        "img_size": img_size,
        "patch_size": patch_size,
        "embed_dim": dim,
        "depth": depth,
        "num_heads": heads,
    }


def resize_pos_embed(state: dict[str, Tensor], grid: int) -> dict[str, Tensor]:
    """``state`` with ``pos_embed`` [1, 1 + g*g, D] resampled (bicubic) to a grid x grid one."""
    pos = state["pos_embed"]
    old = math.isqrt(pos.shape[1] - 1)
    if old == grid:
        return dict(state)
    # timm's own resampler, so the result equals what timm does when it loads at a new size
    new = resample_abs_pos_embed(pos, new_size=[grid, grid], old_size=[old, old])
    return {**state, "pos_embed": new.contiguous()}


def export_timm(
    ckpt: str | Path, out: str | Path, img_size: int | None = None, branch: str = "online"
) -> Path:
    """Write an encoder of ``ckpt`` as a timm ViT safetensors file (``img_size``: resample the
    position embedding for that input size; default the pretraining size; ``branch``: "online"
    or the momentum "target" encoder). A ConvViT checkpoint is an error: use ``export_encoder``."""
    state, cfg = load_pretraining_state(ckpt)
    if cfg.model.encoder in CONVVIT_SIZES:
        raise CheckpointError(
            f"{ckpt}: {cfg.model.encoder} is a hybrid ConvViT, not a timm VisionTransformer; "
            "export_encoder writes its own state dict"
        )
    return _write_encoder(state, cfg, out, img_size, branch, ckpt)


def export_encoder(
    ckpt: str | Path, out: str | Path, img_size: int | None = None, branch: str = "online"
) -> tuple[Path, str]:
    """``cmae export --format timm``: one encoder of ``ckpt`` alone -> (path, format).
    ``branch``: "online" (the default, what fine-tuning uses) or "target", the momentum encoder
    (its EMA'd final norm included), which some evaluate instead.

    A ViT becomes a timm ``VisionTransformer`` file (``FORMAT_TIMM``, see ``export_timm``). A
    ConvViT has no timm model: its own state dict and names are written (``FORMAT_CONVVIT``,
    loaded by ``cmae.interop.api.load_encoder`` and ``cmae knn / linprobe / finetune``).
    """
    state, cfg = load_pretraining_state(ckpt)
    out = _write_encoder(state, cfg, out, img_size, branch, ckpt)
    return out, encoder_format(cfg.model.encoder)


BRANCHES = {"online": "encoder.", "target": "target_encoder."}


def export_mae(ckpt: str | Path, out: str | Path, branch: str = "online") -> Path:
    """``cmae export --format mae``: ``{"model": state_dict}`` in a torch file with timm key
    names, the layout of MAE's released ``mae_pretrain_vit_*.pth``, which detectron2's ViTDet
    and mmsegmentation's MAE converter read. ViT encoders only."""
    state, cfg = load_pretraining_state(ckpt)
    if cfg.model.encoder in CONVVIT_SIZES:
        raise CheckpointError(
            f"{ckpt}: {cfg.model.encoder} is a hybrid ConvViT; MAE's layout holds a plain ViT "
            "(use --format timm, which writes its own state dict)"
        )
    if branch not in BRANCHES:
        raise ConfigError(f"--branch: expected one of {sorted(BRANCHES)}, got {branch!r}")
    prefix = BRANCHES[branch]
    enc = {
        k[len(prefix) :]: v.detach().cpu().contiguous().clone()
        for k, v in state.items()
        if k.startswith(prefix)
    }
    if not enc:
        raise CheckpointError(f"{ckpt}: has no {branch} encoder (an MAE run has no target)")
    out = Path(out)
    save_checkpoint({"model": enc}, out)
    return out


def _write_encoder(
    state: dict[str, Tensor],
    cfg: Config,
    out: str | Path,
    img_size: int | None,
    branch: str = "online",
    source: str | Path = "checkpoint",
) -> Path:
    m = cfg.model
    size = img_size or m.img_size
    if size <= 0 or size % m.patch_size:
        raise ConfigError(f"--img-size: {size} must be a positive multiple of the patch size")
    if branch not in BRANCHES:
        raise ConfigError(f"--branch: expected one of {sorted(BRANCHES)}, got {branch!r}")
    prefix = BRANCHES[branch]
    enc = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not enc:
        raise CheckpointError(f"{source}: has no {branch} encoder (an MAE run has no target)")
    meta = {
        "format": encoder_format(m.encoder),
        "branch": branch,
        "encoder": m.encoder,
        "img_size": str(size),
        "patch_size": str(m.patch_size),
    }
    if m.encoder in CONVVIT_SIZES:
        # its position embedding is the fixed sin-cos one: recomputed for another image size
        pos = sincos_pos_embed(enc["pos_embed"].shape[-1], size // m.patch_size)[None]
        enc["pos_embed"] = pos.to(enc["pos_embed"].dtype)
    else:
        enc = resize_pos_embed(enc, size // m.patch_size)
        meta["timm_kwargs"] = json.dumps(timm_kwargs(m.encoder, size, m.patch_size))
    meta["mean"] = json.dumps(list(cfg.data.mean))
    meta["std"] = json.dumps(list(cfg.data.std))
    tensors = {k: v.detach().cpu().contiguous() for k, v in enc.items()}
    out = Path(out)
    _atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return out


def export_full(ckpt: str | Path, out: str | Path) -> Path:
    """Write the whole model of ``ckpt`` + its config (metadata and ``OUT.yaml`` beside it)."""
    state, cfg = load_pretraining_state(ckpt)
    config = to_dict(cfg)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta = {"format": FORMAT_FULL, "config": json.dumps(config)}
    out = Path(out)
    _atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=meta))
    # the YAML twin can be passed back to `cmae pretrain --config`
    out.with_suffix(".yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out


# ---------------------------------------------------------------------------------------------
# import of the official layouts

LAYOUTS = ("mae", "cmae")

# mm (mmcv / mmselfsup) transformer layer names -> timm Block names
_MM_BLOCK = (
    (r"ln1\.", "norm1."),
    (r"attn\.qkv\.", "attn.qkv."),
    (r"attn\.proj\.", "attn.proj."),
    (r"ln2\.", "norm2."),
    (r"ffn\.layers\.0\.0\.", "mlp.fc1."),
    (r"ffn\.layers\.1\.", "mlp.fc2."),
)
# the official ViT (MAE: timm names already; CMAE: mm names) -> our ViTEncoder
_MAE_VIT = (
    (r"(cls_token|pos_embed)$", r"\1"),
    (r"patch_embed\.proj\.", "patch_embed.proj."),
    (r"blocks\.(\d+)\.", r"blocks.\1."),
    (r"norm\.", "norm."),
)
_MM_VIT = (
    (r"(cls_token|pos_embed)$", r"\1"),
    (r"patch_embed\.projection\.", "patch_embed.proj."),
    *((rf"layers\.(\d+)\.{a}", rf"blocks.\1.{b}") for a, b in _MM_BLOCK),
    (r"ln1\.", "norm."),
)
_MAE_DECODER = (
    (r"decoder_embed\.", "embed."),
    (r"mask_token$", "mask_token"),
    (r"decoder_pos_embed$", "pos_embed"),
    (r"decoder_blocks\.(\d+)\.", r"blocks.\1."),
    (r"decoder_norm\.", "norm."),
    (r"decoder_pred\.", "pred."),
)
_MM_DECODER = (
    (r"decoder_embed\.", "embed."),
    (r"mask_token$", "mask_token"),
    (r"decoder_pos_embed$", "pos_embed"),
    *((rf"decoder_blocks\.(\d+)\.{a}", rf"blocks.\1.{b}") for a, b in _MM_BLOCK),
    (r"ln1\.", "norm."),
    (r"decoder_pred\.", "pred."),
)
# NonLinearNeck fc0 -> bn0 -> relu -> fc1  ==  our nn.Sequential(Linear, BN, ReLU, Linear)
_MM_NECK = ((r"fc0\.", "0."), (r"bn0\.", "1."), (r"fc1\.", "3."))

# (official prefix, our prefix, rules for the rest of the key), first match wins
_RULES: dict[str, tuple[tuple[str, str, tuple], ...]] = {
    "mae": (
        ("", "pixel_decoder.", _MAE_DECODER),
        ("", "encoder.", _MAE_VIT),
    ),
    "cmae": (
        ("backbone.", "encoder.", _MM_VIT),
        ("target_backbone.", "target_encoder.", _MM_VIT),
        ("pixel_decoder.", "pixel_decoder.", _MM_DECODER),
        ("feature_decoder.", "feature_decoder.", _MM_DECODER),
        ("projector.", "projector.", _MM_NECK),
        ("target_projector.", "target_projector.", _MM_NECK),
        ("head.predictor.", "predictor.", _MM_NECK),
    ),
}


def rename_official(
    state: dict[str, Tensor], layout: str
) -> tuple[dict[str, Tensor], dict[str, str], list[str]]:
    """Official key names -> ours: (renamed state, our key -> official key, official keys no
    rule matched)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    rules = _RULES[layout]
    if layout == "cmae" and "cls_token" in state:
        # tools/extract_backbone_weights.py output: the backbone alone, prefix stripped
        rules = (("", "encoder.", _MM_VIT),)
    out, origin, unmatched = {}, {}, []
    for key, value in state.items():
        new = _rename(key, rules)
        if new is None:
            unmatched.append(key)
        else:
            out[new], origin[new] = value, key
    return out, origin, unmatched


def _rename(key: str, rules: tuple[tuple[str, str, tuple], ...]) -> str | None:
    for prefix, ours, patterns in rules:
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        for pattern, repl in patterns:
            m = re.match(pattern, rest)
            if m:
                return ours + m.expand(repl) + rest[m.end() :]
    return None


HEAD_DIM = 64  # heads = width / 64 when neither a preset, the file nor the caller says


def infer_model_config(
    state: dict[str, Tensor],
    method: str,
    decoder_heads: int | None = None,
    encoder_heads: int | None = None,
) -> ModelConfig:
    """The ModelConfig our-named ``state`` describes; parts it lacks keep the reference values.

    Width, depth, patch, image size, decoder widths / depths and the projector come from the
    shapes. Head counts are in no shape: ``encoder_heads`` / ``decoder_heads`` when given
    (``load_official`` passes those of the checkpoint's config when it has one), else the
    preset's heads when (width, depth) is a preset size, else width / 64 (``HEAD_DIM``, the
    ViT-S/B/L rule); decoders default to 16 heads (both official recipes). A size that is not
    a preset is named ``vit_{W}x{D}h{H}``.
    """
    needed = ("encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed.proj.weight")
    if not all(k in state for k in needed):
        raise CheckpointError("no ViT encoder found (cls_token / pos_embed / patch embedding)")
    dim = state["encoder.cls_token"].shape[-1]
    depth = _count_blocks(state, "encoder.blocks.")
    if encoder_heads is None:
        preset = next((h for d, L, h in ENCODER_SIZES.values() if (d, L) == (dim, depth)), None)
        encoder_heads = preset or dim // HEAD_DIM
    if encoder_heads <= 0 or dim % encoder_heads:
        raise CheckpointError(
            f"encoder width {dim}: cannot tell its heads (width / {HEAD_DIM} does not divide "
            "it); pass encoder_heads (--encoder-heads)"
        )
    cfg = ModelConfig(method=method, decoder_heads=decoder_heads or 16)
    cfg.encoder = vit_name(dim, depth, encoder_heads)
    cfg.patch_size = state["encoder.patch_embed.proj.weight"].shape[-1]
    cfg.img_size = math.isqrt(state["encoder.pos_embed"].shape[1] - 1) * cfg.patch_size
    if "pixel_decoder.embed.weight" in state:
        cfg.decoder_dim = state["pixel_decoder.embed.weight"].shape[0]
        cfg.decoder_depth = _count_blocks(state, "pixel_decoder.blocks.")
    if "feature_decoder.embed.weight" in state:
        cfg.feature_decoder_depth = _count_blocks(state, "feature_decoder.blocks.")
    if "projector.0.weight" in state and "projector.3.weight" in state:
        cfg.proj_hidden_dim = state["projector.0.weight"].shape[0]
        cfg.proj_dim = state["projector.3.weight"].shape[0]
    if cfg.decoder_dim % cfg.decoder_heads:
        raise CheckpointError(
            f"decoder width {cfg.decoder_dim} is not a multiple of {cfg.decoder_heads} heads; "
            "pass decoder_heads (--decoder-heads)"
        )
    return cfg


def config_heads(ckpt: dict[str, Any]) -> tuple[int | None, int | None]:
    """(encoder heads, decoder heads) from a config dict inside an official checkpoint, None
    where it has none: mmengine's ``meta.cfg`` / a ``config`` entry when it is a dict (mm ViT
    ``backbone.arch`` dict ``num_heads``, or ``backbone.num_heads``; ``decoder_num_heads`` of
    a neck / decoder), MAE's ``args`` when it carries ``num_heads`` / ``decoder_num_heads``.
    A config saved as text (mmengine's pretty_text) is not parsed."""
    found: dict[str, int] = {}

    def walk(node: Any, parent: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if isinstance(v, int) and not isinstance(v, bool):
                    if k == "decoder_num_heads":
                        found.setdefault("decoder", v)
                    elif k == "num_heads" and parent in ("backbone", "arch"):
                        found.setdefault("encoder", v)
                walk(v, str(k))
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v, parent)

    meta = ckpt.get("meta")
    for cfg in (meta.get("cfg") if isinstance(meta, dict) else None, ckpt.get("config")):
        if isinstance(cfg, dict):
            walk(cfg, "")
    args = ckpt.get("args")
    if args is not None and not isinstance(args, (dict, str)):
        args = vars(args) if hasattr(args, "__dict__") else None
    if isinstance(args, dict):
        walk({"backbone": {k: v for k, v in args.items() if k == "num_heads"}}, "")
        walk({k: v for k, v in args.items() if k == "decoder_num_heads"}, "")
    return found.get("encoder"), found.get("decoder")


def _count_blocks(state: dict[str, Tensor], prefix: str) -> int:
    return len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})


def bgr_to_rgb_patch_embed(
    weight: Tensor, bias: Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[Tensor, Tensor]:
    """Patch-embedding conv for RGB input from one trained on the official CMAE's B,G,R input.

    The official pipeline loads RGB, swaps to B,G,R, then normalises channel c with the RGB
    statistics mean[c], std[c]: x_c = (I[2-c] - mean[c]) / std[c]. We feed
    y_j = (I[j] - mean[j]) / std[j], so x_c = (y_{2-c} std[2-c] + mean[2-c] - mean[c]) / std[c];
    folding that into the conv keeps its output exactly the same for the same picture.
    """
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    w = weight.double()
    flip = [2, 1, 0]
    new_w = w[:, flip] * (s / s[flip]).view(1, 3, 1, 1)
    shift = (m[flip] - m) / s  # constant input offset of official channel c
    new_b = bias.double() + (w * shift.view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
    return new_w.to(weight.dtype), new_b.to(bias.dtype)


def bgr_to_rgb_pixel_head(weight: Tensor, bias: Tensor, patch_size: int) -> tuple[Tensor, Tensor]:
    """Pixel decoder output layer predicting R,G,B from one predicting the official B,G,R.

    Its p*p*3 outputs per patch are channels-last (``patchify``: row, column, channel), so
    output (i, j, c) takes the row of (i, j, 2 - c): a pure permutation, exact for the
    prediction. (With ``norm_pix_loss`` the target is standardised per patch over all three
    channels, so the official B,G,R target normalised with the R,G,B statistics is not a
    permutation of ours: training on from an import sees a slightly different target.)
    """
    idx = torch.arange(patch_size * patch_size * 3).view(-1, 3).flip(1).reshape(-1)
    return weight[idx].clone(), bias[idx].clone()


class ImportResult(NamedTuple):
    model: CMAE
    config: Config
    missing: list[str]  # our parameters/buffers the file lacks (left at their initial values)
    unexpected: list[str]  # official keys with no place in our model
    derived: list[str]  # ours filled from another tensor (the target's unused final norm)


def load_official(
    source: str | Path | dict[str, Any],
    layout: str,
    *,
    bgr_to_rgb: bool = False,
    decoder_heads: int | None = None,
    encoder_heads: int | None = None,
    strict: bool = True,
) -> ImportResult:
    """An official MAE / CMAE checkpoint (path or loaded dict) as our CMAE model.

    ``strict``: any missing or unexpected key is an error listing them all. With
    ``strict=False`` (e.g. the encoder-only MAE release) the rest keeps its initial values, and
    a missing target branch starts as a copy of the online one, as at initialisation.
    ``bgr_to_rgb``: rewrite the patch embeddings so the model takes RGB and the pixel
    decoder's output so it predicts R,G,B (the official CMAE code fed B,G,R).
    Any plain ViT size imports (``infer_model_config``); ``encoder_heads`` / ``decoder_heads``
    override the heads a config dict inside the checkpoint gives (``config_heads``), which
    override the rule (preset heads, else width / 64; decoders 16).
    """
    ckpt = load_checkpoint(source) if isinstance(source, (str, Path)) else source
    state = _official_state(ckpt, layout)
    file_enc, file_dec = config_heads(ckpt) if isinstance(ckpt, dict) else (None, None)
    ours, origin, unexpected = rename_official(state, layout)
    mcfg = infer_model_config(
        ours,
        "mae" if layout == "mae" else "cmae",
        decoder_heads or file_dec,
        encoder_heads or file_enc,
    )
    cfg = Config(model=mcfg)
    # keep the reference shift (32 px at 224, ~2 patches) relative to the image size
    cfg.data.max_shift = mcfg.img_size // 7
    validate(cfg)
    model = build_model(mcfg)
    expected = model.state_dict()

    derived = []
    if layout == "cmae":
        # the official target encoder has no final norm; ours has one, unused (final_norm=False)
        for k in ("weight", "bias"):
            key = f"target_encoder.norm.{k}"
            if key not in ours and f"encoder.norm.{k}" in ours:
                ours[key] = ours[f"encoder.norm.{k}"].clone()
                derived.append(key)
    wrong_shape = [
        f"{origin.get(k, k)} {tuple(v.shape)} (ours: {k} {tuple(expected[k].shape)})"
        for k, v in ours.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if wrong_shape:
        raise CheckpointError(f"{layout} import: shapes differ: {', '.join(wrong_shape)}")
    unexpected += [origin[k] for k in ours if k not in expected]
    missing = [k for k in expected if k not in ours]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{layout} import is not a complete match (strict): missing {missing}, "
            f"unexpected {unexpected}"
        )
    loaded = {k: v for k, v in ours.items() if k in expected}
    if bgr_to_rgb:
        for enc in ("encoder", "target_encoder"):
            wk, bk = f"{enc}.patch_embed.proj.weight", f"{enc}.patch_embed.proj.bias"
            if wk in loaded:
                loaded[wk], loaded[bk] = bgr_to_rgb_patch_embed(
                    loaded[wk], loaded[bk], cfg.data.mean, cfg.data.std
                )
        wk, bk = "pixel_decoder.pred.weight", "pixel_decoder.pred.bias"
        if wk in loaded and bk in loaded:
            loaded[wk], loaded[bk] = bgr_to_rgb_pixel_head(loaded[wk], loaded[bk], mcfg.patch_size)
    if mcfg.method == "cmae":
        # a target branch the file lacks starts equal to the online one, as at initialisation
        for k in missing:
            if k.startswith(("target_encoder.", "target_projector.")):
                src = k[len("target_") :]
                if src in loaded:
                    loaded[k] = loaded[src].clone()
    model.load_state_dict({**expected, **loaded}, strict=True)
    return ImportResult(model, cfg, missing, unexpected, derived)


def _official_state(ckpt: Any, layout: str) -> dict[str, Tensor]:
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{layout} import: expected a dict, got {type(ckpt).__name__}")
    wrapper = {"mae": "model", "cmae": "state_dict"}[layout]
    state = ckpt.get(wrapper, ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        top = ", ".join(map(str, list(ckpt)[:5]))
        raise CheckpointError(
            f"{layout} import: expected {{'{wrapper}': state_dict}} or a plain state dict, "
            f"found keys {top} (wrong --layout?)"
        )
    return state


def describe_import(result: ImportResult, layout: str, bgr_to_rgb: bool) -> str:
    m = result.config.model
    lines = [
        f"imported {layout} layout as {m.method} {m.encoder} {m.img_size}px patch {m.patch_size}, "
        f"decoder {m.decoder_depth}x{m.decoder_dim}; "
        f"{len(result.missing)} missing, {len(result.unexpected)} unexpected, "
        f"{len(result.derived)} derived keys",
    ]
    for name, keys in (
        ("missing (initial values)", result.missing),
        ("unexpected (ignored)", result.unexpected),
        ("derived", result.derived),
    ):
        if keys:
            lines.append(f"  {name}: {', '.join(keys)}")
    if layout == "cmae" and not bgr_to_rgb:
        lines.append(
            "  note: the official CMAE code fed B,G,R input; this model still expects that "
            "(pass --bgr-to-rgb to make it take RGB like the rest of cmae)"
        )
    return "\n".join(lines)


def save_imported(result: ImportResult, out: str | Path, source: str) -> Path:
    """Write an import as a checkpoint the other commands read (``model`` + ``config``)."""
    out = Path(out)
    state = {
        "model": result.model.state_dict(),
        "config": to_dict(result.config),
        "imported_from": source,
    }
    save_checkpoint(state, out)
    return out
