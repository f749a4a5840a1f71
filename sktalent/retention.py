"""
Retention: what is older than the retention time goes, at start-up and every
few hours: chat history, queued messages, and sessions no client ever
connected to that are left with nothing queued.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .failures import every
from .metrics import Metrics
from .mqtt.interfaces import IBroker
from .store.interfaces import IStore

log = Logger()

DAY = 86400.0


@attrs.define(eq=False)
class Retention:
    _clock: IReactorTime
    _store: IStore
    _broker: IBroker
    _metrics: Metrics
    days: int = 30
    # Between purges, in seconds.
    interval: float = DAY / 4
    _loop: LoopingCall | None = None

    def start(self) -> None:
        """Purge now, then every interval until stop()."""
        self._loop = every(self._clock, self.interval, self.purge, log, "Purging stopped")

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def purge(self) -> Deferred[None]:
        """One purge; a failure is logged, so the next one still runs."""
        return Deferred.fromCoroutine(self._purge())

    async def _purge(self) -> None:
        before = int((self._clock.seconds() - self.days * DAY) * 1000)
        try:
            chats = await self._store.purge(before)
            messages, sessions = await self._broker.expire(before)
        except Exception:  # noqa: BLE001 - logged; the next purge tries again
            log.failure("Purging what is past retention failed")
            return
        self._metrics.expired.labels("message").inc(messages)
        self._metrics.expired.labels("session").inc(sessions)
        log.info(
            "Purged {chats} chat messages, {messages} queued messages and {sessions}"
            " never-connected sessions past retention",
            chats=chats,
            messages=messages,
            sessions=sessions,
        )
