"""The command line: the only entry point. Every command touching node state takes --config."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from dicomnode.settings import ConfigError, Settings, json_schema, load_settings

CONFIG_OPTION = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="Settings YAML (default: the embedded config/dicomnode.yaml).",
)


def _settings(config_path: Path | None) -> Settings:
    try:
        return load_settings(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def main(verbose: bool) -> None:
    """dicomnode: a DICOM-native AI node for hospital PACS."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("apscheduler", "alembic", "pynetdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# -- config ---------------------------------------------------------------------------------
@main.group()
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
@main.group()
def db() -> None:
    """Database migrations."""


@db.command("upgrade")
@CONFIG_OPTION
@click.option("--revision", default="head", show_default=True)
def db_upgrade(config_path: Path | None, revision: str) -> None:
    """Apply migrations up to REVISION."""
    from dicomnode.audit.db import migrate

    settings = _settings(config_path)
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.database_url, revision)
    click.echo(f"database at {revision}")


# -- serve ----------------------------------------------------------------------------------
@main.command()
@CONFIG_OPTION
def serve(config_path: Path | None) -> None:
    """Run the node until SIGTERM / SIGINT (stop accepting, finish in-flight work, exit)."""
    from dicomnode.app import Node, config_sha256

    logging.getLogger().setLevel(logging.INFO)
    settings = _settings(config_path)
    try:
        node = Node(settings, config_sha256=config_sha256(config_path))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    node.run(stop)


# -- rules ----------------------------------------------------------------------------------
@main.group()
def rules() -> None:
    """Routing rules."""


@rules.command("test")
@CONFIG_OPTION
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
def rules_test(config_path: Path | None, folder: Path) -> None:
    """Dry run: which rule each series in FOLDER matches, and why (calling AE not considered)."""
    import pydicom

    from dicomnode.route import evaluate_rules, header_values

    settings = _settings(config_path)
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


@main.command()
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config_path: Path | None, as_json: bool) -> None:
    """Series, jobs (with progress), the outbox and dead letters."""
    report = status_report(_settings(config_path))
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


@main.command()
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

    engine, factory = open_database(_settings(config_path), upgrade=False)
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


# -- network tools --------------------------------------------------------------------------
@main.command()
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=11112, show_default=True, type=int)
@click.option("--called-aet", default="DICOMNODE", show_default=True)
@click.option("--calling-aet", default="DICOMNODE-SCU", show_default=True)
def send(paths: tuple[Path, ...], host: str, port: int, called_aet: str, calling_aet: str) -> None:
    """C-STORE files (folders recursively) over one association per batch."""
    from dicomnode.scu import send_files

    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))
             if f.is_file()]
    result = send_files(files, host=host, port=port, called_aet=called_aet,
                        calling_aet=calling_aet)
    click.echo(f"sent {result.ok} ok, {result.failed} failed, {result.skipped} skipped")
    if result.failed or result.ok == 0:
        sys.exit(1)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=11112, show_default=True, type=int)
@click.option("--called-aet", default="DICOMNODE", show_default=True)
def echo(host: str, port: int, called_aet: str) -> None:
    """C-ECHO a peer."""
    from dicomnode.scu import echo as do_echo

    status_code = do_echo(host=host, port=port, called_aet=called_aet)
    if status_code != 0:
        raise click.ClickException(f"C-ECHO failed (status {status_code})")
    click.echo("C-ECHO ok")


@main.group()
def models() -> None:
    """The model registry (models/)."""


@models.command("list")
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True)
def models_list(config_path: Path | None, as_json: bool) -> None:
    """The models found, with version, task, layout and what they were trained on."""
    from dicomnode.models import scan_models

    settings = _settings(config_path)
    found, problems = scan_models(settings.models_path)
    rows = [{"name": n, "version": e.manifest.version, "task": e.manifest.task,
             "layout": e.layout, "verified": e.verified, "labels": len(e.manifest.labels),
             "trained_on": e.manifest.trained_on, "path": str(e.path), "notes": list(e.notes)}
            for n, e in found.items()]
    if as_json:
        click.echo(json.dumps({"models": rows, "problems": problems}, indent=2))
        return
    click.echo(f"models in {settings.models_path}:")
    for r in rows:
        mark = "sha256 ok" if r["verified"] else "UNVERIFIED"
        click.echo(f"  {r['name']} {r['version']}  {r['task']}  {r['layout']}  {mark}  "
                   f"trained on: {r['trained_on']}")
    for p in problems:
        click.echo(f"  PROBLEM: {p}")


