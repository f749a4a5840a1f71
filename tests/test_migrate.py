"""
python3 -m sktalent.migrate: a SQLite store copied into MongoDB, checked
through the store interface; re-runs, interrupted runs, refusals, and a
server's queued chats delivered from the copy.
"""

from __future__ import annotations

import io
import os
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import attrs
import bson
import pymongo
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sktalent.migrate import Progress, copy
from sktalent.store.interfaces import (
    AddInbound,
    Attach,
    ChatRecord,
    Detach,
    Device,
    Enqueue,
    InsertChat,
    Inserted,
    IStore,
    LogOut,
    MarkPushed,
    MarkReceived,
    Message,
    PutDevice,
    PutSession,
    Release,
    SetBan,
    SetRetained,
    StoreUnavailable,
)
from sktalent.store.mongo import Copied, MongoStore
from sktalent.store.sqlite import Snapshot, SQLiteStore
from sktalent.testing.server import ROOT, ServerProcess, free_port, running

from .helpers import chat, mongo_store, msgid, nothing_more, paho_user, raw_user
from .test_store_contract import drop_database

CLIENTS = ("alice", "bob", "carol", "dave")
# Every collection the copy writes ("servers" is who uses the store, not content).
COLLECTIONS = ("sessions", "queue", "inbound", "chats", "receipts", "devices", "bans", "retained")


def _record(n: int, sender: str, recipient: str) -> ChatRecord:
    envelope = f'{{"msgid": "{msgid(n)}", "payload": {{"t": "{1000 + n}"}}}}'
    return ChatRecord(msgid(n), sender, recipient, "o1", envelope, 1000 + n)


async def populate(store: IStore) -> None:
    """A store of several users' sessions, queues, devices, history, pushes and bans."""
    topic = "$sktalent/clients/{}".format
    await store.submit(
        [
            Attach("alice", ((topic("alice"), 1),)),
            Detach("alice", 2),
            PutSession("bob", ((topic("bob"), 1),)),
            Attach("dave", ((topic("dave"), 1),), clean=True),
            AddInbound("alice", 7),
            PutDevice(Device("alice", "ios", "token-a")),
            PutDevice(Device("dave", "android", "token-d")),
            LogOut("dave"),
            LogOut("bob"),
            SetBan("mallory", 5_000_000),
            SetRetained("a/b", Message("a/b", b"kept", 1, True)),
        ]
    )
    for n in range(1, 13):
        sender, recipient = CLIENTS[n % 3], CLIENTS[(n + 1) % 3]
        enqueue = Enqueue(
            recipient, Message(topic(recipient), f"m{n}".encode(), 1), 1000 + n, f"push {n}"
        )
        await store.submit([InsertChat(_record(n, sender, recipient), (enqueue,), digest=f"d{n}")])
    # One without a notice (never pushed), for a client who never connected.
    await store.submit([Enqueue("erin", Message(topic("erin"), b"\x00\xff", 1), 2000)])
    await store.submit(
        [
            MarkPushed("bob", 1),
            MarkPushed("carol", 2),
            Release("carol", 1),
            MarkReceived(CLIENTS[1], msgid(1), CLIENTS[2], 3000),
        ]
    )


async def contents(store: IStore) -> dict[str, Any]:
    """What store answers through its interface about everything populate() stored."""
    users = [*CLIENTS, "erin", "mallory"]
    return {
        "sessions": await store.load_sessions(),
        "summaries": [await store.session_summary(u) for u in users],
        "pushes": await store.pending_pushes(None, 100),
        "totals": await store.queue_totals(),
        "history": await store.chat_history("o1", 100, None),
        "devices": [await store.get_device(u) for u in users],
        "bans": [await store.get_ban(u) for u in users],
        "retained": await store.load_retained(),
        "subscriptions": sorted(await store.load_subscriptions()),
    }


