"""A recorded refusal: a series the node reads but will not process, with a code and a reason."""

from __future__ import annotations

__all__ = ["PipelineRefusal"]


class PipelineRefusal(Exception):
    """The input cannot be handled (tilted, gapped, mixed, wrong units...): not retried.

    The message is recorded as the job's error detail; it must not contain PHI.
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
