"""A PET/CT digital twin: simulated FDG PET (full and low dose) from a CT, for training and tests.

No real PET/CT pairs or low-dose/full-dose pairs can be had here, so the models that need
pairs are trained and tested on this simulation, and every model and DICOM series made from
it says so.

1. **Activity.** Tissue classes from ``ct-tissue`` -> an SUV map: lungs 0.5, adipose 0.35,
   soft tissue 1.0, bone marrow (200-600 HU) 1.6, cortical bone (> 600 HU) 0.6, air 0; plus
   random spherical lesions (given radius and contrast) in soft tissue or lung, returned as a
   label map. Organs that HU thresholds cannot separate (brain, myocardium, liver, kidneys,
   bladder) are not modelled individually yet: they are "soft tissue" (SUV 1.0).
2. **Resolution.** A Gaussian PSF (default 5.5 mm FWHM), then the PET grid (default 4 mm).
3. **Counts.** Per axial slice, a parallel-beam forward projection (image rotation + sum),
   scaled so that the whole volume yields ``dose_mbq x frame_s x sensitivity`` expected
   counts, then Poisson noise.
4. **Reconstruction.** OSEM (ordered subsets EM with the same projector), in SUV units.
5. **Low dose.** The same counts thinned binomially with keep-probability 1/DRF (what a
   shorter list-mode frame does, as in the DRMC paper) and reconstructed the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "PetTwin",
    "UPTAKE",
    "activity_map",
    "osem",
    "project",
    "simulate_pet",
    "thin_counts",
]

UPTAKE = {"lung": 0.5, "adipose": 0.35, "soft_tissue": 1.0, "marrow": 1.6, "cortical": 0.6}


@dataclass(frozen=True, kw_only=True)
class PetTwin:
    """One simulated case on the PET grid (slices, rows, cols)."""

    truth: np.ndarray  # SUV after the PSF, on the PET grid (the noise-free target)
    full: np.ndarray  # reconstructed full dose, SUV
    low: dict[int, np.ndarray]  # DRF -> reconstructed low dose, SUV
    lesions: np.ndarray  # label map on the PET grid (0 = none)
    spacing: tuple[float, float, float]
    counts: dict[int, float] = field(default_factory=dict)  # DRF (1 = full) -> total counts


def activity_map(hu: np.ndarray, spacing: tuple[float, float, float], *,
                 rng: np.random.Generator, lesions: int = 4,
                 radius_mm: tuple[float, float] = (5.0, 12.0),
                 contrast: tuple[float, float] = (3.0, 8.0),
                 masks: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """SUV map and lesion labels on the CT grid (see the module docstring)."""
    if masks is None:
        from dicomnode.pipelines.ct_tissue import body_mask

        body = body_mask(hu)
        lungs = body & (hu < -400)
        masks = {"body": body, "lungs": lungs}
    body = masks["body"]
    lungs = masks.get("lungs", masks.get("lung_left", np.zeros_like(body))
                      | masks.get("lung_right", np.zeros_like(body)))
    suv = np.zeros(hu.shape, np.float32)
    suv[body] = UPTAKE["soft_tissue"]
    suv[body & (hu >= -190) & (hu <= -30)] = UPTAKE["adipose"]
    suv[lungs] = UPTAKE["lung"]
    suv[body & (hu >= 200) & (hu < 600)] = UPTAKE["marrow"]
    suv[body & (hu >= 600)] = UPTAKE["cortical"]
    labels = np.zeros(hu.shape, np.uint16)
    candidates = np.argwhere(body & (hu > -900) & (hu < 150))
    zz, yy, xx = np.ogrid[: hu.shape[0], : hu.shape[1], : hu.shape[2]]
    placed = 0
    for _ in range(lesions * 20):
        if placed == lesions or not len(candidates):
            break
        c = candidates[rng.integers(len(candidates))]
        r = rng.uniform(*radius_mm)
        ball = (((zz - c[0]) * spacing[0]) ** 2 + ((yy - c[1]) * spacing[1]) ** 2
                + ((xx - c[2]) * spacing[2]) ** 2) <= r * r
        if (labels[ball] > 0).any():
            continue
        placed += 1
        labels[ball] = placed
        suv[ball] = max(UPTAKE["soft_tissue"], float(np.median(suv[ball]))) * rng.uniform(*contrast)
    return suv, labels


def _angles(n: int) -> np.ndarray:
    return np.linspace(0.0, 180.0, n, endpoint=False)


def project(image: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Parallel-beam sinogram (angles, columns) of a 2-D image."""
    return np.stack([ndi.rotate(image, a, reshape=False, order=1, mode="constant").sum(axis=0)
                     for a in angles])


