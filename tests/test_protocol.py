"""
The MQTT 3.1.1 connection state machine and broker, in memory.
"""

from __future__ import annotations

import gc
import tracemalloc

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IAnonymous, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from sktalent.mqtt import packets as p
from sktalent.mqtt.auth import AllowEverything, portal_for
from sktalent.mqtt.codec import encode
from sktalent.mqtt.protocol import Limits
from sktalent.mqtt.router import RetainedLimits
from sktalent.mqtt.session import QueueLimits
from sktalent.store.interfaces import Message, SetRetained, StoreUnavailable
from sktalent.store.memory import MemoryStore

from .mqttclient import Client, CountingTransport, Harness, HeldStore, only


@implementer(ICredentialsChecker)
class NeverAnswers:
    """A credentials checker whose answer never comes."""

    credentialInterfaces = (IAnonymous,)

    def requestAvatarId(self, credentials: object) -> Deferred[bytes | tuple[()]]:
        return Deferred()


@implementer(ICredentialsChecker)
@attrs.define
class Slow:
    """A credentials checker that answers after `seconds` on `clock`."""

    clock: Clock
    seconds: float
    credentialInterfaces = (IAnonymous,)

    def requestAvatarId(self, credentials: object) -> Deferred[bytes | tuple[()]]:
        return deferLater(self.clock, self.seconds, lambda: b"a")


@implementer(ICredentialsChecker)
class Refuses:
    """A credentials checker that refuses everyone."""

    credentialInterfaces = (IAnonymous, IUsernamePassword)

    def requestAvatarId(self, credentials: object) -> Deferred[bytes | tuple[()]]:
        return fail(UnauthorizedLogin())


@implementer(ICredentialsChecker)
class Broken:
    """A credentials checker with a bug."""

    credentialInterfaces = (IAnonymous,)

    def requestAvatarId(self, credentials: object) -> Deferred[bytes | tuple[()]]:
        return fail(ZeroDivisionError())


class ConnectTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()

    def test_connack(self) -> None:
        """A CONNECT is answered CONNACK 0 with no session present."""
        c = self.h.client()
        self.assertEqual(c.connect("a"), [p.ConnAck(0, False)])
        self.assertFalse(c.closed)

    def test_packet_before_connect(self) -> None:
        """Anything but CONNECT first closes the connection unanswered."""
        c = self.h.client()
        c.send(p.PingReq())
        self.assertEqual(c.received(), [])
        self.assertTrue(c.closed)

    def test_connect_timeout(self) -> None:
        """A connection that sends no CONNECT in time is closed."""
        c = self.h.client()
        self.h.clock.advance(9.9)
        self.assertFalse(c.closed)
        self.h.clock.advance(0.2)
        self.assertTrue(c.closed)

    def test_slow_login_after_a_late_connect(self) -> None:
        """
        A CONNECT that came in time is answered however late in the connect
        timeout it came and however long its login took within its own time.
        """
        clock = Clock()
        h = Harness(clock=clock, portal=portal_for(Slow(clock, 4.5)))
        c = h.client()
        clock.advance(6)
        c.send(p.Connect("a"))
        clock.advance(4.4)
        self.assertEqual((c.received(), c.closed), ([], False))
        clock.advance(0.2)
        self.assertEqual(c.received(), [p.ConnAck(0)])
        self.assertFalse(c.closed)

    def test_login_timeout(self) -> None:
        """
        A login still undecided the connect timeout after its CONNECT is
        answered CONNACK 3 (server unavailable), counted, and closed.
        """
        h = Harness(portal=portal_for(NeverAnswers()))
        c = h.client()
        h.clock.advance(9)
        c.send(p.Connect("a"))
        h.clock.advance(9.9)
        self.assertEqual((c.received(), c.closed), ([], False))
        h.clock.advance(0.2)
        self.assertEqual(c.received(), [p.ConnAck(3)])
        self.assertTrue(c.closed)
        counted = h.metrics.registry.get_sample_value(
            "sktalent_auth_failures_total", {"reason": "auth_unavailable"}
        )
        self.assertEqual(counted, 1)

    def test_refused_logins_logged_sparingly(self) -> None:
        """
        A refused login is logged with the peer address and the userID it
        claimed; of 2,000 in a moment, with as many connections closed before
        a login, a few lines and one summary are logged, while every refused
        login is counted.
        """
        h = Harness(portal=portal_for(Refuses()))
        with capturedLogs() as events:
            for n in range(1000):
                c = h.client()
                c.send(p.Connect(f"u{n}", username=f"u{n}", password=b"wrong"))
                self.assertEqual(c.received(), [p.ConnAck(4)])
                h.client().send(p.PingReq())
            h.clock.advance(1)
        lines = [formatEvent(e) for e in events]
        self.assertLessEqual(len(lines), 10, lines)
        self.assertEqual(
            lines[0], "Refused a login from 192.168.1.1:54321 as 'u0': bad_credentials (CONNACK 4)"
        )
        self.assertIn(
            "Closed a connection from 192.168.1.1:54321 before a login: PingReq before CONNECT",
            lines,
        )
        self.assertTrue(lines[-1].startswith(f"{2000 - len(lines) + 1} more refused logins"))
        counted = h.metrics.registry.get_sample_value(
            "sktalent_auth_failures_total", {"reason": "bad_credentials"}
        )
        self.assertEqual(counted, 1000)

    def test_keepalive_expiry(self) -> None:
        """Silence for 1.5 times the keepalive closes; any packet resets it."""
        c = self.h.client()
        c.connect("a", keepalive=30)
        self.h.clock.advance(40)
        c.send(p.PingReq())
        self.assertEqual(c.received(), [p.PingResp()])
        self.h.clock.advance(44)
        self.assertFalse(c.closed)
        self.h.clock.advance(1.1)
        self.assertTrue(c.closed)

    def test_keepalive_one_timer(self) -> None:
        """
        Connections share one keepalive timer, and each is closed within a
        second after 1.5 times its keepalive of silence.
        """
        clients = []
        for i in range(20):
            self.h.clock.advance(0.25)
            clients.append(self.h.client())
            clients[-1].connect(f"c{i}", keepalive=10)
        self.assertEqual(len(self.h.clock.getDelayedCalls()), 1)
        # The first came at 0.25 (silent until 15.25), the last at 5.
        self.h.clock.advance(15.24 - self.h.clock.seconds())
        self.assertFalse(any(c.closed for c in clients))
        self.h.clock.advance(16 - self.h.clock.seconds())
        self.assertEqual([c.closed for c in clients[:4]], [True, True, True, True])
        self.assertFalse(clients[4].closed)
        self.h.clock.advance(4)
        self.assertTrue(all(c.closed for c in clients))
        for c in clients:
            c.lose()
        self.assertEqual(self.h.clock.getDelayedCalls(), [])

    def test_idle_connection_memory(self) -> None:
        """
        What the server itself allocates for an idle connection with one
        subscription (protocol, session, subscription, keepalive) stays under
        1,000 bytes; it was 2,660 with a DelayedCall for the keepalive, an
        empty deque and set in every session, and a trie node per filter.
        """

        def idle(i: int) -> Client:
            c = self.h.client()
            c.connect(f"idle-{i}", keepalive=60)
            c.send(p.Subscribe(1, ((f"idle/{i}", 1),)))
            c.received()
            return c

        clients = [idle(i) for i in range(50)]
        gc.collect()
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.take_snapshot()
        clients += [idle(i) for i in range(1000, 1400)]
        gc.collect()
        after = tracemalloc.take_snapshot()
        ours = [tracemalloc.Filter(True, "*sktalent*")]
        grown = after.filter_traces(ours).compare_to(before.filter_traces(ours), "filename")
        self.assertLess(sum(s.size_diff for s in grown) / 400, 1000)
        self.assertFalse(any(c.closed for c in clients))

    def test_keepalive_zero(self) -> None:
        """Keepalive 0 turns the timeout off."""
        c = self.h.client()
        c.connect("a", keepalive=0)
        self.h.clock.advance(100000)
        self.assertFalse(c.closed)

    def test_protocol_level(self) -> None:
        """A CONNECT for another protocol level gets CONNACK 1, then the close."""
        c = self.h.client()
        self.assertEqual(c.connect("a", protocol_level=3), [p.ConnAck(1)])
        self.assertTrue(c.closed)

    def test_unusable_identifier(self) -> None:
        """
        A CONNECT whose client id or user name is not UTF-8 text (bad bytes,
        an encoded surrogate, U+0000) gets CONNACK 2, counted, then the
        close; a second CONNECT so made is only closed.
        """
        head = b"\x00\x04MQTT\x04\xc2\x00\x3c"
        for raw in (b"\xff", b"al\xed\xa0\x80", b"al\x00"):
            for body in (
                head + _utf8(raw) + _utf8(b"alice") + _utf8(b"pw"),
                head + _utf8(b"alice") + _utf8(raw) + _utf8(b"pw"),
            ):
                c = self.h.client()
                c.protocol.dataReceived(b"\x10" + bytes([len(body)]) + body)
                self.assertEqual(c.received(), [p.ConnAck(2)], body)
                self.assertTrue(c.closed)
        counted = self.h.metrics.registry.get_sample_value(
            "sktalent_auth_failures_total", {"reason": "bad_user_id"}
        )
        self.assertEqual(counted, 6)
        c = self.h.client()
        c.connect("a")
        body = head + _utf8(b"\xff") + _utf8(b"a") + _utf8(b"pw")
        c.protocol.dataReceived(b"\x10" + bytes([len(body)]) + body)
        self.assertEqual((c.received(), c.closed), ([], True))

    def test_second_connect(self) -> None:
        """A second CONNECT on one connection is a protocol violation."""
        c = self.h.client()
        c.connect("a")
        c.send(p.Connect("a"))
        self.assertEqual(c.received(), [])
        self.assertTrue(c.closed)

    def test_empty_client_id_persistent(self) -> None:
        """An empty client id with cleansession=0 is refused with CONNACK 2."""
        c = self.h.client()
        self.assertEqual(c.connect("", clean=False), [p.ConnAck(2)])
        self.assertTrue(c.closed)

    def test_empty_client_id_clean(self) -> None:
        """An empty client id with cleansession=1 gets a server-chosen one."""
        a, b = self.h.client(), self.h.client()
        self.assertEqual(a.connect(""), [p.ConnAck(0)])
        self.assertEqual(b.connect(""), [p.ConnAck(0)])
        self.assertFalse(a.closed or b.closed)

    def test_malformed(self) -> None:
        """Malformed bytes close the connection without raising."""
        c = self.h.client()
        c.connect("a")
        c.protocol.dataReceived(b"\xf0\x00")
        self.assertTrue(c.closed)

    def test_packet_too_large(self) -> None:
        """A packet over the limit closes the connection, counted."""
        h = Harness(limits=Limits(max_packet_size=100))
        c = h.client()
        c.connect("a")
        c.send(p.Publish("t", b"x" * 200))
        self.assertTrue(c.closed)
        dropped = h.metrics.registry.get_sample_value(
            "sktalent_dropped_total", {"reason": "packet_too_large"}
        )
        self.assertEqual(dropped, 1)

    def test_takeover(self) -> None:
        """A second connection with the same client id closes the first."""
        first, second = self.h.client(), self.h.client()
        first.connect("a", clean=False)
        self.assertEqual(second.connect("a", clean=False), [p.ConnAck(0, True)])
        self.assertTrue(first.closed)
        first.lose()
        self.assertTrue(self.h.broker.is_online("a"))

    def test_takeovers_logged_sparingly(self) -> None:
        """
        A client connecting again and again takes its session over each
        time; of 500 takeovers in a moment a few lines and one summary are
        logged.
        """
        with capturedLogs() as events:
            for _ in range(500):
                self.h.client().connect("a", clean=False)
            self.h.clock.advance(1)
        lines = [formatEvent(e) for e in events if "connected again" in formatEvent(e)]
        self.assertLessEqual(len(lines), 10, lines)
        self.assertEqual(lines[0], "Client a connected again; closing its old connection")
        self.assertTrue(lines[-1].startswith(f"{500 - len(lines)} more clients connected again"))
        self.assertTrue(self.h.broker.is_online("a"))

    def test_flood_before_connack(self) -> None:
        """A client flooding packets while its login is pending is closed."""
        h = Harness(portal=portal_for(NeverAnswers()))
        c = h.client()
        c.send(p.Connect("a"), *[p.PingReq()] * 300)
        self.assertTrue(c.closed)
        self.assertEqual(c.received(), [])

    def test_connack_despite_a_failing_checker(self) -> None:
        """
        A checker failing unexpectedly still gets the CONNECT a CONNACK: 3,
        server unavailable, counted; the failure is logged.
        """
        h = Harness(portal=portal_for(Broken()))
        c = h.client()
        self.assertEqual(c.connect("a"), [p.ConnAck(3)])
        self.assertTrue(c.closed)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        counted = h.metrics.registry.get_sample_value(
            "sktalent_auth_failures_total", {"reason": "internal_error"}
        )
        self.assertEqual(counted, 1)

    def test_queued_before_connack(self) -> None:
        """Packets sent right behind CONNECT are handled after the CONNACK."""
        c = self.h.client()
        c.send(p.Connect("a"), p.Subscribe(1, (("t", 1),)), p.PingReq())
        self.assertEqual(c.received(), [p.ConnAck(0), p.SubAck(1, (1,)), p.PingResp()])


