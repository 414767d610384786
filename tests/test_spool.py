"""Filing in the spool under concurrency: the instance row and the file it names always agree."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

from sqlalchemy import select

from dicomnode.audit.db import make_engine, make_sessionmaker, migrate
from dicomnode.audit.models import Instance, InstanceReceipt
from dicomnode.node.header import InstanceHeader
from dicomnode.node.spool import Spool, StoreAction, store_instance


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


def _store(factory, spool: Spool, i: int, data: bytes):  # noqa: ANN001, ANN202 - test helper
    return store_instance(factory=factory, spool=spool, header=_header(i), data=data,
                          transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="SENDER",
                          association_id=None, message_id=i, patient_secret=b"k")


def test_a_repeat_whose_file_is_gone_restores_it_only_with_the_same_bytes(
        db_url: str, tmp_path: Path) -> None:
    """The file is linked to its name before the rows (outside the write lock): when the name
    is free but a row for the UID exists (its file was deleted), the same bytes bring the file
    back as a duplicate, and other bytes never stay under the row's name: they go to
    conflicts/ and the name stays free."""
    migrate(db_url)
    engine = make_engine(db_url)
    factory = make_sessionmaker(engine)
    spool = Spool(tmp_path / "spool")
    first = _store(factory, spool, 1, b"one" * 1000)
    (spool.root / first.path).unlink()
    again = _store(factory, spool, 1, b"one" * 1000)
    assert again.action is StoreAction.DUPLICATE and again.path == first.path
    assert (spool.root / first.path).read_bytes() == b"one" * 1000
    (spool.root / first.path).unlink()
    other = _store(factory, spool, 1, b"two" * 1000)
    assert other.action is StoreAction.CONFLICT and other.path.startswith("conflicts/")
    assert not (spool.root / first.path).exists()
    assert (spool.root / other.path).read_bytes() == b"two" * 1000
    with factory() as s:
        assert len(s.execute(select(Instance)).all()) == 1
        assert len(s.execute(select(InstanceReceipt)).all()) == 3
    assert list(spool.tmp.iterdir()) == []
    engine.dispose()


def test_a_name_taken_without_a_row_waits_for_that_store(
        db_url: str, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A file under the instance's name with no row is another association's store of the
    same UID that has not committed: the second store waits for its row and then files a
    repeat; if no row comes, it fails (the sender retries) and leaves that file alone."""
    import dicomnode.node.spool as spool_module

    migrate(db_url)
    engine = make_engine(db_url)
    factory = make_sessionmaker(engine)
    spool = Spool(tmp_path / "spool")
    relative = spool.relative_path(_header(2))
    (spool.root / relative).parent.mkdir(parents=True)
    (spool.root / relative).write_bytes(b"in flight")
    monkeypatch.setattr(spool_module, "SAME_UID_WAIT_S", 0.3)
    try:
        _store(factory, spool, 2, b"late" * 100)
    except RuntimeError as exc:
        assert "exists without a row" in str(exc)
    else:
        raise AssertionError("filed over a name it does not own")
    assert (spool.root / relative).read_bytes() == b"in flight"
    (spool.root / relative).unlink()

    # the first store commits while the second waits: the second is a repeat of it
    monkeypatch.setattr(spool_module, "SAME_UID_WAIT_S", 10.0)
    first_done = threading.Event()
    real_upsert = spool_module._upsert_series

    def slow_upsert(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        time.sleep(0.5)  # the first store holds its name, rows not yet written
        return real_upsert(*args, **kwargs)

    monkeypatch.setattr(spool_module, "_upsert_series", slow_upsert)
    results: list[StoreAction] = []
    first = threading.Thread(target=lambda: (results.append(
        _store(factory, spool, 2, b"same" * 100).action), first_done.set()))
    first.start()
    deadline = time.monotonic() + 5
    while not (spool.root / relative).exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    monkeypatch.setattr(spool_module, "_upsert_series", real_upsert)
    second = _store(factory, spool, 2, b"same" * 100)
    first.join()
    assert results == [StoreAction.CREATE] and second.action is StoreAction.DUPLICATE
    engine.dispose()


def test_a_failed_transaction_removes_the_linked_file(
        db_url: str, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import dicomnode.node.spool as spool_module

    migrate(db_url)
    engine = make_engine(db_url)
    factory = make_sessionmaker(engine)
    spool = Spool(tmp_path / "spool")

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError("database went away")

    monkeypatch.setattr(spool_module, "_upsert_series", broken)
    try:
        _store(factory, spool, 3, b"x" * 100)
    except OSError:
        pass
    else:
        raise AssertionError("the failure was swallowed")
    assert not (spool.root / spool.relative_path(_header(3))).exists()
    assert list(spool.tmp.iterdir()) == []
    monkeypatch.undo()
    assert _store(factory, spool, 3, b"x" * 100).action is StoreAction.CREATE  # the retry files
    engine.dispose()


def test_the_name_is_linked_while_the_data_is_written_and_no_row_comes_before_it(
        db_url: str, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """The instance's name is linked (and its directory fsynced) while the spool thread still
    writes and fsyncs the data; the row waits for that write, and a write that fails leaves
    neither the name nor the temp file behind."""
    import errno

    migrate(db_url)
    engine = make_engine(db_url)
    factory = make_sessionmaker(engine)
    spool = Spool(tmp_path / "spool")
    real_write = Spool._write
    linked_before_written: list[bool] = []

    def slow_write(self, fd, tmp, data):  # noqa: ANN001, ANN202
        time.sleep(0.3)
        final = spool.root / spool.relative_path(_header(int(data[:1])))
        linked_before_written.append(final.exists() and final.stat().st_size == 0)
        time.sleep(0.1)
        with factory() as s:  # the rows wait for this write
            assert s.execute(select(Instance)).first() is None
        return real_write(self, fd, tmp, data)

    monkeypatch.setattr(Spool, "_write", slow_write)
    result = store_instance(factory=factory, spool=spool, header=_header(4),
                            data=b"4" * 1000, written=spool.write_tmp_soon(b"4" * 1000),
                            transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="S",
                            association_id=None, message_id=4, patient_secret=b"k")
    assert result.action is StoreAction.CREATE and linked_before_written == [True]
    assert (spool.root / result.path).read_bytes() == b"4" * 1000

    def full_disk(self, fd, tmp, data):  # noqa: ANN001, ANN202
        time.sleep(0.2)
        os.close(fd)
        tmp.unlink()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Spool, "_write", full_disk)
    try:
        store_instance(factory=factory, spool=spool, header=_header(5), data=b"5" * 1000,
                       written=spool.write_tmp_soon(b"5" * 1000),
                       transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="S",
                       association_id=None, message_id=5, patient_secret=b"k")
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    else:
        raise AssertionError("a failed write was filed")
    assert not (spool.root / spool.relative_path(_header(5))).exists()
    assert list(spool.tmp.iterdir()) == []
    with factory() as s:
        assert [r.sop_instance_uid for r in s.execute(select(Instance)).scalars()] == \
            [_header(4).sop_instance_uid]
    engine.dispose()
