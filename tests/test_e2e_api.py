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
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from sktalent.testing.server import ServerProcess, running, wait_for

from .helpers import DEFAULT_PUSH_TEXTS, chat, metric, msgid, nothing_more, paho_user
from .pahoclient import PahoUser
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


def to(alias: str, app: str | None = None) -> Callable[[Received], bool]:
    """Requests to alias, through app when given."""
    return lambda r: r.alias == alias and app in (None, r.app)


def for_app(app: str) -> Callable[[Received], bool]:
    return lambda r: r.app == app


def write_umeng_config(
    path: Path, stub: UmengStub, delivery: Mapping[str, object] = DELIVERY
) -> Path:
    """A --umeng-config file at path whose pushes go to stub; path."""
    path.write_text(
        json.dumps(
            {
                "endpoint": stub.endpoint,
                "production_mode": False,
                "alias_type": ALIAS_TYPE,
                "ios": {"appkey": IOS.appkey, "app_master_secret": IOS.app_master_secret},
                "android": {
                    "appkey": ANDROID.appkey,
                    "app_master_secret": ANDROID.app_master_secret,
                    "activity": ACTIVITY,
                },
                "delivery": delivery,
            }
        )
    )
    return path


class UmengServerCase(SynchronousTestCase):
    """A server with API tokens and Umeng pushes to a stand-in, and the calls tests make."""

    def server_args(self, directory: Path) -> list[str]:
        """Options beyond the token file and the Umeng config."""
        return []

    def store(self) -> str | None:
        """The store the server uses; None: its default."""
        return None

    def delivery(self) -> Mapping[str, object]:
        """The Umeng config's delivery policy."""
        return DELIVERY

    def setUp(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="sktalent-api-"))
        self.stub = UmengStub()
        self.addCleanup(self.stub.close)
        tokens = directory / "tokens"
        tokens.write_text(f"# the order system\n{TOKEN}\n")
        umeng = write_umeng_config(directory / "umeng.json", self.stub, self.delivery())
        args = [
            "--api-token-file",
            str(tokens),
            "--umeng-config",
            str(umeng),
            *self.server_args(directory),
        ]
        self.server = running(self, ServerProcess(args, self.store(), directory=directory))

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
        return paho_user(self, self.server, name)

    def register(self, user_id: str, platform: str) -> None:
        reply = self.call(
            "PUT",
            f"/v1/users/{user_id}/device",
            {"platform": platform, "device_token": "t"},
        )
        self.assertEqual((reply.status, reply.body), (204, b""))

    def notify(
        self, user_id: str, payload: dict[str, str], alert: str | None = None, type: str = "order"
    ) -> str:
        body: dict[str, object] = {"to": user_id, "type": type, "payload": payload}
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

    def sample(self, name: str, **labels: str) -> float:
        """One sample of /metrics, 0 when absent."""
        return metric(self.server, name, **labels)


class APIEndToEnd(UmengServerCase):
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
        nothing_more(carol)

    def test_chat_to_offline_ios_user_pushed_once_after_retry(self) -> None:
        """
        A chat to bob, offline and registered as iOS, is pushed through the
        iOS app only, as seed 6.1.1 says: the stub answers the first request
        503, the retry succeeds, and nothing more follows.
        """
        self.register("bob", "ios")
        self.stub.unavailable(1)
        self.send_chats(self.user("alice"), [chat("alice", "bob", 1, "你好，在吗？")])
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
                        "aps": {"alert": "你好，在吗？", "sound": "default", "badge": 1},
                        "action": "order_chat",
                        "o_id": "o1",
                        "msgid": msgid(1),
                    },
                },
            )
        self.assertEqual(self.sample("sktalent_push_failures_total", code="http_503"), 1)

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
                    "extra": {"o_id": "o-5521", "status": "paid", "msgid": sent, "action": "order"},
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
            dict(
                target,
                payload={
                    "aps": {"alert": "专家新规", "sound": "default"},
                    "action": "webview",
                    "url": url,
                },
            ),
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
            chat("alice", "bob", 1, "你好，在吗？"),
            chat("alice", "bob", 2, "second"),
            chat("alice", "bob", 3, "other", o_id="o2"),
            chat("alice", "bob", 4, "third"),
        ]
        self.send_chats(alice, chats)
        wanted = [chats[0], chats[1], chats[3]]

        def page(query: str) -> list[dict[str, Any]]:
            reply = self.call("GET", "/v1/orders/o1/messages" + query)
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
        self.assertEqual([f for f in bob.frames(4) if f["payload"]["o_id"] == "o1"], with_t)

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
        self.assertEqual((health.status, health.json()), (200, {"status": "ok", "store": "ok"}))
        alice = self.user("alice")
        self.send_chats(alice, [chat("alice", "bob", 1, "hi")])
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

    def test_presence(self) -> None:
        """bob's presence is false, true while he is connected, false again after."""
        self.assertEqual(self.presence("bob"), {"online": False})
        bob = self.user("bob")
        self.assertEqual(self.presence("bob"), {"online": True})
        bob.close()
        wait_for(lambda: self.presence("bob") == {"online": False}, 10, "bob offline")


