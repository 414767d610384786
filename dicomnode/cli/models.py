"""Models and pipelines: list and check the model registry, run a pipeline on a folder."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from dicomnode.cli.common import CONFIG_OPTION, load_or_exit


@click.group()
def models() -> None:
    """The model registry (models/)."""


@models.command("list")
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True)
def models_list(config_path: Path | None, as_json: bool) -> None:
    """The pipelines and the models found, with version, task, layout and what they were
    trained on; a pipeline whose extra is not installed says what it needs."""
    from dicomnode.pipelines import known_pipelines
    from dicomnode.pipelines.models import scan_models

    settings = load_or_exit(config_path)
    found, problems = scan_models(settings.models_path)
    rows = [{"name": n, "version": e.manifest.version, "task": e.manifest.task,
             "layout": e.layout, "verified": e.verified, "labels": len(e.manifest.labels),
             "trained_on": e.manifest.trained_on, "path": str(e.path), "notes": list(e.notes)}
            for n, e in found.items()]
    specs = sorted(known_pipelines().values(), key=lambda s: s.name)
    pipelines: list[dict[str, Any]] = [
        {"name": s.name, "version": s.version, "series_number": s.series_number,
         "modalities": list(s.modalities), "missing": s.missing()} for s in specs]
    if as_json:
        click.echo(json.dumps({"pipelines": pipelines, "models": rows, "problems": problems},
                              indent=2))
        return
    click.echo("pipelines:")
    for s in specs:
        missing = s.missing()
        state = f"needs {', '.join(missing)}: pip install 'dicomnode[ml]'" if missing else "ready"
        click.echo(f"  {s.name} {s.version}  {'/'.join(s.modalities)}  {state}")
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
    from dicomnode.pipelines.models import scan_models

    settings = load_or_exit(config_path)
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

    from dicomnode.pipelines.models import Manifest
    from dicomnode.research.train_pet_denoise import training_input_level
    from dicomnode.research.training import cached_pairs, simulated_pet_pairs, site_pet_pairs

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




@click.command("run")
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
    from dicomnode.pipelines import PipelineRefusal
    from dicomnode.pipelines.offline import run_folder

    settings = load_or_exit(config_path)
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
