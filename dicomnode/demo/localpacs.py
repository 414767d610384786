"""A local PACS for the demo, the tests and the benchmarks: Orthanc from the Debian package.

Orthanc 1.10 has no bind-address option, so it is kept to this machine by configuration:
``RemoteAccessAllowed: false`` (REST only from localhost) and C-STORE only from the modalities
listed here, each checked against 127.0.0.1 (``DicomCheckModalityHost``). ``TCP_NODELAY=1`` is
set in its environment (ARCHITECTURE.md: otherwise every instance stalls ~50 ms).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["DICOMWEB_PLUGIN", "ORTHANC_BINARY", "Orthanc"]

ORTHANC_BINARY = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

class Orthanc:
    """One Orthanc process with its own storage under ``workdir``.

    Parameters
    ----------
    workdir
        Storage, index, config and log live here.
    dicom_port, http_port
        Ports (127.0.0.1 for clients).
    aet
        Orthanc's AE title.
    peers
        AE titles allowed to store (from 127.0.0.1).
    accept_unknown_sop_classes
        Orthanc's ``UnknownSopClassAccepted``. Orthanc 1.10 (DCMTK 3.6.7) does not know the
        LABELMAP SEG class, so with ``False`` it refuses that presentation context: a real
        "PACS refuses the SOP class" case. (A Lua ``ReceivedInstanceFilter`` is no substitute:
        Orthanc 1.10 answers 0x0000 for instances it filters out and drops them silently.)
    transfer_syntaxes
        Orthanc's ``AcceptedTransferSyntaxes`` (wildcards allowed).
    dicomweb
        Load the DICOMweb plugin (Debian ``orthanc-dicomweb``) at ``/dicom-web/``, for a web
        viewer (``dicomnode.demo.viewer``).
    """

    def __init__(self, workdir: Path, *, dicom_port: int = 4242, http_port: int = 8042,
                 aet: str = "ORTHANC", peers: tuple[str, ...] = ("DICOMNODE",),
                 accept_unknown_sop_classes: bool = False,
                 transfer_syntaxes: tuple[str, ...] = ("1.2.840.10008.1.*",),
                 dicomweb: bool = False) -> None:
        self.workdir = Path(workdir)
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.aet = aet
        self.peers = peers
        self.accept_unknown_sop_classes = accept_unknown_sop_classes
        self.transfer_syntaxes = transfer_syntaxes
        self.dicomweb = dicomweb
        self.proc: subprocess.Popen[bytes] | None = None

    def _config(self) -> dict[str, Any]:
        storage = self.workdir / "storage"
        cfg: dict[str, Any] = {
            "Name": "dicomnode-local-pacs",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpsCACertificates": "",
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {p.lower(): [p, "127.0.0.1", 104] for p in self.peers},
            "StableAge": 1,
            "Plugins": [],
            "UnknownSopClassAccepted": self.accept_unknown_sop_classes,
            "AcceptedTransferSyntaxes": list(self.transfer_syntaxes),
        }
        if self.dicomweb:
            if not Path(DICOMWEB_PLUGIN).exists():
                raise FileNotFoundError(f"{DICOMWEB_PLUGIN} missing: apt-get install "
                                        "orthanc-dicomweb")
            cfg["Plugins"] = [DICOMWEB_PLUGIN]
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                               "WadoRoot": "/wado", "Ssl": False, "StudiesMetadata": "Full",
                               "SeriesMetadata": "Full"}
        return cfg

    def start(self, *, timeout: float = 60.0) -> Orthanc:
        """Start Orthanc and wait until its REST API answers."""
        if not Path(ORTHANC_BINARY).exists():
            raise FileNotFoundError(f"{ORTHANC_BINARY} missing: apt-get install orthanc")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "orthanc.json"
        config.write_text(json.dumps(self._config(), indent=2))
        log = open(self.workdir / "orthanc.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [ORTHANC_BINARY, str(config)], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"}, cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.workdir / "orthanc.log").read_text(errors="replace")[-2000:]
                if "already in use" in tail and time.monotonic() + 2 < deadline:
                    time.sleep(1.0)  # the port of a previous run is still closing: try again
                    self.proc = subprocess.Popen(
                        [ORTHANC_BINARY, str(config)], stdout=log, stderr=subprocess.STDOUT,
                        env={**os.environ, "TCP_NODELAY": "1"}, cwd=self.workdir)
                    continue
                raise RuntimeError(f"Orthanc exited ({self.proc.returncode}): {tail}")
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        self.stop()
        raise TimeoutError("Orthanc did not answer on its REST port")

    def stop(self) -> None:
        """Stop Orthanc (its storage stays, so a restart keeps what it had)."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def wipe(self) -> None:
        """Delete the storage (only when stopped)."""
        shutil.rmtree(self.workdir / "storage", ignore_errors=True)

    def get(self, path: str) -> Any:
        """GET a REST resource as JSON."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def series_in_study(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """The series Orthanc holds for a study (MainDicomTags and instance counts)."""
        studies = self.get("/studies?expand")
        out = []
        for study in studies:
            if study["MainDicomTags"].get("StudyInstanceUID") != study_instance_uid:
                continue
            for sid in study["Series"]:
                series = self.get(f"/series/{sid}")
                out.append({"uid": series["MainDicomTags"].get("SeriesInstanceUID"),
                            "modality": series["MainDicomTags"].get("Modality"),
                            "description": series["MainDicomTags"].get("SeriesDescription"),
                            "instances": len(series["Instances"]), "id": sid})
        return out
