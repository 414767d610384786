"""Derived PET writer: classic PET Image Storage, one instance per slice, built with pydicom.

* From a PET source (enhanced / denoised PET): the PET Series and Isotope modules, the source
  SeriesDate / SeriesTime (viewers decay-correct from them), Units and SUV factors are kept, so
  a viewer's SUV tool gives the same numbers as on the source.
* From a CT source (synthetic PET): the PET modules are built here with Units GML (the values
  are SUVbw), on the CT's grid and Frame of Reference so viewers fuse it with the CT, and the
  series says "synthetic" in SeriesDescription, ImageComments and DerivationDescription.

Pixels are uint16 with a per-slice RescaleSlope and RescaleIntercept 0; values below 0 are
clipped to 0 (a PET image stores activity, which is never negative).
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomnode.dicom.volume import SeriesVolume, SUVFactors
from dicomnode.dicom.write.common import (
    OutputIdentity,
    copy_patient_study,
    new_file_dataset,
    plane_attributes,
    source_reference,
    stamp_equipment,
    uint16_with_slope,
)

__all__ = ["PET_STORAGE", "build_derived_pet"]

PET_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
F18_HALF_LIFE_S = 6586.2

_PET_SERIES_KEYWORDS = (
    "SeriesDate", "SeriesTime", "Units", "CountsSource", "SeriesType", "ReprojectionMethod",
    "NumberOfRRIntervals", "NumberOfTimeSlots", "NumberOfTimeSlices", "CorrectedImage",
    "RandomsCorrectionMethod", "AttenuationCorrectionMethod", "ScatterCorrectionMethod",
    "DecayCorrection", "ReconstructionDiameter", "ConvolutionKernel", "ReconstructionMethod",
    "DetectorLinesOfResponseUsed", "CollimatorType", "AxialAcceptance", "AxialMash",
    "TransverseMash", "CoincidenceWindowWidth", "EnergyWindowRangeSequence",
    "SecondaryCountsType", "FieldOfViewShape", "FieldOfViewDimensions",
    "GantryDetectorTilt", "GantryDetectorSlew", "TypeOfDetectorMotion", "FrameOfReferenceUID",
    "PositionReferenceIndicator", "AcquisitionDate", "AcquisitionTime", "ActualFrameDuration",
    "FrameReferenceTime", "DecayFactor", "DoseCalibrationFactor", "ScatterFractionFactor",
    "DeadTimeFactor", "SliceSensitivityFactor", "PrimaryPromptsCountsAccumulated",
    "AcquisitionNumber", "BodyPartExamined",
)
# Only for DYNAMIC (time slices) or GATED (R-R intervals, time slots) series.
_CONDITIONAL = {"NumberOfTimeSlices": "DYNAMIC", "NumberOfRRIntervals": "GATED",
                "NumberOfTimeSlots": "GATED"}


def _clean_code_sequence(seq: Sequence | None) -> Sequence:
    """Drop empty items (a common scanner fault dciodvfy reports as an error)."""
    if not seq:
        return Sequence([])
    return Sequence([item for item in seq if item.get("CodeValue")])


def _isotope_from_source(src: Dataset) -> Sequence:
    out = []
    for item in src.get("RadiopharmaceuticalInformationSequence", []):
        new = Dataset()
        for element in item:
            new.add(element)
        if "RadionuclideCodeSequence" in new:
            new.RadionuclideCodeSequence = _clean_code_sequence(new.RadionuclideCodeSequence)
        if "RadiopharmaceuticalCodeSequence" in new:
            new.RadiopharmaceuticalCodeSequence = _clean_code_sequence(
                new.RadiopharmaceuticalCodeSequence)
            if not new.RadiopharmaceuticalCodeSequence:
                del new.RadiopharmaceuticalCodeSequence
        for keyword in ("RadionuclideTotalDose", "RadionuclideHalfLife",
                        "RadionuclidePositronFraction"):
            if keyword not in new:
                setattr(new, keyword, "")
        if "RadionuclideCodeSequence" not in new:
            new.RadionuclideCodeSequence = Sequence([])
        out.append(new)
    return Sequence(out)


def _fdg_isotope() -> Sequence:
    code = Dataset()
    code.CodeValue = "77004003"
    code.CodingSchemeDesignator = "SCT"
    code.CodeMeaning = "^18^Fluorine"
    item = Dataset()
    item.RadionuclideCodeSequence = Sequence([code])
    item.Radiopharmaceutical = "Fluorodeoxyglucose"
    item.RadionuclideTotalDose = ""
    item.RadionuclideHalfLife = str(F18_HALF_LIFE_S)
    item.RadionuclidePositronFraction = "0.9673"
    return Sequence([item])


def _stamp_activity(ds: Dataset, activity: SUVFactors) -> None:
    """Weight, dose, half-life and injection time so that SUVbw can be computed again."""
    from datetime import datetime, timedelta

    ds.PatientWeight = f"{activity.weight_kg:.6g}"
    item = ds.RadiopharmaceuticalInformationSequence[0]
    item.RadionuclideTotalDose = f"{activity.injected_dose_bq:.6g}"
    item.RadionuclideHalfLife = f"{activity.half_life_s:.6g}"
    start = datetime.strptime(str(ds.SeriesDate) + str(ds.SeriesTime).split(".")[0].ljust(6, "0"),
                              "%Y%m%d%H%M%S") - timedelta(seconds=activity.decay_s)
    item.RadiopharmaceuticalStartTime = start.strftime("%H%M%S")
    item.RadiopharmaceuticalStartDateTime = start.strftime("%Y%m%d%H%M%S")
    ds.DecayCorrection = "START"


def _pet_source_modules(ds: Dataset, src: Dataset, volume: SeriesVolume, out_units: str) -> None:
    """PET Series and Isotope modules copied from a PET source (cleaned of empty codes)."""
    series_type = str((src.get("SeriesType") or ["STATIC"])[0])
    for keyword in _PET_SERIES_KEYWORDS:
        if keyword in _CONDITIONAL and series_type != _CONDITIONAL[keyword]:
            continue
        if keyword in src and src[keyword].value not in (None, ""):
            setattr(ds, keyword, src[keyword].value)
    ds.RadiopharmaceuticalInformationSequence = _isotope_from_source(src)
    ds.PatientOrientationCodeSequence = _clean_code_sequence(
        src.get("PatientOrientationCodeSequence"))
    ds.PatientGantryRelationshipCodeSequence = _clean_code_sequence(
        src.get("PatientGantryRelationshipCodeSequence"))
    if volume.suv is not None and out_units == "BQML":
        ds.DecayCorrection = volume.suv.decay_correction


def _synthetic_pet_modules(ds: Dataset, src: Dataset, volume: SeriesVolume,
                           activity: SUVFactors | None) -> None:
    """PET Series and Isotope modules of a PET synthesised from a CT source."""
    ds.SeriesDate = (src.get("SeriesDate") or src.get("StudyDate")
                     or src.get("AcquisitionDate") or src.get("ContentDate") or "19700101")
    ds.SeriesTime = (src.get("SeriesTime") or src.get("StudyTime")
                     or src.get("AcquisitionTime") or src.get("ContentTime") or "000000")
    ds.CountsSource = "EMISSION"
    ds.SeriesType = ["STATIC", "IMAGE"]
    ds.CorrectedImage = ["DECY", "ATTN"]
    ds.DecayCorrection = "START"
    ds.RandomsCorrectionMethod = "NONE"
    ds.ReconstructionMethod = "SYNTHETIC (AI)"
    ds.CollimatorType = "NONE"
    ds.RadiopharmaceuticalInformationSequence = _fdg_isotope()
    if activity is not None:
        _stamp_activity(ds, activity)
    ds.PatientOrientationCodeSequence = Sequence([])
    ds.PatientGantryRelationshipCodeSequence = Sequence([])
    ds.FrameOfReferenceUID = volume.frame_of_reference_uid
    ds.PositionReferenceIndicator = src.get("PositionReferenceIndicator", "")
    ds.AcquisitionDate = src.get("AcquisitionDate", "")
    ds.AcquisitionTime = src.get("AcquisitionTime", "")
    ds.ActualFrameDuration = ""
    ds.FrameReferenceTime = "0"
    ds.DecayFactor = "1"
    ds.SliceSensitivityFactor = "1"
    ds.AcquisitionNumber = src.get("AcquisitionNumber", 1) or 1


def build_derived_pet(
    *,
    values: np.ndarray,
    volume: SeriesVolume,
    identity: OutputIdentity,
    description: str,
    details: str = "",
    units: str | None = None,
    activity: SUVFactors | None = None,
) -> list[Dataset]:
    """One PET Image Storage data set per slice of ``values`` on ``volume``'s grid.

    Parameters
    ----------
    values
        (slices, rows, cols) in the output units: the source's units for a PET source,
        SUVbw (GML) for a CT source.
    volume
        The source volume (PET or CT): grid, Frame of Reference, patient and study.
    identity
        Output series identity (deterministic UIDs, number, description).
    description
        DerivationDescription: one sentence (``OutputIdentity.label``).
    details
        Appended to ImageComments: how the intensities were handled, the model's training data.
    units
        Override the Units; default: the source's for PET, GML for a CT source.
    activity
        For a CT source whose ``values`` are activity (Bq/ml): write Units BQML with these SUV
        factors (weight, dose, half-life, injection time = series time - decay time), so that
        a viewer's SUV tool (and :func:`dicomnode.dicom.volume.suv_factors`) gives SUVbw back.

    Raises
    ------
    ValueError
        ``values`` does not match the volume's shape.
    """
    if values.shape != volume.shape:
        raise ValueError(f"values {values.shape} do not match the volume {volume.shape}")
    from_pet = volume.modality == "PT"
    out_units = units or (volume.units if from_pet else ("BQML" if activity else "GML"))
    n = values.shape[0]
    spacing = volume.spacing
    row_dir = volume.affine[:3, 2] / spacing[2]
    col_dir = volume.affine[:3, 1] / spacing[1]
    first = volume.datasets[0]
    result = []
    for k in range(n):
        src = volume.datasets[k]
        ds = new_file_dataset(PET_STORAGE, identity.sop_instance_uid(k))
        copy_patient_study(src, ds)
        ds.Modality = "PT"
        if from_pet:
            _pet_source_modules(ds, src, volume, out_units)
        else:
            _synthetic_pet_modules(ds, src, volume, activity)
        ds.Units = out_units
        ds.Laterality = ""  # General Series Type 2C; the NM/PET orientation module replaces
        #                     PatientPosition, which must then be absent
        ds.NumberOfSlices = n
        ds.ImageIndex = k + 1
        ds.InstanceNumber = k + 1
        for keyword in ("SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime",
                        "ActualFrameDuration", "FrameReferenceTime", "PositionReferenceIndicator",
                        "CorrectedImage", "CollimatorType"):
            if keyword not in ds:
                setattr(ds, keyword, "" if keyword != "FrameReferenceTime" else "0")
        if ds.get("DecayCorrection", "NONE") != "NONE" and "DecayFactor" not in ds:
            ds.DecayFactor = "1"
        ds.FrameOfReferenceUID = volume.frame_of_reference_uid or str(
            first.get("FrameOfReferenceUID", ""))
        ds.ImageType = ["DERIVED", "PRIMARY"]  # PET Image module: value 2 is PRIMARY
        pos = volume.affine[:3, 3] + volume.affine[:3, 0] * k
        plane_attributes(ds, position=list(pos), orientation=[*row_dir, *col_dir],
                         pixel_spacing=(spacing[1], spacing[2]),
                         thickness=volume.slice_thickness or spacing[0])
        pixels, slope = uint16_with_slope(values[k])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope = f"{slope:.8g}"
        ds.RescaleIntercept = "0"
        ds.LossyImageCompression = "00"
        ds.PixelData = pixels.tobytes()
        ds.SourceImageSequence = Sequence([source_reference(src)])
        stamp_equipment(ds, identity, description=description, details=details)
        result.append(ds)
    return result
