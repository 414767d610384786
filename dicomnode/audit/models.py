"""SQLAlchemy 2 models of the audit trail and the job queue (see ``shared/AUDIT.md``).

The migrations in ``db/versions`` create these tables; ``tests/test_db.py`` checks that the
migrated schema and these models agree on both SQLite and PostgreSQL.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Timezone-aware UTC now."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always returned timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class SeriesState(enum.StrEnum):
    RECEIVING = "RECEIVING"
    COMPLETE = "COMPLETE"
    ROUTED = "ROUTED"
    DONE = "DONE"
    FAILED = "FAILED"
    DISCARDED = "DISCARDED"


class StudyState(enum.StrEnum):
    """A study rule's decision for one study (one row per study and rule)."""

    WAITING = "WAITING"  # some required series are complete, others not yet
    QUEUED = "QUEUED"  # every required series complete and registered: the job is queued
    INCOMPLETE = "INCOMPLETE"  # study_max_wait_s passed with a required series missing
    REFUSED = "REFUSED"  # every series there, but not registered (Frames of Reference differ)


class JobStatus(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    DEAD = "DEAD"
    CANCELLED = "CANCELLED"


class OutputState(enum.StrEnum):
    RESERVED = "RESERVED"
    WRITTEN = "WRITTEN"


class DeliveryStatus(enum.StrEnum):
    PENDING = "PENDING"
    SENDING = "SENDING"
    DELIVERED = "DELIVERED"
    RETRY = "RETRY"
    DEAD = "DEAD"
    CANCELLED = "CANCELLED"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(cls, name=name, native_enum=False, length=16, validate_strings=True)


class NodeRun(Base):
    __tablename__ = "node_run"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_ae_title: Mapped[str] = mapped_column(String(16))
    software_version: Mapped[str] = mapped_column(String(32))
    config_sha256: Mapped[str] = mapped_column(String(64))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    stop_reason: Mapped[str | None] = mapped_column(String(64))


class Association(Base):
    __tablename__ = "association"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    direction: Mapped[str] = mapped_column(String(3))  # "in" / "out"
    calling_ae: Mapped[str] = mapped_column(String(16))
    called_ae: Mapped[str] = mapped_column(String(16))
    peer_host: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int] = mapped_column(Integer)
    accepted: Mapped[bool] = mapped_column(default=True)
    reject_reason: Mapped[str | None] = mapped_column(String(128))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    end_reason: Mapped[str | None] = mapped_column(String(16))  # released / aborted / closed / rejected / unreachable / crashed
    requests: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    __table_args__ = (Index("ix_association_calling_ae_started", "calling_ae", "started_at"),)


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    patient_key: Mapped[str | None] = mapped_column(String(64))  # keyed hash, never the raw id
    modality: Mapped[str | None] = mapped_column(String(16))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[SeriesState] = mapped_column(
        _enum(SeriesState, "series_state"), default=SeriesState.RECEIVING
    )
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_association_id: Mapped[int | None] = mapped_column(ForeignKey("association.id"))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    expected_count: Mapped[int | None] = mapped_column(Integer)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completion_reason: Mapped[str | None] = mapped_column(String(200))
    matched_rules: Mapped[list[str] | None] = mapped_column(JSON)
    row_version: Mapped[int] = mapped_column(Integer, default=1)
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # files deleted (retention)
    __table_args__ = (Index("ix_series_state_last_received", "state", "last_received_at"),)


