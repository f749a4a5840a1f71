"""
The backend HTTP API, served on a real port on 127.0.0.1 and called over
HTTP, in front of a small application that records what it is asked and
keeps devices and chat in a MemoryStore; and the notification rules.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, cast

import attrs
from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IListeningPort, IReactorTCP, IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from zope.interface import implementer

from sktalent.api.resource import MAX_BAN, api_site, load_tokens
from sktalent.calltalent.interfaces import ICallTalent, InvalidRequest, QueueFull, SessionInfo
from sktalent.calltalent.notifications import (
    EXPERT_STATUSES,
    NOTE_STATUSES,
    ORDER_STATUSES,
    validate_notification,
    validate_user_id,
)
from sktalent.cluster.interfaces import BackendDown
from sktalent.metrics import Metrics
from sktalent.store.interfaces import (
    ChatRecord,
    Device,
    InsertChat,
    LogOut,
    Op,
    PutDevice,
    StoreUnavailable,
)
from sktalent.store.memory import MemoryStore

from .helpers import eventually, msgid, temp_file
from .tracking import ConnectionTracker

TOKEN = "s3cret-Token_1"
OTHER_TOKEN = "another.token~2=="
MAX_BODY = 2048
JSON = "application/json; charset=utf-8"

# One valid payload per notification type.
PAYLOADS: dict[str, dict[str, str]] = {
    "order": {"status": "paid", "o_id": "o-17"},
    "note": {"status": "replied", "note_id": "n-3"},
    "feedback": {"content": "Thanks, fixed in the next release."},
    "expert": {"status": "verified", "content": "apply"},
}


@implementer(ICallTalent)
@attrs.define
class RecordingApp:
    """
    The application side of the API, reduced to recording calls.  ``failure``
    makes the Deferred-returning calls fail with it, ``refuse`` is raised by
    notify, and ``hold`` makes notify wait until cancelled.
    """

    metrics: Metrics = attrs.Factory(Metrics)
    store: MemoryStore = attrs.Factory(MemoryStore)
    online: set[str] = attrs.Factory(set)
    failure: Exception | None = None
    refuse: InvalidRequest | QueueFull | None = None
    hold: bool = False
    notified: list[tuple[str, str, dict[str, object], str | None]] = attrs.Factory(list)
    webviews: list[tuple[list[str] | None, str | None, str, str]] = attrs.Factory(list)
    histories: list[tuple[str, int, str | None]] = attrs.Factory(list)
    held: list[Deferred[str]] = attrs.Factory(list)
    cancelled: list[Deferred[str]] = attrs.Factory(list)
    sessions: dict[str, SessionInfo] = attrs.Factory(dict)
    disconnects: list[tuple[str, int | None]] = attrs.Factory(list)
    deleted: list[str] = attrs.Factory(list)
    # Parts besides the store that health() reports, as a cluster node has.
    parts: dict[str, bool] = attrs.Factory(dict)

    def _result(self, value: Any) -> Deferred[Any]:
        return succeed(value) if self.failure is None else fail(self.failure)

    def notify(
        self, to: str, type: str, payload: Mapping[str, object], alert: str | None
    ) -> Deferred[str]:
        validate_notification(type, payload)
        if self.refuse is not None:
            raise self.refuse
        self.notified.append((to, type, dict(payload), alert))
        if self.hold:
            held: Deferred[str] = Deferred(self.cancelled.append)
            self.held.append(held)
            return held
        return self._result(msgid(len(self.notified)))

    def push_webview(
        self, users: Sequence[str] | None, tag: str | None, url: str, alert: str
    ) -> None:
        self.webviews.append((None if users is None else list(users), tag, url, alert))

    def register_device(self, device: Device) -> Deferred[None]:
        return self._commit(PutDevice(device))

    def log_out(self, user_id: str) -> Deferred[None]:
        return self._commit(LogOut(user_id))

    def _commit(self, op: Op) -> Deferred[None]:
        if self.failure is not None:
            return fail(self.failure)
        return self.store.submit([op]).addCallback(lambda _: None)

    def is_online(self, user_id: str) -> Deferred[bool]:
        return self._result(user_id in self.online)

    def session_info(self, user_id: str) -> Deferred[SessionInfo | None]:
        return self._result(self.sessions.get(user_id))

    def disconnect(self, user_id: str, ban_seconds: int | None) -> Deferred[bool]:
        self.disconnects.append((user_id, ban_seconds))
        return self._result(user_id in self.sessions)

    def delete_user(self, user_id: str) -> Deferred[None]:
        self.deleted.append(user_id)
        return self._result(None)

    def history(self, o_id: str, limit: int, before: str | None) -> Deferred[list[ChatRecord]]:
        self.histories.append((o_id, limit, before))
        if self.failure is not None:
            return fail(self.failure)
        return self.store.chat_history(o_id, limit, before)

    def health(self) -> Deferred[dict[str, bool]]:
        return succeed({"store": self.failure is None, **self.parts})


@attrs.frozen
class Reply:
    status: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return None if values is None else values[-1]

    def json(self) -> Any:
        return json.loads(self.body)


class _RawClient(Protocol):
    """Collects everything the server sends until it closes the connection."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(self.received)


