"""
Cluster mode end to end: real server processes sharing a MongoDB store
(SKTALENT_TEST_MONGO_URI) and a real redis-server, clients on 127.0.0.1, and
HAProxy in front of them; nodes killed and Redis stopped under load.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
from twisted.trial.unittest import SynchronousTestCase

from sktalent.authsign import sign
from sktalent.mqtt import packets as p
from sktalent.testing.cluster import HAProxyProcess, RedisProcess, running_redis
from sktalent.testing.server import ServerProcess, free_port, running, wait_for

from .helpers import chat, mongo_store, msgid, nothing_more, paho_user, raw_user
from .pahoclient import PahoUser
from .rawclient import RawClient
from .test_e2e_api import to, write_umeng_config
from .test_migrate import migrate
from .umengstub import UmengStub

TOKEN = "cluster-test-token"
SECRET = b"the cluster's shared secret"
PUSH_AFTER = "30"
LOGIN_ATTEMPTS = 5


@attrs.define(eq=False)
class Cluster:
    """Nodes of one cluster: one store, one Redis, one secret and API token."""

    case: SynchronousTestCase
    redis: RedisProcess
    store: str
    files: Path = attrs.Factory(lambda: Path(tempfile.mkdtemp(prefix="sktalent-cluster-")))
    nodes: dict[str, ServerProcess] = attrs.Factory(dict)
    push_after: str = PUSH_AFTER
    # More options for every node.
    args: list[str] = attrs.Factory(list)

    def __attrs_post_init__(self) -> None:
        self.case.addCleanup(shutil.rmtree, self.files, True)
        (self.files / "secret").write_bytes(SECRET)
        (self.files / "tokens").write_text(TOKEN + "\n")

    def start(self, *names: str) -> list[ServerProcess]:
        """
        Start a node for each name, all at once as systemd would; each is
        stopped at the end.
        """
        with ThreadPoolExecutor(len(names)) as pool:
            return list(pool.map(self.node, names))

    def node(self, name: str) -> ServerProcess:
        server = ServerProcess(
            args=[
                "--cluster",
                self.redis.uri,
                "--node",
                name,
                "--auth-secret-file",
                str(self.files / "secret"),
                "--api-token-file",
                str(self.files / "tokens"),
                "--chat-rate",
                "10000",
                "--push-after",
                self.push_after,
                *self.args,
            ],
            store=self.store,
        )
        self.nodes[name] = server
        return running(self.case, server)

    def user(self, server: ServerProcess | HAProxyProcess, user: str) -> PahoUser:
        """user logged in on a node (or through HAProxy), closed at the end."""
        port = server.mqtt_port if isinstance(server, ServerProcess) else server.port
        # As the app does: CONNACK 3 (server unavailable) is tried again.
        # The server answers a login within 10 s (CONNACK 3 when the store
        # is slower, as FerretDB is while it works off a backlog), so the
        # CONNACK is awaited a little longer.
        for _ in range(LOGIN_ATTEMPTS):
            client = PahoUser(port, user, user, sign(SECRET, user), connack_timeout=15)
            self.case.addCleanup(client.drop)
            if client.rc != 3:
                break
            client.drop()
            time.sleep(1)
        self.case.assertEqual(client.rc, 0, f"{user} could not log in")
        return client

    def api(
        self, server: ServerProcess, path: str, method: str = "GET", body: object = None
    ) -> Any:
        status, raw = server.api(path, method, body, token=TOKEN)
        return status, json.loads(raw) if raw else None

    def wait_for(self, condition: Callable[[], object], timeout: float, what: str) -> None:
        """wait_for, the end of every node's log in its error: a rare failure's only trace."""
        try:
            wait_for(condition, timeout, what)
        except AssertionError as e:
            logs = "".join(
                f"\n--- node {name}:\n" + "\n".join(node.log.splitlines()[-40:])
                for name, node in self.nodes.items()
            )
            raise AssertionError(f"{e}{logs}") from None


def contents(frames: Iterable[dict[str, Any]]) -> list[str]:
    return [f["payload"]["content"] for f in frames if f.get("type") == "order_chat"]


class ClusterCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.redis = running_redis(self)
        self.cluster = Cluster(self, self.redis, mongo_store())


class StartTests(SynchronousTestCase):
    def test_sqlite_refused(self) -> None:
        """--cluster with a SQLite store stops the start with one line, status 1."""
        server = ServerProcess(args=["--cluster", "redis://127.0.0.1:6379/0"])
        self.addCleanup(shutil.rmtree, server.directory, True)
        self.assertEqual(server.start_failing(), 1)
        lines = [line for line in server.log.splitlines() if "--cluster" in line]
        self.assertEqual(len(lines), 1, server.log)
        self.assertIn("MongoDB", lines[0])
        self.assertNotIn("Traceback", server.log)

    def test_redis_not_answering(self) -> None:
        """A node whose Redis does not answer stops the start with one line, status 1."""
        port = free_port()
        server = ServerProcess(
            args=["--cluster", f"redis://127.0.0.1:{port}/0", "--node", "a"], store=mongo_store()
        )
        self.addCleanup(shutil.rmtree, server.directory, True)
        self.assertEqual(server.start_failing(timeout=60), 1)
        self.assertIn("Cannot start: --cluster: Redis did not answer within 10 s", server.log)
        self.assertNotIn("Traceback", server.log)


class ThreeNodeTests(ClusterCase):
    def test_started_together(self) -> None:
        """Three nodes started at once on a new database all start and serve."""
        nodes = self.cluster.start("a", "b", "c")
        for server in nodes:
            self.assertEqual(server.api("/healthz")[0], 200, server.log)

    def test_chat_between_nodes(self) -> None:
        """
        Chat between users on different nodes: the recipient gets it, the
        sender sent and then received; a notification through a third
        node's API reaches the user where it is.
        """
        a, b, c = self.cluster.start("a", "b", "c")
        alice, bob = self.cluster.user(a, "alice"), self.cluster.user(b, "bob")
        alice.send(chat("alice", "bob", 1, "hello from a"))
        (sent,) = alice.frames(1)
        self.assertEqual(sent, {"msgid": msgid(1), "type": "sent"})
        (delivered,) = bob.frames(1)
        self.assertEqual(delivered["payload"]["content"], "hello from a")
        bob.send({"msgid": msgid(1), "from": "bob", "to": "alice", "type": "received"})
        self.assertEqual(alice.frames(1), [{"msgid": msgid(1), "type": "received"}])
        status, answer = self.cluster.api(
            c,
            "/v1/notifications",
            "POST",
            {"to": "bob", "type": "feedback", "payload": {"content": "fixed"}},
        )
        self.assertEqual(status, 202)
        (note,) = bob.frames(1)
        self.assertEqual((note["msgid"], note["from"]), (answer["msgid"], "system"))
        nothing_more(alice)
        nothing_more(bob)

    def test_presence_from_every_node(self) -> None:
        """Every node's API tells who is online and on which node."""
        a, b, c = self.cluster.start("a", "b", "c")
        alice = self.cluster.user(a, "alice")
        self.cluster.user(b, "bob")
        for server in (a, b, c):
            for user, node in (("alice", "a"), ("bob", "b")):
                self.assertEqual(
                    self.cluster.api(server, f"/v1/users/{user}/presence"), (200, {"online": True})
                )
                status, session = self.cluster.api(server, f"/v1/users/{user}/session")
                self.assertEqual((status, session["online"], session["node"]), (200, True, node))
            self.assertEqual(
                self.cluster.api(server, "/v1/users/carol/presence"), (200, {"online": False})
            )
        alice.close()
        for server in (a, b, c):
            wait_for(
                lambda s=server: (
                    self.cluster.api(s, "/v1/users/alice/presence")[1]  # type: ignore[misc]
                    == {"online": False}
                ),
                10,
                "alice offline everywhere",
            )

    def test_disconnect_and_ban_from_another_node(self) -> None:
        """A disconnect with a ban on one node closes the user on another and holds everywhere."""
        a, b, c = self.cluster.start("a", "b", "c")
        bob = self.cluster.user(b, "bob")
        status, _ = self.cluster.api(c, "/v1/users/bob/disconnect", "POST", {"ban_seconds": 60})
        self.assertEqual(status, 204)
        bob.wait_closed()
        for server in (a, b, c):
            again = PahoUser(server.mqtt_port, "bob", "bob", sign(SECRET, "bob"))
            self.addCleanup(again.drop)
            self.assertEqual(again.rc, 5)

    def test_health(self) -> None:
        """/healthz names the store and Redis."""
        (a,) = self.cluster.start("a")
        status, raw = a.api("/healthz")
        self.assertEqual(
            (status, json.loads(raw)), (200, {"status": "ok", "store": "ok", "redis": "ok"})
        )


