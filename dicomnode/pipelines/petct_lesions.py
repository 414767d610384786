"""FDG PET/CT lesion delineation by threshold: the baselines a network must beat, and what
many sites use today. Weight-free; a study job (roles CT and PET, see ``node/study.py``).

* ``petct-suv25``: every voxel at SUVbw >= 2.5;
* ``petct-suv41``: regions seeded at SUVbw >= 2.5, each grown to 41 % of its own SUVmax (the
  EANM fixed-relative threshold), connected to its maximum.

Both keep only voxels inside the body (the CT resampled onto the PET grid, above -500 HU,
holes filled) and lesions of at least ``MIN_LESION_ML``. They write, on the PET grid and its
Frame of Reference, a SEG with one segment per lesion (SNOMED CT "Neoplasm"), and a TID 1500
measurement report: per lesion volume, SUVmax, SUVmean, SUVpeak (the highest mean in a 1 cm3
sphere centred in the lesion), and the study's metabolic tumour volume and total lesion
glycolysis. Physiological uptake (brain, heart, bladder, kidneys) is not excluded: that is
the known weakness of threshold methods, and why they are baselines.

Not here yet: the PERCIST liver-reference threshold (it needs a liver from the CT) and the
trained middle-fusion network of the issue (``petct-lesions``).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from dicomnode.dicom.grid import resample_onto
from dicomnode.dicom.volume import SeriesVolume, load_series
from dicomnode.dicom.write.common import OutputIdentity, save
from dicomnode.dicom.write.seg import SegmentSpec, build_seg, sct
from dicomnode.dicom.write.sr import LesionMeasures, build_lesion_report
from dicomnode.pipelines.base import JobContext, OutputFile, PipelineRefusal

__all__ = ["MIN_LESION_ML", "body_on_pet", "delineate", "lesion_measures", "run_suv25",
           "run_suv41"]

SEED_SUV = 2.5
RELATIVE = 0.41
MIN_LESION_ML = 0.5
MAX_LESIONS = 100  # segments in one SEG; the report says when more were found
PEAK_ML = 1.0
NEOPLASM = sct("108369006", "Neoplasm")
ABNORMAL = sct("49755003", "Morphologically Abnormal Structure")
CONNECT = np.ones((3, 3, 3), bool)  # 26-connected


def body_on_pet(ct: SeriesVolume, pet: SeriesVolume) -> np.ndarray:
    """The body on the PET grid: CT above -500 HU, holes filled slice by slice, the largest
    connected part."""
    hu = resample_onto(ct.array.astype(np.float32), ct.affine, pet.affine, pet.shape,
                       cval=-1024.0)
    body = hu > -500
    for k in range(body.shape[0]):
        body[k] = ndi.binary_fill_holes(body[k])
    labels, n = ndi.label(body)
    if n == 0:
        raise PipelineRefusal("empty", "no body in the CT where the PET is (CT above -500 HU)")
    sizes = ndi.sum(body, labels, range(1, n + 1))
    return np.asarray(labels == int(np.argmax(sizes)) + 1)


def delineate(suv: np.ndarray, body: np.ndarray, method: str) -> np.ndarray:
    """Lesion voxels by ``method`` ("suv25" or "suv41") inside ``body``."""
    seed = (suv >= SEED_SUV) & body
    if method == "suv25":
        return seed
    out = np.zeros_like(seed)
    labels, n = ndi.label(seed, structure=CONNECT)
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        # a margin around the seed, so the 41 % region may grow past the 2.5 seed
        grown = tuple(slice(max(0, b.start - 4), b.stop + 4) for b in box)
        local = suv[grown]
        region = labels[grown] == index
        peak_at = np.unravel_index(np.argmax(np.where(region, local, -np.inf)), local.shape)
        candidate = (local >= RELATIVE * local[peak_at]) & body[grown]
        parts, _ = ndi.label(candidate, structure=CONNECT)
        out[grown] |= parts == parts[peak_at]
    return out


def _peak_kernel(spacing: tuple[float, float, float]) -> np.ndarray:
    radius = (3 * PEAK_ML * 1000 / (4 * math.pi)) ** (1 / 3)  # mm: 6.2 for 1 ml
    half = [int(radius // s) for s in spacing]
    grid = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing, strict=True)],
                       indexing="ij")
    kernel = (sum(g**2 for g in grid) <= radius**2).astype(np.float64)
    return kernel / kernel.sum()


def lesion_measures(suv: np.ndarray, lesions: np.ndarray,
                    spacing: tuple[float, float, float]) -> list[LesionMeasures]:
    """Per label of ``lesions`` (1..n): volume, SUVmax, SUVmean, SUVpeak."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    smooth = ndi.correlate(suv.astype(np.float64), _peak_kernel(spacing), mode="constant")
    out = []
    for label in range(1, int(lesions.max()) + 1):
        inside = lesions == label
        values = suv[inside]
        out.append(LesionMeasures(segment_number=label, volume_ml=float(inside.sum()) * voxel_ml,
                                  suv_max=float(values.max()), suv_mean=float(values.mean()),
                                  suv_peak=float(smooth[inside].max())))
    return out


