"""The composition root: builds the engine, spool, receiver, scheduler and executor once.

Everything below is injected from here; nothing connects at import time.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import multiprocessing as mp
import os
import secrets
import signal
import socket
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from prometheus_client.registry import CollectorRegistry
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import __version__
from dicomnode.audit.db import make_engine, make_sessionmaker, migrate, transaction
from dicomnode.audit.events import AuditEventID, Outcome, record_event
from dicomnode.audit.models import (
    Association,
    Delivery,
    DeliveryStatus,
    Instance,
    NodeRun,
    Series,
    utcnow,
)
from dicomnode.files import disk_low, file_sha256
from dicomnode.node.assemble import Assembler
from dicomnode.node.executors import Executor, executor_class
from dicomnode.node.jobs import reclaim_expired
from dicomnode.node.metrics import NodeCollector
from dicomnode.node.push import Pusher
from dicomnode.node.receive import Receiver, open_listeners, serving
from dicomnode.node.retention import purge
from dicomnode.node.schedule import Sweeps, build_scheduler
from dicomnode.node.spool import Spool
from dicomnode.node.web import OpsServer
from dicomnode.pipelines import known_pipelines
from dicomnode.settings import ConfigError, Settings

__all__ = ["Node", "check_pipelines", "open_database", "patient_secret"]

log = logging.getLogger(__name__)

# Start-ups after a crash that may each give a cut job its attempt back (then they count).
RESTART_GRACE = 5


def open_database(settings: Settings, *, upgrade: bool | None = None) -> tuple[Engine, sessionmaker[Session]]:
    """The engine and session factory for the settings' database (migrated when asked)."""
    if upgrade is None:
        upgrade = settings.database.auto_migrate
    if upgrade:
        migrate(settings.database_url)
    engine = make_engine(settings.database_url)
    return engine, make_sessionmaker(engine)


def patient_secret(settings: Settings) -> bytes:
    """The node's key for patient-id hashes (``<var_dir>/secret.key``, created 0600 once)."""
    path = settings.var_dir / "secret.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())


def check_pipelines(settings: Settings) -> dict[str, str]:
    """Every pipeline and model a rule names must exist, and every model directory must load.

    Returns
    -------
    dict[str, str]
        Model name -> version.

    Raises
    ------
    ConfigError
        Naming the rule key, or listing the model directories that fail (missing weights,
        sha256 mismatch, invalid manifest).
    """
    from dicomnode.pipelines.models import scan_models

    known = known_pipelines()
    models, problems = scan_models(settings.models_path)
    if problems:
        raise ConfigError("models: " + "; ".join(problems))
    for index, rule in enumerate(settings.rules):
        for j, name in enumerate(rule.pipelines):
            if name not in known:
                raise ConfigError(
                    f"rules.{index}.pipelines.{j}: unknown pipeline {name!r}; known: {sorted(known)}"
                )
            if set(known[name].roles) != set(rule.requires):
                raise ConfigError(
                    f"rules.{index}.pipelines.{j}: pipeline {name!r} reads "
                    + (f"a study with the roles {list(known[name].roles)}: the rule's "
                       "'requires' must name exactly these" if known[name].roles else
                       "one series: a study rule (requires) cannot run it"))
            if missing := known[name].missing():
                raise ConfigError(
                    f"rules.{index}.pipelines.{j}: pipeline {name!r} needs {', '.join(missing)}, "
                    "not installed here: pip install 'dicomnode[ml]'")
        for pipeline, model in rule.models.items():
            if pipeline not in rule.pipelines:
                raise ConfigError(f"rules.{index}.models.{pipeline}: not one of the rule's "
                                  "pipelines")
            if model not in models:
                raise ConfigError(f"rules.{index}.models.{pipeline}: unknown model {model!r}; "
                                  f"known: {sorted(models)}")
    return {name: entry.manifest.version for name, entry in models.items()}