class TakeoverTests(ClusterCase):
    def test_takeover_with_messages_in_flight(self) -> None:
        """
        bob connects to b while his connection to a receives a stream of
        chats: a closes it, b serves the session, every chat arrives, in
        order, and only those unacknowledged when a let go come twice.
        """
        a, b, c = self.cluster.start("a", "b", "c")
        alice = self.cluster.user(c, "alice")
        first = self.cluster.user(a, "bob")
        count = 150

        def send() -> None:
            for n in range(count):
                alice.send(chat("alice", "bob", n))

        sender = threading.Thread(target=send)
        sender.start()
        self.cluster.wait_for(lambda: first.messages.qsize() >= 20, 30, "chats to reach bob on a")
        second = self.cluster.user(b, "bob")
        first.wait_closed()
        sender.join(60)
        self.assertEqual([f["type"] for f in alice.frames(count, timeout=60)], ["sent"] * count)
        before = _drain(first, [])
        after: list[str] = []
        expected = {f"m{n}" for n in range(count)}
        try:
            self.cluster.wait_for(
                lambda: expected <= set(before) | set(_drain(second, after)), 60, "chats"
            )
        except AssertionError as e:
            missing = sorted(expected - set(before) - set(after), key=lambda c: int(c[1:]))
            raise AssertionError(f"missing on b: {missing}; before: {before}\n{e}") from None
        _assert_in_order(self, after)
        self.assertEqual(after, list(dict.fromkeys(after)), "duplicates on b")
        twice = [x for x in after if x in before]
        self.assertLessEqual(len(twice), 32, "more than the in-flight window came twice")
        nothing_more(second)


