"""Series -> volume: instances of one series to a sorted 3-D array with its LPS affine.

CT values are HU, PET values are in the stored units (Bq/ml for BQML) with the SUVbw factor
when the headers allow it. Real-world series are checked, and anything a pipeline cannot use is
refused with a :class:`~dicomnode.pipelines.base.PipelineRefusal` naming the reason:

* localizers and other orientations mixed in: excluded and recorded (``excluded``);
* duplicate positions: identical copies dropped and recorded; differing ones refused;
* gaps or uneven spacing: refused (never silently interpolated);
* gantry tilt: refused by default, or resampled onto an orthogonal grid when asked
  (``resample=True``, which also evens out uneven spacing, and says so in ``notes``);
* multi-frame (Enhanced CT / PET) frames are unpacked with their per-frame geometry;
* compressed transfer syntaxes and big endian are decoded by pydicom + pylibjpeg;
* PixelPaddingValue voxels become air (-1024 HU) and are reported in ``padding_voxels``.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicomnode.dicom.refusal import PipelineRefusal

__all__ = ["ORIENTATION_TOL", "SUVFactors", "SeriesVolume", "load_series", "read_datasets",
           "spacing_problem", "suv_factors"]

ORIENTATION_TOL = 1e-3  # direction cosines
TILT_TOL_DEG = 0.5
SPACING_REL_TOL = 0.01
SPACING_ABS_TOL_MM = 0.01


@dataclass(frozen=True, kw_only=True)
class SUVFactors:
    """Body-weight SUV from PET activity: ``SUVbw = value * factor`` (value in Bq/ml)."""

    factor: float
    weight_kg: float
    injected_dose_bq: float
    half_life_s: float
    decay_s: float
    decay_correction: str


@dataclass(frozen=True)
class _Frame:
    dataset: Dataset
    frame_index: int | None  # None: single-frame instance
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float


@dataclass(frozen=True, kw_only=True)
class SeriesVolume:
    """A sorted volume: ``array[k, i, j]`` is slice k, row i, column j.

    ``affine`` maps (k, i, j, 1) to LPS millimetres (the position of a voxel centre).
    ``datasets`` are the sorted source headers (pixel data dropped), one per slice for
    single-frame series; for a multi-frame source the same dataset repeats with ``frames``.
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str
    units: str
    datasets: tuple[Dataset, ...]
    frames: tuple[int | None, ...]
    frame_of_reference_uid: str
    series_instance_uid: str
    study_instance_uid: str
    slice_thickness: float | None
    excluded: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()
    suv: SUVFactors | None = None
    suv_problem: str | None = None
    padding_voxels: int = 0
    slice_positions: tuple[tuple[float, float, float], ...] = field(default=())

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (slice, row, column) in mm."""
        return tuple(float(np.linalg.norm(self.affine[:3, a])) for a in range(3))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns)."""
        return self.array.shape  # type: ignore[return-value]

    def hd_volume(self, array: np.ndarray | None = None) -> Any:
        """This grid as a highdicom ``Volume`` (with ``array`` or this volume's data).

        A 4-D array's last axis is taken as segment numbers 1..n (the SEG writer's input).
        """
        import highdicom as hd

        data = self.array if array is None else array
        channels: Any = None
        if data.ndim == 4:
            channels = {"SegmentNumber": list(range(1, data.shape[3] + 1))}
        return hd.Volume(
            array=data,
            affine=self.affine,
            coordinate_system="PATIENT",
            frame_of_reference_uid=self.frame_of_reference_uid,
            channels=channels,
        )


def read_datasets(paths: Iterable[Path]) -> tuple[list[Dataset], list[tuple[str, str]]]:
    """Read every file; unreadable ones are returned as ``(name, reason)``."""
    out: list[Dataset] = []
    bad: list[tuple[str, str]] = []
    for path in paths:
        try:
            out.append(pydicom.dcmread(path))
        except Exception as exc:
            bad.append((Path(path).name, f"unreadable: {type(exc).__name__}: {exc}"[:200]))
    return out, bad


