"""
The seams of the MQTT core: who may do what, and what the application adds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import attrs
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from ..store.interfaces import Message, PendingPush
from .packets import Packet, Will
from .plan import Plan

if TYPE_CHECKING:
    from .session import Outgoing


class ServiceUnavailable(Exception):
    """
    Authentication could not be decided now (its back end is down): the
    client is answered CONNACK 3, not 4.
    """


class IdentifierRejected(UnauthorizedLogin):
    """
    The credentials name an identity no client may have: the client is
    answered CONNACK 2, not 4.
    """


class IMQTTUser(Interface):
    """
    The avatar a cred portal returns for an authenticated MQTT client.
    """

    user_id = Attribute("The authenticated identity (str); '' when anonymous.")


class IAuthorizer(Interface):
    """
    Topic rules, consulted on CONNECT, SUBSCRIBE and PUBLISH.
    """

    def check_client_id(user: IMQTTUser, client_id: str) -> int:
        """
        0 to accept client_id for user, otherwise the CONNACK return code to
        refuse with (2: identifier rejected, 5: not authorized).
        """

    def default_subscriptions(client_id: str) -> tuple[tuple[str, int], ...]:
        """Filters every session of client_id is subscribed to on creation."""

    def grant(user: IMQTTUser, client_id: str, topic_filter: str, qos: int) -> int:
        """The QoS granted for a requested subscription, or 0x80 to refuse it."""

    def may_publish(user: IMQTTUser, client_id: str, topic: str) -> bool:
        """False acknowledges the publish as required, then drops it."""

    def accept_will(user: IMQTTUser, client_id: str, will: Will) -> bool:
        """False discards the will of a CONNECT: it is never published."""


class IApplication(Interface):
    """
    Takes over publishes to topics it owns instead of routing them to
    subscribers.
    """

    def owns(topic: str) -> bool:
        """True when publishes to topic are the application's."""

    def handle(client_id: str, message: Message, plan: Plan) -> None:
        """
        Act on a publish from client_id by adding to plan what must become
        durable (and what to do then) before the publish is acknowledged.
        """


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


class SessionView(Protocol):
    """What those outside the broker see of a session in memory."""

    @property
    def client_id(self) -> str: ...

    @property
    def persistent(self) -> bool: ...

    @property
    def connection(self) -> IConnection | None: ...

    def unacknowledged(self, seq: int) -> bool:
        """Whether the message of seq, if still queued, awaits its client's acknowledgement."""
        ...

    def awaiting(self) -> list[int]:
        """The seqs of the messages with a notice it has read and not had acknowledged."""
        ...

    @property
    def complete(self) -> bool:
        """Whether it has read all its queue, as far as it knows."""
        ...


class IQueueWatcher(Interface):
    """
    Follows the queued messages that carry a notice, to push them while they
    go unacknowledged.  What it needs of messages not in memory it reads from
    the store.
    """

    def queued(
        client_id: str, seq: int, notice: str, badge: int, connection: IConnection | None
    ) -> None:
        """
        A message with notice is now durable in client_id's queue at seq;
        badge counts the queue's messages with a notice; connection is the
        client's connection here, if it has one.
        """

    def resumed(session: SessionView) -> None:
        """session's queue is handed over afresh to a new connection here."""

    def detached(client_id: str) -> None:
        """
        client_id's connection here ended (not taken over): its session left
        memory, its queue is still in the store.
        """

    def discarded(client_id: str, unpushed: Sequence[PendingPush]) -> None:
        """
        client_id's session was discarded (cleansession), durably, with these
        messages never pushed: push them, as their connection was lost.
        """