def _numbered(mask: np.ndarray, suv: np.ndarray, spacing: tuple[float, float, float]
              ) -> tuple[np.ndarray, int]:
    """Connected lesions of at least MIN_LESION_ML, numbered 1.. by falling SUVmax (at most
    MAX_LESIONS); and how many were found in all."""
    labels, n = ndi.label(mask, structure=CONNECT)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    keep = []
    for index in range(1, n + 1):
        inside = labels == index
        if inside.sum() * voxel_ml >= MIN_LESION_ML:
            keep.append((float(suv[inside].max()), index))
    keep.sort(reverse=True)
    out = np.zeros(mask.shape, np.uint16)
    for number, (_, index) in enumerate(keep[:MAX_LESIONS], start=1):
        out[labels == index] = number
    return out, len(keep)


def _run(ctx: JobContext, method: str, text: str) -> list[OutputFile]:
    t0 = time.perf_counter()
    if set(ctx.series_roles) != {"CT", "PET"}:
        raise PipelineRefusal("unsupported", "a PET/CT study job with the roles CT and PET")
    pet = load_series(list(ctx.series_roles["PET"]), modality="PT")
    ct = load_series(list(ctx.series_roles["CT"]), modality="CT")
    if pet.suv is None:
        raise PipelineRefusal("no_suv", "SUV thresholds need SUVbw factors from the PET "
                              f"header: {pet.suv_problem or 'not available'}")
    suv = pet.array * pet.suv.factor
    ctx.progress(0.3)
    t1 = time.perf_counter()
    body = body_on_pet(ct, pet)
    numbered, found = _numbered(delineate(suv, body, method), suv, pet.spacing)
    measures = lesion_measures(suv, numbered, pet.spacing)
    ctx.progress(0.7)
    t2 = time.perf_counter()
    base: dict[str, Any] = dict(source_series_uid=pet.series_instance_uid, pipeline=ctx.pipeline,
                                pipeline_version=ctx.pipeline_version,
                                series_number=ctx.series_number)
    outputs = []
    seg = None
    if measures:
        seg_identity = OutputIdentity(kind="SEG", series_description=(
            f"{ctx.series_description_prefix}FDG-avid lesions ({text})"), **base)
        segments = [SegmentSpec(label=f"FDG-avid lesion {m.segment_number}", category=ABNORMAL,
                                type=NEOPLASM, color=(255, 64, 0)) for m in measures]
        seg = build_seg(volume=pet, labels=numbered, segments=segments, identity=seg_identity,
                        seg_type=ctx.seg_type)
        path = save(seg, ctx.output_dir / f"seg-{seg_identity.sop_instance_uid(0)}.dcm")
        outputs.append(OutputFile(kind="SEG", index=0, sop_class_uid=str(seg.SOPClassUID),
                                  sop_instance_uid=str(seg.SOPInstanceUID),
                                  series_instance_uid=str(seg.SeriesInstanceUID), path=path))
    note = f"; {found} found, the {MAX_LESIONS} highest reported" if found > MAX_LESIONS else ""
    sr_identity = OutputIdentity(kind="SR", series_description=(
        f"{ctx.series_description_prefix}PET lesion report ({text}{note})"), **base)
    sr = build_lesion_report(seg=seg, pet_datasets=list(pet.datasets),
                             ct_datasets=list(ct.datasets), lesions=measures,
                             identity=sr_identity, method=text)
    path = save(sr, ctx.output_dir / f"sr-{sr_identity.sop_instance_uid(0)}.dcm")
    outputs.append(OutputFile(kind="SR", index=0, sop_class_uid=str(sr.SOPClassUID),
                              sop_instance_uid=str(sr.SOPInstanceUID),
                              series_instance_uid=str(sr.SeriesInstanceUID), path=path))
    ctx.timings.update(read_s=t1 - t0, infer_s=t2 - t1, write_s=time.perf_counter() - t2)
    ctx.progress(1.0)
    return outputs


def run_suv25(ctx: JobContext) -> list[OutputFile]:
    """Lesions at SUVbw >= 2.5."""
    return _run(ctx, "suv25", "SUVbw >= 2.5")


def run_suv41(ctx: JobContext) -> list[OutputFile]:
    """Lesions at 41 % of each region's SUVmax, seeded at SUVbw >= 2.5."""
    return _run(ctx, "suv41", "41 % of SUVmax")
