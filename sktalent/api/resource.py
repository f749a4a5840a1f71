"""
The HTTP API the business backend calls: one leaf resource that dispatches on
a small route table, JSON in and JSON out.  Every ``/v1/*`` call needs a
bearer token; ``/healthz`` and ``/metrics`` are open to the operator's probes.
"""

from __future__ import annotations

import hmac
import json
import os
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NoReturn, cast
from urllib.parse import unquote_to_bytes, urlsplit

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import INonQueuedRequestFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from ..calltalent.interfaces import ICallTalent, InvalidRequest, QueueFull
from ..calltalent.notifications import (
    ID_RULE,
    bounded_id,
    nonempty_text,
    validate_notification,
    validate_user_id,
)
from ..metrics import Metrics
from ..mqtt.interfaces import ServiceUnavailable
from ..store.interfaces import Device, StoreUnavailable

JSON_TYPE = b"application/json; charset=utf-8"
METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
DEFAULT_MAX_BODY = 65536
# Seconds: a connection with no request under way is closed after IDLE_TIMEOUT;
# one whose request head (line and headers) takes longer than HEADER_TIMEOUT,
# or whose whole request (head and body) takes longer than REQUEST_TIMEOUT,
# both counted from the request's first byte, is answered 408 and closed.
IDLE_TIMEOUT = 60.0
HEADER_TIMEOUT = 10.0
REQUEST_TIMEOUT = 30.0
MAX_WEBVIEW_USERS = 1000
DEFAULT_HISTORY = 50
MAX_HISTORY = 500
PLATFORMS = ("ios", "android")
# Ten years: a longer ban is a deleted account.
MAX_BAN = 10 * 365 * 86400

_MSGID = re.compile(r"[0-9a-f]{24}")
_LIMIT = re.compile(r"[0-9]{1,4}")
# RFC 6750 b64token: what may follow "Bearer " in the header.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

log = Logger()


@attrs.define
class _Refusal(Exception):
    """An error answer: ``{"error": code, "message": message}``."""

    status: int
    code: str
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


def _bad_request(message: str) -> NoReturn:
    raise _Refusal(400, "bad_request", message)


def _no_session(user_id: str) -> NoReturn:
    raise _Refusal(404, "not_found", f"{user_id} has no session.")


@attrs.frozen
class _Answer:
    status: int
    body: bytes = b""
    content_type: bytes | None = JSON_TYPE
    headers: tuple[tuple[bytes, bytes], ...] = ()


