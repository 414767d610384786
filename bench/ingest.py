"""bench/ingest: receive throughput of dicomnode against DCMTK storescp and Orthanc.

A generated 300-slice 512x512 CT series is sent with DCMTK's storescu (TCP_NODELAY=1) over 1
and over 4 parallel associations. Every run starts its receiver with empty storage. dicomnode
runs the shipped default config (``config/dicomnode.yaml``: its rules, fsync and audit rows;
only the ports and var_dir are changed), and beside it the variants that show what each
receive-path choice is worth: pynetdicom's own polling reactors (``node.event_driven: false``)
and one receiving process. Each node is sent to once ``/healthz`` says its workers have started
(a node runs for months; their start-up, importing torch, is not receiving), and one variant is
sent to as soon as it listens, to show what that start-up costs a sender who comes at once.
The median wall time of several runs and the ratios against
storescp and Orthanc go to ``bench/results/ingest.json``, with completion latency (sender's
association closed -> series complete) and, from one more timed run of the default node, where
the time goes per instance.

Run: ``make bench`` or ``.venv/bin/python -m bench.ingest [--runs N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "ingest"
RESULTS = ROOT / "bench" / "results" / "ingest.json"
ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} never opened")


def send(parts: list[Path], port: int, aec: str) -> float:
    """storescu each folder in parallel (one association each); wall seconds until all exit."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["/usr/bin/storescu", "-aet", "BENCH", "-aec", aec, "+sd", "+sp",
                               "*.dcm", "127.0.0.1", str(port), str(p)], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for p in parts]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - t0


