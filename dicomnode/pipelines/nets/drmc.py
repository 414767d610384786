"""DRMC: a generalist model with dynamic routing for multi-center PET synthesis (METHODS.md 1).

Low-dose PET patch (1 channel) -> full-dose estimate:

* a 3x3x3 convolution stem (1 -> C);
* N dynamic routing blocks; each: LayerNorm -> a bank of M attention experts -> ``+ beta *
  skip``; LayerNorm -> a bank of M FFN experts -> ``+ gamma * skip``;
* an attention expert: 1x1x1 conv to q, k, v; global channel attention with linear
  complexity (softmax(q k^T * temperature) over channels, per head), then a depth-wise 3x3x3
  convolution and a 1x1x1 projection;
* an FFN expert: 1x1x1 conv C -> rC, GELU, 1x1x1 conv rC -> C;
* routing (Eq. 1): ``W = ReLU(MLP([GAP(X), H]))``; the MLP's hidden layer is the new H, carried
  from bank to bank through the whole network (att_1 -> ffn_1 -> att_2 -> ...); ReLU makes W
  sparse and non-negative; the bank's output is ``sum_m W_m E_m(X)`` (Eq. 2);
* a 3x3x3 convolution (C -> 1) plus the input (global residual).

Loss: Charbonnier, ``mean(sqrt((y - y_hat)^2 + eps^2))`` with eps = 1e-3 (Eq. 3).

One deviation, a setting: ``normalize_qk`` (default True) L2-normalises q and k as Restormer
does; the authors' code does not, and without it the channel products over a 32^3 patch
saturate the softmax in our short CPU trainings. torch is imported here only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DRMC", "DRMCConfig", "charbonnier"]


@dataclass(frozen=True, kw_only=True)
class DRMCConfig:
    """Sizes: the paper's are channels 64, experts 3, blocks 5, heads 16, 64^3 patches."""

    channels: int = 64
    experts: int = 3
    blocks: int = 5
    heads: int = 16
    ffn_ratio: int = 2
    hidden: int = 16
    normalize_qk: bool = True

    def as_dict(self) -> dict[str, Any]:
        """For a model manifest."""
        return asdict(self)


def charbonnier(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """Charbonnier loss, per voxel then averaged (equal inputs give exactly eps); with
    ``weight``, a weighted average (same shape as ``pred``)."""
    per_voxel = torch.sqrt((pred - target) ** 2 + eps * eps)
    if weight is None:
        return torch.mean(per_voxel)
    return torch.sum(per_voxel * weight) / torch.sum(weight)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, D, H, W) tensor."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


class AttentionExpert(nn.Module):
    """Transposed (channel) attention, then a depth-wise conv and a projection."""

    def __init__(self, cfg: DRMCConfig) -> None:
        super().__init__()
        c = cfg.channels
        if c % cfg.heads:
            raise ValueError(f"channels ({c}) must be a multiple of heads ({cfg.heads})")
        self.heads = cfg.heads
        self.normalize = cfg.normalize_qk
        self.qkv = nn.Conv3d(c, 3 * c, 1, bias=False)
        self.temperature = nn.Parameter(torch.ones(cfg.heads, 1, 1))
        self.dwconv = nn.Conv3d(c, c, 3, padding=1, groups=c)
        self.proj = nn.Conv3d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, c, d, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b, 3, self.heads, c // self.heads, d * h * w).unbind(1)
        if self.normalize:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.temperature, dim=-1)
        out = (attn @ v).reshape(b, c, d, h, w)
        return self.proj(self.dwconv(out))


class FFNExpert(nn.Module):
    """1x1x1 conv, GELU, 1x1x1 conv."""

    def __init__(self, cfg: DRMCConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.net = nn.Sequential(nn.Conv3d(c, cfg.ffn_ratio * c, 1), nn.GELU(),
                                 nn.Conv3d(cfg.ffn_ratio * c, c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.net(x)


class ExpertBank(nn.Module):
    """M experts mixed by ReLU routing weights computed from [GAP(X), H]."""

    def __init__(self, cfg: DRMCConfig, expert: type[nn.Module]) -> None:
        super().__init__()
        self.experts = nn.ModuleList(expert(cfg) for _ in range(cfg.experts))
        self.route_hidden = nn.Conv3d(cfg.channels + cfg.hidden, cfg.hidden, 1)
        self.route_out = nn.Conv3d(cfg.hidden, cfg.experts, 1)
        self.last_weights: torch.Tensor | None = None  # (B, M) of the last call, for tests

    def forward(self, x: torch.Tensor, hidden: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the mixed output and the new hidden state H."""
        gap = x.mean(dim=(2, 3, 4), keepdim=True)
        new_hidden = F.gelu(self.route_hidden(torch.cat([gap, hidden], dim=1)))
        weights = F.relu(self.route_out(new_hidden))  # (B, M, 1, 1, 1), sparse, >= 0
        self.last_weights = weights.detach().flatten(1)
        out = sum(weights[:, m:m + 1] * e(x) for m, e in enumerate(self.experts))
        return out, new_hidden  # type: ignore[return-value]


class RoutingBlock(nn.Module):
    """One dynamic routing block (attention bank, then FFN bank)."""

    def __init__(self, cfg: DRMCConfig) -> None:
        super().__init__()
        c = cfg.channels
        self.norm1, self.norm2 = ChannelLayerNorm(c), ChannelLayerNorm(c)
        self.att = ExpertBank(cfg, AttentionExpert)
        self.ffn = ExpertBank(cfg, FFNExpert)
        self.beta = nn.Parameter(torch.ones(1, c, 1, 1, 1))
        self.gamma = nn.Parameter(torch.ones(1, c, 1, 1, 1))

    def forward(self, x: torch.Tensor, hidden: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        out, hidden = self.att(self.norm1(x), hidden)
        x = out + self.beta * x
        out, hidden = self.ffn(self.norm2(x), hidden)
        return out + self.gamma * x, hidden


class DRMC(nn.Module):
    """The DRMC generator: stem, routing blocks, tail, global residual."""

    def __init__(self, cfg: DRMCConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or DRMCConfig()
        c = self.cfg.channels
        self.stem = nn.Conv3d(1, c, 3, padding=1)
        self.blocks = nn.ModuleList(RoutingBlock(self.cfg) for _ in range(self.cfg.blocks))
        self.tail = nn.Conv3d(c, 1, 3, padding=1)
        self.hidden0 = nn.Parameter(torch.ones(1, self.cfg.hidden, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        feats = self.stem(x)
        hidden = self.hidden0.expand(x.shape[0], -1, -1, -1, -1)
        for block in self.blocks:
            feats, hidden = block(feats, hidden)
        return self.tail(feats) + x

    def routing_weights(self) -> list[torch.Tensor]:
        """The routing weights of every bank from the last forward pass."""
        out: list[torch.Tensor] = []
        for blk in self.blocks:
            for bank in (blk.att, blk.ffn):
                weights = getattr(bank, "last_weights", None)
                if weights is not None:
                    out.append(weights)
        return out


def drmc_from_params(**params: Any) -> DRMC:
    """Build from a manifest's ``network.params`` (the registry calls ``class(**params)``)."""
    return DRMC(DRMCConfig(**params))
