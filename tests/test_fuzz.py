"""The malformed-input corpus over the real C-STORE path: every input gets an answer, every
failure an audit event, everything answered 0x0000 is stored whole, and the node stays up."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest
from pynetdicom import _config
from sqlalchemy import select

from bench.chaos import offer
from dicomnode.audit.models import EventLog, Instance, InstanceReceipt
from dicomnode.demo.sample import write_phantom_ct
from dicomnode.dicom.net import echo
from tests.conftest import NodeProcess
from tests.fuzz_corpus import corpus, distinct

pytestmark = pytest.mark.slow  # some 240 associations


def test_malformed_corpus_each_answered_recorded_and_the_node_stays_up(
        make_node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the bytes as they are
    (base,) = write_phantom_ct(tmp_path / "base", slices=1, size=16)
    entries = distinct(corpus(base))
    assert len(entries) >= 200, len(entries)
    node: NodeProcess = make_node()
    folder = tmp_path / "corpus"
    folder.mkdir()
    answers: dict[str, int | str] = {}
    for name, data in entries:
        path = folder / f"{name}.dcm"
        path.write_bytes(data)
        answers[name] = offer(node.port, path)
        assert node.proc is not None and node.proc.poll() is None, f"node died on {name}"
    assert echo(host="127.0.0.1", port=node.port, called_aet="DICOMNODE") == 0

    stored = [n for n, a in answers.items() if a == 0]
    failed = [n for n, a in answers.items() if isinstance(a, int) and a != 0]
    unsent = {n: a for n, a in answers.items() if not isinstance(a, int)}
    # every entry's file meta is intact: each one reaches the node as a C-STORE
    assert unsent == {}
    with node.session() as s:
        events = s.execute(select(EventLog).where(
            EventLog.event_type == "instance.failed")).scalars().all()
        receipts = s.execute(select(InstanceReceipt)).scalars().all()
        rows = s.execute(select(Instance)).scalars().all()
    # each failure has its event with the status it was answered, each success a receipt
    assert Counter(e.detail["dimse_status"] for e in events) == Counter(answers[n] for n in failed)
    assert len(receipts) == len(stored)
    for row in rows:  # nothing partial was filed as an instance
        data = (node.settings.spool_dir / row.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.sha256
    # every family of known damage is refused, not stored; what may be kept whole: random
    # flips (they often land in a text value), valid private elements and nesting, non-standard
    # but harmless UIDs of the study or series (hashed into path names), 1-bit pixels
    may_store = ("flip-", "private-", "deep-sequence-10", "deep-sequence-150",
                 "uid-SeriesInstanceUID-letters", "uid-SeriesInstanceUID-path",
                 "uid-StudyInstanceUID-letters", "uid-StudyInstanceUID-path",
                 "claim-BitsAllocated-1")
    must_fail = [n for n in answers if not n.startswith(may_store)]
    wrongly_stored = [n for n in must_fail if answers.get(n) == 0]
    assert not wrongly_stored, wrongly_stored
    assert node.stop() == 0
    print(f"fuzz corpus: {len(entries)} distinct malformed inputs; {len(stored)} stored whole, "
          f"{len(failed)} refused with an audit event "
          f"({dict(Counter(answers[n] for n in failed))}), {len(unsent)} not sendable")


def test_the_sequence_item_count_is_skipped_only_where_too_many_items_cannot_fit() -> None:
    """An item takes at least 8 bytes: a body of 8 * MAX_SEQUENCE_ITEMS bytes is not counted
    (a CT slice is not scanned), one item more is, and is refused."""
    from dicomnode.node.integrity import MAX_SEQUENCE_ITEMS, parse_cost_problem

    item = b"\xfe\xff\x00\xe0\x00\x00\x00\x00"
    assert parse_cost_problem(item * MAX_SEQUENCE_ITEMS) is None
    problem = parse_cost_problem(item * (MAX_SEQUENCE_ITEMS + 1))
    assert problem is not None and f"{MAX_SEQUENCE_ITEMS + 1} sequence items" in problem
    # a large body with few items passes the count
    assert parse_cost_problem(item * 10 + bytes(8 * MAX_SEQUENCE_ITEMS)) is None
