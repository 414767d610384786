"""Receiving processes share one listening socket (dicomnode/node/receive.py)."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode.node.receive import NodeServer
from tests.conftest import require

ECHOSCU = "/usr/bin/echoscu"


@pytest.fixture
def shared() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0), backlog=16)
    sock.setblocking(False)
    yield sock
    sock.close()


def _server(shared: socket.socket, served: list[str], name: str) -> NodeServer:
    """A node server on its own descriptor of the shared socket, as each receiving process
    has (the main process passes the socket to the others)."""
    sock = shared.dup()
    ae = AE("DICOMNODE")
    ae.add_supported_context(Verification)

    def on_echo(_event: object) -> int:
        served.append(name)
        return 0

    server = ae.make_server(sock.getsockname(), evt_handlers=[(evt.EVT_C_ECHO, on_echo)],
                            server_class=type("Shared", (NodeServer,), {"shared_socket": sock}))
    ae._servers.append(server)  # as serving() does: shutdown() unregisters it  # noqa: SLF001
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server  # type: ignore[return-value]


def _echo(port: int) -> int:
    return subprocess.run([ECHOSCU, "-aec", "DICOMNODE", "127.0.0.1", str(port)],
                          capture_output=True, timeout=30).returncode


def test_servers_on_one_socket_each_accept_and_one_closing_leaves_the_rest_listening(
        shared: socket.socket) -> None:
    """Every connection is accepted by exactly one of the servers (the others' non-blocking
    accept finds nothing and they go on waiting), and a server that closes (a receiving
    process ending) closes only its own descriptor: the others keep accepting."""
    require(ECHOSCU)
    port = shared.getsockname()[1]
    served: list[str] = []
    first, second = _server(shared, served, "first"), _server(shared, served, "second")
    try:
        assert [_echo(port) for _ in range(6)] == [0] * 6
        assert len(served) == 6
        first.shutdown()  # pynetdicom's shutdown closes the server's socket
        served.clear()
        assert [_echo(port) for _ in range(3)] == [0] * 3
        assert served == ["second"] * 3
    finally:
        second.shutdown()
