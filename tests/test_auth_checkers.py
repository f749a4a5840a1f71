"""
Tests for sktalent.calltalent.auth: the two credential checkers, the hook
one against a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
from collections.abc import Sequence

from treq.client import HTTPClient
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface.verify import verifyObject

from sktalent.authsign import sign
from sktalent.calltalent.auth import AuthSignChecker, HookChecker
from sktalent.mqtt.interfaces import IdentifierRejected, ServiceUnavailable

from .tracking import ConnectionTracker

SECRET = b"s3cret"


def hmac_hex(message: str) -> str:
    """The HMAC-SHA256 of message under SECRET, computed independently."""
    return hmac.new(SECRET, message.encode("utf-8"), hashlib.sha256).hexdigest()


class AuthSignCheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.checker = AuthSignChecker(SECRET, self.clock)

    def login(self, username: bytes, password: bytes) -> Deferred[bytes | tuple[()]]:
        """Ask the checker about username and password."""
        return self.checker.requestAvatarId(UsernamePassword(username, password))

    def test_interface(self) -> None:
        """
        The checker is a cred checker for username and password.
        """
        self.assertTrue(verifyObject(ICredentialsChecker, self.checker))

    def test_accepted(self) -> None:
        """
        The right authSign yields the userID (UTF-8 bytes, as cred has it)
        as avatar ID, whether the username comes as bytes or text.
        """
        password = hmac_hex("alice").encode("ascii")
        self.assertEqual(self.successResultOf(self.login(b"alice", password)), b"alice")
        # Some IUsernamePassword providers carry the username as text.
        text = UsernamePassword("alice", password)  # type: ignore[arg-type]
        self.assertEqual(self.successResultOf(self.checker.requestAvatarId(text)), b"alice")

    def test_non_ascii_user(self) -> None:
        """
        A non-ASCII userID is checked against the HMAC of its UTF-8 form.
        """
        password = hmac_hex("用户").encode("ascii")
        avatar_id = self.successResultOf(self.login("用户".encode(), password))
        self.assertEqual(avatar_id, "用户".encode())

    def test_refused(self) -> None:
        """
        A wrong, missing, empty or undecodable password is unauthorized.
        """
        for password in [hmac_hex("bob").encode("ascii"), b"", b"\xff" * 64]:
            with self.subTest(password=password):
                self.failureResultOf(self.login(b"alice", password), UnauthorizedLogin)
        missing = UsernamePassword(b"alice", None)  # type: ignore[arg-type]
        self.failureResultOf(self.checker.requestAvatarId(missing), UnauthorizedLogin)

    def test_unusable_user_id(self) -> None:
        """
        An unusable userID, "system" among them, is rejected as an
        identifier (CONNACK 2) even with the HMAC of it under the secret.
        """
        for user_id in ["a/b", "a" * 129, "", "x#", "system", "alice:4102444800", "a\x85"]:
            with self.subTest(user_id=user_id):
                password = hmac_hex(user_id).encode("ascii")
                self.failureResultOf(self.login(user_id.encode(), password), IdentifierRejected)
        self.failureResultOf(self.login(b"\xff", hmac_hex("x").encode("ascii")), IdentifierRejected)

    def test_expiry_follows_clock(self) -> None:
        """
        An expiring sign is accepted until the clock passes its expiry.
        """
        password = sign(SECRET, "alice", 1060).encode("ascii")
        self.clock.advance(60)
        self.assertEqual(self.successResultOf(self.login(b"alice", password)), b"alice")
        self.clock.advance(1)
        self.failureResultOf(self.login(b"alice", password), UnauthorizedLogin)


def _port_number(port: IListeningPort) -> int:
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    return address.port


class _Hook(Resource):
    """
    An auth hook answering every POST with ``code``, or never when
    ``code`` is None; with ``stall_body`` it sends its headers and part of
    the body, then nothing more.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.code: int | None = 200
        self.stall_body = False
        self.bodies: list[object] = []
        self.content_types: list[Sequence[bytes] | None] = []
        self.arrived: Deferred[Request] = Deferred()

    def render_POST(self, request: Request) -> bytes | int:
        assert request.content is not None
        self.bodies.append(json.loads(request.content.read()))
        self.content_types.append(request.requestHeaders.getRawHeaders(b"content-type"))
        if self.code is None:
            self.arrived.callback(request)
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        if self.stall_body:
            request.setHeader(b"content-length", b"100")
            request.write(b"partial")
            self.arrived.callback(request)
            return NOT_DONE_YET
        return b'{"detail": "a body the checker must read and discard"}'


class HookCheckerTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.hook = _Hook()
        self.tracker = ConnectionTracker(Site(self.hook))
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        # Listening on TCP happens at once; the Deferred has fired already.
        port = self.successResultOf(endpoint.listen(self.tracker))
        self.url = f"http://127.0.0.1:{_port_number(port)}/auth"
        # Cleanups run last first: client connections, then the server's, then the port.
        self.addCleanup(port.stopListening)
        self.addCleanup(self.tracker.all_closed)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(self.pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))

    def checker(self, url: str | None = None) -> HookChecker:
        """A HookChecker for the hook, timing out after 0.5 s of the real clock."""
        return HookChecker(url or self.url, self.http, reactor, timeout=0.5)

    def login(self, checker: HookChecker, user_id: str = "alice") -> Deferred[bytes | tuple[()]]:
        """Ask checker about user_id with the password "sign-of-alice"."""
        return checker.requestAvatarId(UsernamePassword(user_id.encode(), b"sign-of-alice"))

    async def test_allowed(self) -> None:
        """
        200 allows: the hook got the userID and authSign as JSON.
        """
        checker = self.checker()
        self.assertTrue(verifyObject(ICredentialsChecker, checker))
        self.assertEqual(await self.login(checker), b"alice")
        self.assertEqual(self.hook.bodies, [{"user_id": "alice", "auth_sign": "sign-of-alice"}])
        self.assertEqual(self.hook.content_types, [[b"application/json; charset=UTF-8"]])

    async def test_denied(self) -> None:
        """
        401 and 403 refuse the login.
        """
        for code in (401, 403):
            self.hook.code = code
            with self.assertRaises(UnauthorizedLogin):
                await self.login(self.checker())

    async def test_other_answer(self) -> None:
        """
        Any other status, error or not, leaves the login undecided.
        """
        for code in (500, 503, 404, 204, 302):
            self.hook.code = code
            with self.assertRaises(ServiceUnavailable):
                await self.login(self.checker())

    async def test_connection_reused(self) -> None:
        """
        The answer's body is read, so consecutive checks share one pooled
        connection, whatever the answer.
        """
        checker = self.checker()
        self.assertEqual(await self.login(checker), b"alice")
        self.hook.code = 403
        with self.assertRaises(UnauthorizedLogin):
            await self.login(checker, "bob")
        self.hook.code = 200
        self.assertEqual(await self.login(checker, "carol"), b"carol")
        self.assertEqual(len(self.hook.bodies), 3)
        self.assertEqual(self.tracker.accepted, 1)

    async def test_unusable_user_never_asked(self) -> None:
        """
        An unusable userID is rejected as an identifier without asking the
        hook.
        """
        for user_id in ["a/b", "system", "alice:4102444800"]:
            with self.assertRaises(IdentifierRejected):
                await self.login(self.checker(), user_id)
        self.assertEqual(self.hook.bodies, [])

    async def test_hook_never_answers(self) -> None:
        """
        A hook that never answers leaves the login undecided once the
        timeout has passed, and its connection is closed.
        """
        self.hook.code = None
        clock = Clock()
        checker = HookChecker(self.url, self.http, clock, timeout=5)
        login = self.login(checker)
        request = await self.hook.arrived
        finished = request.notifyFinish()
        clock.advance(4.9)
        self.assertNoResult(login)
        clock.advance(0.1)
        self.failureResultOf(login, ServiceUnavailable)
        # The server sees the request's connection go away.
        with self.assertRaises((ConnectionDone, ConnectionLost)):
            await finished

    async def test_hook_stalls_mid_body(self) -> None:
        """
        A hook that stops sending halfway through its answer leaves the
        login undecided after the timeout, and its connection is closed.
        The reactor is the clock here: the answer's start must reach the
        checker before the timeout for the body to be what stalls.
        """
        self.hook.stall_body = True
        login = self.login(self.checker())
        request = await self.hook.arrived
        finished = request.notifyFinish()
        with self.assertRaises(ServiceUnavailable):
            await login
        with self.assertRaises((ConnectionDone, ConnectionLost)):
            await finished

    async def test_connection_refused(self) -> None:
        """
        A hook nobody listens for leaves the login undecided.
        """
        # A port just bound and released without listening refuses connections.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            number = s.getsockname()[1]
        with self.assertRaises(ServiceUnavailable):
            await self.login(self.checker(f"http://127.0.0.1:{number}/auth"))
