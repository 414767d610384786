"""SR4ZCT: self-supervised through-plane resolution enhancement (MLMI 2023; METHODS.md 4.2).

The network is trained on the volume's own axial images: each is degraded vertically (and,
rotated by 90 degrees, horizontally) to the through-plane slice thickness r_z and overlap o_z
(F_down), brought back to the in-plane pixel grid (F_up), and the network learns to undo that.
It is then applied to the coronal and sagittal images, upsampled along z to the in-plane pixel
size, and the two results are averaged. Finally the volume is resampled to the target slice
thickness (default: the in-plane pixel size, no overlap).

F_down and F_up are linear maps along one axis, built here as matrices:

* input samples of size r0 with overlap o0 cover L = r0 + (n - 1)(r0 - o0);
* n' = 1 + floor((L - r) / (r - o)) output samples, centres r/2 + k (r - o);
* each output value averages 9 linearly interpolated points across its thickness r (the
  paper's code averages only with overlap; averaging whenever r > r0 models thickness better,
  METHODS.md [assume]); F_up interpolates linearly back to the input centres.

Pure numpy here; torch is imported only in :func:`train` and :func:`apply`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SRBudget",
    "apply_axis",
    "cpu_has_bf16",
    "degrade_matrix",
    "n_samples",
    "super_resolve",
    "training_pairs",
    "upsample_matrix",
]


def n_samples(length: float, r: float, o: float) -> int:
    """n' = 1 + floor((L - r) / (r - o)): samples of thickness r, overlap o, in length L."""
    if r <= o:
        raise ValueError("overlap must be smaller than the thickness")
    return 1 + math.floor((length - r) / (r - o) + 1e-9)


def _centres(n: int, r: float, o: float) -> np.ndarray:
    return r / 2 + np.arange(n) * (r - o)


def _interp_matrix(x_new: np.ndarray, x_old: np.ndarray) -> np.ndarray:
    """Rows: linear interpolation (clamped at the ends) of samples at x_old onto x_new."""
    m = np.zeros((len(x_new), len(x_old)))
    if len(x_old) == 1:
        m[:, 0] = 1
        return m
    pos = np.clip(np.interp(x_new, x_old, np.arange(len(x_old))), 0, len(x_old) - 1)
    lo = np.minimum(np.floor(pos).astype(int), len(x_old) - 2)
    w = pos - lo
    m[np.arange(len(x_new)), lo] = 1 - w
    m[np.arange(len(x_new)), lo + 1] += w
    return m


def degrade_matrix(n: int, r0: float, o0: float, r: float, o: float) -> np.ndarray:
    """F_down as an (n', n) matrix: n samples of (r0, o0) to thickness r with overlap o."""
    length = r0 + (n - 1) * (r0 - o0)
    x_old = _centres(n, r0, o0)
    x_new = _centres(n_samples(length, r, o), r, o)
    if r > r0 + 1e-9:
        offsets = np.linspace(-r / 2, r / 2, 11)[1:-1]  # 9 points inside the thickness
        return np.mean([_interp_matrix(x_new + d, x_old) for d in offsets], axis=0)
    return _interp_matrix(x_new, x_old)


def upsample_matrix(n: int, r0: float, o0: float, r: float, o: float) -> np.ndarray:
    """F_up as an (n, n') matrix: back from the degraded samples to the n input centres."""
    length = r0 + (n - 1) * (r0 - o0)
    x_old = _centres(n, r0, o0)
    x_new = _centres(n_samples(length, r, o), r, o)
    return _interp_matrix(x_old, x_new)


def apply_axis(matrix: np.ndarray, array: np.ndarray, axis: int) -> np.ndarray:
    """Apply a 1-D linear map along ``axis``."""
    moved = np.moveaxis(array, axis, 0)
    out = np.tensordot(matrix, moved, axes=(1, 0))
    return np.moveaxis(out, 0, axis).astype(np.float32)


