"""`dicomnode train petct-lesions --study DIR`: a site's own labelled PET/CT studies as training
data, read the way the pipeline reads a study (CT onto the PET grid, SUV, the SEG's lesions)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

from dicomnode.dicom.grid import resample_onto
from dicomnode.dicom.volume import load_series
from dicomnode.dicom.write.common import OutputIdentity, save
from dicomnode.dicom.write.seg import SegmentSpec, build_seg, sct
from dicomnode.research.train_petct import labelled_study
from tests.conftest import DATA, ROOT, require

pytestmark = pytest.mark.slow  # simulates a PET/CT study


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("twin")
    subprocess.run([sys.executable, "-m", "dicomnode.cli", "simulate", "pet", "--output",
                    str(out), "--drf", "4", "--seed", "5"], check=True, cwd=ROOT,
                   capture_output=True)
    return out


def study(simulated: Path, folder: Path, *, seg: bool = True) -> Path:
    """A study folder as a site would export it: CT, PET and (optionally) the twin's SEG."""
    shutil.copytree(simulated / "ct", folder / "CT")
    shutil.copytree(simulated / "pet-full", folder / "PET")
    if seg:
        shutil.copy(simulated / "lesions-seg.dcm", folder / "lesions.dcm")
    return folder


def seg_voxels(path: Path) -> int:
    return int((pydicom.dcmread(path).pixel_array > 0).sum())


def test_a_seg_on_the_pet_gives_exactly_its_lesion_voxels(simulated: Path,
                                                          tmp_path: Path) -> None:
    hu, suv, mask = labelled_study(study(simulated, tmp_path / "s"))
    pet = load_series(sorted((simulated / "pet-full").glob("*.dcm")), modality="PT")
    assert hu.shape == suv.shape == mask.shape == pet.shape
    assert mask.sum() == seg_voxels(simulated / "lesions-seg.dcm") > 0
    assert suv[mask].mean() > 3 * suv[~mask & (suv > 0.5)].mean()  # the lesions are hot
    assert hu.min() >= -1024 and (hu > -200).mean() > 0.05  # the CT's body on the PET grid


def test_a_seg_drawn_on_the_ct_is_carried_to_the_pet_grid(simulated: Path,
                                                          tmp_path: Path) -> None:
    folder = study(simulated, tmp_path / "s", seg=False)
    _hu, _suv, truth = labelled_study(study(simulated, tmp_path / "ref"))
    ct = load_series(sorted((folder / "CT").glob("*.dcm")), modality="CT")
    pet = load_series(sorted((folder / "PET").glob("*.dcm")), modality="PT")
    on_ct = resample_onto(truth.astype(np.float32), pet.affine, ct.affine, ct.shape,
                          order=0) > 0.5
    spec = [SegmentSpec(label="Lesions", category=sct("49755003", "Morphologically Altered "
                        "Structure"), type=sct("52988006", "Lesion"), color=(255, 40, 40))]
    ident = OutputIdentity(source_series_uid=ct.series_instance_uid, pipeline="test",
                           pipeline_version="1", kind="SEG", series_number=9100,
                           series_description="lesions drawn on the CT")
    save(build_seg(volume=ct, labels=on_ct.astype(np.uint16), segments=spec, identity=ident),
         folder / "on-ct.dcm")
    _hu, _suv, mask = labelled_study(folder)
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.85, dice


def test_a_folder_that_is_not_one_labelled_study_is_refused_naming_it(
        simulated: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unlabelled: needs one CT series, one PET series "
                                         r"and a SEG; found 1 CT, 1 PET, 0 SEG"):
        labelled_study(study(simulated, tmp_path / "unlabelled", seg=False))
    liver = DATA / "seg" / "dcmqi" / "liver.dcm"  # a real SEG of another patient's CT
    require(liver)
    other = study(simulated, tmp_path / "other", seg=False)
    shutil.copy(liver, other / "liver.dcm")
    with pytest.raises(ValueError, match="liver.dcm references neither series"):
        labelled_study(other)


def test_train_on_site_studies_writes_a_model_that_says_so(simulated: Path,
                                                           tmp_path: Path) -> None:
    folder = study(simulated, tmp_path / "s")
    out = tmp_path / "models" / "site-petct"
    r = subprocess.run([sys.executable, "-m", "dicomnode.cli", "train", "petct-lesions",
                        "--output", str(out), "--study", str(folder), "--iterations", "2",
                        "--channels", "4,4,8,8,8"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = yaml.safe_load((out / "manifest.yaml").read_text())
    voxels = seg_voxels(simulated / "lesions-seg.dcm")
    assert manifest["trained_on"].startswith(
        f"a site's own labelled PET/CT studies: 1 studies, {voxels} lesion voxels")
    bad = subprocess.run([sys.executable, "-m", "dicomnode.cli", "train", "petct-lesions",
                          "--output", str(tmp_path / "x"), "--study", str(simulated / "ct")],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "needs one CT series, one PET series and a SEG" in bad.stderr
