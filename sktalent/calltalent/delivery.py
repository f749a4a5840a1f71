"""
When each chat and notification is pushed (INTERFACE section 8): every one
ends acknowledged by the phone or pushed, also across a restart, and none is
pushed twice.

A message is pushed at once when its recipient has no live connection when it
is committed; push_after seconds after it was queued on a live connection, if
it is still unacknowledged then; and when the connection ends before it is
acknowledged.  A connection taken over by a new one of the same client is not
an end: the queue is resent on the new one, which starts the wait again.

Only the messages of clients connected here wait in memory: one FIFO for the
whole server, since every wait is equally long, behind one timer, each wait
holding a seq, not a message, and replaced when its message is sent again on
a new connection; what a queue handed over holds beyond what its session has
read waits as one.  Everything else (what a connection
that ended left unacknowledged, what a queue handed over held, what a
restart finds neither acknowledged nor pushed) is read from the store in
pages, after the acknowledgements made so far are durable.

A message is decided for a push once while its push is under way here, and
marked pushed in the store only once the pusher has settled its push
(IPusher): until then a crash or a stop leaves it to be pushed after the
restart, so that a push held in the coalescing window, queued, or being
retried is never lost.  Across a crash a push may thus come twice (Umeng
took it, and the mark had not landed); the app drops the second by its
msgid.  A push is withdrawn when its message is acknowledged here before it
leaves.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from ..failures import logged
from ..mqtt.interfaces import IBroker, IConnection, IQueueWatcher, SessionView
from ..mqtt.plan import Plan
from ..push.interfaces import IPusher, PushNotice
from ..store.interfaces import IStore, MarkPushed, PendingPush

if TYPE_CHECKING:
    from ..cluster.node import ClusterNode

log = Logger()

# What a stored notice keeps: the rest is decided when it is pushed.
_KEPT = tuple(a.name for a in attrs.fields(PushNotice) if a.name not in ("badge", "reason"))


def encode_notice(notice: PushNotice) -> str:
    """The notice as kept with its queued message."""
    return json.dumps(
        {name: getattr(notice, name) for name in _KEPT}, ensure_ascii=False, separators=(",", ":")
    )


def chat_notice(msgid: str, o_id: str, content: str) -> str:
    """
    encode_notice of the push for a chat (PushTexts.notice: its alert is its
    content), written directly: every chat has one.
    """
    string = json.encoder.encode_basestring
    return (
        f'{{"kind":"order_chat","alert":{string(content)},"o_id":{string(o_id)},'
        f'"note_id":null,"status":null,"url":null,"msgid":{string(msgid)}}}'
    )


def decode_notice(text: str) -> PushNotice:
    """The notice encode_notice kept (fields it does not know are left out)."""
    fields = json.loads(text)
    return PushNotice(**{name: fields[name] for name in _KEPT if name in fields})


# Pushes still owed read from the store at a time.
PAGE = 500
# Seconds during which the waits for a whole queue (see woken) made for one
# client are one wait, moved later at each: so many at most per push_after,
# and what each covers is pushed at most this much after its own due time.
WIDE_SPAN = 0.1

# A wait's key: (client id, seq) for a message, (client id, None, n) for the
# n-th wait for a client's whole queue.
_Key = tuple[str, int | None] | tuple[str, None, int]


@attrs.frozen
class _Wait:
    due: float
    client_id: str
    # The connection it waits on: a wait for another one is void.
    connection: IConnection
    # The message waited for; None: every one queued up to ``before``.
    seq: int | None
    # Milliseconds since the epoch.
    before: int = 0


@attrs.frozen
class _Due:
    """A push decided: sent, then marked in the store once the pusher settled it."""

    client_id: str
    seq: int
    notice: str
    badge: int
    reason: str


@implementer(IQueueWatcher)
@attrs.define(eq=False)
class PushDelivery:
    _broker: IBroker
    _store: IStore
    _pusher: IPusher
    _clock: IReactorTime
    push_after: float = 5.0
    # In a cluster: a client not connected here may be connected to another node.
    cluster: ClusterNode | None = None
    # In order of due time (every wait is push_after long), by _Key: a
    # message's, or one for the rest of a queue handed over or woken for.
    _waits: OrderedDict[_Key, _Wait] = attrs.Factory(OrderedDict)
    # client id -> the key of its latest wait for its whole queue, and when
    # that wait was first made.
    _wide: dict[str, tuple[_Key, float]] = attrs.Factory(dict)
    _wide_made: int = 0
    _timer: IDelayedCall | None = None
    # (client id, seq) decided for a push and not yet marked pushed in the
    # store: decided again, it would be pushed twice.
    _deciding: set[tuple[str, int]] = attrs.Factory(set)
    # Settled this reactor turn, marked in the store together.
    _marks: list[tuple[str, int]] = attrs.Factory(list)
    _marker: IDelayedCall | None = None
    _stopped: bool = False

    # -- IQueueWatcher --------------------------------------------------------

    def queued(
        self, client_id: str, seq: int, notice: str, badge: int, connection: IConnection | None
    ) -> None:
        if connection is None:
            self._offline(_Due(client_id, seq, notice, badge, "offline"))
        else:
            self._wait(_Wait(self._clock.seconds() + self.push_after, client_id, connection, seq))

    def resumed(self, session: SessionView) -> None:
        # Everything queued until now waits afresh on the new connection,
        # each message taken in on a wait of its own, replacing the one it
        # had, the rest of the queue on one for the client.
        connection = session.connection
        if connection is None:
            return
        now = self._clock.seconds()
        due = now + self.push_after
        client_id = session.client_id
        for seq in session.awaiting():
            self._wait(_Wait(due, client_id, connection, seq))
        # Those of the earlier connection are void.
        wide = self._wide.pop(client_id, None)
        if wide is not None:
            self._waits.pop(wide[0], None)
        if not session.complete:
            self._wait_wide(client_id, connection, now)

    def woken(self, client_id: str, seqs: Sequence[int] | None = None) -> None:
        """
        Another process committed messages for client_id, connected here:
        those of seqs (None: whatever it was) are waited for like the
        messages queued here.
        """
        session = self._broker.session(client_id)
        connection = None if session is None else session.connection
        if connection is None:
            return
        now = self._clock.seconds()
        due = now + self.push_after
        if seqs is not None:
            for seq in seqs:
                self._wait(_Wait(due, client_id, connection, seq))
        else:
            self._wait_wide(client_id, connection, now)

    def detached(self, client_id: str) -> None:
        self._owed(client_id, "connection_lost", lambda _: True)

    def push_unpushed(self, client_id: str) -> None:
        """
        client_id is connected nowhere (it left another node, or that node
        died): push what its queue holds unpushed.
        """
        self._owed(client_id, "offline", lambda _: True)

    def _offline(self, due: _Due) -> None:
        """Push due, for a client not connected here: in a cluster, if connected nowhere."""
        if self.cluster is None:
            self._push(due)
        else:
            # The node holding the client's connection, if any, takes it from here.
            self.cluster.deliver(due.client_id, lambda: self._push(due))

    def discarded(self, client_id: str, unpushed: Sequence[PendingPush]) -> None:
        # Their queue entries are gone: nothing is left to mark or withdraw.
        for pending in unpushed:
            self._push(self._due_of(pending, "connection_lost"), queued=False)

    # -- the rest -------------------------------------------------------------

    def recover(self) -> Deferred[None]:
        """
        After a start: push, push_after seconds from now, every message the
        store holds neither acknowledged nor pushed whose client is not
        connected here by then (those connected have their own waits), in
        pages.
        """
        return Deferred.fromCoroutine(self._recover())

    async def _recover(self) -> None:
        await deferLater(self._clock, self.push_after)
        after = None
        while not self._stopped:
            await self._broker.barrier()
            page = await self._store.pending_pushes(after, PAGE)
            for pending in page:
                if self._broker.session(pending.client_id) is None:
                    self._offline(self._due_of(pending, "offline"))
            if len(page) < PAGE:
                return
            after = (page[-1].client_id, page[-1].seq)

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
        self._wide.clear()
        if self._marker is not None and self._marker.active():
            self._marker.cancel()
            self._mark()

    @property
    def waiting(self) -> int:
        """The waits held: at most one for each message taken in, and a few a client."""
        return len(self._waits)

    def _wait(self, wait: _Wait, key: _Key | None = None) -> None:
        if self._stopped:
            return
        if key is None:
            key = (wait.client_id, wait.seq)
        # Sent again: the wait on the earlier connection is replaced, not kept.
        self._waits.pop(key, None)
        self._waits[key] = wait
        if self._timer is None:
            self._timer = self._clock.callLater(self.push_after, self._expired)

    def _wait_wide(self, client_id: str, connection: IConnection, now: float) -> None:
        """
        Wait for whatever client_id's queue holds until now.  Each such wait
        comes due push_after after it was made: one made at every wake and
        replacing the last would never come due while messages keep coming,
        and one kept instead would not cover what came after it.
        """
        latest = self._wide.get(client_id)
        if latest is not None and now - latest[1] < WIDE_SPAN and latest[0] in self._waits:
            key = latest[0]
        else:
            self._wide_made += 1
            key = (client_id, None, self._wide_made)
            self._wide[client_id] = key, now
        self._wait(_Wait(now + self.push_after, client_id, connection, None, int(now * 1000)), key)

    def _expired(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        waits = self._waits
        # client id -> (its session, the seqs due, the latest time all before is due)
        due: dict[str, tuple[SessionView, set[int], int]] = {}
        while waits and next(iter(waits.values())).due <= now:
            key, wait = waits.popitem(last=False)
            if wait.seq is None and self._wide.get(wait.client_id, (None,))[0] == key:
                del self._wide[wait.client_id]
            session = self._broker.session(wait.client_id)
            # Resent on another connection since: that one's wait counts.
            if session is None or session.connection is not wait.connection:
                continue
            if wait.seq is not None and not session.unacknowledged(wait.seq):
                continue
            _, seqs, before = due.setdefault(wait.client_id, (session, set(), -1))
            if wait.seq is None:
                due[wait.client_id] = (session, seqs, max(before, wait.before))
            else:
                seqs.add(wait.seq)
        for client_id, (session, seqs, before) in due.items():
            connection = session.connection

            def wanted(
                pending: PendingPush,
                session: SessionView = session,
                connection: IConnection | None = connection,
                seqs: set[int] = seqs,
                before: int = before,
            ) -> bool:
                return (
                    self._broker.session(pending.client_id) is session
                    and session.connection is connection
                    and (pending.seq in seqs or pending.queued_at <= before)
                    and session.unacknowledged(pending.seq)
                )

            start = None if before >= 0 else min(seqs) - 1
            self._owed(client_id, "unacknowledged", wanted, start)
        if waits:
            self._timer = self._clock.callLater(next(iter(waits.values())).due - now, self._expired)

    def _owed(
        self,
        client_id: str,
        reason: str,
        wanted: Callable[[PendingPush], bool],
        after: int | None = None,
    ) -> None:
        """Push what client_id's queue holds unpushed that is wanted, read from the store."""
        if self._stopped:
            return
        d = Deferred.fromCoroutine(self._read_owed(client_id, reason, wanted, after))
        d.addErrback(logged(log, "Reading the pushes owed to {client} failed", client=client_id))

    async def _read_owed(
        self,
        client_id: str,
        reason: str,
        wanted: Callable[[PendingPush], bool],
        after: int | None,
    ) -> None:
        # After what was acknowledged until now is durable.
        await self._broker.barrier(client_id)
        while not self._stopped:
            start = None if after is None else (client_id, after)
            page = await self._store.pending_pushes(start, PAGE, client_id)
            for pending in page:
                if wanted(pending):
                    self._push(self._due_of(pending, reason))
            if len(page) < PAGE:
                return
            after = page[-1].seq

    @staticmethod
    def _due_of(pending: PendingPush, reason: str) -> _Due:
        return _Due(pending.client_id, pending.seq, pending.notice, pending.badge, reason)

    def _push(self, due: _Due, queued: bool = True) -> None:
        """
        Push due; ``queued`` False for a message whose queue entry is gone
        already, which is neither withdrawn nor marked.
        """
        key = (due.client_id, due.seq)
        if self._stopped or key in self._deciding:
            return
        self._deciding.add(key)
        notice = attrs.evolve(decode_notice(due.notice), badge=due.badge, reason=due.reason)
        wanted = (lambda: self._unacknowledged(*key)) if queued else None
        settled = self._pusher.push_to_users([due.client_id], notice, wanted)
        settled.addCallback(self._settled, key, queued)

    def _unacknowledged(self, client_id: str, seq: int) -> bool:
        """
        Whether the message may still wait: as far as this process can tell
        without asking the store, which it is not connected here to know.
        """
        session = self._broker.session(client_id)
        return session is None or session.unacknowledged(seq)

    def _settled(self, settled: bool, key: tuple[str, int], queued: bool) -> None:
        # One acknowledged meanwhile is gone from the store: nothing to mark.
        if not (settled and queued and self._unacknowledged(*key)):
            self._deciding.discard(key)
            return
        self._marks.append(key)
        if self._marker is None:
            self._marker = self._clock.callLater(0, self._mark)

    def _mark(self) -> None:
        self._marker = None
        marks, self._marks = self._marks, []
        plan = Plan()
        for client_id, seq in marks:
            plan.add(MarkPushed(client_id, seq))

        def marked(_: object) -> None:
            # The store says pushed now (or, failing, the restart will push).
            self._deciding.difference_update(marks)

        self._broker.commit(plan).addErrback(
            logged(
                log,
                "Marking {n} settled pushes failed; they come again after a restart",
                n=len(marks),
            )
        ).addCallback(marked)
