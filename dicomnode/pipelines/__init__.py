"""The pipeline registry: named pipelines, imported lazily (torch/MONAI only where they run).

A pipeline is registered by name with the import path of its ``run`` function. ``run`` takes a
:class:`~dicomnode.pipelines.base.JobContext` and returns the files it wrote. Extra modules that
register pipelines can be named in the ``DICOMNODE_PLUGINS`` environment variable (comma
separated); they are imported in every process, workers included.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

from dicomnode.pipelines.base import JobContext, OutputFile, PipelineRefusal, RunFunction

__all__ = [
    "JobContext",
    "OutputFile",
    "PipelineRefusal",
    "PipelineSpec",
    "get_pipeline",
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
    """

    name: str
    version: str
    entry_point: str
    modalities: tuple[str, ...]
    description: str

    def load(self) -> RunFunction:
        """Import and return the run function."""
        module, _, func = self.entry_point.partition(":")
        run: RunFunction = getattr(importlib.import_module(module), func)
        return run


_REGISTRY: dict[str, PipelineSpec] = {}
_PLUGINS_LOADED = False


def register(spec: PipelineSpec) -> PipelineSpec:
    """Add (or replace) a pipeline in the registry."""
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


def get_pipeline(name: str) -> PipelineSpec:
    """The pipeline called ``name``; ``KeyError`` with the known names otherwise."""
    pipelines = known_pipelines()
    if name not in pipelines:
        raise KeyError(f"unknown pipeline {name!r}; known: {sorted(pipelines)}")
    return pipelines[name]