class FailureTests(ClusterCase):
    def test_node_killed_under_load(self) -> None:
        """
        A node SIGKILLed while 300 chats are in flight to and from its
        users: they reconnect to another node, and every chat acknowledged
        with sent arrives, in order per sender.
        """
        a, b, c = self.cluster.start("a", "b", "c")
        a1, a2 = self.cluster.user(a, "a1"), self.cluster.user(a, "a2")
        b1, b2 = self.cluster.user(b, "b1"), self.cluster.user(b, "b2")
        half = 150
        failed: list[BaseException] = []

        def send(user: PahoUser, sender: str, to: str) -> None:
            try:
                for n in range(half):
                    user.send(chat(sender, to, n))
            except (AssertionError, OSError) as e:
                failed.append(e)  # The node died under it: expected for a1.

        threads = [
            threading.Thread(target=send, args=(a1, "a1", "b1")),
            threading.Thread(target=send, args=(b2, "b2", "a2")),
        ]
        for thread in threads:
            thread.start()
        wait_for(lambda: b1.messages.qsize() >= 30, 60, "chats from a1 to reach b1")
        a.kill()
        for thread in threads:
            thread.join(120)
        acknowledged_a1 = _sent(a1)
        a1.drop()
        a2.drop()
        # What a2 received on a before it died counts: it was acknowledged there.
        got_a2: list[str] = _drain(a2, [])
        # Reconnected elsewhere, as a load balancer would send them.
        again_a2 = self.cluster.user(c, "a2")
        acknowledged_b2 = _sent_all(b2, half)
        got_b1 = contents(json.loads(m.payload) for m in list(b1.messages.queue))
        wait_for(lambda: set(acknowledged_a1) <= set(_drain(b1, got_b1)), 30, "a1's chats on b1")
        _assert_in_order(self, got_b1)
        wait_for(
            lambda: set(acknowledged_b2) <= set(_drain(again_a2, got_a2)), 60, "b2's chats on a2"
        )
        _assert_in_order(self, got_a2)

    def test_redis_stopped_under_load(self) -> None:
        """
        Redis stopped for 10 s while chats flow within one node and between
        two: nothing acknowledged is lost, chat within a node goes on,
        /healthz says Redis is down, and delivery between the nodes resumes
        within 5 s of Redis' return.
        """
        a, b = self.cluster.start("a", "b")
        alice, carol = self.cluster.user(a, "alice"), self.cluster.user(a, "carol")
        bob = self.cluster.user(b, "bob")
        alice.send(chat("alice", "bob", 0))
        self.assertEqual(contents(bob.frames(1)), ["m0"])
        self.redis.stop()
        wait_for(lambda: a.api("/healthz")[0] == 503, 10, "a to notice Redis is down")
        self.assertEqual(
            json.loads(a.api("/healthz")[1]),
            {"status": "unavailable", "store": "ok", "redis": "unavailable"},
        )
        outage_end = time.monotonic() + 10
        n = 1
        while time.monotonic() < outage_end:
            alice.send(chat("alice", "bob", n))
            alice.send(chat("alice", "carol", 10_000 + n))
            n += 1
            time.sleep(0.1)
        # Within one node chat went on.
        self.assertEqual(len(contents(carol.frames(n - 1, timeout=30))), n - 1)
        acknowledged = [f["msgid"] for f in alice.frames(2 * (n - 1), timeout=30)]
        self.assertEqual(len(acknowledged), 2 * (n - 1))
        self.redis.start()
        back = time.monotonic()
        got = contents(bob.frames(n - 1, timeout=30))
        self.assertLess(time.monotonic() - back, 5.0, "cross-node delivery resumed late")
        self.assertEqual(got, [f"m{i}" for i in range(1, n)])
        wait_for(lambda: a.api("/healthz")[0] == 200, 10, "a to see Redis back")


