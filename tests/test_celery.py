"""The celery executor with the real RabbitMQ and PostgreSQL of this machine: a node and two
`dicomnode worker` processes; each job runs once and each result is delivered once, also when
a worker is killed mid-job, when a message is delivered twice, and when a job kills every
worker process that runs it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from dicomnode.audit.models import Delivery, DeliveryStatus, EventLog, Job, JobStatus
from dicomnode.demo.sample import write_phantom_ct
from tests.conftest import (
    ROOT,
    STRICT,
    NodeProcess,
    free_port,
    proc_stat,
    require,
    storescu,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

BROKER = "amqp://guest:guest@127.0.0.1:5672//"


def _broker_up() -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", 5672)) == 0


@pytest.fixture
def queue() -> Iterator[str]:
    """A queue of this test's own (and its dead-letter queue), deleted afterwards."""
    if not _broker_up():
        message = "RabbitMQ is not running on 127.0.0.1:5672 (.ci/run starts it)"
        if STRICT:
            pytest.fail(message)
        pytest.skip(message)
    name = f"dicomnode-test-{uuid.uuid4().hex[:8]}"
    yield name
    from kombu import Connection

    with Connection(BROKER) as conn:
        channel = conn.default_channel
        for q in (name, f"{name}.dead"):
            try:
                channel.queue_delete(q)
            except Exception:
                channel = conn.channel()


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK's storescp as the PACS: every instance it receives is a file."""
    require("/usr/bin/storescp")
    port, out = free_port(), tmp_path / "pacs"
    out.mkdir()
    proc = subprocess.Popen(["/usr/bin/storescp", "-aet", "PACS", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TCP_NODELAY": "1"})
    wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, timeout=20)
    yield port, out
    proc.kill()
    proc.wait(10)


class Workers:
    """`dicomnode worker` processes on the node's config (each: a main process and one child)."""

    def __init__(self, node: NodeProcess) -> None:
        self.node = node
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> None:
        env = {**os.environ, "DICOMNODE_PLUGINS": "tests.plugins", "PYTHONPATH": str(ROOT)}
        log = open(self.node.workdir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "dicomnode.cli", "worker", "--config",
             str(self.node.config_path), "--name", name],
            cwd=self.node.workdir, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
        wait_for(lambda: b"ready." in (self.node.workdir / f"{name}.log").read_bytes(),
                 timeout=60)

    def log(self, name: str) -> str:
        return (self.node.workdir / f"{name}.log").read_text()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _node(make_node, pg_url: str, queue: str, pacs_port: int, pipeline: str,
          **executor: Any) -> tuple[NodeProcess, Workers]:
    node = make_node(
        db_url=pg_url,
        rules=[{"name": "ct", "match": {"Modality": {"equals": "CT"}}, "pipelines": [pipeline],
                "destinations": ["pacs"]}],
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}},
        executor={"kind": "celery", "workers": 0, "lease_s": 2, "poll_interval_s": 0.2,
                  "celery": {"broker_url": BROKER, "queue": queue}, **executor},
        schedule={"dispatch_sweep_s": 0.5, "delivery_sweep_s": 0.2},
        completion={"quiet_period_s": 2, "max_wait_s": 60})
    return node, Workers(node)


def _series(root: Path, n: int) -> list[Path]:
    folders = []
    for i in range(n):
        write_phantom_ct(root / f"s{i}", slices=16, size=48)
        folders.append(root / f"s{i}")
    return folders


def _jobs(node: NodeProcess) -> list[Job]:
    with node.session() as s:
        return list(s.execute(select(Job).order_by(Job.id)).scalars())


def _events(node: NodeProcess, kind: str) -> list[EventLog]:
    with node.session() as s:
        return list(s.execute(select(EventLog).where(EventLog.event_type == kind)).scalars())


def _delivered(node: NodeProcess) -> list[Delivery]:
    with node.session() as s:
        return list(s.execute(select(Delivery).where(
            Delivery.status == DeliveryStatus.DELIVERED)).scalars())


