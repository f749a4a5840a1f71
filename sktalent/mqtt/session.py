"""
One client's session: what is queued for it, the window of what is in flight
on its connection, and the inbound QoS 2 packet ids it has not released.
"""

from __future__ import annotations

from collections import deque

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..metrics import Metrics
from ..store.interfaces import (
    AddInbound,
    Dequeue,
    Enqueue,
    Message,
    PutSession,
    Release,
    RemoveInbound,
    SessionRecord,
)
from .interfaces import IConnection, IQueueWatcher, SessionStatus
from .packets import Packet, Publish, PubRel
from .plan import Pipeline, Plan

log = Logger()


@attrs.frozen
class QueueLimits:
    """
    What one client's queue may hold: messages, and bytes of their payloads.
    Frames about the client's own actions may use a tenth more of each (at
    least one message); see IBroker.enqueue.
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


@attrs.define(eq=False)
class Outgoing:
    """A message in a session's queue, from queued until acknowledged."""

    seq: int
    message: Message
    sent: bool = False
    # PUBREC received: only PUBREL/PUBCOMP remain.
    released: bool = False
    # Milliseconds since the epoch.
    queued_at: int = 0
    # For the IQueueWatcher: what to push for it, and whether its push was
    # decided (the store's flag says whether it was settled).
    notice: str | None = None
    pushed: bool = False

    @property
    def packet_id(self) -> int:
        # Derived from seq so it survives a restart without being stored.
        return self.seq % 0xFFFF + 1


@attrs.define(eq=False)
class Queues:
    """
    What every session's queue shares: its limits, the size of the in-flight
    window, the metrics, who watches the messages with a notice, and the
    pipeline that makes changes durable.
    """

    pipeline: Pipeline
    metrics: Metrics
    clock: IReactorTime
    max_inflight: int = 32
    limits: QueueLimits = QueueLimits()
    watcher: IQueueWatcher | None = None

    def has_room(self, session: Session | None, size: int) -> bool:
        """See IBroker.has_room; None stands for a session not made yet."""
        held, held_bytes = (0, 0) if session is None else (session.held, session.held_bytes)
        return self.limits.admit(held, held_bytes, size, headroom=False)


