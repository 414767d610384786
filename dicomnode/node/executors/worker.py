"""One job run inside a worker: inputs -> pipeline -> outputs and deliveries, all recorded."""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit.db import transaction
from dicomnode.audit.events import AuditEventID, Outcome, record_event
from dicomnode.audit.models import (
    Delivery,
    Instance,
    Job,
    JobInput,
    JobSeries,
    JobStatus,
    Output,
    OutputState,
    Series,
    SeriesState,
)
from dicomnode.files import file_sha256
from dicomnode.node.jobs import ClaimedJob, claim_job, finish_job, heartbeat
from dicomnode.pipelines import OutputFile, PipelineRefusal, get_pipeline, job_context
from dicomnode.pipelines.base import resolve_device
from dicomnode.settings import Settings

__all__ = ["run_claimed_job", "work_loop"]

log = logging.getLogger(__name__)


def _record_outputs(
    session: Session, *, settings: Settings, job: ClaimedJob, outputs: list[OutputFile],
    calling_ae: str | None,
) -> int:
    root = settings.output_dir
    deliveries = 0
    for out in outputs:
        existing = session.execute(
            select(Output).where(Output.sop_instance_uid == out.sop_instance_uid)
        ).scalar_one_or_none()
        rel = str(Path(out.path).resolve().relative_to(root.resolve()))
        if existing is None:
            existing = Output(
                job_id=job.id, kind=out.kind, index=out.index, sop_class_uid=out.sop_class_uid,
                sop_instance_uid=out.sop_instance_uid,
                series_instance_uid=out.series_instance_uid, path=rel,
            )
            session.add(existing)
        existing.path = rel
        existing.sha256 = file_sha256(Path(out.path))
        existing.bytes = Path(out.path).stat().st_size
        existing.state = OutputState.WRITTEN
        session.flush()
        for name in job.destinations:
            dest_name = name
            if name == "CALLING_AE":
                dest_name = next(
                    (n for n, d in settings.destinations.items() if d.ae_title == calling_ae), ""
                )
                if not dest_name:
                    continue
            dest = settings.destinations[dest_name]
            have = session.execute(
                select(Delivery.id).where(
                    Delivery.output_id == existing.id, Delivery.destination == dest_name
                )
            ).scalar_one_or_none()
            if have is None:
                session.add(Delivery(
                    output_id=existing.id, destination=dest_name, ae_title=dest.ae_title,
                    host=dest.host, port=dest.port,
                ))
                deliveries += 1
    return deliveries


def _job_series_ids(session: Session, job_id: int, primary: int) -> list[int]:
    """The series a job reads: its own, and for a study job every series in its roles."""
    others = session.execute(select(JobSeries.series_id).where(JobSeries.job_id == job_id)
                             ).scalars().all()
    return [primary, *sorted(set(others) - {primary})]


def _settle_series(session: Session, job_id: int, primary: int) -> None:
    """Mark each series the job read DONE / FAILED once no job reading it is pending."""
    for series_id in _job_series_ids(session, job_id, primary):
        as_companion = select(JobSeries.job_id).where(JobSeries.series_id == series_id)
        statuses = set(session.execute(select(Job.status).where(
            or_(Job.series_id == series_id, Job.id.in_(as_companion)))).scalars())
        if statuses & {JobStatus.QUEUED, JobStatus.RUNNING}:
            continue
        state = SeriesState.DONE if statuses <= {JobStatus.SUCCEEDED} else SeriesState.FAILED
        session.execute(
            update(Series).where(Series.id == series_id, Series.state == SeriesState.ROUTED)
            .values(state=state, row_version=Series.row_version + 1)
        )