def raw_request(
    method: str, path: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
) -> bytes:
    """An HTTP/1.1 request as bytes, asking the server to close after answering."""
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    head += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def split_response(raw: bytes) -> tuple[bytes, bytes]:
    """The status line and headers, and the body, of one HTTP response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


_DROP = object()


def notification(**changes: object) -> dict[str, object]:
    """A valid notification body, with fields changed or (given _DROP) dropped."""
    body: dict[str, object] = {"to": "bob", "type": "order", "payload": PAYLOADS["order"]}
    body.update(changes)
    return {name: value for name, value in body.items() if value is not _DROP}


_NO_BODY = object()


def listen(factory: ServerFactory[Any]) -> tuple[IListeningPort, str]:
    """Listen on a free port of 127.0.0.1; return the port and its base URL."""
    port = cast(IReactorTCP, reactor).listenTCP(0, factory, interface="127.0.0.1")
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    return port, f"http://127.0.0.1:{address.port}"


_AUTHORIZED = (("Authorization", f"Bearer {TOKEN}"),)


class ApiTestCase(TestCase):
    """A site with the API on a port of 127.0.0.1, and an HTTP client for it."""

    timeout = 20
    tokens: Sequence[str] | None = (TOKEN, OTHER_TOKEN)

    def setUp(self) -> None:
        self.app = RecordingApp()
        self.tracker = ConnectionTracker(api_site(self.app, self.tokens, max_body=MAX_BODY))
        # Twisted types WrappingFactory a client factory; it serves as well.
        self.port, self.base = listen(self.tracker)  # type: ignore[arg-type]
        # Cleanups run last first: client connections, then the server's, then the port.
        self.addCleanup(self.port.stopListening)
        self.addCleanup(self.tracker.all_closed)
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool))

    async def call(
        self,
        method: str,
        path: str,
        body: object = _NO_BODY,
        *,
        token: str | None = TOKEN,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
    ) -> Reply:
        """
        Call the API: body is sent as JSON, or data as it is; headers
        override the ones this sets.
        """
        sent = Headers()
        if token is not None:
            sent.setRawHeaders("Authorization", [f"Bearer {token}"])
        if body is not _NO_BODY:
            data = json.dumps(body).encode()
            sent.setRawHeaders("Content-Type", ["application/json"])
        for name, value in (headers or {}).items():
            sent.setRawHeaders(name, [value])
        response = await self.http.request(method, self.base + path, headers=sent, data=data)
        return Reply(response.code, response.headers, await response.content())

    async def raw(self, request: bytes) -> tuple[_RawClient, Deferred[bytes]]:
        """Send request bytes over a connection of their own."""
        client = _RawClient()
        address = self.port.getHost()
        assert isinstance(address, IPv4Address)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", address.port)
        await connectProtocol(endpoint, client)
        assert client.transport is not None
        client.transport.write(request)
        return client, client.closed

    def assertError(self, reply: Reply, status: int, code: str) -> None:
        """reply is a JSON error answer with that status and code."""
        self.assertEqual((reply.status, reply.header("Content-Type")), (status, JSON), reply.body)
        answer = reply.json()
        self.assertEqual(answer["error"], code, answer)
        self.assertIsInstance(answer["message"], str)
        self.assertTrue(answer["message"])

    def assertJSON(self, reply: Reply, status: int, value: object) -> None:
        """reply is a JSON answer with that status and value."""
        self.assertEqual(
            (reply.status, reply.header("Content-Type"), reply.json()), (status, JSON, value)
        )

    async def assertRefusals(
        self, method: str, path: str, cases: Sequence[tuple[object, str]]
    ) -> None:
        """Each body of cases is refused with 400 and its error code."""
        for body, code in cases:
            reply = await self.call(method, path, body)
            self.assertEqual(reply.status, 400, (body, reply.body))
            self.assertError(reply, 400, code)


class NotificationTests(ApiTestCase):
    async def test_notify(self) -> None:
        """A notification reaches the application, and its msgid the caller."""
        body = notification(alert="Your order was paid")
        reply = await self.call("POST", "/v1/notifications", body)
        self.assertJSON(reply, 202, {"msgid": msgid(1)})
        self.assertEqual(
            self.app.notified, [("bob", "order", PAYLOADS["order"], "Your order was paid")]
        )

    async def test_every_type(self) -> None:
        """Every type with its payload is accepted; no alert (or null) is None."""
        for type, payload in PAYLOADS.items():
            reply = await self.call(
                "POST", "/v1/notifications", notification(type=type, payload=payload)
            )
            self.assertEqual(reply.status, 202, reply.body)
        reply = await self.call("POST", "/v1/notifications", notification(alert=None))
        self.assertEqual(reply.status, 202, reply.body)
        self.assertEqual(
            [(type, payload, alert) for _, type, payload, alert in self.app.notified],
            [(type, payload, None) for type, payload in PAYLOADS.items()]
            + [("order", PAYLOADS["order"], None)],
        )

    async def test_longest_user_id(self) -> None:
        """A userID of 128 characters is accepted."""
        reply = await self.call("POST", "/v1/notifications", notification(to="u" * 128))
        self.assertEqual(reply.status, 202, reply.body)
        self.assertEqual(self.app.notified[0][0], "u" * 128)

    async def test_refused(self) -> None:
        """Every rule on the body is checked before the application is asked."""
        order = PAYLOADS["order"]
        await self.assertRefusals(
            "POST",
            "/v1/notifications",
            [
                (notification(to=_DROP), "bad_request"),
                (notification(payload=_DROP), "bad_request"),
                (notification(type=_DROP), "bad_request"),
                (notification(extra=1), "bad_request"),
                (notification(to=5), "bad_request"),
                (notification(to=""), "bad_request"),
                (notification(to="u" * 129), "bad_request"),
                (notification(to="a/b"), "bad_request"),
                (notification(to="a+b"), "bad_request"),
                (notification(to="a#b"), "bad_request"),
                (notification(to="a\0b"), "bad_request"),
                (notification(to="\ud800"), "bad_request"),
                (notification(alert=3), "bad_request"),
                (notification(alert=""), "bad_request"),
                (notification(type="order_chat"), "unknown_type"),
                (notification(type=["order"]), "unknown_type"),
                (notification(payload="paid"), "bad_payload"),
                (notification(payload={**order, "status": "shipped"}), "bad_payload"),
                (notification(payload={**order, "o_id": ""}), "bad_payload"),
                (notification(payload={**order, "o_id": "o" * 129}), "bad_payload"),
                (
                    notification(type="note", payload={"status": "paid", "note_id": "n" * 129}),
                    "bad_payload",
                ),
                (notification(payload={**order, "extra": "x"}), "bad_payload"),
                (notification(payload={"status": "paid"}), "bad_payload"),
                (notification(type="note", payload={**order}), "bad_payload"),
                (
                    notification(type="note", payload={"status": "pending", "note_id": "n"}),
                    "bad_payload",
                ),
                (
                    notification(type="expert", payload={"status": "paid", "content": "c"}),
                    "bad_payload",
                ),
                (notification(type="feedback", payload={"content": 7}), "bad_payload"),
                ([notification()], "bad_request"),
            ],
        )
        self.assertEqual(self.app.notified, [])

    async def test_not_json(self) -> None:
        """A body that is not UTF-8 JSON is refused with bad_json."""
        for data in [b"", b"{", b'{"to": "\xff"}', b'{"to": NaN}', b"[" * 1020 + b"]" * 1020]:
            reply = await self.call(
                "POST",
                "/v1/notifications",
                data=data,
                headers={"Content-Type": "application/json"},
            )
            self.assertError(reply, 400, "bad_json")
        self.assertEqual(self.app.notified, [])

    async def test_application_refusal(self) -> None:
        """The application's own InvalidRequest is answered 400 with its code."""
        self.app.refuse = InvalidRequest("too_large", "The content is too long.")
        reply = await self.call("POST", "/v1/notifications", notification())
        self.assertError(reply, 400, "too_large")
        self.assertEqual(reply.json()["message"], "The content is too long.")

    async def test_queue_full(self) -> None:
        """A recipient's full queue is answered 429 queue_full."""
        self.app.refuse = QueueFull("the queue of u1 is full; send the notification again later")
        reply = await self.call("POST", "/v1/notifications", notification())
        self.assertError(reply, 429, "queue_full")
        self.assertEqual(
            reply.json()["message"], "the queue of u1 is full; send the notification again later"
        )

    async def test_hang_up(self) -> None:
        """A caller that hangs up cancels the application's work for it."""
        self.app.hold = True
        body = json.dumps(notification()).encode()
        client, closed = await self.raw(
            raw_request(
                "POST",
                "/v1/notifications",
                [
                    *_AUTHORIZED,
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                ],
                body,
            )
        )
        await eventually(lambda: bool(self.app.held))
        self.assertEqual(self.app.cancelled, [])
        assert client.transport is not None
        client.transport.loseConnection()
        self.assertEqual(await closed, b"")
        await eventually(lambda: bool(self.app.cancelled))
        self.assertEqual(self.app.cancelled, self.app.held)