class Instance(Base):
    __tablename__ = "instance"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(String(16))
    association_id: Mapped[int | None] = mapped_column(ForeignKey("association.id"))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(300), unique=True)  # relative to the spool
    instance_number: Mapped[int | None] = mapped_column(Integer)
    # Geometry for the completion content check (no pixel decoding needed).
    position: Mapped[list[float] | None] = mapped_column(JSON)
    orientation: Mapped[list[float] | None] = mapped_column(JSON)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class InstanceReceipt(Base):
    """Append-only: every C-STORE, duplicates and conflicts included."""

    __tablename__ = "instance_receipt"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("association.id"))
    message_id: Mapped[int | None] = mapped_column(Integer)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    action: Mapped[str] = mapped_column(String(16))  # create / duplicate / conflict
    dimse_status: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Job(Base):
    __tablename__ = "job"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(64), unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    rule_name: Mapped[str] = mapped_column(String(64))
    pipeline: Mapped[str] = mapped_column(String(64))
    pipeline_version: Mapped[str] = mapped_column(String(32))
    model_name: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(32))
    # the exact weights that produced the outputs (set when the job succeeds) and the config
    # file that routed the series (set when the job is queued)
    weights_sha256: Mapped[str | None] = mapped_column(String(64))
    config_sha256: Mapped[str | None] = mapped_column(String(64))
    # celery executor: the attempt whose job id was last published to the broker
    published_attempt: Mapped[int | None] = mapped_column(Integer)
    input_sha256: Mapped[str] = mapped_column(String(64))
    destinations: Mapped[list[str]] = mapped_column(JSON)
    status: Mapped[JobStatus] = mapped_column(
        _enum(JobStatus, "job_status"), default=JobStatus.QUEUED
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    device: Mapped[str | None] = mapped_column(String(32))
    progress: Mapped[float] = mapped_column(default=0.0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    timings: Mapped[dict[str, float] | None] = mapped_column(JSON)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_detail: Mapped[str | None] = mapped_column(Text)
    outputs_purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # retention
    __table_args__ = (Index("ix_job_status_next_attempt", "status", "next_attempt_at"),)


class StudyDecision(Base):
    """Study-level routing (a rule with ``requires``): which series fill which role, and what
    was decided, once per study and rule."""

    __tablename__ = "study_decision"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    rule_name: Mapped[str] = mapped_column(String(64))
    state: Mapped[StudyState] = mapped_column(_enum(StudyState, "study_state"))
    roles: Mapped[dict[str, int]] = mapped_column(JSON)  # role -> series id
    reason: Mapped[str | None] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    __table_args__ = (UniqueConstraint("study_instance_uid", "rule_name"),)


class JobSeries(Base):
    """The series a study job reads, each in its role (a series job has no rows here)."""

    __tablename__ = "job_series"
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id"), primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), primary_key=True)
    role: Mapped[str] = mapped_column(String(32))


class JobInput(Base):
    __tablename__ = "job_input"
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id"), primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instance.id"), primary_key=True)


class Output(Base):
    __tablename__ = "output"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # SEG / PT / CT
    index: Mapped[int] = mapped_column(Integer)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(300))
    sha256: Mapped[str | None] = mapped_column(String(64))
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    state: Mapped[OutputState] = mapped_column(
        _enum(OutputState, "output_state"), default=OutputState.RESERVED
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    __table_args__ = (UniqueConstraint("job_id", "kind", "index"),)


class Delivery(Base):
    __tablename__ = "delivery"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("output.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(64))
    port: Mapped[int] = mapped_column(Integer)
    status: Mapped[DeliveryStatus] = mapped_column(
        _enum(DeliveryStatus, "delivery_status"), default=DeliveryStatus.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_dimse_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(300))
    last_association_id: Mapped[int | None] = mapped_column(ForeignKey("association.id"))
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    __table_args__ = (
        UniqueConstraint("output_id", "destination"),
        Index("ix_delivery_status_next_attempt", "status", "next_attempt_at"),
    )


class EventLog(Base):
    """Append-only, hash-chained: each row's hash covers the previous row's hash."""

    __tablename__ = "event_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    event_type: Mapped[str] = mapped_column(String(64), index=True)
    audit_event_id: Mapped[int] = mapped_column(Integer)  # DICOM PS3.15 A.5 EventID (DCM code)
    outcome: Mapped[int] = mapped_column(Integer)  # 0 success, 4 minor, 8 serious, 12 major
    actor: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


APPEND_ONLY_TABLES = ("event_log", "instance_receipt")
