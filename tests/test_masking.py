import pytest
import torch

from cmae.models.cmae import patchify, random_masking, unpatchify


@pytest.mark.parametrize(
    "grid,ratio,block,keep",
    [(14, 0.65, 2, 68), (14, 0.75, 1, 49), (8, 0.65, 2, 20), (8, 0.75, 1, 16)],
)
def test_mask_counts(grid, ratio, block, keep):
    ids_keep, ids_restore, mask = random_masking(5, grid, ratio, block)
    assert ids_keep.shape == (5, keep)
    assert mask.shape == (5, grid * grid)
    assert (mask.sum(1) == grid * grid - keep).all()
    # the kept ids are exactly the visible (mask 0) positions
    for i in range(5):
        assert set(ids_keep[i].tolist()) == set((mask[i] == 0).nonzero().flatten().tolist())


def test_reference_block_mask_is_68_visible_128_masked():
    _, _, mask = random_masking(3, 14, 0.65, 2)
    assert (mask.sum(1) == 128).all()


def test_block_structure():
    grid, block = 8, 2
    _, _, mask = random_masking(16, grid, 0.65, block)
    m = mask.view(16, grid // block, block, grid // block, block)
    # each 2x2 block is entirely masked or entirely visible
    per_block = m.sum(dim=(2, 4))
    assert ((per_block == 0) | (per_block == block * block)).all()


def test_ids_restore_inverts_shuffle():
    n, grid = 4, 6
    ids_keep, ids_restore, mask = random_masking(n, grid, 0.5, 1)
    x = torch.randn(n, grid * grid, 3)
    kept = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, 3))
    rest = torch.zeros(n, grid * grid - kept.shape[1], 3)
    unshuffled = torch.gather(
        torch.cat([kept, rest], 1), 1, ids_restore[..., None].expand(-1, -1, 3)
    )
    vis = (mask == 0)[..., None]
    assert torch.equal(unshuffled * vis, x * vis)


def test_masks_differ_across_samples_and_calls():
    a = random_masking(8, 8, 0.75, 1)[2]
    b = random_masking(8, 8, 0.75, 1)[2]
    assert not torch.equal(a, b)
    assert not all(torch.equal(a[0], a[i]) for i in range(1, 8))


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 16, 16)
    p = patchify(x, 4)
    assert p.shape == (2, 16, 48)
    assert torch.equal(unpatchify(p, 4), x)
    # patch 0 is the top-left 4x4 window, channels last
    assert torch.equal(p[0, 0].view(4, 4, 3), x[0, :, :4, :4].permute(1, 2, 0))
