"""
Full queues end to end: a real server with small queue limits, a recipient
connected on a raw socket that does not read, and paho-mqtt senders.  Every
chat gets exactly one of sent or queue_full, and every chat that got sent is
delivered, in order.
"""

from __future__ import annotations

import json
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from sktalent.testing.server import ServerProcess, running

from .helpers import chat, msgid, nothing_more, paho_user, queued, raw_user
from .pahoclient import PahoUser
from .rawclient import RawClient

TOKEN = "backend-Token.1"
SERVER_TOPIC = "$sktalent/server/mqttserver"
MAX_QUEUED = 50
MAX_QUEUED_BYTES = 65536


class FullQueueEndToEnd(SynchronousTestCase):
    def setUp(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="sktalent-queue-"))
        (directory / "tokens").write_text(f"{TOKEN}\n")
        args = [
            "--max-queued",
            str(MAX_QUEUED),
            "--max-queued-bytes",
            str(MAX_QUEUED_BYTES),
            "--chat-rate",
            "1000",
            "--api-token-file",
            str(directory / "tokens"),
        ]
        self.server = running(self, ServerProcess(args, directory=directory))

    def user(self, name: str) -> PahoUser:
        return paho_user(self, self.server, name)

    def silent(self, name: str) -> RawClient:
        """name connected on a socket that reads nothing until the test says so."""
        return raw_user(self, self.server, name)

    def send_chats(self, sender: PahoUser, frames: list[dict[str, Any]]) -> list[str]:
        """Each chat's one answer, sent or the error code, in the order sent."""
        for frame in frames:
            sender.send(frame)
        answers: dict[str, str] = {}
        for answer in sender.frames(len(frames)):
            self.assertNotIn(answer["msgid"], answers)
            answers[answer["msgid"]] = answer.get("error", answer["type"])
        nothing_more(sender)
        return [answers[str(frame["msgid"])] for frame in frames]

    def notify(self, to: str) -> tuple[int, dict[str, Any]]:
        body = {"to": to, "type": "feedback", "payload": {"content": "谢谢"}}
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.server.api_port}/v1/notifications",
            json.dumps(body).encode(),
            {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def test_slow_reader(self) -> None:
        """
        bob is connected but does not read while alice sends 2.4 times his
        queue: the first 50 chats get sent, the rest queue_full, and a
        notification 429.  Then bob reads: exactly the 50 chats that got sent,
        in order; a refused chat sent again is now taken and delivered, and
        so is a notification.
        """
        bob = self.silent("bob")
        alice = self.user("alice")
        count = MAX_QUEUED * 12 // 5
        answers = self.send_chats(alice, [chat("alice", "bob", n) for n in range(1, count + 1)])
        self.assertEqual(answers, ["sent"] * MAX_QUEUED + ["queue_full"] * (count - MAX_QUEUED))
        status, answer = self.notify("bob")
        self.assertEqual((status, answer["error"]), (429, "queue_full"))
        self.assertIsInstance(answer["message"], str)
        delivered = queued(bob)
        self.assertEqual(
            [f["msgid"] for f in delivered], [msgid(n) for n in range(1, MAX_QUEUED + 1)]
        )
        self.assertEqual(self.send_chats(alice, [chat("alice", "bob", count)]), ["sent"])
        self.assertEqual(self.notify("bob")[0], 202)
        again = queued(bob)
        self.assertEqual([f["from"] for f in again], ["alice", "system"])
        self.assertEqual(again[0]["msgid"], msgid(count))

    def test_race_for_the_last_place(self) -> None:
        """
        With one place left in carol's queue, alice and dave send a chat at
        the same time: one gets sent, the other queue_full, and carol gets
        every chat that got sent.
        """
        carol = self.silent("carol")
        alice, dave = self.user("alice"), self.user("dave")
        frames = [chat("alice", "carol", n) for n in range(1, MAX_QUEUED)]
        self.assertEqual(self.send_chats(alice, frames), ["sent"] * (MAX_QUEUED - 1))
        racing = [
            (alice, chat("alice", "carol", 1000)),
            (dave, chat("dave", "carol", 2000)),
        ]
        infos = [u.client.publish(SERVER_TOPIC, json.dumps(f), 1) for u, f in racing]
        for info in infos:
            info.wait_for_publish(10)
        answers = [u.frames(1)[0] for u, _ in racing]
        codes = sorted(a.get("error", a["type"]) for a in answers)
        self.assertEqual(codes, ["queue_full", "sent"])
        winner = next(f for (_, f), a in zip(racing, answers, strict=True) if a["type"] == "sent")
        delivered = [f["msgid"] for f in queued(carol)]
        self.assertEqual(delivered, [msgid(n) for n in range(1, MAX_QUEUED)] + [winner["msgid"]])

    def test_byte_bound_across_restart(self) -> None:
        """
        Large chats fill erin's queue by bytes long before its count; the
        bound still holds after a restart, and what got sent is delivered.
        """
        self.silent("erin").close()
        alice = self.user("alice")
        content = "长" * 1000
        frames = [chat("alice", "erin", n, content) for n in range(1, 31)]
        answers = self.send_chats(alice, frames)
        kept = answers.count("sent")
        self.assertEqual(answers, ["sent"] * kept + ["queue_full"] * (30 - kept))
        # As delivered: compact JSON with t, a 13-digit time, added.
        as_delivered = dict(frames[0], payload=dict(frames[0]["payload"], t="0" * 13))
        size = len(json.dumps(as_delivered, ensure_ascii=False, separators=(",", ":")).encode())
        self.assertEqual(kept, MAX_QUEUED_BYTES // size)
        alice.close()
        self.server.stop()
        self.server = self.server.restarted()
        self.addCleanup(self.server.stop)
        alice = self.user("alice")
        self.assertEqual(
            self.send_chats(alice, [chat("alice", "erin", 31, content)]), ["queue_full"]
        )
        delivered = queued(self.silent("erin"))
        self.assertEqual([f["msgid"] for f in delivered], [msgid(n) for n in range(1, kept + 1)])
