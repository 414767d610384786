"""A procedural whole-body CT phantom with organ labels, for the PET/CT twin.

The real CTs here are chest CTs: they show no head, arms or legs, and HU thresholds cannot tell
brain, myocardium, liver, kidneys or bladder from other soft tissue. This phantom has all of
them, built from ellipsoids and cylinders with typical adult sizes, varied per seed (body size,
height, organ positions), so that

* the twin can give each organ its own FDG uptake (``dicomnode.research.simulate.ORGAN_SUV``);
* the district CT->PET models have head/neck, arm and leg training data;
* the district logic of ``ct-tissue`` can be tested on a body that has every district.

Array axes are (slice, row, column) = (z, y, x) in LPS patient space: slice 0 is the feet
(+z is superior), +y is posterior, +x is the patient's left, as ``phantom_affine`` says.
HU values: air -1000, fat -100, muscle and organs 35-60, urine 10, lung -850, cortical bone
1000, marrow 250, brain 35, skull 1000.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ORGANS", "WholeBody", "phantom_affine", "whole_body"]

ORGANS = ("brain", "myocardium", "blood", "liver", "spleen", "kidneys", "bladder")


@dataclass(frozen=True)
class WholeBody:
    """HU volume, organ masks (same grid) and the voxel spacing (slice, row, col) in mm."""

    hu: np.ndarray
    organs: dict[str, np.ndarray]
    spacing: tuple[float, float, float]
    z0_mm: float = 0.0  # height of the first slice's centre above the soles

    @property
    def affine(self) -> np.ndarray:
        """Voxel (slice, row, col) -> LPS mm."""
        return phantom_affine(self.spacing, self.hu.shape, z0_mm=self.z0_mm)


def phantom_affine(spacing: tuple[float, float, float], shape: tuple[int, ...], *,
                   z0_mm: float = 0.0) -> np.ndarray:
    """The phantom's voxel-to-LPS affine: isocentre in the middle of each slice."""
    sz, sy, sx = spacing
    return np.array([[0, 0, sx, -sx * (shape[2] - 1) / 2], [0, sy, 0, -sy * (shape[1] - 1) / 2],
                     [sz, 0, 0, z0_mm], [0, 0, 0, 1.0]])


