"""
What the server keeps, and the narrow asynchronous interface to keep it.

The broker holds live state in memory and describes every change it must make
durable as an operation value.  A store commits a list of operations
atomically (as far as its back end allows) and in order; only then does the
broker acknowledge anything to a client.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Sequence

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


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
    client_id: str
    subscriptions: tuple[tuple[str, int], ...]
    queue: tuple[QueuedMessage, ...] = ()
    # Inbound QoS 2 packet ids received but not yet released by PUBREL.
    inbound: frozenset[int] = frozenset()
    # Whether its client has ever connected (a session made by a message
    # addressed to it has not).
    has_connected: bool = False


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


# Operations.  Each commits with the batch it is submitted in; the result list
# of a submit() has one entry per operation (None unless stated).


@attrs.frozen
class PutSession:
    """
    Create or update a persistent session, replacing its subscriptions.
    ``has_connected`` True records that its client has connected; False never
    unsets that.
    """

    client_id: str
    subscriptions: tuple[tuple[str, int], ...]
    has_connected: bool = False


@attrs.frozen
class DropSession:
    """Forget a session with its queue and inbound packet ids."""

    client_id: str


@attrs.frozen
class Enqueue:
    """Queue message (not yet pushed) for the client; QueuedMessage says the rest."""

    client_id: str
    seq: int
    message: Message
    queued_at: int = 0
    notice: str | None = None


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
    """Acknowledged (PUBACK/PUBCOMP), dropped by a limit, or discarded."""

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


class Inserted(enum.Enum):
    """What an InsertChat found."""

    # Stored now: its ``then`` is committed with it.
    NEW = "new"
    # The same chat (recipient and digest) was stored already: a retransmission.
    REPEATED = "repeated"
    # The sender's msgid holds another chat: another recipient or digest.
    CONFLICT = "conflict"


@attrs.frozen
class InsertChat:
    """
    Store a chat message unless (sender, msgid) is stored already.  Result:
    an Inserted; the operations in ``then`` are committed with it only when
    it is NEW.  A commit retried after its first attempt landed unanswered
    finds the chat stored with this operation's token: that is still NEW
    (and ``then`` is written again, harmlessly), where a client's
    retransmission, another operation, is REPEATED or CONFLICT.  ``digest``
    stands for the content; a chat stored without one (by an older server)
    is compared by recipient only.
    """

    chat: ChatRecord
    then: tuple[Op, ...] = ()
    token: str = attrs.Factory(lambda: secrets.token_hex(8))
    digest: str = ""

    def against(self, token: str | None, recipient: str, digest: str | None) -> Inserted:
        """The result where (sender, msgid) is stored already with these."""
        if token == self.token:
            return Inserted.NEW
        return _compared(self.chat.recipient, self.digest, recipient, digest)


def _compared(
    recipient: str, digest: str, stored_recipient: str, stored_digest: str | None
) -> Inserted:
    """REPEATED when the stored chat is this one (no digest: by recipient only), else CONFLICT."""
    if stored_recipient == recipient and stored_digest in (None, digest):
        return Inserted.REPEATED
    return Inserted.CONFLICT


@attrs.frozen
class ChatStored:
    """
    What an InsertChat of this chat would find, changing nothing: None when
    the sender's msgid is not stored, else REPEATED or CONFLICT as InsertChat
    compares them.  It answers a chat that cannot be kept (a full queue).
    """

    sender: str
    msgid: str
    recipient: str
    digest: str

    def against(self, recipient: str, digest: str | None) -> Inserted:
        """The result where (sender, msgid) is stored already with these."""
        return _compared(self.recipient, self.digest, recipient, digest)


@attrs.frozen
class MarkReceived:
    """
    Record that recipient received sender's msgid.  Result: True when that
    chat message exists with that recipient; ``then`` is committed only then.
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
    | DropSession
    | Enqueue
    | MarkPushed
    | Release
    | Dequeue
    | AddInbound
    | RemoveInbound
    | SetRetained
    | InsertChat
    | ChatStored
    | MarkReceived
    | PutDevice
    | LogOut
    | DropDevice
    | SetBan
)


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

    def load_sessions() -> Deferred[list[SessionRecord]]:
        """Every persistent session with its queue in seq order."""

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
