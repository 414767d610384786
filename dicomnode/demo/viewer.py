"""A local web viewer for the results: OHIF (prebuilt, from npm) in front of Orthanc's DICOMweb.

Radiologists see the node's output in the viewer they already use; this module lets the demo,
the tests and an integrator see it the same way without any network: the OHIF build from the
``@ohif/app`` npm package (``make viewer``, kept under ``.cache/ohif``) is served as static files,
and ``/dicom-web/`` is passed through to Orthanc's DICOMweb plugin (Debian
``orthanc-dicomweb``) on the same origin, so the browser needs no CORS. Both listen on
127.0.0.1 only. The server is the standard library's; it carries bytes, it parses no DICOM.
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["OHIF_VERSION", "LocalViewer", "ohif_config"]

OHIF_VERSION = "3.13.2"
"""The ``@ohif/app`` release ``make viewer`` unpacks (its ``dist/`` is a production build)."""

_PASS_HEADERS = ("content-type", "content-length", "content-encoding", "etag", "last-modified")


def ohif_config() -> str:
    """OHIF's ``app-config.js``: one DICOMweb source, Orthanc, on this origin."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "Local PACS (Orthanc)",
            "name": "orthanc",
            "wadoUriRoot": "/wado",
            "qidoRoot": "/dicom-web",
            "wadoRoot": "/dicom-web",
            "qidoSupportsIncludeField": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": None,
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "orthanc",
        "dataSources": [source],
    }
    return "window.config = " + json.dumps(config, indent=2) + ";\n"


class _Handler(BaseHTTPRequestHandler):
    server: _ViewerServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return  # requests are not logged: the viewer asks for hundreds of frames

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if self.path.startswith(("/dicom-web/", "/wado")):
            self._proxy()
        elif self.path.split("?")[0] == "/app-config.js":
            self._send(200, ohif_config().encode(), "application/javascript")
        else:
            self._static()

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _static(self) -> None:
        root = self.server.dist
        rel = self.path.split("?")[0].lstrip("/")
        target = (root / rel).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            target = root / "index.html"  # a route of the single-page app
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if target.suffix == ".wasm":
            kind = "application/wasm"
        self._send(200, target.read_bytes(), kind)

    def _proxy(self) -> None:
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.orthanc_port, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() in ("accept", "range")}
            upstream.request("GET", self.path, headers=headers)
            reply = upstream.getresponse()
            body = reply.read()
            self.send_response(reply.status)
            for key, value in reply.getheaders():
                if key.lower() in _PASS_HEADERS and key.lower() != "content-length":
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        finally:
            upstream.close()


class _ViewerServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, dist: Path, orthanc_port: int) -> None:
        self.dist = dist.resolve()
        self.orthanc_port = orthanc_port
        super().__init__(("127.0.0.1", port), _Handler)


class LocalViewer:
    """OHIF on ``http://127.0.0.1:<port>/`` reading the studies of an Orthanc on this machine.

    Parameters
    ----------
    dist
        The unpacked OHIF build (its ``index.html`` and bundles).
    orthanc_http_port
        The REST port of an Orthanc started with the DICOMweb plugin.
    port
        Where the viewer listens (127.0.0.1).
    """

    def __init__(self, dist: Path, orthanc_http_port: int, port: int) -> None:
        if not (Path(dist) / "index.html").is_file():
            raise FileNotFoundError(f"no OHIF build in {dist}: run `make viewer`")
        self.port = port
        self._server = _ViewerServer(port, Path(dist), orthanc_http_port)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="ohif-viewer")

    def start(self) -> LocalViewer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def main() -> None:
    """``python -m dicomnode.demo.viewer``: OHIF in front of an Orthanc with DICOMweb."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--orthanc-http-port", type=int, default=8042)
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--dist", type=Path, default=Path(".cache/ohif/dist"))
    args = parser.parse_args()
    viewer = LocalViewer(args.dist, args.orthanc_http_port, args.port).start()
    print(f"OHIF on {viewer.url()} (Orthanc DICOMweb on port {args.orthanc_http_port}); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        viewer.stop()


if __name__ == "__main__":
    main()
