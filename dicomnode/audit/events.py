"""The append-only, hash-chained event log (DICOM audit event ids, PS3.15 A.5).

Events hold UIDs, counts and statuses only: never patient names or ids.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from dicomnode.audit.models import EventLog, utcnow

__all__ = ["AuditEventID", "Outcome", "record_event", "verify_chain", "patient_key"]

GENESIS = "0" * 64


class AuditEventID(enum.IntEnum):
    """DCM codes of DICOM audit events (PS3.15 A.5.3)."""

    APPLICATION_ACTIVITY = 110100
    BEGIN_TRANSFERRING = 110102
    INSTANCES_ACCESSED = 110103
    INSTANCES_TRANSFERRED = 110104
    IMPORT = 110107
    QUERY = 110112
    SECURITY_ALERT = 110113
    USER_AUTHENTICATION = 110114


class Outcome(enum.IntEnum):
    """EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


def _row_hash(prev_hash: str, fields: dict[str, Any]) -> str:
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256((prev_hash + blob).encode()).hexdigest()


def record_event(
    session: Session,
    event_type: str,
    *,
    audit_event_id: AuditEventID,
    outcome: Outcome = Outcome.SUCCESS,
    actor: str,
    series_instance_uid: str | None = None,
    detail: dict[str, Any] | None = None,
) -> EventLog:
    """Append one event in the caller's transaction, chained to the previous row's hash.

    Parameters
    ----------
    session
        An open session inside a transaction; the event commits or rolls back with it.
    event_type
        Dotted name, e.g. ``"series.completed"``.
    audit_event_id
        The DICOM audit event id.
    outcome
        Event outcome indicator.
    actor
        Who acted: an AE title or a component name.
    series_instance_uid
        The series concerned, if any.
    detail
        UIDs, counts and statuses only.
    """
    if session.get_bind().dialect.name == "postgresql":
        # Serialise chain appends across processes for the length of this transaction.
        session.execute(text("SELECT pg_advisory_xact_lock(727274)"))
    prev = session.execute(
        select(EventLog.hash).order_by(EventLog.id.desc()).limit(1)
    ).scalar_one_or_none()
    prev_hash = prev or GENESIS
    at = utcnow()
    fields = {
        "at": at.isoformat(),
        "event_type": event_type,
        "audit_event_id": int(audit_event_id),
        "outcome": int(outcome),
        "actor": actor,
        "series_instance_uid": series_instance_uid,
        "detail": detail or {},
    }
    row = EventLog(
        at=at,
        event_type=event_type,
        audit_event_id=int(audit_event_id),
        outcome=int(outcome),
        actor=actor,
        series_instance_uid=series_instance_uid,
        detail=detail or {},
        prev_hash=prev_hash,
        hash=_row_hash(prev_hash, fields),
    )
    session.add(row)
    session.flush()
    return row


def verify_chain(session: Session) -> int | None:
    """Check the hash chain; return the id of the first broken row, or ``None`` if intact."""
    prev_hash = GENESIS
    for row in session.execute(select(EventLog).order_by(EventLog.id)).scalars():
        fields = {
            "at": row.at.isoformat(),
            "event_type": row.event_type,
            "audit_event_id": row.audit_event_id,
            "outcome": row.outcome,
            "actor": row.actor,
            "series_instance_uid": row.series_instance_uid,
            "detail": row.detail,
        }
        if row.prev_hash != prev_hash or row.hash != _row_hash(prev_hash, fields):
            return row.id
        prev_hash = row.hash
    return None


def patient_key(secret: bytes, patient_id: str | None) -> str | None:
    """A keyed hash (HMAC-SHA256) of a patient id, so rows can be joined without holding PHI."""
    if not patient_id:
        return None
    return hmac.new(secret, patient_id.encode("utf-8", "replace"), hashlib.sha256).hexdigest()
