"""The one APScheduler 3.11 instance of a node: periodic, idempotent sweeps over the database.

It only times the sweeps; the job table is the queue. Never share it between processes.

A sweep can also be asked to run now (``Sweeps.run_soon``: the completion sweep when an
association closes). APScheduler alone cannot promise that: a job brought forward while it is
running is skipped ("maximum number of running instances reached") and its next run is a whole
period away, so a series whose sender closed during a pass waited for the next tick. Each sweep
therefore keeps its own running flag: a request during a pass makes that pass run once more, and
a request between passes runs it on the node's trigger thread. Passes of one sweep never overlap.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from apscheduler.schedulers.background import BackgroundScheduler

__all__ = ["Sweeps", "build_scheduler"]

log = logging.getLogger(__name__)

Sweep = Callable[[], object]


class _Guarded:
    """One sweep: passes never overlap, and a request during a pass repeats it."""

    def __init__(self, name: str, func: Sweep) -> None:
        self.name = name
        self.func = func
        self._lock = threading.Lock()
        self._running = False
        self._again = False

    def busy_or_claim(self) -> bool:
        """True when a pass is running (it is told to repeat); otherwise claim the next pass."""
        with self._lock:
            if self._running:
                self._again = True
                return True
            self._running = True
            return False

    def __call__(self) -> None:
        """A scheduler tick: one pass, or a repeat of the running one."""
        if not self.busy_or_claim():
            self.run_claimed()

    def release(self) -> None:
        """Drop a claim without running a pass."""
        with self._lock:
            self._running = False
            self._again = False

    def run_claimed(self) -> None:
        """Run passes until none was asked for during the last one (the caller holds the claim)."""
        try:
            while True:
                try:
                    self.func()
                except Exception:
                    log.exception("sweep %s failed", self.name)
                with self._lock:
                    if not self._again:
                        self._running = False
                        return
                    self._again = False
        except BaseException:
            with self._lock:
                self._running = False
            raise


class Sweeps:
    """The named sweeps of a node with their periods (seconds), and the thread that runs one
    when it is asked for before its tick."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[_Guarded, float]] = {}
        self._wanted: list[_Guarded] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def add(self, name: str, func: Sweep, period_s: float) -> None:
        """Register ``func`` to run every ``period_s`` seconds under ``name``."""
        self.items[name] = (_Guarded(name, func), period_s)

    def run_soon(self, name: str) -> None:
        """Run sweep ``name`` now: once more after the running pass, or on the trigger thread."""
        guarded = self.items[name][0]
        if guarded.busy_or_claim():
            return
        with self._cond:
            if self._stopping:  # shutting down: drop the request with its claim
                guarded.release()
                return
            self._wanted.append(guarded)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, daemon=True,
                                                name="dicomnode-sweep-now")
                self._thread.start()
            self._cond.notify()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._wanted and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    for guarded in self._wanted:  # claimed, never run: drop the claims
                        guarded.release()
                    self._wanted.clear()
                    return
                guarded = self._wanted.pop(0)
            guarded.run_claimed()

    def stop(self) -> None:
        """Stop the trigger thread after the pass it is running (requests after this are
        dropped; the scheduler's own ticks stop with the scheduler)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()


def build_scheduler(sweeps: Sweeps) -> BackgroundScheduler:
    """A background scheduler running each sweep at its period, never overlapping itself."""
    scheduler = BackgroundScheduler(timezone=UTC)
    for name, (guarded, period) in sweeps.items.items():
        scheduler.add_job(
            guarded, "interval", seconds=period, id=name, name=name, max_instances=1,
            coalesce=True, next_run_time=datetime.now(UTC),
        )
    return scheduler
