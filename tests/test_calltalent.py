"""
CallTalent over the MQTT core, in memory: authentication, topic rules, chat
with sent and received, refusals, and notifications.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from sktalent.authsign import sign
from sktalent.calltalent.app import AppLimits, CallTalent
from sktalent.calltalent.auth import AuthSignChecker
from sktalent.calltalent.interfaces import InvalidRequest
from sktalent.calltalent.pushtexts import PushTexts, parse_texts
from sktalent.calltalent.rules import SERVER_TOPIC, CallTalentRules, client_topic
from sktalent.metrics import Metrics
from sktalent.mqtt import packets as p
from sktalent.mqtt.auth import portal_for
from sktalent.push.disabled import DisabledPusher
from sktalent.push.interfaces import IPusher, PushNotice
from sktalent.store.interfaces import Device, Op, StoreUnavailable
from sktalent.store.memory import MemoryStore

from .mqttclient import Client, Harness, only

SECRET = b"test secret"

# INTERFACE section 8: what a notification without an alert is pushed with.
DEFAULT_PUSH_TEXTS: list[tuple[str, dict[str, str], str]] = [
    ("order", {"status": "pending", "o_id": "o1"}, "订单提出，待专家确认"),
    ("order", {"status": "confirmed", "o_id": "o1"}, "专家已确认，待用户支付"),
    ("order", {"status": "rejected", "o_id": "o1"}, "专家已拒绝"),
    ("order", {"status": "paid", "o_id": "o1"}, "用户已支付，可以沟通"),
    ("order", {"status": "toBeFinished", "o_id": "o1"}, "专家已确认完成，待用户评价"),
    ("order", {"status": "finished", "o_id": "o1"}, "用户已评价"),
    ("note", {"status": "paid", "note_id": "n1"}, "小纸条提出，待专家回答"),
    ("note", {"status": "replied", "note_id": "n1"}, "专家已回答"),
    ("feedback", {"content": "已修复，谢谢"}, "客服回复了您的意见反馈：已修复，谢谢"),
    ("expert", {"status": "verified", "content": "apply"}, "专家资格审核成功"),
    ("expert", {"status": "fail", "content": "证书不清晰"}, "专家资格审核失败：证书不清晰"),
]
DEFAULT_LIMITS = AppLimits()


@implementer(IPusher)
@attrs.define
class RecordingPusher:
    """Keeps what would have been pushed."""

    pushed: list[tuple[tuple[str, ...], PushNotice]] = attrs.Factory(list)

    def push_to_users(self, user_ids: Sequence[str], notice: PushNotice) -> None:
        self.pushed.append((tuple(user_ids), notice))

    def push_to_tag(self, tag: str, notice: PushNotice) -> None:
        self.pushed.append((("tag:" + tag,), notice))

    def stop(self) -> None:
        pass


@attrs.define
class HeldStore(MemoryStore):
    """A MemoryStore whose commits land only when the test says so."""

    held: list[tuple[Deferred[list[object]], Sequence[Op]]] = attrs.Factory(list)

    def submit(self, ops: Sequence[Op]) -> Deferred[list[object]]:
        d: Deferred[list[object]] = Deferred()
        self.held.append((d, ops))
        return d

    def release(self) -> None:
        held, self.held = self.held, []
        for d, ops in held:
            MemoryStore.submit(self, ops).chainDeferred(d)


def msgid(n: int) -> str:
    return f"{n:024x}"


def chat(sender: str, to: str, n: int, content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {
        "msgid": msgid(n),
        "from": sender,
        "to": to,
        "type": "order_chat",
        "payload": {"o_id": "o1", "expert": True, "content": content, **extra},
    }


class CallTalentCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = MemoryStore()
        self.pusher = RecordingPusher()
        self.h = self.harness(self.store)
        self.h.clock.advance(1_700_000_000)

    def harness(self, store: MemoryStore, limits: AppLimits = DEFAULT_LIMITS) -> Harness:
        h = Harness(store=store, authorizer=CallTalentRules())
        h.portal = portal_for(AuthSignChecker(SECRET, h.clock))
        self.app = CallTalent(h.broker, store, self.pusher, h.clock, h.metrics, limits)
        h.app = self.app
        h.factory = h.make_factory()
        return h

    def login(self, user: str, clean: bool = False) -> tuple[Client, list[p.Packet]]:
        c = self.h.client()
        packets = c.connect(
            user, clean=clean, username=user, password=sign(SECRET, user).encode(), keepalive=30
        )
        return c, packets

    def user(self, name: str) -> Client:
        c, packets = self.login(name)
        self.assertEqual(only(p.ConnAck, packets[:1])[0].return_code, 0)
        return c

    def publish(self, c: Client, frame: Any, pid: int = 1) -> None:
        body = frame if isinstance(frame, bytes) else json.dumps(frame).encode()
        c.send(p.Publish(SERVER_TOPIC, body, 1, packet_id=pid))

    def frames(self, c: Client, ack: bool = True) -> list[dict[str, Any]]:
        """Frames delivered to c's topic since last asked, acknowledged."""
        out = []
        for packet in c.received():
            if isinstance(packet, p.Publish):
                self.assertEqual(packet.qos, 1)
                out.append(json.loads(packet.payload))
                if ack:
                    assert packet.packet_id is not None
                    c.send(p.PubAck(packet.packet_id))
        return out


