"""bench/chaos: pull the power on the node, again and again, and count what was lost.

Three parts, each on its own spool and database, the disk and the audit rows as the oracle:

* ``receive``: kill -9 of the node at seeded random points while a modality sends a CT, ten
  rounds on one spool; then the whole series is re-sent. Counted: instances acknowledged
  (0x0000), acknowledged but missing after the restart (goal 0), rows whose file does not
  match, temporary leftovers, completions and jobs of the re-sent series (goal 1 each).
* ``job-push``: a new series per round through ``ct-tissue`` to a PACS that answers each
  C-STORE after a pause; each round kills the node while its job runs or while the PACS holds
  a result's C-STORE, then restarts it. Counted: jobs (goal one SUCCEEDED per series), result
  instances the PACS holds that no finished job wrote (duplicate results, goal 0), results
  never delivered (goal 0), and the same instance sent again after a kill (same UID: the PACS
  keeps one copy; at-least-once delivery cannot avoid this).
* ``load``: four senders for two minutes, each sending new series (fresh UIDs) back to back,
  with ``ct-tissue`` on and a DCMTK ``storescp`` as the PACS. Counted: instances acknowledged
  vs stored, jobs and deliveries, and the peak resident memory of the node's processes.

Run: ``.venv/bin/python -m bench.chaos [--rounds 10] [--job-rounds 6] [--load-s 120]``;
results in ``bench/results/chaos.json``. ``tests/test_chaos.py`` runs the same code, shorter.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import yaml
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from bench.ingest import free_port
from dicomnode.audit.models import (
    Delivery,
    DeliveryStatus,
    EventLog,
    Instance,
    Job,
    JobStatus,
    Output,
    Series,
    SeriesState,
)
from dicomnode.demo.sample import write_phantom_ct

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "chaos"
RESULTS = ROOT / "bench" / "results" / "chaos.json"
ENV = {**os.environ, "TCP_NODELAY": "1", "PYTHONPATH": str(ROOT)}
CT = "1.2.840.10008.5.1.4.1.1.2"


def _until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


class Node:
    """``dicomnode serve`` as a subprocess that can be killed with SIGKILL and restarted."""

    def __init__(self, work: Path, config: dict[str, Any]) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.work, self.config = work, config
        self.port = int(config["node"]["port"])
        self.config_path, self.log = work / "dicomnode.yaml", work / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_config()

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start(self) -> Node:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicomnode.cli", "serve", "--config",
                 str(self.config_path)], cwd=self.work, stdout=out, stderr=subprocess.STDOUT,
                env=ENV)

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited:\n{self.log.read_text()[-3000:]}")
            return f"listening on 127.0.0.1:{self.port}" in self.log.read_text()[offset:]
        _until(up, 90, "node start")
        return self

    def kill9(self) -> None:
        """SIGKILL the node's main process only (its workers must notice by themselves)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def session(self) -> Any:
        from dicomnode.app import open_database
        from dicomnode.settings import load_settings

        _engine, factory = open_database(load_settings(self.config_path), upgrade=False)
        return factory()

    @property
    def spool_dir(self) -> Path:
        from dicomnode.settings import load_settings

        return load_settings(self.config_path).spool_dir


def node_config(work: Path, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "var_dir": str(work / "var"), "node": {"port": free_port()},
        "rules": [{"name": "ct", "match": {"Modality": {"equals": "CT"}},
                   "pipelines": ["ct-tissue"]}],
        "executor": {"workers": 0, "device": "cpu"}, "http": {"port": None},
        "output": {"previews": False},
    }
    config.update(overrides)
    return config


