"""
One connected client's session: the window of what is in flight on its
connection, a page of its queue read from the store ahead of it, and the
inbound QoS 2 packet ids it has not released.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ..metrics import Metrics
from ..store.interfaces import (
    AddInbound,
    Dequeue,
    IStore,
    Message,
    QueuedMessage,
    Release,
    RemoveInbound,
    Room,
    SessionRecord,
)
from .interfaces import IConnection, IQueueWatcher
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
    # Without and with the headroom: made once, used for every message.
    _rooms: tuple[Room, Room] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        with_headroom = Room(
            self.messages + max(1, self.messages // 10), self.bytes + max(1, self.bytes // 10)
        )
        object.__setattr__(self, "_rooms", (Room(self.messages, self.bytes), with_headroom))

    def room(self, headroom: bool) -> Room:
        """The room an Enqueue may use."""
        return self._rooms[headroom]

    def admit(self, held: int, held_bytes: int, size: int, headroom: bool) -> bool:
        """
        Whether a message of size payload bytes fits in a queue that holds
        held messages of held_bytes.
        """
        room = self.room(headroom)
        return held < room.messages and held_bytes + size <= room.bytes


@attrs.define(eq=False)
class Outgoing:
    """A message of a session's queue, from taken in until acknowledged."""

    seq: int
    message: Message
    # Sent before (on this connection or, as far as anyone knows, an
    # earlier one): a PUBLISH of it again carries DUP.
    sent: bool = False
    # PUBREC received: only PUBREL/PUBCOMP remain.
    released: bool = False
    # Milliseconds since the epoch.
    queued_at: int = 0
    notice: str | None = None

    @classmethod
    def of(cls, queued: QueuedMessage, sent: bool) -> Outgoing:
        return cls(
            queued.seq,
            queued.message,
            sent,
            queued.released,
            queued.queued_at,
            queued.notice,
        )

    @property
    def packet_id(self) -> int:
        # Derived from seq so it survives a restart without being stored.
        return self.seq % 0xFFFF + 1


@attrs.define(eq=False)
class Queues:
    """
    What every session's queue shares: the store it is read from, its
    limits, the size of the in-flight window and of the page read ahead,
    the metrics, who watches the messages with a notice, and the pipeline
    that makes changes durable.
    """

    pipeline: Pipeline
    store: IStore
    metrics: Metrics
    clock: IReactorTime
    max_inflight: int = 32
    limits: QueueLimits = QueueLimits()
    watcher: IQueueWatcher | None = None
    # Seconds before a queue read that failed is tried again.
    retry: float = 1.0

    @property
    def page(self) -> int:
        """How many messages a session reads from the store ahead of its window."""
        return 2 * self.max_inflight