def _json_bytes(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _json(status: int, value: object) -> _Answer:
    return _Answer(status, _json_bytes(value))


def _error_body(code: str, message: str) -> bytes:
    return _json_bytes({"error": code, "message": message})


@attrs.frozen
class _Call:
    """What a handler gets: the path parameters, query and JSON body."""

    params: tuple[str, ...]
    query: Mapping[bytes, list[bytes]]
    body: Mapping[str, object]


_Handler = Callable[[_Call], Awaitable[_Answer]]


def _pattern(template: str) -> tuple[bytes | None, ...]:
    return tuple(
        None if segment.startswith("{") else segment.encode() for segment in template.split("/")[1:]
    )


@attrs.frozen
class _Route:
    method: bytes
    # The path as docs/openapi.yaml writes it; a "{name}" segment matches any
    # non-empty segment and passes it, percent-decoded, to the handler.
    template: str
    handler: _Handler
    json_body: bool = False
    # With json_body: an empty body is taken as {}.
    body_optional: bool = False
    pattern: tuple[bytes | None, ...] = attrs.field(
        init=False, default=attrs.Factory(lambda self: _pattern(self.template), takes_self=True)
    )


def _match(pattern: tuple[bytes | None, ...], segments: list[bytes]) -> tuple[bytes, ...] | None:
    if len(pattern) != len(segments):
        return None
    raw = []
    for want, got in zip(pattern, segments, strict=True):
        if want is None and got:
            raw.append(unquote_to_bytes(got))
        elif want != got:
            return None
    return tuple(raw)


@attrs.frozen
class _Lookup:
    """The route for a request's method and path, or the methods the path has."""

    route: _Route | None
    raw: tuple[bytes, ...] = ()
    allowed: tuple[bytes, ...] = ()

    def params(self) -> tuple[str, ...]:
        try:
            return tuple(param.decode("utf-8") for param in self.raw)
        except UnicodeDecodeError:
            _bad_request("The path is not UTF-8.")

    @property
    def labels(self) -> tuple[str, str]:
        # Metric labels from the route table only: a path a client made up
        # must not become a time series.
        if self.route is None:
            return ("other", "other")
        return (self.route.method.decode(), self.route.template)


def _fields(
    body: Mapping[str, object], required: Sequence[str], optional: Sequence[str] = ()
) -> None:
    unknown = sorted(set(body) - set(required) - set(optional))
    if unknown:
        _bad_request(f"Unknown field(s): {', '.join(unknown)}.")
    missing = [name for name in required if name not in body]
    if missing:
        _bad_request(f"Missing field(s): {', '.join(missing)}.")


def _text(body: Mapping[str, object], name: str) -> str:
    value = nonempty_text(body[name])
    if value is None:
        _bad_request(f"{name} must be a non-empty string.")
    return value


def _id(name: str, value: object) -> str:
    checked = bounded_id(value)
    if checked is None:
        _bad_request(f"{name} must be {ID_RULE}.")
    return checked


def _choice(body: Mapping[str, object], name: str, choices: Sequence[str]) -> str:
    for choice in choices:
        if body[name] == choice:
            return choice
    _bad_request(f"{name} must be one of {', '.join(choices)}.")


def _web_url(body: Mapping[str, object], name: str) -> str:
    url = _text(body, name)
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        host = None
    if (
        host is None
        or parts.scheme not in ("http", "https")
        or any(c.isspace() or not c.isprintable() for c in url)
    ):
        _bad_request(f"{name} must be an http or https URL.")
    return url


def _json_body(request: Request, optional: bool = False) -> dict[str, object]:
    raw = b"" if request.content is None else request.content.read()
    if optional and not raw:
        return {}
    media = (request.getHeader(b"Content-Type") or b"").split(b";")[0].strip()
    if media.lower() != b"application/json":
        raise _Refusal(415, "unsupported_media_type", "Send the body as application/json.")
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise _Refusal(400, "bad_json", f"The body is not UTF-8 JSON: {e}.") from None
    if not isinstance(body, dict):
        _bad_request("The body must be a JSON object.")
    return body


def _no_constant(name: str) -> NoReturn:
    # NaN and Infinity are not JSON, whatever Python's parser accepts.
    raise ValueError(f"{name} is not a JSON value")


def _query(query: Mapping[bytes, list[bytes]], names: Sequence[str]) -> dict[str, str]:
    found = {}
    for key, values in query.items():
        name = key.decode("utf-8", "replace")
        if name not in names:
            _bad_request(f"Unknown query parameter {name}.")
        if len(values) != 1:
            _bad_request(f"Give {name} once.")
        try:
            found[name] = values[0].decode("utf-8")
        except UnicodeDecodeError:
            _bad_request(f"{name} is not UTF-8.")
    return found


def _described(request: Request) -> str:
    return f"{request.method.decode('latin-1')} {request.uri.decode('latin-1')}"


def _gone(request: Request) -> bool:
    # The connection drops its channel when the client hangs up; this is
    # only asked before the request is finished, while the channel is set.
    return request.channel is None


def _send(request: Request, answer: _Answer) -> None:
    request.setResponseCode(answer.status)
    for name, value in answer.headers:
        request.setHeader(name, value)
    if answer.content_type is not None:
        request.setHeader(b"Content-Type", answer.content_type)
        request.setHeader(b"Content-Length", b"%d" % len(answer.body))
    request.setHeader(b"Cache-Control", b"no-store")
    if answer.body:
        request.write(answer.body)
    request.finish()


def _encoded(tokens: Sequence[str] | None) -> tuple[bytes, ...] | None:
    return None if tokens is None else tuple(t.encode() for t in tokens)


@attrs.define(slots=False, eq=False)
class ApiResource(Resource):
    """
    The whole API as one leaf resource.  tokens None turns ``/v1/*`` off.
    """

    isLeaf = True
    _app: ICallTalent
    _clock: IReactorTime
    _tokens: tuple[bytes, ...] | None = attrs.field(
        repr=False, converter=_encoded, on_setattr=attrs.setters.NO_OP
    )
    _routes: tuple[_Route, ...] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        Resource.__init__(self)
        self._routes = (
            _Route(b"POST", "/v1/notifications", self._notify, True),
            _Route(b"POST", "/v1/push/webview", self._push_webview, True),
            _Route(b"PUT", "/v1/users/{userID}/device", self._device, True),
            _Route(b"DELETE", "/v1/users/{userID}/device", self._log_out),
            _Route(b"GET", "/v1/users/{userID}/presence", self._presence),
            _Route(b"GET", "/v1/users/{userID}/session", self._session),
            _Route(b"POST", "/v1/users/{userID}/disconnect", self._disconnect, True, True),
            _Route(b"DELETE", "/v1/users/{userID}", self._delete_user),
            _Route(b"GET", "/v1/orders/{o_id}/messages", self._history),
            _Route(b"GET", "/healthz", self._health),
            _Route(b"GET", "/metrics", self._metrics),
        )

    def replace_tokens(self, tokens: Sequence[str]) -> None:
        """Accept these bearer tokens, and only these, from now on."""
        self._tokens = _encoded(tokens)

    def render(self, request: Request) -> int:
        finished = request.notifyFinish()
        answering = Deferred.fromCoroutine(self._answer(request))
        # A client that hangs up cancels the work done for it.
        finished.addErrback(lambda _: answering.cancel())
        answering.addErrback(
            lambda f: log.failure("Could not answer {call}", f, call=_described(request))
        )
        return NOT_DONE_YET

    @property
    def routes(self) -> list[tuple[str, str]]:
        """(method, path template) of every route, for the API's documentation."""
        return [(route.method.decode(), route.template) for route in self._routes]

    async def _answer(self, request: Request) -> None:
        started = self._clock.seconds()
        segments = request.path.split(b"/")[1:]
        lookup = self._lookup(request.method, segments)
        try:
            answer = await self._dispatch(request, segments, lookup)
        except _Refusal as e:
            answer = _Answer(e.status, _error_body(e.code, e.message), headers=e.headers)
        except InvalidRequest as e:
            answer = _Answer(400, _error_body(e.code, str(e)))
        except QueueFull as e:
            answer = _Answer(429, _error_body("queue_full", str(e)))
        except StoreUnavailable as e:
            log.warn("{call}: the store is unavailable: {e}", call=_described(request), e=e)
            answer = _Answer(
                503, _error_body("unavailable", "The store is unavailable; try again.")
            )
        except ServiceUnavailable as e:
            log.warn("{call}: {e}", call=_described(request), e=e)
            answer = _Answer(
                503, _error_body("unavailable", "The cluster's Redis is unavailable; try again.")
            )
        except Exception:  # noqa: BLE001 - any other failure is answered 500 and logged
            if _gone(request):
                return
            log.failure("{call} failed", call=_described(request))
            answer = _Answer(500, _error_body("internal_error", "The server failed; see its log."))
        if not _gone(request):
            _send(request, answer)
            metrics = self._app.metrics
            metrics.api_requests.labels(*lookup.labels, str(answer.status)).inc()
            metrics.api_latency.labels(*lookup.labels).observe(self._clock.seconds() - started)

    def _lookup(self, method: bytes, segments: list[bytes]) -> _Lookup:
        allowed = []
        for route in self._routes:
            raw = _match(route.pattern, segments)
            if raw is None:
                continue
            if route.method == method:
                return _Lookup(route, raw)
            allowed.append(route.method)
        return _Lookup(None, allowed=tuple(allowed))

    async def _dispatch(self, request: Request, segments: list[bytes], lookup: _Lookup) -> _Answer:
        # The token first: without one, no path tells what routes exist.
        if segments[0] == b"v1":
            self._authorize(request)
        route = lookup.route
        if route is None:
            if lookup.allowed:
                raise _Refusal(
                    405,
                    "method_not_allowed",
                    f"Use {b', '.join(lookup.allowed).decode()} here.",
                    ((b"Allow", b", ".join(lookup.allowed)),),
                )
            raise _Refusal(404, "not_found", "There is nothing at this path.")
        params = lookup.params()
        body = _json_body(request, route.body_optional) if route.json_body else {}
        return await route.handler(_Call(params, request.args, body))

    def _authorize(self, request: Request) -> None:
        if self._tokens is None:
            raise _Refusal(
                503,
                "unavailable",
                "The API is off: the server was started without an API token file.",
            )
        scheme, _, presented = (request.getHeader(b"Authorization") or b"").partition(b" ")
        presented = presented.strip()
        # Compare with every token, so the time taken tells nothing of which
        # one (if any) matched.
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(token, presented)
        if scheme.lower() != b"bearer" or not matched:
            raise _Refusal(
                401,
                "unauthorized",
                "Send Authorization: Bearer with a valid API token.",
                ((b"WWW-Authenticate", b"Bearer"),),
            )

    async def _notify(self, call: _Call) -> _Answer:
        body = call.body
        _fields(body, ("to", "type", "payload"), ("alert",))
        to = validate_user_id(body["to"], "to")
        type, payload = validate_notification(body["type"], body["payload"])
        alert = None if body.get("alert") is None else _text(body, "alert")
        msgid = await self._app.notify(to, type, payload, alert)
        return _json(202, {"msgid": msgid})

    async def _push_webview(self, call: _Call) -> _Answer:
        body = call.body
        _fields(body, ("url", "alert"), ("to", "tag"))
        if ("to" in body) == ("tag" in body):
            _bad_request("Give exactly one of to (a list of userIDs) and tag.")
        users = None
        tag = None
        if "to" in body:
            to = body["to"]
            if not isinstance(to, list) or not 1 <= len(to) <= MAX_WEBVIEW_USERS:
                _bad_request(f"to must be a list of 1 to {MAX_WEBVIEW_USERS} userIDs.")
            users = [validate_user_id(user_id, "every userID in to") for user_id in to]
        else:
            tag = _id("tag", body["tag"])
        url = _web_url(body, "url")
        alert = _text(body, "alert")
        self._app.push_webview(users, tag, url, alert)
        return _json(202, {})

    async def _device(self, call: _Call) -> _Answer:
        user_id = validate_user_id(call.params[0], "userID")
        body = call.body
        _fields(body, ("platform", "device_token"))
        platform = _choice(body, "platform", PLATFORMS)
        device = Device(user_id, platform, _id("device_token", body["device_token"]))
        await self._app.register_device(device)
        return _Answer(204, content_type=None)

    async def _log_out(self, call: _Call) -> _Answer:
        await self._app.log_out(validate_user_id(call.params[0], "userID"))
        return _Answer(204, content_type=None)

    async def _presence(self, call: _Call) -> _Answer:
        user_id = validate_user_id(call.params[0], "userID")
        return _json(200, {"online": bool(await self._app.is_online(user_id))})

    async def _session(self, call: _Call) -> _Answer:
        user_id = validate_user_id(call.params[0], "userID")
        info = await self._app.session_info(user_id)
        if info is None:
            _no_session(user_id)
        return _json(200, attrs.asdict(info))

    async def _disconnect(self, call: _Call) -> _Answer:
        user_id = validate_user_id(call.params[0], "userID")
        body = call.body
        _fields(body, (), ("ban_seconds",))
        ban = body.get("ban_seconds")
        if isinstance(ban, float) and ban.is_integer():
            # JSON numbers 3600 and 3600.0 are the same; Python parses them apart.
            ban = int(ban)
        if ban is not None and (
            not isinstance(ban, int) or isinstance(ban, bool) or not 0 <= ban <= MAX_BAN
        ):
            _bad_request(f"ban_seconds must be a whole number from 0 to {MAX_BAN}.")
        if not await self._app.disconnect(user_id, ban):
            _no_session(user_id)
        return _Answer(204, content_type=None)

    async def _delete_user(self, call: _Call) -> _Answer:
        user_id = validate_user_id(call.params[0], "userID")
        await self._app.delete_user(user_id)
        return _Answer(204, content_type=None)

    async def _history(self, call: _Call) -> _Answer:
        o_id = _id("o_id", call.params[0])
        query = _query(call.query, ("limit", "before"))
        limit = query.get("limit", str(DEFAULT_HISTORY))
        if not _LIMIT.fullmatch(limit) or not 1 <= int(limit) <= MAX_HISTORY:
            _bad_request(f"limit must be a whole number from 1 to {MAX_HISTORY}.")
        before = query.get("before")
        if before is not None and not _MSGID.fullmatch(before):
            _bad_request("before must be a msgid: 24 lowercase hex digits.")
        records = await self._app.history(o_id, int(limit), before)
        # Stored as the JSON text delivered; answered as objects.
        return _json(200, {"messages": [json.loads(r.envelope) for r in records]})

    async def _health(self, call: _Call) -> _Answer:
        parts = await self._app.health()
        healthy = all(parts.values())
        answer = {"status": "ok" if healthy else "unavailable"}
        answer.update({part: "ok" if up else "unavailable" for part, up in parts.items()})
        return _json(200 if healthy else 503, answer)

    async def _metrics(self, call: _Call) -> _Answer:
        return _Answer(200, self._app.metrics.exposition(), METRICS_TYPE)


class _BoundedRequest(Request):
    """
    A request whose body may not exceed its site's max_body: the declared
    length is checked as soon as the headers are in, the bytes as they come
    (chunked bodies declare none), and an oversized request is answered 413
    at once and its connection closed, without keeping any of the body.
    """

    _refused = False

    def __init__(self, channel: HTTPChannel, max_body: int, metrics: Metrics) -> None:
        super().__init__(channel)
        self._max_body = max_body
        self._metrics = metrics

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._max_body:
            self._refuse()
        else:
            super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        if self.content is None or self.content.tell() + len(data) > self._max_body:
            self._refuse()
        else:
            super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self._refused:
            super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        self._refused = True
        self.content = None
        # The channel sends "100 Continue" after gotLength when asked to:
        # that would invite the body being refused.
        self.requestHeaders.removeHeader(b"Expect")
        body = _error_body("too_large", f"The request body exceeds {self._max_body} bytes.")
        head = (
            b"HTTP/1.1 413 Content Too Large\r\n"
            b"Content-Type: " + JSON_TYPE + b"\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n\r\n"
        ) % len(body)
        log.info(
            "Refused a request body over {max_body} bytes from {peer}",
            max_body=self._max_body,
            peer=self.client,
        )
        self._metrics.api_requests.labels("other", "other", "413").inc()
        self.channel.write(head + body)
        self.channel.loseConnection()


@implementer(INonQueuedRequestFactory)
@attrs.frozen
class _BoundedRequestFactory:
    max_body: int
    metrics: Metrics

    # HTTP/1.1 channels call this with the channel only; queued is accepted
    # for the callers that still pass it, and has long been meaningless.
    def __call__(self, channel: HTTPChannel, queued: object = None) -> _BoundedRequest:
        return _BoundedRequest(channel, self.max_body, self.metrics)


class _ApiChannel(HTTPChannel):
    """
    An HTTP channel that closes a connection whose request head is slower
    than header_timeout, or whose whole request is slower than
    request_timeout: the idle timeout alone is reset by every byte, so a
    client trickling its head or its body (slowloris) would keep it open
    forever.
    """

    header_timeout = HEADER_TIMEOUT
    request_timeout = REQUEST_TIMEOUT
    # The site's reactor: it times the request.
    clock: IReactorTime
    # True until the request under way is all in: its bytes are timed.
    _receiving = True
    _started = 0.0
    _deadline: IDelayedCall | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._receiving and self._deadline is None:
            self._started = self.clock.seconds()
            self._deadline = self._after(self.header_timeout, "request head")
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        if self._deadline is not None:
            # The body, if any, may take what is left of the whole request's time.
            self._deadline.cancel()
            left = self._started + self.request_timeout - self.clock.seconds()
            self._deadline = self._after(max(0.0, left), "whole request")
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self._receiving = False
        self._cancel_deadline()
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        # Set first: the next request may be waiting in the buffer.
        self._receiving = True
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _after(self, delay: float, what: str) -> IDelayedCall:
        limit = self.header_timeout if what == "request head" else self.request_timeout
        return self.clock.callLater(delay, self._too_slow, what, limit)

    def _too_slow(self, what: str, seconds: float) -> None:
        self._deadline = None
        # Cancelled when the connection is lost, so the transport is still there.
        assert self.transport is not None
        log.info(
            "Closed a connection from {peer}: no {what} within {seconds} s",
            peer=self.transport.getPeer(),
            what=what,
            seconds=seconds,
        )
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        self.transport.loseConnection()


class _ApiSite(Site):
    # HTTP/1.1 itself, without the wrapper that could switch to HTTP/2 after TLS.
    protocol = _ApiChannel  # type: ignore[assignment]

    def __init__(
        self, resource: Resource, *, header_timeout: float, request_timeout: float, **kwargs: Any
    ) -> None:
        super().__init__(resource, **kwargs)
        self._header_timeout = header_timeout
        self._request_timeout = request_timeout

    def buildProtocol(self, addr: IAddress | None) -> Any:
        channel = super().buildProtocol(addr)
        channel.header_timeout = self._header_timeout
        channel.request_timeout = self._request_timeout
        channel.clock = self.reactor
        return channel


def api_site(
    app: ICallTalent,
    tokens: Sequence[str] | None,
    *,
    max_body: int = DEFAULT_MAX_BODY,
    reactor: IReactorTime | None = None,
    idle_timeout: float = IDLE_TIMEOUT,
    header_timeout: float = HEADER_TIMEOUT,
    request_timeout: float = REQUEST_TIMEOUT,
) -> Site:
    """
    The API as a Site to listen with.  tokens are the accepted bearer tokens;
    None turns every ``/v1/*`` call into 503.  Request bodies over max_body
    bytes are refused with 413.  reactor times the connections out, and the
    requests for the metrics (the global one if None).
    """
    if isinstance(tokens, str):
        raise TypeError("tokens is a sequence of tokens, not one string.")
    if tokens is not None and not tokens:
        raise ValueError("api_site needs at least one token, or None for no API.")
    if max_body < 1:
        raise ValueError("max_body must be at least 1 byte.")
    if reactor is None:
        from twisted.internet import reactor as default

        reactor = cast(IReactorTime, default)
    resource = ApiResource(app, reactor, tokens)
    # A route's first 500 must be seen by the alerting rules: from 0, not from nothing.
    for method, template in [*resource.routes, ("other", "other")]:
        app.metrics.api_requests.labels(method, template, "500")
    # Bodies are JSON only: never parse them as HTML forms.
    return _ApiSite(
        resource,
        requestFactory=_BoundedRequestFactory(max_body, app.metrics),
        parsePOSTFormSubmission=False,
        timeout=idle_timeout,
        reactor=reactor,
        header_timeout=header_timeout,
        request_timeout=request_timeout,
    )


def load_tokens(path: str | os.PathLike[str]) -> list[str]:
    """
    The bearer tokens in a file, one a line; blank lines and lines starting
    with '#' are ignored.  Raise ValueError, in one sentence naming the file,
    for a file that cannot be read, holds no token or holds something that
    cannot be a bearer token.
    """
    tokens = []
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"Cannot read the API token file {os.fspath(path)}: {e.strerror}.") from e
    except UnicodeDecodeError:
        raise ValueError(f"The API token file {os.fspath(path)} is not UTF-8 text.") from None
    for number, line in enumerate(lines, 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not _TOKEN.fullmatch(token):
            raise ValueError(
                f"Line {number} of the API token file {os.fspath(path)} is not"
                " a bearer token (letters, digits and -._~+/ then any '=')."
            )
        tokens.append(token)
    if not tokens:
        raise ValueError(
            f"The API token file {os.fspath(path)} holds no token: put one token on a line."
        )
    return tokens