class ConnectTests(CallTalentCase):
    def test_valid(self) -> None:
        """A valid authSign is accepted; the session is persistent."""
        _, packets = self.login("alice")
        self.assertEqual(packets, [p.ConnAck(0, False)])
        self.assertEqual(self.login("alice")[1], [p.ConnAck(0, True)])

    def test_wrong_sign(self) -> None:
        """A wrong authSign gets CONNACK 4."""
        c = self.h.client()
        packets = c.connect("alice", username="alice", password=sign(b"other", "alice").encode())
        self.assertEqual(packets, [p.ConnAck(4)])
        self.assertTrue(c.closed)

    def test_expired_sign(self) -> None:
        """An expired authSign gets CONNACK 4; one still valid is accepted."""
        now = int(self.h.clock.seconds())
        c = self.h.client()
        old = sign(SECRET, "alice", now - 1).encode()
        self.assertEqual(c.connect("alice", username="alice", password=old), [p.ConnAck(4)])
        c = self.h.client()
        fresh = sign(SECRET, "alice", now + 60).encode()
        self.assertEqual(c.connect("alice", username="alice", password=fresh), [p.ConnAck(0)])

    def test_missing_password(self) -> None:
        """No password gets CONNACK 4."""
        c = self.h.client()
        self.assertEqual(c.connect("alice", username="alice"), [p.ConnAck(4)])

    def test_client_id_mismatch(self) -> None:
        """clientid != username gets CONNACK 2."""
        c = self.h.client()
        packets = c.connect("bob", username="alice", password=sign(SECRET, "alice").encode())
        self.assertEqual(packets, [p.ConnAck(2)])

    def test_bad_user_id(self) -> None:
        """A userID that would break topics is refused."""
        for bad in ("a/b", "a+", "#", "x" * 129):
            c = self.h.client()
            packets = c.connect(bad, username=bad, password=sign(SECRET, bad).encode())
            self.assertNotEqual(only(p.ConnAck, packets[:1])[0].return_code, 0, bad)


class TopicRuleTests(CallTalentCase):
    def test_own_topic_only(self) -> None:
        """Only the own topic may be subscribed, at QoS 1 at most."""
        a = self.user("alice")
        a.send(p.Subscribe(5, ((client_topic("alice"), 2), (client_topic("bob"), 1), ("#", 0))))
        self.assertEqual(a.received(), [p.SubAck(5, (1, 0x80, 0x80))])

    def test_publish_elsewhere_dropped(self) -> None:
        """A publish to another topic is acknowledged, dropped and counted."""
        a, b = self.user("alice"), self.user("bob")
        a.send(p.Publish(client_topic("bob"), b"x", 1, packet_id=9))
        self.assertEqual(a.received(), [p.PubAck(9)])
        self.assertEqual(b.received(), [])
        value = self.h.metrics.registry.get_sample_value(
            "sktalent_dropped_total", {"reason": "publish_not_allowed"}
        )
        self.assertEqual(value, 1)