class AuthorizationTests(ApiTestCase):
    routes = [
        ("POST", "/v1/notifications"),
        ("POST", "/v1/push/webview"),
        ("PUT", "/v1/users/alice/device"),
        ("DELETE", "/v1/users/alice/device"),
        ("GET", "/v1/users/alice/presence"),
        ("GET", "/v1/orders/o1/messages"),
    ]

    async def test_without_token(self) -> None:
        """Every /v1 call without a token is refused 401, with a challenge."""
        for method, path in self.routes + [("GET", "/v1/nothing-here")]:
            reply = await self.call(method, path, {}, token=None)
            self.assertError(reply, 401, "unauthorized")
            self.assertEqual(reply.header("WWW-Authenticate"), "Bearer")

    async def test_wrong_token(self) -> None:
        """A wrong token, or the right one in another scheme, is refused 401."""
        for authorization in [
            f"Bearer {TOKEN}x",
            f"Bearer {TOKEN[:-1]}",
            "Bearer",
            f"Basic {TOKEN}",
            TOKEN,
        ]:
            reply = await self.call(
                "GET", "/v1/users/alice/presence", headers={"Authorization": authorization}
            )
            self.assertError(reply, 401, "unauthorized")

    async def test_any_token(self) -> None:
        """Each token of the list is accepted, and the scheme in any case."""
        for authorization in [f"Bearer {TOKEN}", f"Bearer {OTHER_TOKEN}", f"bearer {TOKEN}"]:
            reply = await self.call(
                "GET", "/v1/users/alice/presence", headers={"Authorization": authorization}
            )
            self.assertJSON(reply, 200, {"online": False})

    async def test_replaced_tokens(self) -> None:
        """Tokens replaced while serving: the new ones only are accepted from then on."""
        resource = self.tracker.wrappedFactory.resource
        resource.replace_tokens(["fresh-token"])
        reply = await self.call("GET", "/v1/users/alice/presence")
        self.assertError(reply, 401, "unauthorized")
        reply = await self.call("GET", "/v1/users/alice/presence", token="fresh-token")
        self.assertJSON(reply, 200, {"online": False})

    async def test_open_routes(self) -> None:
        """/healthz and /metrics need no token."""
        self.assertEqual((await self.call("GET", "/healthz", token=None)).status, 200)
        self.assertEqual((await self.call("GET", "/metrics", token=None)).status, 200)


class WithoutTokenFileTests(ApiTestCase):
    tokens = None

    async def test_v1_unavailable(self) -> None:
        """Without a token file every /v1 call is 503, token or not."""
        for method, path in AuthorizationTests.routes + [("GET", "/v1/nothing-here")]:
            for token in [TOKEN, None]:
                reply = await self.call(method, path, {}, token=token)
                self.assertError(reply, 503, "unavailable")
                self.assertIn("token file", reply.json()["message"])
        self.assertEqual(self.app.notified, [])

    async def test_open_routes(self) -> None:
        """/healthz and /metrics still answer."""
        self.assertJSON(
            await self.call("GET", "/healthz", token=None), 200, {"status": "ok", "store": "ok"}
        )
        self.assertEqual((await self.call("GET", "/metrics", token=None)).status, 200)


class WebviewTests(ApiTestCase):
    async def test_to_users(self) -> None:
        """A push to a list of users reaches the application."""
        body = {"to": ["alice", "bob"], "url": "https://example.com/a?b=1", "alert": "New!"}
        reply = await self.call("POST", "/v1/push/webview", body)
        self.assertJSON(reply, 202, {})
        self.assertEqual(
            self.app.webviews, [(["alice", "bob"], None, "https://example.com/a?b=1", "New!")]
        )

    async def test_to_tag(self) -> None:
        """A push to a tag reaches the application."""
        body = {"tag": "expert", "url": "http://example.com/", "alert": "Hello"}
        reply = await self.call("POST", "/v1/push/webview", body)
        self.assertJSON(reply, 202, {})
        self.assertEqual(self.app.webviews, [(None, "expert", "http://example.com/", "Hello")])

    async def test_most_users(self) -> None:
        """Up to 1000 users are accepted in one call."""
        users = [f"u{i}" for i in range(1000)]
        body = {"to": users, "url": "https://example.com/", "alert": "a"}
        # The list is larger than the small body limit of these tests.
        site = api_site(self.app, [TOKEN], max_body=65536)
        port, self.base = listen(site)
        self.addCleanup(port.stopListening)
        reply = await self.call("POST", "/v1/push/webview", body)
        self.assertEqual(reply.status, 202, reply.body)
        self.assertEqual(self.app.webviews[0][0], users)
        users.append("one-too-many")
        reply = await self.call("POST", "/v1/push/webview", body)
        self.assertError(reply, 400, "bad_request")

    async def test_refused(self) -> None:
        """Every rule on the body is checked before the application is asked."""
        ok = {"url": "https://example.com/", "alert": "a"}
        await self.assertRefusals(
            "POST",
            "/v1/push/webview",
            [
                ({**ok, "to": ["alice"], "tag": "expert"}, "bad_request"),
                (ok, "bad_request"),
                ({**ok, "to": []}, "bad_request"),
                ({**ok, "to": "alice"}, "bad_request"),
                ({**ok, "to": ["alice", "a/b"]}, "bad_request"),
                ({**ok, "to": ["alice", 5]}, "bad_request"),
                ({**ok, "tag": ""}, "bad_request"),
                ({**ok, "tag": ["expert"]}, "bad_request"),
                ({**ok, "tag": "t" * 129}, "bad_request"),
                ({"tag": "expert", "alert": "a"}, "bad_request"),
                ({"tag": "expert", "url": "https://example.com/"}, "bad_request"),
                ({**ok, "tag": "expert", "alert": ""}, "bad_request"),
                ({**ok, "tag": "expert", "alert": 1}, "bad_request"),
                ({**ok, "tag": "expert", "url": "ftp://example.com/"}, "bad_request"),
                ({**ok, "tag": "expert", "url": "https:///path"}, "bad_request"),
                ({**ok, "tag": "expert", "url": "https://exa mple.com/"}, "bad_request"),
                ({**ok, "tag": "expert", "url": "https://[::1/"}, "bad_request"),
                ({**ok, "tag": "expert", "url": "example.com"}, "bad_request"),
                ({**ok, "tag": "expert", "extra": 1}, "bad_request"),
            ],
        )
        self.assertEqual(self.app.webviews, [])


