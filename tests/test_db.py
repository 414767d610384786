"""Audit schema: migrations both ways on SQLite and PostgreSQL, append-only triggers, hash chain,
and concurrent job claims."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import inspect, select, text, update
from sqlalchemy.exc import DBAPIError

from dicomnode.audit.db import downgrade, make_engine, make_sessionmaker, migrate, transaction
from dicomnode.audit.events import AuditEventID, record_event, verify_chain
from dicomnode.audit.models import Base, EventLog, InstanceReceipt, Job, JobStatus, Series
from dicomnode.node.jobs import claim_job, enqueue_job


def test_upgrade_downgrade_upgrade_matches_models(db_url: str) -> None:
    migrate(db_url)
    downgrade(db_url, "base")
    migrate(db_url)
    engine = make_engine(db_url)
    try:
        tables = set(inspect(engine).get_table_names()) - {"alembic_version"}
        assert tables == set(Base.metadata.tables)
        for name, table in Base.metadata.tables.items():
            cols = {c["name"] for c in inspect(engine).get_columns(name)}
            assert cols == {c.name for c in table.columns}, name
    finally:
        engine.dispose()


def test_event_log_is_append_only_and_chained(db_url: str) -> None:
    migrate(db_url)
    engine = make_engine(db_url)
    factory = make_sessionmaker(engine)
    try:
        for i in range(3):
            with transaction(factory) as s:
                record_event(s, "test.event", audit_event_id=AuditEventID.APPLICATION_ACTIVITY,
                             actor="test", detail={"i": i})
        with factory() as s:
            assert verify_chain(s) is None
            rows = s.execute(select(EventLog).order_by(EventLog.id)).scalars().all()
            assert rows[1].prev_hash == rows[0].hash and rows[2].prev_hash == rows[1].hash
        with transaction(factory) as s:
            s.add(InstanceReceipt(sop_instance_uid="1.2", sha256="0" * 64, bytes=1,
                                  action="create", dimse_status=0))
        for stmt in ("UPDATE event_log SET actor = 'x'", "DELETE FROM event_log",
                     "DELETE FROM instance_receipt", "UPDATE instance_receipt SET bytes = 2"):
            with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
                conn.execute(text(stmt))
        with factory() as s:
            assert s.execute(select(EventLog)).scalars().all()[0].actor == "test"
    finally:
        engine.dispose()


def test_tampering_is_detected(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'x.sqlite'}"
    migrate(url)
    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    for i in range(3):
        with transaction(factory) as s:
            record_event(s, "t", audit_event_id=AuditEventID.APPLICATION_ACTIVITY, actor="a",
                         detail={"i": i})
    with engine.begin() as conn:  # an attacker with file access drops the trigger first
        conn.execute(text("DROP TRIGGER trg_event_log_no_update"))
        conn.execute(text("UPDATE event_log SET detail = '{\"i\": 9}' WHERE id = 2"))
    with factory() as s:
        assert verify_chain(s) == 2
    engine.dispose()


def _queue(url: str, pipelines: list[str], *, max_attempts: int) -> tuple:
    """A migrated database with one series and a queued job per pipeline."""
    migrate(url)
    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    with transaction(factory) as s:
        series = Series(series_instance_uid="1.2.3", study_instance_uid="1.2")
        s.add(series)
        s.flush()
        for name in pipelines:
            enqueue_job(s, series=series, rule_name="r", pipeline=name, pipeline_version="1",
                        input_sha256="0" * 64, destinations=[], max_attempts=max_attempts)
    return engine, factory


def test_three_claimers_get_different_jobs(db_url: str) -> None:
    engine, factory = _queue(db_url, [f"p{n}" for n in range(6)], max_attempts=3)
    with transaction(factory) as s:
        series = s.execute(select(Series)).scalar_one()
        # the same input through the same pipeline version is not queued twice
        assert enqueue_job(s, series=series, rule_name="r", pipeline="p0", pipeline_version="1",
                           input_sha256="0" * 64, destinations=[], max_attempts=3) is None
    claimed: list[int] = []
    lock = threading.Lock()

    def claimer(name: str) -> None:
        while (job := claim_job(factory, owner=name, lease_s=60, device="cpu")) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 6
    with factory() as s:
        assert {j.attempts for j in s.execute(select(Job)).scalars()} == {1}
    engine.dispose()



def test_job_retries_use_their_own_capped_backoff(tmp_path) -> None:
    """A failed job waits retry_backoff_s x 2^(attempt-1), at most retry_backoff_max_s (it used
    the push backoff, uncapped: 2 s x 2^11 = 68 min before attempt 12)."""
    from datetime import timedelta

    from dicomnode.audit.models import utcnow
    from dicomnode.node.jobs import finish_job
    from dicomnode.settings import parse_settings

    executor = parse_settings({"executor": {"retry_backoff_s": 30, "retry_backoff_max_s": 600}
                               }).executor
    engine, factory = _queue(f"sqlite:///{tmp_path / 'j.db'}", ["p"], max_attempts=20)
    waits = []
    for _ in range(8):
        job = claim_job(factory, owner="w", lease_s=60, device="cpu")
        assert job is not None
        with transaction(factory) as s:
            before = utcnow()
            finish_job(s, job_id=job.id, owner="w", succeeded=False, error_code="E",
                       backoff_s=executor.retry_backoff_s,
                       backoff_max_s=executor.retry_backoff_max_s)
            row = s.get(Job, job.id)
            waits.append(round((row.next_attempt_at - before) / timedelta(seconds=1)))
            row.next_attempt_at = before  # due again at once, for the next round
    assert waits == [30, 60, 120, 240, 480, 600, 600, 600]
    engine.dispose()


def test_trace_follows_any_uid_to_the_whole_chain(tmp_path) -> None:
    from dicomnode.audit.models import Delivery, Output, OutputState
    from dicomnode.audit.trace import format_trace, trace

    engine, factory = _queue(f"sqlite:///{tmp_path / 't.db'}", ["p"], max_attempts=3)
    with transaction(factory) as s:
        job = s.execute(select(Job)).scalar_one()
        job.weights_sha256, job.model_name, job.model_version = "c" * 64, "m", "2"
        out = Output(job_id=job.id, kind="SEG", index=0, sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                     sop_instance_uid="2.25.7", series_instance_uid="2.25.8", path="x.dcm",
                     state=OutputState.WRITTEN)
        s.add(out)
        s.flush()
        s.add(Delivery(output_id=out.id, destination="pacs", ae_title="PACS", host="h", port=104))
    with factory() as s:
        for uid, found_as in (("1.2.3", "input series"), ("1.2", "input study"),
                              ("2.25.7", "output"), ("2.25.8", "output")):
            chain = trace(s, uid)
            assert chain["found_as"] == found_as, uid
            (series,) = chain["series"]
            (j,) = series["jobs"]
            assert series["series_instance_uid"] == "1.2.3"
            assert j["weights_sha256"] == "c" * 64 and j["outputs"][0]["sop_instance_uid"] == "2.25.7"
            assert j["outputs"][0]["deliveries"][0]["status"] == "PENDING"
        text = format_trace(trace(s, "2.25.7"))
        assert "model m 2, weights sha256 " + "c" * 64 in text and "pacs PENDING" in text
        unknown = trace(s, "9.9.9")
        assert unknown == {"uid": "9.9.9", "found_as": "unknown", "series": []}
    engine.dispose()


def test_publish_due_hands_each_attempt_to_the_broker_once(db_url: str) -> None:
    from datetime import timedelta

    from dicomnode.audit.models import utcnow
    from dicomnode.node.jobs import publish_due, reclaim_expired

    engine, factory = _queue(db_url, ["p0", "p1"], max_attempts=3)
    sent: list[tuple[int, str]] = []
    assert publish_due(factory, lambda i, p: sent.append((i, p))) == 2
    assert publish_due(factory, lambda i, p: sent.append((i, p))) == 0  # already published
    assert [p for _, p in sent] == ["p0", "p1"]
    # a broker that is down: nothing is marked, the next sweep publishes
    with transaction(factory) as s:
        s.execute(update(Job).values(published_attempt=None))

    def down(job_id: int, pipeline: str) -> None:
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        publish_due(factory, down)
    assert publish_due(factory, lambda i, p: None) == 2
    # the attempt a dead worker held comes back after its lease, and is published again
    job = claim_job(factory, owner="w", lease_s=60, device="cpu", job_id=sent[0][0])
    assert job is not None and job.attempt == 1
    assert claim_job(factory, owner="w2", lease_s=60, device="cpu", job_id=sent[0][0]) is None
    with transaction(factory) as s:
        s.execute(update(Job).where(Job.id == job.id)
                  .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert reclaim_expired(factory) == 1
    again: list[int] = []
    assert publish_due(factory, lambda i, p: again.append(i)) == 1 and again == [job.id]
    engine.dispose()


def test_a_node_restart_gives_the_cut_attempt_back_up_to_a_cap(db_url: str) -> None:
    """A job cut by the node's own death (start-up reclaim) keeps its attempts: three power
    cuts during one job used to leave it DEAD. A job that takes the node down every time
    still ends DEAD once ``restart_cap`` is reached; an expired lease (the worker's death)
    always counts."""
    from datetime import timedelta

    from dicomnode.audit.models import utcnow
    from dicomnode.node.jobs import reclaim_expired

    engine, factory = _queue(db_url, ["p"], max_attempts=1)
    states = []
    for _ in range(4):
        assert claim_job(factory, owner="w", lease_s=60, device="cpu") is not None
        assert reclaim_expired(factory, all_running=True, restart_cap=3) == 1
        with factory() as s:
            job = s.execute(select(Job)).scalar_one()
            states.append((job.status.value, job.attempts, job.max_attempts, job.error_code))
        if job.status == JobStatus.DEAD:
            break
    assert states == [("QUEUED", 1, 2, "node_restart"), ("QUEUED", 2, 3, "node_restart"),
                      ("DEAD", 3, 3, "node_restart")]
    # a worker's expired lease is the job's own attempt: max_attempts stays
    with transaction(factory) as s:
        s.execute(update(Job).values(status=JobStatus.QUEUED, attempts=0, max_attempts=2,
                                     finished_at=None))
    assert claim_job(factory, owner="w", lease_s=60, device="cpu") is not None
    with transaction(factory) as s:
        s.execute(update(Job).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert reclaim_expired(factory, restart_cap=10) == 1
    with factory() as s:
        job = s.execute(select(Job)).scalar_one()
        assert (job.max_attempts, job.error_code) == (2, "lease_expired")
    engine.dispose()
