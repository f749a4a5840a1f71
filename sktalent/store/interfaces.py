"""
What the server keeps, and the narrow asynchronous interface to keep it.

The store is the source of truth.  The broker holds in memory only the
sessions of connected clients, describes every change it must make durable
as an operation value, and reads a session back when its client connects.  A
store commits a list of operations atomically (as far as its back end
allows) and in order; only then does the broker acknowledge anything to a
client.

Queues: each session's queue is ordered by seq, which the store allocates
where an Enqueue commits, from a counter kept with the session, so that no
two messages of one client ever share a seq however many processes write
for it, and messages become visible in seq order.  The store also keeps each
session's counters (messages, payload bytes, messages with a notice) and
checks an Enqueue's room against them in the same commit: a queue limit
holds whether or not its client is connected anywhere.
"""

from __future__ import annotations

import enum
import itertools
import secrets
from collections.abc import Collection, Iterator, Sequence

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

# Tokens of operations: unique to this process (a random prefix) and to each
# operation (a count), and cheap, as every queued message has one.
_TOKENS = map(f"{secrets.token_hex(6)}-{{:x}}".format, itertools.count())


def new_token() -> str:
    """A token no other operation of any process has."""
    return next(_TOKENS)


@attrs.frozen
class Message:
    """
    An application message as it is queued for one client: the QoS is the one
    it is delivered at.
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool = False


@attrs.frozen
class QueuedMessage:
    seq: int
    message: Message
    # True once the client answered PUBREC: only PUBREL/PUBCOMP remain.
    released: bool = False
    # When it was queued, in milliseconds since the epoch: it expires after
    # the retention time.
    queued_at: int = 0
    # What to push for it while it is unacknowledged (opaque to the store);
    # None: it is never pushed.
    notice: str | None = None
    # True once its push went out (MarkPushed): it is never pushed again.
    pushed: bool = False


@attrs.frozen
class SessionRecord:
    """
    A session as stored.  From open_session, ``queue`` is only the first
    page of the queue; from load_sessions, all of it.
    """

    client_id: str
    subscriptions: tuple[tuple[str, int], ...]
    queue: tuple[QueuedMessage, ...] = ()
    # Inbound QoS 2 packet ids received but not yet released by PUBREL.
    inbound: frozenset[int] = frozenset()
    # Whether its client has ever connected (a session made by a message
    # addressed to it has not).
    has_connected: bool = False
    # Whether its client connected with cleansession=1: the session ends
    # with that connection (one left over by a crash is discarded when next
    # opened).
    clean: bool = False
    # The highest seq its last connection may have sent, recorded when that
    # connection ended; None while a connection is open, or when the
    # process holding it died.
    sent_through: int | None = 0


@attrs.frozen
class SessionSummary:
    """What operators and the broker ask of a session without opening it."""

    # Messages queued and not yet acknowledged, and their payload bytes.
    queued: int
    queued_bytes: int
    # Milliseconds since the epoch when the first of them was queued.
    oldest_queued_at: int | None
    # The highest seq allocated in its queue so far (0: none).
    last_seq: int


@attrs.frozen
class PendingPush:
    """A queued message with a notice that has not been pushed."""

    client_id: str
    seq: int
    notice: str
    queued_at: int
    # Queued messages of its client that carry a notice (the iOS badge).
    badge: int


@attrs.frozen
class QueueTotals:
    """Every stored session and queue together, for the metrics."""

    sessions: int
    messages: int
    bytes: int
    # Milliseconds since the epoch; None when nothing is queued.
    oldest_queued_at: int | None


@attrs.frozen
class ChatRecord:
    msgid: str
    sender: str
    recipient: str
    o_id: str
    # The envelope exactly as delivered to the recipient (JSON text, with t).
    envelope: str
    # Server receive time, milliseconds since the epoch.
    received_at: int


@attrs.frozen
class Device:
    """Where a user's pushes go: what the backend registered last."""

    user_id: str
    platform: str | None  # "ios" or "android"; None: never registered
    token: str | None
    # The user logged out: no pushes until the next PutDevice.
    logged_out: bool = False


# What a store holds, as one store's content is copied into another
# (python -m sktalent.migrate): each record with the key it is stored by.


@attrs.frozen
class StoredSession:
    """A session with its counters and inbound packet ids; its queue goes separately."""

    record: SessionRecord
    next_seq: int
    queued: int
    queued_bytes: int
    notices: int


@attrs.frozen
class QueueEntry:
    """A message of a client's queue."""

    client_id: str
    queued: QueuedMessage


@attrs.frozen
class StoredChat:
    """A chat message with what tells a retransmission from a reused msgid."""

    chat: ChatRecord
    token: str | None
    digest: str | None


@attrs.frozen
class Receipt:
    """Recipient received sender's msgid at ``at`` (ms since the epoch)."""

    sender: str
    msgid: str
    at: int


@attrs.frozen
class Ban:
    client_id: str
    until: int


# Operations.  Each commits with the batch it is submitted in; the result list
# of a submit() has one entry per operation (None unless stated).