class DeviceTests(ApiTestCase):
    async def test_register(self) -> None:
        """A device is registered for the user of the path: 204, no body."""
        body = {"platform": "android", "device_token": "Ak3-token"}
        reply = await self.call("PUT", "/v1/users/alice/device", body)
        self.assertEqual((reply.status, reply.body), (204, b""))
        device = await self.app.store.get_device("alice")
        self.assertEqual(device, Device("alice", "android", "Ak3-token"))

    async def test_path_decoded(self) -> None:
        """The userID of the path is percent-decoded UTF-8."""
        body = {"platform": "ios", "device_token": "t"}
        reply = await self.call("PUT", "/v1/users/%E5%BC%A0%20san/device", body)
        self.assertEqual(reply.status, 204, reply.body)
        self.assertEqual(await self.app.store.get_device("张 san"), Device("张 san", "ios", "t"))

    async def test_refused(self) -> None:
        """Every rule on the body is checked before the application is asked."""
        await self.assertRefusals(
            "PUT",
            "/v1/users/alice/device",
            [
                ({"platform": "windows", "device_token": "t"}, "bad_request"),
                ({"platform": "IOS", "device_token": "t"}, "bad_request"),
                ({"platform": ["ios"], "device_token": "t"}, "bad_request"),
                ({"device_token": "t"}, "bad_request"),
                ({"platform": "ios"}, "bad_request"),
                ({"platform": "ios", "device_token": ""}, "bad_request"),
                ({"platform": "ios", "device_token": 12}, "bad_request"),
                ({"platform": "ios", "device_token": "t" * 129}, "bad_request"),
                ({"platform": "ios", "device_token": "t", "user": "bob"}, "bad_request"),
            ],
        )
        self.assertIsNone(await self.app.store.get_device("alice"))

    async def test_bad_user_id(self) -> None:
        """A path userID that cannot name a user is refused."""
        body = {"platform": "ios", "device_token": "t"}
        for user_id in ["a%2Fb", "a+b", "a%23b", "a%00b", "u" * 129, "%FF"]:
            reply = await self.call("PUT", f"/v1/users/{user_id}/device", body)
            self.assertError(reply, 400, "bad_request")

    async def test_log_out(self) -> None:
        """
        DELETE logs the user of the path out: 204, no body, their device kept
        and marked logged out; the next PUT registers it again.
        """
        body = {"platform": "ios", "device_token": "t"}
        await self.call("PUT", "/v1/users/%E5%BC%A0/device", body)
        reply = await self.call("DELETE", "/v1/users/%E5%BC%A0/device")
        self.assertEqual((reply.status, reply.body), (204, b""))
        self.assertEqual(await self.app.store.get_device("张"), Device("张", "ios", "t", True))
        await self.call("PUT", "/v1/users/%E5%BC%A0/device", body)
        self.assertEqual(await self.app.store.get_device("张"), Device("张", "ios", "t"))

    async def test_log_out_refused(self) -> None:
        """A path userID that cannot name a user is 400; a store down is 503."""
        for user_id in ["a%2Fb", "a+b", "u" * 129]:
            reply = await self.call("DELETE", f"/v1/users/{user_id}/device")
            self.assertError(reply, 400, "bad_request")
        self.app.failure = StoreUnavailable("down")
        reply = await self.call("DELETE", "/v1/users/alice/device")
        self.assertError(reply, 503, "unavailable")
        self.assertIsNone(await self.app.store.get_device("alice"))

    async def test_content_type(self) -> None:
        """A body that is not declared JSON is refused 415; parameters are allowed."""
        data = json.dumps({"platform": "ios", "device_token": "t"}).encode()
        for content_type in ["text/plain", "application/x-www-form-urlencoded", None]:
            headers = {} if content_type is None else {"Content-Type": content_type}
            reply = await self.call("PUT", "/v1/users/alice/device", data=data, headers=headers)
            self.assertError(reply, 415, "unsupported_media_type")
        self.assertIsNone(await self.app.store.get_device("alice"))
        headers = {"Content-Type": "Application/JSON; charset=utf-8"}
        reply = await self.call("PUT", "/v1/users/alice/device", data=data, headers=headers)
        self.assertEqual(reply.status, 204, reply.body)


class PresenceTests(ApiTestCase):
    async def test_presence(self) -> None:
        """A user is online exactly when the application says so."""
        self.app.online.add("alice")
        self.assertJSON(await self.call("GET", "/v1/users/alice/presence"), 200, {"online": True})
        self.assertJSON(await self.call("GET", "/v1/users/bob/presence"), 200, {"online": False})

    async def test_bad_user_id(self) -> None:
        """A path userID that cannot name a user is refused."""
        reply = await self.call("GET", "/v1/users/a%2Fb/presence")
        self.assertError(reply, 400, "bad_request")


