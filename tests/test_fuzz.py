"""
Malformed MQTT frames and malformed envelopes, thousands of them: none may
log a failure, and no envelope, however bad, may close its connection or
reach the recipient.  In memory first (fast, every frame), then a bounded
sample against a real server process over a socket.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Iterator
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import provider

from sktalent.authsign import sign
from sktalent.calltalent.app import AppLimits
from sktalent.calltalent.rules import SERVER_TOPIC
from sktalent.mqtt import packets as p
from sktalent.mqtt.codec import encode, encode_all
from sktalent.testing.server import ServerProcess, running

from .helpers import chat, nothing_more, raw_user
from .mqttclient import Client
from .rawclient import RawClient
from .test_calltalent import SECRET, CallTalentCase

SEED = 8
# Every envelope is answered when nothing is rate-limited.
UNLIMITED = AppLimits(rate=1e9, burst=1e9)
_MSGID = re.compile(r"[0-9a-f]{24}\Z")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _text(rng: random.Random) -> str:
    alphabet = 'aZ09 "\\/\x00\x1f\x7f\u00e9\u4f60\U0001f600\ud800\udfff\ufeff'
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))


def _value(rng: random.Random, depth: int = 0) -> Any:
    """Some JSON value; NaN and Infinity come from json.dumps of floats."""
    kind = rng.randrange(11 if depth < 3 else 8)
    return [
        lambda: None,
        lambda: rng.choice((True, False)),
        lambda: rng.choice((0, -1, 2**64, 10**400, 1.5, -0.0)),
        lambda: rng.choice((float("nan"), float("inf"), float("-inf"))),
        lambda: _text(rng),
        lambda: "A" * rng.choice((23, 24, 25, 5000)),
        lambda: rng.choice(("ALICE", "bob", "system", "a/b", "", "bob" * 50, "\ud800")),
        lambda: "".join(rng.choice("0123456789abcdefABCDEFg") for _ in range(24)),
        lambda: [_value(rng, depth + 1) for _ in range(rng.randrange(4))],
        lambda: {_text(rng): _value(rng, depth + 1) for _ in range(rng.randrange(4))},
        lambda: {"o_id": _value(rng, depth + 1), "content": _value(rng, depth + 1)},
    ][kind]()


def _mutate_fields(rng: random.Random, frame: dict[str, Any]) -> None:
    payload = frame["payload"]
    for _ in range(rng.randrange(1, 4)):
        target = rng.choice((frame, payload))
        if not isinstance(target, dict):
            target = frame
        key = rng.choice([*target, "alert", "from_name", "url", _text(rng)])
        action = rng.randrange(3)
        if action == 0:
            target.pop(key, None)
        else:
            target[key] = _value(rng)
        if key == "payload" and action:
            payload = target[key]


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        at = rng.randrange(len(out) + 1)
        action = rng.randrange(6)
        if action == 0 and out:
            out[min(at, len(out) - 1)] = rng.randrange(256)
        elif action == 1:
            out[at:at] = rng.choice(
                (b"\xed\xa0\x80", b"\\ud800", b"\\uDFFF", b"\xff", b"\xc0\x80", b"NaN", b"\x00")
            )
        elif action == 2:
            del out[at : at + rng.randrange(1, 8)]
        elif action == 3:
            del out[at:]
        elif action == 4:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6)))
        else:
            out = out.replace(b"false", rng.choice((b"NaN", b"-Infinity")))
    return bytes(out)


def bad_envelopes(rng: random.Random, count: int, first: int = 1) -> Iterator[bytes]:
    """count payloads for the server topic, nearly all of them invalid."""
    for n in range(first, first + count):
        frame = chat("alice", "bob", n)
        style = rng.randrange(8)
        if style == 0:
            yield bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        elif style == 1:
            yield rng.choice((b"[", b"{")) * rng.randrange(1, 5000)
        elif style == 2:
            yield _mutate_bytes(rng, json.dumps(frame, ensure_ascii=rng.random() < 0.5).encode())
        else:
            _mutate_fields(rng, frame)
            text = json.dumps(frame, ensure_ascii=True)
            yield _mutate_bytes(rng, text.encode()) if style == 3 else text.encode()


def bad_frames(rng: random.Random, count: int) -> Iterator[tuple[bool, bytes]]:
    """
    count byte strings of MQTT, nearly all malformed, each with whether it
    is to follow a successful CONNECT.
    """
    valid = [
        encode(p.Connect("alice", username="alice", password=b"x")),
        encode(
            p.Publish(SERVER_TOPIC, json.dumps(chat("alice", "bob", 1)).encode(), 1, packet_id=7)
        ),
        encode(p.Publish(SERVER_TOPIC, b"{}", 2, packet_id=8)),
        encode(p.Publish("a/b", b"x", 0)),
        encode(p.Subscribe(3, (("$sktalent/clients/alice", 1), ("#", 2)))),
        encode(p.Unsubscribe(4, ("a/+",))),
        encode(p.PubAck(1)),
        encode(p.PubRec(2)),
        encode(p.PubRel(3)),
        encode(p.PingReq()),
    ]
    for _ in range(count):
        data = bytearray(rng.choice(valid))
        style = rng.randrange(5)
        if style == 0:
            data[0] = rng.randrange(256)
        elif style == 1 and len(data) > 1:
            # A remaining length that disagrees with the body.
            data[1] = rng.randrange(256)
        elif style == 2:
            data = bytearray(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 30))))
        elif style == 3:
            data[0:2] = bytes([data[0]]) + b"\xff\xff\xff\xff\x7f"
        else:
            for _ in range(rng.randrange(1, 4)):
                at = rng.randrange(2, len(data) + 1) if len(data) > 2 else len(data)
                data[at:at] = bytes([rng.randrange(256)])
        yield rng.random() < 0.8, bytes(data)


class FailureLog:
    """Log events that report a failure or an error, seen while it is watching."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: list[LogEvent] = []

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            if "log_failure" in event or event.get("log_level") in (
                LogLevel.error,
                LogLevel.critical,
            ):
                self.events.append(event)

        globalLogPublisher.addObserver(observe)
        case.addCleanup(globalLogPublisher.removeObserver, observe)

    def check(self, case: SynchronousTestCase) -> None:
        case.assertEqual([e.get("log_format") for e in self.events], [])


