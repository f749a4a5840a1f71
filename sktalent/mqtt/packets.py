"""
MQTT 3.1.1 control packets as immutable values.

The codec turns bytes into these and back; everything above the codec speaks
only in these values.
"""

from __future__ import annotations

import attrs


class ProtocolError(Exception):
    """
    The peer broke the protocol; the connection must be closed (MQTT-4.8.0-1).
    """


class PacketTooLarge(ProtocolError):
    """
    A packet's remaining length exceeds the configured maximum.
    """


class UnacceptableProtocolLevel(ProtocolError):
    """
    A well-formed CONNECT named a protocol level other than 4: answered with
    CONNACK return code 1 before the close (MQTT-3.1.2-2).
    """

    def __init__(self, level: int) -> None:
        super().__init__(f"unsupported protocol level {level}")
        self.level = level


class UnusableIdentifier(ProtocolError):
    """
    A CONNECT, well-formed otherwise, whose client identifier or user name
    is not well-formed UTF-8 or holds U+0000: answered with CONNACK 2
    (identifier rejected) before the close, so that every CONNECT is
    answered.
    """


@attrs.frozen
class Will:
    topic: str
    message: bytes
    qos: int = 0
    retain: bool = False


@attrs.frozen
class Connect:
    client_id: str
    clean_session: bool = True
    keepalive: int = 0
    will: Will | None = None
    username: str | None = None
    password: bytes | None = None
    protocol_name: str = "MQTT"
    protocol_level: int = 4


@attrs.frozen
class ConnAck:
    return_code: int
    session_present: bool = False


@attrs.frozen
class Publish:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None


@attrs.frozen
class PubAck:
    packet_id: int


@attrs.frozen
class PubRec:
    packet_id: int


@attrs.frozen
class PubRel:
    packet_id: int


@attrs.frozen
class PubComp:
    packet_id: int


@attrs.frozen
class Subscribe:
    packet_id: int
    # (topic filter, requested QoS), in the order sent.
    topics: tuple[tuple[str, int], ...]


@attrs.frozen
class SubAck:
    packet_id: int
    # Granted QoS 0-2, or 0x80 for failure, one per requested filter.
    return_codes: tuple[int, ...]


@attrs.frozen
class Unsubscribe:
    packet_id: int
    filters: tuple[str, ...]


@attrs.frozen
class UnsubAck:
    packet_id: int


@attrs.frozen
class PingReq:
    pass


@attrs.frozen
class PingResp:
    pass


@attrs.frozen
class Disconnect:
    pass


Packet = (
    Connect
    | ConnAck
    | Publish
    | PubAck
    | PubRec
    | PubRel
    | PubComp
    | Subscribe
    | SubAck
    | Unsubscribe
    | UnsubAck
    | PingReq
    | PingResp
    | Disconnect
)

# CONNACK return codes (MQTT-3.2.2.3).
ACCEPTED = 0
REFUSED_PROTOCOL_VERSION = 1
REFUSED_IDENTIFIER = 2
REFUSED_SERVER_UNAVAILABLE = 3
REFUSED_BAD_CREDENTIALS = 4
REFUSED_NOT_AUTHORIZED = 5

SUBSCRIBE_FAILURE = 0x80
