"""The local executor: spawned worker processes that claim jobs from the job table.

Spawned (not forked) so each worker starts clean: its own engine, and torch/MONAI loaded only
there, kept loaded between jobs. A worker that dies leaves its lease to expire; the scheduler's
reclaim sweep re-queues the job.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
from multiprocessing.process import BaseProcess
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from dicomnode.node.executors.base import Executor
from dicomnode.settings import Settings

__all__ = ["LocalExecutor"]

log = logging.getLogger(__name__)


def _worker_main(settings_data: dict[str, Any], index: int, stop: Any, parent: int,
                 ready: Any = None) -> None:
    from dicomnode.audit.db import make_engine, make_sessionmaker
    from dicomnode.node.executors.worker import work_loop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker-%(process)d %(message)s")
    settings = Settings.model_validate(settings_data)
    engine = make_engine(settings.database_url)
    owner = f"{socket.gethostname()}:{os.getpid()}:w{index}"
    try:
        work_loop(settings=settings, factory=make_sessionmaker(engine), owner=owner, stop=stop,
                  parent_pid=parent, ready=ready)
    finally:
        engine.dispose()


class LocalExecutor(Executor):
    """``settings.executor.workers`` spawned processes on this machine."""

    def __init__(self, settings: Settings, *,
                 factory: sessionmaker[Session] | None = None) -> None:
        super().__init__(settings, factory=factory)
        self._ctx = mp.get_context("spawn")
        self._stop = self._ctx.Event()
        self._procs: list[BaseProcess] = []

    def _spawn(self, index: int) -> BaseProcess:
        ready = self._ctx.Event()
        proc = self._ctx.Process(
            target=_worker_main,
            args=(self.settings.model_dump(mode="json"), index, self._stop, os.getpid(), ready),
            name=f"dicomnode-worker-{index}", daemon=True,
        )
        proc.dicomnode_ready = ready  # type: ignore[attr-defined]  # set by the worker
        proc.start()
        return proc

    def start(self) -> None:  # noqa: D102
        self._procs = [self._spawn(i) for i in range(self.settings.executor.workers)]

    def supervise(self) -> int:
        """Replace workers that died (their jobs come back when the lease expires)."""
        if self._stop.is_set():
            return 0
        restarted = 0
        for index, proc in enumerate(self._procs):
            if not proc.is_alive():
                log.warning("worker %s exited with %s; starting a new one", proc.pid,
                            proc.exitcode)
                self._procs[index] = self._spawn(index)
                restarted += 1
        return restarted

    def stop(self, *, timeout_s: float = 30.0) -> None:  # noqa: D102
        self._stop.set()
        for proc in self._procs:
            proc.join(timeout=timeout_s)
            if proc.is_alive():
                log.warning("worker %s did not stop in time; terminating", proc.pid)
                proc.terminate()
                proc.join(5)
        self._procs.clear()

    def alive(self) -> int:  # noqa: D102
        return sum(p.is_alive() for p in self._procs)

    def ready(self) -> int:
        """How many workers are alive and have loaded what they need (torch: several seconds
        of CPU after a start, which a node receiving at once shares with its receivers)."""
        return sum(p.is_alive() and p.dicomnode_ready.is_set()  # type: ignore[attr-defined]
                   for p in self._procs)
