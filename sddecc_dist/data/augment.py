"""Image augmentation on batches of tensors, with kornia: small random affine warps (shift,
rotation, scale) of the kind DEC-DA and DynAE pretrain with. Images in, images out; the
trainer decides where they are used."""

from __future__ import annotations

import kornia.augmentation as K
import torch

__all__ = ["RandomAffineAugment"]


class RandomAffineAugment:
    """Each image of a (B, C, H, W) batch warped by its own random affine map: rotation in
    ±`degrees`, shift in ±`translate` of the size, scale in [1 - `scale`, 1 + `scale`]. Draws
    from torch's global generator (the run's seed)."""

    def __init__(self, degrees: float, translate: float, scale: float):
        self.transform = K.RandomAffine(degrees=degrees, translate=(translate, translate),
                                        scale=(1.0 - scale, 1.0 + scale), padding_mode="zeros", p=1.0)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.transform(images).clamp(0.0, 1.0)
