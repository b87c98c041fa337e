"""benchmarks/feature_stats.py: the feature-geometry numbers reported in docs/RESULTS.md."""

import importlib.util
from pathlib import Path

import torch

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "feature_stats.py"
spec = importlib.util.spec_from_file_location("feature_stats", PATH)
feature_stats = importlib.util.module_from_spec(spec)
spec.loader.exec_module(feature_stats)


def test_isotropic_features_have_full_rank_and_no_shared_direction():
    x = torch.randn(4000, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = feature_stats.geometry(x, n_pairs=1000)
    assert g["effective_rank"] > 15 and abs(g["mean_pair_cos"]) < 0.02 and g["dim"] == 16


def test_offset_low_rank_features_are_detected():
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(2, 16, generator=gen, dtype=torch.float64)
    coeffs = torch.randn(4000, 2, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 0.3])
    x = coeffs @ direction + 20 * torch.ones(16, dtype=torch.float64)  # shared offset
    g = feature_stats.geometry(x, n_pairs=1000)
    assert 1.0 <= g["effective_rank"] < 2.0 and g["top10_eig_share"] > 0.999
    assert g["mean_pair_cos"] > 0.9
