"""Research tooling: the PET/CT twin (simulate) and model training (train)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

# both training commands: validation phantoms are seeds N, N + 1, ... (checked against the
# training and benchmark phantoms, training.validation_seeds_taken)
validation_seed_option = click.option(
    "--validation-seed", default=500, show_default=True,
    help="First validation phantom seed (not a training phantom's; the benchmark's are 1000+).")


@click.group()
def train() -> None:
    """Train the models that need paired data (on simulated data or a site's own pairs)."""


def _refuse_bad_pet_denoise_options(
        *, cases: int, pair_dirs: tuple[str, ...], with_twin: bool, seed: int,
        validation_cases: int, validation_seed: int, validation_dirs: tuple[str, ...],
        scale_augment: tuple[float, float] | None, count_scale: tuple[float, float] | None,
        select: str, psnr_slack: float) -> None:
    """``train pet-denoise``'s option combinations that make no sense, refused naming the
    option (click.BadParameter), before anything is read or simulated."""
    from dicomnode.research.training import validation_seeds_taken

    if validation_dirs and not pair_dirs:
        raise click.BadParameter("validation pairs go with --pairs (simulated training data "
                                 "validates on --validation-cases)",
                                 param_hint="--validation-pairs")
    for option, bounds in (("--scale-augment", scale_augment), ("--count-scale", count_scale)):
        if bounds and bounds[0] > bounds[1]:
            raise click.BadParameter(f"LOW {bounds[0]} above HIGH {bounds[1]}",
                                     param_hint=option)
    if with_twin and not pair_dirs:
        raise click.BadParameter("mixes the twin with a site's --pairs; without them the "
                                 "training data is the twin's anyway", param_hint="--with-twin")
    if count_scale and pair_dirs and not with_twin:
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


@train.command("pet-denoise")
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path),
              help="Model directory to write (e.g. models/pet-denoise-drmc).")
@click.option("--cases", default=8, show_default=True, help="Simulated cases (phantoms and, "
              "when ../shared/data is present, the LIDC CT).")
@click.option("--drf", "drfs", multiple=True, type=int, default=(4, 10), show_default=True)
@click.option("--seconds", default=180.0, show_default=True, help="Training time.")
@click.option("--pairs", "pair_dirs", multiple=True, type=str,
              help="A site's own data instead: LOW_DIR:FULL_DIR pairs of DICOM PET folders.")
@click.option("--with-twin", is_flag=True, default=False,
              help="With --pairs: add --cases simulated twin cases to them (on the --pet-mm "
                   "grids, --count-scale applying to these only); patches come from the site's "
                   "pairs and from the twin's half of the time each.")
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
                      pair_dirs: tuple[str, ...], with_twin: bool, seed: int, version: str,
                      processes: int, lesion_weight: float, init_dir: Path | None,
                      data_cache: Path | None, pet_mm: tuple[float, ...],
                      validation_cases: int, validation_seed: int,
                      validation_dirs: tuple[str, ...], validate_every: float,
                      scale_augment: tuple[float, float] | None,
                      count_scale: tuple[float, float] | None, peak_weight: float,
                      select: str, psnr_slack: float, lr: float) -> None:
    """Train DRMC and write a model directory with its manifest (sha256, trained_on)."""
    from dicomnode.research.simulate import PET_MM
    from dicomnode.research.train_pet_denoise import train as train_drmc
    from dicomnode.research.train_pet_denoise import validation_windows
    from dicomnode.research.training import (
        cached_pairs,
        simulated_pet_pairs,
        site_pet_pairs,
    )

    # refused before anything is read or simulated
    _refuse_bad_pet_denoise_options(
        cases=cases, pair_dirs=pair_dirs, with_twin=with_twin, seed=seed,
        validation_cases=validation_cases, validation_seed=validation_seed,
        validation_dirs=validation_dirs, scale_augment=scale_augment, count_scale=count_scale,
        select=select, psnr_slack=psnr_slack)

    if pair_dirs:
        pairs, source = site_pet_pairs(list(pair_dirs))
    if not pair_dirs or with_twin:
        twin, twin_source = cached_pairs(data_cache, lambda: simulated_pet_pairs(
            cases=cases, drfs=drfs, seed=seed, processes=processes, pet_mm=pet_mm or None,
            count_scale=count_scale or None))
        if not pair_dirs:
            pairs, source = twin, twin_source
        else:  # the site's pairs repeated so that they are drawn half of the time
            pairs = pairs * max(1, round(len(twin) / len(pairs))) + twin
            source = f"{source}, drawn half of the time, mixed with {twin_source}"
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
        # a site's series may be short (35 slices): smaller windows, more of them
        validation = (validation_windows(held, seed=seed, size=16, random_per_pair=32)
                      if validation_dirs else validation_windows(held, seed=seed))
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
                       spacing_mm=(grids[0] if (not pair_dirs or with_twin) and len(grids) == 1
                                   else None),
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