def raw(uri: str) -> dict[str, list[dict[str, Any]]]:
    """Every document the copy writes, as stored, by collection."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(uri)
    try:
        db = client.get_default_database()
        return {c: list(db[c].find({}, sort=[("_id", 1)])) for c in COLLECTIONS}
    finally:
        client.close()


def listing(uri: str) -> dict[str, Any]:
    """
    The whole database as stored: each collection's indexes and documents
    (BSON), but the times of the records in "servers", which their processes
    renew while they run.
    """
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(uri)
    try:
        db = client.get_default_database()
        found: dict[str, Any] = {}
        for name in sorted(db.list_collection_names()):
            docs = list(db[name].find({}, sort=[("_id", 1)]))
            if name == "servers":
                docs = [{k: v for k, v in doc.items() if k != "at"} for doc in docs]
            found[name] = (db[name].index_information(), [bson.encode(doc) for doc in docs])
        return found
    finally:
        client.close()


def check_in(uri: str, token: str, holder: str, copying: bool = False, live: bool = True) -> None:
    """Put in "servers" what a process using the store says there: now, or long ago."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(uri)
    try:
        servers = client.get_default_database()["servers"]
        said: dict[str, Any] = {"holder": holder, "copying": copying}
        if live:
            update = {"$set": said, "$currentDate": {"at": True}}
        else:
            update = {"$set": said | {"at": datetime(2020, 1, 1, tzinfo=UTC)}}
        servers.update_one({"_id": token}, update, upsert=True)
    finally:
        client.close()


def dropped(case: SynchronousTestCase, uri: str) -> None:
    """uri's database is dropped once case ends."""

    def drop() -> None:
        client: pymongo.MongoClient[dict[str, Any]]
        with pymongo.MongoClient(uri) as client:
            client.drop_database(client.get_default_database())

    case.addCleanup(drop)


class Stopped(Exception):
    """The copy stopped part way, as a crash or ^C would stop it."""


@attrs.define
class Interrupted:
    """A target that stops the copy after its first writes."""

    store: MongoStore
    left: int = 1

    def copy_in(self, items: Sequence[Copied]) -> Deferred[None]:
        if self.left == 0:
            raise Stopped()
        self.left -= 1
        return self.store.copy_in(items)

    def copy_prune(self, clients: Sequence[str]) -> Deferred[None]:
        return self.store.copy_prune(clients)


class CopyTests(TestCase):
    """The copy itself, between stores in this process."""

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        self.path = self.mktemp()
        self.uri = mongo_store()
        self.addCleanup(lambda: Deferred.fromCoroutine(drop_database(self.uri)))
        return Deferred.fromCoroutine(self._populate())

    async def _populate(self) -> None:
        source = SQLiteStore(reactor, self.path)
        await source.start()
        try:
            await populate(source)
            self.expected = await contents(source)
        finally:
            await source.stop()

    async def target(self) -> MongoStore:
        store = MongoStore(reactor, self.uri)
        await store.start()
        self.addCleanup(store.stop)
        return store

    async def migrate(self, target: Any, batch: int = 2) -> str:
        snapshot = Snapshot.open(self.path)
        out = io.StringIO()
        try:
            await copy(snapshot, target, batch, Progress(out))
        finally:
            snapshot.close()
        return out.getvalue()

    async def test_everything_copied(self) -> None:
        """Every session, queue, device, chat, push flag and ban reads back alike from MongoDB."""
        target = await self.target()
        output = await self.migrate(target)
        self.assertEqual(await contents(target), self.expected)
        self.assertIn("sessions: 5/5, queued messages: 13/13", output)
        self.assertIn("devices: 3/3", output)
        # The receipt: the interface has no read for it.
        [receipt] = raw(self.uri)["receipts"]
        self.assertEqual(
            (receipt["sender"], receipt["msgid"], receipt["at"]), ("bob", msgid(1), 3000)
        )

    async def test_copy_goes_on_as_the_original(self) -> None:
        """
        What the copy is used for behaves as the original would: a
        retransmitted chat is told from a reused msgid, a new message takes
        the next seq, the receipt's chat is found.
        """
        target = await self.target()
        await self.migrate(target)
        again = InsertChat(_record(1, "bob", "carol"), digest="d1")
        reused = InsertChat(_record(1, "bob", "carol"), digest="other")
        late = Enqueue("carol", Message("t", b"new", 1))
        received = MarkReceived("bob", msgid(1), "carol", 4000)
        results: list[Any] = await target.submit([again, reused, late, received])
        self.assertEqual(
            [results[0].outcome, results[1].outcome, results[3].outcome],
            [Inserted.REPEATED, Inserted.CONFLICT, True],
        )
        carol = self.expected["summaries"][CLIENTS.index("carol")]
        self.assertEqual(results[2].seq, carol.last_seq + 1)

    async def test_run_again(self) -> None:
        """A second run leaves MongoDB exactly as the first did: nothing doubled."""
        target = await self.target()
        await self.migrate(target)
        first = raw(self.uri)
        await self.migrate(target, batch=3)
        self.assertEqual(raw(self.uri), first)
        self.assertEqual(await contents(target), self.expected)

    async def test_interrupted_run(self) -> None:
        """A run stopped after its first batch, then run again, completes the copy."""
        target = await self.target()
        with self.assertRaises(Stopped):
            await self.migrate(Interrupted(target))
        self.assertNotEqual(await contents(target), self.expected)
        await self.migrate(target)
        self.assertEqual(await contents(target), self.expected)

    async def test_source_wins(self) -> None:
        """
        What MongoDB holds under a copied key is replaced (a session's queue
        whole); what it holds under other keys is kept.
        """
        target = await self.target()
        await target.submit(
            [
                Enqueue("carol", Message("t", b"stale", 1), seq=99),
                PutDevice(Device("alice", "android", "old")),
                Enqueue("zed", Message("t", b"own", 1)),
            ]
        )
        await self.migrate(target)
        got = await contents(target)
        self.assertEqual(
            [s for s in got["sessions"] if s.client_id != "zed"],
            self.expected["sessions"],
        )
        self.assertEqual(got["devices"], self.expected["devices"])
        self.assertEqual(
            [m.message.payload for m in await target.read_queue("zed", 0, 9)], [b"own"]
        )

    async def test_source_only_read(self) -> None:
        """The SQLite file is not changed by a copy."""
        with open(self.path, "rb") as f:
            before = f.read()
        await self.migrate(await self.target())
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), before)


