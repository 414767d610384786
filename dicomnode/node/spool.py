"""Spool: received bytes safely on disk, then the instance row, then (only then) success.

Order of operations for one C-STORE (``shared/AUDIT.md``, "Consistency under crashes"):

1. write the encoded bytes to ``.tmp/<uuid>`` and fsync (on a spool thread, while the data
   set is checked);
2. hard-link that file to ``<study>/<series>/<sop>.dcm`` (``link`` never replaces an existing
   file: the name is claimed exclusively) and fsync the directory, while step 1 may still
   run; then wait for step 1;
3. one transaction: count the instance into its series, insert the instance row and the
   receipt (the unique index on the SOP Instance UID catches a repeat), commit;
4. the caller answers 0x0000 only when all of that returned.

Steps 1-2 run outside the database's write lock, so parallel associations' file fsyncs and
directory fsyncs overlap instead of queueing behind each other's commits (at 4 associations
the rename and directory fsync had taken a third of the time the lock was held;
docs/benchmarks.md, "Ingest"). No row names a file before its data is durable. A crash
between the link and the commit leaves a file without a row, set aside at start-up (its
sender was not answered); a failed write or transaction removes it at once.

A second association sending the same SOP Instance UID finds the name taken: with a row it is
a repeat (same bytes: a duplicate receipt; other bytes: kept under ``conflicts/``); without one
(the first has not committed yet) it waits for the first to commit or give up. A free name
with a row is a repeat whose file was deleted: the same bytes bring the file back, other bytes
go to ``conflicts/``.

No pixel data is decoded here.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import logging
import os
import re
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, Table, bindparam, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit.db import write_connection
from dicomnode.audit.events import AuditEventID, Outcome, patient_key, record_event
from dicomnode.audit.models import Instance, InstanceReceipt, Series, SeriesState, utcnow
from dicomnode.files import fsync_dir
from dicomnode.node.header import InstanceHeader
from dicomnode.node.rows import file_new_rows

__all__ = ["PendingWrite", "Spool", "StoreAction", "store_instance"]

log = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# Hot-path statements, built once on the Core tables and run on a Core connection:
# parameters are bound per call, so SQLAlchemy compiles each statement once (~1.5 ms per
# instance measured), and the ORM's bulk-persistence layer, which these plain rows do not need,
# is skipped (another ~2.5 ms per instance; docs/benchmarks.md, "Receive").
_INSTANCES, _RECEIPTS, _SERIES = (cast(Table, m.__table__)
                                  for m in (Instance, InstanceReceipt, Series))
_INSERT_INSTANCE = insert(_INSTANCES)
_INSERT_RECEIPT = insert(_RECEIPTS)
_FIND_INSTANCE = select(_INSTANCES.c.sha256, _INSTANCES.c.path).where(
    _INSTANCES.c.sop_instance_uid == bindparam("sop_uid"))
_COUNT_INTO_SERIES = (
    update(_SERIES)
    .where(_SERIES.c.series_instance_uid == bindparam("series_uid"),
           _SERIES.c.state == SeriesState.RECEIVING)
    .values(instance_count=_SERIES.c.instance_count + 1,
            last_received_at=bindparam("now", type_=_SERIES.c.last_received_at.type),
            last_association_id=bindparam("assoc_id", type_=_SERIES.c.last_association_id.type),
            row_version=_SERIES.c.row_version + 1)
    .returning(_SERIES.c.id, _SERIES.c.expected_count)
)


# top-level spool folders that hold no instance of a study: kept-aside duplicates with other
# bytes, and files found at start-up that no row describes
CONFLICTS, ORPHANS = "conflicts", "orphans"


class StoreAction(enum.StrEnum):
    CREATE = "create"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


def _safe_component(uid: str) -> str:
    """A UID as a path component; anything not a well-formed UID is hashed (no ``..`` tricks)."""
    if _UID_RE.match(uid):
        return uid
    return "x" + hashlib.sha256(uid.encode()).hexdigest()[:40]


class PendingWrite:
    """A temp file being written and fsynced on a spool thread (:meth:`Spool.write_tmp_soon`);
    ``path`` exists from the start, ``result()`` waits for the data to be durable."""

    def __init__(self, path: Path, future: Future[None]) -> None:
        self.path = path
        self._future = future

    def result(self) -> Path:
        """Wait for the write and its fsync; raises what they raised."""
        self._future.result()
        return self.path


class Spool:
    """Atomic, durable file writes under one root directory.

    Parameters
    ----------
    root
        The spool directory; created if missing.
    fsync
        fsync files and directories (only a benchmark turns this off, to measure its cost).
    """

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.tmp = self.root / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def relative_path(self, header: InstanceHeader) -> str:
        """Where an instance lives, relative to the root."""
        return "/".join(
            (
                _safe_component(header.study_instance_uid),
                _safe_component(header.series_instance_uid),
                _safe_component(header.sop_instance_uid) + ".dcm",
            )
        )

    def write_tmp(self, data: bytes) -> Path:
        """Write ``data`` to a new temp file and fsync it; returns its path."""
        tmp, fd = self._new_tmp()
        self._write(fd, tmp, data)
        return tmp

    def _new_tmp(self) -> tuple[Path, int]:
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)

    def _write(self, fd: int, tmp: Path, data: bytes) -> None:
        try:
            with open(fd, "wb") as fh:
                fh.write(data)
                if self.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def write_tmp_soon(self, data: bytes) -> PendingWrite:
        """:meth:`write_tmp` on a spool thread: the caller's work overlaps the write and its
        fsync, which release the GIL. The file exists (empty) when this returns, so that it
        can be linked to its name while it is written. Pass the result to
        :func:`store_instance` or to :meth:`discard`."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="spool")
        tmp, fd = self._new_tmp()
        try:
            return PendingWrite(tmp, self._pool.submit(self._write, fd, tmp, data))
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise

    @staticmethod
    def discard(written: PendingWrite) -> None:
        """Wait for a write from :meth:`write_tmp_soon` and delete its file (not filed)."""
        with contextlib.suppress(Exception):
            written.result()
        written.path.unlink(missing_ok=True)

    def commit_tmp(self, tmp: Path, relative: str) -> None:
        """Rename a fsynced temp file to ``relative`` and fsync the directory."""
        final = self.root / relative
        self._make_parents(final.parent)
        os.replace(tmp, final)
        if self.fsync:
            fsync_dir(final.parent)

    def claim(self, tmp: Path, relative: str) -> bool:
        """Hard-link a fsynced temp file to ``relative`` and fsync the directory; False when
        that name already exists (nothing is replaced)."""
        final = self.root / relative
        for _ in range(100):  # retention may remove an emptied folder between mkdir and link
            self._make_parents(final.parent)
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False
            except FileNotFoundError:
                if not tmp.exists():
                    raise
                continue
            if self.fsync:
                fsync_dir(final.parent)
            return True
        raise FileNotFoundError(f"could not create the folder of {relative}")

    def _make_parents(self, folder: Path) -> None:
        """Create ``folder`` and any missing parents, fsyncing each new entry's parent (a new
        series folder must survive a power cut like the file in it)."""
        missing = []
        while not folder.is_dir():
            missing.append(folder)
            folder = folder.parent
        for new in reversed(missing):
            with contextlib.suppress(FileExistsError):
                new.mkdir()
            if self.fsync:
                fsync_dir(new.parent)

    def unrecorded(self, recorded: set[str]) -> list[str]:
        """Instance files (relative paths) that no row describes: a crash or a failed insert
        between the link and the commit leaves one (its sender was not answered 0x0000)."""
        found = []
        for path in sorted(self.root.glob("*/*/*.dcm")):
            relative = path.relative_to(self.root).as_posix()
            if relative.split("/", 1)[0] not in (self.tmp.name, CONFLICTS, ORPHANS) \
                    and relative not in recorded:
                found.append(relative)
        return found

    def set_aside(self, relative: str) -> str:
        """Move a file no row describes to ``orphans/`` (kept, never deleted: it may hold the
        only copy of what its sender will send again); returns its new relative path."""
        target = f"{ORPHANS}/{relative.replace('/', '_')}"
        (self.root / ORPHANS).mkdir(exist_ok=True)
        os.replace(self.root / relative, self.root / target)
        if self.fsync:
            fsync_dir(self.root / ORPHANS)
        return target

    def clean_tmp(self) -> int:
        """Remove leftovers of interrupted writes (start-up reconciliation); returns the count."""
        count = 0
        for leftover in self.tmp.glob("*.part"):
            leftover.unlink(missing_ok=True)
            count += 1
        return count


