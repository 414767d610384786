"""A full disk: the node's var_dir (spool and SQLite database) on a small tmpfs of its own."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import select

from dicomnode.audit.models import EventLog, Instance
from dicomnode.demo.sample import write_phantom_ct
from dicomnode.dicom.net import echo
from tests.conftest import STRICT, NodeProcess, wait_for


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 32 MB tmpfs (needs root, as CI has)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        message = f"cannot mount a tmpfs: {done.stderr.strip()}"
        if STRICT:
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _send_all(port: int, files: list[Path]) -> dict[str, int]:
    """C-STORE each file on one association; SOP Instance UID -> status."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    statuses = {}
    try:
        for path in files:
            ds = pydicom.dcmread(path)
            statuses[ds.SOPInstanceUID] = int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()
    return statuses


def test_full_disk_refuses_cleanly_and_accepts_again(make_node, small_fs: Path,
                                                     tmp_path: Path) -> None:
    node: NodeProcess = make_node(var_dir=str(small_fs / "var"), node={"min_free_disk_mb": 0})
    files = sorted(write_phantom_ct(tmp_path / "ct", slices=48, size=256))  # ~6 MB
    # leave about 2.5 MB free: room for some instances, not for all
    filler = small_fs / "filler"
    with open(filler, "wb") as fh:
        free = shutil.disk_usage(small_fs).free
        fh.write(b"\0" * (free - 2_500_000))
    statuses = _send_all(node.port, files)
    ok = {uid for uid, st in statuses.items() if st == 0x0000}
    refused = {uid for uid, st in statuses.items() if st != 0x0000}
    assert ok and refused, f"the disk should fill part way: {statuses}"
    assert {statuses[u] for u in refused} == {0xA700}  # out of resources: the sender retries
    spool = node.settings.spool_dir
    assert list((spool / ".tmp").iterdir()) == []  # nothing partial left behind
    assert echo(host="127.0.0.1", port=node.port, called_aet="DICOMNODE") == 0  # still answers

    filler.unlink()  # space returns
    again = _send_all(node.port, files)
    assert set(again.values()) == {0x0000}
    with node.session() as s:
        rows = {r.sop_instance_uid: r for r in s.execute(select(Instance)).scalars()}
        assert set(rows) == set(statuses)  # every instance stored once
        for row in rows.values():
            assert hashlib.sha256((spool / row.path).read_bytes()).hexdigest() == row.sha256

    def refusals_recorded() -> list[EventLog]:
        with node.session() as s:
            return s.execute(select(EventLog).where(
                EventLog.event_type == "instance.failed")).scalars().all()
    events = wait_for(lambda: len(e := refusals_recorded()) >= len(refused) and e, timeout=10)
    # each refusal has its event, those the full database could not take recorded late
    assert {e.detail["sop_instance_uid"] for e in events} == refused
    assert all(e.detail["dimse_status"] == 0xA700 for e in events)
    late = sum(bool(e.detail.get("recorded_late")) for e in events)
    assert late > 0  # the database shares the full disk: those were kept and recorded after
    print(f"full disk: {len(ok)} stored, {len(refused)} refused 0xA700, {late} recorded late")
    assert node.stop() == 0
