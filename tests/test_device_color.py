"""The target view's colour ops on the device in batch (``DeviceTargetColor``) against the
per-image CPU path (``target_color_transform``): the same kernels for given parameters, and the
same distribution of outputs when both draw their own parameters (two-sample KS tests)."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from cmae.data.pipeline import build_device_color, build_views, to_device
from cmae.data.views import DeviceTargetColor, normalize, target_color_transform
from cmae.train.pretrain import run


def images(n=8, size=24, seed=0) -> torch.Tensor:
    """Saturated, textured uint8 images [n, 3, size, size]: a random hue ramp plus noise."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    out = []
    for _ in range(n):
        hue = torch.rand(1, generator=g) + 0.15 * ramp.view(1, 1, -1)  # [1, 1, size]
        phase = torch.tensor([0.0, 1 / 3, 2 / 3]).view(3, 1, 1)
        rgb = 0.5 + 0.45 * torch.cos(2 * torch.pi * (hue - phase))  # [3, 1, size]
        img = 255 * rgb * (0.5 + 0.5 * ramp.view(1, -1, 1)) + 10 * torch.randn(
            3, size, size, generator=g
        )
        out.append(img.clamp(0, 255).to(torch.uint8))
    return torch.stack(out)


def reference(img: torch.Tensor, p, n: int, kernel: int) -> torch.Tensor:
    """torchvision's functional kernels with sample n's parameters."""
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    if p.jitter[n]:
        for op in p.order[n].tolist():
            img = ops[op](img, float(p.factors[n, op]))
    if p.gray[n]:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if p.blur[n]:
        sigma = float(p.sigma[n])
        img = TF.gaussian_blur(img, [kernel, kernel], [sigma, sigma])
    return img


def test_same_output_as_torchvision_kernels_for_given_parameters():
    torch.manual_seed(0)
    x = images(8, 20)
    aug = DeviceTargetColor()
    for _ in range(6):
        p = aug.sample(x.shape[0])
        out = aug.apply(x, p)
        assert out.dtype == torch.uint8 and out.shape == x.shape
        for n in range(x.shape[0]):
            diff = (out[n].int() - reference(x[n], p, n, aug.kernel).int()).abs()
            # float rounding at integer boundaries only: off by one level, rarely
            assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


def test_probabilities_zero_is_identity_and_flags_do_apply():
    x = images(4, 16)
    assert torch.equal(DeviceTargetColor(jitter_p=0, grayscale_p=0, blur_p=0)(x), x)
    gray = DeviceTargetColor(jitter_p=0, grayscale_p=1, blur_p=0)(x)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    blurred = DeviceTargetColor(jitter_p=0, grayscale_p=0, blur_p=1)(x).float()
    assert blurred.diff(dim=-1).abs().mean() < x.float().diff(dim=-1).abs().mean()


