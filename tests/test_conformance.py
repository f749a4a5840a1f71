"""
MQTT 3.1.1 conformance, end to end: the server as a process in anonymous
mode (a plain broker), real clients (paho-mqtt) and a raw connection for
what a well-behaved client will not do.  The cases follow those of the Paho
interoperability suite: basic, retained, will, zero-length client id, offline
queueing, overlapping subscriptions, keepalive, redelivery, $-topics,
unsubscribe; and then malformed input, takeover, shutdown, exactly-once
inbound QoS 2 and the packet size limit.
"""

from __future__ import annotations

import queue
import time

import attrs
from twisted.trial.unittest import SynchronousTestCase

from sktalent.mqtt import packets as p
from sktalent.testing.server import ServerProcess, running

from .pahoclient import PahoUser
from .rawclient import RawClient

# The contract's default limit on a packet's remaining length: 64 KiB.
MAX_PACKET = 64 * 1024


class ServerTestCase(SynchronousTestCase):
    """
    A fresh server for every test: no state leaks from one to the next, and
    a test may stop it.
    """

    def setUp(self) -> None:
        self.server = running(self, ServerProcess(args=["--anonymous"]))

    def paho(self, client_id: str, clean: bool = True) -> PahoUser:
        user = PahoUser(self.server.mqtt_port, client_id, clean=clean)
        self.addCleanup(user.close)
        self.assertEqual(user.rc, 0)
        return user

    def raw(self) -> RawClient:
        client = RawClient(self.server.mqtt_port)
        self.addCleanup(client.close)
        return client


