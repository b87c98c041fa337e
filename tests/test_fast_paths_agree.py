"""Speed settings of the training loop leave the maths alone (docs/PERFORMANCE.md)."""

import pytest
import torch

from cmae.data.views import normalize
from cmae.runtime.optim import param_groups
from cmae.train.pretrain import train_one_step


def views(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    raw = [torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g) for _ in "ot"]
    return [normalize(v, (0.5,) * 3, (0.25,) * 3) for v in raw]


def train(model, fused: bool, steps: int = 3) -> list[float]:
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95), fused=fused)
    losses = []
    for step in range(steps):
        torch.manual_seed(step)  # the same masks in both runs
        losses.append(train_one_step(model, opt, views(step), lr=1e-3, momentum=0.99).loss.item())
    return losses


def test_fused_adamw_trains_like_the_per_parameter_loop(tiny_model):
    loop, fused = tiny_model(), tiny_model()
    assert train(fused, fused=True) == pytest.approx(train(loop, fused=False), rel=1e-5)
    # weight matrices only: some biases have a gradient that is zero up to rounding (the key
    # bias of attention, the Linear bias before a BatchNorm), and Adam turns that noise into
    # steps of +-lr in either implementation
    for (name, a), b in zip(fused.named_parameters(), loop.parameters(), strict=True):
        if a.ndim >= 2:
            assert (a - b).norm() <= 1e-5 * b.norm(), name


def test_explicit_attention_kernel_trains_like_the_fused_one(tiny_model):
    from cmae.models.vit import set_fused_attention, use_fused_attention

    fused, explicit = tiny_model(), tiny_model()
    n = set_fused_attention(explicit, False)
    # every transformer block of the encoder, the target encoder and both decoders
    assert n == sum(1 for m in explicit.modules() if type(m).__name__ == "Attention") > 0
    assert not any(getattr(m, "fused_attn", False) for m in explicit.modules())
    # same weights, one step: only the kernels differ, so the loss and every weight matrix's
    # gradient agree to float32 rounding. Later steps' losses are not compared: Adam turns the
    # rounding differences of near-zero gradients into steps of +-lr (see above), by an amount
    # that depends on the CPU's kernels (third loss: 0.19 % apart on an AMD EPYC host, under
    # 0.1 % on an Intel one)
    a, b = train(fused, fused=True, steps=1), train(explicit, fused=True, steps=1)
    assert a == pytest.approx(b, rel=1e-5)
    grads = 0
    for (name, p), q in zip(fused.named_parameters(), explicit.parameters(), strict=True):
        if p.ndim >= 2 and p.grad is not None:
            assert (p.grad - q.grad).norm() <= 1e-4 * q.grad.norm() + 1e-8, name
            grads += 1
    assert grads > 0
    assert use_fused_attention("auto", torch.device("cpu")) is False
    assert use_fused_attention("auto", torch.device("cuda")) is True
    assert use_fused_attention("fused", torch.device("cpu")) is True
    with pytest.raises(ValueError, match="attention must be"):
        use_fused_attention("flash", torch.device("cpu"))
