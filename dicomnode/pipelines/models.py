"""The model registry: one directory per model under ``models/``, loaded offline.

Two layouts are accepted:

* a dicomnode model: ``manifest.yaml`` (:class:`Manifest`) and its weights file;
* a MONAI bundle as it is (``configs/metadata.json``, ``configs/inference.json``,
  ``models/model.pt``), optionally with a ``dicomnode.yaml`` beside it that adds what a bundle
  does not say: SNOMED CT codes and colours of the labels, the weights' sha256, what it was
  trained on. A bundle without it loads with generic codes and is listed as unverified.

Every weights file is hashed before loading; a missing file or a sha256 mismatch is a
:class:`ModelError` at start-up (``dicomnode serve``, ``dicomnode models check``), not at the
first job.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dicomnode.files import file_sha256

__all__ = ["LoadedModel", "Manifest", "ModelCache", "ModelEntry", "ModelError", "cached_model",
           "scan_models"]


class ModelError(ValueError):
    """A model directory that cannot be used; the message names the directory and the reason."""


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeSpec(_M):
    """A coded concept (SNOMED CT by default)."""

    value: str
    meaning: str
    scheme: str = "SCT"


class LabelSpec(_M):
    """One output label of a segmentation model."""

    value: int = Field(ge=1)
    label: str
    category: CodeSpec = CodeSpec(value="123037004", meaning="Anatomical Structure")
    type: CodeSpec
    color: tuple[int, int, int] = (255, 0, 0)


class Normalisation(_M):
    """Input intensity normalisation: a window mapped to [0, 1] (clipped), or none."""

    kind: Literal["window", "none"] = "window"
    min: float = -1000.0
    max: float = 1000.0


class Manifest(_M):
    """``manifest.yaml`` (or a bundle's ``dicomnode.yaml``)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    version: str
    task: Literal["segmentation", "pet-denoise", "ct2pet", "sr", "petct-lesions"] = "segmentation"
    network: dict[str, Any] = Field(default_factory=dict, description="For state-dict "
                                    "weights: {class: 'module:Class', params: {...}}")
    modality: str = "CT"
    spacing_mm: tuple[float, float, float] | None = None
    normalisation: Normalisation = Normalisation()
    input_level: tuple[float, float] | None = Field(
        default=None, description="pet-denoise: the range of the training inputs' activity "
        "level (pet_denoise.activity_level); an input outside it is scaled into it and back")
    roi_size: tuple[int, int, int] = (96, 96, 96)
    overlap: float = Field(default=0.25, ge=0, lt=1)
    labels: list[LabelSpec] = Field(default_factory=list)
    weights: str = "model.pt"
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    trained_on: str
    validated_on: str | None = Field(
        default=None, description="Held-out data it was checked on and how it compared with "
        "a simple baseline there, better or worse (said in every output it makes)")
    licence: str = "unspecified"

    @field_validator("input_level")
    @classmethod
    def _positive_range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 < v[0] <= v[1]:
            raise ValueError(f"must be [low, high] with 0 < low <= high, not {list(v)}")
        return v


@dataclass(frozen=True)
class ModelEntry:
    """A model found under the models directory."""

    path: Path
    layout: Literal["manifest", "monai-bundle"]
    manifest: Manifest
    weights: Path
    verified: bool  # sha256 given and matched
    notes: tuple[str, ...] = ()

    @property
    def weights_sha256(self) -> str:
        """The sha256 of the weights file: the manifest's when it was verified at loading,
        else computed now (an unverified MONAI bundle)."""
        if self.verified and self.manifest.sha256:
            return self.manifest.sha256
        return file_sha256(self.weights)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ModelError(f"{path}: cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: must be a mapping")
    return data


def _manifest(data: dict[str, Any], source: Path) -> Manifest:
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors())
        raise ModelError(f"{source}: {problems}") from None


