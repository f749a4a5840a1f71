"""
Credential checkers for MQTT CONNECT: the username is the userID and the
password its authSign, checked either against the shared secret or by the
business backend's HTTP hook.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
from treq.client import HTTPClient
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from zope.interface import Interface, implementer

from ..authsign import valid_user_id, verify
from ..logs import without_credentials
from ..mqtt.interfaces import IdentifierRejected, ServiceUnavailable

log = Logger()


def _text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


def _user_and_sign(credentials: IUsernamePassword) -> tuple[str, str]:
    """
    The userID and authSign in credentials.

    @raise IdentifierRejected: the userID is not usable.
    @raise UnauthorizedLogin: the authSign is missing or unusable.
    """
    user_id = _text(credentials.username)
    if user_id is None or not valid_user_id(user_id):
        raise IdentifierRejected("unusable userID")
    auth_sign = _text(credentials.password)
    if not auth_sign:
        raise UnauthorizedLogin("missing or undecodable authSign")
    return user_id, auth_sign


# Avatar IDs as ICredentialsChecker types them; these checkers give bytes.
_AvatarId = bytes | tuple[()]


def _avatar_id(user_id: str) -> bytes:
    """The avatar ID of an authenticated userID: its UTF-8 bytes, as cred has it."""
    return user_id.encode("utf-8")


@implementer(ICredentialsChecker)
@attrs.define
class AuthSignChecker:
    """
    Accepts a userID whose password is its authSign under the shared secret.
    """

    credentialInterfaces: ClassVar[tuple[type[Interface], ...]] = (IUsernamePassword,)

    _secret: bytes
    _clock: IReactorTime

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[_AvatarId]:
        try:
            user_id, auth_sign = _user_and_sign(credentials)
        except UnauthorizedLogin as e:
            return fail(e)
        if not verify(self._secret, user_id, auth_sign, self._clock.seconds()):
            return fail(UnauthorizedLogin("wrong or expired authSign"))
        return succeed(_avatar_id(user_id))


@implementer(ICredentialsChecker)
@attrs.define
class HookChecker:
    """
    Asks the backend's hook: POST JSON ``{"user_id", "auth_sign"}`` to url;
    200 allows, 401 and 403 refuse, and anything else, including no answer
    within timeout seconds, leaves the login undecided (ServiceUnavailable).
    """

    credentialInterfaces: ClassVar[tuple[type[Interface], ...]] = (IUsernamePassword,)

    _url: str
    _http: HTTPClient
    _clock: IReactorTime
    _timeout: float = 5.0

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[_AvatarId]:
        return Deferred.fromCoroutine(self._check(credentials))

    async def _check(self, credentials: IUsernamePassword) -> bytes:
        user_id, auth_sign = _user_and_sign(credentials)
        exchange = Deferred.fromCoroutine(self._ask(user_id, auth_sign))
        # On timeout the exchange is cancelled, which aborts the connection.
        exchange.addTimeout(self._timeout, self._clock)
        try:
            code = await exchange
        except Exception as e:
            log.error(
                "auth hook {url} failed for {user_id}: {error}",
                url=without_credentials(self._url),
                user_id=user_id,
                error=e,
            )
            raise ServiceUnavailable("auth hook failed") from e
        if code == 200:
            return _avatar_id(user_id)
        if code in (401, 403):
            raise UnauthorizedLogin(f"auth hook refused ({code})")
        log.error(
            "auth hook {url} answered {code} for {user_id}",
            url=without_credentials(self._url),
            code=code,
            user_id=user_id,
        )
        raise ServiceUnavailable(f"auth hook answered {code}")

    async def _ask(self, user_id: str, auth_sign: str) -> int:
        response = await self._http.post(
            self._url,
            json={"user_id": user_id, "auth_sign": auth_sign},
            unbuffered=True,
            # The hook itself must answer: a redirect is an unexpected answer.
            allow_redirects=False,
        )
        # Read to the end, so that a pooled connection can be reused.
        body = _DiscardBody()
        response.deliverBody(body)
        await body.done
        return response.code


class _DiscardBody(Protocol):
    """
    Reads a response body to its end; cancelling ``done`` closes the
    connection, so that a hook stalling mid-body holds nothing open.
    """

    def __init__(self) -> None:
        self.done: Deferred[None] = Deferred(self._close)

    def _close(self, done: Deferred[None]) -> None:
        # A body's transport is a producer proxy; stopping it closes the connection.
        self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            # Cancelled already: this is the closing the cancellation caused.
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)
