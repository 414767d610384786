"""A synthetic chest CT series (a phantom) for the demo when no real data is present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = ["phantom_hu", "write_phantom_ct"]


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
    """Write the phantom as a CT Image Storage series; returns the files."""
    folder.mkdir(parents=True, exist_ok=True)
    hu = phantom_hu(slices, size)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
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
        ds.SeriesDescription = "Phantom chest CT (synthetic)"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame, ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-size * 0.35, -size * 0.35, -100 + 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 2.5
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.KVP, ds.AcquisitionNumber, ds.PatientPosition = 120, 1, "HFS"
        ds.Manufacturer = "dicomnode phantom"
        ds.PixelData = (np.round(hu[k]) + 1024).astype(np.int16).tobytes()
        path = folder / f"{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
