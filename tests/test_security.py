"""Security. DICOM TLS against DCMTK: the node's receiver with mutual authentication (echoscu/storescu
+tls), the node's SCUs against DCMTK's storescp +tls, refusals audited as security alerts,
plain and TLS ports side by side, called AE titles the node does not answer to, and
received data readable by the node's user only."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from dicomnode.audit.models import Association, EventLog, Instance
from dicomnode.demo.sample import write_phantom_ct
from tests.conftest import NodeProcess, free_port, require, storescu, wait_for

ECHOSCU, STORESCP = "/usr/bin/echoscu", "/usr/bin/storescp"
SECURITY_ALERT = 110113


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)


def _leaf(folder: Path, name: str, ca: str) -> None:
    (folder / "leaf.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "leaf.ext",
             cwd=folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site CA with a node and a modality certificate, and a rogue CA with its own client."""
    require("/usr/bin/openssl")
    folder = tmp_path_factory.mktemp("pki")
    _ca(folder, "ca")
    _leaf(folder, "node", "ca")
    _leaf(folder, "modality", "ca")
    _ca(folder, "rogue-ca")
    _leaf(folder, "rogue", "rogue-ca")
    return folder


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ct")
    write_phantom_ct(folder, slices=3, size=32)
    return folder


def _node_tls(pki: Path, **extra: object) -> dict[str, object]:
    return {"certificate": str(pki / "node.pem"), "private_key": str(pki / "node.key"),
            "ca_certificates": str(pki / "ca.pem"), **extra}


def _dcmtk_tls(pki: Path, who: str = "modality") -> list[str]:
    return ["+tls", str(pki / f"{who}.key"), str(pki / f"{who}.pem"), "+cf", str(pki / "ca.pem")]


