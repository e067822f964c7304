"""Job events between replicas: created (wake the workers), progress, cancel (stop it wherever it runs), final.

Events are hints, never the truth: the store is. A replica that misses one (a dropped connection) still acts
correctly, later, through its fallback polls (workers poll for work, waiters re-read the job, lease renewals
carry `cancel_requested`). So a bus only needs to be best-effort and cheap: PostgreSQL `LISTEN/NOTIFY` for a
shared store, an in-process call for one process. Progress events are throttled by the publisher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class EventKind(StrEnum):
    CREATED = "created"
    PROGRESS = "progress"
    CANCEL = "cancel"
    FINAL = "final"


@dataclass(frozen=True)
class JobEvent:
    job_id: str
    kind: EventKind
    step: int = 0
    total: int = 0

    def encode(self) -> str:
        """A short text payload (PostgreSQL NOTIFY payloads must stay under 8000 bytes)."""
        return f"{self.kind}:{self.job_id}:{self.step}:{self.total}"

    @classmethod
    def decode(cls, payload: str) -> JobEvent | None:
        """None for anything malformed (a bus is shared; a bad payload must not break the listener)."""
        try:
            kind, job_id, step, total = payload.split(":")
            return cls(job_id, EventKind(kind), int(step), int(total))
        except ValueError:
            return None


EventHandler = Callable[[JobEvent], None]


class JobEvents(Protocol):
    async def start(self, handler: EventHandler) -> None:
        """Deliver every event published by any replica (this one included) to `handler`, from now on."""
        ...

    async def publish(self, event: JobEvent) -> None:
        """Best effort: a failure is logged by the bus, never raised (events are hints)."""
        ...

    async def close(self) -> None: ...


class LocalEvents:
    """The bus of a single process: publishing calls the handler directly."""

    def __init__(self) -> None:
        self._handler: EventHandler | None = None

    async def start(self, handler: EventHandler) -> None:
        self._handler = handler

    async def publish(self, event: JobEvent) -> None:
        if self._handler is not None:
            self._handler(event)

    async def close(self) -> None:
        self._handler = None
