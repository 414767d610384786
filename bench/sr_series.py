"""bench/sr_series: ct-sr on a whole 512 x 512 x 300 series, end to end, timed by stage.

A generated chest phantom CT of 300 slices of 512 x 512 (2.5 mm apart, 5 mm thick: the 5 / 2.5 mm
acquisition) goes through the ``ct-sr`` pipeline exactly as a node job runs it (read, train
SR4ZCT on the series, apply, write the derived DICOM series), with the shipped settings and the
output thickness given by ``--target-mm`` (default 1.25 mm). Written to
``bench/results/sr_series.json``, one entry per kind of CPU (bfloat16 convolutions or float32;
a run replaces only its own kind's entry): wall time, training iterations and the read / train /
apply / write split, and the time the ingest-side reference needs (reading the series with
pydicom) so that the figure can be compared on another machine.

Run: ``.venv/bin/python -m bench.sr_series [--slices 300] [--target-mm 1.25]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import pydicom

from dicomnode.demo.sample import write_phantom_ct
from dicomnode.pipelines import get_pipeline, job_context
from dicomnode.pipelines.base import resolve_device
from dicomnode.pipelines.sr4zct import cpu_has_bf16
from dicomnode.settings import parse_settings

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "sr_series"
RESULTS = ROOT / "bench" / "results" / "sr_series.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--target-mm", type=float, default=1.25)
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    files = write_phantom_ct(WORK / "in", slices=args.slices, size=512)
    for path in files:  # 5 mm slices every 2.5 mm, as a scanner's thick overlapping series
        ds = pydicom.dcmread(path)
        ds.SliceThickness = 5.0
        ds.save_as(path)
    t0 = time.perf_counter()
    for path in files:
        pydicom.dcmread(path).pixel_array  # noqa: B018 - the reference: reading the series
    read_reference = time.perf_counter() - t0
    settings = parse_settings({"var_dir": str(WORK / "var"),
                               "ct_sr": {"target_thickness_mm": args.target_mm}})
    spec = get_pipeline("ct-sr")
    ctx = job_context(settings, spec, job_id=0,
                      series_instance_uid=str(pydicom.dcmread(files[0]).SeriesInstanceUID),
                      input_files=tuple(files), output_dir=WORK / "out",
                      device=resolve_device(settings.executor.device))
    t0 = time.perf_counter()
    outputs = spec.load()(ctx)
    wall = time.perf_counter() - t0
    timings = {k: float(v) for k, v in ctx.timings.items()}
    out = {
        "benchmark": "sr_series", "slices_in": args.slices, "matrix": 512,
        "slices_out": len(outputs), "target_thickness_mm": args.target_mm,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "bf16_convolutions": cpu_has_bf16()},
        "wall_s": wall, "timings_s": timings,
        "apply_s": timings.get("infer_s", 0.0) - timings.get("train_s", 0.0),
        "reference_read_series_s": read_reference,
        "command": f"python -m bench.sr_series --slices {args.slices} "
                   f"--target-mm {args.target_mm}",
    }
    kind = ("bfloat16" if out["machine"]["bf16_convolutions"] else "float32") + " convolutions"
    runs = json.loads(RESULTS.read_text()).get("runs_by_cpu", {}) if RESULTS.exists() else {}
    runs[kind] = out
    RESULTS.write_text(json.dumps({"benchmark": "sr_series", "runs_by_cpu": runs}, indent=2))
    print(json.dumps(out, indent=2))
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
