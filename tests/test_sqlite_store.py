"""
What only the SQLite store has: durability settings, schema migrations, and
surviving a process that dies without closing the file.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from collections.abc import Sequence

import attrs
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import capturedLogs
from twisted.trial.unittest import TestCase

import sktalent
from sktalent.store.interfaces import (
    ChatRecord,
    Dequeue,
    Device,
    DropSession,
    Enqueue,
    Guarded,
    InsertChat,
    Inserted,
    LogOut,
    MarkPushed,
    Message,
    PutDevice,
    Queued,
    QueuedMessage,
    SessionRecord,
    SessionSummary,
    SetBan,
)
from sktalent.store.sqlite import MIGRATIONS, SchemaTooNew, SQLiteStore, connect

UPGRADE = "ALTER TABLE devices ADD COLUMN registered_at INTEGER;"

# Commits through the store, then dies the hard way: no stop(), no close,
# the WAL not checkpointed.
CRASHER = """
import os, sys
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from sktalent.store.interfaces import Device, PutDevice
from sktalent.store.sqlite import SQLiteStore

store = SQLiteStore(reactor, sys.argv[1])

async def main():
    await store.start()
    await store.submit([PutDevice(Device("u", "ios", "durable"))])

def crash(result):
    if isinstance(result, Failure):
        result.printTraceback()
    os._exit(1 if isinstance(result, Failure) else 0)

