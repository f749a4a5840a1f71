"""
One contract for every store: the same tests run against the memory store,
SQLite (a temporary file) and MongoDB (SKTALENT_TEST_MONGO_URI, for example
FerretDB started by .ci/ferretdb).  Also the group committer on its own, and
open_store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import attrs
from bson import Binary
from prometheus_client import CollectorRegistry, Histogram
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, capturedLogs
from twisted.protocols.policies import WrappingFactory
from twisted.protocols.portforward import ProxyFactory
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from txmongo.connection import ConnectionPool

from sktalent.store import open_store
from sktalent.store.group import GroupCommitter, op_bytes
from sktalent.store.interfaces import (
    NO_ROOM,
    AddInbound,
    Attach,
    ChatRecord,
    Dequeue,
    Detach,
    Device,
    DiscardSession,
    DropDevice,
    DropSession,
    Enqueue,
    Guarded,
    InsertChat,
    Inserted,
    IStore,
    LogOut,
    MarkPushed,
    MarkReceived,
    Message,
    Op,
    PendingPush,
    PutDevice,
    PutSession,
    QueueConflict,
    Queued,
    QueuedMessage,
    QueueTotals,
    Release,
    RemoveInbound,
    Room,
    SessionRecord,
    SessionSummary,
    SetBan,
    SetRetained,
    StoreUnavailable,
)
from sktalent.store.memory import MemoryStore
from sktalent.store.mongo import STALE_MARK, MongoStore
from sktalent.store.sqlite import SQLiteStore
from sktalent.testing.server import free_port

from .helpers import mongo_store, msgid, with_database

EVERY_BYTE = bytes(range(256))
NEW, REPEATED, CONFLICT, FULL = Inserted.NEW, Inserted.REPEATED, Inserted.CONFLICT, Inserted.FULL


def chat(
    msgid: str,
    at: int,
    o_id: str = "o1",
    sender: str = "alice",
    recipient: str = "bob",
) -> ChatRecord:
    envelope = f'{{"msgid": "{msgid}", "payload": {{"t": "{at}"}}}}'
    return ChatRecord(msgid, sender, recipient, o_id, envelope, at)


def by_client(sessions: Sequence[SessionRecord]) -> list[SessionRecord]:
    return sorted(sessions, key=lambda s: s.client_id)


@attrs.frozen
class Unhandled:
    """Not an operation: no store handles it."""

    what: str


if TYPE_CHECKING:
    _Mixin = TestCase
else:
    _Mixin = object


class StoreContract(_Mixin):
    """
    The tests every store passes.  A subclass (also a trial TestCase) says how
    to make a store on this test's own file or database.
    """

    store: IStore

    def prepare(self) -> None:
        """Set up what make_store needs, before the first store is made."""

    def make_store(self) -> IStore:
        raise NotImplementedError

    async def started(self) -> IStore:
        store = self.make_store()
        await store.start()
        self.addCleanup(store.stop)
        return store

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        self.prepare()

        async def start() -> None:
            self.store = await self.started()

        return Deferred.fromCoroutine(start())

    async def test_sessions_round_trip(self) -> None:
        """A session comes back with its subscriptions, queue and inbound ids."""
        m1 = Message("$sktalent/clients/bob", b"one", 1)
        m2 = Message("$sktalent/clients/bob", b"two", 2, retain=True)
        results = await self.store.submit(
            [
                PutSession("bob", (("$sktalent/clients/bob", 1), ("x/#", 0))),
                Enqueue("bob", m2),
                Enqueue("bob", m1),
                Release("bob", 1),
                AddInbound("bob", 42),
                AddInbound("bob", 43),
                RemoveInbound("bob", 43),
            ]
        )
        self.assertEqual(results, [None, Queued(1, 0), Queued(2, 0), None, None, None, None])
        record = SessionRecord(
            "bob",
            (("$sktalent/clients/bob", 1), ("x/#", 0)),
            (QueuedMessage(1, m2, released=True), QueuedMessage(2, m1)),
            frozenset({42}),
        )
        self.assertEqual(await self.store.load_sessions(), [record])
        self.assertEqual(await self.store.open_session("bob", 10), record)

    async def test_put_session_replaces_subscriptions(self) -> None:
        """PutSession replaces the subscriptions but keeps the queue."""
        m = Message("t", b"p", 1)
        await self.store.submit([PutSession("c", (("a", 1),)), Enqueue("c", m)])
        await self.store.submit([PutSession("c", (("b", 0),))])
        self.assertEqual(
            await self.store.load_sessions(),
            [SessionRecord("c", (("b", 0),), (QueuedMessage(1, m),))],
        )

    async def test_enqueue_and_add_inbound_create_the_session(self) -> None:
        """Enqueue and AddInbound make a session; removals on an unknown one do not."""
        m = Message("t", b"p", 1)
        await self.store.submit(
            [
                Enqueue("new", m),
                AddInbound("in", 9),
                Dequeue("gone", 5),
                Release("r", 1),
                RemoveInbound("x", 3),
                Detach("d", 4),
            ]
        )
        self.assertEqual(
            by_client(await self.store.load_sessions()),
            [
                SessionRecord("in", (), (), frozenset({9})),
                SessionRecord("new", (), (QueuedMessage(1, m),)),
            ],
        )

    async def test_enqueue_for_an_unloaded_session(self) -> None:
        """
        The store allocates each client's seqs from 1 in the order its
        Enqueues commit, whoever is connected, and counts what each queue
        holds: messages, payload bytes, those with a notice.
        """
        results = await self.store.submit(
            [
                Enqueue("bob", Message("t", b"12345", 1), 1000, "n"),
                Enqueue("carol", Message("t", b"1", 1), 2000),
                Enqueue("bob", Message("t", b"123", 1), 3000),
            ]
        )
        self.assertEqual(results, [Queued(1, 1), Queued(1, 0), Queued(2, 1)])
        self.assertEqual(
            await self.store.submit([Enqueue("bob", Message("t", b"", 1), 4000, "n")]),
            [Queued(3, 2)],
        )
        self.assertEqual(await self.store.session_summary("bob"), SessionSummary(3, 8, 1000, 3))
        self.assertEqual(await self.store.session_summary("carol"), SessionSummary(1, 1, 2000, 1))
        self.assertIsNone(await self.store.session_summary("dave"))

    async def test_seq_never_allocated_twice(self) -> None:
        """
        A seq once allocated is not allocated again, not after its message
        and every other left the queue.
        """
        m = Message("t", b"p", 1)
        await self.store.submit([Enqueue("c", m), Enqueue("c", m)])
        await self.store.submit([Dequeue("c", 1), Dequeue("c", 2), Dequeue("c", 2)])
        self.assertEqual(await self.store.session_summary("c"), SessionSummary(0, 0, None, 2))
        self.assertEqual(await self.store.submit([Enqueue("c", m)]), [Queued(3, 0)])

    async def test_seq_collision_is_an_error(self) -> None:
        """
        An Enqueue at a seq already in the queue fails its commit with
        QueueConflict: the message there is never overwritten.
        """
        kept = Message("t", b"kept", 1)
        await self.store.submit([Enqueue("c", kept, 1000)])
        with self.assertRaises(QueueConflict):
            await self.store.submit([Enqueue("c", Message("t", b"other", 1), 2000, seq=1)])
        self.flushLoggedErrors(QueueConflict)
        self.assertEqual(
            await self.store.read_queue("c", 0, 10), [QueuedMessage(1, kept, queued_at=1000)]
        )
        self.assertEqual(await self.store.submit([Enqueue("c", kept)]), [Queued(2, 0)])

    async def test_queue_in_seq_order(self) -> None:
        """
        Messages copied in at given seqs, in any order, read back in seq
        order; the counter goes on above the highest.
        """
        seqs = [5, 1, 9, 3, 7]
        await self.store.submit(
            [Enqueue("c", Message("t", str(s).encode(), 1), seq=s) for s in seqs]
        )
        await self.store.submit([Dequeue("c", 9)])
        (session,) = await self.store.load_sessions()
        self.assertEqual([q.seq for q in session.queue], [1, 3, 5, 7])
        self.assertEqual([q.message.payload for q in session.queue], [b"1", b"3", b"5", b"7"])
        self.assertEqual(
            await self.store.submit([Enqueue("c", Message("t", b"", 1))]), [Queued(10, 0)]
        )

    async def test_room_checked_where_the_enqueue_commits(self) -> None:
        """
        An Enqueue with a room stores nothing and answers NO_ROOM when the
        queue, with it, would hold more messages or bytes than the room; what
        leaves the queue frees its room; one without a room always fits.
        """
        room = Room(3, 10)

        def q(payload: bytes) -> Enqueue:
            return Enqueue("bob", Message("t", payload, 1), room=room)

        results = await self.store.submit([q(b"aaaa"), q(b"bbbb"), q(b"cccc"), q(b"dd"), q(b"e")])
        self.assertEqual(results, [Queued(1, 0), Queued(2, 0), NO_ROOM, Queued(3, 0), NO_ROOM])
        self.assertEqual(await self.store.submit([Dequeue("bob", 2)]), [None])
        self.assertEqual(await self.store.submit([q(b"cccc"), q(b"f")]), [Queued(4, 0), NO_ROOM])
        unlimited = Enqueue("bob", Message("t", b"x" * 100, 1))
        self.assertEqual(await self.store.submit([unlimited]), [Queued(5, 0)])
        summary = await self.store.session_summary("bob")
        self.assertEqual(summary and (summary.queued, summary.queued_bytes), (4, 110))
        payloads = [q.message.payload for q in await self.store.read_queue("bob", 0, 10)]
        self.assertEqual(payloads, [b"aaaa", b"dd", b"cccc", b"x" * 100])

    async def test_room_holds_for_many_submits_at_once(self) -> None:
        """Submits racing for the last places of a queue never take more than its room."""
        room = Room(5, 1000)
        submits = [
            self.store.submit([Enqueue("bob", Message("t", b"%d" % n, 1), room=room)])
            for n in range(12)
        ]
        results = [(await d)[0] for d in submits]
        self.assertEqual(sum(r is not NO_ROOM for r in results), 5)
        self.assertEqual(len(await self.store.read_queue("bob", 0, 100)), 5)

    async def test_push_state_round_trip(self) -> None:
        """
        A queued message comes back with when it was queued and its notice;
        MarkPushed sets pushed on it alone, and on an unknown session or seq
        does nothing.
        """
        m = Message("$sktalent/clients/bob", b"chat", 1)
        notice = '{"kind": "order_chat", "alert": "你好"}'
        await self.store.submit(
            [
                Enqueue("bob", m, 1_700_000_000_123, notice),
                Enqueue("bob", m, 1_700_000_000_456, notice),
                Enqueue("bob", m, 1_700_000_000_789),
            ]
        )
        self.assertEqual(
            await self.store.submit(
                [MarkPushed("bob", 2), MarkPushed("bob", 99), MarkPushed("nobody", 1)]
            ),
            [None, None, None],
        )
        self.assertEqual(
            await self.store.load_sessions(),
            [
                SessionRecord(
                    "bob",
                    (),
                    (
                        QueuedMessage(1, m, queued_at=1_700_000_000_123, notice=notice),
                        QueuedMessage(
                            2, m, queued_at=1_700_000_000_456, notice=notice, pushed=True
                        ),
                        QueuedMessage(3, m, queued_at=1_700_000_000_789),
                    ),
                )
            ],
        )

    async def test_hundreds_of_updates_in_one_submit(self) -> None:
        """
        A batch of 400 updates of one kind (pushes marked) commits, and the
        store goes on answering: one command of that many statements wedges
        FerretDB, so they are sent in smaller ones.
        """
        m = Message("t", b"p", 1)
        count = 400
        await self.store.submit([Enqueue("bob", m, 10, "n") for _ in range(count)])
        marking = self.store.submit([MarkPushed("bob", seq) for seq in range(1, count + 1)])
        self.assertEqual(await marking.addTimeout(60, reactor), [None] * count)
        self.assertEqual(await self.store.pending_pushes(None, 10), [])
        await self.store.ping()

    async def test_queue_rows_in_runs(self) -> None:
        """
        Messages queued, and taken off, in runs longer than one statement
        holds and mixed with other operations, leave each queue and its
        counters as applying them one by one would: one taken off twice or
        never queued counts once or not at all.
        """
        m = Message("t", b"12345", 1)
        count = 250
        queued = await self.store.submit(
            [Enqueue(c, m, 10, "n" if c == "bob" else None) for c in ["bob", "ann"] * count]
        )
        self.assertEqual(
            [r.seq for r in queued if isinstance(r, Queued)],
            [n for seq in range(1, count + 1) for n in (seq, seq)],
        )
        results = await self.store.submit(
            [
                *[Dequeue("bob", seq) for seq in range(1, count + 1)],
                Dequeue("bob", 1),  # Already gone.
                Dequeue("carol", 1),  # Never queued.
                Enqueue("ann", m, 20),
                *[Dequeue("ann", seq) for seq in range(2, count + 1)],
            ]
        )
        self.assertEqual(
            results, [None] * (count + 2) + [Queued(count + 1, 0)] + [None] * (count - 1)
        )
        summary = self.store.session_summary
        self.assertEqual(await summary("bob"), SessionSummary(0, 0, None, count))
        self.assertEqual(await summary("ann"), SessionSummary(2, 10, 10, count + 1))
        self.assertEqual([q.seq for q in await self.store.read_queue("ann", 0, 10)], [1, count + 1])
        self.assertEqual(await self.store.pending_pushes(None, 10), [])

    async def test_pending_pushes(self) -> None:
        """
        The messages with a notice not yet pushed, in (client, seq) order,
        in pages after a key, or of one client, with the client's badge.
        """
        m = Message("t", b"p", 1)
        await self.store.submit(
            [
                Enqueue("bob", m, 10, "b1"),
                Enqueue("bob", m, 20),
                Enqueue("bob", m, 30, "b3"),
                Enqueue("alice", m, 40, "a1"),
                Enqueue("carol", m, 50, "c1"),
                MarkPushed("carol", 1),
            ]
        )
        expected = [
            PendingPush("alice", 1, "a1", 40, 1),
            PendingPush("bob", 1, "b1", 10, 2),
            PendingPush("bob", 3, "b3", 30, 2),
        ]
        pending = self.store.pending_pushes
        self.assertEqual(await pending(None, 10), expected)
        self.assertEqual(await pending(None, 2), expected[:2])
        self.assertEqual(await pending(("alice", 1), 10), expected[1:])
        self.assertEqual(await pending(("bob", 1), 10), expected[2:])
        self.assertEqual(await pending(None, 10, "bob"), expected[1:])
        self.assertEqual(await pending(("bob", 1), 10, "bob"), expected[2:])
        self.assertEqual(await pending(None, 10, "carol"), [])

    async def test_attach_and_detach(self) -> None:
        """
        Attach records a connection: connected, clean or not, its
        subscriptions, what it sent unknown; Detach records what it sent;
        open_session answers all of it, with the first page of the queue,
        and None for a client without a session.
        """
        m = Message("t", b"p", 1)
        self.assertIsNone(await self.store.open_session("bob", 10))
        await self.store.submit([Enqueue("bob", m) for _ in range(3)])
        opened = await self.store.open_session("bob", 2)
        self.assertEqual(
            opened, SessionRecord("bob", (), (QueuedMessage(1, m), QueuedMessage(2, m)))
        )
        await self.store.submit([Attach("bob", (("t", 1),)), AddInbound("bob", 7)])
        self.assertEqual(
            await self.store.open_session("bob", 0),
            SessionRecord("bob", (("t", 1),), (), frozenset({7}), True, False, None),
        )
        await self.store.submit([Detach("bob", 2), Attach("carol", (), clean=True)])
        bob = await self.store.open_session("bob", 0)
        self.assertEqual(bob and bob.sent_through, 2)
        carol = await self.store.open_session("carol", 0)
        self.assertEqual(carol, SessionRecord("carol", (), (), frozenset(), True, True, None))

    async def test_connect_with_1000_queued(self) -> None:
        """
        A session with 1,000 queued opens with its first page only; the rest
        is read in pages after it, every message once, in seq order.
        """
        m = Message("t", b"p", 1)
        for start in range(0, 1000, 250):
            await self.store.submit(
                [Enqueue("bob", Message("t", b"%d" % n, 1)) for n in range(start, start + 250)]
            )
        await self.store.submit([Enqueue("carol", m)])
        opened = await self.store.open_session("bob", 64)
        assert opened is not None
        read = list(opened.queue)
        self.assertEqual(len(read), 64)
        while page := await self.store.read_queue("bob", read[-1].seq, 100):
            self.assertLessEqual(len(page), 100)
            read += page
        self.assertEqual([q.seq for q in read], list(range(1, 1001)))
        self.assertEqual([q.message.payload for q in read], [b"%d" % n for n in range(1000)])

    async def test_concurrent_enqueue_while_a_session_is_opened(self) -> None:
        """
        Enqueues committed while a session is being opened are in its first
        page or above it: reading on from the page's last seq finds each of
        them once, in order.
        """
        m = Message("t", b"p", 1)
        await self.store.submit([Enqueue("bob", m) for _ in range(5)])
        opening = self.store.open_session("bob", 64)
        landing = [
            self.store.submit([Enqueue("bob", Message("t", b"%d" % n, 1))]) for n in range(5)
        ]
        opened = await opening
        for d in landing:
            await d
        assert opened is not None
        last = opened.queue[-1].seq
        after = await self.store.read_queue("bob", last, 64)
        seqs = [q.seq for q in (*opened.queue, *after)]
        self.assertEqual(seqs, list(range(1, 11)))

    async def test_discard_session(self) -> None:
        """
        DiscardSession drops the queue up to its seq, the inbound ids,
        subscriptions and the connected flag; what was queued above stays,
        and the seq counter goes on.
        """
        m = Message("t", b"p", 1)
        await self.store.submit(
            [
                Attach("bob", (("t", 1),), clean=True),
                AddInbound("bob", 3),
                *(Enqueue("bob", m, n, "n") for n in range(3)),
            ]
        )
        await self.store.submit([DiscardSession("bob", 2), DiscardSession("nobody", 5)])
        self.assertEqual(
            await self.store.load_sessions(),
            [SessionRecord("bob", (), (QueuedMessage(3, m, queued_at=2, notice="n"),))],
        )
        self.assertEqual(await self.store.session_summary("bob"), SessionSummary(1, 1, 2, 3))
        self.assertEqual(await self.store.submit([Enqueue("bob", m)]), [Queued(4, 1)])

    async def test_connected_is_never_unset(self) -> None:
        """
        A session made by a message has not connected; Attach sets it, a
        later PutSession keeps it, and DropSession forgets it with the session.
        """
        m = Message("t", b"p", 1)
        await self.store.submit([Enqueue("bob", m), PutSession("carol", ())])
        self.assertEqual(
            [s.has_connected for s in by_client(await self.store.load_sessions())], [False, False]
        )
        await self.store.submit([Attach("bob", (("t", 1),)), Detach("bob", 1)])
        await self.store.submit([PutSession("bob", (("u", 1),))])
        self.assertEqual(
            by_client(await self.store.load_sessions()),
            [
                SessionRecord(
                    "bob", (("u", 1),), (QueuedMessage(1, m),), has_connected=True, sent_through=1
                ),
                SessionRecord("carol", ()),
            ],
        )
        await self.store.submit([DropSession("bob"), PutSession("bob", ())])
        self.assertEqual(by_client(await self.store.load_sessions())[0], SessionRecord("bob", ()))

    async def test_drop_device(self) -> None:
        """DropDevice forgets the user's device only; an unknown user is no error."""
        await self.store.submit(
            [PutDevice(Device("u", "ios", "t1")), PutDevice(Device("v", "android", "t2"))]
        )
        self.assertEqual(await self.store.submit([DropDevice("u"), DropDevice("w")]), [None, None])
        self.assertIsNone(await self.store.get_device("u"))
        self.assertEqual(await self.store.get_device("v"), Device("v", "android", "t2"))

    async def test_drop_session(self) -> None:
        """DropSession forgets the session, its queue and inbound ids only."""
        m = Message("t", b"p", 1)
        await self.store.submit(
            [
                PutSession("a", (("t", 1),)),
                Enqueue("a", m),
                AddInbound("a", 2),
                PutSession("b", (("t", 1),)),
                Enqueue("b", m),
            ]
        )
        await self.store.submit([DropSession("a"), DropSession("never")])
        self.assertEqual(
            await self.store.load_sessions(),
            [SessionRecord("b", (("t", 1),), (QueuedMessage(1, m),))],
        )

    async def test_drop_then_enqueue_in_one_batch(self) -> None:
        """Operations after DropSession in the same batch start a fresh session."""
        m = Message("t", b"p", 1)
        await self.store.submit([PutSession("a", (("t", 1),)), Enqueue("a", m), Enqueue("a", m)])
        results = await self.store.submit([Enqueue("a", m), DropSession("a"), Enqueue("a", m)])
        self.assertEqual(results, [Queued(3, 0), None, Queued(1, 0)])
        self.assertEqual(
            await self.store.load_sessions(), [SessionRecord("a", (), (QueuedMessage(1, m),))]
        )

    async def test_expire(self) -> None:
        """
        expire drops what was queued before the cut but what it is told to
        keep, from the counters too, then the sessions never connected to
        with nothing queued; the rest stays.
        """
        m = Message("t", b"p", 1)
        await self.store.submit(
            [
                Enqueue("bob", m, 100, "n"),
                Enqueue("bob", m, 200),
                Enqueue("bob", m, 900),
                Enqueue("carol", m, 100),
                Attach("dave", ()),
                Enqueue("dave", m, 100),
                PutSession("erin", ()),
            ]
        )
        self.assertEqual(await self.store.expire(500, {("bob", 2)}), (3, 2))
        self.assertEqual(
            by_client(await self.store.load_sessions()),
            [
                SessionRecord(
                    "bob",
                    (),
                    (QueuedMessage(2, m, queued_at=200), QueuedMessage(3, m, queued_at=900)),
                ),
                SessionRecord("dave", (), has_connected=True, sent_through=None),
            ],
        )
        self.assertEqual(await self.store.session_summary("bob"), SessionSummary(2, 2, 200, 3))
        self.assertEqual(await self.store.expire(500, ()), (1, 0))

    async def test_queue_totals(self) -> None:
        """queue_totals counts every session, queued message and byte, and the oldest."""
        self.assertEqual(await self.store.queue_totals(), QueueTotals(0, 0, 0, None))
        await self.store.submit(
            [
                Enqueue("bob", Message("t", b"12", 1), 300),
                Enqueue("carol", Message("t", b"345", 1), 200),
                PutSession("dave", ()),
            ]
        )
        self.assertEqual(await self.store.queue_totals(), QueueTotals(3, 2, 5, 200))

    async def test_load_subscriptions(self) -> None:
        """load_subscriptions answers the sessions with subscriptions that are not clean."""
        await self.store.submit(
            [
                PutSession("bob", (("a/#", 1),)),
                Attach("carol", (("b", 0),), clean=True),
                PutSession("dave", ()),
            ]
        )
        self.assertEqual(await self.store.load_subscriptions(), [("bob", (("a/#", 1),))])

    async def test_retained(self) -> None:
        """Retained messages are set, replaced and deleted per topic."""
        await self.store.submit(
            [
                SetRetained("a", Message("a", b"1", 1, True)),
                SetRetained("b", Message("b", b"2", 0, True)),
                SetRetained("a", Message("a", b"3", 2, True)),
                SetRetained("b", None),
                SetRetained("never", None),
            ]
        )
        self.assertEqual(await self.store.load_retained(), [Message("a", b"3", 2, True)])

    async def test_bytes_round_trip(self) -> None:
        """Every byte value, and the empty payload, come back exactly."""
        await self.store.submit(
            [
                Enqueue("c", Message("t", EVERY_BYTE, 1)),
                Enqueue("c", Message("t", b"", 1)),
                SetRetained("r", Message("r", EVERY_BYTE[::-1], 1, True)),
            ]
        )
        (session,) = await self.store.load_sessions()
        self.assertEqual([q.message.payload for q in session.queue], [EVERY_BYTE, b""])
        self.assertEqual([m.payload for m in await self.store.load_retained()], [EVERY_BYTE[::-1]])

    async def test_insert_chat(self) -> None:
        """A new chat commits its `then`; the same (sender, msgid) again does not."""
        first = chat(msgid(1), 1000)
        m = Message("$sktalent/clients/bob", b"hi", 1)
        self.assertEqual(
            await self.store.submit([InsertChat(first, (Enqueue("bob", m),))]),
            [Guarded(NEW, (Queued(1, 0),))],
        )
        again = attrs.evolve(first, envelope="{}", received_at=2000)
        self.assertEqual(
            await self.store.submit([InsertChat(again, (Enqueue("bob", m), PutSession("x", ())))]),
            [Guarded(REPEATED)],
        )
        self.assertEqual(
            await self.store.load_sessions(), [SessionRecord("bob", (), (QueuedMessage(1, m),))]
        )
        self.assertEqual(await self.store.chat_history("o1", 10, None), [first])

    async def test_insert_chat_full(self) -> None:
        """
        An InsertChat whose required Enqueue finds no room is FULL: neither
        the chat nor anything of its ``then`` is stored; once there is room
        the same chat is NEW.  A full queue for an Enqueue not required only
        drops that message.
        """
        room = Room(1, 100)
        m = Message("t", b"m", 1)
        await self.store.submit([Enqueue("bob", m, room=room)])
        c = chat(msgid(1), 1000)

        def insert() -> InsertChat:
            return InsertChat(
                c,
                (
                    Enqueue("bob", m, room=room, required=True),
                    Enqueue("alice", m, room=room),
                    Enqueue("alice", m, room=room),
                ),
            )

        self.assertEqual(await self.store.submit([insert()]), [Guarded(FULL)])
        self.assertEqual(await self.store.chat_history("o1", 10, None), [])
        self.assertEqual(await self.store.read_queue("alice", 0, 10), [])
        await self.store.submit([Dequeue("bob", 1)])
        self.assertEqual(
            await self.store.submit([insert()]),
            [Guarded(NEW, (Queued(2, 0), Queued(1, 0), NO_ROOM))],
        )
        self.assertEqual(await self.store.chat_history("o1", 10, None), [c])

    async def test_insert_chat_full_after_other_operations(self) -> None:
        """
        A required Enqueue that finds no room after other operations of the
        same ``then`` undoes them too: nothing of the chat is stored.
        """
        room = Room(0, 100)
        m = Message("t", b"m", 1)
        c = chat(msgid(1), 1000)
        insert = InsertChat(
            c,
            (
                PutDevice(Device("alice", "ios", "t")),
                Enqueue("alice", m),
                Enqueue("bob", m, room=room, required=True),
            ),
        )
        self.assertEqual(await self.store.submit([insert]), [Guarded(FULL)])
        self.assertEqual(await self.store.chat_history("o1", 10, None), [])
        self.assertIsNone(await self.store.get_device("alice"))
        self.assertEqual(await self.store.read_queue("alice", 0, 10), [])
        self.assertEqual(await self.store.submit([Enqueue("alice", m)]), [Queued(1, 0)])

    async def test_insert_chat_full_counts_its_own_enqueues(self) -> None:
        """
        The room a required Enqueue finds counts the Enqueues of the same
        ``then`` before it: taking the last place first leaves it none.
        """
        room = Room(1, 100)
        m = Message("t", b"m", 1)
        insert = InsertChat(
            chat(msgid(1), 1000),
            (Enqueue("bob", m, room=room), Enqueue("bob", m, room=room, required=True)),
        )
        self.assertEqual(await self.store.submit([insert]), [Guarded(FULL)])
        self.assertEqual(await self.store.read_queue("bob", 0, 10), [])
        self.assertEqual(await self.store.chat_history("o1", 10, None), [])

    async def test_insert_chat_retried(self) -> None:
        """
        The same InsertChat committed again (a retry whose first attempt
        landed unanswered) is still NEW and its `then` lands once; a
        retransmission of the chat, another operation, is REPEATED.
        """
        m = Message("$sktalent/clients/bob", b"hi", 1)
        op = InsertChat(chat(msgid(1), 1000), (Enqueue("bob", m),))
        self.assertEqual(await self.store.submit([op]), [Guarded(NEW, (Queued(1, 0),))])
        [again] = await self.store.submit([op])
        assert isinstance(again, Guarded)
        self.assertEqual(again.outcome, NEW)
        self.assertEqual(
            await self.store.load_sessions(), [SessionRecord("bob", (), (QueuedMessage(1, m),))]
        )
        retransmitted = InsertChat(chat(msgid(1), 1000), (Enqueue("bob", m),))
        self.assertEqual(await self.store.submit([retransmitted]), [Guarded(REPEATED)])
        self.assertEqual(len((await self.store.load_sessions())[0].queue), 1)

    async def test_same_msgid_other_sender(self) -> None:
        """The msgid is unique per sender only."""
        a = chat(msgid(1), 1000, sender="alice")
        b = chat(msgid(1), 1001, sender="carol")
        self.assertEqual(
            await self.store.submit([InsertChat(a), InsertChat(b)]), [Guarded(NEW), Guarded(NEW)]
        )
        self.assertEqual(await self.store.chat_history("o1", 10, None), [a, b])

    async def test_insert_chat_twice_in_one_batch(self) -> None:
        """Within one batch the second InsertChat sees the first."""
        c = chat(msgid(1), 1000)
        m = Message("t", b"p", 1)
        results = await self.store.submit(
            [
                InsertChat(c, (Enqueue("bob", m),)),
                InsertChat(c, (Enqueue("bob", m),)),
                MarkReceived("alice", msgid(1), "bob", 1500, (Enqueue("alice", m),)),
            ]
        )
        self.assertEqual(
            results,
            [Guarded(NEW, (Queued(1, 0),)), Guarded(REPEATED), Guarded(True, (Queued(1, 0),))],
        )
        self.assertEqual(
            by_client(await self.store.load_sessions()),
            [
                SessionRecord("alice", (), (QueuedMessage(1, m),)),
                SessionRecord("bob", (), (QueuedMessage(1, m),)),
            ],
        )

    async def test_stored_chat_answered_before_room(self) -> None:
        """
        An InsertChat of a chat already stored is REPEATED or CONFLICT as
        usual, whether or not its recipient's queue has room: a full queue
        never turns a retransmission into queue_full, nor a reused msgid
        into sent.
        """
        m = Message("t", b"p", 1)
        room = Room(1, 100)
        first = InsertChat(
            chat(msgid(1), 1000), (Enqueue("bob", m, room=room, required=True),), digest="d1"
        )
        self.assertEqual(await self.store.submit([first]), [Guarded(NEW, (Queued(1, 0),))])

        def again(recipient: str, digest: str) -> InsertChat:
            c = chat(msgid(1), 2000, recipient=recipient)
            return InsertChat(c, (Enqueue(recipient, m, room=room, required=True),), digest=digest)

        results = await self.store.submit(
            [again("bob", "d1"), again("carol", "d1"), again("bob", "d2")]
        )
        self.assertEqual(results, [Guarded(REPEATED), Guarded(CONFLICT), Guarded(CONFLICT)])
        self.assertEqual(len(await self.store.read_queue("bob", 0, 10)), 1)

    async def test_insert_chat_conflict(self) -> None:
        """
        The same (sender, msgid) for another recipient or another digest is
        CONFLICT: nothing of it is stored or committed.  The same recipient
        and digest (a retransmission, whatever its receive time) is REPEATED.
        """
        m = Message("$sktalent/clients/bob", b"hi", 1)
        first = chat(msgid(1), 1000)
        self.assertEqual(await self.store.submit([InsertChat(first, digest="d1")]), [Guarded(NEW)])
        later = attrs.evolve(first, envelope="{}", received_at=2000)
        results = await self.store.submit(
            [
                InsertChat(
                    attrs.evolve(later, recipient="carol"), (Enqueue("carol", m),), digest="d1"
                ),
                InsertChat(later, (Enqueue("bob", m),), digest="d2"),
                InsertChat(later, (Enqueue("bob", m),), digest="d1"),
                MarkReceived("alice", msgid(1), "carol", 2500),
            ]
        )
        self.assertEqual(
            results,
            [Guarded(CONFLICT), Guarded(CONFLICT), Guarded(REPEATED), Guarded(False)],
        )
        self.assertEqual(await self.store.load_sessions(), [])
        self.assertEqual(await self.store.chat_history("o1", 10, None), [first])

    async def test_insert_chat_conflict_in_one_batch(self) -> None:
        """Within one batch a later InsertChat conflicts with an earlier one."""
        c = chat(msgid(1), 1000)
        m = Message("t", b"p", 1)
        results = await self.store.submit(
            [
                InsertChat(c, (Enqueue("bob", m),), digest="d1"),
                InsertChat(c, (Enqueue("bob", m),), digest="d2"),
            ]
        )
        self.assertEqual(results, [Guarded(NEW, (Queued(1, 0),)), Guarded(CONFLICT)])
        (session,) = await self.store.load_sessions()
        self.assertEqual([q.seq for q in session.queue], [1])

    async def test_insert_chat_retried_with_digest(self) -> None:
        """A retried commit is NEW even after a conflicting one was refused."""
        op = InsertChat(chat(msgid(1), 1000), digest="d1")
        self.assertEqual(await self.store.submit([op]), [Guarded(NEW)])
        other = InsertChat(chat(msgid(1), 1000, recipient="carol"), digest="d1")
        self.assertEqual(await self.store.submit([other, op]), [Guarded(CONFLICT), Guarded(NEW)])

    async def test_mark_received(self) -> None:
        """MarkReceived is True, and commits `then`, only for the chat's recipient."""
        await self.store.submit([InsertChat(chat(msgid(1), 1000))])
        m = Message("$sktalent/clients/alice", b"received", 1)
        results = await self.store.submit(
            [
                MarkReceived("alice", msgid(2), "bob", 2000, (Enqueue("alice", m),)),
                MarkReceived("alice", msgid(1), "mallory", 2000, (Enqueue("alice", m),)),
                MarkReceived("bob", msgid(1), "bob", 2000, (Enqueue("alice", m),)),
                MarkReceived("alice", msgid(1), "bob", 2000, (Enqueue("alice", m),)),
                MarkReceived("alice", msgid(1), "bob", 3000, (Enqueue("alice", m),)),
            ]
        )
        self.assertEqual(
            results,
            [
                Guarded(False),
                Guarded(False),
                Guarded(False),
                Guarded(True, (Queued(1, 0),)),
                Guarded(True, (Queued(2, 0),)),
            ],
        )
        (session,) = await self.store.load_sessions()
        self.assertEqual([q.seq for q in session.queue], [1, 2])

    async def test_nested_then(self) -> None:
        """A `then` may itself hold InsertChat, with its own result in the outer one's."""
        m = Message("t", b"p", 1)
        inner = InsertChat(chat(msgid(2), 2000), (Enqueue("bob", m),))
        outer = InsertChat(chat(msgid(1), 1000), (Enqueue("bob", m), inner))
        self.assertEqual(
            await self.store.submit([outer, PutDevice(Device("u", "ios", "t"))]),
            [Guarded(NEW, (Queued(1, 0), Guarded(NEW, (Queued(2, 0),)))), None],
        )
        self.assertEqual(
            [c.msgid for c in await self.store.chat_history("o1", 10, None)],
            [msgid(1), msgid(2)],
        )
        (session,) = await self.store.load_sessions()
        self.assertEqual([q.seq for q in session.queue], [1, 2])

    async def test_history_paging(self) -> None:
        """History is oldest first, the newest `limit`, before a msgid if given."""
        mine = [chat(msgid(n), 1000 + 10 * n) for n in range(1, 8)]
        other = [chat(msgid(100 + n), 1000 + 10 * n, o_id="o2") for n in range(1, 4)]
        # Stored out of time order on purpose.
        await self.store.submit([InsertChat(c) for c in reversed(mine + other)])
        history = self.store.chat_history
        self.assertEqual(await history("o1", 100, None), mine)
        self.assertEqual(await history("o1", 3, None), mine[-3:])
        self.assertEqual(await history("o1", 3, msgid(5)), mine[1:4])
        self.assertEqual(await history("o1", 10, msgid(2)), mine[:1])
        self.assertEqual(await history("o1", 10, msgid(1)), [])
        self.assertEqual(await history("o1", 10, msgid(999)), [])
        self.assertEqual(await history("o1", 10, msgid(101)), [])
        self.assertEqual(await history("o1", 0, None), [])
        self.assertEqual(await history("o2", 2, None), other[-2:])
        self.assertEqual(await history("nope", 10, None), [])

    async def test_history_same_time_by_msgid(self) -> None:
        """Messages received in the same millisecond are ordered by msgid."""
        chats = [chat(msgid(n), 5000) for n in (3, 1, 2)]
        await self.store.submit([InsertChat(c) for c in chats])
        ordered = sorted(chats, key=lambda c: c.msgid)
        self.assertEqual(await self.store.chat_history("o1", 10, None), ordered)
        self.assertEqual(await self.store.chat_history("o1", 10, msgid(3)), ordered[:2])

    async def test_devices(self) -> None:
        """A device is stored per user and replaced by the next PutDevice."""
        self.assertIsNone(await self.store.get_device("u"))
        await self.store.submit(
            [PutDevice(Device("u", "ios", "tok1")), PutDevice(Device("v", "android", "tok2"))]
        )
        await self.store.submit([PutDevice(Device("u", "android", "tok3"))])
        self.assertEqual(await self.store.get_device("u"), Device("u", "android", "tok3"))
        self.assertEqual(await self.store.get_device("v"), Device("v", "android", "tok2"))

    async def test_log_out(self) -> None:
        """
        LogOut marks the user's device logged out, keeping its platform; a
        user without a device gets a logged-out one of no platform; the next
        PutDevice logs in again.  Others are untouched.
        """
        await self.store.submit(
            [PutDevice(Device("u", "ios", "tok1")), PutDevice(Device("v", "android", "tok2"))]
        )
        self.assertEqual(await self.store.submit([LogOut("u"), LogOut("w")]), [None, None])
        self.assertEqual(await self.store.get_device("u"), Device("u", "ios", "tok1", True))
        self.assertEqual(await self.store.get_device("w"), Device("w", None, None, True))
        self.assertEqual(await self.store.get_device("v"), Device("v", "android", "tok2"))
        await self.store.submit([LogOut("u")])
        self.assertEqual(await self.store.get_device("u"), Device("u", "ios", "tok1", True))
        await self.store.submit([PutDevice(Device("u", "android", "tok3")), LogOut("v")])
        await self.store.submit([PutDevice(Device("w", "ios", "tok4"))])
        self.assertEqual(await self.store.get_device("u"), Device("u", "android", "tok3"))
        self.assertEqual(await self.store.get_device("v"), Device("v", "android", "tok2", True))
        self.assertEqual(await self.store.get_device("w"), Device("w", "ios", "tok4"))

    async def test_purge(self) -> None:
        """purge removes the chats (and receipts) received before the cut."""
        chats = [chat(msgid(n), 1000 * n) for n in range(1, 6)]
        await self.store.submit([InsertChat(c) for c in chats])
        await self.store.submit([MarkReceived("alice", msgid(1), "bob", 1500)])
        self.assertEqual(await self.store.purge(3000), 2)
        self.assertEqual(await self.store.chat_history("o1", 10, None), chats[2:])
        self.assertEqual(await self.store.purge(3000), 0)
        # Gone means gone: the msgid may be used again and cannot be received.
        self.assertEqual(
            await self.store.submit(
                [MarkReceived("alice", msgid(1), "bob", 9000), InsertChat(chats[0])]
            ),
            [Guarded(False), Guarded(NEW)],
        )

    async def test_bans(self) -> None:
        """
        SetBan stores when a client's ban ends, replacing the one before;
        None lifts it; another client's ban is its own.
        """
        self.assertIsNone(await self.store.get_ban("bob"))
        await self.store.submit([SetBan("bob", 5000), SetBan("carol", 7000)])
        self.assertEqual(await self.store.get_ban("bob"), 5000)
        await self.store.submit([SetBan("bob", 9000)])
        self.assertEqual(await self.store.get_ban("bob"), 9000)
        self.assertEqual(
            await self.store.submit([SetBan("bob", None), SetBan("dave", None)]),
            [
                None,
                None,
            ],
        )
        self.assertIsNone(await self.store.get_ban("bob"))
        self.assertIsNone(await self.store.get_ban("dave"))
        self.assertEqual(await self.store.get_ban("carol"), 7000)

    async def test_purge_removes_ended_bans(self) -> None:
        """purge removes the bans that ended before the cut, and only those."""
        await self.store.submit([SetBan("bob", 2999), SetBan("carol", 3000)])
        self.assertEqual(await self.store.purge(3000), 0)
        self.assertIsNone(await self.store.get_ban("bob"))
        self.assertEqual(await self.store.get_ban("carol"), 3000)

    async def test_ping(self) -> None:
        """A started store answers ping."""
        await self.store.ping()

    async def test_empty_submit(self) -> None:
        """An empty submit commits nothing and fires with no results."""
        self.assertEqual(await self.store.submit([]), [])

    async def test_concurrent_submits_get_their_own_results(self) -> None:
        """Submits made together each fire with the results of their own ops, in order."""
        submits = [
            self.store.submit(
                [InsertChat(chat(msgid(n % 7), n)), PutDevice(Device(f"u{n}", "ios", "t"))]
            )
            for n in range(20)
        ]
        results = [await d for d in submits]
        self.assertEqual(results, [[Guarded(NEW if n < 7 else REPEATED), None] for n in range(20)])

    async def test_unhandled_operation_fails(self) -> None:
        """
        An operation the store does not handle fails its commit, naming the
        operation, instead of answering None as if it were done; the store
        still commits what comes after.
        """
        with self.assertRaises(AssertionError) as caught:
            await self.store.submit([PutSession("a", ()), cast(Op, Unhandled("x"))])
        self.assertIn("Unhandled(what='x')", str(caught.exception))
        self.flushLoggedErrors(AssertionError)
        self.assertEqual(await self.store.submit([PutSession("b", ())]), [None])


