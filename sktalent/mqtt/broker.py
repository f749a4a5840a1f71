"""
The broker behind every connection, composed of its parts: the commit
pipeline (plan.py), the sessions with their windows (session.py), the router
(router.py) and the registry of who is connected (registry.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import NoReturn

import attrs
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..failures import logged
from ..metrics import Metrics
from ..store.interfaces import (
    NO_ROOM,
    Attach,
    Detach,
    DiscardSession,
    DropSession,
    Enqueue,
    IStore,
    Message,
    PendingPush,
    PutSession,
    Queued,
    StoreUnavailable,
)
from .batch import Batch
from .interfaces import (
    IAuthorizer,
    IBroker,
    IConnection,
    IQueueWatcher,
    ISessionGate,
    ServiceUnavailable,
    SessionStatus,
    Ticket,
)
from .plan import Pipeline, Plan
from .registry import Registry
from .router import RetainedLimits, Router
from .session import Outgoing, QueueLimits, Queues, Session

log = Logger()

_QUEUE_LIMITS = QueueLimits()
_RETAINED_LIMITS = RetainedLimits()
# Pushes still owed read from the store at a time.
PUSH_PAGE = 500
# Clients whose full queue was logged, remembered so it is logged once an episode.
_OVERFLOWING = 1000


@implementer(ISessionGate)
class LocalGate:
    """The gate of a broker that is the only process on its store: always open."""

    def before_open(self, client_id: str) -> Deferred[None]:
        return succeed(None)

    def opened(self, client_id: str) -> None:
        pass

    def closed(self, client_id: str) -> None:
        pass

    def queued_elsewhere(self, client_id: str, out: Outgoing | None = None) -> None:
        pass  # No other process can hold it.


class OpenFailed(Exception):
    """A session could not be opened in time: the store or the gate did not answer."""

    def __init__(self, message: str, reason: str = "store_unavailable") -> None:
        super().__init__(message)
        # The label of sktalent_auth_failures_total for the refused CONNECT.
        self.reason = reason


@attrs.define(eq=False)
class _Landed:
    """
    The effect of a message's Enqueue: an object rather than a closure, which
    would cost a function and a cell per variable for each message in flight,
    all traversed by every young collection until its commit lands.
    """

    _broker: Broker
    _op: Enqueue
    _ticket: Ticket

    def __call__(self, result: object) -> None:
        self._broker._landed(self._op, self._ticket, result)


@implementer(IBroker)
@attrs.define(eq=False, init=False)
class Broker:
    """
    Sessions, subscriptions and routing for the MQTT connections.

    The store is the truth: memory holds the sessions of connected clients,
    each with a window and a page of its queue.  A CONNECT opens its session
    from the store (open()) and the session leaves memory when its
    connection ends; a message for anyone is an Enqueue, whose seq and room
    the store decides, taken in straight away by a session in memory here.
    Every change a client could rely on is described as store operations in
    a Plan, and shows in memory only once those are durable, in the order
    plans were committed (see Pipeline).

    ``route_offline``: publishes reach stored persistent sessions that are
    not in memory (a plain MQTT broker routes by topic); an application
    that addresses clients by id does not need their subscriptions in
    memory.  ``clean_in_memory``: a clean session's queue is in memory only
    (MQTT lets its state end with the connection); otherwise it is stored
    like any other, and what it held unacknowledged is pushed when it is
    discarded.
    """

    _store: IStore
    # Shared by every connection (protocol.py) and the commit pipeline.
    batch: Batch
    _pipeline: Pipeline
    _queues: Queues
    _router: Router
    _registry: Registry
    _authorizer: IAuthorizer
    _metrics: Metrics
    _clock: IReactorTime
    clean_in_memory: bool
    gate: ISessionGate
    # Seconds a CONNECT may wait for its session: past it, CONNACK 3.
    open_timeout: float
    _overflowing: OrderedDict[str, None]
    # Sessions opened whose Attach is being committed: they are sent
    # nothing before it is durable (fires True), or end (False).
    _attaching: dict[Session, Deferred[bool]]

    def __init__(
        self,
        store: IStore,
        authorizer: IAuthorizer,
        metrics: Metrics,
        clock: IReactorTime,
        max_inflight: int = 32,
        limits: QueueLimits = _QUEUE_LIMITS,
        retained_limits: RetainedLimits = _RETAINED_LIMITS,
        *,
        route_offline: bool = True,
        clean_in_memory: bool = True,
        gate: ISessionGate | None = None,
        open_timeout: float = 5.0,
    ) -> None:
        batch = Batch(metrics.messages_in.labels("mqtt_publish"))
        pipeline = Pipeline(store, clock, batch)
        queues = Queues(pipeline, store, metrics, clock, max_inflight, limits)
        router = Router(metrics, retained_limits)
        registry = Registry(router, route_offline)
        self.__attrs_init__(
            store,
            batch,
            pipeline,
            queues,
            router,
            registry,
            authorizer,
            metrics,
            clock,
            clean_in_memory,
            LocalGate() if gate is None else gate,
            open_timeout,
            OrderedDict(),
            {},
        )

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

    async def start(self) -> None:
        """
        Load what routing needs before clients connect: the retained
        messages (within their limits) and, with route_offline, the
        subscriptions of the stored persistent sessions.  No session is
        loaded: its client's CONNECT opens it.
        """
        if self._registry.route_offline:
            for client_id, subscriptions in await self._store.load_subscriptions():
                self._registry.stand(client_id, dict(subscriptions))
        beyond = self._router.restore(await self._store.load_retained())
        if not beyond.empty:
            await self.commit(beyond)
        log.info(
            "Restored {retained} retained messages",
            retained=self._router.retained_count,
        )

    # -- plans (IBroker.commit) -----------------------------------------------

    def commit(self, plan: Plan) -> Deferred[None]:
        return self._pipeline.commit(plan)

    def commit_batched(self, plan: Plan) -> Deferred[None]:
        """commit(), plan's operations submitted with the batch's others (Pipeline.commit)."""
        return self._pipeline.commit(plan, batched=True)

    def apply_now(self, plan: Plan) -> bool:
        """See Pipeline.apply_now."""
        return self._pipeline.apply_now(plan)

    def barrier(self, client_id: str | None = None) -> Deferred[None]:
        return self._pipeline.barrier(client_id)

    def flush_later(self) -> None:
        """Commit, without waiting, what Pipeline.later holds back."""
        self._pipeline.flush_loose()

    # -- sessions (IBroker and the protocol) ----------------------------------

    def session(self, client_id: str) -> Session | None:
        return self._registry.get(client_id)

    def is_online(self, client_id: str) -> bool:
        return self._registry.is_online(client_id)

    def open(
        self, client_id: str, clean: bool, connection: IConnection
    ) -> Deferred[tuple[Session, bool]]:
        """
        Give connection the client's session, taking it over from another
        connection here, or reading it from the store (after the gate
        opened); fire with the session and whether one was present.  Call
        resume() on the session once the CONNACK is out.  Fails with
        OpenFailed when that takes longer than open_timeout.
        """
        opening = self._registry.serial(client_id, lambda: self._open(client_id, clean, connection))

        def unavailable(failure: Failure) -> NoReturn:
            failure.trap(TimeoutError, StoreUnavailable, ServiceUnavailable)
            raise OpenFailed(
                f"the session of {client_id} could not be opened: {failure.value}",
                "cluster_unavailable" if failure.check(ServiceUnavailable) else "store_unavailable",
            )

        return opening.addTimeout(self.open_timeout, self._clock).addErrback(unavailable)

    async def _open(
        self, client_id: str, clean: bool, connection: IConnection
    ) -> tuple[Session, bool]:
        await self.gate.before_open(client_id)
        old = self._registry.get(client_id)
        if old is not None:
            if old.connection is not None:
                old.connection.take_over()
                old.detach()
            if old.persistent and not clean:
                old.attach(connection)
                self.gate.opened(client_id)
                return old, True
            self._registry.unload(old)
        defaults = dict(self._authorizer.default_subscriptions(client_id))
        if clean and self.clean_in_memory:
            await self._discard(client_id)
            session = Session(client_id, False, False, self._queues, defaults)
            self._registry.register(session)
            session.attach(connection)
            self.gate.opened(client_id)
            return session, False
        if clean:
            through = await self._discard(client_id)
            session = Session.opened(client_id, None, self._queues, defaults, clean=True)
            # What was queued since the discard was decided is the new session's.
            session.cursor = through
            present = False
        else:
            await self.barrier(client_id)
            record = await self._store.open_session(client_id, self._queues.page)
            if record is not None and record.clean:
                # Left over by a process that died: its clean session ended then.
                await self._discard(client_id)
                record = await self._store.open_session(client_id, self._queues.page)
            session = Session.opened(client_id, record, self._queues, defaults, clean=False)
            # A discarded session leaves a husk that only keeps its seq counter.
            present = record is not None and bool(
                record.has_connected or record.queue or record.subscriptions
            )
        plan = Plan()
        plan.add(Attach(client_id, tuple(sorted(session.subscriptions.items())), clean))
        self._registry.register(session)
        session.attach(connection)
        # Not waited for here: the CONNACK does not queue behind every
        # commit under way, only what the session sends does (resume()).
        self._attaching[session] = self.commit(plan).addCallbacks(
            lambda _: True, self._not_attached, errbackArgs=(client_id,)
        )
        self.gate.opened(client_id)
        return session, present

    @staticmethod
    def _not_attached(failure: Failure, client_id: str) -> bool:
        log.failure("Saving the session of {client} failed", failure, client=client_id)
        return False

    async def _discard(self, client_id: str) -> int:
        """
        Discard client_id's stored session, pushing first what it held
        unacknowledged and never pushed; answer the highest seq discarded.
        """
        self._registry.drop_standing(client_id)
        await self.barrier(client_id)
        summary = await self._store.session_summary(client_id)
        if summary is None:
            return 0
        unpushed: list[PendingPush] = []
        watcher = self._queues.watcher
        while watcher is not None:
            after = (client_id, unpushed[-1].seq) if unpushed else None
            page = await self._store.pending_pushes(after, PUSH_PAGE, client_id)
            unpushed += [p for p in page if p.seq <= summary.last_seq]
            if len(page) < PUSH_PAGE or page[-1].seq > summary.last_seq:
                break
        plan = Plan()
        # What was held is pushed once it is gone from the store; the
        # next session needs only the seq (later commits follow this one).
        plan.add(DiscardSession(client_id, summary.last_seq))
        if watcher is not None and unpushed:
            plan.add(None, lambda _: watcher.discarded(client_id, unpushed))
        self.commit(plan).addErrback(
            logged(log, "Discarding the session of {client} failed", client=client_id)
        )
        return summary.last_seq

    def disconnected(self, session: Session, connection: IConnection) -> None:
        """The connection of session went away: the session leaves memory."""
        if session.connection is not connection:
            return  # Taken over already.
        if self._leave(session):
            client_id = session.client_id
            self._registry.serial(client_id, lambda: self._discard(client_id)).addErrback(
                logged(log, "Discarding the clean session of {client} failed", client=client_id)
            )

    def _leave(self, session: Session, taken: bool = False) -> bool:
        """
        session's connection is gone: the session leaves memory.  True when
        it is a clean session the store holds, to be discarded now.  taken:
        another process serves the client now, so what it left
        unacknowledged is that process's to deliver, not pushed from here.
        """
        session.detach()
        client_id = session.client_id
        self._attaching.pop(session, None)
        self._registry.unload(session)
        self.gate.closed(client_id)
        if session.persistent:
            self._pipeline.later(Detach(client_id, session.sent_through))
            if self._queues.watcher is not None and not taken:
                self._queues.watcher.detached(client_id)
            return False
        return session.stored

    def release(self, client_id: str) -> Deferred[None]:
        return self._registry.serial(client_id, lambda: self._release(client_id))

    async def _release(self, client_id: str) -> None:
        session = self._registry.get(client_id)
        if session is not None and session.connection is not None:
            session.connection.take_over()
            if self._leave(session, taken=True):
                await self._discard(client_id)
        await self.barrier(client_id)

    def status(self, client_id: str) -> Deferred[SessionStatus | None]:
        return Deferred.fromCoroutine(self._status(client_id))

    async def _status(self, client_id: str) -> SessionStatus | None:
        await self.barrier(client_id)
        summary = await self._store.session_summary(client_id)
        # As it is now, not as it was before the store answered.
        session = self._registry.get(client_id)
        if summary is None and session is None:
            return None
        online = session is not None and session.connection is not None
        since = None if session is None else session.connected_since
        if summary is not None:
            return SessionStatus(online, since, summary.queued, summary.oldest_queued_at)
        assert session is not None
        queued = session.taken()
        oldest = min((o.queued_at for o in queued), default=None)
        return SessionStatus(online, since, len(queued), oldest)

    def enqueue(
        self,
        plan: Plan,
        client_id: str,
        message: Message,
        *,
        headroom: bool = False,
        notice: str | None = None,
        required: bool = False,
    ) -> Ticket:
        ticket = Ticket()
        session = self._registry.get(client_id)
        if session is not None and not session.stored:
            ticket.full = not session.enqueue_local(plan, message, headroom)
            return ticket
        at = int(self._clock.seconds() * 1000)
        room = self._queues.limits.room(headroom)
        op = Enqueue(client_id, message, at, notice, room, required)
        plan.add(op, _Landed(self, op, ticket))
        return ticket

    def _landed(self, op: Enqueue, ticket: Ticket, result: Queued | object) -> None:
        """op is durable (or refused): tell its ticket, and send the message on."""
        client_id = op.client_id
        if result is NO_ROOM:
            ticket.full = True
            if not op.required:
                self._overflowed(client_id)
            return
        if not isinstance(result, Queued):
            # Committed by an earlier attempt whose answer was lost.
            self.wake(client_id)
            if self._registry.get(client_id) is None:
                self.gate.queued_elsewhere(client_id)
            return
        ticket.seq = result.seq
        session = self._registry.get(client_id)
        out = Outgoing(result.seq, op.message, queued_at=op.queued_at, notice=op.notice)
        if session is not None:
            session.arrived(out)
        else:
            self.gate.queued_elsewhere(client_id, out)
        watcher = self._queues.watcher
        if op.notice is not None and watcher is not None:
            connection = None if session is None else session.connection
            watcher.queued(client_id, result.seq, op.notice, result.notices, connection)

    def _overflowed(self, client_id: str) -> None:
        self._metrics.dropped.labels("queue_full").inc()
        if client_id in self._overflowing:
            return
        # Once per episode: a full queue drops at every new message.
        self._overflowing[client_id] = None
        if len(self._overflowing) > _OVERFLOWING:
            self._overflowing.popitem(last=False)
        log.warn("Queue of {client} is full; dropping new messages to it", client=client_id)

    def wake(self, client_id: str) -> None:
        session = self._registry.get(client_id)
        if session is not None and session.stored:
            session.wake()

    def arrived(self, client_id: str, outs: Sequence[Outgoing]) -> None:
        """
        outs were committed to client_id's queue by another process, which
        sent them along: taken in without reading them from the store where
        they follow what was taken in, else read.
        """
        session = self._registry.get(client_id)
        if session is not None and session.stored:
            for out in outs:
                session.arrived(out)

    def resume(self, session: Session) -> None:
        """
        The CONNACK is out: session's client may be sent its queue, once
        its Attach is durable (so that a crash before cannot leave the
        store saying less was sent than was).
        """
        self._overflowing.pop(session.client_id, None)
        attaching = self._attaching.pop(session, None)
        if attaching is None:
            session.resume()
            return
        connection = session.connection

        def attached(ok: bool) -> None:
            if session.connection is not connection or connection is None:
                return  # Gone meanwhile, or taken over.
            if ok:
                session.resume()
            else:
                connection.end("its session could not be saved")

        attaching.addCallback(attached)

    def connected(self) -> list[tuple[str, float]]:
        """(client id, clock seconds when it attached) of every live connection."""
        return [
            (s.client_id, s.connected_since)
            for s in self._registry.sessions()
            if s.connected_since is not None
        ]

    # -- operators ----------------------------------------------------------

    def disconnect(self, client_id: str) -> None:
        session = self._registry.get(client_id)
        if session is not None and session.connection is not None:
            session.connection.end("disconnected by an operator")

    def remove(self, plan: Plan, client_id: str) -> None:
        plan.add(DropSession(client_id))
        session = self._registry.get(client_id)
        connection = None if session is None else session.connection
        if session is not None:
            # Detached first, so that closing the connection pushes nothing.
            session.detach()
            self._registry.unload(session)
            self.gate.closed(client_id)
        self._registry.drop_standing(client_id)
        if connection is not None:
            connection.end("the account was deleted")

    # -- retention ----------------------------------------------------------

    def expire(self, before: int) -> Deferred[tuple[int, int]]:
        return Deferred.fromCoroutine(self._expire(before))

    async def _expire(self, before: int) -> tuple[int, int]:
        local = 0
        keep: set[tuple[str, int]] = set()
        for session in self._registry.sessions():
            local += session.expire(before)
            if session.stored:
                keep.update((session.client_id, o.seq) for o in (session.inflight or {}).values())
        await self.barrier()
        messages, sessions = await self._store.expire(before, keep)
        return messages + local, sessions

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
            subscriptions = tuple(sorted(session.subscriptions.items()))
            plan.add(PutSession(session.client_id, subscriptions))
        return self.commit(plan)

    def deliver_retained(self, session: Session, granted: list[tuple[str, int]]) -> Deferred[None]:
        """Send the retained messages matching newly granted filters."""
        plan = Plan()
        for message in self._router.retained_for(granted):
            self._deliver(plan, session.client_id, message)
        return self.commit(plan)

    def route(self, plan: Plan, message: Message) -> None:
        """
        Deliver message (its QoS the publisher's) to every matching
        subscription, and keep or clear it as retained.
        """
        for client_id, copy in self._router.route(plan, message):
            self._deliver(plan, client_id, copy)

    def _deliver(self, plan: Plan, client_id: str, message: Message) -> None:
        session = self._registry.get(client_id)
        if message.qos == 0:
            if session is None:
                plan.add(None, lambda _: self._metrics.dropped.labels("qos0_offline").inc())
            else:
                plan.add(None, lambda _: session.send_now(message))
        else:
            self.enqueue(plan, client_id, message)
