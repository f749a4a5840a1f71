"""
The broker behind every connection, composed of its parts: the commit
pipeline (plan.py), the sessions with their queues (session.py), the router
(router.py) and the registry of who is connected (registry.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ..failures import logged
from ..metrics import Metrics
from ..store.interfaces import IStore, Message
from .interfaces import IAuthorizer, IBroker, IConnection, IQueueWatcher, SessionStatus
from .plan import Pipeline, Plan
from .registry import Registry
from .router import RetainedLimits, Router
from .session import QueueLimits, Queues, Session

log = Logger()

_QUEUE_LIMITS = QueueLimits()
_RETAINED_LIMITS = RetainedLimits()


@implementer(IBroker)
@attrs.define(eq=False, init=False)
class Broker:
    """
    Sessions, subscriptions and routing for the MQTT connections.

    Live state is in memory.  Every change a client could rely on is
    described as store operations in a Plan, and shows in memory only once
    those are durable, in the order plans were committed (see Pipeline).
    """

    _store: IStore
    _pipeline: Pipeline
    _queues: Queues
    _router: Router
    _registry: Registry

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
        registry = Registry(router, queues, authorizer, metrics, clock)
        self.__attrs_init__(store, pipeline, queues, router, registry)

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

    async def restore(self) -> None:
        """Load every persistent session and retained message from the store."""
        self._registry.restore(await self._store.load_sessions())
        beyond = self._router.restore(await self._store.load_retained())
        if not beyond.empty:
            await self.commit(beyond)
        log.info(
            "Restored {sessions} sessions and {retained} retained messages",
            sessions=self._registry.count,
            retained=self._router.retained_count,
        )

    # -- plans (IBroker.commit) -----------------------------------------------

    def commit(self, plan: Plan) -> Deferred[None]:
        return self._pipeline.commit(plan)

    def apply_now(self, plan: Plan) -> bool:
        """See Pipeline.apply_now."""
        return self._pipeline.apply_now(plan)

    def barrier(self) -> Deferred[None]:
        """See Pipeline.barrier."""
        return self._pipeline.barrier()

    # -- sessions (IBroker and the protocol) ----------------------------------

    def session(self, client_id: str) -> Session | None:
        return self._registry.get(client_id)

    def is_online(self, client_id: str) -> bool:
        return self._registry.is_online(client_id)

    def oldest_queued_at(self) -> float | None:
        """See Registry.oldest_queued_at."""
        return self._registry.oldest_queued_at()

    def ensure_session(self, plan: Plan, client_id: str) -> Session:
        """See Registry.ensure."""
        return self._registry.ensure(plan, client_id)

    def has_room(self, client_id: str, size: int) -> bool:
        return self._queues.has_room(self._registry.get(client_id), size)

    def enqueue(
        self,
        plan: Plan,
        client_id: str,
        message: Message,
        *,
        headroom: bool = False,
        notice: str | None = None,
    ) -> bool:
        session = self._registry.ensure(plan, client_id)
        return session.enqueue(plan, message, headroom=headroom, notice=notice)

    def status(self, client_id: str) -> SessionStatus | None:
        session = self._registry.get(client_id)
        return None if session is None else session.status()

    def connect(self, client_id: str, clean: bool, connection: IConnection) -> tuple[Session, bool]:
        """
        Registry.connect, committing what the store must keep of it.  Call
        resume() on the session once the CONNACK is out.
        """
        plan = Plan()
        session, present = self._registry.connect(plan, client_id, clean, connection)
        if plan.ops:
            self.commit(plan).addErrback(logged(log, "Saving session {id} failed", id=client_id))
        return session, present

    def disconnected(self, session: Session, connection: IConnection) -> None:
        """See Registry.disconnected."""
        self._registry.disconnected(session, connection)

    # -- operators ----------------------------------------------------------

    def disconnect(self, client_id: str) -> bool:
        return self._registry.disconnect(client_id)

    def remove(self, plan: Plan, client_id: str) -> None:
        self._registry.remove(plan, client_id)

    # -- retention ----------------------------------------------------------

    def expire(self, before: int) -> Deferred[tuple[int, int]]:
        return Deferred.fromCoroutine(self._expire(before))

    async def _expire(self, before: int) -> tuple[int, int]:
        messages = 0
        commits = []
        for session in self._registry.sessions():
            plan = Plan()
            messages += session.expire(plan, before)
            if not plan.empty:
                commits.append(self.commit(plan))
        # A message to an idle session may be on its way to the store: keep
        # the session unless, once all that has landed, none was planned.
        idle = [(s, s.next_seq) for s in self._registry.sessions() if s.idle]
        landed = self.barrier()
        await gatherResults(commits, consumeErrors=True)
        await landed
        plan = Plan()
        removed = 0
        for session, next_seq in idle:
            if (
                self._registry.get(session.client_id) is session
                and session.next_seq == next_seq
                and session.idle
            ):
                self._registry.discard(plan, session)
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
            session = self._registry.get(client_id)
            assert session is not None, "the router routes only to registered sessions"
            session.deliver(plan, copy)
