"""
The security rules end to end, against a real server process: wills and
retained messages cannot bypass the topic rules, retained messages of a
plain broker are bounded, "system" is reserved, and every CONNECT gets a
CONNACK; on each store the rule involves.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
import tempfile
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from twisted.trial.unittest import SynchronousTestCase

from sktalent.authsign import sign
from sktalent.mqtt import packets as p
from sktalent.testing.server import ServerProcess, running, wait_for

from .helpers import metric, mongo_store, nothing_more, paho_user
from .pahoclient import PahoUser
from .rawclient import RawClient

SERVER_TOPIC = "$sktalent/server/mqttserver"
BOB_TOPIC = "$sktalent/clients/bob"
TOKEN = "backend-token"
FORGED = json.dumps(
    {
        "msgid": "5f1d7c3a9b2e4d6f8a0b1c2d",
        "from": "system",
        "to": "bob",
        "type": "order",
        "payload": {"status": "paid", "o_id": "o-1"},
    }
).encode()
CHAT = {
    "msgid": "5f1d7c3a9b2e4d6f8a0b1c2e",
    "from": "alice",
    "to": "bob",
    "type": "order_chat",
    "payload": {"o_id": "o-1", "expert": False, "content": "hi"},
}


def hmac_hex(secret: bytes, message: str) -> str:
    """An HMAC-SHA256 as anyone holding the secret could compute it."""
    return hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()


if TYPE_CHECKING:
    _Mixin = SynchronousTestCase
else:
    _Mixin = object


class StoreMixin(_Mixin):
    """
    The store a test's server uses: a subclass (also a trial TestCase)
    chooses it.
    """

    def store(self) -> str | None:
        raise NotImplementedError

    @property
    def durable(self) -> bool:
        return self.store() != "memory:"

    def paho(self, server: ServerProcess, client_id: str, auth: bool = True) -> PahoUser:
        """A connected paho client, with its authSign unless the server is anonymous."""
        if auth:
            return paho_user(self, server, client_id)
        user = PahoUser(server.mqtt_port, client_id, clean=True)
        self.addCleanup(user.close)
        self.assertEqual(user.rc, 0)
        return user

    def raw(self, server: ServerProcess) -> RawClient:
        client = RawClient(server.mqtt_port)
        self.addCleanup(client.close)
        return client

    def dropped(self, client: RawClient, server: ServerProcess, connections: int) -> None:
        """Drop client's socket and wait until the server has seen it go."""
        client.close()
        wait_for(
            lambda: metric(server, "sktalent_connections") == connections,
            what="the server to see the connection go",
        )


class CallTalentWillMixin(StoreMixin):
    """
    In CallTalent mode no will is published and nothing is retained.
    """

    def setUp(self) -> None:
        self.server = running(self, ServerProcess(store=self.store()))

    def stored_retained_after_restart(self) -> str:
        """Restart on the same store; the log line counting what was restored."""
        self.server.stop()
        again = self.server.restarted()
        self.addCleanup(again.stop)
        self.server = again
        return wait_for(
            lambda: next((x for x in again.log.splitlines()[::-1] if "Restored" in x), ""),
            what="the restore log line",
        )

    def test_forged_system_will(self) -> None:
        """
        The attack: mallory connects with a retained QoS 1 will on bob's
        topic whose payload is a forged notification from "system", and
        drops its socket.  Bob receives nothing, live, at a SUBSCRIBE to his
        topic or at his next connection; nothing is retained, across a
        restart either; the will is counted.
        """
        bob = self.paho(self.server, "bob")
        mallory = self.raw(self.server)
        will = p.Will(BOB_TOPIC, FORGED, 1, retain=True)
        password = sign(self.server.secret, "mallory").encode()
        connack = mallory.connect(
            "mallory", clean=False, will=will, username="mallory", password=password
        )
        self.assertEqual(connack, p.ConnAck(0))
        self.dropped(mallory, self.server, 1)
        nothing_more(bob)
        self.assertEqual(bob.subscribe(BOB_TOPIC, 1), [1])
        nothing_more(bob)
        bob.close()
        again = self.paho(self.server, "bob")
        self.assertTrue(again.session_present)
        nothing_more(again)
        self.assertEqual(
            metric(self.server, "sktalent_dropped_total", reason="will_not_allowed"), 1
        )
        if self.durable:
            again.close()
            self.assertIn("Restored 0 retained messages", self.stored_retained_after_restart())

    def test_retained_publish_not_retained(self) -> None:
        """
        A chat published with the retain flag reaches bob without it, and is
        not retained: bob's SUBSCRIBE brings nothing more.
        """
        alice, bob = self.paho(self.server, "alice"), self.paho(self.server, "bob")
        alice.publish(SERVER_TOPIC, json.dumps(CHAT), 1, retain=True)
        [delivered] = bob.take(1)
        self.assertEqual(json.loads(delivered.payload)["msgid"], CHAT["msgid"])
        self.assertFalse(delivered.retain)
        self.assertEqual(bob.subscribe(BOB_TOPIC, 1), [1])
        nothing_more(bob)
        if self.durable:
            alice.close()
            bob.close()
            self.assertIn("Restored 0 retained messages", self.stored_retained_after_restart())


