"""What a pipeline receives and returns inside a worker."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from dicomnode.dicom.refusal import PipelineRefusal

__all__ = ["JobContext", "OutputFile", "PipelineRefusal", "RunFunction", "job_model",
           "note_model", "resolve_device", "save_outputs"]


@dataclass(frozen=True, kw_only=True)
class OutputFile:
    """One DICOM file a pipeline wrote."""

    kind: str  # "SEG", "PT", "CT"
    index: int
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    path: Path


@dataclass(frozen=True, kw_only=True)
class JobContext:
    """Everything a pipeline run needs; built by the worker from the job row."""

    job_id: int
    pipeline: str
    pipeline_version: str
    series_instance_uid: str
    input_files: tuple[Path, ...]
    output_dir: Path
    device: str
    series_number: int
    series_description_prefix: str
    seg_type: str = "BINARY"
    options: dict[str, object] = field(default_factory=dict)
    progress: Callable[[float], None] = field(default=lambda _f: None)
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds, filled by run
    # the model that ran (name, version, why), filled by run: the worker records it in the job
    # where the rule named none
    model_used: dict[str, str] = field(default_factory=dict)
    # a study job (a rule with ``requires``): role -> that series' files (all of them are also
    # in input_files); empty for a series job
    series_roles: dict[str, tuple[Path, ...]] = field(default_factory=dict)


RunFunction = Callable[[JobContext], list[OutputFile]]


def job_model(ctx: JobContext, *, default: str | Sequence[str] | None = None,
              loader: Callable[..., Any] | None = None,
              choose: Callable[[list[Any]], tuple[Any, str]] | None = None) -> Any:
    """The model the job's rule names, else the pipeline's ``default``, from the worker's
    cache; a refusal with the reason when there is none or it cannot be used. With several
    defaults, those that load are given to ``choose``, which returns one and why (the ones
    missing are skipped). ``ctx.model_used`` says which model and why."""
    from dicomnode.pipelines.models import ModelError, cached_model

    named = ctx.options.get("model")
    names = [str(named)] if named else [default] if isinstance(default, str) else list(
        default or ())
    if not names:
        raise PipelineRefusal("no_model", f"the rule names no model for {ctx.pipeline}")
    found, problems = [], []
    for name in names:
        try:
            found.append(cached_model(Path(str(ctx.options.get("models_dir"))), name,
                                      device=ctx.device, loader=loader))
        except ModelError as exc:
            problems.append(str(exc))
    if not found:
        raise PipelineRefusal("unknown_model", "; ".join(problems))
    if named:
        model, why = found[0], "named by the rule"
    elif choose is not None:
        model, why = choose(found)
    else:
        model, why = found[0], "the pipeline's default"
    note_model(ctx, model.entry, why)
    return model


def note_model(ctx: JobContext, entry: Any, why: str) -> None:
    """Say in ``ctx.model_used`` which model ran (name, version, weights sha256) and why."""
    ctx.model_used.update(name=entry.manifest.name, version=entry.manifest.version, chosen=why,
                          weights_sha256=entry.weights_sha256)


def model_identity(ctx: JobContext, volume: Any, manifest: Any, *, kind: str,
                   description: str) -> Any:
    """The OutputIdentity of a model pipeline's series: the job's naming and numbering, the
    model's name, version, weights sha256 (from :func:`job_model`) and training data (what
    every AI output must say)."""
    from dicomnode.dicom.write.common import OutputIdentity

    return OutputIdentity(
        source_series_uid=volume.series_instance_uid, pipeline=ctx.pipeline,
        pipeline_version=ctx.pipeline_version, kind=kind, series_number=ctx.series_number,
        series_description=f"{ctx.series_description_prefix}{description}",
        model_name=manifest.name, model_version=manifest.version,
        trained_on=manifest.trained_on, weights_sha256=ctx.model_used.get("weights_sha256"))


def save_outputs(datasets: list[Dataset], output_dir: Path, *, kind: str,
                 prefix: str) -> list[OutputFile]:
    """Write each data set as ``<prefix>-<index>.dcm`` and describe it for the job."""
    from dicomnode.dicom.write.common import save

    outputs = []
    for index, ds in enumerate(datasets):
        path = save(ds, output_dir / f"{prefix}-{index:04d}.dcm")
        outputs.append(OutputFile(kind=kind, index=index, sop_class_uid=str(ds.SOPClassUID),
                                  sop_instance_uid=str(ds.SOPInstanceUID),
                                  series_instance_uid=str(ds.SeriesInstanceUID), path=path))
    return outputs


def resolve_device(setting: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu`` (torch imported only here)."""
    if setting != "auto":
        return setting
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"