class InUseTests(TestCase):
    """A MongoDB store says who uses it."""

    async def test_servers_seen_while_they_run(self) -> None:
        """A started store is seen by another, by what it says of itself; once stopped, not."""
        uri = mongo_store()
        self.addCleanup(lambda: Deferred.fromCoroutine(drop_database(uri)))
        server = MongoStore(reactor, uri, holder="the server")
        tool = MongoStore(reactor, uri, holder="the tool")
        await server.start()
        await tool.start()
        self.addCleanup(tool.stop)
        [(who, ago)] = await tool.others()
        self.assertEqual(who, "the server")
        self.assertLess(ago, 5)
        await server.stop()
        self.assertEqual(await tool.others(), [])

    async def test_dead_records_removed(self) -> None:
        """
        The record of a process that died without taking it back is not
        heard of, and is removed when the store looks.
        """
        uri = mongo_store()
        self.addCleanup(lambda: Deferred.fromCoroutine(drop_database(uri)))
        client: pymongo.MongoClient[dict[str, Any]]
        with pymongo.MongoClient(uri) as client:
            long_ago = datetime(2020, 1, 1, tzinfo=UTC)
            db: pymongo.database.Database[dict[str, Any]] = client.get_default_database()
            db["servers"].insert_one({"_id": "dead", "holder": "a crashed server", "at": long_ago})
        tool = MongoStore(reactor, uri, holder="the tool")
        await tool.start()
        self.addCleanup(tool.stop)
        self.assertEqual(await tool.others(), [])
        with pymongo.MongoClient(uri) as client:
            self.assertIsNone(client.get_default_database()["servers"].find_one({"_id": "dead"}))

    async def test_no_start_while_a_copy_is_under_way(self) -> None:
        """
        A store cannot be started while a copy into it is under way (a
        server would serve half a store); once the copy stopped, it can.
        """
        uri = mongo_store()
        self.addCleanup(lambda: Deferred.fromCoroutine(drop_database(uri)))
        tool = MongoStore(reactor, uri, holder="sktalent.migrate pid 7", copying=True)
        await tool.start()
        server = MongoStore(reactor, uri)
        with self.assertRaises(StoreUnavailable) as caught:
            await server.start()
        self.assertIn("a copy into it is under way (sktalent.migrate pid 7)", str(caught.exception))
        await server.stop()
        await tool.stop()
        server = MongoStore(reactor, uri)
        await server.start()
        await server.stop()

    async def test_copies_started_together(self) -> None:
        """
        Two copies that both found the store unused before starting on it
        each see the other once on record, so both are refused.
        """
        uri = mongo_store()
        self.addCleanup(lambda: Deferred.fromCoroutine(drop_database(uri)))
        copies = [MongoStore(reactor, uri, holder=f"copy {n}", copying=True) for n in (1, 2)]
        for c in copies:
            self.assertEqual(await c.others(forget=False), [])
            self.addCleanup(c.stop)
        for c in copies:
            await c.start()
        self.assertEqual(
            [[who for who, _ in await c.others()] for c in copies], [["copy 2"], ["copy 1"]]
        )

    async def test_server_started_as_a_copy_registers(self) -> None:
        """
        A copy that registers just after a starting server looked for
        copies sees that server, which is on record before it looks.
        """
        uri = mongo_store()
        self.addCleanup(lambda: Deferred.fromCoroutine(drop_database(uri)))
        copy = MongoStore(reactor, uri, holder="the copy", copying=True)
        self.addCleanup(copy.stop)
        seen: list[list[tuple[str, float]]] = []

        class Server(MongoStore):
            async def _heard(self, forget: bool = True) -> list[tuple[str, float, bool]]:
                found = await super()._heard(forget)
                await copy.start()
                seen.append(await copy.others())
                return found

        server = Server(reactor, uri, holder="the server")
        await server.start()
        self.addCleanup(server.stop)
        self.assertEqual([[who for who, _ in others] for others in seen], [["the server"]])