class ChatTests(CallTalentCase):
    def test_chat_sent_received(self) -> None:
        """A chat reaches B with t added; A gets sent; B's received reaches A."""
        a, b = self.user("alice"), self.user("bob")
        frame = chat("alice", "bob", 1, "你好", extra_field=1)
        self.publish(a, frame)
        self.assertEqual(self.frames(a), [{"msgid": msgid(1), "type": "sent"}])
        [delivered] = self.frames(b)
        t = delivered["payload"].pop("t")
        self.assertEqual(t, str(int(self.h.clock.seconds() * 1000)))
        self.assertEqual(delivered, frame)
        self.publish(b, {"msgid": msgid(1), "from": "bob", "to": "alice", "type": "received"}, 2)
        self.assertEqual(self.frames(a), [{"msgid": msgid(1), "type": "received"}])
        self.assertEqual(self.pusher.pushed, [])

    def test_nothing_before_commit(self) -> None:
        """Neither PUBACK nor sent nor delivery happens before the store commits."""
        store = HeldStore()
        self.h = self.harness(store)
        a, b = self.user("alice"), self.user("bob")
        self.publish(a, chat("alice", "bob", 1))
        self.assertEqual((a.received(), b.received()), ([], []))
        store.release()
        self.assertIn(p.PubAck(1), a.received())
        self.assertEqual(len(self.frames(b)), 1)

    def test_retransmission(self) -> None:
        """The same msgid again is not delivered twice; sent comes again."""
        a, b = self.user("alice"), self.user("bob")
        self.publish(a, chat("alice", "bob", 1))
        self.publish(a, chat("alice", "bob", 1), 2)
        self.assertEqual([f["type"] for f in self.frames(a)], ["sent", "sent"])
        self.assertEqual(len(self.frames(b)), 1)

    def test_offline_in_order_and_pushed(self) -> None:
        """Chat to an offline user waits, in order, and each is pushed once."""
        a = self.user("alice")
        for n in range(1, 6):
            self.publish(a, chat("alice", "bob", n, f"m{n}"), n)
        self.assertEqual(len(self.frames(a)), 5)
        self.assertEqual(
            [(users, n.kind, n.alert, n.o_id, n.msgid, n.badge) for users, n in self.pusher.pushed],
            [(("bob",), "order_chat", f"m{n}", "o1", msgid(n), n) for n in range(1, 6)],
        )
        b, packets = self.login("bob")
        self.assertEqual(packets[0], p.ConnAck(0, True))
        contents = [
            json.loads(x.payload)["payload"]["content"] for x in only(p.Publish, packets[1:])
        ]
        self.assertEqual(contents, [f"m{n}" for n in range(1, 6)])

    def test_order_across_reconnects(self) -> None:
        """Unacknowledged chat comes again first after a reconnect, in order."""
        a, b = self.user("alice"), self.user("bob")
        self.publish(a, chat("alice", "bob", 1, "one"))
        b.received()  # Not acknowledged.
        b.lose()
        self.publish(a, chat("alice", "bob", 2, "two"), 2)
        _, packets = self.login("bob")
        contents = [
            json.loads(x.payload)["payload"]["content"] for x in only(p.Publish, packets[1:])
        ]
        self.assertEqual(contents, ["one", "two"])

    def test_takeover(self) -> None:
        """A second login takes the session over."""
        first = self.user("bob")
        second, packets = self.login("bob")
        self.assertEqual(packets, [p.ConnAck(0, True)])
        self.assertTrue(first.closed)
        first.lose()
        self.publish(self.user("alice"), chat("alice", "bob", 1))
        self.assertEqual(len(self.frames(second)), 1)


class RefusalTests(CallTalentCase):
    def setUp(self) -> None:
        super().setUp()
        self.a, self.b = self.user("alice"), self.user("bob")

    def refused(self, frame: Any) -> dict[str, Any]:
        self.publish(self.a, frame)
        [error] = self.frames(self.a)
        self.assertEqual(self.frames(self.b), [])
        self.assertEqual(error["type"], "error")
        return error

    def test_bad_json(self) -> None:
        """Bad JSON gets bad_json with an empty msgid."""
        error = self.refused(b"{nope")
        self.assertEqual((error["error"], error["msgid"]), ("bad_json", ""))

    def test_deeply_nested(self) -> None:
        """JSON nested past what the parser takes is bad_json, not a crash."""
        error = self.refused(b"[" * 60000)
        self.assertEqual(error["error"], "bad_json")
        self.assertFalse(self.a.closed)

    def test_not_object(self) -> None:
        """JSON that is not an object gets bad_envelope."""
        self.assertEqual(self.refused([1, 2])["error"], "bad_envelope")

    def test_bad_msgid(self) -> None:
        """A msgid not of the ObjectId form gets bad_msgid."""
        frame = chat("alice", "bob", 1)
        frame["msgid"] = "ABC"
        error = self.refused(frame)
        self.assertEqual((error["error"], error["msgid"]), ("bad_msgid", "ABC"))

    def test_spoofed_from(self) -> None:
        """A from other than the connection's user gets from_mismatch."""
        error = self.refused(chat("mallory", "bob", 1))
        self.assertEqual((error["error"], error["msgid"]), ("from_mismatch", msgid(1)))

    def test_client_sent_order(self) -> None:
        """A client may not send system types."""
        frame = chat("alice", "bob", 1)
        frame["type"] = "order"
        self.assertEqual(self.refused(frame)["error"], "unknown_type")

    def test_payload_fields(self) -> None:
        """Missing or mistyped payload fields get bad_payload."""
        for change in ({"o_id": 5}, {"expert": "yes"}, {"content": ""}):
            frame = chat("alice", "bob", 1)
            frame["payload"].update(change)
            self.assertEqual(self.refused(frame)["error"], "bad_payload", change)
        frame = chat("alice", "bob", 1)
        del frame["payload"]
        self.assertEqual(self.refused(frame)["error"], "bad_payload")

    def test_too_large(self) -> None:
        """Content over the limit gets too_large."""
        self.assertEqual(self.refused(chat("alice", "bob", 1, "x" * 4001))["error"], "too_large")

    def test_unknown_received(self) -> None:
        """received for a message never sent to the user gets unknown_message."""
        error = self.refused({"msgid": msgid(7), "from": "alice", "to": "bob", "type": "received"})
        self.assertEqual(error["error"], "unknown_message")

    def test_rate_limited(self) -> None:
        """A sender over its rate gets rate_limited, and later may send again."""
        self.h = self.harness(self.store, AppLimits(rate=1, burst=2))
        a, b = self.user("alice"), self.user("bob")
        for n in range(1, 4):
            self.publish(a, chat("alice", "bob", n), n)
        kinds = [f.get("error", f["type"]) for f in self.frames(a)]
        self.assertEqual(kinds, ["sent", "sent", "rate_limited"])
        self.assertEqual(len(self.frames(b)), 2)
        self.h.clock.advance(1)
        self.publish(a, chat("alice", "bob", 4), 4)
        self.assertEqual(self.frames(a), [{"msgid": msgid(4), "type": "sent"}])


