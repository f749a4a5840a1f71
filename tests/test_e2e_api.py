"""
The backend HTTP API and Umeng offline push end to end: a real server process
with an API token file and a Umeng config pointing at a local stand-in of the
send API, called over HTTP, with real paho-mqtt clients.
"""

from __future__ import annotations

import json
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from sktalent.authsign import sign

from .pahoclient import PahoUser
from .server import ServerProcess, running, wait_for
from .umengstub import ANDROID, IOS, Received, UmengStub

TOKEN = "backend-Token.1"
ACTIVITY = "com.calltalent.app.MainActivity"
ALIAS_TYPE = "calltalent"
TICKER = "问答CallTalent，您有一条新消息！"
TITLE = "问答CallTalent"
# A metric sample by name and sorted labels.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
# Retries within milliseconds, so a test sees them at once.
DELIVERY = {"max_attempts": 3, "backoff_base": 0.01, "backoff_cap": 0.02, "timeout": 5.0}


@attrs.frozen
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def msgid(n: int) -> str:
    return f"{n:024x}"


def chat(n: int, content: str, o_id: str = "o-1001") -> dict[str, object]:
    return {
        "msgid": msgid(n),
        "from": "alice",
        "to": "bob",
        "type": "order_chat",
        "payload": {"o_id": o_id, "expert": False, "content": content},
    }


def to(alias: str) -> Callable[[Received], bool]:
    return lambda r: r.alias == alias


def for_app(app: str) -> Callable[[Received], bool]:
    return lambda r: r.app == app


