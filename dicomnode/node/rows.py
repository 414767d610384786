"""The receive path's commonest transaction on SQLite, run on the DB-API cursor.

Most stores add one instance to a series that is receiving: one UPDATE that counts it into its
series and two INSERTs (the instance, its receipt). On SQLite those run here on the pooled
DB-API connection, inside the same write lock and ``BEGIN IMMEDIATE`` as
:func:`dicomnode.audit.db.write_connection`, with SQLAlchemy's own SQL text and bind
processors compiled once (so the rows are what the Core statements write, value for value),
but without SQLAlchemy's per-execution machinery: 0.31-0.58 ms per store through Core, 0.20-0.23
ms this way, 0.06 ms for the bare statements on the cursor, measured with ``synchronous=OFF`` (the
difference is CPU, and on four associations it is also time the write lock is held;
docs/benchmarks.md, "Ingest").

Everything else (a new or reopened series, a series still without its expected count, a UID
that already has a row, PostgreSQL) returns ``False`` with nothing written, and the caller
takes the Core path, which decides those cases as before.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from typing import Any, cast

from sqlalchemy import Engine
from sqlalchemy.sql.compiler import Compiled
from sqlalchemy.sql.dml import Insert, Update

__all__ = ["Precompiled", "file_new_rows"]


class Precompiled:
    """A Core statement compiled once for one dialect: its SQL text, and its parameters in
    order with SQLAlchemy's bind processors applied."""

    def __init__(self, stmt: Insert | Update, engine: Engine,
                 keys: list[str] | None = None) -> None:
        self.compiled: Compiled = stmt.compile(dialect=engine.dialect, column_keys=keys)
        if getattr(self.compiled, "insert_prefetch", None) or \
                getattr(self.compiled, "update_prefetch", None):
            # a Python-side column default would need SQLAlchemy's execution context
            raise ValueError(f"{stmt} has column defaults computed at execution")
        self.sql = str(self.compiled)
        processors: dict[str, Any] = dict(self.compiled._bind_processors)  # noqa: SLF001
        positions = self.compiled.positiontup or []
        self.order: list[tuple[str, Any]] = [(name, processors.get(name))
                                             for name in positions]

    def params(self, values: dict[str, Any]) -> tuple[Any, ...]:
        full = self.compiled.construct_params(values)
        assert full is not None
        return tuple(process(full[name]) if process else full[name]
                     for name, process in self.order)


class _CoreDecides(Exception):
    """Roll back: the Core path decides this store."""


def _statements(engine: Engine, count: Update, instance: Insert, receipt: Insert,
                instance_keys: list[str], receipt_keys: list[str]
                ) -> tuple[Precompiled, Precompiled, Precompiled]:
    """The three statements compiled for this engine, kept on it (as its write lock is)."""
    compiled = getattr(engine, "dicomnode_fast_rows", None)
    if compiled is None:
        compiled = (Precompiled(count, engine), Precompiled(instance, engine, instance_keys),
                    Precompiled(receipt, engine, receipt_keys))
        engine.dicomnode_fast_rows = compiled  # type: ignore[attr-defined]
    return cast(tuple[Precompiled, Precompiled, Precompiled], compiled)


@contextlib.contextmanager
def _raw_write(engine: Engine) -> Iterator[Any]:
    """The engine's write lock, a pooled DB-API connection, BEGIN IMMEDIATE ... COMMIT;
    ROLLBACK on any exception."""
    with engine.dicomnode_write_lock:  # type: ignore[attr-defined]
        conn = engine.raw_connection()
        try:
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):
                    cur.execute("ROLLBACK")
                raise
            finally:
                cur.close()
        finally:
            conn.close()


def file_new_rows(engine: Engine, *, count: Update, instance: Insert, receipt: Insert,
                  series_uid: str, now: object, association_id: int | None,
                  expected_count: int | None, instance_row: dict[str, Any],
                  receipt_row: dict[str, Any]) -> bool:
    """Count a new instance into its receiving series and insert its instance and receipt
    rows, in one transaction; ``False`` (nothing written) where the Core path must decide.

    ``count`` is the UPDATE ... RETURNING (id, expected_count) keyed by ``series_uid``,
    ``now`` and ``assoc_id``; ``instance_row`` lacks ``series_id``, which the UPDATE gives.
    """
    if engine.dialect.name != "sqlite" or not hasattr(engine, "dicomnode_write_lock"):
        return False
    instance_keys = [*instance_row, "series_id"]
    counted, ins_instance, ins_receipt = _statements(
        engine, count, instance, receipt, instance_keys, list(receipt_row))
    try:
        with _raw_write(engine) as cur:
            row = cur.execute(counted.sql, counted.params(
                {"series_uid": series_uid, "now": now, "assoc_id": association_id})).fetchone()
            if row is None or (expected_count and not row[1]):
                raise _CoreDecides  # a new, completed or uncounted series
            cur.execute(ins_instance.sql, ins_instance.params({**instance_row,
                                                               "series_id": row[0]}))
            cur.execute(ins_receipt.sql, ins_receipt.params(receipt_row))
    except (_CoreDecides, sqlite3.IntegrityError):  # the UID has a row: a repeat
        return False
    return True
