"""The offline path (``dicomnode run``): the same read -> pipeline -> write code as a job."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pydicom

from dicomnode.pipelines import PipelineRefusal, get_pipeline, job_context
from dicomnode.pipelines.base import resolve_device
from dicomnode.settings import Settings

__all__ = ["group_series", "run_folder"]


def group_series(folder: Path) -> dict[str, list[Path]]:
    """Files under ``folder`` by SeriesInstanceUID (unreadable files are ignored)."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except Exception:
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if uid:
            groups[uid].append(path)
    return dict(groups)


def run_folder(
    settings: Settings, *, pipeline: str, input_dir: Path, output_dir: Path,
    preview: bool = False, seg_type: str = "BINARY", resample: bool = False,
    model: str | None = None,
) -> dict[str, list[Path] | PipelineRefusal]:
    """Run ``pipeline`` on every series under ``input_dir``; refusals are returned, not raised.

    Raises
    ------
    KeyError
        Unknown pipeline.
    """
    spec = get_pipeline(pipeline)
    run = spec.load()
    device = resolve_device(settings.executor.device)
    results: dict[str, list[Path] | PipelineRefusal] = {}
    for series_uid, files in group_series(input_dir).items():
        ctx = job_context(
            settings, spec, job_id=0, series_instance_uid=series_uid,
            input_files=tuple(files), output_dir=output_dir / series_uid, device=device,
            seg_type=seg_type, model=model, preview=preview, resample=resample,
        )
        try:
            outputs = run(ctx)
        except PipelineRefusal as refusal:
            results[series_uid] = refusal
            continue
        paths = [o.path for o in outputs]
        if preview:
            paths += sorted((output_dir / series_uid).glob("*.png"))
        results[series_uid] = paths
    return results
