"""pet-denoise and ct2pet end to end on the real data, with the models shipped in models/."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.models import scan_models
from dicomnode.offline import run_folder
from dicomnode.pipelines.ct_tissue import body_mask
from dicomnode.settings import parse_settings
from dicomnode.volume import load_series
from tests.conftest import DATA, LIDC, ROOT
from tests.dicomtools import dciodvfy

warnings.filterwarnings("ignore", category=UserWarning)
SETTINGS = parse_settings({})


def test_shipped_models_are_verified_and_say_simulated() -> None:
    found, problems = scan_models(ROOT / "models")
    assert problems == []
    for name in ("pet-denoise-drmc", "ct2pet-district"):
        entry = found[name]
        assert entry.verified and "SIMULATED" in entry.manifest.trained_on
        assert entry.weights.stat().st_size < 20 * 2**20


@pytest.mark.parametrize("name", ["ge-signa-petmr-fdg", "philips-gemini-ctac",
                                  "ge-advance-bigendian"])
def test_pet_denoise_keeps_units_and_suv(tmp_path: Path, name: str) -> None:
    src = DATA / "pet" / name
    (paths,) = run_folder(SETTINGS, pipeline="pet-denoise", input_dir=src,
                          output_dir=tmp_path).values()
    assert not isinstance(paths, Exception), paths
    source = load_series(sorted(p for p in src.iterdir() if p.is_file()))
    out = load_series(paths)
    assert out.units == source.units and out.shape == source.shape
    if source.suv is not None:
        assert out.suv.factor == pytest.approx(source.suv.factor)
    assert np.allclose(out.affine, source.affine, atol=1e-4)
    ds = pydicom.dcmread(paths[0])
    assert "enhanced" in ds.SeriesDescription and "simulated" in ds.DerivationDescription.lower()
    errors, _ = dciodvfy(paths[0])
    assert errors == []
    # the activity is where it was: the enhanced image correlates with the source
    a, b = source.array.ravel(), out.array.ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.8


def test_ct2pet_synthetic_pet_on_lidc(tmp_path: Path) -> None:
    (paths,) = run_folder(SETTINGS, pipeline="ct2pet", input_dir=LIDC,
                          output_dir=tmp_path).values()
    assert not isinstance(paths, Exception), paths
    ct = load_series(sorted(LIDC.glob("*.dcm")))
    pet = load_series(paths)
    assert pet.units == "GML" and pet.shape == ct.shape
    assert pet.frame_of_reference_uid == ct.frame_of_reference_uid
    assert np.allclose(pet.affine, ct.affine, atol=1e-4)
    ds = pydicom.dcmread(paths[0])
    assert "SYNTHETIC" in ds.SeriesDescription and "SYNTHETIC" in ds.ImageComments.upper()
    errors, _ = dciodvfy(paths[0])
    assert errors == []
    assert pet.array.min() >= 0 and pet.array.max() <= 20
    body = body_mask(ct.array)
    lung = body & (ct.array < -600)
    soft = body & (ct.array > 0) & (ct.array < 100)
    # the model learned the tissue mapping of its (simulated) training data
    assert pet.array[lung].mean() < pet.array[soft].mean()
    assert pet.array[~body].mean() < 0.3 * pet.array[soft].mean()
