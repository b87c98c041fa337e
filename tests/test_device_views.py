"""data.resize_device: the workers cut out crop boxes (CropBoxes), the training device resizes,
flips and windows them (DeviceViews). On the CPU that equals the workers' own views bit for
bit, and a whole run gives the same losses with and without it. And the data code's seeding
leaves the device generators alone."""

import json

import numpy as np
import pytest
import torch

from cmae.config import ConfigError, load_config
from cmae.data.datasets import SyntheticShapes
from cmae.data.pipeline import build_device_views, build_views
from cmae.data.sampling import SeededSamples
from cmae.data.views import CropBoxes, DeviceViews, PixelShiftViews, SingleView, collate_boxes
from cmae.train.pretrain import run
from cmae.viz.visualize import fixed_views
from tests.helpers import tiny_overrides

CPU = torch.device("cpu")


def photo(h: int = 150, w: int = 200, seed: int = 0) -> torch.Tensor:
    """uint8 [3, H, W] laid out as a decoder gives it (height x width x channels)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    a = np.stack([np.sin(6 * xx + 4 * yy + p) for p in rng.uniform(0, 6, 3)], -1) * 90 + 128
    a = np.clip(a + rng.normal(0, 10, a.shape), 0, 255).astype(np.uint8)
    return torch.from_numpy(a).permute(2, 0, 1)


@pytest.mark.parametrize("method,hflip", [("cmae", 0.5), ("mae", 0.5), ("cmae", 0.0)])
def test_device_views_equal_the_workers_views(method, hflip):
    size, shift = 72, 12
    if method == "cmae":
        full, boxes = PixelShiftViews(size, shift, hflip=hflip), CropBoxes(size, shift, hflip=hflip)
        two = True
    else:
        full, boxes, two = SingleView(size, hflip=hflip), CropBoxes(size, 0, hflip=hflip), False
    finish = DeviceViews(size, shift if two else 0, two_views=two)
    batch, expected = [], []
    for seed in range(12):
        img = photo(seed=seed)
        torch.manual_seed(seed)
        expected.append(full(img))
        torch.manual_seed(seed)
        batch.append((boxes(img), seed % 10, 0))  # as SeededSamples yields: views, label, bad
    (buffer, sizes, params), labels, bad = collate_boxes(batch)
    assert sizes.shape == (12, 2) and params.shape == (12, 3) and labels.tolist()[:3] == [0, 1, 2]
    assert len(sizes.unique(dim=0)) > 1 and buffer.numel() == 3 * sizes.prod(1).sum()
    views = finish(buffer, sizes, params, CPU)
    assert len(views) == len(expected[0]) == (2 if two else 1)
    for i, exp in enumerate(expected):
        for v, e in zip(views, exp, strict=True):
            assert torch.equal(v[i], e), i
    assert params[:, 0].unique().numel() == (2 if hflip == 0.5 else 1)  # flips as drawn
    if two:
        assert (params[:, 1:] > 0).any() and (params[:, 1:] < shift).all()


def test_flag_needs_the_colour_ops_on_the_device():
    with pytest.raises(ConfigError, match="data.target_aug_device=true"):
        load_config(None, tiny_overrides(**{"data.resize_device": True}))
    ok = {"data.resize_device": True, "data.target_aug_device": True}
    cfg = load_config(None, tiny_overrides(**ok))
    assert isinstance(build_views(cfg, workers_part=True), CropBoxes)
    assert isinstance(build_views(cfg), PixelShiftViews)
    assert build_device_views(cfg).two_views
    mae = load_config(None, tiny_overrides(**{"data.resize_device": True, "model.method": "mae"}))
    assert not build_device_views(mae).two_views
    assert build_device_views(load_config(None, tiny_overrides())) is None


def test_pretrain_losses_equal_with_the_resize_on_the_device(tmp_path):
    """64 px views take the tensor resize path, so the device's resize is the workers' own."""
    losses = {}
    for on in (False, True):
        out = tmp_path / str(on)
        over = {
            "model.encoder": "vit_micro",
            "model.img_size": 64,
            "model.patch_size": 16,
            "data.max_shift": 8,
            "data.synthetic_train": 12,
            "data.num_workers": 1,
            "data.target_aug_device": True,
            "data.resize_device": on,
            "train.batch_size": 4,
            "train.epochs": 1,
            "train.log_every": 1,
            "train.knn_at_end": False,
            "train.threads": 1,
            "train.out": str(out),
        }
        run(load_config(None, tiny_overrides(**over)))
        log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        losses[on] = [(r["loss"], r["loss_pixel"], r["loss_contrast"]) for r in log if "loss" in r]
        assert len(list(out.glob("recon_step*.png"))) == 1  # the reconstruction grid was drawn
    assert len(losses[True]) == 3 and losses[True] == losses[False]


def test_data_and_grid_seeding_leave_the_gpu_generators_alone(monkeypatch):
    """Per-sample seeding and the reconstruction grid seed only the CPU generator: reseeding
    the CUDA one (torch.manual_seed) would give every rank of a GPU run the same masks."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", calls.append)
    data = SyntheticShapes(4, 16, transform=PixelShiftViews(16, 4))
    fixed_views(data, 2, seed=3)
    SeededSamples(data, seed=0)[(1, 2)]
    assert calls == []
    torch.manual_seed(0)  # the patch does see torch.manual_seed
    assert calls == [0]
