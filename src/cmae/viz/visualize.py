"""Reconstruction pictures, one row per image: original | masked input | reconstruction |
reconstruction with the visible patches pasted back | the pixel-shifted target view (CMAE only).

Also the optional training-time visuals (``RunVisuals``): a reconstruction grid every N epochs
(PNG in the run directory) and TensorBoard scalars + that grid; tensorboard is imported only
when it is switched on.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torch.utils.data import Dataset

from cmae.data.datasets import DataError, list_images
from cmae.data.pipeline import build_views
from cmae.data.views import DeviceViews, collate_boxes, normalize
from cmae.interop.export import load_model
from cmae.models.cmae import CMAE, patchify, random_masking, unpatchify
from cmae.viz.plot import MissingDependencyError

# original | masked input | reconstruction | reconstruction with the visible patches pasted back
# | pixel-shifted target view (short: the labels must fit a 48 px tile)
COLUMNS = ("original", "masked", "recon", "pasted", "target")


def unnormalize_patches(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """Undo norm-pix: pred [N, L, P] in per-patch normalised units -> the units of target
    [N, L, P], with each patch's own mean and variance (as MAE's visualisation demo does)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return pred * (var + eps).sqrt() + mean


@torch.no_grad()
def reconstruct(
    model: CMAE, online: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Mask, encode, decode: (reconstruction [N, 3, S, S] in the input's normalised units,
    mask [N, L] with 1 = masked). The mask is drawn on the CPU from ``generator``."""
    was_training = model.training
    model.eval()
    p = model.patch_size
    ids_keep, ids_restore, mask = random_masking(
        online.shape[0], model.grid, model.mask_ratio, model.mask_block, generator=generator
    )
    ids_keep, ids_restore = ids_keep.to(online.device), ids_restore.to(online.device)
    latent = model.encoder(online, ids_keep)
    pred = model.pixel_decoder(latent, ids_restore)  # [N, L, p*p*3]
    if model.norm_pix_loss:
        pred = unnormalize_patches(pred, patchify(online, p))
    model.train(was_training)
    return unpatchify(pred, p), mask.to(online.device)


def to_uint8(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalised float [N, 3, H, W] -> uint8 pixels (inverse of ``views.normalize``)."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return ((x * s + m).clamp(0, 1) * 255).round().to(torch.uint8)


def reconstruction_rows(
    model: CMAE,
    views: Sequence[Sequence[Tensor]],
    mean: Sequence[float],
    std: Sequence[float],
    seed: int = 0,
) -> list[list[Tensor]]:
    """Per sample (``views[i]`` = (online,) or (online, target), uint8 [3, S, S]) the row of
    uint8 tiles: original, masked, reconstruction, pasted, and the target view if given."""
    device = next(model.parameters()).device
    online = torch.stack([v[0] for v in views]).to(device)  # uint8 [N, 3, S, S]
    rec, mask = reconstruct(
        model, normalize(online, mean, std), torch.Generator().manual_seed(seed)
    )
    p = model.patch_size
    masked_px = unpatchify(mask[..., None].expand(-1, -1, p * p * 3), p).bool()  # [N, 3, S, S]
    grey = torch.full_like(online, 128)
    rec_u8 = to_uint8(rec, mean, std)
    cols = [
        online,
        torch.where(masked_px, grey, online),
        rec_u8,
        torch.where(masked_px, rec_u8, online),
    ]
    if len(views[0]) > 1:
        cols.append(torch.stack([v[1] for v in views]).to(device))
    return [[c[i].cpu() for c in cols] for i in range(online.shape[0])]


def render_grid(
    rows: Sequence[Sequence[Tensor]], labels: Sequence[str], tile: int = 96, pad: int = 4
) -> Image.Image:
    """Tiles (uint8 [3, H, W]) upscaled to ``tile`` px (nearest: patches stay crisp) on a white
    sheet with a header of column labels. Size: (cols*tile + (cols+1)*pad) x
    (HEADER + rows*tile + (rows+1)*pad)."""
    n_cols = max(len(r) for r in rows)
    width = n_cols * tile + (n_cols + 1) * pad
    height = HEADER + len(rows) * tile + (len(rows) + 1) * pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for j, label in enumerate(labels[:n_cols]):
        draw.text((pad + j * (tile + pad) + 2, 3), label, fill="black", font=font)
    for i, row in enumerate(rows):
        for j, t in enumerate(row):
            img = Image.fromarray(t.permute(1, 2, 0).numpy()).resize(
                (tile, tile), Image.Resampling.NEAREST
            )
            sheet.paste(img, (pad + j * (tile + pad), HEADER + pad + i * (tile + pad)))
    return sheet


HEADER = 16  # px of column labels above the tiles


def reconstruction_grid(
    model: CMAE,
    views: Sequence[Sequence[Tensor]],
    mean: Sequence[float],
    std: Sequence[float],
    seed: int = 0,
    tile: int = 96,
) -> Image.Image:
    return render_grid(reconstruction_rows(model, views, mean, std, seed), COLUMNS, tile)


def fixed_views(
    dataset: Dataset, n: int, seed: int, device_views: DeviceViews | None = None
) -> list[tuple[Tensor, ...]]:
    """The views of the first ``n`` samples, drawn under ``seed`` without touching the global
    RNG streams of the run (the views' randomness uses torch's generator). ``device_views``
    finishes samples that are ``CropBoxes``' (box, params) (``data.resize_device``), here on
    the CPU."""
    with torch.random.fork_rng(devices=[]):  # restores the CPU generator, the one seeded:
        torch.default_generator.manual_seed(seed)  # torch.manual_seed would reseed the GPU's
        items = [dataset[i][0] for i in range(min(n, len(dataset)))]
    if device_views is not None:
        cpu = torch.device("cpu")
        items = [[v[0] for v in device_views(*collate_boxes([(x,)])[0], cpu)] for x in items]
    return [tuple(item) for item in items]


def image_paths(items: Sequence[str | Path]) -> list[Path]:
    """Files as given, directories expanded to their images (recursive, sorted)."""
    out: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            out += list_images(p)
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"image path does not exist: {p}")
    if not out:
        raise DataError(f"no images found in {', '.join(map(str, items))}")
    return out


def visualize_files(
    ckpt: str | Path,
    images: Sequence[str | Path],
    out: str | Path,
    max_images: int = 8,
    seed: int = 0,
    tile: int = 96,
) -> Path:
    """``cmae visualize``: the reconstruction grid of a checkpoint on some image files.

    Views are deterministic apart from ``seed``: the centre square of each image resized to
    S + shift, online window at (0, 0), target window shifted and colour-augmented as in
    pretraining.
    """
    model, cfg = load_model(ckpt)
    view_cfg = copy.deepcopy(cfg)
    view_cfg.data.crop_scale, view_cfg.data.crop_ratio = (1.0, 1.0), (1.0, 1.0)
    view_cfg.data.hflip = 0.0
    make_views = build_views(view_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        views = []
        for path in image_paths(images)[:max_images]:
            try:
                with Image.open(path) as im:
                    views.append(make_views(im.convert("RGB")))
            except OSError as e:
                raise DataError(f"cannot read image {path}: {e}") from e
    grid = reconstruction_grid(model, views, cfg.data.mean, cfg.data.std, seed, tile)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


class RunVisuals:
    """Training-time visuals of ``cmae pretrain``.

    A reconstruction grid of 8 fixed training samples is written to ``RUN/recon_stepNNNNNN.png``
    at the end of the run and, with ``vis_every`` > 0, every that many epochs.
    ``tensorboard``: scalars of each log record and those grids go to ``RUN/tensorboard``.
    """

    def __init__(
        self,
        out_dir: Path,
        tensorboard: bool,
        vis_every: int,
        dataset: Dataset,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int = 0,
        device_views: DeviceViews | None = None,
    ) -> None:
        self.out_dir, self.vis_every = Path(out_dir), vis_every
        self.mean, self.std, self.seed = mean, std, seed
        self.writer = _summary_writer(self.out_dir / "tensorboard") if tensorboard else None
        self.views = fixed_views(dataset, 8, seed, device_views)
        self.last_png: Path | None = None
        self._drawn_step = -1

    def log(self, rec: dict) -> None:
        if self.writer is None:
            return
        for key, value in rec.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, rec["step"])
        self.writer.flush()

    def epoch_end(self, model: CMAE, epoch: int, step: int, last: bool = False) -> None:
        """``epoch``: epochs completed; ``last``: the run ends here (always draws)."""
        due = last or (self.vis_every > 0 and epoch % self.vis_every == 0)
        if not due or step == self._drawn_step:
            return
        self._drawn_step = step
        grid = reconstruction_grid(model, self.views, self.mean, self.std, self.seed)
        self.last_png = self.out_dir / f"recon_step{step:06d}.png"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        grid.save(self.last_png)
        if self.writer is not None:
            self.writer.add_image("reconstruction", np.asarray(grid), step, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _summary_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise MissingDependencyError(
            "train.tensorboard=true needs the tensorboard package: "
            "pip install 'cmae[tensorboard]' (or pip install tensorboard)"
        ) from e
    return SummaryWriter(log_dir=str(log_dir))
