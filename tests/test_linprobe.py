import pytest
import torch

from cmae.eval.linprobe import ProbeHeads, evaluate_heads, feature_batches, lars, train_heads


def separable(n: int = 256, dim: int = 8, num_classes: int = 4, seed: int = 0):
    """Linearly separable toy problem with a margin: the label is the argmax of a fixed linear
    map, points near a decision boundary are left out."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, num_classes, generator=torch.Generator().manual_seed(99))
    x = torch.randn(4 * n, dim, generator=g)
    top2 = (x @ w).topk(2, dim=1).values
    x = x[top2[:, 0] - top2[:, 1] > 1.0][:n]
    return x * 3 + 1, (x @ w).argmax(dim=1)  # offset and scale: BatchNorm's job


def fit(x, y, lrs, optimizer="sgd", epochs=30, batch_size=32, seed=0):
    torch.manual_seed(seed)
    heads = ProbeHeads(x.shape[1], int(y.max()) + 1, len(lrs))
    batches = feature_batches(x, y, batch_size, torch.Generator().manual_seed(seed))
    losses = train_heads(heads, batches, len(x) // batch_size, lrs, epochs, 2, optimizer)
    return heads, losses


def test_linear_probe_learns_a_separable_problem():
    x, y = separable()
    xv, yv = separable(seed=1)
    heads, losses = fit(x, y, lrs=[1e-4, 0.5])
    (slow1, _), (fast1, fast5) = evaluate_heads(heads, xv, yv)
    assert evaluate_heads(heads, x, y)[1][0] == 100.0
    assert fast1 >= 98.0 and fast5 == 100.0
    assert slow1 < fast1 and losses[1] < losses[0]  # the heads really use their own lrs


def test_heads_train_independently():
    # a head trained next to others equals the same head trained alone: one pass, many lrs
    x, y = separable()
    together, _ = fit(x, y, lrs=[0.05, 10.0, 1e-3], epochs=3)
    alone = ProbeHeads(x.shape[1], 4, 1)
    torch.manual_seed(0)
    ref = ProbeHeads(x.shape[1], 4, 3)  # same init draws as `together`
    alone.heads[0].load_state_dict(ref.heads[0].state_dict())
    batches = feature_batches(x, y, 32, torch.Generator().manual_seed(0))
    train_heads(alone, batches, len(x) // 32, [0.05], 3, 2, "sgd")
    torch.testing.assert_close(together.heads[0].weight, alone.heads[0].weight)


def test_optimizer_flag_changes_training():
    x, y = separable()
    sgd, _ = fit(x, y, lrs=[0.1], optimizer="sgd", epochs=2)
    lars, _ = fit(x, y, lrs=[0.1], optimizer="lars", epochs=2)
    assert not torch.allclose(sgd.heads[0].weight, lars.heads[0].weight)
    with pytest.raises(ValueError, match="optimizer"):
        fit(x, y, lrs=[0.1], optimizer="adam", epochs=1)


def test_lars_step_matches_hand_computation():
    torch.manual_seed(0)
    w = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    gw, gb = torch.randn(3, 4), torch.randn(3)
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = lars([{"params": [w, b], "lr": 0.5}])
    for _ in range(2):
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
    # reference: two steps of MAE's LARS by hand, no weight decay as in the probe (matrix: trust
    # ratio 0.001 * |w| / |g|; bias: plain momentum SGD)
    rw, rb, mw, mb = w0.clone(), b0.clone(), torch.zeros_like(w0), torch.zeros_like(b0)
    for _ in range(2):
        u = gw * (0.001 * rw.norm() / gw.norm())
        mw = 0.9 * mw + u
        rw = rw - 0.5 * mw
        mb = 0.9 * mb + gb
        rb = rb - 0.5 * mb
    torch.testing.assert_close(w.detach(), rw)
    torch.testing.assert_close(b.detach(), rb)


def test_feature_batches_drop_the_partial_batch_and_shuffle():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    epoch = feature_batches(x, y, 4, torch.Generator().manual_seed(0))
    first, second = list(epoch()), list(epoch())
    assert [len(b[1]) for b in first] == [4, 4]
    assert not torch.equal(first[0][1], second[0][1])
    for xb, yb in first:
        assert torch.equal(xb[:, 0].long(), yb)


def test_probe_heads_normalise_without_affine():
    heads = ProbeHeads(5, 3, 2)
    assert not any(p.requires_grad for p in heads.norm.parameters())
    assert len(list(heads.parameters())) == 4  # two Linear layers, no BatchNorm weights
    out = heads(torch.randn(8, 5))
    assert out.shape == (2, 8, 3)


def test_holdout_split_is_stratified_disjoint_and_seeded():
    from cmae.eval.linprobe import holdout_split

    y = torch.tensor([0] * 50 + [1] * 20 + [2] * 3 + [3])
    fit, held = holdout_split(y, 0.2, seed=0)
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(len(y)))  # a partition
    counts = torch.bincount(y[held], minlength=4).tolist()
    assert counts == [10, 4, 1, 0]  # per class, rounded; a class of one stays in fit
    again, other = holdout_split(y, 0.2, seed=0), holdout_split(y, 0.2, seed=1)
    assert torch.equal(again[1], held) and not torch.equal(other[1], held)