def statistics(x: torch.Tensor, base: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image summaries that each colour op moves (brightness, contrast, saturation, hue,
    sharpness, greyness), relative to the image's un-augmented ``base``: this takes the spread
    of the base images out, so a wrong parameter range shows."""

    def summary(x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.float() / 255
        maxc, minc = x.amax(dim=1), x.amin(dim=1)
        r, g, b = x.mean(dim=(2, 3)).unbind(dim=1)
        return {
            "log_mean": x.mean(dim=(1, 2, 3)).clamp_min(1e-3).log(),
            "log_std": x.std(dim=(1, 2, 3)).clamp_min(1e-3).log(),
            "log_saturation": ((maxc - minc) / maxc.clamp_min(1e-3))
            .mean(dim=(1, 2))
            .clamp_min(1e-3)
            .log(),
            "log_sharpness": x.diff(dim=-1).abs().mean(dim=(1, 2, 3)).clamp_min(1e-3).log(),
            # angle of the mean colour in an opponent-colour plane: moved by the hue shift
            "hue_angle": torch.atan2((g - b) * 0.866, r - (g + b) / 2),
        }

    out, ref = summary(x), summary(base.repeat(x.shape[0] // base.shape[0], 1, 1, 1))
    stats = {k: (out[k] - ref[k]).numpy() for k in out}
    stats["hue_angle"] = np.angle(np.exp(1j * stats["hue_angle"]))  # wrapped to (-pi, pi]
    stats["grey"] = (x.amax(dim=1) - x.amin(dim=1)).amax(dim=(1, 2)).eq(0).float().numpy()
    return stats


def ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


REPEATS = 60  # 8 base images x 60 draws = 480 samples per path
# KS critical value for n = m = 480 at alpha = 0.001: 1.95 * sqrt(2 / 480)
KS_CRITICAL = 0.126

NO_JITTER = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}
ALONE = {"grayscale_p": 0.0, "blur_p": 0.0}
# the whole pipeline, and each op alone (where a wrong range cannot hide behind the others)
SETTINGS = {
    "all": {},
    "brightness": {**NO_JITTER, **ALONE, "brightness": 0.4},
    "contrast": {**NO_JITTER, **ALONE, "contrast": 0.4},
    "saturation": {**NO_JITTER, **ALONE, "saturation": 0.4},
    "hue": {**NO_JITTER, **ALONE, "hue": 0.1},
    "blur": {"jitter_p": 0.0, "grayscale_p": 0.0},
}


def draws(path: str, setting: dict) -> dict[str, np.ndarray]:
    """Statistics of the 8 base images augmented REPEATS times each by one path."""
    base = images(8, 16)
    if path == "cpu":  # torchvision's transforms, one image at a time (as the data workers)
        torch.manual_seed(1)
        cpu = target_color_transform(**setting)
        out = torch.stack([cpu(img) for _ in range(REPEATS) for img in base])
    else:
        torch.manual_seed(2)
        dev = DeviceTargetColor(**setting)
        out = torch.cat([dev(base) for _ in range(REPEATS)])
    return statistics(out, base)


@pytest.fixture(scope="module")
def cpu_draws() -> dict[str, dict[str, np.ndarray]]:
    return {name: draws("cpu", setting) for name, setting in SETTINGS.items()}


def largest_ks(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, str]:
    return max((ks(a[key], b[key]), key) for key in a)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_same_distribution_as_the_cpu_path(cpu_draws, name):
    stat, key = largest_ks(cpu_draws[name], draws("device", SETTINGS[name]))
    assert stat < KS_CRITICAL, key
    if name == "all":  # the grayscale op (p = 0.2) is the only source of exactly grey images
        for grey in (cpu_draws[name]["grey"], draws("device", {})["grey"]):
            assert abs(grey.mean() - 0.2) < 0.06


@pytest.mark.parametrize(
    "name, wrong",
    [
        ("brightness", {"brightness": 0.2}),
        ("contrast", {"contrast": 0.2}),
        ("saturation", {"saturation": 0.2}),
        ("hue", {"hue": 0.05}),
        ("blur", {"blur_sigma": (0.1, 1.0)}),
        ("blur", {"blur_p": 0.3}),
        ("all", {"jitter_p": 0.4}),
        ("all", {"grayscale_p": 0.5}),
    ],
)
def test_the_statistical_test_detects_a_wrong_distribution(cpu_draws, name, wrong):
    stat, _ = largest_ks(cpu_draws[name], draws("device", {**SETTINGS[name], **wrong}))
    assert stat > KS_CRITICAL


# ---------------------------------------------------------------------------------------------
# data.target_aug_device in the pretraining command


def test_flag_moves_the_colour_ops_from_the_workers_to_the_device(tiny_cfg):
    image = Image.fromarray(images(1, 40)[0].permute(1, 2, 0).numpy())
    for on in (False, True):
        cfg = tiny_cfg(**{"data.target_aug_device": on, "data.max_shift": 0})
        assert (build_device_color(cfg) is not None) == on
        # max_shift 0: without colour ops on the worker the two views are the same crop
        torch.manual_seed(0)
        online, target = build_views(cfg)(image)
        assert torch.equal(online, target) == on
    off = tiny_cfg(**{"data.target_aug_device": True, "data.target_color_aug": False})
    assert build_device_color(off) is None
    mae = tiny_cfg(**{"data.target_aug_device": True, "model.method": "mae"})
    assert build_device_color(mae) is None


def test_to_device_augments_only_the_target_view(tiny_cfg):
    x = images(4, 16)
    mean, std = (0.5,) * 3, (0.25,) * 3
    color = build_device_color(tiny_cfg(**{"data.target_aug_device": True, "data.blur_p": 1.0}))
    online, target = to_device([x, x.clone()], torch.device("cpu"), mean, std, color)
    assert torch.equal(online, normalize(x, mean, std))
    assert not torch.equal(target, online)
    plain = to_device([x, x.clone()], torch.device("cpu"), mean, std)
    assert torch.equal(plain[1], plain[0])


def test_pretrain_runs_with_colour_ops_on_the_device(tmp_path, tiny_cfg):
    cfg = tiny_cfg(
        **{
            "model.encoder": "vit_micro",
            "data.synthetic_train": 8,
            "data.num_workers": 0,
            "data.target_aug_device": True,
            "train.batch_size": 4,
            "train.epochs": 1,
            "train.knn_at_end": False,
            "train.threads": 1,
            "train.out": str(tmp_path),
        }
    )
    summary = run(cfg)
    assert summary["steps"] == 2 and np.isfinite(summary["loss"])
