"""
Every connection's keepalive on one timer.

A timer of its own per connection (a DelayedCall, with its bound method and
heap entry) costs several hundred bytes, more than the rest of an idle
connection's protocol.  Here a connection costs one entry in the dict of
the second its silence would run out in, and a reference to that dict; a
read moves it to a later second's dict, so no time of the last read is kept
either.  (Dicts, not sets: with thousands of entries a set takes 30 to 100
bytes each, a dict 30 to 50.)
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
    def keepalive_expired(self) -> None:
        """The connection was silent for as long as its keepalive allows: close it."""


@attrs.define(eq=False)
class Keepalives:
    """
    Connections filed by the whole second their silence runs out in,
    rounded up; each second's are closed together once it has come.

    Invariants:

    - A watched connection is in exactly one second's dict, the one watch
      answered when it was last filed; leaving that dict (even once its
      second has come and gone) is all forgetting it takes.
    - Each second in ``_filed`` is once in the heap ``_seconds``, and only
      those are; a second's dict may have emptied, and goes when it comes.
    - Outside a tick the timer is set for the earliest second filed, or
      absent when none is: a connection is closed less than a second after
      its silence ran out, never before.
    """

    _clock: IReactorTime
    _filed: dict[int, dict[Watched, None]] = attrs.Factory(dict)
    _seconds: list[int] = attrs.Factory(list)
    _timer: IDelayedCall | None = None
    _ticking: bool = False

    def watch(
        self, connection: Watched, due: float, filed: dict[Watched, None] | None = None
    ) -> dict[Watched, None]:
        """
        File connection to expire at due, taking it out of filed (where
        watch filed it before), and answer the dict it is filed in now.
        """
        second = math.ceil(due)
        bucket = self._filed.get(second)
        if bucket is not None and bucket is filed:
            return bucket  # Heard from again within the same second.
        if filed is not None:
            filed.pop(connection, None)
        if bucket is None:
            bucket = self._filed[second] = {}
            heapq.heappush(self._seconds, second)
            if not self._ticking and self._seconds[0] == second:
                self._schedule()
        bucket[connection] = None
        return bucket

    def stop(self) -> None:
        """Expire nothing more: the server is stopping."""
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
                # A copy: a connection closed here may leave the dict at once.
                for connection in tuple(self._filed.pop(heapq.heappop(seconds))):
                    try:
                        connection.keepalive_expired()
                    except Exception:  # noqa: BLE001 - one failure must not spare the others
                        log.failure("Closing a silent connection failed")
        finally:
            self._ticking = False
            self._schedule()
