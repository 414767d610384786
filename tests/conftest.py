"""Shared fixtures: real peers on loopback, started and stopped by the tests themselves.

* ``node``: starts ``dicomnode serve`` as a real subprocess on a free port (so ``kill -9`` is real).
* ``db_url``: SQLite in the test's folder, or a fresh PostgreSQL database on 127.0.0.1:5432.
* ``DATA``: the real scanner data in ``../shared/data`` (``DICOMNODE_TEST_DATA`` overrides).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicomnode.resources import example_data_dir

ROOT = Path(__file__).resolve().parents[1]
DATA = example_data_dir().resolve()
LIDC = DATA / "ct" / "lidc-idri-0001"
STORESCU = "/usr/bin/storescu"
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# CI sets this: a missing tool or data set is then a failure, not a skip.
STRICT = os.environ.get("DICOMNODE_REQUIRE_ALL") == "1"


def require(path: str | Path) -> None:
    """Skip (fail under DICOMNODE_REQUIRE_ALL=1, as in CI) when a real component is missing."""
    if not Path(path).exists():
        message = f"{path} is missing; `make test` installs the tools (see Makefile)"
        if STRICT:
            pytest.fail(message)
        pytest.skip(message)


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``data`` skip, saying why, when the real scanner data is absent; tests
    marked ``gpu`` when no CUDA device is present (never a CI failure: CI has no GPU)."""
    if any(item.get_closest_marker("gpu") for item in items) and not _cuda():
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(pytest.mark.skip(reason="no CUDA device here"))
    if DATA.is_dir():
        return
    message = (f"real scanner data not found at {DATA} (set DICOMNODE_TEST_DATA to the "
               "shared data folder)")
    if STRICT:
        raise pytest.UsageError(message)
    for item in items:
        if item.get_closest_marker("data"):
            item.add_marker(pytest.mark.skip(reason=message))


def storescu(folder: Path, port: int, *, calling: str = "MODALITY", called: str = "DICOMNODE",
             pattern: str = "*.dcm", extra: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Send a folder with DCMTK's storescu (TCP_NODELAY=1, as ARCHITECTURE.md requires)."""
    require(STORESCU)
    env = {**os.environ, "TCP_NODELAY": "1"}
    cmd = [STORESCU, "-aet", calling, "-aec", called, "+sd", "+sp", pattern, *(extra or []),
           "127.0.0.1", str(port), str(folder)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def wait_for(predicate: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database URL, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'node.sqlite'}"
        return
    yield from _pg_database()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database."""
    yield from _pg_database()


def _pg_database() -> Iterator[str]:
    from sqlalchemy import create_engine, text

    name = f"dn_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        message = f"PostgreSQL on 127.0.0.1:5432 is needed: {exc}"
        if STRICT:
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class NodeProcess:
    """``dicomnode serve`` in a subprocess, with helpers to read its state."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        self.config = config
        self.port = int(config["node"]["port"])
        self.config_path = workdir / "dicomnode.yaml"
        self.write_config()
        self.log_path = workdir / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        """Write ``self.config`` (after a test changed it; takes effect at the next start)."""
        self.config_path.write_text(yaml.safe_dump(self.config))

    @property
    def settings(self) -> Any:
        from dicomnode.settings import load_settings

        return load_settings(self.config_path)

    def start(self, *, timeout: float = 60.0) -> NodeProcess:
        env = {**os.environ, "DICOMNODE_PLUGINS": "tests.plugins", "PYTHONPATH": str(ROOT)}
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(self.config_path)],
            cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited: {self.log_path.read_text()[-3000:]}")
            return f"listening on 127.0.0.1:{self.port}" in self.log_path.read_text()[offset:]

        wait_for(up, timeout=timeout, interval=0.2)
        return self

    def stop(self, *, timeout: float = 60.0) -> int:
        """SIGTERM and wait: the node must exit cleanly (returns the exit code)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("node did not stop on SIGTERM") from None

    def kill9(self) -> None:
        assert self.proc is not None
        # the whole process group would include spawned workers; kill the server only
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def status(self) -> dict[str, Any]:
        from dicomnode.cli.node import status_report

        return status_report(self.settings)

    def session(self) -> Any:
        from dicomnode.app import open_database

        _engine, factory = open_database(self.settings, upgrade=False)
        return factory()


@pytest.fixture
def make_node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., NodeProcess]]:
    """Factory: ``make_node(db_url=..., **overrides)`` returns a started node."""
    nodes: list[NodeProcess] = []

    def factory(*, db_url: str | None = None, start: bool = True, **overrides: Any) -> NodeProcess:
        workdir = tmp_path / f"node{len(nodes)}"
        workdir.mkdir()
        config: dict[str, Any] = {
            "var_dir": str(workdir / "var"),
            # one receiving process: the shipped `auto` (4 or more) adds ~3 s to every start;
            # test_reactor.py, the chaos rounds (bench/chaos.py) and the demo run `auto`
            "node": {"port": free_port(), "receive_processes": 1},
            "database": {"url": db_url},
            "completion": {"quiet_period_s": 30, "max_wait_s": 600},
            "rules": [{"name": "ct", "match": {"Modality": {"equals": "CT"}},
                       "pipelines": ["test-echo"]}],
            "executor": {"workers": 0},
            "http": {"port": None},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        node = NodeProcess(workdir, config)
        nodes.append(node)
        return node.start() if start else node

    yield factory
    for node in nodes:
        with contextlib.suppress(Exception):
            node.stop(timeout=20)


@pytest.fixture
def lidc_copy(tmp_path: Path) -> Path:
    """The LIDC CT slices only (the folder also holds an XML annotation file)."""
    require(LIDC)
    out = tmp_path / "lidc"
    out.mkdir()
    for f in sorted(LIDC.glob("*.dcm")):
        os.symlink(f, out / f.name)
    return out


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process from /proc, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return fields[0], int(fields[1])


def have_binary(name: str) -> bool:
    return shutil.which(name) is not None


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[object]:
    """Factory: ``orthanc_factory(**kwargs)`` an Orthanc PACS on free ports (not started)."""
    from dicomnode.demo.localpacs import Orthanc

    started: list[Orthanc] = []

    def make(**kwargs: object) -> Orthanc:
        require("/usr/sbin/Orthanc")
        pacs = Orthanc(tmp_path / "orthanc", dicom_port=kwargs.pop("dicom_port", free_port()),
                       http_port=free_port(), **kwargs)  # type: ignore[arg-type]
        started.append(pacs)
        return pacs

    yield make
    for pacs in started:
        pacs.stop()
