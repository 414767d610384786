"""Sampling one series' grid onto another in the same patient space (CT onto the PET grid)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["resample_onto"]


def resample_onto(values: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray,
                  dst_shape: tuple[int, ...], *, order: int = 1, cval: float = 0.0
                  ) -> np.ndarray:
    """``values`` (on the grid of ``src_affine``) sampled at the voxel centres of another grid
    in the same patient space (trilinear by default; ``cval`` outside the source)."""
    to_src = np.linalg.inv(src_affine) @ dst_affine
    out = np.empty(dst_shape, np.float32)
    jj, ii = np.mgrid[0: dst_shape[1], 0: dst_shape[2]]
    for k in range(dst_shape[0]):
        idx = np.stack([np.full(jj.shape, k), jj, ii, np.ones(jj.shape)]).reshape(4, -1)
        src = (to_src @ idx)[:3]
        out[k] = ndi.map_coordinates(values, src, order=order, cval=cval).reshape(jj.shape)
    return out
