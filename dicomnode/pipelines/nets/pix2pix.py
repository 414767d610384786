"""The 3-D Pix2Pix networks of ``ct2pet``: a two-level U-Net generator and a PatchGAN
discriminator on (CT, PET) pairs (METHODS.md 3)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Discriminator", "Generator"]


def _block(i: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(i, o, 3, padding=1), nn.InstanceNorm3d(o), nn.LeakyReLU(0.2),
                         nn.Conv3d(o, o, 3, padding=1), nn.InstanceNorm3d(o), nn.LeakyReLU(0.2))


class Generator(nn.Module):
    """A 3-D U-Net (two levels) mapping CT [0, 1] to PET SUV / 20 in [0, 1]."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.e1, self.e2, self.mid = _block(1, w), _block(w, 2 * w), _block(2 * w, 4 * w)
        self.u2, self.d2 = nn.ConvTranspose3d(4 * w, 2 * w, 2, 2), _block(4 * w, 2 * w)
        self.u1, self.d1 = nn.ConvTranspose3d(2 * w, w, 2, 2), _block(2 * w, w)
        self.out = nn.Conv3d(w, 1, 1)
        with torch.no_grad():  # start near SUV 1 (sigmoid(-3) * 20), not SUV 10
            nn.init.constant_(self.out.bias, -3.0)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        e1 = self.e1(x)
        e2 = self.e2(nn.functional.max_pool3d(e1, 2))
        m = self.mid(nn.functional.max_pool3d(e2, 2))
        d2 = self.d2(torch.cat([self.u2(m), e2], 1))
        d1 = self.d1(torch.cat([self.u1(d2), e1], 1))
        return torch.sigmoid(self.out(d1))


def Discriminator(width: int = 16) -> nn.Sequential:  # noqa: N802 - a network factory
    """A 3-D PatchGAN on (CT, PET) pairs."""
    return nn.Sequential(
        nn.Conv3d(2, width, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv3d(width, 2 * width, 4, 2, 1), nn.InstanceNorm3d(2 * width), nn.LeakyReLU(0.2),
        nn.Conv3d(2 * width, 1, 3, 1, 1))
