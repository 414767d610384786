"""Outbound DICOM: the push path and ``dicomnode send`` agree on what a response status means,
and the audit trail says how each outbound association ended. The peer is a real pynetdicom
Storage SCP on loopback whose C-STORE answer the test chooses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select

from dicomnode.audit.db import make_engine, make_sessionmaker, migrate, transaction
from dicomnode.audit.models import (
    Association,
    Delivery,
    DeliveryStatus,
    Output,
    OutputState,
    Series,
)
from dicomnode.demo.sample import write_phantom_ct
from dicomnode.dicom.net import Disposition, classify_status, send_files
from dicomnode.node.jobs import enqueue_job
from dicomnode.node.push import Pusher
from dicomnode.settings import parse_settings
from tests.conftest import free_port


class Peer:
    """A Storage SCP answering every C-STORE with ``status``."""

    def __init__(self, status: int, *, ae_title: str = "PEER") -> None:
        self.status = status
        self.port = free_port()
        self.ae = AE(ae_title=ae_title)
        self.ae.require_called_aet = True
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, lambda event: self.status)])

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer(0x0000)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_phantom_ct(tmp_path_factory.mktemp("ct"), slices=3, size=32)


def test_status_meanings() -> None:
    assert classify_status(0x0000) is Disposition.DELIVERED
    assert classify_status(0x0111) is Disposition.DELIVERED  # the peer already has it
    assert classify_status(0xB000) is Disposition.DELIVERED  # warning: stored
    assert classify_status(0xA700) is Disposition.RETRY and classify_status(None) is Disposition.RETRY
    assert classify_status(0xA900) is Disposition.FAIL and classify_status(0xC000) is Disposition.FAIL


@pytest.mark.parametrize(("status", "ok"), [(0x0000, 3), (0x0111, 3), (0xB000, 3), (0xA700, 0),
                                            (0xC000, 0)])
def test_send_counts_like_the_outbox(peer: Peer, ct_files: list[Path], status: int, ok: int) -> None:
    peer.status = status
    result = send_files(ct_files, host="127.0.0.1", port=peer.port, called_aet="PEER")
    assert (result.ok, result.failed) == (ok, 3 - ok)
    assert result.statuses == (status,) * 3


def _outbox(tmp_path: Path, ct_files: list[Path], port: int, *, ae_title: str = "PEER",
            tls: dict[str, str] | None = None) -> tuple:
    """Settings, a session factory and an engine whose outbox holds ``ct_files`` for the
    destination ``pacs`` (``ae_title`` on ``port``, over TLS when given)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    settings = parse_settings({
        "var_dir": str(tmp_path / "var"),
        "push": {"max_attempts": 2, "backoff_initial_s": 0.01},
        "destinations": {"pacs": {"ae_title": ae_title, "host": "127.0.0.1", "port": port,
                                  **({"tls": tls} if tls else {})}}})
    url = f"sqlite:///{tmp_path / 'node.db'}"
    migrate(url)
    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    settings.output_dir.mkdir(parents=True)
    with transaction(factory) as s:
        series = Series(series_instance_uid="1.2.3", study_instance_uid="1.2")
        s.add(series)
        s.flush()
        job_id = enqueue_job(s, series=series, rule_name="r", pipeline="p", pipeline_version="1",
                             input_sha256="0" * 64, destinations=["pacs"], max_attempts=1)
        for i, f in enumerate(ct_files):
            (settings.output_dir / f.name).write_bytes(f.read_bytes())
            out = Output(job_id=job_id, kind="CT", index=i, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                         sop_instance_uid=f"1.2.3.{i}", series_instance_uid="1.2.3.9",
                         path=f.name, state=OutputState.WRITTEN)
            s.add(out)
            s.flush()
            s.add(Delivery(output_id=out.id, destination="pacs", ae_title=ae_title,
                           host="127.0.0.1", port=port))
    return settings, factory, engine


def test_duplicate_status_is_delivered_by_the_push_path(tmp_path: Path, peer: Peer,
                                                          ct_files: list[Path]) -> None:
    peer.status = 0x0111
    settings, factory, engine = _outbox(tmp_path, ct_files, peer.port)
    assert Pusher(settings=settings, factory=factory).sweep() == 3
    with factory() as s:
        assert {d.status for d in s.execute(select(Delivery)).scalars()} == {DeliveryStatus.DELIVERED}
        (assoc,) = s.execute(select(Association)).scalars()
        assert (assoc.end_reason, assoc.accepted, assoc.requests) == ("released", True, 3)
    engine.dispose()


def test_unreachable_peer_is_not_recorded_as_released(tmp_path: Path, ct_files: list[Path]) -> None:
    settings, factory, engine = _outbox(tmp_path, ct_files, free_port())  # nobody listens
    assert Pusher(settings=settings, factory=factory).sweep() == 0
    with factory() as s:
        (assoc,) = s.execute(select(Association)).scalars()
        assert (assoc.end_reason, assoc.accepted) == ("unreachable", False)
        assert {d.status for d in s.execute(select(Delivery)).scalars()} == {DeliveryStatus.RETRY}
    engine.dispose()


def test_rejected_association_is_recorded_as_rejected(tmp_path: Path,
                                                      ct_files: list[Path]) -> None:
    other = Peer(0x0000, ae_title="SOMEONE-ELSE")  # rejects a call to "PEER"
    try:
        settings, factory, engine = _outbox(tmp_path, ct_files, other.port)
        assert Pusher(settings=settings, factory=factory).sweep() == 0
        with factory() as s:
            (assoc,) = s.execute(select(Association)).scalars()
            assert (assoc.end_reason, assoc.accepted) == ("rejected", False)
            assert assoc.reject_reason == "rejected by the peer"
        engine.dispose()
    finally:
        other.stop()