class SessionTests(ApiTestCase):
    async def test_session(self) -> None:
        """A user's session is answered with exactly its six fields."""
        self.app.sessions["张三"] = SessionInfo(True, "mqtt-1:8075", 1_700_000_000_250, 3, 5, "ios")
        reply = await self.call("GET", "/v1/users/%E5%BC%A0%E4%B8%89/session")
        self.assertJSON(
            reply,
            200,
            {
                "online": True,
                "node": "mqtt-1:8075",
                "connected_since": 1_700_000_000_250,
                "queued": 3,
                "oldest_queued_at": 5,
                "platform": "ios",
            },
        )
        self.assertEqual(
            list(reply.json()),
            ["online", "node", "connected_since", "queued", "oldest_queued_at", "platform"],
        )
        self.app.sessions["bob"] = SessionInfo(False, None, None, 0, None, None)
        reply = await self.call("GET", "/v1/users/bob/session")
        self.assertEqual(
            reply.json(),
            {
                "online": False,
                "node": None,
                "connected_since": None,
                "queued": 0,
                "oldest_queued_at": None,
                "platform": None,
            },
        )

    async def test_refused(self) -> None:
        """No session is 404; a bad userID 400; without a token 401; a store down 503."""
        self.assertError(await self.call("GET", "/v1/users/nobody/session"), 404, "not_found")
        self.assertError(await self.call("GET", "/v1/users/a%2Fb/session"), 400, "bad_request")
        reply = await self.call("GET", "/v1/users/bob/session", token=None)
        self.assertError(reply, 401, "unauthorized")
        self.app.failure = StoreUnavailable("down")
        self.assertError(await self.call("GET", "/v1/users/bob/session"), 503, "unavailable")


