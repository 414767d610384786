"""Chaos: kill -9 of the node at seeded random points during receive, ten rounds on one spool
and database. The disk and the audit trail are the oracle: no acknowledged instance is lost,
no partial file is an instance, and the series re-sent at the end completes once, one job."""

from __future__ import annotations

import hashlib
import random
import threading
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import select

from dicomnode.audit.models import EventLog, Instance, Job, Series, SeriesState
from dicomnode.demo.sample import write_phantom_ct
from tests.conftest import NodeProcess, storescu, wait_for

pytestmark = pytest.mark.slow

ROUNDS = 10


def _send_until_killed(node: NodeProcess, files: list[Path], kill_at: int) -> dict[str, Path]:
    """Send ``files`` on one association; kill -9 the node before the ``kill_at``-th store.
    Returns the instances answered 0x0000."""
    acknowledged: dict[str, Path] = {}
    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    killer = threading.Timer(0, node.kill9)
    for i, ds in enumerate(datasets):
        if i == kill_at:
            killer.start()  # the store below races the kill: either outcome is allowed
        try:
            rsp = assoc.send_c_store(ds)
        except Exception:  # noqa: BLE001 - the connection died with the node
            break
        if rsp and int(rsp.get("Status", 0xFFFF)) == 0:
            acknowledged[str(ds.SOPInstanceUID)] = files[i]
        if not assoc.is_established:
            break
    killer.join()
    if assoc.is_established:
        assoc.abort()
    return acknowledged


def test_ten_kill9_rounds_during_receive_lose_nothing(make_node, tmp_path: Path) -> None:
    files = sorted(write_phantom_ct(tmp_path / "ct", slices=60, size=128))
    # a long quiet period: a series cut by a crash must not complete before it is re-sent
    node = make_node(completion={"quiet_period_s": 600})
    rng = random.Random(20261206)
    acknowledged: dict[str, Path] = {}
    for _round in range(ROUNDS):
        order = files[:]
        rng.shuffle(order)  # instances arrive in any order, some again
        acknowledged |= _send_until_killed(node, order, rng.randrange(1, len(order)))
        node.start()  # same config, database and spool
        with node.session() as s:
            rows = {r.sop_instance_uid: r for r in s.execute(select(Instance)).scalars()}
        lost = [u for u in acknowledged if u not in rows]
        assert not lost, f"round {_round}: {len(lost)} acknowledged instances lost"
        for row in rows.values():  # every row's file is whole
            data = (node.settings.spool_dir / row.path).read_bytes()
            assert hashlib.sha256(data).hexdigest() == row.sha256
        assert not list((node.settings.spool_dir / ".tmp").iterdir())  # leftovers removed
    assert len(acknowledged) >= ROUNDS
    # the modality re-sends the whole series: it completes once, one job
    assert storescu(tmp_path / "ct", node.port).returncode == 0
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)

    def completed() -> Series | None:
        with node.session() as s:
            series = s.execute(select(Series).where(Series.series_instance_uid == uid)
                               ).scalar_one()
            return series if series.state != SeriesState.RECEIVING else None
    # the crashed associations keep the series open until the quiet period: shorten it
    assert node.stop() == 0
    node.config["completion"]["quiet_period_s"] = 2
    node.write_config()
    node.start()
    series = wait_for(completed, timeout=60)
    assert series.instance_count == len(files)
    with node.session() as s:
        completions = s.execute(select(EventLog).where(
            EventLog.event_type == "series.completed")).scalars().all()
        jobs = s.execute(select(Job)).scalars().all()
        crashed = s.execute(select(EventLog).where(EventLog.event_type == "node.started")
                            ).scalars().all()
    assert len(completions) == 1 and len(jobs) == 1
    assert sum(bool(e.detail["crashed_runs"]) for e in crashed) == ROUNDS
    assert node.stop() == 0
    print(f"chaos: {ROUNDS} kill -9 rounds during receive, {len(acknowledged)} instances "
          f"acknowledged, 0 lost, 1 completion, 1 job")
