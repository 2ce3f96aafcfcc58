"""Fair scheduling: one request in flight, queued requests served round-robin.

The engine is sequential, so the only question is who goes next. A plain
FIFO lets one client's burst of 20 writes (~100–160 ms each) hold another
client's 1 ms status read for seconds; round-robin across clients bounds
that wait to about one request per other busy client.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar


class HasOwner(Protocol):
    @property
    def owner(self) -> Hashable: ...


J = TypeVar("J", bound=HasOwner)


class FairQueue(Generic[J]):
    """Per-owner FIFO queues, taken round-robin across owners.

    The owner whose job was just taken goes to the back of the line only at the
    next `get`, so a client that shows up while that job runs is served right
    after it: one running job is all it waits for. That holds also when the
    owner's queue was empty as its job was taken and its next request arrives
    (before the newcomer's) while the job runs: a pipelined burst reaches the
    broker in pieces, and its first piece is often a single request.
    """

    def __init__(self) -> None:
        self._queues: dict[Hashable, collections.deque[J]] = {}
        self._turns: collections.deque[Hashable] = collections.deque()
        self._held: Hashable | None = None  # had the last turn; rejoins the line at the next get
        self._has_held = False
        self._ready = asyncio.Event()

    def put(self, job: J) -> None:
        q = self._queues.get(job.owner)
        if q is None:
            q = self._queues[job.owner] = collections.deque()
        if not q and not (self._has_held and self._held == job.owner):
            self._turns.append(job.owner)
        q.append(job)
        self._ready.set()

    def remove(self, job: J) -> bool:
        q = self._queues.get(job.owner)
        if not q:
            return False
        try:
            q.remove(job)
        except ValueError:
            return False
        if not q:  # its turn goes; if it had the last turn it keeps that (a new request waits behind newcomers)
            self._drop_turn(job.owner)
        return True

    def drop_owner(self, owner: Hashable) -> list[J]:
        q = self._queues.pop(owner, None)
        if self._has_held and self._held == owner:
            self._held, self._has_held = None, False
        self._drop_turn(owner)
        return list(q or ())

    def _drop_turn(self, owner: Hashable) -> None:
        try:
            self._turns.remove(owner)
        except ValueError:
            pass
        self._settle()

    def _settle(self) -> None:
        """Clear `_ready` unless some owner has a job waiting (set by `put`: it is set exactly while one does)."""
        if not self._turns and not (self._has_held and self._queues.get(self._held)):
            self._ready.clear()

    def get_nowait(self) -> J | None:
        if self._has_held:
            if self._queues.get(self._held):
                self._turns.append(self._held)
            self._held, self._has_held = None, False
        while self._turns:
            owner = self._turns.popleft()
            q = self._queues.get(owner)
            if not q:
                continue
            job = q.popleft()
            self._held, self._has_held = owner, True  # rejoins the line at the next get, even with nothing queued now
            self._settle()
            return job
        self._ready.clear()
        return None

    async def get(self) -> J:
        while True:
            job = self.get_nowait()
            if job is not None:
                return job
            await self._ready.wait()

    def depth(self, owner: Hashable) -> int:
        return len(self._queues.get(owner) or ())

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def jobs(self) -> list[J]:
        return [job for q in self._queues.values() for job in q]