def training_pairs(axial: np.ndarray, *, r_xy: float, r_z: float, o_z: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets from axial images (Z, H, W), both on the in-plane grid.

    Input: F_up(F_down(a)) to (r_z, o_z) vertically, and the same horizontally rotated by 90
    degrees so that the degradation is always vertical; target: the axial image itself (the
    network restores the in-plane resolution; the target thickness is applied once, at the
    end). Returns (2Z, H, W) arrays (Z pairs for non-square images).
    """
    h, w = axial.shape[1:]
    d_v = upsample_matrix(h, r_xy, 0, r_z, o_z) @ degrade_matrix(h, r_xy, 0, r_z, o_z)
    vin = apply_axis(d_v, axial, 1)
    if h != w:
        return vin, axial.astype(np.float32)
    d_h = upsample_matrix(w, r_xy, 0, r_z, o_z) @ degrade_matrix(w, r_xy, 0, r_z, o_z)
    hin = apply_axis(d_h, axial, 2)
    hin_r, axial_r = np.rot90(hin, 1, axes=(1, 2)), np.rot90(axial, 1, axes=(1, 2))
    return (np.concatenate([vin, hin_r]).astype(np.float32),
            np.concatenate([axial, axial_r]).astype(np.float32))


@dataclass(frozen=True, kw_only=True)
class SRBudget:
    """Network size and training budget.

    The budget is ``iterations``, so a series gets the same network on a busy machine as on
    an idle one; ``max_train_seconds`` is only a safety stop, and when it cuts training short
    the statistics (and the output's description) say so.
    """

    width: int = 16
    depth: int = 6
    patch: int = 64
    batch: int = 16
    iterations: int = 1000
    max_train_seconds: float = 1800.0
    lr: float = 1e-3
    seed: int = 0


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where autocast to
    bfloat16 makes the convolutions about 4 x faster; elsewhere it would be slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _network(budget: SRBudget) -> Any:
    import torch
    from torch import nn

    class DilatedResNet(nn.Module):
        """A small MS-D-like 2-D net: dilated 3x3 convolutions, global residual."""

        def __init__(self) -> None:
            super().__init__()
            # in-place ReLUs: no extra pass over each activation (35 MB per 1070 x 512
            # image at width 16); applying a series took 30 % less time on a 2-core AVX2 CPU
            layers: list[nn.Module] = [nn.Conv2d(1, budget.width, 3, padding=1),
                                       nn.ReLU(inplace=True)]
            for i in range(budget.depth):
                d = (1, 2, 4, 8, 4, 2, 1, 2, 4, 8)[i % 10]
                layers += [nn.Conv2d(budget.width, budget.width, 3, padding=d, dilation=d),
                           nn.ReLU(inplace=True)]
            layers.append(nn.Conv2d(budget.width, 1, 3, padding=1))
            self.body = nn.Sequential(*layers)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # the residual may come in bfloat16 (autocast); the sum stays float32, so the
            # output keeps the input's precision (bfloat16 alone: about 16 HU steps)
            return x + self.body(x).float()

    torch.manual_seed(budget.seed)
    return DilatedResNet()


def train(inputs: np.ndarray, targets: np.ndarray, *, budget: SRBudget, device: str = "cpu",
          progress: Any = None) -> tuple[Any, dict[str, float]]:
    """Train on (N, H, W) pairs in [0, 1] with L2 loss and Adam; returns (net, stats)."""
    import torch

    net = _network(budget).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=budget.lr)
    rng = np.random.default_rng(budget.seed)
    n, h, w = inputs.shape
    p = min(budget.patch, h, w)
    t0 = time.perf_counter()
    losses = []
    it = 0
    while it < budget.iterations and time.perf_counter() - t0 < budget.max_train_seconds:
        idx = rng.integers(0, n, budget.batch)
        ys = rng.integers(0, h - p + 1, budget.batch)
        xs = rng.integers(0, w - p + 1, budget.batch)
        xb = np.stack([inputs[i, y:y + p, x:x + p] for i, y, x in zip(idx, ys, xs, strict=True)])
        yb = np.stack([targets[i, y:y + p, x:x + p] for i, y, x in zip(idx, ys, xs, strict=True)])
        xt = torch.from_numpy(np.ascontiguousarray(xb[:, None])).to(device)
        yt = torch.from_numpy(np.ascontiguousarray(yb[:, None])).to(device)
        loss = torch.mean((net(xt) - yt) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        it += 1
        if progress and it % 20 == 0:
            progress(it / budget.iterations)
    first = float(np.mean(losses[:20])) if losses else float("nan")
    last = float(np.mean(losses[-20:])) if losses else float("nan")
    return net, {"iterations": it, "iterations_planned": budget.iterations,
                 "cut_by_time_limit": float(it < budget.iterations),
                 "train_s": time.perf_counter() - t0, "loss_first": first, "loss_last": last}


def apply(net: Any, images: np.ndarray, *, device: str = "cpu", batch: int = 16,
          bf16: bool | None = None) -> np.ndarray:
    """Run the net on (N, H, W) images in [0, 1]: channels-last, in batches, the convolutions
    in bfloat16 where the device computes it natively (``bf16=None``: CUDA, or a CPU with
    :func:`cpu_has_bf16`), the residual sum in float32."""
    import torch

    out = np.empty_like(images, dtype=np.float32)
    net.eval()
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if bf16 is None:
        bf16 = kind == "cuda" or cpu_has_bf16()
    net = net.to(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device_type=kind, dtype=torch.bfloat16,
                                                enabled=bf16):
        for s in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch, None])).to(device)
            x = x.contiguous(memory_format=torch.channels_last)
            out[s:s + batch] = net(x).float()[:, 0].cpu().numpy()
    return out


def super_resolve(
    volume: np.ndarray, *, r_xy: float, r_z: float, o_z: float, r_target: float | None = None,
    budget: SRBudget | None = None, device: str = "cpu", progress: Any = None,
    bf16: bool | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """SR4ZCT on a (Z, H, W) HU volume with slices of thickness r_z, spacing r_z - o_z.

    Returns the volume on the target grid (thickness r_target, no overlap, first slice
    centred r_target / 2 from the start of the covered length) and run statistics.
    """
    budget = budget or SRBudget()
    r_target = r_target or r_xy
    lo, hi = -1024.0, 3071.0
    norm = (np.clip(volume, lo, hi) - lo) / (hi - lo)
    t0 = time.perf_counter()
    inputs, targets = training_pairs(norm, r_xy=r_xy, r_z=r_z, o_z=o_z)
    net, stats = train(inputs, targets, budget=budget, device=device,
                       progress=(lambda f: progress(0.6 * f)) if progress else None)
    # through-plane: thick slices -> the in-plane pixel grid along z
    z = volume.shape[0]
    up = upsample_matrix_to(z, r_z, o_z, r_xy)
    fine = apply_axis(up, norm, 0)  # (Z_fine, H, W)
    cor = np.moveaxis(fine, 1, 0)  # (H, Z_fine, W): coronal images, z vertical
    sag = np.moveaxis(fine, 2, 0)  # (W, Z_fine, H): sagittal images
    t1 = time.perf_counter()
    cor_out = np.moveaxis(apply(net, cor, device=device, bf16=bf16), 0, 1)
    if progress:
        progress(0.8)
    sag_out = np.moveaxis(apply(net, sag, device=device, bf16=bf16), 0, 2)
    fused = (cor_out + sag_out) / 2
    stats["apply_s"] = time.perf_counter() - t1
    if abs(r_target - r_xy) > 1e-6:
        fused = apply_axis(degrade_matrix(fused.shape[0], r_xy, 0, r_target, 0), fused, 0)
    stats["total_s"] = time.perf_counter() - t0
    return (fused * (hi - lo) + lo).astype(np.float32), stats


def upsample_matrix_to(n: int, r: float, o: float, r_fine: float) -> np.ndarray:
    """Linear map from n samples of thickness r / overlap o to the fine grid of size r_fine
    covering the same length (fine centres r_fine / 2 + k r_fine)."""
    length = r + (n - 1) * (r - o)
    x_old = _centres(n, r, o)
    x_new = _centres(n_samples(length, r_fine, 0), r_fine, 0)
    return _interp_matrix(x_new, x_old)