class DisconnectTests(ApiTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.app.sessions["bob"] = SessionInfo(True, "n", 1, 0, None, None)

    async def test_disconnect(self) -> None:
        """
        Without a body, or with {} or a ban, the user is disconnected: 204
        with no body.
        """
        reply = await self.call("POST", "/v1/users/bob/disconnect")
        self.assertEqual((reply.status, reply.body), (204, b""))
        reply = await self.call("POST", "/v1/users/bob/disconnect", {})
        self.assertEqual((reply.status, reply.body), (204, b""))
        for ban in (0, 3600, MAX_BAN):
            reply = await self.call("POST", "/v1/users/bob/disconnect", {"ban_seconds": ban})
            self.assertEqual((reply.status, reply.body), (204, b""))
        reply = await self.call("POST", "/v1/users/bob/disconnect", {"ban_seconds": None})
        self.assertEqual(reply.status, 204)
        self.assertEqual(
            self.app.disconnects,
            [
                ("bob", None),
                ("bob", None),
                ("bob", 0),
                ("bob", 3600),
                ("bob", MAX_BAN),
                ("bob", None),
            ],
        )

    async def test_ban_written_with_a_fraction(self) -> None:
        """
        A whole number written as 3600.0 is that number (JSON does not tell
        them apart, nor does the API document): the ban is 3600 seconds.
        """
        data = b'{"ban_seconds": 3600.0}'
        headers = {"Content-Type": "application/json"}
        reply = await self.call("POST", "/v1/users/bob/disconnect", data=data, headers=headers)
        self.assertEqual(reply.status, 204, reply.body)
        self.assertEqual(self.app.disconnects, [("bob", 3600)])
        self.assertIsInstance(self.app.disconnects[0][1], int)

    async def test_refused(self) -> None:
        """A bad body is 400 and disconnects nobody; no session is 404."""
        await self.assertRefusals(
            "POST",
            "/v1/users/bob/disconnect",
            [
                ({"ban_seconds": -1}, "bad_request"),
                ({"ban_seconds": 1.5}, "bad_request"),
                ({"ban_seconds": "60"}, "bad_request"),
                ({"ban_seconds": True}, "bad_request"),
                ({"ban_seconds": MAX_BAN + 1}, "bad_request"),
                ({"ban": 60}, "bad_request"),
                ([60], "bad_request"),
            ],
        )
        reply = await self.call(
            "POST",
            "/v1/users/bob/disconnect",
            data=b"{60",
            headers={"Content-Type": "application/json"},
        )
        self.assertError(reply, 400, "bad_json")
        reply = await self.call("POST", "/v1/users/bob/disconnect", data=b'{"ban_seconds": 1}')
        self.assertError(reply, 415, "unsupported_media_type")
        self.assertEqual(self.app.disconnects, [])
        reply = await self.call("POST", "/v1/users/nobody/disconnect", {"ban_seconds": 60})
        self.assertError(reply, 404, "not_found")
        reply = await self.call("POST", "/v1/users/a%2Fb/disconnect")
        self.assertError(reply, 400, "bad_request")
        reply = await self.call("POST", "/v1/users/bob/disconnect", token=None)
        self.assertError(reply, 401, "unauthorized")
        self.assertEqual(self.app.disconnects, [("nobody", 60)])


class DeleteUserTests(ApiTestCase):
    async def test_delete(self) -> None:
        """DELETE of a user is 204 with no body, also for one the server does not know."""
        for user_id in ("bob", "nobody"):
            reply = await self.call("DELETE", f"/v1/users/{user_id}")
            self.assertEqual((reply.status, reply.body), (204, b""))
        self.assertEqual(self.app.deleted, ["bob", "nobody"])

    async def test_refused(self) -> None:
        """A bad userID is 400, no token 401, a store down 503; GET there is 405."""
        self.assertError(await self.call("DELETE", "/v1/users/a%2Fb"), 400, "bad_request")
        self.assertError(
            await self.call("DELETE", "/v1/users/bob", token=None), 401, "unauthorized"
        )
        self.assertEqual(self.app.deleted, [])
        self.app.failure = StoreUnavailable("down")
        self.assertError(await self.call("DELETE", "/v1/users/bob"), 503, "unavailable")
        reply = await self.call("GET", "/v1/users/bob")
        self.assertError(reply, 405, "method_not_allowed")
        self.assertEqual(reply.header("Allow"), "DELETE")


class HistoryTests(ApiTestCase):
    async def chats(self) -> list[ChatRecord]:
        """Store five chat messages of order o1 and one of o2; return o1's."""
        records = [
            ChatRecord(
                msgid=msgid(i),
                sender="alice",
                recipient="bob",
                o_id=o_id,
                envelope=json.dumps(
                    {
                        "msgid": msgid(i),
                        "from": "alice",
                        "to": "bob",
                        "type": "order_chat",
                        "payload": {
                            "o_id": o_id,
                            "expert": True,
                            "content": f"message {i}",
                            "t": str(1_700_000_000_000 + i),
                        },
                    }
                ),
                received_at=1_700_000_000_000 + i,
            )
            for i, o_id in enumerate(["o1", "o1", "o2", "o1", "o1", "o1"])
        ]
        await self.app.store.submit([InsertChat(record) for record in records])
        return [record for record in records if record.o_id == "o1"]

    async def test_default(self) -> None:
        """Without parameters: up to 50 of the order's messages, oldest first, as objects."""
        records = await self.chats()
        reply = await self.call("GET", "/v1/orders/o1/messages")
        self.assertJSON(reply, 200, {"messages": [json.loads(r.envelope) for r in records]})
        self.assertEqual(self.app.histories, [("o1", 50, None)])
        self.assertIsInstance(reply.json()["messages"][0], dict)
        self.assertIsInstance(reply.json()["messages"][0]["payload"], dict)

    async def test_paging(self) -> None:
        """limit and before reach the application and page the history."""
        records = await self.chats()
        reply = await self.call("GET", f"/v1/orders/o1/messages?limit=2&before={records[3].msgid}")
        self.assertJSON(reply, 200, {"messages": [json.loads(r.envelope) for r in records[1:3]]})
        self.assertEqual(self.app.histories, [("o1", 2, records[3].msgid)])

    async def test_limits(self) -> None:
        """limit may be 1 to 500; the order id is percent-decoded."""
        for limit in [1, 500]:
            reply = await self.call("GET", f"/v1/orders/o%201/messages?limit={limit}")
            self.assertJSON(reply, 200, {"messages": []})
        self.assertEqual(self.app.histories, [("o 1", 1, None), ("o 1", 500, None)])

    async def test_longest_o_id(self) -> None:
        """An order id may be 128 characters; a longer one names no order and is refused."""
        reply = await self.call("GET", f"/v1/orders/{'o' * 128}/messages")
        self.assertJSON(reply, 200, {"messages": []})
        reply = await self.call("GET", f"/v1/orders/{'o' * 129}/messages")
        self.assertError(reply, 400, "bad_request")
        self.assertEqual(self.app.histories, [("o" * 128, 50, None)])

    async def test_refused(self) -> None:
        """Bad paging parameters are refused before the application is asked."""
        for query in [
            "limit=0",
            "limit=501",
            "limit=-1",
            "limit=abc",
            "limit=",
            "limit=1e2",
            "limit=10000000000000000000000",
            "limit=5&limit=6",
            "before=" + "A" * 24,
            "before=" + "a" * 23,
            "before=" + "g" * 24,
            "before=",
            "after=" + "a" * 24,
        ]:
            reply = await self.call("GET", f"/v1/orders/o1/messages?{query}")
            self.assertError(reply, 400, "bad_request")
        self.assertEqual(self.app.histories, [])


class RoutingTests(ApiTestCase):
    async def test_not_found(self) -> None:
        """A path with nothing behind it is 404, with a token for /v1."""
        for path in [
            "/",
            "/nope",
            "/healthz/",
            "/v1",
            "/v1/nope",
            "/v1/users",
            "/v1/users/alice/device/more",
            "/v1/orders//messages",
            "/v1/users//presence",
        ]:
            self.assertError(await self.call("GET", path), 404, "not_found")

    async def test_method_not_allowed(self) -> None:
        """A path with another method is 405, naming the allowed one."""
        for method, path, allowed in [
            ("GET", "/v1/notifications", "POST"),
            ("PUT", "/v1/push/webview", "POST"),
            ("POST", "/v1/users/alice/device", "PUT, DELETE"),
            ("POST", "/v1/users/alice/presence", "GET"),
            ("PUT", "/v1/users/alice", "DELETE"),
            ("GET", "/v1/users/alice/disconnect", "POST"),
            ("DELETE", "/v1/users/alice/session", "GET"),
            ("POST", "/v1/orders/o1/messages", "GET"),
            ("POST", "/healthz", "GET"),
            ("PUT", "/metrics", "GET"),
        ]:
            reply = await self.call(method, path)
            self.assertError(reply, 405, "method_not_allowed")
            self.assertEqual(reply.header("Allow"), allowed)


class BodyLimitTests(ApiTestCase):
    def assertTooLarge(self, response: bytes) -> None:
        """response is a 413 JSON answer, and nothing else."""
        head, body = split_response(response)
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), response)
        self.assertNotIn(b"100 Continue", response)
        self.assertIn(b"Content-Type: " + JSON.encode(), head.split(b"\r\n"))
        self.assertEqual(json.loads(body)["error"], "too_large")

    async def test_declared_too_large(self) -> None:
        """A declared length over the limit is refused before any body is sent."""
        headers = [
            *_AUTHORIZED,
            ("Content-Type", "application/json"),
            ("Content-Length", str(MAX_BODY + 1)),
            ("Expect", "100-continue"),
        ]
        _, closed = await self.raw(raw_request("POST", "/v1/notifications", headers))
        self.assertTooLarge(await closed)
        self.assertEqual(self.app.notified, [])

    async def test_chunked_too_large(self) -> None:
        """A chunked body is refused as soon as it grows over the limit."""
        headers = [
            *_AUTHORIZED,
            ("Content-Type", "application/json"),
            ("Transfer-Encoding", "chunked"),
        ]
        chunk = b"%x\r\n%s\r\n" % (MAX_BODY, b" " * MAX_BODY)
        body = chunk + b"1\r\n \r\n0\r\n\r\n"
        _, closed = await self.raw(raw_request("POST", "/v1/notifications", headers, body))
        self.assertTooLarge(await closed)
        self.assertEqual(self.app.notified, [])

    async def test_at_the_limit(self) -> None:
        """A body of exactly the limit, declared or chunked, is accepted."""
        data = json.dumps(notification()).encode()
        data += b" " * (MAX_BODY - len(data))
        reply = await self.call(
            "POST", "/v1/notifications", data=data, headers={"Content-Type": "application/json"}
        )
        self.assertEqual(reply.status, 202, reply.body)
        headers = [
            *_AUTHORIZED,
            ("Content-Type", "application/json"),
            ("Transfer-Encoding", "chunked"),
        ]
        half = MAX_BODY // 2
        body = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, data[:half], half, data[half:])
        _, closed = await self.raw(raw_request("POST", "/v1/notifications", headers, body))
        head, _ = split_response(await closed)
        self.assertTrue(head.startswith(b"HTTP/1.1 202 "), head)
        self.assertEqual(len(self.app.notified), 2)


def families(exposition: bytes) -> set[str]:
    """The names of the metric families in a Prometheus text exposition."""
    return {family.name for family in text_string_to_metric_families(exposition.decode())}


