"""The operations endpoint: ``/metrics``, ``/healthz`` and a status page for IT admins.

Standard library ``http.server`` (threaded) plus the official ``prometheus-client`` for the
metrics text format: no web framework is needed for three read-only pages and one form. The
page is server-rendered HTML (no scripts), shows UIDs, states and audit events (the database
holds no patient names: patient IDs only as keyed hashes), and is read-only apart from
re-sending a dead letter, which takes a per-start token that only a reader of the page has
(another site's page cannot post it) and is audited like ``dicomnode retry``.
"""

from __future__ import annotations

import hmac
import html
import json
import logging
import secrets
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry
from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode import __version__
from dicomnode.audit.models import (
    Delivery,
    DeliveryStatus,
    EventLog,
    Job,
    Output,
    Series,
)
from dicomnode.node.push import requeue_dead

__all__ = ["OpsServer"]

log = logging.getLogger(__name__)

ROWS = 50
_STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;
margin-bottom:1.5em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 6px;text-align:left}
th{background:#eee}.bad{color:#a00;font-weight:bold}.ok{color:#070}code{font-size:12px}"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _table(title: str, headers: list[str], rows: list[list[str]], *, css_id: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    empty = "" if rows else f"<tr><td colspan={len(headers)}>none</td></tr>"
    return (f"<h2>{_e(title)}</h2><table id='{css_id}'><tr>{head}</tr>{body}{empty}</table>")


def _when(value: Any) -> str:
    return _e(f"{value:%Y-%m-%d %H:%M:%S}") if value else ""


class OpsServer:
    """Serves ``/metrics``, ``/healthz`` and ``/`` on its own thread.

    Parameters
    ----------
    factory
        Session factory of the audit database.
    registry
        Prometheus registry holding the node's collector.
    health
        Returns ``(healthy, checks)``; ``/healthz`` answers 200 or 503 with the checks as JSON.
    ae_title
        Shown in the page title.
    """

    def __init__(self, *, host: str, port: int, factory: sessionmaker[Session],
                 registry: CollectorRegistry, health: Callable[[], tuple[bool, dict[str, Any]]],
                 ae_title: str) -> None:
        self.factory = factory
        self.registry = registry
        self.health = health
        self.ae_title = ae_title
        self.token = secrets.token_urlsafe(24)
        ops = self

        class Handler(BaseHTTPRequestHandler):
            server_version = f"dicomnode/{__version__}"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("http %s " + format, self.client_address[0], *args)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                url = urlsplit(self.path)
                if url.path == "/metrics":
                    self._send(HTTPStatus.OK, generate_latest(ops.registry), CONTENT_TYPE_LATEST)
                elif url.path == "/healthz":
                    healthy, checks = ops.health()
                    self._send(HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE,
                               json.dumps({"healthy": healthy, **checks}).encode(),
                               "application/json")
                elif url.path == "/":
                    query = parse_qs(url.query).get("q", [""])[0].strip()[:64]
                    self._send(HTTPStatus.OK, ops.page(query).encode(), "text/html; charset=utf-8")
                else:
                    self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

            def do_POST(self) -> None:  # noqa: N802
                if urlsplit(self.path).path != "/resend":
                    self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
                    return
                length = min(int(self.headers.get("Content-Length") or 0), 4096)
                form = parse_qs(self.rfile.read(length).decode("ascii", "replace"))
                token = form.get("token", [""])[0]
                ids = [int(v) for v in form.get("id", []) if v.isdigit()]
                if not hmac.compare_digest(token, ops.token) or not ids:
                    self._send(HTTPStatus.FORBIDDEN, b"re-send refused: reload the status page\n",
                               "text/plain")
                    return
                requeue_dead(ops.factory, delivery_ids=ids, actor="http")
                self.send_response(HTTPStatus.SEE_OTHER)
                self.send_header("Location", "/")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="dicomnode-http",
                                        daemon=True)

    def start(self) -> OpsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- the status page -------------------------------------------------------------------
    def page(self, query: str) -> str:
        """The whole status page (optionally filtered by a Study or Series Instance UID)."""
        healthy, checks = self.health()
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>dicomnode "
                 f"{_e(self.ae_title)}</title><style>{_STYLE}</style></head><body>",
                 f"<h1>dicomnode {_e(self.ae_title)} <small>{_e(__version__)}</small></h1>",
                 f"<p>Latest {ROWS} of each, newest first; times in UTC. Patient names are "
                 "never stored by this node.</p>",
                 f"<p id='health' class='{'ok' if healthy else 'bad'}'>"
                 f"{'healthy' if healthy else 'UNHEALTHY'}: "
                 + _e(", ".join(f"{k} {v}" for k, v in checks.items())) + "</p>",
                 "<form method='get' action='/'><input name='q' size='70' placeholder='Study or "
                 f"Series Instance UID' value='{_e(query)}'> <button>search</button> "
                 "<a href='/'>all</a> · <a href='/metrics'>metrics</a> · "
                 "<a href='/healthz'>healthz</a></form>"]
        with self.factory() as session:
            parts.append(self._series(session, query))
            parts.append(self._jobs(session, query))
            parts.append(self._deliveries(session, query))
            parts.append(self._events(session, query))
        parts.append("</body></html>")
        return "".join(parts)

    def _series_filter(self, query: str) -> Any:
        return or_(Series.series_instance_uid.startswith(query),
                   Series.study_instance_uid.startswith(query))

    def _series(self, session: Session, query: str) -> str:
        stmt = select(Series).order_by(Series.id.desc()).limit(ROWS)
        if query:
            stmt = stmt.where(self._series_filter(query))
        rows = [[_e(s.study_instance_uid), f"<code>{_e(s.series_instance_uid)}</code>",
                 _e(s.modality), _e(s.calling_ae), _e(s.state.value),
                 _e(f"{s.instance_count}" + (f"/{s.expected_count}" if s.expected_count else "")),
                 _when(s.last_received_at), _e(s.completion_reason),
                 _e(", ".join(s.matched_rules or [])), "deleted" if s.purged_at else ""]
                for s in session.execute(stmt).scalars()]
        return _table("Series", ["study", "series", "modality", "from", "state", "instances",
                                 "last received", "completion", "rules", "files"], rows,
                      css_id="series")

    def _jobs(self, session: Session, query: str) -> str:
        stmt = (select(Job, Series.series_instance_uid).join(Series, Series.id == Job.series_id)
                .order_by(Job.id.desc()).limit(ROWS))
        if query:
            stmt = stmt.where(self._series_filter(query))
        rows = [[_e(j.id), f"<code>{_e(uid)}</code>", _e(j.pipeline), _e(j.model_name),
                 f"<span class='{'bad' if j.status.value in ('FAILED', 'DEAD') else ''}'>"
                 f"{_e(j.status.value)}</span>", _e(j.attempts), _e(f"{j.progress:.0%}"),
                 _e(j.device), _when(j.finished_at), _e(j.error_code)]
                for j, uid in session.execute(stmt)]
        return _table("Jobs", ["id", "series", "pipeline", "model", "status", "attempts",
                               "progress", "device", "finished", "error"], rows, css_id="jobs")

    def _deliveries(self, session: Session, query: str) -> str:
        base = (select(Delivery, Output).join(Output, Output.id == Delivery.output_id)
                .join(Job, Job.id == Output.job_id).join(Series, Series.id == Job.series_id))
        if query:
            base = base.where(or_(self._series_filter(query),
                                  Output.series_instance_uid.startswith(query)))
        outbox = session.execute(base.where(Delivery.status.in_(
            (DeliveryStatus.PENDING, DeliveryStatus.SENDING, DeliveryStatus.RETRY)))
            .order_by(Delivery.next_attempt_at).limit(ROWS)).all()
        dead = session.execute(base.where(Delivery.status == DeliveryStatus.DEAD)
                               .order_by(Delivery.id.desc()).limit(ROWS)).all()

        def row(d: Delivery, o: Output) -> list[str]:
            return [_e(d.id), _e(d.destination), _e(o.kind), f"<code>{_e(o.sop_instance_uid)}</code>",
                    _e(d.status.value), _e(d.attempts), _when(d.next_attempt_at),
                    _e(d.last_error or (f"0x{d.last_dimse_status:04X}"
                                        if d.last_dimse_status is not None else ""))]
        headers = ["id", "destination", "kind", "instance", "status", "attempts",
                   "next attempt", "last error"]
        resend = (f"<form method='post' action='/resend'><input type='hidden' name='token' "
                  f"value='{_e(self.token)}'>")
        dead_rows = [[*row(d, o), f"<input type='checkbox' name='id' value='{d.id}'>"]
                     for d, o in dead]
        return (_table("Outbox", headers, [row(d, o) for d, o in outbox], css_id="outbox")
                + resend + _table("Dead letters", [*headers, "re-send"], dead_rows,
                                  css_id="dead")
                + ("<button>re-send the ticked dead letters</button>" if dead_rows else "")
                + "</form>")

    def _events(self, session: Session, query: str) -> str:
        stmt = select(EventLog).order_by(EventLog.id.desc()).limit(ROWS)
        if query:
            stmt = stmt.where(EventLog.series_instance_uid.startswith(query))
        rows = [[_e(ev.id), _when(ev.at), _e(ev.event_type), _e(ev.audit_event_id),
                 f"<span class='{'bad' if ev.outcome >= 8 else ''}'>{_e(ev.outcome)}</span>",
                 _e(ev.actor), f"<code>{_e(ev.series_instance_uid)}</code>",
                 f"<code>{_e(json.dumps(ev.detail, default=str)[:300])}</code>"]
                for ev in session.execute(stmt).scalars()]
        return _table("Recent audit events", ["#", "at", "event", "DICOM event", "outcome",
                                              "actor", "series", "detail"], rows, css_id="events")
