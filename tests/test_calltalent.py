"""
CallTalent over the MQTT core, in memory: authentication, topic rules, chat
with sent and received, refusals, and notifications.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from typing import Any

import attrs
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from sktalent.authsign import sign
from sktalent.calltalent.app import AppLimits, CallTalent, ChatPayload, chat_frame
from sktalent.calltalent.auth import AuthSignChecker
from sktalent.calltalent.delivery import PushDelivery, chat_notice, encode_notice
from sktalent.calltalent.interfaces import InvalidRequest, QueueFull
from sktalent.calltalent.pushtexts import PushTexts, parse_texts
from sktalent.calltalent.rules import SERVER_TOPIC, CallTalentRules, client_topic
from sktalent.metrics import Metrics, QueueFigures
from sktalent.mqtt import packets as p
from sktalent.mqtt.auth import portal_for
from sktalent.mqtt.plan import LOOSE_WAIT, Plan
from sktalent.mqtt.router import NOTHING_RETAINED
from sktalent.mqtt.session import QueueLimits
from sktalent.push.disabled import DisabledPusher
from sktalent.push.interfaces import IPusher, PushNotice, Wanted
from sktalent.store.interfaces import (
    Dequeue,
    Device,
    InsertChat,
    Message,
    SetRetained,
    StoreUnavailable,
)
from sktalent.store.memory import MemoryStore

from .helpers import DEFAULT_PUSH_TEXTS, chat, msgid
from .mqttclient import Client, DownStore, Harness, HeldStore, only

SECRET = b"test secret"

DEFAULT_LIMITS = AppLimits()
PUSH_AFTER = 5.0


@implementer(IPusher)
@attrs.define
class RecordingPusher:
    """
    Keeps what would have been pushed; each push is settled at once, or with
    settle_at_once False when the test fires it from ``unsettled``.
    """

    pushed: list[tuple[tuple[str, ...], PushNotice]] = attrs.Factory(list)
    wanted: list[Wanted] = attrs.Factory(list)
    settle_at_once: bool = True
    unsettled: list[Deferred[bool]] = attrs.Factory(list)

    def push_to_users(
        self, user_ids: Sequence[str], notice: PushNotice, wanted: Wanted | None = None
    ) -> Deferred[bool]:
        self.pushed.append((tuple(user_ids), notice))
        if wanted is not None:
            self.wanted.append(wanted)
        if self.settle_at_once:
            return succeed(True)
        settled: Deferred[bool] = Deferred()
        self.unsettled.append(settled)
        return settled

    def push_to_tag(self, tag: str, notice: PushNotice) -> None:
        self.pushed.append((("tag:" + tag,), notice))

    def stop(self) -> None:
        pass


class CallTalentCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = MemoryStore()
        self.pusher = RecordingPusher()
        self.h = self.harness(self.store)
        self.h.clock.advance(1_700_000_000)

    def harness(self, store: MemoryStore, limits: AppLimits = DEFAULT_LIMITS) -> Harness:
        h = Harness(
            store=store, authorizer=CallTalentRules(), retained=NOTHING_RETAINED, plain=False
        )
        h.portal = portal_for(AuthSignChecker(SECRET, h.clock))
        self.delivery = PushDelivery(h.broker, store, self.pusher, h.clock, PUSH_AFTER)
        h.broker.watch(self.delivery)
        self.app = CallTalent(h.broker, store, self.pusher, h.clock, h.metrics, limits, bans=h.bans)
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
        """
        Frames delivered to c's topic since last asked, acknowledged, with
        those the acknowledgements let through; the acknowledgements are
        durable when it returns.
        """
        out: list[dict[str, Any]] = []
        while packets := c.received():
            for packet in packets:
                if isinstance(packet, p.Publish):
                    self.assertEqual(packet.qos, 1)
                    out.append(json.loads(packet.payload))
                    if ack:
                        assert packet.packet_id is not None
                        c.send(p.PubAck(packet.packet_id))
            if not ack:
                break
        self.h.clock.advance(0)
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

    def test_logins_and_failures_counted(self) -> None:
        """Each accepted CONNECT counts as a login, each refused one by its reason."""
        self.login("alice")
        self.login("alice")
        self.h.client().connect("bob", username="bob", password=b"wrong")
        registry = self.h.metrics.registry
        self.assertEqual(registry.get_sample_value("sktalent_logins_total"), 2)
        self.assertEqual(
            registry.get_sample_value(
                "sktalent_auth_failures_total", {"reason": "bad_credentials"}
            ),
            1,
        )

    def test_expired_sign(self) -> None:
        """An expired authSign gets CONNACK 4; one still valid is accepted."""
        now = int(self.h.clock.seconds())
        c = self.h.client()
        old = sign(SECRET, "alice", now - 1).encode()
        self.assertEqual(c.connect("alice", username="alice", password=old), [p.ConnAck(4)])
        c = self.h.client()
        fresh = sign(SECRET, "alice", now + 60).encode()
        self.assertEqual(c.connect("alice", username="alice", password=fresh), [p.ConnAck(0)])

    def auth_failures(self, reason: str) -> float | None:
        """The refused CONNECTs counted for reason."""
        return self.h.metrics.registry.get_sample_value(
            "sktalent_auth_failures_total", {"reason": reason}
        )

    def test_missing_password(self) -> None:
        """No password gets CONNACK 4."""
        c = self.h.client()
        self.assertEqual(c.connect("alice", username="alice"), [p.ConnAck(4)])

    def test_missing_username(self) -> None:
        """
        No username (and so no password) gets CONNACK 4, counted as an auth
        failure, with nothing logged as an error.
        """
        c = self.h.client()
        self.assertEqual(c.connect("alice"), [p.ConnAck(4)])
        self.assertTrue(c.closed)
        self.assertEqual(self.auth_failures("missing_credentials"), 1)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_client_id_mismatch(self) -> None:
        """clientid != username gets CONNACK 2."""
        c = self.h.client()
        packets = c.connect("bob", username="alice", password=sign(SECRET, "alice").encode())
        self.assertEqual(packets, [p.ConnAck(2)])

    def test_unusable_user_id(self) -> None:
        """
        An unusable userID gets CONNACK 2, even with the HMAC of it under the
        secret: one that would break topics, holds ":" or a control
        character, or is the reserved "system".
        """
        unusable = ["a/b", "a+", "#", "x" * 129, "alice:4102444800", "a\x85", "system"]
        unusable += ["System", "\uff53\uff59\uff53\uff54\uff45\uff4d", "system\u200b"]
        for bad in unusable:
            c = self.h.client()
            password = hmac.new(SECRET, bad.encode(), hashlib.sha256).hexdigest().encode()
            self.assertEqual(c.connect(bad, username=bad, password=password), [p.ConnAck(2)])
        self.assertEqual(self.auth_failures("bad_user_id"), len(unusable))


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


# What an attacker would have bob believe: a notification from the backend.
FORGED = json.dumps(
    {
        "msgid": msgid(99),
        "from": "system",
        "to": "bob",
        "type": "order",
        "payload": {"status": "paid", "o_id": "o1"},
    }
).encode()


class WillAndRetainTests(CallTalentCase):
    """
    Wills and retained messages would bypass the topic rules: in CallTalent
    mode no will is published and nothing is retained.
    """

    def attack(self, will: p.Will) -> None:
        """mallory connects with will, then drops its connection."""
        c = self.h.client()
        password = sign(SECRET, "mallory").encode()
        packets = c.connect(
            "mallory", clean=False, username="mallory", password=password, will=will
        )
        self.assertEqual(packets, [p.ConnAck(0)])
        c.lose()

    def test_forged_will_not_published(self) -> None:
        """
        A retained will on bob's topic carrying a forged system
        notification reaches bob neither live, nor at his next SUBSCRIBE,
        nor at his next connection; nothing is retained; it is counted.
        """
        bob = self.user("bob")
        self.attack(p.Will(client_topic("bob"), FORGED, 1, retain=True))
        self.assertEqual(self.frames(bob), [])
        bob.send(p.Subscribe(3, ((client_topic("bob"), 1),)))
        self.assertEqual(bob.received(), [p.SubAck(3, (1,))])
        self.assertEqual(self.successResultOf(self.store.load_retained()), [])
        self.assertEqual(self.login("bob")[1], [p.ConnAck(0, True)])
        dropped = self.h.metrics.registry.get_sample_value(
            "sktalent_dropped_total", {"reason": "will_not_allowed"}
        )
        self.assertEqual(dropped, 1)

    def test_will_to_server_topic_not_published(self) -> None:
        """
        A will on the server's topic is not handled as a chat either.
        """
        bob = self.user("bob")
        will = json.dumps(chat("mallory", "bob", 1)).encode()
        self.attack(p.Will(SERVER_TOPIC, will, 1))
        self.assertEqual(self.frames(bob), [])
        self.assertEqual(self.successResultOf(self.store.chat_history("o1", 10, None)), [])

    def test_retained_publish_not_retained(self) -> None:
        """
        A chat published with the retain flag is delivered without it and
        not retained.
        """
        alice, bob = self.user("alice"), self.user("bob")
        body = json.dumps(chat("alice", "bob", 1)).encode()
        alice.send(p.Publish(SERVER_TOPIC, body, 1, retain=True, packet_id=1))
        [delivered] = only(p.Publish, bob.received())
        self.assertFalse(delivered.retain)
        self.assertEqual(self.successResultOf(self.store.load_retained()), [])

    def test_stored_retained_removed_at_start(self) -> None:
        """
        Retained messages already in the store (a forged will kept by an
        older version) are removed when the server starts, not resent.
        """
        store = MemoryStore()
        forged = Message(client_topic("bob"), FORGED, 1, retain=True)
        store.submit([SetRetained(forged.topic, forged)])
        self.h = self.harness(store)
        self.successResultOf(Deferred.fromCoroutine(self.h.broker.start()))
        self.assertEqual(self.successResultOf(store.load_retained()), [])
        bob = self.user("bob")
        bob.send(p.Subscribe(3, ((client_topic("bob"), 1),)))
        self.assertEqual(bob.received(), [p.SubAck(3, (1,))])


class ReservedSystemTests(CallTalentCase):
    """
    "system" is the sender of notifications: no client is it, and nothing
    is sent to it.
    """

    def test_not_a_chat_recipient(self) -> None:
        """
        A chat or a receipt to "system", or to what reads as it, is refused
        with bad_envelope.
        """
        alice = self.user("alice")
        n = 0
        for to in ["system", "System", "\uff53\uff59\uff53\uff54\uff45\uff4d", "system\u200b"]:
            receipt = {"msgid": msgid(2), "from": "alice", "to": to, "type": "received"}
            for frame in [chat("alice", to, 1), receipt]:
                n += 1
                self.publish(alice, frame, n)
                [error] = self.frames(alice)
                self.assertEqual(error["error"], "bad_envelope", to)
        sessions = self.successResultOf(self.store.load_sessions())
        self.assertEqual([s.client_id for s in sessions], ["alice"])

    def test_not_a_notification_recipient(self) -> None:
        """
        A notification to "system" is refused before anything is stored.
        """
        e = self.assertRaises(
            InvalidRequest, self.app.notify, "system", "feedback", {"content": "x"}, None
        )
        self.assertEqual(e.code, "bad_request")
        self.assertIn("not 'system'", str(e))
        self.assertEqual(self.successResultOf(self.store.load_sessions()), [])


class ChatTests(CallTalentCase):
    def test_chat_sent_received(self) -> None:
        """A chat reaches B with t added; A gets sent; B's received reaches A."""
        a, b = self.user("alice"), self.user("bob")
        frame = chat("alice", "bob", 1, "你好")
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
        store = HeldStore(holding=False)
        self.h = self.harness(store)
        a, b = self.user("alice"), self.user("bob")
        store.holding = True
        self.publish(a, chat("alice", "bob", 1))
        self.assertEqual((a.received(), b.received()), ([], []))
        store.release()
        self.assertIn(p.PubAck(1), a.received())
        self.assertEqual(len(self.frames(b)), 1)

    def test_one_commit_and_write_per_read(self) -> None:
        """
        Chats read together are one submit to the store; once it is durable
        the sender gets every PUBACK and `sent` in one write, and the
        recipient every chat in one.
        """
        store = HeldStore(holding=False)
        self.h = self.harness(store)
        a, b = self.user("alice"), self.user("bob")
        store.holding = True
        a.send(
            *(
                p.Publish(
                    SERVER_TOPIC, json.dumps(chat("alice", "bob", n)).encode(), 1, packet_id=n
                )
                for n in range(1, 6)
            )
        )
        self.assertEqual(len(store.held), 1)
        before = a.transport.writes, b.transport.writes
        store.release()
        self.assertEqual((a.transport.writes, b.transport.writes), (before[0] + 1, before[1] + 1))
        # Each chat's PUBACK, then its `sent`.
        sent = a.received()
        self.assertEqual(sent[0::2], [p.PubAck(n) for n in range(1, 6)])
        frames = [json.loads(packet.payload) for packet in only(p.Publish, sent[1::2])]
        self.assertEqual(frames, [{"msgid": msgid(n), "type": "sent"} for n in range(1, 6)])
        delivered = only(p.Publish, b.received())
        self.assertEqual(
            [json.loads(d.payload)["msgid"] for d in delivered], [msgid(n) for n in range(1, 6)]
        )

    def test_acknowledgements_share_a_submit(self) -> None:
        """
        PUBACKs read one at a time take their messages off the queue
        together, in one submit LOOSE_WAIT after the first, not in a submit
        each.
        """
        store = HeldStore(holding=False)
        self.h = self.harness(store)
        a, b = self.user("alice"), self.user("bob")
        for n in range(1, 6):
            self.publish(a, chat("alice", "bob", n), n)
        self.h.clock.advance(0)
        delivered = only(p.Publish, b.received())
        self.assertEqual(len(delivered), 5)
        store.holding = True
        for d in delivered:
            b.send(p.PubAck(d.packet_id or 0))
            self.h.clock.advance(LOOSE_WAIT / 10)
        self.assertEqual(store.held, [])
        self.h.clock.advance(LOOSE_WAIT)
        self.assertEqual(len(store.held), 1)
        [(_, ops)] = store.held
        self.assertEqual(list(ops), [Dequeue("bob", seq) for seq in range(1, 6)])

    def test_acknowledgements_ride_with_a_chat(self) -> None:
        """
        A chat published while acknowledgements wait carries them in its own
        submit, ahead of its operations; nothing is left to commit after.
        """
        store = HeldStore(holding=False)
        self.h = self.harness(store)
        a, b = self.user("alice"), self.user("bob")
        self.publish(a, chat("alice", "bob", 1), 1)
        self.h.clock.advance(0)
        [delivered] = only(p.Publish, b.received())
        store.holding = True
        b.send(p.PubAck(delivered.packet_id or 0))
        self.publish(a, chat("alice", "bob", 2), 2)
        [(_, ops)] = store.held
        self.assertEqual(ops[0], Dequeue("bob", 1))
        self.assertIsInstance(ops[1], InsertChat)
        self.h.clock.advance(LOOSE_WAIT)
        self.assertEqual(len(store.held), 1)

    def test_retransmission(self) -> None:
        """The same msgid again is not delivered twice; sent comes again."""
        a, b = self.user("alice"), self.user("bob")
        self.publish(a, chat("alice", "bob", 1))
        self.publish(a, chat("alice", "bob", 1), 2)
        self.assertEqual([f["type"] for f in self.frames(a)], ["sent", "sent"])
        self.assertEqual(len(self.frames(b)), 1)

    def test_offline_in_order_and_pushed(self) -> None:
        """
        Chat to an offline user waits, in order, and each is pushed once at
        once, its badge counting what was queued by then.
        """
        a = self.user("alice")
        for n in range(1, 6):
            self.publish(a, chat("alice", "bob", n, f"m{n}"), n)
        self.assertEqual(len(self.frames(a)), 5)
        self.h.clock.advance(0)
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


