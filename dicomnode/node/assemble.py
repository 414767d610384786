"""Assemble: decide when a series is complete, then route it to jobs.

A sweep over database state (``series.state = RECEIVING``), not in-memory timers, so a restart
loses nothing. A series is complete when, under its rule's policy:

* every association that sent it has closed and the content checks pass, or
* the quiet period since the last instance has passed, or
* the maximum wait since the first instance has passed.

The decision and its reason are recorded on the row and in the event log; routing (rules ->
jobs) happens in the same transaction as the state change, compare-and-set on ``row_version``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
from sqlalchemy import exists, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit.db import transaction
from dicomnode.audit.events import AuditEventID, Outcome, record_event
from dicomnode.audit.models import Association, Instance, Series, SeriesState, utcnow
from dicomnode.dicom.volume import ORIENTATION_TOL, spacing_problem
from dicomnode.node.route import RuleEvaluation, evaluate_rules, header_values
from dicomnode.node.study import bound_enqueue, note_series, study_sweep
from dicomnode.pipelines import get_pipeline
from dicomnode.settings import CompletionPolicy, Settings

__all__ = ["CompletionDecision", "content_check", "completion_decision", "Assembler"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class CompletionDecision:
    """Whether a series is complete now, and why (or why not)."""

    complete: bool
    reason: str


def content_check(
    positions: list[list[float] | None],
    orientations: list[list[float] | None],
    expected_count: int | None,
) -> str | None:
    """``None`` when the instances form one complete, evenly spaced stack; else the problem.

    Series without image geometry (SEG, SR, ...) pass the geometric part.
    """
    n = len(positions)
    if expected_count and n < expected_count:
        return f"{n} of {expected_count} expected instances"
    usable = [
        (p, o) for p, o in zip(positions, orientations, strict=True) if p is not None and o is not None
    ]
    if len(usable) < 2:
        return None
    orients = np.array([o for _, o in usable])
    if np.abs(orients - orients[0]).max() > ORIENTATION_TOL:
        return "instances have more than one orientation"
    row, col = orients[0][:3], orients[0][3:]
    normal = np.cross(row, col)
    z = np.sort(np.array([p for p, _ in usable]) @ normal)
    steps = np.diff(z)
    if steps.min() < 1e-3:
        return "duplicate slice positions"
    problem = spacing_problem(z)
    return f"{problem[0]} slice spacing: {problem[1]}" if problem else None


def completion_decision(
    *,
    policy: CompletionPolicy,
    now: datetime,
    first_received_at: datetime,
    last_received_at: datetime,
    senders_open: bool,
    content_problem: str | None,
    count: int,
) -> CompletionDecision:
    """The pure completion rule (no I/O): see the module docstring."""
    quiet = (now - last_received_at).total_seconds()
    waited = (now - first_received_at).total_seconds()
    checks_ok = content_problem is None or not policy.require_contiguous
    if policy.on_association_close and not senders_open and checks_ok:
        return CompletionDecision(
            complete=True,
            reason=f"sender association closed; {count} instances"
            + ("; content checks passed" if policy.require_contiguous else ""),
        )
    if quiet >= policy.quiet_period_s:
        note = f"; content check: {content_problem}" if content_problem else ""
        return CompletionDecision(
            complete=True,
            reason=f"quiet period {policy.quiet_period_s:g}s elapsed; {count} instances{note}",
        )
    if waited >= policy.max_wait_s:
        note = f"; content check: {content_problem}" if content_problem else ""
        return CompletionDecision(
            complete=True, reason=f"maximum wait {policy.max_wait_s:g}s reached{note}"
        )
    return CompletionDecision(
        complete=False, reason=content_problem or "senders still connected"
    )


def _first_header(settings: Settings, session: Session, series_id: int) -> pydicom.Dataset:
    path = session.execute(
        select(Instance.path).where(Instance.series_id == series_id).order_by(Instance.id).limit(1)
    ).scalar_one()
    return pydicom.dcmread(Path(settings.spool_dir) / path, stop_before_pixels=True)


class Assembler:
    """The completion sweep and routing, bound to the settings and a session factory."""

    def __init__(self, *, settings: Settings, factory: sessionmaker[Session],
                 model_versions: dict[str, str] | None = None,
                 config_sha256: str | None = None) -> None:
        self.settings = settings
        self.factory = factory
        self.config_sha256 = config_sha256
        self.model_versions = model_versions or {}
        self._rules_cache: dict[int, list[RuleEvaluation]] = {}
        # series id -> ((instance count, last received), content problem, rows counted): the
        # slice positions are re-read only when the series has received something new
        self._content_cache: dict[int, tuple[tuple[int, datetime], str | None, int]] = {}
        self._study_rules = {r.name: r for r in settings.rules if r.requires}
        self._enqueue = bound_enqueue(settings, self.model_versions, config_sha256)

    def _evaluations(self, series: Series) -> list[RuleEvaluation]:
        cached = self._rules_cache.get(series.id)
        if cached is None:
            with self.factory() as session:
                ds = _first_header(self.settings, session, series.id)
            cached = evaluate_rules(
                self.settings.rules,
                values=header_values(ds, self.settings.rules),
                calling_ae=series.calling_ae,
            )
            self._rules_cache[series.id] = cached
        return cached

    def sweep(self) -> list[str]:
        """One pass: complete and route every series that is ready; returns their UIDs."""
        now = utcnow()
        with self.factory() as session:
            candidates = session.execute(
                select(Series).where(Series.state == SeriesState.RECEIVING)
            ).scalars().all()
            session.expunge_all()  # plain snapshots: no lazy reloads below
        receiving = {series.id for series in candidates}
        for cache in (self._rules_cache, self._content_cache):
            for gone in set(cache) - receiving:  # completed or deleted: forget them
                del cache[gone]
        done = []
        for series in candidates:
            try:
                if self._try_complete(series, now):
                    done.append(series.series_instance_uid)
            except Exception:
                log.exception("completion of series id %s failed", series.id)
        if self._study_rules:
            study_sweep(self.settings, self.factory, now=utcnow(), enqueue=self._enqueue)
        return done

    def _try_complete(self, series: Series, now: datetime) -> bool:
        with self.factory() as session:
            senders_open = bool(
                session.execute(
                    select(
                        exists().where(
                            Instance.series_id == series.id,
                            Instance.association_id == Association.id,
                            # an abort or a dropped connection is not a finished sender
                            or_(Association.ended_at.is_(None),
                                Association.end_reason != "released"),
                        )
                    )
                ).scalar()
            )
        evaluations = self._evaluations(series)
        matched = [e.rule for e in evaluations if e.matched]
        policy = self.settings.completion_for(matched)
        if senders_open and (now - series.last_received_at).total_seconds() \
                < policy.quiet_period_s \
                and (now - series.first_received_at).total_seconds() < policy.max_wait_s:
            # nothing can complete it yet: the content check (every instance's geometry) is
            # left for when a sender closes or a wait runs out, not repeated while receiving
            return False
        with self.factory() as session:
            key = (series.instance_count, series.last_received_at)
            cached = self._content_cache.get(series.id)
            if cached is not None and cached[0] == key:
                problem, count = cached[1], cached[2]
            else:
                rows = session.execute(
                    select(Instance.position, Instance.orientation).where(
                        Instance.series_id == series.id
                    )
                ).all()
                problem = content_check([r.position for r in rows],
                                        [r.orientation for r in rows], series.expected_count)
                count = len(rows)
                self._content_cache[series.id] = (key, problem, count)
        decision = completion_decision(
            policy=policy, now=now, first_received_at=series.first_received_at,
            last_received_at=series.last_received_at, senders_open=senders_open,
            content_problem=problem, count=count,
        )
        if not decision.complete:
            return False
        return self._complete_and_route(series, decision, evaluations, now)

    def _complete_and_route(
        self, series: Series, decision: CompletionDecision,
        evaluations: list[RuleEvaluation], now: datetime,
    ) -> bool:
        matched = [e for e in evaluations if e.matched]
        per_series = [e for e in matched if e.role is None]
        with transaction(self.factory) as session:
            result = session.execute(
                update(Series)
                .where(Series.id == series.id, Series.row_version == series.row_version,
                       Series.state == SeriesState.RECEIVING)
                .values(
                    state=SeriesState.ROUTED if matched else SeriesState.DONE,
                    completed_at=now, completion_reason=decision.reason,
                    matched_rules=[e.rule for e in matched],
                    row_version=Series.row_version + 1,
                )
            )
            if not result.rowcount:  # type: ignore[attr-defined]
                return False  # a new instance arrived meanwhile: decide again next sweep
            record_event(
                session, "series.completed", audit_event_id=AuditEventID.APPLICATION_ACTIVITY,
                actor="assemble", series_instance_uid=series.series_instance_uid,
                detail={"reason": decision.reason, "instances": series.instance_count,
                        "expected": series.expected_count},
            )
            record_event(
                session, "route.evaluated", audit_event_id=AuditEventID.APPLICATION_ACTIVITY,
                outcome=Outcome.SUCCESS, actor="route",
                series_instance_uid=series.series_instance_uid,
                detail={"rules": [
                    {"rule": e.rule, "matched": e.matched, "reason": e.reason}
                    for e in evaluations
                ]},
            )
            waits = [note_series(session, series=series, rule=self._study_rules[e.rule],
                                 role=e.role, now=now) for e in matched if e.role]
            if not per_series and not any(waits):
                session.execute(update(Series).where(Series.id == series.id)
                                .values(state=SeriesState.DONE))
            shas = session.execute(
                select(Instance.sha256).where(Instance.series_id == series.id)
                .order_by(Instance.sha256)
            ).scalars().all()
            input_sha = hashlib.sha256("".join(shas).encode()).hexdigest()
            rules = {r.name: r for r in self.settings.rules}
            for evaluation in per_series:
                rule = rules[evaluation.rule]
                for pipeline in rule.pipelines:
                    self._enqueue(
                        session, series=series, rule_name=rule.name, pipeline=pipeline,
                        pipeline_version=get_pipeline(pipeline).version,
                        input_sha256=input_sha, destinations=list(rule.destinations),
                        model_name=rule.models.get(pipeline))
        self._rules_cache.pop(series.id, None)
        return True