def strict(frame: dict[str, Any]) -> None:
    """Assert frame is a chat delivered exactly as documented."""
    assert list(frame) == ["msgid", "from", "to", "type", "payload"], frame
    assert list(frame["payload"]) == ["o_id", "expert", "content", "t"], frame
    assert _MSGID.match(frame["msgid"]), frame
    assert isinstance(frame["payload"]["expert"], bool), frame
    for value in (
        frame["from"],
        frame["to"],
        frame["payload"]["o_id"],
        frame["payload"]["content"],
    ):
        assert isinstance(value, str) and not _SURROGATE.search(value), frame


class InMemoryFuzz(CallTalentCase):
    def setUp(self) -> None:
        super().setUp()
        self.failures = FailureLog(self)
        self.h = self.harness(self.store, UNLIMITED)
        self.a, self.b = self.user("alice"), self.user("bob")
        self.pid = 0

    def answer(self, body: bytes) -> dict[str, Any]:
        """
        Publish body as alice: it must be PUBACKed and answered by one frame,
        error or sent, which is returned; the connection stays open.
        """
        self.pid = self.pid % 0xFFFF + 1
        self.publish(self.a, body, self.pid)
        self.assertFalse(self.a.closed, body)
        received = self.a.received()
        self.assertEqual(received[:1], [p.PubAck(self.pid)], body)
        [publish] = received[1:]
        assert isinstance(publish, p.Publish) and publish.packet_id is not None, publish
        self.a.send(p.PubAck(publish.packet_id))
        frame: dict[str, Any] = json.loads(publish.payload)
        self.assertIn(frame["type"], ("error", "sent"), body)
        return frame

    def delivered(self) -> list[dict[str, Any]]:
        frames = self.frames(self.b)
        for frame in frames:
            strict(frame)
        return frames

    def test_bad_envelopes(self) -> None:
        """
        4,000 malformed envelopes: each PUBACKed and answered, the connection
        never closed, no failure logged, and what reaches the recipient is
        only ever a well-formed chat.
        """
        started = time.monotonic()
        codes: dict[str, int] = {}
        rng = random.Random(SEED)
        to_bob = 0
        for body in bad_envelopes(rng, 4000):
            frame = self.answer(body)
            code = frame.get("error", "sent")
            codes[code] = codes.get(code, 0) + 1
            # A mutation may have named another valid recipient.
            to_bob += code == "sent" and json.loads(body)["to"] == "bob"
        self.assertEqual(len(self.delivered()), to_bob)
        self.failures.check(self)
        # The generator reaches every check, not only the JSON parser.
        self.assertTrue(
            {"bad_json", "bad_envelope", "bad_msgid", "bad_payload", "sent"} <= codes.keys(),
            codes,
        )
        self.assertLess(time.monotonic() - started, 60)

    def test_bad_mqtt_frames(self) -> None:
        """
        2,000 malformed MQTT frames, each on a connection of its own: some
        close it, as the protocol requires; none logs a failure.
        """
        rng = random.Random(SEED)
        closed = 0
        for after_connect, data in bad_frames(rng, 2000):
            c: Client = self.h.client()
            if after_connect:
                self.assertEqual(
                    c.connect("carol", password=sign(SECRET, "carol").encode(), username="carol")[
                        :1
                    ],
                    [p.ConnAck(0)],
                )
            c.protocol.dataReceived(data)
            closed += c.closed
            c.lose()
        self.failures.check(self)
        self.assertGreater(closed, 1000)

    @settings(
        max_examples=500,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        field=st.sampled_from(
            ["msgid", "from", "to", "type", "payload", "o_id", "expert", "content", "extra"]
        ),
        value=st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats()
            | st.text(st.characters(codec=None)),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=5), inner, max_size=3)
            ),
            max_leaves=8,
        ),
    )
    def test_any_value_in_any_field(self, field: str, value: Any) -> None:
        """Any JSON value (NaN, lone surrogates included) in any field is answered."""
        self.pid += 1
        frame = chat("alice", "bob", self.pid)
        target = frame["payload"] if field in ("o_id", "expert", "content") else frame
        target[field] = value
        self.answer(json.dumps(frame).encode())
        self.delivered()
        self.failures.check(self)