@models.command("check")
@CONFIG_OPTION
def models_check(config_path: Path | None) -> None:
    """Exit 1 if any model directory fails (missing weights, sha256 mismatch, bad manifest)."""
    from dicomnode.models import scan_models

    settings = _settings(config_path)
    found, problems = scan_models(settings.models_path)
    for p in problems:
        click.echo(f"PROBLEM: {p}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"{len(found)} models ok")


@models.command("input-level")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--cases", default=8, show_default=True, help="As the model was trained with.")
@click.option("--drf", "drfs", multiple=True, type=int, default=(4, 10), show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--pet-mm", "pet_mm", multiple=True, type=click.FloatRange(min=0.5))
@click.option("--pairs", "pair_dirs", multiple=True, type=str,
              help="A site's LOW_DIR:FULL_DIR pairs, when the model was trained on those.")
@click.option("--processes", default=os.cpu_count() or 1, show_default=True)
@click.option("--data-cache", type=click.Path(path_type=Path), default=None,
              help="As for train pet-denoise: the simulated pairs are read from it when it "
                   "exists, else saved there.")
@click.option("--start", "start_dir", type=click.Path(exists=True, file_okay=False,
                                                      path_type=Path), default=None,
              help="The model these weights were fine-tuned from: its input_level widens "
                   "the range (as train pet-denoise --init does).")
@click.option("--version", default=None, help="Write this manifest version too (the model's "
              "output changes for series outside the range).")
def models_input_level(model_dir: Path, cases: int, drfs: tuple[int, ...], seed: int,
                       pet_mm: tuple[float, ...], pair_dirs: tuple[str, ...], processes: int,
                       data_cache: Path | None, start_dir: Path | None,
                       version: str | None) -> None:
    """Write a pet-denoise model's input_level from its training data, rebuilt from the same
    arguments as its training (for models trained before train pet-denoise wrote it). The
    weights and their sha256 are unchanged; the data's description must begin the manifest's
    trained_on, or nothing is written."""
    import yaml

    from dicomnode.models import Manifest
    from dicomnode.pipelines.pet_denoise import training_input_level
    from dicomnode.training import cached_pairs, simulated_pet_pairs, site_pet_pairs

    manifest_path = model_dir / "manifest.yaml"
    data = yaml.safe_load(manifest_path.read_text())
    if data.get("task") != "pet-denoise":
        raise click.ClickException(f"{model_dir}: task {data.get('task')!r}, not pet-denoise")
    start = None
    if start_dir is not None:
        start = Manifest.model_validate(
            yaml.safe_load((start_dir / "manifest.yaml").read_text())).input_level
        if start is None:
            raise click.ClickException(f"{start_dir} has no input_level: measure it first")
    if pair_dirs:
        pairs, source = site_pet_pairs(list(pair_dirs))
    else:
        pairs, source = cached_pairs(data_cache, lambda: simulated_pet_pairs(
            cases=cases, drfs=drfs, seed=seed, processes=processes, pet_mm=pet_mm or None))
    if not str(data.get("trained_on", "")).startswith(source):
        raise click.ClickException(
            f"{model_dir} was not trained on these data: its trained_on is "
            f"{data.get('trained_on')!r}, these are {source!r}")
    (low, high), levels = training_input_level(pairs, start)
    click.echo(f"{len(levels)} training inputs, activity level {min(levels):.4f}-"
               f"{max(levels):.4f}" + (f", widened to {start_dir}'s {start[0]}-{start[1]}"
                                       if start else "") + f": input_level [{low}, {high}]")
    out: dict[str, Any] = {}
    for key, value in data.items():  # input_level after normalisation, as train writes it
        if key != "input_level":
            out[key] = version if key == "version" and version else value
        if key == "normalisation":
            out["input_level"] = [low, high]
    out.setdefault("input_level", [low, high])
    Manifest.model_validate(out)  # validated before anything is written
    manifest_path.write_text(yaml.safe_dump(out, sort_keys=False))
    stats_path = model_dir / "training.json"
    if stats_path.exists():
        stats = json.loads(stats_path.read_text())
        stats["input_levels"] = [round(lv, 4) for lv in levels]
        stats_path.write_text(json.dumps(stats, indent=2))
    click.echo(f"wrote {manifest_path}")


# both training commands: validation phantoms are seeds N, N + 1, ... (checked against the
# training and benchmark phantoms, training.validation_seeds_taken)
validation_seed_option = click.option(
    "--validation-seed", default=500, show_default=True,
    help="First validation phantom seed (not a training phantom's; the benchmark's are 1000+).")


@main.group()
def train() -> None:
    """Train the models that need paired data (on simulated data or a site's own pairs)."""


@train.command("pet-denoise")
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path),
              help="Model directory to write (e.g. models/pet-denoise-drmc).")
