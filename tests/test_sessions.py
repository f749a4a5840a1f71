"""
Sessions as the store holds them, in memory with a Clock: opened from the
store on CONNECT (behind the gate, within a timeout), their queues read in
pages, out of memory once the connection ends, woken for what another
process queued, and released to another process.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from sktalent.mqtt import packets as p
from sktalent.mqtt.interfaces import ISessionGate
from sktalent.mqtt.plan import Plan
from sktalent.mqtt.session import Outgoing
from sktalent.store.interfaces import (
    Enqueue,
    Message,
    Op,
    QueuedMessage,
    SessionRecord,
    every_op,
)
from sktalent.store.memory import MemoryStore

from .mqttclient import Client, Harness, only


@attrs.define
class CountingStore(MemoryStore):
    """
    A MemoryStore that counts the queue entries it hands out, and whose
    session reads wait for the test while ``holding``.
    """

    handed: int = 0
    holding: bool = False
    held: list[Deferred[SessionRecord | None]] = attrs.Factory(list)

    def open_session(self, client_id: str, limit: int) -> Deferred[SessionRecord | None]:
        opened = MemoryStore.open_session(self, client_id, limit)
        if not self.holding:
            return opened.addCallback(self._count)
        held: Deferred[SessionRecord | None] = Deferred()
        self.held.append(held)
        # What the store held when asked, handed over when the test says.
        return opened.addCallback(lambda record: held.addCallback(lambda _: record))

    def _count(self, record: SessionRecord | None) -> SessionRecord | None:
        self.handed += 0 if record is None else len(record.queue)
        return record

    def read_queue(self, client_id: str, after: int, limit: int) -> Deferred[list[QueuedMessage]]:
        def count(page: list[QueuedMessage]) -> list[QueuedMessage]:
            self.handed += len(page)
            return page

        return MemoryStore.read_queue(self, client_id, after, limit).addCallback(count)

    def release(self) -> None:
        held, self.held = self.held, []
        for d in held:
            d.callback(None)


@attrs.define
class SlowCommits(MemoryStore):
    """
    A MemoryStore whose commits are answered when the test says, while
    ``slow`` (what they write is there at once, as a commit under way may
    already be); each answer is kept with the client ids it concerns.
    """

    slow: bool = False
    answers: list[tuple[set[str], Deferred[None]]] = attrs.Factory(list)

    def submit(self, ops: Sequence[Op]) -> Deferred[list[object]]:
        done = MemoryStore.submit(self, ops)
        if not self.slow:
            return done
        answer: Deferred[None] = Deferred()
        clients = {c for op in every_op(ops) if (c := getattr(op, "client_id", None))}
        self.answers.append((clients, answer))
        return done.addCallback(lambda results: answer.addCallback(lambda _: results))

    def answer(self, client_id: str | None = None) -> None:
        """Answer the commits held that concern client_id (all, without)."""
        keep = []
        for clients, d in self.answers:
            if client_id is None or client_id in clients:
                d.callback(None)
            else:
                keep.append((clients, d))
        self.answers = keep


@implementer(ISessionGate)
@attrs.define
class RecordingGate:
    """A gate that opens when the test says, and keeps what it is told."""

    waiting: list[tuple[str, Deferred[None]]] = attrs.Factory(list)
    told: list[tuple[str, str]] = attrs.Factory(list)
    shut: bool = True
    # What before_open fails with, if anything (a cluster without Redis).
    failure: Exception | None = None

    def before_open(self, client_id: str) -> Deferred[None]:
        if self.failure is not None:
            return fail(self.failure)
        if not self.shut:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.waiting.append((client_id, d))
        return d

    def opened(self, client_id: str) -> None:
        self.told.append(("opened", client_id))

    def closed(self, client_id: str) -> None:
        self.told.append(("closed", client_id))

    def queued_elsewhere(self, client_id: str, out: Outgoing | None = None) -> None:
        self.told.append(("queued_elsewhere", client_id))


def queue(store: MemoryStore, client_id: str, payloads: Sequence[bytes]) -> None:
    """Queue payloads for client_id straight in the store, as another process would."""
    store.submit([Enqueue(client_id, Message("t", payload, 1)) for payload in payloads])


def payloads(packets: Sequence[p.Packet]) -> list[bytes]:
    return [x.payload for x in only(p.Publish, packets)]


class PagingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = CountingStore()
        self.h = Harness(store=self.store)

    def connect(self, client_id: str = "s") -> tuple[Client, list[p.Packet]]:
        c = self.h.client()
        packets = c.connect(client_id, clean=False)
        self.assertEqual(only(p.ConnAck, packets[:1])[0].return_code, 0)
        return c, packets[1:]

    def test_queue_read_in_pages(self) -> None:
        """
        A client with 1,000 queued gets them all, once and in order, while
        memory never holds more of them than a window and a page, and the
        store hands out each of them once.
        """
        numbers = [b"%d" % n for n in range(1000)]
        queue(self.store, "s", numbers)
        c, packets = self.connect()
        got: list[bytes] = []
        session = self.h.broker.session("s")
        assert session is not None
        limit = self.h.broker.max_inflight + 2 * self.h.broker.max_inflight
        while packets:
            self.assertLessEqual(len(session.taken()), limit)
            for publish in only(p.Publish, packets):
                got.append(publish.payload)
                assert publish.packet_id is not None
                c.send(p.PubAck(publish.packet_id))
            packets = c.received()
        self.assertEqual(got, numbers)
        self.assertEqual(self.store.handed, 1000)

    def test_session_leaves_memory_with_its_connection(self) -> None:
        """
        Once its connection ends a persistent session is in the store only;
        a message queued for it then is stored, not loaded, and comes at the
        next CONNECT after what was unacknowledged, which comes with DUP.
        """
        queue(self.store, "s", [b"one"])
        c, packets = self.connect()
        [first] = only(p.Publish, packets)
        c.lose()
        self.assertIsNone(self.h.broker.session("s"))
        queue(self.store, "s", [b"two"])
        self.assertIsNone(self.h.broker.session("s"))
        _, packets = self.connect()
        self.assertEqual(packets[0], attrs.evolve(first, dup=True))
        self.assertEqual([x.dup for x in only(p.Publish, packets)], [True, False])
        self.assertEqual(payloads(packets), [b"one", b"two"])

    def test_wake_reads_what_another_process_queued(self) -> None:
        """
        A message queued in the store by another process reaches a connected
        client once the broker is woken for it: each once, in order, and
        nothing is read twice.
        """
        c, packets = self.connect()
        self.assertEqual(packets, [])
        queue(self.store, "s", [b"a", b"b"])
        self.assertEqual(c.received(), [])
        self.h.broker.wake("s")
        self.assertEqual(payloads(c.received()), [b"a", b"b"])
        self.h.broker.wake("s")
        self.h.broker.wake("nobody")
        self.assertEqual(c.received(), [])
        queue(self.store, "s", [b"c"])
        self.h.broker.wake("s")
        self.assertEqual(payloads(c.received()), [b"c"])
        self.assertEqual(self.store.handed, 3)

    def test_enqueue_while_the_session_is_opened(self) -> None:
        """
        Messages committed while a CONNECT is reading its session from the
        store come after the first page, each once, in order.
        """
        queue(self.store, "s", [b"1", b"2"])
        self.store.holding = True
        c = self.h.client()
        c.send(p.Connect("s", clean_session=False))
        self.assertEqual(c.received(), [])
        queue(self.store, "s", [b"3"])
        self.store.holding = False
        self.store.release()
        packets = c.received()
        self.assertEqual(packets[0], p.ConnAck(0, True))
        self.assertEqual(payloads(packets[1:]), [b"1", b"2", b"3"])


class OpenTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = CountingStore()
        self.gate = RecordingGate()
        self.h = Harness(store=self.store)
        self.h.broker.gate = self.gate

    def test_gate_before_open(self) -> None:
        """
        The session is read from the store only once the gate opened, and
        the CONNACK follows; the gate hears when it opened and closed here.
        """
        queue(self.store, "s", [b"kept"])
        c = self.h.client()
        c.send(p.Connect("s", clean_session=False))
        self.assertEqual((c.received(), self.store.handed), ([], 0))
        [(client_id, gate)] = self.gate.waiting
        self.assertEqual(client_id, "s")
        gate.callback(None)
        packets = c.received()
        self.assertEqual(packets[0], p.ConnAck(0, True))
        self.assertEqual(payloads(packets[1:]), [b"kept"])
        c.lose()
        self.assertEqual(self.gate.told, [("opened", "s"), ("closed", "s")])

    def test_store_not_answering_gets_connack_3(self) -> None:
        """
        A session the store does not hand over within the open timeout gets
        CONNACK 3, counted; the client may try again once it answers.
        """
        self.gate.shut = False
        self.store.holding = True
        c = self.h.client()
        c.send(p.Connect("s", clean_session=False))
        self.h.clock.advance(self.h.broker.open_timeout)
        self.assertEqual(c.received(), [p.ConnAck(3)])
        self.assertTrue(c.closed)
        failures = self.h.metrics.registry.get_sample_value(
            "sktalent_auth_failures_total", {"reason": "store_unavailable"}
        )
        self.assertEqual(failures, 1)
        self.store.holding = False
        self.store.release()
        self.assertEqual(self.h.client().connect("s", clean=False), [p.ConnAck(0, False)])

    def test_gate_not_opening_gets_connack_3(self) -> None:
        """A gate that does not open in time refuses the CONNECT with CONNACK 3."""
        c = self.h.client()
        c.send(p.Connect("s", clean_session=False))
        self.h.clock.advance(self.h.broker.open_timeout)
        self.assertEqual(c.received(), [p.ConnAck(3)])
        self.assertEqual(self.gate.told, [])

    def test_connects_of_one_client_one_at_a_time(self) -> None:
        """
        A second CONNECT of a client whose session is being opened waits for
        the first, then takes the session over.
        """
        first, second = self.h.client(), self.h.client()
        first.send(p.Connect("s", clean_session=False))
        second.send(p.Connect("s", clean_session=False))
        self.assertEqual(len(self.gate.waiting), 1)
        self.gate.waiting[0][1].callback(None)
        self.assertEqual(first.received(), [p.ConnAck(0, False)])
        self.assertEqual(len(self.gate.waiting), 2)
        self.gate.waiting[1][1].callback(None)
        self.assertEqual(second.received(), [p.ConnAck(0, True)])
        self.assertTrue(first.closed)

    def test_gone_while_opened(self) -> None:
        """A client gone while its session was opened leaves nothing in memory."""
        c = self.h.client()
        c.send(p.Connect("s", clean_session=False))
        c.lose()
        self.gate.waiting[0][1].callback(None)
        self.assertIsNone(self.h.broker.session("s"))
        self.assertEqual(self.gate.told, [("opened", "s"), ("closed", "s")])


class SlowCommitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = SlowCommits()
        self.h = Harness(store=self.store)

    def test_connack_not_behind_other_clients_commits(self) -> None:
        """
        A CONNECT is answered while other clients' commits are still under
        way; its queue is sent once its session's own record is durable.
        """
        queue(self.store, "s", [b"kept"])
        self.store.slow = True
        plan = Plan()
        plan.add(Enqueue("other", Message("t", b"x", 1)))
        self.h.broker.commit(plan)
        c = self.h.client()
        c.send(p.Connect("s", clean_session=False))
        self.assertEqual(c.received(), [p.ConnAck(0, True)])
        self.store.answer("s")
        # Still in order behind the other client's commit.
        self.assertEqual(c.received(), [])
        self.store.answer()
        self.assertEqual(payloads(c.received()), [b"kept"])

    def test_session_read_after_its_own_commits(self) -> None:
        """
        A CONNECT reads its session only once what this process committed
        for that client is settled (here: what its last connection
        acknowledged), so nothing acknowledged is sent again.
        """
        queue(self.store, "s", [b"1", b"2"])
        c = self.h.client()
        sent = only(p.Publish, c.connect("s", clean=False)[1:])
        self.store.slow = True
        for publish in sent:
            assert publish.packet_id is not None
            c.send(p.PubAck(publish.packet_id))
        c.lose()
        self.h.clock.advance(0)
        again = self.h.client()
        again.send(p.Connect("s", clean_session=False))
        self.assertEqual(again.received(), [])
        self.store.answer("s")
        packets = again.received()
        self.assertEqual(packets[0], p.ConnAck(0, True))
        self.assertEqual(payloads(packets[1:]), [])
        self.store.answer()
        self.assertEqual(payloads(again.received()), [])

    def test_gone_before_its_record_is_durable(self) -> None:
        """A connection gone before its session's record is durable is sent nothing."""
        queue(self.store, "s", [b"kept"])
        self.store.slow = True
        c = self.h.client()
        c.send(p.Connect("s", clean_session=False))
        self.assertEqual(c.received(), [p.ConnAck(0, True)])
        c.lose()
        self.store.answer()
        self.assertEqual(c.received(), [])
        self.assertIsNone(self.h.broker.session("s"))


class ReleaseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = SlowCommits()
        self.h = Harness(store=self.store)
        self.gate = RecordingGate(shut=False)
        self.h.broker.gate = self.gate

    def test_release_closes_and_settles(self) -> None:
        """
        Releasing a session (for another process) closes its connection as
        a takeover and fires once what that connection acknowledged is
        settled in the store: the next CONNECT, wherever, gets the rest.
        """
        queue(self.store, "s", [b"1", b"2"])
        c = self.h.client()
        first = only(p.Publish, c.connect("s", clean=False)[1:])[0]
        assert first.packet_id is not None
        self.store.slow = True
        c.send(p.PubAck(first.packet_id))
        released = self.h.broker.release("s")
        self.assertTrue(c.closed)
        self.assertIsNone(self.h.broker.session("s"))
        self.assertEqual(self.gate.told, [("opened", "s"), ("closed", "s")])
        self.assertNoResult(released)
        self.store.answer("s")
        self.successResultOf(released)
        self.store.slow = False
        again = self.h.client().connect("s", clean=False)[1:]
        self.assertEqual([(x.payload, x.dup) for x in only(p.Publish, again)], [(b"2", True)])

    def test_release_waits_for_an_open_here(self) -> None:
        """
        A session being opened here when it is released is released once
        opened: that CONNECT's connection closes without a CONNACK, and
        nothing of it stays in memory.
        """
        self.gate.shut = True
        c = self.h.client()
        c.send(p.Connect("s", clean_session=False))
        released = self.h.broker.release("s")
        self.assertNoResult(released)
        self.gate.waiting[0][1].callback(None)
        self.successResultOf(released)
        self.assertEqual(c.received(), [])
        self.assertTrue(c.closed)
        self.assertIsNone(self.h.broker.session("s"))

    def test_release_of_a_clean_session_discards_it(self) -> None:
        """
        A clean session released is discarded before the release fires: the
        next process finds nothing of it.
        """
        h = Harness(store=self.store, plain=False)
        h.client().connect("s", clean=True)
        queue(self.store, "s", [b"x"])
        self.successResultOf(h.broker.release("s"))
        summary = self.successResultOf(self.store.session_summary("s"))
        self.assertEqual(summary and summary.queued, 0)

    def test_release_of_no_session(self) -> None:
        """Nothing connected here: the release fires at once."""
        self.successResultOf(self.h.broker.release("nobody"))


