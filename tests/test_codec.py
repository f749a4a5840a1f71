"""
Tests for sktalent.mqtt.codec.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sktalent.mqtt import codec
from sktalent.mqtt.codec import Decoder, decode, encode, encode_all, encode_remaining_length
from sktalent.mqtt.packets import (
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

_text = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00"),
    max_size=20,
)
_level = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00+#/"),
    max_size=6,
)
_topic_names = st.lists(_level, min_size=1, max_size=4).map("/".join).filter(bool)
_topic_filters = st.builds(
    lambda levels, rest: "/".join(levels + rest),
    st.lists(st.one_of(_level, st.just("+")), max_size=4),
    st.sampled_from(([], ["#"])),
).filter(bool)
_packet_ids = st.integers(1, 0xFFFF)
_qos = st.integers(0, 2)
_payloads = st.binary(max_size=64)


@st.composite
def _connects(draw: st.DrawFn) -> Connect:
    username = draw(st.none() | _text)
    return Connect(
        client_id=draw(_text),
        clean_session=draw(st.booleans()),
        keepalive=draw(st.integers(0, 0xFFFF)),
        will=draw(st.none() | st.builds(Will, _topic_names, _payloads, _qos, st.booleans())),
        username=username,
        # A password needs a user name (MQTT-3.1.2-22).
        password=None if username is None else draw(st.none() | _payloads),
    )


@st.composite
def _connacks(draw: st.DrawFn) -> ConnAck:
    return_code = draw(st.integers(0, 5))
    present = False if return_code else draw(st.booleans())
    return ConnAck(return_code, present)


@st.composite
def _publishes(draw: st.DrawFn) -> Publish:
    qos = draw(_qos)
    return Publish(
        topic=draw(_topic_names),
        payload=draw(_payloads),
        qos=qos,
        retain=draw(st.booleans()),
        dup=bool(qos) and draw(st.booleans()),
        packet_id=draw(_packet_ids) if qos else None,
    )


_PACKET_STRATEGIES: tuple[st.SearchStrategy[Packet], ...] = (
    _connects(),
    _connacks(),
    _publishes(),
    st.builds(PubAck, _packet_ids),
    st.builds(PubRec, _packet_ids),
    st.builds(PubRel, _packet_ids),
    st.builds(PubComp, _packet_ids),
    st.builds(
        Subscribe,
        _packet_ids,
        st.lists(st.tuples(_topic_filters, _qos), min_size=1, max_size=4).map(tuple),
    ),
    st.builds(
        SubAck,
        _packet_ids,
        st.lists(st.sampled_from((0, 1, 2, 0x80)), min_size=1, max_size=4).map(tuple),
    ),
    st.builds(
        Unsubscribe,
        _packet_ids,
        st.lists(_topic_filters, min_size=1, max_size=4).map(tuple),
    ),
    st.builds(UnsubAck, _packet_ids),
    st.just(PingReq()),
    st.just(PingResp()),
    st.just(Disconnect()),
)
_packets = st.one_of(_PACKET_STRATEGIES)


def _frame(first: int, body: bytes) -> bytes:
    """
    A packet with the given first byte around an arbitrary body.
    """
    return bytes([first]) + encode_remaining_length(len(body)) + body


def _utf8(raw: bytes) -> bytes:
    """
    A length-prefixed string field holding raw bytes, valid or not.
    """
    return len(raw).to_bytes(2, "big") + raw


def _connect(name: bytes = b"MQTT", level: int = 4, flags: int = 0x02) -> bytes:
    """
    A CONNECT with client id "c" and the given header fields.
    """
    return _frame(0x10, _utf8(name) + bytes([level, flags, 0, 60]) + _utf8(b"c"))


class RoundTripTests(SynchronousTestCase):
    """
    Properties of encode and Decoder together.
    """

    @given(st.data())
    def test_round_trip_every_type(self, data: st.DataObject) -> None:
        """
        Every packet type decodes to the value it was encoded from, and
        re-encodes to the same bytes.
        """
        for strategy in _PACKET_STRATEGIES:
            packet = data.draw(strategy)
            wire = encode(packet)
            self.assertEqual(Decoder().feed(wire), [packet])
            self.assertEqual(encode(packet), wire)

    @given(st.lists(_packets, max_size=8), st.data())
    def test_arbitrary_split(self, packets: list[Packet], data: st.DataObject) -> None:
        """
        Feeding a stream in pieces cut anywhere yields the packets in order.
        """
        wire = encode_all(packets)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
        decoder = Decoder()
        decoded: list[Packet] = []
        for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
            decoded.extend(decoder.feed(wire[start:end]))
        self.assertEqual(decoded, packets)

    @settings(max_examples=500)
    @given(st.binary(max_size=300))
    def test_random_bytes(self, wire: bytes) -> None:
        """
        Arbitrary input either decodes or raises ProtocolError.
        """
        try:
            Decoder().feed(wire)
        except ProtocolError:
            pass

    @settings(max_examples=500)
    @given(st.lists(_packets, min_size=1, max_size=3), st.data())
    def test_corrupted_packets(self, packets: list[Packet], data: st.DataObject) -> None:
        """
        Valid streams with a few bytes overwritten either decode or raise
        ProtocolError.
        """
        wire = bytearray(encode_all(packets))
        for _ in range(data.draw(st.integers(1, 3))):
            wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
        try:
            Decoder().feed(bytes(wire))
        except ProtocolError:
            pass


class RemainingLengthTests(SynchronousTestCase):
    """
    The variable-length remaining length field.
    """

    # Boundaries of the 1 to 4 byte encodings with their encodings from the
    # table in section 2.2.3.
    BOUNDARIES = (
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16383, b"\xff\x7f"),
        (16384, b"\x80\x80\x01"),
        (2097151, b"\xff\xff\x7f"),
        (2097152, b"\x80\x80\x80\x01"),
        (268435455, b"\xff\xff\xff\x7f"),
    )

    def test_encoding(self) -> None:
        """
        Lengths at the boundaries encode as the specification's table says.
        """
        for length, encoded in self.BOUNDARIES:
            self.assertEqual(encode_remaining_length(length), encoded)

    def test_decoding(self) -> None:
        """
        Each boundary length decodes exactly: a limit one below it refuses
        the header, a limit equal to it waits for the body.
        """
        for length, encoded in self.BOUNDARIES[1:]:
            header = b"\x30" + encoded
            self.assertEqual(Decoder(max_packet_size=length).feed(header), [])
            with self.assertRaises(PacketTooLarge):
                Decoder(max_packet_size=length - 1).feed(header)

    def test_packets_at_boundaries(self) -> None:
        """
        Packets whose remaining length sits on a boundary (up to 2097152)
        carry that length and round trip.
        """
        self.assertEqual(encode(PingReq()), b"\xc0\x00")
        self.assertEqual(Decoder(max_packet_size=0).feed(b"\xc0\x00"), [PingReq()])
        for length, encoded in self.BOUNDARIES[1:-1]:
            # Two bytes of topic length and a one-character topic.
            packet = Publish("t", b"x" * (length - 3))
            wire = encode(packet)
            self.assertEqual(wire[1 : 1 + len(encoded)], encoded)
            self.assertEqual(len(wire), 1 + len(encoded) + length)
            self.assertEqual(Decoder(max_packet_size=length).feed(wire), [packet])

    def test_out_of_range(self) -> None:
        """
        Lengths beyond four bytes' worth, or negative, cannot be encoded.
        """
        for length in (-1, 268435456):
            with self.assertRaises(ValueError):
                encode_remaining_length(length)

    def test_fifth_byte(self) -> None:
        """
        A continuation bit on the fourth length byte is refused at once, with
        or without a fifth byte.
        """
        for wire in (b"\x30\xff\xff\xff\xff\x01", b"\xc0\x80\x80\x80\x80"):
            with self.assertRaises(ProtocolError):
                Decoder(max_packet_size=2**40).feed(wire)


class DecoderTests(SynchronousTestCase):
    """
    Decoder behaviour apart from validation.
    """

    def test_partial_then_complete(self) -> None:
        """
        Bytes of an incomplete packet are kept until the rest arrives, and
        packets already complete are returned at once.
        """
        decoder = Decoder()
        wire = encode_all([PubAck(1), Publish("a/b", b"hello", 1, packet_id=2)])
        self.assertEqual(decoder.feed(wire[:6]), [PubAck(1)])
        self.assertEqual(decoder.feed(wire[6:-1]), [])
        self.assertEqual(
            decoder.feed(wire[-1:] + encode(PingReq())),
            [Publish("a/b", b"hello", 1, packet_id=2), PingReq()],
        )

    def test_large_packet_in_many_reads(self) -> None:
        """
        A packet arriving in many reads is parsed once its last byte is in,
        not again at every read.
        """
        packet = Publish("t", bytes(range(256)) * 200, 1, packet_id=5)
        wire = encode(packet)
        decoder = Decoder(max_packet_size=len(wire))
        parses = 0
        parse = codec._parse

        def counted(data: bytes, limit: int) -> tuple[list[Packet], int]:
            nonlocal parses
            parses += 1
            return parse(data, limit)

        self.patch(codec, "_parse", counted)
        decoded = [decoder.feed(wire[i : i + 512]) for i in range(0, len(wire), 512)]
        self.assertEqual(decoded[-1], [packet])
        self.assertEqual(sum(decoded, []), [packet])
        self.assertEqual(parses, 2)

    def test_decode(self) -> None:
        """
        decode answers the whole packets and no decoder when nothing is left
        over, else a decoder that completes the packet begun.
        """
        wire = encode_all([PubAck(1), Publish("a", b"x", 1, packet_id=2)])
        self.assertEqual(decode(wire, 100), ([PubAck(1), Publish("a", b"x", 1, packet_id=2)], None))
        packets, decoder = decode(wire[:5], 100)
        self.assertEqual(packets, [PubAck(1)])
        assert decoder is not None
        self.assertTrue(decoder.pending)
        self.assertEqual(decoder.feed(wire[5:]), [Publish("a", b"x", 1, packet_id=2)])
        self.assertFalse(decoder.pending)
        with self.assertRaises(PacketTooLarge):
            decode(wire, 3)

    def test_too_large_before_body(self) -> None:
        """
        A remaining length over the limit is refused from the fixed header
        alone; the limit itself is allowed.
        """
        with self.assertRaises(PacketTooLarge):
            Decoder(max_packet_size=100).feed(b"\x30\x65")
        packet = Publish("t", b"x" * 97)
        self.assertEqual(Decoder(max_packet_size=100).feed(encode(packet)), [packet])

    def test_default_limit(self) -> None:
        """
        The default limit is 64 KiB of remaining length.
        """
        self.assertEqual(Decoder().feed(b"\x30\x80\x80\x04"), [])
        with self.assertRaises(PacketTooLarge):
            Decoder().feed(b"\x30\x81\x80\x04")

    def test_refuses_after_error(self) -> None:
        """
        After an error the decoder refuses even valid input.
        """
        decoder = Decoder()
        with self.assertRaises(ProtocolError):
            decoder.feed(b"\x00\x00")
        with self.assertRaises(ProtocolError):
            decoder.feed(encode(PingReq()))

    def test_empty_client_id(self) -> None:
        """
        An empty client id is left for the protocol to judge.
        """
        self.assertEqual(Decoder().feed(encode(Connect(""))), [Connect("")])


class ValidationTests(SynchronousTestCase):
    """
    Each rule of MQTT 3.1.1 the decoder enforces.
    """

    def assertRejected(self, wire: bytes) -> ProtocolError:
        with self.assertRaises(ProtocolError, msg=repr(wire)) as caught:
            Decoder().feed(wire)
        return caught.exception

    def test_reserved_packet_types(self) -> None:
        """
        Packet types 0 and 15 are refused whatever the flags.
        """
        for ptype in (0, 15):
            for flags in range(16):
                self.assertRejected(bytes([ptype << 4 | flags]))

    def test_fixed_header_flags(self) -> None:
        """
        PUBREL, SUBSCRIBE and UNSUBSCRIBE need flags 0010 and the other
        non-PUBLISH types 0000 (MQTT-2.2.2-1); the first byte suffices.
        """
        required = {6: 0b0010, 8: 0b0010, 10: 0b0010}
        for ptype in (1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14):
            for flags in range(16):
                if flags != required.get(ptype, 0):
                    self.assertRejected(bytes([ptype << 4 | flags]))

    def test_publish_qos_3(self) -> None:
        """
        A PUBLISH with both QoS bits set is refused (MQTT-3.3.1-4).
        """
        self.assertRejected(encode(Publish("t", b"", qos=3, packet_id=1)))

    def test_publish_qos_0_dup(self) -> None:
        """
        A QoS 0 PUBLISH with DUP set is refused (MQTT-3.3.1-2).
        """
        self.assertRejected(encode(Publish("t", b"", dup=True)))

    def test_packet_id_zero(self) -> None:
        """
        Packet identifier 0 is refused wherever one is required
        (MQTT-2.3.1-1).
        """
        for packet in (
            Publish("t", b"", qos=1, packet_id=0),
            Publish("t", b"", qos=2, packet_id=0),
            PubAck(0),
            PubRec(0),
            PubRel(0),
            PubComp(0),
            Subscribe(0, (("t", 0),)),
            SubAck(0, (0,)),
            Unsubscribe(0, ("t",)),
            UnsubAck(0),
        ):
            self.assertRejected(encode(packet))

    def test_trailing_bytes(self) -> None:
        """
        A remaining length longer than the packet's contents is refused.
        """
        for packet in (
            PubAck(1),
            PingReq(),
            ConnAck(0),
            Connect("c"),
            Subscribe(1, (("t", 0),)),
        ):
            wire = encode(packet)
            self.assertRejected(_frame(wire[0], wire[2:] + b"\x00"))

    def test_short_packets(self) -> None:
        """
        A remaining length shorter than the packet's contents is refused.
        """
        for wire in (
            _frame(0x40, b"\x00"),
            _frame(0x20, b"\x00"),
            _frame(0x32, b"\x00\x01t\x00"),
            _frame(0x82, b"\x00\x01\x00\x05ab"),
            _frame(0x82, b"\x00\x01\x00\x01a"),
            _frame(0x10, encode(Connect("c"))[2:-1]),
        ):
            self.assertRejected(wire)

    def test_invalid_utf8(self) -> None:
        """
        Strings must be well-formed UTF-8 without NUL or surrogates
        (MQTT-1.5.3-1, MQTT-1.5.3-2), in topics as in other fields.
        """
        for raw in (b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"a\x00b", b"\xe2\x82"):
            self.assertRejected(_frame(0x30, _utf8(raw)))
            body = _utf8(b"MQTT") + b"\x04\x02\x00\x3c" + _utf8(raw)
            self.assertRejected(_frame(0x10, body))
            self.assertRejected(_frame(0xA2, b"\x00\x01" + _utf8(raw)))
        self.assertRejected(encode(Connect("c", username="a\x00")))

    def test_unusable_identifier(self) -> None:
        """
        A CONNECT whose client identifier or user name is not a string of
        MQTT raises UnusableIdentifier, to be answered CONNACK 2, once the
        rest of it is found well-formed; anything else wrong with it is a
        plain protocol error.
        """
        good = _utf8(b"MQTT") + b"\x04"
        for raw in (b"\xff", b"\xed\xa0\x80", b"a\x00b", b"\xe2\x82"):
            for body in (
                good + b"\x02\x00\x3c" + _utf8(raw),
                good + b"\xc2\x00\x3c" + _utf8(b"c") + _utf8(raw) + _utf8(b"pw"),
                good + b"\x82\x00\x3c" + _utf8(raw) + _utf8(raw),
            ):
                with self.assertRaises(UnusableIdentifier, msg=repr(body)):
                    Decoder().feed(_frame(0x10, body))
            for body in (
                good + b"\x03\x00\x3c" + _utf8(raw),
                good + b"\x06\x00\x3c" + _utf8(raw) + _utf8(b"a/+") + _utf8(b""),
                good + b"\x02\x00\x3c" + _utf8(raw) + b"\x00",
            ):
                error = self.assertRejected(_frame(0x10, body))
                self.assertNotIsInstance(error, UnusableIdentifier)

    def test_publish_topic(self) -> None:
        """
        PUBLISH topic names must not be empty nor contain wildcards
        (MQTT-3.3.2-2, MQTT-4.7.3-1).
        """
        for topic in ("", "+", "a/#", "a/b+", "#"):
            self.assertRejected(encode(Publish(topic, b"")))

    def test_subscribe_needs_filters(self) -> None:
        """
        SUBSCRIBE and UNSUBSCRIBE need at least one filter (MQTT-3.8.3-3,
        MQTT-3.10.3-2).
        """
        self.assertRejected(encode(Subscribe(1, ())))
        self.assertRejected(encode(Unsubscribe(1, ())))

    def test_subscribe_requested_qos(self) -> None:
        """
        The requested QoS byte must be 0 to 2 with its reserved bits clear
        (MQTT-3-8.3-4).
        """
        for qos in (3, 0x04, 0x41, 0x80, 0xFF):
            self.assertRejected(encode(Subscribe(1, (("t", 0), ("u", qos)))))

    def test_invalid_filters(self) -> None:
        """
        SUBSCRIBE and UNSUBSCRIBE filters follow the wildcard rules and are
        not empty (MQTT-4.7.1-2, MQTT-4.7.1-3, MQTT-4.7.3-1).
        """
        for topic_filter in ("", "a#", "a/#/b", "a+", "+a/b", "#/"):
            self.assertRejected(encode(Subscribe(1, (("ok", 0), (topic_filter, 0)))))
            self.assertRejected(encode(Unsubscribe(1, ("ok", topic_filter))))

    def test_suback_return_codes(self) -> None:
        """
        SUBACK return codes are 0, 1, 2 or 0x80, at least one.
        """
        for codes in ((3,), (0, 0x81), ()):
            self.assertRejected(encode(SubAck(1, codes)))

    def test_connack(self) -> None:
        """
        CONNACK refuses reserved acknowledge flags, reserved return codes and
        a session present flag on a refusal (MQTT-3.2.2-4).
        """
        for body in (b"\x02\x00", b"\x00\x06", b"\x01\x05"):
            self.assertRejected(_frame(0x20, body))

    def test_protocol_name(self) -> None:
        """
        A protocol name other than MQTT is a protocol error, not a level
        refusal, even for MQTT 3.1's name.
        """
        for name in (b"MQIsdp", b"mqtt", b"", b"\xff"):
            error = self.assertRejected(_connect(name=name, level=3))
            self.assertNotIsInstance(error, UnacceptableProtocolLevel)

    def test_protocol_level(self) -> None:
        """
        A CONNECT naming MQTT with a level other than 4 raises
        UnacceptableProtocolLevel carrying the level, whatever follows the
        level byte (MQTT-3.1.2-2).
        """
        for level in (3, 5, 0, 255):
            with self.assertRaises(UnacceptableProtocolLevel) as caught:
                Decoder().feed(_connect(level=level, flags=0xFF))
            self.assertEqual(caught.exception.level, level)

    def test_connect_reserved_flag(self) -> None:
        """
        The reserved CONNECT flag must be 0 (MQTT-3.1.2-3).
        """
        self.assertRejected(_connect(flags=0x03))

    def test_will_fields_without_will(self) -> None:
        """
        Without the will flag, will QoS and will retain must be 0
        (MQTT-3.1.2-11, MQTT-3.1.2-13, MQTT-3.1.2-15).
        """
        for flags in (0x08, 0x10, 0x20):
            self.assertRejected(_connect(flags=0x02 | flags))

    def test_will_qos_3(self) -> None:
        """
        Will QoS 3 is refused (MQTT-3.1.2-14).
        """
        self.assertRejected(encode(Connect("c", will=Will("t", b"", qos=3))))

    def test_password_without_username(self) -> None:
        """
        The password flag needs the user name flag (MQTT-3.1.2-22).
        """
        self.assertRejected(encode(Connect("c", password=b"p")))

    def test_will_topic(self) -> None:
        """
        The will topic must be a valid topic name (MQTT-3.1.3-10).
        """
        for topic in ("", "a/+", "#"):
            self.assertRejected(encode(Connect("c", will=Will(topic, b""))))


class EncoderTests(SynchronousTestCase):
    """
    encode refuses fields that do not fit the wire format.
    """

    def test_unrepresentable(self) -> None:
        """
        Out-of-range numbers, over-long strings and inconsistent packet
        identifiers raise ValueError.
        """
        for packet in (
            PubAck(0x10000),
            PubAck(-1),
            Connect("c", keepalive=0x10000),
            Publish("t" * 0x10000, b""),
            Publish("t", b"", qos=4, packet_id=1),
            Publish("t", b"", qos=1),
            Publish("t", b"", packet_id=1),
            Publish("\ud800", b""),
            Subscribe(1, (("t", 256),)),
            SubAck(1, (-1,)),
            ConnAck(256),
        ):
            with self.assertRaises(ValueError, msg=repr(packet)):
                encode(packet)
