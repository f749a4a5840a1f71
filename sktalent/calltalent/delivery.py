"""
When each chat and notification is pushed (INTERFACE section 8): every one
ends acknowledged by the phone or pushed, also across a restart, and none is
pushed twice.

A message is pushed at once when its recipient has no live connection when it
is committed; push_after seconds after it was queued on a live connection, if
it is still unacknowledged then; and when the connection ends before it is
acknowledged.  A connection taken over by a new one of the same client is not
an end: the queue is resent on the new one, which starts the wait again, as a
restart does for what was neither acknowledged nor pushed.

The waits are one FIFO for the whole server, since every wait is equally long,
behind one timer: an acknowledged message is not looked for, only skipped when
its turn comes (a wait holds its seq, not the message, which is freed at once).
A message sent again (on a new connection) moves its wait to the end, so there
is at most one wait per message, however often its client reconnects.

A message is decided for a push once in the life of the process (its
``pushed`` mark in memory), and marked pushed in the store only once the
pusher has settled its push (IPusher): until then a crash or a stop leaves it
to be pushed after the restart, so that a push held in the coalescing window,
queued, or being retried is never lost.  Across a crash a push may thus come twice (Umeng took
it, and the mark had not landed); the app drops the second by its msgid.  A
push is withdrawn when its message is acknowledged before it leaves.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ..failures import logged
from ..mqtt.interfaces import IBroker, IConnection, IQueueWatcher, QueuedView, SessionView
from ..mqtt.plan import Plan
from ..push.interfaces import IPusher, PushNotice
from ..store.interfaces import MarkPushed

log = Logger()

# What a stored notice keeps: the rest is decided when it is pushed.
_KEPT = tuple(a.name for a in attrs.fields(PushNotice) if a.name not in ("badge", "reason"))


def encode_notice(notice: PushNotice) -> str:
    """The notice as kept with its queued message."""
    return json.dumps(
        {name: getattr(notice, name) for name in _KEPT}, ensure_ascii=False, separators=(",", ":")
    )


def decode_notice(text: str) -> PushNotice:
    """The notice encode_notice kept (fields it does not know are left out)."""
    fields = json.loads(text)
    return PushNotice(**{name: fields[name] for name in _KEPT if name in fields})


@attrs.frozen
class _Wait:
    due: float
    # The connection it waits on; None after a restart.
    connection: IConnection | None


# A wait's message: its session and seq, not the message, so that one
# acknowledged is freed at once.
_Key = tuple[SessionView, int]


@implementer(IQueueWatcher)
@attrs.define(eq=False)
class PushDelivery:
    _broker: IBroker
    _pusher: IPusher
    _clock: IReactorTime
    push_after: float = 5.0
    # In order of due time: every wait is push_after long.
    _waits: OrderedDict[_Key, _Wait] = attrs.Factory(OrderedDict)
    _timer: IDelayedCall | None = None
    # Settled this reactor turn, marked in the store together.
    _marks: list[MarkPushed] = attrs.Factory(list)
    _marking: IDelayedCall | None = None
    _stopped: bool = False

    @property
    def waiting(self) -> int:
        """The waits held: at most one for each message in flight."""
        return len(self._waits)

    # -- IQueueWatcher --------------------------------------------------------

    def queued(self, session: SessionView, out: QueuedView) -> None:
        if session.connection is None:
            self._push(session, out, "offline")
        else:
            self._wait(session, out)

    def resumed(self, session: SessionView) -> None:
        for out in session.queue.values():
            if out.notice is not None and not out.pushed:
                self._wait(session, out)

    def detached(self, session: SessionView) -> None:
        for out in session.queue.values():
            if out.notice is not None and not out.pushed:
                self._push(session, out, "connection_lost")

    # -- the rest -------------------------------------------------------------

    def stop(self) -> None:
        """
        The server is stopping: its connections ending are not the clients'
        doing, so nothing more is pushed; what was not is after the restart.
        The pushes settled so far are marked now, before the store closes.
        """
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._waits.clear()
        if self._marking is not None and self._marking.active():
            self._marking.cancel()
            self._mark()

    def _wait(self, session: SessionView, out: QueuedView) -> None:
        if self._stopped:
            return
        due = self._clock.seconds() + self.push_after
        key = (session, out.seq)
        # Sent again: the wait on the earlier connection is replaced, not kept.
        self._waits.pop(key, None)
        self._waits[key] = _Wait(due, session.connection)
        if self._timer is None:
            self._timer = self._clock.callLater(self.push_after, self._expired)

    def _expired(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        waits = self._waits
        while waits and next(iter(waits.values())).due <= now:
            (session, seq), wait = waits.popitem(last=False)
            out = session.queue.get(seq)
            if (
                out is not None
                and not out.pushed
                # On a connection since gone: its end decided instead.
                and session.connection is wait.connection
                and self._broker.session(session.client_id) is session
            ):
                reason = "offline" if session.connection is None else "unacknowledged"
                self._push(session, out, reason)
        if waits:
            self._timer = self._clock.callLater(next(iter(waits.values())).due - now, self._expired)

    def _push(self, session: SessionView, out: QueuedView, reason: str) -> None:
        if self._stopped:
            return
        out.pushed = True
        assert out.notice is not None
        notice = attrs.evolve(decode_notice(out.notice), badge=session.notices, reason=reason)
        settled = self._pusher.push_to_users(
            [session.client_id], notice, lambda: self._unacknowledged(session, out)
        )
        settled.addCallback(self._settled, session, out)

    def _unacknowledged(self, session: SessionView, out: QueuedView) -> bool:
        """
        Whether out still waits in session, and session is the client's now:
        a persistent one may have been deleted, or discarded by a clean
        connection; a clean one ends with its connection, pushed all the same.
        """
        if session.queue.get(out.seq) is not out:
            return False
        return not session.persistent or self._broker.session(session.client_id) is session

    def _settled(self, settled: bool, session: SessionView, out: QueuedView) -> None:
        # One acknowledged is gone from the store; and a session deleted since
        # may have been made again, reusing seqs.
        if settled and session.persistent and self._unacknowledged(session, out):
            self._marks.append(MarkPushed(session.client_id, out.seq))
            if self._marking is None:
                self._marking = self._clock.callLater(0, self._mark)

    def _mark(self) -> None:
        self._marking = None
        plan = Plan()
        for mark in self._marks:
            plan.add(mark)
        n, self._marks = len(self._marks), []
        self._broker.commit(plan).addErrback(
            logged(log, "Marking {n} settled pushes failed; they come again after a restart", n=n)
        )