@click.option("--cases", default=8, show_default=True, help="Simulated cases (phantoms and, "
              "when ../shared/data is present, the LIDC CT).")
@click.option("--drf", "drfs", multiple=True, type=int, default=(4, 10), show_default=True)
@click.option("--seconds", default=180.0, show_default=True, help="Training time.")
@click.option("--pairs", "pair_dirs", multiple=True, type=str,
              help="A site's own data instead: LOW_DIR:FULL_DIR pairs of DICOM PET folders.")
@click.option("--seed", default=0, show_default=True)
@click.option("--version", default="1.0.0", show_default=True, help="Model version to write.")
@click.option("--processes", default=os.cpu_count() or 1, show_default=True,
              help="Processes reconstructing the simulated PET.")
@click.option("--lesion-weight", default=1.0, show_default=True,
              help="Weight of lesion voxels in the loss (simulated data has lesion labels).")
@click.option("--init", "init_dir", type=click.Path(exists=True, file_okay=False,
                                                    path_type=Path), default=None,
              help="Continue from this model directory (same configuration).")
@click.option("--data-cache", type=click.Path(path_type=Path), default=None,
              help="An .npz file: the simulated pairs are saved there, or read from it when "
              "it exists (the simulation is the slow part).")
@click.option("--pet-mm", "pet_mm", multiple=True, type=click.FloatRange(min=0.5),
              help="PET voxel size of the simulated cases in mm (default: the twin's, 4); "
                   "repeated, case i uses the i-th modulo their number (README: train on the "
                   "voxel sizes the model will see).")
@click.option("--validation-cases", default=0, show_default=True, type=click.IntRange(0),
              help="Simulated whole-body phantoms (seeds --validation-seed, +1, ...; on the "
                   "--pet-mm grids in turn) to score checkpoints on: the checkpoint kept is the "
                   "best by PSNR among those with no higher lesion SUVmax bias than the start "
                   "(0: keep the last iterate).")
@validation_seed_option
@click.option("--validation-pairs", "validation_dirs", multiple=True, type=str,
              help="With --pairs: LOW_DIR:FULL_DIR pairs to score checkpoints on instead, none "
                   "of them among --pairs.")
@click.option("--validate-every", default=180.0, show_default=True,
              type=click.FloatRange(min=1.0), help="Seconds of training between checkpoints.")
@click.option("--scale-augment", nargs=2, type=click.FloatRange(min=0.01), default=None,
              help="LOW HIGH: multiply every training patch pair by a factor drawn "
                   "log-uniform from this range (other activity levels than the data's).")
@click.option("--count-scale", nargs=2, type=click.FloatRange(min=0.01), default=None,
              help="LOW HIGH: simulated cases (training and validation alike) acquire "
                   "LOW to HIGH times the counts, log-spaced across the cases (other noise "
                   "levels than the twin's default).")
@click.option("--peak-weight", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
              help="Add this times each lesion's relative SUVmax error against the full-dose "
                   "image (a Charbonnier of it) to the loss (0: Charbonnier only, as DRMC).")
@click.option("--select", type=click.Choice(["psnr", "b_max"]), default="psnr",
              show_default=True,
              help="Validation checkpoint to keep: psnr, the best PSNR among those with no "
                   "higher lesion SUVmax bias than the start; b_max, the lowest SUVmax bias "
                   "among those within --psnr-slack dB of the start's PSNR.")
@click.option("--lr", default=1e-4, show_default=True, type=click.FloatRange(min=0.0, min_open=True),
              help="Adam learning rate (the DRMC paper's 1e-4; lower for fine-tuning a "
                   "trained model: Adam's first steps move every weight by about lr).")
@click.option("--psnr-slack", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
              help="With --select b_max: validation PSNR that may be given up, in dB.")
