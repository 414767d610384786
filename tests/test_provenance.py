"""Every output says which pipeline, model and exact weights made it, in the standard places:
a one-sentence DerivationDescription for the viewer, the full provenance in
ContributingEquipmentSequence (and AlgorithmIdentificationSequence for SEG), and no value
longer than its VR allows."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset

from dicomnode.dicom.volume import load_series
from dicomnode.dicom.write.common import OutputIdentity, fit, save
from dicomnode.dicom.write.seg import build_seg
from dicomnode.files import file_sha256
from dicomnode.pipelines.ct_tissue import SEGMENTS, TISSUE_KEYS
from dicomnode.pipelines.models import scan_models
from dicomnode.pipelines.offline import run_folder
from dicomnode.settings import parse_settings
from tests.conftest import DATA, ROOT

pytestmark = pytest.mark.data  # reads ../shared/data

warnings.filterwarnings("ignore", category=UserWarning)

# PS3.5 table 6.2-1: maximum length of one value, in characters
VR_MAX = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64,
          "LT": 10240, "SH": 16, "ST": 1024, "TM": 14, "UI": 64}
PET = DATA / "pet" / "ge-advance-bigendian"  # the smallest PET series of the shared data


def vr_violations(ds: Dataset, where: str = "") -> list[str]:
    """Every value of ``ds`` (sequences and file meta included) longer than its VR allows."""
    found = []
    elements = list(ds) + (list(ds.file_meta) if getattr(ds, "file_meta", None) else [])
    for elem in elements:
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value or []):
                found += vr_violations(item, f"{where}{elem.keyword}[{i}].")
            continue
        if elem.value in (None, "", b""):
            continue
        values = list(elem.value) if elem.VM > 1 else [elem.value]
        for value in values:
            if elem.VR == "PN":  # 64 per component group
                too_long = any(len(g) > 64 for g in str(value).split("="))
            elif elem.VR in VR_MAX:
                too_long = len(str(value)) > VR_MAX[elem.VR]
            else:
                continue
            if too_long:
                found.append(f"{where}{elem.keyword} ({elem.VR}): {len(str(value))} characters")
    return found


def _pet_denoise(models_dir: Path, out: Path) -> list[Path]:
    (paths,) = run_folder(parse_settings({"models_dir": str(models_dir)}), pipeline="pet-denoise",
                          input_dir=PET, output_dir=out).values()
    assert not isinstance(paths, Exception), paths
    return paths


def _weights(ds: Dataset) -> str:
    """The weights sha256 an output carries (the 64-hex value of SoftwareVersions)."""
    (sha,) = [v for v in ds.SoftwareVersions if len(v) == 64 and set(v) <= set("0123456789abcdef")]
    return str(sha)


def test_fit_cuts_at_a_word_boundary() -> None:
    assert fit("short enough", 64) == "short enough"
    text = "trained on SIMULATED data only: " + "eight cases of the twin, " * 60
    cut = fit(text, 1024)
    assert len(cut) <= 1024 and cut.endswith(" ...")
    assert text.startswith(cut[:-4]) and text[len(cut) - 4] == " "  # a whole word, then " ..."


def test_enhanced_pet_names_its_model_and_weights_in_short_valid_values(tmp_path: Path) -> None:
    paths = _pet_denoise(ROOT / "models", tmp_path / "out")
    models, _ = scan_models(ROOT / "models")
    for path in paths:
        ds = pydicom.dcmread(path)
        assert vr_violations(ds) == [], path.name
    ds = pydicom.dcmread(paths[0])
    name = ds.ContributingEquipmentSequence[0].ManufacturerModelName
    manifest = models[name].manifest
    assert _weights(ds) == manifest.sha256
    assert manifest.sha256 in ds.ContributingEquipmentSequence[0].ContributionDescription
    # one sentence a viewer's info panel can show, not the model's whole lineage
    label = ds.DerivationDescription
    assert label.endswith(".") and label.count(". ") == 0 and len(label) < 200
    assert f"model {manifest.name} {manifest.version}" in label
    assert "trained on simulated data" in label
    assert manifest.trained_on[:200] in " ".join(ds.ImageComments.split())
    assert list(ds.ImageType) == ["DERIVED", "PRIMARY"]  # the PET IOD requires PRIMARY


@pytest.mark.slow
def test_replaced_weights_change_the_hash_the_output_carries(tmp_path: Path) -> None:
    import torch

    first = pydicom.dcmread(_pet_denoise(ROOT / "models", tmp_path / "a")[0])
    name = first.ContributingEquipmentSequence[0].ManufacturerModelName
    models = tmp_path / "models"
    for d in (ROOT / "models").iterdir():
        if d.is_dir():
            shutil.copytree(d, models / d.name)
    weights = models / name / "model.pt"
    state = torch.load(weights, map_location="cpu")
    key = next(k for k, v in state.items() if v.dtype.is_floating_point)
    state[key] = state[key] * 1.01
    torch.save(state, weights)
    manifest = models / name / "manifest.yaml"
    data = yaml.safe_load(manifest.read_text())
    manifest.write_text(yaml.safe_dump({**data, "sha256": file_sha256(weights)}, sort_keys=False))
    second = pydicom.dcmread(_pet_denoise(models, tmp_path / "b")[0])
    assert _weights(second) == file_sha256(weights) != _weights(first)
    assert second.SOPInstanceUID == first.SOPInstanceUID  # same job identity: replaces in PACS


def test_seg_carries_the_weights_in_its_algorithm_identification(tmp_path: Path) -> None:
    folder = DATA / "seg" / "dcmqi" / "ct-3slice"
    vol = load_series(sorted(p for p in folder.iterdir() if p.is_file()))
    labels = np.zeros(vol.shape, np.uint8)
    labels[:, 10:30, 10:30] = 1
    sha = "ab" * 32
    ident = OutputIdentity(source_series_uid=vol.series_instance_uid, pipeline="ct-organs",
                           pipeline_version="1.0.0", kind="SEG", series_number=9000,
                           series_description="AI " + "very long organ model name " * 5,
                           model_name="site-organs", model_version="2.1",
                           trained_on="SIMULATED data only: " + "a long lineage, " * 200,
                           weights_sha256=sha)
    seg = build_seg(volume=vol, labels=labels, segments=[SEGMENTS[list(TISSUE_KEYS)[0]]],
                    identity=ident)
    back = pydicom.dcmread(save(seg, tmp_path / "seg.dcm"))
    assert vr_violations(back) == []
    algorithm = back.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("site-organs", "2.1")
    assert f"weights_sha256={sha}" in algorithm.AlgorithmParameters
    assert sha in back.SoftwareVersions
    equipment = back.ContributingEquipmentSequence[0]
    assert sha in equipment.ContributionDescription
    assert equipment.ContributionDescription.endswith(" ...")  # the lineage cut at a word