class DupTests(SynchronousTestCase):
    def test_dup_after_a_crash(self) -> None:
        """
        After a crash (nothing said what the connection had sent) the head
        of the queue, as much as a window, is resent with DUP; after a
        connection that ended, exactly what it was sent.
        """
        store = MemoryStore()
        h = Harness(store=store)
        h.broker.max_inflight = 2
        queue(store, "s", [b"1", b"2", b"3", b"4"])
        c = h.client()
        self.assertEqual(len(c.connect("s", clean=False)), 3)
        # A new server on the same store: the old one died, c with it.
        h = Harness(store=store)
        h.broker.max_inflight = 2
        c = h.client()
        sent = only(p.Publish, c.connect("s", clean=False)[1:])
        self.assertEqual([(x.payload, x.dup) for x in sent], [(b"1", True), (b"2", True)])
        assert sent[0].packet_id is not None
        c.send(p.PubAck(sent[0].packet_id))
        self.assertEqual(
            [(x.payload, x.dup) for x in only(p.Publish, c.received())], [(b"3", False)]
        )
        c.lose()
        h.clock.advance(0)
        c = h.client()
        again = only(p.Publish, c.connect("s", clean=False)[1:])
        self.assertEqual([(x.payload, x.dup) for x in again], [(b"2", True), (b"3", True)])
