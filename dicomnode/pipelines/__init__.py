"""The pipeline registry: named pipelines, imported lazily (torch/MONAI only where they run).

A pipeline is registered by name with the import path of its ``run`` function. ``run`` takes a
:class:`~dicomnode.pipelines.base.JobContext` and returns the files it wrote. Extra modules that
register pipelines can be named in the ``DICOMNODE_PLUGINS`` environment variable (comma
separated); they are imported in every process, workers included.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode.pipelines.base import JobContext, OutputFile, PipelineRefusal, RunFunction

if TYPE_CHECKING:
    from dicomnode.settings import Settings

__all__ = [
    "JobContext",
    "OutputFile",
    "PipelineRefusal",
    "PipelineSpec",
    "get_pipeline",
    "job_context",
    "known_pipelines",
    "register",
]


@dataclass(frozen=True, kw_only=True)
class PipelineSpec:
    """A registered pipeline.

    Parameters
    ----------
    name
        Registry name used in rules, e.g. ``"ct-tissue"``.
    version
        Pipeline version: part of the job idempotency key and of output UIDs.
    entry_point
        ``"module:function"`` of the run function, imported when first used.
    modalities
        Input modalities it accepts.
    description
        One line for ``dicomnode models list`` / status.
    series_number
        The pipeline's own number: its results' SeriesNumber is the config's
        ``output.series_number_offset`` plus this, whatever else is registered.
    requires
        Python modules the run function needs beyond the core install (torch, monai: the
        ``ml`` extra); a rule naming the pipeline without them is a config error.
    roles
        A study pipeline: the series roles it reads (``ctx.series_roles``), e.g. ``("CT",
        "PET")``; only a study rule whose ``requires`` has these roles may name it.

    Raises
    ------
    ValueError
        ``series_number`` outside 0-999.
    """

    name: str
    version: str
    entry_point: str
    modalities: tuple[str, ...]
    description: str
    series_number: int
    requires: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.series_number <= 999:
            raise ValueError(f"pipeline {self.name!r}: series_number {self.series_number} is "
                             "not in 0-999")

    def missing(self) -> list[str]:
        """The modules in ``requires`` that cannot be imported here."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def load(self) -> RunFunction:
        """Import and return the run function."""
        module, _, func = self.entry_point.partition(":")
        run: RunFunction = getattr(importlib.import_module(module), func)
        return run


_REGISTRY: dict[str, PipelineSpec] = {}
_PLUGINS_LOADED = False


def register(spec: PipelineSpec) -> PipelineSpec:
    """Add (or replace) a pipeline in the registry.

    Raises
    ------
    ValueError
        Another pipeline already has ``spec.series_number``.
    """
    clash = [s.name for s in _REGISTRY.values()
             if s.series_number == spec.series_number and s.name != spec.name]
    if clash:
        raise ValueError(f"pipeline {spec.name!r}: series_number {spec.series_number} is "
                         f"already {clash[0]!r}'s")
    _REGISTRY[spec.name] = spec
    return spec


def _load_plugins() -> None:
    global _PLUGINS_LOADED  # noqa: PLW0603 - registry bootstrap, once per process
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    importlib.import_module("dicomnode.pipelines.builtin")
    for module in filter(None, os.environ.get("DICOMNODE_PLUGINS", "").split(",")):
        importlib.import_module(module.strip())


def known_pipelines() -> dict[str, PipelineSpec]:
    """Every registered pipeline, by name."""
    _load_plugins()
    return dict(_REGISTRY)


def job_context(
    settings: Settings,
    spec: PipelineSpec,
    *,
    job_id: int,
    series_instance_uid: str,
    input_files: tuple[Path, ...],
    output_dir: Path,
    device: str,
    seg_type: str = "BINARY",
    model: str | None = None,
    preview: bool | None = None,
    resample: bool = False,
    progress: Callable[[float], None] | None = None,
    series_roles: dict[str, tuple[Path, ...]] | None = None,
) -> JobContext:
    """The context of one run, the same for a job in the node and for ``dicomnode run``."""
    extra: dict[str, Any] = {"progress": progress} if progress is not None else {}
    return JobContext(
        job_id=job_id, pipeline=spec.name, pipeline_version=spec.version,
        series_instance_uid=series_instance_uid, input_files=input_files,
        output_dir=output_dir, device=device,
        series_number=settings.output.series_number_offset + spec.series_number,
        series_description_prefix=settings.output.series_description_prefix,
        seg_type=seg_type,
        options={"preview": settings.output.previews if preview is None else preview,
                 "resample": resample, "model": model, "ct_sr": settings.ct_sr.model_dump(),
                 "models_dir": str(settings.models_path)},
        series_roles=series_roles or {},
        **extra,
    )


def get_pipeline(name: str) -> PipelineSpec:
    """The pipeline called ``name``; ``KeyError`` with the known names otherwise."""
    pipelines = known_pipelines()
    if name not in pipelines:
        raise KeyError(f"unknown pipeline {name!r}; known: {sorted(pipelines)}")
    return pipelines[name]
