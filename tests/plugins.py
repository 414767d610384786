"""Pipelines registered only in tests (loaded through DICOMNODE_PLUGINS=tests.plugins)."""

from __future__ import annotations

import json
import os

from dicomnode.pipelines import JobContext, OutputFile, PipelineSpec, register

register(PipelineSpec(name="test-echo", version="1", entry_point="tests.plugins:echo_run",
                      modalities=("CT", "PT"), description="test: records its inputs",
                      series_number=900))
register(PipelineSpec(name="test-slow-tissue", version="1",
                      entry_point="tests.plugins:slow_tissue_run", modalities=("CT",),
                      description="test: ct-tissue after a pause (a job long enough to kill)",
                      series_number=902))
register(PipelineSpec(name="test-crash-always", version="1",
                      entry_point="tests.plugins:crash_always_run", modalities=("CT",),
                      description="test: the process running it dies, every attempt",
                      series_number=903))
register(PipelineSpec(name="test-crash-once", version="1",
                      entry_point="tests.plugins:crash_once_run", modalities=("CT",),
                      description="test: the worker process dies on the first attempt",
                      series_number=901))


def echo_run(ctx: JobContext) -> list[OutputFile]:
    """Write a JSON file listing the inputs the worker handed over."""
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    (ctx.output_dir / "inputs.json").write_text(json.dumps(
        {"job": ctx.job_id, "files": [str(p) for p in ctx.input_files],
         "exist": all(p.exists() for p in ctx.input_files)}))
    return []


def crash_once_run(ctx: JobContext) -> list[OutputFile]:
    """Kill the worker process on the first attempt (a marker file remembers it)."""
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    marker = ctx.output_dir / "crashed-once"
    if not marker.exists():
        marker.write_text("x")
        os._exit(17)
    return echo_run(ctx)


def slow_tissue_run(ctx: JobContext) -> list[OutputFile]:
    """ct-tissue after TEST_SLOW_S seconds (default 6), reporting progress meanwhile."""
    import time

    from dicomnode.pipelines.ct_tissue import run

    for _ in range(int(float(os.environ.get("TEST_SLOW_S", "6")) * 10)):
        time.sleep(0.1)
    return run(ctx)


def crash_always_run(ctx: JobContext) -> list[OutputFile]:
    """Kill the process running the job, every time."""
    os._exit(19)
