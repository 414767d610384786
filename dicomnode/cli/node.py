"""Node operations, for IT admins: config, db, serve, rules, status, audit, send, echo, retry, purge."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from dicomnode.cli.common import CONFIG_OPTION, load_or_exit, tls_options, tls_or_exit
from dicomnode.settings import (
    DEVICE_PATTERN,
    ConfigError,
    Settings,
    json_schema,
    load_settings,
)


# -- config ---------------------------------------------------------------------------------
@click.group()
def config() -> None:
    """Check the settings file or print its JSON Schema."""


@config.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def config_check(file: Path) -> None:
    """Exit 0 if FILE is valid; otherwise print each bad key with the reason and exit 1."""
    from dicomnode.app import check_pipelines

    try:
        settings = load_settings(file)
        check_pipelines(settings)
    except ConfigError as exc:
        click.echo(f"invalid: {exc}", err=True)
        sys.exit(1)
    click.echo(f"{file}: valid ({len(settings.rules)} rules, "
               f"{len(settings.destinations)} destinations)")


@config.command("schema")
def config_schema() -> None:
    """Print the JSON Schema of the settings file."""
    click.echo(json.dumps(json_schema(), indent=2))


# -- db -------------------------------------------------------------------------------------
@click.group()
def db() -> None:
    """Database migrations."""


@db.command("upgrade")
@CONFIG_OPTION
@click.option("--revision", default="head", show_default=True)
def db_upgrade(config_path: Path | None, revision: str) -> None:
    """Apply migrations up to REVISION."""
    from dicomnode.audit.db import migrate

    settings = load_or_exit(config_path)
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.database_url, revision)
    click.echo(f"database at {revision}")


# -- serve ----------------------------------------------------------------------------------
@click.command()
@CONFIG_OPTION
def serve(config_path: Path | None) -> None:
    """Run the node until SIGTERM / SIGINT (stop accepting, finish in-flight work, exit)."""
    from dicomnode.app import Node, config_sha256, stop_on_signals

    logging.getLogger().setLevel(logging.INFO)
    settings = load_or_exit(config_path)
    # received instances, results and the database hold patient data: readable by the node's
    # user only (files 0600, folders 0700), whatever the login's umask
    os.umask(0o077)
    try:
        node = Node(settings, config_sha256=config_sha256(config_path))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    stop = threading.Event()
    stop_on_signals(stop)
    node.run(stop)


@click.command()
@CONFIG_OPTION
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: the config's).")
@click.option("--queue", "queues", multiple=True,
              help="Consume only these queues (default: every queue the config names).")
@click.option("--name", default=None, help="Worker name shown by the broker.")
def worker(config_path: Path | None, device: str | None, queues: tuple[str, ...],
           name: str | None) -> None:
    """Run one worker for the celery executor (one per GPU) until SIGTERM: it takes job ids
    from RabbitMQ, claims each job in the shared database and runs it here."""
    settings = load_or_exit(config_path)
    if settings.executor.kind != "celery":
        raise click.ClickException("executor.kind is not celery: the node runs its own workers")
    if device is not None and not re.match(DEVICE_PATTERN, device):
        raise click.BadParameter(f"{device!r}: cpu, cuda or cuda:N", param_hint="--device")
    try:
        from dicomnode.node.executors.celery_executor import run_worker
    except ImportError as exc:
        raise click.ClickException(f"{exc}: pip install 'dicomnode[celery]'") from None
    os.umask(0o077)
    run_worker(settings, device=device, queues=list(queues) or None, name=name)


# -- rules ----------------------------------------------------------------------------------
@click.group()
def rules() -> None:
    """Routing rules."""


@rules.command("test")
@CONFIG_OPTION
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
def rules_test(config_path: Path | None, folder: Path) -> None:
    """Dry run: which rule each series in FOLDER matches, and why (calling AE not considered)."""
    import pydicom

    from dicomnode.node.route import evaluate_rules, header_values

    settings = load_or_exit(config_path)
    seen: dict[str, Any] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if uid and uid not in seen:
            seen[uid] = ds
    if not seen:
        raise click.ClickException(f"no DICOM series found under {folder}")
    for uid, ds in seen.items():
        click.echo(f"series {uid} ({ds.get('Modality', '?')}, "
                   f"{str(ds.get('SeriesDescription', ''))[:40]!r})")
        for ev in evaluate_rules(settings.rules, values=header_values(ds, settings.rules),
                                 calling_ae=None):
            rule = next(r for r in settings.rules if r.name == ev.rule)
            mark = "MATCH" if ev.matched else "no   "
            extra = f" -> pipelines {rule.pipelines}, destinations {rule.destinations}" \
                if ev.matched else ""
            click.echo(f"  {mark} {ev.rule}: {ev.reason}{extra}")


# -- status / audit -------------------------------------------------------------------------
def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def status_report(settings: Settings) -> dict[str, Any]:
    """The node's state as plain data (``dicomnode status --json``)."""
    from sqlalchemy import select

    from dicomnode.app import open_database
    from dicomnode.audit.models import Delivery, Job, Output, Series

    engine, factory = open_database(settings, upgrade=False)
    try:
        with factory() as session:
            series = session.execute(select(Series).order_by(Series.id)).scalars().all()
            jobs = session.execute(select(Job).order_by(Job.id)).scalars().all()
            uid_of = {s.id: s.series_instance_uid for s in series}
            deliveries = session.execute(
                select(Delivery, Output).join(Output, Output.id == Delivery.output_id)
                .order_by(Delivery.id)
            ).all()
    finally:
        engine.dispose()
    return {
        "series": [
            {"series_instance_uid": s.series_instance_uid, "study_instance_uid":
             s.study_instance_uid, "modality": s.modality, "state": s.state.value,
             "instances": s.instance_count, "expected": s.expected_count,
             "calling_ae": s.calling_ae, "first_received_at": _iso(s.first_received_at),
             "last_received_at": _iso(s.last_received_at), "completed_at": _iso(s.completed_at),
             "completion_reason": s.completion_reason, "matched_rules": s.matched_rules}
            for s in series
        ],
        "jobs": [
            {"id": j.id, "series_instance_uid": uid_of.get(j.series_id), "pipeline": j.pipeline,
             "pipeline_version": j.pipeline_version, "rule": j.rule_name,
             "status": j.status.value, "attempts": j.attempts, "progress": j.progress,
             "device": j.device, "created_at": _iso(j.created_at),
             "started_at": _iso(j.started_at), "finished_at": _iso(j.finished_at),
             "timings": j.timings, "error_code": j.error_code, "error_detail": j.error_detail}
            for j in jobs
        ],
        "deliveries": [
            {"id": d.id, "destination": d.destination, "status": d.status.value,
             "attempts": d.attempts, "kind": o.kind, "sop_instance_uid": o.sop_instance_uid,
             "series_instance_uid": o.series_instance_uid, "job_id": o.job_id,
             "last_dimse_status": d.last_dimse_status, "last_error": d.last_error,
             "delivered_at": _iso(d.delivered_at)}
            for d, o in deliveries
        ],
    }


