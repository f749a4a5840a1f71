"""
Tests for the Umeng push client and its configuration.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, cast

import attrs
from hypothesis import given
from hypothesis import strategies as st
from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from sktalent.metrics import Metrics
from sktalent.push.config import (
    UMENG_ENDPOINT,
    DeliveryPolicy,
    UmengApp,
    UmengConfig,
    load_config,
    parse_config,
)
from sktalent.push.interfaces import PushNotice
from sktalent.push.umeng import (
    BODY_LIMITS,
    ELLIPSIS,
    UmengPusher,
    Verdict,
    backoff_delay,
    build_request,
    classify,
    customizedcast,
)
from sktalent.store.interfaces import Device, LogOut, PutDevice
from sktalent.store.memory import MemoryStore

from .helpers import eventually, temp_file

reactor = cast(PosixReactorBase, _reactor)

IOS = UmengApp("ios", "ioskey0001", "ios-secret")
ANDROID = UmengApp("android", "androidkey01", "android-secret", "com.calltalent.Main")
TIMESTAMP = "1700000000000"


def config(endpoint: str = UMENG_ENDPOINT, **delivery: Any) -> UmengConfig:
    return UmengConfig(IOS, ANDROID, endpoint, delivery=DeliveryPolicy(**delivery))


def pushes(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value("sktalent_pushes_total", {"outcome": outcome})
    return value or 0.0


def failures(metrics: Metrics, code: str) -> float:
    value = metrics.registry.get_sample_value("sktalent_push_failures_total", {"code": code})
    return value or 0.0


def with_device(store: MemoryStore, user_id: str, platform: str) -> None:
    store.submit([PutDevice(Device(user_id, platform, "token-" + user_id))])


def umeng_error(code: str, message: str) -> tuple[int, bytes]:
    answer = {"ret": "FAIL", "data": {"error_code": code, "error_msg": message}}
    return 400, json.dumps(answer, ensure_ascii=False).encode()


class RequestTests(SynchronousTestCase):
    """Bodies, signatures and the judging of Umeng's answers."""

    def test_long_alert_cut_on_character_boundary(self) -> None:
        """
        A Chinese (and astral) alert too long for either app is cut to the
        longest prefix that fits with an ellipsis; the body stays within the
        limit and one more character would not.
        """
        text = "您的订单已确认😀请尽快支付" * 200
        target = customizedcast(config(), "u1")
        notice = PushNotice("order_chat", text, o_id="5f1a2b3c4d5e6f7a8b9c0d1e")
        for app in (IOS, ANDROID):
            request = build_request(config(), app, target, notice, TIMESTAMP)
            assert request is not None
            body = request.body(TIMESTAMP)
            self.assertLessEqual(len(body), BODY_LIMITS[app.platform])
            decoded = json.loads(body.decode("utf-8"))
            payload = decoded["payload"]
            alert = payload["aps"]["alert"] if app is IOS else payload["body"]["text"]
            self.assertTrue(alert.endswith(ELLIPSIS))
            kept = alert[: -len(ELLIPSIS)]
            self.assertTrue(text.startswith(kept))
            # Unescaped in the JSON, one more character adds its UTF-8 bytes.
            following = text[len(kept)].encode("utf-8")
            self.assertGreater(len(body) + len(following), BODY_LIMITS[app.platform])

    def test_short_alert_kept(self) -> None:
        """An alert that fits is sent as it is."""
        notice = PushNotice("order_chat", "你好", o_id="o1")
        request = build_request(config(), IOS, customizedcast(config(), "u1"), notice, TIMESTAMP)
        assert request is not None
        self.assertEqual(json.loads(request.body(TIMESTAMP))["payload"]["aps"]["alert"], "你好")

    def test_sound_badge_and_msgid(self) -> None:
        """
        An iOS push has aps.sound "default", aps.badge when the notice counts
        one and the msgid beside aps; an Android push has extra.msgid.
        """
        target = customizedcast(config(), "u1")
        notice = PushNotice(
            "order", "专家已拒绝", o_id="o1", status="rejected", msgid="ab" * 12, badge=7
        )

        def payload(app: UmengApp, notice: PushNotice) -> Any:
            request = build_request(config(), app, target, notice, TIMESTAMP)
            assert request is not None
            return json.loads(request.body(TIMESTAMP))["payload"]

        self.assertEqual(
            payload(IOS, notice),
            {
                "aps": {"alert": "专家已拒绝", "sound": "default", "badge": 7},
                "action": "order",
                "o_id": "o1",
                "status": "rejected",
                "msgid": "ab" * 12,
            },
        )
        self.assertEqual(
            payload(ANDROID, notice)["extra"],
            {"o_id": "o1", "status": "rejected", "msgid": "ab" * 12, "action": "order"},
        )
        uncounted = PushNotice("feedback", "已回复")
        self.assertEqual(payload(IOS, uncounted)["aps"], {"alert": "已回复", "sound": "default"})
        self.assertEqual(payload(ANDROID, uncounted)["extra"], {"action": "feedback"})

    def test_nothing_fits(self) -> None:
        """A body too large even without alert text is not built."""
        notice = PushNotice("webview", "看看", url="https://example.com/" + "a" * 3000)
        request = build_request(
            config(), ANDROID, customizedcast(config(), "u1"), notice, TIMESTAMP
        )
        self.assertIsNone(request)

    def test_classify(self) -> None:
        """Umeng's answers map to sent, retry, re-sign or final failure."""
        cases = [
            ((200, b'{"ret":"SUCCESS","data":{"msg_id":"uu1"}}'), Verdict.SENT),
            ((503, b"Service Unavailable"), Verdict.RETRY),
            ((502, b""), Verdict.RETRY),
            ((429, b""), Verdict.RETRY),
            (umeng_error("4001", "系统忙"), Verdict.RETRY),
            (umeng_error("2026", "1分钟内发送任务次数超出3次"), Verdict.RETRY),
            ((500, b'{"ret":"FAIL","data":{"error_code":3002}}'), Verdict.RETRY),
            (umeng_error("2028", "时间戳已过期"), Verdict.RESIGN),
            (umeng_error("2027", "签名不正确"), Verdict.FAILED),
            (umeng_error("2021", "appkey不存在"), Verdict.FAILED),
            ((500, b'{"ret":"FAIL","data":{"error_code":"1018"}}'), Verdict.FAILED),
            (umeng_error("2010", "与alias对应的device_tokens为空"), Verdict.NO_DEVICE),
            ((200, b"<html>"), Verdict.FAILED),
            ((404, b"Not Found"), Verdict.FAILED),
        ]
        for (status, content), verdict in cases:
            self.assertEqual(classify(status, content).verdict, verdict, (status, content))

    def test_failure_codes(self) -> None:
        """
        A failed answer is labelled with Umeng's error code, else with its
        HTTP status; a success has no label.
        """
        cases = [
            ((200, b'{"ret":"SUCCESS","data":{"msg_id":"uu1"}}'), None),
            (umeng_error("2027", "签名不正确"), "2027"),
            ((500, b'{"ret":"FAIL","data":{"error_code":3002}}'), "3002"),
            ((503, b"Service Unavailable"), "http_503"),
            ((200, b"<html>"), "http_200"),
        ]
        for (status, content), code in cases:
            self.assertEqual(classify(status, content).code, code, (status, content))

    @given(
        st.integers(min_value=1, max_value=200),
        st.floats(min_value=0, max_value=1, exclude_max=True),
    )
    def test_backoff_full_jitter(self, attempt: int, draw: float) -> None:
        """A delay is the draw times the exponential step, never above the cap."""
        policy = DeliveryPolicy(backoff_base=0.5, backoff_cap=30.0)
        delay = backoff_delay(attempt, policy, draw)
        step = min(30.0, 0.5 * 2 ** min(attempt - 1, 64))
        self.assertAlmostEqual(delay, draw * step)
        self.assertLessEqual(delay, 30.0)

    def test_backoff_schedule(self) -> None:
        """With the largest draw the delays double from the base up to the cap."""
        policy = DeliveryPolicy(backoff_base=1.0, backoff_cap=10.0)
        delays = [backoff_delay(n, policy, 1.0) for n in range(1, 7)]
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 10.0, 10.0])


