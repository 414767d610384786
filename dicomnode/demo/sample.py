"""A synthetic chest CT series (a phantom) for the demo when no real data is present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = ["phantom_hu", "write_ct_series", "write_phantom_ct"]


def phantom_hu(n: int, size: int) -> np.ndarray:
    """HU: an elliptic body with fat rim, two lungs and a spine, in air."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = size / 2
    hu = np.full((n, size, size), -1000, np.float32)
    body = ((xx - c) / (0.42 * size)) ** 2 + ((yy - c) / (0.30 * size)) ** 2 <= 1
    inner = ((xx - c) / (0.38 * size)) ** 2 + ((yy - c) / (0.26 * size)) ** 2 <= 1
    spine = ((xx - c) / (0.05 * size)) ** 2 + ((yy - c - 0.18 * size) / (0.05 * size)) ** 2 <= 1
    for k in range(n):
        s = hu[k]
        s[body] = -100
        s[inner] = 40
        shrink = 1 - abs(k - n / 2) / n  # lungs taper at the apex and base
        for side in (-1, 1):
            lung = ((xx - c - side * 0.17 * size) / (0.12 * size * shrink)) ** 2 + \
                   ((yy - c) / (0.18 * size * shrink)) ** 2 <= 1
            s[lung] = -850
        s[spine] = 700
    rng = np.random.default_rng(0)
    return hu + rng.normal(0, 10, hu.shape).astype(np.float32)


def write_phantom_ct(folder: Path, *, slices: int = 60, size: int = 256) -> list[Path]:
    """Write the chest phantom as a CT Image Storage series; returns the files."""
    return write_ct_series(folder, phantom_hu(slices, size), (2.5, 0.7, 0.7),
                           origin=(-size * 0.35, -size * 0.35, -100.0),
                           description="Phantom chest CT (synthetic)", body_part="CHEST")


def write_ct_series(folder: Path, hu: np.ndarray, spacing: tuple[float, float, float], *,
                    origin: tuple[float, float, float], description: str,
                    body_part: str) -> list[Path]:
    """Write HU (slices, rows, cols; slice k at ``origin`` + k x spacing[0] along +z, axial,
    rows along +y, columns along +x) as a CT Image Storage series; returns the files."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    slices = hu.shape[0]
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID = "PHANTOM^DEMO", "DEMO0001"
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.StudyDate = ds.SeriesDate = "20260101"
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        ds.SeriesDescription, ds.BodyPartExamined = description, body_part
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame, ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + spacing[0] * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.KVP, ds.AcquisitionNumber, ds.PatientPosition = 120, 1, "HFS"
        ds.Manufacturer = "dicomnode phantom"
        ds.PixelData = (np.round(np.clip(hu[k], -1024, 3000)) + 1024).astype(np.int16).tobytes()
        path = folder / f"{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
