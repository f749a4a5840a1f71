"""
A stand-in for Umeng's send API: a real HTTP server on 127.0.0.1, in a thread
of its own, that checks each request's signature as Umeng does and records
what it was sent.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import attrs

SEND_PATH = "/api/send"


@attrs.frozen
class StubApp:
    """An app the stub knows: its appkey and the secret its requests are signed with."""

    platform: str
    appkey: str
    app_master_secret: str


IOS = StubApp("ios", "5f0ios0000000000000000aa", "ios-master-secret")
ANDROID = StubApp("android", "5f0android00000000000bb", "android-master-secret")
# The "ios" and "android" entries of an --umeng-config file for both apps.
APPS = {
    "ios": {"appkey": IOS.appkey, "app_master_secret": IOS.app_master_secret},
    "android": {
        "appkey": ANDROID.appkey,
        "app_master_secret": ANDROID.app_master_secret,
        "activity": "com.calltalent.app.MainActivity",
    },
}


@attrs.frozen
class Received:
    """One request as the stub saw it, and how it answered."""

    # The platform of the body's appkey; None for an unknown appkey.
    app: str | None
    # The decoded JSON body; None when it was not a JSON object.
    body: dict[str, Any] | None
    # Whether the sign matched; an unavailable answer is given regardless.
    signed: bool
    # "sent", "unavailable" (told to fail), "bad_sign", "bad_appkey", "bad_body".
    outcome: str
    # The body's bytes as they came.
    raw: bytes

    @property
    def alias(self) -> object:
        return None if self.body is None else self.body.get("alias")


def _fail(code: str, message: str) -> bytes:
    answer = {"ret": "FAIL", "data": {"error_code": code, "error_msg": message}}
    return json.dumps(answer, ensure_ascii=False).encode()


class _Server(ThreadingHTTPServer):
    stub: UmengStub


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        stub = cast(_Server, self.server).stub
        url = urlsplit(self.path)
        length = self.headers.get("Content-Length")
        if url.path != SEND_PATH or length is None or not length.isdigit():
            self._answer(404 if url.path != SEND_PATH else 411, b"")
            return
        raw = self.rfile.read(int(length))
        signs = parse_qs(url.query).get("sign", [])
        status, answer = stub.judge(raw, signs[0] if len(signs) == 1 else "")
        self._answer(status, answer)

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json;charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads what the stub recorded instead."""


class UmengStub:
    """
    The send API at ``endpoint``.  Each request is recorded; it gets Umeng's
    success answer when its appkey is known and its sign is
    ``md5("POST" + endpoint + body + app_master_secret)``, Umeng's error JSON
    otherwise, and HTTP 503 while told to be unavailable.
    """

    def __init__(self, apps: Sequence[StubApp] = (IOS, ANDROID)) -> None:
        self._apps = {app.appkey: app for app in apps}
        self._lock = threading.Condition()
        self._received: list[Received] = []
        self._unavailable = 0
        self._last = time.monotonic()
        self._ids = itertools.count(1)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.stub = self
        port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{port}{SEND_PATH}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def unavailable(self, count: int) -> None:
        """Answer the next count requests with HTTP 503."""
        with self._lock:
            self._unavailable = count

    def judge(self, raw: bytes, sign: str) -> tuple[int, bytes]:
        """Record one request and choose its answer (the handler's part)."""
        try:
            body = json.loads(raw.decode("utf-8"))
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = None
        app = None if body is None else self._apps.get(body.get("appkey"))
        signed = (
            app is not None
            and sign
            == hashlib.md5(
                b"POST" + self.endpoint.encode() + raw + app.app_master_secret.encode(),
                usedforsecurity=False,
            ).hexdigest()
        )
        with self._lock:
            if self._unavailable > 0:
                self._unavailable -= 1
                outcome, status, answer = "unavailable", 503, b"Service Unavailable"
            elif body is None:
                outcome, status, answer = "bad_body", 400, _fail("1000", "请求参数没有appkey")
            elif app is None:
                outcome, status, answer = "bad_appkey", 400, _fail("2021", "appkey不存在")
            elif not signed:
                outcome, status, answer = "bad_sign", 400, _fail("2027", "签名不正确")
            else:
                msg_id = f"uu{next(self._ids):020d}"
                outcome, status = "sent", 200
                answer = json.dumps({"ret": "SUCCESS", "data": {"msg_id": msg_id}}).encode()
            self._received.append(
                Received(None if app is None else app.platform, body, signed, outcome, raw)
            )
            self._last = time.monotonic()
            self._lock.notify_all()
        return status, answer

    def received(self, where: Callable[[Received], bool] = lambda r: True) -> list[Received]:
        """The requests so far that where accepts, in arrival order."""
        with self._lock:
            return [r for r in self._received if where(r)]

    def wait(
        self,
        count: int,
        where: Callable[[Received], bool] = lambda r: True,
        timeout: float = 10.0,
    ) -> list[Received]:
        """At least count requests that where accepts, waited for at most timeout."""
        with self._lock:
            if not self._lock.wait_for(
                lambda: len([r for r in self._received if where(r)]) >= count, timeout
            ):
                raise AssertionError(
                    f"fewer than {count} matching Umeng requests in {timeout}s: {self._received}"
                )
            return [r for r in self._received if where(r)]

    def settle(self, idle: float = 0.5, timeout: float | None = None) -> None:
        """
        Wait until no request has arrived for idle seconds, counted from now
        at the earliest; give up after timeout (by default, idle and ten
        seconds more: a push burst ends within its 2 s coalescing window).
        """
        if timeout is None:
            timeout = idle + 10.0
        start = time.monotonic()
        deadline = start + timeout
        with self._lock:
            while True:
                now = time.monotonic()
                quiet = now - max(start, self._last)
                if quiet >= idle:
                    return
                if now >= deadline:
                    raise AssertionError(f"Umeng requests kept coming for {timeout}s")
                self._lock.wait(min(idle - quiet, deadline - now))