class ScheduleTests(SynchronousTestCase):
    """
    Retry timing, queueing and stopping, against a real HTTP client whose
    connections never complete (a memory reactor): every attempt times out.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_700_000_000)
        self.store = MemoryStore()
        self.metrics = Metrics()

    def pusher(self, **delivery: Any) -> UmengPusher:
        pusher = UmengPusher(
            self.reactor,
            HTTPClient(Agent(self.reactor)),
            self.store,
            config("http://127.0.0.1:8999/api/send", **delivery),
            self.metrics,
            random=lambda: 0.5,
        )
        self.addCleanup(pusher.stop)
        return pusher

    def connects(self) -> int:
        return len(self.reactor.tcpClients)

    def test_timeouts_retried_with_backoff_then_given_up(self) -> None:
        """
        Each attempt is abandoned after the timeout, the next comes after
        the jittered backoff, and after max_attempts the push is given up
        with no timer left: settled then, and not before.
        """
        pusher = self.pusher(max_attempts=3, timeout=10, backoff_base=1, backoff_cap=60)
        with_device(self.store, "u1", "ios")
        settled = pusher.push_to_users(["u1"], PushNotice("order_chat", "你好", o_id="o1"))
        self.assertEqual(self.connects(), 1)
        self.assertEqual(self.reactor.tcpClients[0][:2], ("127.0.0.1", 8999))
        # Timeout, then 0.5 * 1 s.
        self.reactor.advance(10)
        self.assertEqual(pushes(self.metrics, "retried"), 1)
        self.reactor.advance(0.49)
        self.assertEqual(self.connects(), 1)
        self.reactor.advance(0.01)
        self.assertEqual(self.connects(), 2)
        # Timeout, then 0.5 * 2 s.
        self.reactor.advance(10)
        self.reactor.advance(0.99)
        self.assertEqual(self.connects(), 2)
        self.reactor.advance(0.01)
        self.assertEqual(self.connects(), 3)
        self.assertNoResult(settled)
        self.reactor.advance(10)
        self.assertIs(self.successResultOf(settled), True)
        self.assertEqual(pushes(self.metrics, "retried"), 2)
        self.assertEqual(pushes(self.metrics, "given_up"), 1)
        self.assertEqual(failures(self.metrics, "network"), 3)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.connects(), 3)

    def test_request_time_observed(self) -> None:
        """Every attempt's time, to its answer or its timeout, is in the histogram."""
        pusher = self.pusher(max_attempts=2, timeout=10, backoff_base=1, backoff_cap=60)
        with_device(self.store, "u1", "ios")
        pusher.push_to_users(["u1"], PushNotice("feedback", "已回复"))
        self.reactor.advance(10)
        self.reactor.advance(0.5)
        self.reactor.advance(10)
        self.assertEqual(pushes(self.metrics, "given_up"), 1)
        registry = self.metrics.registry
        name = "sktalent_push_request_seconds"
        self.assertEqual(registry.get_sample_value(f"{name}_count"), 2)
        self.assertEqual(registry.get_sample_value(f"{name}_sum"), 20)
        self.assertEqual(registry.get_sample_value(f"{name}_bucket", {"le": "5.0"}), 0)
        self.assertEqual(registry.get_sample_value(f"{name}_bucket", {"le": "10.0"}), 2)

    def test_stop_cancels_retry_timer(self) -> None:
        """
        stop() leaves no timer, and the push waiting to be retried is not
        settled; later pushes are refused, not settled either.
        """
        pusher = self.pusher(timeout=5)
        retrying = pusher.push_to_users(["u1"], PushNotice("feedback", "已回复"))
        self.reactor.advance(5)
        self.assertEqual(pushes(self.metrics, "retried"), 1)
        self.assertNotEqual(self.reactor.getDelayedCalls(), [])
        pusher.stop()
        self.assertIs(self.successResultOf(retrying), False)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(pushes(self.metrics, "cancelled"), 1)
        pusher.push_to_tag("user", PushNotice("feedback", "已回复"))
        late = pusher.push_to_users(["u1"], PushNotice("feedback", "已回复"))
        self.assertIs(self.successResultOf(late), False)
        self.assertEqual(pushes(self.metrics, "cancelled"), 3)
        self.reactor.advance(100)
        self.assertEqual(self.connects(), 1)

    def test_queue_overflow_dropped_and_counted(self) -> None:
        """
        Beyond concurrency the pushes wait in the queue; beyond its size
        they are dropped and counted, and the calls return at once.
        """
        pusher = self.pusher(concurrency=1, queue_size=2, timeout=5)
        for user in ("u1", "u2", "u3", "u4", "u5"):
            with_device(self.store, user, "android")
        notice = PushNotice("order", "订单已支付", o_id="o1", status="paid")
        settled = [pusher.push_to_users([user], notice) for user in ("u1", "u2", "u3", "u4")]
        self.assertEqual(self.connects(), 1)
        self.assertEqual(pushes(self.metrics, "dropped"), 1)
        # Given up without trying: settled.
        self.assertIs(self.successResultOf(settled[3]), True)
        pusher.push_to_users(["u5"], notice)
        self.assertEqual(pushes(self.metrics, "dropped"), 2)
        for waiting in settled[:3]:
            self.assertNoResult(waiting)
        pusher.stop()
        self.assertEqual([self.successResultOf(d) for d in settled[:3]], [False] * 3)
        self.assertEqual(pushes(self.metrics, "cancelled"), 3)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_reconfigure(self) -> None:
        """
        A new config applies to the pushes that start after it, and its
        larger concurrency starts waiting pushes at once.
        """
        pusher = self.pusher(concurrency=1, timeout=5)
        for user in ("u1", "u2"):
            with_device(self.store, user, "ios")
        pusher.push_to_users(["u1", "u2"], PushNotice("feedback", "已回复"))
        self.assertEqual(self.connects(), 1)
        pusher.reconfigure(config("http://127.0.0.1:8998/api/send", concurrency=2, timeout=5))
        self.assertEqual(
            [client[:2] for client in self.reactor.tcpClients],
            [("127.0.0.1", 8999), ("127.0.0.1", 8998)],
        )

    def test_too_large_not_sent(self) -> None:
        """A push that cannot fit is counted, never sent."""
        pusher = self.pusher()
        notice = PushNotice("webview", "看看", url="https://example.com/" + "a" * 3000)
        pusher.push_to_tag("expert", notice)
        self.assertEqual(pushes(self.metrics, "too_large"), 2)
        self.assertEqual(self.connects(), 0)

    def test_invalid_notice_refused(self) -> None:
        """An unknown kind, or a webview without url, is refused, counted and settled."""
        pusher = self.pusher()
        settled = pusher.push_to_users(["u1"], PushNotice("birthday", "生日快乐"))
        pusher.push_to_tag("user", PushNotice("webview", "看看"))
        self.assertEqual(pushes(self.metrics, "invalid"), 2)
        self.assertEqual(self.connects(), 0)
        self.assertIs(self.successResultOf(settled), True)

    def test_no_longer_wanted_withdrawn(self) -> None:
        """
        A push whose wanted says no when its turn comes is not sent: counted
        withdrawn, and settled.  One still wanted is sent.
        """
        pusher = self.pusher(concurrency=1, max_attempts=1, timeout=5)
        notice = PushNotice("feedback", "已回复")
        wanted = {"u2": True, "u3": True}
        for user in ("u1", "u2", "u3"):
            with_device(self.store, user, "ios")
        pusher.push_to_users(["u1"], notice)
        withdrawn = pusher.push_to_users(["u2"], notice, lambda: wanted["u2"])
        pusher.push_to_users(["u3"], notice, lambda: wanted["u3"])
        wanted["u2"] = False
        self.reactor.advance(5)
        self.assertIs(self.successResultOf(withdrawn), True)
        self.assertEqual(pushes(self.metrics, "withdrawn"), 1)
        self.assertEqual(self.connects(), 2)


