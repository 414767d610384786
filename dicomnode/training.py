"""Training data for the models that need pairs: the PET/CT twin, or a site's own DICOM pairs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dicomnode.sample import phantom_hu
from dicomnode.simulate import simulate_pet

__all__ = ["simulated_pet_pairs", "site_pet_pairs"]


def _lidc() -> Path | None:
    root = Path(os.environ.get("DICOMNODE_TEST_DATA",
                               Path(__file__).resolve().parents[2] / "shared" / "data"))
    lidc = root / "ct" / "lidc-idri-0001"
    return lidc if lidc.is_dir() else None


def _training_cts(cases: int, *, phantom: tuple[int, int], pixel_mm: float, lidc_step: int
                  ) -> Iterator[tuple[np.ndarray, tuple[float, float, float], np.ndarray, str]]:
    """(HU, spacing, affine, name) of each training CT: lidc-idri-0001 first when the shared
    data is present (every ``lidc_step``-th voxel), then generated phantoms of
    ``phantom = (slices, size)`` with 2.5 mm slices and ``pixel_mm`` pixels."""
    lidc = _lidc()
    for i in range(cases):
        if lidc is not None and i == 0:
            from dicomnode.volume import load_series

            vol = load_series(sorted(lidc.glob("*.dcm")))
            s = lidc_step
            affine = vol.affine.copy()
            affine[:3, :3] *= s
            yield (vol.array[::s, ::s, ::s],
                   (vol.spacing[0] * s, vol.spacing[1] * s, vol.spacing[2] * s), affine,
                   "lidc-idri-0001")
        else:
            px = pixel_mm
            affine = np.array([[0, 0, px, 0], [0, px, 0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1.0]])
            yield phantom_hu(*phantom), (2.5, px, px), affine, "phantom"


def simulated_pet_pairs(*, cases: int, drfs: tuple[int, ...], seed: int = 0
                        ) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """(low-dose SUV, full-dose SUV) pairs from the twin, and a description of the data.

    Cases vary in dose (150-400 MBq), scanner sensitivity (60-140 cps/MBq) and PSF (4.5-6.5 mm
    FWHM), standing in for different centres; anatomy from generated phantoms and, when the
    shared data is present, from lidc-idri-0001.
    """
    rng = np.random.default_rng(seed)
    pairs = []
    sources = []
    for i, (hu, spacing, _affine, name) in enumerate(
            _training_cts(cases, phantom=(48, 192), pixel_mm=1.4, lidc_step=2)):
        twin = simulate_pet(hu, spacing, drfs=drfs, seed=seed + i, angles=64,
                            dose_mbq=float(rng.uniform(150, 400)),
                            sensitivity_cps_per_mbq=float(rng.uniform(60, 140)),
                            fwhm_mm=float(rng.uniform(4.5, 6.5)), lesions=int(rng.integers(2, 7)))
        for low in twin.low.values():
            pairs.append((low, twin.full))
        sources.append(name)
    desc = (f"SIMULATED data only: {cases} cases of dicomnode's PET/CT twin "
            f"({', '.join(sorted(set(sources)))}), DRF {', '.join(map(str, drfs))}, seed {seed}")
    return pairs, desc


def site_pet_pairs(pair_dirs: list[str]) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """Pairs from a site's own DICOM folders given as LOW_DIR:FULL_DIR (SUV when possible)."""
    from dicomnode.pipelines.pet_denoise import to_suv
    from dicomnode.volume import load_series

    pairs = []
    for spec in pair_dirs:
        low_dir, _, full_dir = str(spec).partition(":")
        low = load_series(sorted(p for p in Path(low_dir).rglob("*") if p.is_file()))
        full = load_series(sorted(p for p in Path(full_dir).rglob("*") if p.is_file()))
        if low.shape != full.shape:
            raise ValueError(f"{spec}: low and full dose grids differ")
        pairs.append((to_suv(low)[0], to_suv(full)[0]))
    return pairs, f"site data: {len(pairs)} low/full-dose pairs"


def simulated_ct2pet_cases(*, cases: int, seed: int = 0
                           ) -> tuple[list[tuple[np.ndarray, np.ndarray, dict]], str]:
    """(CT [0,1], SUV / 20, district masks) on the 4 mm PET grid, from the twin's noise-free
    activity (the target a CT -> PET model can learn; lesions are random and not in the CT)."""
    from scipy import ndimage as ndi

    from dicomnode.pipelines.ct2pet import SUV_MAX, district_masks, norm_ct

    out = []
    sources = []
    for i, (hu, spacing, affine, name) in enumerate(
            _training_cts(cases, phantom=(60, 256), pixel_mm=0.7, lidc_step=1)):
        twin = simulate_pet(hu, spacing, drfs=(), seed=seed + i, angles=16, iterations=1,
                            subsets=2, lesions=0)
        factors = [s / 4.0 for s in spacing]
        ct4 = norm_ct(ndi.zoom(hu, factors, order=1))[: twin.truth.shape[0],
                                                        : twin.truth.shape[1],
                                                        : twin.truth.shape[2]]
        masks = {k: ndi.zoom(v.astype(np.uint8), factors, order=0)[: ct4.shape[0],
                                                                   : ct4.shape[1],
                                                                   : ct4.shape[2]] > 0
                 for k, v in district_masks(hu, spacing, affine).items()}
        out.append((ct4, (np.clip(twin.truth, 0, SUV_MAX) / SUV_MAX).astype(np.float32), masks))
        sources.append(name)
    return out, (f"SIMULATED data only: {cases} CTs ({', '.join(sorted(set(sources)))}) with "
                 f"noise-free activity from dicomnode's PET/CT twin, seed {seed}")
