"""Retention: delete the files of finished work, so the disk does not only fill.

Two kinds of item, each deleted whole and recorded as one audit event (DICOM "Instances
Accessed", action D):

* a **received series**: its instance files, once the series is finished (DONE / FAILED /
  DISCARDED), every job on it has ended and every delivery of those jobs' results has ended
  (delivered, dead or cancelled); its clock starts at the latest of those moments;
* a **job's results**: its ``outputs/<job id>/`` folder, once the job has ended and every
  delivery of its results has ended.

An item goes when it is older than its ``retention.*_days``, or, above ``retention.max_gb``,
oldest first until the total is under the cap. Work still receiving, queued, running or with a
delivery still pending is never a candidate. Rows are kept (UIDs, checksums, decisions):
``series.purged_at`` / ``job.outputs_purged_at`` say the files are gone. The row is marked in a
fenced update first and the files deleted after it commits, so a crash in between leaves files
to spare, never a row that claims files that were deleted without record.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit.db import transaction
from dicomnode.audit.events import AuditEventID, Outcome, record_event
from dicomnode.audit.models import (
    Delivery,
    DeliveryStatus,
    Instance,
    Job,
    JobSeries,
    JobStatus,
    Output,
    Series,
    SeriesState,
    utcnow,
)
from dicomnode.settings import Settings

__all__ = ["Candidate", "PurgeReport", "plan", "purge"]

log = logging.getLogger(__name__)

FINISHED_SERIES = (SeriesState.DONE, SeriesState.FAILED, SeriesState.DISCARDED)
ENDED_JOB = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.DEAD, JobStatus.CANCELLED})
ENDED_DELIVERY = frozenset({DeliveryStatus.DELIVERED, DeliveryStatus.DEAD,
                            DeliveryStatus.CANCELLED})


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """Finished work whose files may be deleted."""

    kind: str  # "received" (a series' instances) or "outputs" (a job's results)
    id: int  # series id or job id
    series_instance_uid: str
    finished_at: datetime
    bytes: int


@dataclass(kw_only=True)
class PurgeReport:
    """What a run of the policy chose (and, unless a dry run, deleted)."""

    dry_run: bool
    total_bytes_before: int
    chosen: list[tuple[Candidate, str]] = field(default_factory=list)  # (item, reason)
    skipped: int = 0  # chosen, but changed under us (e.g. a series reopened): left alone

    @property
    def bytes_freed(self) -> int:
        return sum(c.bytes for c, _ in self.chosen)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run, "total_bytes_before": self.total_bytes_before,
            "bytes_freed": self.bytes_freed, "skipped": self.skipped,
            "items": [{**asdict(c), "finished_at": c.finished_at.isoformat(), "reason": why}
                      for c, why in self.chosen],
        }


def _latest(*values: datetime | None) -> datetime | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def candidates(session: Session) -> tuple[list[Candidate], int]:
    """All finished work not yet purged, and the bytes held by everything not yet purged."""
    series = {r.id: r for r in session.execute(
        select(Series.id, Series.series_instance_uid, Series.state, Series.completed_at,
               Series.last_received_at, Series.purged_at))}
    jobs = session.execute(select(Job.id, Job.series_id, Job.status, Job.finished_at,
                                  Job.outputs_purged_at)).all()
    # per job: (all deliveries ended?, the latest end)
    delivery_end: dict[int, tuple[bool, datetime | None]] = {}
    for job_id, status, delivered_at, attempted_at in session.execute(
            select(Output.job_id, Delivery.status, Delivery.delivered_at, Delivery.next_attempt_at)
            .join(Output, Output.id == Delivery.output_id)):
        ended, latest = delivery_end.get(job_id, (True, None))
        done = DeliveryStatus(status) in ENDED_DELIVERY
        delivery_end[job_id] = (ended and done,
                                _latest(latest, delivered_at or attempted_at if done else None))
    series_bytes: dict[int, int] = {sid: int(b or 0) for sid, b in session.execute(
        select(Instance.series_id, func.sum(Instance.bytes)).group_by(Instance.series_id))}
    job_bytes: dict[int, int] = {jid: int(b or 0) for jid, b in session.execute(
        select(Output.job_id, func.sum(Output.bytes)).group_by(Output.job_id))}

    found: list[Candidate] = []
    total = sum(int(b) for sid, b in series_bytes.items()
                if sid in series and series[sid].purged_at is None)
    series_jobs: dict[int, list[Any]] = defaultdict(list)
    by_id = {job.id: job for job in jobs}
    for job_id, series_id in session.execute(select(JobSeries.job_id, JobSeries.series_id)):
        if series_id != by_id[job_id].series_id:  # a study job's other series: kept for it
            series_jobs[series_id].append(by_id[job_id])
    for job in jobs:
        series_jobs[job.series_id].append(job)
        if job.outputs_purged_at is not None:
            continue
        total += job_bytes.get(job.id, 0)
        ended, delivered = delivery_end.get(job.id, (True, None))
        if JobStatus(job.status) in ENDED_JOB and ended and job.finished_at is not None:
            found.append(Candidate(
                kind="outputs", id=job.id,
                series_instance_uid=series[job.series_id].series_instance_uid,
                finished_at=_latest(job.finished_at, delivered) or job.finished_at,
                bytes=job_bytes.get(job.id, 0)))
    for sid, row in series.items():
        if row.purged_at is not None or SeriesState(row.state) not in FINISHED_SERIES:
            continue
        ends: list[datetime | None] = [row.completed_at, row.last_received_at]
        ready = True
        for job in series_jobs.get(sid, []):
            ended, delivered = delivery_end.get(job.id, (True, None))
            ready = ready and JobStatus(job.status) in ENDED_JOB and ended
            ends += [job.finished_at, delivered]
        if ready:
            found.append(Candidate(
                kind="received", id=sid, series_instance_uid=row.series_instance_uid,
                finished_at=_latest(*ends) or row.last_received_at,
                bytes=int(series_bytes.get(sid, 0))))
    return found, total


def plan(factory: sessionmaker[Session], settings: Settings, *,
         now: datetime | None = None) -> PurgeReport:
    """Choose what the policy deletes now (nothing is changed)."""
    policy = settings.retention
    now = now or utcnow()
    with factory() as session:
        found, total = candidates(session)
    report = PurgeReport(dry_run=True, total_bytes_before=total)
    days = {"received": policy.received_days, "outputs": policy.outputs_days}
    rest = []
    for item in sorted(found, key=lambda c: (c.finished_at, c.kind, c.id)):
        limit = days[item.kind]
        if limit is not None and item.finished_at <= now - timedelta(days=limit):
            report.chosen.append((item, f"{item.kind}_days={limit:g}"))
        else:
            rest.append(item)
    if policy.max_gb is not None:
        cap = int(policy.max_gb * 1e9)
        remaining = total - report.bytes_freed
        for item in rest:  # oldest finished work first
            if remaining <= cap:
                break
            report.chosen.append((item, f"max_gb={policy.max_gb:g}"))
            remaining -= item.bytes
    return report


def _claim(session: Session, item: Candidate, now: datetime) -> list[Path] | None:
    """Mark one item purged if it is still finished; the files to delete, or None."""
    if item.kind == "received":
        claimed = session.execute(
            update(Series).where(Series.id == item.id, Series.purged_at.is_(None),
                                 Series.state.in_(FINISHED_SERIES))
            .values(purged_at=now)).rowcount  # type: ignore[attr-defined]
        if not claimed:
            return None
        return [Path(p) for p in session.execute(
            select(Instance.path).where(Instance.series_id == item.id)).scalars()]
    pending = session.execute(
        select(func.count()).select_from(Delivery).join(Output, Output.id == Delivery.output_id)
        .where(Output.job_id == item.id, Delivery.status.not_in(ENDED_DELIVERY))).scalar_one()
    if pending:  # a dead letter re-queued since the plan
        return None
    claimed = session.execute(
        update(Job).where(Job.id == item.id, Job.outputs_purged_at.is_(None),
                          Job.status.in_(ENDED_JOB))
        .values(outputs_purged_at=now)).rowcount  # type: ignore[attr-defined]
    return [Path(str(item.id))] if claimed else None


def purge(factory: sessionmaker[Session], settings: Settings, *, dry_run: bool = False,
          actor: str = "retention", now: datetime | None = None) -> PurgeReport:
    """Run the policy: choose, then (unless ``dry_run``) mark and delete, one event per item."""
    report = plan(factory, settings, now=now)
    report.dry_run = dry_run
    if dry_run:
        return report
    kept: list[tuple[Candidate, str]] = []
    for item, why in report.chosen:
        when = utcnow()
        with transaction(factory) as session:
            paths = _claim(session, item, when)
            if paths is None:
                report.skipped += 1
                continue
            record_event(
                session, "retention.purged", audit_event_id=AuditEventID.INSTANCES_ACCESSED,
                outcome=Outcome.SUCCESS, actor=actor,
                series_instance_uid=item.series_instance_uid,
                detail={"action": "D", "kind": item.kind, "id": item.id, "reason": why,
                        "bytes": item.bytes, "files": len(paths),
                        "finished_at": item.finished_at.isoformat()})
        # the row says purged (committed): now the files go
        if item.kind == "received":
            for rel in paths:
                (settings.spool_dir / rel).unlink(missing_ok=True)
            _remove_empty_parents(settings.spool_dir, {p.parent for p in paths})
        else:
            shutil.rmtree(settings.output_dir / paths[0], ignore_errors=True)
        kept.append((item, why))
    report.chosen = kept
    if kept:
        log.info("retention: %d items deleted, %.1f MB freed", len(kept), report.bytes_freed / 1e6)
    return report


def _remove_empty_parents(root: Path, folders: set[Path]) -> None:
    """Remove series folders (then study folders) left empty; never the root itself."""
    for rel in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        for folder in (root / rel, (root / rel).parent):
            if folder != root and folder.is_dir() and not any(folder.iterdir()):
                with contextlib.suppress(OSError):  # an instance arriving right now
                    folder.rmdir()
