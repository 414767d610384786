"""Jobs: the job table is the queue (one row per input set, pipeline and version).

States: QUEUED -> RUNNING -> SUCCEEDED / FAILED (refused, not retried) / DEAD (attempts spent).
Claiming is ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL; on SQLite every transaction
is ``BEGIN IMMEDIATE`` (see :mod:`dicomnode.audit.db`), which serialises claimers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit.db import transaction
from dicomnode.audit.events import AuditEventID, Outcome, record_event
from dicomnode.audit.models import Job, JobStatus, Series, utcnow

__all__ = [
    "ClaimedJob",
    "claim_job",
    "enqueue_job",
    "finish_job",
    "heartbeat",
    "idempotency_key",
    "publish_due",
    "reclaim_expired",
]


def idempotency_key(
    *, series_instance_uid: str, pipeline: str, pipeline_version: str, input_sha256: str
) -> str:
    """The job's identity: the same input set through the same pipeline version runs once."""
    raw = "|".join((series_instance_uid, pipeline, pipeline_version, input_sha256))
    return hashlib.sha256(raw.encode()).hexdigest()


def enqueue_job(
    session: Session,
    *,
    series: Series,
    rule_name: str,
    pipeline: str,
    pipeline_version: str,
    input_sha256: str,
    destinations: list[str],
    max_attempts: int,
    model_name: str | None = None,
    model_version: str | None = None,
    config_sha256: str | None = None,
    study_key: str | None = None,
) -> int | None:
    """Insert a job unless its idempotency key exists; returns the new id or ``None``.

    The key covers the model too: a new model version runs the series again.
    ``config_sha256`` is the config file that routed it (recorded, not part of the key).
    ``study_key`` (a study rule: study UID and rule) replaces the series and its content in
    the key: one job per study, pipeline and version, whatever is re-sent later.
    """
    key = idempotency_key(
        series_instance_uid=study_key or series.series_instance_uid,
        pipeline=pipeline,
        pipeline_version=pipeline_version
        + (f"+{model_name}@{model_version}" if model_name else ""),
        input_sha256="" if study_key else input_sha256,
    )
    values = dict(
        idempotency_key=key,
        series_id=series.id,
        rule_name=rule_name,
        pipeline=pipeline,
        pipeline_version=pipeline_version,
        model_name=model_name,
        model_version=model_version,
        config_sha256=config_sha256,
        input_sha256=input_sha256,
        destinations=destinations,
        status=JobStatus.QUEUED,
        attempts=0,
        max_attempts=max_attempts,
        next_attempt_at=utcnow(),
        progress=0.0,
        created_at=utcnow(),
    )
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    stmt = (
        insert(Job)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
        .returning(Job.id)
    )
    job_id = session.execute(stmt).scalar_one_or_none()
    record_event(
        session,
        "job.queued" if job_id else "job.duplicate",
        audit_event_id=AuditEventID.APPLICATION_ACTIVITY,
        actor="route",
        series_instance_uid=series.series_instance_uid,
        detail={"job_id": job_id, "pipeline": pipeline, "rule": rule_name, "key": key},
    )
    return job_id


@dataclass(frozen=True, kw_only=True)
class ClaimedJob:
    """A job a worker holds a lease on (an immutable snapshot of the row)."""

    id: int
    pipeline: str
    pipeline_version: str
    series_id: int
    series_instance_uid: str
    destinations: tuple[str, ...]
    attempt: int
    model_name: str | None = None


def claim_job(
    factory: sessionmaker[Session], *, owner: str, lease_s: float, device: str,
    job_id: int | None = None,
) -> ClaimedJob | None:
    """Claim the oldest due QUEUED job for ``owner`` (only job ``job_id`` when given: what a
    broker message names); ``None`` when there is none. The claim is a locked update of a
    QUEUED row, so a job is claimed once however often its id is delivered."""
    now = utcnow()
    with transaction(factory) as session:
        query = select(Job).where(Job.status == JobStatus.QUEUED, Job.next_attempt_at <= now)
        if job_id is not None:
            query = query.where(Job.id == job_id)
        job = session.execute(
            query.order_by(Job.next_attempt_at, Job.id).limit(1).with_for_update(skip_locked=True)
        ).scalar_one_or_none()
        if job is None:
            return None
        job.status = JobStatus.RUNNING
        job.attempts += 1
        job.lease_owner = owner
        job.lease_expires_at = now + timedelta(seconds=lease_s)
        job.started_at = now
        job.device = device
        job.progress = 0.0
        series_uid = session.execute(
            select(Series.series_instance_uid).where(Series.id == job.series_id)
        ).scalar_one()
        record_event(
            session,
            "job.started",
            audit_event_id=AuditEventID.APPLICATION_ACTIVITY,
            actor=owner[:64],
            series_instance_uid=series_uid,
            detail={"job_id": job.id, "pipeline": job.pipeline, "attempt": job.attempts,
                    "device": device},
        )
        return ClaimedJob(
            id=job.id,
            pipeline=job.pipeline,
            pipeline_version=job.pipeline_version,
            series_id=job.series_id,
            series_instance_uid=series_uid,
            destinations=tuple(job.destinations),
            attempt=job.attempts,
            model_name=job.model_name,
        )