class HealthAndMetricsTests(ApiTestCase):
    async def test_healthy(self) -> None:
        """/healthz is 200 when every part answers, and says so of each."""
        self.assertJSON(await self.call("GET", "/healthz"), 200, {"status": "ok", "store": "ok"})
        self.app.parts["redis"] = True
        self.assertJSON(
            await self.call("GET", "/healthz"), 200, {"status": "ok", "store": "ok", "redis": "ok"}
        )

    async def test_unhealthy(self) -> None:
        """/healthz is 503 when the store does not answer."""
        self.app.failure = StoreUnavailable("no answer")
        self.assertJSON(
            await self.call("GET", "/healthz"),
            503,
            {"status": "unavailable", "store": "unavailable"},
        )

    async def test_redis_down(self) -> None:
        """/healthz is 503 when Redis is down, and says that the store is not."""
        self.app.parts["redis"] = False
        self.assertJSON(
            await self.call("GET", "/healthz"),
            503,
            {"status": "unavailable", "store": "ok", "redis": "unavailable"},
        )

    async def test_cluster_unavailable(self) -> None:
        """
        A call that needs the cluster's Redis while it is down answers 503
        unavailable, saying so.
        """
        self.app.failure = BackendDown("Redis is unavailable")
        reply = await self.call("GET", "/v1/users/alice/presence")
        self.assertError(reply, 503, "unavailable")
        self.assertIn("Redis", reply.json()["message"])
        self.assertError(await self.call("POST", "/v1/users/bob/disconnect"), 503, "unavailable")

    async def test_metrics(self) -> None:
        """/metrics is the application's metrics in the Prometheus text format."""
        self.app.metrics.messages_in.labels("order_chat").inc(3)
        # Before the call: once answered, the call itself is counted.
        expected = families(self.app.metrics.exposition())
        reply = await self.call("GET", "/metrics", token=None)
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.header("Content-Type"), "text/plain; version=0.0.4; charset=utf-8")
        self.assertEqual(families(reply.body), expected)
        self.assertIn(b'sktalent_messages_in_total{type="order_chat"} 3.0\n', reply.body)

    async def test_requests_counted(self) -> None:
        """
        Every answer is counted and timed by the route it took, as the route
        table names it, and its status; a path that is no route, a method a
        path lacks, and a body refused before it is read count as "other",
        never by the path a client made up.
        """
        await self.call("GET", "/v1/users/alice/presence")
        await self.call("GET", "/v1/users/alice/presence", token=None)
        await self.call("GET", "/v1/made/up/path")
        await self.call("DELETE", "/healthz")
        headers = [*_AUTHORIZED, ("Content-Length", str(MAX_BODY + 1))]
        _, closed = await self.raw(raw_request("POST", "/v1/notifications", headers))
        await closed
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(self.app.metrics.exposition().decode())
            for sample in family.samples
            if sample.name.startswith("sktalent_api_")
        }
        presence = (("method", "GET"), ("route", "/v1/users/{userID}/presence"))
        other = (("method", "other"), ("route", "other"))
        requests = "sktalent_api_requests_total"
        self.assertEqual(samples[(requests, (*presence, ("status", "200")))], 1)
        self.assertEqual(samples[(requests, (*presence, ("status", "401")))], 1)
        for status in ("404", "405", "413"):
            self.assertEqual(samples[(requests, (*other, ("status", status)))], 1)
        self.assertEqual(samples[("sktalent_api_request_seconds_count", presence)], 2)
        self.assertGreaterEqual(samples[("sktalent_api_request_seconds_sum", presence)], 0)
        self.assertNotIn("alice", repr(samples))
        self.assertNotIn("made", repr(samples))