class ISessionGate(Interface):
    """
    Where a broker that is one of several processes on one store asks and
    tells who holds which session (a cluster); one process alone needs
    nothing of it (LocalGate).
    """

    def before_open(client_id: str) -> Deferred[None]:
        """
        Awaited before a CONNECT opens client_id's session here, and before
        anything of it is read from the store: fire once no other process
        holds it (another node closed its connection and made durable what
        that client acknowledged there).  Failing, or not firing within the
        broker's open timeout, refuses the CONNECT with CONNACK 3.
        """

    def opened(client_id: str) -> None:
        """client_id's session is connected here now (for presence)."""

    def closed(client_id: str) -> None:
        """client_id's connection here ended; its session left memory."""

    def queued_elsewhere(client_id: str, out: Outgoing | None = None) -> None:
        """
        Messages were committed to the queue of client_id, whose session is
        not open here: the process that has it open, if any, must read them
        (out, when given, is one of them, as queued).
        """


@attrs.define
class Ticket:
    """What became of a message given to IBroker.enqueue, known once its plan is durable."""

    # Where it went in the queue; None until then, or if it was refused.
    seq: int | None = None
    # Refused: the queue had no room, and nothing was stored.
    full: bool = False


@attrs.frozen
class SessionStatus:
    """A session as it is now, for operators."""

    online: bool
    # Clock seconds when its connection attached; None when offline.
    connected_since: float | None
    # Messages queued and not yet acknowledged.
    queued: int
    # Milliseconds since the epoch when the oldest of them was queued.
    oldest_queued_at: int | None


class IBroker(Interface):
    """
    What the application, push delivery, the operators' jobs and a cluster
    use of the broker: plans to commit, durable queues by client id, and
    the sessions of the clients connected here.
    """

    def commit(plan: Plan) -> Deferred[None]:
        """
        Commit plan in the broker's pipeline: its effects run once its
        operations are durable, behind every plan committed before it.
        Fails when the store failed the commit.
        """

    def barrier(client_id: str | None = None) -> Deferred[None]:
        """
        Fire once everything committed before now, acknowledgements
        included, is durable: what the store answers after it is current.
        With client_id, only what concerns that client's session is waited
        for (it does not queue behind every other client's commits).
        """

    def session(client_id: str) -> SessionView | None:
        """The client's session, if it is in memory here (connected here)."""

    def is_online(client_id: str) -> bool:
        """Whether the client has a live connection here."""

    def status(client_id: str) -> Deferred[SessionStatus | None]:
        """The client's session as it is now, if it has one (from the store)."""

    def enqueue(
        plan: Plan,
        client_id: str,
        message: Message,
        *,
        headroom: bool = False,
        notice: str | None = None,
        required: bool = False,
    ) -> Ticket:
        """
        Queue message (QoS 1 or 2) durably for client_id once plan is
        durable, in a persistent session with the default subscriptions if
        it has none, whether or not the client is connected: the store
        allocates its seq and checks the queue's room where it commits.
        Without room nothing is queued, the ticket says full, and the
        message is dropped and counted, unless ``required``, when it is the
        guarding InsertChat that fails (FULL).  Never is what is queued
        already dropped to make room: it may have been promised to someone.
        headroom lets the queue exceed its limits by a tenth, for frames
        about the client's own actions.  A notice goes with the message, for
        the IQueueWatcher.
        """

    def wake(client_id: str) -> None:
        """
        The store has new messages for client_id, committed by another
        process: if the client is connected here, read them (everything
        above what its session has taken in, in seq order, each once) as
        its window drains.  Nothing when it is not connected here.
        """

    def disconnect(client_id: str) -> None:
        """Close the client's connection here, if it has one (a ban is Bans's)."""

    def release(client_id: str) -> Deferred[None]:
        """
        Give client_id's session up to another process: close its connection
        here as a takeover (after a CONNECT being opened here, if one is),
        and fire once everything this process committed for that session,
        what it acknowledged and what it was sent included, is settled in
        the store.  What a cluster's ISessionGate.before_open on another
        node waits for from this one.
        """

    def remove(plan: Plan, client_id: str) -> None:
        """
        Forget the client's session and its queue, in the store with plan,
        and close its connection: the account is gone.
        """

    def expire(before: int) -> Deferred[tuple[int, int]]:
        """
        Drop the messages queued before ``before`` (milliseconds since the
        epoch), except those in flight on a connection, and then the sessions
        that no client ever connected to and that have nothing queued.  Fire
        with how many messages and sessions went, once that is durable.
        """