@attrs.frozen
class PutSession:
    """Create a session if there is none, and replace its subscriptions."""

    client_id: str
    subscriptions: tuple[tuple[str, int], ...]


@attrs.frozen
class Attach:
    """
    A client connected to its session (created if there is none): it has
    connected, it is clean or not as given, its subscriptions are these, and
    what its connection sends is unknown until Detach.
    """

    client_id: str
    subscriptions: tuple[tuple[str, int], ...]
    clean: bool = False


@attrs.frozen
class Detach:
    """The session's connection ended having sent nothing above sent_through."""

    client_id: str
    sent_through: int


@attrs.frozen
class DropSession:
    """Forget a session with its queue and inbound packet ids: the account is gone."""

    client_id: str


@attrs.frozen
class DiscardSession:
    """
    A clean session ends, or a client connects clean: drop the queue up to
    and including seq ``through``, the inbound packet ids and subscriptions,
    and forget that a client connected.  Messages above ``through`` (queued
    since it was decided) stay, and so does the seq counter, so that no seq
    is ever allocated twice while someone may hold the session.
    """

    client_id: str
    through: int


@attrs.frozen
class Room:
    """What a queue may hold for an Enqueue to be stored: messages, and payload bytes."""

    messages: int
    bytes: int


@attrs.frozen
class Enqueue:
    """
    Queue message (not yet pushed) for the client, creating its session if
    it has none; QueuedMessage says the rest.  Result: Queued, with the seq
    the store allocated; or NO_ROOM when ``room`` is given and the queue,
    with this message, would hold more than it allows: then nothing is
    stored, and when ``required`` within an InsertChat's ``then``, the chat
    is not stored either.

    ``seq`` given (copying a queue from another store) is used as it is and
    must be free: a seq already in the queue fails the commit with
    QueueConflict, never overwrites.  ``token`` tells a retried commit that
    landed unanswered from a new message.
    """

    client_id: str
    message: Message
    queued_at: int = 0
    notice: str | None = None
    room: Room | None = None
    required: bool = False
    seq: int | None = None
    token: str = attrs.Factory(new_token)


@attrs.frozen
class Queued:
    """An Enqueue's result: where the message went."""

    seq: int
    # Messages in the client's queue that carry a notice, this one included.
    notices: int


class NoRoom(enum.Enum):
    """An Enqueue's result when the queue had no room: nothing was stored."""

    NO_ROOM = "no_room"


NO_ROOM = NoRoom.NO_ROOM


class QueueConflict(Exception):
    """An Enqueue at a given seq found it taken: the commit is refused, nothing overwritten."""


@attrs.frozen
class MarkPushed:
    """The queued message's push went out."""

    client_id: str
    seq: int


@attrs.frozen
class Release:
    """The client answered PUBREC for the queued message."""

    client_id: str
    seq: int


@attrs.frozen
class Dequeue:
    """Acknowledged (PUBACK/PUBCOMP): the message leaves the queue and its counters."""

    client_id: str
    seq: int


@attrs.frozen
class AddInbound:
    client_id: str
    packet_id: int


@attrs.frozen
class RemoveInbound:
    client_id: str
    packet_id: int


@attrs.frozen
class SetRetained:
    """Retain message for topic; None deletes the retained message."""

    topic: str
    message: Message | None


@attrs.frozen
class Guarded:
    """
    The result of an operation with ``then``: its own, and one for each of
    the operations in ``then`` when they were committed (empty otherwise).
    """

    outcome: object
    then: tuple[object, ...] = ()


class Inserted(enum.Enum):
    """What an InsertChat found (the outcome of its Guarded result)."""

    # Stored now: its ``then`` is committed with it.
    NEW = "new"
    # The same chat (recipient and digest) was stored already: a retransmission.
    REPEATED = "repeated"
    # The sender's msgid holds another chat: another recipient or digest.
    CONFLICT = "conflict"
    # A required Enqueue of its ``then`` found no room: nothing is stored.
    FULL = "full"


@attrs.frozen
class InsertChat:
    """
    Store a chat message unless (sender, msgid) is stored already.  Result:
    Guarded, its outcome an Inserted; the operations in ``then`` are
    committed with it only when it is NEW.  A commit retried after its first
    attempt landed unanswered finds the chat stored with this operation's
    token: that is still NEW, with ``then`` as the first attempt committed
    it, where a client's retransmission, another operation, is REPEATED or
    CONFLICT.  ``digest`` stands for the content; a chat stored without one
    (by an older server) is compared by recipient only.
    """

    chat: ChatRecord
    then: tuple[Op, ...] = ()
    token: str = attrs.Factory(new_token)
    digest: str = ""

    def against(self, token: str | None, recipient: str, digest: str | None) -> Inserted:
        """The outcome where (sender, msgid) is stored already with these."""
        if token == self.token:
            return Inserted.NEW
        if recipient == self.chat.recipient and digest in (None, self.digest):
            return Inserted.REPEATED
        return Inserted.CONFLICT


@attrs.frozen
class MarkReceived:
    """
    Record that recipient received sender's msgid.  Result: Guarded, its
    outcome True when that chat message exists with that recipient;
    ``then`` is committed only then.
    """

    sender: str
    msgid: str
    recipient: str
    at: int
    then: tuple[Op, ...] = ()