class FailureTests(ApiTestCase):
    async def test_store_unavailable(self) -> None:
        """A store that cannot be reached makes the call 503."""
        self.app.failure = StoreUnavailable("connection refused")
        for method, path, body in [
            ("POST", "/v1/notifications", notification()),
            ("PUT", "/v1/users/alice/device", {"platform": "ios", "device_token": "t"}),
            ("GET", "/v1/orders/o1/messages", _NO_BODY),
        ]:
            self.assertError(await self.call(method, path, body), 503, "unavailable")

    async def test_unexpected(self) -> None:
        """An unexpected failure is answered 500 and logged."""
        self.app.failure = RuntimeError("a bug")
        reply = await self.call("POST", "/v1/notifications", notification())
        self.assertError(reply, 500, "internal_error")
        self.assertNotIn("a bug", reply.json()["message"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ValidateNotificationTests(SynchronousTestCase):
    def assertRefused(self, type: object, payload: object, code: str) -> None:
        """validate_notification raises InvalidRequest with code."""
        with self.assertRaises(InvalidRequest) as raised:
            validate_notification(type, payload)
        self.assertEqual(raised.exception.code, code, (type, payload))
        self.assertTrue(str(raised.exception))

    def test_ids_bounded(self) -> None:
        """o_id and note_id may be 128 characters, not more."""
        for type, field in [("order", "o_id"), ("note", "note_id")]:
            payload = {**PAYLOADS[type], field: "i" * 128}
            self.assertEqual(validate_notification(type, payload), (type, payload))
            self.assertRefused(type, {**payload, field: "i" * 129}, "bad_payload")

    def test_every_status(self) -> None:
        """Every status of the seed is accepted with its type, and returned."""
        for type, field, statuses in [
            ("order", "o_id", ORDER_STATUSES),
            ("note", "note_id", NOTE_STATUSES),
            ("expert", "content", EXPERT_STATUSES),
        ]:
            for status in statuses:
                payload = {"status": status, field: "x"}
                self.assertEqual(validate_notification(type, payload), (type, payload))
        payload = {"content": "reply"}
        self.assertEqual(validate_notification("feedback", payload), ("feedback", payload))

    def test_seed_statuses(self) -> None:
        """The statuses are those of seed section 5."""
        self.assertEqual(
            set(ORDER_STATUSES),
            {"pending", "confirmed", "rejected", "paid", "toBeFinished", "finished"},
        )
        self.assertEqual(set(NOTE_STATUSES), {"paid", "replied"})
        self.assertEqual(set(EXPERT_STATUSES), {"verified", "fail"})

    def test_unknown_type(self) -> None:
        """A type that is not a notification type is unknown_type."""
        for type in ["order_chat", "Order", "", None, 5, ["order"]]:
            self.assertRefused(type, PAYLOADS["order"], "unknown_type")

    def test_unknown_status(self) -> None:
        """A status of another type, or of none, is bad_payload."""
        for type, status in [
            ("order", "replied"),
            ("order", "Paid"),
            ("note", "pending"),
            ("expert", "paid"),
            ("expert", "verify"),
        ]:
            self.assertRefused(type, {**PAYLOADS[type], "status": status}, "bad_payload")

    def test_fields(self) -> None:
        """Each field is required, a non-empty UTF-8 string; no other field is allowed."""
        for type, payload in PAYLOADS.items():
            self.assertRefused(type, {**payload, "extra": "x"}, "bad_payload")
            for field in payload:
                self.assertRefused(
                    type, {k: v for k, v in payload.items() if k != field}, "bad_payload"
                )
                for value in ["", 5, None, ["x"], "\udc00"]:
                    self.assertRefused(type, {**payload, field: value}, "bad_payload")

    def test_not_an_object(self) -> None:
        """A payload that is not an object is bad_payload."""
        for payload in [None, "paid", ["paid", "o1"], 3]:
            self.assertRefused("order", payload, "bad_payload")

    def test_user_id(self) -> None:
        """validate_user_id returns a valid userID and names the field of a bad one."""
        for user_id in ["alice", "张三", "u" * 128, "a b", "$weird"]:
            self.assertEqual(validate_user_id(user_id), user_id)
        for bad in ["", "u" * 129, "a/b", "a+b", "a#b", "a\0b", "\ud800", 5, None]:
            with self.assertRaises(InvalidRequest) as raised:
                validate_user_id(bad, "recipient")
            self.assertEqual(raised.exception.code, "bad_request")
            self.assertIn("recipient", str(raised.exception))


class TimeoutTests(SynchronousTestCase):
    """Idle connections and slow requests, timed with a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        site = api_site(
            RecordingApp(),
            [TOKEN],
            reactor=self.clock,
            idle_timeout=60,
            header_timeout=10,
            request_timeout=30,
        )
        self.channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def test_slow_head(self) -> None:
        """
        A request head still incomplete 10 s after its first byte is answered
        408 and its connection closed, however steadily its bytes come.
        """
        self.send(b"GET /nothing HTTP/1.1\r\n")
        for _ in range(9):
            self.clock.advance(1)
            self.send(b"X-Slow: 1\r\n")
        self.clock.advance(0.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 408 "))

    def test_slow_body(self) -> None:
        """
        A request whose body is still incomplete 30 s after its first byte is
        answered 408 and its connection closed, however steadily its bytes
        come, with no token needed to hold it open.
        """
        self.send(b"POST /v1/notifications HTTP/1.1\r\nContent-Length: 100\r\n")
        self.clock.advance(9)
        self.send(b"Content-Type: application/json\r\n\r\n")
        for _ in range(20):
            self.clock.advance(1)
            self.send(b" ")
        self.clock.advance(0.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 408 "))

    def test_body_in_time(self) -> None:
        """
        A request all in within 30 s is answered, and its clock stops: the
        kept-alive connection then idles up to 60 s, no 408 coming.
        """
        body = b"{}"
        self.send(b"POST /v1/notifications HTTP/1.1\r\nContent-Length: 2\r\n\r\n")
        self.clock.advance(29)
        self.send(body)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 401 "))
        self.clock.advance(59.9)
        self.assertFalse(self.transport.disconnecting)
        self.assertNotIn(b" 408 ", self.transport.value())
        self.clock.advance(0.2)
        self.assertTrue(self.transport.disconnecting)

    def test_idle(self) -> None:
        """
        A connection that has sent nothing, or nothing since its last answer,
        is closed after 60 s, not before.
        """
        self.clock.advance(59.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(self.transport.disconnecting)

    def test_every_head_timed(self) -> None:
        """
        A complete head stops its clock: the kept-alive connection then idles
        up to 60 s, and the next request's head has 10 s from its first byte.
        """
        self.send(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"404", self.transport.value())
        self.clock.advance(59)
        self.assertFalse(self.transport.disconnecting)
        self.send(b"GET /nothing HTTP/1.1\r\n")
        self.clock.advance(9.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(self.transport.disconnecting)


class SlowHeadSocketTests(TestCase):
    timeout = 20

    async def test_slow_head_closed(self) -> None:
        """Over a real socket, a head left incomplete is answered 408 and closed in time."""
        tracker = ConnectionTracker(api_site(RecordingApp(), [TOKEN], header_timeout=0.5))
        port, _ = listen(tracker)  # type: ignore[arg-type]
        self.addCleanup(port.stopListening)
        self.addCleanup(tracker.all_closed)
        client = _RawClient()
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", address.port), client)
        assert client.transport is not None
        client.transport.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = cast(IReactorTime, reactor).seconds()
        received = await client.closed
        self.assertTrue(received.startswith(b"HTTP/1.1 408 "), received)
        self.assertLess(cast(IReactorTime, reactor).seconds() - started, 5)


class SlowBodySocketTests(TestCase):
    timeout = 20

    async def test_slow_body_closed(self) -> None:
        """Over a real socket, a body trickled past the deadline is answered 408 and closed."""
        site = api_site(RecordingApp(), [TOKEN], header_timeout=5, request_timeout=1)
        tracker = ConnectionTracker(site)
        port, _ = listen(tracker)  # type: ignore[arg-type]
        self.addCleanup(port.stopListening)
        self.addCleanup(tracker.all_closed)
        client = _RawClient()
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", address.port), client)
        assert client.transport is not None
        client.transport.write(
            b"POST /v1/notifications HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        started = cast(IReactorTime, reactor).seconds()
        received = await client.closed
        self.assertTrue(received.startswith(b"HTTP/1.1 408 "), received)
        self.assertLess(cast(IReactorTime, reactor).seconds() - started, 5)


class TokenFileTests(SynchronousTestCase):
    def test_tokens(self) -> None:
        """One token a line; blank lines, comments and surrounding space are ignored."""
        path = temp_file(self, f"# API tokens\n\n  {TOKEN}  \n#{OTHER_TOKEN}\n{OTHER_TOKEN}\n")
        self.assertEqual(load_tokens(path), [TOKEN, OTHER_TOKEN])

    def test_no_token(self) -> None:
        """A file without a token is refused with one clear sentence."""
        for text in ["", "\n\n", "# nothing yet\n"]:
            with self.assertRaises(ValueError) as raised:
                load_tokens(temp_file(self, text))
            self.assertIn("holds no token", str(raised.exception))

    def test_not_a_token(self) -> None:
        """A line that cannot follow "Bearer " is refused, naming the line."""
        with self.assertRaises(ValueError) as raised:
            load_tokens(temp_file(self, f"{TOKEN}\ntwo words\n"))
        self.assertIn("Line 2", str(raised.exception))

    def test_empty_token_list(self) -> None:
        """api_site refuses an empty token list: None is how to turn the API off."""
        with self.assertRaises(ValueError):
            api_site(RecordingApp(), [])