def _die_with_parent() -> None:
    """Linux: end this process when the node's main process dies, even by kill -9 (an
    orphaned receiver would keep the port and answer associations with nobody to complete
    their series)."""
    parent = os.getppid()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the call
        os._exit(0)


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop``, from a watcher thread. The handlers only note the
    signal: a handler that set the event itself deadlocked when a second signal came while the
    first held the event's lock, and a receiving process orphaned by kill -9 (which ends it
    with SIGTERM) then lived on, holding the port."""
    received: list[int] = []

    def note(signum: int, _frame: object) -> None:
        received.append(signum)

    def watch() -> None:
        while not received:
            time.sleep(0.1)
        stop.set()

    signal.signal(signal.SIGTERM, note)
    signal.signal(signal.SIGINT, note)
    threading.Thread(target=watch, daemon=True, name="dicomnode-signals").start()


def wait_until_set(stop: threading.Event) -> None:
    """Block the main thread until ``stop`` is set, waking every 0.2 s.

    A signal sent to the process runs its Python handler in the main thread, at its next
    bytecode. The kernel hands the signal to another thread when the main one already has a
    signal pending, and a main thread blocked in ``Event.wait()`` without a timeout is then
    never woken: the node ignored SIGTERM (found as a node that did not stop within 60 s in
    ``bench.ingest``; ``tests/test_reactor.py`` sends SIGTERM to a thread that is not the main
    one)."""
    while not stop.wait(0.2):
        pass


def _receiver_process(settings_data: dict[str, Any], index: int, ready: Any,
                      closed: Any, shared: list[socket.socket]) -> None:
    """An extra receiving process accepting on the main process's listening sockets; it
    tells the main process through ``closed`` when an association ends, so completion acts at
    once there too."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s recv-{index} %(message)s")
    _die_with_parent()
    settings = Settings.model_validate(settings_data)
    engine, factory = open_database(settings, upgrade=False)
    receiver = Receiver(settings=settings, factory=factory, spool=Spool(settings.spool_dir),
                        patient_secret=patient_secret(settings),
                        on_association_closed=lambda: closed.put(index))
    done = threading.Event()
    stop_on_signals(done)
    with serving(receiver, settings, shared=shared):
        ready.release()
        wait_until_set(done)
    engine.dispose()


