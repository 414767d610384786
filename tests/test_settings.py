"""Settings: the embedded default runs as it is; misspelt keys fail naming the key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dicomnode.settings import (
    ConfigError,
    default_config_path,
    json_schema,
    load_settings,
    parse_settings,
)

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomnode.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


def test_embedded_default_is_valid_and_matches_issue() -> None:
    s = load_settings(default_config_path())
    assert s.node.ae_title == "DICOMNODE"
    assert s.node.port == 11112
    assert s.node.allowed_peers == []
    assert s.var_dir == Path("./var")
    assert s.database_url.startswith("sqlite:///") and s.database_url.endswith("var/dicomnode.sqlite")
    assert s.completion.quiet_period_s == 30


def test_config_check_cli_accepts_default() -> None:
    r = cli("config", "check", str(default_config_path()))
    assert r.returncode == 0, r.stderr
    assert "valid" in r.stdout


def test_misspelt_key_fails_naming_it(tmp_path: Path) -> None:
    data = yaml.safe_load(default_config_path().read_text())
    data["node"]["ae_titel"] = "X"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    r = cli("config", "check", str(bad))
    assert r.returncode == 1
    assert "node.ae_titel" in r.stderr and "unknown key" in r.stderr


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"rules": [{"name": "r", "match": {"Modalty": {"equals": "CT"}}}]}, "rules.0.match"),
        ({"rules": [{"name": "r", "match": {"Modality": {"equals": "CT", "regex": "x"}}}]},
         "rules.0.match.Modality"),
        ({"rules": [{"name": "r", "destinations": ["nowhere"]}]}, "nowhere"),
        ({"node": {"port": 70000}}, "node.port"),
        ({"node": {"ae_title": "A" * 17}}, "node.ae_title"),
        ({"completion": {"quiet_period_s": -1}}, "completion.quiet_period_s"),
    ],
)
def test_invalid_values_name_the_key(data: dict, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(data)
    assert path in str(info.value)


def test_unknown_pipeline_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"rules": [{"name": "r", "pipelines": ["no-such-thing"]}]}))
    r = cli("config", "check", str(bad))
    assert r.returncode == 1
    assert "rules.0.pipelines.0" in r.stderr and "no-such-thing" in r.stderr


def test_committed_json_schema_is_current() -> None:
    committed = json.loads((ROOT / "config" / "dicomnode.schema.json").read_text())
    assert committed == json_schema(), "regenerate: dicomnode config schema > config/dicomnode.schema.json"
