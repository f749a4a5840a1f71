"""
Sessions, subscriptions and routing: the broker behind every connection.

Live state is in memory.  Every change a client could rely on is described as
store operations in a Plan; a Plan's in-memory effects run only after its
operations are durable, and Plans complete in the order they were committed,
so that acknowledgements go out in the order their packets arrived.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import attrs
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Interface

from ..failures import logged
from ..metrics import Metrics
from ..store.interfaces import (
    AddInbound,
    Dequeue,
    DropSession,
    Enqueue,
    IStore,
    Message,
    PutSession,
    Release,
    RemoveInbound,
    SetRetained,
)
from .interfaces import IAuthorizer
from .packets import Packet, Publish, PubRel
from .plan import Pipeline, Plan
from .topics import SubscriptionTrie, topic_matches

log = Logger()


class IConnection(Interface):
    """
    What the broker needs of a client's live connection.
    """

    def send(packets: list[Packet]) -> None:
        """Write packets to the client, in order, in one write."""

    def take_over() -> None:
        """Another connection claimed this client id: close this one."""

    def end(why: str) -> None:
        """Close the connection (an operator's disconnect, a deleted account)."""


class IQueueWatcher(Interface):
    """
    Follows the queued messages that carry a notice, to push them while they
    go unacknowledged.
    """

    def queued(session: Session, out: Outgoing) -> None:
        """out, which has a notice, is now durable in session's queue."""

    def resumed(session: Session) -> None:
        """
        session's queue is handed over afresh: to a new connection, or to no
        connection after the server restored it.
        """

    def detached(session: Session) -> None:
        """session's connection ended; its queue is still there."""


@attrs.define(eq=False)
class Outgoing:
    seq: int
    message: Message
    sent: bool = False
    # PUBREC received: only PUBREL/PUBCOMP remain.
    released: bool = False
    # Milliseconds since the epoch.
    queued_at: int = 0
    # For the IQueueWatcher: what to push for it, and whether that happened.
    notice: str | None = None
    pushed: bool = False

    @property
    def packet_id(self) -> int:
        # Derived from seq so it survives a restart without being stored.
        return self.seq % 0xFFFF + 1


@attrs.define(eq=False)
class Session:
    client_id: str
    persistent: bool
    subscriptions: dict[str, int] = attrs.Factory(dict)
    # Every message not yet acknowledged, in seq order.
    queue: dict[int, Outgoing] = attrs.Factory(dict)
    # Queued messages not yet sent on the current connection, in seq order.
    unsent: deque[Outgoing] = attrs.Factory(deque)
    # packet id -> message sent and awaiting acknowledgement.
    inflight: dict[int, Outgoing] = attrs.Factory(dict)
    # Inbound QoS 2 packet ids not yet released.
    inbound: set[int] = attrs.Factory(set)
    next_seq: int = 1
    connection: IConnection | None = None
    # Messages, and their payload bytes, that the queue limits count: those
    # queued and those reserved by plans not yet committed.
    held: int = 0
    held_bytes: int = 0
    # Clock seconds when the current connection attached.
    connected_since: float | None = None
    # Whether a client ever connected to it (kept in the store).
    has_connected: bool = False
    # Queued messages that carry a notice: the user's unacknowledged messages.
    notices: int = 0
    # Dropping for a full queue since the client last connected.
    overflowing: bool = False

    def subscription_record(self) -> PutSession:
        return PutSession(
            self.client_id, tuple(sorted(self.subscriptions.items())), self.has_connected
        )


def _idle(session: Session) -> bool:
    """Never connected to and nothing queued: a session that serves nobody."""
    return not session.has_connected and not session.queue and session.connection is None


@attrs.frozen
class QueueLimits:
    """
    What one client's queue may hold: messages, and bytes of their payloads.
    Frames about the client's own actions may use a tenth more of each (at
    least one message); see Broker.queue.
    """

    messages: int = 10_000
    bytes: int = 16 * 1024 * 1024

    def admit(self, held: int, held_bytes: int, size: int, headroom: bool) -> bool:
        """
        Whether a message of size payload bytes fits in a queue that holds
        held messages of held_bytes.
        """
        messages, limit = self.messages, self.bytes
        if headroom:
            messages += max(1, messages // 10)
            limit += max(1, limit // 10)
        return held < messages and held_bytes + size <= limit


@attrs.frozen
class RetainedLimits:
    """
    How much a plain broker retains: MQTT 3.1.1 sets no bound, memory and
    the store do.
    """

    max_count: int = 10_000
    # Topic and payload bytes of every retained message together.
    max_bytes: int = 64 * 1024 * 1024


# For an application whose clients have no use for retained messages.
NOTHING_RETAINED = RetainedLimits(0, 0)


def _retained_size(message: Message) -> int:
    return len(message.topic.encode("utf-8")) + len(message.payload)


@attrs.define(eq=False)
class Broker:
    _store: IStore
    _authorizer: IAuthorizer
    _metrics: Metrics
    _clock: IReactorTime
    max_inflight: int = 32
    limits: QueueLimits = QueueLimits()
    retained_limits: RetainedLimits = RetainedLimits()
    _sessions: dict[str, Session] = attrs.Factory(dict)
    _trie: SubscriptionTrie = attrs.Factory(SubscriptionTrie)
    _retained: dict[str, Message] = attrs.Factory(dict)
    # What the retained messages will be once every commit under way has
    # landed, which is what the limits are checked against.
    _retained_sizes: dict[str, int] = attrs.Factory(dict)
    _retained_bytes: int = 0
    # Refusing retained messages at the limits since space was last freed.
    _retained_full: bool = False
    _watcher: IQueueWatcher | None = None
    # client id -> clock seconds when its ban ends.
    _bans: dict[str, float] = attrs.Factory(dict)
    _pipeline: Pipeline = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._pipeline = Pipeline(self._store, self._clock)

    def watch(self, watcher: IQueueWatcher) -> None:
        """Tell watcher what happens to queued messages with a notice."""
        self._watcher = watcher

    # -- start -------------------------------------------------------------

    async def restore(self) -> None:
        """Load every persistent session and retained message from the store."""
        for record in await self._store.load_sessions():
            session = Session(record.client_id, persistent=True, has_connected=record.has_connected)
            session.inbound = set(record.inbound)
            for filter_, qos in record.subscriptions:
                self._subscribe(session, filter_, qos)
            for queued in record.queue:
                out = Outgoing(
                    queued.seq,
                    queued.message,
                    released=queued.released,
                    queued_at=queued.queued_at,
                    notice=queued.notice,
                    pushed=queued.pushed,
                )
                session.queue[queued.seq] = out
                session.notices += out.notice is not None
                session.next_seq = queued.seq + 1
                # What is queued counts against the limits after a restart too.
                session.held += 1
                session.held_bytes += len(queued.message.payload)
            self._sessions[session.client_id] = session
            if self._watcher is not None:
                self._watcher.resumed(session)
        await self._restore_retained()
        self._metrics.sessions.set(len(self._sessions))
        self._metrics.queued.set(sum(s.held for s in self._sessions.values()))
        self._metrics.queued_bytes.set(sum(s.held_bytes for s in self._sessions.values()))
        log.info(
            "Restored {sessions} sessions and {retained} retained messages",
            sessions=len(self._sessions),
            retained=len(self._retained),
        )

    async def _restore_retained(self) -> None:
        # The limits may be lower than when the messages were retained (and
        # nothing at all for an application that keeps none): what does not
        # fit leaves the store too.
        beyond = Plan()
        for message in await self._store.load_retained():
            size = _retained_size(message)
            if self._fits(message.topic, size):
                self._retained[message.topic] = message
                self._retained_sizes[message.topic] = size
                self._retained_bytes += size
            else:
                beyond.add(SetRetained(message.topic, None))
        if beyond.empty:
            return
        await self.commit(beyond)
        removed = len(beyond.ops)
        self._metrics.dropped.labels("retained_limit").inc(removed)
        log.warn(
            "Removed {removed} stored retained messages beyond the limits"
            " ({count} messages, {bytes} bytes)",
            removed=removed,
            count=self.retained_limits.max_count,
            bytes=self.retained_limits.max_bytes,
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
            session = Session(client_id, persistent=True)
            for filter_, qos in self._authorizer.default_subscriptions(client_id):
                self._subscribe(session, filter_, qos)
            self._sessions[client_id] = session
            self._metrics.sessions.set(len(self._sessions))
            plan.add(session.subscription_record())
        return session

    def connect(self, client_id: str, clean: bool, connection: IConnection) -> tuple[Session, bool]:
        """
        Attach connection to the client's session, taking it over from any
        other connection; answer the session and whether it was present.
        Call resume() once the CONNACK is out.
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
            session = Session(client_id, persistent=False)
            for filter_, qos in self._authorizer.default_subscriptions(client_id):
                self._subscribe(session, filter_, qos)
            self._sessions[client_id] = session
            self._metrics.sessions.set(len(self._sessions))
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
        session.connection = session.connected_since = None
        if self._watcher is not None:
            self._watcher.detached(session)
        if not session.persistent:
            self._discard(None, session)

    def _discard(self, plan: Plan | None, session: Session) -> None:
        for filter_ in session.subscriptions:
            self._trie.unsubscribe(filter_, session.client_id)
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]
        self._metrics.sessions.set(len(self._sessions))
        self._metrics.queued.dec(len(session.queue))
        self._metrics.queued_bytes.dec(sum(len(o.message.payload) for o in session.queue.values()))
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
            messages += self._expire_queue(plan, session, before)
            if not plan.empty:
                commits.append(self.commit(plan))
        # A message to an idle session may be on its way to the store: keep
        # the session unless, once all that has landed, none was planned.
        idle = [(s, s.next_seq) for s in self._sessions.values() if _idle(s)]
        landed = self.barrier()
        await gatherResults(commits, consumeErrors=True)
        await landed
        plan = Plan()
        removed = 0
        for session, next_seq in idle:
            if (
                self._sessions.get(session.client_id) is session
                and session.next_seq == next_seq
                and _idle(session)
            ):
                self._discard(plan, session)
                removed += 1
        await self.commit(plan)
        return messages, removed

    def _expire_queue(self, plan: Plan, session: Session, before: int) -> int:
        live = session.connection is not None
        expired = []
        # Queued in seq order, so in time order.
        for out in session.queue.values():
            if out.queued_at >= before:
                break
            if not (live and session.inflight.get(out.packet_id) is out):
                expired.append(out)
        for out in expired:
            del session.queue[out.seq]
            session.notices -= out.notice is not None
            size = len(out.message.payload)
            self._unhold(session, size)
            self._metrics.queued_bytes.dec(size)
            if session.persistent:
                plan.add(Dequeue(session.client_id, out.seq))
        if expired and live:
            session.unsent = deque(o for o in session.unsent if o.seq in session.queue)
        self._metrics.queued.dec(len(expired))
        return len(expired)

    # -- subscriptions -----------------------------------------------------

    def _subscribe(self, session: Session, filter_: str, qos: int) -> None:
        session.subscriptions[filter_] = qos
        self._trie.subscribe(filter_, session.client_id, qos)

    def subscribe(self, session: Session, granted: list[tuple[str, int]]) -> Deferred[None]:
        """
        Add granted (filter, QoS) subscriptions; fire once they are durable.
        """
        plan = Plan()
        for filter_, qos in granted:
            self._subscribe(session, filter_, qos)
        if session.persistent:
            plan.add(session.subscription_record())
        return self.commit(plan)

    def deliver_retained(self, session: Session, granted: list[tuple[str, int]]) -> Deferred[None]:
        """Send the retained messages matching newly granted filters."""
        plan = Plan()
        for topic, retained in self._retained.items():
            qos = max((q for f, q in granted if topic_matches(f, topic)), default=None)
            if qos is not None:
                self._deliver(plan, session, attrs.evolve(retained, qos=min(qos, retained.qos)))
        return self.commit(plan)

    def unsubscribe(self, session: Session, filters: Iterable[str]) -> Deferred[None]:
        plan = Plan()
        for filter_ in filters:
            if session.subscriptions.pop(filter_, None) is not None:
                self._trie.unsubscribe(filter_, session.client_id)
        if session.persistent:
            plan.add(session.subscription_record())
        return self.commit(plan)

    # -- routing -----------------------------------------------------------

    def route(self, plan: Plan, message: Message) -> None:
        """
        Deliver message (its QoS the publisher's) to every matching
        subscription, and keep or clear it as retained.
        """
        if message.retain:
            self._retain(plan, message)
            message = attrs.evolve(message, retain=False)
        # One copy per delivered QoS, shared by every subscriber at that QoS.
        copies = {message.qos: message}
        for client_id, granted in self._trie.match(message.topic).items():
            qos = min(granted, message.qos)
            copy = copies.get(qos)
            if copy is None:
                copy = copies[qos] = attrs.evolve(message, qos=qos)
            self._deliver(plan, self._sessions[client_id], copy)

    def _retain(self, plan: Plan, message: Message) -> None:
        """Keep message as its topic's retained message, or clear it, within the limits."""
        topic = message.topic
        if not message.payload:
            if topic in self._retained_sizes:
                self._retained_full = False  # Space freed: a new episode may start.
            self._unretain(plan, topic)
            return
        size = _retained_size(message)
        if self._fits(topic, size):
            self._retained_bytes += size - self._retained_sizes.get(topic, 0)
            self._retained_sizes[topic] = size
            plan.add(
                SetRetained(topic, message), lambda _: self._retained.__setitem__(topic, message)
            )
            return
        self._metrics.dropped.labels("retained_limit").inc()
        if not self._retained_full:
            # Once per episode: a client at the limits may keep trying.
            self._retained_full = True
            log.warn(
                "Retained messages at their limits ({count} messages, {bytes} bytes);"
                " further retained publishes are delivered but not retained",
                count=self.retained_limits.max_count,
                bytes=self.retained_limits.max_bytes,
            )
        if topic in self._retained_sizes:
            # The message it could not keep still supersedes the old one.
            self._unretain(plan, topic)

    def _unretain(self, plan: Plan, topic: str) -> None:
        self._retained_bytes -= self._retained_sizes.pop(topic, 0)
        plan.add(SetRetained(topic, None), lambda _: self._retained.pop(topic, None))

    def _fits(self, topic: str, size: int) -> bool:
        """Whether topic's retained message may be one of size bytes."""
        old = self._retained_sizes.get(topic)
        count = len(self._retained_sizes) + (old is None)
        limits = self.retained_limits
        return count <= limits.max_count and (
            self._retained_bytes - (old or 0) + size <= limits.max_bytes
        )

    def _deliver(self, plan: Plan, session: Session, message: Message) -> None:
        if message.qos == 0:
            plan.add(None, lambda _: self._send_at_most_once(session, message))
        else:
            self.queue(plan, session, message)

    def _send_at_most_once(self, session: Session, message: Message) -> None:
        if session.connection is None:
            self._metrics.dropped.labels("qos0_offline").inc()
            return
        session.connection.send([Publish(message.topic, message.payload, 0, message.retain)])

    def has_room(self, client_id: str, size: int) -> bool:
        """
        Whether client_id's queue (empty if it has no session yet) has room
        for a message of size payload bytes, counting what plans not yet
        committed have reserved.
        """
        session = self._sessions.get(client_id)
        held, held_bytes = (0, 0) if session is None else (session.held, session.held_bytes)
        return self.limits.admit(held, held_bytes, size, headroom=False)

    def queue(
        self,
        plan: Plan,
        session: Session,
        message: Message,
        *,
        headroom: bool = False,
        notice: str | None = None,
    ) -> bool:
        """
        Queue message (QoS 1 or 2) for session once plan is durable, reserving
        its room now so that no later plan can take it.  Without room the
        message is dropped, counted, and False answered: never what is queued
        already, which may have been promised to someone.  headroom lets the
        queue exceed its limits by a tenth, for frames about the client's own
        actions.  A notice goes with the message, for the IQueueWatcher.
        """
        size = len(message.payload)
        if not self.limits.admit(session.held, session.held_bytes, size, headroom):
            plan.add(None, lambda _: self._overflowed(session))
            return False
        session.held += 1
        session.held_bytes += size
        plan.on_abandon(lambda: self._unhold(session, size))
        seq = session.next_seq
        session.next_seq += 1
        at = int(self._clock.seconds() * 1000)
        op = Enqueue(session.client_id, seq, message, at, notice) if session.persistent else None
        out = Outgoing(seq, message, queued_at=at, notice=notice)
        plan.add(op, lambda _: self._enqueue(session, out))
        return True

    def _unhold(self, session: Session, size: int) -> None:
        session.held -= 1
        session.held_bytes -= size

    def _overflowed(self, session: Session) -> None:
        self._metrics.dropped.labels("queue_full").inc()
        if not session.overflowing:
            # Once per episode: a full queue drops at every new message.
            session.overflowing = True
            log.warn(
                "Queue of {client} is full; dropping new messages to it",
                client=session.client_id,
            )

    def _enqueue(self, session: Session, out: Outgoing) -> None:
        if self._sessions.get(session.client_id) is not session:
            return  # Discarded while the commit was under way.
        session.queue[out.seq] = out
        session.unsent.append(out)
        session.notices += out.notice is not None
        self._metrics.queued.inc()
        self._metrics.queued_bytes.inc(len(out.message.payload))
        if out.notice is not None and self._watcher is not None:
            self._watcher.queued(session, out)
        self._pump(session)

    # -- the outbound window ----------------------------------------------

    def resume(self, session: Session) -> None:
        """
        A connection attached: resend what is unacknowledged, in order, then
        continue with the queue.
        """
        session.inflight.clear()
        session.unsent = deque(session.queue.values())
        session.overflowing = False
        self._pump(session)
        if self._watcher is not None:
            self._watcher.resumed(session)

    def _pump(self, session: Session) -> None:
        connection = session.connection
        if connection is None:
            return
        packets: list[Packet] = []
        while session.unsent and len(session.inflight) < self.max_inflight:
            out = session.unsent[0]
            if out.packet_id in session.inflight:
                break  # Wrapped around onto a message still unacknowledged.
            session.unsent.popleft()
            session.inflight[out.packet_id] = out
            m = out.message
            if out.released:
                packets.append(PubRel(out.packet_id))
            else:
                packets.append(
                    Publish(m.topic, m.payload, m.qos, m.retain, out.sent, out.packet_id)
                )
            out.sent = True
        if packets:
            connection.send(packets)

    def acknowledged(self, session: Session, packet_id: int, qos: int) -> None:
        """
        PUBACK (qos 1) or PUBCOMP (qos 2) for packet_id: the message is done.
        """
        out = session.inflight.get(packet_id)
        if out is None or out.message.qos != qos or (qos == 2 and not out.released):
            log.debug("Ignoring acknowledgement of unknown packet {pid}", pid=packet_id)
            return
        del session.inflight[packet_id]
        del session.queue[out.seq]
        size = len(out.message.payload)
        self._unhold(session, size)
        session.notices -= out.notice is not None
        self._metrics.queued.dec()
        self._metrics.queued_bytes.dec(size)
        if session.persistent:
            self._pipeline.later(Dequeue(session.client_id, out.seq))
        self._pump(session)

    def received(self, session: Session, packet_id: int) -> Deferred[bool]:
        """
        PUBREC for packet_id: fire with True once the release is durable and
        PUBREL may go out, False for an unknown packet id.
        """
        out = session.inflight.get(packet_id)
        if out is None or out.message.qos != 2:
            return succeed(False)
        plan = Plan()

        def release(_: object) -> None:
            out.released = True

        plan.add(Release(session.client_id, out.seq) if session.persistent else None, release)
        return self.commit(plan).addCallback(lambda _: True)

    # -- inbound QoS 2 ------------------------------------------------------

    def hold_inbound(self, plan: Plan, session: Session, packet_id: int) -> None:
        """Remember an inbound QoS 2 packet id with the publish it carries."""
        session.inbound.add(packet_id)
        if session.persistent:
            plan.add(AddInbound(session.client_id, packet_id))

    def release_inbound(self, session: Session, packet_id: int) -> None:
        if packet_id in session.inbound:
            session.inbound.discard(packet_id)
            if session.persistent:
                self._pipeline.later(RemoveInbound(session.client_id, packet_id))
