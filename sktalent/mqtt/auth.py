"""
The MQTT core's side of twisted.cred, and the rules of a plain broker.
"""

from __future__ import annotations

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IAnonymous, ICredentials, IUsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from .interfaces import IAuthorizer, IMQTTUser
from .packets import SUBSCRIBE_FAILURE, Will


@implementer(IMQTTUser)
@attrs.frozen
class MQTTUser:
    user_id: str


# Every client without a user name is this one (a value: one is as good as another).
_NOBODY = MQTTUser("")


@implementer(IRealm)
class MQTTRealm:
    def requestAvatar(self, avatarId, mind, *interfaces):
        if IMQTTUser not in interfaces:
            raise NotImplementedError("MQTTRealm only provides IMQTTUser")
        user_id = avatarId.decode() if isinstance(avatarId, bytes) else avatarId
        return IMQTTUser, MQTTUser(user_id) if user_id else _NOBODY, lambda: None


@implementer(ICredentialsChecker)
class AllowEveryone:
    """
    Development only: any username and password, or none, is accepted.
    """

    credentialInterfaces = (IUsernamePassword, IAnonymous)

    def requestAvatarId(self, credentials: ICredentials) -> Deferred[bytes | tuple[()]]:
        return succeed(getattr(credentials, "username", None) or b"")


def portal_for(*checkers: ICredentialsChecker) -> Portal:
    return Portal(MQTTRealm(), checkers)


@implementer(IAuthorizer)
@attrs.frozen
class AllowEverything:
    """
    A plain MQTT 3.1.1 broker: every client id, topic and filter is allowed,
    but for the filters an operator refuses by name.
    """

    refused: frozenset[str] = frozenset()

    def check_client_id(self, user: IMQTTUser, client_id: str) -> int:
        return 0

    def default_subscriptions(self, client_id: str) -> tuple[tuple[str, int], ...]:
        return ()

    def grant(self, user: IMQTTUser, client_id: str, topic_filter: str, qos: int) -> int:
        return SUBSCRIBE_FAILURE if topic_filter in self.refused else qos

    def may_publish(self, user: IMQTTUser, client_id: str, topic: str) -> bool:
        return True

    def accept_will(self, user: IMQTTUser, client_id: str, will: Will) -> bool:
        return True
