"""
What the handling of one event holds back until its end: the connections'
output, and the plans committed meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import attrs
from prometheus_client import Counter


class Flushes(Protocol):
    def flush(self) -> None:
        """Write the output held for the batch."""


@attrs.define(eq=False)
class Batch:
    """
    What the handling of one read, or of one commit's effects, holds back
    until its end, shared by every connection of a server: each connection's
    output, written with one transport write however many packets it got (a
    read of 32 PUBLISHes answers 32 PUBACKs and delivers 32 messages; a
    commit of 32 chats sends each sender its PUBACKs and `sent` frames at
    once), the plans committed meanwhile (submitted to the store together,
    see Pipeline), and the count of routed publishes.  Output outside a
    batch is written at once.
    """

    # Publishes routed to subscribers (the application counts its own).
    _counter: Counter
    routed: int = 0
    # Whether the batch under way answers a read.  Its output then waits
    # for the reactor's write pass, as the other connections' answers do;
    # a commit's output is sent at once (see send.py).
    reading: bool = False
    _depth: int = 0
    _held: list[Flushes] = attrs.Factory(list)
    _ends: list[Callable[[], object]] = attrs.Factory(list)

    @property
    def holding(self) -> bool:
        return self._depth > 0

    def hold(self, reading: bool = False) -> None:
        if not self._depth:
            self.reading = reading
        self._depth += 1

    def release(self) -> None:
        """End what hold began; the outermost end runs what waited for it."""
        self._depth -= 1
        if self._depth:
            return
        while self._ends or self._held:
            ends, self._ends = self._ends, []
            for end in ends:
                end()
            held, self._held = self._held, []
            for protocol in held:
                protocol.flush()
        self.reading = False
        if self.routed:
            self._counter.inc(self.routed)
            self.routed = 0

    def held(self, protocol: Flushes) -> None:
        """protocol has output held: flush it at the end."""
        self._held.append(protocol)

    def at_end(self, end: Callable[[], object]) -> None:
        """Call end at the end of the batch, before the output is written."""
        self._ends.append(end)
