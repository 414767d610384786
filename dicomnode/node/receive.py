"""Receive: the pynetdicom Storage / Verification SCP.

The network edge is a list of ``(event, handler)`` pairs. Handlers are thin: the C-STORE handler
parses the header (no pixel decoding), hands the encoded bytes to :mod:`dicomnode.node.spool` and turns
the outcome, or any exception, into a DIMSE status. Nothing heavier runs on the association thread.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import logging
import socket
import ssl
import struct
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    evt,
)
from pynetdicom import sop_class as _sop_class
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit.db import transaction
from dicomnode.audit.events import AuditEventID, Outcome, record_event
from dicomnode.audit.models import Association, utcnow
from dicomnode.dicom.net import VERIFICATION, set_nodelay
from dicomnode.dicom.reactor import FastRequestHandler, SharedContexts
from dicomnode.dicom.tls import server_context
from dicomnode.files import disk_low
from dicomnode.node.header import InstanceHeader, InvalidInstance
from dicomnode.node.integrity import encoding_problem, integrity_problem, parse_cost_problem
from dicomnode.node.spool import PendingWrite, Spool, StoreAction, store_instance
from dicomnode.settings import Settings

__all__ = [
    "STORAGE_SOP_CLASSES",
    "Status",
    "Receiver",
    "make_receiver_ae",
]

log = logging.getLogger(__name__)

# pynetdicom's list lacks some newer storage classes: add them (ARCHITECTURE.md).
_EXTRA_STORAGE = {
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.30": "Parametric Map Storage",
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.128": "Positron Emission Tomography Image Storage",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
}
STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(
    dict.fromkeys([*_sop_class._STORAGE_CLASSES.values(), *_EXTRA_STORAGE])  # noqa: SLF001
)


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xL", 2, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 2, element, vr, len(value)) + value


def _even(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group (explicit VR little endian) for
    a received data set: the same bytes as pynetdicom's ``Event.encoded_dataset()`` writes, at
    a twentieth of its cost (it builds and encodes a pydicom data set per instance)."""
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _even(sop_class_uid, b"\0")),
        _meta_element(0x0003, b"UI", _even(sop_instance_uid, b"\0")),
        _meta_element(0x0010, b"UI", _even(transfer_syntax_uid, b"\0")),
        _meta_element(0x0012, b"UI", _even(PYNETDICOM_IMPLEMENTATION_UID, b"\0")),
        _meta_element(0x0013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
    ))
    group_length = struct.pack("<HH2sHL", 2, 0x0000, b"UL", 4, len(body))
    return b"\0" * 128 + b"DICM" + group_length + body