@click.command()
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config_path: Path | None, as_json: bool) -> None:
    """Series, jobs (with progress), the outbox and dead letters."""
    report = status_report(load_or_exit(config_path))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"SERIES ({len(report['series'])})")
    for s in report["series"]:
        click.echo(f"  {s['series_instance_uid']}  {s['modality'] or '?':3} {s['state']:9} "
                   f"{s['instances']:5} inst  {s['completion_reason'] or ''}")
    click.echo(f"JOBS ({len(report['jobs'])})")
    for j in report["jobs"]:
        err = f"  {j['error_code']}: {j['error_detail']}" if j["error_code"] else ""
        click.echo(f"  #{j['id']:<4} {j['pipeline']:12} {j['status']:9} "
                   f"{100 * (j['progress'] or 0):5.1f}%  attempts {j['attempts']}{err}")
    counts = Counter(d["status"] for d in report["deliveries"])
    click.echo(f"OUTBOX  {dict(counts) or 'empty'}")
    for d in report["deliveries"]:
        if d["status"] == "DEAD":
            click.echo(f"  dead letter #{d['id']} -> {d['destination']}: {d['kind']} "
                       f"{d['sop_instance_uid']} status={d['last_dimse_status']} "
                       f"{d['last_error'] or ''}")


@click.command()
@CONFIG_OPTION
@click.option("--series", "series_uid", default=None, help="Only events of this series.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--verify", is_flag=True, help="Check the hash chain of the event log.")
def audit(config_path: Path | None, series_uid: str | None, as_json: bool, verify: bool) -> None:
    """The audit event log (UIDs, counts and statuses; no patient data)."""
    from sqlalchemy import select

    from dicomnode.app import open_database
    from dicomnode.audit.events import verify_chain
    from dicomnode.audit.models import EventLog

    engine, factory = open_database(load_or_exit(config_path), upgrade=False)
    try:
        with factory() as session:
            if verify:
                broken = verify_chain(session)
                if broken is not None:
                    raise click.ClickException(f"event log hash chain broken at row {broken}")
                click.echo("event log hash chain intact")
                return
            query = select(EventLog).order_by(EventLog.id)
            if series_uid:
                query = query.where(EventLog.series_instance_uid == series_uid)
            rows = session.execute(query).scalars().all()
    finally:
        engine.dispose()
    events = [
        {"id": e.id, "at": e.at.isoformat(), "event_type": e.event_type,
         "audit_event_id": e.audit_event_id, "outcome": e.outcome, "actor": e.actor,
         "series_instance_uid": e.series_instance_uid, "detail": e.detail}
        for e in rows
    ]
    if as_json:
        click.echo(json.dumps(events, indent=2))
        return
    for e in events:
        click.echo(f"{e['at']}  {e['event_type']:22} {e['audit_event_id']} o={e['outcome']:<2} "
                   f"{e['actor']:16} {json.dumps(e['detail'])[:120]}")


