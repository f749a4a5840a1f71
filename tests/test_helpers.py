"""
The probes that prove nothing more is on its way catch a duplicate that
arrives late: against a stand-in server that sends one 0.3 s after the
original, with what it sends next held behind it, as a commit pipeline
holds later commits behind a slow one.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from sktalent.mqtt import packets as p
from sktalent.mqtt.codec import MAX_REMAINING_LENGTH, Decoder, encode_all

from .helpers import chat, msgid, nothing_more, queued
from .pahoclient import PahoUser
from .rawclient import RawClient

LATE = 0.3
SERVER_TOPIC = "$sktalent/server/mqttserver"


class LateDuplicate:
    """
    A stand-in for the server on 127.0.0.1:port: it routes a publish to
    the clients subscribed to its topic, a chat on the server topic to its
    recipient (with `sent` to its sender), and answers an envelope without
    a recipient with an error; everything at QoS 0, written in the order
    decided.  With late, the first message it routes
    is written once more, late seconds after, and everything decided
    after it waits behind it.
    """

    def __init__(self, late: float | None) -> None:
        self._late = late
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._out: queue.Queue[tuple[float, socket.socket, bytes] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._users: dict[str, socket.socket] = {}
        self._subscribers: dict[str, list[socket.socket]] = {}
        self._routed = 0
        self._threads = [
            threading.Thread(target=self._accept, daemon=True),
            threading.Thread(target=self._write, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        self._out.put(None)
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for thread in self._threads:
            thread.join(5)

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _write(self) -> None:
        while (item := self._out.get()) is not None:
            due, connection, data = item
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                connection.sendall(data)
            except OSError:
                pass

    def _send(self, connection: socket.socket, packet: p.Packet, delay: float = 0.0) -> None:
        self._out.put((time.monotonic() + delay, connection, encode_all([packet])))

    def _serve(self, connection: socket.socket) -> None:
        decoder = Decoder(MAX_REMAINING_LENGTH)
        with connection:
            try:
                while data := connection.recv(65536):
                    for packet in decoder.feed(data):
                        self._answer(connection, packet)
            except OSError:
                return

    def _answer(self, connection: socket.socket, packet: p.Packet) -> None:
        with self._lock:
            if isinstance(packet, p.Connect):
                self._users[packet.client_id] = connection
                self._send(connection, p.ConnAck(0))
            elif isinstance(packet, p.Subscribe):
                for topic, _ in packet.topics:
                    self._subscribers.setdefault(topic, []).append(connection)
                codes = tuple(0 for _ in packet.topics)
                self._send(connection, p.SubAck(packet.packet_id, codes))
            elif isinstance(packet, p.PingReq):
                self._send(connection, p.PingResp())
            elif isinstance(packet, p.Publish):
                if packet.packet_id is not None:
                    self._send(connection, p.PubAck(packet.packet_id))
                self._route(connection, packet)

    def _route(self, publisher: socket.socket, publish: p.Publish) -> None:
        if publish.topic != SERVER_TOPIC:
            for connection in self._subscribers.get(publish.topic, []):
                self._deliver(connection, publish.topic, publish.payload)
            return
        frame = json.loads(publish.payload)
        if "to" not in frame:
            error = {"msgid": frame["msgid"], "type": "error", "error": "bad_envelope"}
            self._deliver(publisher, "$sktalent/clients/?", json.dumps(error).encode())
            return
        sender, to = frame["from"], frame["to"]
        self._deliver(self._users[to], f"$sktalent/clients/{to}", publish.payload)
        sent = json.dumps({"msgid": frame["msgid"], "type": "sent"}).encode()
        self._deliver(self._users[sender], f"$sktalent/clients/{sender}", sent)

    def _deliver(self, connection: socket.socket, topic: str, payload: bytes) -> None:
        publish = p.Publish(topic, payload)
        self._send(connection, publish)
        self._routed += 1
        if self._late is not None and self._routed == 1:
            self._send(connection, publish, self._late)


class ProbeTests(SynchronousTestCase):
    def server(self, late: float | None) -> LateDuplicate:
        server = LateDuplicate(late)
        self.addCleanup(server.close)
        return server

    def paho(self, server: LateDuplicate, user: str) -> PahoUser:
        client = PahoUser(server.port, user, clean=True)
        self.addCleanup(client.close)
        return client

    def raw(self, server: LateDuplicate, user: str) -> RawClient:
        client = RawClient(server.port)
        self.addCleanup(client.close)
        self.assertEqual(client.connect(user), p.ConnAck(0))
        return client

    def test_nothing_more_catches_a_late_duplicate(self) -> None:
        """
        nothing_more fails when the recipient's chat arrives a second time
        0.3 s late, and passes when it does not.
        """
        for late in (LATE, None):
            server = self.server(late)
            alice, bob = self.paho(server, "alice"), self.paho(server, "bob")
            alice.send(chat("alice", "bob", 1))
            started = time.monotonic()
            self.assertEqual(bob.frames(1)[0]["msgid"], msgid(1))
            if late is None:
                nothing_more(bob)
                continue
            with self.assertRaises(AssertionError) as caught:
                nothing_more(bob)
            self.assertIn(msgid(1), str(caught.exception))
            self.assertGreaterEqual(time.monotonic() - started, LATE)

    def test_probe_catches_a_late_duplicate(self) -> None:
        """
        A paho client's probe on a topic returns the message that arrived
        a second time 0.3 s late, and nothing when none did.
        """
        for late in (LATE, None):
            user = self.paho(self.server(late), "subscriber")
            self.assertEqual(user.subscribe("t", 0), [0])
            user.publish("t", b"once", 0)
            self.assertEqual(user.take(1)[0].payload, b"once")
            expected = [] if late is None else [b"once"]
            self.assertEqual([m.payload for m in user.probe("t")], expected)

    def test_ping_catches_a_late_duplicate(self) -> None:
        """
        A raw client's ping returns the packet that arrived a second time
        0.3 s late, and nothing when none did.
        """
        for late in (LATE, None):
            client = self.raw(self.server(late), "subscriber")
            self.assertEqual(client.subscribe(1, ("t", 0)).return_codes, (0,))
            client.send(p.Publish("t", b"once"))
            self.assertEqual(client.expect(p.Publish).payload, b"once")
            expected = [] if late is None else [p.Publish("t", b"once")]
            self.assertEqual(client.ping(), expected)

    def test_raw_recipient(self) -> None:
        """
        nothing_more with a raw recipient fails on the late duplicate too,
        and passes when none comes.
        """
        for late in (LATE, None):
            server = self.server(late)
            alice, bob = self.paho(server, "alice"), self.raw(server, "bob")
            alice.send(chat("alice", "bob", 1))
            self.assertEqual(json.loads(bob.expect(p.Publish).payload)["msgid"], msgid(1))
            if late is None:
                nothing_more(bob)
            else:
                self.assertRaises(AssertionError, nothing_more, bob)

    def test_queued_waits_for_a_late_frame(self) -> None:
        """
        queued returns a frame that comes 0.3 s late with the others, where
        reading until a quiet moment would stop before it.
        """
        for late in (LATE, None):
            server = self.server(late)
            alice, bob = self.paho(server, "alice"), self.raw(server, "bob")
            alice.send(chat("alice", "bob", 1))
            copies = 1 if late is None else 2
            self.assertEqual([f["msgid"] for f in queued(bob)], [msgid(1)] * copies)