def _echoscu(port: int, *extra: str, called: str = "DICOMNODE") -> subprocess.CompletedProcess:
    require(ECHOSCU)
    return subprocess.run([ECHOSCU, "-aet", "MODALITY", "-aec", called, *extra, "127.0.0.1",
                           str(port)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TCP_NODELAY": "1"})


def _refusals(node: NodeProcess) -> list[EventLog]:
    with node.session() as s:
        return list(s.execute(select(EventLog).where(
            EventLog.event_type == "association.rejected")).scalars())


def test_tls_receiver_with_mutual_authentication(make_node, pki: Path, ct: Path) -> None:
    node: NodeProcess = make_node(node={"tls": _node_tls(pki)})
    assert _echoscu(node.port, *_dcmtk_tls(pki)).returncode == 0
    sent = storescu(ct, node.port, extra=_dcmtk_tls(pki))
    assert sent.returncode == 0, sent.stderr
    with node.session() as s:
        assert len(s.execute(select(Instance)).scalars().all()) == 3
    assert _refusals(node) == []

    # plain TCP on the TLS port, and a certificate from another CA: refused and audited
    assert _echoscu(node.port).returncode != 0
    assert _echoscu(node.port, "+tls", str(pki / "rogue.key"), str(pki / "rogue.pem"),
                    "+cf", str(pki / "ca.pem")).returncode != 0
    def two_refusals() -> list[EventLog] | None:
        found = _refusals(node)
        return found if len(found) >= 2 else None

    refusals = wait_for(two_refusals)
    assert {e.audit_event_id for e in refusals} == {SECURITY_ALERT}
    assert all("TLS handshake failed" in e.detail["reason"] for e in refusals)
    with node.session() as s:
        rows = s.execute(select(Association).where(Association.accepted.is_(False))).scalars()
        assert len(list(rows)) == len(refusals)
    # the node keeps serving good peers
    assert _echoscu(node.port, *_dcmtk_tls(pki)).returncode == 0


def test_plain_and_tls_ports_side_by_side(make_node, pki: Path) -> None:
    tls_port = free_port()
    node: NodeProcess = make_node(node={"tls": _node_tls(pki, port=tls_port)})
    assert f"TLS on port {tls_port}" in node.log_path.read_text()
    assert _echoscu(node.port).returncode == 0  # plain stays where it was
    assert _echoscu(tls_port, *_dcmtk_tls(pki)).returncode == 0
    assert _echoscu(tls_port).returncode != 0
    # dicomnode's own SCU, with and without its certificate
    cli = [sys.executable, "-m", "dicomnode.cli", "echo", "--port", str(tls_port)]
    tls = ["--tls-cert", str(pki / "modality.pem"), "--tls-key", str(pki / "modality.key"),
           "--tls-ca", str(pki / "ca.pem")]
    assert subprocess.run([*cli, *tls], capture_output=True, timeout=60).returncode == 0
    assert subprocess.run(cli, capture_output=True, timeout=60).returncode != 0
    half = subprocess.run([*cli, "--tls-cert", str(pki / "modality.pem")], capture_output=True,
                          text=True, timeout=60)
    assert half.returncode == 2 and "--tls-key" in half.stderr


def test_wrong_called_ae_title_is_rejected_unless_an_alias(make_node) -> None:
    node: NodeProcess = make_node(node={"ae_title_aliases": ["AI-NODE"]})
    assert _echoscu(node.port, called="AI-NODE").returncode == 0
    assert _echoscu(node.port, called="SOMEONE").returncode != 0
    (event,) = wait_for(lambda: _refusals(node) or None)
    assert event.audit_event_id == SECURITY_ALERT
    assert event.detail["called_ae"] == "SOMEONE"


def test_received_files_and_folders_are_private(make_node, ct: Path) -> None:
    node: NodeProcess = make_node()
    assert storescu(ct, node.port).returncode == 0
    spool = Path(node.config["var_dir"]) / "spool"
    files = [p for p in spool.rglob("*") if p.is_file()]
    assert len(files) == 3
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o600"}
    folders = [p for p in spool.rglob("*") if p.is_dir()]
    assert folders and {oct(p.stat().st_mode & 0o777) for p in folders} == {"0o700"}
    database = Path(node.config["var_dir"]) / "dicomnode.sqlite"
    assert oct(database.stat().st_mode & 0o777) == "0o600"


def _storescp(port: int, pki: Path, out: Path) -> subprocess.Popen:
    require(STORESCP)
    out.mkdir()
    proc = subprocess.Popen([STORESCP, "-aet", "PACS", *_dcmtk_tls(pki, "node"), "-od", str(out),
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "TCP_NODELAY": "1"})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("storescp +tls did not start")


def test_push_and_send_over_tls_to_dcmtk(tmp_path: Path, pki: Path, ct: Path) -> None:
    from tests.test_outbound import _outbox

    port = free_port()
    pacs = _storescp(port, pki, tmp_path / "pacs")
    try:
        cli = [sys.executable, "-m", "dicomnode.cli", "send", str(ct), "--port", str(port),
               "--called-aet", "PACS"]
        tls = ["--tls-cert", str(pki / "modality.pem"), "--tls-key", str(pki / "modality.key"),
               "--tls-ca", str(pki / "ca.pem")]
        sent = subprocess.run([*cli, *tls], capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0 and "sent 3 ok" in sent.stdout, sent.stdout + sent.stderr
        assert len(list((tmp_path / "pacs").iterdir())) == 3
        # the outbox, to a destination configured with TLS
        from dicomnode.audit.models import Delivery, DeliveryStatus
        from dicomnode.node.push import Pusher

        settings, factory, engine = _outbox(tmp_path / "node", sorted(ct.iterdir()), port,
                                            ae_title="PACS", tls={"certificate": str(pki / "modality.pem"),
                                                 "private_key": str(pki / "modality.key"),
                                                 "ca_certificates": str(pki / "ca.pem")})
        assert Pusher(settings=settings, factory=factory).sweep() == 3
        with factory() as s:
            assert {d.status for d in s.execute(select(Delivery)).scalars()} == \
                {DeliveryStatus.DELIVERED}
        engine.dispose()
    finally:
        pacs.kill()
        pacs.wait(10)


def test_no_patient_name_or_id_in_logs_or_audit_rows(make_node, tmp_path: Path) -> None:
    """A series with a known patient name and ID goes through receive, completion and a job;
    neither appears in the node's log nor in any column of any audit table (the
    patient is only a keyed hash there)."""
    import pydicom
    from sqlalchemy import inspect as sa_inspect
    from sqlalchemy import text as sa_text

    # every needle holds letters that no sha256 (hex), UID or number can: "7781" alone was
    # found by chance in an instance row's sha256 or UID (a failed CI run)
    name, pid = "SECRETARY^JANEDOE", "PHI-QZ7781-XQ"
    folder = tmp_path / "phi"
    for path in write_phantom_ct(folder, slices=4, size=32):
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID, ds.OtherPatientIDs = name, pid, pid
        ds.save_as(path)
    node: NodeProcess = make_node(executor={"workers": 1, "poll_interval_s": 0.2},
                                  completion={"quiet_period_s": 1})
    assert storescu(folder, node.port).returncode == 0

    def job_done() -> bool:
        with node.session() as s:
            return bool(s.execute(sa_text("select count(*) from job where status in "
                                          "('SUCCEEDED', 'FAILED', 'DEAD')")).scalar())

    wait_for(job_done, timeout=60)
    assert node.stop() == 0
    needles = [name, pid, "SECRETARY", "JANEDOE", "QZ7781"]
    log = node.log_path.read_text()
    assert not [n for n in needles if n in log]
    with node.session() as s:
        tables = sa_inspect(s.get_bind()).get_table_names()
        assert "event_log" in tables and "series" in tables
        for table in tables:
            for row in s.execute(sa_text(f"select * from {table}")).all():  # noqa: S608
                text_of_row = " ".join(str(v) for v in row)
                assert not [n for n in needles if n in text_of_row], table
        key = s.execute(sa_text("select patient_key from series")).scalar()
        assert key and len(key) == 64  # a keyed hash of the ID, not the ID
        # the whole path ran: received, completed, routed, a job run
        kinds = set(s.execute(sa_text("select event_type from event_log")).scalars())
        assert {"series.completed", "job.started", "job.succeeded"} <= kinds