def whole_body(seed: int = 0, *, slice_mm: float = 4.0, pixel_mm: float = 3.0,
               fov_mm: float = 600.0, z_range_mm: tuple[float, float] | None = None,
               noise_hu: float = 10.0) -> WholeBody:
    """A whole-body CT phantom (feet to vertex, about 1.6-1.8 m) and its organ masks.

    ``z_range_mm`` crops to that range of heights above the soles (the phantom's z).
    """
    rng = np.random.default_rng(seed)
    s = float(rng.uniform(0.88, 1.1))  # girth
    height = float(rng.uniform(1600.0, 1800.0))
    h = height / 1700.0
    lo, hi = z_range_mm or (0.0, height)
    n = int(round((hi - lo) / slice_mm))
    size = int(round(fov_mm / pixel_mm))
    z = (lo + slice_mm * (np.arange(n) + 0.5))[:, None, None]
    y = ((np.arange(size) - size / 2 + 0.5) * pixel_mm)[None, :, None]
    x = ((np.arange(size) - size / 2 + 0.5) * pixel_mm)[None, None, :]

    def j(scale: float) -> float:  # a random shift of a landmark, mm
        return float(rng.uniform(-scale, scale))

    def ell(cx: float, cy: float, cz: float, ax: float, ay: float, az: float) -> np.ndarray:
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1.0

    def cyl(cx: float, cy: float, ax: float, ay: float, z0: float, z1: float) -> np.ndarray:
        return (((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0) & (z >= z0) & (z < z1)

    hu = np.full((n, size, size), -1000.0, np.float32)
    organs: dict[str, np.ndarray] = {}
    zs = {k: v * h for k, v in {"knee": 480, "crotch": 800, "pelvis": 900, "kidney": 1060,
                                "liver": 1160, "diaphragm": 1200, "heart": 1270,
                                "shoulder": 1400, "neck": 1450, "skull": 1510,
                                "vertex": 1700}.items()}
    tx, ty = 150 * s, 105 * s  # trunk semi-axes (x, y)

    def limb(cx: float, r0: float, r1: float, z0: float, z1: float) -> None:
        """A tapered limb: fat rim, muscle, a bone with marrow."""
        for zz0 in np.arange(z0, z1, slice_mm):
            k = np.nonzero((z[:, 0, 0] >= zz0) & (z[:, 0, 0] < zz0 + slice_mm))[0]
            if not len(k):
                continue
            f = (zz0 - z0) / max(z1 - z0, 1.0)
            r = r0 + (r1 - r0) * f
            rr = np.sqrt((x[0] - cx) ** 2 + y[0] ** 2)
            sl = hu[k]
            sl[:, rr <= r] = -100
            sl[:, rr <= r - 8] = 45
            sl[:, rr <= 0.22 * r] = 1000
            sl[:, rr <= 0.13 * r] = 250
            hu[k] = sl

    # legs: two tapered cylinders, calf to thigh
    for side in (-1, 1):
        cx = side * (85 * s + j(5))
        limb(cx, 45 * s, 60 * s, 0, zs["knee"])
        limb(cx, 60 * s, 85 * s, zs["knee"], zs["crotch"] + 40)
    # trunk: an elliptic cylinder from the crotch to the shoulders, fat rim 15 mm
    trunk = cyl(0, 0, tx, ty, zs["crotch"], zs["shoulder"] + 30)
    inner = cyl(0, 0, tx - 15, ty - 15, zs["crotch"], zs["shoulder"] + 30)
    hu[trunk] = -100
    hu[inner] = 40
    # arms beside the trunk with a gap of 5-20 mm, hand to shoulder, joined to the trunk by
    # the shoulders
    reach = tx + 20 + 38 * s
    for side in (-1, 1):
        limb(side * (reach + j(7)), 28 * s, 42 * s, zs["crotch"] + 60, zs["shoulder"] + 10)
    shoulders = cyl(0, 0, reach + 30 * s, ty - 10, zs["shoulder"] - 25, zs["shoulder"] + 20)
    hu[shoulders & (hu < -500)] = -100
    hu[cyl(0, 0, reach + 20 * s, ty - 20, zs["shoulder"] - 20, zs["shoulder"] + 15)
       & (hu < 200)] = 40
    # neck and head
    hu[cyl(0, 10, 55 * s, 55 * s, zs["shoulder"] + 30, zs["skull"] + 30)] = 40
    hc = (zs["skull"] + zs["vertex"]) / 2
    hz = (zs["vertex"] - zs["skull"]) / 2
    head = ell(0, 0, hc, 75 * s, 95 * s, hz)
    hu[head] = 40
    hu[head & ~ell(0, 0, hc, 75 * s - 7, 95 * s - 7, hz - 7)] = 1000
    organs["brain"] = ell(0, 0, hc + 10, 75 * s - 9, 95 * s - 9, hz - 25)
    hu[organs["brain"]] = 35
    # pelvis bones and spine (cortical ring, marrow)
    for side in (-1, 1):
        wing = ell(side * 95 * s, 20, zs["pelvis"] + 20, 55 * s, 30, 70)
        hu[wing] = 1000
        hu[ell(side * 95 * s, 20, zs["pelvis"] + 20, 45 * s, 20, 60)] = 250
    spine = cyl(0, ty - 40 * s, 18, 18, zs["pelvis"], zs["skull"])
    hu[spine] = 1000
    hu[cyl(0, ty - 40 * s, 12, 12, zs["pelvis"], zs["skull"])] = 250
    # lungs (above the diaphragm), heart between them
    lungs = np.zeros_like(trunk)
    for side in (-1, 1):
        lungs |= ell(side * (70 * s + j(5)), 5, zs["diaphragm"] + 110 * h, 58 * s, 75 * s, 115 * h)
    lungs &= z >= zs["diaphragm"]
    heart_c = (20 + j(8), -25 + j(8), zs["heart"] + j(15))
    heart = ell(*heart_c, 55 * s, 45 * s, 55 * h)
    lungs &= ~heart
    hu[lungs] = -850
    hu[heart] = 40
    organs["myocardium"] = heart & ~ell(*heart_c, 55 * s - 11, 45 * s - 11, 55 * h - 11)
    organs["blood"] = (heart & ~organs["myocardium"]) | cyl(
        10, ty - 75 * s, 12, 12, zs["pelvis"] + 40, zs["heart"] + 30)
    hu[organs["blood"]] = 40
    # abdomen
    organs["liver"] = ell(-60 * s + j(8), -5 + j(8), zs["liver"] + j(10), 95 * s, 75 * s, 70 * h)
    organs["liver"] &= ~lungs & ~heart & (z < zs["diaphragm"] + 30)
    organs["spleen"] = ell(85 * s + j(6), 40 + j(6), zs["liver"] + j(10), 35 * s, 45 * s, 50 * h)
    kidneys = np.zeros_like(trunk)
    for side in (-1, 1):
        kidneys |= ell(side * (65 * s + j(5)), ty - 55 * s, zs["kidney"] + j(15), 28 * s, 25 * s,
                       55 * h)
    organs["kidneys"] = kidneys & ~spine
    organs["bladder"] = ell(0 + j(6), -50 * s, zs["pelvis"] + j(10), 40 * s, 35 * s, 35 * h)
    for name, value in (("liver", 58), ("spleen", 48), ("kidneys", 32), ("bladder", 8)):
        hu[organs[name]] = value
    taken = np.zeros_like(trunk)  # organs do not overlap: vessels first, the liver last
    for name in ("blood", "myocardium", "brain", "kidneys", "bladder", "spleen", "liver"):
        organs[name] = organs[name] & ~taken & (hu > -500)
        taken |= organs[name]
    organs = {k: organs[k] for k in ORGANS}
    if noise_hu:
        hu += rng.normal(0, noise_hu, hu.shape).astype(np.float32)
    return WholeBody(hu=hu, organs=organs, spacing=(slice_mm, pixel_mm, pixel_mm),
                     z0_mm=lo + slice_mm / 2)
