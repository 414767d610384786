"""``ct-organs``: a segmentation model (a MONAI bundle or a dicomnode model) on a CT -> SEG.

The model is named in the rule (``models: {ct-organs: NAME}``). Inference: intensities
normalised as the manifest says, resampled to the model's spacing when it gives one,
sliding-window inference with Gaussian blending (MONAI), windows on the device and the whole
volume stitched on the CPU (so large volumes fit), bf16 autocast on CUDA; labels from argmax,
resampled back to the CT grid (nearest), written as a SEG with the manifest's SNOMED codes.
Workers keep loaded models between jobs (a per-process cache).
"""

from __future__ import annotations

import time

import numpy as np
from pydicom.sr.coding import Code

from dicomnode.dicom.volume import load_series
from dicomnode.dicom.write.common import save
from dicomnode.dicom.write.seg import SegmentSpec, build_seg
from dicomnode.pipelines.base import (
    JobContext,
    OutputFile,
    PipelineRefusal,
    job_model,
    model_identity,
)
from dicomnode.pipelines.models import LoadedModel, ModelEntry

__all__ = ["infer_labels", "run"]

def infer_labels(model: LoadedModel, hu: np.ndarray, spacing: tuple[float, float, float]
                 ) -> np.ndarray:
    """Label map (slices, rows, cols) for a HU volume on its own grid."""
    import torch
    from monai.inferers import sliding_window_inference
    from scipy.ndimage import zoom

    m = model.entry.manifest
    x = hu.astype(np.float32)
    if m.normalisation.kind == "window":
        x = np.clip((x - m.normalisation.min) / (m.normalisation.max - m.normalisation.min), 0, 1)
    factors = None
    if m.spacing_mm:
        factors = tuple(s / t for s, t in zip(spacing, m.spacing_mm, strict=True))
        x = zoom(x, factors, order=1)
    tensor = torch.from_numpy(np.ascontiguousarray(x))[None, None]
    roi = tuple(min(r, s) for r, s in zip(m.roi_size, x.shape, strict=True))
    cuda = model.device.startswith("cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        logits = sliding_window_inference(
            tensor, roi_size=roi, sw_batch_size=2, predictor=model.network,
            overlap=m.overlap, mode="gaussian", sw_device=model.device, device="cpu")
    if not isinstance(logits, torch.Tensor):
        raise PipelineRefusal("model_output", "the network must return one tensor of logits")
    labels = torch.argmax(logits.float(), dim=1)[0].numpy().astype(np.uint16)
    if factors is not None:
        back = tuple(t / s for s, t in zip(labels.shape, hu.shape, strict=True))
        labels = zoom(labels, back, order=0)[: hu.shape[0], : hu.shape[1], : hu.shape[2]]
    return labels


def _segments(entry: ModelEntry) -> dict[int, SegmentSpec]:
    return {
        lab.value: SegmentSpec(
            label=lab.label,
            category=Code(lab.category.value, lab.category.scheme, lab.category.meaning),
            type=Code(lab.type.value, lab.type.scheme, lab.type.meaning),
            color=lab.color,
        )
        for lab in entry.manifest.labels
    }


def run(ctx: JobContext) -> list[OutputFile]:
    """Segment the CT with the rule's model and write one SEG."""
    model = job_model(ctx)
    name = model.entry.manifest.name
    t0 = time.perf_counter()
    volume = load_series(list(ctx.input_files), modality="CT")
    t1 = time.perf_counter()
    labels = infer_labels(model, volume.array, volume.spacing)
    t2 = time.perf_counter()
    specs = _segments(model.entry)
    present = [v for v in sorted(specs) if (labels == v).any()]
    if not present:
        raise PipelineRefusal("empty", f"model {name} found none of its labels in this CT")
    remap = np.zeros(int(labels.max()) + 1, np.uint16)
    for i, v in enumerate(present, start=1):
        remap[v] = i
    compact = remap[np.clip(labels, 0, len(remap) - 1)]
    m = model.entry.manifest
    identity = model_identity(ctx, volume, m, kind="SEG", description=f"{m.name} segmentation")
    seg = build_seg(volume=volume, labels=compact, segments=[specs[v] for v in present],
                    identity=identity, seg_type=ctx.seg_type)
    path = save(seg, ctx.output_dir / f"seg-{identity.sop_instance_uid(0)}.dcm")
    ctx.timings.update(read_s=t1 - t0, infer_s=t2 - t1, write_s=time.perf_counter() - t2)
    ctx.progress(1.0)
    return [OutputFile(kind="SEG", index=0, sop_class_uid=str(seg.SOPClassUID),
                       sop_instance_uid=str(seg.SOPInstanceUID),
                       series_instance_uid=str(seg.SeriesInstanceUID), path=path)]