class PublishTests(ServerTestCase):
    def test_basic(self) -> None:
        """
        A QoS 2 subscriber receives publishes at QoS 0, 1 and 2 once each,
        with their payloads and QoS.
        """
        user = self.paho("basic")
        self.assertEqual(user.subscribe("conformance/basic", 2), [2])
        for qos in (0, 1, 2):
            user.publish("conformance/basic", f"qos {qos}".encode(), qos)
        got = sorted((m.qos, m.payload, m.retain) for m in user.take(3))
        self.assertEqual(got, [(0, b"qos 0", False), (1, b"qos 1", False), (2, b"qos 2", False)])

    def test_overlapping_subscriptions(self) -> None:
        """
        A publish matching two subscriptions of one client is delivered
        once, at the higher granted QoS.
        """
        user = self.paho("overlap")
        self.assertEqual(user.subscribe("conformance/overlap/#", 2), [2])
        self.assertEqual(user.subscribe("conformance/overlap/+", 1), [1])
        user.publish("conformance/overlap/x", b"both", 2)
        [message] = user.take(1)
        self.assertEqual(
            (message.topic, message.payload, message.qos), ("conformance/overlap/x", b"both", 2)
        )

    def test_dollar_topics(self) -> None:
        """
        "#" does not match topics starting with "$" (MQTT-4.7.2-1);
        "$test/#" does.
        """
        everything = self.paho("everything")
        dollar = self.paho("dollar")
        self.assertEqual(everything.subscribe("#", 1), [1])
        self.assertEqual(dollar.subscribe("$test/#", 1), [1])
        dollar.publish("$test/x", b"system", 1)
        # Sent after the $ publish on the same connection, so delivered after.
        dollar.publish("conformance/after", b"marker", 1)
        [first] = everything.take(1)
        self.assertEqual((first.topic, first.payload), ("conformance/after", b"marker"))
        [got] = dollar.take(1)
        self.assertEqual((got.topic, got.payload), ("$test/x", b"system"))

    def test_unsubscribe(self) -> None:
        """
        Once UNSUBACK is in, the filter delivers no more; the client's other
        filters still do.
        """
        user = self.paho("unsubscriber")
        self.assertEqual(user.subscribe("conformance/unsub/a", 1), [1])
        self.assertEqual(user.subscribe("conformance/unsub/b", 1), [1])
        unsubacks: queue.Queue[int] = queue.Queue()
        user.client.on_unsubscribe = lambda c, u, mid, codes, props: unsubacks.put(mid)
        _, mid = user.client.unsubscribe("conformance/unsub/a")
        self.assertEqual(unsubacks.get(timeout=10), mid)
        user.publish("conformance/unsub/a", b"gone", 1)
        user.publish("conformance/unsub/b", b"kept", 1)
        [message] = user.take(1)
        self.assertEqual((message.topic, message.payload), ("conformance/unsub/b", b"kept"))

    def test_qos2_exactly_once_inbound(self) -> None:
        """
        A QoS 2 publish resent with DUP before PUBREL is acknowledged again
        but delivered once; after PUBCOMP its packet id is free for a new
        message.
        """
        subscriber = self.paho("once-subscriber")
        self.assertEqual(subscriber.subscribe("conformance/once", 2), [2])
        publisher = self.raw()
        self.assertEqual(publisher.connect("once-publisher"), p.ConnAck(0))
        first = p.Publish("conformance/once", b"first", 2, packet_id=7)
        publisher.send(first)
        self.assertEqual(publisher.receive(), p.PubRec(7))
        publisher.send(p.Publish("conformance/once", b"first", 2, dup=True, packet_id=7))
        self.assertEqual(publisher.receive(), p.PubRec(7))
        publisher.send(p.PubRel(7))
        self.assertEqual(publisher.receive(), p.PubComp(7))
        publisher.send(p.Publish("conformance/once", b"second", 2, packet_id=7))
        self.assertEqual(publisher.receive(), p.PubRec(7))
        publisher.send(p.PubRel(7))
        self.assertEqual(publisher.receive(), p.PubComp(7))
        self.assertEqual([m.payload for m in subscriber.take(2)], [b"first", b"second"])

    def test_packet_size_limit(self) -> None:
        """
        A publish whose remaining length is exactly the limit is delivered
        intact; one byte more closes the publisher's connection, and the
        server goes on serving.
        """
        subscriber = self.paho("large-subscriber")
        self.assertEqual(subscriber.subscribe("conformance/large", 1), [1])
        topic = "conformance/large"
        # Remaining length: topic length prefix and topic, packet id, payload.
        room = MAX_PACKET - (2 + len(topic.encode()) + 2)
        payload = bytes(range(256)) * (room // 256) + b"x" * (room % 256)
        publisher = self.raw()
        self.assertEqual(publisher.connect("large-publisher"), p.ConnAck(0))
        publisher.send(p.Publish(topic, payload, 1, packet_id=1))
        self.assertEqual(publisher.receive(), p.PubAck(1))
        [message] = subscriber.take(1)
        self.assertEqual(message.payload, payload)

        publisher.send(p.Publish(topic, payload + b"!", 1, packet_id=2))
        self.assertTrue(publisher.closed_by_server())
        self.assertIsNone(publisher.receive(0))
        # The server still serves, and nothing of the refused publish came.
        self.assertEqual(subscriber.probe(topic), [])


class RetainedTests(ServerTestCase):
    def test_retained(self) -> None:
        """
        Retained messages at QoS 0, 1 and 2 reach a later subscriber with the
        retain flag; once cleared by empty retained publishes, a later
        subscriber gets none.
        """
        publisher = self.paho("retainer")
        expected = {}
        # QoS 0 first: the QoS 2 flow completing shows the others stored.
        for qos in (0, 1, 2):
            topic = f"conformance/retained/q{qos}"
            publisher.publish(topic, f"retained {qos}".encode(), qos, retain=True)
            expected[topic] = (f"retained {qos}".encode(), qos, True)
        first = self.paho("retained-first")
        self.assertEqual(first.subscribe("conformance/retained/#", 2), [2])
        got = {m.topic: (m.payload, m.qos, m.retain) for m in first.take(3)}
        self.assertEqual(got, expected)

        for qos in (0, 1, 2):
            publisher.publish(f"conformance/retained/q{qos}", b"", qos, retain=True)
        later = self.paho("retained-later")
        self.assertEqual(later.subscribe("conformance/retained/#", 2), [2])
        self.assertEqual(later.probe("conformance/retained/probe"), [])


class WillTests(ServerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.watcher = self.paho("will-watcher")
        self.assertEqual(self.watcher.subscribe("conformance/will/#", 2), [2])

    def connect_with_will(self, client_id: str) -> RawClient:
        client = self.raw()
        will = p.Will(f"conformance/will/{client_id}", b"gone: " + client_id.encode(), 1)
        self.assertEqual(client.connect(client_id, will=will), p.ConnAck(0))
        return client

    def test_will_on_abnormal_close(self) -> None:
        """A connection lost without DISCONNECT publishes its will."""
        self.connect_with_will("dropped").close()
        [message] = self.watcher.take(1)
        self.assertEqual(
            (message.topic, message.payload, message.qos),
            ("conformance/will/dropped", b"gone: dropped", 1),
        )

    def test_no_will_after_disconnect(self) -> None:
        """
        DISCONNECT discards the will: of a clean and a dropped client, only
        the dropped one's will arrives.
        """
        self.connect_with_will("clean").disconnect()
        self.connect_with_will("dropped").close()
        [message] = self.watcher.take(1)
        self.assertEqual(message.topic, "conformance/will/dropped")


class SessionTests(ServerTestCase):
    def test_zero_length_client_id_clean(self) -> None:
        """
        Two clients with an empty client id and cleansession=1 are both
        accepted, with separate sessions: neither takes the other over.
        """
        users = [self.paho(""), self.paho("")]
        for user in users:
            self.assertFalse(user.session_present)
            self.assertEqual(user.subscribe("conformance/anonymous", 1), [1])
        users[0].publish("conformance/anonymous", b"to both", 1)
        for user in users:
            [message] = user.take(1)
            self.assertEqual(message.payload, b"to both")

    def test_zero_length_client_id_persistent(self) -> None:
        """
        An empty client id with cleansession=0 is refused with CONNACK 2, and
        the connection closed (MQTT-3.1.3-8).
        """
        client = self.raw()
        self.assertEqual(client.connect("", clean=False), p.ConnAck(p.REFUSED_IDENTIFIER))
        self.assertTrue(client.closed_by_server())

    def test_offline_queueing(self) -> None:
        """
        A persistent session gets, on its return, the QoS 1 and 2 messages
        published while it was away; QoS 0 ones are not kept.
        """
        away = self.paho("offline", clean=False)
        self.assertFalse(away.session_present)
        self.assertEqual(away.subscribe("conformance/offline", 2), [2])
        away.close()
        publisher = self.paho("offline-publisher")
        for qos in (0, 1, 2):
            publisher.publish("conformance/offline", f"qos {qos}".encode(), qos)
        back = self.paho("offline", clean=False)
        self.assertTrue(back.session_present)
        got = sorted((m.qos, m.payload) for m in back.take(2))
        self.assertEqual(got, [(1, b"qos 1"), (2, b"qos 2")])

    def test_redelivery_on_reconnect(self) -> None:
        """
        Unacknowledged QoS 1 and 2 publishes are resent on reconnection with
        DUP set and their packet ids; once PUBREC is in, a reconnection gets
        PUBREL instead; after PUBCOMP, nothing.
        """
        client = self.raw()
        self.assertEqual(client.connect("redeliver", clean=False), p.ConnAck(0))
        subscribed = client.subscribe(
            1, ("conformance/redeliver/1", 1), ("conformance/redeliver/2", 2)
        )
        self.assertEqual(subscribed.return_codes, (1, 2))
        publisher = self.paho("redeliver-publisher")
        publisher.publish("conformance/redeliver/1", b"one", 1)
        publisher.publish("conformance/redeliver/2", b"two", 2)
        first = [client.expect(p.Publish), client.expect(p.Publish)]
        self.assertEqual(
            [(m.payload, m.qos, m.dup) for m in first], [(b"one", 1, False), (b"two", 2, False)]
        )
        client.disconnect()

        client = self.raw()
        self.assertEqual(client.connect("redeliver", clean=False), p.ConnAck(0, True))
        again = [client.expect(p.Publish), client.expect(p.Publish)]
        self.assertEqual(again, [attrs.evolve(m, dup=True) for m in first])
        one, two = first
        assert one.packet_id is not None and two.packet_id is not None
        client.send(p.PubAck(one.packet_id), p.PubRec(two.packet_id))
        self.assertEqual(client.receive(), p.PubRel(two.packet_id))
        client.disconnect()

        client = self.raw()
        self.assertEqual(client.connect("redeliver", clean=False), p.ConnAck(0, True))
        self.assertEqual(client.receive(), p.PubRel(two.packet_id))
        # What a session resends follows its CONNACK at once.
        self.assertEqual(client.ping(), [])
        client.send(p.PubComp(two.packet_id))
        client.disconnect()

        client = self.raw()
        self.assertEqual(client.connect("redeliver", clean=False), p.ConnAck(0, True))
        self.assertEqual(client.ping(), [])

    def test_takeover(self) -> None:
        """
        A second connection with the same client id closes the first and
        takes its session over.
        """
        first = self.raw()
        self.assertEqual(first.connect("takeover", clean=False), p.ConnAck(0))
        second = self.paho("takeover", clean=False)
        self.assertTrue(second.session_present)
        self.assertTrue(first.closed_by_server())
        self.assertEqual(second.subscribe("conformance/takeover", 1), [1])
        second.publish("conformance/takeover", b"mine now", 1)
        [message] = second.take(1)
        self.assertEqual(message.payload, b"mine now")


class KeepaliveTests(ServerTestCase):
    def test_keepalive(self) -> None:
        """
        A client silent for 1.5 times its keepalive is closed and its will
        published; one that sends PINGREQ in time stays connected.
        """
        watcher = self.paho("keepalive-watcher")
        self.assertEqual(watcher.subscribe("conformance/keepalive/#", 1), [1])
        silent, pinging = self.raw(), self.raw()
        started = time.monotonic()
        for client, name in ((silent, "silent"), (pinging, "pinging")):
            will = p.Will(f"conformance/keepalive/{name}", name.encode(), 1)
            self.assertEqual(client.connect(name, keepalive=2, will=will), p.ConnAck(0))
        closed_after = None
        for _ in range(12):
            pinging.send(p.PingReq())
            self.assertEqual(pinging.receive(), p.PingResp())
            if silent.closed_by_server(0.5):
                closed_after = time.monotonic() - started
                break
        self.assertIsNotNone(closed_after, "the silent client was never closed")
        assert closed_after is not None
        self.assertGreater(closed_after, 2.9)
        # 1.5 times the keepalive, and slack for a busy machine.
        self.assertLess(closed_after, 5.0)
        [message] = watcher.take(1)
        self.assertEqual(
            (message.topic, message.payload), ("conformance/keepalive/silent", b"silent")
        )
        pinging.send(p.PingReq())
        self.assertEqual(pinging.receive(), p.PingResp())


# Each after a valid CONNECT; every one breaks MQTT 3.1.1 at the codec.
MALFORMED = {
    "reserved packet type 0": b"\x00\x00",
    "reserved packet type 15": b"\xf0\x00",
    "SUBSCRIBE with flags 0": b"\x80\x06\x00\x01\x00\x01a\x01",
    "remaining length over four bytes": b"\x30\xff\xff\xff\xff\x01",
    "PUBLISH with QoS 3": b"\x36\x06\x00\x01a\x00\x01x",
    "topic not UTF-8": b"\x30\x05\x00\x02\xc3\x28x",
    "wildcard in a topic name": b"\x30\x06\x00\x03a/+x",
    "PINGRESP from a client": b"\xd0\x00",
}


class RobustnessTests(ServerTestCase):
    def test_malformed_before_connect(self) -> None:
        """Garbage instead of a CONNECT closes the connection unanswered."""
        client = self.raw()
        client.send_bytes(b"\xf0\x00garbage")
        self.assertTrue(client.closed_by_server())
        self.assertIsNone(client.receive(0))

    def test_malformed_after_connect(self) -> None:
        """
        Each malformed packet closes its connection and publishes its will
        (a close for a protocol error is abnormal, MQTT-3.1.2-8); the server
        goes on serving others.
        """
        watcher = self.paho("malformed-watcher")
        self.assertEqual(watcher.subscribe("conformance/malformed/#", 1), [1])
        for index, (what, data) in enumerate(MALFORMED.items()):
            client = self.raw()
            will = p.Will(f"conformance/malformed/{index}", what.encode(), 1)
            self.assertEqual(client.connect(f"malformed-{index}", will=will), p.ConnAck(0))
            client.send_bytes(data)
            self.assertTrue(client.closed_by_server(), what)
            self.assertEqual(watcher.messages.get(timeout=10).payload, what.encode())
        watcher.publish("conformance/malformed/ok", b"still serving", 1)
        [message] = watcher.take(1)
        self.assertEqual(message.payload, b"still serving")

    def test_sigterm(self) -> None:
        """
        SIGTERM ends the server with status 0, its connections closed and
        its persistent sessions kept for the next start.
        """
        client = self.raw()
        self.assertEqual(client.connect("sigterm", clean=False), p.ConnAck(0))
        self.assertEqual(client.subscribe(1, ("conformance/sigterm", 1)).return_codes, (1,))
        status = self.server.stop()
        self.assertTrue(client.closed_by_server())

        self.server = self.server.restarted()
        self.addCleanup(self.server.stop)
        client = self.raw()
        self.assertEqual(client.connect("sigterm", clean=False), p.ConnAck(0, True))
        publisher = self.paho("sigterm-publisher")
        publisher.publish("conformance/sigterm", b"after restart", 1)
        message = client.expect(p.Publish)
        self.assertEqual(message.payload, b"after restart")
        self.assertEqual(status, 0, self.server.log)
