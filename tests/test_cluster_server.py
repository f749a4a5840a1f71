"""
The server's side of cluster mode, in memory: a CONNECT waiting for the
cluster (the session gate), a session taken to another node, push decisions
for users connected elsewhere, rate limits handed over, and what operators
see of users on other nodes.
"""

from __future__ import annotations

import gc

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from sktalent.calltalent.app import CallTalent
from sktalent.calltalent.delivery import WIDE_SPAN, encode_notice
from sktalent.calltalent.rules import client_topic
from sktalent.cluster.interfaces import BackendDown
from sktalent.cluster.local import LocalServer
from sktalent.cluster.node import ClusterNode
from sktalent.mqtt import packets as p
from sktalent.mqtt.plan import Plan
from sktalent.mqtt.session import Outgoing
from sktalent.push.interfaces import PushNotice
from sktalent.store.interfaces import (
    Enqueue,
    Message,
    Queued,
    SessionRecord,
    SessionSummary,
    StoreUnavailable,
)
from sktalent.store.memory import MemoryStore

from .fakecluster import FakeBackend, FakeLocal, FakeRedis
from .helpers import msgid
from .mqttclient import Harness
from .test_calltalent import PUSH_AFTER, CallTalentCase, chat
from .test_sessions import RecordingGate

# The store's own read, which OperatorLookupTests holds back.
_SUMMARY = MemoryStore.session_summary


class GateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.gate = RecordingGate(shut=False)
        self.h = Harness(gate=self.gate)

    def test_unavailable(self) -> None:
        """A cluster that cannot decide (Redis down) is CONNACK 3, counted as such."""
        self.gate.failure = BackendDown("Redis is unavailable")
        c = self.h.client()
        self.assertEqual(c.connect("a"), [p.ConnAck(3)])
        self.assertTrue(c.closed)
        failures = self.h.metrics.registry.get_sample_value(
            "sktalent_auth_failures_total", {"reason": "cluster_unavailable"}
        )
        self.assertEqual(failures, 1)
        self.assertEqual(self.gate.told, [])

    def test_queued_elsewhere(self) -> None:
        """
        What is committed for a client whose session is not open here is
        told to the gate (another node may hold it); for one open here, not.
        """
        self.h.client().connect("here", clean=False)
        away = self.h.client()
        away.connect("away", clean=False)
        away.lose()
        plan = Plan()
        for client_id in ("here", "away"):
            self.h.broker.enqueue(plan, client_id, Message("t", b"x", 1))
        self.successResultOf(self.h.broker.commit(plan))
        self.assertIn(("queued_elsewhere", "away"), self.gate.told)
        self.assertNotIn(("queued_elsewhere", "here"), self.gate.told)


class ClusterServerCase(CallTalentCase):
    """A CallTalent server as node "a" of a cluster whose other nodes are stand-ins."""

    def setUp(self) -> None:
        super().setUp()
        self.redis = FakeRedis(self.h.clock)
        self.node = self.member("a")
        self.app.cluster = self.node
        self.delivery.cluster = self.node
        self.h.gate = self.node
        self.h.factory = self.h.make_factory()

    def member(self, name: str, local: FakeLocal | None = None) -> ClusterNode:
        node = ClusterNode(name, FakeBackend(self.redis, name), self.h.clock)
        node.attach(local or FakeLocal(self.h.clock))
        self.successResultOf(node.start())
        return node

    def elsewhere(self, user: str, name: str = "b") -> FakeLocal:
        """
        user connected to another node (its session stored, as that node
        would have): that node's local server.
        """
        self.user(user).lose()
        local = FakeLocal(self.h.clock)
        other = self.member(name, local)
        self.successResultOf(other.before_open(user))
        local.users[user] = int(self.h.clock.seconds() * 1000)
        other.opened(user)
        return local


class TakenAwayTests(ClusterServerCase):
    def test_released_without_push(self) -> None:
        """
        A session taken to another node closes here as a takeover: what was
        unacknowledged is not pushed from here, and the acknowledgements it
        made are durable before release() fires.
        """
        a, b = self.user("alice"), self.user("bob")
        self.publish(a, chat("alice", "bob", 1))
        self.publish(a, chat("alice", "bob", 2), 2)
        self.frames(a)
        first, second = (out for out in b.received() if isinstance(out, p.Publish))
        assert first.packet_id is not None
        b.send(p.PubAck(first.packet_id))
        d = self.h.broker.release("bob")
        self.assertTrue(b.closed)
        self.successResultOf(d)
        stored: list[SessionRecord] = self.successResultOf(self.store.load_sessions())
        (bob,) = [s for s in stored if s.client_id == "bob"]
        self.assertEqual(len(bob.queue), 1)
        b.lose()
        self.h.clock.advance(PUSH_AFTER * 2)
        self.assertEqual(self.pusher.pushed, [])


