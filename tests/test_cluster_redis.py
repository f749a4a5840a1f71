"""
The cluster's Redis backend (sktalent/cluster/redis.py) against a real
redis-server: its scripts, and its links going and coming back.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace
from typing import Any

import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import TestCase

from sktalent.cluster import RedisAddress
from sktalent.cluster.interfaces import BackendDown, Holder
from sktalent.cluster.redis import RedisBackend
from sktalent.testing.cluster import RedisProcess, running_redis
from sktalent.testing.server import free_port

from .helpers import eventually

A = Holder("a", "i1", 1000)
B = Holder("b", "j1", 2000)


class RedisBackendTests(TestCase):
    def setUp(self) -> None:
        self.redis = running_redis(self)

    async def backend(self, node: str, redis: RedisProcess | None = None) -> RedisBackend:
        """A started backend for node, once Redis answers it."""
        backend = RedisBackend(RedisAddress.parse((redis or self.redis).uri), node, reactor)
        self.messages: list[Any] = []
        self.ups: list[bool] = []
        up: Deferred[None] = Deferred()

        def came_up() -> None:
            self.ups.append(True)
            if not up.called:
                up.callback(None)

        backend.start(self.messages.append, came_up, lambda: self.ups.append(False))
        self.addCleanup(backend.stop)
        await up.addTimeout(10, reactor)
        return backend

    async def test_presence(self) -> None:
        """
        A claim is seen by locate while its node's lease lives; a release by
        another holder leaves it; its own release removes it.
        """
        a = await self.backend("a")
        b = await self.backend("b")
        self.assertIsNone(await a.lease("i1", 10_000))
        claimed = await a.claim("alice", A)
        self.assertEqual((claimed.previous, claimed.rate), (None, None))
        self.assertEqual(await b.locate(["alice", "nobody"]), [A, None])
        await b.release("alice", B, None, 0)
        self.assertEqual(await b.locate(["alice"]), [A])
        await a.release("alice", A, "state", 5_000)
        self.assertEqual(await b.locate(["alice"]), [None])
        self.assertEqual((await b.claim("alice", B)).rate, "state")

    async def test_claim_finds_live_holder(self) -> None:
        """A claim answers the previous holder only while that node's lease lives."""
        a = await self.backend("a")
        await a.lease("i1", 10_000)
        await a.claim("alice", A)
        self.assertEqual((await a.claim("alice", B)).previous, A)
        await a.lease("i1", 0)
        await a.claim("alice", A)
        self.assertIsNone((await a.claim("alice", B)).previous)

    async def test_lease_held_by_another(self) -> None:
        """A node's name held by another live incarnation is answered with it."""
        a = await self.backend("a")
        self.assertIsNone(await a.lease("i1", 10_000))
        self.assertEqual(await a.lease("i2", 10_000), "i1")
        self.assertIsNone(await a.lease("i1", 0))
        self.assertIsNone(await a.lease("i2", 10_000))

    async def test_lease_runs_out(self) -> None:
        """A lease not renewed runs out, and the node's users are offline."""
        a = await self.backend("a")
        await a.lease("i1", 300)
        await a.claim("alice", A)
        self.assertEqual(await a.locate(["alice"]), [A])
        await deferLater(reactor, 0.4)
        self.assertEqual(await a.locate(["alice"]), [None])

    async def test_reap(self) -> None:
        """
        The users a dead node still holds are taken once, in batches; those
        who connected elsewhere meanwhile are not taken.
        """
        a = await self.backend("a")
        b = await self.backend("b")
        await a.lease("i1", 10_000)
        await b.lease("j1", 10_000)
        for i in range(5):
            await a.claim(f"u{i}", A)
        await b.claim("u0", B)
        self.assertEqual(await b.reap(10), [])
        await a.lease("i1", 0)
        first = await b.reap(2)
        rest = await a.reap(10)
        self.assertEqual(sorted(first + rest), ["u1", "u2", "u3", "u4"])
        self.assertLessEqual(len(first), 2)
        self.assertEqual(await b.reap(10), [])
        self.assertEqual(await b.locate(["u0", "u1"]), [B, None])

    async def test_reassert(self) -> None:
        """
        Reasserting puts this node's presences back, leaves users another
        live node holds (and names them), and drops those it no longer has.
        """
        a = await self.backend("a")
        b = await self.backend("b")
        await a.lease("i1", 10_000)
        await b.lease("j1", 10_000)
        await a.claim("gone", A)
        await b.claim("taken", B)
        taken = await a.reassert("i1", {"alice": A, "taken": A})
        self.assertEqual(taken, ["taken"])
        self.assertEqual(await b.locate(["alice", "taken", "gone"]), [A, B, None])

    async def test_messages(self) -> None:
        """A message to a node reaches it alone; a broadcast every node."""
        a = await self.backend("a")
        a_heard = self.messages
        b = await self.backend("b")
        self.assertEqual(await a.send("b", {"k": "wake", "u": ["bob"]}), 1)
        self.assertEqual(await a.send("c", {"k": "wake", "u": ["x"]}), 0)
        self.assertEqual(await b.broadcast({"k": "disconnect", "u": "eve"}), 2)
        await eventually(lambda: len(self.messages) == 2 and len(a_heard) == 1, "the messages")
        self.assertEqual(
            self.messages, [{"k": "wake", "u": ["bob"]}, {"k": "disconnect", "u": "eve"}]
        )
        self.assertEqual(a_heard, [{"k": "disconnect", "u": "eve"}])

    async def test_route(self) -> None:
        """
        route() answers each user's live holder and, in the same call, wakes
        each other node holding some of them once, with what it carries for
        each; the caller's own users get no wake.
        """
        a = await self.backend("a")
        a_heard = self.messages
        b = await self.backend("b")
        b_heard = self.messages
        self.assertIsNone(await a.lease("i1", 10_000))
        self.assertIsNone(await b.lease("j1", 10_000))
        for user, holder in (("alice", A), ("bob", B), ("小明", B)):
            await (a if holder is A else b).claim(user, holder)
        carried = [{"s": 1, "t": "$sktalent/clients/bob", "p": '{"content":"你好\\"/"}', "q": 1}]
        holders = await a.route("i1", 1, ["bob", "alice", "nobody", "小明"], {"bob": carried})
        self.assertEqual(holders, [B, A, None, B])
        await eventually(lambda: len(b_heard) == 1, "the wake")
        self.assertEqual(
            b_heard, [{"k": "wake", "h": 1, "u": ["bob", "小明"], "m": {"bob": carried}}]
        )
        self.assertEqual(a_heard, [])

    async def test_scripts_by_hash(self) -> None:
        """
        Scripts are called by their SHA1, computed once, not at every call:
        Redis is sent each script whole once, and once again after it lost
        them (SCRIPT FLUSH, as a restart does), the backend working on.
        """
        a = await self.backend("a")
        b = await self.backend("b")
        hashed: list[object] = []

        def sha1(data: bytes) -> Any:
            hashed.append(data)
            return hashlib.sha1(data)

        self.patch(txredisapi, "hashlib", SimpleNamespace(sha1=sha1))

        async def evals() -> int:
            stats = await b._run("info", "commandstats")
            # "calls=3,usec=...": EVAL's line, absent before its first call.
            line = stats.get("cmdstat_eval", "calls=0,")
            return int(line.split(",")[0].removeprefix("calls="))

        for _ in range(3):
            self.assertIsNone(await a.lease("i1", 10_000))
            await a.claim("alice", A)
            self.assertEqual(await a.locate(["alice"]), [A])
        self.assertEqual(await evals(), 3)
        # Behind a's back, as a restarted Redis would be.
        await b._run("execute_command", "SCRIPT", "FLUSH")
        for _ in range(2):
            self.assertEqual(await a.locate(["alice"]), [A])
            self.assertEqual((await a.claim("alice", A)).previous, A)
        self.assertEqual(await evals(), 5)
        self.assertEqual(hashed, [])

    async def test_redis_restarted(self) -> None:
        """
        Redis stopping is noticed, calls fail with BackendDown meanwhile, and
        the links come back within a second of its return.
        """
        a = await self.backend("a")
        self.redis.stop()
        await eventually(lambda: not a.up, "the link to go down")
        self.assertEqual(self.ups, [True, False])
        with self.assertRaises(BackendDown):
            await a.locate(["alice"])
        self.redis.start()
        back = reactor.seconds()
        await eventually(lambda: a.up, "the link to come back")
        self.assertLess(reactor.seconds() - back, 1.5)
        self.assertEqual(self.ups, [True, False, True])
        self.assertEqual(await a.locate(["alice"]), [None])


class RedisDownTests(TestCase):
    async def test_retries_logged_briefly(self) -> None:
        """
        While Redis does not answer the backend tries again twice a second;
        its log says so in short lines (it logged 250 KB a try, the
        factory's repr with everything the backend refers to).
        """
        address = RedisAddress.parse(f"redis://127.0.0.1:{free_port()}/0")
        backend = RedisBackend(address, "a", reactor)
        with capturedLogs() as events:
            backend.start(lambda m: None, lambda: None, lambda: None)
            await deferLater(reactor, 1.6, lambda: None)
            await backend.stop()
        lines = [formatEvent(e) for e in events]
        self.assertTrue(any("127.0.0.1" in line for line in lines), lines)
        self.assertFalse([line for line in lines if "Starting factory" in line])
        self.assertLess(max(map(len, lines)), 500)