def storescu(folder: Path, port: int, *, verbose: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = ["/usr/bin/storescu", "-aet", "MODALITY", "-aec", "DICOMNODE", "+sd", "+sp", "*.dcm",
           *(["-v"] if verbose else []), "127.0.0.1", str(port), str(folder)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------------------------- receive


def _send_until_killed(node: Node, files: list[Path], kill_at: int) -> dict[str, Path]:
    """Send ``files`` on one association; kill -9 the node as the ``kill_at``-th store goes
    out. Returns the instances answered 0x0000."""
    acknowledged: dict[str, Path] = {}
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    killer = threading.Timer(0, node.kill9)
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        if i == kill_at:
            killer.start()  # the store below races the kill: either outcome is allowed
        try:
            rsp = assoc.send_c_store(ds)
        except Exception:  # noqa: BLE001 - the connection died with the node
            break
        if rsp and int(rsp.get("Status", 0xFFFF)) == 0:
            acknowledged[str(ds.SOPInstanceUID)] = path
        if not assoc.is_established:
            break
    killer.join()
    if assoc.is_established:
        assoc.abort()
    return acknowledged


def receive_rounds(work: Path, *, rounds: int = 10, seed: int = 20261206,
                   db_url: str | None = None) -> dict[str, Any]:
    """kill -9 during receive, ``rounds`` times on one spool; then the series is re-sent."""
    files = sorted(write_phantom_ct(work / "ct", slices=60, size=128))
    # a long quiet period: a series cut by a crash must not complete before it is re-sent
    node = Node(work / "node", node_config(work, database={"url": db_url},
                                           completion={"quiet_period_s": 600})).start()
    rng = random.Random(seed)
    acknowledged: dict[str, Path] = {}
    lost_after_round: list[int] = []
    bad_files = leftovers = 0
    for _ in range(rounds):
        order = files[:]
        rng.shuffle(order)  # instances arrive in any order, some again
        acknowledged |= _send_until_killed(node, order, rng.randrange(1, len(order)))
        node.start()  # same config, database and spool
        with node.session() as s:
            rows = {r.sop_instance_uid: r for r in s.execute(select(Instance)).scalars()}
        lost_after_round.append(sum(u not in rows for u in acknowledged))
        for row in rows.values():  # every row's file is whole
            data = (node.spool_dir / row.path).read_bytes()
            bad_files += hashlib.sha256(data).hexdigest() != row.sha256
        leftovers += len(list((node.spool_dir / ".tmp").iterdir()))
    # the modality re-sends the whole series; the crashed associations keep it open until the
    # quiet period, so restart with a short one
    resent = storescu(work / "ct", node.port).returncode
    node.stop()
    node.config["completion"]["quiet_period_s"] = 2
    node.write_config()
    node.start()
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)

    def finished() -> Series | None:
        with node.session() as s:
            series = s.execute(select(Series).where(Series.series_instance_uid == uid)
                               ).scalar_one()
            return series if series.state != SeriesState.RECEIVING else None
    series = _until(finished, 60, "re-sent series complete")
    with node.session() as s:
        completions = len(s.execute(select(EventLog).where(
            EventLog.event_type == "series.completed")).scalars().all())
        jobs = len(s.execute(select(Job)).scalars().all())
        starts = s.execute(select(EventLog).where(EventLog.event_type == "node.started")
                           ).scalars().all()
    node.stop()
    return {"rounds": rounds, "instances_acknowledged": len(acknowledged),
            "acknowledged_lost": max(lost_after_round), "rows_not_matching_file": bad_files,
            "temporary_leftovers": leftovers, "resend_storescu_rc": resent,
            "series_instances": series.instance_count, "series_slices": len(files),
            "completions": completions, "jobs": jobs,
            "crashed_runs_closed": sum(bool(e.detail["crashed_runs"]) for e in starts)}


# --------------------------------------------------------------------------------- job-push


class SlowPacs:
    """A storage SCP that holds each C-STORE for ``delay_s`` before storing and answering, so
    that a kill can land while a result is in flight. Records every instance it stored."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.port = free_port()
        self.received: list[tuple[str, str]] = []  # (SOPInstanceUID, SeriesInstanceUID)
        self.in_flight = threading.Event()
        self._lock = threading.Lock()
        from pynetdicom import AllStoragePresentationContexts

        self.ae = AE(ae_title="PACS")
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.ae.add_supported_context(Verification)

    def _on_store(self, event: Any) -> int:
        self.in_flight.set()
        time.sleep(self.delay_s)
        ds = event.dataset
        with self._lock:
            self.received.append((str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)))
        return 0x0000

    def start(self) -> SlowPacs:
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        self.server.shutdown()


def job_push_rounds(work: Path, *, rounds: int = 6, seed: int = 7,
                    db_url: str | None = None) -> dict[str, Any]:
    """Even rounds kill the node while its job runs, odd rounds while the PACS holds one of
    its results; every series must end with one job, its results delivered, none twice."""
    pacs = SlowPacs(delay_s=1.0).start()
    rng = random.Random(seed)
    config = node_config(
        work, database={"url": db_url}, completion={"quiet_period_s": 1},
        executor={"workers": 1, "device": "cpu", "lease_s": 3, "poll_interval_s": 0.2},
        push={"backoff_initial_s": 0.5, "backoff_max_s": 2},
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}},
        rules=[{"name": "ct", "match": {"Modality": {"equals": "CT"}},
                "pipelines": ["ct-tissue"], "destinations": ["pacs"]}])
    node = Node(work / "node", config).start()
    series_uids: list[str] = []
    hits: Counter[str] = Counter()

    def running() -> int:
        with node.session() as s:
            return len(s.execute(select(Job.id).where(
                Job.status == JobStatus.RUNNING)).all())
    try:
        for i in range(rounds):
            folder = work / f"series{i}"
            # a job round's series is large enough that its job outlasts the kill and the
            # worker's next heartbeat (lease_s / 4), which is when it notices the node is gone
            files = (write_phantom_ct(folder, slices=96, size=256) if i % 2 == 0
                     else write_phantom_ct(folder, slices=32, size=128))
            series_uids.append(str(pydicom.dcmread(files[0], stop_before_pixels=True)
                                   .SeriesInstanceUID))
            pacs.in_flight.clear()
            if storescu(folder, node.port).returncode != 0:
                raise RuntimeError(f"round {i}: the node refused the series")
            if i % 2 == 0:  # while the job runs
                _until(running, 120, f"round {i}: job running")
                time.sleep(rng.uniform(0.0, 0.4))  # early in the job: its worker must not finish it first
                still = running()
                node.kill9()
                hits["job" if still else "job-finished-before-kill"] += 1
            else:  # while the PACS holds a C-STORE of a result (a job may run meanwhile)
                _until(pacs.in_flight.is_set, 120, f"round {i}: push in flight")
                time.sleep(rng.uniform(0.0, pacs.delay_s * 0.8))
                still = running()
                node.kill9()
                hits["push"] += 1
            hits["running_jobs_killed"] += still
            node.start()

        def settled() -> bool:
            with node.session() as s:
                jobs = s.execute(select(Job.status)).scalars().all()
                open_deliveries = s.execute(select(Delivery.id).where(Delivery.status.in_(
                    [DeliveryStatus.PENDING, DeliveryStatus.SENDING, DeliveryStatus.RETRY]))).first()
            return (len(jobs) >= rounds and open_deliveries is None
                    and all(j in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.DEAD)
                            for j in jobs))
        _until(settled, 600, "all jobs and deliveries finished")
        time.sleep(pacs.delay_s * 2)  # a store the PACS still held when the node died
        with node.session() as s:
            jobs = s.execute(select(Job)).scalars().all()
            written = {o.sop_instance_uid for o in s.execute(select(Output)).scalars()}
            delivered = s.execute(select(Delivery.status)).scalars().all()
            reclaimed = len(s.execute(select(EventLog).where(
                EventLog.event_type == "job.reclaimed")).scalars().all())
            input_of = {j.id: s.get(Series, j.series_id).series_instance_uid for j in jobs}
    finally:
        node.stop()
        pacs.stop()
    stored = Counter(uid for uid, _ in pacs.received)
    per_series = Counter(input_of.values())
    return {
        "rounds": rounds, "kills": dict(hits), "series": len(series_uids),
        "jobs": len(jobs), "jobs_per_series_max": max(per_series.values()),
        "jobs_succeeded": sum(j.status == JobStatus.SUCCEEDED for j in jobs),
        "job_attempts": sum(j.attempts for j in jobs), "jobs_reclaimed": reclaimed,
        "result_instances": len(written),
        "results_not_delivered": len(written - set(stored)),
        "duplicate_results": len(set(stored) - written),
        "resent_same_uid": sum(n - 1 for n in stored.values()),
        "deliveries": dict(Counter(str(d) for d in delivered)),
    }


# --------------------------------------------------------------------------------- malformed


def offer(port: int, path: Path) -> int | str:
    """C-STORE the file's bytes as they are (with pynetdicom's STORE_SEND_CHUNKED_DATASET
    on); the status, or why no C-STORE could be sent."""
    try:
        meta = pydicom.filereader.read_file_meta_info(path)  # only the (intact) file meta
        sop_class, syntax = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
    except Exception as exc:  # noqa: BLE001 - the corpus entry's own damage
        return f"no meta: {type(exc).__name__}"
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    if not assoc.is_established:
        return "association refused"
    try:
        rsp = assoc.send_c_store(path)
        return int(rsp.Status) if "Status" in rsp else "no status (aborted)"
    except Exception as exc:  # noqa: BLE001
        return f"not sent: {type(exc).__name__}"
    finally:
        if assoc.is_established:
            assoc.release()


def malformed(work: Path) -> dict[str, Any]:
    """The test suite's malformed corpus, each input on its own association."""
    from pynetdicom import _config

    from tests.fuzz_corpus import corpus, distinct

    _config.STORE_SEND_CHUNKED_DATASET = True
    (base,) = write_phantom_ct(work / "base", slices=1, size=16)
    node = Node(work / "node", node_config(work)).start()
    answers: Counter[str] = Counter()
    died = 0
    (work / "corpus").mkdir()
    try:
        for name, data in distinct(corpus(base)):
            path = work / "corpus" / f"{name}.dcm"
            path.write_bytes(data)
            answer = offer(node.port, path)
            answers[f"0x{answer:04X}" if isinstance(answer, int) else answer] += 1
            if node.proc is not None and node.proc.poll() is not None:
                died += 1
                node.start()
        with node.session() as s:
            events = len(s.execute(select(EventLog).where(
                EventLog.event_type == "instance.failed")).scalars().all())
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        node.stop()
    refused = sum(n for a, n in answers.items() if a != "0x0000")
    return {"inputs": sum(answers.values()), "answers": dict(answers), "refused": refused,
            "failure_events": events, "node_died": died}


