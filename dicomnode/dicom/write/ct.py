"""Derived CT writer (CT Image Storage), e.g. a super-resolved series with thinner slices.

New slice positions, thickness and spacing come from the output grid; each slice references
the source slices nearest to it; ImageType is DERIVED\\SECONDARY\\AXIAL; HU are stored as int16
with RescaleSlope 1 and RescaleIntercept -1024 (the common CT encoding).
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomnode.dicom.volume import SeriesVolume
from dicomnode.dicom.write.common import (
    OutputIdentity,
    copy_patient_study,
    new_file_dataset,
    plane_attributes,
    source_reference,
    stamp_equipment,
)

__all__ = ["CT_STORAGE", "build_derived_ct"]

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def build_derived_ct(
    *,
    values: np.ndarray,
    affine: np.ndarray,
    source: SeriesVolume,
    identity: OutputIdentity,
    description: str,
    slice_thickness: float,
    details: str = "",
) -> list[Dataset]:
    """One CT Image Storage data set per slice of ``values`` (HU) on the grid ``affine``.

    Parameters
    ----------
    values
        (slices, rows, cols) in HU.
    affine
        4x4 (slice, row, column) -> LPS of the output grid; same Frame of Reference as the source.
    source
        The source CT volume (patient, study, Frame of Reference, source references).
    identity
        Output series identity.
    description
        DerivationDescription: one sentence (``OutputIdentity.label``).
    slice_thickness
        Nominal reconstructed thickness of the output slices (mm).
    details
        Appended to ImageComments.
    """
    if values.ndim != 3:
        raise ValueError("values must be (slices, rows, cols)")
    spacing = [float(np.linalg.norm(affine[:3, a])) for a in range(3)]
    row_dir = affine[:3, 2] / spacing[2]
    col_dir = affine[:3, 1] / spacing[1]
    normal = np.cross(row_dir, col_dir)
    src_z = np.array([np.asarray(p) @ normal for p in source.slice_positions])
    hu = np.clip(np.round(values), -1024, 31743).astype(np.int32)
    stored = (hu + 1024).astype(np.int16)
    out = []
    for k in range(values.shape[0]):
        pos = affine[:3, 3] + affine[:3, 0] * k
        nearest = int(np.argmin(np.abs(src_z - pos @ normal)))
        src = source.datasets[nearest]
        ds = new_file_dataset(CT_STORAGE, identity.sop_instance_uid(k))
        copy_patient_study(src, ds)
        ds.Modality = "CT"
        ds.SeriesDate = src.get("SeriesDate") or src.get("StudyDate") or ""
        ds.SeriesTime = src.get("SeriesTime") or src.get("StudyTime") or ""
        ds.FrameOfReferenceUID = source.frame_of_reference_uid
        ds.PositionReferenceIndicator = src.get("PositionReferenceIndicator", "")
        ds.PatientPosition = src.get("PatientPosition", "") or ""
        ds.BodyPartExamined = src.get("BodyPartExamined", "") or ""
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = src.get("AcquisitionNumber", 1) or 1
        ds.KVP = src.get("KVP", "") or ""
        ds.PatientOrientation = ""
        plane_attributes(ds, position=list(pos), orientation=[*row_dir, *col_dir],
                         pixel_spacing=(spacing[1], spacing[2]), thickness=slice_thickness)
        ds.SpacingBetweenSlices = f"{spacing[0]:.6g}"
        ds.SliceLocation = f"{float(pos @ normal):.6g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape[1:]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.LossyImageCompression = "00"
        ds.PixelData = stored[k].tobytes()
        ds.SourceImageSequence = Sequence([source_reference(src)])
        stamp_equipment(ds, identity, description=description, details=details)
        out.append(ds)
    return out