@attrs.define
class Received:
    raw: bytes
    body: dict[str, object]


class FakeUmeng(Resource):
    """
    Umeng's send API: checks each request's sign against the raw body with
    its app's secret, records it, and plays scripted answers before success.
    """

    isLeaf = True

    def __init__(self, secrets: dict[str, str]) -> None:
        super().__init__()
        self.secrets = secrets
        self.endpoint = ""
        self.script: list[tuple[int, bytes]] = []
        self.received: list[Received] = []
        self.accepted: list[Received] = []

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        raw = request.content.read()
        body = json.loads(raw.decode("utf-8"))
        secret = self.secrets.get(body.get("appkey"), "")
        expected = hashlib.md5(b"POST" + self.endpoint.encode() + raw + secret.encode())
        typed = request.getHeader("content-type") == "application/json"
        if not secret or not typed or request.args.get(b"sign") != [expected.hexdigest().encode()]:
            status, answer = umeng_error("2027", "签名不正确")
        else:
            self.received.append(Received(raw, body))
            if self.script:
                status, answer = self.script.pop(0)
            else:
                self.accepted.append(self.received[-1])
                status = 200
                answer = b'{"ret":"SUCCESS","data":{"msg_id":"uu%d"}}' % len(self.accepted)
        request.setResponseCode(status)
        return answer


