import math

import torch
import torch.nn.functional as F

from cmae.models.losses import info_nce, masked_pixel_loss


def info_nce_loop(q, k, tau):
    """Hand-written reference: per-sample -log softmax of the positive, mean, times 2 tau."""
    total = 0.0
    for i in range(q.shape[0]):
        qi = q[i] / q[i].norm()
        logits = [float(qi @ (k[j] / k[j].norm())) / tau for j in range(k.shape[0])]
        m = max(logits)
        lse = m + math.log(sum(math.exp(v - m) for v in logits))
        total += lse - logits[i]
    return 2 * tau * total / q.shape[0]


def test_info_nce_matches_loop_reference():
    torch.manual_seed(0)
    q, k = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    for tau in (0.07, 0.2, 1.0):
        assert math.isclose(info_nce(q, k, tau).item(), info_nce_loop(q, k, tau), rel_tol=1e-5)


def test_info_nce_equal_keys_gives_2tau_log_n():
    for n in (8, 64):
        q = torch.randn(n, 16)
        k = torch.ones(n, 16)
        assert math.isclose(info_nce(q, k, 0.07).item(), 2 * 0.07 * math.log(n), rel_tol=1e-5)


def test_info_nce_no_gradient_to_keys():
    q = torch.randn(4, 8, requires_grad=True)
    k = torch.randn(4, 8, requires_grad=True)
    info_nce(q, k, 0.07).backward()
    assert q.grad is not None and k.grad is None


def test_info_nce_with_explicit_global_keys_and_offset():
    torch.manual_seed(0)
    q, keys = torch.randn(3, 8), torch.randn(6, 8)
    # rank 1 of 2: its own keys are keys[3:6]
    got = info_nce(q, keys[3:], 0.1, keys=keys, offset=3)
    logits = F.normalize(q, dim=1) @ F.normalize(keys, dim=1).t() / 0.1
    want = 2 * 0.1 * F.cross_entropy(logits, torch.arange(3, 6))
    assert torch.allclose(got, want)


def test_pixel_loss_ignores_visible_patches():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 16, 12), torch.randn(2, 16, 12)
    mask = torch.zeros(2, 16)
    mask[:, ::2] = 1
    base = masked_pixel_loss(pred, target, mask)
    pred2 = pred.clone()
    pred2[:, 1::2] += 100.0  # visible positions only
    assert torch.equal(masked_pixel_loss(pred2, target, mask), base)
    pred2[:, 0] += 1.0  # a masked position
    assert not torch.equal(masked_pixel_loss(pred2, target, mask), base)


def test_pixel_loss_norm_pix_reference():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 6), torch.randn(2, 4, 6) * 3 + 1
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])
    mean = target.mean(-1, keepdim=True)
    var = target.var(-1, unbiased=True, keepdim=True)
    t = (target - mean) / torch.sqrt(var + 1e-6)
    per = ((pred - t) ** 2).mean(-1)
    want = (per * mask).sum() / mask.sum()
    assert torch.allclose(masked_pixel_loss(pred, target, mask, norm_pix=True), want)
    per_raw = ((pred - target) ** 2).mean(-1)
    want_raw = (per_raw * mask).sum() / mask.sum()
    assert torch.allclose(masked_pixel_loss(pred, target, mask, norm_pix=False), want_raw)