def _utf8(raw: bytes) -> bytes:
    """A length-prefixed string field holding raw bytes, valid or not."""
    return len(raw).to_bytes(2, "big") + raw


def _connected(h: Harness, client_id: str, clean: bool = True, **kw: object) -> Client:
    c = h.client()
    [connack] = only(p.ConnAck, c.connect(client_id, clean=clean, **kw))
    assert connack.return_code == 0
    return c


class PubSubTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()

    def queue(self, client_id: str) -> list[object]:
        """What the clean session of client_id holds unacknowledged, in memory."""
        session = self.h.broker.session(client_id)
        assert session is not None
        return list(session.taken())

    def test_qos0(self) -> None:
        """QoS 0 is delivered at QoS 0 with no acknowledgement."""
        sub, pub = _connected(self.h, "s"), _connected(self.h, "p")
        sub.send(p.Subscribe(1, (("a/b", 2),)))
        self.assertEqual(sub.received(), [p.SubAck(1, (2,))])
        pub.send(p.Publish("a/b", b"x"))
        self.assertEqual(pub.received(), [])
        self.assertEqual(sub.received(), [p.Publish("a/b", b"x")])

    def test_qos1(self) -> None:
        """QoS 1: PUBACK to the publisher, a QoS 1 publish to the subscriber."""
        sub, pub = _connected(self.h, "s"), _connected(self.h, "p")
        sub.send(p.Subscribe(1, (("a/+", 1),)))
        sub.received()
        pub.send(p.Publish("a/b", b"x", 1, packet_id=7))
        self.assertEqual(pub.received(), [p.PubAck(7)])
        [delivered] = sub.received()
        assert isinstance(delivered, p.Publish)
        self.assertEqual((delivered.topic, delivered.qos, delivered.dup), ("a/b", 1, False))
        assert delivered.packet_id is not None
        sub.send(p.PubAck(delivered.packet_id))
        self.assertEqual(self.queue("s"), [])
        counted = self.h.metrics.registry.get_sample_value(
            "sktalent_messages_in_total", {"type": "mqtt_publish"}
        )
        self.assertEqual(counted, 1)

    def test_qos_downgrade(self) -> None:
        """A publish is delivered at the lower of its QoS and the granted one."""
        sub, pub = _connected(self.h, "s"), _connected(self.h, "p")
        sub.send(p.Subscribe(1, (("t", 0),)))
        sub.received()
        pub.send(p.Publish("t", b"x", 2, packet_id=1))
        self.assertEqual(sub.received(), [p.Publish("t", b"x", 0)])

    def test_qos2_both_ways(self) -> None:
        """QoS 2 runs PUBREC/PUBREL/PUBCOMP on both sides, delivering once."""
        sub, pub = _connected(self.h, "s"), _connected(self.h, "p")
        sub.send(p.Subscribe(1, (("t", 2),)))
        sub.received()
        pub.send(p.Publish("t", b"x", 2, packet_id=3))
        self.assertEqual(pub.received(), [p.PubRec(3)])
        # The publisher resends before PUBREL: not delivered again.
        pub.send(p.Publish("t", b"x", 2, dup=True, packet_id=3))
        self.assertEqual(pub.received(), [p.PubRec(3)])
        pub.send(p.PubRel(3))
        self.assertEqual(pub.received(), [p.PubComp(3)])
        [delivered] = sub.received()
        assert isinstance(delivered, p.Publish) and delivered.packet_id is not None
        self.assertEqual(delivered.qos, 2)
        sub.send(p.PubRec(delivered.packet_id))
        self.assertEqual(sub.received(), [p.PubRel(delivered.packet_id)])
        sub.send(p.PubComp(delivered.packet_id))
        self.assertEqual(self.queue("s"), [])
        # The packet id is free again for a new message.
        pub.send(p.Publish("t", b"y", 2, packet_id=3))
        self.assertEqual(pub.received(), [p.PubRec(3)])
        self.assertEqual(len(sub.received()), 1)

    def test_overlapping(self) -> None:
        """Overlapping subscriptions deliver one copy at the highest QoS."""
        sub, pub = _connected(self.h, "s"), _connected(self.h, "p")
        sub.send(p.Subscribe(1, (("a/#", 0), ("a/+", 1), ("a/b", 0))))
        sub.received()
        pub.send(p.Publish("a/b", b"x", 2, packet_id=1))
        [delivered] = only(p.Publish, sub.received())
        self.assertEqual(delivered.qos, 1)

    def test_dollar_topics(self) -> None:
        """Filters starting with a wildcard do not match $ topics."""
        sub, pub = _connected(self.h, "s"), _connected(self.h, "p")
        sub.send(p.Subscribe(1, (("#", 0), ("+/x", 0))))
        sub.received()
        pub.send(p.Publish("$SYS/x", b"x"))
        self.assertEqual(sub.received(), [])
        sub.send(p.Subscribe(2, (("$SYS/#", 0),)))
        sub.received()
        pub.send(p.Publish("$SYS/x", b"x"))
        self.assertEqual(sub.received(), [p.Publish("$SYS/x", b"x")])

    def test_refused_filter(self) -> None:
        """A filter the operator refuses is answered 0x80; the others granted."""
        h = Harness(authorizer=AllowEverything(frozenset({"test/nosubscribe"})))
        sub = _connected(h, "s")
        sub.send(p.Subscribe(1, (("test/nosubscribe", 2), ("test/ok", 2))))
        self.assertEqual(sub.received(), [p.SubAck(1, (0x80, 2))])

    def test_unsubscribe(self) -> None:
        """After UNSUBACK nothing more arrives for that filter."""
        sub, pub = _connected(self.h, "s"), _connected(self.h, "p")
        sub.send(p.Subscribe(1, (("t", 0),)))
        sub.send(p.Unsubscribe(2, ("t",)))
        self.assertEqual(sub.received(), [p.SubAck(1, (0,)), p.UnsubAck(2)])
        pub.send(p.Publish("t", b"x"))
        self.assertEqual(sub.received(), [])

    def test_order_kept(self) -> None:
        """Messages from one publisher arrive in order, past the window."""
        self.h.broker.max_inflight = 3
        sub, pub = _connected(self.h, "s"), _connected(self.h, "p")
        sub.send(p.Subscribe(1, (("t", 1),)))
        sub.received()
        for i in range(10):
            pub.send(p.Publish("t", b"%d" % i, 1, packet_id=i + 1))
        got: list[bytes] = []
        for _ in range(10):
            batch = sub.received()
            self.assertLessEqual(len(batch), 3)
            for packet in batch:
                assert isinstance(packet, p.Publish) and packet.packet_id is not None
                got.append(packet.payload)
                sub.send(p.PubAck(packet.packet_id))
        self.assertEqual(got, [b"%d" % i for i in range(10)])


