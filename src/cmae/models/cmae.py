"""Contrastive Masked Autoencoder (Huang et al., arXiv 2207.13532), top to bottom.

Online branch: ViT encoder on the visible patches of the online view -> pixel decoder (MAE
reconstruction) and feature decoder (mean-pooled, -> projector -> predictor = query q).
Target branch: momentum copy of encoder + projector on the full pixel-shifted target view
(key k). Loss = norm-pix masked MSE + 2*tau*InfoNCE(q, k). ``method="mae"`` builds only the
encoder and pixel decoder, which is plain MAE in the same code.

Encoder parameter names equal timm's ``VisionTransformer`` under the ``encoder.`` prefix, so
exporting to timm is a key filter. ``convvit_*`` encoder sizes plug the hybrid ConvViT of
``cmae.models.convvit`` (same interface, its own names) into the same model (``make_encoder``).
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block
from torch import Tensor

from cmae.models.convvit import ConvViT
from cmae.models.losses import info_nce, masked_pixel_loss
from cmae.models.sizes import vit_size
from cmae.models.vit import LayerNorm, ViTEncoder, init_module, sincos_pos_embed

# ---------------------------------------------------------------------------------------------
# tensor helpers


def patchify(imgs: Tensor, p: int) -> Tensor:
    """[N, 3, H, W] -> [N, L, p*p*3] (MAE's patch order: row-major, channels last)."""
    n, c, h, w = imgs.shape
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: Tensor, p: int, channels: int = 3) -> Tensor:
    """[N, L, p*p*3] -> [N, 3, H, W] (square grid)."""
    n, length, _ = x.shape
    g = int(math.isqrt(length))
    x = x.reshape(n, g, g, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, g * p, g * p)


def random_masking(
    n: int,
    grid: int,
    mask_ratio: float,
    block: int = 1,
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Random (block-wise) masking of a grid x grid patch grid.

    The grid is split into (grid/block)^2 blocks of block x block patches; int(blocks*(1-ratio))
    blocks are kept, so ``block=1`` is MAE's per-patch masking and ``block=2`` the CMAE
    reference. Returns ids_keep [N, K] (patch indices fed to the encoder), ids_restore [N, L]
    (unshuffle for the decoders) and mask [N, L] (1 = removed, 0 = visible).
    """
    gb = grid // block
    n_blocks = gb * gb
    keep = int(n_blocks * (1 - mask_ratio)) * block * block
    noise = torch.rand(n, n_blocks, device=device, generator=generator)
    block_order = torch.argsort(noise, dim=1)  # [N, n_blocks], kept blocks first
    r = torch.arange(grid, device=device).view(gb, block)  # patch row/col of (block, offset)
    table = (r[:, None, :, None] * grid + r[None, :, None, :]).reshape(n_blocks, block * block)
    ids_shuffle = table[block_order].reshape(n, grid * grid)  # [N, L]
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(n, grid * grid, device=device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_shuffle[:, :keep], ids_restore, mask


# ---------------------------------------------------------------------------------------------
# modules


class Decoder(nn.Module):
    """MAE-style decoder: embed, fill masked positions with a mask token, blocks, norm, head."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        out_dim: int,
        grid: int,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(dim, grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
            for _ in range(depth)
        )
        self.norm = LayerNorm(dim)
        self.pred = nn.Linear(dim, out_dim)

    def forward(self, latent: Tensor, ids_restore: Tensor, pool: bool = False) -> Tensor:
        """latent [N, 1 + K, D_enc] -> [N, L, out_dim], or [N, out_dim] mean-pooled if ``pool``."""
        x = self.embed(latent)
        n, length = ids_restore.shape
        fill = self.mask_token.expand(n, length - (x.shape[1] - 1), -1)
        x_ = torch.cat([x[:, 1:], fill], dim=1)  # visible then masked, shuffled order
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)[:, 1:]  # drop cls
        if pool:
            # the head is linear, so mean(pred(x)) == pred(mean(x)): pool first, L times cheaper
            x = x.mean(dim=1)
        return self.pred(x)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "mask_token"}


HEAD_BN_EPS = 1e-6  # the official CMAE neck's BatchNorm1d eps (PyTorch's default is 1e-5)


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Projector / predictor: Linear -> BN -> ReLU -> Linear (no bias, no last BN), as the
    official CMAE neck: BN eps 1e-6, Linear layers keep PyTorch's default init
    (kaiming-uniform weights, uniform non-zero first bias; ``CMAE.initialize_weights`` leaves
    them alone)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim, eps=HEAD_BN_EPS),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
    )


class CMAEOutput(NamedTuple):
    loss: Tensor  # weighted total
    loss_pixel: Tensor
    loss_contrast: Tensor  # zero in MAE mode
    pred: Tensor  # [N, L, p*p*3] pixel-decoder output
    mask: Tensor  # [N, L], 1 = masked
    q: Tensor | None  # [N, proj_dim] queries (online branch)
    k: Tensor | None  # [N, proj_dim] keys (target branch)


