"""
The seams of the MQTT core: who may do what, and what the application adds.
"""

from __future__ import annotations

from twisted.cred.error import UnauthorizedLogin
from zope.interface import Attribute, Interface

from ..store.interfaces import Message
from .packets import Will
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
