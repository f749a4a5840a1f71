"""
Plans and the ordered commit pipeline: how a change a client could rely on
becomes durable before anyone sees it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ..failures import logged
from ..store.interfaces import Guarded, IStore, Op, every_op
from .batch import Batch

log = Logger()

Effect = Callable[[Any], object]

# Seconds bookkeeping nobody waits for (Pipeline.later) may wait for more to
# join it.  At low rates each read is one acknowledgement, and committed
# each on its own it cost a submit and its landing a read; a barrier still
# commits what waits at once.
LOOSE_WAIT = 0.002


@attrs.define(eq=False)
class Plan:
    """
    Store operations to commit together, each with what to do in memory once
    it is durable.  An entry with no operation is an effect that only has to
    wait its turn.  What a plan reserves up front (room in a queue) is given
    back by its abandon callbacks when its effects will never run.

    Effects run in the order they were added, each with its operation's
    result (None for an entry without one), and either all run or, when
    abandoned, none.
    """

    _entries: list[tuple[Op | None, Effect | None]] = attrs.Factory(list)
    _ops: list[Op] = attrs.Factory(list)
    _abandon: list[Callable[[], object]] = attrs.Factory(list)

    def add(self, op: Op | None, effect: Effect | None = None) -> None:
        self._entries.append((op, effect))
        if op is not None:
            self._ops.append(op)

    def add_guarded(
        self,
        op: Op,
        inner: Plan,
        otherwise: Callable[[Any], object] | None = None,
        passed: Callable[[Any], bool] = bool,
    ) -> None:
        """
        Add a guarded operation whose ``then`` are inner's operations: inner's
        effects run, each with its operation's result, when the outcome
        passes (``passed(outcome)``); otherwise inner is abandoned and
        ``otherwise(outcome)`` called.
        """
        self.add(op, _Decided(inner, otherwise, passed))
        self.on_abandon(inner.abandon)

    def on_abandon(self, undo: Callable[[], object]) -> None:
        """Call undo if this plan's effects will never run."""
        self._abandon.append(undo)

    def abandon(self) -> None:
        undo, self._abandon = self._abandon, []
        for callback in undo:
            callback()

    @property
    def empty(self) -> bool:
        """True when nothing in it needs the store."""
        return not self._ops

    @property
    def ops(self) -> tuple[Op, ...]:
        return tuple(self._ops)

    def apply(self, results: Iterable[object]) -> None:
        it = iter(results)
        for op, effect in self._entries:
            result = next(it) if op is not None else None
            if effect is not None:
                effect(result)


@attrs.define(eq=False)
class _Decided:
    """
    A guarded operation's effect (Plan.add_guarded): an object, not a
    closure, as are the effects made for each message (see Broker).
    """

    _inner: Plan
    _otherwise: Callable[[Any], object] | None
    _passed: Callable[[Any], bool]

    def __call__(self, result: Guarded) -> None:
        if self._passed(result.outcome):
            self._inner.apply(result.then)
            return
        self._inner.abandon()
        if self._otherwise is not None:
            self._otherwise(result.outcome)


@attrs.define(eq=False)
class _Pending:
    plan: Plan
    done: Deferred[None]
    results: list[object] | None = None
    failure: Any = None
    # Fired once the store answered (durable or failed), in any order.
    answered: list[Deferred[None]] | None = None

    @property
    def settled(self) -> bool:
        return self.results is not None or self.failure is not None

    # The clients its operations are about, once asked: a busy server asks
    # of every plan under way at each barrier.
    _clients: frozenset[str | None] | None = None

    def touches(self, client_id: str) -> bool:
        if self._clients is None:
            self._clients = frozenset(
                getattr(op, "client_id", None) for op in every_op(self.plan.ops)
            )
        return client_id in self._clients

    def settle(self) -> None:
        waiting, self.answered = self.answered or [], None
        for d in waiting:
            d.callback(None)