class PushDecisionTests(ClusterServerCase):
    def test_offline_everywhere_pushed(self) -> None:
        """A chat to a user connected nowhere in the cluster is pushed, once looked up."""
        a = self.user("alice")
        self.publish(a, chat("alice", "bob", 1))
        self.assertEqual(self.pusher.pushed, [])
        self.h.clock.advance(0)
        self.assertEqual([(u, n.reason) for u, n in self.pusher.pushed], [(("bob",), "offline")])

    def test_connected_elsewhere_not_pushed(self) -> None:
        """
        A chat to a user connected to another node is not pushed from here:
        that node is woken, and pushes if it goes unacknowledged.
        """
        other = self.elsewhere("bob")
        a = self.user("alice")
        self.publish(a, chat("alice", "bob", 1))
        self.h.clock.advance(0)
        self.assertEqual(other.woken, ["bob"])
        self.h.clock.pump([0.5] * int(PUSH_AFTER * 4))
        self.assertEqual(self.pusher.pushed, [])

    def test_woken_from_another_node(self) -> None:
        """
        A chat another node committed for bob, connected here, reaches bob
        as its wake carried it, not read back from the store (the store's
        copy differs here, to tell them apart); left unacknowledged, it is
        pushed from here after push_after.
        """
        self.node.attach(LocalServer(self.h.broker, self.app, self.delivery))
        other = self.member("b")
        bob = self.user("bob")
        # Its presence here, as the broker's gate claims it in a server.
        self.successResultOf(self.node.before_open("bob"))
        self.node.opened("bob")
        topic = client_topic("bob")
        notice = encode_notice(PushNotice("order_chat", "m1", "o1", msgid=msgid(1)))
        [queued] = self.successResultOf(
            self.store.submit([Enqueue("bob", Message(topic, b"as stored", 1), 5, notice)])
        )
        assert isinstance(queued, Queued)
        carried = Message(topic, b"as carried", 1)
        other.queued_elsewhere("bob", Outgoing(queued.seq, carried, queued_at=5, notice=notice))
        self.h.clock.advance(0)
        [delivered] = [out for out in bob.received() if isinstance(out, p.Publish)]
        self.assertEqual(delivered.payload, b"as carried")
        self.h.clock.pump([0.5] * int(PUSH_AFTER * 2 + 2))
        self.assertEqual(
            [(u, n.reason, n.msgid) for u, n in self.pusher.pushed],
            [(("bob",), "unacknowledged", msgid(1))],
        )

    def committed_elsewhere(self, local: LocalServer, n: int) -> None:
        """Chat n queued for bob by another node, which woke him without carrying it."""
        notice = encode_notice(PushNotice("order_chat", f"m{n}", "o1", msgid=msgid(n)))
        at = int(self.h.clock.seconds() * 1000)
        message = Message(client_topic("bob"), f"m{n}".encode(), 1)
        self.successResultOf(self.store.submit([Enqueue("bob", message, at, notice)]))
        local.wake("bob", routed=True)
        self.h.clock.advance(0)

    def test_plain_wakes_each_waited_for(self) -> None:
        """
        Messages another node committed for bob, connected here, and woke
        him for without carrying them are each pushed push_after after their
        wake if left unacknowledged: a wake during the wait of an earlier
        one waits on its own, as the earlier covers only what came before it.
        """
        local = LocalServer(self.h.broker, self.app, self.delivery)
        bob = self.user("bob")
        self.committed_elsewhere(local, 1)
        self.h.clock.advance(1)
        self.committed_elsewhere(local, 2)
        delivered = [out.payload for out in bob.received() if isinstance(out, p.Publish)]
        self.assertEqual(delivered, [b"m1", b"m2"])
        self.h.clock.pump([0.25] * int((PUSH_AFTER - 1 + 0.5) * 4))
        self.assertEqual([n.msgid for _, n in self.pusher.pushed], [msgid(1)])
        # Within the coalescing window of the first push: sent at its end.
        self.h.clock.pump([0.25] * 16)
        self.assertEqual([n.msgid for _, n in self.pusher.pushed], [msgid(1), msgid(2)])

    def test_fast_wakes_share_waits(self) -> None:
        """
        Wakes coming faster than WIDE_SPAN share a wait, so a client has a
        bounded number; a steady stream of them does not put off the push
        of what came first by more than WIDE_SPAN.
        """
        local = LocalServer(self.h.broker, self.app, self.delivery)
        self.user("bob")
        before = self.delivery.waiting
        self.committed_elsewhere(local, 1)
        started = self.h.clock.seconds()
        while not self.pusher.pushed and self.h.clock.seconds() < started + 2 * PUSH_AFTER:
            self.h.clock.advance(0.02)
            local.wake("bob", routed=True)
            self.assertLessEqual(self.delivery.waiting - before, PUSH_AFTER / WIDE_SPAN + 1)
        self.assertEqual([n.msgid for _, n in self.pusher.pushed], [msgid(1)])
        self.assertLessEqual(self.h.clock.seconds() - started, PUSH_AFTER + WIDE_SPAN + 0.05)

    def test_sweep_waits_for_nothing(self) -> None:
        """
        The safety sweep's wake of a connected user reads its queue and
        starts no push wait (each would cost a store read later); a wake
        routed from another node without its messages starts one.
        """
        local = LocalServer(self.h.broker, self.app, self.delivery)
        self.user("bob")
        before = self.delivery.waiting
        local.wake("bob")
        self.assertEqual(self.delivery.waiting, before)
        local.wake("bob", routed=True)
        self.assertEqual(self.delivery.waiting, before + 1)

    def test_redis_down_decided_later(self) -> None:
        """A push decision that needs Redis while it is down is made when it is back."""
        a = self.user("alice")
        self.redis.go_down()
        self.publish(a, chat("alice", "bob", 1))
        self.h.clock.advance(1)
        self.assertEqual(self.pusher.pushed, [])
        self.redis.come_back()
        self.h.clock.advance(0)
        self.assertEqual([u for u, _ in self.pusher.pushed], [("bob",)])