class BatchTests(SynchronousTestCase):
    """What one read causes is written with one write per connection."""

    def setUp(self) -> None:
        self.h = Harness()

    def test_one_write_per_read(self) -> None:
        """
        Ten QoS 1 PUBLISHes in one read are answered with their ten PUBACKs
        in one write, delivered in one write, and counted; the subscriber's
        ten PUBACKs in one read are one write too, of nothing.
        """
        sub, pub = _connected(self.h, "s"), _connected(self.h, "p")
        sub.send(p.Subscribe(1, (("a/b", 1),)))
        sub.received()
        before = sub.transport.writes, pub.transport.writes
        pub.send(*(p.Publish("a/b", b"%d" % i, 1, packet_id=i) for i in range(1, 11)))
        self.assertEqual(pub.received(), [p.PubAck(i) for i in range(1, 11)])
        delivered = only(p.Publish, sub.received())
        self.assertEqual([d.payload for d in delivered], [b"%d" % i for i in range(1, 11)])
        self.assertEqual(
            (sub.transport.writes, pub.transport.writes), (before[0] + 1, before[1] + 1)
        )
        counted = self.h.metrics.registry.get_sample_value(
            "sktalent_messages_in_total", {"type": "mqtt_publish"}
        )
        self.assertEqual(counted, 10)
        sub.send(*(p.PubAck(d.packet_id) for d in delivered if d.packet_id is not None))
        self.assertEqual(sub.transport.writes, before[0] + 1)
        self.assertEqual(self.h.broker.session("s").taken(), [])  # type: ignore[union-attr]

    def test_decoder_only_while_part_read(self) -> None:
        """
        A connection keeps a decoder only while a packet is part-read, and
        the packet completes across the reads.
        """
        c = _connected(self.h, "c")
        self.assertIsNone(c.protocol._decoder)
        wire = encode(p.PingReq())
        c.protocol.dataReceived(wire[:1])
        self.assertIsNotNone(c.protocol._decoder)
        c.protocol.dataReceived(wire[1:])
        self.assertEqual(c.received(), [p.PingResp()])
        self.assertIsNone(c.protocol._decoder)

    def test_held_output_before_the_close(self) -> None:
        """
        What a read wrote before it closed the connection is written before
        the close, however the transport treats writes after it.
        """
        c = _connected(self.h, "c")
        c.transport = _DropsAfterClose()
        c.protocol.transport = c.transport
        c.send(p.Publish("t", b"x", 1, packet_id=3), p.Connect("c"))
        self.assertEqual(c.received(), [p.PubAck(3)])
        self.assertTrue(c.closed)


