"""The executor interface."""

from __future__ import annotations

import abc

from sqlalchemy.orm import Session, sessionmaker

from dicomnode.settings import Settings


class Executor(abc.ABC):
    """Runs queued jobs somewhere; the job table stays the source of truth."""

    def __init__(self, settings: Settings, *,
                 factory: sessionmaker[Session] | None = None) -> None:
        self.settings = settings
        self.factory = factory

    @abc.abstractmethod
    def start(self) -> None:
        """Start taking jobs."""

    @abc.abstractmethod
    def stop(self, *, timeout_s: float = 30.0) -> None:
        """Stop taking jobs; let a running job finish within ``timeout_s`` if it can."""

    def supervise(self) -> int:
        """Periodic health check (restart what died); returns how many were restarted."""
        return 0

    def dispatch(self) -> int:
        """Hand due jobs to the workers, where they do not claim them themselves; returns how
        many."""
        return 0

    @property
    def claims_locally(self) -> bool:
        """Whether every worker of this executor runs inside this node (then, at start-up,
        any RUNNING job is an orphan)."""
        return True

    @abc.abstractmethod
    def alive(self) -> int:
        """How many workers are running."""

    def ready(self) -> int:
        """How many workers are running and ready to take a job (by default: the running
        ones)."""
        return self.alive()
