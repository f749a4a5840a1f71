"""
Retention: the purge schedule (at start-up, then every few hours), and what a
purge removes: chat history, queued messages and never-connected sessions
past the retention time.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sktalent.authsign import sign
from sktalent.metrics import Metrics
from sktalent.mqtt import packets as p
from sktalent.mqtt.auth import AllowEverything
from sktalent.mqtt.broker import Broker
from sktalent.retention import DAY, Retention
from sktalent.store.interfaces import PutSession, StoreUnavailable
from sktalent.store.memory import MemoryStore

from .helpers import chat
from .mqttclient import Client, only
from .test_calltalent import SECRET, CallTalentCase, HeldStore

RETENTION = 30 * DAY


@attrs.define
class PurgeLog(MemoryStore):
    """A MemoryStore that records each purge's cut, failing the first ``failing``."""

    cuts: list[int] = attrs.Factory(list)
    failing: int = 0

    def purge(self, older_than: int) -> Deferred[int]:
        self.cuts.append(older_than)
        if self.failing:
            self.failing -= 1
            return fail(StoreUnavailable("down"))
        return super().purge(older_than)


class ScheduleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = PurgeLog()
        self.metrics = Metrics()
        broker = Broker(self.store, AllowEverything(), self.metrics, self.clock)
        self.retention = Retention(self.clock, self.store, broker, self.metrics, days=30)

    def cut(self) -> int:
        return int((self.clock.seconds() - RETENTION) * 1000)

    def test_at_start_then_periodically(self) -> None:
        """
        start() purges at once, then every interval with the cut moved on;
        stop() ends it.
        """
        self.retention.start()
        self.assertEqual(self.store.cuts, [self.cut()])
        self.clock.advance(self.retention.interval - 1)
        self.assertEqual(len(self.store.cuts), 1)
        self.clock.advance(1)
        self.assertEqual(self.store.cuts[1:], [self.cut()])
        self.clock.advance(self.retention.interval)
        self.assertEqual(len(self.store.cuts), 3)
        self.retention.stop()
        self.clock.advance(self.retention.interval * 3)
        self.assertEqual(len(self.store.cuts), 3)

    def test_failure_keeps_the_schedule(self) -> None:
        """A purge that fails is logged, and the next one still runs."""
        self.store.failing = 1
        self.retention.start()
        self.assertEqual(len(self.flushLoggedErrors(StoreUnavailable)), 1)
        self.clock.advance(self.retention.interval)
        self.assertEqual(len(self.store.cuts), 2)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_stop_before_start(self) -> None:
        """stop() without start() is harmless."""
        self.retention.stop()


class ExpiryTests(CallTalentCase):
    def setUp(self) -> None:
        super().setUp()
        self.retention = Retention(self.h.clock, self.store, self.h.broker, self.h.metrics)

    def purge(self) -> None:
        self.successResultOf(self.retention.purge())

    def quiet(self, user: str) -> Client:
        """user connected without keepalive, so that days may pass."""
        c = self.h.client()
        password = sign(SECRET, user).encode()
        packets = c.connect(user, clean=False, username=user, password=password)
        self.assertEqual(only(p.ConnAck, packets[:1])[0].return_code, 0)
        return c

    def expired(self, what: str) -> float | None:
        return self.h.metrics.registry.get_sample_value("sktalent_expired_total", {"what": what})

    def stored_queue(self, user: str) -> list[int] | None:
        """The seqs of user's queue in the store; None without a session."""
        sessions = {s.client_id: s for s in self.successResultOf(self.store.load_sessions())}
        session = sessions.get(user)
        return None if session is None else [q.seq for q in session.queue]

    def test_queued_past_retention_expire(self) -> None:
        """
        A message queued longer than the retention time expires from the
        store, counted; a younger one stays.  The session, never connected
        to, goes once nothing is queued for it.
        """
        a = self.quiet("alice")
        self.publish(a, chat("alice", "bob", 1, "old"))
        self.h.clock.advance(DAY)
        self.publish(a, chat("alice", "bob", 2, "young"), 2)
        self.h.clock.advance(RETENTION - DAY)
        self.purge()
        self.assertEqual(self.stored_queue("bob"), [1, 2])
        self.h.clock.advance(1)
        self.purge()
        self.assertEqual((self.expired("message"), self.expired("session")), (1, 0))
        self.assertEqual(self.stored_queue("bob"), [2])
        self.h.clock.advance(DAY)
        self.purge()
        self.assertEqual((self.expired("message"), self.expired("session")), (2, 1))
        self.assertIsNone(self.h.broker.session("bob"))
        self.assertIsNone(self.stored_queue("bob"))
        # A user whose session went is one who never connected: they start afresh.
        _, packets = self.login("bob")
        self.assertEqual(packets, [p.ConnAck(0, False)])

    def test_connected_session_kept(self) -> None:
        """A session whose client has connected stays, with nothing queued."""
        self.user("carol").lose()
        self.h.clock.advance(RETENTION * 2)
        self.purge()
        self.assertEqual(self.stored_queue("carol"), [])
        self.assertEqual(self.expired("session"), 0)

    def test_in_flight_kept(self) -> None:
        """
        A message in flight on a live connection does not expire under it;
        one waiting behind it does, and is not sent after.
        """
        self.h.broker.max_inflight = 1
        a, bob = self.user("alice"), self.quiet("bob")
        for n in (1, 2):
            self.publish(a, chat("alice", "bob", n, f"m{n}"), n)
        [first] = [x for x in bob.received() if isinstance(x, p.Publish)]
        self.h.clock.advance(RETENTION + 1)
        self.purge()
        self.assertEqual(self.stored_queue("bob"), [1])
        assert first.packet_id is not None
        bob.send(p.PubAck(first.packet_id))
        self.assertEqual(bob.received(), [])

    def test_message_on_its_way_keeps_the_session(self) -> None:
        """
        A notification committed while the purge looks at a never-connected,
        empty session keeps the session and is delivered.
        """
        store = self.store = HeldStore(holding=False)
        self.h = self.harness(store)
        self.retention = Retention(self.h.clock, store, self.h.broker, self.h.metrics)
        self.successResultOf(store.submit([PutSession("bob", ())]))
        store.holding = True
        sent = self.app.notify("bob", "feedback", {"content": "hi"}, None)
        purged = self.retention.purge()
        store.holding = False
        store.release()
        self.successResultOf(sent)
        self.successResultOf(purged)
        self.assertEqual(self.expired("session"), 0)
        self.assertEqual(self.stored_queue("bob"), [1])
