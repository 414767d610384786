"""``make demo``: the whole loop on a laptop, on the embedded default config.

Starts a local PACS (Orthanc on 127.0.0.1:4242, AE ORTHANC, TCP_NODELAY=1), starts the node with
``config/dicomnode.yaml`` in a fresh working directory (``var/demo``), sends a sample CT study
with DCMTK's ``storescu`` (``../shared/data/ct/lidc-idri-0001`` when present, else a generated
phantom), waits for the results to reach the PACS, prints a report, and stops what it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom

from dicomnode.demo.localpacs import Orthanc
from dicomnode.resources import example_data_dir
from dicomnode.settings import default_config_path, load_settings

STORESCU = "/usr/bin/storescu"


def _sample(workdir: Path) -> tuple[Path, str]:
    lidc = example_data_dir() / "ct" / "lidc-idri-0001"
    if lidc.is_dir() and any(lidc.glob("*.dcm")):
        return lidc, "LIDC-IDRI-0001 chest CT (133 slices; TCIA, CC BY 3.0)"
    from dicomnode.demo.sample import write_phantom_ct

    folder = workdir / "sample"
    write_phantom_ct(folder)
    return folder, "generated phantom chest CT (60 slices)"


def main() -> int:
    """Run the demo; returns the exit code (0 when the results reached the PACS)."""
    config = default_config_path()
    settings = load_settings(config)
    dest = settings.destinations["pacs"]
    root = Path.cwd()
    workdir = root / "var" / "demo"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    sample, sample_name = _sample(workdir)
    first = pydicom.dcmread(next(iter(sorted(sample.glob("*.dcm")))), stop_before_pixels=True)
    series_uid, study_uid = str(first.SeriesInstanceUID), str(first.StudyInstanceUID)

    print(f"[demo] local PACS: Orthanc on 127.0.0.1:{dest.port} (AE {dest.ae_title})")
    pacs = Orthanc(workdir / "orthanc", dicom_port=dest.port, aet=dest.ae_title,
                   peers=(settings.node.ae_title, "MODALITY")).start()
    node_log = open(workdir / "node.log", "wb")  # noqa: SIM115 - owned by the process
    print(f"[demo] node: dicomnode serve --config {config} "
          f"(working directory {workdir.relative_to(root)})")
    node = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config",
                             str(config)], cwd=workdir, stdout=node_log, stderr=subprocess.STDOUT)
    node_settings = settings.model_copy(update={"var_dir": workdir / "var"})
    code = 1
    try:
        deadline = time.monotonic() + 60
        while b"listening on" not in (workdir / "node.log").read_bytes():
            if node.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the node did not start:\n"
                                   + (workdir / "node.log").read_text()[-2000:])
            time.sleep(0.2)
        def storescu(aec: str, port: int) -> None:
            sent = subprocess.run(
                [STORESCU, "-aet", "MODALITY", "-aec", aec, "+sd", "+sp", "*.dcm",
                 "127.0.0.1", str(port), str(sample)],
                env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True)
            if sent.returncode != 0:
                raise RuntimeError(f"storescu failed: {sent.stderr[-1000:]}")

        print(f"[demo] the PACS holds the study: {sample_name}")
        storescu(dest.ae_title, dest.port)
        print(f"[demo] the PACS routing rule sends it to the node ({STORESCU})")
        t0 = time.monotonic()
        storescu(settings.node.ae_title, settings.node.port)
        print(f"[demo] sent in {time.monotonic() - t0:.1f} s; waiting for the results ...")
        report = _wait(node_settings, series_uid, timeout=600)
        orthanc_series = pacs.series_in_study(study_uid)
        _print(report, orthanc_series, node_settings.output_dir)
        seg_in_pacs = [s for s in orthanc_series if s["modality"] == "SEG"]
        code = 0 if seg_in_pacs and report.get("deliveries", {}).get("DELIVERED") else 1
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(60)
        except subprocess.TimeoutExpired:
            node.kill()
        pacs.stop()
        print("[demo] stopped the node and the local PACS")
    return code


def _wait(settings: object, series_uid: str, *, timeout: float) -> dict:  # type: ignore[type-arg]
    from dicomnode.app import open_database
    from dicomnode.node.report import series_report

    engine, factory = open_database(settings, upgrade=False)  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout
    report: dict = {}  # type: ignore[type-arg]
    try:
        while time.monotonic() < deadline:
            with factory() as session:
                try:
                    report = series_report(session, series_uid)
                except Exception:
                    report = {}
            jobs_done = report.get("jobs") and all(
                j["status"] in ("SUCCEEDED", "FAILED", "DEAD") for j in report["jobs"])
            pending = {k: v for k, v in report.get("deliveries", {}).items()
                       if k in ("PENDING", "SENDING", "RETRY")}
            if jobs_done and not pending and (report.get("deliveries") or any(
                    j["status"] != "SUCCEEDED" for j in report["jobs"])):
                return report
            time.sleep(0.5)
    finally:
        engine.dispose()
    return report


def _print(report: dict, orthanc_series: list, output_dir: Path) -> None:  # type: ignore[type-arg]
    print("\n=== dicomnode demo report ===")
    print(f"received : {report.get('instances')} instances of series "
          f"{report.get('series_instance_uid')}")
    print(f"complete : {report.get('completion_reason')}")
    print(f"rules    : {report.get('matched_rules')}")
    for job in report.get("jobs", []):
        extra = f" ({job['error']})" if job.get("error") else ""
        print(f"pipeline : {job['pipeline']} -> {job['status']} after {job['attempts']} "
              f"attempt(s){extra}")
    print(f"delivered: {report.get('deliveries')}")
    print("stages   : " + ", ".join(f"{k} {v:.2f}s" for k, v in report.get("stages_s", {}).items()))
    print("PACS now holds, in the same study:")
    for s in orthanc_series:
        print(f"  {s['modality']:4} {s['instances']:4} instances  {s['description']}")
    previews = sorted(output_dir.rglob("*.png"))
    if previews:
        print("previews :")
        for p in previews:
            print(f"  {p}")

