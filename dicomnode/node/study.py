"""Study-level routing: rules with ``requires`` (a PET/CT study's CT and PET series).

A completed series that fills a role of a study rule is noted on the study's decision row
(``study_decision``, one per study and rule). The study sweep then decides, once:

* every role filled -> the series must share a Frame of Reference (one PET/CT scanner writes
  one; the rule may allow otherwise) -> one job per pipeline, keyed on the study and the rule,
  so a series re-sent or arriving late never runs it twice (``QUEUED``); or ``REFUSED`` with
  the two Frames of Reference;
* a role still empty ``study_max_wait_s`` after the study's first series -> ``INCOMPLETE``,
  naming the missing roles. A series that fills them later still starts the job, recorded as
  late.

Every step is an event (``study.series``, ``study.paired``, ``study.incomplete``,
``study.refused``, ``study.ignored``) with the series UID of each role: the pairing is in the
audit trail. Compare with peers: Orthanc's "stable study" fires again when a study arrives in
pieces, MONAI Deploy opens a second workflow for a late series, mercure matches companions by
SeriesDescription substrings and discards incomplete studies.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pydicom
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit.db import transaction
from dicomnode.audit.events import AuditEventID, Outcome, record_event
from dicomnode.audit.models import (
    Instance,
    JobSeries,
    Series,
    SeriesState,
    StudyDecision,
    StudyState,
)
from dicomnode.node.jobs import enqueue_job
from dicomnode.pipelines import get_pipeline
from dicomnode.settings import Rule, Settings

__all__ = ["note_series", "study_sweep"]

log = logging.getLogger(__name__)

OPEN = (StudyState.WAITING, StudyState.INCOMPLETE)


def _event(session: Session, kind: str, series_uid: str | None, detail: dict[str, Any], *,
           outcome: Outcome = Outcome.SUCCESS) -> None:
    record_event(session, kind, audit_event_id=AuditEventID.APPLICATION_ACTIVITY,
                 outcome=outcome, actor="route", series_instance_uid=series_uid, detail=detail)


def note_series(session: Session, *, series: Series, rule: Rule, role: str,
                now: datetime) -> bool:
    """Record that ``series`` (complete) fills ``role`` of ``rule`` for its study. Returns
    whether the series waits for the study (False: the study already has that role or has
    been decided)."""
    decision = session.execute(
        select(StudyDecision).where(
            StudyDecision.study_instance_uid == series.study_instance_uid,
            StudyDecision.rule_name == rule.name).with_for_update()
    ).scalar_one_or_none()
    detail: dict[str, Any] = {"rule": rule.name, "role": role,
                              "study": series.study_instance_uid}
    if decision is None:
        session.add(StudyDecision(study_instance_uid=series.study_instance_uid,
                                  rule_name=rule.name, state=StudyState.WAITING,
                                  roles={role: series.id}, created_at=now))
        _event(session, "study.series", series.series_instance_uid, detail)
        return True
    if role in decision.roles or decision.state not in OPEN:
        why = (f"the study's job is already {decision.state.value.lower()}"
               if decision.state not in OPEN else
               f"role {role} is already filled by series id {decision.roles[role]}")
        _event(session, "study.ignored", series.series_instance_uid, {**detail, "reason": why},
               outcome=Outcome.MINOR_FAILURE)
        return False
    decision.roles = {**decision.roles, role: series.id}  # a new dict: JSON change tracked
    _event(session, "study.series", series.series_instance_uid, detail)
    return True


def _frame_of_reference(settings: Settings, session: Session, series_id: int) -> str:
    path = session.execute(select(Instance.path).where(Instance.series_id == series_id)
                           .order_by(Instance.id).limit(1)).scalar_one()
    ds = pydicom.dcmread(settings.spool_dir / path, stop_before_pixels=True,
                         specific_tags=["FrameOfReferenceUID"])
    return str(ds.get("FrameOfReferenceUID", "") or "")


def _release(session: Session, series_ids: list[int]) -> None:
    """Series that waited for a study that will not run: ROUTED -> DONE."""
    session.execute(update(Series).where(Series.id.in_(series_ids),
                                         Series.state == SeriesState.ROUTED)
                    .values(state=SeriesState.DONE, row_version=Series.row_version + 1))


def _pair(session: Session, settings: Settings, decision: StudyDecision, rule: Rule,
          now: datetime, enqueue: Callable[..., int | None]) -> None:
    """Every role is filled: check registration, then queue one job per pipeline."""
    order = [r for r in rule.requires if r in decision.roles]
    series = {r: session.get(Series, decision.roles[r]) for r in order}
    uids = {r: s.series_instance_uid for r, s in series.items() if s is not None}
    primary = series[order[0]]
    assert primary is not None
    frames = {r: _frame_of_reference(settings, session, decision.roles[r]) for r in order}
    late = decision.state == StudyState.INCOMPLETE
    decision.decided_at = now
    if len(set(frames.values())) > 1 and not rule.allow_frame_of_reference_mismatch:
        decision.state = StudyState.REFUSED
        decision.reason = ("not registered: Frames of Reference differ ("
                           + ", ".join(f"{r} {f or 'none'}" for r, f in frames.items()) + ")")[:300]
        _event(session, "study.refused", primary.series_instance_uid,
               {"rule": rule.name, "roles": uids, "reason": decision.reason},
               outcome=Outcome.MINOR_FAILURE)
        _release(session, list(decision.roles.values()))
        return
    shas = session.execute(select(Instance.sha256).where(
        Instance.series_id.in_(list(decision.roles.values()))).order_by(Instance.sha256)
    ).scalars().all()
    input_sha = hashlib.sha256("".join(shas).encode()).hexdigest()
    jobs = []
    for pipeline in rule.pipelines:
        job_id = enqueue(session, series=primary, rule_name=rule.name, pipeline=pipeline,
                         pipeline_version=get_pipeline(pipeline).version,
                         input_sha256=input_sha, destinations=list(rule.destinations),
                         model_name=rule.models.get(pipeline),
                         study_key=f"study:{decision.study_instance_uid}:{rule.name}")
        if job_id is not None:
            session.add_all(JobSeries(job_id=job_id, series_id=decision.roles[r], role=r)
                            for r in order)
            jobs.append(job_id)
    if jobs:  # series released by an earlier INCOMPLETE wait for this job again
        session.execute(update(Series).where(Series.id.in_(list(decision.roles.values())),
                                             Series.state == SeriesState.DONE)
                        .values(state=SeriesState.ROUTED, row_version=Series.row_version + 1))
    decision.state = StudyState.QUEUED
    decision.reason = ("every role filled" + (" (late: after the maximum wait)" if late else "")
                       + f"; jobs {jobs}")[:300]
    _event(session, "study.paired", primary.series_instance_uid,
           {"rule": rule.name, "roles": uids, "frame_of_reference": sorted(set(frames.values())),
            "jobs": jobs, "late": late})
    if not jobs:
        _release(session, list(decision.roles.values()))


def study_sweep(settings: Settings, factory: sessionmaker[Session], *, now: datetime,
                enqueue: Callable[..., int | None]) -> int:
    """Decide every open study whose roles are filled or whose wait is over; returns how
    many decisions were made. ``enqueue`` is :func:`enqueue_job` with the node's settings
    bound (attempts, model versions, config hash)."""
    rules = {r.name: r for r in settings.rules if r.requires}
    decided = 0
    with factory() as session:
        open_ids = session.execute(select(StudyDecision.id).where(
            StudyDecision.state.in_(OPEN), StudyDecision.rule_name.in_(list(rules)))
        ).scalars().all()
    for decision_id in open_ids:
        try:
            with transaction(factory) as session:
                decision = session.get(StudyDecision, decision_id, with_for_update=True)
                if decision is None or decision.state not in OPEN:
                    continue
                rule = rules[decision.rule_name]
                missing = [r for r in rule.requires if r not in decision.roles]
                if not missing:
                    _pair(session, settings, decision, rule, now, enqueue)
                    decided += 1
                elif decision.state == StudyState.WAITING and now - decision.created_at \
                        >= timedelta(seconds=rule.study_max_wait_s):
                    decision.state = StudyState.INCOMPLETE
                    decision.decided_at = now
                    decision.reason = (f"no {', '.join(missing)} series after "
                                       f"{rule.study_max_wait_s:g} s")[:300]
                    first = session.get(Series, next(iter(decision.roles.values())))
                    _event(session, "study.incomplete",
                           first.series_instance_uid if first else None,
                           {"rule": rule.name, "missing": missing, "reason": decision.reason,
                            "have": {r: s for r, s in decision.roles.items()}},
                           outcome=Outcome.MINOR_FAILURE)
                    _release(session, list(decision.roles.values()))
                    decided += 1
        except Exception:
            log.exception("study decision %s failed", decision_id)
    return decided


def bound_enqueue(settings: Settings, model_versions: dict[str, str],
                  config_sha256: str | None) -> Callable[..., int | None]:
    """:func:`enqueue_job` with what the node adds to every job."""
    def enqueue(session: Session, **kwargs: object) -> int | None:
        model = kwargs.get("model_name")
        return enqueue_job(session, max_attempts=settings.executor.max_attempts,
                           model_version=model_versions.get(str(model)) if model else None,
                           config_sha256=config_sha256, **kwargs)  # type: ignore[arg-type]
    return enqueue