class HAProxyTests(ClusterCase):
    def test_clients_through_haproxy(self) -> None:
        """
        Clients connecting through HAProxy (deploy/haproxy.cfg) are spread
        over two nodes and chat with each other whichever node they reached.
        """
        a, b = self.cluster.start("a", "b")
        template = (Path(__file__).parent.parent / "deploy" / "haproxy.cfg").read_text()
        haproxy = HAProxyProcess([a.mqtt_port, b.mqtt_port])
        self.addCleanup(shutil.rmtree, haproxy.directory, True)
        self.addCleanup(haproxy.stop)
        haproxy.start(template)
        users = {name: self.cluster.user(haproxy, name) for name in ("u1", "u2", "u3", "u4")}
        nodes = {self.cluster.api(a, f"/v1/users/{name}/session")[1]["node"] for name in users}
        self.assertEqual(nodes, {"a", "b"})
        pairs = [("u1", "u2"), ("u2", "u3"), ("u3", "u4"), ("u4", "u1")]
        for i, (sender, recipient) in enumerate(pairs):
            users[sender].send(chat(sender, recipient, i, f"{sender} to {recipient}"))
        for sender, recipient in pairs:
            # Each gets its sent and the chat to it, in either order.
            frames = users[recipient].frames(2)
            self.assertIn(f"{sender} to {recipient}", contents(frames))


def _sent(user: PahoUser) -> list[str]:
    """The contents of the chats user got sent for so far: by msgid order."""
    frames = [json.loads(m.payload) for m in list(user.messages.queue)]
    return [f"m{int(f['msgid'], 16)}" for f in frames if f.get("type") == "sent"]


def _sent_all(user: PahoUser, count: int) -> list[str]:
    frames = user.frames(count, timeout=60)
    return [f"m{int(f['msgid'], 16)}" for f in frames if f.get("type") == "sent"]


def _drain(user: PahoUser, into: list[str]) -> list[str]:
    while not user.messages.empty():
        frame = json.loads(user.messages.get().payload)
        if frame.get("type") == "order_chat":
            into.append(frame["payload"]["content"])
    return into


def _assert_in_order(case: SynchronousTestCase, got: list[str]) -> None:
    """Chats of one sender, m<n>, first seen in the order they were sent."""
    first = list(dict.fromkeys(got))
    case.assertEqual(first, sorted(first, key=lambda c: int(c[1:])), "out of order")


