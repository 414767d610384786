"""bench/e2e: from the sender's association closing to the last result acknowledged by the PACS.

``ct-tissue`` on lidc-idri-0001 (133 slices), sent with DCMTK's storescu to a node whose
destination is a local Orthanc. Each run starts both with empty storage. Stages come from the
audit rows (``dicomnode.node.report``): completion, queue wait, pipeline (read / infer / write),
recording, push. The target is that everything except the pipeline stays under 10 % of the
total. Results in ``bench/results/e2e.json``.

Run: ``.venv/bin/python -m bench.e2e [--runs N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.ingest import free_port
from dicomnode.demo.localpacs import Orthanc
from dicomnode.resources import example_data_dir

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "e2e"
RESULTS = ROOT / "bench" / "results" / "e2e.json"
LIDC = example_data_dir() / "ct" / \
    "lidc-idri-0001"
LIDC_SERIES = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"


def one_run(work: Path) -> dict[str, float]:
    from dicomnode.app import open_database
    from dicomnode.node.report import series_report
    from dicomnode.settings import load_settings

    pacs = Orthanc(work / "orthanc", dicom_port=free_port(), http_port=free_port()).start()
    port = free_port()
    cfg = {"var_dir": str(work / "var"), "node": {"port": port},
           "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1",
                                     "port": pacs.dicom_port}},
           "rules": [{"name": "ct-tissue", "match": {"Modality": {"equals": "CT"}},
                      "pipelines": ["ct-tissue"], "destinations": ["pacs"]}]}
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    log = open(work / "node.log", "wb")  # noqa: SIM115
    node = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config",
                             str(work / "cfg.yaml")], stdout=log, stderr=subprocess.STDOUT,
                            cwd=ROOT)
    try:
        while b"listening on" not in (work / "node.log").read_bytes():
            if node.poll() is not None:
                raise RuntimeError((work / "node.log").read_text()[-2000:])
            time.sleep(0.1)
        subprocess.run(["/usr/bin/storescu", "-aet", "MODALITY", "-aec", "DICOMNODE", "+sd",
                        "+sp", "*.dcm", "127.0.0.1", str(port), str(LIDC)], check=True,
                       env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True)
        settings = load_settings(work / "cfg.yaml")
        engine, factory = open_database(settings, upgrade=False)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            with factory() as s:
                try:
                    report = series_report(s, LIDC_SERIES)
                except Exception:
                    report = {}
            if report.get("deliveries", {}).get("DELIVERED") and "total" in report["stages_s"]:
                break
            time.sleep(0.2)
        engine.dispose()
        return report["stages_s"]
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(60)
        pacs.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs = []
    for i in range(args.runs):
        work = WORK / str(i)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        stages = one_run(work)
        runs.append(stages)
        print(json.dumps({k: round(v, 3) for k, v in stages.items()}), flush=True)
        shutil.rmtree(work, ignore_errors=True)
    keys = sorted({k for r in runs for k in r})
    median = {k: statistics.median(r[k] for r in runs if k in r) for k in keys}
    overhead = median["total"] - median["pipeline"]
    out = {"benchmark": "e2e", "pipeline": "ct-tissue", "input": "lidc-idri-0001 (133 slices)",
           "runs": runs, "median_s": median,
           "non_pipeline_share": overhead / median["total"],
           "target": "non-pipeline share < 0.10",
           "command": f"python -m bench.e2e --runs {args.runs}"}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(f"median total {median['total']:.2f} s, pipeline {median['pipeline']:.2f} s, "
          f"non-pipeline share {out['non_pipeline_share']:.1%}")


if __name__ == "__main__":
    main()
