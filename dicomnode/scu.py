"""A small C-STORE / C-ECHO SCU (``dicomnode send`` / ``echo``): one association per batch."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context

from dicomnode.receive import VERIFICATION, set_nodelay

__all__ = ["SendResult", "echo", "send_files"]


@dataclass(frozen=True)
class SendResult:
    """Counts of one send."""

    ok: int
    failed: int
    skipped: int
    statuses: tuple[int, ...]


def send_files(
    files: list[Path], *, host: str, port: int, called_aet: str, calling_aet: str = "DICOMNODE-SCU",
    batch_size: int = 1000,
) -> SendResult:
    """C-STORE ``files``; unreadable files are skipped, non-zero statuses counted as failed."""
    datasets = []
    skipped = 0
    for f in files:
        try:
            datasets.append(pydicom.dcmread(f))
        except Exception:
            skipped += 1
    ok = failed = 0
    statuses: list[int] = []
    for start in range(0, len(datasets), batch_size):
        batch = datasets[start:start + batch_size]
        wanted: dict[str, set[str]] = defaultdict(set)
        for ds in batch:
            wanted[str(ds.SOPClassUID)].add(str(ds.file_meta.TransferSyntaxUID))
        ae = AE(ae_title=calling_aet)
        ae.requested_contexts = [build_context(s, sorted(t)) for s, t in wanted.items()][:128]
        assoc = ae.associate(host, port, ae_title=called_aet,
                             evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
        if not assoc.is_established:
            failed += len(batch)
            continue
        try:
            for ds in batch:
                try:
                    rsp = assoc.send_c_store(ds)
                    code = int(getattr(rsp, "Status", 0xFFFF))
                except Exception:
                    code = 0xFFFF
                statuses.append(code)
                if code == 0 or (code & 0xF000) == 0xB000:
                    ok += 1
                else:
                    failed += 1
        finally:
            if assoc.is_established:
                assoc.release()
    return SendResult(ok=ok, failed=failed, skipped=skipped, statuses=tuple(statuses))


def echo(*, host: str, port: int, called_aet: str, calling_aet: str = "DICOMNODE-SCU") -> int:
    """C-ECHO; returns the status (0xFFFF when no association)."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(host, port, ae_title=called_aet,
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    if not assoc.is_established:
        return 0xFFFF
    try:
        rsp = assoc.send_c_echo()
        return int(getattr(rsp, "Status", 0xFFFF))
    finally:
        assoc.release()
