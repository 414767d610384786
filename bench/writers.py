"""bench/writers: time and size of the writers on a 300 x 512 x 512 grid.

* SEG with 10 and 117 segments, BINARY and LABELMAP (dicomnode's ``build_seg``: an
  ``hd.Volume`` on the source grid, empty frames omitted; LABELMAP RLE-compressed), against a
  naive baseline: one BINARY SEG from the dense 4-D numpy stack (slices, rows, cols, segments)
  with the sorted source images, which is what a first attempt with highdicom looks like;
* a 300-slice derived PET series and a 300-slice derived CT series.

Segments are spheres spread through the volume (each about 20 slices thick). One run each
(the SEG builds take long enough that the variation is small); results in
``bench/results/writers.json``. Run: ``.venv/bin/python -m bench.writers``.
"""

from __future__ import annotations

import json
import shutil
import time
import tracemalloc
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np

from dicomnode.demo.sample import write_phantom_ct
from dicomnode.dicom.volume import load_series
from dicomnode.dicom.write.common import OutputIdentity, save
from dicomnode.dicom.write.ct import build_derived_ct
from dicomnode.dicom.write.pet import build_derived_pet
from dicomnode.dicom.write.seg import ANATOMICAL_STRUCTURE, SegmentSpec, build_seg, sct

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "writers"
RESULTS = ROOT / "bench" / "results" / "writers.json"
warnings.simplefilter("ignore")


def spheres(shape: tuple[int, int, int], n: int, seed: int = 0) -> np.ndarray:
    """A uint16 label map of n non-overlapping spheres (radius 10 slices, 20 pixels)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint16)
    zz, yy, xx = np.ogrid[:shape[0], :shape[1], :shape[2]]
    placed = 0
    while placed < n:
        c = rng.integers([12, 40, 40], [shape[0] - 12, shape[1] - 40, shape[2] - 40])
        ball = (zz - c[0]) ** 2 + ((yy - c[1]) / 2) ** 2 + ((xx - c[2]) / 2) ** 2 <= 100
        if labels[ball].any():
            continue
        placed += 1
        labels[ball] = placed
    return labels


def timed(fn: object, *args: object, **kwargs: object) -> tuple[object, float, float]:
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)  # type: ignore[operator]
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return out, elapsed, peak


def main() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    files = write_phantom_ct(WORK / "ct", slices=300, size=512)
    volume = load_series(files)
    results: dict[str, dict[str, float]] = {}
    for n in (10, 117):
        labels = spheres(volume.shape, n)
        segs = [SegmentSpec(label=f"Lesion {i + 1}", category=ANATOMICAL_STRUCTURE,
                            type=sct("52988006", "Lesion"), color=(255, 0, 0)) for i in range(n)]
        ident = OutputIdentity(source_series_uid=volume.series_instance_uid, pipeline="bench",
                               pipeline_version="1", kind=f"SEG{n}", series_number=1,
                               series_description="bench")
        for seg_type in ("BINARY", "LABELMAP"):
            seg, secs, peak = timed(build_seg, volume=volume, labels=labels, segments=segs,
                                    identity=ident, seg_type=seg_type)
            path = save(seg, WORK / f"seg-{n}-{seg_type}.dcm")  # type: ignore[arg-type]
            results[f"seg {n} segments {seg_type}"] = {
                "seconds": secs, "bytes": path.stat().st_size, "peak_mib": peak}
            print(f"{n:3} segments {seg_type:8} {secs:6.1f} s {path.stat().st_size / 1e6:8.2f} MB",
                  flush=True)
        # naive baseline: dense 4-D numpy stack, sorted source images, BINARY, no Volume
        dense_bytes = int(np.prod(volume.shape)) * n
        key = f"seg {n} segments naive BINARY (dense 4-D, all frames)"
        if dense_bytes > 4 * 2**30:
            results[key] = {"seconds": float("nan"), "bytes": float("nan"),
                            "not_run": f"the dense stack alone needs {dense_bytes / 2**30:.1f} GiB"}
            print(f"{n:3} segments naive    not run: dense stack {dense_bytes / 2**30:.1f} GiB")
            continue
        masks = np.stack([labels == i + 1 for i in range(n)], axis=-1)
        descriptions = [hd.seg.SegmentDescription(
            segment_number=i + 1, segment_label=s.label, segmented_property_category=s.category,
            segmented_property_type=s.type, algorithm_type="MANUAL") for i, s in enumerate(segs)]

        def naive(masks: np.ndarray = masks, descriptions: list = descriptions) -> object:
            return hd.seg.Segmentation(
                source_images=list(volume.datasets), pixel_array=masks.astype(np.uint8),
                segmentation_type="BINARY", segment_descriptions=descriptions,
                series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(),
                instance_number=1, manufacturer="x", manufacturer_model_name="x",
                software_versions="x", device_serial_number="x", omit_empty_frames=False)

        seg, secs, peak = timed(naive)
        path = save(seg, WORK / f"seg-{n}-naive.dcm")  # type: ignore[arg-type]
        results[key] = {"seconds": secs, "bytes": path.stat().st_size, "peak_mib": peak}
        print(f"{n:3} segments naive    {secs:6.1f} s {path.stat().st_size / 1e6:8.2f} MB",
              flush=True)
        del masks
    ident = OutputIdentity(source_series_uid=volume.series_instance_uid, pipeline="bench",
                           pipeline_version="1", kind="PT", series_number=3,
                           series_description="bench PET")
    suv = np.clip((volume.array + 1000) / 200, 0, 20).astype(np.float32)
    dss, secs, peak = timed(build_derived_pet, values=suv, volume=volume, identity=ident,
                            description="bench")
    t0 = time.perf_counter()
    for i, ds in enumerate(dss):  # type: ignore[arg-type]
        save(ds, WORK / "pet" / f"{i:04d}.dcm")
    results["derived PET 300 slices"] = {"seconds": secs + time.perf_counter() - t0,
                                         "build_seconds": secs, "peak_mib": peak}
    ident = OutputIdentity(source_series_uid=volume.series_instance_uid, pipeline="bench",
                           pipeline_version="1", kind="CT", series_number=4,
                           series_description="bench CT")
    dss, secs, peak = timed(build_derived_ct, values=volume.array, affine=volume.affine,
                            source=volume, identity=ident, description="bench",
                            slice_thickness=2.5)
    t0 = time.perf_counter()
    for i, ds in enumerate(dss):  # type: ignore[arg-type]
        save(ds, WORK / "ct-out" / f"{i:04d}.dcm")
    results["derived CT 300 slices"] = {"seconds": secs + time.perf_counter() - t0,
                                        "build_seconds": secs, "peak_mib": peak}
    for key in ("derived PET 300 slices", "derived CT 300 slices"):
        print(f"{key}: {results[key]['seconds']:.1f} s", flush=True)
    out = {"benchmark": "writers", "grid": [300, 512, 512], "results": results,
           "ratios_vs_naive": {
               f"{n} segments {t}": results[f"seg {n} segments {t}"]["seconds"]
               / results[f"seg {n} segments naive BINARY (dense 4-D, all frames)"]["seconds"]
               for n in (10,) for t in ("BINARY", "LABELMAP")},
           "command": "python -m bench.writers"}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(json.dumps(out["ratios_vs_naive"], indent=2))


if __name__ == "__main__":
    main()