class RoundTripTests(TestCase):
    """Pushes over real sockets to a local Umeng stand-in."""

    def setUp(self) -> None:
        self.umeng = FakeUmeng(
            {IOS.appkey: IOS.app_master_secret, ANDROID.appkey: ANDROID.app_master_secret}
        )
        port = reactor.listenTCP(0, Site(self.umeng), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        address = cast(IPv4Address, port.getHost())
        self.umeng.endpoint = f"http://127.0.0.1:{address.port}/api/send"
        self.store = MemoryStore()
        self.metrics = Metrics()
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        self.pusher = UmengPusher(
            reactor,
            HTTPClient(Agent(reactor, pool=pool)),
            self.store,
            config(self.umeng.endpoint, backoff_base=0.02, backoff_cap=0.05, timeout=5),
            self.metrics,
            random=lambda: 1.0,
        )
        self.addCleanup(self.pusher.stop)

    async def settled(self, outcome: str, count: int) -> None:
        """Wait until count pushes ended with outcome."""
        await eventually(lambda: pushes(self.metrics, outcome) >= count)

    def base(self, app: UmengApp, body: dict[str, object]) -> dict[str, object]:
        """The fields every body has, checked and removed."""
        body = dict(body)
        timestamp = body.pop("timestamp")
        assert isinstance(timestamp, str)
        self.assertTrue(timestamp.isdigit())
        self.assertEqual(body.pop("appkey"), app.appkey)
        self.assertEqual(body.pop("production_mode"), "true")
        return body

    async def test_chat_to_ios_user_after_503(self) -> None:
        """
        A chat push to an iOS user is one signed customizedcast to the iOS
        app with seed 6.1.1's fields, sent again after a 503.
        """
        with_device(self.store, "u1", "ios")
        self.umeng.script = [(503, b"Service Unavailable")]
        settled = self.pusher.push_to_users(
            ["u1"], PushNotice("order_chat", "张三：你好", o_id="o1")
        )
        self.assertIs(await settled, True)
        self.assertEqual(pushes(self.metrics, "sent"), 1)
        self.assertEqual(len(self.umeng.received), 2)
        [accepted] = self.umeng.accepted
        self.assertEqual(
            self.base(IOS, accepted.body),
            {
                "type": "customizedcast",
                "alias": "u1",
                "alias_type": "calltalent",
                "payload": {
                    "aps": {"alert": "张三：你好", "sound": "default"},
                    "action": "order_chat",
                    "o_id": "o1",
                },
            },
        )
        self.assertIn("张三".encode(), accepted.raw)
        self.assertEqual(pushes(self.metrics, "retried"), 1)

    async def test_order_to_android_user(self) -> None:
        """An order push to an Android user has seed 6.2's body and extras."""
        with_device(self.store, "u2", "android")
        notice = PushNotice("order", "您的订单已被确认", o_id="o9", status="confirmed")
        self.pusher.push_to_users(["u2"], notice)
        await self.settled("sent", 1)
        [accepted] = self.umeng.accepted
        self.assertEqual(
            self.base(ANDROID, accepted.body),
            {
                "type": "customizedcast",
                "alias": "u2",
                "alias_type": "calltalent",
                "payload": {
                    "display_type": "notification",
                    "body": {
                        "ticker": "问答CallTalent，您有一条新消息！",
                        "title": "问答CallTalent",
                        "text": "您的订单已被确认",
                        "play_vibrate": "true",
                        "play_lights": "true",
                        "play_sound": "true",
                        "after_open": "go_activity",
                        "activity": "com.calltalent.Main",
                    },
                    "extra": {"o_id": "o9", "status": "confirmed", "action": "order"},
                },
            },
        )

    async def test_unknown_platform_pushes_both_apps(self) -> None:
        """
        A user without a registered device is pushed through both apps; the
        push is settled once both have answered.
        """
        settled = self.pusher.push_to_users(
            ["u3"], PushNotice("note", "小纸条已回答", note_id="n1", status="replied")
        )
        self.assertIs(await settled, True)
        self.assertEqual(pushes(self.metrics, "sent"), 2)
        bodies = {r.body["appkey"]: r.body for r in self.umeng.accepted}
        self.assertEqual(set(bodies), {IOS.appkey, ANDROID.appkey})
        ios = bodies[IOS.appkey]["payload"]
        self.assertEqual(
            ios,
            {
                "aps": {"alert": "小纸条已回答", "sound": "default"},
                "action": "note",
                "note_id": "n1",
                "status": "replied",
            },
        )
        android = bodies[ANDROID.appkey]["payload"]
        assert isinstance(android, dict)
        self.assertEqual(android["extra"], {"note_id": "n1", "status": "replied", "action": "note"})

    async def test_webview_to_tag_is_groupcast(self) -> None:
        """A webview push to a tag is a groupcast to both apps opening the url."""
        url = "https://calltalent.example/活动?id=1"
        self.pusher.push_to_tag("expert", PushNotice("webview", "新活动上线", url=url))
        await self.settled("sent", 2)
        bodies = {r.body["appkey"]: r.body for r in self.umeng.accepted}
        self.assertEqual(set(bodies), {IOS.appkey, ANDROID.appkey})
        target = {"type": "groupcast", "filter": {"where": {"and": [{"tag": "expert"}]}}}
        ios = self.base(IOS, bodies[IOS.appkey])
        self.assertEqual(
            ios.pop("payload"),
            {"aps": {"alert": "新活动上线", "sound": "default"}, "action": "webview", "url": url},
        )
        self.assertEqual(ios, target)
        android = self.base(ANDROID, bodies[ANDROID.appkey])
        payload = android.pop("payload")
        self.assertEqual(android, target)
        assert isinstance(payload, dict)
        self.assertEqual(payload["body"]["after_open"], "go_url")
        self.assertEqual(payload["body"]["url"], url)
        self.assertNotIn("activity", payload["body"])
        self.assertEqual(payload["extra"], {"action": "webview"})

    async def test_permanent_error_not_retried(self) -> None:
        """An answer that cannot change (appkey unknown) ends the push at once."""
        with_device(self.store, "u1", "ios")
        self.umeng.script = [umeng_error("2021", "appkey不存在")]
        settled = self.pusher.push_to_users(
            ["u1"], PushNotice("expert", "专家资格审核通过", status="verified")
        )
        # Settled for good: it never will be sent.
        self.assertIs(await settled, True)
        self.assertEqual(pushes(self.metrics, "failed"), 1)
        self.assertEqual(len(self.umeng.received), 1)
        self.assertEqual(
            self.umeng.received[0].body["payload"],
            {
                "aps": {"alert": "专家资格审核通过", "sound": "default"},
                "action": "expert",
                "status": "verified",
            },
        )
        self.assertEqual(pushes(self.metrics, "retried"), 0)
        self.assertEqual(self.umeng.accepted, [])

    async def test_temporary_umeng_error_retried(self) -> None:
        """'System busy' answers are retried until Umeng accepts."""
        with_device(self.store, "u1", "android")
        self.umeng.script = [umeng_error("4001", "系统忙"), umeng_error("4001", "系统忙")]
        self.pusher.push_to_users(["u1"], PushNotice("feedback", "您的反馈已回复"))
        await self.settled("sent", 1)
        self.assertEqual(len(self.umeng.received), 3)
        self.assertEqual(pushes(self.metrics, "retried"), 2)

    async def test_failures_counted_by_code(self) -> None:
        """Every request Umeng does not accept is counted by its error code or status."""
        with_device(self.store, "u1", "android")
        self.umeng.script = [
            umeng_error("4001", "系统忙"),
            (503, b"Service Unavailable"),
            umeng_error("2021", "appkey不存在"),
        ]
        self.pusher.push_to_users(["u1"], PushNotice("feedback", "您的反馈已回复"))
        await self.settled("failed", 1)
        self.assertEqual(
            [failures(self.metrics, code) for code in ("4001", "http_503", "2021", "network")],
            [1, 1, 1, 0],
        )

    async def test_logged_out_not_pushed(self) -> None:
        """
        A user who logged out is not pushed (counted logged_out), whether a
        device was registered or not; after the next PutDevice they are.
        """
        with_device(self.store, "u1", "ios")
        self.store.submit([LogOut("u1"), LogOut("u2")])
        settled = self.pusher.push_to_users(
            ["u1", "u2"], PushNotice("order_chat", "在吗", o_id="o1")
        )
        self.assertIs(await settled, True)
        self.assertEqual(pushes(self.metrics, "logged_out"), 2)
        self.assertEqual(self.umeng.received, [])
        with_device(self.store, "u1", "ios")
        self.pusher.push_to_users(["u1"], PushNotice("order_chat", "在吗", o_id="o1"))
        await self.settled("sent", 1)
        self.assertEqual([r.body["alias"] for r in self.umeng.accepted], ["u1"])

    async def test_expired_timestamp_resigned(self) -> None:
        """After 'timestamp expired' the push is signed again with a fresh timestamp."""
        with_device(self.store, "u1", "ios")
        self.umeng.script = [umeng_error("2028", "时间戳已过期")]
        self.pusher.push_to_users(["u1"], PushNotice("order_chat", "在吗", o_id="o1"))
        await self.settled("sent", 1)
        first, second = self.umeng.received
        self.assertGreater(int(str(second.body["timestamp"])), int(str(first.body["timestamp"])))
        self.assertEqual(pushes(self.metrics, "resigned"), 1)

    async def test_long_chinese_alert_cut_to_limits(self) -> None:
        """A long Chinese alert arrives cut to each app's limit, whole characters only."""
        text = "专家回复了您的问题，" * 300
        self.pusher.push_to_users(["u4"], PushNotice("order_chat", text, o_id="o1"))
        await self.settled("sent", 2)
        for received in self.umeng.accepted:
            app = IOS if received.body["appkey"] == IOS.appkey else ANDROID
            self.assertLessEqual(len(received.raw), BODY_LIMITS[app.platform])
            payload = received.body["payload"]
            assert isinstance(payload, dict)
            alert = payload["aps"]["alert"] if app is IOS else payload["body"]["text"]
            self.assertTrue(alert.endswith(ELLIPSIS))
            self.assertTrue(text.startswith(alert[:-1]))


class ConfigTests(SynchronousTestCase):
    """Loading and checking --umeng-config."""

    def document(self, **changes: object) -> dict[str, object]:
        doc: dict[str, object] = {
            "ios": {"appkey": "ik", "app_master_secret": "is"},
            "android": {"appkey": "ak", "app_master_secret": "as", "activity": "com.x.Main"},
        }
        doc.update(changes)
        return doc

    def test_minimal_with_defaults(self) -> None:
        """The two apps alone give Umeng's endpoint, production mode and alias type."""
        loaded = load_config(temp_file(self, json.dumps(self.document())))
        self.assertEqual(
            loaded,
            UmengConfig(
                UmengApp("ios", "ik", "is"),
                UmengApp("android", "ak", "as", "com.x.Main"),
                "https://msgapi.umeng.com/api/send",
                True,
                "calltalent",
                DeliveryPolicy(),
            ),
        )

    def test_everything_given(self) -> None:
        """Every field and delivery setting is taken from the file."""
        doc = self.document(
            endpoint="http://127.0.0.1:1/send",
            production_mode=False,
            alias_type="ct",
            delivery={
                "queue_size": 5,
                "concurrency": 2,
                "max_attempts": 3,
                "backoff_base": 0.5,
                "backoff_cap": 9,
                "timeout": 2.5,
            },
        )
        loaded = parse_config(doc)
        self.assertEqual(
            (loaded.endpoint, loaded.production_mode, loaded.alias_type, loaded.delivery),
            ("http://127.0.0.1:1/send", False, "ct", DeliveryPolicy(5, 2, 3, 0.5, 9, 2.5)),
        )

    def assertRefused(self, content: str, *words: str) -> None:
        path = temp_file(self, content)
        with self.assertRaises(ValueError) as raised:
            load_config(path)
        message = str(raised.exception)
        self.assertIn(path, message)
        self.assertEqual(message.count("\n"), 0)
        for word in words:
            self.assertIn(word, message)

    def test_bad_files_refused(self) -> None:
        """Each kind of mistake is one sentence naming the file and the field."""
        good = self.document()
        self.assertRefused("{not json", "not valid JSON")
        self.assertRefused("[]", "JSON object")
        self.assertRefused(json.dumps({"android": good["android"]}), "ios is missing")
        self.assertRefused(
            json.dumps(self.document(ios={"appkey": "", "app_master_secret": "s"})), "ios.appkey"
        )
        self.assertRefused(
            json.dumps(self.document(android={"appkey": "a", "app_master_secret": "s"})),
            "android.activity",
        )
        self.assertRefused(json.dumps(self.document(production_mode="yes")), "production_mode")
        self.assertRefused(json.dumps(self.document(endpoint="msgapi.umeng.com")), "endpoint")
        self.assertRefused(json.dumps(self.document(alias="x")), "unknown field alias")
        self.assertRefused(
            json.dumps(self.document(delivery={"concurrency": 0})), "delivery.concurrency"
        )
        self.assertRefused(
            json.dumps(self.document(delivery={"max_attempts": 2.5})), "delivery.max_attempts"
        )
        self.assertRefused(
            json.dumps(self.document(delivery={"timeout": True})), "delivery.timeout"
        )
        self.assertRefused(
            json.dumps(self.document(delivery={"backoff_base": 5, "backoff_cap": 1})), "backoff_cap"
        )

    def test_unreadable_file(self) -> None:
        """A missing file is refused with its path."""
        path = self.mktemp()
        with self.assertRaises(ValueError) as raised:
            load_config(path)
        self.assertIn(path, str(raised.exception))