@attrs.define(eq=False, weakref_slot=False)
class Session:
    """
    One client's session.

    Invariants:

    - ``queue`` holds every message queued and not yet acknowledged, by seq
      and in seq order (which is the order they were queued in); ``next_seq``
      is above every seq used.
    - While a connection is attached, each queued message is either in
      ``unsent`` (in seq order) or in ``inflight`` (sent and awaiting its
      acknowledgement), never both; ``inflight`` holds at most
      ``max_inflight`` messages, under distinct packet ids.
    - ``held`` and ``held_bytes`` count the queue and what plans not yet
      committed have reserved in it: the limits are checked against them, so
      plans under way together cannot overfill it.
    - ``notices`` is the number of queued messages that carry a notice.
    - A persistent session puts every change to its subscriptions, queue and
      inbound ids in the store, in the plan whose effect makes the change in
      memory (bookkeeping nobody waits for goes in Pipeline.later); a clean
      session never touches the store.
    - ``connection`` and ``connected_since`` are set exactly while a
      connection is attached.  Once ``discarded`` (the registry forgot it),
      nothing more is queued in it.
    """

    client_id: str
    persistent: bool
    _queues: Queues = attrs.field(repr=False)
    subscriptions: dict[str, int] = attrs.Factory(dict)
    queue: dict[int, Outgoing] = attrs.Factory(dict)
    # Queued messages not yet sent on the current connection, in seq order;
    # made when first needed (an empty deque takes 760 bytes, a quarter of
    # an idle connection).
    unsent: deque[Outgoing] | None = None
    # packet id -> message sent and awaiting acknowledgement; made when first needed.
    inflight: dict[int, Outgoing] | None = None
    # Inbound QoS 2 packet ids not yet released (frozen and shared while none are).
    inbound: set[int] | frozenset[int] = frozenset()
    next_seq: int = 1
    connection: IConnection | None = None
    held: int = 0
    held_bytes: int = 0
    # Clock seconds when the current connection attached.
    connected_since: float | None = None
    # Whether a client ever connected to it (kept in the store).
    has_connected: bool = False
    notices: int = 0
    # Dropping for a full queue since the client last connected.
    overflowing: bool = False
    discarded: bool = False

    @classmethod
    def restored(cls, record: SessionRecord, queues: Queues) -> Session:
        """The persistent session record describes, as the store kept it."""
        session = cls(record.client_id, True, queues, has_connected=record.has_connected)
        session.subscriptions = dict(record.subscriptions)
        if record.inbound:
            session.inbound = set(record.inbound)
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
        return session

    def subscription_record(self) -> PutSession:
        return PutSession(
            self.client_id, tuple(sorted(self.subscriptions.items())), self.has_connected
        )

    @property
    def idle(self) -> bool:
        """Never connected to and nothing queued: a session that serves nobody."""
        return not self.has_connected and not self.queue and self.connection is None

    @property
    def oldest_queued_at(self) -> int | None:
        """When its oldest queued message was queued, in milliseconds since the epoch."""
        # The queue is in the order its messages joined it: its first is its oldest.
        oldest = next(iter(self.queue.values()), None)
        return None if oldest is None else oldest.queued_at

    def status(self) -> SessionStatus:
        return SessionStatus(
            online=self.connection is not None,
            connected_since=self.connected_since,
            queued=len(self.queue),
            oldest_queued_at=self.oldest_queued_at,
        )

    # -- connections --------------------------------------------------------

    def resume(self) -> None:
        """
        A connection attached: resend what is unacknowledged, in order, then
        continue with the queue.
        """
        self.inflight = None
        self.unsent = deque(self.queue.values()) if self.queue else None
        self.overflowing = False
        self._pump()
        self.handed_over()

    def handed_over(self) -> None:
        """Tell the watcher the queue is handed over afresh."""
        if self._queues.watcher is not None:
            self._queues.watcher.resumed(self)

    def detach(self) -> None:
        """The connection went away; the queue stays."""
        self.connection = self.connected_since = None
        if self._queues.watcher is not None:
            self._queues.watcher.detached(self)

    def forget(self) -> None:
        """The registry forgot this session: its queue is no longer counted."""
        self.discarded = True
        metrics = self._queues.metrics
        metrics.queued.dec(len(self.queue))
        metrics.queued_bytes.dec(sum(len(o.message.payload) for o in self.queue.values()))

    # -- queueing -----------------------------------------------------------

    def deliver(self, plan: Plan, message: Message) -> None:
        """Send message (QoS 0) or queue it, once plan is durable."""
        if message.qos == 0:
            plan.add(None, lambda _: self._send_at_most_once(message))
        else:
            self.enqueue(plan, message)

    def _send_at_most_once(self, message: Message) -> None:
        if self.connection is None:
            self._queues.metrics.dropped.labels("qos0_offline").inc()
            return
        self.connection.send([Publish(message.topic, message.payload, 0, message.retain)])

    def enqueue(
        self,
        plan: Plan,
        message: Message,
        *,
        headroom: bool = False,
        notice: str | None = None,
    ) -> bool:
        """Queue message once plan is durable, as IBroker.enqueue says."""
        size = len(message.payload)
        if not self._queues.limits.admit(self.held, self.held_bytes, size, headroom):
            plan.add(None, lambda _: self._overflowed())
            return False
        self.held += 1
        self.held_bytes += size
        plan.on_abandon(lambda: self._unhold(size))
        seq = self.next_seq
        self.next_seq += 1
        at = int(self._queues.clock.seconds() * 1000)
        op = Enqueue(self.client_id, seq, message, at, notice) if self.persistent else None
        out = Outgoing(seq, message, queued_at=at, notice=notice)
        plan.add(op, lambda _: self._enqueued(out))
        return True

    def _unhold(self, size: int) -> None:
        self.held -= 1
        self.held_bytes -= size

    def _overflowed(self) -> None:
        self._queues.metrics.dropped.labels("queue_full").inc()
        if not self.overflowing:
            # Once per episode: a full queue drops at every new message.
            self.overflowing = True
            log.warn(
                "Queue of {client} is full; dropping new messages to it", client=self.client_id
            )

    def _enqueued(self, out: Outgoing) -> None:
        if self.discarded:
            return  # Discarded while the commit was under way.
        self.queue[out.seq] = out
        if self.unsent is None:
            self.unsent = deque()
        self.unsent.append(out)
        self.notices += out.notice is not None
        metrics = self._queues.metrics
        metrics.queued.inc()
        metrics.queued_bytes.inc(len(out.message.payload))
        if out.notice is not None and self._queues.watcher is not None:
            self._queues.watcher.queued(self, out)
        self._pump()

    def expire(self, plan: Plan, before: int) -> int:
        """
        Drop the messages queued before ``before`` (milliseconds since the
        epoch), except those in flight on a live connection; answer how many.
        """
        live = self.connection is not None
        expired = []
        # Queued in seq order, so in time order.
        for out in self.queue.values():
            if out.queued_at >= before:
                break
            if not (live and (self.inflight or {}).get(out.packet_id) is out):
                expired.append(out)
        metrics = self._queues.metrics
        for out in expired:
            del self.queue[out.seq]
            self.notices -= out.notice is not None
            size = len(out.message.payload)
            self._unhold(size)
            metrics.queued_bytes.dec(size)
            if self.persistent:
                plan.add(Dequeue(self.client_id, out.seq))
        if expired and live:
            self.unsent = deque(o for o in self.unsent or () if o.seq in self.queue)
        metrics.queued.dec(len(expired))
        return len(expired)

    # -- the outbound window ------------------------------------------------

    def _pump(self) -> None:
        connection = self.connection
        if connection is None or not self.unsent:
            return
        if self.inflight is None:
            self.inflight = {}
        inflight = self.inflight
        packets: list[Packet] = []
        while self.unsent and len(inflight) < self._queues.max_inflight:
            out = self.unsent[0]
            if out.packet_id in inflight:
                break  # Wrapped around onto a message still unacknowledged.
            self.unsent.popleft()
            inflight[out.packet_id] = out
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

    def acknowledged(self, packet_id: int, qos: int) -> None:
        """
        PUBACK (qos 1) or PUBCOMP (qos 2) for packet_id: the message is done.
        """
        inflight = self.inflight or {}
        out = inflight.get(packet_id)
        if out is None or out.message.qos != qos or (qos == 2 and not out.released):
            log.debug("Ignoring acknowledgement of unknown packet {pid}", pid=packet_id)
            return
        del inflight[packet_id]
        del self.queue[out.seq]
        size = len(out.message.payload)
        self._unhold(size)
        self.notices -= out.notice is not None
        metrics = self._queues.metrics
        metrics.queued.dec()
        metrics.queued_bytes.dec(size)
        if self.persistent:
            self._queues.pipeline.later(Dequeue(self.client_id, out.seq))
        self._pump()

    def received(self, packet_id: int) -> Deferred[bool]:
        """
        PUBREC for packet_id: fire with True once the release is durable and
        PUBREL may go out, False for an unknown packet id.
        """
        out = (self.inflight or {}).get(packet_id)
        if out is None or out.message.qos != 2:
            return succeed(False)
        plan = Plan()

        def release(_: object) -> None:
            out.released = True

        plan.add(Release(self.client_id, out.seq) if self.persistent else None, release)
        return self._queues.pipeline.commit(plan).addCallback(lambda _: True)

    # -- inbound QoS 2 ------------------------------------------------------

    def hold_inbound(self, plan: Plan, packet_id: int) -> None:
        """Remember an inbound QoS 2 packet id with the publish it carries."""
        if not isinstance(self.inbound, set):
            self.inbound = set()
        self.inbound.add(packet_id)
        if self.persistent:
            plan.add(AddInbound(self.client_id, packet_id))

    def release_inbound(self, packet_id: int) -> None:
        if isinstance(self.inbound, set) and packet_id in self.inbound:
            self.inbound.discard(packet_id)
            if self.persistent:
                self._queues.pipeline.later(RemoveInbound(self.client_id, packet_id))
