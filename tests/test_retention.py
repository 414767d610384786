"""Retention: only finished work is deleted, each deletion recorded, the rows kept."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from click.testing import CliRunner
from sqlalchemy import select

from dicomnode.audit.db import make_engine, make_sessionmaker, migrate, transaction
from dicomnode.audit.models import (
    Delivery,
    DeliveryStatus,
    EventLog,
    Instance,
    Job,
    JobStatus,
    Output,
    OutputState,
    Series,
    SeriesState,
    utcnow,
)
from dicomnode.cli import main
from dicomnode.node.push import requeue_dead
from dicomnode.node.retention import purge
from dicomnode.settings import Settings, parse_settings
from tests.conftest import NodeProcess, wait_for

NOW = utcnow()
MB = 1_000_000


@dataclass
class Work:
    """One series with one job and one result, as the rows and files a node leaves."""

    series_id: int
    job_id: int
    instance_file: Path
    output_dir: Path


def _work(session, settings: Settings, name: str, *, series_state: SeriesState,
          job_status: JobStatus | None, delivery: DeliveryStatus | None, age_days: float,
          size: int = MB) -> Work:
    when = NOW - timedelta(days=age_days)
    uid = f"1.2.826.0.1.3680043.10.998.{len(name)}{ord(name[0])}"
    series = Series(series_instance_uid=uid, study_instance_uid=uid + ".1", state=series_state,
                    first_received_at=when, last_received_at=when,
                    completed_at=when if series_state != SeriesState.RECEIVING else None,
                    instance_count=1)
    session.add(series)
    session.flush()
    rel = f"{uid}.1/{uid}/{uid}.2.dcm"
    instance_file = settings.spool_dir / rel
    instance_file.parent.mkdir(parents=True, exist_ok=True)
    instance_file.write_bytes(b"\0" * size)
    session.add(Instance(sop_instance_uid=uid + ".2", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                         series_id=series.id, transfer_syntax_uid="1.2.840.10008.1.2.1",
                         calling_ae="MODALITY", bytes=size, sha256="0" * 64, path=rel,
                         received_at=when))
    output_dir = settings.output_dir / "none"
    job_id = 0
    if job_status is not None:
        job = Job(idempotency_key=name, series_id=series.id, rule_name="r", pipeline="ct-tissue",
                  pipeline_version="1", input_sha256="0" * 64, destinations=["pacs"],
                  status=job_status, created_at=when,
                  finished_at=when if job_status != JobStatus.RUNNING else None)
        session.add(job)
        session.flush()
        job_id = job.id
        output_dir = settings.output_dir / str(job.id)
        output_dir.mkdir(parents=True)
        (output_dir / "seg-0000.dcm").write_bytes(b"\0" * size)
        out = Output(job_id=job.id, kind="SEG", index=0, sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                     sop_instance_uid=uid + ".3", series_instance_uid=uid + ".4",
                     path=f"{job.id}/seg-0000.dcm", bytes=size, state=OutputState.WRITTEN)
        session.add(out)
        session.flush()
        if delivery is not None:
            session.add(Delivery(output_id=out.id, destination="pacs", ae_title="PACS",
                                 host="127.0.0.1", port=4242, status=delivery,
                                 next_attempt_at=when,
                                 delivered_at=when if delivery == DeliveryStatus.DELIVERED else None))
    return Work(series.id, job_id, instance_file, output_dir)


def _settings(tmp_path: Path, db_url: str, **retention: object) -> Settings:
    return parse_settings({"var_dir": str(tmp_path / "var"), "database": {"url": db_url},
                           "retention": retention})


def test_only_finished_work_goes_and_each_deletion_is_recorded(db_url: str, tmp_path: Path) -> None:
    settings = _settings(tmp_path, db_url, received_days=7, outputs_days=7)
    migrate(db_url)
    engine = make_engine(db_url)
    factory = make_sessionmaker(engine)
    with transaction(factory) as s:
        old_done = _work(s, settings, "old-done", series_state=SeriesState.DONE,
                         job_status=JobStatus.SUCCEEDED, delivery=DeliveryStatus.DELIVERED,
                         age_days=10)
        running = _work(s, settings, "running-job", series_state=SeriesState.ROUTED,
                        job_status=JobStatus.RUNNING, delivery=None, age_days=10)
        retrying = _work(s, settings, "retrying-delivery", series_state=SeriesState.DONE,
                         job_status=JobStatus.SUCCEEDED, delivery=DeliveryStatus.RETRY,
                         age_days=10)
        dead = _work(s, settings, "dead-letter", series_state=SeriesState.DONE,
                     job_status=JobStatus.SUCCEEDED, delivery=DeliveryStatus.DEAD, age_days=9)
        recent = _work(s, settings, "recent", series_state=SeriesState.DONE,
                       job_status=JobStatus.SUCCEEDED, delivery=DeliveryStatus.DELIVERED,
                       age_days=1)
        receiving = _work(s, settings, "still-receiving-old", series_state=SeriesState.RECEIVING,
                          job_status=None, delivery=None, age_days=30)
        no_rule = _work(s, settings, "no-rule", series_state=SeriesState.DONE,
                        job_status=None, delivery=None, age_days=8)

    dry = purge(factory, settings, dry_run=True)
    chosen = {(c.kind, c.id) for c, _ in dry.chosen}
    assert chosen == {("received", old_done.series_id), ("outputs", old_done.job_id),
                      ("received", dead.series_id), ("outputs", dead.job_id),
                      ("received", no_rule.series_id)}
    assert dry.total_bytes_before == 12 * MB and dry.bytes_freed == 5 * MB
    assert old_done.instance_file.exists() and old_done.output_dir.exists()  # a dry run deletes nothing

    done = purge(factory, settings)
    assert {(c.kind, c.id) for c, _ in done.chosen} == chosen
    for gone in (old_done, dead):
        assert not gone.instance_file.exists() and not gone.output_dir.exists()
    assert not no_rule.instance_file.exists()
    assert not old_done.instance_file.parent.exists()  # empty series folder removed too
    for kept in (running, retrying, recent, receiving):
        assert kept.instance_file.exists()
    for kept in (running, retrying, recent):
        assert kept.output_dir.exists()
    with factory() as s:
        events = s.execute(select(EventLog).where(EventLog.event_type == "retention.purged")
                           ).scalars().all()
        assert sorted((e.detail["kind"], e.detail["id"]) for e in events) == sorted(chosen)
        assert all(e.audit_event_id == 110103 and e.detail["action"] == "D" for e in events)
        # rows stay, marked
        assert s.get(Series, old_done.series_id).purged_at is not None
        assert s.get(Job, old_done.job_id).outputs_purged_at is not None
        assert s.get(Series, recent.series_id).purged_at is None
        assert len(s.execute(select(Instance)).scalars().all()) == 7
    # a dead letter whose results were deleted cannot be re-queued
    assert requeue_dead(factory) == 0
    assert purge(factory, settings).chosen == []  # nothing twice

    # a size cap evicts the oldest finished work first, never unfinished work
    capped = _settings(tmp_path, db_url, received_days=None, outputs_days=None, max_gb=0.0025)
    report = purge(factory, capped)
    # 7 MB left, 2.5 MB allowed: only the recent series and its results are finished
    assert [(c.kind, c.id) for c, _ in report.chosen] == [
        ("outputs", recent.job_id), ("received", recent.series_id)]
    assert report.total_bytes_before == 7 * MB
    assert not recent.output_dir.exists() and retrying.output_dir.exists()
    engine.dispose()


def test_node_applies_the_policy_and_a_restart_does_not_alarm(make_node, tmp_path: Path) -> None:
    """A series no rule wants is finished at once; with received_days 0 the node's own sweep
    deletes its files; the start-up reconciliation then expects them gone (no alert)."""
    from dicomnode.demo.sample import write_phantom_ct
    from tests.conftest import storescu

    write_phantom_ct(tmp_path / "ct", slices=4, size=32)
    node: NodeProcess = make_node(rules=[], retention={"received_days": 0, "sweep_s": 0.5})
    assert storescu(tmp_path / "ct", node.port).returncode == 0

    def purged() -> bool:
        with node.session() as s:
            return s.execute(select(Series.purged_at)).scalar_one_or_none() is not None
    wait_for(purged, timeout=60)
    assert list(node.settings.spool_dir.glob("*/*/*.dcm")) == []
    assert node.stop() == 0
    node.start()
    with node.session() as s:
        started = s.execute(select(EventLog).where(EventLog.event_type == "node.started")
                            .order_by(EventLog.id.desc())).scalars().first()
        reconciled = s.execute(select(EventLog).where(
            EventLog.event_type == "spool.reconciled")).scalars().all()
    assert started is not None and started.detail["instances_missing"] == 0
    assert reconciled == []


def test_purge_cli_dry_run_lists_and_changes_nothing(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'node.sqlite'}"
    settings = _settings(tmp_path, db_url)
    migrate(db_url)
    factory = make_sessionmaker(make_engine(db_url))
    with transaction(factory) as s:
        work = _work(s, settings, "old", series_state=SeriesState.DONE,
                     job_status=JobStatus.SUCCEEDED, delivery=DeliveryStatus.DELIVERED,
                     age_days=30)
    config = tmp_path / "node.yaml"
    config.write_text(json.dumps({"var_dir": str(tmp_path / "var"), "database": {"url": db_url}}))
    result = CliRunner().invoke(main, ["purge", "--config", str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "would delete 2 items, 2.0 MB of 2.0 MB" in result.output
    assert work.instance_file.exists()
    result = CliRunner().invoke(main, ["purge", "--config", str(config), "--json"])
    assert json.loads(result.output)["bytes_freed"] == 2 * MB
    assert not work.instance_file.exists() and not work.output_dir.exists()
