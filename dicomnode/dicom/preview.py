"""PNG previews: an axial and a coronal view, SEG outlines on the CT, or PET fused on CT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

__all__ = ["seg_preview", "window"]


def window(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``low..high`` to 0..255 (uint8)."""
    return (np.clip((values - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def _resize(img: np.ndarray, row_mm: float, col_mm: float) -> Image.Image:
    h, w = img.shape[:2]
    scale = row_mm / col_mm
    return Image.fromarray(img).resize((w, max(1, round(h * scale))), Image.Resampling.NEAREST)


def seg_preview(
    ct: np.ndarray, spacing: tuple[float, float, float], masks: np.ndarray,
    colors: list[tuple[int, int, int]], out: Path, *, low: float = -1000, high: float = 400,
) -> list[Path]:
    """Write ``<out>-axial.png`` and ``<out>-coronal.png`` with segment outlines.

    ``ct`` is (slices, rows, cols); ``masks`` (slices, rows, cols, segments). The axial view is
    the slice with the most segmented voxels, the coronal view the middle row. Slices are
    sorted inferior to superior, so the coronal view is flipped to show the head at the top.
    """
    k = int(np.argmax(masks.reshape(masks.shape[0], -1).sum(axis=1)))
    i = ct.shape[1] // 2
    views = {
        "axial": (ct[k], masks[k], spacing[1], spacing[2]),
        "coronal": (ct[::-1, i, :], masks[::-1, i, :, :], spacing[0], spacing[2]),
    }
    paths = []
    for name, (img, m, row_mm, col_mm) in views.items():
        rgb = np.repeat(window(img, low, high)[..., None], 3, axis=-1)
        for s, color in enumerate(colors):
            edge = m[..., s] & ~ndi.binary_erosion(m[..., s])
            rgb[edge] = color
        path = out.with_name(f"{out.name}-{name}.png")
        _resize(rgb, row_mm, col_mm).save(path)
        paths.append(path)
    return paths
