"""``pet-denoise``: low-dose PET -> enhanced PET with DRMC, units and SUV factors kept.

Intensities: BQML with SUV factors -> SUVbw; other units (CNTS, PROPCNTS) -> a pseudo-SUV that
puts the mean of the voxels above 10 % of the maximum at 1.0 (what soft tissue is in the
training data). The model sees SUV / 10 and is applied in overlapping windows (Gaussian
blending); values are scaled back, so the series keeps its units, and a viewer's SUV tool gives
the same numbers as on the source. The shipped models were trained on simulated data only
(``models/pet-denoise-drmc*/manifest.yaml``), which the output series says.

Activity level: the network is not scale-equivariant, and SUVs depend on what a site enters
(the Philips phantom's header SUV factors put its object at 0.47 instead of about 1). A model's
manifest gives the range of its training inputs' ``activity_level`` (``input_level``); a series
outside it is scaled to the nearer end before the network and scaled back after, so the output
keeps the series' units, and the output series says by how much. Inside the range nothing
changes. Measured in docs/research/pet-twin.md (the Philips phantom).

Which model: the one the rule names (``models: {pet-denoise: NAME}``); otherwise, of the
shipped ``DEFAULT_MODELS`` present, the one whose training voxel size (``spacing_mm`` in its
manifest) is nearest, by ratio, to the series' (the cube root of the voxel volume). A small
network fits the voxel size it was trained on (docs/research/pet-experiments.md), and resampling the
series to the model's grid instead was measured worse (docs/research/pet-twin.md).

Training (``dicomnode train pet-denoise``) is :mod:`dicomnode.research.train_pet_denoise`: it
simulates cases with the PET/CT twin (or reads a site's pairs of DICOM folders) and writes a
model directory with its manifest.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from dicomnode.dicom.volume import SeriesVolume, load_series
from dicomnode.dicom.write.pet import build_derived_pet
from dicomnode.pipelines.base import (
    JobContext,
    OutputFile,
    PipelineRefusal,
    job_model,
    model_identity,
    save_outputs,
)
from dicomnode.pipelines.models import LoadedModel

__all__ = ["DEFAULT_MODELS", "activity_level", "by_voxel_size", "choose_model", "denoise",
           "input_scale", "run", "to_suv", "voxel_mm"]

# chosen between by voxel size when the rule names no model
DEFAULT_MODELS = ("pet-denoise-drmc", "pet-denoise-drmc-2mm")
SCALE = 10.0  # the network sees SUV / 10


def to_suv(volume: SeriesVolume) -> tuple[np.ndarray, float, str]:
    """(SUV-like array, factor such that SUV = value * factor, how it was obtained)."""
    if volume.suv is not None:
        return volume.array * volume.suv.factor, volume.suv.factor, "SUVbw from the header"
    top = float(volume.array.max())
    if top <= 0:
        raise PipelineRefusal("empty", "the PET series has no positive values")
    mean = float(volume.array[volume.array > 0.1 * top].mean())
    return volume.array / mean, 1.0 / mean, f"pseudo-SUV ({volume.units}: no SUV factors)"


def voxel_mm(spacing: Sequence[float]) -> float:
    """The edge of a cube with the voxel's volume."""
    return float(np.prod([float(v) for v in spacing])) ** (1 / 3)


def choose_model(models: Sequence[LoadedModel], spacing: Sequence[float]) -> LoadedModel:
    """The model whose training voxel size is nearest (by ratio) to ``spacing``; models whose
    manifest gives no ``spacing_mm`` only where none does (the first, then)."""
    size = voxel_mm(spacing)

    def distance(model: LoadedModel) -> float:
        trained = model.entry.manifest.spacing_mm
        return abs(math.log(size / voxel_mm(trained))) if trained else math.inf

    return min(models, key=distance)


def by_voxel_size(spacing: Sequence[float]) -> Callable[[list[LoadedModel]],
                                                         tuple[LoadedModel, str]]:
    """``job_model``'s ``choose`` for a series of this voxel spacing: ``choose_model``, and
    why."""
    def choose(found: list[LoadedModel]) -> tuple[LoadedModel, str]:
        model = choose_model(found, spacing)
        trained = model.entry.manifest.spacing_mm
        return model, (f"chosen for the series' {voxel_mm(spacing):.2f} mm voxels"
                       + (f", trained on {voxel_mm(trained):g} mm" if trained else ""))

    return choose