def test_two_workers_run_each_job_once_and_deliver_once(make_node, pg_url, queue, pacs,
                                                        tmp_path: Path) -> None:
    node, workers = _node(make_node, pg_url, queue, pacs[0], "ct-tissue")
    try:
        workers.start("wa")
        workers.start("wb")
        for folder in _series(tmp_path, 4):
            assert storescu(folder, node.port).returncode == 0
        wait_for(lambda: len(_delivered(node)) == 4 or None, timeout=180, interval=0.5)
        jobs = _jobs(node)
        assert len(jobs) == 4 and {j.status for j in jobs} == {JobStatus.SUCCEEDED}
        assert {j.attempts for j in jobs} == {1}
        started = _events(node, "job.started")
        assert sorted(e.detail["job_id"] for e in started) == sorted(j.id for j in jobs)
        assert len(list(pacs[1].iterdir())) == 4  # one SEG per series, each delivered once
        # the same message again, after the job is done: dropped, nothing runs twice
        from dicomnode.node.executors.celery_executor import TASK, make_app

        app = make_app(node.settings)
        for job in jobs:
            app.send_task(TASK, args=[job.id], queue=queue)
        wait_for(lambda: (workers.log("wa") + workers.log("wb")).count("message dropped") >= 4,
                 timeout=30)
        app.close()
        assert len(_events(node, "job.started")) == 4 and len(_delivered(node)) == 4
        assert len(list(pacs[1].iterdir())) == 4
    finally:
        workers.stop()


def test_a_worker_killed_mid_job_costs_one_retry_on_the_other(make_node, pg_url, queue, pacs,
                                                             tmp_path: Path) -> None:
    os.environ["TEST_SLOW_S"] = "6"
    node, workers = _node(make_node, pg_url, queue, pacs[0], "test-slow-tissue")
    try:
        workers.start("wa")
        workers.start("wb")
        assert storescu(_series(tmp_path, 1)[0], node.port).returncode == 0

        def running() -> Job | None:
            jobs = _jobs(node)
            return jobs[0] if jobs and jobs[0].status == JobStatus.RUNNING else None

        job = wait_for(running, timeout=60, interval=0.1)
        child = int(job.lease_owner.split(":")[1])  # the pool process running it
        stat = proc_stat(child)
        assert stat is not None
        main = stat[1]
        victim = next(n for n, p in workers.procs.items() if p.pid == main)
        os.kill(child, signal.SIGKILL)
        os.kill(main, signal.SIGKILL)  # the whole worker gone, as with a pulled cable
        workers.procs[victim].wait(10)
        wait_for(lambda: len(_delivered(node)) == 1 or None, timeout=120, interval=0.5)
        (job,) = _jobs(node)
        assert job.status == JobStatus.SUCCEEDED and job.attempts == 2
        owners = [e.actor for e in _events(node, "job.started")]
        assert len(owners) == 2 and owners[0] != owners[1]
        assert [e.event_type for e in _events(node, "job.reclaimed")] == ["job.reclaimed"]
        assert len(list(pacs[1].iterdir())) == 1
    finally:
        os.environ.pop("TEST_SLOW_S", None)
        workers.stop()


def test_a_job_that_kills_its_worker_ends_failed_and_the_queue_serves_on(
        make_node, pg_url, queue, pacs, tmp_path: Path) -> None:
    node, workers = _node(make_node, pg_url, queue, pacs[0], "test-crash-always",
                          max_attempts=2)
    try:
        workers.start("wa")
        assert storescu(_series(tmp_path / "a", 1)[0], node.port).returncode == 0
        wait_for(lambda: (j := _jobs(node)) and j[0].status == JobStatus.DEAD or None,
                 timeout=120, interval=0.5)
        (dead,) = _jobs(node)
        assert dead.attempts == 2 and dead.error_code == "lease_expired"
        # the same worker (a new pool process) still serves the queue
        config = node.config
        config["rules"] = [{"name": "ct", "match": {"Modality": {"equals": "CT"}},
                            "pipelines": ["ct-tissue"], "destinations": ["pacs"]}]
        node.stop()
        node = NodeProcess(node.workdir, config).start()
        assert storescu(_series(tmp_path / "b", 1)[0], node.port).returncode == 0
        wait_for(lambda: len(_delivered(node)) == 1 or None, timeout=120, interval=0.5)
        assert [j.status for j in _jobs(node)] == [JobStatus.DEAD, JobStatus.SUCCEEDED]
        node.stop()
    finally:
        workers.stop()


def test_worker_refuses_without_the_celery_executor(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(f"var_dir: {tmp_path}\n")
    r = subprocess.run([sys.executable, "-m", "dicomnode.cli", "worker", "--config", str(config)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "executor.kind is not celery" in r.stderr