@train.command("petct-lesions")
@click.option("--output", "output_dir", required=True, type=click.Path(path_type=Path),
              help="The model directory to write (its name is the model's name).")
@click.option("--cases", default=16, show_default=True,
              help="Simulated PET/CT twin cases (phantom seeds --seed, --seed + 1, ...).")
@click.option("--iterations", default=1500, show_default=True, type=click.IntRange(1))
@click.option("--max-seconds", default=None, type=float,
              help="A safety stop only; the manifest says when it cut training short.")
@click.option("--channels", default="8,8,16,32,64", show_default=True,
              help="Widths of the five stages (the paper: 32,32,64,128,256).")
@click.option("--seed", default=3000, show_default=True)
@click.option("--version", default="1.0.0", show_default=True)
@click.option("--study", "studies", multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A site's own labelled study instead of the twin (repeatable): a folder "
                   "with its CT series, its PET series and a SEG of the lesions.")
def train_petct_cmd(output_dir: Path, cases: int, iterations: int, max_seconds: float | None,
                    channels: str, seed: int, version: str, studies: tuple[Path, ...]) -> None:
    """Train the petct-lesions middle-fusion U-Net on the PET/CT twin's lesions or on a
    site's own labelled PET/CT studies."""
    import json

    from dicomnode.demo.sample import write_phantom_ct
    from dicomnode.research.train_petct import labelled_study, simulated_cases, train_petct

    widths = tuple(int(c) for c in channels.split(","))
    if len(widths) != 5:
        raise click.BadParameter("five widths, one per stage", param_hint="--channels")
    if studies:
        try:
            data = [labelled_study(folder) for folder in studies]
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--study") from None
        voxels = sum(int(mask.sum()) for _hu, _suv, mask in data)
        if voxels == 0:
            raise click.BadParameter("the SEGs hold no lesion voxel", param_hint="--study")
        trained_on = (f"a site's own labelled PET/CT studies: {len(data)} studies, {voxels} "
                      f"lesion voxels on the PET grids, {iterations} iterations of 4 patches "
                      "of 32^3")
    else:
        data = simulated_cases(cases, lambda d: write_phantom_ct(d, slices=60, size=256),
                               seed=seed)
        trained_on = (f"SIMULATED data only: {cases} cases of dicomnode's PET/CT twin (chest "
                      f"phantom, phantom seeds {seed}-{seed + cases - 1}, 6 spherical lesions "
                      "each, radius 5-12 mm, contrast 3-8 x background, full-dose PET on a 4 "
                      f"mm grid), {iterations} iterations of 4 patches of 32^3")
    stats = train_petct(output=output_dir, cases=data, iterations=iterations, channels=widths,
                        max_seconds=max_seconds, version=version, trained_on=trained_on)
    click.echo(json.dumps(stats, indent=2))


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
    from dicomnode.pipelines.ct2pet import check_districts
    from dicomnode.research.train_ct2pet import train_ct2pet
    from dicomnode.research.training import (
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


@click.group()
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
    from dicomnode.demo.sample import write_ct_series, write_phantom_ct
    from dicomnode.research.simulate_io import write_case

    organs = None
    if ct_dir is not None:
        files = sorted(p for p in ct_dir.rglob("*") if p.is_file() and p.suffix != ".xml")
    elif phantom == "whole-body":
        from dicomnode.research.phantom import whole_body

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
              "twin's, dicomnode.research.simulate.POSTFILTER_MM).")
def simulate_lowdose_cmd(input_dir: Path, drf: int, output_dir: Path, seed: int,
                         postfilter_mm: float | None) -> None:
    """A simulated low-dose version of a real PET series."""
    from dicomnode.pipelines import PipelineRefusal
    from dicomnode.research.simulate import POSTFILTER_MM
    from dicomnode.research.simulate_io import lowdose_from_pet

    files = sorted(p for p in input_dir.rglob("*") if p.is_file())
    try:
        out = lowdose_from_pet(files, output_dir, drf=drf, seed=seed,
                               postfilter_mm=POSTFILTER_MM if postfilter_mm is None
                               else postfilter_mm)
    except PipelineRefusal as refusal:
        raise click.ClickException(f"{refusal.code}: {refusal.reason}") from None
    click.echo(f"low-dose (DRF {drf}) PET written to {out}")
