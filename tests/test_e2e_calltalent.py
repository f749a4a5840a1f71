"""
CallTalent end to end: a real server process and real paho-mqtt clients.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from sktalent.authsign import sign
from sktalent.calltalent.rules import SERVER_TOPIC
from sktalent.mqtt import packets as p
from sktalent.testing.server import ROOT, ServerProcess, running

from .helpers import chat, msgid, nothing_more, paho_user, raw_user
from .pahoclient import PahoUser


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
        nothing_more(b)

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
        nothing_more(b)

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

    def test_bad_text_answered_on_an_open_connection(self) -> None:
        """
        A lone surrogate (raw bytes or a JSON escape) in any field, NaN and
        Infinity get PUBACK and bad_json; the connection stays open and
        nothing reaches the recipient.
        """
        a, b = self.user("alice"), self.user("bob")
        text = json.dumps(chat("alice", "bob", 1, "X"))
        bodies = [
            text.encode().replace(b"X", b"\xed\xa0\x80"),
            text.replace("X", "\\ud800").encode(),
            text.replace('"o1"', '"\\udc00"').encode(),
            text.replace('"00000', '"\\ud83d0').encode(),
            text.replace("false", "NaN").encode(),
            text.replace("false", "-Infinity").encode(),
            text.replace("}}", '}, "alert": Infinity}').encode(),
        ]
        for body in bodies:
            a.publish(SERVER_TOPIC, body)
            [error] = a.frames(1)
            self.assertEqual(error["error"], "bad_json", body)
        self.assertTrue(a.client.is_connected())
        a.send(chat("alice", "bob", 2))
        self.assertEqual(a.frames(1), [{"msgid": msgid(2), "type": "sent"}])
        self.assertEqual(b.frames(1)[0]["msgid"], msgid(2))
        self.assertNotIn("Traceback", self.server.log)

    def test_only_documented_fields_forwarded(self) -> None:
        """Unknown fields, at the top or in the payload, never reach the recipient."""
        a, b = self.user("alice"), self.user("bob")
        frame = chat("alice", "bob", 1)
        frame |= {"alert": "x", "from_name": "system"}
        frame["payload"] |= {"url": "javascript:alert(1)"}
        a.send(frame)
        [delivered] = b.frames(1)
        self.assertEqual(list(delivered), ["msgid", "from", "to", "type", "payload"])
        self.assertEqual(list(delivered["payload"]), ["o_id", "expert", "content", "t"])

    def test_duplicate_msgid(self) -> None:
        """
        A msgid reused for another recipient or other content gets
        duplicate_msgid and reaches nobody; a true retransmission gets sent
        and is not delivered again.
        """
        a, b, c = self.user("alice"), self.user("bob"), self.user("carol")
        a.send(chat("alice", "bob", 1, "first"))
        self.assertEqual(a.frames(1), [{"msgid": msgid(1), "type": "sent"}])
        self.assertEqual(len(b.frames(1)), 1)
        for frame in (chat("alice", "carol", 1, "first"), chat("alice", "bob", 1, "other")):
            a.send(frame)
            [error] = a.frames(1)
            self.assertEqual((error["msgid"], error["error"]), (msgid(1), "duplicate_msgid"))
        a.send(chat("alice", "bob", 1, "first"))
        self.assertEqual(a.frames(1), [{"msgid": msgid(1), "type": "sent"}])
        nothing_more(b)
        nothing_more(c)

    def test_upper_case_msgid(self) -> None:
        """
        An upper-case msgid is accepted as its lower-case form: delivered in
        lower case, deduplicated and matched by `received` in either case.
        """
        a, b = self.user("alice"), self.user("bob")
        upper = "5F1D7C3A9B2E4D6F8A0B1C2D"
        frame = dict(chat("alice", "bob", 1), msgid=upper)
        a.send(frame)
        self.assertEqual(a.frames(1), [{"msgid": upper, "type": "sent"}])
        self.assertEqual(b.frames(1)[0]["msgid"], upper.lower())
        a.send(dict(frame, msgid=upper.lower()))
        self.assertEqual(a.frames(1), [{"msgid": upper.lower(), "type": "sent"}])
        b.send({"msgid": upper, "from": "bob", "to": "alice", "type": "received"})
        self.assertEqual(a.frames(1), [{"msgid": upper.lower(), "type": "received"}])
        nothing_more(b)

    def test_receipts_have_their_own_bucket(self) -> None:
        """A chat page confirming 90 messages at once gets every receipt through."""
        senders = [self.user(f"s{n}") for n in range(3)]
        for s, sender in enumerate(senders):
            for n in range(30):
                sender.send(chat(f"s{s}", "bob", n))
            self.assertEqual(len(sender.frames(30)), 30)
        b = raw_user(self, self.server, "bob")
        receipts = []
        for _ in range(90):
            delivered = b.expect(p.Publish)
            assert delivered.packet_id is not None
            b.send(p.PubAck(delivered.packet_id))
            frame = json.loads(delivered.payload)
            receipt = {"msgid": frame["msgid"], "from": "bob", "to": frame["from"]}
            receipts.append(json.dumps(receipt | {"type": "received"}).encode())
        b.send(*(p.Publish(SERVER_TOPIC, r, 1, packet_id=n + 1) for n, r in enumerate(receipts)))
        self.assertEqual([b.expect(p.PubAck).packet_id for _ in receipts], list(range(1, 91)))
        for sender in senders:
            self.assertEqual({f["type"] for f in sender.frames(30)}, {"received"})
        nothing_more(b)


def refusals(server: ServerProcess) -> dict[str, float]:
    """The server's refusal counters by code, from /metrics."""
    status, body = server.api("/metrics")
    assert status == 200, status
    return {
        sample.labels["code"]: sample.value
        for family in text_string_to_metric_families(body.decode())
        if family.name == "sktalent_refusals"
        for sample in family.samples
        if sample.name == "sktalent_refusals_total"
    }