class _DropsAfterClose(CountingTransport):
    """A transport that, once closing, drops what is written."""

    def write(self, data: bytes) -> None:
        if not self.disconnecting:
            super().write(data)


class RetainedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()

    def test_retained_lifecycle(self) -> None:
        """Retained messages are set, replaced, delivered with the flag, deleted."""
        pub = _connected(self.h, "p")
        pub.send(p.Publish("r/1", b"one", 1, retain=True, packet_id=1))
        pub.send(p.Publish("r/1", b"two", 1, retain=True, packet_id=2))
        pub.send(p.Publish("r/2", b"x", 0, retain=True))
        sub = _connected(self.h, "s")
        sub.send(p.Subscribe(1, (("r/#", 1),)))
        packets = sub.received()
        self.assertEqual(packets[0], p.SubAck(1, (1,)))
        got = {(x.topic, x.payload, x.retain, x.qos) for x in only(p.Publish, packets[1:])}
        self.assertEqual(got, {("r/1", b"two", True, 1), ("r/2", b"x", True, 0)})
        pub.send(p.Publish("r/1", b"", 0, retain=True))
        # Live subscribers get the deletion as a normal message.
        self.assertEqual(sub.received(), [p.Publish("r/1", b"", 0, False)])
        later = _connected(self.h, "l")
        later.send(p.Subscribe(1, (("r/#", 1),)))
        packets = later.received()
        self.assertEqual([x.topic for x in only(p.Publish, packets[1:])], ["r/2"])

    def test_live_delivery_not_retained(self) -> None:
        """A retained publish reaches existing subscribers without the flag."""
        sub, pub = _connected(self.h, "s"), _connected(self.h, "p")
        sub.send(p.Subscribe(1, (("t", 0),)))
        sub.received()
        pub.send(p.Publish("t", b"x", 0, retain=True))
        self.assertEqual(sub.received(), [p.Publish("t", b"x", 0, False)])