# Any text a chat may hold, escapes and characters beyond ASCII included.
_texts = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=40)


def _compact(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class ChatEncodingTests(SynchronousTestCase):
    """A chat's frame, notice and digest, written directly, are what json writes."""

    @given(_texts, _texts, _texts, _texts, _texts, st.booleans(), st.integers(0, 2**45))
    def test_frame(
        self, msgid: str, sender: str, to: str, o_id: str, content: str, expert: bool, at: int
    ) -> None:
        """chat_frame is the compact JSON of the documented fields, in their order."""
        frame = {
            "msgid": msgid,
            "from": sender,
            "to": to,
            "type": "order_chat",
            "payload": {"o_id": o_id, "expert": expert, "content": content, "t": str(at)},
        }
        self.assertEqual(
            chat_frame(msgid, sender, to, ChatPayload(o_id, expert, content), at), _compact(frame)
        )

    @given(_texts, _texts, _texts)
    def test_notice(self, msgid: str, o_id: str, content: str) -> None:
        """chat_notice is encode_notice of the push PushTexts makes for the chat."""
        frame = {
            "msgid": msgid,
            "type": "order_chat",
            "payload": {"o_id": o_id, "expert": False, "content": content},
        }
        self.assertEqual(
            chat_notice(msgid, o_id, content), encode_notice(PushTexts().notice(frame))
        )

    @given(_texts, _texts, st.booleans())
    def test_digest(self, o_id: str, content: str, expert: bool) -> None:
        """The digest is the one stores hold: blake2b-128 of the compact JSON list."""
        text = _compact([o_id, expert, content]).encode()
        self.assertEqual(
            ChatPayload(o_id, expert, content).digest(),
            hashlib.blake2b(text, digest_size=16).hexdigest(),
        )


class LatencyTests(CallTalentCase):
    def test_publish_to_sent_timed(self) -> None:
        """
        The time from a chat's PUBLISH to its `sent` going out, the commit
        wait included, is observed once per chat.
        """
        store = HeldStore(holding=False)
        self.h = self.harness(store)
        self.user("bob")
        a = self.user("alice")
        store.holding = True
        self.publish(a, chat("alice", "bob", 1))
        self.h.clock.advance(0.25)
        store.release()
        self.assertEqual([f["type"] for f in self.frames(a)], ["sent"])
        registry = self.h.metrics.registry
        name = "sktalent_publish_to_sent_seconds"
        self.assertEqual(registry.get_sample_value(f"{name}_count"), 1)
        self.assertEqual(registry.get_sample_value(f"{name}_sum"), 0.25)
        self.assertEqual(registry.get_sample_value(f"{name}_bucket", {"le": "0.1"}), 0)
        self.assertEqual(registry.get_sample_value(f"{name}_bucket", {"le": "0.25"}), 1)

    def test_oldest_queued_age(self) -> None:
        """
        The oldest-queued gauge is the age of the oldest message waiting for
        anyone, as the store said when last read, and 0 once everything is
        acknowledged.
        """
        figures = QueueFigures(self.h.clock, self.store)
        self.h.metrics.watch_queues(lambda: figures.last, self.h.clock.seconds)

        def age() -> float | None:
            self.successResultOf(figures.refresh())
            return self.h.metrics.registry.get_sample_value("sktalent_oldest_queued_seconds")

        a = self.user("alice")
        self.assertEqual(age(), 0)
        self.publish(a, chat("alice", "bob", 1))
        self.frames(a)
        self.h.clock.advance(30)
        self.publish(a, chat("alice", "bob", 2), 2)
        self.frames(a)
        self.h.clock.advance(15)
        self.assertEqual(age(), 45)
        b, packets = self.login("bob")
        queued = only(p.Publish, packets[1:])
        self.assertEqual(len(queued), 2)
        b.send(p.PubAck(queued[0].packet_id or 0))
        self.h.clock.advance(LOOSE_WAIT)
        self.assertAlmostEqual(age(), 15 + LOOSE_WAIT, places=6)
        b.send(p.PubAck(queued[1].packet_id or 0))
        self.h.clock.advance(LOOSE_WAIT)
        self.assertEqual(age(), 0)


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

    def test_long_o_id(self) -> None:
        """
        An o_id of 128 characters is taken; one longer, which no push could
        carry, gets bad_payload and is neither stored nor forwarded.
        """
        self.publish(self.a, chat("alice", "bob", 1, o_id="o" * 128))
        self.assertEqual([f["type"] for f in self.frames(self.a)], ["sent"])
        self.assertEqual(len(self.frames(self.b)), 1)
        self.assertEqual(
            self.refused(chat("alice", "bob", 2, o_id="o" * 129))["error"], "bad_payload"
        )
        history = self.successResultOf(self.store.chat_history("o" * 129, 10, None))
        self.assertEqual(history, [])

    def test_too_large(self) -> None:
        """Content over the limit gets too_large."""
        self.assertEqual(self.refused(chat("alice", "bob", 1, "x" * 4001))["error"], "too_large")

    def test_unknown_received(self) -> None:
        """received for a message never sent to the user gets unknown_message."""
        error = self.refused({"msgid": msgid(7), "from": "alice", "to": "bob", "type": "received"})
        self.assertEqual(error["error"], "unknown_message")

    def test_duplicate_msgid(self) -> None:
        """
        The same msgid again for another recipient, or for other content, gets
        duplicate_msgid and reaches nobody; the first message stands.
        """
        c = self.user("carol")
        self.publish(self.a, chat("alice", "bob", 1, "first"))
        self.assertEqual(self.frames(self.a), [{"msgid": msgid(1), "type": "sent"}])
        self.assertEqual(len(self.frames(self.b)), 1)
        for pid, frame in enumerate(
            (chat("alice", "carol", 1, "first"), chat("alice", "bob", 1, "other")), 2
        ):
            self.publish(self.a, frame, pid)
        errors = self.frames(self.a)
        self.assertEqual(
            [(e["msgid"], e["error"]) for e in errors], [(msgid(1), "duplicate_msgid")] * 2
        )
        self.assertEqual((self.frames(self.b), self.frames(c)), ([], []))
        history = self.successResultOf(self.store.chat_history("o1", 10, None))
        self.assertEqual([json.loads(h.envelope)["payload"]["content"] for h in history], ["first"])

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


class EnvelopeTests(CallTalentCase):
    """Bad input never closes a connection and never reaches the recipient."""

    def setUp(self) -> None:
        super().setUp()
        self.a, self.b = self.user("alice"), self.user("bob")

    def answered(self, body: bytes, pid: int = 1) -> dict[str, Any]:
        """Publish body as alice: the single frame she gets, once PUBACKed."""
        self.publish(self.a, body, pid)
        self.assertFalse(self.a.closed)
        received = self.a.received()
        self.assertEqual(received[:1], [p.PubAck(pid)])
        [publish] = only(p.Publish, received[1:])
        assert publish.packet_id is not None
        self.a.send(p.PubAck(publish.packet_id))
        frame: dict[str, Any] = json.loads(publish.payload)
        return frame

    def with_marker(self, marker: bytes) -> list[tuple[str, bytes]]:
        """A valid chat with marker put into each field in turn, as JSON text."""
        placeholder = "MARKER"
        frames: list[tuple[str, dict[str, Any]]] = []
        for field in ("msgid", "from", "to", "type"):
            frame = chat("alice", "bob", 1)
            frame[field] += placeholder
            frames.append((field, frame))
        for field in ("o_id", "content"):
            frame = chat("alice", "bob", 1)
            frame["payload"][field] += placeholder
            frames.append((field, frame))
        frames.append(("unknown field", dict(chat("alice", "bob", 1), alert=placeholder)))
        frames.append(("unknown key", dict(chat("alice", "bob", 1), **{placeholder: 1})))
        frame = chat("alice", "bob", 1)
        frame["payload"][placeholder] = [placeholder]
        frames.append(("payload key", frame))
        return [
            (f, json.dumps(x).encode().replace(placeholder.encode(), marker)) for f, x in frames
        ]

    def test_lone_surrogate(self) -> None:
        """
        A lone surrogate, as raw bytes or as a JSON escape, in any field is
        bad_json: PUBACKed, answered, nothing delivered, the connection open.
        A valid msgid is echoed when the text was JSON.
        """
        pid = 0
        for marker, echoed in ((b"\xed\xa0\x80", False), (b"\\ud800", True), (b"\\uDC00x", True)):
            for field, body in self.with_marker(marker):
                pid += 1
                error = self.answered(body, pid)
                expected = msgid(1) if echoed and field != "msgid" else ""
                self.assertEqual(
                    (error["error"], error["msgid"]), ("bad_json", expected), (marker, field)
                )
        self.assertEqual(self.frames(self.b), [])
        # A surrogate pair is a character like any other.
        self.publish(self.a, json.dumps(chat("alice", "bob", 1, "\U0001f600")).encode(), 99)
        self.assertEqual(self.frames(self.a), [{"msgid": msgid(1), "type": "sent"}])
        self.assertEqual(self.frames(self.b)[0]["payload"]["content"], "\U0001f600")

    def test_nan_and_infinity(self) -> None:
        """NaN, Infinity and -Infinity anywhere are bad_json; nothing is delivered."""
        pid = 0
        for constant in (b"NaN", b"Infinity", b"-Infinity"):
            for body in (
                json.dumps(chat("alice", "bob", 1, expert=True))
                .encode()
                .replace(b"true", constant),
                json.dumps(dict(chat("alice", "bob", 1), n="X")).encode().replace(b'"X"', constant),
            ):
                pid += 1
                self.assertEqual(self.answered(body, pid)["error"], "bad_json", body)
        self.assertEqual(self.frames(self.b), [])

    def test_only_documented_fields_forwarded(self) -> None:
        """The recipient gets exactly the documented fields; unknown ones are dropped."""
        frame = chat("alice", "bob", 1, url="javascript:alert(1)", from_name="system")
        frame |= {"alert": "hacked", "from_name": "system"}
        self.publish(self.a, frame)
        self.assertEqual(self.frames(self.a), [{"msgid": msgid(1), "type": "sent"}])
        [delivered] = self.frames(self.b)
        self.assertEqual(list(delivered), ["msgid", "from", "to", "type", "payload"])
        self.assertEqual(list(delivered["payload"]), ["o_id", "expert", "content", "t"])
        [stored] = self.successResultOf(self.store.chat_history("o1", 10, None))
        self.assertEqual(json.loads(stored.envelope), delivered)

    def test_retransmission_not_delivered_twice(self) -> None:
        """
        A true retransmission, later and on a new connection, gets sent again
        and is delivered once.
        """
        sent = {"msgid": msgid(1), "type": "sent"}
        self.publish(self.a, chat("alice", "bob", 1, "x"))
        self.assertEqual(self.frames(self.a), [sent])
        self.h.clock.advance(5)
        self.a.lose()
        a = self.user("alice")
        self.publish(a, chat("alice", "bob", 1, "x"))
        self.assertEqual(self.frames(a), [sent])
        self.assertEqual(len(self.frames(self.b)), 1)

    def test_upper_case_msgid(self) -> None:
        """
        An upper-case msgid is accepted and is the lower-case one: the sender's
        answers echo it as written, what is stored and forwarded is lower
        case, and retransmission and received match either spelling.
        """
        upper = "5F1D7C3A9B2E4D6F8A0B1C2D"
        frame = chat("alice", "bob", 1)
        frame["msgid"] = upper
        self.publish(self.a, frame)
        self.assertEqual(self.frames(self.a), [{"msgid": upper, "type": "sent"}])
        [delivered] = self.frames(self.b)
        self.assertEqual(delivered["msgid"], upper.lower())
        self.publish(self.a, dict(frame, msgid=upper.lower()), 2)
        self.assertEqual(self.frames(self.a), [{"msgid": upper.lower(), "type": "sent"}])
        self.assertEqual(self.frames(self.b), [])
        self.publish(self.a, dict(frame, to="carol", msgid=upper.title()), 3)
        self.assertEqual(self.frames(self.a)[0]["error"], "duplicate_msgid")
        receipt = {"msgid": upper, "from": "bob", "to": "alice", "type": "received"}
        self.publish(self.b, receipt)
        self.assertEqual(self.frames(self.a), [{"msgid": upper.lower(), "type": "received"}])
        self.assertEqual(self.frames(self.b), [])


class RateTests(CallTalentCase):
    def refused_count(self, code: str) -> float:
        value = self.h.metrics.registry.get_sample_value("sktalent_refusals_total", {"code": code})
        return value or 0

    def test_refusals_count_against_rate(self) -> None:
        """
        Invalid messages count against the rate: past it the sender gets one
        rate_limited frame a second, each message is still PUBACKed, and the
        rest are counted, neither stored nor logged one by one.
        """
        self.h = self.harness(self.store, AppLimits(rate=1, burst=2))
        a, b = self.user("alice"), self.user("bob")
        frames = []
        with capturedLogs() as events:
            for _ in range(3):
                for n in range(1, 501):
                    self.publish(a, b"{", n)
                received = a.received()
                acks = [x for x in received if isinstance(x, p.PubAck)]
                self.assertEqual(acks, [p.PubAck(n) for n in range(1, 501)])
                for publish in received:
                    if isinstance(publish, p.Publish):
                        frames.append(json.loads(publish.payload)["error"])
                        assert publish.packet_id is not None
                        a.send(p.PubAck(publish.packet_id))
                self.h.clock.advance(1)
        self.assertFalse(a.closed)
        # The burst, then one token and one warning a second.
        self.assertEqual(
            frames,
            [
                "bad_json",
                "bad_json",
                "rate_limited",
                "bad_json",
                "rate_limited",
                "bad_json",
                "rate_limited",
            ],
        )
        self.assertEqual(self.refused_count("rate_limited"), 1500 - 4)
        self.assertEqual(self.refused_count("bad_json"), 4)
        refusals = [e for e in events if "Refused" in e.get("log_format", "")]
        self.assertEqual(len(refusals), 7)
        queued = self.successResultOf(self.store.load_sessions())
        self.assertLessEqual(sum(len(s.queue) for s in queued), 7)
        # The rate limit did not cost anything to others.
        self.publish(b, chat("bob", "alice", 1))
        self.assertEqual(self.frames(b), [{"msgid": msgid(1), "type": "sent"}])

    def test_receipts_have_their_own_bucket(self) -> None:
        """A chat page confirming 90 messages at once is not refused, nor are the chats after."""
        a, b = self.user("alice"), self.user("bob")
        for n in range(1, 91):
            self.publish(a, chat("alice", "bob", n), n)
            self.h.clock.advance(0.05)
        self.assertEqual(len(self.frames(a)), 90)
        self.assertEqual(len(self.frames(b)), 90)
        for n in range(1, 91):
            receipt = {"msgid": msgid(n), "from": "bob", "to": "alice", "type": "received"}
            self.publish(b, receipt, n)
        self.assertEqual(
            self.frames(a), [{"msgid": msgid(n), "type": "received"} for n in range(1, 91)]
        )
        for n in range(1, 61):
            self.publish(b, chat("bob", "alice", 100 + n), n)
        self.assertEqual([f["type"] for f in self.frames(b)], ["sent"] * 60)
        self.assertEqual(self.refused_count("rate_limited"), 0)

    def test_receipt_rate_bounded(self) -> None:
        """Receipts have a rate too: ten times the chat rate."""
        self.h = self.harness(self.store, AppLimits(rate=1, burst=2))
        b = self.user("bob")
        for n in range(1, 31):
            receipt = {"msgid": msgid(n), "from": "bob", "to": "alice", "type": "received"}
            self.publish(b, receipt, n)
        errors = [f["error"] for f in self.frames(b)]
        self.assertEqual(errors, ["unknown_message"] * 20 + ["rate_limited"])
        self.assertEqual(self.refused_count("rate_limited"), 10)

    def test_idle_senders_forgotten(self) -> None:
        """
        The rate state of a sender idle long enough to have full buckets is
        forgotten: memory grows with the senders of the last seconds only.
        """
        message = Message(SERVER_TOPIC, b"{", 1)
        for n in range(3000):
            self.app.handle(f"u{n}", message, Plan())
            self.h.clock.advance(0.01)
        # Burst / rate is 3 s: 300 senders at 0.01 s apart.
        self.assertLessEqual(len(self.app._senders), 301)
        # Coming back, a forgotten sender has its whole burst again.
        plan = Plan()
        for _ in range(int(DEFAULT_LIMITS.burst)):
            self.app.handle("u0", message, plan)
        self.assertEqual(self.refused_count("rate_limited"), 0)


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
        count of unacknowledged messages, and gets it at the next connect.
        """
        sent_id = self.successResultOf(
            self.app.notify("carol", "note", {"status": "replied", "note_id": "n1"}, "看看")
        )
        self.h.clock.advance(0)
        [(users, notice)] = self.pusher.pushed
        expected = PushNotice(
            "note", "看看", note_id="n1", status="replied", msgid=sent_id, badge=1, reason="offline"
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
            self.h.clock.advance(0)
            (_, notice) = self.pusher.pushed.pop()
            self.assertEqual(notice.alert, text, (type, payload))

    def test_texts_replaced_while_running(self) -> None:
        """Texts put in force by use() say what the next push says."""
        texts = PushTexts()
        self.app = CallTalent(
            self.h.broker,
            self.store,
            self.pusher,
            self.h.clock,
            self.h.metrics,
            texts=texts,
            bans=self.h.bans,
        )
        payload = {"status": "paid", "o_id": "o9"}
        self.successResultOf(self.app.notify("carol", "order", payload, None))
        texts.use(parse_texts({"order": {"paid": "订单{o_id}已支付"}}))
        self.successResultOf(self.app.notify("carol", "order", payload, None))
        self.h.clock.advance(0)
        self.assertEqual(
            [n.alert for _, n in self.pusher.pushed], ["用户已支付，可以沟通", "订单o9已支付"]
        )

    def test_push_off(self) -> None:
        """Without a push service, a push that was due is counted as disabled."""
        metrics = Metrics()
        self.pusher = DisabledPusher(metrics)  # type: ignore[assignment]
        self.h = self.harness(self.store)
        self.successResultOf(self.app.notify("carol", "feedback", {"content": "谢谢"}, None))
        self.h.clock.advance(0)
        counted = metrics.registry.get_sample_value(
            "sktalent_pushes_total", {"outcome": "disabled"}
        )
        self.assertEqual(counted, 1)

    def test_store_down(self) -> None:
        """While the store is down, notifications and devices are refused at once."""
        self.h = self.harness(DownStore())
        self.assertRaises(
            StoreUnavailable, self.app.notify, "bob", "feedback", {"content": "x"}, None
        )
        self.assertRaises(StoreUnavailable, self.app.register_device, Device("bob", "ios", "t"))
        self.assertEqual(self.successResultOf(self.app.health()), {"store": False})

    def test_invalid(self) -> None:
        """An unknown status is refused before anything is stored."""
        self.assertRaises(
            InvalidRequest, self.app.notify, "bob", "order", {"status": "x", "o_id": "1"}, None
        )
        self.assertEqual(self.successResultOf(self.store.load_sessions()), [])


class QueueFullTests(CallTalentCase):
    """
    A chat or notification is refused when the recipient's queue is full;
    nothing acknowledged is ever dropped to make room.
    """

    def setUp(self) -> None:
        super().setUp()
        self.limit(3)

    def limit(self, messages: int, nbytes: int = 65536) -> None:
        self.h.broker.limits = QueueLimits(messages, nbytes)

    def answers(self, c: Client) -> dict[str, str]:
        """msgid -> sent or the error code, of the frames c got, acknowledged."""
        answers: dict[str, str] = {}
        for frame in self.frames(c):
            self.assertNotIn(frame["msgid"], answers)
            answers[frame["msgid"]] = frame.get("error", frame["type"])
        return answers

    def send_chats(self, c: Client, sender: str, to: str, numbers: range) -> list[str]:
        """Each chat's answer (sent or the error), read before the next is sent."""
        answers = []
        for n in numbers:
            self.publish(c, chat(sender, to, n, f"m{n}"), n)
            answers.append(self.answers(c)[msgid(n)])
        return answers

    def contents(self, c: Client) -> list[str]:
        return [f["payload"]["content"] for f in self.frames(c)]

    def arrive(self, name: str) -> tuple[Client, list[dict[str, Any]]]:
        """name connects: the client, and the frames queued for it, acknowledged."""
        c, packets = self.login(name)
        frames = []
        for packet in only(p.Publish, packets[1:]):
            frames.append(json.loads(packet.payload))
            assert packet.packet_id is not None
            c.send(p.PubAck(packet.packet_id))
        self.h.clock.advance(0)
        return c, frames

    def test_chat_refused_when_full(self) -> None:
        """
        Past the limit a chat gets queue_full and no sent, is neither stored
        nor pushed, and what got sent is all delivered in order; once the
        recipient has read, the refused chat sent again is taken.
        """
        a = self.user("alice")
        self.assertEqual(
            self.send_chats(a, "alice", "bob", range(1, 6)), ["sent"] * 3 + ["queue_full"] * 2
        )
        history = self.successResultOf(self.store.chat_history("o1", 10, None))
        self.assertEqual([c.msgid for c in history], [msgid(1), msgid(2), msgid(3)])
        self.h.clock.advance(0)
        self.assertEqual(len(self.pusher.pushed), 3)
        self.assertEqual(
            self.h.metrics.registry.get_sample_value(
                "sktalent_refusals_total", {"code": "queue_full"}
            ),
            2,
        )
        b, frames = self.arrive("bob")
        self.assertEqual([f["payload"]["content"] for f in frames], ["m1", "m2", "m3"])
        self.publish(a, chat("alice", "bob", 4, "m4"), 6)
        self.assertEqual(self.answers(a), {msgid(4): "sent"})
        self.assertEqual(self.contents(b), ["m4"])

    def test_connected_reader_that_does_not_read(self) -> None:
        """A connected recipient who does not acknowledge fills its queue the same way."""
        a, b = self.user("alice"), self.user("bob")
        self.assertEqual(
            self.send_chats(a, "alice", "bob", range(1, 6)), ["sent"] * 3 + ["queue_full"] * 2
        )
        self.assertEqual(self.contents(b), ["m1", "m2", "m3"])
        self.publish(a, chat("alice", "bob", 5, "m5"), 6)
        self.assertEqual(self.answers(a), {msgid(5): "sent"})
        self.assertEqual(self.contents(b), ["m5"])

    def test_race_for_the_last_place(self) -> None:
        """
        The room is decided where the commit lands: of two chats whose
        commits are under way together for the last place, one gets sent and
        the other queue_full.
        """
        store = HeldStore(holding=False)
        self.h = self.harness(store)
        self.limit(3)
        a, c = self.user("alice"), self.user("carol")
        for n in (1, 2):
            self.publish(a, chat("alice", "bob", n), n)
        self.frames(a)
        store.holding = True
        self.publish(a, chat("alice", "bob", 3), 3)
        self.publish(c, chat("carol", "bob", 4), 1)
        self.assertEqual((a.received(), c.received()), ([], []))
        store.holding = False
        store.release()
        self.assertEqual(self.answers(a), {msgid(3): "sent"})
        self.assertEqual(self.answers(c), {msgid(4): "queue_full"})
        self.assertEqual(len(self.arrive("bob")[1]), 3)

    def test_retransmission_when_full(self) -> None:
        """A chat already kept, sent again while the queue is full, gets sent again, once."""
        a = self.user("alice")
        for n in range(1, 4):
            self.publish(a, chat("alice", "bob", n), n)
        self.frames(a)
        self.publish(a, chat("alice", "bob", 3), 4)
        self.assertEqual(self.frames(a), [{"msgid": msgid(3), "type": "sent"}])
        self.assertEqual(len(self.arrive("bob")[1]), 3)

    def test_msgid_reused_when_full(self) -> None:
        """
        A msgid kept for another recipient, or for other content, reused for
        a full queue gets duplicate_msgid, as it would with room, never sent;
        a new msgid gets queue_full and the recipient gets only what was sent.
        """
        a = self.user("alice")
        self.publish(a, chat("alice", "carol", 7, "for carol"), 1)
        for n in range(1, 4):
            self.publish(a, chat("alice", "bob", n), n + 1)
        self.assertEqual(set(self.answers(a).values()), {"sent"})
        self.publish(a, chat("alice", "bob", 7, "for bob"), 5)
        self.assertEqual(self.answers(a), {msgid(7): "duplicate_msgid"})
        self.publish(a, chat("alice", "bob", 1, "other content"), 6)
        self.assertEqual(self.answers(a), {msgid(1): "duplicate_msgid"})
        self.publish(a, chat("alice", "bob", 8), 7)
        self.assertEqual(self.answers(a), {msgid(8): "queue_full"})
        _, frames = self.arrive("bob")
        self.assertEqual([f["msgid"] for f in frames], [msgid(1), msgid(2), msgid(3)])

    def test_byte_limit(self) -> None:
        """The payload bytes queued are bounded as well as their number."""
        self.limit(100, 3000)
        a = self.user("alice")
        for n in range(1, 4):
            self.publish(a, chat("alice", "bob", n, "x" * 1000), n)
        self.publish(a, chat("alice", "bob", 4, "short"), 4)
        self.assertEqual(
            self.answers(a),
            {msgid(1): "sent", msgid(2): "sent", msgid(3): "queue_full", msgid(4): "sent"},
        )
        self.assertEqual(len(self.arrive("bob")[1]), 3)

    def test_restart_keeps_the_limit(self) -> None:
        """A stored queue counts after a restart, not loaded: a full one stays full."""
        a = self.user("alice")
        for n in range(1, 4):
            self.publish(a, chat("alice", "bob", n), n)
        self.h = self.harness(self.store)
        self.limit(3)
        self.successResultOf(Deferred.fromCoroutine(self.h.broker.start()))
        a = self.user("alice")
        self.frames(a)
        self.publish(a, chat("alice", "bob", 4), 4)
        self.assertEqual(self.answers(a), {msgid(4): "queue_full"})

    def test_failed_commit_gives_room_back(self) -> None:
        """A chat whose commit fails was never sent and takes no room."""
        store = HeldStore(holding=False)
        self.h = self.harness(store)
        self.limit(1)
        a = self.user("alice")
        store.holding = True
        self.publish(a, chat("alice", "bob", 1), 1)
        store.fail()
        self.assertEqual(len(self.flushLoggedErrors(StoreUnavailable)), 1)
        self.assertEqual(self.answers(a), {})
        store.holding = False
        a = self.user("alice")
        self.publish(a, chat("alice", "bob", 1), 1)
        self.assertEqual(self.answers(a), {msgid(1): "sent"})

    def test_own_frames_use_headroom(self) -> None:
        """
        sent frames to a sender who does not read its own queue may pass the
        limit by a tenth (at least one); past that they are dropped and
        counted, never the chats, which all reach the recipient.  The sender
        that reads again and resends learns its chat was sent.
        """
        a, b = self.user("alice"), self.user("bob")
        for n in range(1, 7):
            self.publish(a, chat("alice", "bob", n), n)
            self.assertEqual(len(self.frames(b)), 1)
        frames = [x for x in a.received() if isinstance(x, p.Publish)]
        self.assertEqual(
            [json.loads(x.payload)["msgid"] for x in frames], [msgid(n) for n in range(1, 5)]
        )
        self.assertEqual(
            self.h.metrics.registry.get_sample_value(
                "sktalent_dropped_total", {"reason": "queue_full"}
            ),
            2,
        )
        for x in frames:
            assert x.packet_id is not None
            a.send(p.PubAck(x.packet_id))
        self.h.clock.advance(0)
        self.publish(a, chat("alice", "bob", 6), 7)
        self.assertEqual(self.frames(a), [{"msgid": msgid(6), "type": "sent"}])
        self.assertEqual(self.frames(b), [])

    def test_receipt_to_a_full_queue(self) -> None:
        """A receipt for a chat the sender made reaches it even when its queue is full."""
        a, b = self.user("alice"), self.user("bob")
        self.publish(a, chat("alice", "bob", 1), 1)
        self.frames(a)
        self.frames(b)
        a.lose()
        c = self.user("carol")
        for n in range(2, 5):
            self.publish(c, chat("carol", "alice", n, f"c{n}"), n)
        self.assertEqual(len(self.answers(c)), 3)
        self.publish(b, {"msgid": msgid(1), "from": "bob", "to": "alice", "type": "received"})
        self.assertEqual(self.frames(b), [])
        _, frames = self.arrive("alice")
        self.assertEqual(
            [f["payload"]["content"] for f in frames[:3]] + [frames[3]["type"]],
            ["c2", "c3", "c4", "received"],
        )

    def test_notification_refused_when_full(self) -> None:
        """A notification to a full queue raises QueueFull; nothing is stored or pushed."""
        for n in range(3):
            self.successResultOf(self.app.notify("bob", "feedback", {"content": f"{n}"}, None))
        self.pusher.pushed.clear()
        refused = self.app.notify("bob", "feedback", {"content": "one too many"}, None)
        self.failureResultOf(refused, QueueFull)
        self.assertEqual(self.pusher.pushed, [])
        _, frames = self.arrive("bob")
        self.assertEqual([f["payload"]["content"] for f in frames], ["0", "1", "2"])
        self.successResultOf(self.app.notify("bob", "feedback", {"content": "now"}, None))