def publish_due(factory: sessionmaker[Session], publish: Callable[[int, str], None]) -> int:
    """Hand every due QUEUED job whose current attempt has not been published to ``publish``
    (job id, pipeline); returns how many.

    The jobs are marked published and committed first, then published: a worker that gets
    the message at once must find the row committed and unlocked, or it would drop it. A
    publish that fails un-marks its job for the next sweep; one published twice is harmless
    (see :func:`claim_job`)."""
    now = utcnow()
    with transaction(factory) as session:
        jobs = session.execute(
            select(Job).where(Job.status == JobStatus.QUEUED, Job.next_attempt_at <= now,
                              or_(Job.published_attempt.is_(None),
                                  Job.published_attempt <= Job.attempts))
            .order_by(Job.next_attempt_at, Job.id).with_for_update(skip_locked=True)
        ).scalars().all()
        marked = [(job.id, job.pipeline, job.published_attempt) for job in jobs]
        for job in jobs:
            job.published_attempt = job.attempts + 1
    for count, (job_id, pipeline, _) in enumerate(marked):
        try:
            publish(job_id, pipeline)
        except Exception:
            with transaction(factory) as session:  # this one and the rest: next sweep
                for left_id, _, before in marked[count:]:
                    session.execute(update(Job).where(Job.id == left_id)
                                    .values(published_attempt=before))
            raise
    return len(marked)


def heartbeat(
    factory: sessionmaker[Session], *, job_id: int, owner: str, lease_s: float,
    progress: float | None = None,
) -> bool:
    """Extend the lease (and record progress); ``False`` if the job is no longer ours."""
    values: dict[str, object] = {"lease_expires_at": utcnow() + timedelta(seconds=lease_s)}
    if progress is not None:
        values["progress"] = max(0.0, min(1.0, progress))
    with transaction(factory) as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.RUNNING)
            .values(**values)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


def finish_job(
    session: Session,
    *,
    job_id: int,
    owner: str,
    succeeded: bool,
    retryable: bool = True,
    error_code: str | None = None,
    error_detail: str | None = None,
    timings: dict[str, float] | None = None,
    weights_sha256: str | None = None,
    backoff_s: float = 30.0,
    backoff_max_s: float = 600.0,
) -> JobStatus:
    """Close a run in the caller's transaction; a failure is retried until attempts run out,
    after ``backoff_s`` doubling per attempt, at most ``backoff_max_s``."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None or job.lease_owner != owner or job.status != JobStatus.RUNNING:
        raise RuntimeError(f"job {job_id} is not held by {owner}")
    now = utcnow()
    job.timings = timings
    job.lease_owner = None
    job.lease_expires_at = None
    if succeeded:
        job.weights_sha256 = weights_sha256
        job.status = JobStatus.SUCCEEDED
        job.progress = 1.0
        job.finished_at = now
        job.error_code = job.error_detail = None
    elif retryable and job.attempts < job.max_attempts:
        job.status = JobStatus.QUEUED
        job.next_attempt_at = now + timedelta(
            seconds=min(backoff_max_s, backoff_s * 2 ** (job.attempts - 1)))
        job.error_code, job.error_detail = error_code, error_detail
    else:
        job.status = JobStatus.DEAD if retryable else JobStatus.FAILED
        job.finished_at = now
        job.error_code, job.error_detail = error_code, error_detail
    series_uid = session.execute(
        select(Series.series_instance_uid).where(Series.id == job.series_id)
    ).scalar_one()
    record_event(
        session,
        f"job.{job.status.value.lower()}",
        audit_event_id=AuditEventID.APPLICATION_ACTIVITY,
        outcome=Outcome.SUCCESS if succeeded else Outcome.SERIOUS_FAILURE,
        actor=owner[:64],
        series_instance_uid=series_uid,
        detail={"job_id": job_id, "pipeline": job.pipeline, "attempt": job.attempts,
                "error_code": error_code, "timings": timings,
                **({"model": job.model_name, "model_version": job.model_version,
                    "weights_sha256": job.weights_sha256, "config_sha256": job.config_sha256}
                   if succeeded else {})},
    )
    return job.status


def reclaim_expired(factory: sessionmaker[Session], *, all_running: bool = False,
                    restart_cap: int = 0) -> int:
    """Re-queue RUNNING jobs whose lease expired (a worker died); returns how many.

    Parameters
    ----------
    all_running
        At start-up no worker of this node is running yet, so every RUNNING job is an orphan.
    restart_cap
        With ``all_running``: the job was cut by the node's own death (a crash, a pulled
        plug), not by the job, so the attempt is given back (``max_attempts`` + 1) while
        ``max_attempts`` is below this cap. A job that takes the whole node down every time
        still ends DEAD once the cap is reached.
    """
    now = utcnow()
    count = 0
    with transaction(factory) as session:
        query = select(Job).where(Job.status == JobStatus.RUNNING)
        if not all_running:
            query = query.where(Job.lease_expires_at < now)
        for job in session.execute(query.with_for_update(skip_locked=True)).scalars():
            given_back = all_running and job.max_attempts < restart_cap
            if given_back:
                job.max_attempts += 1
            dead = job.attempts >= job.max_attempts
            job.status = JobStatus.DEAD if dead else JobStatus.QUEUED
            job.error_code = "node_restart" if all_running else "lease_expired"
            job.error_detail = (f"the node stopped while {job.lease_owner} ran it" if all_running
                                else f"worker {job.lease_owner} stopped renewing its lease")
            job.lease_owner = None
            job.lease_expires_at = None
            job.next_attempt_at = now
            if dead:
                job.finished_at = now
            record_event(
                session,
                "job.reclaimed",
                audit_event_id=AuditEventID.APPLICATION_ACTIVITY,
                outcome=Outcome.MINOR_FAILURE,
                actor="scheduler",
                detail={"job_id": job.id, "status": job.status.value, "attempts": job.attempts,
                        "cause": job.error_code, "attempt_given_back": given_back},
            )
            count += 1
    return count
