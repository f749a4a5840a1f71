"""
Group commit: many small submits become few durable transactions.

Operations submitted while a commit is running, or in the same reactor turn,
ride together in the next one; each submitter still gets only its own results.
While the back end is unreachable the batch waits and is retried, so a client
is never told "stored" before it is, and never told "lost" for a hiccup.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import attrs
from prometheus_client import Histogram
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from .interfaces import Op, StoreUnavailable

Commit = Callable[[Sequence[Op]], "Deferred[list[object]]"]


@attrs.frozen
class _Submit:
    ops: Sequence[Op]
    done: Deferred[list[object]]
    at: float


@attrs.define
class GroupCommitter:
    """
    Serialise submits into batches for ``commit``, which must apply a batch in
    one transaction (or as close to it as the back end allows), fire with one
    result per operation, and fail with StoreUnavailable when the back end
    cannot be reached (anything else is taken as this batch's own fault).
    """

    _commit: Commit
    _clock: IReactorTime
    _name: str
    _latency: Histogram | None = None
    # A single submit is never split, so a batch may exceed this by one submit.
    _max_batch: int = 1000
    _first_retry: float = 0.1
    _max_retry: float = 30.0
    available: bool = attrs.field(default=True, init=False)
    # Times available turned False: an outage shorter than a scrape still counts.
    outages: int = attrs.field(default=0, init=False)
    # Batches landed: with `submits`, how well grouping works.
    commits: int = attrs.field(default=0, init=False)
    submits: int = attrs.field(default=0, init=False)
    _pending: deque[_Submit] = attrs.field(factory=deque, init=False)
    _scheduled: IDelayedCall | None = attrs.field(default=None, init=False)
    _running: bool = attrs.field(default=False, init=False)
    _stopping: bool = attrs.field(default=False, init=False)
    _backoff: Deferred[None] | None = attrs.field(default=None, init=False)
    _idle: list[Deferred[None]] = attrs.field(factory=list, init=False)
    _log = Logger()

    def submit(self, ops: Sequence[Op]) -> Deferred[list[object]]:
        if self._stopping:
            return fail(StoreUnavailable(f"store {self._name} is stopping"))
        done: Deferred[list[object]] = Deferred()
        self.submits += 1
        self._pending.append(_Submit(tuple(ops), done, self._clock.seconds()))
        if not self._running and self._scheduled is None:
            # Not at once: let the rest of this reactor turn join the batch.
            self._scheduled = self._clock.callLater(0, self._start)
        return done

    def stop(self) -> Deferred[None]:
        """
        Commit what is pending and refuse new work.  If the back end is down,
        one last attempt is made and what still cannot be stored fails with
        StoreUnavailable.
        """
        self._stopping = True
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._start()
        if self._backoff is not None:
            self._backoff.cancel()
        if not self._running:
            return succeed(None)
        idle: Deferred[None] = Deferred()
        self._idle.append(idle)
        return idle

    def _start(self) -> None:
        self._scheduled = None
        self._running = True
        Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        while self._pending:
            await self._land(self._take())
        self._running = False
        idle, self._idle = self._idle, []
        for d in idle:
            d.callback(None)

    def _take(self) -> list[_Submit]:
        batch = [self._pending.popleft()]
        size = len(batch[0].ops)
        while self._pending and size + len(self._pending[0].ops) <= self._max_batch:
            size += len(self._pending[0].ops)
            batch.append(self._pending.popleft())
        return batch

    async def _land(self, batch: list[_Submit]) -> None:
        ops = [op for s in batch for op in s.ops]
        delay = self._first_retry
        while True:
            try:
                results = await self._commit(ops)
            except StoreUnavailable as e:
                self._down(e)
                if self._stopping:
                    self._give_up(batch, e)
                    return
                await self._wait(delay)
                delay = min(delay * 2, self._max_retry)
            except Exception:  # noqa: BLE001 - anything else is this batch's own fault
                failure = Failure()
                self._log.failure(
                    "store {name}: commit of {n} operations failed",
                    failure,
                    name=self._name,
                    n=len(ops),
                )
                self._give_up(batch, failure)
                return
            else:
                self.commits += 1
                self._up()
                self._deliver(batch, results)
                return

    async def _wait(self, delay: float) -> None:
        self._backoff = deferLater(self._clock, delay)
        try:
            await self._backoff
        except CancelledError:
            pass  # stop() wants one last attempt now
        finally:
            self._backoff = None

    def _down(self, error: StoreUnavailable) -> None:
        if self.available:
            self.available = False
            self.outages += 1
            self._log.error(
                "store {name} is unavailable, holding writes and retrying: {error}",
                name=self._name,
                error=error,
            )

    def _up(self) -> None:
        if not self.available:
            self.available = True
            self._log.info("store {name} is back", name=self._name)

    def _deliver(self, batch: list[_Submit], results: list[object]) -> None:
        now = self._clock.seconds()
        start = 0
        for s in batch:
            if self._latency is not None:
                self._latency.observe(now - s.at)
            end = start + len(s.ops)
            s.done.callback(results[start:end])
            start = end

    @staticmethod
    def _give_up(batch: list[_Submit], error: Failure | Exception) -> None:
        for s in batch:
            s.done.errback(error)