class SocketFuzz(SynchronousTestCase):
    """A bounded sample against a real server process."""

    def test_bad_input_over_a_socket(self) -> None:
        """
        600 malformed envelopes on one connection and 150 malformed frames on
        connections of their own: every envelope PUBACKed and answered, the
        connection still open, and no traceback in the server log.
        """
        server = running(self, ServerProcess(["--chat-rate", "1000000"]))
        rng = random.Random(SEED + 1)
        alice = raw_user(self, server, "alice")
        bodies = list(bad_envelopes(rng, 600))
        for start in range(0, len(bodies), 50):
            batch = bodies[start : start + 50]
            alice.send(
                *(
                    p.Publish(SERVER_TOPIC, b, 1, packet_id=start + i + 1)
                    for i, b in enumerate(batch)
                )
            )
            acks, answers = 0, 0
            while acks < len(batch) or answers < len(batch):
                packet = alice.receive()
                self.assertIsNotNone(packet, "the server closed or stopped answering")
                if isinstance(packet, p.PubAck):
                    acks += 1
                elif isinstance(packet, p.Publish):
                    answers += 1
                    assert packet.packet_id is not None
                    alice.send(p.PubAck(packet.packet_id))
                    self.assertIn(json.loads(packet.payload)["type"], ("error", "sent"))
        # Still open, and every envelope answered once.
        nothing_more(alice)

        closed = 0
        for after_connect, data in bad_frames(rng, 150):
            raw = raw_user(self, server, "carol") if after_connect else RawClient(server.mqtt_port)
            # A frame that waits for more bytes is cut short by the close.
            raw.send_bytes(data + encode_all([p.PingReq()]))
            closed += raw.closed_by_server(0.2)
            raw.close()
        self.assertGreater(closed, 50)
        log = server.log
        self.assertNotIn("Traceback", log)
        self.assertNotIn("Unhandled", log)
        self.assertEqual(server.stop(), 0)
