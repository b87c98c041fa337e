import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from cmae.data.views import eval_transform
from cmae.eval.frozen import cached_features, extract_features, feature_cache_file, topk_accuracy
from cmae.eval.knn import knn_predict


def clusters(n_per_class: int, num_classes: int = 5, dim: int = 16, seed: int = 0):
    """Well-separated Gaussian clusters on the unit sphere: [N, dim] features, [N] labels."""
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123))
    centers = F.normalize(centers, dim=1) * 10  # the same centres for bank and queries
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centers[y] + 0.5 * torch.randn(len(y), dim, generator=g)
    return F.normalize(x, dim=1), y


def test_knn_is_perfect_on_separated_clusters():
    bank, bank_y = clusters(40, seed=0)
    q, q_y = clusters(20, seed=1)
    scores = knn_predict(bank, bank_y, q, num_classes=5, k=20, temperature=0.07)
    top1, top5 = topk_accuracy(scores, q_y)
    assert top1 == 100.0 and top5 == 100.0


def test_knn_does_not_depend_on_chunk_size():
    bank, bank_y = clusters(30, seed=0)
    q, _ = clusters(25, seed=2)
    noise = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    q = F.normalize(q + 0.8 * noise, dim=1)  # ambiguous queries, non-trivial votes
    ref = knn_predict(bank, bank_y, q, 5, k=7, chunk=10_000)
    for chunk in (1, 7, 64):
        # equal up to float rounding: a 1-row product runs another kernel, exp(sim / T) scales
        # its ulp-level differences by 1 / T
        out = knn_predict(bank, bank_y, q, 5, k=7, chunk=chunk)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert torch.equal(out.argmax(dim=1), ref.argmax(dim=1))


def test_knn_votes_are_exp_similarity_over_temperature():
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    bank_y = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.0]])
    # k = 2 nearest: bank 0 (sim 1.0, class 0) and bank 1 (sim 0.8, class 1); bank 2 is out
    scores = knn_predict(bank, bank_y, q, num_classes=2, k=2, temperature=0.5)
    expected = torch.tensor([[torch.exp(torch.tensor(2.0)), torch.exp(torch.tensor(1.6))]])
    torch.testing.assert_close(scores, expected)
    # the temperature changes the vote weights, k which neighbours vote
    assert not torch.allclose(knn_predict(bank, bank_y, q, 2, k=2, temperature=0.07), scores)
    k3 = knn_predict(bank, bank_y, q, 2, k=3, temperature=0.5)
    assert k3[0, 1] > scores[0, 1]


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    top1, top2 = topk_accuracy(scores, labels, ks=(1, 2))
    assert top1 == pytest.approx(100 / 3) and top2 == pytest.approx(200 / 3)


class TokenEncoder(nn.Module):
    """Stand-in encoder: tokens [N, 1 + 4, 3] from the image, counting its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        patches = x.flatten(2).unflatten(2, (4, -1)).mean(-1).transpose(1, 2)  # [N, 4, 3]
        cls = x.amax(dim=(2, 3))[:, None]
        return torch.cat([cls, patches], dim=1)


def image_set(n: int = 10) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    return TensorDataset(imgs, torch.arange(n) % 3)


def test_extract_features_pools_and_normalises():
    enc, data = TokenEncoder(), image_set()
    mean, std = (0.5,) * 3, (0.25,) * 3
    f_mean, y = extract_features(enc, data, torch.device("cpu"), mean, std, "mean", batch_size=4)
    f_cls, _ = extract_features(enc, data, torch.device("cpu"), mean, std, "cls", batch_size=4)
    raw, _ = extract_features(enc, data, torch.device("cpu"), mean, std, "mean", 4, 0, False)
    assert f_mean.shape == (10, 3) and torch.equal(y, torch.arange(10) % 3)
    torch.testing.assert_close(f_mean.norm(dim=1), torch.ones(10))
    torch.testing.assert_close(F.normalize(raw, dim=1), f_mean)
    assert not torch.allclose(f_mean, f_cls)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(10))


def test_feature_cache_is_written_once_and_reused(tmp_path):
    enc, data = TokenEncoder(), image_set()
    args = (torch.device("cpu"), (0.5,) * 3, (0.25,) * 3, "mean", 4, 0)
    cache = feature_cache_file(tmp_path, "weights+data", "train")
    first = cached_features(enc, data, *args, cache)
    calls = enc.calls
    assert cache.is_file() and calls > 0
    second = cached_features(enc, data, *args, cache)
    assert enc.calls == calls  # read back, not recomputed
    torch.testing.assert_close(second, first)
    # another key is another file; None switches the cache off
    assert feature_cache_file(tmp_path, "other", "train") != cache
    assert feature_cache_file(None, "weights+data", "train") is None
    cached_features(enc, data, *args, None)
    assert enc.calls > calls and len(list(tmp_path.iterdir())) == 1


def test_eval_crop_pct_crops_the_centre():
    img = Image.new("RGB", (32, 32), (255, 0, 0))
    for x in range(32):
        img.putpixel((x, 0), (0, 0, 255))  # a blue top row: visible without a centre crop
    full, cropped = eval_transform(32)(img), eval_transform(32, crop_pct=0.875)(img)
    assert full.shape == cropped.shape == (3, 32, 32)
    assert full[2, 0].float().mean() > 200 and cropped[2, 0].float().mean() < 50