class Status:
    """C-STORE DIMSE statuses used here (PS3.4 B.2.3)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATASET_MISMATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC000


class NodeServer(ThreadedAssociationServer):
    """The association server: optionally accepts on a listening socket shared with sibling
    receiving processes (see :func:`open_listeners`), and does the TLS handshake in the
    connection's own thread (pynetdicom does it in the accept loop, where one slow or plain-TCP
    peer would stall every other), handing a failed handshake to ``on_tls_refused`` before
    closing the connection."""

    shared_socket: socket.socket | None = None
    on_tls_refused: Callable[[str, int, str], None] | None = None

    def server_bind(self) -> None:  # noqa: D102
        if self.shared_socket is None:
            super().server_bind()
            return
        assert self.socket is not None
        self.socket.close()  # the one socketserver made: the shared one is already listening
        self.socket = self.shared_socket
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:  # noqa: D102
        if self.shared_socket is None:
            super().server_activate()

    def server_close(self) -> None:  # noqa: D102
        if self.shared_socket is None:
            super().server_close()
            return
        assert self.socket is not None
        self.socket.close()  # not shutdown(): that would stop the siblings' listening too

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:  # noqa: D102
        assert self.socket is not None
        client, address = self.socket.accept()  # BlockingIOError: a sibling took it
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address

    def finish_request(self, request: Any, client_address: Any) -> None:  # noqa: D102
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(self.ae.network_timeout)
                request.do_handshake()
                request.settimeout(None)
            except (ssl.SSLError, OSError) as exc:
                if self.on_tls_refused is not None:
                    self.on_tls_refused(str(client_address[0]), int(client_address[1]),
                                        f"TLS handshake failed: {exc}"[:120])
                with contextlib.suppress(OSError):
                    request.close()
                return
        super().finish_request(request, client_address)


def open_listeners(settings: Settings) -> list[socket.socket]:
    """The node's listening sockets (one per :func:`listeners` entry), for the receiving
    processes to share: each waits for connections on the same socket and, woken together,
    the first to run accepts (the others' non-blocking ``accept`` finds nothing). A process
    busy with an association needs its interpreter lock back first, so an idle one usually
    wins, where SO_REUSEPORT's hash of the peer's port put two of four parallel associations
    on one process most of the time (docs/benchmarks.md, "Ingest")."""
    sockets = []
    for port, _context in listeners(settings):
        # SO_REUSEPORT still, so that a node restarted at once after kill -9 can listen while
        # its old receiving processes are still dying with their copy of the old socket
        sock = socket.create_server((settings.node.host, port), backlog=128, reuse_port=True)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


@dataclass
class _AssocState:
    row_id: int
    calling_ae: str
    requests: int = 0
    bytes: int = 0
    stored: int = 0
    failed: int = 0
    end_reason: str = "closed"


class Receiver:
    """The Storage SCP's handlers, bound to a session factory, a spool and the settings.

    Parameters
    ----------
    settings
        Node settings (AE title, allow-list).
    factory
        Session factory of the audit database.
    spool
        Where instances are filed.
    patient_secret
        Key for the patient-id hash.
    on_association_closed
        Called after an inbound association ends (the completion sweep uses it to act at once).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        factory: sessionmaker[Session],
        spool: Spool,
        patient_secret: bytes,
        on_association_closed: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.spool = spool
        self.patient_secret = patient_secret
        self.on_association_closed = on_association_closed
        self._states: weakref.WeakKeyDictionary[Any, _AssocState] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        # refusals the database could not take (a full disk it shares): recorded once it can
        self._unrecorded: collections.deque[dict[str, Any]] = collections.deque(maxlen=10_000)

    # -- handlers -------------------------------------------------------------------------
    def handlers(self) -> list[Any]:
        """The ``(event, handler)`` pairs to bind to the server."""
        return [
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_RELEASED, self.on_released),
            (evt.EVT_ABORTED, self.on_aborted),
            (evt.EVT_CONN_CLOSE, self.on_conn_close),
        ]

    def _peer_allowed(self, calling_ae: str, host: str) -> bool:
        peers = self.settings.node.allowed_peers
        if not peers:
            return True
        return any(
            p.ae_title.strip() == calling_ae and (p.host is None or p.host == host) for p in peers
        )

    def on_requested(self, event: Any) -> None:
        """EVT_REQUESTED: reject a peer not on the allow-list, or one calling an AE title this
        node does not answer to, with a security alert."""
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        called = str(assoc.requestor.primitive.called_ae_title).strip()
        host, port = assoc.requestor.address, assoc.requestor.port
        if not self._peer_allowed(calling, host):
            # 0x01 rejected-permanent, 0x01 service-user, 0x03 calling AE title not recognised
            assoc.acse.send_reject(0x01, 0x01, 0x03)
            self._refused(calling, called, str(host), int(port), "peer not in allowed_peers")
        elif called not in {self.settings.node.ae_title, *self.settings.node.ae_title_aliases}:
            # 0x07: called AE title not recognised
            assoc.acse.send_reject(0x01, 0x01, 0x07)
            self._refused(calling, called, str(host), int(port),
                          "called AE title is not this node's")
        elif (free := disk_low(self.settings.var_dir, self.settings.node.min_free_disk_mb)) \
                is not None:
            # transient (senders retry): 0x02, service-provider (presentation), local limit
            assoc.acse.send_reject(0x02, 0x03, 0x02)
            self._refused(calling, called, str(host), int(port),
                          f"free disk {free:.0f} MB below node.min_free_disk_mb",
                          audit_event_id=AuditEventID.APPLICATION_ACTIVITY)

    def on_tls_refused(self, host: str, port: int, reason: str) -> None:
        """A TLS handshake failed (plain TCP on the TLS port, no certificate, a certificate from
        another CA): recorded like a rejected association."""
        self._refused("", "", host, port, reason)

    def _refused(self, calling: str, called: str, host: str, port: int, reason: str, *,
                 audit_event_id: AuditEventID = AuditEventID.SECURITY_ALERT) -> None:
        try:
            with transaction(self.factory) as session:
                session.add(Association(
                    direction="in", calling_ae=calling[:16], called_ae=called[:16],
                    peer_host=host[:64], peer_port=port, accepted=False,
                    reject_reason=reason[:128], ended_at=utcnow(), end_reason="rejected"))
                record_event(
                    session, "association.rejected", audit_event_id=audit_event_id,
                    outcome=Outcome.SERIOUS_FAILURE, actor=(calling or host)[:64],
                    detail={"peer_host": host, "called_ae": called, "reason": reason},
                )
        except Exception:  # the refusal stands even if the audit write fails
            log.exception("could not record a refused association")

    def on_accepted(self, event: Any) -> None:
        """EVT_ACCEPTED: one association row per inbound association."""
        assoc = event.assoc
        calling = str(assoc.requestor.ae_title).strip()
        with transaction(self.factory) as session:
            row = Association(
                direction="in", calling_ae=calling[:16],
                called_ae=str(assoc.acceptor.ae_title).strip()[:16],
                peer_host=str(assoc.requestor.address)[:64], peer_port=int(assoc.requestor.port),
            )
            session.add(row)
            session.flush()
            row_id = row.id
        with self._lock:
            self._states[assoc] = _AssocState(row_id=row_id, calling_ae=calling)

    def on_echo(self, event: Any) -> int:
        """EVT_C_ECHO."""
        return Status.SUCCESS

    def on_store(self, event: Any) -> int | Dataset:
        """EVT_C_STORE: file the instance, then answer; never 0x0000 for anything not stored.

        The file is written and fsynced on a spool thread while this one parses and checks the
        header (the I/O releases the GIL): the File Meta header needs only the UIDs of the
        request, and a refused instance's temp file is deleted. The database transaction
        starts when both are done, as before.
        """
        state = self._states.get(event.assoc)
        calling = state.calling_ae if state else str(event.assoc.requestor.ae_title).strip()
        if state:
            state.requests += 1
        message_id = int(getattr(event.request, "MessageID", 0) or 0)
        transfer_syntax = str(event.context.transfer_syntax)
        encoded = event.request.DataSet.getvalue()
        early = self._write_early(event, encoded, transfer_syntax)
        try:
            try:
                header = self._checked_header(event, encoded, transfer_syntax)
            except InvalidInstance as exc:
                return self._fail(state, calling, Status.DATASET_MISMATCH, "invalid instance",
                                  exc)
            except Exception as exc:  # pydicom could not parse the data set
                return self._fail(state, calling, Status.CANNOT_UNDERSTAND, "cannot parse", exc)
            if early is not None and early[0] != (header.sop_class_uid, header.sop_instance_uid):
                Spool.discard(early[2])  # written under UIDs the data set does not have
                early = None
            try:
                # the bytes being written, or built now under the header's UIDs (checked:
                # ASCII, equal to the request's and the context's)
                data = early[1] if early else b"".join((part10_header(
                    header.sop_class_uid, header.sop_instance_uid, transfer_syntax), encoded))
                written, early = (early[2] if early else None), None  # store_instance owns it
                result = store_instance(
                    factory=self.factory, spool=self.spool, header=header, data=data,
                    written=written, transfer_syntax_uid=transfer_syntax, calling_ae=calling,
                    association_id=state.row_id if state else None, message_id=message_id,
                    patient_secret=self.patient_secret,
                )
            except Exception as exc:  # disk full, database down, ...: the sender must retry
                log.exception("storing %s failed", header.sop_instance_uid)
                return self._fail(
                    state, calling, Status.OUT_OF_RESOURCES, "store failed", exc,
                    sop_instance_uid=header.sop_instance_uid,
                    series_instance_uid=header.series_instance_uid,
                )
        finally:
            if early is not None:
                Spool.discard(early[2])
        if state:
            state.bytes += len(data)
            if result.action is StoreAction.CREATE:
                state.stored += 1
        if self._unrecorded:
            self._record_late()
        return Status.SUCCESS

    def _write_early(self, event: Any, encoded: bytes, transfer_syntax: str
                     ) -> tuple[tuple[str, str], bytes, PendingWrite] | None:
        """Start writing the instance file under the request's UIDs, if they can be used:
        (those UIDs, the file's bytes, the write)."""
        uids = (str(event.request.AffectedSOPClassUID or ""),
                str(event.request.AffectedSOPInstanceUID or ""))
        if not all(0 < len(u) <= 64 and u.isascii() and u.isprintable() for u in uids):
            return None  # written after the checks, under the data set's own UIDs
        data = b"".join((part10_header(*uids, transfer_syntax), encoded))
        return uids, data, self.spool.write_tmp_soon(data)

    @staticmethod
    def _checked_header(event: Any, encoded: bytes, transfer_syntax: str) -> InstanceHeader:
        """The instance's header; raises :class:`InvalidInstance` with the reason to refuse."""
        problem = parse_cost_problem(encoded) or encoding_problem(encoded, transfer_syntax)
        if problem:  # refused before pydicom spends seconds decoding it
            raise InvalidInstance(problem)
        ds = event.dataset
        problem = integrity_problem(ds, transfer_syntax)
        if problem:
            raise InvalidInstance(problem)
        header = InstanceHeader.from_dataset(ds)
        if header.sop_class_uid != str(event.context.abstract_syntax):
            raise InvalidInstance(
                f"SOPClassUID {header.sop_class_uid} differs from the negotiated "
                f"{event.context.abstract_syntax}")
        requested = str(event.request.AffectedSOPInstanceUID or "")
        if requested and requested != header.sop_instance_uid:
            raise InvalidInstance(
                "SOPInstanceUID in the data set differs from AffectedSOPInstanceUID")
        return header

    def _record_late(self) -> None:
        """Record the refusals kept in memory while the database could not take them."""
        with self._lock:
            pending = list(self._unrecorded)
            self._unrecorded.clear()
        try:
            with transaction(self.factory) as session:
                for kwargs in pending:
                    record_event(session, "instance.failed", **kwargs)
        except Exception:
            with self._lock:
                self._unrecorded.extendleft(reversed(pending))

    def _fail(
        self,
        state: _AssocState | None,
        calling: str,
        status: int,
        what: str,
        exc: BaseException,
        *,
        sop_instance_uid: str | None = None,
        series_instance_uid: str | None = None,
    ) -> int:
        if state:
            state.failed += 1
        reason = f"{what}: {type(exc).__name__}: {exc}"[:300]
        detail: dict[str, Any] = {"dimse_status": status, "reason": reason,
                                  "sop_instance_uid": sop_instance_uid,
                                  "association_id": state.row_id if state else None}
        event: dict[str, Any] = dict(
            audit_event_id=AuditEventID.IMPORT, outcome=Outcome.SERIOUS_FAILURE,
            actor=calling[:64], series_instance_uid=series_instance_uid, detail=detail)
        if self._unrecorded:
            self._record_late()
        try:
            with transaction(self.factory) as session:
                record_event(session, "instance.failed", **event)
        except Exception:
            log.exception("could not record a failed C-STORE (kept until the database can)")
            event["detail"] = {**detail, "dimse_status": Status.OUT_OF_RESOURCES,
                               "recorded_late": True, "failed_at": utcnow().isoformat()}
            self._unrecorded.append(event)
            return Status.OUT_OF_RESOURCES
        return status

    def on_released(self, event: Any) -> None:
        """EVT_RELEASED."""
        state = self._states.get(event.assoc)
        if state:
            state.end_reason = "released"

    def on_aborted(self, event: Any) -> None:
        """EVT_ABORTED."""
        state = self._states.get(event.assoc)
        if state:
            state.end_reason = "aborted"

    def on_conn_close(self, event: Any) -> None:
        """EVT_CONN_CLOSE: close the association row and log what it transferred."""
        with self._lock:
            state = self._states.pop(event.assoc, None)
        if state is None:
            return
        try:
            with transaction(self.factory) as session:
                session.execute(
                    update(Association).where(Association.id == state.row_id).values(
                        ended_at=utcnow(), end_reason=state.end_reason,
                        requests=state.requests, bytes=state.bytes,
                    )
                )
                record_event(
                    session, "association.closed",
                    audit_event_id=AuditEventID.INSTANCES_TRANSFERRED,
                    outcome=Outcome.SUCCESS if not state.failed else Outcome.MINOR_FAILURE,
                    actor=state.calling_ae[:64],
                    detail={
                        "association_id": state.row_id, "end": state.end_reason,
                        "requests": state.requests, "stored": state.stored,
                        "failed": state.failed, "bytes": state.bytes,
                    },
                )
        except Exception:
            log.exception("could not close association %s", state.row_id)
        if self.on_association_closed is not None:
            self.on_association_closed()


