"""Executors: where jobs run. ``local`` (spawned worker processes) is the default."""

from dicomnode.node.executors.base import Executor
from dicomnode.node.executors.local import LocalExecutor

EXECUTORS: dict[str, type[Executor]] = {"local": LocalExecutor}

__all__ = ["EXECUTORS", "Executor", "LocalExecutor"]
