"""Receive end to end: DCMTK storescu -> node -> spool + audit rows -> complete -> job queued."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import select

from dicomnode.audit.models import (
    Association,
    EventLog,
    Instance,
    InstanceReceipt,
    Job,
    JobStatus,
    Series,
    SeriesState,
)
from dicomnode.dicom.net import echo
from tests.conftest import DATA, NodeProcess, storescu, wait_for

pytestmark = pytest.mark.data  # reads ../shared/data

LIDC_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"


def _series(node: NodeProcess, uid: str) -> Series | None:
    with node.session() as s:
        return s.execute(select(Series).where(Series.series_instance_uid == uid)).scalar_one_or_none()


def test_lidc_received_stored_completed_and_queued(make_node, db_url: str, lidc_copy: Path) -> None:
    node = make_node(db_url=db_url)
    t0 = time.monotonic()
    r = storescu(lidc_copy, node.port)
    closed_at = time.monotonic()
    assert r.returncode == 0, r.stderr
    series = wait_for(lambda: (s := _series(node, LIDC_UID)) and s.state != SeriesState.RECEIVING
                      and s, timeout=20)
    latency = time.monotonic() - closed_at
    assert series.state == SeriesState.ROUTED
    assert series.instance_count == 133
    assert series.completion_reason.startswith("sender association closed; 133 instances")
    assert latency < 2.0 + 0.5, f"completion took {latency:.2f}s after the sender closed"
    assert series.matched_rules == ["ct"]
    spool = node.settings.spool_dir
    with node.session() as s:
        rows = s.execute(select(Instance).where(Instance.series_id == series.id)).scalars().all()
        assert len(rows) == 133
        sources = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p
                   for p in lidc_copy.iterdir()}
        for row in rows:
            data = (spool / row.path).read_bytes()
            assert hashlib.sha256(data).hexdigest() == row.sha256
            assert row.bytes == len(data)
            assert row.calling_ae == "MODALITY"
            assert row.transfer_syntax_uid
            # the stored file is the same data set the modality sent
            got = pydicom.dcmread(spool / row.path)
            sent = pydicom.dcmread(sources[row.sop_instance_uid])
            assert got.PixelData == sent.PixelData
        receipts = s.execute(select(InstanceReceipt)).scalars().all()
        assert len(receipts) == 133 and {r.action for r in receipts} == {"create"}
        assoc = s.execute(select(Association).where(Association.direction == "in")).scalars().all()
        assert len(assoc) == 1
        sent_assoc = assoc[0]
        assert sent_assoc.calling_ae == "MODALITY" and sent_assoc.accepted
        assert sent_assoc.requests == 133 and sent_assoc.end_reason == "released"
        jobs = s.execute(select(Job)).scalars().all()
        assert [(j.pipeline, j.status) for j in jobs] == [("test-echo", JobStatus.QUEUED)]
        events = [e.event_type for e in s.execute(
            select(EventLog).where(EventLog.series_instance_uid == LIDC_UID)).scalars()]
        assert events.count("series.completed") == 1
        assert "route.evaluated" in events and "job.queued" in events
        # no PHI: the patient id appears nowhere in the event log
        pid = str(sent.PatientID)
        for e in s.execute(select(EventLog)).scalars():
            assert pid not in str(e.detail)
    status = node.status()
    entry = next(x for x in status["series"] if x["series_instance_uid"] == LIDC_UID)
    assert entry["state"] == "ROUTED" and entry["instances"] == 133
    assert node.stop() == 0
    print(f"completion latency after association close: {latency:.3f}s "
          f"(transfer {closed_at - t0:.2f}s)")


def test_duplicate_and_conflict(make_node, tmp_path: Path, lidc_copy: Path) -> None:
    node = make_node()
    one = sorted(lidc_copy.iterdir())[:1]
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "a.dcm").symlink_to(one[0])
    assert storescu(folder, node.port).returncode == 0
    assert storescu(folder, node.port).returncode == 0  # identical again: duplicate
    changed = pydicom.dcmread(one[0])
    changed.SeriesDescription = "edited"
    folder2 = tmp_path / "two"
    folder2.mkdir()
    changed.save_as(folder2 / "b.dcm", enforce_file_format=True)
    assert storescu(folder2, node.port).returncode == 0
    with node.session() as s:
        actions = [r.action for r in s.execute(
            select(InstanceReceipt).order_by(InstanceReceipt.id)).scalars()]
        assert actions == ["create", "duplicate", "conflict"]
        inst = s.execute(select(Instance)).scalar_one()
        original = (node.settings.spool_dir / inst.path).read_bytes()
        assert hashlib.sha256(original).hexdigest() == inst.sha256  # not overwritten
        conflict = s.execute(select(EventLog).where(EventLog.event_type == "instance.conflict")
                             ).scalar_one()
        kept = node.settings.spool_dir / conflict.detail["conflict_path"]
        assert pydicom.dcmread(kept).SeriesDescription == "edited"  # nothing lost


def test_unknown_peer_rejected_with_security_event(make_node) -> None:
    node = make_node(node={"allowed_peers": [{"ae_title": "PACS", "host": "127.0.0.1"}]})
    assert echo(host="127.0.0.1", port=node.port, called_aet="DICOMNODE",
                calling_aet="INTRUDER") == 0xFFFF
    ae = AE(ae_title="PACS")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assoc.release()
    with node.session() as s:
        ev = s.execute(select(EventLog).where(EventLog.event_type == "association.rejected")
                       ).scalars().all()
        assert len(ev) >= 1
        assert ev[0].audit_event_id == 110113 and ev[0].actor == "INTRUDER"
        rejected = s.execute(select(Association).where(Association.accepted.is_(False))
                             ).scalars().all()
        assert rejected and rejected[0].reject_reason == "peer not in allowed_peers"


@pytest.fixture(autouse=True)
def _send_raw_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make pynetdicom send a file's bytes as they are (by default it decodes and re-encodes a
    path, which silently 'repairs' a truncated file before the node could see it)."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def _send_raw(port: int, path: Path) -> int | None:
    """C-STORE a file as its raw bytes: the status, or None when the file cannot even be
    offered (no file meta to name its SOP class)."""
    try:
        meta = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta
        ae = AE(ae_title="EDGE")
        ae.add_requested_context(str(meta.MediaStorageSOPClassUID), [str(meta.TransferSyntaxUID)])
    except Exception:
        return None
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_store(path)
        return int(rsp.Status) if "Status" in rsp else None
    except Exception:
        return None
    finally:
        assoc.release()


# bad_sequence.dcm is a readable CT whose UIDs are hashes (anonymised): stored, not refused.
BROKEN = ["badVR.dcm", "rtplan_truncated.dcm", "MR_truncated.dcm"]


@pytest.mark.parametrize("name", BROKEN)
def test_broken_files_get_failure_status_and_event(make_node, name: str) -> None:
    node = make_node()
    path = DATA / "edge" / name
    status = _send_raw(node.port, path)
    with node.session() as s:
        failed = s.execute(select(EventLog).where(EventLog.event_type == "instance.failed")
                           ).scalars().all()
        stored = s.execute(select(Instance)).scalars().all()
    assert status is not None, f"{name}: could not be offered at all"
    assert status != 0x0000, f"{name} was accepted as stored"
    assert stored == []
    assert len(failed) == 1 and failed[0].detail["dimse_status"] == status
    # the node keeps serving
    assert echo(host="127.0.0.1", port=node.port, called_aet="DICOMNODE") == 0


def test_edge_files_all_answered_and_node_survives(make_node) -> None:
    node = make_node()
    answered = {}
    for path in sorted((DATA / "edge").iterdir()):
        answered[path.name] = _send_raw(node.port, path)
    assert echo(host="127.0.0.1", port=node.port, called_aet="DICOMNODE") == 0
    with node.session() as s:
        stored = {r.sop_instance_uid for r in s.execute(select(Instance)).scalars()}
        failures = s.execute(select(EventLog).where(EventLog.event_type == "instance.failed")
                             ).scalars().all()
    ok = [n for n, st in answered.items() if st == 0]
    bad = [n for n, st in answered.items() if st not in (0, None)]
    # files without a file meta header cannot be offered over DICOM at all (no SOP class)
    assert {n for n, st in answered.items() if st is None} <= {"no_meta.dcm",
                                                                "meta_missing_tsyntax.dcm"}
    # several edge files are one image in different syntaxes (same SOP Instance UID): the
    # first is stored, the rest are kept as conflicts
    ok_uids = {pydicom.dcmread(DATA / "edge" / n, stop_before_pixels=True).SOPInstanceUID
               for n in ok}
    assert stored == ok_uids
    assert len(failures) == len(bad)
    assert set(BROKEN) <= set(bad)
    assert "CT_small.dcm" in ok and "liver_j2k.dcm" in ok  # compressed syntaxes are accepted
    assert node.stop() == 0


def test_non_finite_geometry_is_refused_alike_on_every_database(make_node, db_url: str,
                                                                tmp_path: Path) -> None:
    """ImagePositionPatient NaN: 0xA900 with the reason on SQLite and PostgreSQL (it was
    stored on SQLite and answered 0xA700, retry forever, on PostgreSQL)."""
    from dicomnode.demo.sample import write_phantom_ct

    (path,) = write_phantom_ct(tmp_path / "ct", slices=1, size=16)
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient = ["NaN", "0", "0"]
    ds.save_as(path)
    node = make_node(db_url=db_url)
    assert _send_raw(node.port, path) == 0xA900
    with node.session() as s:
        (failed,) = s.execute(select(EventLog).where(
            EventLog.event_type == "instance.failed")).scalars().all()
        assert s.execute(select(Instance)).scalars().all() == []
    assert "ImagePositionPatient" in json.dumps(failed.detail)
