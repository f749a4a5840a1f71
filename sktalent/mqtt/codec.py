"""
MQTT 3.1.1 wire format: bytes to packet values and back, validated strictly.

Anything malformed raises ProtocolError; the connection must then be closed
(MQTT-4.8.0-1), so the decoder does not try to resynchronise.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

import attrs

from .packets import (
    SUBSCRIBE_FAILURE,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PacketTooLarge,
    PingReq,
    PingResp,
    ProtocolError,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    UnacceptableProtocolLevel,
    UnsubAck,
    Unsubscribe,
    UnusableIdentifier,
    Will,
)
from .topics import validate_topic_filter, validate_topic_name

CONNECT = 1
CONNACK = 2
PUBLISH = 3
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10

MAX_REMAINING_LENGTH = 268_435_455

# Packets made of a packet identifier only, and packets with no body at all.
_ID_ONLY: dict[int, type[PubAck | PubRec | PubRel | PubComp | UnsubAck]] = {
    4: PubAck,
    5: PubRec,
    6: PubRel,
    7: PubComp,
    11: UnsubAck,
}
_EMPTY: dict[int, type[PingReq | PingResp | Disconnect]] = {
    12: PingReq,
    13: PingResp,
    14: Disconnect,
}
_ID_ONLY_TYPES = {cls: ptype for ptype, cls in _ID_ONLY.items()}
_EMPTY_TYPES = {cls: ptype for ptype, cls in _EMPTY.items()}

# Fixed-header flags each type must carry (MQTT-2.2.2-1); PUBLISH has its own.
_FLAGS = {ptype: 0 for ptype in range(1, 15) if ptype != PUBLISH}
_FLAGS.update({6: 0b0010, SUBSCRIBE: 0b0010, UNSUBSCRIBE: 0b0010})

# The fixed header of a PUBACK, the packet sent most after PUBLISH.
_PUBACK_HEAD = bytes((0x40, 2))
# First byte, one-byte remaining length and topic length of a short PUBLISH.
_SHORT_PUBLISH = struct.Struct(">BBH")

_PROTOCOL_NAME = "MQTT"
_PROTOCOL_LEVEL = 4
_MAX_RETURN_CODE = 5
_SUBACK_CODES = frozenset((0, 1, 2, SUBSCRIBE_FAILURE))


@attrs.define
class Decoder:
    """
    Incremental decoder for one connection's byte stream.
    """

    # Limit on the remaining length, checked before the body is buffered.
    max_packet_size: int = 65536
    # Bytes of a packet not yet complete, and how many there must be before
    # parsing again is worth it: a large packet arriving in many reads is
    # parsed once, not once per read.  None between packets, as most of the
    # time on an idle connection.
    _partial: bytearray | None = attrs.field(default=None, init=False)
    _needed: int = attrs.field(default=0, init=False)
    _error: ProtocolError | None = attrs.field(default=None, init=False)

    def feed(self, data: bytes) -> list[Packet]:
        """
        Add data and return every packet it completes, in order.
        """
        if self._error is not None:
            raise ProtocolError("input after a protocol error") from self._error
        partial = self._partial
        if partial is not None:
            partial += data
            if len(partial) < self._needed:
                return []
            data = bytes(partial)
            self._partial = None
        elif type(data) is not bytes:
            data = bytes(data)
        try:
            packets, consumed = _parse(data, self.max_packet_size)
        except ProtocolError as e:
            self._error = e
            raise
        if consumed < len(data):
            self._keep(data[consumed:])
        return packets

    @property
    def pending(self) -> bool:
        """Whether part of a packet is waiting for the rest."""
        return self._partial is not None

    def _keep(self, rest: bytes) -> None:
        self._partial = bytearray(rest)
        self._needed = _needed(rest)


def decode(data: bytes, limit: int) -> tuple[list[Packet], Decoder | None]:
    """
    The packets complete in data, and a Decoder holding the start of the
    packet after them, if data ends inside one: for a reader that keeps a
    decoder only while a packet is part-read, as a connection between
    packets need not (every idle one).
    """
    packets, consumed = _parse(bytes(data), limit)
    if consumed == len(data):
        return packets, None
    decoder = Decoder(limit)
    decoder._keep(data[consumed:])
    return packets, decoder


def _parse(data: bytes, limit: int) -> tuple[list[Packet], int]:
    """
    The complete packets at the start of data, and how many bytes they
    take.  The packets every connection sends most (PUBLISH, PUBACK, with a
    one-byte remaining length) are read inline; the rest, and anything
    irregular, by the general decoders, which also word every error.
    """
    packets: list[Packet] = []
    append = packets.append
    pos = 0
    size = len(data)
    while pos < size:
        first = data[pos]
        if (
            pos + 1 < size
            and (length := data[pos + 1]) < 0x80
            and length <= limit
            and (end := pos + 2 + length) <= size
        ):
            body = pos + 2
            if first == 0x40 and length == 2:
                packet_id = data[body] << 8 | data[body + 1]
                if packet_id:
                    append(PubAck(packet_id))
                    pos = end
                    continue
            elif first >> 4 == PUBLISH and (publish := _quick_publish(data, first, body, end)):
                append(publish)
                pos = end
                continue
        header = _fixed_header(data, pos)
        if header is None:
            break
        first, length, body = header
        if length > limit:
            raise PacketTooLarge(f"remaining length {length} over {limit}")
        end = body + length
        if end > size:
            break
        reader = _Reader(memoryview(data)[body:end])
        append(_DECODERS[first >> 4](first & 0x0F, reader))
        reader.finish()
        pos = end
    return packets, pos


def _quick_publish(data: bytes, first: int, body: int, end: int) -> Publish | None:
    """
    The PUBLISH in data[body:end] when it is well-formed, else None: the
    general decoder then says what is wrong with it.
    """
    qos = first >> 1 & 3
    if qos == 3 or (qos == 0 and first & 0b1000):
        return None
    topic_end = body + 2 + (data[body] << 8 | data[body + 1]) if end - body >= 2 else end + 1
    start = topic_end + 2 if qos else topic_end
    if start > end:
        return None
    try:
        topic = str(data[body + 2 : topic_end], "utf-8")
    except UnicodeDecodeError:
        return None
    if not topic or "\x00" in topic or "+" in topic or "#" in topic:
        return None
    packet_id = None
    if qos:
        packet_id = data[topic_end] << 8 | data[topic_end + 1]
        if not packet_id:
            return None
    return Publish(topic, data[start:end], qos, bool(first & 1), bool(first & 0b1000), packet_id)


def _needed(rest: bytes) -> int:
    """
    How many bytes rest, the start of a packet, must grow to before it may
    be complete.
    """
    header = _fixed_header(rest, 0)
    if header is None:
        return len(rest) + 1
    _, length, body = header
    return body + length


def _fixed_header(data: bytes, pos: int) -> tuple[int, int, int] | None:
    """
    (first byte, remaining length, body offset), or None while incomplete.
    """
    first = data[pos]
    _check_flags(first >> 4, first & 0x0F)
    length = 0
    for index in range(4):
        at = pos + 1 + index
        if at >= len(data):
            return None
        byte = data[at]
        length |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return first, length, at + 1
    raise ProtocolError("remaining length longer than four bytes")


def _check_flags(ptype: int, flags: int) -> None:
    if ptype == PUBLISH:
        qos = (flags >> 1) & 3
        if qos == 3:
            raise ProtocolError("PUBLISH with QoS 3")
        if qos == 0 and flags & 0b1000:
            raise ProtocolError("PUBLISH with QoS 0 and DUP set")
        return
    expected = _FLAGS.get(ptype)
    if expected is None:
        raise ProtocolError(f"reserved packet type {ptype}")
    if flags != expected:
        raise ProtocolError(f"packet type {ptype} with flags {flags:#06b}")


@attrs.define
class _Reader:
    """
    Cursor over one packet's body.
    """

    _view: memoryview
    _pos: int = 0

    def _take(self, size: int) -> memoryview:
        end = self._pos + size
        if end > len(self._view):
            raise ProtocolError("packet shorter than its contents")
        chunk = self._view[self._pos : end]
        self._pos = end
        return chunk

    def at_end(self) -> bool:
        return self._pos == len(self._view)

    def finish(self) -> None:
        if not self.at_end():
            raise ProtocolError("packet longer than its contents")

    def byte(self) -> int:
        return self._take(1)[0]

    def uint16(self) -> int:
        return int.from_bytes(self._take(2), "big")

    def packet_id(self) -> int:
        packet_id = self.uint16()
        if packet_id == 0:
            raise ProtocolError("packet identifier 0")
        return packet_id

    def binary(self) -> bytes:
        return bytes(self._take(self.uint16()))

    def string(self) -> str:
        """
        A UTF-8 string without NUL (MQTT-1.5.3-1, MQTT-1.5.3-2); the strict
        decoder already refuses overlong forms and encoded surrogates.
        """
        text = self.text()
        if isinstance(text, ProtocolError):
            raise text
        return text

    def text(self) -> str | ProtocolError:
        """A string as string() reads it, or the error it is instead."""
        try:
            text = str(self._take(self.uint16()), "utf-8")
        except UnicodeDecodeError as e:
            return ProtocolError(f"invalid UTF-8: {e}")
        if "\x00" in text:
            return ProtocolError("NUL in a string")
        return text

    def topic_name(self) -> str:
        return _checked(validate_topic_name, self.string())

    def topic_filter(self) -> str:
        return _checked(validate_topic_filter, self.string())

    def rest(self) -> bytes:
        return bytes(self._take(len(self._view) - self._pos))


def _checked(validate: Callable[[str], None], text: str) -> str:
    try:
        validate(text)
    except ValueError as e:
        raise ProtocolError(str(e)) from e
    return text


def _decode_connect(flags: int, r: _Reader) -> Connect:
    if r.string() != _PROTOCOL_NAME:
        raise ProtocolError("protocol name is not MQTT")
    level = r.byte()
    if level != _PROTOCOL_LEVEL:
        raise UnacceptableProtocolLevel(level)
    connect_flags = r.byte()
    if connect_flags & 0x01:
        raise ProtocolError("reserved CONNECT flag set")
    has_will = bool(connect_flags & 0x04)
    will_qos = (connect_flags >> 3) & 3
    will_retain = bool(connect_flags & 0x20)
    has_password = bool(connect_flags & 0x40)
    has_username = bool(connect_flags & 0x80)
    if not has_will and (will_qos or will_retain):
        raise ProtocolError("will QoS or retain without a will")
    if will_qos == 3:
        raise ProtocolError("will QoS 3")
    if has_password and not has_username:
        raise ProtocolError("password without user name")
    keepalive = r.uint16()
    client_id = r.text()
    will = None
    if has_will:
        will = Will(r.topic_name(), r.binary(), will_qos, will_retain)
    username = r.text() if has_username else None
    password = r.binary() if has_password else None
    # The rest is checked first: only a CONNECT wrong in nothing else is answered.
    r.finish()
    if isinstance(client_id, ProtocolError):
        raise UnusableIdentifier(f"client identifier: {client_id}")
    if isinstance(username, ProtocolError):
        raise UnusableIdentifier(f"user name: {username}")
    return Connect(
        client_id=client_id,
        clean_session=bool(connect_flags & 0x02),
        keepalive=keepalive,
        will=will,
        username=username,
        password=password,
    )


def _decode_connack(flags: int, r: _Reader) -> ConnAck:
    acknowledge = r.byte()
    return_code = r.byte()
    if acknowledge & 0xFE:
        raise ProtocolError("reserved CONNACK flag set")
    if return_code > _MAX_RETURN_CODE:
        raise ProtocolError(f"reserved CONNACK return code {return_code}")
    if acknowledge and return_code:
        raise ProtocolError("session present on a refused connection")
    return ConnAck(return_code, bool(acknowledge))


def _decode_publish(flags: int, r: _Reader) -> Publish:
    qos = (flags >> 1) & 3
    topic = r.topic_name()
    packet_id = r.packet_id() if qos else None
    return Publish(
        topic=topic,
        payload=r.rest(),
        qos=qos,
        retain=bool(flags & 0b0001),
        dup=bool(flags & 0b1000),
        packet_id=packet_id,
    )


def _decode_subscribe(flags: int, r: _Reader) -> Subscribe:
    packet_id = r.packet_id()
    topics = []
    while not r.at_end():
        topic_filter = r.topic_filter()
        qos = r.byte()
        if qos > 2:
            raise ProtocolError(f"requested QoS byte {qos:#04x}")
        topics.append((topic_filter, qos))
    if not topics:
        raise ProtocolError("SUBSCRIBE without a topic filter")
    return Subscribe(packet_id, tuple(topics))


def _decode_suback(flags: int, r: _Reader) -> SubAck:
    packet_id = r.packet_id()
    codes = r.rest()
    if not codes:
        raise ProtocolError("SUBACK without a return code")
    if not _SUBACK_CODES.issuperset(codes):
        raise ProtocolError("reserved SUBACK return code")
    return SubAck(packet_id, tuple(codes))


def _decode_unsubscribe(flags: int, r: _Reader) -> Unsubscribe:
    packet_id = r.packet_id()
    filters = []
    while not r.at_end():
        filters.append(r.topic_filter())
    if not filters:
        raise ProtocolError("UNSUBSCRIBE without a topic filter")
    return Unsubscribe(packet_id, tuple(filters))


def _id_only_decoder(ptype: int) -> Callable[[int, _Reader], Packet]:
    cls = _ID_ONLY[ptype]
    return lambda flags, r: cls(r.packet_id())


def _empty_decoder(ptype: int) -> Callable[[int, _Reader], Packet]:
    cls = _EMPTY[ptype]
    return lambda flags, r: cls()


_DECODERS: dict[int, Callable[[int, _Reader], Packet]] = {
    CONNECT: _decode_connect,
    CONNACK: _decode_connack,
    PUBLISH: _decode_publish,
    SUBSCRIBE: _decode_subscribe,
    SUBACK: _decode_suback,
    UNSUBSCRIBE: _decode_unsubscribe,
    **{ptype: _id_only_decoder(ptype) for ptype in _ID_ONLY},
    **{ptype: _empty_decoder(ptype) for ptype in _EMPTY},
}


def encode_remaining_length(length: int) -> bytes:
    """
    The variable-length encoding of a remaining length (MQTT-2.2.3).
    """
    if not 0 <= length <= MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length {length} out of range")
    out = bytearray()
    while True:
        length, digit = divmod(length, 128)
        if length:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def encode(packet: Packet) -> bytes:
    """
    The wire form of packet.

    Raises ValueError when a field cannot be represented (out of range, too
    long); values that are representable but break a protocol rule are
    encoded as they are.
    """
    if isinstance(packet, Publish):
        return _encode_publish(packet)
    if isinstance(packet, PubAck):
        return encode_puback(packet.packet_id)
    ptype, flags, body = _encode_body(packet)
    return _framed(ptype << 4 | flags, body)


def _framed(first: int, body: bytes) -> bytes:
    length = len(body)
    if length < 0x80:
        return bytes((first, length)) + body
    return bytes((first,)) + encode_remaining_length(length) + body


def encode_puback(packet_id: int) -> bytes:
    """The wire form of PubAck(packet_id), for the hot path: no value built."""
    return _PUBACK_HEAD + _uint16(packet_id)


def encode_all(packets: Iterable[Packet]) -> bytes:
    """
    The wire form of several packets, back to back.
    """
    return b"".join(map(encode, packets))


def _encode_body(packet: Packet) -> tuple[int, int, bytes]:
    """
    (packet type, fixed-header flags, body) of packet.
    """
    match packet:
        case Connect():
            return CONNECT, 0, _encode_connect(packet)
        case ConnAck(return_code=code, session_present=present):
            return CONNACK, 0, bytes([present, _byte(code)])
        case Subscribe(packet_id=packet_id, topics=topics):
            body = _uint16(packet_id) + b"".join(
                _string(topic_filter) + bytes([_byte(qos)]) for topic_filter, qos in topics
            )
            return SUBSCRIBE, _FLAGS[SUBSCRIBE], body
        case SubAck(packet_id=packet_id, return_codes=codes):
            return SUBACK, 0, _uint16(packet_id) + bytes(map(_byte, codes))
        case Unsubscribe(packet_id=packet_id, filters=filters):
            body = _uint16(packet_id) + b"".join(map(_string, filters))
            return UNSUBSCRIBE, _FLAGS[UNSUBSCRIBE], body
        case PubRec() | PubRel() | PubComp() | UnsubAck():
            ptype = _ID_ONLY_TYPES[type(packet)]
            return ptype, _FLAGS[ptype], _uint16(packet.packet_id)
        case PingReq() | PingResp() | Disconnect():
            return _EMPTY_TYPES[type(packet)], 0, b""
    raise TypeError(f"not a packet: {packet!r}")


def _encode_connect(packet: Connect) -> bytes:
    flags = packet.clean_session << 1
    payload = _string(packet.client_id)
    if packet.will is not None:
        will = packet.will
        flags |= 0x04 | _qos(will.qos) << 3 | will.retain << 5
        payload += _string(will.topic) + _binary(will.message)
    if packet.username is not None:
        flags |= 0x80
        payload += _string(packet.username)
    if packet.password is not None:
        flags |= 0x40
        payload += _binary(packet.password)
    return (
        _string(packet.protocol_name)
        + bytes([_byte(packet.protocol_level), flags])
        + _uint16(packet.keepalive)
        + payload
    )


def _encode_publish(packet: Publish) -> bytes:
    # Every message delivered goes through here: one struct for the fixed
    # header and topic length whenever the remaining length fits one byte.
    qos = _qos(packet.qos)
    first = PUBLISH << 4 | packet.dup << 3 | qos << 1 | packet.retain
    topic = packet.topic.encode("utf-8")
    topic_size = len(topic)
    if topic_size > 0xFFFF:
        raise ValueError(f"{topic_size} does not fit two bytes")
    packet_id = packet.packet_id
    if qos:
        if packet_id is None:
            raise ValueError("PUBLISH with QoS > 0 needs a packet identifier")
        topic += _uint16(packet_id)
    elif packet_id is not None:
        raise ValueError("PUBLISH with QoS 0 has no packet identifier")
    payload = packet.payload
    length = 2 + len(topic) + len(payload)
    if length < 0x80:
        return _SHORT_PUBLISH.pack(first, length, topic_size) + topic + payload
    return bytes((first,)) + encode_remaining_length(length) + _uint16(topic_size) + topic + payload


def _byte(value: int) -> int:
    if not 0 <= value <= 0xFF:
        raise ValueError(f"{value} does not fit a byte")
    return value


def _qos(qos: int) -> int:
    # Wider values would spill into neighbouring flag bits.
    if not 0 <= qos <= 3:
        raise ValueError(f"QoS {qos} does not fit two bits")
    return qos


def _uint16(value: int) -> bytes:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"{value} does not fit two bytes")
    return value.to_bytes(2, "big")


def _binary(data: bytes) -> bytes:
    return _uint16(len(data)) + data


def _string(text: str) -> bytes:
    """
    Raises ValueError (UnicodeEncodeError) for lone surrogates, which UTF-8
    cannot carry.
    """
    return _binary(text.encode("utf-8"))