def train_pet_denoise(output_dir: Path, cases: int, drfs: tuple[int, ...], seconds: float,
                      pair_dirs: tuple[str, ...], seed: int, version: str,
                      processes: int, lesion_weight: float, init_dir: Path | None,
                      data_cache: Path | None, pet_mm: tuple[float, ...],
                      validation_cases: int, validation_seed: int,
                      validation_dirs: tuple[str, ...], validate_every: float,
                      scale_augment: tuple[float, float] | None,
                      count_scale: tuple[float, float] | None, peak_weight: float,
                      select: str, psnr_slack: float, lr: float) -> None:
    """Train DRMC and write a model directory with its manifest (sha256, trained_on)."""
    from dicomnode.pipelines.pet_denoise import train as train_drmc
    from dicomnode.pipelines.pet_denoise import validation_windows
    from dicomnode.simulate import PET_MM
    from dicomnode.training import (
        cached_pairs,
        simulated_pet_pairs,
        site_pet_pairs,
        validation_seeds_taken,
    )

    # refused before anything is read or simulated
    if validation_dirs and not pair_dirs:
        raise click.BadParameter("validation pairs go with --pairs (simulated training data "
                                 "validates on --validation-cases)",
                                 param_hint="--validation-pairs")
    for option, bounds in (("--scale-augment", scale_augment), ("--count-scale", count_scale)):
        if bounds and bounds[0] > bounds[1]:
            raise click.BadParameter(f"LOW {bounds[0]} above HIGH {bounds[1]}",
                                     param_hint=option)
    if count_scale and pair_dirs:
        raise click.BadParameter("a site's own pairs have the counts they were acquired with",
                                 param_hint="--count-scale")
    if set(validation_dirs) & set(pair_dirs):
        raise click.BadParameter(f"{sorted(set(validation_dirs) & set(pair_dirs))} also in "
                                 "--pairs", param_hint="--validation-pairs")
    if select == "b_max" and not (validation_cases or validation_dirs):
        raise click.BadParameter("the SUVmax bias is scored on validation data: give "
                                 "--validation-cases or --validation-pairs",
                                 param_hint="--select")
    if psnr_slack and select != "b_max":
        raise click.BadParameter("goes with --select b_max", param_hint="--psnr-slack")
    if pair_dirs and validation_cases:
        raise click.BadParameter("with --pairs, validate on --validation-pairs",
                                 param_hint="--validation-cases")
    taken = validation_seeds_taken(cases=cases, seed=seed, validation_seed=validation_seed,
                                   validation_cases=validation_cases)
    if taken:
        raise click.BadParameter(f"phantom seeds {taken} are training or benchmark phantoms",
                                 param_hint="--validation-seed")

    if pair_dirs:
        pairs, source = site_pet_pairs(list(pair_dirs))
    else:
        pairs, source = cached_pairs(data_cache, lambda: simulated_pet_pairs(
            cases=cases, drfs=drfs, seed=seed, processes=processes, pet_mm=pet_mm or None,
            count_scale=count_scale or None))
    click.echo(f"{len(pairs)} training pairs: {source}")
    validation = None
    if validation_dirs:
        held, held_source = site_pet_pairs(list(validation_dirs))
    elif validation_cases:
        held, held_source = cached_pairs(
            None if data_cache is None
            else data_cache.with_name(f"{data_cache.stem}-validation.npz"),
            lambda: simulated_pet_pairs(cases=validation_cases, drfs=drfs, seed=validation_seed,
                                        processes=processes, pet_mm=pet_mm or None, lidc=False,
                                        count_scale=count_scale or None))
    if validation_dirs or validation_cases:
        validation = validation_windows(held, seed=seed)
        click.echo(f"{len(held)} validation pairs ({len(validation)} windows): {held_source}")
        held_what = ("site pairs" if validation_dirs else "twin phantom seeds "
                     f"{validation_seed}-{validation_seed + validation_cases - 1}")
        source += ((f"; checkpoint chosen by PSNR and lesion SUVmax bias on {len(held)} "
                    if select == "psnr" else
                    f"; checkpoint chosen by lowest lesion SUVmax bias within {psnr_slack:g} dB "
                    f"of the start's PSNR on {len(held)} ")
                   + f"validation pairs ({held_what})")
    if peak_weight:
        source += f"; loss: Charbonnier + {peak_weight:g} x lesion SUVmax error"

    def checkpoint(point: dict[str, Any]) -> None:
        click.echo(f"checkpoint at {point['seconds']:.0f} s, iteration {point['iteration']}: "
                   f"validation PSNR {point['psnr']:.2f} dB, lesion B_max {point['b_max']:.3f} "
                   f"(signed {point['b_max_signed']:+.3f})")

    # one simulated grid: the manifest says which (the pipeline picks models by voxel size)
    grids = sorted(set(pet_mm or (PET_MM,)))
    stats = train_drmc(output=output_dir, pairs=pairs, seconds=seconds, trained_on=source,
                       seed=seed, version=version, lesion_weight=lesion_weight,
                       init=init_dir, validation=validation, validate_every=validate_every,
                       on_checkpoint=checkpoint,
                       spacing_mm=grids[0] if not pair_dirs and len(grids) == 1 else None,
                       scale_augment=scale_augment or None, peak_weight=peak_weight,
                       select=select, psnr_slack=psnr_slack, lr=lr)
    click.echo(f"trained {stats['iterations']} iterations in {stats['seconds']:.0f} s; "
               f"{'loss (Charbonnier + SUVmax term)' if peak_weight else 'Charbonnier'} "
               f"{stats['loss_first']:.4f} -> {stats['loss_last']:.4f}")
    if stats.get("kept") is not None:
        click.echo(f"kept the checkpoint at iteration {stats['kept']['iteration']}"
                   + (f": no checkpoint beat {init_dir} on validation, so its weights were "
                      "written unchanged" if stats["kept"]["iteration"] == 0 else ""))
    click.echo(f"wrote {output_dir}")


