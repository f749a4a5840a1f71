"""
Acknowledged or pushed, end to end: a real server with a short --push-after,
the local Umeng stand-in, clients that stop reading, acknowledge in time or
lose their socket; a SIGKILL between delivery and acknowledgement, with a
push held in the coalescing window, or with Umeng answering 503, on SQLite
and on MongoDB.  Also the operator endpoints against a real server.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sktalent.authsign import sign
from sktalent.mqtt import packets as p
from sktalent.testing.server import wait_for

from .helpers import chat, mongo_store, msgid, raw_user
from .pahoclient import PahoUser
from .rawclient import RawClient
from .test_e2e_api import DELIVERY, UmengServerCase, to
from .umengstub import Received

PUSH_AFTER = 1.0


def alert(push: Received) -> object:
    """The text of an iOS push."""
    assert push.body is not None
    return push.body["payload"]["aps"]["alert"]


class DeliveryCase(UmengServerCase):
    def raw_user(self, name: str, expect: int = 0) -> RawClient:
        """name connected (persistent session) by a client that acknowledges nothing."""
        return raw_user(self, self.server, name, expect)

    def chats_to_bob(self, alice: PahoUser, numbers: range) -> None:
        self.send_chats(alice, [chat("alice", "bob", n) for n in numbers])

    def bob_pushes(self) -> list[Received]:
        return self.stub.received(to("bob"))

    def answered(self, sent: int) -> None:
        """
        Wait until the server has had Umeng's answer to sent pushes: they
        are settled, and their marks on the way to the store.
        """
        wait_for(
            lambda: self.sample("sktalent_pushes_total", outcome="sent") >= sent,
            10,
            f"{sent} pushes answered",
        )

    def pushed_msgids(self, outcome: str = "sent") -> list[object]:
        """The msgid of each push to bob that the stand-in answered with outcome."""
        return [
            r.body["payload"]["msgid"]
            for r in self.bob_pushes()
            if r.outcome == outcome and r.body is not None
        ]


class UnacknowledgedTests(DeliveryCase):
    def server_args(self, directory: Path) -> list[str]:
        return ["--push-after", str(PUSH_AFTER)]

    def test_client_that_stops_reading_pushed_once(self) -> None:
        """
        bob stays connected but reads nothing: his chat is pushed once,
        --push-after seconds after it was committed and not before.
        """
        self.register("bob", "ios")
        bob = self.raw_user("bob")
        alice = self.user("alice")
        committed = time.monotonic()
        self.chats_to_bob(alice, range(1, 2))
        self.assertEqual(self.bob_pushes(), [])
        [push] = self.stub.wait(1, to("bob"))
        self.assertGreaterEqual(time.monotonic() - committed, PUSH_AFTER)
        self.stub.settle(idle=PUSH_AFTER * 2)
        self.assertEqual(self.bob_pushes(), [push])
        payload = self.assertSignedBody(push, "ios")["payload"]
        self.assertEqual((payload["aps"]["alert"], payload["msgid"]), ("m1", msgid(1)))
        self.assertEqual(self.sample("sktalent_push_requests_total", reason="unacknowledged"), 1)
        # Still connected: a ping is answered, behind the chat bob left unread.
        self.assertEqual([type(packet) for packet in bob.ping()], [p.Publish])

    def test_acknowledged_in_time_not_pushed(self) -> None:
        """bob, whose client acknowledges at once, is never pushed."""
        self.register("bob", "ios")
        bob = self.user("bob")
        self.chats_to_bob(self.user("alice"), range(1, 4))
        self.assertEqual(len(bob.frames(3)), 3)
        self.stub.settle(idle=PUSH_AFTER * 2.5)
        self.assertEqual(self.bob_pushes(), [])


class ConnectionLostTests(DeliveryCase):
    def server_args(self, directory: Path) -> list[str]:
        # Long enough that a push within it comes from the connection's end.
        return ["--push-after", "60"]

    def test_socket_cut_with_three_unacknowledged(self) -> None:
        """
        bob's socket is cut with three chats delivered and unacknowledged:
        they are pushed at once, the last push for the last chat with the
        badge 3, in at most two pushes (coalesced).
        """
        self.register("bob", "ios")
        bob = self.raw_user("bob")
        self.chats_to_bob(self.user("alice"), range(1, 4))
        delivered = [bob.expect(p.Publish) for _ in range(3)]
        self.assertEqual(
            [json.loads(x.payload)["msgid"] for x in delivered], [msgid(n) for n in range(1, 4)]
        )
        self.assertEqual(self.bob_pushes(), [])
        bob.close()
        self.stub.wait(1, to("bob"))
        self.stub.settle(idle=3)
        pushes = self.bob_pushes()
        self.assertLessEqual(len(pushes), 2)
        last = self.assertSignedBody(pushes[-1], "ios")["payload"]
        self.assertEqual(
            (last["aps"], last["msgid"]),
            ({"alert": "m3", "sound": "default", "badge": 3}, msgid(3)),
        )
        self.assertEqual(self.sample("sktalent_push_requests_total", reason="connection_lost"), 3)

    def test_acknowledged_while_held_not_pushed(self) -> None:
        """
        bob's socket is cut with three chats unacknowledged: the first is
        pushed at once, the other two are held in the 2 s window; bob
        connects again and acknowledges them within it, so nothing more is
        pushed (counted withdrawn).
        """
        self.register("bob", "ios")
        bob = self.raw_user("bob")
        self.chats_to_bob(self.user("alice"), range(1, 4))
        for _ in range(3):
            bob.expect(p.Publish)
        bob.close()
        self.stub.wait(1, to("bob"))
        again = self.raw_user("bob")
        resent = [again.expect(p.Publish) for _ in range(3)]
        self.assertEqual(
            [json.loads(x.payload)["msgid"] for x in resent], [msgid(n) for n in range(1, 4)]
        )
        again.send(*(p.PubAck(x.packet_id or 0) for x in resent))
        self.stub.settle(idle=3)
        self.assertEqual(self.pushed_msgids(), [msgid(1)])
        self.assertEqual(self.sample("sktalent_pushes_total", outcome="withdrawn"), 2)


class SQLiteRestartTests(DeliveryCase):
    def server_args(self, directory: Path) -> list[str]:
        return ["--push-after", "2"]

    def test_sigkill_between_delivery_and_acknowledgement(self) -> None:
        """
        The server dies (SIGKILL) with bob's chat delivered and not
        acknowledged: after the restart it is pushed once, and a further
        restart does not push it again.
        """
        self.register("bob", "ios")
        bob = self.raw_user("bob")
        alice = self.user("alice")
        self.chats_to_bob(alice, range(1, 2))
        bob.expect(p.Publish)
        self.server.kill()
        alice.drop()
        self.assertEqual(self.bob_pushes(), [])
        again = self.server.restarted()
        self.addCleanup(again.stop)
        [push] = self.stub.wait(1, to("bob"))
        self.assertEqual((push.outcome, alert(push)), ("sent", "m1"))
        # Stopped before it has the answer, it would push again: at least once.
        self.answered(1)
        self.assertEqual(again.stop(), 0)
        third = again.restarted()
        self.addCleanup(third.stop)
        self.stub.settle(idle=4)
        self.assertEqual(self.bob_pushes(), [push])

    def test_sigterm_is_not_a_lost_connection(self) -> None:
        """
        SIGTERM closes bob's connection with a chat unacknowledged: that is
        the server stopping, not bob's connection failing, so nothing is
        pushed then; the restarted server pushes it once, bob not being back.
        """
        self.register("bob", "ios")
        bob = self.raw_user("bob")
        self.chats_to_bob(self.user("alice"), range(1, 2))
        bob.expect(p.Publish)
        self.assertEqual(self.server.stop(), 0)
        self.stub.settle(idle=1)
        self.assertEqual(self.bob_pushes(), [])
        again = self.server.restarted()
        self.addCleanup(again.stop)
        [push] = self.stub.wait(1, to("bob"))
        self.stub.settle(idle=3)
        self.assertEqual(self.bob_pushes(), [push])

    def test_acknowledged_just_before_sigterm(self) -> None:
        """
        bob acknowledges his chat and the server is stopped (SIGTERM) at
        once: the acknowledgement is kept, so the restarted server neither
        delivers the chat again nor pushes it.
        """
        self.register("bob", "ios")
        bob = self.raw_user("bob")
        self.chats_to_bob(self.user("alice"), range(1, 2))
        delivered = bob.expect(p.Publish)
        bob.send(p.PubAck(delivered.packet_id or 0), p.PingReq())
        bob.expect(p.PingResp)
        self.assertEqual(self.server.stop(), 0)
        again = self.server.restarted()
        self.addCleanup(again.stop)
        bob = raw_user(self, again, "bob")
        bob.send(p.PingReq())
        self.assertEqual(bob.until(lambda packet: isinstance(packet, p.PingResp)), [])
        self.stub.settle(idle=3)
        self.assertEqual(self.bob_pushes(), [])

    def test_sigkill_with_a_push_held(self) -> None:
        """
        The server dies (SIGKILL) with a push held in bob's coalescing
        window: after the restart it is pushed, once; the push Umeng took
        before is not pushed again.
        """
        self.register("bob", "ios")
        alice = self.user("alice")
        self.chats_to_bob(alice, range(1, 2))
        self.answered(1)
        time.sleep(0.3)  # Its mark lands; the window has over a second left.
        self.chats_to_bob(alice, range(2, 3))
        self.server.kill()
        alice.drop()
        self.assertEqual(self.pushed_msgids(), [msgid(1)])
        again = self.server.restarted()
        self.addCleanup(again.stop)
        self.stub.wait(2, to("bob"))
        self.stub.settle(idle=3)
        self.assertEqual(self.pushed_msgids(), [msgid(1), msgid(2)])
        last = self.assertSignedBody(self.bob_pushes()[-1], "ios")["payload"]
        self.assertEqual((last["aps"]["alert"], last["aps"]["badge"]), ("m2", 2))


class SQLiteOutageRestartTests(DeliveryCase):
    def server_args(self, directory: Path) -> list[str]:
        return ["--push-after", "1"]

    def delivery(self) -> Mapping[str, object]:
        # Retrying for many seconds, so that the SIGKILL comes while it does.
        return {**DELIVERY, "max_attempts": 100, "backoff_base": 0.1, "backoff_cap": 0.2}

    def test_sigkill_while_umeng_answers_503(self) -> None:
        """
        The server dies while Umeng answers 503 and bob's push is being
        retried: after the restart, it is retried again through three more
        503s until Umeng accepts it, once.
        """
        self.register("bob", "ios")
        self.stub.unavailable(10_000)
        alice = self.user("alice")
        self.chats_to_bob(alice, range(1, 2))
        self.stub.wait(3, to("bob"))
        self.server.kill()
        alice.drop()
        self.stub.settle(idle=0.3)
        self.assertEqual(self.pushed_msgids(), [])
        self.stub.unavailable(3)
        again = self.server.restarted()
        self.addCleanup(again.stop)
        wait_for(lambda: self.pushed_msgids(), 15, "the push after the restart")
        self.stub.settle(idle=2)
        self.assertEqual(self.pushed_msgids(), [msgid(1)])
        self.assertGreaterEqual(len(self.pushed_msgids("unavailable")), 6)


class SQLiteBanTests(DeliveryCase):
    BAN = 6.0

    def test_ban_survives_restart_and_ends_on_time(self) -> None:
        """
        bob is banned for a few seconds and the server is SIGKILLed: the
        restarted server still refuses him (CONNACK 5), a second before the
        ban ends too, and takes him back with his session once it has ended.
        """
        self.raw_user("bob")
        reply = self.call("POST", "/v1/users/bob/disconnect", {"ban_seconds": int(self.BAN)})
        ends = time.monotonic() + self.BAN
        self.assertEqual(reply.status, 204)
        self.server.kill()
        again = self.server.restarted()
        self.addCleanup(again.stop)
        self.raw_user("bob", expect=p.REFUSED_NOT_AUTHORIZED)
        self.assertLess(time.monotonic(), ends - 1.5, "the restart took too long to tell")
        time.sleep(max(0.0, ends - 1.0 - time.monotonic()))
        self.raw_user("bob", expect=p.REFUSED_NOT_AUTHORIZED)
        time.sleep(max(0.0, ends + 0.2 - time.monotonic()))
        bob = RawClient(self.server.mqtt_port)
        self.addCleanup(bob.close)
        password = sign(self.server.secret, "bob").encode()
        bob.send(p.Connect("bob", clean_session=False, username="bob", password=password))
        self.assertEqual(bob.expect(p.ConnAck), p.ConnAck(0, True))


class MongoBanTests(SQLiteBanTests):
    def store(self) -> str | None:
        return mongo_store()


class MongoRestartTests(SQLiteRestartTests):
    def store(self) -> str | None:
        return mongo_store()


class MongoOutageRestartTests(SQLiteOutageRestartTests):
    def store(self) -> str | None:
        return mongo_store()


class OperatorTests(DeliveryCase):
    def session(self, user_id: str) -> dict[str, Any]:
        reply = self.call("GET", f"/v1/users/{user_id}/session")
        self.assertEqual(reply.status, 200, reply.body)
        answer: dict[str, Any] = reply.json()
        return answer

    def test_session(self) -> None:
        """
        GET .../session: 404 before bob has one; online since his connect,
        on this server, with his platform; offline with what waits for him
        and since when.
        """
        reply = self.call("GET", "/v1/users/bob/session")
        self.assertEqual((reply.status, reply.json()["error"]), (404, "not_found"))
        self.register("bob", "android")
        before = int(time.time() * 1000)
        bob = self.user("bob")
        after = int(time.time() * 1000)
        online = self.session("bob")
        since = online.pop("connected_since")
        self.assertTrue(before - 1 <= since <= after, (before, since, after))
        self.assertIsInstance(online.pop("node"), str)
        self.assertEqual(
            online, {"online": True, "queued": 0, "oldest_queued_at": None, "platform": "android"}
        )
        bob.close()
        wait_for(lambda: not self.session("bob")["online"], 10, "bob offline")
        alice = self.user("alice")
        sent = int(time.time() * 1000)
        self.chats_to_bob(alice, range(1, 3))
        offline = self.session("bob")
        oldest = offline.pop("oldest_queued_at")
        self.assertTrue(sent - 1 <= oldest <= int(time.time() * 1000), (sent, oldest))
        self.assertEqual(
            offline,
            {
                "online": False,
                "node": None,
                "connected_since": None,
                "queued": 2,
                "platform": "android",
            },
        )

    def test_disconnect_with_ban(self) -> None:
        """
        POST .../disconnect closes bob's connection; with ban_seconds he gets
        CONNACK 5 until they have passed, then his session back.  A bad body
        is 400 and a user without a session 404, both disconnecting nobody.
        """
        bob = self.raw_user("bob")
        for body, status in [
            ({"ban_seconds": -5}, 400),
            ({"ban_seconds": "2"}, 400),
            ({"until": 2}, 400),
        ]:
            reply = self.call("POST", "/v1/users/bob/disconnect", body)
            self.assertEqual((reply.status, reply.json()["error"]), (status, "bad_request"))
        reply = self.call("POST", "/v1/users/nobody/disconnect", {"ban_seconds": 2})
        self.assertEqual((reply.status, reply.json()["error"]), (404, "not_found"))
        self.assertEqual(bob.ping(), [])
        reply = self.call("POST", "/v1/users/bob/disconnect", {"ban_seconds": 2})
        banned_at = time.monotonic()
        self.assertEqual((reply.status, reply.body), (204, b""))
        self.assertTrue(bob.closed_by_server())
        refused = self.raw_user("bob", expect=p.REFUSED_NOT_AUTHORIZED)
        self.assertTrue(refused.closed_by_server())
        time.sleep(max(0.0, banned_at + 2.2 - time.monotonic()))
        self.raw_user("bob")
        reply = self.call("POST", "/v1/users/bob/disconnect")
        self.assertEqual(reply.status, 204)

    def test_delete_user(self) -> None:
        """
        DELETE /v1/users/bob closes his connection and forgets his session,
        queue and device, not the chat history; a notification after it
        creates a new session and is pushed to both apps, as for a user with
        no device.
        """
        self.register("bob", "ios")
        bob = self.raw_user("bob")
        self.chats_to_bob(self.user("alice"), range(1, 3))
        reply = self.call("DELETE", "/v1/users/bob")
        self.assertEqual((reply.status, reply.body), (204, b""))
        self.assertTrue(bob.closed_by_server())
        reply = self.call("GET", "/v1/users/bob/session")
        self.assertEqual(reply.status, 404)
        history = self.call("GET", "/v1/orders/o1/messages").json()["messages"]
        self.assertEqual([m["msgid"] for m in history], [msgid(1), msgid(2)])
        self.stub.settle(idle=0.5)
        self.assertEqual(self.bob_pushes(), [])
        self.notify("bob", {"status": "paid", "o_id": "o1"})
        self.stub.wait(2, to("bob"))
        self.assertEqual(sorted(r.app or "" for r in self.bob_pushes()), ["android", "ios"])
        self.assertEqual(self.session("bob")["queued"], 1)
        reply = self.call("DELETE", "/v1/users/a%2Fb")
        self.assertEqual((reply.status, reply.json()["error"]), (400, "bad_request"))