def activity_level(suv: np.ndarray) -> float:
    """The median SUV of the object: of the voxels whose smoothed value (Gaussian, sigma 1.5
    voxels) is above 5 % of the smoothed image's 99.9th percentile. About 0.8-1.0 on the
    twin's cases (soft tissue at SUV 1), 0.45 on the Philips phantom of the shared data."""
    from scipy.ndimage import gaussian_filter

    x = np.clip(np.asarray(suv, dtype=np.float32), 0, None)
    smooth = gaussian_filter(x, 1.5)
    inside = smooth > 0.05 * float(np.percentile(smooth, 99.9))
    return float(np.median(x[inside])) if inside.any() else 0.0




def input_scale(model: LoadedModel, suv: np.ndarray) -> tuple[float, float]:
    """(factor, activity level): 1 where the model's manifest gives no ``input_level`` (the
    level is not computed then: NaN), the level lies inside it, or the image is empty; else
    the factor that brings the level to the nearer end of the range."""
    bounds = model.entry.manifest.input_level
    if bounds is None:
        return 1.0, math.nan
    level = activity_level(suv)
    if level <= 0 or bounds[0] <= level <= bounds[1]:
        return 1.0, level
    return min(max(level, bounds[0]), bounds[1]) / level, level


def denoise(model: LoadedModel, suv: np.ndarray, *, roi: int = 32, overlap: float = 0.5,
            scale: float = 1.0) -> np.ndarray:
    """DRMC over the whole volume in overlapping windows (Gaussian blending), on ``suv``
    times ``scale`` (``input_scale``), divided by it again after."""
    import torch
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.ascontiguousarray(np.clip(suv, 0, None) * (scale / SCALE),
                                              dtype=np.float32))[None, None]
    size = tuple(min(roi, s) for s in suv.shape)
    cuda = model.device.startswith("cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        out = sliding_window_inference(x, roi_size=size, sw_batch_size=4,
                                       predictor=model.network, overlap=overlap,
                                       mode="gaussian", sw_device=model.device, device="cpu")
    assert isinstance(out, torch.Tensor)
    return np.clip(out.float()[0, 0].numpy() * (SCALE / scale), 0, None)


def run(ctx: JobContext) -> list[OutputFile]:
    """Enhance one PET series."""
    t0 = time.perf_counter()
    volume = load_series(list(ctx.input_files), modality="PT")
    suv, factor, how = to_suv(volume)
    model = job_model(ctx, default=DEFAULT_MODELS, choose=by_voxel_size(volume.spacing))
    t1 = time.perf_counter()
    m = model.entry.manifest
    scale, level = input_scale(model, suv)
    enhanced = denoise(model, suv, roi=m.roi_size[0], scale=scale)
    t2 = time.perf_counter()
    identity = model_identity(ctx, volume, m, kind="PT", description="PET enhanced (DRMC)")
    scaled = ("" if scale == 1.0 or m.input_level is None else
              f"; input scaled x{scale:.2f} into the model's training activity range "
              f"(median SUV in the object {level:.2f}, trained on {m.input_level[0]:.2f}-"
              f"{m.input_level[1]:.2f}) and back")
    # one sentence for the viewer's info panel; the rest (the scaling, the model's whole
    # training lineage, which can be long) in ImageComments and ContributingEquipment
    description = identity.label("Low-dose PET enhanced (DRMC)")
    details = (f"Model {m.name} {m.version} ({ctx.model_used['chosen']}); intensities via "
               f"{how}{scaled}; units and SUV factors as the source. "
               + (f"Validated on {m.validated_on}. " if m.validated_on else "")
               + f"Model trained on {m.trained_on}")
    outputs = save_outputs(build_derived_pet(values=(enhanced / factor).astype(np.float32),
                                             volume=volume, identity=identity,
                                             description=description, details=details),
                           ctx.output_dir, kind="PT", prefix="pt")
    ctx.timings.update(read_s=t1 - t0, infer_s=t2 - t1, write_s=time.perf_counter() - t2)
    ctx.progress(1.0)
    return outputs














