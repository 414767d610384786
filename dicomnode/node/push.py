"""Push: the outbox (``delivery`` rows) sent by C-STORE, one association per batch.

Status classes (PS3.4 B.2.3 / C.4.2): 0x0000, 0x0111 (duplicate) and warnings (0xB...) count as
delivered; 0xA7xx (out of resources) and network errors retry with capped exponential backoff;
0xA9xx, 0xC...., a refused presentation context and anything else fail at once (dead letter and
an alert event). ``dicomnode retry`` re-queues dead letters after the cause is fixed.
"""

from __future__ import annotations

import logging
import ssl
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

import pydicom
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.audit.db import transaction
from dicomnode.audit.events import AuditEventID, Outcome, record_event
from dicomnode.audit.models import Association, Delivery, DeliveryStatus, Job, Output, utcnow
from dicomnode.dicom.net import Disposition, classify_status, set_nodelay
from dicomnode.dicom.tls import client_context
from dicomnode.settings import Settings

__all__ = ["Disposition", "Pusher", "classify_status", "requeue_dead"]

log = logging.getLogger(__name__)

UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")


class Pusher:
    """Sends due deliveries; one instance per node, driven by the scheduler."""

    def __init__(self, *, settings: Settings, factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.factory = factory
        # destination name -> TLS context, built once (a bad certificate fails at start-up)
        self.tls = {name: client_context(d.tls) for name, d in settings.destinations.items()
                    if d.tls is not None}

    def sweep(self) -> int:
        """Send every due delivery, batched per destination; returns how many were delivered."""
        now = utcnow()
        with transaction(self.factory) as session:
            rows = session.execute(
                select(Delivery.id, Delivery.destination, Delivery.ae_title, Delivery.host,
                       Delivery.port,
                       Output.path, Output.sop_instance_uid, Output.sop_class_uid)
                .join(Output, Output.id == Delivery.output_id)
                .where(Delivery.status.in_([DeliveryStatus.PENDING, DeliveryStatus.RETRY]),
                       Delivery.next_attempt_at <= now)
                .order_by(Delivery.id)
                .limit(self.settings.push.batch_size * 4)
                .with_for_update(skip_locked=True)
            ).all()
            if not rows:
                return 0
            session.execute(
                update(Delivery).where(Delivery.id.in_([r.id for r in rows]))
                .values(status=DeliveryStatus.SENDING)
            )
        groups: dict[tuple[str, str, str, int], list[object]] = defaultdict(list)
        for r in rows:
            groups[(r.destination, r.ae_title, r.host, r.port)].append(r)
        delivered = 0
        for (destination, ae_title, host, port), items in groups.items():
            tls = self.tls.get(destination)
            for start in range(0, len(items), self.settings.push.batch_size):
                batch = items[start:start + self.settings.push.batch_size]
                delivered += self._send_batch(ae_title, host, port, batch, tls=tls)
        return delivered

    def _send_batch(self, ae_title: str, host: str, port: int, batch: list[object], *,
                    tls: ssl.SSLContext | None = None) -> int:
        results: dict[int, tuple[int | None, str | None]] = {}
        datasets = {}
        for item in batch:
            try:
                datasets[item.id] = pydicom.dcmread(  # type: ignore[attr-defined]
                    self.settings.output_dir / item.path  # type: ignore[attr-defined]
                )
            except Exception as exc:
                results[item.id] = (0xC000, f"cannot read output: {exc}"[:300])  # type: ignore[attr-defined]
        ae = AE(ae_title=self.settings.node.ae_title)
        ae.network_timeout = self.settings.node.network_timeout_s
        ae.acse_timeout = 30
        ae.dimse_timeout = 120
        wanted: dict[str, set[str]] = defaultdict(set)
        for ds in datasets.values():
            wanted[str(ds.SOPClassUID)].add(str(ds.file_meta.TransferSyntaxUID))
        contexts = []
        for sop_class, syntaxes in wanted.items():
            # A compressed syntax in its own context, uncompressed as the fallback.
            for ts in sorted(syntaxes - set(UNCOMPRESSED)):
                contexts.append(build_context(sop_class, [ts]))
            contexts.append(build_context(sop_class, list(UNCOMPRESSED)))
        # Verification too: with one refused SOP class and nothing else, pynetdicom would abort
        # the association, and a refusal would look like a network error (retried forever)
        contexts.append(build_context("1.2.840.10008.1.1"))
        ae.requested_contexts = contexts[-128:]
        with transaction(self.factory) as session:
            arow = Association(direction="out", calling_ae=self.settings.node.ae_title,
                               called_ae=ae_title, peer_host=host[:64], peer_port=port)
            session.add(arow)
            session.flush()
            assoc_id = arow.id
        sent_bytes = 0
        assoc = ae.associate(host, port, ae_title=ae_title,
                             evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)],
                             tls_args=(tls, host) if tls is not None else None)
        if not assoc.is_established:
            end = "rejected" if assoc.is_rejected else "unreachable"
            reason = "association rejected" if assoc.is_rejected else "peer unreachable"
            for item in batch:
                results.setdefault(item.id, (None, reason))  # type: ignore[attr-defined]
        else:
            end = "released"
            try:
                for item in batch:
                    iid = item.id  # type: ignore[attr-defined]
                    if iid in results:
                        continue
                    ds = datasets[iid]
                    results[iid] = self._store_one(assoc, ds)
                    sent_bytes += Path(self.settings.output_dir / item.path).stat().st_size  # type: ignore[attr-defined]
            finally:
                if assoc.is_established:
                    assoc.release()
                if assoc.is_aborted:
                    end = "aborted"
        return self._record(batch, results, assoc_id, ae_title, host, port, sent_bytes, end)

    @staticmethod
    def _store_one(assoc: object, ds: pydicom.Dataset) -> tuple[int | None, str | None]:
        sop_class = str(ds.SOPClassUID)
        ts = str(ds.file_meta.TransferSyntaxUID)
        accepted = [c for c in assoc.accepted_contexts  # type: ignore[attr-defined]
                    if c.abstract_syntax == sop_class]
        if not accepted:
            return 0x0122, "peer refused the SOP class (no accepted presentation context)"
        if (not any(c.transfer_syntax[0] == ts for c in accepted)
                and ds.file_meta.TransferSyntaxUID.is_compressed):
            ds.decompress()  # the peer took only an uncompressed syntax
        try:
            rsp = assoc.send_c_store(ds)  # type: ignore[attr-defined]
        except Exception as exc:  # connection dropped mid-batch
            return None, f"{type(exc).__name__}: {exc}"[:300]
        status = getattr(rsp, "Status", None)
        if status is None:
            return None, "no response (timeout or abort)"
        return int(status), None

    def _record(
        self, batch: list[object], results: dict[int, tuple[int | None, str | None]],
        assoc_id: int, ae_title: str, host: str, port: int, sent_bytes: int, end: str,
    ) -> int:
        cfg = self.settings.push
        now = utcnow()
        delivered = dead = retried = 0
        with transaction(self.factory) as session:
            session.execute(update(Association).where(Association.id == assoc_id).values(
                ended_at=now, end_reason=end, accepted=end not in ("rejected", "unreachable"),
                reject_reason={"rejected": "rejected by the peer",
                               "unreachable": "peer unreachable"}.get(end),
                requests=len(batch), bytes=sent_bytes))
            for item in batch:
                iid = item.id  # type: ignore[attr-defined]
                status, error = results.get(iid, (None, "not sent"))
                row = session.get(Delivery, iid)
                assert row is not None
                row.attempts += 1
                row.last_dimse_status = status
                row.last_error = error
                row.last_association_id = assoc_id
                disposition = classify_status(status)
                if disposition is Disposition.DELIVERED:
                    row.status = DeliveryStatus.DELIVERED
                    row.delivered_at = now
                    delivered += 1
                elif disposition is Disposition.RETRY and row.attempts < cfg.max_attempts:
                    row.status = DeliveryStatus.RETRY
                    delay = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** (row.attempts - 1))
                    row.next_attempt_at = now + timedelta(seconds=delay)
                    retried += 1
                else:
                    row.status = DeliveryStatus.DEAD
                    dead += 1
                    record_event(
                        session, "delivery.dead", audit_event_id=AuditEventID.INSTANCES_TRANSFERRED,
                        outcome=Outcome.SERIOUS_FAILURE, actor=self.settings.node.ae_title,
                        detail={"alert": True, "delivery_id": iid,
                                "sop_instance_uid": item.sop_instance_uid,  # type: ignore[attr-defined]
                                "destination": row.destination, "status": status,
                                "error": error, "attempts": row.attempts},
                    )
            record_event(
                session, "delivery.batch", audit_event_id=AuditEventID.INSTANCES_TRANSFERRED,
                outcome=Outcome.SUCCESS if delivered == len(batch) else Outcome.MINOR_FAILURE,
                actor=self.settings.node.ae_title,
                detail={"association_id": assoc_id, "peer": f"{ae_title}@{host}:{port}",
                        "delivered": delivered, "retry": retried, "dead": dead},
            )
        return delivered


def requeue_dead(factory: sessionmaker[Session], *, delivery_ids: list[int] | None = None,
                 actor: str = "cli") -> int:
    """Put dead letters (all, or the given ids) back in the outbox; returns how many."""
    with transaction(factory) as session:
        # results the retention policy already deleted cannot be re-sent
        purged = (select(Output.id).join(Job, Job.id == Output.job_id)
                  .where(Job.outputs_purged_at.is_not(None)))
        stmt = update(Delivery).where(Delivery.status == DeliveryStatus.DEAD,
                                      Delivery.output_id.not_in(purged))
        if delivery_ids:
            stmt = stmt.where(Delivery.id.in_(delivery_ids))
        result = session.execute(stmt.values(status=DeliveryStatus.PENDING, attempts=0,
                                             next_attempt_at=utcnow()))
        count = int(result.rowcount)  # type: ignore[attr-defined]
        record_event(session, "delivery.requeued", audit_event_id=AuditEventID.APPLICATION_ACTIVITY,
                     actor=actor, detail={"count": count, "ids": delivery_ids or "all"})
        return count