def _float(ds: Dataset, keyword: str, default: float | None = None) -> float | None:
    value = ds.get(keyword)
    if value in (None, ""):
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _frames(ds: Dataset) -> list[_Frame]:
    """Geometry and rescale of every frame of one instance."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" in ds:
        shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
        out = []
        for index, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
            def group(name: str, item: Dataset = item) -> Dataset | None:
                seq = item.get(name) or shared.get(name)
                return seq[0] if seq else None

            pos, ori, meas = (group("PlanePositionSequence"), group("PlaneOrientationSequence"),
                              group("PixelMeasuresSequence"))
            if pos is None or ori is None or meas is None:
                raise PipelineRefusal("missing_geometry",
                                      "a multi-frame instance lacks per-frame plane geometry")
            trans = group("PixelValueTransformationSequence")
            out.append(_Frame(
                dataset=ds, frame_index=index,
                position=np.array(pos.ImagePositionPatient, dtype=float),
                orientation=np.array(ori.ImageOrientationPatient, dtype=float),
                pixel_spacing=(float(meas.PixelSpacing[0]), float(meas.PixelSpacing[1])),
                slope=_float(trans, "RescaleSlope", 1.0) if trans else 1.0,  # type: ignore[arg-type]
                intercept=_float(trans, "RescaleIntercept", 0.0) if trans else 0.0,  # type: ignore[arg-type]
            ))
        return out
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
        raise PipelineRefusal("missing_geometry",
                              "ImagePositionPatient / ImageOrientationPatient missing")
    if frames != 1:
        raise PipelineRefusal("unsupported", "multi-frame image without functional groups")
    spacing = ds.get("PixelSpacing")
    if not spacing:
        raise PipelineRefusal("missing_geometry", "PixelSpacing missing")
    if str(ds.get("SOPClassUID", "")) in _RESCALE_REQUIRED and any(
            _float(ds, k) is None for k in ("RescaleSlope", "RescaleIntercept")):
        # Type 1 in the CT and PET Image modules: a default of 1 / 0 would misread the values
        raise PipelineRefusal("missing_rescale", "RescaleSlope / RescaleIntercept missing "
                              f"or not a number in instance {ds.get('SOPInstanceUID', '?')}")
    return [_Frame(
        dataset=ds, frame_index=None,
        position=np.array(ds.ImagePositionPatient, dtype=float),
        orientation=np.array(ds.ImageOrientationPatient, dtype=float),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        slope=_float(ds, "RescaleSlope", 1.0),  # type: ignore[arg-type]
        intercept=_float(ds, "RescaleIntercept", 0.0),  # type: ignore[arg-type]
    )]


# CT Image Storage, PET Image Storage
_RESCALE_REQUIRED = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.128"}


def _is_localizer(ds: Dataset) -> bool:
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    return "LOCALIZER" in image_type


# JPEG process 1/2-4/14 (.50, .51, .57, .70): pydicom decodes them with pylibjpeg-libjpeg, which
# is GPLv3 and therefore the optional ``jpeg`` extra of this Apache-2.0 project (README).
_LIBJPEG_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
                     "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"}


def _decoder_hint(ds: Dataset) -> str:
    """What to install when the missing decoder is the optional libjpeg one."""
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if syntax in _LIBJPEG_SYNTAXES and importlib.util.find_spec("libjpeg") is None:
        return " (JPEG decoding needs the optional GPLv3 decoder: pip install 'dicomnode[jpeg]')"
    return ""


def _pixels(frame: _Frame, cache: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """Stored values of one frame as float32 after rescale, and the padding mask."""
    ds = frame.dataset
    key = id(ds)
    if key not in cache:
        try:
            cache[key] = ds.pixel_array
        except Exception as exc:  # truncated stream, missing decoder, bad header...
            raise PipelineRefusal(
                "undecodable",
                f"pixel data of {ds.get('SOPInstanceUID', '?')} cannot be decoded: "
                f"{type(exc).__name__}: {str(exc)[:160]}{_decoder_hint(ds)}",
            ) from None
    arr = cache[key]
    raw = arr[frame.frame_index] if frame.frame_index is not None else arr
    pad_mask = None
    ppv = ds.get("PixelPaddingValue")
    if ppv is not None:
        ppv = int(ppv)
        if int(ds.get("PixelRepresentation", 0)) == 1 and ppv > 32767:
            ppv -= 65536  # an unsigned encoding of a negative padding value
        pad_mask = raw == ppv
    values = raw.astype(np.float32) * np.float32(frame.slope) + np.float32(frame.intercept)
    return values, pad_mask


def load_series(
    paths: Iterable[Path] | list[Dataset],
    *,
    resample: bool = False,
    modality: str | None = None,
) -> SeriesVolume:
    """Build a :class:`SeriesVolume` from the files (or datasets) of one series.

    Parameters
    ----------
    paths
        Files of one series, or datasets already read.
    resample
        Resample a gantry-tilted or unevenly spaced stack onto an orthogonal, evenly spaced
        grid (linear interpolation, recorded in ``notes``) instead of refusing it.
    modality
        Only accept this modality (e.g. ``"CT"``).

    Raises
    ------
    PipelineRefusal
        With a code and a reason: no images, mixed series, wrong modality, tilt, gaps,
        duplicate positions with different content, missing geometry.
    """
    try:
        return _load_series(list(paths), resample=resample, modality=modality)
    except PipelineRefusal:
        raise
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
        # a header the checks above did not foresee: refuse with the reason, never crash
        raise PipelineRefusal("malformed_input",
                              f"{type(exc).__name__}: {str(exc)[:200]}") from None


def _load_series(items: list[Any], *, resample: bool, modality: str | None) -> SeriesVolume:
    if items and isinstance(items[0], Dataset):
        datasets: list[Dataset] = list(items)
        unreadable: list[tuple[str, str]] = []
    else:
        datasets, unreadable = read_datasets(items)
    excluded: list[tuple[str, str]] = list(unreadable)
    notes: list[str] = []
    images = []
    for ds in datasets:
        missing = [k for k in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")
                   if not ds.get(k)]
        if missing:
            excluded.append((str(ds.get("SOPInstanceUID", "?")), f"{missing[0]} missing"))
        elif "PixelData" not in ds:
            excluded.append((str(ds.get("SOPInstanceUID", "?")), "no pixel data"))
        elif _is_localizer(ds):
            excluded.append((str(ds.SOPInstanceUID), "localizer"))
        else:
            images.append(ds)
    if not images:
        why = f" ({excluded[0][1]})" if excluded else ""
        raise PipelineRefusal("no_images", f"the series has no usable images{why}")
    series_uids = {str(ds.SeriesInstanceUID) for ds in images}
    if len(series_uids) != 1:
        raise PipelineRefusal("mixed_series", f"{len(series_uids)} series mixed in one input")
    found = {str(ds.get("Modality", "")) for ds in images}
    if len(found) != 1:
        raise PipelineRefusal("mixed_modality", f"mixed modalities {sorted(found)}")
    mod = found.pop()
    if modality and mod != modality:
        raise PipelineRefusal("wrong_modality", f"expects {modality}, got {mod}")

    frames = [f for ds in images for f in _frames(ds)]
    # keep the largest group sharing one orientation; exclude the rest with the reason
    groups: list[list[_Frame]] = []
    for f in frames:
        for g in groups:
            if np.abs(g[0].orientation - f.orientation).max() < ORIENTATION_TOL:
                g.append(f)
                break
        else:
            groups.append([f])
    groups.sort(key=len, reverse=True)
    for g in groups[1:]:
        for f in g:
            excluded.append((str(f.dataset.SOPInstanceUID), "different orientation"))
    frames = groups[0]
    shapes = {(int(f.dataset.Rows), int(f.dataset.Columns)) for f in frames}
    if len(shapes) != 1:
        raise PipelineRefusal("mixed_matrix", f"images of different sizes {sorted(shapes)}")
    spacings = {f.pixel_spacing for f in frames}
    if len(spacings) != 1:
        raise PipelineRefusal("mixed_spacing", "images with different pixel spacing")

    orientation = frames[0].orientation
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    frames.sort(key=lambda f: float(f.position @ normal))
    z = np.array([f.position @ normal for f in frames])

    # duplicate positions: identical copies are dropped, different content is refused
    cache: dict[int, np.ndarray] = {}
    keep = [0]
    for idx in range(1, len(frames)):
        if abs(z[idx] - z[keep[-1]]) < 1e-3:
            a, _ = _pixels(frames[keep[-1]], cache)
            b, _ = _pixels(frames[idx], cache)
            if a.shape == b.shape and np.array_equal(a, b):
                excluded.append((str(frames[idx].dataset.SOPInstanceUID),
                                 "duplicate of another slice at the same position"))
                continue
            raise PipelineRefusal(
                "duplicate_positions",
                f"two different slices at the same position ({z[idx]:.2f} mm along the normal)",
            )
        keep.append(idx)
    frames = [frames[i] for i in keep]
    z = z[keep]
    positions = np.array([f.position for f in frames])

    tilt, uneven = 0.0, None
    step = _float(frames[0].dataset, "SliceThickness", 1.0) or 1.0
    if len(frames) > 1:
        stack_dir = positions[-1] - positions[0]
        stack_dir /= np.linalg.norm(stack_dir)
        tilt = math.degrees(math.acos(min(1.0, abs(float(stack_dir @ normal)))))
        step = float(np.median(np.diff(z)))
        uneven = spacing_problem(z)
    if not resample:
        if tilt > TILT_TOL_DEG:
            extra = f"; also {uneven[1]}" if uneven else ""
            raise PipelineRefusal(
                "gantry_tilt",
                f"slices are stacked {tilt:.1f} degrees off their normal (gantry tilt){extra}; "
                "enable resampling to use an orthogonal grid",
            )
        if uneven:
            raise PipelineRefusal(f"{uneven[0]}_spacing",
                                  f"{uneven[1]}; resampling would invent slices")

    arrays, pad_total = [], 0
    for f in frames:
        values, pad = _pixels(f, cache)
        if pad is not None and pad.any():
            pad_total += int(pad.sum())
            values = np.where(pad, np.float32(-1024.0 if mod == "CT" else 0.0), values)
        arrays.append(values)
    array = np.stack(arrays).astype(np.float32)
    dy, dx = frames[0].pixel_spacing

    if resample and (tilt > TILT_TOL_DEG or uneven):
        fill = -1024.0 if mod == "CT" else 0.0
        array = _untilt(array, positions, row_dir, col_dir, dx, dy, fill=fill)
        z_out = z[0] + step * np.arange(int(round((z[-1] - z[0]) / step)) + 1)
        array = _resample_z(array, z, z_out)
        positions = positions[0] + np.outer(z_out - z[0], normal)
        if tilt > TILT_TOL_DEG:
            notes.append(f"gantry tilt {tilt:.1f} deg resampled to an orthogonal grid")
        if uneven:
            notes.append(f"{uneven[1]}: resampled to {step:.3g} mm by linear interpolation")
        frames = [frames[int(np.argmin(np.abs(z - zz)))] for zz in z_out]

    affine = np.eye(4)
    slice_vec = (positions[-1] - positions[0]) / max(len(frames) - 1, 1) if len(frames) > 1 \
        else normal * step
    affine[:3, 0] = slice_vec
    affine[:3, 1] = col_dir * dy
    affine[:3, 2] = row_dir * dx
    affine[:3, 3] = positions[0]

    first = frames[0].dataset
    units = "HU" if mod == "CT" else str(first.get("Units", "") or "")
    suv, suv_problem = (None, None)
    if mod == "PT":
        suv, suv_problem = suv_factors(first)
        if units == "BQML" and suv is None:
            notes.append(f"no SUV: {suv_problem}")
    headers = []
    for f in frames:
        ds = f.dataset
        headers.append(ds)
    for ds in {id(d): d for d in headers}.values():
        if "PixelData" in ds:
            del ds.PixelData  # keep headers only; the array holds the values
    return SeriesVolume(
        array=array, affine=affine, modality=mod, units=units, datasets=tuple(headers),
        frames=tuple(f.frame_index for f in frames),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        series_instance_uid=str(first.SeriesInstanceUID),
        study_instance_uid=str(first.StudyInstanceUID),
        slice_thickness=_float(first, "SliceThickness"),
        excluded=tuple(excluded), notes=tuple(notes), suv=suv, suv_problem=suv_problem,
        padding_voxels=pad_total,
        slice_positions=tuple((float(p[0]), float(p[1]), float(p[2])) for p in positions),
    )


def spacing_problem(z: np.ndarray) -> tuple[str, str] | None:
    """Whether sorted slice positions ``z`` (mm along the stack normal) are evenly spaced.

    The one tolerance of the project (completion checks and volume reading use it): each step
    within ``SPACING_REL_TOL`` of the median step, or ``SPACING_ABS_TOL_MM``, whichever is larger.

    Returns
    -------
    tuple[str, str] | None
        ``None`` when even (or fewer than two slices); else (``"gapped"`` or ``"uneven"``, a
        sentence with the range of steps).
    """
    steps = np.diff(np.asarray(z, dtype=float))
    if steps.size == 0:
        return None
    step = float(np.median(steps))
    if np.abs(steps - step).max() <= max(SPACING_ABS_TOL_MM, SPACING_REL_TOL * step):
        return None
    kind = "gapped" if steps.max() > 1.5 * step else "uneven"
    return kind, (f"slice spacing varies from {steps.min():.3g} to {steps.max():.3g} mm "
                  f"(median {step:.3g} mm)")


def _resample_z(array: np.ndarray, z: np.ndarray, z_out: np.ndarray) -> np.ndarray:
    """Linear interpolation along the slice axis from positions ``z`` to ``z_out``."""
    out = np.empty((len(z_out), *array.shape[1:]), dtype=np.float32)
    for k, zz in enumerate(z_out):
        hi = int(np.clip(np.searchsorted(z, zz), 1, len(z) - 1))
        lo = hi - 1
        w = 0.0 if z[hi] == z[lo] else float(np.clip((zz - z[lo]) / (z[hi] - z[lo]), 0, 1))
        out[k] = (1 - w) * array[lo] + w * array[hi]
    return out


def _untilt(array: np.ndarray, positions: np.ndarray, row_dir: np.ndarray, col_dir: np.ndarray,
            dx: float, dy: float, *, fill: float) -> np.ndarray:
    """Shift each slice in-plane so the stack lies along the slice normal (shear removal)."""
    from scipy.ndimage import shift

    out = np.empty_like(array)
    for k in range(array.shape[0]):
        offset = positions[k] - positions[0]
        di = float(offset @ col_dir) / dy  # rows
        dj = float(offset @ row_dir) / dx  # columns
        out[k] = shift(array[k], (di, dj), order=1, mode="constant", cval=fill)
    return out


def _dicom_time(date: str | None, time: str | None) -> datetime | None:
    if not time:
        return None
    t = str(time).split(".")[0].ljust(6, "0")
    d = str(date) if date else "19700101"
    try:
        return datetime.strptime(d + t, "%Y%m%d%H%M%S")
    except ValueError:
        return None


def suv_factors(ds: Dataset) -> tuple[SUVFactors | None, str | None]:
    """SUVbw factor from a PET header, or ``None`` and the reason it cannot be computed.

    SUVbw = Bq/ml x weight[g] / (dose[Bq] x 2^(-dt / half-life)), dt from the injection to the
    series time (decay correction START); with ADMIN correction dt = 0.
    """
    units = str(ds.get("Units", "") or "")
    if units != "BQML":
        return None, f"Units is {units or 'absent'}, not BQML: no absolute activity"
    weight = _float(ds, "PatientWeight")
    if not weight or weight <= 0 or weight > 500:
        return None, f"PatientWeight implausible or missing ({weight})"
    seq = ds.get("RadiopharmaceuticalInformationSequence")
    if not seq:
        return None, "RadiopharmaceuticalInformationSequence missing"
    radio = seq[0]
    dose = _float(radio, "RadionuclideTotalDose")
    if not dose or dose <= 0:
        return None, f"RadionuclideTotalDose implausible or missing ({dose})"
    half_life = _float(radio, "RadionuclideHalfLife")
    if not half_life or half_life <= 0:
        return None, "RadionuclideHalfLife missing"
    correction = str(ds.get("DecayCorrection", "") or "")
    if correction == "ADMIN":
        dt = 0.0
    elif correction == "START":
        injected = _dicom_time(
            radio.get("RadiopharmaceuticalStartDateTime", "")[:8] or ds.get("SeriesDate"),
            radio.get("RadiopharmaceuticalStartTime")
            or str(radio.get("RadiopharmaceuticalStartDateTime", ""))[8:14],
        )
        start = _dicom_time(ds.get("SeriesDate"), ds.get("SeriesTime")) or _dicom_time(
            ds.get("AcquisitionDate"), ds.get("AcquisitionTime"))
        if injected is None or start is None:
            return None, "injection or series time missing"
        delta = start - injected
        if delta < timedelta(0):
            delta += timedelta(days=1)  # injection before midnight
        dt = delta.total_seconds()
        if dt > 24 * 3600:
            return None, f"implausible uptake time {dt / 3600:.1f} h"
    else:
        return None, f"DecayCorrection {correction or 'absent'} is not START or ADMIN"
    decayed = dose * 2.0 ** (-dt / half_life)
    return SUVFactors(factor=weight * 1000.0 / decayed, weight_kg=weight, injected_dose_bq=dose,
                      half_life_s=half_life, decay_s=dt, decay_correction=correction), None
