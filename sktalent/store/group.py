"""
Group commit: many small submits become few durable transactions.

Operations submitted while a commit is running, or in the same reactor turn,
ride together in the next one; each submitter still gets only its own results.
While the back end is unreachable the batch waits and is retried, so a client
is never told "stored" before it is, and never told "lost" for a hiccup.

A slow back end is not an unreachable one.  A commit is never abandoned for
being slow: abandoned work goes on in the back end while its retry queues
behind it, so each retry makes the next slower until nothing lands at all.  A
commit that takes long is waited for as long as the back end still answers
(``alive``); batches shrink while commits are slow, so each one stays short
and what waits behind it is bounded by the clients' own windows (the MQTT
protocol stops reading a connection while its publishes await the store).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence

import attrs
from prometheus_client import Histogram
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from .interfaces import (
    Attach,
    Enqueue,
    InsertChat,
    MarkReceived,
    Message,
    Op,
    PutSession,
    SetRetained,
    StoreUnavailable,
)

Commit = Callable[[Sequence[Op]], "Deferred[list[object]]"]
Probe = Callable[[], "Deferred[None]"]

# What an operation weighs beyond its payload: keys, topic, the write itself.
_OP_BYTES = 100


def op_bytes(op: Op) -> int:
    """Roughly the bytes op writes: with the operation count, what bounds a batch."""
    match op:
        case Enqueue(message=message) | SetRetained(message=Message() as message):
            return _OP_BYTES + len(message.payload)
        case InsertChat(chat, then):
            return _OP_BYTES + len(chat.envelope) + sum(map(op_bytes, then))
        case MarkReceived(then=then):
            return _OP_BYTES + sum(map(op_bytes, then))
        case PutSession(subscriptions=subscriptions) | Attach(subscriptions=subscriptions):
            return _OP_BYTES + sum(len(f) for f, _ in subscriptions)
        case _:
            return _OP_BYTES


@attrs.frozen
class _Submit:
    ops: Sequence[Op]
    size: int
    done: Deferred[list[object]]
    at: float


@attrs.define
class GroupCommitter:
    """
    Serialise submits into batches for ``commit``, which must apply a batch in
    one transaction (or as close to it as the back end allows), fire with one
    result per operation, and fail with StoreUnavailable when the back end
    cannot be reached (anything else is taken as this batch's own fault).

    ``alive``, when given, is asked whether the back end still answers once a
    commit has waited ``patience`` seconds, and again every ``patience``
    seconds while it waits: while it answers, the commit is only slow and is
    waited for; when it does not (or not within ``patience``), the commit is
    cancelled and retried as unavailable.  Without ``alive``, ``commit`` must
    itself fail when the back end is gone.
    """

    _commit: Commit
    _clock: IReactorTime
    _name: str
    _latency: Histogram | None = None
    _alive: Probe | None = None
    _patience: float = 10.0
    # The bounds of a batch (see op_bytes).  A single submit is never split,
    # so a batch may exceed them by one submit.
    _max_batch: int = 1000
    _max_bytes: int = 4 * 2**20
    # A commit slower than this halves the batch, unless halving did not
    # shorten commits (their time is not the batch's size); a full one at
    # least twice as quick doubles it again, up to max_batch.
    _target: float = 1.0
    _first_retry: float = 0.1
    _max_retry: float = 30.0
    # At least this many seconds between the starts of two commits: at low
    # rates every submit would otherwise be a commit (and an fsync) of its
    # own, where waiting a little lets those of the next moments join it.
    # It bounds the latency it adds; a busy back end, whose commits take
    # longer, never waits for it.
    _spacing: float = 0.0
    available: bool = attrs.field(default=True, init=False)
    # True while a commit has waited past patience on a back end that answers.
    slow: bool = attrs.field(default=False, init=False)
    # Times available turned False: an outage shorter than a scrape still counts.
    outages: int = attrs.field(default=0, init=False)
    # Batches landed: with `submits`, how well grouping works.
    commits: int = attrs.field(default=0, init=False)
    submits: int = attrs.field(default=0, init=False)
    # The operation bound of the next batch, between 1 and max_batch.
    limit: int = attrs.field(
        init=False, default=attrs.Factory(lambda self: self._max_batch, takes_self=True)
    )
    # Not halved below this: halving from here did not shorten commits.
    _floor: int = attrs.field(default=1, init=False)
    # (size, seconds) of the commit that the last halving followed.
    _halved: tuple[int, float] | None = attrs.field(default=None, init=False)
    _pending: deque[_Submit] = attrs.field(factory=deque, init=False)
    _scheduled: IDelayedCall | None = attrs.field(default=None, init=False)
    _running: bool = attrs.field(default=False, init=False)
    _last_start: float = attrs.field(default=-math.inf, init=False)
    _stopping: bool = attrs.field(default=False, init=False)
    _backoff: Deferred[None] | None = attrs.field(default=None, init=False)
    _idle: list[Deferred[None]] = attrs.field(factory=list, init=False)
    _log = Logger()

    def submit(self, ops: Sequence[Op]) -> Deferred[list[object]]:
        if self._stopping:
            return fail(StoreUnavailable(f"store {self._name} is stopping"))
        done: Deferred[list[object]] = Deferred()
        self.submits += 1
        ops = tuple(ops)
        size = sum(map(op_bytes, ops))
        self._pending.append(_Submit(ops, size, done, self._clock.seconds()))
        if not self._running and self._scheduled is None:
            # Not at once: let the rest of this reactor turn join the batch.
            self._scheduled = self._clock.callLater(self._until_spaced(), self._start)
        return done

    def _until_spaced(self) -> float:
        """Seconds until a commit may start, spacing kept."""
        return max(0.0, self._last_start + self._spacing - self._clock.seconds())

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
            wait = self._until_spaced()
            if wait > 0 and not self._stopping:
                await self._wait(wait)
            self._last_start = self._clock.seconds()
            await self._land(self._take())
        self._running = False
        idle, self._idle = self._idle, []
        for d in idle:
            d.callback(None)

    def _take(self) -> list[_Submit]:
        first = self._pending.popleft()
        batch, count, size = [first], len(first.ops), first.size
        while self._pending:
            after = self._pending[0]
            if count + len(after.ops) > self.limit or size + after.size > self._max_bytes:
                break
            count += len(after.ops)
            size += after.size
            batch.append(self._pending.popleft())
        return batch

    async def _land(self, batch: list[_Submit]) -> None:
        # Fixed here: a retry sends these operations again, never more.
        ops = [op for s in batch for op in s.ops]
        full = bool(self._pending)
        delay = self._first_retry
        while True:
            started = self._clock.seconds()
            try:
                results = await self._watched(self._commit(ops), len(ops))
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
                self._adapt(len(ops), full, self._clock.seconds() - started)
                self._up()
                self._deliver(batch, results)
                return

    def _watched(self, work: Deferred[list[object]], n: int) -> Deferred[list[object]]:
        """work's outcome, or StoreUnavailable once the back end stops answering."""
        alive = self._alive
        if alive is None:
            return work
        outcome: Deferred[list[object]] = Deferred()
        started = self._clock.seconds()

        def check() -> None:
            alive().addTimeout(self._patience, self._clock).addCallbacks(answered, gone)

        timer = self._clock.callLater(self._patience, check)

        def answered(_: object) -> None:
            nonlocal timer
            if not work.called:
                self._slow(n, self._clock.seconds() - started)
                timer = self._clock.callLater(self._patience, check)

        def gone(failure: Failure) -> None:
            if work.called:
                return
            error = failure.value
            if not isinstance(error, StoreUnavailable):
                error = StoreUnavailable(
                    f"store {self._name} did not answer within {self._patience:g} s"
                )
            outcome.errback(error)
            # Its Failure is the CancelledError that settled() drops.
            work.cancel()

        def settled(result: list[object] | Failure) -> None:
            if timer.active():
                timer.cancel()
            if outcome.called:
                return
            if isinstance(result, Failure):
                outcome.errback(result)
            else:
                outcome.callback(result)

        work.addBoth(settled)
        return outcome

    def _adapt(self, n: int, full: bool, took: float) -> None:
        # Short commits let a slow back end finish each batch it is given and
        # keep stop() short; but where a commit's time is mostly round trips,
        # smaller batches would only cost throughput.
        if self._halved is not None and full:
            size, before = self._halved
            self._halved = None
            if took > before * 2 / 3:
                self._floor = self.limit = size
                return
        if took > self._target and n // 2 >= self._floor:
            self._halved = (n, took)
            self.limit = n // 2
        elif took < self._target / 2:
            self._floor = 1
            if full:
                self.limit = min(self._max_batch, self.limit * 2)

    async def _wait(self, delay: float) -> None:
        self._backoff = deferLater(self._clock, delay)
        try:
            await self._backoff
        except CancelledError:
            pass  # stop() wants one last attempt now
        finally:
            self._backoff = None

    def _slow(self, n: int, waited: float) -> None:
        if not self.slow:
            self.slow = True
            self._log.warn(
                "store {name} is slow: a commit of {n} operations has waited {waited:.0f} s;"
                " the store still answers, so it is waited for",
                name=self._name,
                n=n,
                waited=waited,
            )

    def _down(self, error: StoreUnavailable) -> None:
        self.slow = False
        if self.available:
            self.available = False
            self.outages += 1
            self._log.error(
                "store {name} is unavailable, holding writes and retrying: {error}",
                name=self._name,
                error=error,
            )

    def _up(self) -> None:
        if self.slow:
            self.slow = False
            self._log.info("store {name} is no longer slow", name=self._name)
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