def _job_inputs(factory: sessionmaker[Session], job: ClaimedJob
                ) -> tuple[list[Any], str | None, dict[str, tuple[int, ...]]]:
    """The instances of the series the job reads (recorded as the job's inputs), the AE title
    that sent its series, and for a study job the series id of each role."""
    with transaction(factory) as session:
        series_ids = _job_series_ids(session, job.id, job.series_id)
        inputs = list(session.execute(
            select(Instance.id, Instance.path, Instance.series_id)
            .where(Instance.series_id.in_(series_ids))
            .order_by(Instance.series_id, Instance.instance_number, Instance.id)
        ).all())
        have = set(session.execute(
            select(JobInput.instance_id).where(JobInput.job_id == job.id)
        ).scalars())
        session.add_all(JobInput(job_id=job.id, instance_id=i.id) for i in inputs if i.id not in have)
        calling_ae = session.execute(
            select(Series.calling_ae).where(Series.id == job.series_id)
        ).scalar_one()
        roles: dict[str, tuple[int, ...]] = {role: (sid,) for role, sid in session.execute(
            select(JobSeries.role, JobSeries.series_id).where(JobSeries.job_id == job.id))}
    return inputs, calling_ae, roles


def _seg_type(settings: Settings, job: ClaimedJob) -> str:
    """The SEG flavour of the job's first known destination (BINARY when none)."""
    for name in job.destinations:
        dest = settings.destinations.get(name)
        if dest is not None:
            return dest.seg_type
    return "BINARY"


def _exit_if_orphaned(job_id: int, *, held: bool, parent_pid: int | None) -> None:
    """End this process when its work can no longer count: the job's lease went to another
    worker (this run's result would be refused at the end), or the node that started this
    worker is gone (a restarted node would run the job beside it). The lease sweep hands the
    job on; the executor starts a new worker."""
    if not held:
        log.error("job %s: lease lost to another worker; this worker process stops", job_id)
        os._exit(3)
    if parent_pid is not None and os.getppid() != parent_pid:
        log.error("job %s: node process %s is gone; this worker process stops", job_id,
                  parent_pid)
        os._exit(3)


