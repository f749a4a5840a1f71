"""
Every connection's keepalive on one timer.

A timer of its own per connection (a DelayedCall, with its bound method and
heap entry) costs several hundred bytes, more than the rest of an idle
connection's protocol; here a connection costs one set entry.
"""

from __future__ import annotations

import heapq
import math
from typing import Protocol

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()


class Watched(Protocol):
    def keepalive_due(self, now: float) -> None:
        """
        The keepalive came due: close the connection if it was silent too
        long, else watch it again for when it comes due next.
        """


@attrs.define(eq=False)
class Keepalives:
    """
    Connections filed by the whole second their keepalive comes due in,
    rounded up; each second's are checked together once it has come.

    Invariants:

    - A watched connection is in exactly one second's set, the one watch
      answered when it was last filed.
    - Each second in ``_filed`` is once in the heap ``_seconds``, and only
      those are; a second's set may have emptied, and goes when it comes.
    - Outside a tick the timer is set for the earliest second filed, or
      absent when none is: a connection is checked less than a second after
      it came due.
    """

    _clock: IReactorTime
    _filed: dict[int, set[Watched]] = attrs.Factory(dict)
    _seconds: list[int] = attrs.Factory(list)
    _timer: IDelayedCall | None = None
    _ticking: bool = False

    def watch(self, connection: Watched, due: float) -> int:
        """File connection to be checked at due; answer the second it is filed under."""
        second = math.ceil(due)
        filed = self._filed.get(second)
        if filed is None:
            filed = self._filed[second] = set()
            heapq.heappush(self._seconds, second)
            if not self._ticking and self._seconds[0] == second:
                self._schedule()
        filed.add(connection)
        return second

    def forget(self, connection: Watched, second: int) -> None:
        """Stop watching connection, filed under second."""
        filed = self._filed.get(second)
        if filed is not None:
            filed.discard(connection)

    def stop(self) -> None:
        """Check nothing more: the server is stopping."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
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
                for connection in self._filed.pop(heapq.heappop(seconds)):
                    try:
                        connection.keepalive_due(now)
                    except Exception:  # noqa: BLE001 - one bad check must not stop the others
                        log.failure("Checking a keepalive failed")
        finally:
            self._ticking = False
            self._schedule()