def make_receiver_ae(settings: Settings) -> AE:
    """An AE that accepts Verification and every storage SOP class in every transfer syntax."""
    ae = AE(ae_title=settings.node.ae_title)
    ae.maximum_pdu_size = settings.node.max_pdu
    ae.network_timeout = settings.node.network_timeout_s
    ae.maximum_associations = 64
    ae.add_supported_context(VERIFICATION, ALL_TRANSFER_SYNTAXES)
    for uid in STORAGE_SOP_CLASSES:
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    return ae


def listeners(settings: Settings) -> list[tuple[int, ssl.SSLContext | None]]:
    """The (port, TLS context or None) pairs the node listens on: plain DICOM on
    ``node.port``, or TLS there when ``node.tls`` is set, or both when ``node.tls.port`` names
    a second port."""
    tls = settings.node.tls
    if tls is None:
        return [(settings.node.port, None)]
    context = server_context(tls)
    if tls.port is None:
        return [(settings.node.port, context)]
    return [(settings.node.port, None), (tls.port, context)]


@contextlib.contextmanager
def serving(
    receiver: Receiver, settings: Settings, *, shared: list[socket.socket] | None = None
) -> Iterator[list[ThreadedAssociationServer]]:
    """Run the SCP in background threads (one server per listener: plain and/or TLS); on exit
    stop accepting and let in-flight stores end.

    Parameters
    ----------
    receiver
        The bound handlers.
    settings
        Address and AE title.
    shared
        Listening sockets from :func:`open_listeners`, shared with sibling processes.
    """
    ae = make_receiver_ae(settings)
    servers = []
    for i, (port, context) in enumerate(listeners(settings)):
        server_class = NodeServer if shared is None else type(
            "SharedNodeServer", (NodeServer,), {"shared_socket": shared[i]})
        server = ae.make_server((settings.node.host, port), evt_handlers=receiver.handlers(),
                                ssl_context=context, server_class=server_class,
                                request_handler=(FastRequestHandler if settings.node.event_driven
                                                 else RequestHandler))
        server.on_tls_refused = receiver.on_tls_refused  # type: ignore[attr-defined]
        server.contexts = SharedContexts(server.contexts)
        ae._servers.append(server)  # so that server.shutdown() can unregister it
        threading.Thread(target=server.serve_forever, name=f"dicomnode-scp-{port}",
                         daemon=True).start()
        servers.append(server)
    # What exists by now (modules, the AE and its contexts, the settings) lives as long as the
    # process: frozen out of the cyclic collector, whose full passes over it took 0.1-0.16 s
    # of CPU, the interpreter lock held, in the middle of a 300-instance receive
    # (docs/benchmarks.md, "Ingest").
    gc.collect()
    gc.freeze()
    try:
        yield servers
    finally:
        # Stop accepting, then give running associations time to finish their stores.
        for server in servers:
            server.shutdown()
            server.server_close()
        for server in servers:
            for assoc in list(server.active_associations):
                assoc.join(timeout=60.0)