class APIEndToEnd(SynchronousTestCase):
    def setUp(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="sktalent-api-"))
        self.stub = UmengStub()
        self.addCleanup(self.stub.close)
        tokens = directory / "tokens"
        tokens.write_text(f"# the order system\n{TOKEN}\n")
        umeng = directory / "umeng.json"
        umeng.write_text(
            json.dumps(
                {
                    "endpoint": self.stub.endpoint,
                    "production_mode": False,
                    "alias_type": ALIAS_TYPE,
                    "ios": {"appkey": IOS.appkey, "app_master_secret": IOS.app_master_secret},
                    "android": {
                        "appkey": ANDROID.appkey,
                        "app_master_secret": ANDROID.app_master_secret,
                        "activity": ACTIVITY,
                    },
                    "delivery": DELIVERY,
                }
            )
        )
        args = ["--api-token-file", str(tokens), "--umeng-config", str(umeng)]
        self.server = running(self, ServerProcess(args, directory=directory))

    def call(self, method: str, path: str, body: object = None, token: str | None = TOKEN) -> Reply:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.server.api_port}{path}", method=method
        )
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        if body is not None:
            request.data = json.dumps(body, ensure_ascii=False).encode()
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return Reply(response.status, dict(response.headers), response.read())
        except urllib.error.HTTPError as e:
            return Reply(e.code, dict(e.headers), e.read())

    def user(self, name: str) -> PahoUser:
        u = PahoUser(self.server.mqtt_port, name, name, sign(self.server.secret, name))
        self.addCleanup(u.close)
        self.assertEqual(u.rc, 0)
        return u

    def register(self, user_id: str, platform: str) -> None:
        reply = self.call(
            "PUT",
            f"/v1/users/{user_id}/device",
            {"platform": platform, "device_token": "t"},
        )
        self.assertEqual((reply.status, reply.body), (204, b""))

    def notify(self, user_id: str, payload: dict[str, str], alert: str | None = None) -> str:
        body: dict[str, object] = {"to": user_id, "type": "order", "payload": payload}
        if alert is not None:
            body["alert"] = alert
        reply = self.call("POST", "/v1/notifications", body)
        self.assertEqual(reply.status, 202, reply.body)
        answer = reply.json()
        self.assertEqual(list(answer), ["msgid"])
        return str(answer["msgid"])

    def send_chats(self, alice: PahoUser, chats: list[dict[str, object]]) -> None:
        for frame in chats:
            alice.send(frame)
        acks = alice.frames(len(chats))
        self.assertEqual(acks, [{"msgid": f["msgid"], "type": "sent"} for f in chats])

    def presence(self, user_id: str) -> object:
        reply = self.call("GET", f"/v1/users/{user_id}/presence")
        self.assertEqual(reply.status, 200)
        return reply.json()

    def assertSignedBody(self, received: Received, app: str) -> dict[str, Any]:
        """The body Umeng would accept for app, without its appkey and timestamp."""
        self.assertEqual((received.app, received.signed), (app, True))
        assert received.body is not None
        body = dict(received.body)
        self.assertEqual(body.pop("appkey"), {"ios": IOS, "android": ANDROID}[app].appkey)
        timestamp = body.pop("timestamp")
        self.assertTrue(timestamp.isdigit() and len(timestamp) == 13, timestamp)
        self.assertEqual(body.pop("production_mode"), "false")
        return body

    def test_unauthorized_and_bad_status(self) -> None:
        """
        POST /v1/notifications without a token or with an unknown one is 401
        with WWW-Authenticate: Bearer; an order with an unknown status is 400
        with exactly error and message; none of them reaches the user, who
        gets only the valid notification sent after them.
        """
        valid = {"to": "carol", "type": "order", "payload": {"status": "paid", "o_id": "o-7"}}
        for token in (None, "wrong-token"):
            reply = self.call("POST", "/v1/notifications", valid, token=token)
            self.assertEqual(reply.status, 401, token)
            self.assertEqual(reply.json()["error"], "unauthorized")
            self.assertEqual(reply.headers.get("WWW-Authenticate"), "Bearer")
        bad = dict(valid, payload={"status": "lost", "o_id": "o-7"})
        reply = self.call("POST", "/v1/notifications", bad)
        self.assertEqual(reply.status, 400)
        answer = reply.json()
        self.assertEqual(set(answer), {"error", "message"})
        self.assertEqual(answer["error"], "bad_payload")
        self.assertTrue(answer["message"])
        good = self.notify("carol", {"status": "confirmed", "o_id": "o-7"})
        carol = self.user("carol")
        self.assertEqual([f["msgid"] for f in carol.frames(1)], [good])
        self.assertTrue(carol.nothing_more(0.3))

    def test_chat_to_offline_ios_user_pushed_once_after_retry(self) -> None:
        """
        A chat to bob, offline and registered as iOS, is pushed through the
        iOS app only, as seed 6.1.1 says: the stub answers the first request
        503, the retry succeeds, and nothing more follows.
        """
        self.register("bob", "ios")
        self.stub.unavailable(1)
        self.send_chats(self.user("alice"), [chat(1, "你好，在吗？")])
        first, second = self.stub.wait(2, to("bob"))
        self.stub.settle()
        self.assertEqual(self.stub.received(to("bob")), [first, second])
        self.assertEqual((first.outcome, second.outcome), ("unavailable", "sent"))
        self.assertEqual(self.stub.received(for_app("android")), [])
        for attempt in (first, second):
            self.assertEqual(
                self.assertSignedBody(attempt, "ios"),
                {
                    "type": "customizedcast",
                    "alias": "bob",
                    "alias_type": ALIAS_TYPE,
                    "payload": {
                        "aps": {"alert": "你好，在吗？"},
                        "action": "order_chat",
                        "o_id": "o-1001",
                    },
                },
            )

    def test_order_notification_to_offline_android_user(self) -> None:
        """
        An order notification to carol, offline and registered as Android,
        is pushed through the Android app with seed 6.2's body and extras,
        and waits for her next connect as the system frame.
        """
        self.register("carol", "android")
        payload = {"status": "paid", "o_id": "o-5521"}
        sent = self.notify("carol", payload, alert="用户已付款，可以开始了")
        [push] = self.stub.wait(1, to("carol"))
        self.stub.settle()
        self.assertEqual(self.stub.received(), [push])
        self.assertEqual(push.outcome, "sent")
        self.assertEqual(
            self.assertSignedBody(push, "android"),
            {
                "type": "customizedcast",
                "alias": "carol",
                "alias_type": ALIAS_TYPE,
                "payload": {
                    "display_type": "notification",
                    "body": {
                        "ticker": TICKER,
                        "title": TITLE,
                        "text": "用户已付款，可以开始了",
                        "play_vibrate": "true",
                        "play_lights": "true",
                        "play_sound": "true",
                        "after_open": "go_activity",
                        "activity": ACTIVITY,
                    },
                    "extra": {"o_id": "o-5521", "status": "paid", "action": "order"},
                },
            },
        )
        carol = self.user("carol")
        self.assertTrue(carol.session_present)
        self.assertEqual(
            carol.frames(1),
            [{"msgid": sent, "from": "system", "to": "carol", "type": "order", "payload": payload}],
        )

    def test_online_user_not_pushed(self) -> None:
        """
        dave, connected, gets a notification over MQTT and no push; once he
        has disconnected the next one is pushed, so the silence was not the
        push path's.
        """
        self.register("dave", "ios")
        dave = self.user("dave")
        payload = {"status": "confirmed", "o_id": "o-9"}
        sent = self.notify("dave", payload)
        [frame] = dave.frames(1)
        self.assertEqual((frame["msgid"], frame["payload"]), (sent, payload))
        self.stub.settle(idle=1.0)
        self.assertEqual(self.stub.received(to("dave")), [])
        dave.close()
        wait_for(lambda: self.presence("dave") == {"online": False}, 10, "dave offline")
        self.notify("dave", {"status": "finished", "o_id": "o-9"})
        [push] = self.stub.wait(1, to("dave"))
        self.assertEqual(push.outcome, "sent")
        self.assertEqual(push.body and push.body["payload"]["status"], "finished")

    def test_webview_to_tag(self) -> None:
        """
        POST /v1/push/webview to a tag is 202 {} and becomes one groupcast
        with the tag filter through each app, opening the url.
        """
        url = "https://example.com/news/42?from=push"
        reply = self.call(
            "POST", "/v1/push/webview", {"tag": "expert", "url": url, "alert": "专家新规"}
        )
        self.assertEqual((reply.status, reply.json()), (202, {}))
        self.stub.wait(2)
        self.stub.settle()
        received = self.stub.received()
        self.assertEqual(sorted(r.app or "" for r in received), ["android", "ios"])
        target = {"type": "groupcast", "filter": {"where": {"and": [{"tag": "expert"}]}}}
        [ios] = self.stub.received(for_app("ios"))
        self.assertEqual(
            self.assertSignedBody(ios, "ios"),
            dict(target, payload={"aps": {"alert": "专家新规"}, "action": "webview", "url": url}),
        )
        [android] = self.stub.received(for_app("android"))
        body = self.assertSignedBody(android, "android")
        self.assertEqual(
            body,
            dict(
                target,
                payload={
                    "display_type": "notification",
                    "body": {
                        "ticker": TICKER,
                        "title": TITLE,
                        "text": "专家新规",
                        "play_vibrate": "true",
                        "play_lights": "true",
                        "play_sound": "true",
                        "after_open": "go_url",
                        "url": url,
                    },
                    "extra": {"action": "webview"},
                },
            ),
        )

    def test_order_history_paging(self) -> None:
        """
        GET /v1/orders/{o_id}/messages gives the order's chat as delivered,
        with t, oldest first; limit keeps the newest, before pages back, and
        another order's chat is not in it.
        """
        alice = self.user("alice")
        chats = [
            chat(1, "你好，在吗？"),
            chat(2, "second"),
            chat(3, "other", "o-2"),
            chat(4, "third"),
        ]
        self.send_chats(alice, chats)
        wanted = [chats[0], chats[1], chats[3]]

        def page(query: str) -> list[dict[str, Any]]:
            reply = self.call("GET", "/v1/orders/o-1001/messages" + query)
            self.assertEqual(reply.status, 200, reply.body)
            messages: list[dict[str, Any]] = reply.json()["messages"]
            return messages

        everything = page("")
        self.assertEqual(len(everything), 3)
        for message in everything:
            t = message["payload"].pop("t")
            self.assertTrue(t.isdigit() and len(t) == 13, t)
        self.assertEqual(everything, wanted)
        # The same envelopes bob is delivered, t included.
        with_t = page("")
        bob = self.user("bob")
        self.assertEqual([f for f in bob.frames(4) if f["payload"]["o_id"] == "o-1001"], with_t)

        newest = page("?limit=2")
        self.assertEqual([m["msgid"] for m in newest], [msgid(2), msgid(4)])
        older = page(f"?limit=2&before={msgid(2)}")
        self.assertEqual([m["msgid"] for m in older], [msgid(1)])
        self.assertEqual(page(f"?before={msgid(1)}"), [])

    def test_healthz_and_metrics(self) -> None:
        """
        /healthz is 200 {"status": "ok"} and /metrics is Prometheus text with
        the connection gauge, chat messages in and pushes sent, all without a
        token.
        """
        health = self.call("GET", "/healthz", token=None)
        self.assertEqual((health.status, health.json()), (200, {"status": "ok"}))
        alice = self.user("alice")
        self.send_chats(alice, [chat(1, "hi")])
        # bob has no device: one push through each app, counted once
        # Umeng's answer is read, so after the stub has seen the request.
        sent = ("sktalent_pushes_total", (("outcome", "sent"),))

        def counted() -> Samples:
            found = self.metrics()
            return found if found.get(sent) == 2 else {}

        samples = wait_for(counted, 10, "two pushes counted")
        self.assertEqual(samples[("sktalent_connections", ())], 1)
        self.assertEqual(samples[("sktalent_messages_in_total", (("type", "order_chat"),))], 1)
        self.assertEqual(len(self.stub.received(to("bob"))), 2)

    def metrics(self) -> Samples:
        """The samples of /metrics, checked to be Prometheus text."""
        reply = self.call("GET", "/metrics", token=None)
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.headers["Content-Type"], "text/plain; version=0.0.4; charset=utf-8")
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(reply.body.decode())
            for s in family.samples
        }

    def test_presence(self) -> None:
        """bob's presence is false, true while he is connected, false again after."""
        self.assertEqual(self.presence("bob"), {"online": False})
        bob = self.user("bob")
        self.assertEqual(self.presence("bob"), {"online": True})
        bob.close()
        wait_for(lambda: self.presence("bob") == {"online": False}, 10, "bob offline")
