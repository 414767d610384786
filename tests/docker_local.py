"""A Docker daemon and the dicomnode image on a machine that cannot pull from a registry.

The daemon is Debian's ``docker.io`` (``dockerd``), started here on a private socket with the
settings a container host without a bridge or iptables needs (vfs storage, host networking
only). The base images come from Debian packages: ``debootstrap`` writes a bookworm root file
system, imported as ``dicomnode-local/debian:bookworm``; ``docker/base/python.Dockerfile``
turns it into a stand-in for ``python:3.11-slim-bookworm``; ``docker/Dockerfile`` builds on it
with ``BASE_IMAGE``, and takes the CPU torch wheel from this machine (``TORCH_FIND_LINKS``)
because the PyTorch index is not reachable. Images persist under ``.cache/docker``.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("DICOMNODE_DOCKER_STATE", ROOT / ".cache" / "docker"))
DEBIAN = "dicomnode-local/debian:bookworm"
PYTHON = "dicomnode-local/python:3.11-slim-bookworm"
IMAGE = "dicomnode:latest"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
WHEEL_PORT = 18999


class LocalDocker:
    """``dockerd`` on ``STATE/docker.sock``; ``run`` calls the docker client against it."""

    def __init__(self, state: Path = STATE) -> None:
        self.state = state
        self.socket = state / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "0"}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> LocalDocker:
        self.state.mkdir(parents=True, exist_ok=True)
        log = open(self.state / "dockerd.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [shutil.which("dockerd") or "/usr/sbin/dockerd", "--iptables=false", "--ip6tables=false", "--bridge=none",
             "--storage-driver=vfs", "--data-root", str(self.state / "data"),
             "--exec-root", str(self.state / "exec"), "--pidfile", str(self.state / "pid"),
             "-H", f"unix://{self.socket}"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("dockerd exited: "
                                   + (self.state / "dockerd.log").read_text()[-2000:])
            if self.run("info", check=False).returncode == 0:
                return self
            time.sleep(0.5)
        raise TimeoutError("dockerd did not answer")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # dockerd leaves its network namespace mounted, which keeps the folder from being
        # deleted (a checkout could not be removed after the tests)
        netns = self.state / "exec" / "netns" / "default"
        if os.path.ismount(netns):
            subprocess.run(["umount", str(netns)], check=False, capture_output=True)

    def run(self, *args: str, check: bool = True, timeout: float = 1800,
            input_bytes: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        r = subprocess.run(["docker", *args], env=self.env, capture_output=True,
                           timeout=timeout, input=input_bytes)
        if check and r.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args[:3])} failed: "
                               f"{r.stdout.decode()[-3000:]}{r.stderr.decode()[-3000:]}")
        return r

    def has_image(self, name: str) -> bool:
        return self.run("image", "inspect", name, check=False).returncode == 0

    def build(self, context: Path, dockerfile: Path, tag: str, *args: str) -> None:
        self.run("build", "--network", "host", "-f", str(dockerfile), "-t", tag, *args,
                 str(context), timeout=3600)

    def debian_base(self) -> None:
        """``debootstrap --variant=minbase bookworm``, imported as an image (about a minute)."""
        if self.has_image(DEBIAN):
            return
        with tempfile.TemporaryDirectory(dir=self.state) as tmp:
            rootfs = Path(tmp) / "rootfs"
            subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs),
                            "http://deb.debian.org/debian"], check=True, capture_output=True,
                           timeout=1800)
            tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], check=True,
                                 capture_output=True).stdout
            self.run("import", "-", DEBIAN, input_bytes=tar)

    def python_base(self) -> None:
        if self.has_image(PYTHON):
            return
        self.debian_base()
        with tempfile.TemporaryDirectory(dir=self.state) as tmp:
            shutil.copy(CA_BUNDLE, Path(tmp) / "ca-certificates.crt")
            self.build(Path(tmp), ROOT / "docker" / "base" / "python.Dockerfile", PYTHON)

    def node_image(self) -> None:
        """``docker/Dockerfile`` on the stand-in base, torch from this machine's wheel."""
        self.python_base()
        with tempfile.TemporaryDirectory(dir=self.state) as wheels, _serve(Path(wheels)) as url:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            "torch==2.13.0", "-d", wheels], check=True, capture_output=True)
            self.build(ROOT, ROOT / "docker" / "Dockerfile", IMAGE,
                       "--build-arg", f"BASE_IMAGE={PYTHON}",
                       "--build-arg", f"TORCH_FIND_LINKS={url}")


@contextlib.contextmanager
def _serve(folder: Path) -> Iterator[str]:
    """A find-links page for pip inside the build (host network), on 127.0.0.1."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    try:  # a fixed port keeps the build argument, and so Docker's layer cache, the same
        server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEEL_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
