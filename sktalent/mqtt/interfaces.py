"""
The seams of the MQTT core: who may do what, and what the application adds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from twisted.cred.error import UnauthorizedLogin
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

    # The IQueueWatcher's own mark: it pushed the message.
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
