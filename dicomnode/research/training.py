"""Training data for the models that need pairs: the PET/CT twin, or a site's own DICOM pairs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicomnode.dicom.grid import resample_onto
from dicomnode.research.simulate import FRAME_S, PET_MM, pet_truth, simulate_pet
from dicomnode.resources import example_data_dir

__all__ = [
    "BENCH_PHANTOM_SEEDS",
    "phantom_seeds",
    "resample_onto",
    "simulated_ct2pet_cases",
    "simulated_pet_pairs",
    "site_ct2pet_cases",
    "site_pet_pairs",
    "load_pairs",
    "save_pairs",
]


def _lidc() -> Path | None:
    lidc = example_data_dir() / "ct" / "lidc-idri-0001"
    return lidc if lidc.is_dir() else None


# (low-dose SUV, full-dose SUV, lesion labels or None): what pet-denoise trains on
PetPair = tuple[np.ndarray, np.ndarray, np.ndarray | None]


@dataclass(frozen=True)
class TrainingCT:
    """One CT the twin simulates from: HU, voxel spacing, affine, organ masks (or None)."""

    hu: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    name: str
    organs: dict[str, np.ndarray] | None = None


def _training_cts(cases: int, *, seed: int, lidc_step: int,
                  z_window_mm: float | None = None, lidc: bool = True
                  ) -> Iterator[TrainingCT]:
    """The CTs the twin simulates from: lidc-idri-0001 first when the shared data is present
    and ``lidc`` (every ``lidc_step``-th voxel), then whole-body phantoms
    (``dicomnode.research.phantom``, seeds ``seed + i`` for case i), each cropped to a random
    ``z_window_mm`` when given."""
    from dicomnode.research.phantom import whole_body

    lidc_dir = _lidc() if lidc else None
    rng = np.random.default_rng(seed)
    if lidc_dir is not None and cases > 0:
        from dicomnode.dicom.volume import load_series

        vol = load_series(sorted(lidc_dir.glob("*.dcm")))
        s = lidc_step
        affine = vol.affine.copy()
        affine[:3, :3] *= s
        yield TrainingCT(vol.array[::s, ::s, ::s],
                         (vol.spacing[0] * s, vol.spacing[1] * s, vol.spacing[2] * s),
                         affine, "lidc-idri-0001")
    for phantom_seed in phantom_seeds(cases=cases, seed=seed, lidc=lidc):
        z_range = None
        if z_window_mm:
            z0 = float(rng.uniform(0.0, 1650.0 - z_window_mm))
            z_range = (z0, z0 + z_window_mm)
        body = whole_body(phantom_seed, z_range_mm=z_range)
        yield TrainingCT(body.hu, body.spacing, body.affine, "whole-body phantom",
                         body.organs)


def simulated_pet_pairs(*, cases: int, drfs: tuple[int, ...], seed: int = 0,
                        z_window_mm: float = 320.0, processes: int = 1,
                        pet_mm: tuple[float, ...] | None = None, lidc: bool = True,
                        count_scale: tuple[float, float] | None = None
                        ) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], str]:
    """(low-dose SUV, full-dose SUV, lesion labels) from the twin, and a description.

    Cases vary in dose (150-400 MBq), scanner sensitivity (1000-4000 cps/MBq), PSF (4.5-6.5 mm
    FWHM), post-filter (3-6 mm FWHM), lesion count (3-8), size (4-15 mm radius) and contrast
    (2-10 x), standing in for different centres and patients; anatomy from whole-body phantoms with organ uptake (a
    random ``z_window_mm`` of each) and, when the shared data is present, lidc-idri-0001.
    Case i is reconstructed on a PET grid of ``pet_mm[i % len(pet_mm)]`` mm (default: the
    twin's ``PET_MM``): scanners write
    2-4 mm voxels, and a network trained on one voxel size does not carry over to another
    (docs/research/pet-experiments.md: the 4 mm-only model loses to a Gaussian filter on a 2 mm grid).
    ``lidc=False``: phantoms only (validation cases).

    ``count_scale`` (low, high): each case's frame time, so its counts at every dose level,
    times a factor log-spaced from low to high across the cases, in an order shuffled by the
    seed (every other draw is the same as without it). The dose and sensitivity ranges alone
    give 2 mm low-dose inputs of about 0.2-9 counts per object voxel, where the bench's real
    phantoms made low dose by ``simulate lowdose`` have 2.4-14 and a network trained on the former
    smooths the latter like a noisier image (docs/research/pet-experiments.md, experiment 13).
    """
    pet_mm = (PET_MM,) if pet_mm is None else pet_mm
    if not pet_mm or min(pet_mm) <= 0:
        raise ValueError(f"pet_mm must hold positive voxel sizes, not {pet_mm}")
    rng = np.random.default_rng(seed)
    frames = np.full(cases, FRAME_S)
    if count_scale is not None:
        low_c, high_c = count_scale
        if not 0 < low_c <= high_c:
            raise ValueError(f"count_scale must be (low, high) with 0 < low <= high, not "
                             f"{count_scale}")
        factors = np.geomspace(low_c, high_c, cases) if cases > 1 else np.array([low_c])
        frames = FRAME_S * np.random.default_rng(seed + 104_729).permutation(factors)
    pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
    sources = []
    for i, ct in enumerate(_training_cts(cases, seed=seed, lidc_step=2,
                                         z_window_mm=z_window_mm, lidc=lidc)):
        twin = simulate_pet(ct.hu, ct.spacing, drfs=drfs, seed=seed + i, angles=64,
                            pet_mm=pet_mm[i % len(pet_mm)], dose_mbq=float(rng.uniform(150, 400)),
                            sensitivity_cps_per_mbq=float(rng.uniform(1000, 4000)),
                            frame_s=float(frames[i]), fwhm_mm=float(rng.uniform(4.5, 6.5)),
                            lesions=int(rng.integers(3, 9)),
                            radius_mm=(4.0, 15.0), contrast=(2.0, 10.0), organs=ct.organs,
                            processes=processes, postfilter_mm=float(rng.uniform(3.0, 6.0)))
        for low in twin.low.values():
            pairs.append((low, twin.full, twin.lesions))
        sources.append(ct.name)
    desc = (f"SIMULATED data only: {cases} cases of dicomnode's PET/CT twin "
            f"({', '.join(sorted(set(sources)))}), DRF {', '.join(map(str, drfs))}, OSEM "
            f"post-filtered 3-6 mm, seed {seed}"
            + ("" if tuple(pet_mm) == (PET_MM,) else
               f", PET grids {' / '.join(f'{m:g}' for m in pet_mm)} mm")
            + ("" if count_scale is None else
               f", acquisition counts x{count_scale[0]:g}-{count_scale[1]:g} across cases "
               "(frame time)"))
    return pairs, desc


def site_pet_pairs(pair_dirs: list[str]
                   ) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], str]:
    """Pairs from a site's own DICOM folders given as LOW_DIR:FULL_DIR (SUV when possible)."""
    from dicomnode.dicom.volume import load_series
    from dicomnode.pipelines.pet_denoise import to_suv

    pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
    for spec in pair_dirs:
        low_dir, _, full_dir = str(spec).partition(":")
        low = load_series(sorted(p for p in Path(low_dir).rglob("*") if p.is_file()))
        full = load_series(sorted(p for p in Path(full_dir).rglob("*") if p.is_file()))
        if low.shape != full.shape:
            raise ValueError(f"{spec}: low and full dose grids differ")
        pairs.append((to_suv(low)[0], to_suv(full)[0], None))
    return pairs, f"site data: {len(pairs)} low/full-dose pairs"


def simulated_ct2pet_cases(*, cases: int, seed: int = 0, lidc: bool = True
                           ) -> tuple[list[tuple[np.ndarray, np.ndarray, dict]], str]:
    """(CT [0,1], SUV / 20, district masks) on the 4 mm PET grid, from the twin's noise-free
    activity (the target a CT -> PET model can learn; lesions are random and not in the CT).

    Case 0 is lidc-idri-0001 when the shared data is present and ``lidc``; case i otherwise
    the whole-body phantom of seed ``seed + i`` (:func:`phantom_seeds`)."""
    from scipy import ndimage as ndi

    from dicomnode.pipelines.ct2pet import SUV_MAX, district_masks, norm_ct

    out = []
    sources = []
    rng = np.random.default_rng(seed)
    for ct in _training_cts(cases, seed=seed, lidc_step=1, lidc=lidc):
        truth, _, _ = pet_truth(ct.hu, ct.spacing, rng=rng, lesions=0, organs=ct.organs)
        factors = [s / 4.0 for s in ct.spacing]
        ct4 = norm_ct(ndi.zoom(ct.hu, factors, order=1))
        n = tuple(min(a, b) for a, b in zip(ct4.shape, truth.shape, strict=True))
        masks = {k: ndi.zoom(v.astype(np.uint8), factors, order=0)[: n[0], : n[1], : n[2]] > 0
                 for k, v in district_masks(ct.hu, ct.spacing, ct.affine).items()}
        out.append((ct4[: n[0], : n[1], : n[2]],
                    (np.clip(truth[: n[0], : n[1], : n[2]], 0, SUV_MAX) / SUV_MAX
                     ).astype(np.float32), masks))
        sources.append(ct.name)
    return out, (f"SIMULATED data only: {cases} CTs ({', '.join(sorted(set(sources)))}) with "
                 f"noise-free activity (organ uptake) from dicomnode's PET/CT twin, seed {seed} "
                 f"(phantom seeds {phantom_seeds(cases=cases, seed=seed, lidc=lidc)})")


# whole-body phantom seeds bench/pet measures on (ct2pet: 1000-1002, then 1003/1004 to confirm;
# pet-denoise: 1000-1002 and 1005-1010): the training commands refuse to validate on them
BENCH_PHANTOM_SEEDS = tuple(range(1000, 1011))


def validation_seeds_taken(*, cases: int, seed: int, validation_seed: int,
                           validation_cases: int) -> list[int]:
    """The validation phantom seeds asked for that are training phantoms (``cases``,
    ``seed``) or benchmark phantoms: training commands refuse them."""
    asked = set(range(validation_seed, validation_seed + validation_cases))
    return sorted(asked & (set(phantom_seeds(cases=cases, seed=seed)) | set(BENCH_PHANTOM_SEEDS)))


def phantom_seeds(*, cases: int, seed: int, lidc: bool = True) -> list[int]:
    """The whole-body phantom seeds of the twin's training CTs (``simulated_ct2pet_cases``,
    ``simulated_pet_pairs``) for these arguments: case i is phantom ``seed + i``, case 0
    lidc-idri-0001 instead when the shared data is present and ``lidc``."""
    first = 1 if lidc and _lidc() is not None else 0
    return [seed + i for i in range(first, cases)]


def site_ct2pet_cases(pair_dirs: list[str]
                      ) -> tuple[list[tuple[np.ndarray, np.ndarray, dict]], str]:
    """(CT [0,1], SUV / 20, district masks) on a 4 mm grid from a site's PET/CT studies given
    as CT_DIR:PET_DIR (one Frame of Reference; the PET in SUVbw, or pseudo-SUV without SUV
    factors), the PET resampled onto the CT's grid first."""
    from scipy import ndimage as ndi

    from dicomnode.dicom.volume import load_series
    from dicomnode.pipelines.ct2pet import SUV_MAX, district_masks, norm_ct
    from dicomnode.pipelines.pet_denoise import to_suv

    out = []
    for spec in pair_dirs:
        ct_dir, _, pet_dir = str(spec).partition(":")
        ct = load_series(sorted(p for p in Path(ct_dir).rglob("*") if p.is_file()),
                         modality="CT")
        pet = load_series(sorted(p for p in Path(pet_dir).rglob("*") if p.is_file()),
                          modality="PT")
        if ct.frame_of_reference_uid != pet.frame_of_reference_uid:
            raise ValueError(f"{spec}: the CT and the PET are not on one Frame of Reference")
        suv = resample_onto(to_suv(pet)[0], pet.affine, ct.affine, ct.shape)
        factors = [sp / 4.0 for sp in ct.spacing]
        ct4 = norm_ct(ndi.zoom(ct.array, factors, order=1))
        pet4 = ndi.zoom(suv, factors, order=1)
        masks = {k: ndi.zoom(v.astype(np.uint8), factors, order=0) > 0
                 for k, v in district_masks(ct.array, ct.spacing, ct.affine).items()}
        n = tuple(min(a, b) for a, b in zip(ct4.shape, pet4.shape, strict=True))
        out.append((ct4[: n[0], : n[1], : n[2]],
                    (np.clip(pet4[: n[0], : n[1], : n[2]], 0, SUV_MAX) / SUV_MAX
                     ).astype(np.float32),
                    {k: v[: n[0], : n[1], : n[2]] for k, v in masks.items()}))
    return out, f"site data: {len(out)} PET/CT studies"


def save_pairs(path: Path, pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
               description: str) -> None:
    """Training pairs to an .npz file (``load_pairs`` reads them back)."""
    arrays: dict[str, np.ndarray] = {"description": np.array(description)}
    for i, (low, full, lesions) in enumerate(pairs):
        arrays[f"low{i}"], arrays[f"full{i}"] = low, full
        if lesions is not None:
            arrays[f"lesions{i}"] = lesions
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]


def cached_pairs(path: Path | None, simulate: Callable[[], tuple[list[PetPair], str]]
                 ) -> tuple[list[PetPair], str]:
    """The pairs saved at ``path`` when it exists, else ``simulate()``'s, saved there
    (``path`` None: simulated, not saved); the simulation is the slow part of training."""
    if path is not None and path.exists():
        return load_pairs(path)
    pairs, source = simulate()
    if path is not None:
        save_pairs(path, pairs, source)
    return pairs, source


def load_pairs(path: Path) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], str]:
    """The pairs and description :func:`save_pairs` wrote."""
    with np.load(path) as data:
        n = sum(1 for k in data.files if k.startswith("low"))
        pairs = [(data[f"low{i}"], data[f"full{i}"],
                  data[f"lesions{i}"] if f"lesions{i}" in data.files else None)
                 for i in range(n)]
        return pairs, str(data["description"])
