"""Stage times of one series through the loop, read from the audit rows (demo and bench)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicomnode.audit.models import (
    Association,
    Delivery,
    DeliveryStatus,
    Instance,
    Job,
    Output,
    Series,
)

__all__ = ["series_report"]


def series_report(session: Session, series_instance_uid: str) -> dict[str, Any]:
    """Received, completed, jobs, deliveries and the time of each stage (seconds).

    Stages: ``completion`` (sender's association closed -> series complete), ``queue`` (job
    created -> claimed), ``pipeline`` (the run function: read, infer, write), ``record``
    (outputs and deliveries recorded), ``push`` (job done -> last instance acknowledged by the
    destination), and ``total`` (sender closed -> last acknowledgement).
    """
    series = session.execute(
        select(Series).where(Series.series_instance_uid == series_instance_uid)).scalar_one()
    closed = session.execute(
        select(func.max(Association.ended_at)).join(Instance, Instance.association_id == Association.id)
        .where(Instance.series_id == series.id)).scalar_one()
    jobs = session.execute(select(Job).where(Job.series_id == series.id).order_by(Job.id)
                           ).scalars().all()
    rows = session.execute(
        select(Delivery, Output).join(Output, Output.id == Delivery.output_id)
        .join(Job, Job.id == Output.job_id).where(Job.series_id == series.id)).all()
    delivered = [d.delivered_at for d, _ in rows
                 if d.status == DeliveryStatus.DELIVERED and d.delivered_at is not None]
    stages: dict[str, float] = {}
    if closed and series.completed_at:
        stages["completion"] = (series.completed_at - closed).total_seconds()
    if jobs and jobs[0].started_at:
        stages["queue"] = (jobs[0].started_at - jobs[0].created_at).total_seconds()
    timings = (jobs[0].timings or {}) if jobs else {}
    if "pipeline_s" in timings:
        stages["pipeline"] = timings["pipeline_s"]
        for part in ("read_s", "infer_s", "write_s"):
            if f"pipeline.{part}" in timings:
                stages[f"pipeline.{part[:-2]}"] = timings[f"pipeline.{part}"]
    if jobs and jobs[0].finished_at and jobs[0].started_at and "pipeline_s" in timings:
        stages["record"] = max(0.0, (jobs[0].finished_at - jobs[0].started_at).total_seconds()
                               - timings["pipeline_s"])
    if delivered and jobs and jobs[-1].finished_at:
        stages["push"] = (max(delivered) - max(j.finished_at for j in jobs if j.finished_at)
                          ).total_seconds()
    if delivered and closed:
        stages["total"] = (max(delivered) - closed).total_seconds()
    return {
        "series_instance_uid": series.series_instance_uid,
        "study_instance_uid": series.study_instance_uid,
        "instances": series.instance_count,
        "state": series.state.value,
        "completion_reason": series.completion_reason,
        "matched_rules": series.matched_rules,
        "jobs": [{"id": j.id, "pipeline": j.pipeline, "status": j.status.value,
                  "attempts": j.attempts, "error": j.error_detail} for j in jobs],
        "outputs": sorted({(o.kind, o.series_instance_uid, o.path) for _, o in rows}),
        "deliveries": {s.value: sum(1 for d, _ in rows if d.status == s)
                       for s in DeliveryStatus if any(d.status == s for d, _ in rows)},
        "stages_s": stages,
    }
