"""``petct-percist``: the PERCIST-style liver-reference threshold, a third baseline for
``petct-lesions`` (Wahl et al. 2009: 1.5 x liver SUVmean + 2 x liver SD, in a 3 cm sphere in
the right lobe).

The liver is found on the CT resampled onto the PET grid, without a model: soft tissue
(20-100 HU after a 3-voxel mean) inside the body, on the patient's right, in the 20 cm below the
lowest voxel of the right lung; the largest connected part; the sphere's centre is its voxel
deepest inside it. If no part is deep enough to hold the 3 cm sphere (a chest CT that stops
above the liver, say), the threshold is the fixed ``FALLBACK_SUV`` and the output says so.
Either way the method text in the SEG and the report names the threshold and where it came
from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from dicomnode.dicom.volume import SeriesVolume
from dicomnode.dicom.write.common import OutputIdentity
from dicomnode.pipelines.base import JobContext, OutputFile
from dicomnode.pipelines.petct_lesions import CONNECT, _run

__all__ = ["FALLBACK_SUV", "LiverReference", "liver_reference", "run_percist"]

SPHERE_RADIUS_MM = 15.0
BELOW_LUNG_MM = 200.0
# 1.5 x 2.0 + 2 x 0.3: a typical FDG liver (SUVmean about 2, SD about 0.3) when none is found
FALLBACK_SUV = 3.6


@dataclass(frozen=True)
class LiverReference:
    """The threshold and where it came from (``centre``: PET voxel index, or None)."""

    threshold: float
    mean: float | None
    sd: float | None
    centre: tuple[int, int, int] | None

    def text(self) -> str:
        """The method as the SEG and the report name it (short: series descriptions hold 64
        characters)."""
        if self.centre is None:
            return f"PERCIST: no liver on CT, SUV >= {self.threshold:.2f}"
        return f"PERCIST: SUV >= {self.threshold:.2f}, liver {self.mean:.2f} SD {self.sd:.2f}"


def _coordinates(affine: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """The LPS coordinate ``axis`` (0 x: to the patient's left, 2 z: up) of every voxel."""
    k, i, j = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
    a = affine[axis]
    return (a[0] * k + a[1] * i + a[2] * j + a[3]).astype(np.float32)


def liver_reference(hu: np.ndarray, suv: np.ndarray, body: np.ndarray,
                    affine: np.ndarray) -> LiverReference:
    """The PERCIST threshold from ``suv`` in a 3 cm sphere in the liver found on ``hu`` (both
    on the PET grid, ``affine`` its voxel -> LPS map)."""
    spacing = np.array([np.linalg.norm(affine[:3, a]) for a in range(3)])
    x = _coordinates(affine, hu.shape, 0)
    z = _coordinates(affine, hu.shape, 2)
    centre_x = float(x[body].mean()) if body.any() else 0.0
    right = x < centre_x
    lungs = (hu < -400) & body & right
    lungs = ndi.binary_opening(lungs, iterations=1)
    found = None
    if lungs.any():
        floor = float(z[lungs].min())
        band = (z <= floor + 10.0) & (z >= floor - BELOW_LUNG_MM)
        smooth = ndi.uniform_filter(hu.astype(np.float32), size=3)
        soft = (smooth > 20) & (smooth < 100) & body & right & band
        labels, n = ndi.label(soft, structure=CONNECT)
        if n:
            sizes = ndi.sum(soft, labels, range(1, n + 1))
            liver = labels == int(np.argmax(sizes)) + 1
            depth = ndi.distance_transform_edt(liver, sampling=spacing)
            if float(depth.max()) >= SPHERE_RADIUS_MM:
                found = tuple(int(c) for c in np.unravel_index(np.argmax(depth), depth.shape))
    if found is None:
        return LiverReference(FALLBACK_SUV, None, None, None)
    offsets = [(np.arange(s) - c) * d for s, c, d in zip(hu.shape, found, spacing, strict=True)]
    dk, di, dj = np.meshgrid(*offsets, indexing="ij")
    sphere = dk**2 + di**2 + dj**2 <= SPHERE_RADIUS_MM**2
    values = suv[sphere]
    mean, sd = float(values.mean()), float(values.std(ddof=1))
    return LiverReference(1.5 * mean + 2 * sd, mean, sd, found)  # type: ignore[arg-type]


def _percist(ctx: JobContext, hu: np.ndarray, pet: SeriesVolume, suv: np.ndarray,
             body: np.ndarray) -> tuple[np.ndarray, OutputIdentity | None, str]:
    ref = liver_reference(hu, suv, body, pet.affine)
    ctx.timings["liver_reference_suv"] = ref.threshold
    return (suv >= ref.threshold) & body, None, ref.text()


def run_percist(ctx: JobContext) -> list[OutputFile]:
    """Lesions at the PERCIST-style liver-reference threshold."""
    return _run(ctx, "PERCIST-style liver reference", _percist)
