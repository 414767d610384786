"""SR4ZCT: the degradation operators, a real CT super-resolved beyond linear interpolation, and
``ct-sr`` end to end through the derived CT writer."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.dicom.volume import load_series
from dicomnode.dicom.write.common import OutputIdentity, save
from dicomnode.dicom.write.ct import build_derived_ct
from dicomnode.pipelines.offline import run_folder
from dicomnode.pipelines.sr4zct import (
    SRBudget,
    _centres,
    _interp_matrix,
    apply_axis,
    degrade_matrix,
    n_samples,
    super_resolve,
    training_pairs,
    upsample_matrix,
)
from dicomnode.settings import parse_settings
from tests.conftest import LIDC
from tests.dicomtools import dciodvfy

pytestmark = pytest.mark.data  # reads ../shared/data

warnings.filterwarnings("ignore", category=UserWarning)


def test_identity_when_target_equals_input() -> None:
    for n, r0 in ((50, 0.7), (17, 2.5)):
        assert np.allclose(degrade_matrix(n, r0, 0, r0, 0), np.eye(n))
        assert np.allclose(upsample_matrix(n, r0, 0, r0, 0), np.eye(n))


@pytest.mark.parametrize(("r", "o"), [(5.0, 2.5), (7.5, 2.5), (2.5, 0.0), (3.0, 1.0)])
def test_constants_preserved_and_sample_count(r: float, o: float) -> None:
    n, r0 = 100, 0.7
    length = r0 + (n - 1) * r0
    d = degrade_matrix(n, r0, 0, r, o)
    u = upsample_matrix(n, r0, 0, r, o)
    assert d.shape == (1 + math.floor((length - r) / (r - o)), n)
    assert n_samples(length, r, o) == d.shape[0]
    assert np.allclose(d @ np.full(n, 7.0), 7.0)
    assert np.allclose(u @ (d @ np.full(n, -3.0)), -3.0)
    # centres are spaced by the slice spacing d = r - o
    assert np.allclose(np.diff(_centres(d.shape[0], r, o)), r - o)


def test_degradation_blurs_along_one_axis_only() -> None:
    img = np.zeros((1, 64, 64), np.float32)
    img[0, 32, :] = 1.0  # a horizontal line: vertical degradation spreads it, horizontal not
    inputs, targets = training_pairs(img, r_xy=0.7, r_z=5.0, o_z=2.5)
    assert inputs.shape == (2, 64, 64) and np.array_equal(targets[0], img[0])
    assert (inputs[0][:, 10] > 0.01).sum() > 3  # spread over several rows
    # horizontally the line is constant, so the horizontal degradation leaves it as it is
    assert np.allclose(inputs[1], np.rot90(img[0]), atol=1e-5)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.clip(a, -1024, 3071) - np.clip(b, -1024, 3071)) ** 2))
    return 10 * math.log10(4095.0 ** 2 / mse)


@pytest.fixture(scope="module")
def lidc_crop() -> np.ndarray:
    vol = load_series(sorted(LIDC.glob("*.dcm")))
    return vol.array[:, 208:304, 208:304].copy()  # central 96 x 96 pixels (67 mm)


@pytest.mark.slow
def test_sr4zct_beats_linear_on_real_ct(lidc_crop: np.ndarray) -> None:
    gt, r0, r, o = lidc_crop, 2.5, 5.0, 2.5
    thick = apply_axis(degrade_matrix(gt.shape[0], r0, 0, r, o), gt, 0)
    linear = apply_axis(_interp_matrix(_centres(gt.shape[0], r0, 0),
                                       _centres(thick.shape[0], r, o)), thick, 0)
    sr, stats = super_resolve(thick, r_xy=0.703125, r_z=r, o_z=o, r_target=r0,
                              budget=SRBudget(iterations=600))
    n = min(len(sr), len(gt))
    assert stats["loss_last"] < stats["loss_first"]
    p_lin, p_sr = psnr(linear[:n], gt[:n]), psnr(sr[:n], gt[:n])
    print(f"PSNR linear {p_lin:.2f} dB, SR4ZCT {p_sr:.2f} dB, {stats}")
    assert p_sr > p_lin + 0.5


def make_thick_series(folder: Path, sub: int = 24) -> Path:
    """A thick-slice acquisition (5 mm slices every 2.5 mm), written as a scanner would."""
    vol = load_series(sorted(LIDC.glob("*.dcm")))
    gt = vol.array[40:40 + sub]
    thick = apply_axis(degrade_matrix(sub, 2.5, 0, 5.0, 2.5), gt, 0)
    aff = vol.affine.copy()
    aff[:3, 3] = vol.affine[:3, 3] + vol.affine[:3, 0] * (40 + 0.5)  # centre of 5 mm slices
    ident = OutputIdentity(source_series_uid=vol.series_instance_uid, pipeline="make-thick",
                           pipeline_version="1", kind="CT", series_number=3,
                           series_description="thick 5mm")
    for k, ds in enumerate(build_derived_ct(values=thick, affine=aff, source=vol,
                                            identity=ident, description="test input",
                                            slice_thickness=5.0)):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        save(ds, folder / f"{k:03d}.dcm")
    return folder


@pytest.mark.slow
def test_ct_sr_runs_from_a_rule_in_the_node(make_node, tmp_path: Path) -> None:
    from sqlalchemy import select

    from dicomnode.audit.models import Job, JobStatus, Output
    from tests.conftest import storescu, wait_for

    src = make_thick_series(tmp_path / "thick")
    node = make_node(rules=[{"name": "thick-ct", "match": {"SliceThickness": {"min": 3}},
                             "pipelines": ["ct-sr"]}],
                     executor={"workers": 1, "poll_interval_s": 0.2},
                     ct_sr={"iterations": 100,
                            "target_thickness_mm": 1.25})
    assert storescu(src, node.port).returncode == 0

    def done() -> Job | None:
        with node.session() as s:
            job = s.execute(select(Job)).scalar_one_or_none()
            return job if job and job.status not in (JobStatus.QUEUED, JobStatus.RUNNING) \
                else None

    job = wait_for(done, timeout=180, interval=0.5)
    assert job.status == JobStatus.SUCCEEDED, job.error_detail
    assert job.progress == 1.0 and job.timings["pipeline.iterations"] > 0
    with node.session() as s:
        outputs = s.execute(select(Output)).scalars().all()
    assert len(outputs) > 24 and {o.kind for o in outputs} == {"CT"}
    assert node.stop() == 0


@pytest.mark.slow
def test_ct_sr_pipeline_writes_thin_series(tmp_path: Path) -> None:
    src = make_thick_series(tmp_path / "thick")
    thick = load_series(sorted(src.iterdir())).array
    settings = parse_settings({"ct_sr": {"iterations": 200,
                                         "target_thickness_mm": 1.25}})
    (paths,) = run_folder(settings, pipeline="ct-sr", input_dir=src,
                          output_dir=tmp_path / "out").values()
    assert not isinstance(paths, Exception), paths
    out = load_series(paths)
    assert np.isclose(out.spacing[0], 1.25, atol=1e-3)
    length = 5.0 + (thick.shape[0] - 1) * 2.5
    # the thin slices cover the length of the thick acquisition (to within one thin slice)
    assert abs(out.shape[0] * 1.25 - length) <= 1.25
    thick_vol = load_series(sorted(src.iterdir()))
    normal = thick_vol.affine[:3, 0] / np.linalg.norm(thick_vol.affine[:3, 0])
    first_expected = thick_vol.affine[:3, 3] @ normal - 2.5 + 0.625
    assert abs(out.affine[:3, 3] @ normal - first_expected) < 1e-3
    ds = pydicom.dcmread(paths[0])
    assert float(ds.SliceThickness) == 1.25 and "SR4ZCT" in ds.DerivationDescription
    assert ds.FrameOfReferenceUID == thick_vol.frame_of_reference_uid
    errors, _ = dciodvfy(paths[0])
    assert errors == []


def test_ct_sr_pipeline_on_a_small_thick_series(tmp_path: Path) -> None:
    """The fast tier's ct-sr run: a generated 5 mm series (12 x 64 x 64) through the offline
    path with a tiny training budget; the output is a derived CT at the target thickness,
    on the source's Frame of Reference, covering the same length, valid for dciodvfy."""
    from dicomnode.demo.sample import phantom_hu, write_ct_series
    from dicomnode.pipelines.offline import run_folder
    from dicomnode.settings import parse_settings
    from tests.test_provenance import vr_violations

    src = tmp_path / "thick"
    write_ct_series(src, phantom_hu(12, 64), (5.0, 2.0, 2.0), origin=(-64.0, -64.0, 0.0),
                    description="thick", body_part="CHEST")
    settings = parse_settings({"ct_sr": {"iterations": 20,
                                         "target_thickness_mm": 2.5}})
    (paths,) = run_folder(settings, pipeline="ct-sr", input_dir=src,
                          output_dir=tmp_path / "out").values()
    assert not isinstance(paths, Exception), paths
    out = load_series(paths)
    source = load_series(sorted(src.iterdir()))
    assert out.spacing[0] == pytest.approx(2.5) and out.shape[1:] == (64, 64)
    assert abs(out.shape[0] * 2.5 - 12 * 5.0) <= 2.5
    ds = pydicom.dcmread(paths[0])
    assert ds.FrameOfReferenceUID == source.frame_of_reference_uid
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    # one sentence saying what made it; no value longer than its VR allows
    assert ds.DerivationDescription.startswith("CT super-resolved from 5 mm to 2.5 mm slices by "
                                               "dicomnode ct-sr")
    assert "simulated" not in ds.DerivationDescription  # trained on the series itself
    assert "trained on this series for 20 iterations." in ds.ImageComments
    assert "time limit" not in ds.ImageComments
    assert vr_violations(ds) == []
    errors, _ = dciodvfy(paths[0])
    assert errors == []


def test_a_time_limit_that_cuts_training_is_said_in_the_output(tmp_path: Path) -> None:
    """The budget is iterations; the time limit is a safety stop, and a result it weakened
    says so in every image (ImageComments), not only in a log."""
    from dicomnode.demo.sample import phantom_hu, write_ct_series
    from dicomnode.pipelines.offline import run_folder
    from dicomnode.settings import parse_settings

    src = tmp_path / "thick"
    write_ct_series(src, phantom_hu(12, 64), (5.0, 2.0, 2.0), origin=(-64.0, -64.0, 0.0),
                    description="thick", body_part="CHEST")
    settings = parse_settings({"ct_sr": {"iterations": 100000, "max_train_seconds": 1,
                                         "target_thickness_mm": 2.5}})
    (paths,) = run_folder(settings, pipeline="ct-sr", input_dir=src,
                          output_dir=tmp_path / "out").values()
    assert not isinstance(paths, Exception), paths
    comments = pydicom.dcmread(paths[0]).ImageComments
    assert "stopped by the time limit (ct_sr.max_train_seconds) after" in comments
    assert "of 100000 iterations" in comments
