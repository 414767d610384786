"""The ``celery`` executor: jobs run in ``dicomnode worker`` processes on any machine that
reaches RabbitMQ, the database and the shared storage.

The database job row stays the source of truth; a broker message carries only the job id.

* The node publishes each due QUEUED job's current attempt once (``jobs.publish_due``), on
  the queue the config names for its pipeline.
* A worker claims the row named by the message with a locked update of a QUEUED row
  (``jobs.claim_job``), renews the lease while the pipeline runs, and writes outputs,
  deliveries and the job's end in one transaction (``worker.run_claimed_job``). A message
  delivered twice finds the row no longer QUEUED and is dropped: no second run.
* A worker killed mid-job stops renewing its lease; the node's lease sweep puts the job back
  to QUEUED, and the next publish hands it to another worker. After ``max_attempts`` the job
  ends DEAD with the reason, and the queue keeps serving the others.
* Celery: ``task_acks_late``, ``worker_prefetch_multiplier=1``, ``task_reject_on_worker_lost``,
  one job at a time per worker (a prefork pool of one child, which keeps its models loaded
  between jobs and is replaced when a job kills it).
  RabbitMQ quorum queues with a delivery limit and a dead-letter queue (``<queue>.dead``),
  so a message that kills worker after worker ends there instead of circulating. RabbitMQ's
  consumer timeout (30 min by default; a broker setting before RabbitMQ 3.12) must exceed
  the longest job, or the broker re-delivers a running job's message; the re-delivery is then
  dropped by the claim, and the running worker finishes (docs/deployment.md).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from dicomnode.node.executors.base import Executor
from dicomnode.node.jobs import claim_job, publish_due
from dicomnode.settings import Settings

__all__ = ["TASK", "CeleryExecutor", "make_app", "run_worker"]

log = logging.getLogger(__name__)

TASK = "dicomnode.run_job"
DEAD_EXCHANGE = "dicomnode.dead"


def _queues(settings: Settings) -> list[Any]:
    """Every configured job queue (quorum, delivery limit, dead-lettered) and its dead queue."""
    from kombu import Exchange, Queue

    cfg = settings.executor.celery
    names = sorted({cfg.queue, *cfg.queues.values()})
    exchange = Exchange("dicomnode", type="direct", durable=True)
    dead = Exchange(DEAD_EXCHANGE, type="direct", durable=True)
    queues = []
    for name in names:
        queues.append(Queue(name, exchange, routing_key=name, durable=True, queue_arguments={
            "x-queue-type": "quorum", "x-delivery-limit": cfg.delivery_limit,
            "x-dead-letter-exchange": DEAD_EXCHANGE, "x-dead-letter-routing-key": f"{name}.dead"}))
        queues.append(Queue(f"{name}.dead", dead, routing_key=f"{name}.dead", durable=True,
                            queue_arguments={"x-queue-type": "quorum"}))
    return queues


def make_app(settings: Settings, *, run: Callable[[int], None] | None = None) -> Any:
    """The Celery app of the node (publisher, ``run`` None) or of a worker (``run`` runs a job
    id). No connection is made here."""
    from celery import Celery

    cfg = settings.executor.celery
    app = Celery("dicomnode", broker=cfg.broker_url, set_as_current=False)
    app.conf.update(
        task_queues=_queues(settings), task_default_queue=cfg.queue,
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        task_serializer="json", accept_content=["json"], task_ignore_result=True,
        broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
        worker_enable_remote_control=True, task_create_missing_queues=False,
    )

    @app.task(name=TASK, ignore_result=True)  # type: ignore[untyped-decorator]
    def run_job(job_id: int) -> None:
        if run is None:
            raise RuntimeError("this process only publishes jobs")
        run(int(job_id))

    return app


def queue_for(settings: Settings, pipeline: str) -> str:
    """The queue a pipeline's jobs go to."""
    cfg = settings.executor.celery
    return cfg.queues.get(pipeline, cfg.queue)


def declare(app: Any, settings: Settings) -> None:
    """Declare every queue (with its arguments) and dead-letter queue on the broker."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for queue in _queues(settings):
            queue.bind(channel).declare()


class CeleryExecutor(Executor):
    """Publishes due jobs to RabbitMQ; ``dicomnode worker`` processes run them."""

    def __init__(self, settings: Settings, *,
                 factory: sessionmaker[Session] | None = None) -> None:
        super().__init__(settings, factory=factory)
        self.app: Any = None

    def start(self) -> None:  # noqa: D102
        self.app = make_app(self.settings)
        declare(self.app, self.settings)

    def dispatch(self) -> int:
        """Publish every due job's current attempt; returns how many."""
        if self.app is None or self.factory is None:
            return 0
        app, settings = self.app, self.settings

        def publish(job_id: int, pipeline: str) -> None:
            app.send_task(TASK, args=[job_id], queue=queue_for(settings, pipeline))

        return publish_due(self.factory, publish)

    @property
    def claims_locally(self) -> bool:  # noqa: D102
        return False  # workers run elsewhere: a RUNNING job at start-up may be alive

    def stop(self, *, timeout_s: float = 30.0) -> None:  # noqa: D102
        if self.app is not None:
            self.app.close()
            self.app = None

    def alive(self) -> int:
        """Workers answering a ping (they may serve other nodes' queues too)."""
        if self.app is None:
            return 0
        return len(self.app.control.ping(timeout=1.0) or [])


def run_worker(settings: Settings, *, device: str | None = None,
               queues: list[str] | None = None, name: str | None = None) -> None:
    """Run one worker until SIGTERM: consume job ids from ``queues`` (default: all configured),
    claim and run each job here on ``device``."""
    from dicomnode.audit.db import make_engine, make_sessionmaker
    from dicomnode.node.executors.worker import run_claimed_job
    from dicomnode.pipelines.base import resolve_device

    device = resolve_device(device or settings.executor.device)
    per_process: dict[int, sessionmaker[Session]] = {}  # engines never cross a fork

    def run(job_id: int) -> None:
        pid = os.getpid()
        if pid not in per_process:
            per_process.clear()
            per_process[pid] = make_sessionmaker(make_engine(settings.database_url))
        factory, owner = per_process[pid], f"{socket.gethostname()}:{pid}:celery"
        job = claim_job(factory, owner=owner, lease_s=settings.executor.lease_s, device=device,
                        job_id=job_id)
        if job is None:
            log.warning("job %s is not waiting to run (done, or running elsewhere): message "
                        "dropped", job_id)
            return
        run_claimed_job(job, settings=settings, factory=factory, owner=owner, device=device)

    app = make_app(settings, run=run)
    declare(app, settings)
    wanted = queues or sorted({settings.executor.celery.queue,
                               *settings.executor.celery.queues.values()})
    # prefork with one child: a job that kills its process (OOM, a crash in native code) costs
    # that child only; the worker starts a new one and keeps consuming
    app.worker_main(argv=["worker", "--pool=prefork", "--concurrency=1", "--loglevel=INFO",
                          f"--queues={','.join(wanted)}", "--without-gossip", "--without-mingle",
                          f"--hostname={name or f'dicomnode-{os.getpid()}'}@%h"])
