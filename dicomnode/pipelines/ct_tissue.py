"""``ct-tissue``: weight-free CT segmentation from HU thresholds, morphology and components.

Segments: body, left and right lung, bone, adipose tissue, soft tissue, and the four districts
of the CT->PET district paper (head/neck, trunk, arms, legs) where the field of view shows
them. Tissue classes follow common HU windows: adipose -190..-30 HU, soft tissue -29..150 HU,
bone >= 200 HU (tissue classes on 3x3 in-plane smoothed HU), lung = air enclosed by the body.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from dicomnode.dicom.volume import SeriesVolume, load_series
from dicomnode.dicom.write.common import OutputIdentity, save
from dicomnode.dicom.write.seg import ANATOMICAL_STRUCTURE, TISSUE, SegmentSpec, build_seg, sct
from dicomnode.pipelines.base import JobContext, OutputFile, PipelineRefusal

__all__ = ["SEGMENTS", "TissueResult", "districts", "run", "segment_tissue"]

SEGMENTS: dict[str, SegmentSpec] = {
    "body": SegmentSpec(label="Body", category=ANATOMICAL_STRUCTURE,
                        type=sct("38266002", "Entire body as a whole"), color=(177, 122, 101)),
    "lung_left": SegmentSpec(label="Left lung", category=ANATOMICAL_STRUCTURE,
                             type=sct("44029006", "Left lung structure"), color=(197, 165, 145)),
    "lung_right": SegmentSpec(label="Right lung", category=ANATOMICAL_STRUCTURE,
                              type=sct("3341006", "Right lung structure"), color=(172, 138, 115)),
    "bone": SegmentSpec(label="Bone", category=ANATOMICAL_STRUCTURE,
                        type=sct("272673000", "Bone structure"), color=(241, 214, 145)),
    "adipose": SegmentSpec(label="Adipose tissue", category=TISSUE,
                           type=sct("55603005", "Adipose tissue"), color=(230, 220, 70)),
    "soft_tissue": SegmentSpec(label="Soft tissue", category=TISSUE,
                               type=sct("87784001", "Soft tissue"), color=(192, 104, 88)),
    "head_neck": SegmentSpec(label="Head and neck", category=ANATOMICAL_STRUCTURE,
                             type=sct("774007", "Head and neck"), color=(128, 174, 128)),
    "trunk": SegmentSpec(label="Trunk", category=ANATOMICAL_STRUCTURE,
                         type=sct("22943007", "Trunk structure"), color=(111, 184, 210)),
    "arms": SegmentSpec(label="Upper limbs", category=ANATOMICAL_STRUCTURE,
                        type=sct("53120007", "Upper limb structure"), color=(216, 101, 79)),
    "legs": SegmentSpec(label="Lower limbs", category=ANATOMICAL_STRUCTURE,
                        type=sct("61685007", "Lower limb structure"), color=(183, 156, 220)),
}
TISSUE_KEYS = ("lung_left", "lung_right", "bone", "adipose", "soft_tissue")
DISTRICT_KEYS = ("head_neck", "trunk", "arms", "legs")


@dataclass(frozen=True)
class TissueResult:
    """Boolean masks by segment key (only non-empty ones are written)."""

    masks: dict[str, np.ndarray]

    def volume_ml(self, key: str, voxel_ml: float) -> float:
        """Volume of one segment in millilitres."""
        return float(self.masks[key].sum()) * voxel_ml


def _largest(mask: np.ndarray) -> np.ndarray:
    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = ndi.sum(mask, labels, range(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The patient: > -500 HU, opened in-plane (drops the table), largest 3-D component, holes
    filled slice by slice."""
    mask = hu > -500
    mask = ndi.binary_opening(mask, structure=np.ones((1, 5, 5), bool))
    mask = _largest(mask)
    for k in range(mask.shape[0]):
        mask[k] = ndi.binary_fill_holes(mask[k])
    return mask


def segment_tissue(volume: SeriesVolume) -> TissueResult:
    """All tissue and district masks of a CT volume (HU)."""
    hu = volume.array
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    body = body_mask(hu)
    masks: dict[str, np.ndarray] = {"body": body}
    # lungs: air enclosed by the body, large components only (not bowel gas or the trachea)
    air = body & (hu < -400)
    air = ndi.binary_opening(air, structure=np.ones((1, 3, 3), bool))
    labels, n = ndi.label(air)
    lungs = np.zeros_like(body)
    left = np.zeros_like(body)
    right = np.zeros_like(body)
    if n:
        sizes = ndi.sum(air, labels, range(1, n + 1)) * voxel_ml
        order = np.argsort(sizes)[::-1]
        keep = [i + 1 for i in order[:2] if sizes[i] > 150.0]
        lungs = np.isin(labels, keep)
        if lungs.any():
            # left/right by the patient's x (LPS: +x is the patient's left)
            k, i, j = np.nonzero(lungs)
            x = volume.affine[0, 0] * k + volume.affine[0, 1] * i + volume.affine[0, 2] * j \
                + volume.affine[0, 3]
            if len(keep) == 2:
                comp = labels[k, i, j]
                mean_x = {c: float(x[comp == c].mean()) for c in keep}
                lcomp = max(keep, key=lambda c: mean_x[c])
                left = labels == lcomp
                right = lungs & ~left
            else:  # the two lungs touch: split at the body's midline
                mid = float(np.median(x))
                left = np.zeros_like(body)
                left[k[x > mid], i[x > mid], j[x > mid]] = True
                right = lungs & ~left
    masks["lung_left"], masks["lung_right"] = left, right
    smooth = ndi.uniform_filter(hu, size=(1, 3, 3))
    bone = body & (smooth >= 200) & ~lungs
    bone = ndi.binary_opening(bone, structure=np.ones((1, 2, 2), bool))
    masks["bone"] = bone
    # tissue classes on in-plane smoothed HU: thresholds on raw noise give speckled masks
    masks["adipose"] = body & (smooth >= -190) & (smooth <= -30) & ~lungs & ~bone
    masks["soft_tissue"] = body & (smooth > -30) & (smooth <= 150) & ~lungs & ~bone
    masks.update(districts(body, volume))
    return TissueResult(masks=masks)


