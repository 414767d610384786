"""bench/lesions: FDG lesion delineation on held-out PET/CT twin cases, with the autoPET metrics:
the middle-fusion U-Net (``petct-lesions``, the shipped model) against the threshold baselines.

Each case is the chest phantom with simulated full-dose FDG PET and spherical lesions of
random size (radius 5-12 mm) and contrast (3-8 x background) on a 4 mm and a 2 mm PET grid;
phantom seeds 2000-2009, never used by any training command. Each method runs as the node
runs it (the pipeline's run function on the written DICOM, SEG and SR included), scored
against the simulated lesion labels:

* Dice over the case; false-positive volume (predicted components touching no lesion) and
  false-negative volume (lesions touching no prediction), in ml, as autoPET defines them;
* lesion-wise sensitivity and false positives per case;
* CPU time per case.

Run: ``.venv/bin/python -m bench.lesions [--cases 10]``; results in
``bench/results/lesions.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from scipy import ndimage as ndi

from dicomnode.demo.sample import write_phantom_ct
from dicomnode.dicom.volume import load_series
from dicomnode.pipelines import get_pipeline, job_context
from dicomnode.research.simulate_io import write_case
from dicomnode.settings import parse_settings

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "lesions"
RESULTS = ROOT / "bench" / "results" / "lesions.json"
SEEDS = tuple(range(2000, 2010))
METHODS = ("petct-lesions", "petct-suv25", "petct-suv41", "petct-percist")
CONNECT = np.ones((3, 3, 3), bool)


def score(pred: np.ndarray, truth: np.ndarray, voxel_ml: float) -> dict[str, float]:
    """autoPET-style metrics of a predicted mask against a lesion label map."""
    inter = float((pred & (truth > 0)).sum())
    total = float(pred.sum() + (truth > 0).sum())
    components, n = ndi.label(pred, structure=CONNECT)
    fp = [c for c in range(1, n + 1) if not (truth[components == c] > 0).any()]
    fpv = sum(float((components == c).sum()) for c in fp) * voxel_ml
    lesions = [int(v) for v in np.unique(truth) if v]
    missed = [v for v in lesions if not pred[truth == v].any()]
    fnv = sum(float((truth == v).sum()) for v in missed) * voxel_ml
    return {"dice": 2 * inter / total if total else 1.0, "fpv_ml": fpv, "fnv_ml": fnv,
            "lesions": len(lesions), "detected": len(lesions) - len(missed),
            "false_positives": len(fp)}


def one_case(seed: int, pet_mm: float, work: Path) -> list[dict[str, Any]]:
    case_dir = work / f"seed{seed}-{pet_mm:g}mm"
    files = write_phantom_ct(case_dir / "phantom-ct", slices=60, size=256)
    case = write_case(files, case_dir, drfs=(), seed=seed, pet_mm=pet_mm, lesions=6)
    truth = case.twin.lesions
    pet = load_series(sorted(case.full.glob("*.dcm")), modality="PT")
    voxel_ml = float(np.prod(pet.spacing)) / 1000.0
    rows = []
    settings = parse_settings({})
    for method in METHODS:
        spec = get_pipeline(method)
        out = case_dir / method
        ctx = job_context(settings, spec, job_id=1, series_instance_uid=pet.series_instance_uid,
                          input_files=(), output_dir=out, device="cpu",
                          series_roles={"CT": tuple(sorted(case.ct.glob("*.dcm"))),
                                        "PET": tuple(sorted(case.full.glob("*.dcm")))})
        cpu0, wall0 = time.process_time(), time.perf_counter()
        outputs = {o.kind: o.path for o in spec.load()(ctx)}
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        pred = np.zeros(pet.shape, bool)
        if "SEG" in outputs:
            import highdicom as hd

            seg = hd.seg.segread(outputs["SEG"])
            pred = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=[ds.SOPInstanceUID for ds in pet.datasets],
                segment_numbers=[int(s.SegmentNumber) for s in seg.SegmentSequence],
                combine_segments=True, skip_overlap_checks=True) > 0
        rows.append({"case": f"seed {seed}", "pet_mm": pet_mm, "method": method,
                     **score(pred, truth, voxel_ml), "cpu_s": round(cpu, 2),
                     "wall_s": round(wall, 2),
                     "sr_bytes": os.path.getsize(outputs["SR"])})
    shutil.rmtree(case_dir / "phantom-ct", ignore_errors=True)
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for pet_mm in sorted({r["pet_mm"] for r in rows}, reverse=True):
        for method in METHODS:
            sel = [r for r in rows if r["pet_mm"] == pet_mm and r["method"] == method]
            lesions = sum(r["lesions"] for r in sel)
            out.append({
                "pet_mm": pet_mm, "method": method, "cases": len(sel),
                "dice_mean": round(statistics.mean(r["dice"] for r in sel), 3),
                "fpv_ml_mean": round(statistics.mean(r["fpv_ml"] for r in sel), 2),
                "fnv_ml_mean": round(statistics.mean(r["fnv_ml"] for r in sel), 2),
                "lesion_sensitivity": round(sum(r["detected"] for r in sel) / lesions, 3)
                if lesions else None,
                "false_positives_per_case": round(statistics.mean(
                    r["false_positives"] for r in sel), 2),
                "cpu_s_per_case": round(statistics.mean(r["cpu_s"] for r in sel), 2)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    rows: list[dict[str, Any]] = []
    for pet_mm in (4.0, 2.0):
        for seed in SEEDS[: args.cases]:
            for row in one_case(seed, pet_mm, WORK):
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                  for k, v in row.items()}), flush=True)
                rows.append(row)
    table = summary(rows)
    for line in table:
        print(json.dumps(line))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": f"python -m bench.lesions --cases {args.cases}",
        "machine": f"{os.cpu_count()} CPUs, no GPU",
        "data": "PET/CT twin, chest phantom, seeds 2000-2009 (held out), 6 lesions each",
        "summary": table, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