class PushTests(SynchronousTestCase):
    """
    Section 8's push rules across nodes, with the Umeng stand-in: bob's
    chats come from alice on another node.
    """

    def start(self, push_after: float) -> tuple[ServerProcess, ServerProcess]:
        self.stub = UmengStub()
        self.addCleanup(self.stub.close)
        self.cluster = Cluster(self, running_redis(self), mongo_store(), push_after=str(push_after))
        config = write_umeng_config(self.cluster.files / "umeng.json", self.stub)
        self.cluster.args = ["--umeng-config", str(config)]
        a, b = self.cluster.start("a", "b")
        status, _ = self.cluster.api(
            a, "/v1/users/bob/device", "PUT", {"platform": "ios", "device_token": "t"}
        )
        self.assertEqual(status, 204)
        return a, b

    def silent_bob(self, server: ServerProcess) -> RawClient:
        """bob connected to server by a client that acknowledges nothing."""
        bob = RawClient(server.mqtt_port)
        self.addCleanup(bob.close)
        connack = bob.connect("bob", clean=False, password=sign(SECRET, "bob").encode())
        self.assertEqual(connack.return_code, 0)
        return bob

    def chat_to_bob(self, a: ServerProcess, bob: RawClient) -> None:
        """alice, on a, chats to bob, who receives it (and does not acknowledge it)."""
        alice = self.cluster.user(a, "alice")
        alice.send(chat("alice", "bob", 1))
        self.assertEqual(alice.frames(1), [{"msgid": msgid(1), "type": "sent"}])
        delivered = bob.expect(p.Publish)
        self.assertEqual(json.loads(delivered.payload)["msgid"], msgid(1))

    def pushed(self) -> list[object]:
        return [
            r.body["payload"]["msgid"] for r in self.stub.received(to("bob")) if r.body is not None
        ]

    def test_acknowledged_elsewhere_not_pushed(self) -> None:
        """A chat to bob, connected to the other node and acknowledging, is never pushed."""
        a, b = self.start(push_after=1)
        bob = self.cluster.user(b, "bob")
        alice = self.cluster.user(a, "alice")
        alice.send(chat("alice", "bob", 1))
        self.assertEqual(len(bob.frames(1)), 1)
        self.stub.settle(idle=3)
        self.assertEqual(self.pushed(), [])

    def test_unacknowledged_elsewhere_pushed_once(self) -> None:
        """
        bob, connected to the other node, leaves the chat unacknowledged:
        it is pushed once, --push-after after it reached him.
        """
        a, b = self.start(push_after=1)
        bob = self.silent_bob(b)
        self.chat_to_bob(a, bob)
        self.stub.wait(1, to("bob"))
        self.stub.settle(idle=3)
        self.assertEqual(self.pushed(), [msgid(1)])

    def test_node_killed_with_the_chat_unacknowledged(self) -> None:
        """
        The node holding bob is SIGKILLed with his chat delivered and not
        acknowledged: once its lease runs out the other node pushes it,
        once.
        """
        a, b = self.start(push_after=60)
        bob = self.silent_bob(b)
        self.chat_to_bob(a, bob)
        b.kill()
        self.stub.wait(1, to("bob"), timeout=30)
        self.stub.settle(idle=3)
        self.assertEqual(self.pushed(), [msgid(1)])


class MigratedTests(SynchronousTestCase):
    def test_cluster_on_a_migrated_store(self) -> None:
        """
        A SQLite store with sessions, queues and history, copied into
        MongoDB: a cluster started on the copy delivers every queued chat,
        in order and once, to users on either node, and serves the history.
        """
        before = running(self, ServerProcess())
        for user in ("bob", "carol"):
            raw_user(self, before, user).disconnect()
        alice = paho_user(self, before, "alice")
        for n in range(1, 41):
            alice.send(chat("alice", "bob" if n % 2 else "carol", n))
        self.assertEqual({f["type"] for f in alice.frames(40)}, {"sent"})
        alice.close()
        self.assertEqual(before.stop(), 0)
        uri = mongo_store()
        result = migrate(str(before.directory / "store.sqlite3"), uri)
        self.assertEqual(result.returncode, 0, result.stderr)
        cluster = Cluster(self, running_redis(self), uri)
        a, b = cluster.start("a", "b")
        for user, node, numbers in (("bob", a, range(1, 41, 2)), ("carol", b, range(2, 41, 2))):
            client = cluster.user(node, user)
            frames = client.frames(20)
            self.assertEqual([f["msgid"] for f in frames], [msgid(n) for n in numbers])
            nothing_more(client)
        status, history = cluster.api(b, "/v1/orders/o1/messages?limit=100")
        self.assertEqual(status, 200)
        self.assertEqual(len(history["messages"]), 40)
