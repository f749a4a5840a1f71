"""
Output sent in the call that writes it (sktalent/mqtt/send.py), over real
TCP connections on 127.0.0.1: what an idle socket takes goes out at once,
the rest through the transport's buffer, in order, and a broken connection
is reported as lost rather than raised.
"""

from __future__ import annotations

import socket
import struct
from typing import cast

from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IReactorTCP, ITransport
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sktalent.mqtt import packets as p
from sktalent.mqtt import send
from sktalent.mqtt.codec import encode
from sktalent.mqtt.protocol import MQTTServerProtocol

from .helpers import eventually
from .mqttclient import Harness, HeldStore


class _Held(Protocol):
    """The server's side of a connection, handed to the test."""

    def __init__(self, made: Deferred[_Held]) -> None:
        self._made = made
        self.lost: Deferred[list[Failure | None]] = Deferred()

    def connectionMade(self) -> None:
        self._made.callback(self)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback([reason])


def _recv_exactly(peer: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = peer.recv(min(size, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _peer(case: TestCase, factory: object) -> socket.socket:
    """factory listening on 127.0.0.1, and a client's blocking socket connected to it."""
    port = cast(IReactorTCP, reactor).listenTCP(
        0,
        factory,  # type: ignore[arg-type]
        interface="127.0.0.1",
    )
    case.addCleanup(port.stopListening)
    peer = socket.create_connection(("127.0.0.1", port.getHost().port))  # type: ignore[attr-defined]
    peer.settimeout(10)
    case.addCleanup(peer.close)
    return peer


async def _served(
    case: TestCase, harness: Harness
) -> tuple[MQTTServerProtocol, tcp.Connection, socket.socket]:
    """A connection to harness's MQTT factory: its protocol and transport, the client's socket."""
    factory = harness.factory
    built: list[MQTTServerProtocol] = []
    build = factory.buildProtocol

    def building(address: IAddress) -> MQTTServerProtocol:
        protocol = build(address)
        built.append(protocol)
        return protocol

    factory.buildProtocol = building  # type: ignore[method-assign,assignment]
    peer = _peer(case, factory)
    await eventually(lambda: bool(built) and built[0].transport is not None, "a connection")
    protocol = built[0]
    transport = protocol.transport
    assert isinstance(transport, tcp.Connection)
    case.addCleanup(transport.loseConnection)
    return protocol, transport, peer


class SendTests(TestCase):
    async def connected(self) -> tuple[tcp.Connection, _Held, socket.socket]:
        """The server's transport and protocol, and the client's blocking socket."""
        made: Deferred[_Held] = Deferred()
        peer = _peer(self, ServerFactory.forProtocol(lambda: _Held(made)))
        held = await made
        transport = held.transport
        assert isinstance(transport, tcp.Connection)

        def closed() -> Deferred[list[Failure | None]]:
            transport.loseConnection()
            return held.lost

        self.addCleanup(closed)
        return transport, held, peer

    async def test_idle_socket_sent_at_once(self) -> None:
        """
        A write an idle socket takes whole is on the wire when the call
        returns: nothing is left for the reactor.
        """
        transport, _, peer = await self.connected()
        send.write(transport, b"hello ")
        send.write(transport, b"world")
        self.assertFalse(transport.dataBuffer)
        self.assertFalse(transport._tempDataLen)
        self.assertEqual(_recv_exactly(peer, 11), b"hello world")

    async def test_rest_buffered_in_order(self) -> None:
        """
        What the socket does not take waits in the transport, and later
        writes queue behind it: all arrives, in order.
        """
        transport, _, peer = await self.connected()
        big = bytes(range(256)) * (32 * 1024)  # 8 MiB: more than the socket buffers hold
        send.write(transport, big)
        self.assertTrue(transport.dataBuffer or transport._tempDataLen)
        send.write(transport, b"tail")
        data = await deferToThread(_recv_exactly, peer, len(big) + 4)
        self.assertEqual(data, big + b"tail")

    async def test_broken_connection_reported(self) -> None:
        """
        Writing to a connection the peer reset raises nothing here; the
        transport reports it lost.
        """
        transport, held, peer = await self.connected()
        # Linger 0: close sends a reset, so the next sends fail.
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()
        for _ in range(3):
            send.write(transport, b"x" * 1000)
        (reason,) = await held.lost
        self.assertIsInstance(reason, Failure)


class NoDelayTests(TestCase):
    async def test_nagle_off(self) -> None:
        """
        The MQTT listener's connections have Nagle's algorithm off: a batch
        is already one write, and must not wait for the one before it to be
        acknowledged.
        """
        _, transport, _ = await _served(self, Harness())
        self.assertTrue(transport.getTcpNoDelay())


class AnswersTests(TestCase):
    async def test_read_answers_wait_commit_output_goes_at_once(self) -> None:
        """
        What answers a read waits for the reactor's write pass, as every
        connection's answers do (sent at once, a fast publisher's PUBACKs
        would let it run ever further ahead of its subscribers); what a
        commit makes durable is sent in the call that lands it.
        """
        store = HeldStore(holding=False)
        protocol, transport, peer = await _served(self, Harness(store=store))

        def unsent() -> int:
            return len(transport.dataBuffer) - transport.offset + transport._tempDataLen

        # A read, as the reactor would deliver it: its answers are held.
        protocol.dataReceived(
            encode(p.Connect("c", clean_session=False)) + encode(p.Subscribe(1, (("t", 1),)))
        )
        self.assertEqual(unsent(), 4 + 5)  # CONNACK and SUBACK, not yet sent
        await eventually(lambda: unsent() == 0, "the write pass")
        store.holding = True
        protocol.dataReceived(encode(p.Publish("t", b"x", 1, packet_id=7)))
        self.assertEqual((unsent(), len(store.held)), (0, 1))
        # The commit lands (outside any read): PUBACK and delivery go at once.
        store.release()
        self.assertEqual(unsent(), 0)
        answers = encode(p.ConnAck(p.ACCEPTED)) + encode(p.SubAck(1, (1,)))
        self.assertEqual(_recv_exactly(peer, len(answers)), answers)
        self.assertEqual(_recv_exactly(peer, 4), encode(p.PubAck(7)))


class OtherTransportTests(SynchronousTestCase):
    def test_other_transports_buffered(self) -> None:
        """A transport that is not a TCP connection (TLS, tests) gets a plain write."""
        transport = StringTransport()
        checked: ITransport = transport
        send.write(checked, b"abc")
        self.assertEqual(transport.value(), b"abc")
