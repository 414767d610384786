"""The one APScheduler 3.11 instance of a node: periodic, idempotent sweeps over the database.

It only times the sweeps; the job table is the queue. Never share it between processes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from apscheduler.schedulers.background import BackgroundScheduler

__all__ = ["Sweeps", "build_scheduler"]

log = logging.getLogger(__name__)

Sweep = Callable[[], object]


class Sweeps:
    """The named sweeps of a node with their periods (seconds)."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[Sweep, float]] = {}

    def add(self, name: str, func: Sweep, period_s: float) -> None:
        """Register ``func`` to run every ``period_s`` seconds under ``name``."""
        self.items[name] = (func, period_s)


def _guarded(name: str, func: Sweep) -> Callable[[], None]:
    def run() -> None:
        try:
            func()
        except Exception:
            log.exception("sweep %s failed", name)

    return run


def build_scheduler(sweeps: Sweeps) -> BackgroundScheduler:
    """A background scheduler running each sweep at its period, never overlapping itself."""
    scheduler = BackgroundScheduler(timezone=UTC)
    for name, (func, period) in sweeps.items.items():
        scheduler.add_job(
            _guarded(name, func), "interval", seconds=period, id=name, max_instances=1,
            coalesce=True, next_run_time=datetime.now(UTC),
        )
    return scheduler


def run_soon(scheduler: BackgroundScheduler, name: str) -> None:
    """Bring a sweep forward to now (e.g. completion when an association closes)."""
    try:
        scheduler.modify_job(name, next_run_time=datetime.now(UTC))
    except Exception:  # scheduler stopping, or the job is running: the next tick catches up
        log.debug("could not bring %s forward", name)
