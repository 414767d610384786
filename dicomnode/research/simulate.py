"""A PET/CT digital twin: simulated FDG PET (full and low dose) from a CT, for training and tests.

No real PET/CT pairs or low-dose/full-dose pairs can be had here, so the models that need
pairs are trained and tested on this simulation, and every model and DICOM series made from
it says so.

1. **Activity.** Tissue classes from ``ct-tissue`` -> an SUV map: lungs 0.5, adipose 0.35,
   soft tissue 1.0, bone marrow (200-600 HU) 1.6, cortical bone (> 600 HU) 0.6, air 0; then
   organs, each with an uptake drawn per case from a typical FDG range (``ORGAN_SUV``): brain,
   myocardium (fasting varies it widely), blood pool, liver, spleen, kidneys, bladder (urine).
   HU thresholds cannot find organs: the whole-body phantom (``dicomnode.research.phantom``) brings
   its own masks; on a real CT only the mediastinum (soft tissue between the lungs, row by
   row) is found, as blood pool. Plus random spherical lesions (given radius and contrast) in
   soft tissue or lung, returned as a label map.
2. **Resolution.** A Gaussian PSF (default 5.5 mm FWHM), then the PET grid (default 4 mm).
3. **Counts.** Per axial slice, a parallel-beam forward projection (image rotation + sum),
   scaled to the true coincidences that slice's activity gives in a frame: activity (MBq) =
   SUV x ml x injected dose decayed over a 60 min uptake / 75 000 ml (a 75 kg patient), times
   ``sensitivity_cps_per_mbq`` (trues per second per MBq in the field of view, attenuation
   included; default 2000, an older 3-D scanner) times ``frame_s`` per bed: every bed is
   acquired for ``frame_s``, so a longer volume has more counts. Measured: 12.8 M counts
   for a 400 mm thorax-to-head window of the whole-body phantom (seed 1001, 300 MBq, 120 s;
   about 128 000 per 4 mm slice). (Until 2026-11 the twin spread one
   ``dose x frame x 100 cps/MBq`` total over the whole volume: 3.6 M counts at the same dose
   and frame, whatever the volume's length, so 3.6x fewer here and more on longer volumes.)
   Then Poisson noise.
4. **Reconstruction.** OSEM (ordered subsets EM with the same projector), in SUV units, then
   a 3-D Gaussian post-filter (``POSTFILTER_MM``, 4 mm FWHM), as clinical protocols end.
5. **Low dose.** The same counts thinned binomially with keep-probability 1/DRF (what a
   shorter list-mode frame does, as in the DRMC paper) and reconstructed the same way,
   post-filter included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from dicomnode.dicom.write.pet import F18_HALF_LIFE_S

__all__ = [
    "FRAME_S",
    "ORGAN_SUV",
    "PET_MM",
    "POSTFILTER_MM",
    "PetTwin",
    "UPTAKE",
    "activity_map",
    "mediastinum",
    "gaussian_fwhm",
    "osem",
    "pet_truth",
    "project",
    "simulate_pet",
    "thin_counts",
]

UPTAKE_S = 3600.0  # injection to scan
# clinical reconstructions end with a Gaussian post-filter (its width is a protocol setting);
# without it the twin's full-dose images were far noisier than any clinical image (measured:
# on held-out phantom seed 1000, in 7 of its 8 lesions the full-dose SUVmax was 37-47 % above
# the noise-free activity's)
POSTFILTER_MM = 4.0
PET_MM = 4.0  # the twin's default PET voxel size (scanners write 2-4 mm)
FRAME_S = 120.0  # the twin's default acquisition time per bed position
PATIENT_ML = 75_000.0  # SUV 1 everywhere in a 75 kg patient holds the whole dose
UPTAKE = {"lung": 0.5, "adipose": 0.35, "soft_tissue": 1.0, "marrow": 1.6, "cortical": 0.6}
# SUVbw ranges of normal FDG uptake, one value drawn per case (adult, 60 min after injection)
ORGAN_SUV = {"brain": (6.0, 10.0), "myocardium": (1.5, 8.0), "blood": (1.5, 2.2),
             "liver": (2.0, 3.0), "spleen": (1.6, 2.4), "kidneys": (2.5, 5.0),
             "bladder": (8.0, 20.0)}


def mediastinum(lungs: np.ndarray, body: np.ndarray) -> np.ndarray:
    """The region between the two lungs, row by row, on slices where both are present (heart
    and great vessels on a chest CT; the caller keeps its soft tissue)."""
    out = np.zeros_like(lungs)
    cols = np.arange(lungs.shape[2])
    for k in np.nonzero(lungs.any(axis=(1, 2)))[0]:
        centre = float(np.nonzero(body[k])[1].mean()) if body[k].any() else lungs.shape[2] / 2
        right = lungs[k] & (cols[None, :] < centre)
        left = lungs[k] & (cols[None, :] >= centre)
        if not right.any() or not left.any():
            continue
        right_edge = np.where(right.any(axis=1), np.where(right, cols, -1).max(axis=1), -1)
        left_edge = np.where(left.any(axis=1), np.where(left, cols, 1 << 30).min(axis=1), -1)
        rows = (right_edge >= 0) & (left_edge >= 0)
        out[k] = rows[:, None] & (cols[None, :] > right_edge[:, None]) \
            & (cols[None, :] < left_edge[:, None])
    return out


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
                 masks: dict[str, np.ndarray] | None = None,
                 organs: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """SUV map and lesion labels on the CT grid (see the module docstring). ``organs``: masks
    by ``ORGAN_SUV`` key (the whole-body phantom's); without them, the mediastinum of a CT
    with two lungs is blood pool."""
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
    if organs is None:
        organs = {"blood": mediastinum(lungs, body) & (hu > -30) & (hu < 150)}
    for name, mask in organs.items():
        if mask.any():
            suv[mask] = rng.uniform(*ORGAN_SUV[name])
    labels = np.zeros(hu.shape, np.uint16)
    taken = np.zeros_like(body)  # whole balls, so that lesions never touch, even in air
    busy = np.zeros_like(body)
    for mask in organs.values():
        busy |= mask
    candidates = np.argwhere(body & (hu > -900) & (hu < 150) & ~busy)
    zz, yy, xx = np.ogrid[: hu.shape[0], : hu.shape[1], : hu.shape[2]]
    placed = 0
    for _ in range(lesions * 20):
        if placed == lesions or not len(candidates):
            break
        c = candidates[rng.integers(len(candidates))]
        r = rng.uniform(*radius_mm)
        ball = (((zz - c[0]) * spacing[0]) ** 2 + ((yy - c[1]) * spacing[1]) ** 2
                + ((xx - c[2]) * spacing[2]) ** 2) <= r * r
        if taken[ball].any():
            continue
        taken |= ball
        placed += 1
        # the lesion is the part of the ball inside the body: no activity, no label in air
        labels[ball & body] = placed
        suv[ball] = max(UPTAKE["soft_tissue"], float(np.median(suv[ball]))) * rng.uniform(*contrast)
        suv[ball & ~body] = 0.0
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
            expected = project(x, angles[g])
            # a count on a ray whose estimate has gone to zero cannot be explained by this
            # image: it updates nothing (a ratio against a clamped 1e-9 reached pixels off the
            # ray through the rotation back-projector and wrote values of order 1e9 on sparse
            # data, docs/research/pet-experiments.md experiment 13)
            ratio = np.divide(sino[g], expected, out=np.zeros_like(expected),
                              where=expected > 1e-9)
            x *= backproject(ratio, angles[g], shape) / s
    return x


def gaussian_fwhm(image: np.ndarray, spacing: tuple[float, ...], fwhm_mm: float) -> np.ndarray:
    """A 3-D Gaussian of ``fwhm_mm`` FWHM on a grid of ``spacing`` mm (0: the image as it is):
    the twin's PSF, the scanner's post-filter, the benchmark's baseline filter."""
    if fwhm_mm <= 0:
        return image
    return ndi.gaussian_filter(image, [fwhm_mm / 2.3548 / s for s in spacing]).astype(image.dtype)


def thin_counts(counts: np.ndarray, drf: float, rng: np.random.Generator) -> np.ndarray:
    """Keep each count with probability 1/DRF (a shorter frame of the same acquisition)."""
    return rng.binomial(counts.astype(np.int64), 1.0 / drf).astype(np.float64)


def pet_truth(hu: np.ndarray, spacing: tuple[float, float, float], *,
              rng: np.random.Generator, pet_mm: float = PET_MM, fwhm_mm: float = 5.5,
              lesions: int = 4, masks: dict[str, np.ndarray] | None = None,
              organs: dict[str, np.ndarray] | None = None,
              radius_mm: tuple[float, float] = (5.0, 12.0),
              contrast: tuple[float, float] = (3.0, 8.0),
              ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """The noise-free activity on the PET grid (SUV after the PSF), its lesion labels and the
    PET voxel spacing."""
    suv, labels = activity_map(hu, spacing, rng=rng, lesions=lesions, masks=masks,
                               organs=organs, radius_mm=radius_mm, contrast=contrast)
    blurred = gaussian_fwhm(suv, spacing, fwhm_mm)
    factors = [s / pet_mm for s in spacing]
    truth = np.clip(ndi.zoom(blurred, factors, order=1), 0, None).astype(np.float32)
    lesion_pet = ndi.zoom(labels, factors, order=0).astype(np.uint16)
    pet_spacing = tuple(s / f for s, f in zip(spacing, factors, strict=True))
    return truth, lesion_pet, pet_spacing  # type: ignore[return-value]


def _crop(image: np.ndarray) -> tuple[slice, slice]:
    """The smallest square around a slice's activity whose inscribed circle holds all of it
    (so that rotating it in the projector loses nothing); the whole slice when larger."""
    rows, cols = np.nonzero(image > 0)
    if not len(rows):
        return slice(0, 0), slice(0, 0)
    cy, cx = (rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2
    side = int(np.ceil(np.hypot(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1))) + 4
    if side >= min(image.shape):
        return slice(0, image.shape[0]), slice(0, image.shape[1])
    y0 = int(np.clip(round(cy - side / 2), 0, image.shape[0] - side))
    x0 = int(np.clip(round(cx - side / 2), 0, image.shape[1] - side))
    return slice(y0, y0 + side), slice(x0, x0 + side)


def _osem_slice(args: tuple[np.ndarray, np.ndarray, tuple[int, int], int, int]) -> np.ndarray:
    sino, ang, shape, iterations, subsets = args
    if not shape[0]:
        return np.zeros(shape)
    return osem(sino, ang, shape, iterations=iterations, subsets=subsets)


def simulate_pet(
    hu: np.ndarray, spacing: tuple[float, float, float], *, drfs: tuple[int, ...] = (4, 10),
    seed: int = 0, pet_mm: float = PET_MM, fwhm_mm: float = 5.5, dose_mbq: float = 300.0,
    frame_s: float = FRAME_S, sensitivity_cps_per_mbq: float = 2000.0, angles: int = 96,
    iterations: int = 3, subsets: int = 8, lesions: int = 4,
    radius_mm: tuple[float, float] = (5.0, 12.0), contrast: tuple[float, float] = (3.0, 8.0),
    masks: dict[str, np.ndarray] | None = None, organs: dict[str, np.ndarray] | None = None,
    processes: int = 1, postfilter_mm: float = POSTFILTER_MM,
) -> PetTwin:
    """Simulate full- and low-dose FDG PET from a CT volume (HU, slices along axis 0).

    Each slice is projected and reconstructed within the square that holds its activity
    (:func:`_crop`), which is exact for the parallel-beam projector and much faster on limbs
    and heads; ``processes`` > 1 reconstructs slices in parallel. Every reconstruction (full
    and low dose alike, as a scanner's protocol does) ends with a 3-D Gaussian post-filter of
    ``postfilter_mm`` FWHM (0: none).
    """
    rng = np.random.default_rng(seed)
    truth, lesion_pet, pet_spacing = pet_truth(hu, spacing, rng=rng, pet_mm=pet_mm,
                                               fwhm_mm=fwhm_mm, lesions=lesions, masks=masks,
                                               organs=organs, radius_mm=radius_mm,
                                               contrast=contrast)
    ang = _angles(angles)
    crops = [_crop(sl) for sl in truth]
    # expected sinograms, SUV units
    clean = [project(sl[c], ang) if sl[c].size else np.zeros((angles, 0))
             for sl, c in zip(truth, crops, strict=True)]
    voxel_ml = float(np.prod(pet_spacing)) / 1000.0
    decayed_mbq = dose_mbq * 2 ** (-UPTAKE_S / F18_HALF_LIFE_S)
    activity_mbq = float(truth.sum()) * voxel_ml * decayed_mbq / PATIENT_ML
    total = activity_mbq * sensitivity_cps_per_mbq * frame_s
    scale = total / max(float(sum(c.sum() for c in clean)), 1e-9)  # counts per SUV unit
    counts = [rng.poisson(c * scale).astype(np.float64) for c in clean]

    def recon(sinos: list[np.ndarray], keep: float) -> np.ndarray:
        jobs = [(sino, ang, (c[0].stop - c[0].start, c[1].stop - c[1].start), iterations,
                 subsets) for sino, c in zip(sinos, crops, strict=True)]
        if processes > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(processes) as pool:
                slices = pool.map(_osem_slice, jobs, chunksize=4)
        else:
            slices = [_osem_slice(j) for j in jobs]
        out = np.zeros(truth.shape, np.float32)
        for k, (img, c) in enumerate(zip(slices, crops, strict=True)):
            out[k][c] = img / (scale * keep)
        return gaussian_fwhm(out, pet_spacing, postfilter_mm)

    full = recon(counts, 1.0)
    low, totals = {}, {1: float(sum(c.sum() for c in counts))}
    for drf in drfs:
        thinned = [thin_counts(c, drf, rng) for c in counts]
        totals[drf] = float(sum(c.sum() for c in thinned))
        low[drf] = recon(thinned, 1.0 / drf)
    return PetTwin(truth=truth, full=full, low=low, lesions=lesion_pet,
                   spacing=pet_spacing, counts=totals)