def districts(body: np.ndarray, volume: SeriesVolume) -> dict[str, np.ndarray]:
    """Head/neck, trunk, arms and legs from the body's axial cross-sections.

    The trunk is the largest 2-D component of each slice; other sizeable components are arms
    (above the pelvis) or legs (below it, where the body splits into two comparable parts);
    slices superior to the widest (shoulder) level whose cross-section is under 45 % of the
    widest are head/neck.
    """
    out = {key: np.zeros_like(body) for key in DISTRICT_KEYS}
    pixel_mm2 = volume.spacing[1] * volume.spacing[2]
    # patient z of each slice (LPS: +z is superior)
    z = volume.affine[2, 0] * np.arange(body.shape[0]) + volume.affine[2, 3]
    main_area = np.zeros(body.shape[0])
    comps = []
    for k in range(body.shape[0]):
        labels, n = ndi.label(body[k])
        sizes = ndi.sum(body[k], labels, range(1, n + 1)) * pixel_mm2 if n else np.array([])
        comps.append((labels, sizes))
        main_area[k] = sizes.max() if n else 0.0
    if not main_area.any():
        return out
    widest = int(np.argmax(main_area))
    legs_from: float | None = None  # slices with z below this are legs
    for k in np.argsort(z)[::-1]:  # superior to inferior
        labels, sizes = comps[k]
        if z[k] >= z[widest] or len(sizes) < 2:
            continue
        top2 = np.sort(sizes)[::-1][:2]
        if top2[1] > 0.5 * top2[0] and top2.sum() > 0.6 * sizes.sum() and top2[1] > 3000:
            legs_from = float(z[k])
            break
    for k in range(body.shape[0]):
        labels, sizes = comps[k]
        if not len(sizes):
            continue
        main = int(np.argmax(sizes)) + 1
        if legs_from is not None and z[k] <= legs_from:
            for c, size in enumerate(sizes, start=1):
                if size > 3000:
                    out["legs"][k] |= labels == c
            continue
        if z[k] > z[widest] and main_area[k] < 0.45 * main_area[widest]:
            out["head_neck"][k] |= labels == main
        else:
            out["trunk"][k] |= labels == main
        for c, size in enumerate(sizes, start=1):
            if c != main and size > 400:
                out["arms"][k] |= labels == c
    return out


def run(ctx: JobContext) -> list[OutputFile]:
    """The job: read the CT series, segment it, write one SEG."""
    t0 = time.perf_counter()
    volume = load_series(list(ctx.input_files), modality="CT",
                         resample=bool(ctx.options.get("resample", False)))
    ctx.progress(0.2)
    t1 = time.perf_counter()
    result = segment_tissue(volume)
    ctx.progress(0.7)
    t2 = time.perf_counter()
    keys = [k for k in SEGMENTS if result.masks[k].any()]
    if ctx.seg_type == "LABELMAP":
        keys = [k for k in keys if k in TISSUE_KEYS]  # a label map cannot hold overlaps
    if not keys:
        raise PipelineRefusal("empty", "no body found in the CT (all voxels below -500 HU?)")
    masks = np.stack([result.masks[k] for k in keys], axis=-1)
    identity = OutputIdentity(
        source_series_uid=volume.series_instance_uid, pipeline=ctx.pipeline,
        pipeline_version=ctx.pipeline_version, kind="SEG", series_number=ctx.series_number,
        series_description=f"{ctx.series_description_prefix}CT tissue segmentation",
    )
    seg = build_seg(volume=volume, masks=masks, segments=[SEGMENTS[k] for k in keys],
                    identity=identity, seg_type=ctx.seg_type)
    path = save(seg, ctx.output_dir / f"seg-{identity.sop_instance_uid(0)}.dcm")
    t3 = time.perf_counter()
    ctx.timings.update(read_s=t1 - t0, infer_s=t2 - t1, write_s=t3 - t2)
    if ctx.options.get("preview"):
        from dicomnode.dicom.preview import seg_preview

        shown = [k for k in keys if k in TISSUE_KEYS]
        seg_preview(volume.array, volume.spacing,
                    np.stack([result.masks[k] for k in shown], axis=-1),
                    [SEGMENTS[k].color for k in shown], ctx.output_dir / "preview")
    ctx.progress(1.0)
    return [OutputFile(kind="SEG", index=0, sop_class_uid=str(seg.SOPClassUID),
                       sop_instance_uid=str(seg.SOPInstanceUID),
                       series_instance_uid=str(seg.SeriesInstanceUID), path=path)]