class DurableContract(StoreContract):
    """What a store that keeps data across restarts adds to the contract."""

    store: SQLiteStore | MongoStore

    def make_store(self) -> SQLiteStore | MongoStore:
        raise NotImplementedError

    async def test_reopen_keeps_everything(self) -> None:
        """After stop, a new store on the same file or database sees every commit."""
        m = Message("$sktalent/clients/bob", EVERY_BYTE, 1)
        c = chat(msgid(1), 1000)
        await self.store.submit(
            [
                Attach("bob", (("$sktalent/clients/bob", 1),)),
                InsertChat(c, (Enqueue("bob", m, 1000, "notice"), Enqueue("bob", m, 2000))),
                Release("bob", 2),
                MarkPushed("bob", 1),
                AddInbound("bob", 5),
                Detach("bob", 2),
                SetRetained("r", Message("r", b"kept", 1, True)),
                PutDevice(Device("bob", "ios", "tok")),
                LogOut("carol"),
                SetBan("dave", 10_000),
            ]
        )
        sessions = await self.store.load_sessions()
        await self.store.stop()
        again = await self.started()
        self.assertEqual(await again.load_sessions(), sessions)
        self.assertEqual(
            sessions,
            [
                SessionRecord(
                    "bob",
                    (("$sktalent/clients/bob", 1),),
                    (
                        QueuedMessage(1, m, queued_at=1000, notice="notice", pushed=True),
                        QueuedMessage(2, m, released=True, queued_at=2000),
                    ),
                    frozenset({5}),
                    has_connected=True,
                    sent_through=2,
                )
            ],
        )
        self.assertEqual(await again.session_summary("bob"), SessionSummary(2, 2 * 256, 1000, 2))
        self.assertEqual(await again.submit([Enqueue("bob", m)]), [Queued(3, 1)])
        self.assertEqual(await again.load_retained(), [Message("r", b"kept", 1, True)])
        self.assertEqual(await again.chat_history("o1", 10, None), [c])
        self.assertEqual(await again.get_device("bob"), Device("bob", "ios", "tok"))
        self.assertEqual(await again.get_device("carol"), Device("carol", None, None, True))
        self.assertEqual(await again.get_ban("dave"), 10_000)
        self.assertEqual(await again.submit([InsertChat(c)]), [Guarded(REPEATED)])

    async def test_restart_in_the_middle_of_a_page(self) -> None:
        """
        A store stopped while a session's queue was being read and
        acknowledged page by page, and started again, opens the session
        with the first message not acknowledged: the rest comes once, in
        order, and seqs go on above it.
        """
        await self.store.submit([Enqueue("bob", Message("t", b"%d" % n, 1)) for n in range(200)])
        opened = await self.store.open_session("bob", 64)
        assert opened is not None
        page = await self.store.read_queue("bob", opened.queue[-1].seq, 64)
        # Acknowledged: the first page and half the second.
        await self.store.submit([Dequeue("bob", q.seq) for q in (*opened.queue, *page[:32])])
        await self.store.stop()
        again = await self.started()
        reopened = await again.open_session("bob", 64)
        assert reopened is not None
        read = list(reopened.queue)
        while more := await again.read_queue("bob", read[-1].seq, 64):
            read += more
        self.assertEqual([q.seq for q in read], list(range(97, 201)))
        self.assertEqual(
            await again.submit([Enqueue("bob", Message("t", b"", 1))]), [Queued(201, 0)]
        )

    async def test_stop_flushes_pending(self) -> None:
        """Submits not yet committed when stop() is called are committed by it."""
        pending = [self.store.submit([PutDevice(Device(f"u{n}", "ios", "t"))]) for n in range(5)]
        await self.store.stop()
        self.assertEqual([await d for d in pending], [[None]] * 5)
        again = await self.started()
        self.assertEqual(await again.get_device("u4"), Device("u4", "ios", "t"))

    async def test_group_commit_merges_submits(self) -> None:
        """Submits made in one reactor turn land in a single commit."""
        committer = self.store.committer
        commits, submits = committer.commits, committer.submits
        n = 200
        pending = [self.store.submit([Enqueue("c", Message("t", b"%d" % i, 1))]) for i in range(n)]
        self.assertEqual([await d for d in pending], [[Queued(i, 0)] for i in range(1, n + 1)])
        self.assertEqual(committer.submits - submits, n)
        self.assertEqual(committer.commits - commits, 1)
        (session,) = await self.store.load_sessions()
        self.assertEqual(len(session.queue), n)