def run_claimed_job(
    job: ClaimedJob, *, settings: Settings, factory: sessionmaker[Session], owner: str,
    device: str, parent_pid: int | None = None,
) -> JobStatus:
    """Run one claimed job to its end state, keeping its lease alive meanwhile (and ending
    this process if the lease is lost or ``parent_pid``, the node, dies)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    inputs, calling_ae, roles = _job_inputs(factory, job)
    seg_type = _seg_type(settings, job)
    progress = {"value": 0.0}
    stop = threading.Event()

    def beat() -> None:
        # often enough for `dicomnode status` to show progress, well inside the lease
        interval = max(0.2, min(2.0, settings.executor.lease_s / 4))
        while not stop.wait(interval):
            try:
                held = heartbeat(factory, job_id=job.id, owner=owner,
                                 lease_s=settings.executor.lease_s, progress=progress["value"])
            except Exception:
                log.exception("heartbeat failed for job %s", job.id)
                continue
            if not stop.is_set():  # a job that just ended is no longer ours: that is fine
                _exit_if_orphaned(job.id, held=held, parent_pid=parent_pid)

    beater = threading.Thread(target=beat, name=f"lease-{job.id}", daemon=True)
    beater.start()
    output_dir = settings.output_dir / str(job.id)
    spec = get_pipeline(job.pipeline)
    ctx = job_context(
        settings, spec, job_id=job.id, series_instance_uid=job.series_instance_uid,
        input_files=tuple(settings.spool_dir / i.path for i in inputs),
        series_roles={role: tuple(settings.spool_dir / i.path for i in inputs
                                  if i.series_id in ids) for role, ids in roles.items()},
        output_dir=output_dir, device=device, seg_type=seg_type, model=job.model_name,
        progress=lambda f: progress.__setitem__("value", float(f)),
    )
    timings["load_inputs_s"] = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        outputs = spec.load()(ctx)
        timings["pipeline_s"] = time.perf_counter() - t1
        timings.update({f"pipeline.{k}": v for k, v in ctx.timings.items()})
    except PipelineRefusal as refusal:
        stop.set()
        with transaction(factory) as session:
            status = finish_job(session, job_id=job.id, owner=owner, succeeded=False,
                                retryable=False, error_code=refusal.code,
                                error_detail=refusal.reason, timings=timings)
            record_event(
                session, "pipeline.refused", audit_event_id=AuditEventID.APPLICATION_ACTIVITY,
                outcome=Outcome.MINOR_FAILURE, actor=owner[:64],
                series_instance_uid=job.series_instance_uid,
                detail={"job_id": job.id, "code": refusal.code, "reason": refusal.reason},
            )
            _settle_series(session, job.id, job.series_id)
        return status
    except Exception as exc:
        stop.set()
        log.exception("job %s (%s) failed", job.id, job.pipeline)
        with transaction(factory) as session:
            status = finish_job(session, job_id=job.id, owner=owner, succeeded=False,
                                error_code=type(exc).__name__, error_detail=str(exc)[:500],
                                timings=timings, backoff_s=settings.executor.retry_backoff_s,
                                backoff_max_s=settings.executor.retry_backoff_max_s)
            _settle_series(session, job.id, job.series_id)
        return status
    stop.set()
    timings["total_s"] = time.perf_counter() - t0
    return _record_success(factory, settings=settings, job=job, owner=owner, outputs=outputs,
                           calling_ae=calling_ae, used=ctx.model_used, timings=timings)


def _record_success(
    factory: sessionmaker[Session], *, settings: Settings, job: ClaimedJob, owner: str,
    outputs: list[OutputFile], calling_ae: str | None, used: dict[str, str],
    timings: dict[str, float],
) -> JobStatus:
    """Outputs, deliveries, the model and weights that ran, and the job's end, in one
    transaction."""
    with transaction(factory) as session:
        n = _record_outputs(session, settings=settings, job=job, outputs=outputs,
                            calling_ae=calling_ae)
        if used and job.model_name is None:  # the pipeline chose: the job says which
            session.execute(update(Job).where(Job.id == job.id).values(
                model_name=used["name"][:64], model_version=used["version"][:32]))
        status = finish_job(session, job_id=job.id, owner=owner, succeeded=True, timings=timings,
                            weights_sha256=used.get("weights_sha256"))
        record_event(
            session, "outputs.written", audit_event_id=AuditEventID.APPLICATION_ACTIVITY,
            actor=owner[:64], series_instance_uid=job.series_instance_uid,
            detail={"job_id": job.id, "outputs": len(outputs), "deliveries": n,
                    "series": sorted({o.series_instance_uid for o in outputs}),
                    **({"model": used} if used else {})},
        )
        _settle_series(session, job.id, job.series_id)
    return status


def work_loop(
    *, settings: Settings, factory: sessionmaker[Session], owner: str, stop: Any,
    parent_pid: int | None = None, ready: Any = None,
) -> None:
    """Claim and run jobs until ``stop`` is set (or the node process that started us is gone).

    ``ready`` (an event), when given, is set once the device is resolved (torch imported):
    the node's ``/healthz`` reports the worker ready from then on.
    """
    device = resolve_device(settings.executor.device)
    # torch and the pipelines' modules, imported by now, live as long as the worker: frozen out
    # of the cyclic collector, whose full pass over them took 0.13 s of CPU (on a 2-core
    # machine, CPU the receiving processes wait for; docs/benchmarks.md, "Ingest")
    gc.collect()
    gc.freeze()
    if ready is not None:
        ready.set()
    while not stop.is_set():
        if parent_pid is not None and os.getppid() != parent_pid:
            log.warning("node process %s is gone; worker exiting", parent_pid)
            return
        job = claim_job(factory, owner=owner, lease_s=settings.executor.lease_s, device=device)
        if job is None:
            stop.wait(settings.executor.poll_interval_s)
            continue
        run_claimed_job(job, settings=settings, factory=factory, owner=owner, device=device,
                        parent_pid=parent_pid)
