"""Completion and routing decisions as pure functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from dicomnode.assemble import completion_decision, content_check
from dicomnode.route import evaluate_rules
from dicomnode.settings import CompletionPolicy, parse_settings

AX = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def stack(zs: list[float]) -> tuple[list, list]:
    return [[0.0, 0.0, z] for z in zs], [AX for _ in zs]


def test_content_check() -> None:
    assert content_check(*stack([0, 2.5, 5, 7.5]), None) is None
    assert content_check(*stack([7.5, 0, 5, 2.5]), 4) is None  # order does not matter
    assert "3 of 4" in content_check(*stack([0, 2.5, 5]), 4)
    assert "gapped" in content_check(*stack([0, 2.5, 5, 10]), None)
    assert "duplicate" in content_check(*stack([0, 2.5, 2.5, 5]), None)
    pos, ori = stack([0, 2.5, 5])
    ori[1] = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # a localizer mixed in
    assert "orientation" in content_check(pos, ori, None)
    assert content_check([None, None], [None, None], None) is None  # SEG / SR: no geometry


def test_completion_decision() -> None:
    policy = CompletionPolicy(quiet_period_s=30, max_wait_s=600)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    common = dict(policy=policy, first_received_at=t0, last_received_at=t0, count=10)
    d = completion_decision(now=t0 + timedelta(seconds=1), senders_open=False,
                            content_problem=None, **common)
    assert d.complete and d.reason.startswith("sender association closed")
    d = completion_decision(now=t0 + timedelta(seconds=1), senders_open=False,
                            content_problem="gap", **common)
    assert not d.complete  # closed but gapped: wait for the quiet period
    d = completion_decision(now=t0 + timedelta(seconds=31), senders_open=False,
                            content_problem="gap", **common)
    assert d.complete and "quiet period" in d.reason and "gap" in d.reason
    d = completion_decision(now=t0 + timedelta(seconds=10), senders_open=True,
                            content_problem=None, **common)
    assert not d.complete
    d = completion_decision(now=t0 + timedelta(seconds=601), senders_open=True,
                            content_problem=None, policy=policy, first_received_at=t0,
                            last_received_at=t0 + timedelta(seconds=600), count=10)
    assert d.complete and "maximum wait" in d.reason


def test_rules() -> None:
    s = parse_settings({"rules": [
        {"name": "ct-chest", "match": {"Modality": {"equals": "CT"},
                                       "BodyPartExamined": {"one_of": ["CHEST", "LUNG"]},
                                       "SliceThickness": {"min": 0.5, "max": 3}}},
        {"name": "pet", "match": {"Modality": {"equals": "PT"}}, "calling_ae": ["SCANNER1"]},
        {"name": "desc", "match": {"SeriesDescription": {"regex": "(?i)low ?dose"}}},
    ]})
    values = {"Modality": "CT", "BodyPartExamined": "CHEST", "SliceThickness": "2.5",
              "SeriesDescription": "Low Dose Chest"}
    r = {e.rule: e for e in evaluate_rules(s.rules, values=values, calling_ae="X")}
    assert r["ct-chest"].matched and r["desc"].matched
    assert not r["pet"].matched and "calling AE" in r["pet"].reason
    values["SliceThickness"] = "5"
    r = {e.rule: e for e in evaluate_rules(s.rules, values=values, calling_ae="SCANNER1")}
    assert not r["ct-chest"].matched and "5.0 > 3" in r["ct-chest"].reason
    assert not r["pet"].matched and "Modality='CT'" in r["pet"].reason
