"""Helpers around the real validators: dciodvfy and dcm2niix."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import numpy as np

from tests.conftest import require


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) that dicom3tools' dciodvfy reports for one file."""
    require("/usr/bin/dciodvfy")
    r = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True,
                       timeout=120)
    lines = (r.stdout + r.stderr).splitlines()
    return ([ln for ln in lines if ln.startswith("Error")],
            [ln for ln in lines if ln.startswith("Warning")])


class Dcm2niixFailed(AssertionError):
    """dcm2niix converted nothing (the message holds its output)."""


def nifti_affine(folder: Path, out: Path) -> tuple[np.ndarray, tuple[int, ...]]:
    """Convert a DICOM folder with dcm2niix; return the NIfTI sform affine and the shape."""
    require("/usr/bin/dcm2niix")
    out.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["/usr/bin/dcm2niix", "-z", "n", "-b", "n", "-f", "vol", "-o", str(out),
                        str(folder)], capture_output=True, text=True, timeout=300)
    niis = sorted(out.glob("vol*.nii"))
    if not niis:
        raise Dcm2niixFailed(f"dcm2niix wrote nothing: {r.stdout[-1500:]} {r.stderr[-500:]}")
    header = niis[0].read_bytes()[:352]
    dims = struct.unpack("<8h", header[40:56])
    srow = np.array(struct.unpack("<12f", header[280:328])).reshape(3, 4)
    return srow, tuple(dims[1:1 + dims[0]])