reactor.callWhenRunning(lambda: Deferred.fromCoroutine(main()).addBoth(crash))
reactor.run()
"""


class SQLiteStoreTests(TestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()

    async def started(
        self, migrations: Sequence[str] = MIGRATIONS, busy_timeout: float = 5.0
    ) -> SQLiteStore:
        store = SQLiteStore(reactor, self.path, migrations=migrations, busy_timeout=busy_timeout)
        await store.start()
        self.addCleanup(store.stop)
        return store

    def query(self, sql: str) -> list[tuple[object, ...]]:
        """Read the file with a connection of the test's own."""
        conn = sqlite3.connect(self.path)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    def test_connect_is_durable(self) -> None:
        """connect() puts the file in WAL mode with synchronous=FULL."""
        conn = connect(self.path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone(), ("wal",))
        self.assertEqual(conn.execute("PRAGMA synchronous").fetchone(), (2,))

    async def test_schema_and_indexes(self) -> None:
        """start() applies every migration, records it, and makes the indexes."""
        await self.started()
        self.assertEqual(
            [v for (v,) in self.query("SELECT version FROM schema_migrations")],
            list(range(1, len(MIGRATIONS) + 1)),
        )
        self.assertEqual(self.query("PRAGMA journal_mode"), [("wal",)])
        indexes = {
            (table, tuple(r[2] for r in self.query(f"PRAGMA index_info({name!r})")), unique)
            for table in ("queue", "chats", "receipts")
            for _, name, unique, *_ in self.query(f"PRAGMA index_list({table!r})")
        }
        self.assertTrue(
            {
                ("queue", ("client_id", "seq"), 1),
                ("chats", ("sender", "msgid"), 1),
                ("chats", ("o_id", "received_at", "msgid"), 0),
                ("receipts", ("sender", "msgid"), 1),
            }
            <= indexes,
            indexes,
        )

    async def test_upgrade_in_place(self) -> None:
        """A newer migration list upgrades an existing file and keeps its data."""
        store = await self.started()
        await store.submit([PutDevice(Device("u", "ios", "t"))])
        await store.stop()
        upgraded = await self.started(migrations=(*MIGRATIONS, UPGRADE))
        self.assertEqual(await upgraded.get_device("u"), Device("u", "ios", "t"))
        self.assertEqual(
            [v for (v,) in self.query("SELECT version FROM schema_migrations")],
            list(range(1, len(MIGRATIONS) + 2)),
        )
        self.assertIn("registered_at", [r[1] for r in self.query("PRAGMA table_info(devices)")])

    async def test_first_schema_upgrades(self) -> None:
        """
        A file of the first schema, chats without InsertChat tokens or
        digests, upgrades in place: its chats stay, a retransmission of one
        (whatever its digest) is REPEATED, and the msgid for another recipient
        is CONFLICT.
        """
        first = await self.started(migrations=MIGRATIONS[:1])
        conn = sqlite3.connect(self.path)
        conn.execute(
            "INSERT INTO chats (sender, msgid, recipient, o_id, envelope, received_at)"
            " VALUES ('a', 'm1', 'b', 'o1', '{}', 5)"
        )
        conn.commit()
        conn.close()
        await first.stop()
        store = await self.started()
        record = ChatRecord("m1", "a", "b", "o1", "{}", 5)
        self.assertEqual(await store.chat_history("o1", 10, None), [record])
        self.assertEqual(
            await store.submit(
                [
                    InsertChat(record, digest="d"),
                    InsertChat(attrs.evolve(record, recipient="c")),
                ]
            ),
            [Guarded(Inserted.REPEATED), Guarded(Inserted.CONFLICT)],
        )

    async def test_devices_upgrade_to_log_out(self) -> None:
        """
        A file whose devices cannot be logged out yet (schema 2) upgrades in
        place: its devices stay, logged in, and can then be logged out.
        """
        before = await self.started(migrations=MIGRATIONS[:2])
        conn = sqlite3.connect(self.path)
        conn.execute("INSERT INTO devices (user_id, platform, token) VALUES ('u', 'ios', 't')")
        conn.commit()
        conn.close()
        await before.stop()
        store = await self.started()
        self.assertEqual(await store.get_device("u"), Device("u", "ios", "t"))
        await store.submit([LogOut("u"), LogOut("never")])
        self.assertEqual(await store.get_device("u"), Device("u", "ios", "t", True))
        self.assertEqual(await store.get_device("never"), Device("never", None, None, True))

    async def test_push_state_upgrades(self) -> None:
        """
        A file of the schema before the push state upgrades in place: a
        message queued in it counts as queued at the upgrade, without a
        notice and not pushed, and its session as one whose client has
        connected; a session made by a message after the upgrade has not.
        """
        before_push = await self.started(migrations=MIGRATIONS[:4])
        conn = sqlite3.connect(self.path)
        conn.execute("INSERT INTO sessions (client_id, subscriptions) VALUES ('bob', '[]')")
        conn.execute(
            "INSERT INTO queue (client_id, seq, topic, payload, qos, retain)"
            " VALUES ('bob', 1, 't', x'01', 1, 0)"
        )
        conn.commit()
        conn.close()
        await before_push.stop()
        before = int(time.time() * 1000)
        store = await self.started()
        after = int(time.time() * 1000)
        await store.submit([Enqueue("carol", Message("t", b"c", 1), 5)])
        bob, carol = await store.load_sessions()
        self.assertEqual(
            (bob.client_id, bob.has_connected, carol.has_connected), ("bob", True, False)
        )
        [queued] = bob.queue
        self.assertTrue(before // 1000 * 1000 <= queued.queued_at <= after, queued)
        self.assertEqual(
            queued, QueuedMessage(1, Message("t", b"\x01", 1), queued_at=queued.queued_at)
        )

    async def test_bans_upgrade(self) -> None:
        """A file of the schema before bans upgrades in place, keeping its data, and keeps bans."""
        before = await self.started(migrations=MIGRATIONS[:5])
        await before.submit([PutDevice(Device("u", "ios", "t"))])
        await before.stop()
        store = await self.started()
        self.assertEqual(await store.get_device("u"), Device("u", "ios", "t"))
        await store.submit([SetBan("u", 5000)])
        self.assertEqual(await store.get_ban("u"), 5000)

    async def test_queue_counters_upgrade(self) -> None:
        """
        A file of the schema before the store kept queue counters upgrades
        in place: each session's counters are counted from its queue, a
        queue entry without its session gets one, what a connected session
        was sent is unknown, and seqs go on above the highest kept; pushes
        owed and expiry are found by index, not by scanning the queue.
        """
        old = await self.started(migrations=MIGRATIONS[:6])
        conn = sqlite3.connect(self.path)
        conn.execute("INSERT INTO sessions (client_id, subscriptions) VALUES ('bob', '[]')")
        conn.executemany(
            "INSERT INTO queue (client_id, seq, topic, payload, qos, retain, queued_at, notice)"
            " VALUES (?, ?, 't', ?, 1, 0, ?, ?)",
            [
                ("bob", 3, b"\x01\x02", 100, "n"),
                ("bob", 7, b"\x03", 200, None),
                ("orphan", 2, b"", 300, "n"),
            ],
        )
        conn.commit()
        conn.close()
        await old.stop()
        store = await self.started()
        self.assertEqual(await store.session_summary("bob"), SessionSummary(2, 3, 100, 7))
        self.assertEqual(await store.session_summary("orphan"), SessionSummary(1, 0, 300, 2))
        bob = await store.open_session("bob", 10)
        self.assertEqual((bob and bob.has_connected, bob and bob.sent_through), (True, None))
        self.assertEqual(
            await store.submit([Enqueue("bob", Message("t", b"", 1), notice="n")]), [Queued(8, 2)]
        )
        plans = [
            " ".join(str(row[-1]) for row in self.query(f"EXPLAIN QUERY PLAN {sql}"))
            for sql in (
                "SELECT seq FROM queue WHERE notice IS NOT NULL AND NOT pushed"
                " AND (client_id, seq) > ('bob', 0) ORDER BY client_id, seq",
                "SELECT seq FROM queue WHERE queued_at < 5",
            )
        ]
        self.assertIn("USING INDEX queue_unpushed", plans[0])
        self.assertIn("USING COVERING INDEX queue_by_age", plans[1])

    async def test_refuses_newer_schema(self) -> None:
        """A file from a newer server is refused with a clear error."""
        store = await self.started(migrations=(*MIGRATIONS, UPGRADE))
        await store.stop()
        newest = len(MIGRATIONS) + 1
        with self.assertRaises(SchemaTooNew) as raised:
            await SQLiteStore(reactor, self.path).start()
        self.assertIn(
            f"version {newest}, newer than version {len(MIGRATIONS)}", str(raised.exception)
        )

    async def test_failed_migration_leaves_no_trace(self) -> None:
        """A migration that fails is rolled back whole and not recorded."""
        with self.assertRaises(sqlite3.OperationalError):
            await self.started(migrations=(*MIGRATIONS, "CREATE TABLE t (x); SELECT nonsense;"))
        self.assertEqual(len(self.query("SELECT version FROM schema_migrations")), len(MIGRATIONS))
        self.assertEqual(self.query("SELECT name FROM sqlite_master WHERE name = 't'"), [])

    async def test_commit_survives_crash(self) -> None:
        """What a submit acknowledged is there after the process died without closing."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(sktalent.__file__)))
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-c", CRASHER, self.path],
            env={**os.environ, "PYTHONPATH": root},
            path=os.getcwd(),
        )
        self.assertEqual(code, 0, err)
        self.assertTrue(os.path.exists(self.path + "-wal"))
        store = await self.started()
        self.assertEqual(await store.get_device("u"), Device("u", "ios", "durable"))

    async def test_locked_file_is_waited_for(self) -> None:
        """
        While another process holds the write lock a submit is held and retried,
        logged once as unavailable and once as back, then lands.
        """
        store = await self.started(busy_timeout=0.05)
        holder = sqlite3.connect(self.path, isolation_level=None)
        self.addCleanup(holder.close)
        holder.execute("BEGIN IMMEDIATE")
        m = Message("t", b"p", 1)
        with capturedLogs() as events:
            landed = store.submit([Enqueue("c", m)])
            for _ in range(100):
                if not store.committer.available:
                    break
                await deferLater(reactor, 0.02)
            self.assertFalse(store.committer.available)
            # Long enough for several retries at 0.1, 0.2, 0.4 s.
            await deferLater(reactor, 1.0)
            self.assertNoResult(landed)
            holder.execute("ROLLBACK")
            self.assertEqual(await landed, [Queued(1, 0)])
        self.assertTrue(store.committer.available)
        self.assertEqual(
            await store.load_sessions(), [SessionRecord("c", (), (QueuedMessage(1, m),))]
        )
        formats = [e.get("log_format", "") for e in events]
        self.assertEqual(len([f for f in formats if "unavailable" in f]), 1)
        self.assertEqual(len([f for f in formats if "is back" in f]), 1)

    async def test_rows_held_back_are_seen(self) -> None:
        """
        The queue rows of a commit are written together, yet what follows
        an Enqueue in the commit sees its row: a Dequeue of it, a
        MarkPushed, a DropSession of its client.
        """
        store = await self.started()
        m = Message("t", b"abc", 1)
        results = await store.submit(
            [
                Enqueue("a", m, 1, "n"),
                Enqueue("a", m, 2, "n"),
                Dequeue("a", 1),
                MarkPushed("a", 2),
                Enqueue("b", m, 3),
                DropSession("b"),
            ]
        )
        self.assertEqual(results, [Queued(1, 1), Queued(2, 2), None, None, Queued(1, 0), None])
        self.assertEqual(await store.session_summary("a"), SessionSummary(1, 3, 2, 2))
        self.assertIsNone(await store.session_summary("b"))
        self.assertEqual(self.query("SELECT client_id, seq, pushed FROM queue"), [("a", 2, 1)])

    async def test_bad_batch_fails_alone(self) -> None:
        """A batch the database rejects fails its submitters; the next one commits."""
        store = await self.started()
        bad = store.submit([Enqueue("c", Message(None, b"", 1))])  # type: ignore[arg-type]
        await deferLater(reactor, 0)
        good = store.submit([PutDevice(Device("u", "ios", "t"))])
        with self.assertRaises(sqlite3.IntegrityError):
            await bad
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.IntegrityError)), 1)
        self.assertEqual(await good, [None])
        self.assertEqual(await store.load_sessions(), [])
        self.assertTrue(store.committer.available)
