"""The pipeline registry: fixed series numbers, clashes refused, missing extras named."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode import pipelines as registry
from dicomnode.app import check_pipelines
from dicomnode.pipelines import PipelineSpec, get_pipeline, job_context, known_pipelines, register
from dicomnode.settings import ConfigError, parse_settings


def _spec(name: str, number: int, requires: tuple[str, ...] = ()) -> PipelineSpec:
    return PipelineSpec(name=name, version="1", entry_point="tests.plugins:echo_run",
                        modalities=("CT",), description="test", series_number=number,
                        requires=requires)


def _series_number(name: str) -> int:
    ctx = job_context(parse_settings({}), get_pipeline(name), job_id=1,
                      series_instance_uid="1.2.3", input_files=(), output_dir=Path("."),
                      device="cpu")
    return ctx.series_number


def test_a_plugin_does_not_renumber_the_builtin_pipelines(monkeypatch: pytest.MonkeyPatch) -> None:
    known_pipelines()  # built-ins loaded
    before = {name: _series_number(name) for name in
              ("ct-organs", "ct-sr", "ct-tissue", "ct2pet", "pet-denoise")}
    assert before == {"ct-organs": 9000, "ct-sr": 9001, "ct-tissue": 9002, "ct2pet": 9003,
                      "pet-denoise": 9004}
    # a plugin whose name sorts first (it used to shift every built-in by one)
    monkeypatch.setitem(registry._REGISTRY, "aaa-site-plugin", _spec("aaa-site-plugin", 950))
    assert {name: _series_number(name) for name in before} == before
    assert _series_number("aaa-site-plugin") == 9950


def test_series_number_clash_and_range_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    known_pipelines()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with pytest.raises(ValueError, match="series_number 2 is already 'ct-tissue'"):
        register(_spec("site-seg", 2))
    with pytest.raises(ValueError, match="not in 0-999"):
        _spec("site-seg", 1000)


def test_a_pipeline_without_its_extra_is_a_config_error_naming_the_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    known_pipelines()
    monkeypatch.setitem(registry._REGISTRY, "needs-extra",
                        _spec("needs-extra", 951, requires=("numpy", "no_such_module_here")))
    assert registry._REGISTRY["needs-extra"].missing() == ["no_such_module_here"]
    settings = parse_settings({"rules": [{"name": "r", "pipelines": ["ct-tissue", "needs-extra"]}]})
    with pytest.raises(ConfigError) as info:
        check_pipelines(settings)
    assert "rules.0.pipelines.1" in str(info.value)
    assert "no_such_module_here" in str(info.value) and "dicomnode[ml]" in str(info.value)
