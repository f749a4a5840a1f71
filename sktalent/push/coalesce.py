"""
One push per burst (INTERFACE section 8): a user who is sent many messages in
a moment gets one push at once and one more for the rest, not one for each.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from ..metrics import Metrics
from .interfaces import IPusher, PushNotice

WINDOW = 2.0


@attrs.define(eq=False)
class _Window:
    ends: float
    held: PushNotice | None = None


@implementer(IPusher)
@attrs.define
class Coalescer:
    """
    In front of a pusher.  A push to a user goes on at once and opens a window
    of ``window`` seconds for that user; a push within the window is held,
    replacing any held before it (that one is counted ``coalesced``), and is
    passed on when the window ends, which opens the next window.  A window
    that ends with nothing held is released, so memory follows the users
    pushed in the last few seconds.  Webview pushes are announcements, not
    messages: they pass straight through.
    """

    _clock: IReactorTime
    _inner: IPusher
    _metrics: Metrics
    _window: float = WINDOW
    # Beyond this many open windows pushes pass on uncoalesced.
    _max_windows: int = 100_000
    # Every window is as long, so insertion order is the order they end in.
    _windows: dict[str, _Window] = attrs.field(factory=dict, init=False)
    _timer: IDelayedCall | None = attrs.field(default=None, init=False)
    _stopped: bool = attrs.field(default=False, init=False)

    def push_to_users(self, user_ids: Sequence[str], notice: PushNotice) -> None:
        if self._stopped or notice.kind == "webview":
            self._inner.push_to_users(user_ids, notice)
            return
        requests = self._metrics.push_requests.labels(reason=notice.reason)
        for user_id in user_ids:
            requests.inc()
            window = self._windows.get(user_id)
            if window is None:
                self._pass_on(user_id, notice)
                continue
            if window.held is not None:
                self._metrics.pushes.labels(outcome="coalesced").inc()
            window.held = notice

    def push_to_tag(self, tag: str, notice: PushNotice) -> None:
        self._inner.push_to_tag(tag, notice)

    def stop(self) -> None:
        """Drop what is held (counted ``cancelled``), then stop the pusher behind."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held = sum(1 for window in self._windows.values() if window.held is not None)
        self._windows.clear()
        self._metrics.pushes.labels(outcome="cancelled").inc(held)
        self._inner.stop()

    @property
    def windows(self) -> int:
        """Windows open now."""
        return len(self._windows)

    def _pass_on(self, user_id: str, notice: PushNotice) -> None:
        if len(self._windows) < self._max_windows:
            self._windows[user_id] = _Window(self._clock.seconds() + self._window)
            self._schedule()
        self._inner.push_to_users([user_id], notice)

    def _schedule(self) -> None:
        if self._timer is None and self._windows:
            first = next(iter(self._windows.values()))
            delay = max(0.0, first.ends - self._clock.seconds())
            self._timer = self._clock.callLater(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        due = []
        while self._windows:
            user_id, window = next(iter(self._windows.items()))
            if window.ends > now:
                break
            del self._windows[user_id]
            if window.held is not None:
                due.append((user_id, window.held))
        for user_id, notice in due:
            self._pass_on(user_id, notice)
        self._schedule()
