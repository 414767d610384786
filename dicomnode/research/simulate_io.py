"""``dicomnode simulate``: the PET/CT twin written as DICOM (CT, full / low-dose PET, lesion SEG).

The PET series are PET Image Storage in Bq/ml (Units BQML) with the SUV factors of a nominal
75 kg patient injected with the simulated dose 60 min before, all on the CT's Frame of
Reference; their SeriesDescription and ImageComments say they are simulated. The lesions are a
SEG on the full-dose PET.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from dicomnode.dicom.volume import SeriesVolume, SUVFactors, load_series
from dicomnode.dicom.write.common import OutputIdentity, save
from dicomnode.dicom.write.pet import F18_HALF_LIFE_S, build_derived_pet
from dicomnode.dicom.write.seg import SegmentSpec, build_seg, sct
from dicomnode.research.simulate import PATIENT_ML, POSTFILTER_MM, UPTAKE_S, PetTwin, simulate_pet

__all__ = ["SimulatedCase", "nominal_activity", "pet_grid_volume", "write_case"]


def nominal_activity(dose_mbq: float, *, weight_kg: float = PATIENT_ML / 1000,
                     uptake_s: float = UPTAKE_S
                     ) -> SUVFactors:
    """SUV factors of the simulated patient (Bq/ml = SUV / factor)."""
    decayed = dose_mbq * 1e6 * 2 ** (-uptake_s / F18_HALF_LIFE_S)
    return SUVFactors(factor=weight_kg * 1000 / decayed, weight_kg=weight_kg,
                      injected_dose_bq=dose_mbq * 1e6, half_life_s=F18_HALF_LIFE_S,
                      decay_s=uptake_s, decay_correction="START")


def pet_grid_volume(ct: SeriesVolume, shape: tuple[int, int, int],
                    spacing: tuple[float, float, float]) -> SeriesVolume:
    """A volume description of the PET grid: same origin corner, axes and Frame of Reference
    as the CT, voxel size ``spacing``; headers borrowed from the nearest CT slices."""
    affine = ct.affine.copy()
    for axis in range(3):
        unit = ct.affine[:3, axis] / np.linalg.norm(ct.affine[:3, axis])
        affine[:3, axis] = unit * spacing[axis]
    # keep the corner of the field of view: shift by half a voxel of the difference
    corner = ct.affine[:3, 3] - 0.5 * ct.affine[:3, :3].sum(axis=1)
    affine[:3, 3] = corner + 0.5 * affine[:3, :3].sum(axis=1)
    z_ct = np.array([np.asarray(p) for p in ct.slice_positions])
    positions = [affine[:3, 3] + affine[:3, 0] * k for k in range(shape[0])]
    picks = [int(np.argmin(np.linalg.norm(z_ct - p, axis=1))) for p in positions]
    return SeriesVolume(
        array=np.zeros(shape, np.float32), affine=affine, modality="CT", units="HU",
        datasets=tuple(ct.datasets[i] for i in picks), frames=tuple(None for _ in picks),
        frame_of_reference_uid=ct.frame_of_reference_uid,
        series_instance_uid=ct.series_instance_uid, study_instance_uid=ct.study_instance_uid,
        slice_thickness=spacing[0],
        slice_positions=tuple((float(p[0]), float(p[1]), float(p[2])) for p in positions))


@dataclass(frozen=True)
class SimulatedCase:
    """Where a written case lives."""

    ct: Path
    full: Path
    low: dict[int, Path]
    lesions: Path | None
    twin: PetTwin


def _write_series(values_suv: np.ndarray, grid: SeriesVolume, folder: Path, *, kind: str,
                  description: str, activity: SUVFactors, number: int) -> list[Dataset]:
    ident = OutputIdentity(source_series_uid=grid.series_instance_uid, pipeline="simulate",
                           pipeline_version="1", kind=kind, series_number=number,
                           series_description=description,
                           model_name="dicomnode PET/CT twin", model_version="1",
                           trained_on="n/a: simulated from the CT")
    dss = build_derived_pet(values=values_suv / activity.factor, volume=grid, identity=ident,
                            description=f"SIMULATED PET ({description}) from the CT by "
                                        "dicomnode's PET/CT twin", activity=activity)
    for k, ds in enumerate(dss):
        save(ds, folder / f"{k:04d}.dcm")
    return dss


def write_case(ct_files: list[Path], out: Path, *, drfs: tuple[int, ...] = (4, 10),
               seed: int = 0, dose_mbq: float = 300.0, **kwargs: object) -> SimulatedCase:
    """Simulate one case from a CT series and write it under ``out``."""
    ct = load_series(ct_files, modality="CT")
    twin = simulate_pet(ct.array, ct.spacing, drfs=drfs, seed=seed, dose_mbq=dose_mbq,
                        **kwargs)  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    ct_dir = out / "ct"
    ct_dir.mkdir(exist_ok=True)
    for f in ct_files:
        shutil.copy2(f, ct_dir / Path(f).name)
    grid = pet_grid_volume(ct, twin.full.shape, twin.spacing)
    activity = nominal_activity(dose_mbq)
    _write_series(twin.full, grid, out / "pet-full", kind="PT-full", number=9101,
                  description="SIMULATED PET full dose", activity=activity)
    low_dirs = {}
    for drf, img in twin.low.items():
        low_dirs[drf] = out / f"pet-drf{drf}"
        _write_series(img, grid, low_dirs[drf], kind=f"PT-drf{drf}", number=9101 + drf,
                      description=f"SIMULATED PET 1/{drf} dose", activity=activity)
    seg_path = None
    if twin.lesions.any():
        pet = load_series(sorted((out / "pet-full").iterdir()))
        n = int(twin.lesions.max())
        spec = [SegmentSpec(label=f"Lesion {i + 1}", category=sct("49755003",
                            "Morphologically Altered Structure"), type=sct("52988006", "Lesion"),
                            color=(255, 40, 40)) for i in range(n)]
        ident = OutputIdentity(source_series_uid=pet.series_instance_uid, pipeline="simulate",
                               pipeline_version="1", kind="SEG-lesions", series_number=9100,
                               series_description="SIMULATED lesions")
        seg = build_seg(volume=pet, labels=twin.lesions.astype(np.uint16), segments=spec,
                        identity=ident)
        seg_path = save(seg, out / "lesions-seg.dcm")
    return SimulatedCase(ct=ct_dir, full=out / "pet-full", low=low_dirs, lesions=seg_path,
                         twin=twin)


def lowdose_from_pet(pet_files: list[Path], out: Path, *, drf: int, seed: int = 0,
                     counts_per_slice: float = 2e5, angles: int = 96,
                     postfilter_mm: float = POSTFILTER_MM) -> Path:
    """A low-dose version of a real PET series (``dicomnode simulate lowdose``).

    The image is taken as the mean activity; each slice is forward projected, given
    ``counts_per_slice`` expected counts (the real raw counts are not in the DICOM), sampled
    with Poisson noise, thinned by 1/DRF and reconstructed with OSEM and the twin's
    post-filter (``postfilter_mm``, as the scanner would reconstruct a short frame with the
    protocol of the full one); values keep the source's units and SUV factors. Written as a
    derived PET series labelled simulated.
    """
    from dicomnode.research.simulate import gaussian_fwhm, osem, project, thin_counts

    rng = np.random.default_rng(seed)
    pet = load_series(pet_files, modality="PT")
    ang = np.linspace(0.0, 180.0, angles, endpoint=False)
    img = np.clip(pet.array, 0, None)
    low = np.zeros_like(img)
    for k, sl in enumerate(img):
        clean = project(sl, ang)
        if clean.sum() <= 0:
            continue
        scale = counts_per_slice / clean.sum()
        counts = thin_counts(rng.poisson(clean * scale).astype(np.float64), drf, rng)
        low[k] = osem(counts, ang, sl.shape) / (scale / drf)
    low = gaussian_fwhm(low, pet.spacing, postfilter_mm)
    ident = OutputIdentity(source_series_uid=pet.series_instance_uid, pipeline="simulate-lowdose",
                           pipeline_version="1", kind=f"PT-drf{drf}", series_number=9200 + drf,
                           series_description=f"SIMULATED 1/{drf} dose PET")
    for k, ds in enumerate(build_derived_pet(
            values=low.astype(np.float32), volume=pet, identity=ident,
            description=f"SIMULATED low-dose PET: counts thinned by DRF {drf} and reconstructed "
                        "with OSEM by dicomnode's PET twin")):
        save(ds, out / f"{k:04d}.dcm")
    return out