@dataclass(frozen=True, kw_only=True)
class StoreResult:
    """What :func:`store_instance` did."""

    action: StoreAction
    sha256: str
    path: str


def store_instance(
    *,
    factory: sessionmaker[Session],
    spool: Spool,
    header: InstanceHeader,
    data: bytes,
    written: PendingWrite | None = None,
    transfer_syntax_uid: str,
    calling_ae: str,
    association_id: int | None,
    message_id: int | None,
    patient_secret: bytes,
) -> StoreResult:
    """File one received instance durably and record it; raises on any disk or database failure.

    The bytes are written and fsynced to a temp file first and linked to their name (directory
    fsynced); then, in one transaction, either the rows are inserted or, when the name or the
    UID is taken, the store is recorded as a duplicate / conflict. A duplicate with the same sha256
    only adds a receipt; one with different content is kept under ``conflicts/``; the original
    is never overwritten (see the module docstring).

    ``written``, when given, is ``data`` already being written by :meth:`Spool.write_tmp_soon`
    (the caller's parsing overlapped it). Its name is linked and the directory fsynced while
    the data's own write and fsync may still run; both are waited for before the transaction
    starts, so a row only ever names a durable file (a crash before that leaves a file
    without a row, set aside at start-up).

    Returns
    -------
    StoreResult
        The action taken, the checksum and the stored path (relative to the spool).
    """
    try:
        sha = hashlib.sha256(data).hexdigest()
    except BaseException:
        if written is not None:
            Spool.discard(written)
        raise
    tmp = written.path if written is not None else spool.write_tmp(data)
    relative = spool.relative_path(header)
    try:
        deadline = time.monotonic() + SAME_UID_WAIT_S
        while True:
            try:
                linked = spool.claim(tmp, relative)
            except FileNotFoundError:
                if written is not None:
                    written.result()  # the write failed and removed its file: its error
                raise
            try:
                if written is not None:
                    written.result()  # the data durable before any row names the file
                result = _file_rows(factory, spool, header=header, tmp=tmp, sha=sha,
                                    size=len(data), relative=relative, linked=linked,
                                    transfer_syntax_uid=transfer_syntax_uid,
                                    calling_ae=calling_ae, association_id=association_id,
                                    message_id=message_id, patient_secret=patient_secret)
            except BaseException:
                if linked:
                    _unclaim(factory, spool, header.sop_instance_uid, relative)
                raise
            if result is not None:
                return result
            # the name is taken and no row describes it: another association is filing the
            # same SOP Instance UID and has not committed yet
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{relative} exists without a row after {SAME_UID_WAIT_S:g}s: another "
                    "association's store of this SOP Instance UID did not finish (a file left "
                    "by a crash is set aside at the next start); the sender should retry")
            time.sleep(0.02)
    finally:
        if written is not None:
            with contextlib.suppress(Exception):
                written.result()  # not unlinked under a write still running
        tmp.unlink(missing_ok=True)