class OperatorTests(ClusterServerCase):
    def test_presence_elsewhere(self) -> None:
        """A user connected to another node is online, there, since its connect."""
        self.h.clock.advance(0.5)
        self.elsewhere("bob")
        self.assertTrue(self.successResultOf(self.app.is_online("bob")))
        info = self.successResultOf(self.app.session_info("bob"))
        assert info is not None
        self.assertEqual((info.online, info.node), (True, "b"))
        self.assertEqual(info.connected_since, int(self.h.clock.seconds() * 1000))
        self.assertFalse(self.successResultOf(self.app.is_online("carol")))
        self.assertIsNone(self.successResultOf(self.app.session_info("carol")))

    def test_disconnect_elsewhere(self) -> None:
        """A disconnect with a ban reaches the node holding the user, and holds everywhere."""
        other = self.elsewhere("bob")
        self.assertTrue(self.successResultOf(self.app.disconnect("bob", 60)))
        self.assertEqual(other.disconnected, ["bob"])
        self.assertEqual(self.login("bob")[1], [p.ConnAck(5)])
        self.assertFalse(self.successResultOf(self.app.disconnect("nobody", None)))

    def test_just_connected_elsewhere(self) -> None:
        """
        A user another node has just let in, whose session that node has not
        stored yet, has a session and can be disconnected from here.
        """
        local = FakeLocal(self.h.clock)
        other = self.member("b", local)
        self.successResultOf(other.before_open("carol"))
        local.users["carol"] = int(self.h.clock.seconds() * 1000)
        other.opened("carol")
        info = self.successResultOf(self.app.session_info("carol"))
        assert info is not None
        self.assertEqual((info.online, info.node, info.queued), (True, "b", 0))
        self.assertTrue(self.successResultOf(self.app.disconnect("carol", None)))
        self.assertEqual(local.disconnected, ["carol"])

    def test_redis_down(self) -> None:
        """Presence cannot be told while Redis is down: the call fails, BackendDown."""
        self.redis.go_down()
        self.failureResultOf(self.app.is_online("bob"), BackendDown)
        self.assertEqual(self.successResultOf(self.app.health()), {"store": True, "redis": False})


