"""DICOM in and out on the real data: volumes, SEG / derived PET / derived CT, ct-tissue.

Every object written is validated by dciodvfy (no errors) and read back.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicomnode.dicom.volume import load_series
from dicomnode.dicom.write.common import OutputIdentity, save
from dicomnode.dicom.write.ct import build_derived_ct
from dicomnode.dicom.write.pet import build_derived_pet
from dicomnode.dicom.write.seg import build_seg
from dicomnode.pipelines.base import PipelineRefusal
from dicomnode.pipelines.ct_tissue import SEGMENTS, TISSUE_KEYS, segment_tissue
from dicomnode.pipelines.offline import run_folder
from dicomnode.settings import parse_settings
from tests.conftest import DATA, LIDC
from tests.dicomtools import Dcm2niixFailed, dciodvfy, nifti_affine

pytestmark = pytest.mark.data  # reads ../shared/data

warnings.filterwarnings("ignore", category=UserWarning)
PET = {name: DATA / "pet" / name for name in
       ("ge-signa-petmr-fdg", "philips-gemini-ctac", "ge-advance-bigendian")}


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".xml")


@pytest.fixture(scope="module")
def lidc() -> object:
    return load_series(files(LIDC))


@pytest.fixture(scope="module")
def lidc_tissue(lidc) -> object:
    return segment_tissue(lidc)


def test_lidc_volume(lidc) -> None:
    assert lidc.shape == (133, 512, 512) and lidc.units == "HU"
    assert np.allclose(lidc.spacing, (2.5, 0.703125, 0.703125), atol=1e-4)
    z = [p[2] for p in lidc.slice_positions]
    assert np.all(np.diff(z) > 0)  # sorted inferior -> superior
    first = min(files(LIDC), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    ds = pydicom.dcmread(first)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.array_equal(lidc.array[0], hu.astype(np.float32))


@pytest.mark.slow
def test_ct_tissue_on_lidc_end_to_end(tmp_path: Path, lidc, lidc_tissue) -> None:
    ml = float(np.prod(lidc.spacing)) / 1000
    left, right = (lidc_tissue.volume_ml(k, ml) for k in ("lung_left", "lung_right"))
    assert 800 < left < 3500 and 800 < right < 3500, (left, right)
    # the offline path (same code as the job) writes the SEG and previews
    settings = parse_settings({})
    results = run_folder(settings, pipeline="ct-tissue", input_dir=LIDC, output_dir=tmp_path,
                         preview=True)
    (paths,) = results.values()
    seg_path = next(p for p in paths if p.suffix == ".dcm")
    assert {p.name for p in paths if p.suffix == ".png"} == {"preview-axial.png",
                                                            "preview-coronal.png"}
    errors, _warnings = dciodvfy(seg_path)
    assert errors == []
    seg = hd.seg.segread(seg_path)
    assert seg.SeriesDescription.startswith("AI ") and "AI-generated" in seg.ContentDescription
    labels = [d.SegmentLabel for d in seg.SegmentSequence]
    assert "Left lung" in labels and "Right lung" in labels and "Body" in labels
    alg = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert alg.AlgorithmName == "ct-tissue" and alg.AlgorithmFamilyCodeSequence[0].CodeValue
    # voxel for voxel: the SEG read back on the source grid equals the masks written
    src_uids = [ds.SOPInstanceUID for ds in lidc.datasets]
    back = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=src_uids, segment_numbers=list(range(1, len(labels) + 1)),
        combine_segments=False, skip_overlap_checks=True)
    keys = [k for k in SEGMENTS if SEGMENTS[k].label in labels]
    for n, key in enumerate(keys):
        assert np.array_equal(back[..., n].astype(bool), lidc_tissue.masks[key]), key
    refs = {r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
            for r in s.ReferencedInstanceSequence}
    assert refs <= set(src_uids)
    # a re-run gives the same UIDs (the PACS replaces rather than duplicates)
    again = run_folder(settings, pipeline="ct-tissue", input_dir=LIDC, output_dir=tmp_path / "b")
    (paths2,) = again.values()
    seg2 = pydicom.dcmread(paths2[0], stop_before_pixels=True)
    assert seg2.SOPInstanceUID == seg.SOPInstanceUID
    assert seg2.SeriesInstanceUID == seg.SeriesInstanceUID


def test_labelmap_seg_reads_back(tmp_path: Path, lidc, lidc_tissue) -> None:
    keys = list(TISSUE_KEYS)
    masks = np.stack([lidc_tissue.masks[k] for k in keys], axis=-1)
    ident = OutputIdentity(source_series_uid=lidc.series_instance_uid, pipeline="t",
                           pipeline_version="1", kind="SEG", series_number=9000,
                           series_description="AI labelmap")
    seg = build_seg(volume=lidc, masks=masks, segments=[SEGMENTS[k] for k in keys],
                    identity=ident, seg_type="LABELMAP")
    path = save(seg, tmp_path / "lm.dcm")
    # dciodvfy (2022) predates the LABELMAP IOD: check by reading it back (ARCHITECTURE.md)
    back = hd.seg.segread(path)
    assert back.SegmentationType == "LABELMAP"
    arr = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[d.SOPInstanceUID for d in lidc.datasets],
        segment_numbers=list(range(1, len(keys) + 1)), combine_segments=True)
    expected = np.zeros(lidc.shape, np.uint8)
    for i in range(len(keys)):
        expected[masks[..., i]] = i + 1
    assert np.array_equal(arr, expected)
    with pytest.raises(ValueError, match="non-overlapping"):
        build_seg(volume=lidc, masks=np.stack([masks[..., 0], masks[..., 0]], -1),
                  segments=[SEGMENTS["body"], SEGMENTS["trunk"]], identity=ident,
                  seg_type="LABELMAP")


def test_gantry_tilt_refused_then_resampled() -> None:
    folder = DATA / "ct" / "ge-head-gantry-tilt"
    with pytest.raises(PipelineRefusal) as info:
        load_series(files(folder))
    assert info.value.code == "gantry_tilt" and "18.5 degrees" in info.value.reason
    vol = load_series(files(folder), resample=True)
    assert any("gantry tilt 18.5" in n for n in vol.notes)
    row, col = vol.affine[:3, 2], vol.affine[:3, 1]
    normal = np.cross(row, col) / np.linalg.norm(np.cross(row, col))
    step = vol.affine[:3, 0] / np.linalg.norm(vol.affine[:3, 0])
    assert abs(abs(step @ normal) - 1) < 1e-6  # orthogonal grid now


def test_dupe_positions_refused_with_reason() -> None:
    with pytest.raises(PipelineRefusal) as info:
        load_series(files(DATA / "ct" / "dupe-positions"))
    assert info.value.code == "gapped_spacing"
    assert "from 7.5 to 115 mm" in info.value.reason


def test_pet_units_and_suv() -> None:
    ge = load_series(files(PET["ge-signa-petmr-fdg"]))
    assert ge.units == "PROPCNTS" and ge.suv is None and "not BQML" in ge.suv_problem
    ph = load_series(files(PET["philips-gemini-ctac"]))
    assert ph.units == "BQML" and ph.suv is not None
    ds = pydicom.dcmread(files(PET["philips-gemini-ctac"])[0], stop_before_pixels=True)
    radio = ds.RadiopharmaceuticalInformationSequence[0]
    assert ph.suv.weight_kg == pytest.approx(float(ds.PatientWeight))
    assert ph.suv.factor == pytest.approx(
        float(ds.PatientWeight) * 1000 / (float(radio.RadionuclideTotalDose)
                                          * 2 ** (-ph.suv.decay_s / float(radio.RadionuclideHalfLife))))
    big = load_series(files(PET["ge-advance-bigendian"]))
    assert big.units == "BQML" and big.suv is None and "PatientWeight" in big.suv_problem
    # per-slice RescaleSlope is applied slice by slice
    raw = [pydicom.dcmread(f) for f in files(PET["ge-advance-bigendian"])]
    slopes = {float(d.RescaleSlope) for d in raw}
    assert len(slopes) > 1
    by_z = {round(float(d.ImagePositionPatient[2]), 3): d for d in raw}
    for k, pos in enumerate(big.slice_positions):
        d = by_z[round(pos[2], 3)]
        assert np.allclose(big.array[k], d.pixel_array * float(d.RescaleSlope), rtol=1e-5)


@pytest.mark.parametrize("name", list(PET))
def test_derived_pet_round_trip_valid_and_same_geometry(tmp_path: Path, name: str) -> None:
    vol = load_series(files(PET[name]))
    ident = OutputIdentity(source_series_uid=vol.series_instance_uid, pipeline="pet-denoise",
                           pipeline_version="1", kind="PT", series_number=9001,
                           series_description="AI enhanced PET")
    values = np.clip(vol.array, 0, None)
    dss = build_derived_pet(values=values, volume=vol, identity=ident, description="test copy")
    out = tmp_path / "pet"
    paths = [save(ds, out / f"{i:03d}.dcm") for i, ds in enumerate(dss)]
    for p in paths[:2] + paths[-1:]:
        errors, _ = dciodvfy(p)
        assert errors == [], (p, errors)
    back = load_series(paths)
    assert back.units == vol.units
    assert np.allclose(back.array, values, atol=values.max() / 65535 * 0.51 + 1e-6)
    src = pydicom.dcmread(files(PET[name])[0], stop_before_pixels=True)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert first.SeriesDate == src.SeriesDate and first.SeriesTime == src.SeriesTime
    assert first.FrameOfReferenceUID == src.FrameOfReferenceUID
    if vol.suv is not None:
        assert back.suv.factor == pytest.approx(vol.suv.factor)
    assert np.allclose(back.affine, vol.affine, atol=1e-4)
    try:
        a_src, shape_src = nifti_affine(PET[name], tmp_path / "nii-src")
    except Dcm2niixFailed as exc:
        # dcm2niix cannot convert this source itself (multi-bed frames with different
        # FrameReferenceTime look dynamic to it): the copy must fail the same way
        with pytest.raises(Dcm2niixFailed) as again:
            nifti_affine(out, tmp_path / "nii-out")
        assert "FrameReferenceTime" in str(exc) and "FrameReferenceTime" in str(again.value)
        return
    a_out, shape_out = nifti_affine(out, tmp_path / "nii-out")
    assert shape_src == shape_out
    assert np.allclose(a_src, a_out, atol=1e-3)


def test_synthetic_pet_on_ct_grid(tmp_path: Path, lidc) -> None:
    ident = OutputIdentity(source_series_uid=lidc.series_instance_uid, pipeline="ct2pet",
                           pipeline_version="1", kind="PT", series_number=9002,
                           series_description="AI SYNTHETIC PET (simulated training)")
    suv = np.clip((lidc.array + 1000) / 200, 0, 20).astype(np.float32)
    dss = build_derived_pet(values=suv, volume=lidc, identity=ident,
                            description="SYNTHETIC PET from CT by test model")
    out = tmp_path / "syn"
    paths = [save(ds, out / f"{i:03d}.dcm") for i, ds in enumerate(dss)]
    errors, _ = dciodvfy(paths[0])
    assert errors == []
    ds = pydicom.dcmread(paths[0])
    assert ds.Units == "GML" and ds.Modality == "PT"
    assert ds.FrameOfReferenceUID == lidc.frame_of_reference_uid
    assert "SYNTHETIC" in ds.SeriesDescription and "SYNTHETIC" in ds.DerivationDescription
    assert "AI-generated" in ds.ImageComments
    assert ds.ContributingEquipmentSequence[0].Manufacturer == "dicomnode"
    back = load_series(paths)
    assert np.allclose(back.array, suv, atol=20 / 65535)
    a_ct, _ = nifti_affine(LIDC, tmp_path / "nii-ct")
    a_pt, _ = nifti_affine(out, tmp_path / "nii-pt")
    assert np.allclose(a_ct, a_pt, atol=1e-3)


@pytest.mark.slow
def test_derived_ct_new_slices(tmp_path: Path, lidc) -> None:
    aff = lidc.affine.copy()
    aff[:3, 0] /= 2  # 1.25 mm slices
    n = 2 * lidc.shape[0] - 1
    values = np.empty((n, *lidc.shape[1:]), np.float32)
    values[0::2] = lidc.array
    values[1::2] = (lidc.array[:-1] + lidc.array[1:]) / 2
    ident = OutputIdentity(source_series_uid=lidc.series_instance_uid, pipeline="ct-sr",
                           pipeline_version="1", kind="CT", series_number=9003,
                           series_description="AI super-resolved CT")
    dss = build_derived_ct(values=values, affine=aff, source=lidc, identity=ident,
                           description="test", slice_thickness=1.25)
    out = tmp_path / "ct"
    paths = [save(ds, out / f"{i:03d}.dcm") for i, ds in enumerate(dss)]
    errors, _ = dciodvfy(paths[1])
    assert errors == []
    ds = pydicom.dcmread(paths[1])
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert float(ds.SliceThickness) == 1.25 and ds.SourceImageSequence
    back = load_series(paths)
    assert back.shape == values.shape
    assert np.allclose(back.spacing[0], 1.25, atol=1e-3)
    assert np.allclose(back.array, np.clip(np.round(values), -1024, None))
    a_src, _ = nifti_affine(LIDC, tmp_path / "nii-src")
    a_out, shape = nifti_affine(out, tmp_path / "nii-out")
    assert shape[2] == n
    expected = a_src.copy()
    expected[:, 2] /= 2  # same origin and in-plane axes, half the slice step
    assert np.allclose(a_out, expected, atol=1e-3)


def test_seg_on_dcmqi_ct_references_each_slice_with_its_own_segment(tmp_path: Path) -> None:
    """dicomnode's SEG writer on the dcmqi 3-slice CT, files handed over in reverse order:
    a segment drawn on one slice only must come back on that slice's SOP instance (highdicom
    pairs frame i with source i when given an array: the writer must sort)."""
    folder = DATA / "seg" / "dcmqi" / "ct-3slice"
    vol = load_series(list(reversed(files(folder))))
    labels = np.zeros(vol.shape, np.uint8)
    for k in range(vol.shape[0]):
        labels[k, 10 + 20 * k:30 + 20 * k, 40:60] = k + 1  # segment k+1 on slice k only
    ident = OutputIdentity(source_series_uid=vol.series_instance_uid, pipeline="t",
                           pipeline_version="1", kind="SEG", series_number=9000,
                           series_description="AI test")
    specs = [SEGMENTS[k] for k in list(TISSUE_KEYS)[:vol.shape[0]]]
    path = save(build_seg(volume=vol, labels=labels, segments=specs, identity=ident),
                tmp_path / "seg.dcm")
    errors, _ = dciodvfy(path)
    assert errors == []
    back = hd.seg.segread(path)
    ct_uids = [d.SOPInstanceUID for d in vol.datasets]  # in the volume's (sorted) order
    refs = {r.ReferencedSOPInstanceUID for s in back.ReferencedSeriesSequence
            for r in s.ReferencedInstanceSequence}
    assert refs == set(ct_uids)
    assert back.FrameOfReferenceUID == vol.datasets[0].FrameOfReferenceUID
    for k, uid in enumerate(ct_uids):
        got = back.get_pixels_by_source_instance(
            source_sop_instance_uids=[uid], segment_numbers=list(range(1, vol.shape[0] + 1)),
            combine_segments=True)[0]
        assert np.array_equal(got, labels[k]), f"slice {k}"


# What each edge file must give: a volume ("ok") or a refusal with this code; a refusal says why.
EDGE_EXPECTED = {
    "CT_small.dcm": "ok", "J2K_pixelrep_mismatch.dcm": "ok", "MR_small_RLE.dcm": "ok",
    "MR_small_bigendian.dcm": "ok", "MR_small_jp2klossless.dcm": "ok",
    "MR_small_jpeg_ls_lossless.dcm": "ok", "bad_sequence.dcm": "ok", "eCT_Supplemental.dcm": "ok",
    "liver_j2k.dcm": "ok",
    "JPEG-LL.dcm": "missing_geometry", "JPEG2000.dcm": "missing_geometry",
    "MR_truncated.dcm": "undecodable", "liver_deflate.dcm": "undecodable",
    "liver_rle.dcm": "undecodable", "badVR.dcm": "malformed_input",
    "JPEGLSNearLossless_16.dcm": "no_images", "emri_small_jpeg_2k_lossless_too_short.dcm": "no_images",
    "meta_missing_tsyntax.dcm": "no_images", "no_meta.dcm": "no_images",
    "rtplan_truncated.dcm": "no_images",
}


@pytest.mark.parametrize("path", sorted((DATA / "edge").glob("*")), ids=lambda p: p.name)
def test_edge_files_decode_or_refuse(path: Path) -> None:
    expected = EDGE_EXPECTED[path.name]  # a new edge file needs its expected outcome here
    if expected != "ok":
        with pytest.raises(PipelineRefusal) as info:
            load_series([path])
        assert info.value.code == expected
        assert len(info.value.reason) > 10
        return
    vol = load_series([path])
    assert vol.array.ndim == 3 and np.isfinite(vol.array).all()


def test_seg_preview_draws_each_segment_outline_in_its_colour(tmp_path: Path) -> None:
    from dicomnode.dicom.preview import seg_preview

    ct = np.full((10, 32, 32), -1000.0)
    masks = np.zeros((10, 32, 32, 2), bool)
    masks[2:8, 8:24, 8:24, 0] = True  # a cube
    masks[5, 12:20, 12:20, 1] = True  # a square on the axial slice with the most voxels
    paths = seg_preview(ct, (2.0, 1.0, 1.0), masks, [(255, 0, 0), (0, 255, 0)],
                        tmp_path / "p")
    assert [p.name for p in paths] == ["p-axial.png", "p-coronal.png"]
    from PIL import Image

    axial = np.asarray(Image.open(paths[0]))
    assert (axial == [255, 0, 0]).all(axis=-1).any() and (axial == [0, 255, 0]).all(axis=-1).any()
    coronal = np.asarray(Image.open(paths[1]))
    assert coronal.shape[0] == 20  # 10 slices of 2 mm shown at 1 mm per pixel


def test_a_ct_slice_without_its_rescale_is_refused_not_read_with_a_default(tmp_path: Path) -> None:
    """RescaleIntercept is Type 1 in the CT Image module; reading a missing one as 0 would put
    every value 1024 HU off on a scanner that stores unsigned pixels (found by the C-STORE
    property test: the node stores such a slice, so the pipeline must refuse it)."""
    import pydicom

    from dicomnode.demo.sample import write_phantom_ct

    files = sorted(write_phantom_ct(tmp_path / "ct", slices=4, size=16))
    assert load_series(files).array.shape == (4, 16, 16)
    ds = pydicom.dcmread(files[2])
    del ds.RescaleIntercept
    ds.save_as(files[2])
    with pytest.raises(PipelineRefusal) as info:
        load_series(files)
    assert info.value.code == "missing_rescale" and ds.SOPInstanceUID in info.value.reason
