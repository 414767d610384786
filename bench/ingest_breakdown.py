"""Runs ``dicomnode serve`` with wall-clock timers around the receive path's stages.

Used by ``bench/ingest.py`` for the "where the time goes" table: each wrapped call adds its
duration to a per-stage total, written as JSON to ``$DICOMNODE_BREAKDOWN`` every 25 stores.
Stages nest (``on_store`` holds ``store_instance``, which holds ``claim`` and the wait for
the spool thread's write).
"""

from __future__ import annotations

import functools
import json
import os
import runpy
import sys
import time
from typing import Any

import pynetdicom.dimse
import pynetdicom.fsm

import dicomnode.dicom.reactor
import dicomnode.node.receive
import dicomnode.node.spool

STAGES: dict[str, list[float]] = {}


def _timed(owner: Any, name: str, stage: str) -> None:
    func = getattr(owner, name)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            entry = STAGES.setdefault(stage, [0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - start
            if stage == "handler (on_store)" and entry[0] % 25 == 0:
                with open(os.environ["DICOMNODE_BREAKDOWN"], "w") as fh:
                    json.dump(STAGES, fh)

    setattr(owner, name, wrapper)


def install() -> None:
    """Wrap the stages (in this process; extra receiving processes are not timed)."""
    receive, spool, reactor = dicomnode.node.receive, dicomnode.node.spool, dicomnode.dicom.reactor
    _timed(receive.Receiver, "on_store", "handler (on_store)")
    _timed(receive, "integrity_problem", "integrity checks")
    _timed(receive, "store_instance", "filing (store_instance)")
    _timed(spool.Spool, "_write", "write + fsync file (spool thread)")
    _timed(spool.PendingWrite, "result", "waiting for the file's write + fsync")
    _timed(spool.Spool, "claim", "link + fsync directory")
    # the C-STORE fast path (dicomnode/dicom/reactor.py): reading a PDU holds serving the
    # request when it completes one, and serving holds the handler
    _timed(reactor.FastDUL, "_read_pdu_data", "read PDUs (incl. serving)")
    _timed(reactor.FastDUL, "_serve_store", "serve request (incl. handler)")
    # pynetdicom's own path, for what does not take the fast one
    _timed(pynetdicom.fsm.StateMachine, "do_action", "DUL state machine (incl. DIMSE assembly)")
    _timed(pynetdicom.dimse.DIMSEServiceProvider, "send_msg", "encode + queue a DIMSE message")


if __name__ == "__main__":
    install()
    sys.argv = ["dicomnode", *sys.argv[1:]]
    runpy.run_module("dicomnode.cli", run_name="__main__")
