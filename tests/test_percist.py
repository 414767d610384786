"""petct-percist: the liver found on the CT (whole-body twin: the phantom's liver, 58 HU, on the
patient's right), the threshold 1.5 x SUVmean + 2 x SD of a 3 cm sphere in it; a CT without a
liver falls back to a fixed SUV, and the outputs say which happened."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.dicom.volume import load_series
from dicomnode.pipelines import get_pipeline, job_context
from dicomnode.pipelines.percist import FALLBACK_SUV, SPHERE_RADIUS_MM, liver_reference
from dicomnode.pipelines.petct_lesions import body_on_pet, ct_on_pet
from dicomnode.settings import parse_settings
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # simulates two PET/CT studies


def simulate(out: Path, *args: str) -> dict[str, Path]:
    subprocess.run([sys.executable, "-m", "dicomnode.cli", "simulate", "pet", "--output",
                    str(out), "--drf", "4", "--seed", "3", *args], check=True, cwd=ROOT,
                   capture_output=True)
    return {"CT": out / "ct", "PET": out / "pet-full"}


@pytest.fixture(scope="module")
def abdomen(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The whole-body twin from the lower chest to the pelvis: liver, spleen, kidneys."""
    return simulate(tmp_path_factory.mktemp("abdomen"), "--phantom", "whole-body",
                    "--z-range", "900", "1300")


@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The small chest phantom: lungs, spine, no liver."""
    return simulate(tmp_path_factory.mktemp("chest"))


def volumes(study: dict[str, Path]) -> tuple:
    ct = load_series(sorted(study["CT"].glob("*.dcm")), modality="CT")
    pet = load_series(sorted(study["PET"].glob("*.dcm")), modality="PT")
    assert pet.suv is not None
    hu = ct_on_pet(ct, pet)
    return hu, pet.array * pet.suv.factor, body_on_pet(hu), pet


def test_the_reference_sphere_sits_in_the_liver(abdomen: dict[str, Path]) -> None:
    hu, suv, body, pet = volumes(abdomen)
    ref = liver_reference(hu, suv, body, pet.affine)
    assert ref.centre is not None
    k, i, j = ref.centre
    assert 50 < hu[k - 1:k + 2, i - 1:i + 2, j - 1:j + 2].mean() < 66  # the phantom liver
    x_centre = (pet.affine @ np.array([k, i, j, 1.0]))[0]
    x_body = np.mean([(pet.affine @ np.array([*v, 1.0]))[0] for v in np.argwhere(body)[::97]])
    assert x_centre < x_body - 20  # on the patient's right (LPS x grows to the left)
    # the threshold is computed from the sphere, as PERCIST defines it
    offsets = np.indices(hu.shape).reshape(3, -1).T - np.array(ref.centre)
    inside = (((offsets * np.array(pet.spacing)) ** 2).sum(axis=1)
              <= SPHERE_RADIUS_MM**2).reshape(hu.shape)
    assert ref.mean == pytest.approx(float(suv[inside].mean()), rel=1e-5)
    assert ref.threshold == pytest.approx(1.5 * ref.mean + 2 * float(suv[inside].std(ddof=1)),
                                          rel=1e-5)
    assert ref.text() == (f"PERCIST: SUV >= {ref.threshold:.2f}, liver {ref.mean:.2f} "
                          f"SD {ref.sd:.2f}")


def test_no_liver_falls_back_to_a_fixed_threshold_and_says_so(chest: dict[str, Path],
                                                              tmp_path: Path) -> None:
    hu, suv, body, pet = volumes(chest)
    ref = liver_reference(hu, suv, body, pet.affine)
    assert ref.centre is None and ref.threshold == FALLBACK_SUV
    spec = get_pipeline("petct-percist")
    ctx = job_context(parse_settings({}), spec, job_id=1, series_instance_uid="x",
                      input_files=(), output_dir=tmp_path, device="cpu",
                      series_roles={r: tuple(sorted(f.glob("*.dcm"))) for r, f in chest.items()})
    outputs = {o.kind: o for o in spec.load()(ctx)}
    described = pydicom.dcmread(outputs["SR"].path).SeriesDescription
    assert described.endswith(f"(PERCIST: no liver on CT, SUV >= {FALLBACK_SUV:.2f})")
    if "SEG" in outputs:  # lesions above the fixed threshold, labelled the same way
        assert "no liver on CT" in pydicom.dcmread(outputs["SEG"].path).SeriesDescription
