"""A built wheel, installed (not editable) into a fresh virtual environment, works from any
folder: the packaged default config, the shipped models and the migrations are found."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**{k: v for k, v in os.environ.items()
                                  if k not in ("PYTHONPATH", "DICOMNODE_MODELS_DIR")}, **env})


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; its dependencies come from this environment's
    site-packages through a path file (their .pth files, this checkout's editable install
    among them, are not processed there), so nothing is downloaded."""
    base = tmp_path_factory.mktemp("install")
    source = base / "source"  # a clean copy: no build/ left over from an earlier build
    for name in ("dicomnode", "config", "models", "db"):
        shutil.copytree(ROOT / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    wheels = base / "wheels"
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(wheels), str(source)], cwd=base)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("dicomnode-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    install = _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "-q", "--no-deps", str(wheel)], cwd=base)
    assert install.returncode == 0, install.stderr
    return venv


def test_the_wheel_is_what_runs(installed: Path, tmp_path: Path) -> None:
    r = _run([str(installed / "bin" / "python"), "-c",
              "import dicomnode, dicomnode.resources as r; print(dicomnode.__file__); "
              "print(r.shipped('config'))"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    module, config = r.stdout.split()
    assert str(installed) in module and str(ROOT) not in module
    assert config.endswith("dicomnode/_shipped/config") and str(installed) in config


def test_config_check_of_the_packaged_default(installed: Path, tmp_path: Path) -> None:
    r = _run([str(installed / "bin" / "dicomnode"), "config", "check", "--help"], cwd=tmp_path)
    assert r.returncode == 0
    r = _run([str(installed / "bin" / "python"), "-c",
              "from dicomnode.settings import default_config_path as d; print(d())"], cwd=tmp_path)
    default = Path(r.stdout.strip())
    assert str(installed) in str(default)
    r = _run([str(installed / "bin" / "dicomnode"), "config", "check", str(default)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "valid" in r.stdout


def test_models_list_finds_the_shipped_models(installed: Path, tmp_path: Path) -> None:
    r = _run([str(installed / "bin" / "dicomnode"), "models", "list"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for name in ("ct2pet-district", "pet-denoise-drmc", "pet-denoise-drmc-2mm",
                 "petct-lesions-fusion"):
        assert name in r.stdout and "sha256 ok" in r.stdout
    assert "_shipped/models" in r.stdout
    other = tmp_path / "site-models"
    other.mkdir()
    r = _run([str(installed / "bin" / "dicomnode"), "models", "list"], cwd=tmp_path,
             DICOMNODE_MODELS_DIR=str(other))
    assert r.returncode == 0 and f"models in {other}:" in r.stdout
    assert "pet-denoise-drmc " not in r.stdout


def test_db_upgrade_finds_the_migrations(installed: Path, tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(f"var_dir: {tmp_path / 'var'}\n")
    r = _run([str(installed / "bin" / "dicomnode"), "db", "upgrade", "--config", str(config)],
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    tables = set(inspect(create_engine(f"sqlite:///{tmp_path / 'var' / 'dicomnode.sqlite'}"))
                 .get_table_names())
    assert {"instance", "series", "job", "delivery", "event_log"} <= tables