class Node:
    """A running node: receive, sweeps (completion, leases, delivery) and workers.

    Parameters
    ----------
    settings
        Validated settings.
    config_sha256
        Hash of the config file, recorded in ``node_run``.
    """

    def __init__(self, settings: Settings, *, config_sha256: str = "") -> None:
        model_versions = check_pipelines(settings)
        self.settings = settings
        self.config_sha256 = config_sha256 or hashlib.sha256(
            settings.model_dump_json().encode()
        ).hexdigest()
        settings.var_dir.mkdir(parents=True, exist_ok=True)
        self.engine, self.factory = open_database(settings)
        self.spool = Spool(settings.spool_dir)
        settings.output_dir.mkdir(parents=True, exist_ok=True)
        self.assembler = Assembler(settings=settings, factory=self.factory,
                                   model_versions=model_versions,
                                   config_sha256=self.config_sha256)
        self.pusher = Pusher(settings=settings, factory=self.factory)
        self.sweeps = sweeps = Sweeps()
        sweeps.add("completion", self.assembler.sweep, settings.schedule.completion_sweep_s)
        sweeps.add("leases", lambda: reclaim_expired(self.factory),
                   settings.schedule.dispatch_sweep_s)
        sweeps.add("delivery", self.pusher.sweep, settings.schedule.delivery_sweep_s)
        sweeps.add("workers", lambda: self.executor.supervise(), settings.schedule.dispatch_sweep_s)
        sweeps.add("dispatch", lambda: self.executor.dispatch(), settings.executor.poll_interval_s)
        sweeps.add("retention", lambda: purge(self.factory, settings,
                                              actor=settings.node.ae_title),
                   settings.retention.sweep_s)
        self.scheduler = build_scheduler(sweeps)
        self.registry = CollectorRegistry()
        self.registry.register(NodeCollector(self.factory, settings.var_dir))
        self._servers: list[Any] = []
        self.receiver = Receiver(
            settings=settings, factory=self.factory, spool=self.spool,
            patient_secret=patient_secret(settings),
            on_association_closed=lambda: sweeps.run_soon("completion"),
        )
        self.executor: Executor = executor_class(settings.executor.kind)(settings,
                                                                         factory=self.factory)
        self._run_id: int | None = None
        self._extra_receivers: list[BaseProcess] = []

    def _reconcile_spool(self) -> tuple[int, int]:
        """Files without rows go to ``orphans/``; rows whose file is gone raise an alert.
        Returns (files set aside, instances missing)."""
        with self.factory() as session:
            # instances whose files the retention policy deleted are expected to be gone
            recorded = dict(session.execute(
                select(Instance.path, Instance.sop_instance_uid)
                .join(Series, Series.id == Instance.series_id)
                .where(Series.purged_at.is_(None))).all())
            recorded_anywhere = set(session.execute(select(Instance.path)).scalars())
        orphans = self.spool.unrecorded(recorded_anywhere)
        moved = [self.spool.set_aside(p) for p in orphans]
        missing = sorted(uid for path, uid in recorded.items()
                         if not (self.spool.root / path).exists())
        if moved or missing:
            with transaction(self.factory) as session:
                record_event(
                    session, "spool.reconciled",
                    audit_event_id=AuditEventID.APPLICATION_ACTIVITY,
                    outcome=Outcome.SERIOUS_FAILURE if missing else Outcome.MINOR_FAILURE,
                    actor=self.settings.node.ae_title,
                    detail={"alert": bool(missing), "set_aside": moved[:100],
                            "missing_sop_instance_uids": missing[:100],
                            "counts": {"set_aside": len(moved), "missing": len(missing)}})
        return len(moved), len(missing)

    def _reconcile(self) -> None:
        """Start-up reconciliation after a crash or a stop (AUDIT.md)."""
        removed = self.spool.clean_tmp()
        orphans, missing = self._reconcile_spool()
        # local workers are this node's children: any RUNNING job is an orphan now; remote
        # (celery) workers may still be running theirs, so only expired leases count
        # (an attempt cut by the node's own death is given back, up to RESTART_GRACE times)
        requeued = reclaim_expired(
            self.factory, all_running=self.executor.claims_locally,
            restart_cap=self.settings.executor.max_attempts + RESTART_GRACE)
        with transaction(self.factory) as session:
            crashed = session.execute(
                select(NodeRun.id).where(NodeRun.stopped_at.is_(None))
            ).scalars().all()
            session.execute(update(NodeRun).where(NodeRun.id.in_(crashed)).values(
                stopped_at=utcnow(), stop_reason="crash detected at next start"))
            # associations of the crashed run never ended: close them as crashed (not
            # "released": a crashed sender is never taken as finished, so their series still
            # complete by the quiet period, after the sender has had time to send again)
            closed = session.execute(
                update(Association).where(Association.ended_at.is_(None))
                .values(ended_at=utcnow(), end_reason="crashed")
            ).rowcount  # type: ignore[attr-defined]
            resumed = session.execute(
                update(Delivery).where(Delivery.status == DeliveryStatus.SENDING)
                .values(status=DeliveryStatus.RETRY, next_attempt_at=utcnow())
            ).rowcount  # type: ignore[attr-defined]
            run = NodeRun(node_ae_title=self.settings.node.ae_title, software_version=__version__,
                          config_sha256=self.config_sha256, pid=os.getpid())
            session.add(run)
            session.flush()
            self._run_id = run.id
            record_event(
                session, "node.started", audit_event_id=AuditEventID.APPLICATION_ACTIVITY,
                outcome=Outcome.MINOR_FAILURE if crashed else Outcome.SUCCESS,
                actor=self.settings.node.ae_title,
                detail={"run_id": run.id, "version": __version__, "crashed_runs": list(crashed),
                        "tmp_removed": removed, "orphans_set_aside": orphans,
                        "instances_missing": missing, "jobs_requeued": requeued,
                        "deliveries_resumed": resumed, "associations_closed": closed, "host": socket.gethostname()},
            )

    def health(self) -> tuple[bool, dict[str, Any]]:
        """``/healthz``: the database answers, every receiver listens, the disk has room; it
        also says whether the local workers have started (not part of ``healthy``)."""
        checks: dict[str, Any] = {}
        try:
            with self.factory() as session:
                session.execute(select(1))
            checks["database"] = "ok"
        except Exception as exc:  # any failure to answer is the finding
            checks["database"] = f"unreachable: {type(exc).__name__}"
        listening = bool(self._servers) and all(s.socket.fileno() >= 0 for s in self._servers) \
            and all(p.is_alive() for p in self._extra_receivers)
        checks["receiver"] = "listening" if listening else "not listening"
        free = disk_low(self.settings.var_dir, self.settings.node.min_free_disk_mb)
        checks["disk"] = "ok" if free is None else \
            f"{free:.0f} MB free, below node.min_free_disk_mb"
        if self.executor.claims_locally:
            # starting workers (importing torch) do not make the node unhealthy: receiving
            # does not wait for them, and their jobs wait in the queue
            total, ready = self.settings.executor.workers, self.executor.ready()
            checks["workers"] = "ready" if ready >= total else f"{ready} of {total} ready"
        healthy = checks["database"] == "ok" and listening and free is None
        return healthy, checks

    def _forward_closes(self, closed: Any) -> None:
        """Bring the completion sweep forward when another receiving process's association
        ends (``None`` ends the thread)."""
        while closed.get() is not None:
            self.sweeps.run_soon("completion")

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set, then shut down in order (stop accepting first)."""
        self._reconcile()
        self.executor.start()
        self.scheduler.start()
        count = self.settings.node.receive_process_count
        shared = open_listeners(self.settings) if count > 1 else None
        closed = None
        if shared:
            ctx = mp.get_context("spawn")
            data = self.settings.model_dump(mode="json")
            ready = ctx.Semaphore(0)
            closed = ctx.SimpleQueue()
            threading.Thread(target=self._forward_closes, args=(closed,), daemon=True,
                             name="dicomnode-closes").start()
            for i in range(1, count):
                proc = ctx.Process(target=_receiver_process,
                                   args=(data, i, ready, closed, shared), daemon=True)
                proc.start()
                self._extra_receivers.append(proc)
            for _ in self._extra_receivers:  # report "listening" only when all of them are
                if not ready.acquire(timeout=120):
                    raise RuntimeError("a receiving process did not start")
        http = self.settings.http
        ops = None if http.port is None else OpsServer(
            host=http.host, port=http.port, factory=self.factory, registry=self.registry,
            health=self.health, ae_title=self.settings.node.ae_title).start()
        try:
            with serving(self.receiver, self.settings, shared=shared) as servers:
                self._servers = servers
                log.info("dicomnode %s listening on %s:%s as %s", __version__,
                         self.settings.node.host, self.settings.node.port,
                         self.settings.node.ae_title)
                tls = self.settings.node.tls
                print(f"listening on {self.settings.node.host}:{self.settings.node.port} "
                      f"as {self.settings.node.ae_title}"
                      + (" (TLS)" if tls and tls.port is None else "")
                      + (f"; TLS on port {tls.port}" if tls and tls.port else "")
                      + (f"; status page http://{http.host}:{ops.port}/" if ops else ""),
                      flush=True)
                wait_until_set(stop)
        finally:
            self._servers = []
            if ops is not None:
                ops.stop()
            for extra in self._extra_receivers:
                if extra.pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(extra.pid, signal.SIGTERM)
            for extra in self._extra_receivers:
                extra.join(60)
            if closed is not None:
                closed.put(None)
            self.sweeps.stop()
            self.scheduler.shutdown(wait=True)
            self.executor.stop()
            with transaction(self.factory) as session:
                session.execute(update(NodeRun).where(NodeRun.id == self._run_id).values(
                    stopped_at=utcnow(), stop_reason="signal"))
                record_event(session, "node.stopped",
                             audit_event_id=AuditEventID.APPLICATION_ACTIVITY,
                             actor=self.settings.node.ae_title, detail={"run_id": self._run_id})
            self.engine.dispose()


def config_sha256(path: Path | None) -> str:
    """sha256 of a config file's bytes ('' for the embedded defaults)."""
    return file_sha256(path) if path else ""
