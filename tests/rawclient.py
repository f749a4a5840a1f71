"""
A blocking MQTT 3.1.1 connection that sends exactly what a test tells it to:
for what a well-behaved client library will not do (stay silent past its
keepalive, withhold acknowledgements, send malformed bytes).
"""

from __future__ import annotations

import socket
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from sktalent.mqtt import packets as p
from sktalent.mqtt.codec import MAX_REMAINING_LENGTH, Decoder, encode_all

P = TypeVar("P", bound=p.Packet)
# Bounds the wait for a probe: no test has more than this on its way.
_MOST_BEFORE_A_PROBE = 10_000


class RawClient:
    """
    One TCP connection to 127.0.0.1:port.  Every wait is bounded by
    ``timeout`` seconds unless a call says otherwise.
    """

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._sock = socket.create_connection(("127.0.0.1", port), timeout)
        # No limit of its own: the server decides what it sends.
        self._decoder = Decoder(MAX_REMAINING_LENGTH)
        self._received: deque[p.Packet] = deque()
        self._eof = False

    # -- sending --------------------------------------------------------------

    def send(self, *packets: p.Packet) -> None:
        self._sock.sendall(encode_all(packets))

    def send_bytes(self, data: bytes) -> None:
        self._sock.sendall(data)

    def connect(
        self,
        client_id: str,
        clean: bool = True,
        keepalive: int = 0,
        will: p.Will | None = None,
        password: bytes | None = None,
        username: str | None = None,
    ) -> p.ConnAck:
        """
        Send CONNECT and answer the CONNACK; with a password, the username
        is the client id unless given.
        """
        if username is None and password is not None:
            username = client_id
        self.send(
            p.Connect(
                client_id,
                clean_session=clean,
                keepalive=keepalive,
                will=will,
                username=username,
                password=password,
            )
        )
        return self.expect(p.ConnAck)

    def subscribe(self, packet_id: int, *topics: tuple[str, int]) -> p.SubAck:
        """Send SUBSCRIBE and answer the SUBACK, checking its packet id."""
        self.send(p.Subscribe(packet_id, topics))
        suback = self.expect(p.SubAck)
        if suback.packet_id != packet_id:
            raise AssertionError(f"SUBACK for {suback.packet_id}, not {packet_id}")
        return suback

    def disconnect(self) -> None:
        """Send DISCONNECT and wait until the server has closed the connection."""
        self.send(p.Disconnect())
        if not self.closed_by_server():
            raise AssertionError("the server kept the connection open after DISCONNECT")
        self.close()

    def close(self) -> None:
        """Drop the connection, with no DISCONNECT."""
        self._sock.close()

    # -- receiving ------------------------------------------------------------

    def receive(self, timeout: float | None = None) -> p.Packet | None:
        """
        The next packet from the server; None when none came within timeout
        or the server closed the connection first.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self._received:
            remaining = deadline - time.monotonic()
            if self._eof or remaining <= 0 or not self._read(remaining):
                return None
        return self._received.popleft()

    def expect(self, kind: type[P], timeout: float | None = None) -> P:
        """The next packet, which must be of the given kind."""
        packet = self.receive(timeout)
        if not isinstance(packet, kind):
            raise AssertionError(f"expected {kind.__name__}, got {packet!r}")
        return packet

    def until(
        self,
        is_probe: Callable[[p.Packet], bool],
        acknowledge: bool = False,
        timeout: float | None = None,
    ) -> list[p.Packet]:
        """
        The packets received before the first one is_probe accepts, which
        is taken too; with acknowledge, each QoS 1 PUBLISH taken, the probe
        included, is acknowledged (so that the server's window lets the
        rest through).
        With a probe sent behind everything already on its way, an empty
        list proves that nothing more was coming.
        """
        before: list[p.Packet] = []
        for _ in range(_MOST_BEFORE_A_PROBE):
            packet = self.receive(timeout)
            if packet is None:
                raise AssertionError(f"the probe never came; before it: {before!r}")
            if acknowledge and isinstance(packet, p.Publish) and packet.qos == 1:
                assert packet.packet_id is not None
                self.send(p.PubAck(packet.packet_id))
            if is_probe(packet):
                return before
            before.append(packet)
        raise AssertionError(f"no probe among {_MOST_BEFORE_A_PROBE} packets")

    def ping(self) -> list[p.Packet]:
        """
        A PINGREQ round trip: the packets received before the PINGRESP.
        Whatever the server wrote on this connection before reading the
        PINGREQ comes first; a close instead is an AssertionError.
        """
        self.send(p.PingReq())
        return self.until(lambda packet: isinstance(packet, p.PingResp))

    def closed_by_server(self, timeout: float | None = None) -> bool:
        """
        Whether the server closes the connection within timeout; packets that
        arrive meanwhile are kept for receive().
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self._eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._read(remaining)
        return True

    def _read(self, timeout: float) -> bool:
        """Read once; whether anything (data or the end) came in time."""
        self._sock.settimeout(timeout)
        try:
            data = self._sock.recv(1 << 16)
        except TimeoutError:
            return False
        except ConnectionResetError:
            # A server closing with our bytes unread resets instead of FIN.
            data = b""
        if not data:
            self._eof = True
        else:
            self._received.extend(self._decoder.feed(data))
        return True
