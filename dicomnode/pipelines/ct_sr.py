"""``ct-sr``: SR4ZCT super-resolution of a thick-slice CT into a derived thin-slice CT series.

Geometry from the headers: in-plane pixel size r_xy = PixelSpacing, slice thickness
r_z = SliceThickness, spacing d from the slice positions, overlap o_z = max(0, r_z - d). The
output slices have thickness r_t (setting; default r_xy) with no overlap; slice j is centred at
z_first - r_z / 2 + r_t / 2 + j r_t along the slice normal (METHODS.md 4.2).
"""

from __future__ import annotations

import time

import numpy as np

from dicomnode.dicom.volume import SeriesVolume, load_series
from dicomnode.dicom.write.common import OutputIdentity
from dicomnode.dicom.write.ct import build_derived_ct
from dicomnode.pipelines.base import JobContext, OutputFile, PipelineRefusal, save_outputs
from dicomnode.pipelines.sr4zct import SRBudget, super_resolve

__all__ = ["output_affine", "run"]


def output_affine(volume: SeriesVolume, r_z: float, r_t: float) -> np.ndarray:
    """The (slice, row, column) -> LPS affine of the super-resolved grid."""
    affine = volume.affine.copy()
    normal = affine[:3, 0] / np.linalg.norm(affine[:3, 0])
    affine[:3, 3] = affine[:3, 3] + normal * (r_t / 2 - r_z / 2)
    affine[:3, 0] = normal * r_t
    return affine


def run(ctx: JobContext) -> list[OutputFile]:
    """Read the CT, train SR4ZCT on it, write the derived CT series."""
    t0 = time.perf_counter()
    volume = load_series(list(ctx.input_files), modality="CT")
    if volume.shape[0] < 3:
        raise PipelineRefusal("too_few_slices", "super-resolution needs at least 3 slices")
    r_xy = float(volume.spacing[1])
    if abs(volume.spacing[1] - volume.spacing[2]) > 1e-3:
        raise PipelineRefusal("anisotropic_pixels", "in-plane pixels are not square")
    d = float(volume.spacing[0])
    r_z = float(volume.slice_thickness or d)
    o_z = max(0.0, r_z - d)
    if r_z - o_z <= 0 or abs((r_z - o_z) - d) > 0.01 * d:
        # thickness smaller than the spacing (gaps between slices): model the slices as
        # touching samples of the spacing, and say so
        r_z, o_z = d, 0.0
    opts = dict(ctx.options.get("ct_sr") or {})  # type: ignore[call-overload]
    r_t = float(opts.pop("target_thickness_mm", None) or r_xy)
    if r_t >= d:
        raise PipelineRefusal("already_thin", f"slices are {d:.3g} mm apart; target {r_t:.3g} mm")
    budget = SRBudget(**{k: v for k, v in opts.items() if k in SRBudget.__dataclass_fields__})
    ctx.progress(0.05)
    t1 = time.perf_counter()
    values, stats = super_resolve(volume.array, r_xy=r_xy, r_z=r_z, o_z=o_z, r_target=r_t,
                                  budget=budget, device=ctx.device,
                                  progress=lambda f: ctx.progress(0.05 + 0.85 * f))
    t2 = time.perf_counter()
    identity = OutputIdentity(
        source_series_uid=volume.series_instance_uid, pipeline=ctx.pipeline,
        pipeline_version=ctx.pipeline_version, kind="CT", series_number=ctx.series_number,
        series_description=f"{ctx.series_description_prefix}SR {r_t:.2g}mm (SR4ZCT)",
        model_name="SR4ZCT self-supervised", model_version=ctx.pipeline_version,
        trained_on="this series only (self-supervised on its own axial images)",
    )
    description = identity.label(f"CT super-resolved from {r_z:.3g} mm to {r_t:.3g} mm slices")
    details = (f"SR4ZCT: source slice overlap {o_z:.3g} mm; network trained on this series for "
               f"{stats['iterations']:.0f} iterations.")
    if stats["cut_by_time_limit"]:
        details += (f" Training was stopped by the time limit (ct_sr.max_train_seconds) after "
                    f"{stats['iterations']:.0f} of {stats['iterations_planned']:.0f} "
                    "iterations: this result is weaker than the configured one.")
    datasets = build_derived_ct(values=values, affine=output_affine(volume, r_z, r_t),
                                source=volume, identity=identity, description=description,
                                slice_thickness=r_t, details=details)
    outputs = save_outputs(datasets, ctx.output_dir, kind="CT", prefix="ct")
    ctx.timings.update(read_s=t1 - t0, infer_s=t2 - t1, write_s=time.perf_counter() - t2,
                       train_s=stats["train_s"], iterations=float(stats["iterations"]),
                       train_cut_by_time_limit=stats["cut_by_time_limit"])
    ctx.progress(1.0)
    return outputs
