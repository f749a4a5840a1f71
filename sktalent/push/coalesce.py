"""
One push per burst (INTERFACE section 8): a user who is sent many messages in
a moment gets one push at once and one more for the rest, not one for each.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from ..metrics import Metrics
from .interfaces import IPusher, PushNotice, Wanted, all_settled

WINDOW = 2.0


@attrs.frozen
class _Held:
    notice: PushNotice
    wanted: Wanted | None
    settled: Deferred[bool] = attrs.field(eq=False)

    def still_wanted(self) -> bool:
        return self.wanted is None or self.wanted()


@attrs.define(eq=False)
class _Window:
    ends: float
    # Pushes held for the end of the window, oldest first.
    held: list[_Held] = attrs.Factory(list)


@implementer(IPusher)
@attrs.define
class Coalescer:
    """
    In front of a pusher.  A push to a user goes on at once and opens a window
    of ``window`` seconds for that user; pushes within the window are held.
    When the window ends, the latest held push still wanted is passed on
    (which opens the next window) and settles with it every push held: it
    covers them with its badge and its text.  The others are counted
    ``coalesced``, or ``withdrawn`` when no longer wanted; when none is
    wanted nothing goes out.  A window that ends with nothing to pass on is
    released, so memory follows the users pushed in the last few seconds.
    Webview pushes are announcements, not messages: they pass straight
    through.
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

    def push_to_users(
        self, user_ids: Sequence[str], notice: PushNotice, wanted: Wanted | None = None
    ) -> Deferred[bool]:
        if self._stopped or notice.kind == "webview":
            return self._inner.push_to_users(user_ids, notice, wanted)
        requests = self._metrics.push_requests.labels(reason=notice.reason)
        settled = []
        for user_id in user_ids:
            requests.inc()
            window = self._windows.get(user_id)
            if window is None:
                settled.append(self._pass_on(user_id, notice, wanted))
                continue
            held = _Held(notice, wanted, Deferred())
            window.held.append(held)
            settled.append(held.settled)
        return all_settled(settled)

    def push_to_tag(self, tag: str, notice: PushNotice) -> None:
        self._inner.push_to_tag(tag, notice)

    def stop(self) -> None:
        """
        Drop what is held (counted ``cancelled``, not settled), then stop the
        pusher behind.
        """
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        windows, self._windows = self._windows, {}
        held = [h for window in windows.values() for h in window.held]
        self._metrics.pushes.labels(outcome="cancelled").inc(len(held))
        for h in held:
            h.settled.callback(False)
        self._inner.stop()

    @property
    def windows(self) -> int:
        """Windows open now."""
        return len(self._windows)

    def _pass_on(self, user_id: str, notice: PushNotice, wanted: Wanted | None) -> Deferred[bool]:
        if len(self._windows) < self._max_windows:
            self._windows[user_id] = _Window(self._clock.seconds() + self._window)
            self._schedule()
        return self._inner.push_to_users([user_id], notice, wanted)

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
            if window.held:
                due.append((user_id, window.held))
        for user_id, held in due:
            self._end(user_id, held)
        self._schedule()

    def _end(self, user_id: str, held: list[_Held]) -> None:
        """Pass on the latest of held still wanted, settling them all with it."""
        wanted = [h.still_wanted() for h in held]
        pushes = self._metrics.pushes
        pushes.labels(outcome="withdrawn").inc(wanted.count(False))
        if True not in wanted:
            for h in held:
                h.settled.callback(True)
            return
        latest = len(wanted) - 1 - wanted[::-1].index(True)
        pushes.labels(outcome="coalesced").inc(wanted.count(True) - 1)
        covered = [h for h, w in zip(held, wanted, strict=True) if w]

        def still() -> bool:
            return any(h.still_wanted() for h in covered)

        chosen = held[latest]
        outcome = self._pass_on(user_id, chosen.notice, None if chosen.wanted is None else still)

        def settle(settled: bool) -> None:
            for h in held:
                h.settled.callback(settled)

        outcome.addCallback(settle)