@click.command()
@CONFIG_OPTION
@click.argument("uid")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def trace(config_path: Path | None, uid: str, as_json: bool) -> None:
    """Where UID came from and went: input series -> rule -> job -> model and weights sha256
    -> outputs -> deliveries. UID: any Study, Series or SOP Instance UID, input or output.
    Exit 1 when the audit trail does not know it."""
    from dicomnode.app import open_database
    from dicomnode.audit.trace import format_trace
    from dicomnode.audit.trace import trace as trace_uid

    engine, factory = open_database(load_or_exit(config_path), upgrade=False)
    try:
        with factory() as session:
            chain = trace_uid(session, uid)
    finally:
        engine.dispose()
    click.echo(json.dumps(chain, indent=2) if as_json else format_trace(chain))
    if not chain["series"]:
        sys.exit(1)


# -- network tools --------------------------------------------------------------------------
@click.command()
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=11112, show_default=True, type=int)
@click.option("--called-aet", default="DICOMNODE", show_default=True)
@click.option("--calling-aet", default="DICOMNODE-SCU", show_default=True)
@tls_options
def send(paths: tuple[Path, ...], host: str, port: int, called_aet: str, calling_aet: str,
         tls_cert: Path | None, tls_key: Path | None, tls_ca: Path | None) -> None:
    """C-STORE files (folders recursively) over one association per batch."""
    from dicomnode.dicom.net import send_files

    tls = tls_or_exit(tls_cert, tls_key, tls_ca)
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))
             if f.is_file()]
    result = send_files(files, host=host, port=port, called_aet=called_aet,
                        calling_aet=calling_aet, tls=tls)
    click.echo(f"sent {result.ok} ok, {result.failed} failed, {result.skipped} skipped")
    if result.failed or result.ok == 0:
        sys.exit(1)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=11112, show_default=True, type=int)
@click.option("--called-aet", default="DICOMNODE", show_default=True)
@tls_options
def echo(host: str, port: int, called_aet: str, tls_cert: Path | None, tls_key: Path | None,
         tls_ca: Path | None) -> None:
    """C-ECHO a peer."""
    from dicomnode.dicom.net import echo as do_echo

    tls = tls_or_exit(tls_cert, tls_key, tls_ca)
    status_code = do_echo(host=host, port=port, called_aet=called_aet, tls=tls)
    if status_code != 0:
        raise click.ClickException(f"C-ECHO failed (status {status_code})")
    click.echo("C-ECHO ok")



@click.command()
@CONFIG_OPTION
@click.option("--id", "ids", multiple=True, type=int, help="Only these delivery ids.")
def retry(config_path: Path | None, ids: tuple[int, ...]) -> None:
    """Put dead-letter deliveries back in the outbox."""
    from dicomnode.app import open_database
    from dicomnode.node.push import requeue_dead

    engine, factory = open_database(load_or_exit(config_path), upgrade=False)
    try:
        count = requeue_dead(factory, delivery_ids=list(ids) or None)
    finally:
        engine.dispose()
    click.echo(f"{count} deliveries re-queued")


@click.command()
@CONFIG_OPTION
@click.option("--dry-run", is_flag=True, help="Only list what the policy would delete now.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def purge(config_path: Path | None, dry_run: bool, as_json: bool) -> None:
    """Apply the retention policy now (the node also runs it every retention.sweep_s)."""
    from dicomnode.app import open_database
    from dicomnode.node.retention import purge as run_purge

    settings = load_or_exit(config_path)
    engine, factory = open_database(settings, upgrade=False)
    try:
        report = run_purge(factory, settings, dry_run=dry_run, actor="cli")
    finally:
        engine.dispose()
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    verb = "would delete" if dry_run else "deleted"
    for item, why in report.chosen:
        click.echo(f"{item.kind:9} {item.series_instance_uid}  "
                   f"{'job ' + str(item.id) if item.kind == 'outputs' else '':10} "
                   f"{item.bytes / 1e6:9.1f} MB  finished {item.finished_at:%Y-%m-%d %H:%M}  ({why})")
    click.echo(f"{verb} {len(report.chosen)} items, {report.bytes_freed / 1e6:.1f} MB of "
               f"{report.total_bytes_before / 1e6:.1f} MB"
               + (f"; {report.skipped} changed since and were kept" if report.skipped else ""))