def compact(body: object) -> bytes:
    """JSON as Umeng bodies are sent: compact, UTF-8 unescaped."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


class PushEndToEnd(UmengServerCase):
    """What is pushed, to which app, and how often."""

    def test_default_texts(self) -> None:
        """
        Each order, note, expert and feedback notification sent without an
        alert to a user with no registered device is pushed through both apps
        with the text of INTERFACE section 8, byte for byte, in aps.alert and
        in body.text, with its msgid, the iOS sound and badge.
        """
        sent = [
            (f"user{n}", type, payload, text, self.notify(f"user{n}", payload, type=type))
            for n, (type, payload, text) in enumerate(DEFAULT_PUSH_TEXTS)
        ]
        self.stub.wait(2 * len(sent))
        self.stub.settle()
        for user, type, payload, text, sent_id in sent:
            extra = {k: v for k, v in payload.items() if k != "content"}
            [ios] = self.stub.received(to(user, "ios"))
            self.assertEqual(
                self.assertSignedBody(ios, "ios")["payload"],
                {
                    "aps": {"alert": text, "sound": "default", "badge": 1},
                    "action": type,
                    **extra,
                    "msgid": sent_id,
                },
            )
            [android] = self.stub.received(to(user, "android"))
            payload_sent = self.assertSignedBody(android, "android")["payload"]
            self.assertEqual(payload_sent["body"]["text"], text)
            self.assertEqual(payload_sent["extra"], {**extra, "msgid": sent_id, "action": type})
            for received in (ios, android):
                # Sent as the text's own UTF-8 bytes, no escapes.
                self.assertEqual(received.raw, compact(received.body))
                self.assertIn(text.encode(), received.raw)

    def test_android_chat_body(self) -> None:
        """
        A chat to an Android user is pushed with exactly this body; a chat of
        the longest content is cut to Umeng's Android limit between characters.
        """
        self.register("bob", "android")
        self.register("carol", "android")
        alice = self.user("alice")
        self.send_chats(alice, [chat("alice", "bob", 1, "你好，在吗？")])
        [push] = self.stub.wait(1, to("bob"))
        assert push.body is not None
        expected = (
            '{"appkey":"' + ANDROID.appkey + '","timestamp":"' + push.body["timestamp"] + '",'
            '"type":"customizedcast","alias":"bob","alias_type":"calltalent",'
            '"payload":{"display_type":"notification","body":'
            '{"ticker":"问答CallTalent，您有一条新消息！","title":"问答CallTalent",'
            '"text":"你好，在吗？","play_vibrate":"true","play_lights":"true",'
            '"play_sound":"true","after_open":"go_activity","activity":"' + ACTIVITY + '"},'
            '"extra":{"o_id":"o1","msgid":"' + msgid(1) + '","action":"order_chat"}},'
            '"production_mode":"false"}'
        )
        self.assertEqual(push.raw, expected.encode())
        self.assertEqual(push.outcome, "sent")

        long = "专家回复了您的问题😀" * 400
        self.send_chats(alice, [chat("alice", "carol", 2, long)])
        [cut] = self.stub.wait(1, to("carol"))
        assert cut.body is not None
        self.assertEqual(cut.outcome, "sent")
        self.assertLessEqual(len(cut.raw), 1840)
        text = cut.body["payload"]["body"]["text"]
        self.assertTrue(text.endswith("…") and long.startswith(text[:-1]), text)
        self.assertGreater(len(cut.raw) + len(long[len(text) - 1].encode()), 1840)

    def test_log_out_stops_pushes(self) -> None:
        """
        After DELETE .../device nothing is pushed to the user while their
        messages keep queuing; after the next PUT pushes resume, through the
        app of the platform it names.
        """
        self.register("dave", "ios")
        reply = self.call("DELETE", "/v1/users/dave/device")
        self.assertEqual((reply.status, reply.body), (204, b""))
        first = self.notify("dave", {"status": "paid", "o_id": "o-1"})
        wait_for(
            lambda: self.sample("sktalent_pushes_total", outcome="logged_out") == 1,
            10,
            "the push skipped",
        )
        self.stub.settle()
        self.assertEqual(self.stub.received(), [])
        self.register("dave", "android")
        second = self.notify("dave", {"status": "finished", "o_id": "o-1"})
        [push] = self.stub.wait(1, to("dave"))
        self.stub.settle()
        self.assertEqual(self.stub.received(), [push])
        body = self.assertSignedBody(push, "android")
        self.assertEqual(body["payload"]["extra"]["msgid"], second)
        self.assertEqual(body["payload"]["body"]["text"], "用户已评价")
        dave = self.user("dave")
        self.assertEqual([f["msgid"] for f in dave.frames(2)], [first, second])

    def test_burst_is_at_most_two_pushes(self) -> None:
        """
        20 notifications to an offline user within a second make at most two
        pushes; the last carries the latest message's msgid, text and badge
        (all 20 queued), and the others are counted coalesced.
        """
        self.register("erin", "ios")
        statuses = ["pending", "confirmed", "rejected", "paid", "toBeFinished"] * 4
        with ThreadPoolExecutor(max_workers=20) as pool:
            list(pool.map(lambda s: self.notify("erin", {"status": s, "o_id": "o-2"}), statuses))
        self.stub.wait(1, to("erin"))
        self.stub.settle(idle=3.0, timeout=10.0)
        pushes = self.stub.received(to("erin"))
        self.assertEqual(len(pushes), 2, pushes)
        erin = self.user("erin")
        frames = erin.frames(20)
        last = self.assertSignedBody(pushes[-1], "ios")["payload"]
        self.assertEqual(last["msgid"], frames[-1]["msgid"])
        self.assertEqual(last["aps"]["badge"], 20)
        texts = {p["status"]: text for type, p, text in DEFAULT_PUSH_TEXTS if type == "order"}
        self.assertEqual(last["aps"]["alert"], texts[frames[-1]["payload"]["status"]])
        self.assertEqual(self.sample("sktalent_push_requests_total", reason="offline"), 20)
        self.assertEqual(self.sample("sktalent_pushes_total", outcome="coalesced"), 18)


class PushTextsEndToEnd(UmengServerCase):
    def server_args(self, directory: Path) -> list[str]:
        texts = {"feedback": "客服回复：{content}", "order": {"paid": "订单 {o_id} 已付款"}}
        path = directory / "texts.json"
        path.write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
        return ["--push-texts", str(path)]

    def test_texts_from_file(self) -> None:
        """
        The texts of --push-texts are pushed in place of the defaults, their
        placeholders filled from the payload; the texts it leaves out keep
        their defaults, and the backend's alert still wins.
        """
        self.register("frank", "ios")
        self.notify("frank", {"content": "已退款"}, type="feedback")
        self.notify("gina", {"status": "paid", "o_id": "o-77"})
        self.notify("hana", {"status": "replied", "note_id": "n-1"}, type="note")
        self.notify("ivan", {"status": "paid", "o_id": "o-78"}, alert="请开始服务")
        self.stub.wait(7)
        self.stub.settle()

        def texts(user: str) -> list[str]:
            return [
                r.body["payload"]["aps"]["alert"]
                if r.app == "ios"
                else r.body["payload"]["body"]["text"]
                for r in self.stub.received(to(user))
                if r.body is not None
            ]

        self.assertEqual(texts("frank"), ["客服回复：已退款"])
        self.assertEqual(texts("gina"), ["订单 o-77 已付款"] * 2)
        self.assertEqual(texts("hana"), ["专家已回答"] * 2)
        self.assertEqual(texts("ivan"), ["请开始服务"] * 2)