@train.command("ct2pet")
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path))
@click.option("--cases", default=4, show_default=True)
@click.option("--seconds", default=240.0, show_default=True, help="Training time in all.")
@click.option("--seed", default=0, show_default=True)
@click.option("--version", default="1.0.0", show_default=True, help="Model version to write.")
@click.option("--pairs", "pair_dirs", multiple=True, type=str,
              help="A site's own data instead: CT_DIR:PET_DIR pairs of one PET/CT study each.")
@click.option("--pretrain-share", default=0.0, show_default=True,
              type=click.FloatRange(0.0, 0.9),
              help="Share of the time spent first on a whole-body model that every district "
                   "model then starts from (0: every model from scratch; README: measured "
                   "worse).")
@click.option("--ema-decay", default=0.0, show_default=True, type=click.FloatRange(0.0, 0.9999),
              help="Keep an exponential moving average of each generator's weights with this "
                   "decay and write it instead of the last iterate (0: the last iterate).")
@click.option("--init", "init_dir", type=click.Path(exists=True, file_okay=False,
                                                    path_type=Path), default=None,
              help="Fine-tune this ct2pet model directory (e.g. the shipped "
                   "models/ct2pet-district) instead of starting from scratch.")
@click.option("--iterations", type=click.IntRange(1), default=None,
              help="Iterations per model instead of a time budget (--seconds is then unused): "
                   "the same training on a slower or busier machine.")
@click.option("--loss-in-district", multiple=True,
              help="This district's model (head_neck, trunk, arms, legs) counts its L1 loss "
                   "on the district's own voxels only, not on the rest of its patches "
                   "(repeatable; README: arms).")
@click.option("--seeds-per-model", default=1, show_default=True, type=click.IntRange(1),
              help="Train every model this many times from successive seeds and keep the one "
                   "with the lowest MAE on the validation cases (README: one seed's result "
                   "varies by more than most settings).")
@click.option("--validation-cases", default=2, show_default=True, type=click.IntRange(1),
              help="With --seeds-per-model > 1 and simulated data: whole-body phantoms to "
                   "choose on, seeds --validation-seed, --validation-seed + 1, ...")
@validation_seed_option
@click.option("--validation-pairs", "validation_dirs", multiple=True, type=str,
              help="With --pairs and --seeds-per-model > 1: CT_DIR:PET_DIR studies to choose "
                   "on, none of them among --pairs.")