# how long a store waits for another association's store of the same SOP Instance UID
SAME_UID_WAIT_S = 10.0


def _file_rows(
    factory: sessionmaker[Session], spool: Spool, *, header: InstanceHeader, tmp: Path,
    sha: str, size: int, relative: str, linked: bool, transfer_syntax_uid: str,
    calling_ae: str, association_id: int | None, message_id: int | None,
    patient_secret: bytes,
) -> StoreResult | None:
    """The rows of one store, in one transaction; None when the file name is taken by a store
    that has not committed (``linked`` False and no row)."""

    def repeat(conn: Connection) -> StoreResult | None:
        existing = conn.execute(
            _FIND_INSTANCE, {"sop_uid": header.sop_instance_uid}).one_or_none()
        if existing is None:
            return None
        if linked and (existing.sha256 != sha or existing.path != relative):
            # this link restored the name of a row whose file was gone: not with other
            # bytes, and not under a name no row describes
            (spool.root / relative).unlink(missing_ok=True)
        return _record_repeat(
            conn, spool=spool, header=header, tmp=tmp, sha=sha, size=size,
            existing_sha=existing.sha256, existing_path=existing.path,
            association_id=association_id, message_id=message_id,
        )

    now = utcnow()
    instance_row = dict(
        sop_instance_uid=header.sop_instance_uid, sop_class_uid=header.sop_class_uid,
        transfer_syntax_uid=transfer_syntax_uid, calling_ae=calling_ae,
        association_id=association_id, bytes=size, sha256=sha, path=relative,
        instance_number=header.instance_number, position=header.position,
        orientation=header.orientation, received_at=now)
    receipt_row = dict(
        association_id=association_id, message_id=message_id,
        sop_instance_uid=header.sop_instance_uid, sha256=sha, bytes=size,
        action=StoreAction.CREATE.value, dimse_status=0, received_at=now)
    created = StoreResult(action=StoreAction.CREATE, sha256=sha, path=relative)
    # the name was free, so this UID is new unless its row's file is gone: the instance row's
    # unique index decides that (IntegrityError), not a lookup while the write lock is held
    if linked and file_new_rows(
            factory.kw["bind"], count=_COUNT_INTO_SERIES, instance=_INSERT_INSTANCE,
            receipt=_INSERT_RECEIPT, series_uid=header.series_instance_uid, now=now,
            association_id=association_id, expected_count=header.expected_count,
            instance_row=instance_row, receipt_row=receipt_row):
        return created  # SQLite, a series receiving: on the DB-API cursor (node/rows.py)
    try:
        with write_connection(factory) as conn:
            if not linked:  # the name is taken: a repeat, or a store not yet committed
                return repeat(conn)
            series_id = _upsert_series(
                conn, header=header, calling_ae=calling_ae,
                association_id=association_id, patient_secret=patient_secret, now=now,
            )
            conn.execute(_INSERT_INSTANCE, {**instance_row, "series_id": series_id})
            conn.execute(_INSERT_RECEIPT, receipt_row)
            return created
    except IntegrityError:
        # a row for this UID exists (its file was gone, so the link succeeded): a repeat
        with write_connection(factory) as conn:
            result = repeat(conn)
            if result is None:  # another constraint failed: not a repeat
                raise
            return result


