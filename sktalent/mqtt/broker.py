"""
Sessions, subscriptions and routing: the broker behind every connection.

Live state is in memory.  Every change a client could rely on is described as
store operations in a Plan; a Plan's in-memory effects run only after its
operations are durable, and Plans complete in the order they were committed,
so that acknowledgements go out in the order their packets arrived.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..failures import logged
from ..metrics import Metrics
from ..store.interfaces import DropSession, IStore, Message
from .interfaces import IAuthorizer, IConnection, IQueueWatcher
from .plan import Pipeline, Plan
from .router import RetainedLimits, Router
from .session import QueueLimits, Queues, Session

log = Logger()


_QUEUE_LIMITS = QueueLimits()
_RETAINED_LIMITS = RetainedLimits()


def _retained_size(message: Message) -> int:
    return len(message.topic.encode("utf-8")) + len(message.payload)


@attrs.define(eq=False, init=False)
class Broker:
    _store: IStore
    _authorizer: IAuthorizer
    _metrics: Metrics
    _clock: IReactorTime
    _pipeline: Pipeline
    _queues: Queues
    _router: Router
    _sessions: dict[str, Session] = attrs.Factory(dict)
    # client id -> clock seconds when its ban ends.
    _bans: dict[str, float] = attrs.Factory(dict)

    def __init__(
        self,
        store: IStore,
        authorizer: IAuthorizer,
        metrics: Metrics,
        clock: IReactorTime,
        max_inflight: int = 32,
        limits: QueueLimits = _QUEUE_LIMITS,
        retained_limits: RetainedLimits = _RETAINED_LIMITS,
    ) -> None:
        pipeline = Pipeline(store, clock)
        queues = Queues(pipeline, metrics, clock, max_inflight, limits)
        router = Router(metrics, retained_limits)
        self.__attrs_init__(store, authorizer, metrics, clock, pipeline, queues, router)

    @property
    def max_inflight(self) -> int:
        """How many messages may await acknowledgement on one connection."""
        return self._queues.max_inflight

    @max_inflight.setter
    def max_inflight(self, value: int) -> None:
        self._queues.max_inflight = value

    @property
    def limits(self) -> QueueLimits:
        """What one client's queue may hold."""
        return self._queues.limits

    @limits.setter
    def limits(self, value: QueueLimits) -> None:
        self._queues.limits = value

    def watch(self, watcher: IQueueWatcher) -> None:
        """Tell watcher what happens to queued messages with a notice."""
        self._queues.watcher = watcher

    # -- start -------------------------------------------------------------

    async def restore(self) -> None:
        """Load every persistent session and retained message from the store."""
        for record in await self._store.load_sessions():
            session = Session.restored(record, self._queues)
            self._register(session)
            session.handed_over()
        beyond = self._router.restore(await self._store.load_retained())
        if not beyond.empty:
            await self.commit(beyond)
        self._metrics.sessions.set(len(self._sessions))
        self._metrics.queued.set(sum(s.held for s in self._sessions.values()))
        self._metrics.queued_bytes.set(sum(s.held_bytes for s in self._sessions.values()))
        log.info(
            "Restored {sessions} sessions and {retained} retained messages",
            sessions=len(self._sessions),
            retained=self._router.retained_count,
        )

    # -- plans -------------------------------------------------------------

    def commit(self, plan: Plan) -> Deferred[None]:
        """
        Make plan's operations durable, then run its effects; plans complete
        in the order committed.  Fails when the store failed the commit.
        """
        return self._pipeline.commit(plan)

    def apply_now(self, plan: Plan) -> bool:
        """
        Apply a plan that needs no store at once, when no commit is under way
        for it to wait behind.  False when it must go through commit().
        """
        return self._pipeline.apply_now(plan)

    def barrier(self) -> Deferred[None]:
        """Fire once everything committed before now has completed."""
        return self._pipeline.barrier()

    # -- sessions ----------------------------------------------------------

    def session(self, client_id: str) -> Session | None:
        return self._sessions.get(client_id)

    def is_online(self, client_id: str) -> bool:
        session = self._sessions.get(client_id)
        return session is not None and session.connection is not None

    def oldest_queued_at(self) -> float | None:
        """
        When the oldest message still queued or in flight to any client was
        queued; None when none is.  A scan of the sessions: for scrapes.
        """
        # A queue is in the order its messages joined it: its first is its oldest.
        heads = (next(iter(s.queue.values())).queued_at for s in self._sessions.values() if s.queue)
        oldest = min(heads, default=None)
        return None if oldest is None else oldest / 1000

    def ensure_session(self, plan: Plan, client_id: str) -> Session:
        """
        The client's session, created persistent with the default
        subscriptions when it has none.
        """
        session = self._sessions.get(client_id)
        if session is None:
            session = self._new_session(client_id, persistent=True)
            plan.add(session.subscription_record())
        return session

    def _new_session(self, client_id: str, persistent: bool) -> Session:
        session = Session(client_id, persistent, self._queues)
        session.subscriptions = dict(self._authorizer.default_subscriptions(client_id))
        self._register(session)
        self._metrics.sessions.set(len(self._sessions))
        return session

    def _register(self, session: Session) -> None:
        self._router.add(session)
        self._sessions[session.client_id] = session

    def connect(self, client_id: str, clean: bool, connection: IConnection) -> tuple[Session, bool]:
        """
        Attach connection to the client's session, taking it over from any
        other connection; answer the session and whether it was present.
        Call resume() on the session once the CONNACK is out.
        """
        plan = Plan()
        old = self._sessions.get(client_id)
        if old is not None and old.connection is not None:
            old.connection.take_over()
            old.connection = None
        if old is not None and (clean or not old.persistent):
            self._discard(plan, old)
            old = None
        if clean:
            session = self._new_session(client_id, persistent=False)
        else:
            session = self.ensure_session(plan, client_id)
            if not session.has_connected:
                session.has_connected = True
                plan.add(session.subscription_record())
        session.connection = connection
        session.connected_since = self._clock.seconds()
        if plan.ops:
            self.commit(plan).addErrback(logged(log, "Saving session {id} failed", id=client_id))
        return session, old is not None

    def disconnected(self, session: Session, connection: IConnection) -> None:
        """The connection of session went away."""
        if session.connection is not connection:
            return  # Taken over already.
        session.detach()
        if not session.persistent:
            self._discard(None, session)

    def _discard(self, plan: Plan | None, session: Session) -> None:
        self._router.forget(session)
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]
        self._metrics.sessions.set(len(self._sessions))
        session.forget()
        if session.persistent and plan is not None:
            plan.add(DropSession(session.client_id))

    # -- operators ----------------------------------------------------------

    def disconnect(self, client_id: str, ban_seconds: float | None = None) -> bool:
        """
        Close the client's connection, if any.  ban_seconds, when given,
        replaces its ban: CONNECTs are refused until that many seconds from
        now (0 lifts the ban).  False when the client has no session.
        """
        session = self._sessions.get(client_id)
        if session is None:
            return False
        if ban_seconds is not None:
            now = self._clock.seconds()
            # Ended bans go whenever one is set, so the table stays small.
            self._bans = {c: end for c, end in self._bans.items() if end > now}
            if ban_seconds > 0:
                self._bans[client_id] = now + ban_seconds
            else:
                self._bans.pop(client_id, None)
        if session.connection is not None:
            session.connection.end("disconnected by an operator")
        return True

    def banned(self, client_id: str) -> bool:
        """Whether the client's CONNECTs are refused now."""
        end = self._bans.get(client_id)
        return end is not None and end > self._clock.seconds()

    def remove(self, plan: Plan, client_id: str) -> None:
        """
        Forget the client's session and its queue, now in memory and with
        plan in the store, and close its connection: the account is gone.
        """
        plan.add(DropSession(client_id))
        session = self._sessions.get(client_id)
        if session is None:
            return
        # Detached first, so that closing the connection pushes nothing.
        connection, session.connection = session.connection, None
        self._discard(None, session)
        if connection is not None:
            connection.end("the account was deleted")

    # -- retention ----------------------------------------------------------

    def expire(self, before: int) -> Deferred[tuple[int, int]]:
        """
        Drop the messages queued before ``before`` (milliseconds since the
        epoch), except those in flight on a connection, and then the sessions
        that no client ever connected to and that have nothing queued.  Fire
        with how many messages and sessions went, once that is durable.
        """
        return Deferred.fromCoroutine(self._expire(before))

    async def _expire(self, before: int) -> tuple[int, int]:
        messages = 0
        commits = []
        for session in list(self._sessions.values()):
            plan = Plan()
            messages += session.expire(plan, before)
            if not plan.empty:
                commits.append(self.commit(plan))
        # A message to an idle session may be on its way to the store: keep
        # the session unless, once all that has landed, none was planned.
        idle = [(s, s.next_seq) for s in self._sessions.values() if s.idle]
        landed = self.barrier()
        await gatherResults(commits, consumeErrors=True)
        await landed
        plan = Plan()
        removed = 0
        for session, next_seq in idle:
            if (
                self._sessions.get(session.client_id) is session
                and session.next_seq == next_seq
                and session.idle
            ):
                self._discard(plan, session)
                removed += 1
        await self.commit(plan)
        return messages, removed

    # -- subscriptions and routing -------------------------------------------

    def subscribe(self, session: Session, granted: list[tuple[str, int]]) -> Deferred[None]:
        """
        Add granted (filter, QoS) subscriptions; fire once they are durable.
        """
        self._router.subscribe(session, granted)
        return self._save_subscriptions(session)

    def unsubscribe(self, session: Session, filters: Iterable[str]) -> Deferred[None]:
        self._router.unsubscribe(session, filters)
        return self._save_subscriptions(session)

    def _save_subscriptions(self, session: Session) -> Deferred[None]:
        plan = Plan()
        if session.persistent:
            plan.add(session.subscription_record())
        return self.commit(plan)

    def deliver_retained(self, session: Session, granted: list[tuple[str, int]]) -> Deferred[None]:
        """Send the retained messages matching newly granted filters."""
        plan = Plan()
        for message in self._router.retained_for(granted):
            session.deliver(plan, message)
        return self.commit(plan)

    def route(self, plan: Plan, message: Message) -> None:
        """
        Deliver message (its QoS the publisher's) to every matching
        subscription, and keep or clear it as retained.
        """
        for client_id, copy in self._router.route(plan, message):
            self._sessions[client_id].deliver(plan, copy)

    def has_room(self, client_id: str, size: int) -> bool:
        """
        Whether client_id's queue (empty if it has no session yet) has room
        for a message of size payload bytes, counting what plans not yet
        committed have reserved.
        """
        return self._queues.has_room(self._sessions.get(client_id), size)
