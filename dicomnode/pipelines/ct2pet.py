"""``ct2pet``: district-specific CT -> synthetic PET (METHODS.md 3).

* districts (head/neck, trunk, arms, legs) from ``ct-tissue``;
* one 3-D Pix2Pix per district: U-Net generator, PatchGAN discriminator on (CT, PET), loss
  adversarial + 100 x L1; plus one whole-body model, the baseline the paper compares against
  and the fallback for a district without its own model;
* CT: HU clipped to [-1000, 1000] -> [0, 1]; PET: SUV clipped to [0, 20] -> / 20;
* inference on 32^3 patches with a 16-voxel stride, overlapping predictions blended with
  Gaussian weights (a plain average left the patch edges visible in a viewer); each
  district's prediction placed with its mask; the result resampled to the CT grid and written
  as a synthetic PET (Units GML) on the CT's Frame of Reference, labelled SYNTHETIC.

Training (``dicomnode train ct2pet``, :mod:`dicomnode.research.train_ct2pet`) uses the PET/CT
twin (simulated) or a site's pairs.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi

from dicomnode.pipelines.base import (
    JobContext,
    OutputFile,
    job_model,
    model_identity,
    save_outputs,
)
from dicomnode.pipelines.ct_tissue import DISTRICT_KEYS
from dicomnode.pipelines.nets.pix2pix import Generator

__all__ = ["DISTRICTS", "load_generators", "predict", "run", "synthesize"]

DISTRICTS = DISTRICT_KEYS  # ct-tissue's districts, in its order
PATCH, STRIDE, SUV_MAX = 32, 16, 20.0
BLEND_SIGMA = 0.25  # Gaussian blending of overlapping patches: sigma as a share of PATCH
DEFAULT_MODEL = "ct2pet-district"








def norm_ct(hu: np.ndarray) -> np.ndarray:
    """HU -> [0, 1] (clipped at -1000 and 1000)."""
    return ((np.clip(hu, -1000, 1000) + 1000) / 2000).astype(np.float32)


def _patches(shape: tuple[int, ...]) -> list[tuple[slice, ...]]:
    starts = []
    for s in shape:
        pos = list(range(0, max(s - PATCH, 0) + 1, STRIDE))
        if pos[-1] != max(s - PATCH, 0):
            pos.append(max(s - PATCH, 0))
        starts.append(pos)
    return [tuple(slice(a, a + PATCH) for a in (z, y, x))
            for z in starts[0] for y in starts[1] for x in starts[2]]


def patch_weights(sigma_scale: float | None = BLEND_SIGMA) -> np.ndarray:
    """Gaussian weights over one patch (centre 1), as MONAI's ``mode="gaussian"`` blends.

    A plain average of overlapping patches showed their edges: in a viewer the synthetic PET
    was a patchwork of 16-voxel blocks (each patch's border, where the network sees least
    context, counted as much as its centre). Weighting by distance from the centre hides the
    seams; ``sigma_scale=None`` gives the plain average back.
    """
    if sigma_scale is None:
        return np.ones((PATCH,) * 3, np.float32)
    c = (np.arange(PATCH) - (PATCH - 1) / 2) / (sigma_scale * PATCH)
    g = np.exp(-0.5 * c**2)
    w = g[:, None, None] * g[None, :, None] * g[None, None, :]
    return np.maximum(w / w.max(), 1e-3).astype(np.float32)


def predict(generator: Any, ct01: np.ndarray, *, device: str = "cpu",
            region: np.ndarray | None = None, batch: int = 8,
            sigma_scale: float | None = BLEND_SIGMA) -> np.ndarray:
    """SUV from a normalised CT on the PET grid: 32^3 patches, stride 16, blended with
    Gaussian weights (:func:`patch_weights`).

    With ``region`` (a mask on the same grid) only the patches that overlap it are computed:
    inside the region the result is the same as over the whole volume (every patch covering a
    region voxel overlaps the region); far from it, 0. Patches go through the network
    ``batch`` at a time (instance norm: the batch does not change a patch's result).
    """
    pad = [(0, max(0, PATCH - s)) for s in ct01.shape]
    x = np.pad(ct01, pad, mode="edge")
    where = None if region is None else np.pad(region, pad)
    acc = np.zeros(x.shape, np.float32)
    cnt = np.zeros(x.shape, np.float32)
    weights = patch_weights(sigma_scale)
    todo = [sl for sl in _patches(x.shape) if where is None or where[sl].any()]
    generator.eval()
    with torch.inference_mode():
        for k in range(0, len(todo), batch):
            group = todo[k:k + batch]
            t = torch.from_numpy(np.stack([x[sl] for sl in group])[:, None]).to(device)
            pred = generator(t)[:, 0].float().cpu().numpy()
            for sl, p in zip(group, pred, strict=True):
                acc[sl] += p * weights
                cnt[sl] += weights
    out = acc / np.maximum(cnt, 1e-6)
    return out[: ct01.shape[0], : ct01.shape[1], : ct01.shape[2]] * SUV_MAX








def district_masks(hu: np.ndarray, spacing: tuple[float, float, float],
                   affine: np.ndarray) -> dict[str, np.ndarray]:
    """Districts of a CT (same grid), via ``ct-tissue``."""
    from dicomnode.dicom.volume import SeriesVolume
    from dicomnode.pipelines.ct_tissue import body_mask, districts

    body = body_mask(hu)
    fake = SeriesVolume(array=hu, affine=affine, modality="CT", units="HU", datasets=(),
                        frames=(), frame_of_reference_uid="", series_instance_uid="",
                        study_instance_uid="", slice_thickness=spacing[0])
    return districts(body, fake)


def check_districts(names: tuple[str, ...]) -> None:
    """A ValueError naming every one of ``names`` that is not a district."""
    unknown = set(names) - set(DISTRICTS)
    if unknown:
        raise ValueError(f"unknown districts {sorted(unknown)} (known: {', '.join(DISTRICTS)})")


def all_districts(masks: dict[str, np.ndarray]) -> np.ndarray:
    """The union of a case's district masks: the voxels the whole-body model is asked for."""
    return np.logical_or.reduce([masks[d] for d in DISTRICTS])






def load_generators(entry: Any, device: str) -> dict[str, Any]:
    """The whole-body and district generators of a ct2pet model directory (sha256 checked by
    the registry before this is called)."""
    states = torch.load(entry.weights, map_location="cpu", weights_only=True)
    width = int(entry.manifest.network.get("params", {}).get("width", 16))
    out = {}
    for name, state in states.items():
        gen = Generator(width)
        gen.load_state_dict(state)
        out[name] = gen.eval().to(device)
    return out


def _load_generators_model(entry: Any, *, device: str) -> Any:
    """A :class:`~dicomnode.pipelines.models.LoadedModel` whose network is the dict of generators."""
    from dicomnode.pipelines.models import LoadedModel

    return LoadedModel(entry=entry, network=load_generators(entry, device), device=device)


def synthesize(generators: dict[str, Any], hu: np.ndarray, spacing: tuple[float, float, float],
               affine: np.ndarray, *, districts_on: bool = True, device: str = "cpu"
               ) -> np.ndarray:
    """Synthetic SUV on the CT grid, stitched with the district masks: each district from its
    own model (the whole-body model where a district has none, or for all of them with
    ``districts_on=False``, the paper's baseline); outside every district (outside the body)
    there is no activity."""
    factors = [s / 4.0 for s in spacing]
    ct4 = norm_ct(ndi.zoom(hu, factors, order=1))

    def on_pet_grid(mask: np.ndarray) -> np.ndarray:
        small = ndi.zoom(mask.astype(np.float32), factors, order=0)
        return small[: ct4.shape[0], : ct4.shape[1], : ct4.shape[2]] > 0.5

    masks = {d: on_pet_grid(m) for d, m in district_masks(hu, spacing, affine).items()
             if d in DISTRICTS and m.any()}
    own = {d for d in masks if districts_on and d in generators}
    fallback = [m for d, m in masks.items() if d not in own]
    whole = (predict(generators["whole_body"], ct4, device=device,
                     region=np.logical_or.reduce(fallback)) if fallback else None)
    pet4 = np.zeros(ct4.shape, np.float32)
    for d, m4 in masks.items():
        pred = predict(generators[d], ct4, device=device, region=m4) if d in own else whole
        assert pred is not None
        pet4 = np.where(m4, pred, pet4)
    back = [t / s for s, t in zip(ct4.shape, hu.shape, strict=True)]
    out = ndi.zoom(pet4, back, order=1)[: hu.shape[0], : hu.shape[1], : hu.shape[2]]
    return np.clip(out, 0, SUV_MAX).astype(np.float32)


def run(ctx: JobContext) -> list[OutputFile]:
    """CT -> synthetic PET series on the CT grid and Frame of Reference."""
    from dicomnode.dicom.volume import load_series
    from dicomnode.dicom.write.pet import build_derived_pet

    t0 = time.perf_counter()
    volume = load_series(list(ctx.input_files), modality="CT")
    loaded = job_model(ctx, default=DEFAULT_MODEL, loader=_load_generators_model)
    entry, generators = loaded.entry, loaded.network
    t1 = time.perf_counter()
    suv = synthesize(generators, volume.array, volume.spacing, volume.affine, device=ctx.device)
    t2 = time.perf_counter()
    m = entry.manifest
    identity = model_identity(ctx, volume, m, kind="PT", description="SYNTHETIC PET from CT")
    description = identity.label("SYNTHETIC PET (SUVbw; not a PET scan) predicted from the CT")
    details = (f"District 3-D Pix2Pix models {m.name} {m.version}, trained on {m.trained_on}. "
               "Not a PET scan.")
    outputs = save_outputs(build_derived_pet(values=suv, volume=volume, identity=identity,
                                             description=description, details=details),
                           ctx.output_dir, kind="PT", prefix="pt")
    ctx.timings.update(read_s=t1 - t0, infer_s=t2 - t1, write_s=time.perf_counter() - t2)
    ctx.progress(1.0)
    return outputs
