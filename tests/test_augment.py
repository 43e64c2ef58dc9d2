"""The affine augmentation of pretraining batches."""

import torch

from sddecc_dist.data.augment import RandomAffineAugment


def test_no_warp_is_the_identity_and_warps_stay_images():
    x = torch.rand(6, 1, 16, 16)
    torch.testing.assert_close(RandomAffineAugment(0.0, 0.0, 0.0)(x), x, atol=1e-5, rtol=0)
    torch.manual_seed(0)
    warped = RandomAffineAugment(10.0, 0.1, 0.1)(x)
    assert warped.shape == x.shape and warped.min() >= 0 and warped.max() <= 1
    assert not torch.allclose(warped, x, atol=1e-3)  # each image moved


def test_a_pure_shift_moves_the_pixels():
    """translate only, a bright pixel: it moves by at most 10% of the size, and nothing is created."""
    x = torch.zeros(50, 1, 20, 20)
    x[:, 0, 10, 10] = 1.0
    torch.manual_seed(1)
    warped = RandomAffineAugment(0.0, 0.1, 0.0)(x)
    rows, cols = torch.meshgrid(torch.arange(20.0), torch.arange(20.0), indexing="ij")
    mass = warped[:, 0].sum((1, 2))
    centre_r = (warped[:, 0] * rows).sum((1, 2)) / mass
    centre_c = (warped[:, 0] * cols).sum((1, 2)) / mass
    assert (mass - 1).abs().max() < 0.05  # bilinear resampling keeps the mass
    assert ((centre_r - 10).abs() <= 2.01).all() and ((centre_c - 10).abs() <= 2.01).all()
    assert (centre_r - 10).abs().max() > 0.5  # some image moved