class AnonymousRetainedMixin(StoreMixin):
    """
    A plain broker retains at most --max-retained messages of at most
    --max-retained-bytes together.
    """

    def test_bounded(self) -> None:
        """
        With room for 5 messages or 3,000 bytes: publishes past the count
        or the bytes, and retained wills, are delivered but not retained,
        counted, and logged once per episode; replacing and clearing still
        work, and clearing makes room.  The store holds what a new
        subscriber receives, also after a restart.
        """
        args = ["--anonymous", "--max-retained", "5", "--max-retained-bytes", "3000"]
        server = running(self, ServerProcess(args, store=self.store()))
        publisher = self.paho(server, "publisher", auth=False)
        for n in range(8):
            publisher.publish(f"bound/{n}", b"x" * 100, 1, retain=True)
        publisher.publish("bound/0", b"y" * 200, 1, retain=True)
        publisher.publish("bound/1", b"", 1, retain=True)
        # 4 kept of 528 bytes: 2,507 more would pass 3,000.
        publisher.publish("bound/8", b"z" * 2500, 1, retain=True)
        publisher.publish("bound/9", b"x" * 100, 1, retain=True)
        publisher.publish("bound/10", b"x" * 100, 1, retain=True)
        willing = self.raw(server)
        will = p.Will("bound/11", b"x", 1, retain=True)
        self.assertEqual(willing.connect("willing", will=will), p.ConnAck(0))
        self.dropped(willing, server, 1)

        expected = {f"bound/{n}": b"x" * 100 for n in (2, 3, 4, 9)}
        expected["bound/0"] = b"y" * 200
        self.assertEqual(self.retained(server), expected)
        self.assertEqual(metric(server, "sktalent_dropped_total", reason="retained_limit"), 6)
        self.assertEqual(server.log.count("Retained messages at their limits"), 2)
        self.assertNotIn("Traceback", server.log)
        if self.store() is None:
            with sqlite3.connect(server.directory / "store.sqlite3") as db:
                count, size = db.execute(
                    "SELECT count(*), sum(length(CAST(topic AS BLOB)) + length(payload))"
                    " FROM retained"
                ).fetchone()
            self.assertEqual((count, size), (5, sum(len(k) + len(v) for k, v in expected.items())))
        if self.durable:
            publisher.close()
            server.stop()
            again = server.restarted()
            self.addCleanup(again.stop)
            self.assertEqual(self.retained(again), expected)

    def retained(self, server: ServerProcess) -> dict[str, bytes]:
        """What a new subscriber to bound/# receives as retained."""
        subscriber = self.paho(server, "subscriber", auth=False)
        self.assertEqual(subscriber.subscribe("bound/#", 1), [1])
        got = {}
        for message in subscriber.probe("bound/probe"):
            self.assertTrue(message.retain)
            got[message.topic] = bytes(message.payload)
        subscriber.close()
        return got


class MemoryCallTalentWillTests(CallTalentWillMixin, SynchronousTestCase):
    def store(self) -> str | None:
        return "memory:"