@attrs.frozen
class PutDevice:
    """Store the user's device as given, replacing the one before."""

    device: Device


@attrs.frozen
class LogOut:
    """
    The user logged out: their device, kept as it was, is marked logged out;
    a user without one gets a logged-out device of no platform.
    """

    user_id: str


@attrs.frozen
class DropDevice:
    """Forget the user's device, if any."""

    user_id: str


@attrs.frozen
class SetBan:
    """
    Refuse the client's CONNECTs until ``until``, in milliseconds since the
    epoch, replacing its ban if it had one; None lifts its ban.
    """

    client_id: str
    until: int | None


Op = (
    PutSession
    | Attach
    | Detach
    | DropSession
    | DiscardSession
    | Enqueue
    | MarkPushed
    | Release
    | Dequeue
    | AddInbound
    | RemoveInbound
    | SetRetained
    | InsertChat
    | MarkReceived
    | PutDevice
    | LogOut
    | DropDevice
    | SetBan
)


def every_op(ops: Sequence[Op]) -> Iterator[Op]:
    """Every operation of ops, those in a ``then`` included, in order."""
    for op in ops:
        yield op
        if isinstance(op, InsertChat | MarkReceived):
            yield from every_op(op.then)


class StoreUnavailable(Exception):
    """
    The back end could not be reached or refused to commit.
    """


class IStore(Interface):
    """
    Durable state.  Every method returns a Deferred and never blocks the
    reactor.
    """

    name = Attribute("Short back-end name for logs and metrics, e.g. 'sqlite'.")
    available = Attribute("False while commits fail because the back end is unreachable.")
    outages = Attribute("How many times available turned False since the store was made.")

    def start() -> Deferred[None]:
        """Open connections, create schema and indexes; fire when ready."""

    def stop() -> Deferred[None]:
        """Finish pending commits and close."""

    def submit(ops: Sequence[Op]) -> Deferred[list[object]]:
        """
        Commit ops in order, in one transaction where the back end has them.
        Operations submitted close together are grouped into one commit; the
        Deferred fires when the commit holding these ops is durable, and
        fails with StoreUnavailable only if the caller should give up.
        """

    def open_session(client_id: str, limit: int) -> Deferred[SessionRecord | None]:
        """
        The client's session with the first ``limit`` messages of its queue
        in seq order (what CONNECT needs), or None if it has none.  It reads
        one session: its cost does not depend on how many are stored.
        """

    def read_queue(client_id: str, after: int, limit: int) -> Deferred[list[QueuedMessage]]:
        """Up to ``limit`` messages of the client's queue above seq ``after``, in seq order."""

    def session_summary(client_id: str) -> Deferred[SessionSummary | None]:
        """The client's queue in figures, or None if it has no session."""

    def pending_pushes(
        after: tuple[str, int] | None, limit: int, client_id: str | None = None
    ) -> Deferred[list[PendingPush]]:
        """
        Up to ``limit`` queued messages with a notice and not pushed, in
        (client id, seq) order, after ``after`` when given; only the client's
        own when ``client_id`` is given.  Its cost grows with what it answers,
        not with what is stored.
        """

    def expire(before: int, keep: Collection[tuple[str, int]]) -> Deferred[tuple[int, int]]:
        """
        Drop the messages queued before ``before`` (milliseconds since the
        epoch) but for those keyed (client id, seq) in ``keep``, then the
        sessions no client ever connected to with nothing queued.  Fire with
        how many messages and sessions went.
        """

    def queue_totals() -> Deferred[QueueTotals]:
        """Every session and queue together, in figures (a scan: for the metrics only)."""

    def load_subscriptions() -> Deferred[list[tuple[str, tuple[tuple[str, int], ...]]]]:
        """
        (client id, subscriptions) of every session that is not clean and has
        subscriptions: what a plain MQTT broker routes offline messages by.
        """

    def load_sessions() -> Deferred[list[SessionRecord]]:
        """
        Every session with all its queue in seq order: a dump for tests and
        tools, which the server itself never reads.
        """

    def load_retained() -> Deferred[list[Message]]:
        """Every retained message."""

    def chat_history(o_id: str, limit: int, before: str | None) -> Deferred[list[ChatRecord]]:
        """
        Up to limit chat messages of the order, oldest first, all older than
        the message with msgid ``before`` when given.
        """

    def get_device(user_id: str) -> Deferred[Device | None]:
        """The user's device, if any was registered or logged out."""

    def get_ban(client_id: str) -> Deferred[int | None]:
        """
        When the client's ban ends, in milliseconds since the epoch, if one
        was set (SetBan); it may have ended already.
        """

    def ping() -> Deferred[None]:
        """Fire when the back end answers a trivial query; fail otherwise."""

    def purge(older_than: int) -> Deferred[int]:
        """
        Delete chat history (and its receipts) received before older_than,
        in milliseconds since the epoch, and the bans that ended before it;
        fire with how many chat messages were removed.
        """
