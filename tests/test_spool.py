"""Filing in the spool under concurrency: the instance row and the file it names always agree."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from sqlalchemy import select

from dicomnode.audit.db import make_engine, make_sessionmaker, migrate
from dicomnode.audit.models import Instance, InstanceReceipt
from dicomnode.node.spool import InstanceHeader, Spool, StoreAction, store_instance


def _header(i: int) -> InstanceHeader:
    return InstanceHeader(
        sop_instance_uid=f"1.2.826.0.1.3680043.10.999.{i}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_instance_uid="1.2.826.0.1.3680043.10.999.1000",
        study_instance_uid="1.2.826.0.1.3680043.10.999.2000",
        modality="CT", patient_id="P", instance_number=i, position=None, orientation=None,
        expected_count=None,
    )


def test_racing_different_bytes_under_one_uid_lose_nothing(db_url: str, tmp_path: Path) -> None:
    """Two senders file different bytes under one SOP Instance UID at the same moment, 15
    times: both are answered, the row's sha256 is the file's at the row's path, and the other
    version is kept under conflicts/ (on PostgreSQL the loser's rename used to replace the
    winner's file, so one acknowledged version was lost and the row no longer matched)."""
    migrate(db_url)
    engine = make_engine(db_url)
    factory = make_sessionmaker(engine)
    spool = Spool(tmp_path / "spool")
    pairs = 15
    results: dict[tuple[int, int], StoreAction] = {}
    errors: list[BaseException] = []

    def send(i: int, side: int, barrier: threading.Barrier) -> None:
        data = f"instance {i} version {side} ".encode() * 2000
        barrier.wait()
        try:
            results[(i, side)] = store_instance(
                factory=factory, spool=spool, header=_header(i), data=data,
                transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae=f"SENDER{side}",
                association_id=None, message_id=i, patient_secret=b"k").action
        except BaseException as exc:  # noqa: BLE001 - collected and asserted on below
            errors.append(exc)

    for i in range(pairs):
        barrier = threading.Barrier(2)
        threads = [threading.Thread(target=send, args=(i, side, barrier)) for side in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    engine.dispose()
    assert errors == []
    with make_sessionmaker(make_engine(db_url))() as s:
        rows = {r.sop_instance_uid: r for r in s.execute(select(Instance)).scalars()}
        receipts = s.execute(select(InstanceReceipt)).scalars().all()
    assert len(rows) == pairs and len(receipts) == 2 * pairs
    kept: dict[str, set[str]] = {}
    for path in (spool.root / "conflicts").glob("*.dcm"):
        uid = path.name.rsplit(".", 2)[0]
        kept.setdefault(uid, set()).add(hashlib.sha256(path.read_bytes()).hexdigest())
    for i in range(pairs):
        assert {results[(i, 0)], results[(i, 1)]} == {StoreAction.CREATE, StoreAction.CONFLICT}
        row = rows[_header(i).sop_instance_uid]
        on_disk = hashlib.sha256((spool.root / row.path).read_bytes()).hexdigest()
        assert on_disk == row.sha256, f"pair {i}: the row does not describe its file"
        versions = {hashlib.sha256(f"instance {i} version {side} ".encode() * 2000).hexdigest()
                    for side in (0, 1)}
        assert {on_disk} | kept.get(_header(i).sop_instance_uid, set()) == versions