def train_ct2pet_cmd(output_dir: Path, cases: int, seconds: float, seed: int,
                     version: str, pair_dirs: tuple[str, ...], pretrain_share: float,
                     ema_decay: float, init_dir: Path | None, iterations: int | None,
                     loss_in_district: tuple[str, ...], seeds_per_model: int,
                     validation_cases: int, validation_seed: int,
                     validation_dirs: tuple[str, ...]) -> None:
    """Train the whole-body and district Pix2Pix models; write a model directory."""
    from dicomnode.pipelines.ct2pet import check_districts, train_ct2pet
    from dicomnode.training import (
        simulated_ct2pet_cases,
        site_ct2pet_cases,
        validation_seeds_taken,
    )

    try:  # before the data is read or simulated
        check_districts(tuple(loss_in_district))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--loss-in-district") from exc
    if validation_dirs and (not pair_dirs or seeds_per_model == 1):
        raise click.BadParameter("validation studies are used with --pairs and "
                                 "--seeds-per-model > 1", param_hint="--validation-pairs")
    if pair_dirs and seeds_per_model > 1:
        if not validation_dirs:
            raise click.BadParameter("--seeds-per-model > 1 with --pairs needs "
                                     "--validation-pairs", param_hint="--seeds-per-model")
        if set(validation_dirs) & set(pair_dirs):
            raise click.BadParameter(f"{sorted(set(validation_dirs) & set(pair_dirs))} "
                                     "also in --pairs", param_hint="--validation-pairs")
    if not pair_dirs and seeds_per_model > 1:
        taken = validation_seeds_taken(cases=cases, seed=seed, validation_seed=validation_seed,
                                       validation_cases=validation_cases)
        if taken:
            raise click.BadParameter(f"phantom seeds {taken} are training or benchmark "
                                     "phantoms", param_hint="--validation-seed")
    if pair_dirs:
        data, source = site_ct2pet_cases(list(pair_dirs))
    else:
        data, source = simulated_ct2pet_cases(cases=cases, seed=seed)
    click.echo(f"{len(data)} training cases: {source}")
    validation, validation_source = None, ""
    if seeds_per_model > 1:
        if pair_dirs:
            validation, validation_source = site_ct2pet_cases(list(validation_dirs))
        else:
            validation, validation_source = simulated_ct2pet_cases(
                cases=validation_cases, seed=validation_seed, lidc=False)
        click.echo(f"choosing each model of {seeds_per_model} seeds on {validation_source}")
        source += (f"; each model the best of {seeds_per_model} training seeds by MAE on "
                   f"{len(validation)} validation cases")
    stats = train_ct2pet(output=output_dir, cases=data, seconds=seconds, trained_on=source,
                         seed=seed, version=version, pretrain_share=pretrain_share,
                         ema_decay=ema_decay, init=init_dir, iterations=iterations,
                         loss_in_district=tuple(loss_in_district),
                         seeds_per_model=seeds_per_model, validation=validation,
                         validation_source=validation_source)
    for name, s in stats.items():
        chosen = "".join(f"; seed {c['seed']}: validation MAE {c['validation_mae_suv']:.4f}"
                         for c in s.get("candidates", []))
        if chosen:
            chosen += f"; kept seed {s['seed']}"
        click.echo(f"{name}: {s['iterations']} iterations, L1 {s['l1_first']:.4f} -> "
                   f"{s['l1_last']:.4f}{chosen}")
    click.echo(f"wrote {output_dir}")


@main.group()
def simulate() -> None:
    """The PET/CT twin: simulated PET (full and low dose) for training and tests."""


@simulate.command("pet")
@click.option("--ct", "ct_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="CT series folder (default: a generated phantom).")
@click.option("--phantom", type=click.Choice(["chest", "whole-body"]), default="chest",
              show_default=True, help="The phantom written as the CT when no --ct is given: "
              "a small chest, or a whole body with organs (brain, heart, liver, ...).")
@click.option("--z-range", nargs=2, type=float, default=None,
              help="Whole-body phantom only: heights above the soles to keep, in mm "
              "(e.g. 900 1300 for the abdomen and lower chest).")
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path))
@click.option("--drf", "drfs", multiple=True, type=int, default=(4, 10), show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--dose-mbq", default=300.0, show_default=True)
def simulate_pet_cmd(ct_dir: Path | None, phantom: str, z_range: tuple[float, float] | None,
                     output_dir: Path, drfs: tuple[int, ...], seed: int,
                     dose_mbq: float) -> None:
    """Write CT, full-dose PET, low-dose PET per DRF and a lesion SEG under OUTPUT."""
    from dicomnode.sample import write_ct_series, write_phantom_ct
    from dicomnode.simulate_io import write_case

    organs = None
    if ct_dir is not None:
        files = sorted(p for p in ct_dir.rglob("*") if p.is_file() and p.suffix != ".xml")
    elif phantom == "whole-body":
        from dicomnode.phantom import whole_body

        body = whole_body(seed, z_range_mm=z_range)
        origin = tuple(float(v) for v in body.affine[:3, 3])
        files = write_ct_series(output_dir / "phantom-ct", body.hu, body.spacing,
                                origin=(origin[0], origin[1], origin[2]),
                                description="Phantom whole-body CT (synthetic)",
                                body_part="WHOLEBODY")
        organs = body.organs
    else:
        files = write_phantom_ct(output_dir / "phantom-ct", slices=60, size=256)
    case = write_case(files, output_dir, drfs=drfs, seed=seed, dose_mbq=dose_mbq,
                      organs=organs, processes=os.cpu_count() or 1)
    click.echo(f"CT {case.ct}\nfull dose {case.full}")
    for drf, path in case.low.items():
        click.echo(f"DRF {drf}: {path}")
    click.echo(f"lesions {case.lesions}")


@simulate.command("lowdose")
@click.option("--input", "input_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--drf", required=True, type=int)
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True)
@click.option("--postfilter-mm", type=float, default=None,
              help="FWHM of the Gaussian post-filter after OSEM, mm (0: none; default: the "
              "twin's, dicomnode.simulate.POSTFILTER_MM).")