def _unclaim(factory: sessionmaker[Session], spool: Spool, sop_instance_uid: str,
             relative: str) -> None:
    """After a failed transaction: remove the linked file unless a row describes it (a commit
    that failed to answer may still have landed). If the database cannot say, the file stays,
    and the next start sets it aside."""
    try:
        with factory() as session:
            described = session.execute(select(Instance.id).where(
                Instance.sop_instance_uid == sop_instance_uid,
                Instance.path == relative)).first() is not None
    except Exception:
        log.warning("kept %s: could not check for its row", relative)
        return
    if not described:
        (spool.root / relative).unlink(missing_ok=True)


def _upsert_series(
    conn: Connection,
    *,
    header: InstanceHeader,
    calling_ae: str,
    association_id: int | None,
    patient_secret: bytes,
    now: object,
) -> int:
    """Count the instance into its series (one UPDATE on the hot path); returns the series id."""
    row = conn.execute(
        _COUNT_INTO_SERIES,
        {"series_uid": header.series_instance_uid, "now": now, "assoc_id": association_id},
    ).one_or_none()
    if row is None:
        current = conn.execute(
            select(Series.id, Series.state).where(
                Series.series_instance_uid == header.series_instance_uid)
        ).one_or_none()
        if current is None:
            dialect = conn.dialect.name
            ins = pg_insert if dialect == "postgresql" else sqlite_insert
            new_id = conn.execute(
                ins(_SERIES).values(
                    series_instance_uid=header.series_instance_uid,
                    study_instance_uid=header.study_instance_uid,
                    patient_key=patient_key(patient_secret, header.patient_id),
                    modality=header.modality,
                    calling_ae=calling_ae,
                    state=SeriesState.RECEIVING,
                    first_received_at=now,
                    last_received_at=now,
                    last_association_id=association_id,
                    instance_count=1,
                    expected_count=header.expected_count,
                    row_version=1,
                ).on_conflict_do_nothing(index_elements=["series_instance_uid"])
                .returning(Series.id)
            ).scalar_one_or_none()
            if new_id is not None:
                return int(new_id)
            # created concurrently (PostgreSQL): count into it
            return _upsert_series(conn, header=header, calling_ae=calling_ae,
                                  association_id=association_id,
                                  patient_secret=patient_secret, now=now)
        # an instance after completion: reopen the series, with the reason in the log
        counted = {
            "instance_count": Series.instance_count + 1,
            "last_received_at": now,
            "last_association_id": association_id,
            "row_version": Series.row_version + 1,
        }
        conn.execute(
            update(Series).where(Series.id == current.id)
            .values(**counted, state=SeriesState.RECEIVING, completion_reason=None,
                    completed_at=None)
        )
        _record_event(
            conn,
            "series.reopened",
            audit_event_id=AuditEventID.IMPORT,
            outcome=Outcome.MINOR_FAILURE,
            actor=calling_ae,
            series_instance_uid=header.series_instance_uid,
            detail={"previous_state": SeriesState(current.state).value,
                    "reason": "instance after completion"},
        )
        return int(current.id)
    if header.expected_count and not row.expected_count:
        conn.execute(update(Series).where(Series.id == row.id)
                        .values(expected_count=header.expected_count))
    return int(row.id)


