"""Engine and sessions: SQLite (WAL, synchronous=FULL) by default, PostgreSQL in production.

Built once in :mod:`dicomnode.app` (or a CLI command) and injected; nothing connects at import.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import resources

__all__ = ["make_engine", "make_sessionmaker", "transaction", "write_connection", "migrate"]




class WriteLock:
    """Serialises SQLite writers: a thread lock, then ``flock`` on ``<db>.writelock``.

    SQLite's own busy handler sleep-polls (1 ms up to 100 ms per retry), so writers from
    several threads or receiving processes waste most of their time asleep. Queuing on a
    kernel file lock wakes the next writer as soon as the previous commit is done.
    """

    def __init__(self, path: Path) -> None:
        self._thread_lock = threading.Lock()
        self._path = path
        self._fd: int | None = None
        self._pid = -1

    def __enter__(self) -> WriteLock:
        self._thread_lock.acquire()
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            self._pid = os.getpid()
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._fd is not None
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """Create the engine for ``url`` with the settings this node relies on.

    For SQLite: WAL journal with ``synchronous=FULL`` (a committed receipt survives a power
    cut), foreign keys on, a 30 s busy timeout, and pysqlite's implicit transactions replaced by
    ``BEGIN IMMEDIATE`` so that concurrent writers (receivers, workers) queue instead of failing
    on a lock upgrade.

    Parameters
    ----------
    url
        SQLAlchemy URL.
    echo
        Log SQL statements.
    """
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, echo=echo, connect_args={"timeout": 30, "check_same_thread": False}
        )

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # writers (see transaction()) take the write lock at once; readers never block
            # anyone in WAL mode, so they start a plain deferred transaction
            write = conn.get_execution_options().get("dicomnode_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        if path and path != ":memory:":
            engine.dicomnode_write_lock = WriteLock(Path(path + ".writelock"))  # type: ignore[attr-defined]
        return engine
    return create_engine(url, echo=echo, pool_pre_ping=True, pool_size=10, max_overflow=20)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """A session factory whose objects stay readable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work that writes: commit on success, roll back on any exception.

    On SQLite it holds the engine's :class:`WriteLock` and uses ``BEGIN IMMEDIATE``; sessions
    opened directly from the factory are for reading only.
    """
    engine = factory.kw.get("bind")
    lock = getattr(engine, "dicomnode_write_lock", None)
    if lock is None:
        with factory() as session, session.begin():
            yield session
        return
    with lock, factory() as session, session.begin():
        session.connection(execution_options={"dicomnode_write": True})
        yield session


@contextmanager
def write_connection(factory: sessionmaker[Session]) -> Iterator[Connection]:
    """:func:`transaction` without the ORM session: one Core connection in one write
    transaction, for the receive path's plain statements (the session's bookkeeping cost
    ~0.5 ms per instance there). ``Session(bind=conn)`` joins it where ORM objects are needed.
    """
    engine = factory.kw["bind"]
    lock = getattr(engine, "dicomnode_write_lock", None)
    if lock is None:
        with engine.begin() as conn:
            yield conn
        return
    with lock, engine.connect() as conn:
        conn.execution_options(dicomnode_write=True)
        with conn.begin():
            yield conn


def alembic_config(url: str) -> Any:
    """An Alembic config pointing at ``db/`` for ``url``."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(resources.shipped("db")))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision``."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Downgrade the database at ``url`` to ``revision``."""
    from alembic import command

    command.downgrade(alembic_config(url), revision)