@attrs.define(eq=False)
class Pipeline:
    """
    Commits plans to the store and runs their effects.

    Invariants:

    - A plan's effects run only once all its operations are durable; a plan
      that needs no store still waits for every plan committed before it.
    - Plans complete (effects run, then the Deferred fires) in the order they
      were committed, whatever order the store answers in: acknowledgements
      go out in the order their packets arrived.
    - A plan whose commit failed is abandoned (its reservations given back),
      its Deferred fails, and the plans behind it still complete.
    - An effect that raises is logged; it never stalls the plans behind it.
    """

    _store: IStore
    _clock: IReactorTime
    # Plans committed while it holds are submitted together at its end, and
    # the effects of what one submit made durable run inside one: a store
    # round trip, and a write per connection, for all of them.
    _batch: Batch
    _pending: deque[_Pending] = attrs.Factory(deque)
    # Committed in the batch under way, not yet submitted: each with the
    # number of its operations.
    _unsent: list[tuple[_Pending, int]] = attrs.Factory(list)
    _unsent_ops: list[Op] = attrs.Factory(list)
    # Bookkeeping that nobody waits for (acknowledged messages leaving a
    # queue), committed LOOSE_WAIT after the first of it, with what came
    # meanwhile, rather than once each.
    _loose: list[Op] = attrs.Factory(list)
    _loose_flush: IDelayedCall | None = None

    def commit(self, plan: Plan, batched: bool = False) -> Deferred[None]:
        """
        Make plan's operations durable, then run its effects; plans complete
        in the order committed.  Fails when the store failed the commit.

        Plan's operations reach the store at once, so a read that follows
        sees them; ``batched``, when the batch holds, only at its end, with
        the other plans committed batched meanwhile (for what nothing reads
        back before then: a publish).
        """
        if self._loose and not plan.empty:
            # Ahead of it, in the same submit: room an acknowledgement made
            # is free for what follows it.
            self.flush_loose(batched)
        pending = _Pending(plan, Deferred())
        self._pending.append(pending)
        if plan.empty:
            pending.results = []
            self._drain()
            return pending.done
        ops = plan.ops
        if not (batched and self._batch.holding):
            self._submit([(pending, len(ops))], ops)
            return pending.done
        if not self._unsent:
            self._batch.at_end(self._submit_unsent)
        self._unsent.append((pending, len(ops)))
        self._unsent_ops.extend(ops)
        return pending.done

    def _submit_unsent(self) -> None:
        unsent, self._unsent = self._unsent, []
        ops, self._unsent_ops = self._unsent_ops, []
        self._submit(unsent, ops)

    def _submit(self, plans: list[tuple[_Pending, int]], ops: Sequence[Op]) -> None:
        def landed(results: list[object]) -> None:
            start = 0
            for pending, n in plans:
                pending.results = results[start : start + n]
                pending.settle()
                start += n
            self._batch.hold()
            try:
                self._drain()
            finally:
                self._batch.release()

        def failed(failure: Any) -> None:
            for pending, _ in plans:
                pending.failure = failure
                pending.settle()
            self._drain()

        self._store.submit(ops).addCallbacks(landed, failed)

    def apply_now(self, plan: Plan) -> bool:
        """
        Apply a plan that needs no store at once, when no commit is under way
        for it to wait behind: the hot path of a plain broker.  False when it
        must go through commit().
        """
        if self._pending or not plan.empty:
            return False
        plan.apply(())
        return True

    def barrier(self, client_id: str | None = None) -> Deferred[None]:
        """
        Fire once everything committed before now has completed, the
        bookkeeping of later() included.  With client_id: once every
        operation on client_id's session committed before now is settled in
        the store (durable, or failed), whatever else is still under way:
        what the store then answers about that session is current.
        """
        self.flush_loose()
        if client_id is None:
            return self.commit(Plan())
        waits: list[Deferred[None]] = []
        for pending in self._pending:
            if not pending.settled and pending.touches(client_id):
                d: Deferred[None] = Deferred()
                pending.answered = [*(pending.answered or ()), d]
                waits.append(d)
        return gatherResults(waits).addCallback(lambda _: None)

    def later(self, op: Op) -> None:
        """
        Commit op, within LOOSE_WAIT, with the other bookkeeping of that
        time: for what nobody waits for, so a failure is only logged.
        """
        self._loose.append(op)
        if self._loose_flush is None:
            self._loose_flush = self._clock.callLater(LOOSE_WAIT, self.flush_loose)

    def _drain(self) -> None:
        while self._pending and (
            self._pending[0].results is not None or self._pending[0].failure is not None
        ):
            head = self._pending.popleft()
            if head.failure is not None:
                head.plan.abandon()
                head.done.errback(head.failure)
                continue
            assert head.results is not None
            try:
                head.plan.apply(head.results)
            except Exception:  # noqa: BLE001 - one bad effect must not stall every later plan
                log.failure("Applying a committed plan failed")
            head.done.callback(None)

    def flush_loose(self, batched: bool = False) -> None:
        """
        Commit the bookkeeping waiting now (a stop must not leave it behind),
        ``batched`` as for commit().
        """
        if self._loose_flush is not None:
            if self._loose_flush.active():  # Not when it is what calls.
                self._loose_flush.cancel()
            self._loose_flush = None
        if not self._loose:
            return  # Already committed: by a barrier, a commit or a stop.
        plan = Plan()
        for op in self._loose:
            plan.add(op)
        self._loose = []
        self.commit(plan, batched).addErrback(logged(log, "Committing queue bookkeeping failed"))