# -------------------------------------------------------------------------------------- load


def _tree_rss_mib(pid: int) -> tuple[float, float]:
    """(resident MiB of ``pid`` and all its descendants, of ``pid`` alone)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        child = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(child)
        rss[child] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total / 2**20, rss.get(pid, 0) / 2**20


def _sender(template: list[pydicom.Dataset], folder: Path, port: int, until: float,
            tally: Counter[str], lock: threading.Lock) -> None:
    """Send new series (fresh UIDs on the template) back to back until ``until``."""
    n = 0
    while time.monotonic() < until:
        out = folder / f"s{n}"
        out.mkdir(parents=True)
        study, series = generate_uid(), generate_uid()
        for k, ds in enumerate(template):
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(out / f"{k:04d}.dcm", enforce_file_format=True)
        proc = storescu(out, port, verbose=True)
        ok = len(re.findall(r"Received Store Response \(Success\)", proc.stdout + proc.stderr))
        with lock:
            tally["sent"] += len(template)
            tally["acknowledged"] += ok
            tally["series"] += 1
            tally["storescu_failed"] += proc.returncode != 0
        shutil.rmtree(out)
        n += 1


def load(work: Path, *, seconds: float = 120, senders: int = 4) -> dict[str, Any]:
    """``senders`` parallel modalities for ``seconds``, ct-tissue on, storescp as the PACS."""
    pacs_port = free_port()
    (work / "pacs").mkdir(parents=True)
    pacs = subprocess.Popen(["/usr/bin/storescp", "-aet", "PACS", "-od", str(work / "pacs"),
                             str(pacs_port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    config = node_config(
        work, executor={"workers": 1, "device": "cpu"},
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}},
        rules=[{"name": "ct", "match": {"Modality": {"equals": "CT"}},
                "pipelines": ["ct-tissue"], "destinations": ["pacs"]}])
    node = Node(work / "node", config).start()
    template = write_phantom_ct(work / "template", slices=48, size=128)
    tally: Counter[str] = Counter()
    lock = threading.Lock()
    peak = [0.0, 0.0]
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=_sender, args=([pydicom.dcmread(f) for f in template],
                                                      work / f"sender{i}", node.port, until,
                                                      tally, lock)) for i in range(senders)]
    try:
        for t in threads:
            t.start()
        assert node.proc is not None
        while any(t.is_alive() for t in threads):
            tree, main = _tree_rss_mib(node.proc.pid)
            peak = [max(peak[0], tree), max(peak[1], main)]
            time.sleep(0.5)
        elapsed = seconds + max(0.0, time.monotonic() - until)
        with node.session() as s:
            stored = len(s.execute(select(Instance.id)).all())
            jobs_at_end = Counter(str(j) for j in s.execute(select(Job.status)).scalars())
        drain_start = time.monotonic()

        def drained() -> bool:
            tree, main = _tree_rss_mib(node.proc.pid)  # type: ignore[union-attr]
            peak[:] = [max(peak[0], tree), max(peak[1], main)]
            with node.session() as s:
                return s.execute(select(Job.id).where(Job.status.in_(
                    [JobStatus.QUEUED, JobStatus.RUNNING]))).first() is None and \
                    s.execute(select(Delivery.id).where(Delivery.status.in_(
                        [DeliveryStatus.PENDING, DeliveryStatus.SENDING,
                         DeliveryStatus.RETRY]))).first() is None
        _until(drained, 1800, "job backlog drained")
        drain_s = time.monotonic() - drain_start
        with node.session() as s:
            jobs = Counter(str(j) for j in s.execute(select(Job.status)).scalars())
            deliveries = Counter(str(d) for d in s.execute(select(Delivery.status)).scalars())
        alive = node.proc.poll() is None
    finally:
        node.stop()
        pacs.terminate()
        pacs.wait(10)
    return {"senders": senders, "seconds": round(elapsed, 1), "series_sent": tally["series"],
            "instances_sent": tally["sent"], "instances_acknowledged": tally["acknowledged"],
            "instances_stored": stored,
            "acknowledged_per_s": round(tally["acknowledged"] / elapsed, 1),
            "storescu_failures": tally["storescu_failed"], "jobs_when_senders_stopped":
            dict(jobs_at_end), "backlog_drain_s": round(drain_s, 1), "jobs": dict(jobs),
            "deliveries": dict(deliveries), "peak_rss_mib_all_processes": round(peak[0], 1),
            "peak_rss_mib_main_process": round(peak[1], 1), "node_alive": alive}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="kill -9 rounds during receive")
    parser.add_argument("--job-rounds", type=int, default=6, help="kill -9 rounds job/push")
    parser.add_argument("--load-s", type=float, default=120)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--only", choices=["receive", "job_push", "malformed", "load"],
                        action="append", help="run these parts; keep the others' results")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.only else {}
    results |= {
        "command": f"python -m bench.chaos --rounds {args.rounds} --job-rounds "
                   f"{args.job_rounds} --load-s {args.load_s:g} --senders {args.senders}",
        "machine": f"{os.cpu_count()} CPUs, no GPU", "database": "SQLite (the default)"}
    for name, run in (("receive", lambda: receive_rounds(WORK / "receive", rounds=args.rounds)),
                      ("job_push", lambda: job_push_rounds(WORK / "job-push",
                                                           rounds=args.job_rounds)),
                      ("malformed", lambda: malformed(WORK / "malformed")),
                      ("load", lambda: load(WORK / "load", seconds=args.load_s,
                                            senders=args.senders))):
        if args.only and name not in args.only:
            continue
        started = time.monotonic()
        results[name] = {**run(), "bench_s": round(time.monotonic() - started, 1)}
        print(name, json.dumps(results[name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