def backproject(sino: np.ndarray, angles: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Adjoint of :func:`project` (up to interpolation)."""
    out = np.zeros(shape, np.float64)
    for row, a in zip(sino, angles, strict=True):
        out += ndi.rotate(np.broadcast_to(row, shape), -a, reshape=False, order=1,
                          mode="constant")
    return out


def osem(sino: np.ndarray, angles: np.ndarray, shape: tuple[int, int], *, iterations: int = 3,
         subsets: int = 8) -> np.ndarray:
    """OSEM reconstruction of a 2-D slice (counts in, activity x scale out)."""
    x = np.ones(shape, np.float64)
    groups = [np.arange(s, len(angles), subsets) for s in range(subsets)]
    sens = [np.maximum(backproject(np.ones((len(g), shape[1])), angles[g], shape), 1e-9)
            for g in groups]
    for _ in range(iterations):
        for g, s in zip(groups, sens, strict=True):
            expected = np.maximum(project(x, angles[g]), 1e-9)
            x *= backproject(sino[g] / expected, angles[g], shape) / s
    return x


def thin_counts(counts: np.ndarray, drf: float, rng: np.random.Generator) -> np.ndarray:
    """Keep each count with probability 1/DRF (a shorter frame of the same acquisition)."""
    return rng.binomial(counts.astype(np.int64), 1.0 / drf).astype(np.float64)


def simulate_pet(
    hu: np.ndarray, spacing: tuple[float, float, float], *, drfs: tuple[int, ...] = (4, 10),
    seed: int = 0, pet_mm: float = 4.0, fwhm_mm: float = 5.5, dose_mbq: float = 300.0,
    frame_s: float = 120.0, sensitivity_cps_per_mbq: float = 100.0, angles: int = 96,
    iterations: int = 3, subsets: int = 8, lesions: int = 4,
    masks: dict[str, np.ndarray] | None = None,
) -> PetTwin:
    """Simulate full- and low-dose FDG PET from a CT volume (HU, slices along axis 0)."""
    rng = np.random.default_rng(seed)
    suv, labels = activity_map(hu, spacing, rng=rng, lesions=lesions, masks=masks)
    sigma = [fwhm_mm / 2.3548 / s for s in spacing]
    blurred = ndi.gaussian_filter(suv, sigma)
    factors = [s / pet_mm for s in spacing]
    truth = np.clip(ndi.zoom(blurred, factors, order=1), 0, None).astype(np.float32)
    lesion_pet = ndi.zoom(labels, factors, order=0)
    pet_spacing = tuple(s / f for s, f in zip(spacing, factors, strict=True))
    ang = _angles(angles)
    shape = truth.shape[1:]
    clean = np.stack([project(sl, ang) for sl in truth])  # expected sinograms, SUV units
    total = dose_mbq * frame_s * sensitivity_cps_per_mbq
    scale = total / max(float(clean.sum()), 1e-9)  # counts per SUV unit of projection
    counts = rng.poisson(clean * scale).astype(np.float64)

    def recon(c: np.ndarray, keep: float) -> np.ndarray:
        return np.stack([osem(s, ang, shape, iterations=iterations, subsets=subsets)
                         for s in c]).astype(np.float32) / (scale * keep)

    full = recon(counts, 1.0)
    low, totals = {}, {1: float(counts.sum())}
    for drf in drfs:
        thinned = thin_counts(counts, drf, rng)
        totals[drf] = float(thinned.sum())
        low[drf] = recon(thinned, 1.0 / drf)
    return PetTwin(truth=truth, full=full, low=low, lesions=lesion_pet.astype(np.uint16),
                   spacing=pet_spacing, counts=totals)  # type: ignore[arg-type]