class OperatorLookupTests(ClusterServerCase):
    """The operator calls that need both the store and Redis ask them at once."""

    def setUp(self) -> None:
        super().setUp()
        self.bob = self.elsewhere("bob")
        # Store reads of session summaries wait until answer_store().
        self.summaries: list[tuple[Deferred[SessionSummary | None], MemoryStore, str]] = []
        self.patch(MemoryStore, "session_summary", lambda *a: self.held_summary(*a))
        backend = self.node._backend
        assert isinstance(backend, FakeBackend)
        self.redis_backend = backend
        backend.hold = {"locate"}

    def held_summary(self, store: MemoryStore, client_id: str) -> Deferred[SessionSummary | None]:
        d: Deferred[SessionSummary | None] = Deferred()
        self.summaries.append((d, store, client_id))
        return d

    def answer_store(self, failure: Exception | None = None) -> None:
        """The held store reads are answered, or fail with failure."""
        held, self.summaries = self.summaries, []
        for d, store, client_id in held:
            if failure is None:
                _SUMMARY(store, client_id).chainDeferred(d)
            else:
                d.errback(failure)

    def under_way(self) -> tuple[int, int]:
        """Store reads and Redis lookups under way."""
        return len(self.summaries), len(self.redis_backend.held)

    def test_session_info_asks_both_at_once(self) -> None:
        """
        A session's details need the store and Redis: both are asked before
        either answers, whichever answers first.
        """
        for redis_first in (True, False):
            d = self.app.session_info("bob")
            self.assertEqual(self.under_way(), (1, 1))
            if redis_first:
                self.redis_backend.answer_held()
                self.assertNoResult(d)
                self.answer_store()
            else:
                self.answer_store()
                self.assertNoResult(d)
                self.redis_backend.answer_held()
            info = self.successResultOf(d)
            assert info is not None
            self.assertEqual((info.online, info.node), (True, "b"))

    def test_disconnect_asks_both_at_once(self) -> None:
        """
        A disconnect asks the store and Redis at once whether the user has a
        session: one connected elsewhere and not stored yet is found by
        Redis, the store having answered first.
        """
        other = self.member("d", local := FakeLocal(self.h.clock))
        self.successResultOf(other.before_open("dan"))
        local.users["dan"] = int(self.h.clock.seconds() * 1000)
        other.opened("dan")
        d = self.app.disconnect("dan", None)
        self.assertEqual(self.under_way(), (1, 1))
        self.answer_store()
        self.assertNoResult(d)
        self.redis_backend.answer_held()
        self.assertTrue(self.successResultOf(d))
        self.assertEqual(local.disconnected, ["dan"])

    def test_failures_as_when_asked_in_turn(self) -> None:
        """
        Failures answer as when the store was asked before Redis: the
        store's first, even when Redis failed before it; Redis's when its
        answer is needed; none of a lookup whose answer is not needed.
        """
        d = self.app.session_info("bob")
        self.redis.go_down()
        self.redis_backend.answer_held()
        self.answer_store(StoreUnavailable("down"))
        self.failureResultOf(d, StoreUnavailable)
        self.redis.come_back()

        d = self.app.session_info("bob")
        self.answer_store()
        self.redis.go_down()
        self.redis_backend.answer_held()
        self.failureResultOf(d, BackendDown)
        self.redis.come_back()

        # bob's session is stored: where he is connected is not needed.
        disconnected = self.app.disconnect("bob", None)
        self.redis.go_down()
        self.redis_backend.answer_held()
        self.redis.come_back()
        self.answer_store()
        self.assertTrue(self.successResultOf(disconnected))
        self.assertEqual(self.bob.disconnected, ["bob"])
        # Nothing was left failed and unhandled.
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])


class RateHandoverTests(CallTalentCase):
    def test_rate_follows_the_user(self) -> None:
        """
        A sender past its rate on one server is still past it on the server
        it moves to, given the state the first handed over.
        """
        a = self.user("alice")
        for i in range(1, 70):
            self.publish(a, chat("alice", "bob", i), i)
        refusals = [f for f in self.frames(a) if f.get("error") == "rate_limited"]
        self.assertEqual(len(refusals), 1)
        state = self.app.rate_state("alice")
        assert state is not None
        other = CallTalent(
            self.h.broker,
            self.store,
            self.pusher,
            self.h.clock,
            self.h.metrics,
            self.app._limits,
            bans=self.h.bans,
        )
        other.seed_rate("alice", state)
        self.h.clock.advance(1.5)
        self.assertEqual(other.rate_state("alice"), self.app.rate_state("alice"))
        self.assertIsNone(other.rate_state("nobody"))
        other.seed_rate("carol", "not json")
        self.assertIsNone(other.rate_state("carol"))
