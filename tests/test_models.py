"""Model registry and ``ct-organs``: a MONAI bundle built here runs through the pipeline."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import yaml

from dicomnode.app import check_pipelines
from dicomnode.dicom.volume import load_series
from dicomnode.pipelines.models import scan_models
from dicomnode.settings import ConfigError, parse_settings
from tests.conftest import DATA, ROOT

pytestmark = pytest.mark.data  # reads ../shared/data

warnings.filterwarnings("ignore", category=UserWarning)
CT3 = DATA / "seg" / "dcmqi" / "ct-3slice"


def make_bundle(root: Path, *, with_overlay: bool = True) -> Path:
    """A real MONAI bundle whose network is a 1x1x1 convolution: class 1 where HU > 0.

    Inputs are scaled from [-1000, 1000] HU to [0, 1]; logits are (5 - 10x, 10x - 5), so the
    argmax is 1 exactly where x > 0.5, i.e. HU > 0.
    """
    import torch

    bundle = root / "tiny-dense"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "metadata.json").write_text(json.dumps({
        "version": "0.1.0", "license": "CC0", "data_source": "none: weights set by hand (test)",
        "network_data_format": {"outputs": {"pred": {"channel_def": {
            "0": "background", "1": "dense tissue"}}}}}))
    (bundle / "configs" / "inference.json").write_text(json.dumps({
        "network_def": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2,
                        "kernel_size": 1},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 64, 64]},
        "preprocessing": {"transforms": [{"_target_": "ScaleIntensityRanged", "keys": "image",
                                          "a_min": -1000, "a_max": 1000, "b_min": 0,
                                          "b_max": 1, "clip": True}]}}))
    net = torch.nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        net.weight[:] = torch.tensor([-10.0, 10.0]).view(2, 1, 1, 1, 1)
        net.bias[:] = torch.tensor([5.0, -5.0])
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    if with_overlay:
        sha = hashlib.sha256((bundle / "models" / "model.pt").read_bytes()).hexdigest()
        (bundle / "dicomnode.yaml").write_text(yaml.safe_dump({
            "sha256": sha, "trained_on": "nothing: a threshold set by hand for tests",
            "labels": [{"value": 1, "label": "Dense tissue",
                        "category": {"value": "85756007", "meaning": "Tissue"},
                        "type": {"value": "87784001", "meaning": "Soft tissue"},
                        "color": [200, 80, 60]}]}))
    return bundle


def test_bundle_runs_through_ct_organs(tmp_path: Path) -> None:
    models = tmp_path / "models"
    make_bundle(models)
    found, problems = scan_models(models)
    assert problems == [] and found["tiny-dense"].verified
    assert found["tiny-dense"].manifest.roi_size == (16, 64, 64)
    settings = parse_settings({
        "models_dir": str(models),
        "rules": [{"name": "organs", "pipelines": ["ct-organs"],
                   "models": {"ct-organs": "tiny-dense"}}]})
    assert check_pipelines(settings) == {"tiny-dense": "0.1.0"}
    from dicomnode.pipelines import JobContext, get_pipeline

    files = tuple(sorted(CT3.iterdir()))
    ctx = JobContext(job_id=1, pipeline="ct-organs", pipeline_version="1.0.0",
                     series_instance_uid="x", input_files=files, output_dir=tmp_path / "out",
                     device="cpu", series_number=9001, series_description_prefix="AI ",
                     options={"model": "tiny-dense", "models_dir": str(models)})
    (out,) = get_pipeline("ct-organs").load()(ctx)
    seg = hd.seg.segread(out.path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Dense tissue"]
    prop = seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
    assert (prop.CodeValue, prop.CodingSchemeDesignator) == ("87784001", "SCT")
    alg = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert alg.AlgorithmName == "tiny-dense" and alg.AlgorithmVersion == "0.1.0"
    vol = load_series(list(files))
    back = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[d.SOPInstanceUID for d in vol.datasets],
        segment_numbers=[1], combine_segments=True)
    assert np.array_equal(back > 0, vol.array > 0)  # exactly the threshold the weights encode


def test_bundle_without_overlay_is_unverified(tmp_path: Path) -> None:
    make_bundle(tmp_path, with_overlay=False)
    found, problems = scan_models(tmp_path)
    entry = found["tiny-dense"]
    assert problems == [] and not entry.verified and entry.notes
    assert [lab.label for lab in entry.manifest.labels] == ["dense tissue"]


def test_bad_weights_fail_at_startup(tmp_path: Path) -> None:
    models = tmp_path / "models"
    bundle = make_bundle(models)
    with open(bundle / "models" / "model.pt", "ab") as fh:
        fh.write(b"tampered")
    settings = parse_settings({"models_dir": str(models)})
    with pytest.raises(ConfigError, match="sha256"):
        check_pipelines(settings)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"models_dir": str(models)}))
    r = subprocess.run([sys.executable, "-m", "dicomnode.cli", "models", "check", "--config",
                        str(cfg)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "sha256" in r.stderr
    (bundle / "models" / "model.pt").unlink()
    _, problems = scan_models(models)
    assert problems and "missing" in problems[0]


def test_models_list_cli(tmp_path: Path) -> None:
    make_bundle(tmp_path / "models")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"models_dir": str(tmp_path / "models")}))
    r = subprocess.run([sys.executable, "-m", "dicomnode.cli", "models", "list", "--json",
                        "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT)
    data = json.loads(r.stdout)
    assert [m["name"] for m in data["models"]] == ["tiny-dense"]
    assert data["models"][0]["verified"] and data["models"][0]["layout"] == "monai-bundle"


def test_rule_naming_unknown_model_is_a_config_error(tmp_path: Path) -> None:
    settings = parse_settings({"models_dir": str(tmp_path), "rules": [
        {"name": "r", "pipelines": ["ct-organs"], "models": {"ct-organs": "nope"}}]})
    with pytest.raises(ConfigError, match=r"rules\.0\.models\.ct-organs"):
        check_pipelines(settings)


def test_model_cache_loads_once_and_notices_new_weights(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import dicomnode.pipelines.models as registry

    models = tmp_path / "models"
    bundle = make_bundle(models)
    scans = []
    real_scan = registry.scan_models
    monkeypatch.setattr(registry, "scan_models",
                        lambda d: scans.append(d) or real_scan(d))  # type: ignore[func-returns-value]
    cache = registry.ModelCache()
    first = cache.get(models, "tiny-dense", device="cpu")
    assert cache.get(models, "tiny-dense", device="cpu") is first
    assert len(scans) == 1  # no re-scan, no re-hash for the second job
    weights = bundle / "models" / "model.pt"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    second = cache.get(models, "tiny-dense", device="cpu")  # changed weights: verified again
    assert second is not first and len(scans) == 2
    with open(weights, "ab") as fh:
        fh.write(b"x")
    with pytest.raises(registry.ModelError):  # and a tampered file is refused, not used
        cache.get(models, "tiny-dense", device="cpu")
