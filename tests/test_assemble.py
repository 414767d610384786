"""Completion and routing decisions as pure functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from dicomnode.node.assemble import completion_decision, content_check
from dicomnode.node.route import evaluate_rules
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


def test_sweep_reads_slice_positions_only_when_they_can_decide_and_have_changed(
        tmp_path) -> None:
    """The completion sweep runs every 0.5 s over every receiving series: while a sender is
    still connected (and no wait has run out) it does not read the slice positions at all;
    once the check can decide, it re-reads them only after the series received something, and
    it forgets series that are no longer receiving."""
    from sqlalchemy import event

    from dicomnode.audit.db import make_engine, make_sessionmaker, migrate, transaction
    from dicomnode.audit.models import Association, Instance, Series, SeriesState
    from dicomnode.node.assemble import Assembler

    url = f"sqlite:///{tmp_path / 'a.db'}"
    migrate(url)
    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    reads: list[str] = []
    event.listen(engine, "before_cursor_execute",
                 lambda _c, _cur, stmt, *_a: reads.append(stmt)
                 if "instance.position" in stmt else None)
    settings = parse_settings({"var_dir": str(tmp_path / "var"), "database": {"url": url}})

    def add_instance(s, series: Series, assoc: Association, k: int, z: float) -> None:
        s.add(Instance(sop_instance_uid=f"1.2.3.{k}", sop_class_uid="1.2", series_id=series.id,
                       transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="M",
                       association_id=assoc.id, bytes=1, sha256="0" * 64, path=f"p{k}",
                       position=[0.0, 0.0, z], orientation=AX))
        series.instance_count += 1
        series.last_received_at = datetime.now(UTC)

    with transaction(factory) as s:
        assoc = Association(direction="in", calling_ae="M", called_ae="N", peer_host="h",
                            peer_port=1)  # still open: the series cannot complete
        series = Series(series_instance_uid="1.2.3", study_instance_uid="1.2",
                        state=SeriesState.RECEIVING, instance_count=0)
        s.add_all([assoc, series])
        s.flush()
        for k, z in enumerate((0.0, 1.0, 2.0, 5.0)):  # a gap: the check will refuse it
            add_instance(s, series, assoc, k, z)
        sid, aid = series.id, assoc.id
    asm = Assembler(settings=settings, factory=factory)
    asm._rules_cache[sid] = []  # no rule reads a header from the (absent) spool file
    assert asm.sweep() == [] and asm.sweep() == [] and reads == []
    with transaction(factory) as s:  # the sender releases: now the check decides
        s.get(Association, aid).ended_at = datetime.now(UTC)
        s.get(Association, aid).end_reason = "released"
    assert asm.sweep() == [] and len(reads) == 1  # the gap: waits for the quiet period
    assert "gap" in asm._content_cache[sid][1] or "uneven" in asm._content_cache[sid][1]
    assert asm.sweep() == [] and asm.sweep() == [] and len(reads) == 1
    with transaction(factory) as s:
        series = s.get(Series, sid)
        add_instance(s, series, s.get(Association, aid), 4, 6.0)
    assert asm.sweep() == [] and len(reads) == 2
    assert asm._content_cache[sid][2] == 5
    with transaction(factory) as s:
        s.get(Series, sid).state = SeriesState.COMPLETE
    asm.sweep()
    assert sid not in asm._content_cache and sid not in asm._rules_cache


def test_completion_and_volume_share_one_spacing_tolerance() -> None:
    """A stack 1.5 % uneven: the completion check and the volume reader say the same (it was
    accepted at completion under a 2 % tolerance and refused by the reader under 1 %)."""
    import numpy as np

    from dicomnode.dicom.volume import spacing_problem

    zs = [0.0, 2.5, 5.0, 7.5375, 10.0375]  # one step 2.5375 mm: 1.5 % over the median
    problem = content_check(*stack(zs), None)
    assert problem is not None and "uneven" in problem
    assert spacing_problem(np.array(zs)) is not None
    even = [0.0, 2.5, 5.0, 7.52, 10.02]  # 0.8 %: inside both
    assert content_check(*stack(even), None) is None and spacing_problem(np.array(even)) is None
