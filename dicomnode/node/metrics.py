"""Prometheus metrics, read from the audit database at scrape time.

The database is the one place every receiving process and every worker (on this machine or
another) records into, so the numbers are the node's whole truth, not one process's view.
Counters count rows that are never deleted (receipts, associations, events, jobs), so they
only grow; gauges are current counts. Each scrape runs a handful of aggregate queries.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit.models import (
    Association,
    Delivery,
    DeliveryStatus,
    EventLog,
    Instance,
    InstanceReceipt,
    Job,
    JobStatus,
    Output,
    Series,
    SeriesState,
)

__all__ = ["NodeCollector", "DURATION_BUCKETS"]

# seconds: a job of a few seconds (ct-tissue) up to the hour a large SR4ZCT run may take
DURATION_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


def _histogram(name: str, doc: str, labels: list[str],
               samples: dict[tuple[str, ...], list[float]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for key, values in sorted(samples.items()):
        buckets = [(f"{b:g}", float(sum(v <= b for v in values))) for b in DURATION_BUCKETS]
        buckets.append(("+Inf", float(len(values))))
        family.add_metric(list(key), buckets, sum_value=float(sum(values)))
    return family


class NodeCollector(Collector):
    """Collects every ``dicomnode_*`` metric from the database and the disk."""

    def __init__(self, factory: sessionmaker[Session], var_dir: Path) -> None:
        self.factory = factory
        self.var_dir = var_dir

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("dicomnode_database_up", "1 when the database answered this scrape.")
        try:
            with self.factory() as session:
                families = list(self._from_database(session))
        except Exception:  # the scrape still answers, saying the database did not
            up.add_metric([], 0.0)
            families = []
        else:
            up.add_metric([], 1.0)
        yield up
        yield from families
        yield from self._disk()

    def _from_database(self, session: Session) -> Iterator[Metric]:
        received = CounterMetricFamily(
            "dicomnode_instances_received", "C-STORE requests answered success, by what the "
            "spool did (create, duplicate, conflict).", labels=["action"])
        for action, count in session.execute(
                select(InstanceReceipt.action, func.count()).group_by(InstanceReceipt.action)):
            received.add_metric([action], float(count))
        yield received

        events = dict(session.execute(
            select(EventLog.event_type, func.count()).where(EventLog.event_type.in_(
                ("instance.failed", "series.completed", "delivery.dead", "retention.purged")))
            .group_by(EventLog.event_type)).all())
        for name, event, doc in (
                ("dicomnode_instances_refused", "instance.failed",
                 "C-STORE requests answered with a failure status (each with an audit event)."),
                ("dicomnode_series_completed", "series.completed", "Series found complete."),
                ("dicomnode_dead_letters", "delivery.dead",
                 "Deliveries that ran out of attempts (an alert each)."),
                ("dicomnode_retention_purges", "retention.purged",
                 "Series or job results whose files the retention policy deleted.")):
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], float(events.get(event, 0)))
            yield counter

        assocs = CounterMetricFamily(
            "dicomnode_associations", "Associations by direction (in/out) and whether they were "
            "accepted.", labels=["direction", "result"])
        for direction, accepted, count in session.execute(
                select(Association.direction, Association.accepted, func.count())
                .group_by(Association.direction, Association.accepted)):
            assocs.add_metric([direction, "accepted" if accepted else "rejected"], float(count))
        yield assocs

        series = GaugeMetricFamily("dicomnode_series", "Series by state.", labels=["state"])
        by_state = dict(session.execute(
            select(Series.state, func.count()).group_by(Series.state)).all())
        for state in SeriesState:
            series.add_metric([state.value], float(by_state.get(state, 0)))
        yield series

        jobs = GaugeMetricFamily("dicomnode_jobs", "Jobs by pipeline and status.",
                                 labels=["pipeline", "status"])
        job_counts: dict[tuple[str, Any], int] = {
            (p, s): n for p, s, n in session.execute(
                select(Job.pipeline, Job.status, func.count()).group_by(Job.pipeline, Job.status))}
        for pipeline in sorted({p for p, _ in job_counts}):
            for status in JobStatus:
                jobs.add_metric([pipeline, status.value],
                                float(job_counts.get((pipeline, status), 0)))
        yield jobs
        yield from self._durations(session)
        yield from self._outbox_and_storage(session)

    def _durations(self, session: Session) -> Iterator[Metric]:
        durations: dict[tuple[str, ...], list[float]] = {}
        stages: dict[tuple[str, ...], list[float]] = {}
        for pipeline, started, finished, timings in session.execute(
                select(Job.pipeline, Job.started_at, Job.finished_at, Job.timings)
                .where(Job.status == JobStatus.SUCCEEDED)):
            if started and finished:
                durations.setdefault((pipeline,), []).append(
                    (finished - started).total_seconds())
            for stage, seconds in (timings or {}).items():
                if isinstance(seconds, int | float):
                    stages.setdefault((pipeline, stage), []).append(float(seconds))
        yield _histogram("dicomnode_job_duration_seconds",
                         "Wall time of succeeded jobs, claim to done.", ["pipeline"], durations)
        yield _histogram("dicomnode_job_stage_seconds", "Time per stage of succeeded jobs "
                         "(load, infer, write, ...).", ["pipeline", "stage"], stages)

    def _outbox_and_storage(self, session: Session) -> Iterator[Metric]:
        deliveries = GaugeMetricFamily("dicomnode_deliveries", "Deliveries (one per result "
                                       "instance and destination) by status.", labels=["status"])
        by_status = dict(session.execute(
            select(Delivery.status, func.count()).group_by(Delivery.status)).all())
        for delivery_status in DeliveryStatus:
            deliveries.add_metric([delivery_status.value],
                                  float(by_status.get(delivery_status, 0)))
        yield deliveries

        held = GaugeMetricFamily("dicomnode_stored_bytes", "Bytes on disk as the database "
                                 "records them (files not yet deleted by retention).",
                                 labels=["kind"])
        spool = session.execute(
            select(func.sum(Instance.bytes)).join(Series, Series.id == Instance.series_id)
            .where(Series.purged_at.is_(None))).scalar()
        outputs = session.execute(
            select(func.sum(Output.bytes)).join(Job, Job.id == Output.job_id)
            .where(Job.outputs_purged_at.is_(None))).scalar()
        held.add_metric(["received"], float(spool or 0))
        held.add_metric(["outputs"], float(outputs or 0))
        yield held

    def _disk(self) -> Iterator[Metric]:
        free = GaugeMetricFamily("dicomnode_disk_free_bytes",
                                 "Free space on the filesystem holding var_dir.")
        total = GaugeMetricFamily("dicomnode_disk_total_bytes",
                                  "Size of the filesystem holding var_dir.")
        try:
            usage = shutil.disk_usage(self.var_dir)
        except OSError:
            return
        free.add_metric([], float(usage.free))
        total.add_metric([], float(usage.total))
        yield free
        yield total
