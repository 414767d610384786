"""Operations endpoint: /metrics counts what happened, /healthz fails when it should, and the
status page renders in a real browser (headless Chromium)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from sqlalchemy import create_engine, select, text

from dicomnode.audit.models import Delivery, DeliveryStatus, EventLog
from dicomnode.demo.sample import write_phantom_ct
from dicomnode.dicom.net import echo
from tests.conftest import PG_ADMIN, ROOT, free_port, require, storescu, wait_for

CHROMIUM = "/usr/bin/chromium"


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = _get(port, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def _store(port: int, ds: pydicom.Dataset) -> int:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def _pipeline_node(make_node, pacs, **extra):  # type: ignore[no-untyped-def]
    return make_node(
        rules=[{"name": "ct", "match": {"Modality": {"equals": "CT"}},
                "pipelines": ["ct-tissue"], "destinations": ["pacs"]}],
        destinations={"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1",
                               "port": pacs.dicom_port}},
        executor={"workers": 1, "poll_interval_s": 0.2}, schedule={"delivery_sweep_s": 0.3},
        output={"previews": False}, http={"port": free_port()}, **extra)


def test_metrics_count_what_happened(make_node, orthanc_factory, tmp_path: Path) -> None:
    pacs = orthanc_factory().start()
    node = _pipeline_node(make_node, pacs)
    http = node.config["http"]["port"]
    # the worker reports itself once it has loaded torch; until then /healthz says how many
    wait_for(lambda: json.loads(_get(http, "/healthz")[1]).get("workers") == "ready",
             timeout=60)
    before = _metrics(http)
    assert before[("dicomnode_database_up", ())] == 1
    assert before.get(("dicomnode_instances_received_total", (("action", "create"),)), 0) == 0

    write_phantom_ct(tmp_path / "ct", slices=8, size=64)
    assert storescu(tmp_path / "ct", node.port).returncode == 0

    def delivered() -> bool:
        with node.session() as s:
            rows = s.execute(select(Delivery.status)).scalars().all()
        return bool(rows) and all(r == DeliveryStatus.DELIVERED for r in rows)
    wait_for(delivered, timeout=120)
    # a refused instance (non-finite geometry) and a rejected association
    (bad,) = write_phantom_ct(tmp_path / "bad", slices=1, size=16)
    ds = pydicom.dcmread(bad)
    ds.ImagePositionPatient = ["NaN", "0", "0"]
    assert _store(node.port, ds) == 0xA900
    assert echo(host="127.0.0.1", port=node.port, called_aet="NOT-THIS-NODE") != 0

    rejected = ("dicomnode_associations_total", (("direction", "in"), ("result", "rejected")))
    # the refusal is recorded just after the reject PDU went out
    after = wait_for(lambda: (m := _metrics(http)).get(rejected) and m, timeout=10)
    assert after[rejected] == 1
    assert after[("dicomnode_instances_received_total", (("action", "create"),))] == 8
    assert after[("dicomnode_instances_refused_total", ())] == 1
    assert after[("dicomnode_series_completed_total", ())] == 1
    assert after[("dicomnode_jobs", (("pipeline", "ct-tissue"), ("status", "SUCCEEDED")))] == 1
    assert after[("dicomnode_deliveries", (("status", "DELIVERED"),))] == 1
    assert after[("dicomnode_job_duration_seconds_count", (("pipeline", "ct-tissue"),))] == 1
    assert after[("dicomnode_dead_letters_total", ())] == 0
    assert after[("dicomnode_stored_bytes", (("kind", "received"),))] > 8 * 64 * 64 * 2
    assert after[("dicomnode_disk_free_bytes", ())] > 0
    assert node.stop() == 0


def test_healthz_fails_on_low_disk_and_refuses_associations(make_node) -> None:
    node = make_node(http={"port": free_port()})
    http = node.config["http"]["port"]
    status, body = _get(http, "/healthz")
    assert status == 200 and json.loads(body)["healthy"] is True
    assert node.stop() == 0
    # a threshold above any real free space: the node starts, reports, and refuses senders
    node.config["node"]["min_free_disk_mb"] = 1e12
    node.write_config()
    node.start()
    status, body = _get(http, "/healthz")
    checks = json.loads(body)
    assert status == 503 and checks["healthy"] is False and "min_free_disk_mb" in checks["disk"]
    assert checks["database"] == "ok" and checks["receiver"] == "listening"
    assert echo(host="127.0.0.1", port=node.port, called_aet="DICOMNODE") != 0

    def rejected() -> list[EventLog]:
        with node.session() as s:
            return s.execute(select(EventLog).where(
                EventLog.event_type == "association.rejected")).scalars().all()
    (event,) = wait_for(rejected, timeout=10)  # recorded just after the reject PDU went out
    assert "min_free_disk_mb" in event.detail["reason"] and event.audit_event_id == 110100
    assert node.stop() == 0


@pytest.mark.postgres
def test_healthz_fails_while_the_database_is_unreachable(make_node, pg_url: str) -> None:
    node = make_node(db_url=pg_url, http={"port": free_port()})
    http = node.config["http"]["port"]
    assert _get(http, "/healthz")[0] == 200
    name = pg_url.rsplit("/", 1)[1]
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
        conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = :n"), {"n": name})
    try:
        status, body = _get(http, "/healthz")
        assert status == 503 and json.loads(body)["database"].startswith("unreachable")
        assert _metrics(http)[("dicomnode_database_up", ())] == 0
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()
    assert wait_for(lambda: _get(http, "/healthz")[0] == 200, timeout=30)
    assert node.stop() == 0


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    require(CHROMIUM)
    return subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
                           "--disable-dev-shm-usage", "--no-first-run", *args],
                          capture_output=True, text=True, timeout=120)


def test_status_page_in_a_real_browser(make_node, tmp_path: Path) -> None:
    """Headless Chromium renders the page while the node runs: the sent series is a row, a
    search by its Study UID keeps it, and no patient name appears anywhere."""
    node = make_node(http={"port": free_port()})  # the test rule queues a job, no worker
    http = node.config["http"]["port"]
    files = write_phantom_ct(tmp_path / "ct", slices=4, size=32)
    head = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert storescu(tmp_path / "ct", node.port).returncode == 0
    wait_for(lambda: node.status()["jobs"], timeout=30)
    dom = _chromium("--dump-dom", f"http://127.0.0.1:{http}/").stdout
    assert "<table id=\"series\">" in dom.replace("'", '"')
    assert head.SeriesInstanceUID in dom and "ROUTED" in dom and "test-echo" in dom
    assert str(head.PatientName) not in dom
    other = _chromium("--dump-dom", f"http://127.0.0.1:{http}/?q=1.2.3.4.5.6.7.8.9").stdout
    assert head.SeriesInstanceUID not in other  # the search filters
    found = _chromium("--dump-dom", f"http://127.0.0.1:{http}/?q={head.StudyInstanceUID}").stdout
    assert head.SeriesInstanceUID in found
    shot = tmp_path / "status-page.png"
    _chromium(f"--screenshot={shot}", "--window-size=1400,900", f"http://127.0.0.1:{http}/")
    assert shot.stat().st_size > 10_000
    if os.environ.get("DICOMNODE_WRITE_DOC_IMAGES"):
        shutil.copy(shot, ROOT / "docs" / "img" / "status-page.png")
    assert node.stop() == 0


def test_resend_needs_the_page_token_and_is_audited(make_node, tmp_path: Path) -> None:
    """A dead letter (the PACS port is closed, one attempt allowed) is re-sent only by a form
    that carries the token of the page it came from."""
    node = make_node(
        rules=[{"name": "ct", "match": {"Modality": {"equals": "CT"}},
                "pipelines": ["ct-tissue"], "destinations": ["pacs"]}],
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}},
        executor={"workers": 1, "poll_interval_s": 0.2}, output={"previews": False},
        push={"max_attempts": 1}, schedule={"delivery_sweep_s": 0.3}, http={"port": free_port()})
    http = node.config["http"]["port"]
    write_phantom_ct(tmp_path / "ct", slices=6, size=32)
    assert storescu(tmp_path / "ct", node.port).returncode == 0

    def dead() -> list[int]:
        with node.session() as s:
            return list(s.execute(select(Delivery.id).where(
                Delivery.status == DeliveryStatus.DEAD)).scalars())
    (dead_id,) = wait_for(dead, timeout=120)
    page = _get(http, "/")[1]
    assert f"name='id' value='{dead_id}'" in page
    token = page.split("name='token' value='", 1)[1].split("'", 1)[0]

    def post(form: str) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{http}/resend", data=form.encode(),
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as rsp:
                return rsp.status
        except urllib.error.HTTPError as err:
            return err.code
    assert post(f"id={dead_id}&token=forged") == 403
    assert dead() == [dead_id]
    assert post(f"id={dead_id}&token={token}") == 200  # 303 to the page, followed
    with node.session() as s:
        (event,) = s.execute(select(EventLog).where(
            EventLog.event_type == "delivery.requeued")).scalars().all()
    assert event.actor == "http" and event.detail == {"count": 1, "ids": [dead_id]}
    assert node.stop() == 0
