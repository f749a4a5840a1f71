"""
CallTalent end to end: a real server process and real paho-mqtt clients.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

from sktalent.authsign import sign

from .pahoclient import PahoUser
from .server import ROOT, ServerProcess, running


def msgid(n: int) -> str:
    return f"{n:024x}"


def chat(sender: str, to: str, n: int, content: str = "hi") -> dict[str, object]:
    return {
        "msgid": msgid(n),
        "from": sender,
        "to": to,
        "type": "order_chat",
        "payload": {"o_id": "o-1", "expert": False, "content": content},
    }


class CallTalentEndToEnd(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = running(self, ServerProcess())

    def user(
        self, name: str, auth: str | None = None, client_id: str | None = None, clean: bool = False
    ) -> PahoUser:
        password = auth if auth is not None else sign(self.server.secret, name)
        u = PahoUser(self.server.mqtt_port, client_id or name, name, password, clean)
        self.addCleanup(u.close)
        return u

    def test_connack_codes(self) -> None:
        """Wrong and expired authSigns get 4, clientid != username 2, valid 0."""
        secret = self.server.secret
        self.assertEqual(self.user("a", auth=sign(b"wrong", "a")).rc, 4)
        self.assertEqual(self.user("a", auth=sign(secret, "a", int(time.time()) - 5)).rc, 4)
        self.assertEqual(self.user("a", client_id="b").rc, 2)
        ok = self.user("a", auth=sign(secret, "a", int(time.time()) + 600))
        self.assertEqual(ok.rc, 0)

    def test_cli_mints_valid_sign(self) -> None:
        """The authsign command prints a sign the server accepts."""
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "sktalent.authsign",
                "--secret-file",
                str(self.server.directory / "sktalent.secret"),
                "carol",
                "--ttl",
                "60",
            ],
            capture_output=True,
            check=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        ).stdout.strip()
        self.assertEqual(self.user("carol", auth=out).rc, 0)

    def test_subscribe_rules(self) -> None:
        """Other users' topics and # get 0x80; the own topic QoS 1."""
        a = self.user("alice")
        self.assertEqual(a.subscribe("$sktalent/clients/bob", 1), [0x80])
        self.assertEqual(a.subscribe("#", 0), [0x80])
        self.assertEqual(a.subscribe("$sktalent/clients/alice", 2), [1])

    def test_chat_round_trip(self) -> None:
        """Chat reaches B with t added; A gets sent; B's received reaches A."""
        a, b = self.user("alice"), self.user("bob")
        a.send(chat("alice", "bob", 1, "你好"))
        self.assertEqual(a.frames(1), [{"msgid": msgid(1), "type": "sent"}])
        [delivered] = b.frames(1)
        t = delivered["payload"].pop("t")
        self.assertTrue(t.isdigit())
        self.assertEqual(delivered, chat("alice", "bob", 1, "你好"))
        b.send({"msgid": msgid(1), "from": "bob", "to": "alice", "type": "received"})
        self.assertEqual(a.frames(1), [{"msgid": msgid(1), "type": "received"}])
        # A retransmission is confirmed again but not delivered again.
        a.send(chat("alice", "bob", 1, "你好"))
        self.assertEqual(a.frames(1), [{"msgid": msgid(1), "type": "sent"}])
        self.assertTrue(b.nothing_more())

    def test_refusals(self) -> None:
        """Each bad message gets its error code and nothing is forwarded."""
        a, b = self.user("alice"), self.user("bob")
        bad_msgid = chat("alice", "bob", 2)
        bad_msgid["msgid"] = "xyz"
        system = chat("alice", "bob", 3)
        system["type"] = "order"
        no_payload = chat("alice", "bob", 4)
        del no_payload["payload"]
        cases = [
            (chat("mallory", "bob", 1), "from_mismatch"),
            (bad_msgid, "bad_msgid"),
            (system, "unknown_type"),
            (no_payload, "bad_payload"),
        ]
        for frame, code in cases:
            a.send(frame)
            [error] = a.frames(1)
            self.assertEqual((error["type"], error["error"]), ("error", code))
        a.publish("$sktalent/server/mqttserver", b"{not json")
        self.assertEqual(a.frames(1)[0]["error"], "bad_json")
        self.assertTrue(b.nothing_more())

    def test_offline_in_order(self) -> None:
        """Chat sent while B is offline arrives in order at B's reconnect."""
        b = self.user("bob")
        b.close()
        a = self.user("alice")
        for n in range(1, 21):
            a.send(chat("alice", "bob", n, f"m{n}"))
        self.assertEqual(len(a.frames(20)), 20)
        again = self.user("bob")
        self.assertTrue(again.session_present)
        contents = [f["payload"]["content"] for f in again.frames(20)]
        self.assertEqual(contents, [f"m{n}" for n in range(1, 21)])

    def test_takeover(self) -> None:
        """A second login with the same userID takes the session over."""
        first = self.user("bob")
        second = self.user("bob")
        self.assertTrue(second.session_present)
        first.wait_closed()
        self.user("alice").send(chat("alice", "bob", 1))
        self.assertEqual(len(second.frames(1)), 1)