class MemoryStoreTests(StoreContract, TestCase):
    def make_store(self) -> IStore:
        return MemoryStore()


class SQLiteStoreTests(DurableContract, TestCase):
    def prepare(self) -> None:
        self.path = self.mktemp()

    def make_store(self) -> SQLiteStore:
        return SQLiteStore(reactor, self.path)


async def drop_database(uri: str) -> None:
    pool = ConnectionPool(uri)
    try:
        await pool.drop_database(urlsplit(uri).path.lstrip("/"))
    finally:
        await pool.disconnect()


class MongoStoreTests(DurableContract, TestCase):
    def prepare(self) -> None:
        # A database of its own per test, dropped after.
        self.uri = mongo_store()
        self.addCleanup(lambda: Deferred.fromCoroutine(drop_database(self.uri)))

    def make_store(self) -> MongoStore:
        return MongoStore(reactor, self.uri)

    async def test_chat_of_an_older_server(self) -> None:
        """
        A chat stored without token or digest (by an older server) is a
        retransmission for the same recipient, whatever the digest, and a
        conflict for another.
        """
        record = chat(msgid(1), 1000)
        pool = ConnectionPool(self.uri)
        try:
            database = pool[urlsplit(self.uri).path.lstrip("/")]
            await database.chats.insert_one(
                attrs.asdict(record) | {"_id": json.dumps([record.sender, record.msgid])}
            )
        finally:
            await pool.disconnect()
        other = attrs.evolve(record, recipient="carol")
        results = await self.store.submit(
            [InsertChat(record, digest="d"), InsertChat(other, digest="d")]
        )
        self.assertEqual(results, [Guarded(REPEATED), Guarded(CONFLICT)])

    async def test_seq_not_reused_after_the_hint_went_back(self) -> None:
        """
        A session document whose next_seq went back below seqs already
        read and dequeued, as FerretDB leaves it when a node's Dequeue and
        another's Enqueue update it at once, still never gets a seq used
        twice: the next message goes above every seq used, where a reader
        past them finds it.
        """
        m = Message("t", b"p", 1)
        await self.store.submit([Enqueue("bob", m), Enqueue("bob", m), Enqueue("bob", m)])
        await self.store.submit([Dequeue("bob", 2), Dequeue("bob", 3)])
        pool = ConnectionPool(self.uri)
        self.addCleanup(pool.disconnect)
        db = pool[urlsplit(self.uri).path.lstrip("/")]
        await db.sessions.update_one({"_id": "bob"}, {"$set": {"next_seq": 2}})
        self.assertEqual(await self.store.submit([Enqueue("bob", m)]), [Queued(4, 0)])
        self.assertEqual([q.seq for q in await self.store.read_queue("bob", 3, 10)], [4])

    async def test_documents_of_an_older_server_upgrade(self) -> None:
        """
        Documents written before the push state and the queue counters
        existed load, once the store has started, as a message queued when
        it started, without a notice and not pushed, in a session whose
        client has connected (what it was sent unknown), with its counters
        counted from its queue; an entry without its session document gets
        one; seqs go on above the highest.
        """
        pool = ConnectionPool(self.uri)
        self.addCleanup(pool.disconnect)
        db = pool[urlsplit(self.uri).path.lstrip("/")]
        # A database no server of this version has started on.
        await db.meta.drop()
        await db.sessions.insert_one({"_id": "bob", "subscriptions": []})
        old = {"released": False, "topic": "t", "qos": 1, "retain": False}
        for client_id, seq, payload in (
            ("bob", 1, b"\x01"),
            ("bob", 4, b"\x02\x03"),
            ("x", 2, b""),
        ):
            await db.queue.insert_one(
                old
                | {
                    "_id": json.dumps([client_id, seq]),
                    "client_id": client_id,
                    "seq": seq,
                    "payload": Binary(payload),
                }
            )
        before = int(time.time() * 1000)
        store = await self.started()
        after = int(time.time() * 1000)
        bob, x = await store.load_sessions()
        self.assertEqual((bob.has_connected, bob.sent_through), (True, None))
        queued = bob.queue[0]
        self.assertTrue(before <= queued.queued_at <= after, queued)
        self.assertEqual(
            queued, QueuedMessage(1, Message("t", b"\x01", 1), queued_at=queued.queued_at)
        )
        self.assertEqual(
            await store.session_summary("bob"), SessionSummary(2, 3, queued.queued_at, 4)
        )
        self.assertEqual(
            await store.session_summary("x"), SessionSummary(1, 0, queued.queued_at, 2)
        )
        self.assertEqual(await store.submit([Enqueue("bob", Message("t", b"", 1))]), [Queued(5, 0)])

    async def test_retried_batch_queues_once(self) -> None:
        """
        A batch tried again after its first attempt landed unanswered queues
        each message once, at the seq the first attempt gave it, and counts
        it once.
        """
        m = Message("t", b"p", 1)
        c = chat(msgid(1), 1000)
        ops: list[Op] = [
            Enqueue("bob", m, notice="n"),
            InsertChat(c, (Enqueue("bob", m, required=True),)),
        ]
        store = self.store
        assert isinstance(store, MongoStore)
        first = await store._guard(store._commit(ops))
        # Its answer lost on the way: the committer tries the same batch again.
        store._attempted.add(id(ops))
        again = await store._guard(store._commit(ops))
        self.assertEqual(first, [Queued(1, 1), Guarded(NEW, (Queued(2, 1),))])
        self.assertEqual([q.seq for q in await store.read_queue("bob", 0, 10)], [1, 2])
        self.assertEqual(again, [Queued(1, 0), Guarded(NEW, (Queued(2, 0),))])
        self.assertEqual(
            (await self.store.open_session("bob", 0), await self.store.session_summary("bob")),
            (SessionRecord("bob", ()), SessionSummary(2, 2, 0, 2)),
        )

    async def test_counters_put_right_at_open(self) -> None:
        """
        Counters a dead batch left off the queue are put right when the
        session is opened, but not while a reservation is under way (its
        messages are not in the queue yet); a mark that old can only be a
        dead batch's, and goes.
        """
        await self.store.submit([Enqueue("bob", Message("t", b"abc", 1), notice="n")])
        pool = ConnectionPool(self.uri)
        self.addCleanup(pool.disconnect)
        sessions = pool[urlsplit(self.uri).path.lstrip("/")].sessions
        now = int(time.time() * 1000)
        off = {"queued": 5, "queued_bytes": 50, "notices": 0}
        for marks, expected in (
            ([f"{now}-a"], SessionSummary(5, 50, 0, 1)),
            ([f"{now - int(STALE_MARK * 1000) - 1}-a"], SessionSummary(1, 3, 0, 1)),
            (None, SessionSummary(1, 3, 0, 1)),
        ):
            update: dict[str, Any] = {"$set": off}
            if marks is None:
                update["$unset"] = {"reserved": ""}
            else:
                update["$set"] = off | {"reserved": marks}
            await sessions.update_one({"_id": "bob"}, update)
            await self.store.open_session("bob", 0)
            summary = await self.store.session_summary("bob")
            self.assertEqual(summary and attrs.evolve(summary, oldest_queued_at=0), expected)
            [doc] = await sessions.find({"_id": "bob"})
            self.assertEqual(doc["notices"], 0 if expected.queued == 5 else 1)

    async def two_stores(self) -> MongoStore:
        """A second store on this test's database: another process of a cluster."""
        other = MongoStore(reactor, self.uri)
        await other.start()
        self.addCleanup(other.stop)
        return other

    async def test_two_processes_enqueue_for_one_client(self) -> None:
        """
        Two stores on one database (two processes of a cluster) enqueueing
        for one client at once never allocate a seq twice, and each one's
        messages become visible in seq order.
        """
        other = await self.two_stores()
        submits = [
            store.submit([Enqueue("bob", Message("t", b"%s%d" % (name, n), 1))])
            for n in range(25)
            for name, store in ((b"a", self.store), (b"b", other))
        ]
        results = [(await d)[0] for d in submits]
        self.assertEqual(
            sorted(r.seq for r in results if isinstance(r, Queued)), list(range(1, 51))
        )
        queue = await self.store.read_queue("bob", 0, 100)
        self.assertEqual([q.seq for q in queue], list(range(1, 51)))
        for name in (b"a", b"b"):
            mine = [int(q.message.payload[1:]) for q in queue if q.message.payload[:1] == name]
            self.assertEqual(mine, list(range(25)))

    async def test_two_processes_share_the_room(self) -> None:
        """
        Two stores on one database enqueueing for one client at once never
        take more than its room between them.
        """
        if await self.ferretdb():
            raise SkipTest(
                "FerretDB v1 does not apply concurrent updates of one document"
                " atomically: 50 $inc from two connections leave about 25"
            )
        other = await self.two_stores()
        room = Room(30, 1 << 20)
        submits = [
            store.submit([Enqueue("bob", Message("t", b"%d" % n, 1), room=room)])
            for n in range(25)
            for store in (self.store, other)
        ]
        results = [(await d)[0] for d in submits]
        self.assertEqual(sum(isinstance(r, Queued) for r in results), 30)
        summary = await self.store.session_summary("bob")
        self.assertEqual(summary and summary.queued, 30)

    async def ferretdb(self) -> bool:
        """Whether the test server is FerretDB, not MongoDB."""
        pool = ConnectionPool(self.uri)
        try:
            info = await pool["admin"].command("buildInfo")
        finally:
            await pool.disconnect()
        return "ferretdbVersion" in info

    async def test_outage_held_and_retried(self) -> None:
        """
        While the server cannot be reached a submit waits, the outage is logged
        once, and the submit lands when the server is back.
        """
        target = urlsplit(self.uri)
        assert target.hostname is not None and target.port is not None
        relay = WrappingFactory(ProxyFactory(target.hostname, target.port))
        port = free_port()

        def listen() -> IListeningPort:
            # WrappingFactory is a ServerFactory in all but its annotations.
            listening: IListeningPort = reactor.listenTCP(
                port,
                relay,  # type: ignore[arg-type]
                interface="127.0.0.1",
            )
            return listening

        listening = listen()
        uri = with_database(f"mongodb://127.0.0.1:{port}", urlsplit(self.uri).path.lstrip("/"))
        store = MongoStore(reactor, uri, timeout=0.5)
        await store.start()
        self.addCleanup(store.stop)
        await store.submit([PutDevice(Device("u", "ios", "before"))])

        await maybeDeferred(listening.stopListening)
        for p in list(relay.protocols):
            p.transport.abortConnection()
        with capturedLogs() as events:
            landed = store.submit([PutDevice(Device("u", "ios", "during"))])
            for _ in range(100):
                if not store.committer.available:
                    break
                await deferLater(reactor, 0.05)
            self.assertFalse(store.committer.available)
            await deferLater(reactor, 1.5)
            self.assertNoResult(landed)
            listening = listen()
            self.addCleanup(lambda: listening.stopListening())
            self.assertEqual(await landed, [None])
        self.assertTrue(store.committer.available)
        self.assertEqual(await store.get_device("u"), Device("u", "ios", "during"))
        outages = [e for e in events if "unavailable" in e.get("log_format", "")]
        backs = [e for e in events if "is back" in e.get("log_format", "")]
        self.assertEqual((len(outages), len(backs)), (1, 1))

    async def test_slow_commit_is_waited_for(self) -> None:
        """
        A commit that takes many times the store's timeout is waited for, not
        abandoned and sent again: it lands, the store never counts as
        unavailable, and a ping answers meanwhile on a connection of its own.
        """
        store = MongoStore(reactor, self.uri, timeout=0.1)
        await store.start()
        self.addCleanup(store.stop)
        n = 600
        ops: list[Op] = [
            InsertChat(chat(msgid(i), i), (Enqueue("bob", Message("t", b"x" * 100, 1)),))
            for i in range(n)
        ]
        started = time.monotonic()
        with capturedLogs() as events:
            landed = store.submit(ops)
            await deferLater(reactor, 0.2)
            await store.ping()
            self.assertNoResult(landed)
            results = await landed.addTimeout(120, reactor)
        took = time.monotonic() - started
        self.assertGreater(took, 0.5, "not slow enough to test anything")
        self.assertEqual(results, [Guarded(NEW, (Queued(i + 1, 0),)) for i in range(n)])
        self.assertEqual((store.outages, store.committer.commits), (0, 1))
        self.assertEqual([e for e in events if e["log_level"] >= LogLevel.error], [])
        # (Not every entry read back: a read has the 0.1 s deadline too.)
        summary = await store.session_summary("bob")
        assert summary is not None
        self.assertEqual((summary.queued, summary.last_seq), (n, n))

    async def test_silent_connection_is_dropped(self) -> None:
        """
        A commit on a connection that stops answering altogether is given up
        once pings go unanswered too; it is sent again on a new connection,
        not behind what the silent one holds, and lands exactly once.
        """
        target = urlsplit(self.uri)
        assert target.hostname is not None and target.port is not None
        relay = WrappingFactory(ProxyFactory(target.hostname, target.port))
        port = free_port()
        # WrappingFactory is a ServerFactory in all but its annotations.
        listening = reactor.listenTCP(port, relay, interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(listening.stopListening)
        uri = with_database(f"mongodb://127.0.0.1:{port}", urlsplit(self.uri).path.lstrip("/"))
        store = MongoStore(reactor, uri, timeout=0.3)
        await store.start()
        self.addCleanup(store.stop)
        await store.submit([PutDevice(Device("u", "ios", "before"))])

        # Every connection so far stays open and silent, both ways.
        for wrapper in list(relay.protocols):
            wrapper.transport.pauseProducing()
            wrapper.wrappedProtocol.peer.transport.pauseProducing()
        with capturedLogs() as events:
            landed = store.submit(
                [InsertChat(chat(msgid(1), 1)), PutDevice(Device("u", "ios", "during"))]
            )
            self.assertEqual(await landed.addTimeout(30, reactor), [Guarded(NEW), None])
        self.assertEqual(store.outages, 1)
        self.assertEqual(await store.submit([InsertChat(chat(msgid(1), 1))]), [Guarded(REPEATED)])
        outages = [e for e in events if "unavailable" in e.get("log_format", "")]
        self.assertEqual(len(outages), 1)


class MongoUnreachableTests(TestCase):
    async def test_start_fails_unavailable(self) -> None:
        """With nothing listening, start() fails with StoreUnavailable, not a hang."""
        store = MongoStore(reactor, f"mongodb://127.0.0.1:{free_port()}/x", timeout=0.3)
        self.addCleanup(store.stop)
        with self.assertRaises(StoreUnavailable):
            await store.start()
        with self.assertRaises(StoreUnavailable):
            await store.ping()


@attrs.define
class HandBackend:
    """
    A back end that applies batches to a MemoryStore when the test says so,
    or fails them as told: commit timing is the test's to choose.
    """

    store: MemoryStore = attrs.Factory(MemoryStore)
    calls: list[tuple[list[Op], Deferred[list[object]]]] = attrs.Factory(list)
    # The operations of every commit the committer cancelled.
    cancelled: list[list[Op]] = attrs.Factory(list)

    def commit(self, ops: Sequence[Op]) -> Deferred[list[object]]:
        batch = list(ops)
        d: Deferred[list[object]] = Deferred(lambda _: self._cancel(batch, d))
        self.calls.append((batch, d))
        return d

    def _cancel(self, ops: list[Op], d: Deferred[list[object]]) -> None:
        self.calls.remove((ops, d))
        self.cancelled.append(ops)

    def land(self) -> list[Op]:
        ops, d = self.calls.pop(0)
        self.store.submit(ops).chainDeferred(d)
        return ops

    def fail(self, error: Exception) -> list[Op]:
        ops, d = self.calls.pop(0)
        d.errback(error)
        return ops


def device(n: int) -> PutDevice:
    return PutDevice(Device(f"u{n}", "ios", f"t{n}"))


@attrs.define
class HandProbe:
    """A liveness probe that answers when the test says."""

    calls: list[Deferred[None]] = attrs.Factory(list)

    def __call__(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.calls.append(d)
        return d


class GroupCommitterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = HandBackend()
        self.committer = GroupCommitter(self.backend.commit, self.clock, "hand")

    def test_same_turn_is_one_batch(self) -> None:
        """Submits of one reactor turn become one commit, in order, after the turn."""
        ds = [self.committer.submit([device(n), device(n + 10)]) for n in range(3)]
        self.assertEqual(self.backend.calls, [])
        self.clock.advance(0)
        self.assertEqual(
            self.backend.land(),
            [device(0), device(10), device(1), device(11), device(2), device(12)],
        )
        self.assertEqual([self.successResultOf(d) for d in ds], [[None, None]] * 3)
        self.assertEqual((self.committer.submits, self.committer.commits), (3, 1))

    def test_submits_during_commit_join_next(self) -> None:
        """What arrives while a commit runs goes in the next commit, together."""
        first = self.committer.submit([device(0)])
        self.clock.advance(0)
        later = [self.committer.submit([device(n)]) for n in range(1, 4)]
        self.clock.advance(0)
        self.assertEqual(len(self.backend.calls), 1)
        self.backend.land()
        self.assertEqual(self.successResultOf(first), [None])
        self.assertNoResult(later[0])
        self.assertEqual(self.backend.land(), [device(1), device(2), device(3)])
        self.assertEqual([self.successResultOf(d) for d in later], [[None]] * 3)

    def test_spacing(self) -> None:
        """
        With a spacing, a commit starts no sooner than that after the one
        before started, and what comes meanwhile joins it; a commit that
        took longer than the spacing is followed at once.
        """
        committer = GroupCommitter(self.backend.commit, self.clock, "hand", spacing=0.01)
        committer.submit([device(0)])
        self.clock.advance(0)
        self.backend.land()
        committer.submit([device(1)])
        self.clock.advance(0.004)
        committer.submit([device(2)])
        self.clock.advance(0.005)
        self.assertEqual(self.backend.calls, [])
        self.clock.advance(0.001)
        self.assertEqual(len(self.backend.calls), 1)
        committer.submit([device(3)])
        self.clock.advance(0.02)
        self.assertEqual(self.backend.land(), [device(1), device(2)])
        self.assertEqual(self.backend.land(), [device(3)])
        self.assertEqual(committer.commits, 3)

    def test_results_sliced_per_submit(self) -> None:
        """Each submit gets the results of its own operations only."""
        c = chat(msgid(1), 1)
        a = self.committer.submit([InsertChat(c), device(1)])
        b = self.committer.submit([InsertChat(c)])
        e = self.committer.submit([])
        self.clock.advance(0)
        self.backend.land()
        self.assertEqual(self.successResultOf(a), [Guarded(NEW), None])
        self.assertEqual(self.successResultOf(b), [Guarded(REPEATED)])
        self.assertEqual(self.successResultOf(e), [])

    def test_batch_size_bounded(self) -> None:
        """A batch stops at max_batch operations but never splits a submit."""
        committer = GroupCommitter(self.backend.commit, self.clock, "hand", max_batch=3)
        for n in range(4):
            committer.submit([device(n)])
        big = committer.submit([device(n) for n in range(10, 15)])
        committer.submit([device(20)])
        self.clock.advance(0)
        self.assertEqual(len(self.backend.land()), 3)
        self.assertEqual(len(self.backend.land()), 1)
        self.assertEqual(len(self.backend.land()), 5)
        self.assertEqual(self.successResultOf(big), [None] * 5)
        self.assertEqual(len(self.backend.land()), 1)

    def test_unavailable_is_retried_with_capped_backoff(self) -> None:
        """StoreUnavailable keeps the batch and retries it after 0.1, 0.2, 0.4, 0.4 s."""
        committer = GroupCommitter(self.backend.commit, self.clock, "hand", max_retry=0.4)
        d = committer.submit([device(1)])
        self.clock.advance(0)
        with capturedLogs() as events:
            for delay in (0.1, 0.2, 0.4, 0.4):
                self.backend.fail(StoreUnavailable("down"))
                self.assertFalse(committer.available)
                self.clock.advance(delay - 0.01)
                self.assertEqual(self.backend.calls, [])
                self.clock.advance(0.01)
                self.assertEqual(len(self.backend.calls), 1)
            self.assertNoResult(d)
            self.assertEqual(self.backend.land(), [device(1)])
        self.assertEqual(self.successResultOf(d), [None])
        self.assertTrue(committer.available)
        levels = [(e["log_level"], e["log_format"].split(" is ")[1][:4]) for e in events]
        self.assertEqual(levels, [(LogLevel.error, "unav"), (LogLevel.info, "back")])

    def test_outages_counted(self) -> None:
        """
        Each time the back end becomes unreachable counts once, however many
        retries the outage takes.
        """
        for outage in (1, 2):
            d = self.committer.submit([device(outage)])
            self.clock.advance(0)
            for delay in (0.1, 0.2):
                self.backend.fail(StoreUnavailable("down"))
                self.clock.advance(delay)
            self.assertEqual((self.committer.available, self.committer.outages), (False, outage))
            self.backend.land()
            self.successResultOf(d)
            self.assertEqual((self.committer.available, self.committer.outages), (True, outage))

    def test_later_submits_wait_behind_outage(self) -> None:
        """Submits made during an outage stay queued and keep their order."""
        first = self.committer.submit([device(1)])
        self.clock.advance(0)
        self.backend.fail(StoreUnavailable("down"))
        second = self.committer.submit([device(2)])
        self.clock.advance(0.1)
        self.assertEqual(self.backend.land(), [device(1)])
        self.assertEqual(self.backend.land(), [device(2)])
        self.assertEqual(self.successResultOf(first), [None])
        self.assertEqual(self.successResultOf(second), [None])

    def test_other_errors_fail_only_their_batch(self) -> None:
        """A batch failing with a bug is failed and logged; the next one still commits."""
        bad = [self.committer.submit([device(1)]), self.committer.submit([device(2)])]
        self.clock.advance(0)
        good = self.committer.submit([device(3)])
        self.backend.fail(ValueError("bug"))
        for d in bad:
            self.failureResultOf(d, ValueError)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertTrue(self.committer.available)
        self.assertEqual(self.backend.land(), [device(3)])
        self.assertEqual(self.successResultOf(good), [None])

    def test_stop_flushes(self) -> None:
        """stop() commits what is pending and fires after it landed."""
        d = self.committer.submit([device(1)])
        stopped = self.committer.stop()
        self.assertEqual(len(self.backend.calls), 1)
        self.assertNoResult(stopped)
        self.backend.land()
        self.assertEqual(self.successResultOf(d), [None])
        self.successResultOf(stopped)
        self.failureResultOf(self.committer.submit([device(2)]), StoreUnavailable)

    def test_stop_during_outage_gives_up_after_one_try(self) -> None:
        """stop() during an outage tries once more, then fails what is left."""
        d = self.committer.submit([device(1)])
        self.clock.advance(0)
        self.backend.fail(StoreUnavailable("down"))
        stopped = self.committer.stop()
        self.backend.fail(StoreUnavailable("still down"))
        self.failureResultOf(d, StoreUnavailable)
        self.successResultOf(stopped)

    def test_stop_when_idle(self) -> None:
        """stop() with nothing pending fires at once."""
        self.successResultOf(self.committer.stop())

    def test_latency_recorded_per_submit(self) -> None:
        """The histogram gets each submit's time from submit to durable."""
        registry = CollectorRegistry()
        histogram = Histogram("commit_seconds", "test", registry=registry)
        committer = GroupCommitter(self.backend.commit, self.clock, "hand", histogram)
        committer.submit([device(1)])
        self.clock.advance(0.5)
        committer.submit([device(2)])
        self.backend.land()
        self.clock.advance(0.25)
        self.backend.land()
        self.assertEqual(registry.get_sample_value("commit_seconds_count"), 2)
        self.assertEqual(registry.get_sample_value("commit_seconds_sum"), 0.5 + 0.25)


class PatientCommitterTests(SynchronousTestCase):
    """
    A committer whose back end is probed while a commit waits, and whose
    batches follow how long commits take.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = HandBackend()
        self.probe = HandProbe()

    def committer(self, max_batch: int = 1000, max_bytes: int = 2**20) -> GroupCommitter:
        return GroupCommitter(
            self.backend.commit,
            self.clock,
            "hand",
            alive=self.probe,
            patience=10.0,
            max_batch=max_batch,
            max_bytes=max_bytes,
        )

    def test_slow_commit_is_waited_for(self) -> None:
        """
        While the back end answers its probe, a commit is waited for however
        long it takes: never cancelled or sent again, and the store stays
        available (slow, and said so once).
        """
        committer = self.committer()
        d = committer.submit([device(1)])
        self.clock.advance(0)
        with capturedLogs() as events:
            for n in range(1, 4):
                self.clock.advance(10)
                self.assertEqual(len(self.probe.calls), n)
                self.probe.calls[-1].callback(None)
            self.assertEqual((len(self.backend.calls), self.backend.cancelled), (1, []))
            self.assertTrue(committer.available)
            self.assertTrue(committer.slow)
            self.backend.land()
        self.assertEqual(self.successResultOf(d), [None])
        self.assertFalse(committer.slow)
        self.clock.advance(100)
        self.assertEqual(len(self.probe.calls), 3)
        levels = [(e["log_level"], e["log_format"].split(" is ")[1][:4]) for e in events]
        self.assertEqual(levels, [(LogLevel.warn, "slow"), (LogLevel.info, "no l")])
        self.assertEqual(committer.outages, 0)

    def test_quick_commit_is_not_probed(self) -> None:
        """A commit that lands within patience costs no probe."""
        committer = self.committer()
        d = committer.submit([device(1)])
        self.clock.advance(9)
        self.backend.land()
        self.successResultOf(d)
        self.clock.advance(100)
        self.assertEqual(self.probe.calls, [])

    def test_gone_store_gives_the_commit_up(self) -> None:
        """
        A probe that fails gives the waiting commit up as unavailable; the
        retry sends the same operations, not what arrived meanwhile.
        """
        committer = self.committer()
        first = committer.submit([device(1)])
        self.clock.advance(0)
        later = committer.submit([device(2)])
        self.clock.advance(10)
        self.probe.calls[0].errback(StoreUnavailable("no answer"))
        self.assertEqual(self.backend.cancelled, [[device(1)]])
        self.assertEqual((committer.available, committer.outages), (False, 1))
        self.assertEqual(self.backend.calls, [])
        self.clock.advance(0.1)
        self.assertEqual(self.backend.land(), [device(1)])
        self.assertEqual(self.successResultOf(first), [None])
        self.assertTrue(committer.available)
        self.assertEqual(self.backend.land(), [device(2)])
        self.assertEqual(self.successResultOf(later), [None])

    def test_silent_probe_is_a_gone_store(self) -> None:
        """A probe unanswered for patience seconds counts as a failed one."""
        committer = self.committer()
        d = committer.submit([device(1)])
        self.clock.advance(0)
        self.clock.advance(10)
        self.assertEqual(len(self.probe.calls), 1)
        with capturedLogs() as events:
            self.clock.advance(10)
        self.assertEqual(self.backend.cancelled, [[device(1)]])
        self.assertFalse(committer.available)
        [event] = events
        self.assertIn("did not answer within 10 s", str(event["error"]))
        self.assertNoResult(d)

    def test_batch_never_grows_on_retry(self) -> None:
        """
        However many submits pile up during an outage, each retry sends the
        batch it started with; they follow in batches of their own.
        """
        committer = self.committer(max_batch=4)
        committer.submit([device(0)])
        self.clock.advance(0)
        for n in range(1, 10):
            committer.submit([device(n)])
        for delay in (0.1, 0.2, 0.4):
            self.backend.fail(StoreUnavailable("down"))
            self.clock.advance(delay)
            self.assertEqual(self.backend.calls[0][0], [device(0)])
        self.assertEqual(self.backend.land(), [device(0)])
        self.assertEqual(self.backend.land(), [device(n) for n in range(1, 5)])
        self.assertEqual(self.backend.land(), [device(n) for n in range(5, 9)])
        self.assertEqual(self.backend.land(), [device(9)])

    def test_batch_bounded_by_bytes(self) -> None:
        """
        A batch also stops at max_bytes of operations (roughly, by op_bytes),
        and a single larger submit still goes whole.
        """
        big = Enqueue("c", Message("t", b"x" * 1000, 1))
        self.assertEqual(op_bytes(big), op_bytes(Dequeue("c", 1)) + 1000)
        self.assertEqual(
            op_bytes(InsertChat(chat(msgid(1), 1), (big,))),
            op_bytes(Dequeue("c", 1)) + len(chat(msgid(1), 1).envelope) + op_bytes(big),
        )
        committer = self.committer(max_bytes=3 * op_bytes(big))
        for _ in range(5):
            committer.submit([big])
        committer.submit([big] * 4)
        self.clock.advance(0)
        self.assertEqual([len(self.backend.land()) for _ in range(3)], [3, 2, 4])

    def test_slow_commits_shrink_batches(self) -> None:
        """
        A commit slower than the target halves the batch; a full batch landing
        in under half the target doubles it back, up to max_batch.
        """
        committer = self.committer(max_batch=8)
        ds = [committer.submit([device(n)]) for n in range(30)]
        self.clock.advance(0)
        sizes = []
        for took in (2.0, 1.2, 0.0, 0.0, 0.0, 0.0):
            self.clock.advance(took)
            sizes.append(len(self.backend.land()))
        self.assertEqual(sizes, [8, 4, 2, 4, 8, 4])
        self.assertEqual([self.successResultOf(d) for d in ds], [[None]] * 30)
        self.assertEqual(committer.limit, 8)

    def test_round_trips_do_not_shrink_batches(self) -> None:
        """
        Where halving the batch did not shorten the commit (its time is round
        trips, not size), the batch goes back to its size and stays there.
        """
        committer = self.committer(max_batch=8)
        for n in range(40):
            committer.submit([device(n)])
        self.clock.advance(0)
        sizes = []
        for _ in range(5):
            self.clock.advance(1.5)
            sizes.append(len(self.backend.land()))
        self.assertEqual(sizes, [8, 4, 8, 8, 8])

    def test_recovers_when_load_stops(self) -> None:
        """
        Overloaded (twenty submits a second against commits of 0.1 s per
        operation, clients holding at most 64 unanswered), the committer keeps
        commits within the target after the first slow one, lands everything
        in order, is idle again within the time its backlog takes, and commits
        the next submit at once.
        """
        committer = self.committer()
        submitted: list[Deferred[list[object]]] = []
        landed: list[Op] = []
        sizes: list[int] = []
        began = 0.0
        while len(submitted) < 400 or self.backend.calls:
            if len(submitted) < 400 and sum(not d.called for d in submitted) < 64:
                submitted += [committer.submit([device(len(submitted) + i)]) for i in range(2)]
                stopped = self.clock.seconds()
            self.clock.advance(0.1)
            if not self.backend.calls:
                began = self.clock.seconds()
            elif self.clock.seconds() - began >= 0.1 * len(self.backend.calls[0][0]) - 1e-9:
                sizes.append(len(self.backend.calls[0][0]))
                landed += self.backend.land()
                began = self.clock.seconds()
        self.assertEqual(landed, [device(n) for n in range(400)])
        self.assertEqual([self.successResultOf(d) for d in submitted], [[None]] * 400)
        # One commit over the 1 s target, and none after it.
        over = [n for n, size in enumerate(sizes) if size * 0.1 > 1.0]
        self.assertEqual(len(over), 1, sizes)
        self.assertLessEqual(self.clock.seconds() - stopped, 64 * 0.1 + 1)
        self.assertTrue(committer.available)
        self.assertEqual(committer.outages, 0)
        d = committer.submit([device(400)])
        self.clock.advance(0)
        self.backend.land()
        self.assertEqual(self.successResultOf(d), [None])


class OpenStoreTests(SynchronousTestCase):
    def test_memory(self) -> None:
        """memory: is the in-process store."""
        self.assertIsInstance(open_store("memory:", Clock()), MemoryStore)

    def test_sqlite(self) -> None:
        """sqlite:PATH is the SQLite store on PATH."""
        store = open_store("sqlite:some/file.sqlite3", Clock())
        self.assertIsInstance(store, SQLiteStore)
        self.assertEqual(store.name, "sqlite")

    def test_mongodb(self) -> None:
        """mongodb://HOST:PORT/DB is the MongoDB store, not connected yet."""
        self.assertIsInstance(open_store("mongodb://127.0.0.1:1/db", Clock()), MongoStore)

    def test_bad_uris(self) -> None:
        """A URI that names no usable store is a ValueError in one sentence."""
        for uri in ("", "sqlite:", "mysql://x/db", "mongodb://127.0.0.1:1", "mongodb://"):
            with self.assertRaises(ValueError) as raised:
                open_store(uri, Clock())
            message = str(raised.exception)
            self.assertIn(repr(uri), message)
            self.assertNotIn("\n", message)