class CMAE(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        drop_path: float = 0.0,
        contrastive: bool = True,
        mask_ratio: float = 0.65,
        mask_block: int = 2,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        feature_decoder: bool = True,
        feature_decoder_depth: int = 2,
        proj_hidden_dim: int = 1536,
        proj_dim: int = 256,
        norm_pix_loss: bool = True,
        temperature: float = 0.07,
        pixel_weight: float = 1.0,
        contrast_weight: float = 1.0,
        target_masked: bool = False,
        symmetric: bool = False,
        encoder: str | None = None,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.contrastive = contrastive
        self.mask_ratio = mask_ratio
        self.mask_block = mask_block
        self.norm_pix_loss = norm_pix_loss
        self.temperature = temperature
        self.pixel_weight = pixel_weight
        self.contrast_weight = contrast_weight
        self.target_masked = target_masked
        self.symmetric = symmetric

        # encoder: a named size (ViT or hybrid ConvViT), else a ViT of the given shape
        self.encoder = (
            make_encoder(encoder, img_size, patch_size, drop_path)
            if encoder is not None
            else ViTEncoder(img_size, patch_size, embed_dim, depth, num_heads, drop_path=drop_path)
        )
        embed_dim = self.encoder.embed_dim

        # pixel decoder (MAE)
        self.pixel_decoder = Decoder(
            embed_dim, decoder_dim, decoder_depth, decoder_heads, patch_size**2 * 3, self.grid
        )

        if contrastive:
            # feature decoder: own mask token and pos-embed, output at encoder width
            self.feature_decoder = (
                Decoder(
                    embed_dim,
                    decoder_dim,
                    feature_decoder_depth,
                    decoder_heads,
                    embed_dim,
                    self.grid,
                )
                if feature_decoder
                else None
            )
            self.projector = mlp_head(embed_dim, proj_hidden_dim, proj_dim)
            self.predictor = mlp_head(proj_dim, proj_hidden_dim, proj_dim)

        self.initialize_weights()

        if contrastive:
            # target (momentum) branch: equal to the online one at init, never trained by SGD
            self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
            self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def initialize_weights(self) -> None:
        # MAE init: xavier-uniform Linear, zero biases, unit LayerNorm, tokens N(0, 0.02); the
        # projector / predictor keep PyTorch's default init, as the official CMAE code does
        self.encoder.init_weights()
        for name, child in self.named_children():
            if name not in ("encoder", "projector", "predictor"):
                child.apply(init_module)
            if isinstance(child, Decoder):
                nn.init.normal_(child.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        out = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        for name in ("pixel_decoder", "feature_decoder"):
            dec = getattr(self, name, None)
            if dec is not None:
                out |= {f"{name}.{n}" for n in dec.no_weight_decay()}
        return out

    # -- online branch ------------------------------------------------------------------------

    def forward_encoder(self, imgs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Mask and encode: latent [N, 1 + K, D], mask [N, L], ids_restore [N, L], ids_keep."""
        ids_keep, ids_restore, mask = random_masking(
            imgs.shape[0], self.grid, self.mask_ratio, self.mask_block, device=imgs.device
        )
        latent = self.encoder(imgs, ids_keep)
        return latent, mask, ids_restore, ids_keep

    def forward_pixel_loss(
        self, imgs: Tensor, latent: Tensor, mask: Tensor, ids_restore: Tensor
    ) -> tuple[Tensor, Tensor]:
        pred = self.pixel_decoder(latent, ids_restore)  # [N, L, p*p*3]
        target = patchify(imgs, self.patch_size)
        return pred, masked_pixel_loss(pred, target, mask, self.norm_pix_loss)

    def forward_query(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """q [N, proj_dim]: feature decoder over all L positions, mean-pooled, proj, pred."""
        if self.feature_decoder is not None:
            feat = self.feature_decoder(latent, ids_restore, pool=True)  # [N, D]
        else:
            feat = latent[:, 1:].mean(dim=1)  # ablation: pool the visible encoder tokens
        return self.predictor(self.projector(feat))

    # -- target branch ------------------------------------------------------------------------

    @torch.no_grad()
    def forward_key(self, imgs: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """k [N, proj_dim]: target encoder (no final norm), mean of patch tokens, projector."""
        x = self.target_encoder(imgs, ids_keep if self.target_masked else None, final_norm=False)
        return self.target_projector(x[:, 1:].mean(dim=1))

    # -- loss ---------------------------------------------------------------------------------

    def forward(
        self,
        online: Tensor,
        target: Tensor | None = None,
        keys: Tensor | None = None,
        key_offset: int = 0,
    ) -> CMAEOutput:
        """online, target: normalised images [N, 3, S, S] (target unused in MAE mode).

        ``keys`` [M, proj_dim]: keys computed beforehand (``forward_key``) for a larger batch in
        which this batch's keys are rows ``key_offset .. key_offset + N``; they replace the
        target view. Gradient accumulation uses it so every micro-batch is contrasted with the
        keys of the whole accumulated (and gathered) batch.
        """
        latent, mask, ids_restore, ids_keep = self.forward_encoder(online)
        pred, loss_pixel = self.forward_pixel_loss(online, latent, mask, ids_restore)
        if not self.contrastive:
            zero = loss_pixel.new_zeros(())
            return CMAEOutput(
                self.pixel_weight * loss_pixel, loss_pixel, zero, pred, mask, None, None
            )
        q = self.forward_query(latent, ids_restore)
        if keys is not None:
            if self.symmetric or self.target_masked:
                # both ablations need keys that depend on this forward's masks
                raise ValueError("precomputed keys do not support symmetric or target_masked")
            k = keys[key_offset : key_offset + q.shape[0]]
            loss_contrast = info_nce(q, k, self.temperature, keys=keys, offset=key_offset)
            loss = self.pixel_weight * loss_pixel + self.contrast_weight * loss_contrast
            return CMAEOutput(loss, loss_pixel, loss_contrast, pred, mask, q, k)
        if target is None:
            raise ValueError("CMAE needs the target view; pass model(online, target)")
        k = self.forward_key(target, ids_keep)
        loss_contrast = info_nce(q, k, self.temperature)
        if self.symmetric:
            # swapped roles: the masked target view is the query, the full online view the key
            latent2, _, ids_restore2, ids_keep2 = self.forward_encoder(target)
            q2 = self.forward_query(latent2, ids_restore2)
            k2 = self.forward_key(online, ids_keep2)
            loss_contrast = 0.5 * (loss_contrast + info_nce(q2, k2, self.temperature))
        loss = self.pixel_weight * loss_pixel + self.contrast_weight * loss_contrast
        return CMAEOutput(loss, loss_pixel, loss_contrast, pred, mask, q, k)

    # -- momentum update ----------------------------------------------------------------------

    @torch.no_grad()
    def update_target(self, momentum: float | Tensor) -> None:
        """theta_t <- m * theta_t + (1 - m) * theta_o for encoder and projector, paired by name.

        Call once per optimizer step, after ``optimizer.step()``. BN running buffers are not
        averaged (the target projector keeps its own, as in the reference). A 0-dim tensor
        ``momentum`` stays on the device: 1.0 skips the update without a host sync.
        """
        if not self.contrastive:
            return
        online, target = [], []
        for src, dst in (
            (self.encoder, self.target_encoder),
            (self.projector, self.target_projector),
        ):
            o, t = dict(src.named_parameters()), dict(dst.named_parameters())
            if o.keys() != t.keys():
                raise RuntimeError(f"target/online parameter names differ: {o.keys() ^ t.keys()}")
            online += [o[name] for name in t]
            target += [t[name] for name in t]
        if isinstance(momentum, Tensor):
            torch._foreach_lerp_(target, online, [1.0 - momentum] * len(target))
            return
        torch._foreach_mul_(target, momentum)
        torch._foreach_add_(target, online, alpha=1.0 - momentum)


def make_encoder(name: str, img_size: int, patch_size: int, drop_path: float = 0.0) -> nn.Module:
    """The encoder a size name describes: ``ViTEncoder`` (a preset or ``vit_{W}x{D}h{H}``) or
    the hybrid ``ConvViT`` (convvit_*, cmae.models.convvit); both take ``(imgs, ids_keep,
    final_norm)`` and return ``[N, 1 + K, D]``."""
    size = vit_size(name)
    if size is not None:
        dim, depth, heads = size
        return ViTEncoder(img_size, patch_size, dim, depth, heads, drop_path=drop_path)
    return ConvViT.from_name(name, img_size, patch_size, drop_path)


def build_model(cfg) -> CMAE:  # cfg: cmae.config.ModelConfig
    """The CMAE (or MAE) model a ``ModelConfig`` describes."""
    ratio, block = cfg.resolved_mask()
    return CMAE(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        encoder=cfg.encoder,
        drop_path=cfg.drop_path,
        contrastive=cfg.method == "cmae",
        mask_ratio=ratio,
        mask_block=block,
        decoder_dim=cfg.decoder_dim,
        decoder_depth=cfg.decoder_depth,
        decoder_heads=cfg.decoder_heads,
        feature_decoder=cfg.feature_decoder,
        feature_decoder_depth=cfg.feature_decoder_depth,
        proj_hidden_dim=cfg.proj_hidden_dim,
        proj_dim=cfg.proj_dim,
        norm_pix_loss=cfg.norm_pix_loss,
        temperature=cfg.temperature,
        pixel_weight=cfg.pixel_weight,
        contrast_weight=cfg.contrast_weight,
        target_masked=cfg.target_masked,
        symmetric=cfg.symmetric,
    )


def build_encoder(cfg) -> nn.Module:  # cfg: cmae.config.ModelConfig
    """A freshly initialised encoder alone (e.g. the random-init baseline for evaluation)."""
    enc = make_encoder(cfg.encoder, cfg.img_size, cfg.patch_size, cfg.drop_path)
    enc.init_weights()
    return enc
