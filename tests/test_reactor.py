"""The receive path's speed-ups keep its behaviour: event-driven association threads
(dicomnode/dicom/reactor.py), several receiving processes by default, the File Meta header
written without pydicom, the integrity checks that convert only what they check."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from sqlalchemy import select

from dicomnode.audit.models import Association, Instance, Series
from dicomnode.node.integrity import integrity_problem
from dicomnode.node.receive import part10_header
from dicomnode.settings import ConfigError, parse_settings
from tests.conftest import storescu, wait_for


@pytest.mark.parametrize(("sop_class", "transfer_syntax"), [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"),  # even-length UIDs
    ("1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.1.2"),  # odd: padded with NUL
])
def test_part10_header_is_byte_for_byte_pynetdicoms(sop_class: str, transfer_syntax: str) -> None:
    for sop_instance in ("1.2.3.4", "1.2.3.45"):
        reference = b"\0" * 128 + b"DICM" + encode_file_meta(create_file_meta(
            sop_class_uid=sop_class, sop_instance_uid=sop_instance,
            transfer_syntax=transfer_syntax))
        assert part10_header(sop_class, sop_instance, transfer_syntax) == reference


def test_receive_processes_auto_is_one_per_core_and_bad_values_name_the_key() -> None:
    import os

    auto = parse_settings({}).node
    assert auto.receive_processes == "auto"
    assert auto.receive_process_count == min(max(os.cpu_count() or 1, 4), 16)
    assert parse_settings({"node": {"receive_processes": 3}}).node.receive_process_count == 3
    for bad in (0, 65, "many"):
        with pytest.raises(ConfigError, match="receive_processes"):
            parse_settings({"node": {"receive_processes": bad}})


def test_numbers_are_still_checked_in_sequences_private_and_implicit_elements(
        tmp_path: Path) -> None:
    """Only elements that can be IS / DS are converted now; a bad number anywhere pydicom
    would read one is still found."""
    from pydicom.sequence import Sequence

    def read(ds: Dataset, *, implicit: bool, swap: tuple[bytes, bytes] = (b"", b"")) -> Dataset:
        """``ds`` written to a file, with a placeholder value's bytes swapped for text no
        number can hold (as a broken sender would write it), and read back."""
        path = tmp_path / "x.dcm"
        ds.file_meta = create_file_meta(
            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22", sop_instance_uid="1.2.3",
            transfer_syntax="1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1")
        ds.save_as(path, enforce_file_format=True)
        raw = path.read_bytes()
        assert raw.count(swap[0]) == 1
        path.write_bytes(raw.replace(*swap))
        return pydicom.dcmread(path)

    explicit = "1.2.840.10008.1.2.1"
    for implicit in (False, True):
        item = Dataset()
        item.add_new(0x00181050, "DS", "1.25")  # SpatialResolution
        outer = Dataset()
        outer.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # an SR: no pixel data
        outer.add_new(0x00082112, "SQ", Sequence([item]))  # SourceImageSequence
        assert integrity_problem(read(outer, implicit=implicit, swap=(b"1.25", b"1.25")),
                                 explicit) is None
        problem = integrity_problem(read(outer, implicit=implicit, swap=(b"1.25", b"abcd")),
                                    explicit)
        assert problem is not None and "SpatialResolution" in problem
        flat = Dataset()
        flat.add_new(0x00200013, "IS", "27")  # InstanceNumber
        problem = integrity_problem(read(flat, implicit=implicit, swap=(b"27", b"2x")),
                                    explicit)
        assert problem is not None and "InstanceNumber" in problem
    private = Dataset()
    private.add_new(0x00090010, "LO", "SITE")
    private.add_new(0x00091010, "DS", "9.75")  # explicit VR says DS: read and checked as DS
    problem = integrity_problem(read(private, implicit=False, swap=(b"9.75", b"9.7x")),
                                explicit)
    assert problem is not None and "(0009,1010)" in problem


@pytest.mark.parametrize("event_driven", [True, False])
def test_every_released_association_completes_its_series_at_once(
        make_node, tmp_path: Path, event_driven: bool) -> None:
    """Twelve series, each on its own association, to a node with two receiving processes and
    a completion sweep every 30 s: each association is recorded as released (not 'closed':
    the event-driven DUL once closed the connection before RELEASED fired) and each series
    completes within seconds of its close, in whichever process received it."""
    from dicomnode.demo.sample import write_phantom_ct

    node = make_node(node={"receive_processes": 2, "event_driven": event_driven},
                     schedule={"completion_sweep_s": 30},
                     completion={"quiet_period_s": 600, "max_wait_s": 600})
    for i in range(12):
        write_phantom_ct(tmp_path / f"s{i}", slices=4, size=16)
        assert storescu(tmp_path / f"s{i}", node.port).returncode == 0

    def all_complete() -> bool:
        with node.session() as s:
            return s.execute(select(Series).where(Series.completed_at.is_(None))).first() is None

    try:
        wait_for(all_complete, timeout=10, interval=0.2)
    except AssertionError:
        with node.session() as s:  # what a failure needs to be understood
            open_series = [(r.series_instance_uid[-12:], r.state, r.instance_count)
                           for r in s.execute(select(Series).where(
                               Series.completed_at.is_(None))).scalars()]
            assocs = [(a.id, a.end_reason, a.ended_at) for a in s.execute(
                select(Association).where(Association.direction == "in")).scalars()]
        raise AssertionError(f"not complete after 10 s: {open_series}; associations {assocs}; "
                             f"log tail: {node.log_path.read_text()[-3000:]}") from None
    with node.session() as s:
        reasons = s.execute(select(Association.end_reason).where(
            Association.direction == "in")).scalars().all()
        assert reasons == ["released"] * 12
        assert len(s.execute(select(Instance)).all()) == 48
        for series in s.execute(select(Series)).scalars():
            assert series.completion_reason.startswith("sender association closed")
    # the processes take turns on the shared listening socket: whichever is idle and runs
    # first accepts, so twelve associations in a row can all go to one of them (about one run
    # in fifteen here); more are sent until the second has served one
    for extra in range(36):
        if "recv-1 Accepting Association" in node.log_path.read_text():
            break
        write_phantom_ct(tmp_path / f"x{extra}", slices=1, size=16)
        assert storescu(tmp_path / f"x{extra}", node.port).returncode == 0
    assert "recv-1 Accepting Association" in node.log_path.read_text(), \
        "48 associations, none accepted by the second receiving process"


def test_files_written_while_checking_are_deleted_when_the_instance_is_refused(
        make_node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is written on a spool thread under the request's UIDs while the data set is
    checked: a refusal (UIDs that differ from the data set's, a truncated data set) deletes
    it before the answer, and an accepted instance is filed once."""
    from pynetdicom import AE, _config

    from dicomnode.demo.sample import write_phantom_ct

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send bytes as they are
    good = write_phantom_ct(tmp_path / "ct", slices=1, size=16)[0]
    other_uid = tmp_path / "other-uid.dcm"
    ds = pydicom.dcmread(good)
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.999"  # what the request will carry
    ds.save_as(other_uid)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[:-100])
    node = make_node()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(str(ds.SOPClassUID), [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(path).Status)
                    for path in (other_uid, truncated, good)]
    finally:
        assoc.release()
    assert statuses == [0xA900, 0xA900, 0x0000]
    spool = Path(node.config["var_dir"]) / "spool"
    assert list((spool / ".tmp").iterdir()) == []
    assert len(list(spool.glob("*/*/*.dcm"))) == 1
    with node.session() as s:
        assert [row.sop_instance_uid for row in s.execute(select(Instance)).scalars()] \
            == [str(ds.SOPInstanceUID)]