class SQLiteCallTalentWillTests(CallTalentWillMixin, SynchronousTestCase):
    def store(self) -> str | None:
        return None  # The embedded default.


class MongoCallTalentWillTests(CallTalentWillMixin, SynchronousTestCase):
    def store(self) -> str | None:
        return self._mongo

    def setUp(self) -> None:
        self._mongo = mongo_store()
        super().setUp()


class MemoryAnonymousRetainedTests(AnonymousRetainedMixin, SynchronousTestCase):
    def store(self) -> str | None:
        return "memory:"


class SQLiteAnonymousRetainedTests(AnonymousRetainedMixin, SynchronousTestCase):
    def store(self) -> str | None:
        return None


class MongoAnonymousRetainedTests(AnonymousRetainedMixin, SynchronousTestCase):
    def store(self) -> str | None:
        return self._mongo

    def setUp(self) -> None:
        self._mongo = mongo_store()
        super().setUp()


class ConnectTests(SynchronousTestCase):
    """
    Every CONNECT gets a CONNACK: 4 without credentials, 2 for an unusable
    userID; and the two forms of authSign cannot stand in for each other.
    """

    def setUp(self) -> None:
        self.server = running(self, ServerProcess())

    def connack(self, client_id: str, username: str | None, password: bytes | None) -> p.ConnAck:
        client = RawClient(self.server.mqtt_port)
        self.addCleanup(client.close)
        connack = client.connect(client_id, clean=False, username=username, password=password)
        if connack.return_code:
            self.assertTrue(client.closed_by_server())
        return connack

    def test_connack_codes(self) -> None:
        """
        No username, or a username without password, gets CONNACK 4, with
        no traceback logged; "system" and a userID holding ":" get 2 even
        with the HMAC of them under the secret; the plain sign of
        "alice:4102444800" is not alice's expiring sign; each refusal is
        counted.
        """
        secret = self.server.secret
        swapped = f"4102444800:{hmac_hex(secret, 'alice:4102444800')}".encode()
        for username, password, code in [
            (None, None, 4),
            ("alice", None, 4),
            ("system", hmac_hex(secret, "system").encode(), 2),
            ("alice:4102444800", hmac_hex(secret, "alice:4102444800").encode(), 2),
            ("alice", swapped, 4),
            ("alice", sign(secret, "alice", 4102444800).encode(), 0),
        ]:
            with self.subTest(username=username, password=password):
                self.assertEqual(
                    self.connack(username or "alice", username, password).return_code, code
                )
        self.assertEqual(
            metric(self.server, "sktalent_auth_failures_total", reason="missing_credentials"), 1
        )
        self.assertEqual(
            metric(self.server, "sktalent_auth_failures_total", reason="bad_user_id"), 2
        )
        self.assertEqual(
            metric(self.server, "sktalent_auth_failures_total", reason="bad_credentials"), 2
        )
        self.assertNotIn("Traceback", self.server.log)
        self.assertNotIn("UnhandledCredentials", self.server.log)


class ReservedSystemTests(SynchronousTestCase):
    """
    "system" is neither a chat recipient nor a notification recipient.
    """

    def setUp(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="sktalent-system-"))
        (directory / "tokens").write_text(TOKEN + "\n")
        args = ["--api-token-file", str(directory / "tokens")]
        self.server = running(self, ServerProcess(args, directory=directory))

    def call(self, method: str, path: str, body: object = None) -> tuple[int, dict[str, str]]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.server.api_port}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def test_not_a_notification_recipient(self) -> None:
        """
        The HTTP API refuses a notification to "system" with 400.
        """
        body = {"to": "system", "type": "feedback", "payload": {"content": "x"}}
        status, answer = self.call("POST", "/v1/notifications", body)
        self.assertEqual((status, answer["error"]), (400, "bad_request"))
        self.assertEqual(self.call("GET", "/v1/users/system/presence")[0], 400)

    def test_not_a_chat_recipient(self) -> None:
        """
        A chat to "system" gets bad_envelope.
        """
        alice = paho_user(self, self.server, "alice")
        alice.send(dict(CHAT, to="system"))
        [error] = alice.frames(1)
        self.assertEqual((error["type"], error["error"]), ("error", "bad_envelope"))