class NotificationTests(CallTalentCase):
    def test_online(self) -> None:
        """An online user gets the notification over MQTT and no push."""
        b = self.user("bob")
        payload = {"status": "paid", "o_id": "o9"}
        sent_id = self.successResultOf(self.app.notify("bob", "order", payload, None))
        [frame] = self.frames(b)
        self.assertEqual(
            frame,
            {"msgid": sent_id, "from": "system", "to": "bob", "type": "order", "payload": payload},
        )
        self.assertEqual(self.pusher.pushed, [])

    def test_offline(self) -> None:
        """
        An offline user is pushed the backend's alert with the msgid and the
        count of queued messages, and gets it at the next connect.
        """
        sent_id = self.successResultOf(
            self.app.notify("carol", "note", {"status": "replied", "note_id": "n1"}, "看看")
        )
        [(users, notice)] = self.pusher.pushed
        expected = PushNotice(
            "note", "看看", note_id="n1", status="replied", msgid=sent_id, badge=1
        )
        self.assertEqual((users, notice), (("carol",), expected))
        _, packets = self.login("carol")
        self.assertEqual(packets[0], p.ConnAck(0, True))
        self.assertEqual(json.loads(only(p.Publish, packets[1:])[0].payload)["type"], "note")

    def test_default_texts(self) -> None:
        """
        Without an alert each notification is pushed with the text of its
        type and status (INTERFACE section 8), where the old server said
        "您的订单状态有更新" or showed the raw content.
        """
        for type, payload, text in DEFAULT_PUSH_TEXTS:
            self.successResultOf(self.app.notify("carol", type, payload, None))
            (_, notice) = self.pusher.pushed.pop()
            self.assertEqual(notice.alert, text, (type, payload))

    def test_texts_replaced_while_running(self) -> None:
        """Texts put in force by use() say what the next push says."""
        texts = PushTexts()
        self.app = CallTalent(
            self.h.broker, self.store, self.pusher, self.h.clock, self.h.metrics, texts=texts
        )
        payload = {"status": "paid", "o_id": "o9"}
        self.successResultOf(self.app.notify("carol", "order", payload, None))
        texts.use(parse_texts({"order": {"paid": "订单{o_id}已支付"}}))
        self.successResultOf(self.app.notify("carol", "order", payload, None))
        self.assertEqual(
            [n.alert for _, n in self.pusher.pushed], ["用户已支付，可以沟通", "订单o9已支付"]
        )

    def test_push_off(self) -> None:
        """Without a push service, a push that was due is counted as disabled."""
        metrics = Metrics()
        self.pusher = DisabledPusher(metrics)  # type: ignore[assignment]
        self.h = self.harness(self.store)
        self.successResultOf(self.app.notify("carol", "feedback", {"content": "谢谢"}, None))
        counted = metrics.registry.get_sample_value(
            "sktalent_pushes_total", {"outcome": "disabled"}
        )
        self.assertEqual(counted, 1)

    def test_store_down(self) -> None:
        """While the store is down, notifications and devices are refused at once."""

        class DownStore(MemoryStore):
            available = False

        self.h = self.harness(DownStore())
        self.assertRaises(
            StoreUnavailable, self.app.notify, "bob", "feedback", {"content": "x"}, None
        )
        self.assertRaises(StoreUnavailable, self.app.register_device, Device("bob", "ios", "t"))
        self.failureResultOf(self.app.health(), StoreUnavailable)

    def test_invalid(self) -> None:
        """An unknown status is refused before anything is stored."""
        self.assertRaises(
            InvalidRequest, self.app.notify, "bob", "order", {"status": "x", "o_id": "1"}, None
        )
        self.assertEqual(self.successResultOf(self.store.load_sessions()), [])