def _record_event(conn: Connection, event_type: str, **kwargs: Any) -> None:
    """An audit event in the connection's transaction (the event log's writer is ORM)."""
    with Session(bind=conn) as session:
        record_event(session, event_type, **kwargs)
        session.flush()


def _record_repeat(
    conn: Connection,
    *,
    spool: Spool,
    header: InstanceHeader,
    tmp: Path,
    sha: str,
    size: int,
    existing_sha: str,
    existing_path: str,
    association_id: int | None,
    message_id: int | None,
) -> StoreResult:
    if sha == existing_sha:
        action, path = StoreAction.DUPLICATE, existing_path
    else:
        action = StoreAction.CONFLICT
        path = f"{CONFLICTS}/{_safe_component(header.sop_instance_uid)}.{sha[:16]}.dcm"
        spool.commit_tmp(tmp, path)
    conn.execute(_INSERT_RECEIPT, dict(
        association_id=association_id,
        message_id=message_id,
        sop_instance_uid=header.sop_instance_uid,
        sha256=sha,
        bytes=size,
        action=action.value,
        dimse_status=0,
        received_at=utcnow(),
    ))
    if action is StoreAction.CONFLICT:
        _record_event(
            conn,
            "instance.conflict",
            audit_event_id=AuditEventID.IMPORT,
            outcome=Outcome.MINOR_FAILURE,
            actor="spool",
            series_instance_uid=header.series_instance_uid,
            detail={
                "sop_instance_uid": header.sop_instance_uid,
                "kept_sha256": existing_sha,
                "received_sha256": sha,
                "conflict_path": path,
            },
        )
    return StoreResult(action=action, sha256=sha, path=path)
