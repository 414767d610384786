"""FDG PET/CT lesion delineation: a middle-fusion U-Net, and the threshold baselines it must
beat (what many sites use today). Study jobs (roles CT and PET, see ``node/study.py``).

* ``petct-lesions``: the network of nets/fusion_unet.py (a model from models/), sliding
  windows with 0.5 overlap on the PET grid;
* ``petct-suv25``: every voxel at SUVbw >= 2.5;
* ``petct-suv41``: regions seeded at SUVbw >= 2.5, each grown to 41 % of its own SUVmax (the
  EANM fixed-relative threshold), connected to its maximum.

All keep only voxels inside the body (the CT resampled onto the PET grid, above -500 HU,
holes filled) and lesions of at least ``MIN_LESION_ML``. They write, on the PET grid and its
Frame of Reference, a SEG with one segment per lesion (SNOMED CT "Neoplasm"), and a TID 1500
measurement report: per lesion volume, SUVmax, SUVmean, SUVpeak (the highest mean in a 1 cm3
sphere centred in the lesion), and the study's metabolic tumour volume and total lesion
glycolysis. Physiological uptake (brain, heart, bladder, kidneys) is not excluded: that is
the known weakness of threshold methods, and why they are baselines.

The PERCIST liver-reference threshold, which first finds the liver on the CT, is
``petct-percist`` (percist.py), on the same writer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from dicomnode.dicom.grid import resample_onto
from dicomnode.dicom.volume import SeriesVolume, load_series
from dicomnode.dicom.write.common import OutputIdentity, save
from dicomnode.dicom.write.seg import SegmentSpec, build_seg, sct
from dicomnode.dicom.write.sr import LesionMeasures, build_lesion_report
from dicomnode.pipelines.base import JobContext, OutputFile, PipelineRefusal

__all__ = ["MIN_LESION_ML", "body_on_pet", "ct_on_pet", "delineate", "lesion_measures", "petct_inputs",
           "run_network", "run_suv25", "run_suv41"]

SEED_SUV = 2.5
RELATIVE = 0.41
MIN_LESION_ML = 0.5
MAX_LESIONS = 100  # segments in one SEG; the report says when more were found
PEAK_ML = 1.0
NEOPLASM = sct("108369006", "Neoplasm")
ABNORMAL = sct("49755003", "Morphologically Abnormal Structure")
CONNECT = np.ones((3, 3, 3), bool)  # 26-connected


def ct_on_pet(ct: SeriesVolume, pet: SeriesVolume) -> np.ndarray:
    """The CT's HU sampled at the PET's voxel centres (-1024 outside the CT), once per job:
    the body mask and the network both read it."""
    return resample_onto(ct.array.astype(np.float32), ct.affine, pet.affine, pet.shape,
                         cval=-1024.0)


def body_on_pet(hu_on_pet: np.ndarray) -> np.ndarray:
    """The body on the PET grid: CT above -500 HU, holes filled slice by slice, the largest
    connected part."""
    body = hu_on_pet > -500
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


# (job, CT HU on the PET grid, PET, SUV, body) -> (lesion mask, the model's identity or None,
# the method as the outputs name it, when it depends on the study, or None)
Delineator = Callable[[JobContext, np.ndarray, SeriesVolume, np.ndarray, np.ndarray],
                      tuple[np.ndarray, OutputIdentity | None, str | None]]


def _thresholds(method: str) -> Delineator:
    def delineator(ctx: JobContext, hu: np.ndarray, pet: SeriesVolume, suv: np.ndarray,
                   body: np.ndarray) -> tuple[np.ndarray, OutputIdentity | None, str | None]:
        return delineate(suv, body, method), None, None
    return delineator


def _run(ctx: JobContext, text: str, delineator: Delineator) -> list[OutputFile]:
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
    hu = ct_on_pet(ct, pet)
    body = body_on_pet(hu)
    mask, model, how = delineator(ctx, hu, pet, suv, body)
    text = how or text
    numbered, found = _numbered(mask & body, suv, pet.spacing)
    measures = lesion_measures(suv, numbered, pet.spacing)
    ctx.progress(0.7)
    t2 = time.perf_counter()
    base: dict[str, Any] = dict(source_series_uid=pet.series_instance_uid, pipeline=ctx.pipeline,
                                pipeline_version=ctx.pipeline_version,
                                series_number=ctx.series_number)
    if model is not None:  # the model's name, version, weights and training data, on both
        base.update(model_name=model.model_name, model_version=model.model_version,
                    trained_on=model.trained_on, weights_sha256=model.weights_sha256)
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
    return _run(ctx, "SUVbw >= 2.5", _thresholds("suv25"))


def run_suv41(ctx: JobContext) -> list[OutputFile]:
    """Lesions at 41 % of each region's SUVmax, seeded at SUVbw >= 2.5."""
    return _run(ctx, "41 % of SUVmax", _thresholds("suv41"))


DEFAULT_MODEL = "petct-lesions-fusion"


def petct_inputs(hu_on_pet: np.ndarray, suv: np.ndarray, suv_scale: float = 20.0) -> np.ndarray:
    """The network's input, (2, z, y, x) float32: CT [0, 1] from [-1000, 1000] HU, SUV /
    ``suv_scale`` (training draws 20 or 40; inference uses 20)."""
    ct = (np.clip(hu_on_pet, -1000.0, 1000.0) + 1000.0) / 2000.0
    return np.stack([ct, suv / suv_scale]).astype(np.float32)


def _network(ctx: JobContext, hu: np.ndarray, pet: SeriesVolume, suv: np.ndarray,
             body: np.ndarray) -> tuple[np.ndarray, OutputIdentity | None, str | None]:
    """The middle-fusion U-Net (nets/fusion_unet.py), sliding windows with 0.5 overlap on the
    PET grid; a voxel is lesion where the sigmoid is at least 0.5."""
    import torch
    from monai.inferers import sliding_window_inference

    from dicomnode.pipelines.base import job_model, model_identity

    model = job_model(ctx, default=DEFAULT_MODEL)
    manifest = model.entry.manifest
    x = torch.from_numpy(petct_inputs(hu, suv)[None]).to(model.device)
    with torch.no_grad():
        logits = sliding_window_inference(x, roi_size=tuple(manifest.roi_size), sw_batch_size=2,
                                          predictor=model.network, overlap=manifest.overlap,
                                          mode="gaussian", padding_mode="replicate")
    assert isinstance(logits, torch.Tensor)
    mask = (torch.sigmoid(logits)[0, 0] >= 0.5).cpu().numpy()
    return mask, model_identity(ctx, pet, manifest, kind="SEG", description=""), None


def run_network(ctx: JobContext) -> list[OutputFile]:
    """Lesions by the middle-fusion U-Net (a model from models/, default
    ``petct-lesions-fusion``)."""
    return _run(ctx, "middle-fusion U-Net", _network)