class StoreSCP:
    name = "storescp"

    def __init__(self, parallel: int) -> None:
        self.parallel = parallel

    def start(self, work: Path) -> int:
        port = free_port()
        (work / "out").mkdir(parents=True)
        args = ["/usr/bin/storescp", "-od", str(work / "out")]
        if self.parallel > 1:
            args.append("--fork")
        self.proc = subprocess.Popen([*args, str(port)], env=ENV, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(port)
        return port

    def aec(self) -> str:
        return "ANY-SCP"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        subprocess.run(["pkill", "-f", "storescp -od"], check=False)


class OrthancTarget:
    name = "orthanc"

    def start(self, work: Path) -> int:
        from dicomnode.demo.localpacs import Orthanc

        self.pacs = Orthanc(work / "orthanc", dicom_port=free_port(), http_port=free_port(),
                            peers=("BENCH",)).start()
        return self.pacs.dicom_port

    def aec(self) -> str:
        return "ORTHANC"

    def stop(self) -> None:
        self.pacs.stop()


class NodeTarget:
    """dicomnode on the shipped config; ``node`` overrides keys of its ``node:`` section."""

    def __init__(self, name: str = "dicomnode", node: dict[str, object] | None = None,
                 breakdown: Path | None = None, *, wait_workers: bool = True) -> None:
        self.name, self.node, self.breakdown = name, node or {}, breakdown
        self.wait_workers = wait_workers

    def start(self, work: Path) -> int:
        from dicomnode.settings import default_config_path

        port = free_port()
        self.work = work
        cfg = yaml.safe_load(default_config_path().read_text())
        cfg["var_dir"] = str(work / "var")
        cfg["node"].update({"port": port, **self.node})
        cfg["http"]["port"] = free_port()
        work.mkdir(parents=True, exist_ok=True)
        (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        self.log = open(work / "node.log", "wb")  # noqa: SIM115
        runner = ["bench/ingest_breakdown.py"] if self.breakdown else ["-m", "dicomnode.cli"]
        env = {**os.environ, "DICOMNODE_BREAKDOWN": str(self.breakdown or "")}
        self.proc = subprocess.Popen([sys.executable, *runner, "serve", "--config",
                                      str(work / "cfg.yaml")], stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        deadline = time.monotonic() + 60
        while b"listening on" not in (work / "node.log").read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((work / "node.log").read_text()[-2000:])
            time.sleep(0.1)
        if self.wait_workers:
            self._wait_workers_ready(cfg["http"]["port"], deadline)
        return port

    def _wait_workers_ready(self, http_port: int, deadline: float) -> None:
        """Until /healthz says the workers have started: a node runs for months, and its
        workers' start (importing torch, about 1 s of CPU on both cores) is not receiving.
        Orthanc, too, is measured once it has started."""
        import urllib.request

        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz",
                                            timeout=5) as resp:
                    if json.loads(resp.read()).get("workers") == "ready":
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the node's workers never reported ready")

    def aec(self) -> str:
        return "DICOMNODE"

    def completion_latency(self, series_uid: str, closed_at: float) -> float | None:
        """Seconds from the last storescu exit to the series row's completed_at."""
        from sqlalchemy import select

        from dicomnode.audit.db import make_engine, make_sessionmaker
        from dicomnode.audit.models import Association, Series

        engine = make_engine(f"sqlite:///{(self.work / 'var' / 'dicomnode.sqlite').resolve()}")
        factory = make_sessionmaker(engine)
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                with factory() as s:
                    row = s.execute(select(Series).where(
                        Series.series_instance_uid == series_uid)).scalar_one_or_none()
                    ended = s.execute(select(Association.ended_at).where(
                        Association.direction == "in").order_by(Association.ended_at.desc())
                    ).scalars().first()
                if row is not None and row.completed_at is not None and ended is not None:
                    return (row.completed_at - ended).total_seconds()
                time.sleep(0.05)
        finally:
            engine.dispose()
        return None

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def where_the_time_goes(parts: list[Path], slices: int) -> dict[str, float]:
    """One more default-node run (one receiving process, so that the timed one gets the
    association) with stage timers (bench/ingest_breakdown.py): milliseconds
    per instance in each stage, and the whole send's wall time per instance."""
    stats = WORK / "breakdown.json"
    target = NodeTarget("dicomnode (timed)", {"receive_processes": 1}, breakdown=stats)
    work = WORK / "runs" / "breakdown"
    port = target.start(work)
    try:
        wall = send(parts, port, target.aec())
        time.sleep(0.5)
    finally:
        target.stop()
    shutil.rmtree(work, ignore_errors=True)
    stages = json.loads(stats.read_text())
    out = {"wall per instance (timers on)": 1000 * wall / slices}
    out.update({name: 1000 * total / slices for name, (_, total) in stages.items()})
    print(json.dumps(out, indent=2), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    args = parser.parse_args()
    from dicomnode.demo.sample import write_phantom_ct

    shutil.rmtree(WORK, ignore_errors=True)
    data = WORK / "series"
    files = write_phantom_ct(data, slices=args.slices, size=512)
    import pydicom

    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    splits = WORK / "split4"
    for i, f in enumerate(files):
        d = splits / str(i % 4)
        d.mkdir(parents=True, exist_ok=True)
        os.link(f, d / f.name)
    layouts = {1: [data], 4: sorted(p for p in splits.iterdir())}
    results: dict[str, dict[str, object]] = {}
    latencies: list[float] = []
    for parallel, parts in layouts.items():
        targets = [StoreSCP(parallel), OrthancTarget(), NodeTarget(),
                   NodeTarget("dicomnode, polling reactors", {"event_driven": False}),
                   NodeTarget("dicomnode, sent while its workers start", wait_workers=False)]
        if parallel > 1:
            targets.append(NodeTarget("dicomnode, 1 process", {"receive_processes": 1}))
        times_by: dict[str, list[float]] = {t.name: [] for t in targets}
        for run in range(args.runs):  # interleaved, so that drift on a shared machine is spread
            for target in targets:
                work = WORK / "runs" / f"{target.name.replace(' ', '_')}-{parallel}-{run}"
                port = target.start(work)
                try:
                    times_by[target.name].append(send(parts, port, target.aec()))
                    if type(target) is NodeTarget and target.name == "dicomnode" \
                            and parallel == 1:
                        lat = target.completion_latency(series_uid, time.perf_counter())
                        if lat is not None:
                            latencies.append(lat)
                finally:
                    target.stop()
                shutil.rmtree(work, ignore_errors=True)
        for name, times in times_by.items():
            results[f"{name} x{parallel}"] = {
                "median_s": statistics.median(times), "runs_s": times}
            print(f"{name:28} {parallel} assoc: median {statistics.median(times):.2f} s "
                  f"{[round(t, 2) for t in times]}", flush=True)
    ratios = {}
    for parallel in layouts:
        orth = results[f"orthanc x{parallel}"]["median_s"]
        scp = results[f"storescp x{parallel}"]["median_s"]
        for key, value in results.items():
            if key.startswith("dicomnode") and key.endswith(f"x{parallel}"):
                ratios[key] = {"vs_orthanc": value["median_s"] / orth,  # type: ignore[operator]
                               "vs_storescp": value["median_s"] / scp}  # type: ignore[operator]
    breakdown = where_the_time_goes(layouts[1], args.slices)
    out = {
        "benchmark": "ingest", "slices": args.slices, "matrix": 512, "runs": args.runs,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "config": "config/dicomnode.yaml as shipped (ports and var_dir changed)",
        "median_seconds": {k: v["median_s"] for k, v in results.items()},
        "runs_seconds": {k: v["runs_s"] for k, v in results.items()},
        "ratios": ratios,
        "completion_latency_s": {"runs": latencies,
                                 "median": statistics.median(latencies) if latencies else None},
        "per_instance_ms_one_association": breakdown,
        "command": f"python -m bench.ingest --runs {args.runs}",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(json.dumps(out["ratios"], indent=2))
    print(f"completion latency: {out['completion_latency_s']}")


if __name__ == "__main__":
    main()
