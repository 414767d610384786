"""Middle-fusion U-Net for FDG PET/CT lesion segmentation (METHODS.md: "Domain-Adaptive PET/CT
Tumor Lesion Segmentation Networks through Effective Training Methods").

* one encoder per modality (CT, PET), each of five stages; a stage is two 3x3x3 convolutions
  with Instance Norm and SELU, the first of stages 2-5 with stride 2;
* the two encoders' features are concatenated at every skip and at the bottleneck, and one
  decoder (transposed-convolution upsampling, two convolutions per stage) reads them;
* a 1x1x1 convolution to one logit per voxel (lesion / not).

The paper's widths are [32, 32, 64, 128, 256]; ``channels`` sets them (the shipped CPU-trained
weights use half of each, see the model's manifest). torch is imported here only.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MiddleFusionUNet"]


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.InstanceNorm3d(cout, affine=True),
        nn.SELU(inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1), nn.InstanceNorm3d(cout, affine=True),
        nn.SELU(inplace=True))


class _Encoder(nn.Module):
    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        stages, cin = [], 1
        for i, c in enumerate(channels):
            stages.append(_block(cin, c, 1 if i == 0 else 2))
            cin = c
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


class MiddleFusionUNet(nn.Module):
    """(batch, 2, z, y, x) input, channel 0 CT in [0, 1], channel 1 SUV scaled -> logits
    (batch, 1, z, y, x). Patch edges must be divisible by 2 ** (stages - 1)."""

    def __init__(self, channels: tuple[int, ...] | list[int] = (32, 32, 64, 128, 256)) -> None:
        super().__init__()
        ch = tuple(int(c) for c in channels)
        self.ct, self.pet = _Encoder(ch), _Encoder(ch)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        below = 2 * ch[-1]  # the fused bottleneck
        for c in reversed(ch[:-1]):
            self.up.append(nn.ConvTranspose3d(below, c, 2, stride=2))
            self.dec.append(_block(c + 2 * c, c, 1))  # upsampled + both encoders' skips
            below = c
        self.head = nn.Conv3d(ch[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        skips_ct, skips_pet = self.ct(x[:, :1]), self.pet(x[:, 1:2])
        y = torch.cat([skips_ct[-1], skips_pet[-1]], dim=1)
        for i, (up, dec) in enumerate(zip(self.up, self.dec, strict=True)):
            level = len(skips_ct) - 2 - i
            y = dec(torch.cat([up(y), skips_ct[level], skips_pet[level]], dim=1))
        return self.head(y)  # type: ignore[no-any-return]
