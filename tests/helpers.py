"""
What many test modules need alike: what clients send, users logged in to
a server process and its metrics, the proof that nothing more is on its
way to a user, and a test's own files, ports and MongoDB database.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from sktalent.authsign import sign
from sktalent.calltalent.rules import SERVER_TOPIC
from sktalent.mqtt import packets as p
from sktalent.testing.server import ServerProcess

from .pahoclient import PahoUser
from .rawclient import RawClient

# -- what clients send and the server pushes --------------------------------


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


# INTERFACE section 8: a notification sent without an alert, and its push text.
DEFAULT_PUSH_TEXTS: list[tuple[str, dict[str, str], str]] = [
    ("order", {"status": "pending", "o_id": "o1"}, "订单提出，待专家确认"),
    ("order", {"status": "confirmed", "o_id": "o1"}, "专家已确认，待用户支付"),
    ("order", {"status": "rejected", "o_id": "o1"}, "专家已拒绝"),
    ("order", {"status": "paid", "o_id": "o1"}, "用户已支付，可以沟通"),
    ("order", {"status": "toBeFinished", "o_id": "o1"}, "专家已确认完成，待用户评价"),
    ("order", {"status": "finished", "o_id": "o1"}, "用户已评价"),
    ("note", {"status": "paid", "note_id": "n1"}, "小纸条提出，待专家回答"),
    ("note", {"status": "replied", "note_id": "n1"}, "专家已回答"),
    ("feedback", {"content": "已修复，谢谢"}, "客服回复了您的意见反馈：已修复，谢谢"),
    ("expert", {"status": "verified", "content": "apply"}, "专家资格审核成功"),
    ("expert", {"status": "fail", "content": "证书不清晰"}, "专家资格审核失败：证书不清晰"),
]


# -- a server process's users and metrics -----------------------------------


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


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    """A sample of the server's /metrics; 0 when it is not there."""
    status, body = server.api("/metrics")
    assert status == 200, body
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


# -- nothing more on its way ------------------------------------------------

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


# -- a test's own resources -------------------------------------------------


def temp_file(case: SynchronousTestCase, content: str | bytes) -> str:
    """The path of a new file of case's holding content (str as UTF-8)."""
    path = case.mktemp()
    with open(path, "wb") as f:
        f.write(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def port_taken(case: SynchronousTestCase) -> int:
    """A port of 127.0.0.1 that the test listens on until it ends."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    case.addCleanup(taken.close)
    return int(taken.getsockname()[1])


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


def with_database(uri: str, database: str) -> str:
    """uri naming database instead of its own."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(path="/" + database))


async def eventually(condition: Callable[[], bool], what: str = "the condition") -> None:
    """Wait on the reactor, at most 5 seconds, until condition holds."""
    for _ in range(500):
        if condition():
            return
        await deferLater(reactor, 0.01)
    raise AssertionError(f"{what} never held")
