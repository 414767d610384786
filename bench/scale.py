"""bench/scale: jobs per hour with 1 and 2 workers, local executor against celery.

The same short CPU job for every configuration: ``ct-tissue`` on a generated CT (by default
64 x 256 x 256),
JOBS series sent at once with DCMTK's storescu, results pushed to DCMTK's storescp. Each
configuration starts from an empty PostgreSQL database (the shared truth for celery; used for
local too, so the database is not the difference). Reported per configuration: the makespan
(first job queued -> last job finished) and jobs per hour, and the queue-to-start latency of
each job (queued -> claimed by a worker: median and p95). Results in
``bench/results/scale.json``.

Run: ``.venv/bin/python -m bench.scale [--jobs 8]`` (needs PostgreSQL and RabbitMQ on
127.0.0.1, as the tests do).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import create_engine, select, text

from bench.ingest import free_port
from dicomnode.audit.models import Job, JobStatus
from dicomnode.demo.sample import write_phantom_ct

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "scale"
RESULTS = ROOT / "bench" / "results" / "scale.json"
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
ENV = {**os.environ, "TCP_NODELAY": "1", "PYTHONPATH": str(ROOT)}


def _start(cmd: list[str], log: Path, ready: bytes, cwd: Path) -> subprocess.Popen[bytes]:
    out = open(log, "wb")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=ENV,
                            start_new_session=True)
    deadline = time.monotonic() + 90
    while ready not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{cmd[3:5]} did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def one_config(kind: str, workers: int, series: list[Path], work: Path) -> dict[str, Any]:
    """Run every series through a node with ``workers`` workers of executor ``kind``."""
    db = f"dn_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db}"'))
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}"
    pacs_port, port = free_port(), free_port()
    (work / "pacs").mkdir(parents=True)
    queue = f"dicomnode-bench-{uuid.uuid4().hex[:8]}"
    cfg = {
        "var_dir": str(work / "var"), "node": {"port": port}, "database": {"url": url},
        "completion": {"quiet_period_s": 5},
        "rules": [{"name": "ct", "match": {"Modality": {"equals": "CT"}},
                   "pipelines": ["ct-tissue"], "destinations": ["pacs"]}],
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}},
        "output": {"previews": False},
        "executor": {"kind": kind, "workers": workers if kind == "local" else 0,
                     "device": "cpu", "poll_interval_s": 0.2,
                     "celery": {"queue": queue}},
    }
    config = work / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    procs = [subprocess.Popen(["/usr/bin/storescp", "-aet", "PACS", "-od", str(work / "pacs"),
                               str(pacs_port)], env=ENV, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        procs.append(_start([sys.executable, "-m", "dicomnode.cli", "serve", "--config",
                             str(config)], work / "node.log", b"listening on", work))
        if kind == "celery":
            for i in range(workers):
                procs.append(_start([sys.executable, "-m", "dicomnode.cli", "worker",
                                     "--config", str(config), "--name", f"w{i}"],
                                    work / f"w{i}.log", b"ready.", work))
        for folder in series:
            subprocess.run(["/usr/bin/storescu", "-aet", "MODALITY", "-aec", "DICOMNODE",
                            "+sd", "+sp", "*.dcm", "127.0.0.1", str(port), str(folder)],
                           check=True, env=ENV, capture_output=True)
        engine = create_engine(url)
        deadline = time.monotonic() + 1800
        while True:
            with engine.connect() as conn:
                jobs = conn.execute(select(Job.created_at, Job.started_at, Job.finished_at,
                                           Job.status)).all()
            if len(jobs) == len(series) and all(
                    j.status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.DEAD)
                    for j in jobs):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{kind} x{workers}: jobs did not finish")
            time.sleep(0.5)
        engine.dispose()
    finally:
        for proc in reversed(procs):
            _stop(proc)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        admin.dispose()
        if kind == "celery":
            from kombu import Connection

            with Connection("amqp://guest:guest@127.0.0.1:5672//") as conn:
                for q in (queue, f"{queue}.dead"):
                    conn.default_channel.queue_delete(q)
    waits = sorted((j.started_at - j.created_at).total_seconds() for j in jobs)
    span = (max(j.finished_at for j in jobs) - min(j.created_at for j in jobs)).total_seconds()
    runs = [(j.finished_at - j.started_at).total_seconds() for j in jobs]
    return {
        "executor": kind, "workers": workers, "jobs": len(jobs),
        "succeeded": sum(j.status == JobStatus.SUCCEEDED for j in jobs),
        "makespan_s": round(span, 2), "jobs_per_hour": round(len(jobs) * 3600 / span, 1),
        "job_run_s_median": round(statistics.median(runs), 2),
        "queue_to_start_s_median": round(statistics.median(waits), 3),
        "queue_to_start_s_p95": round(waits[min(len(waits) - 1, int(0.95 * len(waits)))], 3),
    }


def main() -> None:
    """Run every configuration and write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    series = []
    for i in range(args.jobs):
        write_phantom_ct(WORK / "series" / f"s{i}", slices=args.slices, size=args.size)
        series.append(WORK / "series" / f"s{i}")
    rows = []
    for kind, workers in (("local", 1), ("celery", 1), ("local", 2), ("celery", 2)):
        row = one_config(kind, workers, series, WORK / f"{kind}-{workers}")
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": f"python -m bench.scale --jobs {args.jobs} --slices {args.slices} "
                   f"--size {args.size}",
        "machine": f"{os.cpu_count()} CPUs, no GPU", "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
