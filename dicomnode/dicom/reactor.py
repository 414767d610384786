"""Event-driven reactors for pynetdicom's acceptor: a patch applied by subclassing.

pynetdicom 3.0 runs two threads per association, and both poll: the DUL reactor sleeps 1 ms
whenever it found nothing to do, and the association reactor sleeps 1 ms before every look at
its DIMSE queue (its own source says "TODO: try and make this event based"). On one
association a C-STORE waits on both on the way in and on the way out, and the socket is read
4 KiB per ``recv`` call (128 Python-level reads for one 512 KiB CT slice).

Here the same loops wait on what they wait for instead:

* the DUL reactor blocks in ``select`` on the socket and on a wake-up pipe that
  :meth:`FastDUL.send_pdu` writes to, so an outgoing response or incoming PDU is handled at
  once (timers are still checked at least every 50 ms);
* the association reactor blocks on its DIMSE message queue (5 ms at most, so release and
  abort are still noticed promptly);
* the socket reads a whole PDU with ``recv_into`` into one buffer;
* pynetdicom's per-message logging handlers are unbound (they decode each command set to
  format log lines; the audit trail records every store);
* :class:`SharedContexts`: each new association gets its own copy of the server's supported
  presentation contexts without ``deepcopy`` re-validating every UID (171 contexts with 7695
  transfer syntaxes: 135 ms of CPU per association, 1.2 ms now). It applies to both reactors;
* the C-STORE fast path: in the data transfer state, P-DATA-TF PDUs go through
  :class:`~dicomnode.dicom.pdata.MessageAssembler`; a whole C-STORE request is served on the
  DUL thread that read it (the peer waits for its response anyway: no hand-over to the
  association thread and back), its command fields read without a pydicom data set, and the
  handler's status sent as a C-STORE-RSP PDU built from the request's fields (byte for byte
  what pynetdicom sends, ``tests/test_pdata.py``). Everything else (C-ECHO, a status data
  set, a request before the EVT_ACCEPTED handlers have returned, anything the assembler does
  not expect) goes through pynetdicom as before, and the path is off where a handler watches
  an event it skips (PDU, data and DIMSE receive and send, state transitions). Measured on one
  association: the response 1.05 -> 0.13 ms per instance, the request's decoding 1.2 -> 0.8 ms.

The loops are pynetdicom's own, copied with only those waits changed, and they are pinned to
the pynetdicom version in ``pyproject.toml``; ``tests/test_reactor.py`` runs the node's receive
path with and without them. docs/benchmarks.md ("Receive") has what each saves. All of them are
candidates for upstream.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import queue
import select
import ssl
import struct
import time
from io import BytesIO
from typing import Any

from pydicom.uid import UID
from pynetdicom import _config, evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import AssociationSocket, RequestHandler

from dicomnode.dicom.pdata import (
    AFFECTED_SOP_CLASS,
    AFFECTED_SOP_INSTANCE,
    MESSAGE_ID,
    MessageAssembler,
    Store,
    c_store_rsp,
)

log = logging.getLogger(__name__)

__all__ = ["FastRequestHandler", "SharedContexts", "accelerate"]

_TIMER_CHECK_S = 0.05  # the DUL's ARTIM timer and kill flag are looked at least this often
_DIMSE_WAIT_S = 0.005  # the association reactor looks for release / abort this often
_LOG_HANDLERS = ((evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
                 (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
                 (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
                 (evt.EVT_PDU_SENT, standard_pdu_sent_handler))
# what pynetdicom signals on the way in and the fast path does not
_SKIPPED_EVENTS = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_DIMSE_RECV,
                   evt.EVT_FSM_TRANSITION, evt.EVT_PDU_SENT, evt.EVT_DIMSE_SENT)


class FastSocket(AssociationSocket):
    """Reads a PDU with ``recv_into`` into one preallocated buffer."""

    def recv(self, nr_bytes: int) -> bytearray:  # noqa: D102
        buffer = bytearray(nr_bytes)
        read = self.recv_into(buffer, 0)
        return buffer if read == nr_bytes else buffer[:read]

    def recv_into(self, buffer: bytearray, start: int) -> int:
        """Fill ``buffer`` from ``start``; returns the bytes read, fewer only if the
        connection closed (as pynetdicom's ``recv``)."""
        sock = self.socket
        assert sock is not None
        view = memoryview(buffer)
        read, wanted = 0, len(buffer) - start
        while read < wanted:
            got = sock.recv_into(view[start + read:], wanted - read)
            if not got:
                break
            read += got
        del view
        return read


class FastDUL(DULServiceProvider):
    """The DUL reactor, waiting on its socket and a wake-up pipe instead of sleeping."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = os.pipe()
        self._assembler: MessageAssembler | None = None
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def send_pdu(self, primitive: Any) -> None:  # noqa: D102
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:  # noqa: D102
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:  # noqa: D102
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._wake()
        return super().stop_dul()

    def _wait(self) -> None:
        """Until the socket is readable, a primitive was queued, or the timer interval."""
        wrapper = self.socket
        sock = getattr(wrapper, "socket", None)
        if sock is None or not getattr(wrapper, "_is_connected", False):
            time.sleep(self._run_loop_delay)
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes already buffered: select would not see them
        try:
            ready, _, _ = select.select([sock, self._wake_r], [], [], _TIMER_CHECK_S)
        except (OSError, ValueError):  # closed under us: let the loop notice
            time.sleep(self._run_loop_delay)
            return
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError, OSError):
                os.read(self._wake_r, 4096)

    # -- the C-STORE fast path -----------------------------------------------------------
    def _assembler_now(self) -> MessageAssembler | None:
        """The association's assembler, made at its first P-DATA-TF; ``None`` when off."""
        if self._assembler is None:
            # only where nothing watches the events the fast path skips (_SKIPPED_EVENTS)
            watched = any(self.assoc.get_handlers(e) for e in _SKIPPED_EVENTS)
            self._assembler = MessageAssembler(self._wants_store, off=watched)
        return None if self._assembler.off else self._assembler

    def _wants_store(self, context_id: int, fields: dict[int, bytes]) -> bool:
        """Whether a C-STORE request is served by the fast path: its context accepted and its
        SOP class one pynetdicom's Storage service class serves (as ``_serve_request``)."""
        assoc = self.assoc
        if context_id not in assoc._accepted_cx:  # noqa: SLF001  (pynetdicom aborts)
            return False
        if _config.UNRESTRICTED_STORAGE_SERVICE:
            return True
        class_uid = fields[AFFECTED_SOP_CLASS].rstrip(b"\0 ").decode("ascii", "replace")
        extended = assoc.acceptor.accepted_common_extended.get(UID(class_uid))
        return uid_to_service_class(extended[0] if extended else class_uid) \
            is StorageServiceClass

    def _read_pdu_data(self) -> None:
        """pynetdicom's PDU read, with P-DATA-TF PDUs of the data transfer state going
        through :class:`MessageAssembler`: a whole C-STORE request is served here, on this
        thread (the peer waits for its response anyway), everything else is decoded by
        pynetdicom as before."""
        wrapper = self.socket
        assembler = (self._assembler_now() if self.state_machine.current_state == "Sta6"
                     else None)
        if assembler is None or not isinstance(wrapper, FastSocket):
            if self._assembler is not None and self._assembler.pending:
                for raw in self._assembler.give_up():  # the state changed inside a message
                    self._decode_raw(raw)
            super()._read_pdu_data()
            return
        try:
            header = wrapper.recv(6)
            pdu_type, _, length = struct.unpack(">BBL", header)
        except (OSError, TimeoutError, struct.error):
            self.event_queue.put("Evt17")  # connection closed (pynetdicom's READ_PDU_EXC_A/B)
            return
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            self.event_queue.put("Evt19")
            return
        pdu = bytearray(6 + length)
        pdu[:6] = header
        try:
            complete = wrapper.recv_into(pdu, 6) == length
        except (OSError, TimeoutError):
            complete = False
        if not complete:
            self.event_queue.put("Evt17")
            return
        if pdu_type != 0x04:
            for raw in assembler.give_up() if assembler.pending else ():
                self._decode_raw(raw)
            self._decode_raw(pdu)
            return
        result = assembler.feed(pdu)
        if isinstance(result, Store):
            self._serve_store(result)
        elif result is not None:
            for raw in result:
                self._decode_raw(raw)

    def _decode_raw(self, pdu: bytearray) -> None:
        """The end of pynetdicom's ``_read_pdu_data`` for one whole PDU."""
        try:
            decoded, event = self._decode_pdu(pdu)
        except Exception:
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(decoded)

    def _serve_store(self, store: Store) -> None:
        """pynetdicom's ``_serve_request`` and Storage SCP for one C-STORE request, on this
        thread: the EVT_C_STORE handler runs here and its status goes straight back as a
        C-STORE-RSP PDU (a status data set, which can carry more elements, goes through
        pynetdicom's encoder as before)."""
        assoc = self.assoc
        if assoc._sent_release:  # noqa: SLF001  (pynetdicom ignores it too)
            return
        # before the EVT_ACCEPTED handlers have returned (the peer may send at once after
        # the A-ASSOCIATE-AC), a request waits for the association thread, as in pynetdicom
        request = _store_request(store) if assoc.is_established else None
        if request is None:  # pynetdicom takes it, with its own checks and answers
            for raw in store.raw:
                self._decode_raw(raw)
            return
        context = assoc._accepted_cx[store.context_id]  # noqa: SLF001
        assoc.dimse.cancel_req = {}
        # as pynetdicom's ``attempt``: a handler that aborts must not wait for this thread
        assoc.abort = assoc._abort_nonblocking  # type: ignore[method-assign]  # noqa: SLF001
        try:
            status = evt.trigger(assoc, evt.EVT_C_STORE,
                                 {"request": request, "context": context.as_tuple})
        except Exception:
            log.exception("Exception in handler bound to 'evt.EVT_C_STORE'")
            status = 0xC211
        finally:
            assoc.abort = assoc._abort_blocking  # type: ignore[method-assign]  # noqa: SLF001
        if not assoc.is_established:  # the handler aborted or released
            return
        if type(status) is int and 0 <= status <= 0xFFFF:
            self.socket.send(c_store_rsp(store.context_id, store.fields, status))  # type: ignore[union-attr]
        else:
            response = C_STORE()
            response.MessageIDBeingRespondedTo = request.MessageID
            response.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
            response.AffectedSOPClassUID = request.AffectedSOPClassUID
            response = StorageServiceClass(assoc).validate_status(status, response)  # type: ignore[arg-type]
            assoc.dimse.send_msg(response, store.context_id)
        self._idle_timer.restart()

    def run_reactor(self) -> None:
        """pynetdicom's ``DULServiceProvider.run_reactor`` with ``_wait`` for its sleep."""
        try:
            self._reactor_loop()
        finally:
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _reactor_loop(self) -> None:
        self._idle_timer.start()
        idle = False
        while True:
            if not self.assoc._dul_ready.is_set():  # noqa: SLF001
                self.assoc._dul_ready.set()  # noqa: SLF001
                idle = True
            if idle:
                self._wait()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                # either encode and send one primitive or receive and decode one PDU
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception:  # as pynetdicom: abort the association, end the thread
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                with contextlib.suppress(Exception):
                    self.socket.send(abort_pdu.encode())  # type: ignore[union-attr]
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True  # noqa: SLF001
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            self.state_machine.do_action(event)
            idle = False


class FastAssociation(Association):
    """An acceptor whose reactor blocks on its DIMSE queue instead of sleeping 1 ms."""

    def _run_reactor(self) -> None:
        """pynetdicom's ``Association._run_reactor`` with a queue wait for its sleep."""
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            try:
                context_id, msg = self.dimse.msg_queue.get(timeout=_DIMSE_WAIT_S)
            except queue.Empty:
                context_id, msg = None, None
            if msg:
                self._serve_request(msg, context_id)  # type: ignore[arg-type]
            if self.is_established and self.acse.is_release_requested():
                # EVT_RELEASED before the A-RELEASE-RP is queued, not after as in
                # pynetdicom: the DUL no longer sleeps, so it may send the reply and see the
                # connection close (EVT_CONN_CLOSE) before this thread got to the trigger,
                # and handlers rely on RELEASED coming first (the polling delay hid this)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.acse.send_release(is_response=True)
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def _text(raw: bytes | None) -> str:
    return (raw or b"").rstrip(b"\0 ").decode("ascii")


def _store_request(store: Store) -> C_STORE | None:
    """The C-STORE request primitive, from the command fields read by the assembler (what
    pynetdicom's ``decode`` and ``message_to_primitive`` build, without a pydicom data set);
    ``None`` where a value does not fit, for pynetdicom to answer."""
    fields = store.fields
    request = C_STORE()
    try:
        request.MessageID = struct.unpack("<H", fields[MESSAGE_ID])[0]
        request.AffectedSOPClassUID = _text(fields[AFFECTED_SOP_CLASS])
        request.AffectedSOPInstanceUID = _text(fields[AFFECTED_SOP_INSTANCE])
        if 0x0700 in fields:
            request.Priority = struct.unpack("<H", fields[0x0700])[0]
        if fields.get(0x1030):
            request.MoveOriginatorApplicationEntityTitle = _text(fields[0x1030])
        if fields.get(0x1031):
            request.MoveOriginatorMessageID = struct.unpack("<H", fields[0x1031])[0]
    except (KeyError, ValueError, TypeError, struct.error, UnicodeDecodeError):
        return None
    request.DataSet = BytesIO(store.data_set)
    request._context_id = store.context_id  # noqa: SLF001
    return request


def accelerate(assoc: Association) -> Association:
    """Give a not yet started acceptor the event-driven reactors and the socket reads.

    The association and socket only change methods (their state is pynetdicom's); the DUL is
    a new thread object, because ``Thread`` binds its target when it is built.
    """
    old = assoc.dul
    dul = FastDUL(assoc)
    dul.socket = old.socket
    # the socket already queued its connection event (Evt5) on the old provider
    dul.event_queue, dul.to_provider_queue = old.event_queue, old.to_provider_queue
    dul.to_user_queue, dul._recv_pdu = old.to_user_queue, old._recv_pdu  # noqa: SLF001
    dul._idle_timer = old._idle_timer  # noqa: SLF001
    dul.artim_timer = old.artim_timer
    assoc.dul = dul
    assoc.__class__ = FastAssociation
    # pynetdicom's own per-message log handlers decode every command set to format lines
    # (one INFO line per C-STORE); the audit trail records each store, so they go
    for event, handler in _LOG_HANDLERS:
        with contextlib.suppress(Exception):
            assoc.unbind(event, handler)
    if type(old.socket) is AssociationSocket:
        old.socket.__class__ = FastSocket
    return assoc


class FastRequestHandler(RequestHandler):
    """The server's per-connection handler, building accelerated acceptors."""

    def _create_association(self) -> Association:
        return accelerate(super()._create_association())


class SharedContexts(list):  # type: ignore[type-arg]
    """A server's supported presentation contexts, copied cheaply for each association.

    pynetdicom gives every association ``deepcopy(server.contexts)`` so that no association
    can change another's contexts. UIDs are immutable strings: sharing them is as safe, and a
    deep copy re-validates every one with a regular expression. Here each context is copied
    with its own transfer syntax list, and the UIDs are shared.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        out = []
        for context in self:
            twin = copy.copy(context)
            twin._transfer_syntax = list(context._transfer_syntax)  # noqa: SLF001
            out.append(twin)
        return out
