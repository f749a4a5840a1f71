"""
The MongoDB store driven past what it can commit (FerretDB commits about a
hundred chats a second): the server slows its clients down instead of
failing them, /healthz keeps saying the store answers, and once the load
stops it commits again within 30 s, with every acknowledged chat delivered.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from sktalent.authsign import sign
from sktalent.calltalent.rules import SERVER_TOPIC
from sktalent.mqtt import packets as p
from sktalent.testing.server import ServerProcess, running

from .helpers import chat, mongo_store, paho_user
from .rawclient import RawClient

PAIRS, WINDOW, LOAD_SECONDS = 10, 32, 20.0


class Sender:
    """
    A user on a raw connection keeping WINDOW chats unanswered by ``sent``;
    ``acked`` holds the msgid of every chat answered ``sent``, ``refused``
    every other answer.
    """

    def __init__(self, server: ServerProcess, index: int) -> None:
        self.index = index
        self.user = f"load-a{index}"
        self.raw = RawClient(server.mqtt_port)
        connack = self.raw.connect(self.user, password=sign(server.secret, self.user).encode())
        assert connack.return_code == p.ACCEPTED, connack
        self.sent = 0
        self.acked: set[str] = set()
        self.refused: list[dict[str, Any]] = []

    def load(self, until: float, answers_by: float) -> None:
        """
        Send until the monotonic time until, then wait until answers_by for
        the answers to what is still unanswered.
        """
        while time.monotonic() < answers_by:
            unanswered = self.sent - len(self.acked) - len(self.refused)
            if time.monotonic() >= until and not unanswered:
                return
            if time.monotonic() < until and unanswered < WINDOW:
                frame = chat(self.user, f"load-b{self.index}", self.sent, "x" * 40)
                self.sent += 1
                payload = json.dumps(frame).encode()
                self.raw.send(p.Publish(SERVER_TOPIC, payload, 1, packet_id=self.sent % 0xFFFF + 1))
                continue
            packet = self.raw.receive(0.2)
            if isinstance(packet, p.Publish):
                if packet.packet_id is not None:
                    self.raw.send(p.PubAck(packet.packet_id))
                answer = json.loads(packet.payload)
                if answer.get("type") == "sent":
                    self.acked.add(answer["msgid"])
                else:
                    self.refused.append(answer)


class MongoOverloadTests(SynchronousTestCase):
    def test_overload_then_recovery(self) -> None:
        """
        Ten pairs, each sender keeping 32 chats unanswered, for 20 s against
        FerretDB: no chat is refused and no client dropped, /healthz answers
        200 throughout; after the load stops a new chat is answered ``sent``
        within 30 s, and every chat answered ``sent`` reaches its recipient.
        """
        server = running(self, ServerProcess(["--chat-rate", "1000000"], store=mongo_store()))
        recipients = [paho_user(self, server, f"load-b{i}") for i in range(PAIRS)]
        senders = [Sender(server, i) for i in range(PAIRS)]
        for sender in senders:
            self.addCleanup(sender.raw.close)

        until = time.monotonic() + LOAD_SECONDS
        threads = [
            threading.Thread(target=s.load, args=(until, until + 90), daemon=True) for s in senders
        ]
        for thread in threads:
            thread.start()
        health = []
        while time.monotonic() < until:
            health.append(server.api("/healthz")[0])
            time.sleep(1)
        stopped = time.monotonic()

        probe = paho_user(self, server, "probe-a")
        probe.client.publish(SERVER_TOPIC, json.dumps(chat("probe-a", "probe-b", 0)), 1)
        [answer] = probe.frames(1, timeout=max(0.0, stopped + 30 - time.monotonic()))
        self.assertEqual(answer["type"], "sent", answer)

        # What the senders had in flight is answered too, all of it ``sent``.
        for thread in threads:
            thread.join(100)
        self.assertEqual([len(s.acked) for s in senders], [s.sent for s in senders])
        self.assertEqual([s.refused for s in senders], [[]] * PAIRS)
        self.assertTrue(all(u.client.is_connected() for u in recipients))
        self.assertEqual(set(health), {200}, health)

        for i, recipient in enumerate(recipients):
            delivered = {f["msgid"] for f in recipient.frames(len(senders[i].acked), 60)}
            self.assertEqual(delivered, senders[i].acked)
        self.assertNotIn("unavailable", server.log)