class RetainedLimitTests(SynchronousTestCase):
    """
    A plain broker keeps at most so many retained messages and bytes of
    them: past that, a retained publish is delivered but not retained.
    """

    def setUp(self) -> None:
        # Three messages; "r/N" with a 10-byte payload costs 13 bytes.
        self.h = Harness(retained=RetainedLimits(max_count=3, max_bytes=50))
        self.pub = _connected(self.h, "p")

    def retain(self, topic: str, payload: bytes) -> None:
        self.pub.send(p.Publish(topic, payload, 0, retain=True))

    def stored(self) -> dict[str, bytes]:
        """The retained messages in the store, by topic."""
        return {m.topic: m.payload for m in self.successResultOf(self.h.store.load_retained())}

    def delivered(self) -> dict[str, bytes]:
        """The retained messages a new subscriber to everything receives."""
        sub = _connected(self.h, "s")
        sub.send(p.Subscribe(1, (("#", 0),)))
        got = {x.topic: x.payload for x in only(p.Publish, sub.received()[1:])}
        sub.send(p.Disconnect())
        return got

    def dropped(self) -> float | None:
        return self.h.metrics.registry.get_sample_value(
            "sktalent_dropped_total", {"reason": "retained_limit"}
        )

    def test_count_limit(self) -> None:
        """
        Past the count, retained publishes still reach subscribers but are
        not retained; each is counted, and logged once for the episode.
        """
        live = _connected(self.h, "live")
        live.send(p.Subscribe(1, (("r/#", 0),)))
        live.received()
        with capturedLogs() as events:
            for n in range(6):
                self.retain(f"r/{n}", b"%010d" % n)
        kept = {f"r/{n}": b"%010d" % n for n in range(3)}
        self.assertEqual(self.stored(), kept)
        self.assertEqual(self.delivered(), kept)
        self.assertEqual(len(only(p.Publish, live.received())), 6)
        self.assertEqual(self.dropped(), 3)
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn("limits (3 messages, 50 bytes)", formatEvent(warnings[0]))

    def test_byte_limit(self) -> None:
        """
        A message that would take the retained bytes past the limit is not
        retained; smaller ones still are.
        """
        self.retain("r/0", b"x" * 30)
        self.retain("r/1", b"x" * 20)
        self.retain("r/2", b"x" * 14)
        self.assertEqual(self.stored(), {"r/0": b"x" * 30, "r/2": b"x" * 14})
        self.assertEqual(self.dropped(), 1)

    def test_replace_and_clear_at_the_limit(self) -> None:
        """
        At the limit, a retained topic can still be replaced (within the
        bytes) and cleared; a cleared topic makes room, and the next drop
        starts a new episode, logged again.
        """
        with capturedLogs() as events:
            for n in range(3):
                self.retain(f"r/{n}", b"old")
            self.retain("r/3", b"refused")
            self.retain("r/0", b"new")
            self.retain("r/1", b"")
            self.assertEqual(self.stored(), {"r/0": b"new", "r/2": b"old"})
            self.retain("r/3", b"room")
            self.retain("r/4", b"refused")
        self.assertEqual(self.stored(), {"r/0": b"new", "r/2": b"old", "r/3": b"room"})
        self.assertEqual(self.delivered(), self.stored())
        self.assertEqual(self.dropped(), 2)
        self.assertEqual(len([e for e in events if e["log_level"] == LogLevel.warn]), 2)

    def test_too_large_replacement_clears(self) -> None:
        """
        A replacement that does not fit the bytes is not retained, and the
        message it replaces is cleared rather than kept stale.
        """
        self.retain("r/0", b"x" * 10)
        self.retain("r/1", b"x" * 20)
        self.retain("r/0", b"y" * 30)
        self.assertEqual(self.stored(), {"r/1": b"x" * 20})
        self.retain("r/0", b"y" * 20)
        self.assertEqual(self.stored(), {"r/0": b"y" * 20, "r/1": b"x" * 20})

    def test_restore_within_the_limits(self) -> None:
        """
        Stored retained messages beyond the limits (lowered since they were
        retained) are dropped at start, from the store too, and counted.
        """
        for n in range(5):
            self.retain(f"r/{n}", b"x")
        self.assertEqual(len(self.stored()), 3)
        store = MemoryStore()
        store.submit([SetRetained(f"r/{n}", Message(f"r/{n}", b"x", 0, True)) for n in range(5)])
        h = Harness(store=store, retained=RetainedLimits(max_count=2, max_bytes=50))
        self.successResultOf(Deferred.fromCoroutine(h.broker.start()))
        self.assertEqual(len(self.successResultOf(store.load_retained())), 2)
        dropped = h.metrics.registry.get_sample_value(
            "sktalent_dropped_total", {"reason": "retained_limit"}
        )
        self.assertEqual(dropped, 3)
        # What was kept counts against the limits.
        pub = _connected(h, "p")
        pub.send(p.Publish("r/9", b"x", 0, retain=True))
        self.assertEqual(len(self.successResultOf(store.load_retained())), 2)


class WillTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.sub = _connected(self.h, "s")
        self.sub.send(p.Subscribe(1, (("will", 0),)))
        self.sub.received()

    def test_abnormal_loss(self) -> None:
        """Losing the connection without DISCONNECT publishes the will."""
        c = _connected(self.h, "w", will=p.Will("will", b"gone"))
        c.lose()
        self.assertEqual(self.sub.received(), [p.Publish("will", b"gone")])

    def test_disconnect(self) -> None:
        """DISCONNECT discards the will."""
        c = _connected(self.h, "w", will=p.Will("will", b"gone"))
        c.send(p.Disconnect())
        self.assertTrue(c.closed)
        c.lose()
        self.assertEqual(self.sub.received(), [])

    def test_server_stopping(self) -> None:
        """Connections closed because the server stops publish no will."""
        c = _connected(self.h, "w", will=p.Will("will", b"gone", retain=True))
        self.h.factory.close_all()
        self.assertTrue(c.closed)
        c.lose()
        self.assertEqual(self.successResultOf(self.h.store.load_retained()), [])

    def test_keepalive_publishes_will(self) -> None:
        """A keepalive timeout is an abnormal loss."""
        c = _connected(self.h, "w", keepalive=2, will=p.Will("will", b"gone"))
        self.h.clock.advance(3)
        self.assertTrue(c.closed)
        c.lose()
        self.assertEqual(self.sub.received(), [p.Publish("will", b"gone")])


class SessionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()

    def _offline_subscriber(self) -> Client:
        sub = _connected(self.h, "s", clean=False)
        sub.send(p.Subscribe(1, (("t", 2),)))
        sub.received()
        sub.send(p.Disconnect())
        sub.lose()
        return sub

    def test_offline_queue(self) -> None:
        """QoS 1 and 2 wait for an offline persistent session; QoS 0 does not."""
        self._offline_subscriber()
        pub = _connected(self.h, "p")
        for qos in (0, 1, 2):
            pub.send(p.Publish("t", b"%d" % qos, qos, packet_id=qos or None))
        sub = self.h.client()
        packets = sub.connect("s", clean=False)
        self.assertEqual(packets[0], p.ConnAck(0, True))
        self.assertEqual([x.payload for x in only(p.Publish, packets[1:])], [b"1", b"2"])

    def test_redelivery_with_dup(self) -> None:
        """Unacknowledged messages are resent with DUP and the same packet id."""
        sub = _connected(self.h, "s", clean=False)
        sub.send(p.Subscribe(1, (("t", 1),)))
        sub.received()
        pub = _connected(self.h, "p")
        pub.send(p.Publish("t", b"x", 1, packet_id=1))
        [first] = sub.received()
        assert isinstance(first, p.Publish)
        sub.lose()
        again = self.h.client()
        packets = again.connect("s", clean=False)
        self.assertEqual(packets[0], p.ConnAck(0, True))
        self.assertEqual(packets[1], attrs.evolve(first, dup=True))

    def test_pubrel_resent(self) -> None:
        """After PUBREC, a reconnect resends PUBREL rather than the PUBLISH."""
        sub = _connected(self.h, "s", clean=False)
        sub.send(p.Subscribe(1, (("t", 2),)))
        sub.received()
        _connected(self.h, "p").send(p.Publish("t", b"x", 2, packet_id=1))
        [first] = sub.received()
        assert isinstance(first, p.Publish) and first.packet_id is not None
        sub.send(p.PubRec(first.packet_id))
        sub.received()
        sub.lose()
        again = self.h.client()
        self.assertEqual(again.connect("s", clean=False)[1:], [p.PubRel(first.packet_id)])

    def test_clean_session_discards(self) -> None:
        """cleansession=1 discards the stored session and its queue."""
        self._offline_subscriber()
        _connected(self.h, "p").send(p.Publish("t", b"x", 1, packet_id=1))
        c = self.h.client()
        self.assertEqual(c.connect("s", clean=True), [p.ConnAck(0, False)])
        c.send(p.Disconnect())
        c.lose()
        again = self.h.client()
        self.assertEqual(again.connect("s", clean=False), [p.ConnAck(0, False)])

    def test_restore(self) -> None:
        """
        A new broker on the same store routes to the stored sessions, and
        opens each with its queue when its client connects.
        """
        store = MemoryStore()
        first = Harness(store=store)
        sub = _connected(first, "s", clean=False)
        sub.send(p.Subscribe(1, (("t", 1),)))
        sub.lose()
        _connected(first, "p").send(p.Publish("t", b"kept", 1, packet_id=1))
        second = Harness(store=store)
        self.successResultOf(Deferred.fromCoroutine(second.broker.start()))
        _connected(second, "p").send(p.Publish("t", b"routed", 1, packet_id=1))
        self.assertIsNone(second.broker.session("s"))
        c = second.client()
        packets = c.connect("s", clean=False)
        self.assertEqual(packets[0], p.ConnAck(0, True))
        self.assertEqual([x.payload for x in only(p.Publish, packets[1:])], [b"kept", b"routed"])

    def queued_payloads(self) -> list[bytes]:
        """What the offline subscriber gets when it connects again."""
        packets = self.h.client().connect("s", clean=False)
        return [x.payload for x in only(p.Publish, packets[1:])]

    def dropped(self) -> float | None:
        return self.h.metrics.registry.get_sample_value(
            "sktalent_dropped_total", {"reason": "queue_full"}
        )

    def test_queue_limit(self) -> None:
        """
        A full queue drops each new message, counted and logged once; never
        one it holds, which may have been promised to someone.
        """
        self.h.broker.limits = QueueLimits(messages=3)
        self._offline_subscriber()
        pub = _connected(self.h, "p")
        with capturedLogs() as events:
            for i in range(5):
                pub.send(p.Publish("t", b"%d" % i, 1, packet_id=i + 1))
        self.assertEqual(self.queued_payloads(), [b"0", b"1", b"2"])
        self.assertEqual(self.dropped(), 2)
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual([e["client"] for e in warnings], ["s"])

    def test_queue_byte_limit(self) -> None:
        """
        The payload bytes a queue holds are bounded too: a message that would
        pass the bound is dropped, a smaller one that fits is still queued.
        """
        self.h.broker.limits = QueueLimits(messages=100, bytes=10)
        self._offline_subscriber()
        pub = _connected(self.h, "p")
        for i, payload in enumerate((b"aaaa", b"bbbb", b"cccc", b"dd", b"e")):
            pub.send(p.Publish("t", payload, 1, packet_id=i + 1))
        summary = self.successResultOf(self.h.store.session_summary("s"))
        assert summary is not None
        self.assertEqual((summary.queued, summary.queued_bytes), (3, 10))
        self.assertEqual(self.queued_payloads(), [b"aaaa", b"bbbb", b"dd"])
        self.assertEqual(self.dropped(), 2)

    def test_room_reserved_before_commit(self) -> None:
        """
        The room is decided where the commit lands: of two publishes whose
        commits are under way together for the last place, the second is
        dropped.
        """
        store = HeldStore(holding=False)
        self.h = Harness(store=store)
        self.h.broker.limits = QueueLimits(messages=1)
        self._offline_subscriber()
        first, second = _connected(self.h, "p1"), _connected(self.h, "p2")
        store.holding = True
        first.send(p.Publish("t", b"first", 1, packet_id=1))
        second.send(p.Publish("t", b"second", 1, packet_id=1))
        store.release()
        store.holding = False
        self.assertEqual((first.received(), second.received()), ([p.PubAck(1)], [p.PubAck(1)]))
        self.assertEqual(self.queued_payloads(), [b"first"])
        self.assertEqual(self.dropped(), 1)

    def test_failed_commit_gives_room_back(self) -> None:
        """A commit that fails takes no room."""
        store = HeldStore(holding=False)
        self.h = Harness(store=store)
        self.h.broker.limits = QueueLimits(messages=1)
        self._offline_subscriber()
        p1, p2 = _connected(self.h, "p1"), _connected(self.h, "p2")
        store.holding = True
        p1.send(p.Publish("t", b"lost", 1, packet_id=1))
        store.fail()
        self.assertEqual(len(self.flushLoggedErrors(StoreUnavailable)), 1)
        p2.send(p.Publish("t", b"kept", 1, packet_id=1))
        store.release()
        store.holding = False
        self.assertEqual(self.queued_payloads(), [b"kept"])
        self.assertEqual(self.dropped(), 0)

    def test_room_after_acknowledgement(self) -> None:
        """What the client acknowledges leaves the queue and frees its room."""
        self.h.broker.limits = QueueLimits(messages=2, bytes=65536)
        sub = _connected(self.h, "s", clean=False)
        sub.send(p.Subscribe(1, (("t", 1),)))
        pub = _connected(self.h, "p")
        for i in range(3):
            pub.send(p.Publish("t", b"%d" % i, 1, packet_id=i + 1))
        sent = only(p.Publish, sub.received()[1:])
        self.assertEqual([x.payload for x in sent], [b"0", b"1"])
        assert sent[0].packet_id is not None
        sub.send(p.PubAck(sent[0].packet_id))
        # The acknowledgement is durable in the next reactor turn.
        self.h.clock.advance(0)
        pub.send(p.Publish("t", b"3", 1, packet_id=4))
        self.assertEqual([x.payload for x in only(p.Publish, sub.received())], [b"3"])
        self.assertEqual(self.dropped(), 1)

    def test_restored_queue_counts(self) -> None:
        """After a restart the stored queue counts against the limits, not loaded."""
        store = MemoryStore()
        first = Harness(store=store)
        first.broker.limits = QueueLimits(messages=2)
        self.h = first
        self._offline_subscriber()
        pub = _connected(first, "p")
        for i in range(2):
            pub.send(p.Publish("t", b"%d" % i, 1, packet_id=i + 1))
        self.h = Harness(store=store)
        self.h.broker.limits = QueueLimits(messages=2)
        self.successResultOf(Deferred.fromCoroutine(self.h.broker.start()))
        _connected(self.h, "p").send(p.Publish("t", b"late", 1, packet_id=1))
        self.assertEqual(self.queued_payloads(), [b"0", b"1"])
        self.assertEqual(self.dropped(), 1)
