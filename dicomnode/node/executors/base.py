"""The executor interface."""

from __future__ import annotations

import abc

from dicomnode.settings import Settings


class Executor(abc.ABC):
    """Runs queued jobs somewhere; the job table stays the source of truth."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @abc.abstractmethod
    def start(self) -> None:
        """Start taking jobs."""

    @abc.abstractmethod
    def stop(self, *, timeout_s: float = 30.0) -> None:
        """Stop taking jobs; let a running job finish within ``timeout_s`` if it can."""

    def supervise(self) -> int:
        """Periodic health check (restart what died); returns how many were restarted."""
        return 0

    @abc.abstractmethod
    def alive(self) -> int:
        """How many workers are running."""
