"""``dicomnode trace UID``: from any Study, Series or SOP Instance UID of an input or an output,
the chain input series -> rule -> job -> model and weights -> outputs -> deliveries, read from
the audit database (nothing else is consulted)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from dicomnode.audit.models import Delivery, Instance, Job, Output, Series

__all__ = ["format_trace", "trace"]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _input_series_ids(session: Session, uid: str) -> tuple[str, set[int]]:
    """What ``uid`` is, and the ids of the input series it leads to."""
    rows = session.execute(select(Series.id, Series.study_instance_uid).where(or_(
        Series.series_instance_uid == uid, Series.study_instance_uid == uid))).all()
    if rows:
        study = any(r.study_instance_uid == uid for r in rows)
        return ("input study" if study else "input series"), {r.id for r in rows}
    by_instance = set(session.execute(
        select(Instance.series_id).where(Instance.sop_instance_uid == uid)).scalars())
    if by_instance:
        return "input instance", by_instance
    by_output = set(session.execute(
        select(Job.series_id).join(Output, Output.job_id == Job.id).where(or_(
            Output.sop_instance_uid == uid, Output.series_instance_uid == uid))).scalars())
    if by_output:
        return "output", by_output
    return "unknown", set()


def _job(session: Session, job: Job) -> dict[str, Any]:
    outputs = session.execute(select(Output).where(Output.job_id == job.id)
                              .order_by(Output.kind, Output.index)).scalars().all()
    deliveries = session.execute(
        select(Delivery).where(Delivery.output_id.in_([o.id for o in outputs]))
        .order_by(Delivery.id)).scalars().all() if outputs else []
    by_output: dict[int, list[dict[str, Any]]] = {}
    for d in deliveries:
        by_output.setdefault(d.output_id, []).append({
            "destination": d.destination, "peer": f"{d.ae_title}@{d.host}:{d.port}",
            "status": d.status.value, "attempts": d.attempts,
            "last_dimse_status": d.last_dimse_status, "delivered_at": _iso(d.delivered_at)})
    return {
        "job_id": job.id, "rule": job.rule_name, "pipeline": job.pipeline,
        "pipeline_version": job.pipeline_version, "status": job.status.value,
        "attempts": job.attempts, "device": job.device, "timings": job.timings,
        "started_at": _iso(job.started_at), "finished_at": _iso(job.finished_at),
        "error": job.error_code, "model": job.model_name, "model_version": job.model_version,
        "weights_sha256": job.weights_sha256, "config_sha256": job.config_sha256,
        "input_sha256": job.input_sha256,
        "outputs": [{"kind": o.kind, "index": o.index, "sop_instance_uid": o.sop_instance_uid,
                     "series_instance_uid": o.series_instance_uid, "sha256": o.sha256,
                     "deliveries": by_output.get(o.id, [])} for o in outputs],
    }


def trace(session: Session, uid: str) -> dict[str, Any]:
    """The provenance chain of ``uid`` (a Study, Series or SOP Instance UID, input or output).

    Returns
    -------
    dict
        ``{"uid", "found_as", "series": [...]}``; each input series with its jobs, each job
        with its model, weights sha256, outputs and their deliveries. ``found_as`` is
        ``"unknown"`` (and ``series`` empty) when the audit trail does not know the UID.
    """
    found_as, series_ids = _input_series_ids(session, uid)
    result: dict[str, Any] = {"uid": uid, "found_as": found_as, "series": []}
    for series in session.execute(select(Series).where(Series.id.in_(series_ids))
                                  .order_by(Series.id)).scalars():
        jobs = session.execute(select(Job).where(Job.series_id == series.id)
                               .order_by(Job.id)).scalars().all()
        result["series"].append({
            "series_instance_uid": series.series_instance_uid,
            "study_instance_uid": series.study_instance_uid, "modality": series.modality,
            "calling_ae": series.calling_ae, "instances": series.instance_count,
            "state": series.state.value, "completed_at": _iso(series.completed_at),
            "completion_reason": series.completion_reason,
            "matched_rules": series.matched_rules or [],
            "jobs": [_job(session, job) for job in jobs],
        })
    return result


def format_trace(chain: dict[str, Any]) -> str:
    """The chain as indented text, one fact a line."""
    if not chain["series"]:
        return f"{chain['uid']}: not in the audit trail"
    lines = [f"{chain['uid']} ({chain['found_as']})"]
    for s in chain["series"]:
        lines.append(f"input series {s['series_instance_uid']} ({s['modality']}, "
                     f"{s['instances']} instances from {s['calling_ae']}), {s['state']}; "
                     f"complete: {s['completion_reason']}")
        for j in s["jobs"]:
            lines.append(f"  rule {j['rule']} -> job {j['job_id']} {j['pipeline']} "
                         f"{j['pipeline_version']}: {j['status']} after {j['attempts']} "
                         f"attempt(s) on {j['device']}")
            if j["model"]:
                lines.append(f"    model {j['model']} {j['model_version']}, weights sha256 "
                             f"{j['weights_sha256']}")
            if j["timings"]:
                lines.append("    timings: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in sorted(j["timings"].items())))
            lines.append(f"    config sha256 {j['config_sha256']}")
            for o in j["outputs"]:
                sent = "; ".join(f"{d['destination']} {d['status']} ({d['attempts']} attempt(s))"
                                 for d in o["deliveries"]) or "not delivered"
                lines.append(f"    output {o['kind']} {o['index']} {o['sop_instance_uid']}: "
                             f"{sent}")
    return "\n".join(lines)
