"""
What many test modules build the same way: msgids, chat envelopes, users
logged in, the proof that nothing more is on its way to one, and a MongoDB
database of a test's own.
"""

from __future__ import annotations

import itertools
import json
import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from sktalent.authsign import sign
from sktalent.calltalent.rules import SERVER_TOPIC
from sktalent.mqtt import packets as p
from sktalent.testing.server import ServerProcess

from .pahoclient import PahoUser
from .rawclient import RawClient


def msgid(n: int) -> str:
    """The nth msgid: 24 hex characters, as clients write them."""
    return f"{n:024x}"


def chat(
    sender: str,
    to: str,
    n: int,
    content: str | None = None,
    *,
    o_id: str = "o1",
    expert: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """
    An order_chat envelope with msgid(n), its content m<n> unless given;
    extra goes into the payload.
    """
    return {
        "msgid": msgid(n),
        "from": sender,
        "to": to,
        "type": "order_chat",
        "payload": {
            "o_id": o_id,
            "expert": expert,
            "content": f"m{n}" if content is None else content,
            **extra,
        },
    }


def with_database(uri: str, database: str) -> str:
    """uri naming database instead of its own."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(path="/" + database))


def mongo_store() -> str:
    """
    The URI of a fresh database on the test MongoDB server
    (SKTALENT_TEST_MONGO_URI); the test is skipped without one, except in
    CI, where it must run.
    """
    uri = os.environ.get("SKTALENT_TEST_MONGO_URI")
    if not uri:
        if os.environ.get("CI") == "true":
            raise AssertionError("CI=true but SKTALENT_TEST_MONGO_URI is unset: run .ci/ferretdb")
        raise SkipTest('SKTALENT_TEST_MONGO_URI is unset (eval "$(.ci/ferretdb)" to set it)')
    return with_database(uri, f"sktalent_test_{uuid.uuid4().hex[:12]}")


def paho_user(case: SynchronousTestCase, server: ServerProcess, user: str) -> PahoUser:
    """user logged in with its authSign on a paho client, closed at the end."""
    client = PahoUser(server.mqtt_port, user, user, sign(server.secret, user))
    case.addCleanup(client.close)
    case.assertEqual(client.rc, 0)
    return client


def raw_user(
    case: SynchronousTestCase, server: ServerProcess, user: str, expect: int = 0
) -> RawClient:
    """
    user logging in with its authSign and its session kept, on a raw
    connection that reads and acknowledges only when told; expect is the
    CONNACK's return code.
    """
    client = RawClient(server.mqtt_port)
    case.addCleanup(client.close)
    connack = client.connect(user, clean=False, password=sign(server.secret, user).encode())
    case.assertEqual(connack.return_code, expect)
    return client


# The msgids of probes: far from those tests give their own.
_probes = itertools.count(0xF0_0000_0000)


def _send_probe(user: PahoUser | RawClient) -> Callable[[bytes | bytearray], bool]:
    """
    Have user send a bare envelope, which the server refuses: its error
    frame is queued for user behind everything already on its way, as
    every frame to user is.  Whether a frame is that error.
    """
    probe = msgid(next(_probes))
    body = json.dumps({"msgid": probe}).encode()
    if isinstance(user, RawClient):
        # QoS 0: no PUBACK to stand between the frames.
        user.send(p.Publish(SERVER_TOPIC, body))
    else:
        user.publish(SERVER_TOPIC, body)

    def is_probe(payload: bytes | bytearray) -> bool:
        frame = json.loads(payload)
        return bool(frame["msgid"] == probe and frame["type"] == "error")

    return is_probe


def nothing_more(user: PahoUser | RawClient) -> None:
    """
    Prove that nothing more is on its way to user, logged in: the answer
    to a probe it sends must be the next frame it receives.
    """
    is_probe = _send_probe(user)
    before: Sequence[object]
    if isinstance(user, RawClient):
        before = user.until(
            lambda packet: isinstance(packet, p.Publish) and is_probe(packet.payload),
            acknowledge=True,
        )
    else:
        before = [m.payload for m in user.until(lambda m: is_probe(m.payload))]
    if before:
        raise AssertionError(f"received before the probe's answer: {before!r}")


def queued(user: RawClient) -> list[dict[str, Any]]:
    """
    The frames on their way to user, logged in, each acknowledged as it
    comes: all those before the answer to a probe it sends.
    """
    is_probe = _send_probe(user)
    before = user.until(
        lambda packet: isinstance(packet, p.Publish) and is_probe(packet.payload),
        acknowledge=True,
    )
    frames = []
    for packet in before:
        assert isinstance(packet, p.Publish), packet
        frames.append(json.loads(packet.payload))
    return frames