def test_each_association_gets_its_own_contexts_without_a_deep_copy() -> None:
    """SharedContexts: what pynetdicom deep-copies per association is copied per context
    (its own transfer syntax list) with the immutable UIDs shared, and holds the same."""
    import copy

    from dicomnode.dicom.reactor import SharedContexts
    from dicomnode.node.receive import make_receiver_ae

    server = make_receiver_ae(parse_settings({})).supported_contexts
    shared = SharedContexts(server)
    mine = copy.deepcopy(shared)  # what pynetdicom's request handler calls
    assert [(c.abstract_syntax, c.transfer_syntax, c.scu_role, c.scp_role) for c in mine] == \
        [(c.abstract_syntax, c.transfer_syntax, c.scu_role, c.scp_role) for c in server]
    assert all(a is not b and a._transfer_syntax is not b._transfer_syntax
               for a, b in zip(mine, server, strict=True))
    before = list(server[0].transfer_syntax)
    mine[0]._transfer_syntax.append(mine[0].transfer_syntax[0])
    mine[0].context_id = 99
    assert server[0].transfer_syntax == before and server[0].context_id != 99


def _fast_server(handlers: list) -> tuple[object, int]:
    """A pynetdicom server with the node's accelerated request handler, on a free port."""
    import threading

    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES

    from dicomnode.dicom.reactor import FastRequestHandler, SharedContexts

    ae = AE(ae_title="DICOMNODE")
    ae.add_supported_context("1.2.840.10008.1.1")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.2", ALL_TRANSFER_SYNTAXES)
    server = ae.make_server(("127.0.0.1", 0), evt_handlers=handlers,
                            request_handler=FastRequestHandler)
    server.contexts = SharedContexts(server.contexts)
    ae._servers.append(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


@pytest.mark.parametrize("watched", [False, True])
def test_stores_are_served_on_the_dul_thread_after_the_accept_handlers_with_each_status(
        tmp_path: Path, watched: bool) -> None:
    """The C-STORE fast path: a request is served where it was read (the DUL thread), never
    before the EVT_ACCEPTED handlers have returned (the peer may send at once after the
    A-ASSOCIATE-AC); a handler's int status, its exception (0xC211) and a status data set with
    an ErrorComment all reach the sender; C-ECHO on the same association goes through
    pynetdicom. A handler bound to a receive event the fast path skips turns it off."""
    import threading
    import time

    from pynetdicom import AE, evt

    from dicomnode.demo.sample import write_phantom_ct
    from dicomnode.dicom.reactor import FastDUL

    accepted, seen = threading.Event(), []

    def on_accepted(event) -> None:
        time.sleep(0.3)  # a slow database write
        accepted.set()

    def on_store(event):
        seen.append((accepted.is_set(), isinstance(threading.current_thread(), FastDUL)))
        number = int(event.dataset.InstanceNumber)
        if number == 2:
            raise RuntimeError("disk on fire")
        if number == 3:
            status = Dataset()
            status.Status = 0xA700
            status.ErrorComment = "no room"
            return status
        return 0x0000

    handlers = [(evt.EVT_ACCEPTED, on_accepted), (evt.EVT_C_STORE, on_store)]
    if watched:
        handlers.append((evt.EVT_PDU_RECV, lambda event: None))
    server, port = _fast_server(handlers)
    files = write_phantom_ct(tmp_path / "ct", slices=4, size=64)
    scu = AE(ae_title="MODALITY")
    scu.add_requested_context("1.2.840.10008.1.1")
    scu.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
    try:
        assoc = scu.associate("127.0.0.1", port, ae_title="DICOMNODE")
        assert assoc.is_established
        try:
            answers = [assoc.send_c_store(pydicom.dcmread(f)) for f in files]
            echo = assoc.send_c_echo()
        finally:
            assoc.release()
    finally:
        server.shutdown()
    numbers = [int(pydicom.dcmread(f).InstanceNumber) for f in files]
    statuses = {n: (int(a.Status), a.get("ErrorComment")) for n, a in zip(numbers, answers,
                                                                            strict=True)}
    assert statuses == {1: (0, None), 2: (0xC211, None), 3: (0xA700, "no room"), 4: (0, None)}
    assert int(echo.Status) == 0
    assert all(done for done, _ in seen)  # never before EVT_ACCEPTED returned
    on_dul = [fast for _, fast in seen]
    # the first request can arrive while the accept handler sleeps: pynetdicom's thread
    # serves it then; all the others are served on the DUL thread unless the path is off
    assert on_dul[1:] == [not watched] * 3


def _extra_receiver(node) -> int:  # noqa: ANN001
    """The pid of a two-process node's extra receiving process (it listens on the port too)."""
    assert node.proc is not None
    listening = subprocess.run(["ss", "-Hltnp", f"sport = :{node.port}"], capture_output=True,
                               text=True, check=True).stdout
    extra = {int(p) for p in re.findall(r"pid=(\d+)", listening)} - {node.proc.pid}
    assert len(extra) == 1, listening
    return extra.pop()


def _still_running(pid: int, timeout: float) -> bool:
    """Whether ``pid`` still runs after up to ``timeout`` s (a zombie, reaped by nobody yet,
    has ended)."""
    def running() -> bool:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
        return False

    deadline = time.monotonic() + timeout
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    return running()


def test_an_extra_receiving_process_ends_with_the_main_one_and_frees_the_port(
        make_node) -> None:
    """kill -9 of the main process: its extra receiving process gets SIGTERM (PDEATHSIG), here
    with four more in a row, and ends, and nothing listens on the node's port any more (the
    main process's listening socket is shared with it)."""
    node = make_node(node={"receive_processes": 2})
    pid = _extra_receiver(node)
    node.kill9()
    for _ in range(4):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    assert not _still_running(pid, 20), "the orphaned receiving process is still running"
    with socket.socket() as s:  # nobody listens on the port any more
        s.bind(("127.0.0.1", node.port))


def test_a_signal_inside_the_stop_handler_does_not_deadlock_it() -> None:
    """The stop handler only notes the signal; a watcher thread sets the event. The old
    handler set the event itself, so a second signal arriving while the first handler held
    the event's lock deadlocked the process (found as receiving processes orphaned by kill -9
    that never ended). Here the handler runs while its own thread holds that lock."""
    import threading

    from dicomnode.app import stop_on_signals

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    stop = threading.Event()
    try:
        stop_on_signals(stop)
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)

        def nested() -> None:
            with stop._cond:  # noqa: SLF001 - as if a first handler were inside set()
                handler(signal.SIGTERM, None)

        inner = threading.Thread(target=nested, daemon=True)
        inner.start()
        inner.join(timeout=5)
        assert not inner.is_alive(), "the handler blocked on the event's lock"
        assert stop.wait(timeout=5)
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


