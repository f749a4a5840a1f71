"""
Every connection's keepalive on one timer.

A timer of its own per connection (a DelayedCall, with its bound method and
heap entry) costs several hundred bytes, more than the rest of an idle
connection's protocol.  Here connections are filed by the second their
silence would run out in, each second's in a ring linked through the
connections themselves: a connection costs three references, its ring and
its two neighbours, where a dict or set entry would cost 30 to 100 bytes.
A read moves the connection to a later second's ring, so no time of the
last read is kept either.
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Protocol

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()


class Watched(Protocol):
    """A connection as Keepalives files it: the links are Keepalives' to set."""

    keepalive_prev: Any
    keepalive_next: Any

    def keepalive_expired(self) -> None:
        """The connection was silent for as long as its keepalive allows: close it."""


@attrs.define(eq=False, weakref_slot=False)
class Ring:
    """The head of one second's ring of connections; alone, it links to itself."""

    keepalive_prev: Any = None
    keepalive_next: Any = None

    def __attrs_post_init__(self) -> None:
        self.keepalive_prev = self.keepalive_next = self

    def __len__(self) -> int:
        count, link = 0, self.keepalive_next
        while link is not self:
            count, link = count + 1, link.keepalive_next
        return count

    def take(self) -> list[Watched]:
        """Unlink every connection, and answer them."""
        taken, link = [], self.keepalive_next
        while link is not self:
            after = link.keepalive_next
            link.keepalive_prev = link.keepalive_next = None
            taken.append(link)
            link = after
        self.keepalive_prev = self.keepalive_next = self
        return taken


def forget(connection: Watched) -> None:
    """Take connection out of the ring it is in, if any."""
    prev, after = connection.keepalive_prev, connection.keepalive_next
    if prev is not None:
        prev.keepalive_next, after.keepalive_prev = after, prev
        connection.keepalive_prev = connection.keepalive_next = None


@attrs.define(eq=False)
class Keepalives:
    """
    Connections filed by the whole second their silence runs out in,
    rounded up; each second's are closed together once it has come.

    Invariants:

    - A watched connection is in exactly one second's ring, the one watch
      answered when it was last filed; forget takes it out (also once its
      second has come and gone); a connection in no ring has no links.
    - Each second in ``_filed`` is once in the heap ``_seconds``, and only
      those are; a second's ring may have emptied, and goes when it comes.
    - Outside a tick the timer is set for the earliest second filed, or
      absent when none is: a connection is closed less than a second after
      its silence ran out, never before.
    """

    _clock: IReactorTime
    _filed: dict[int, Ring] = attrs.Factory(dict)
    _seconds: list[int] = attrs.Factory(list)
    _timer: IDelayedCall | None = None
    _ticking: bool = False

    def watch(self, connection: Watched, due: float, filed: Ring | None = None) -> Ring:
        """
        File connection to expire at due, taking it out of filed (the ring
        watch answered for it before), and answer the ring it is in now.
        """
        second = math.ceil(due)
        ring = self._filed.get(second)
        if ring is not None and ring is filed and connection.keepalive_prev is not None:
            return ring  # Heard from again within the same second.
        forget(connection)
        if ring is None:
            ring = self._filed[second] = Ring()
            heapq.heappush(self._seconds, second)
            if not self._ticking and self._seconds[0] == second:
                self._schedule()
        last = ring.keepalive_prev
        connection.keepalive_prev, connection.keepalive_next = last, ring
        last.keepalive_next = ring.keepalive_prev = connection
        return ring

    def stop(self) -> None:
        """Expire nothing more: the server is stopping."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for ring in self._filed.values():
            ring.take()
        self._filed.clear()
        self._seconds.clear()

    def __len__(self) -> int:
        return sum(map(len, self._filed.values()))

    def _schedule(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._seconds:
            delay = max(0.0, self._seconds[0] - self._clock.seconds())
            self._timer = self._clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._ticking = True
        try:
            now = self._clock.seconds()
            seconds = self._seconds
            while seconds and seconds[0] <= now:
                for connection in self._filed.pop(heapq.heappop(seconds)).take():
                    try:
                        connection.keepalive_expired()
                    except Exception:  # noqa: BLE001 - one failure must not spare the others
                        log.failure("Closing a silent connection failed")
        finally:
            self._ticking = False
            self._schedule()
