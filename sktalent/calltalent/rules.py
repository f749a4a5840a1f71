"""
Who may use which topic in CallTalent (INTERFACE.md section 2).
"""

from __future__ import annotations

from zope.interface import implementer

from ..authsign import valid_user_id
from ..mqtt.interfaces import IAuthorizer, IMQTTUser
from ..mqtt.packets import ACCEPTED, REFUSED_IDENTIFIER, SUBSCRIBE_FAILURE, Will

SERVER_TOPIC = "$sktalent/server/mqttserver"


def client_topic(user_id: str) -> str:
    """The topic everything for user_id is sent to."""
    return f"$sktalent/clients/{user_id}"


@implementer(IAuthorizer)
class CallTalentRules:
    def check_client_id(self, user: IMQTTUser, client_id: str) -> int:
        if client_id != user.user_id or not valid_user_id(client_id):
            return REFUSED_IDENTIFIER
        return ACCEPTED

    def default_subscriptions(self, client_id: str) -> tuple[tuple[str, int], ...]:
        return ((client_topic(client_id), 1),)

    def grant(self, user: IMQTTUser, client_id: str, topic_filter: str, qos: int) -> int:
        if topic_filter != client_topic(client_id):
            return SUBSCRIBE_FAILURE
        return min(qos, 1)

    def may_publish(self, user: IMQTTUser, client_id: str, topic: str) -> bool:
        return topic == SERVER_TOPIC

    def accept_will(self, user: IMQTTUser, client_id: str, will: Will) -> bool:
        # Clients have no use for wills, and one would bypass the topic rules.
        return False