def _bundle_manifest(path: Path) -> tuple[Manifest, list[str]]:
    """A manifest for a MONAI bundle: its own metadata, with dicomnode.yaml on top if present."""
    notes = []
    try:
        meta = json.loads((path / "configs" / "metadata.json").read_text())
        inference = json.loads((path / "configs" / "inference.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not a readable MONAI bundle: {exc}") from None
    data: dict[str, Any] = {
        "name": path.name, "version": str(meta.get("version", "0")),
        "trained_on": str(meta.get("data_source", "unspecified (MONAI bundle metadata)")),
        "licence": str(meta.get("license", "unspecified")), "weights": "models/model.pt",
    }
    channels = (meta.get("network_data_format", {}).get("outputs", {}).get("pred", {})
                .get("channel_def", {}))
    data["labels"] = [{"value": int(k), "label": str(v),
                       "type": {"value": "85756007", "meaning": "Tissue"}}
                      for k, v in channels.items() if int(k) > 0]
    inferer = inference.get("inferer", {})
    if "roi_size" in inferer:
        data["roi_size"] = tuple(int(v) for v in inferer["roi_size"])
    for t in inference.get("preprocessing", {}).get("transforms", []):
        if isinstance(t, dict) and str(t.get("_target_", "")).endswith("ScaleIntensityRanged"):
            data["normalisation"] = {"kind": "window", "min": t.get("a_min", -1000),
                                     "max": t.get("a_max", 1000)}
    overlay = path / "dicomnode.yaml"
    if overlay.exists():
        data.update(_read_yaml(overlay))
    else:
        notes.append("no dicomnode.yaml: generic label codes, weights not verified")
    return _manifest(data, path), notes


def load_entry(path: Path) -> ModelEntry:
    """Validate one model directory (hashing its weights); raises :class:`ModelError`."""
    notes: list[str] = []
    if (path / "manifest.yaml").exists():
        manifest = _manifest(_read_yaml(path / "manifest.yaml"), path / "manifest.yaml")
        layout = "manifest"
    elif (path / "configs" / "metadata.json").exists():
        manifest, notes = _bundle_manifest(path)
        layout = "monai-bundle"
    else:
        raise ModelError(f"{path}: neither manifest.yaml nor a MONAI bundle")
    weights = path / manifest.weights
    if not weights.is_file():
        raise ModelError(f"{path}: weights file {manifest.weights} is missing")
    verified = False
    if manifest.sha256:
        actual = file_sha256(weights)
        if actual != manifest.sha256:
            raise ModelError(f"{path}: sha256 of {manifest.weights} is {actual}, the manifest "
                             f"says {manifest.sha256}")
        verified = True
    elif layout == "manifest":
        raise ModelError(f"{path}: manifest.yaml must give the weights' sha256")
    return ModelEntry(path=path, layout=layout, manifest=manifest,  # type: ignore[arg-type]
                      weights=weights, verified=verified, notes=tuple(notes))


def scan_models(models_dir: Path) -> tuple[dict[str, ModelEntry], list[str]]:
    """Every model under ``models_dir`` by name, and the problems found (one line each)."""
    entries: dict[str, ModelEntry] = {}
    problems: list[str] = []
    if not models_dir.is_dir():
        return entries, problems
    for path in sorted(p for p in models_dir.iterdir() if p.is_dir()):
        try:
            entry = load_entry(path)
        except ModelError as exc:
            problems.append(str(exc))
            continue
        if entry.manifest.name in entries:
            problems.append(f"{path}: duplicate model name {entry.manifest.name!r}")
            continue
        entries[entry.manifest.name] = entry
    return entries, problems


@dataclass
class LoadedModel:
    """A network ready for inference, kept by the worker between jobs."""

    entry: ModelEntry
    network: Any
    device: str
    extra: dict[str, Any] = field(default_factory=dict)


Loader = Callable[..., "LoadedModel"]


class ModelCache:
    """The models a worker keeps loaded between jobs.

    The registry is scanned (and the weights hashed) only when a model is not loaded yet or
    its weights file changed (size or modification time), not before every job.
    """

    def __init__(self) -> None:
        self._loaded: dict[tuple[str, str, str, Loader], tuple[LoadedModel, tuple[int, int]]] = {}

    def get(self, models_dir: Path, name: str, *, device: str,
            loader: Loader | None = None) -> LoadedModel:
        """The named model, loaded once with ``loader`` (default :func:`load_network`);
        a :class:`ModelError` when it is not usable."""
        loader = loader or load_network
        key = (str(models_dir), name, device, loader)
        hit = self._loaded.get(key)
        if hit is not None:
            try:
                st = hit[0].entry.weights.stat()
                if (st.st_mtime_ns, st.st_size) == hit[1]:
                    return hit[0]
            except OSError:
                pass  # the weights went away: scan again and say so
        models, problems = scan_models(models_dir)
        if name not in models:
            raise ModelError(f"model {name!r} not found in {models_dir} "
                             f"({'; '.join(problems) or 'no problems reported'})")
        entry = models[name]
        st = entry.weights.stat()
        loaded = loader(entry, device=device)
        self._loaded[key] = (loaded, (st.st_mtime_ns, st.st_size))
        return loaded


_WORKER_MODELS = ModelCache()  # a worker process keeps its models loaded between jobs


def cached_model(models_dir: Path, name: str, *, device: str,
                 loader: Loader | None = None) -> LoadedModel:
    """The named model from this process's cache (loaded on first use)."""
    return _WORKER_MODELS.get(models_dir, name, device=device, loader=loader)


def load_network(entry: ModelEntry, *, device: str) -> LoadedModel:
    """Instantiate the network and load the (already verified) weights; torch imported here."""
    import torch

    if entry.layout == "monai-bundle":
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(entry.path / "configs" / "inference.json"))
        parser["bundle_root"] = str(entry.path)
        network = parser.get_parsed_content("network_def")
    else:
        import importlib

        spec = entry.manifest.network
        module, _, cls = str(spec.get("class", "")).partition(":")
        if not module or not cls:
            raise ModelError(f"{entry.path}: network.class must be 'module:Class'")
        network = getattr(importlib.import_module(module), cls)(**spec.get("params", {}))
    state = torch.load(entry.weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    network.load_state_dict(state)
    network.eval().to(device)
    return LoadedModel(entry=entry, network=network, device=device)
