"""The broker's own accept loop: bounded and quiet at the open-file limit.

asyncio's server accept loop, at EMFILE, logs an error with a traceback and retries after a fixed
second, forever, while the half-open clients wait; and it accepts right up to the limit, leaving the
broker no descriptor to restart its engine with (a pipe each for stdin/stdout/stderr, the engine's
own start) or to reopen its log. This loop instead:

- keeps `fd_reserve` descriptors free: it stops accepting once this process has `limit - reserve`
  files open (counted with /dev/fd, which Linux and macOS both have; the count is an estimate between
  recounts, refreshed whenever it nears the limit);
- at the limit it pauses for a backoff (0.1 s doubling to 2 s), and each pause accepts one waiting
  client from the reserve to tell it why (-32068, `fd_reserve`) instead of leaving it in the backlog;
  when accept itself fails with EMFILE/ENFILE/ENOBUFS/ENOMEM (files opened elsewhere in the process)
  there is no descriptor to tell anyone with, so it only pauses;
- logs the condition once per LOG_EVERY_S with how many connections it refused meanwhile;
- resumes by itself once descriptors are free.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections.abc import Callable

from mp_ssh_bridge import protocol
from mp_ssh_bridge_broker.bounds import limit_error

log = logging.getLogger("broker.accept")

BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 2.0
LOG_EVERY_S = 60.0
RECOUNT_EVERY_S = 1.0
LINGER_S = 0.5  # a refused client's unread input is drained this long before the close
DISCARD_CHUNK = 16 * 1024
OUT_OF_FILES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The listening socket itself is gone: nothing to retry. Every other accept error is about one client (it
# reset or left before we took it; Linux also passes on pending network errors: ENETDOWN, EHOSTUNREACH,
# ETIMEDOUT, EPERM from a firewall …) and must never end the loop: a broker whose listener died would keep
# beating in broker.json while serving nobody.
LISTENER_GONE = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSOCK})


def open_fds() -> int:
    """Descriptors this process has open (listing /dev/fd opens one itself, not counted)."""
    try:
        return max(0, len(os.listdir("/dev/fd")) - 1)
    except OSError:
        return 0


def nofile_limit() -> int | None:
    """The soft RLIMIT_NOFILE, or None when unlimited or unknown."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


class FdBudget:
    """Whether one more connection still leaves `reserve` descriptors free.

    Counting /dev/fd costs ~0.1 ms per hundred files, so between recounts the estimate is the last
    count plus what was accepted since; it is recounted once a second, and at once when the estimate
    reaches the threshold (closed connections make it pessimistic, never optimistic).
    """

    def __init__(self, reserve: int, limit: Callable[[], int | None] = nofile_limit,
                 count: Callable[[], int] = open_fds, clock: Callable[[], float] = time.monotonic) -> None:
        self.reserve = reserve
        self._limit, self._count, self._clock = limit, count, clock
        self._estimate = 0
        self._counted_at = float("-inf")

    def threshold(self) -> int | None:
        limit = self._limit()
        return None if limit is None else max(1, limit - self.reserve)

    def room(self) -> bool:
        """True while open files stay under limit - reserve (recounting when in doubt)."""
        threshold = self.threshold()
        if threshold is None:
            return True
        if self._estimate >= threshold or self._clock() - self._counted_at >= RECOUNT_EVERY_S:
            self._estimate, self._counted_at = self._count(), self._clock()
        return self._estimate < threshold

    def accepted(self) -> None:
        self._estimate += 1


class Backoff:
    """0.1 s doubling to 2 s while the condition lasts; reset once it clears."""

    def __init__(self, low: float = BACKOFF_MIN_S, high: float = BACKOFF_MAX_S) -> None:
        self.low, self.high = low, high
        self.current = 0.0

    def next(self) -> float:
        self.current = self.low if self.current == 0 else min(self.high, self.current * 2)
        return self.current

    def reset(self) -> None:
        self.current = 0.0


class RefusalLog:
    """One log line per LOG_EVERY_S while refusing, with the count since the last line."""

    def __init__(self, every: float = LOG_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.every, self._clock = every, clock
        self.refused = 0  # since the last line
        self.total = 0
        self._logged_at = float("-inf")

    def refuse(self, why: str) -> bool:
        """Count one refusal; True when this call wrote the log line."""
        self.refused += 1
        self.total += 1
        now = self._clock()
        if now - self._logged_at < self.every:
            return False
        log.warning("%s: refused %d connection(s) since the last such line; accepting again once files are free "
                    "(this line repeats at most every %.0fs)", why, self.refused, self.every)
        self._logged_at, self.refused = now, 0
        return True


class Acceptor:
    """Accepts on one non-blocking listening socket and hands each connection to `handler`."""

    def __init__(self, sock: socket.socket, handler: Callable[[socket.socket], None], budget: FdBudget,
                 name: str) -> None:
        self.sock = sock
        self.handler = handler
        self.budget = budget
        self.name = name
        self.backoff = Backoff()
        self.refusals = RefusalLog()
        sock.setblocking(False)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.budget.room():
                await self._at_limit(loop, "at the open-file limit less its reserve of "
                                     f"{self.budget.reserve} (fd_reserve) on {self.name}")
                continue
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as exc:
                if exc.errno in LISTENER_GONE:
                    raise
                if exc.errno in OUT_OF_FILES:
                    self.refusals.refuse(f"cannot accept on {self.name}: {exc.strerror}")
                    await asyncio.sleep(self.backoff.next())
                elif exc.errno not in (errno.ECONNABORTED, errno.EAGAIN, errno.EPROTO, errno.EINTR):
                    self.refusals.refuse(f"accept on {self.name} failed for one client: {exc.strerror or exc}")
                    await asyncio.sleep(BACKOFF_MIN_S)  # about that client; but never a hot loop
                continue
            self.backoff.reset()
            self.budget.accepted()
            self.handler(conn)

    async def _at_limit(self, loop: asyncio.AbstractEventLoop, why: str) -> None:
        """Tell one waiting client why (from the reserve), then pause before looking again."""
        try:
            conn = self.sock.accept()[0]
        except (BlockingIOError, InterruptedError):
            conn = None
        except OSError as exc:
            if exc.errno in LISTENER_GONE:
                raise
            conn = None  # out of files, or that client left: either way, pause and look again
        if conn is not None:
            self.refusals.refuse(why)
            await refuse(conn, limit_error(None, "fd_reserve", self.budget.reserve,
                                           "the broker is at its open-file limit"), linger=self.backoff.next())
        else:
            await asyncio.sleep(self.backoff.next())


async def refuse(conn: socket.socket, message: dict[str, object], linger: float = LINGER_S) -> None:
    """Send one line, then close gently: what the client already sent is read and dropped (up to `linger`
    seconds), so its unread request does not turn our close into a reset that loses the line."""
    loop = asyncio.get_running_loop()
    try:
        conn.setblocking(False)
        conn.send(protocol.encode(message))  # one short line: fits any socket buffer
        conn.shutdown(socket.SHUT_WR)
        deadline = loop.time() + linger
        while (left := deadline - loop.time()) > 0:
            if not await asyncio.wait_for(loop.sock_recv(conn, DISCARD_CHUNK), left):
                break  # the client closed its side
    except (OSError, asyncio.TimeoutError):
        pass
    finally:
        conn.close()