class RateEndToEnd(SynchronousTestCase):
    def test_flood_of_invalid_messages(self) -> None:
        """
        A client flooding invalid messages gets every one PUBACKed, its burst
        answered, then at most one rate_limited frame a second; the rest are
        counted in the metrics, neither stored nor logged one by one.
        """
        server = running(self, ServerProcess(["--chat-rate", "2"]))
        alice = raw_user(self, server, "alice")
        flood = 1000
        started = time.monotonic()
        alice.send(*(p.Publish(SERVER_TOPIC, b"{", 1, packet_id=n) for n in range(1, flood + 1)))
        acks, errors = 0, []
        while acks < flood:
            packet = alice.receive()
            if isinstance(packet, p.PubAck):
                acks += 1
            elif isinstance(packet, p.Publish):
                assert packet.packet_id is not None
                alice.send(p.PubAck(packet.packet_id))
                errors.append(json.loads(packet.payload)["error"])
            else:
                self.fail(f"the flood ended in {packet!r}")
        elapsed = time.monotonic() - started
        # alice is over her rate, so the probe behind her errors is bob's chat.
        paho_user(self, server, "bob").send(chat("bob", "alice", 1))
        rest = alice.until(
            lambda packet: (
                isinstance(packet, p.Publish) and json.loads(packet.payload)["msgid"] == msgid(1)
            ),
            acknowledge=True,
        )
        for packet in rest:
            assert isinstance(packet, p.Publish), packet
            errors.append(json.loads(packet.payload)["error"])
        # A burst of 6, 2 a second after it, and a warning a second.
        self.assertEqual(errors[:7], ["bad_json"] * 6 + ["rate_limited"])
        self.assertLessEqual(len(errors), 7 + 3 * (elapsed + 1), errors)
        counted = refusals(server)
        self.assertEqual(counted["bad_json"] + counted["rate_limited"], flood)
        self.assertLessEqual(server.log.count("Refused a message"), len(errors))
        self.assertNotIn("Traceback", server.log)