@attrs.define(eq=False, weakref_slot=False)
class Session:
    """
    One connected client's session.  Only connected clients have one in
    memory: what is queued for everyone else is in the store alone.

    Invariants:

    - A ``stored`` session's queue is the store's: messages enter memory in
      seq order, from a page read (``_refill``) or straight from the commit
      that queued them (``arrived``), and ``cursor`` is the highest seq taken
      in.  Everything queued at or below ``cursor`` and not acknowledged is
      in ``inflight`` or ``unsent``; what is above it is read when ``unsent``
      runs low, so memory holds at most a page and a window per session.
      ``_behind`` says the store may hold messages above ``cursor``; a
      message that does not follow ``cursor`` directly, or comes while a
      read is under way, only sets it (the read takes it in, once).
    - A session that is not stored (a clean session of a plain broker) keeps
      its queue in ``unsent`` alone, within the limits, counted in ``held``.
    - While a connection is attached, each message taken in is either in
      ``unsent`` (in seq order) or in ``inflight`` (sent and awaiting its
      acknowledgement), never both; ``inflight`` holds at most
      ``max_inflight`` messages, under distinct packet ids.
    - A persistent session puts every change to its subscriptions, queue
      and inbound ids in the store, in the plan whose effect makes the
      change in memory (bookkeeping nobody waits for goes in
      Pipeline.later); a stored clean session, its queue only.
    - ``connection`` and ``connected_since`` are set exactly while a
      connection is attached; once ``gone`` (it left memory) nothing more is
      taken in.
    """

    client_id: str
    persistent: bool
    stored: bool
    _queues: Queues = attrs.field(repr=False)
    subscriptions: dict[str, int] = attrs.Factory(dict)
    # Messages taken in and not yet sent on the current connection, in seq
    # order; made when first needed (an empty deque takes 760 bytes, a
    # quarter of an idle connection).
    unsent: deque[Outgoing] | None = None
    # packet id -> message sent and awaiting acknowledgement; made when first needed.
    inflight: dict[int, Outgoing] | None = None
    # Inbound QoS 2 packet ids not yet released (frozen and shared while none are).
    inbound: set[int] | frozenset[int] = frozenset()
    cursor: int = 0
    connection: IConnection | None = None
    # Clock seconds when the current connection attached.
    connected_since: float | None = None
    # Whether a client ever connected to it (kept in the store).
    has_connected: bool = False
    # The highest seq that may have been sent to its client, ever.
    sent_through: int = 0
    # What a session that is not stored holds, and its next seq.
    held: int = 0
    held_bytes: int = 0
    gone: bool = False
    # Resumed on its connection: what it takes in may be sent.
    _live: bool = False
    _behind: bool = False
    _reading: bool = False
    _again: bool = False
    _retry: IDelayedCall | None = None

    @classmethod
    def opened(
        cls,
        client_id: str,
        record: SessionRecord | None,
        queues: Queues,
        defaults: dict[str, int],
        clean: bool,
    ) -> Session:
        """
        A stored session as CONNECT finds it: record (None for a new one)
        with the first page of its queue.
        """
        session = cls(client_id, not clean, True, queues, behind=True)
        if record is None:
            session.subscriptions = dict(defaults)
            return session
        session.has_connected = record.has_connected
        subscriptions = dict(record.subscriptions)
        # A session a message made has the defaults from its first connection.
        session.subscriptions = subscriptions if record.has_connected else defaults | subscriptions
        if record.inbound:
            session.inbound = set(record.inbound)
        if record.sent_through is not None:
            session.sent_through = record.sent_through
        elif record.queue:
            # Its last connection ended without saying what it sent: it
            # sent no more than a window from the head of the queue.
            head = record.queue[: queues.max_inflight]
            session.sent_through = head[-1].seq
        if record.queue:
            session.unsent = deque(
                Outgoing.of(queued, queued.seq <= session.sent_through) for queued in record.queue
            )
            session.cursor = record.queue[-1].seq
        return session

    # -- connections --------------------------------------------------------

    def resume(self) -> None:
        """
        A connection attached: resend what is unacknowledged, in order, then
        continue with the queue.
        """
        self._live = True
        if self.inflight:
            inflight = sorted(self.inflight.values(), key=lambda o: o.seq)
            self.inflight = None
            self._unsent().extendleft(reversed(inflight))
        self._pump()
        if self._queues.watcher is not None and self.stored:
            self._queues.watcher.resumed(self)

    def attach(self, connection: IConnection) -> None:
        """connection is the session's now; it is sent nothing until resume()."""
        self.connection = connection
        self.connected_since = self._queues.clock.seconds()
        self._live = False

    def detach(self) -> None:
        """The connection went away."""
        self.connection = self.connected_since = None
        self._live = False

    def leave(self) -> None:
        """The session leaves memory: nothing more is taken in."""
        self.gone = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()

    def unacknowledged(self, seq: int) -> bool:
        """Whether the message of seq, if queued, is still to be acknowledged here."""
        if seq > self.cursor or (self.unsent and seq >= self.unsent[0].seq):
            return True
        out = None if self.inflight is None else self.inflight.get(seq % 0xFFFF + 1)
        return out is not None and out.seq == seq

    def awaiting(self) -> list[int]:
        """The seqs of the messages with a notice taken in and not acknowledged."""
        return [o.seq for o in self.taken() if o.notice is not None]

    def taken(self) -> list[Outgoing]:
        """The messages taken in and not acknowledged: in flight, then unsent."""
        return [*(self.inflight or {}).values(), *(self.unsent or ())]

    def _unsent(self) -> deque[Outgoing]:
        if self.unsent is None:
            self.unsent = deque()
        return self.unsent

    @property
    def complete(self) -> bool:
        """Whether everything queued is taken in, as far as it knows."""
        return not (self._behind or self._reading)

    # -- queueing -----------------------------------------------------------

    def arrived(self, out: Outgoing) -> None:
        """A commit queued out in this stored session: take it in, in order."""
        if self.gone or out.seq <= self.cursor:
            return  # Gone, or read from the store already.
        if (
            self._reading
            or self._behind
            or out.seq != self.cursor + 1
            or len(self.unsent or ()) >= self._queues.page
        ):
            self.wake()
            return
        self.cursor = out.seq
        self._unsent().append(out)
        self._pump()

    def wake(self) -> None:
        """The store may hold messages above the cursor: read them when there is room."""
        self._behind = True
        if self._reading:
            self._again = True
        else:
            self._refill()

    def enqueue_local(self, plan: Plan, message: Message, headroom: bool = False) -> bool:
        """
        Queue message in a session that is not stored once plan is durable,
        reserving its room now; False, dropped, when there is none.
        """
        size = len(message.payload)
        if not self._queues.limits.admit(self.held, self.held_bytes, size, headroom):
            plan.add(None, lambda _: self._queues.metrics.dropped.labels("queue_full").inc())
            return False
        self.held += 1
        self.held_bytes += size
        plan.on_abandon(lambda: self._unhold(size))
        at = int(self._queues.clock.seconds() * 1000)

        def queued(_: object) -> None:
            if self.gone:
                return
            self.cursor += 1
            self._unsent().append(Outgoing(self.cursor, message, queued_at=at))
            self._pump()

        plan.add(None, queued)
        return True

    def _unhold(self, size: int) -> None:
        self.held -= 1
        self.held_bytes -= size

    def expire(self, before: int) -> int:
        """
        Forget the messages taken in but not sent that were queued before
        ``before`` (milliseconds since the epoch), which the store drops;
        answer how many of them only memory held.
        """
        unsent = self.unsent or ()
        expired = [o for o in unsent if o.queued_at < before]
        self.unsent = deque(o for o in unsent if o.queued_at >= before) or None
        if self.stored:
            return 0
        for out in expired:
            self._unhold(len(out.message.payload))
        return len(expired)

    # -- the outbound window ------------------------------------------------

    def send_now(self, message: Message) -> None:
        """Send message at QoS 0 if the client is connected; otherwise drop it."""
        if self.connection is None or not self._live:
            self._queues.metrics.dropped.labels("qos0_offline").inc()
            return
        self.connection.send([Publish(message.topic, message.payload, 0, message.retain)])

    def _pump(self) -> None:
        connection = self.connection
        if connection is None or not self._live:
            return
        unsent = self.unsent
        packets: list[Packet] = []
        if unsent:
            if self.inflight is None:
                self.inflight = {}
            inflight = self.inflight
            while unsent and len(inflight) < self._queues.max_inflight:
                out = unsent[0]
                if out.packet_id in inflight:
                    break  # Wrapped around onto a message still unacknowledged.
                unsent.popleft()
                inflight[out.packet_id] = out
                m = out.message
                if out.released:
                    packets.append(PubRel(out.packet_id))
                else:
                    packets.append(
                        Publish(m.topic, m.payload, m.qos, m.retain, out.sent, out.packet_id)
                    )
                out.sent = True
                self.sent_through = max(self.sent_through, out.seq)
        if packets:
            connection.send(packets)
        self._refill()

    def _refill(self) -> None:
        """Read the next page of the queue once what is taken in runs low."""
        queues = self._queues
        if (
            not self._behind
            or self._reading
            or self.gone
            or not self._live
            or len(self.unsent or ()) > queues.page // 2
        ):
            return
        self._reading, self._again = True, False
        limit = queues.page - len(self.unsent or ())
        read = queues.store.read_queue(self.client_id, self.cursor, limit)
        read.addCallbacks(self._read, self._read_failed, (limit,))

    def _read(self, page: list[QueuedMessage], limit: int) -> None:
        self._reading = False
        if self.gone:
            return
        for queued in page:
            if queued.seq > self.cursor:
                self._unsent().append(Outgoing.of(queued, queued.seq <= self.sent_through))
                self.cursor = queued.seq
        self._behind = len(page) >= limit or self._again
        self._pump()

    def _read_failed(self, failure: Any) -> None:
        self._reading = False
        if self.gone:
            return
        log.failure(
            "Reading the queue of {client} failed; trying again", failure, client=self.client_id
        )
        self._retry = self._queues.clock.callLater(self._queues.retry, self._refill)

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
        if self.stored:
            self._queues.pipeline.later(Dequeue(self.client_id, out.seq))
        else:
            self._unhold(len(out.message.payload))
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

        plan.add(Release(self.client_id, out.seq) if self.stored else None, release)
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
