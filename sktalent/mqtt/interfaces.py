"""
The seams of the MQTT core: who may do what, and what the application adds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import attrs
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from ..store.interfaces import Message
from .packets import Packet, Will
from .plan import Plan


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


class QueuedView(Protocol):
    """What those outside the broker see of a queued message."""

    @property
    def seq(self) -> int: ...

    @property
    def notice(self) -> str | None: ...

    # The IQueueWatcher's own mark: it decided to push the message.
    pushed: bool


class SessionView(Protocol):
    """
    What those outside the broker see of a session.  Only the broker changes
    it: a queued message stays in ``queue`` until acknowledged or expired.
    """

    @property
    def client_id(self) -> str: ...

    @property
    def persistent(self) -> bool: ...

    @property
    def connection(self) -> IConnection | None: ...

    @property
    def queue(self) -> Mapping[int, QueuedView]: ...

    # How many queued messages carry a notice.
    @property
    def notices(self) -> int: ...


class IQueueWatcher(Interface):
    """
    Follows the queued messages that carry a notice, to push them while they
    go unacknowledged.
    """

    def queued(session: SessionView, out: QueuedView) -> None:
        """out, which has a notice, is now durable in session's queue."""

    def resumed(session: SessionView) -> None:
        """
        session's queue is handed over afresh: to a new connection, or to no
        connection after the server restored it.
        """

    def detached(session: SessionView) -> None:
        """session's connection ended; its queue is still there."""


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
    What the application and the operators' jobs use of the broker: sessions
    by client id, and plans to commit.
    """

    def commit(plan: Plan) -> Deferred[None]:
        """
        Commit plan in the broker's pipeline: its effects run once its
        operations are durable, behind every plan committed before it.
        Fails when the store failed the commit.
        """

    def session(client_id: str) -> SessionView | None:
        """The client's session, if it has one."""

    def is_online(client_id: str) -> bool:
        """Whether the client has a live connection."""

    def status(client_id: str) -> SessionStatus | None:
        """The client's session as it is now, if it has one."""

    def has_room(client_id: str, size: int) -> bool:
        """
        Whether client_id's queue (empty if it has no session yet) has room
        for a message of size payload bytes, counting what plans not yet
        committed have reserved.
        """

    def enqueue(
        plan: Plan,
        client_id: str,
        message: Message,
        *,
        headroom: bool = False,
        notice: str | None = None,
    ) -> bool:
        """
        Queue message (QoS 1 or 2) for client_id once plan is durable, in a
        persistent session with the default subscriptions if it has none,
        reserving its room now so that no later plan can take it.  Without
        room the message is dropped, counted, and False answered: never what
        is queued already, which may have been promised to someone.
        headroom lets the queue exceed its limits by a tenth, for frames
        about the client's own actions.  A notice goes with the message, for
        the IQueueWatcher.
        """

    def disconnect(client_id: str) -> bool:
        """
        Close the client's connection, if any (a ban is Bans's).  False when
        the client has no session.
        """

    def remove(plan: Plan, client_id: str) -> None:
        """
        Forget the client's session and its queue, now in memory and with
        plan in the store, and close its connection: the account is gone.
        """

    def expire(before: int) -> Deferred[tuple[int, int]]:
        """
        Drop the messages queued before ``before`` (milliseconds since the
        epoch), except those in flight on a connection, and then the sessions
        that no client ever connected to and that have nothing queued.  Fire
        with how many messages and sessions went, once that is durable.
        """
