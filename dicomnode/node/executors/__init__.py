"""Executors: where jobs run. ``local`` (spawned worker processes) is the default; ``celery``
(``dicomnode worker`` processes fed through RabbitMQ) needs the ``celery`` extra."""

from dicomnode.node.executors.base import Executor
from dicomnode.node.executors.local import LocalExecutor

__all__ = ["Executor", "LocalExecutor", "executor_class"]


def executor_class(kind: str) -> type[Executor]:
    """The executor named ``kind`` in the config (celery imported only when asked for)."""
    if kind == "celery":
        from dicomnode.node.executors.celery_executor import CeleryExecutor

        return CeleryExecutor
    return LocalExecutor