def simulate_lowdose_cmd(input_dir: Path, drf: int, output_dir: Path, seed: int,
                         postfilter_mm: float | None) -> None:
    """A simulated low-dose version of a real PET series."""
    from dicomnode.pipelines import PipelineRefusal
    from dicomnode.simulate import POSTFILTER_MM
    from dicomnode.simulate_io import lowdose_from_pet

    files = sorted(p for p in input_dir.rglob("*") if p.is_file())
    try:
        out = lowdose_from_pet(files, output_dir, drf=drf, seed=seed,
                               postfilter_mm=POSTFILTER_MM if postfilter_mm is None
                               else postfilter_mm)
    except PipelineRefusal as refusal:
        raise click.ClickException(f"{refusal.code}: {refusal.reason}") from None
    click.echo(f"low-dose (DRF {drf}) PET written to {out}")


@main.command("run")
@CONFIG_OPTION
@click.argument("pipeline")
@click.option("--input", "input_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path))
@click.option("--preview", is_flag=True, help="Also write PNG previews next to the outputs.")
@click.option("--seg-type", type=click.Choice(["BINARY", "LABELMAP"]), default="BINARY")
@click.option("--resample", is_flag=True,
              help="Resample tilted or unevenly spaced series instead of refusing them.")
@click.option("--model", default=None, help="Model for pipelines that run one (see "
              "`dicomnode models list`).")
def run_offline(config_path: Path | None, pipeline: str, input_dir: Path, output_dir: Path,
                preview: bool, seg_type: str, resample: bool, model: str | None) -> None:
    """Run PIPELINE on each series under INPUT, writing DICOM to OUTPUT (no node needed)."""
    from dicomnode.offline import run_folder
    from dicomnode.pipelines import PipelineRefusal

    settings = _settings(config_path)
    try:
        results = run_folder(settings, pipeline=pipeline, input_dir=input_dir,
                             output_dir=output_dir, preview=preview, seg_type=seg_type,
                             resample=resample, model=model)
    except KeyError as exc:
        raise click.ClickException(str(exc)) from None
    refused = 0
    for series_uid, outcome in results.items():
        if isinstance(outcome, PipelineRefusal):
            refused += 1
            click.echo(f"series {series_uid}: REFUSED {outcome.code}: {outcome.reason}")
            continue
        click.echo(f"series {series_uid}: {len(outcome)} files")
        for path in outcome:
            click.echo(f"  {path}")
    if refused:
        sys.exit(2)


@main.command()
@CONFIG_OPTION
@click.option("--id", "ids", multiple=True, type=int, help="Only these delivery ids.")
def retry(config_path: Path | None, ids: tuple[int, ...]) -> None:
    """Put dead-letter deliveries back in the outbox."""
    from dicomnode.app import open_database
    from dicomnode.push import requeue_dead

    engine, factory = open_database(_settings(config_path), upgrade=False)
    try:
        count = requeue_dead(factory, delivery_ids=list(ids) or None)
    finally:
        engine.dispose()
    click.echo(f"{count} deliveries re-queued")


if __name__ == "__main__":  # pragma: no cover
    main()