def migrate(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the command in a process of its own: its status and output."""
    return subprocess.run(
        [sys.executable, "-m", "sktalent.migrate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )


def refused(
    case: SynchronousTestCase, result: subprocess.CompletedProcess[str], status: int, *words: str
) -> None:
    """result is a refusal: status, one line, without a traceback, saying words."""
    case.assertEqual(result.returncode, status, result.stderr)
    case.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
    for word in words:
        case.assertIn(word, result.stderr)


def stopped_store(case: SynchronousTestCase) -> str:
    """The path of a SQLite store a server made, then stopped."""
    server = running(case, ServerProcess())
    case.assertEqual(server.stop(), 0)
    return str(server.directory / "store.sqlite3")


class CommandTests(SynchronousTestCase):
    """The command line: usage, and each refusal in one line."""

    def test_help(self) -> None:
        """--help prints the usage."""
        result = migrate("--help")
        self.assertEqual(result.returncode, 0)
        self.assertIn("SRC DST", result.stdout)

    def test_bad_arguments(self) -> None:
        """Missing or unusable arguments are refused with status 2."""
        unreachable = f"mongodb://127.0.0.1:{free_port()}/x"
        refused(self, migrate(), 2, "SRC, DST")
        refused(self, migrate("s.db", unreachable, "--batch", "0"), 2, "--batch")
        refused(self, migrate("s.db", "sqlite:other.db"), 2, "not a MongoDB store")
        refused(self, migrate("s.db", "mongodb://127.0.0.1:1"), 2, "names no database")
        refused(self, migrate(unreachable, unreachable), 2, "not a SQLite store")

    def test_missing_or_foreign_source(self) -> None:
        """A missing file, one that is not SQLite and one that is not a store are refused."""
        unreachable = f"mongodb://127.0.0.1:{free_port()}/x"
        missing = os.path.abspath(self.mktemp())
        refused(self, migrate(f"sqlite:{missing}", unreachable), 1, missing, "no such file")
        junk = self.mktemp()
        with open(junk, "wb") as f:
            f.write(b"not a database" * 100)
        refused(self, migrate(junk, unreachable), 1, "not an SQLite database")
        other = self.mktemp()
        sqlite3.connect(other).execute("CREATE TABLE t (a)").connection.close()
        refused(self, migrate(other, unreachable), 1, "not a sktalent store")

    def test_unreachable_destination(self) -> None:
        """A MongoDB that does not answer is refused naming its host and port."""
        port = free_port()
        refused(
            self,
            migrate(stopped_store(self), f"mongodb://127.0.0.1:{port}/x"),
            1,
            f"127.0.0.1:{port}",
        )

    def test_source_in_use(self) -> None:
        """A SQLite store a running server has open is refused; once it stopped, it is read."""
        server = running(self, ServerProcess())
        path = str(server.directory / "store.sqlite3")
        unreachable = f"mongodb://127.0.0.1:{free_port()}/x"
        assert server.process is not None
        refused(self, migrate(path, unreachable), 1, "open in process", str(server.process.pid))
        server.stop()
        # Past the source's checks, to the destination's.
        refused(self, migrate(path, unreachable), 1, "cannot be reached")


class EndToEndTests(SynchronousTestCase):
    """Real servers before and after the copy."""

    def test_destination_in_use(self) -> None:
        """A MongoDB store a running server uses is refused; once it stopped, the copy runs."""
        uri = mongo_store()
        path = stopped_store(self)
        server = running(self, ServerProcess(store=uri))
        refused(self, migrate(path, uri), 1, "DST is in use")
        server.stop()
        result = migrate(path, uri)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Done in", result.stdout)

    def test_queued_chats_delivered_from_the_copy(self) -> None:
        """
        Chats queued for an offline user on a SQLite server reach that user,
        in order and once each, from a server on the MongoDB copy.
        """
        uri = mongo_store()
        before = running(self, ServerProcess())
        raw_user(self, before, "bob").disconnect()
        alice = paho_user(self, before, "alice")
        for n in range(1, 31):
            alice.send(chat("alice", "bob", n))
        self.assertEqual({f["type"] for f in alice.frames(30)}, {"sent"})
        alice.close()
        self.assertEqual(before.stop(), 0)
        result = migrate(str(before.directory / "store.sqlite3"), uri, "--batch", "7")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("sessions: 2/2, queued messages: 30/30", result.stdout)
        after = running(
            self,
            ServerProcess(store=uri, directory=before.directory, mqtt_port=before.mqtt_port),
        )
        bob = paho_user(self, after, "bob")
        frames = bob.frames(30)
        self.assertEqual([f["msgid"] for f in frames], [msgid(n) for n in range(1, 31)])
        nothing_more(bob)


class RefusedUntouchedTests(SynchronousTestCase):
    """A run refused because DST is in use leaves DST as it found it."""

    def test_live_server(self) -> None:
        """
        DST a running server uses is refused with nothing written: no record
        of the run, and the record of a process that died stays for the
        server to remove; the server's own record is as it was.
        """
        uri = mongo_store()
        dropped(self, uri)
        path = stopped_store(self)
        server = running(self, ServerProcess(store=uri))
        check_in(uri, "dead", "a crashed server", live=False)
        before = listing(uri)
        self.assertEqual(len(before["servers"][1]), 2)
        refused(self, migrate(path, uri), 1, "DST is in use", "sktalent on")
        self.assertEqual(listing(uri), before)
        server.stop()

    def test_live_node_on_an_empty_database(self) -> None:
        """
        A database where only a node has checked in is refused without a
        collection, index or schema document made.
        """
        uri = mongo_store()
        dropped(self, uri)
        check_in(uri, "node", "sktalent on node-2 pid 9")
        before = listing(uri)
        refused(self, migrate(stopped_store(self), uri), 1, "DST is in use", "node-2 pid 9")
        self.assertEqual(listing(uri), before)
        self.assertEqual(list(before), ["servers"])

    def test_copy_under_way(self) -> None:
        """A copy into DST under way refuses a second one, which writes nothing."""
        uri = mongo_store()
        dropped(self, uri)
        path = stopped_store(self)
        self.assertEqual(migrate(path, uri).returncode, 0)
        check_in(uri, "copy", "sktalent.migrate on host-1 pid 7", copying=True)
        check_in(uri, "dead", "an interrupted copy", copying=True, live=False)
        before = listing(uri)
        refused(self, migrate(path, uri), 1, "DST is in use", "sktalent.migrate on host-1 pid 7")
        self.assertEqual(listing(uri), before)

    def test_new_database_copied(self) -> None:
        """A DST that does not exist yet is made by the copy, as ever, and left unused."""
        uri = mongo_store()
        dropped(self, uri)
        self.assertEqual(listing(uri), {})
        result = migrate(stopped_store(self), uri)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Done in", result.stdout)
        after = listing(uri)
        self.assertIn("sessions", after)
        self.assertIn(("client_id_1_seq_1"), after["queue"][0])
        self.assertEqual(after["servers"][1], [])
        self.assertEqual(after["meta"][1], [bson.encode({"_id": "schema", "version": 2})])
