"""The SQLite fast path for a new instance's rows (dicomnode/node/rows.py) writes what the
Core path writes, and leaves every other case to it."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

import dicomnode.node.spool as spool_mod
from dicomnode.audit.db import make_engine, make_sessionmaker, migrate
from dicomnode.node.header import InstanceHeader
from dicomnode.node.spool import Spool, StoreAction, store_instance

SERIES = "1.2.826.0.1.3680043.10.999.1000"


def _header(i: int, *, series: str = SERIES, expected: int | None = 4) -> InstanceHeader:
    return InstanceHeader(
        sop_instance_uid=f"1.2.826.0.1.3680043.10.999.{i}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_instance_uid=series,
        study_instance_uid="1.2.826.0.1.3680043.10.999.2000", modality="CT", patient_id="P",
        instance_number=i, position=[-125.5, -125.5, 2.5 * i],
        orientation=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], expected_count=expected)


def _store(factory, spool: Spool, i: int, **kw: object) -> StoreAction:  # type: ignore[no-untyped-def]
    return store_instance(
        factory=factory, spool=spool, header=_header(i, **kw),  # type: ignore[arg-type]
        data=f"instance {i} ".encode() * 100, transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae="SENDER", association_id=None, message_id=i, patient_secret=b"k").action


def _raw_rows(db: Path, table: str) -> dict[str, tuple[object, ...]]:
    """Each row as SQLite stores it (text, numbers, JSON text), keyed by SOP Instance UID."""
    with sqlite3.connect(db) as con:
        cur = con.execute(f"SELECT * FROM {table} ORDER BY id")  # noqa: S608 - fixed names
        names = [d[0] for d in cur.description]
        return {row[names.index("sop_instance_uid")]: tuple(
            (n, type(v).__name__, v) for n, v in zip(names, row, strict=True)
            if n not in ("id", "sop_instance_uid", "path", "sha256", "bytes", "message_id",
                         "instance_number", "position"))
            for row in cur.fetchall()}


def test_fast_rows_are_the_core_rows_value_for_value(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Instances 1-3 of a series: the first creates the series (Core), the second takes the
    fast path, the third is forced onto Core. The second's rows and the third's are stored
    alike, column by column, down to SQLite's storage type (dates as text, JSON as text),
    and the series counts all three."""
    db = tmp_path / "db.sqlite"
    migrate(f"sqlite:///{db}")
    factory = make_sessionmaker(make_engine(f"sqlite:///{db}"))
    spool = Spool(tmp_path / "spool")
    taken: list[bool] = []
    fast = spool_mod.file_new_rows

    def watched(*args: object, **kwargs: object) -> bool:
        taken.append(fast(*args, **kwargs))  # type: ignore[arg-type]
        return taken[-1]

    monkeypatch.setattr(spool_mod, "file_new_rows", watched)
    assert _store(factory, spool, 1) is StoreAction.CREATE  # new series: Core
    assert _store(factory, spool, 2) is StoreAction.CREATE  # counted: fast
    monkeypatch.setattr(spool_mod, "file_new_rows", lambda *a, **k: False)
    assert _store(factory, spool, 3) is StoreAction.CREATE  # forced onto Core
    assert taken == [False, True]
    for table in ("instance", "instance_receipt"):
        rows = _raw_rows(db, table)
        second, third = (rows[_header(i).sop_instance_uid] for i in (2, 3))
        # the same text in each column; the times differ, but not in their format
        def shape(row: tuple[object, ...]) -> list[object]:
            return [(n, t, re.sub(r"[0-9]", "0", v) if n == "received_at" else v)
                    for n, t, v in row]  # type: ignore[misc]

        assert "received_at" in [c[0] for c in second]
        assert shape(second) == shape(third)
    with sqlite3.connect(db) as con:
        count, version, positions = con.execute(
            "SELECT instance_count, row_version, (SELECT group_concat(position, '|') "
            "FROM instance) FROM series").fetchone()
    assert (count, version) == (3, 3)
    assert positions.split("|")[1] == "[-125.5, -125.5, 5.0]"


def test_what_the_fast_path_leaves_to_core(tmp_path: Path) -> None:
    """A new series, a series still without its expected count, and a UID whose row exists
    (its file deleted) return False with nothing written; Core then files them."""
    db = tmp_path / "db.sqlite"
    migrate(f"sqlite:///{db}")
    engine = make_engine(f"sqlite:///{db}")
    factory = make_sessionmaker(engine)
    spool = Spool(tmp_path / "spool")
    assert _store(factory, spool, 1, expected=None) is StoreAction.CREATE
    # the series has no expected count and this instance brings one: Core sets it
    assert _store(factory, spool, 2, expected=7) is StoreAction.CREATE
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT expected_count, instance_count FROM series").fetchone() \
            == (7, 2)
    # a row exists for the UID but its file is gone: the unique index refuses the fast
    # INSERT, nothing of it stays, and Core records a repeat that restores the file
    (path,) = [p for p in (tmp_path / "spool").rglob("*.dcm") if "999.2." in p.name]
    path.unlink()
    assert _store(factory, spool, 2, expected=7) is StoreAction.DUPLICATE
    assert path.exists()
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT count(*), max(instance_count) FROM instance, series")\
            .fetchone() == (2, 2)