_TGKILL = {"x86_64": 234, "aarch64": 131}  # the tgkill system call's number


@pytest.mark.skipif(os.uname().machine not in _TGKILL, reason="tgkill number unknown here")
def test_sigterm_handed_to_a_thread_that_is_not_the_main_one_still_stops_the_node(
        make_node) -> None:
    """The kernel hands a process's signal to another thread when the main one already has
    one pending; Python runs the handler in the main thread at its next bytecode, so a main
    thread blocked in ``Event.wait()`` without a timeout never saw it (a node in bench.ingest
    ignored SIGTERM for 60 s). Here SIGTERM goes to one thread of the main process that is
    not the main thread, and to one of its extra receiving process: both end."""
    import ctypes

    node = make_node(node={"receive_processes": 2})
    assert node.proc is not None
    extra = _extra_receiver(node)
    libc = ctypes.CDLL(None, use_errno=True)

    def tgkill_other_thread(pid: int) -> None:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
        assert tids, f"process {pid} has no thread but its main one"
        assert libc.syscall(_TGKILL[os.uname().machine], pid, tids[-1], signal.SIGTERM) == 0

    tgkill_other_thread(extra)
    assert not _still_running(extra, 20), "the receiving process ignored SIGTERM"
    tgkill_other_thread(node.proc.pid)
    assert node.proc.wait(timeout=20) == 0

