"""
The logic of a cluster node (sktalent/cluster/node.py) with an in-memory
Redis and recording local servers: presence, routing, takeover, failures.
"""

from __future__ import annotations

import attrs
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sktalent.cluster.carried import MAX_BYTES, MAX_MESSAGES, Carried, uncarry
from sktalent.cluster.interfaces import BackendDown, encode_message
from sktalent.cluster.node import ClusterNode
from sktalent.failures import StartFailure
from sktalent.mqtt.interfaces import ServiceUnavailable
from sktalent.mqtt.session import Outgoing
from sktalent.store.interfaces import Message

from .fakecluster import FakeBackend, FakeLocal, FakeRedis

LEASE = 10.0
TICK = LEASE / 4


@attrs.define(eq=False)
class Member:
    node: ClusterNode
    local: FakeLocal
    backend: FakeBackend


class ClusterCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.redis = FakeRedis(self.clock)

    def member(self, name: str, start: bool = True) -> Member:
        backend = FakeBackend(self.redis, name)
        node = ClusterNode(name, backend, self.clock, lease_ms=int(LEASE * 1000))
        local = FakeLocal(self.clock)
        node.attach(local)
        if start:
            self.successResultOf(node.start())
        return Member(node, local, backend)

    def connect(self, member: Member, user: str) -> None:
        """A client of user connects to member: claimed, opened, attached."""
        self.successResultOf(member.node.before_open(user))
        member.local.users[user] = int(self.clock.seconds() * 1000)
        member.node.opened(user)

    def leave(self, member: Member, user: str) -> None:
        member.local.users.pop(user, None)
        member.node.closed(user)

    def where(self, member: Member, user: str) -> str | None:
        holder = self.successResultOf(member.node.locate(user))
        return None if holder is None else holder.node

    def turn(self) -> None:
        """Let one reactor turn pass: batched routing runs."""
        self.clock.advance(0)


class StartTests(ClusterCase):
    def test_lease(self) -> None:
        """A started node holds its lease, renewed while it runs."""
        a = self.member("a")
        self.assertEqual(self.redis.leases["a"][0], a.node.incarnation)
        self.clock.advance(LEASE * 3)
        self.assertGreater(self.redis.leases["a"][1], self.clock.seconds())

    def test_redis_never_answers(self) -> None:
        """A start without Redis fails after the start timeout, in one line naming --cluster."""
        self.redis.up = False
        a = self.member("a", start=False)
        d = a.node.start()
        self.clock.advance(a.node.start_timeout)
        failure = self.failureResultOf(d, StartFailure)
        self.assertIn("--cluster", str(failure.value))

    def test_waits_for_previous_process(self) -> None:
        """
        A node restarted under its name waits for its previous process's
        lease to run out rather than failing.
        """
        old = self.member("a")
        assert old.node._ticker is not None
        old.node._ticker.stop()  # Killed: no more renewals.
        new = self.member("a", start=False)
        d = new.node.start()
        self.assertNoResult(d)
        self.clock.pump([1.0] * int(LEASE + 1))
        self.successResultOf(d)
        self.assertEqual(self.redis.leases["a"][0], new.node.incarnation)

    def test_name_in_use(self) -> None:
        """A second live process under the same name cannot start."""
        self.member("a")
        twin = self.member("a", start=False)
        d = twin.node.start()
        self.clock.pump([1.0] * int(LEASE + 3))
        failure = self.failureResultOf(d, StartFailure)
        self.assertIn("--node a", str(failure.value))

    def test_stop_gives_lease_back(self) -> None:
        """A stopped node's users are offline at once, not when its lease runs out."""
        a, b = self.member("a"), self.member("b")
        self.connect(a, "alice")
        self.successResultOf(a.node.stop())
        self.assertIsNone(self.where(b, "alice"))


class PresenceTests(ClusterCase):
    def test_seen_from_every_node(self) -> None:
        """A user connected to one node is online, there, from every node."""
        a, b = self.member("a"), self.member("b")
        self.connect(a, "alice")
        self.assertEqual(self.where(b, "alice"), "a")
        self.assertEqual(self.where(a, "alice"), "a")
        self.leave(a, "alice")
        self.assertIsNone(self.where(b, "alice"))

    def test_dead_node_users_offline(self) -> None:
        """
        The users of a node that died without a word are offline once its
        lease runs out.
        """
        a, b = self.member("a"), self.member("b")
        self.connect(a, "alice")
        a.backend.cut = True  # Killed: silent from now on.
        assert a.node._ticker is not None
        a.node._ticker.stop()
        self.assertEqual(self.where(b, "alice"), "a")
        self.clock.advance(LEASE)
        self.assertIsNone(self.where(b, "alice"))

    def test_local_takeover_keeps_presence(self) -> None:
        """
        A second connection on the same node takes the session over: the
        user stays online until that one ends.
        """
        a, b = self.member("a"), self.member("b")
        self.connect(a, "alice")
        self.successResultOf(a.node.before_open("alice"))
        a.node.opened("alice")
        self.assertEqual(self.where(b, "alice"), "a")
        a.node.closed("alice")
        self.assertIsNone(self.where(b, "alice"))

    def test_reconnecting_keeps_presence(self) -> None:
        """A connection ending while the same user connects here again leaves it online."""
        a, b = self.member("a"), self.member("b")
        self.connect(a, "alice")
        self.successResultOf(a.node.before_open("alice"))
        a.node.closed("alice")
        self.assertEqual(self.where(b, "alice"), "a")
        a.node.opened("alice")
        self.assertEqual(self.where(b, "alice"), "a")

    def test_failed_open_releases(self) -> None:
        """
        A CONNECT whose connection went before its session opened holds the
        user's presence no longer than open_timeout.
        """
        a, b = self.member("a"), self.member("b")
        self.successResultOf(a.node.before_open("alice"))
        self.clock.pump([TICK] * int(a.node.open_timeout / TICK + 2))
        self.assertIsNone(self.where(b, "alice"))

    def test_redis_down(self) -> None:
        """
        While Redis is down a CONNECT is refused as server unavailable and
        the presence API fails with BackendDown.
        """
        a = self.member("a")
        self.redis.go_down()
        failure = self.failureResultOf(a.node.before_open("alice"), BackendDown)
        self.assertIsInstance(failure.value, ServiceUnavailable)
        self.failureResultOf(a.node.locate("alice"), BackendDown)


class TakeoverTests(ClusterCase):
    def test_old_node_closes_and_flushes_first(self) -> None:
        """
        A user connecting to b while connected to a: a closes its connection
        and flushes, and only then may b open the session.
        """
        a, b = self.member("a"), self.member("b")
        self.connect(a, "alice")
        a.local.hold_flush = True
        d = b.node.before_open("alice")
        self.assertEqual(a.local.released, ["alice"])
        self.assertNoResult(d)
        a.local.flushing[0].callback(None)
        self.successResultOf(d)
        self.assertEqual(self.where(a, "alice"), "b")
        # a's connection ending afterwards leaves b's presence alone.
        a.node.closed("alice")
        self.assertEqual(self.where(a, "alice"), "b")

    def test_old_node_silent(self) -> None:
        """An old node that does not answer is waited for only release_timeout seconds."""
        a, b = self.member("a"), self.member("b")
        self.connect(a, "alice")
        a.local.hold_flush = True
        d = b.node.before_open("alice")
        self.clock.advance(b.node.release_timeout)
        self.successResultOf(d)

    def test_old_node_gone(self) -> None:
        """An old node nobody hears (killed, lease still running) is not waited for."""
        a, b = self.member("a"), self.member("b")
        self.connect(a, "alice")
        a.backend.cut = True
        self.successResultOf(b.node.before_open("alice"))

    def test_rate_limits_follow(self) -> None:
        """The old node hands the user's rate limit state to the new one."""
        a, b = self.member("a"), self.member("b")
        self.connect(a, "alice")
        a.local.rates["alice"] = "[1,2,3,4]"
        self.connect(b, "alice")
        self.assertEqual(b.local.seeded, {"alice": "[1,2,3,4]"})

    def test_rate_limits_after_reconnect(self) -> None:
        """A user who left one node and connects to another soon after keeps its rate state."""
        a, b = self.member("a"), self.member("b")
        self.connect(a, "alice")
        a.local.rates["alice"] = "[0,0,0,0]"
        self.leave(a, "alice")
        self.clock.advance(1)
        self.connect(b, "alice")
        self.assertEqual(b.local.seeded, {"alice": "[0,0,0,0]"})

    def test_taken_while_opening(self) -> None:
        """
        A user claimed by b while still opening on a is closed on a once
        open there: the later CONNECT wins.
        """
        a, b = self.member("a"), self.member("b")
        self.successResultOf(a.node.before_open("alice"))
        self.successResultOf(b.node.before_open("alice"))
        self.assertEqual(a.local.released, [])
        a.local.users["alice"] = 0
        a.node.opened("alice")
        self.assertEqual(a.local.released, ["alice"])
        self.assertEqual(self.where(a, "alice"), "b")

    def test_disconnect(self) -> None:
        """An operator's disconnect on any node closes the user's connection where it is."""
        a, b = self.member("a"), self.member("b")
        self.connect(a, "alice")
        self.successResultOf(b.node.disconnect("alice"))
        self.assertEqual((a.local.disconnected, b.local.disconnected), (["alice"], []))


class RoutingTests(ClusterCase):
    def test_wakes_the_holding_node(self) -> None:
        """What is committed for a user connected elsewhere wakes that node, not a push."""
        a, b = self.member("a"), self.member("b")
        self.connect(b, "bob")
        pushed: list[str] = []
        a.node.deliver("bob", lambda: pushed.append("bob"))
        self.turn()
        self.assertEqual(b.local.woken, ["bob"])
        self.assertEqual(pushed, [])

    def test_wake_carries_the_messages(self) -> None:
        """
        A wake carries the messages committed for its user, as queued, so
        that the holding node need not read them back; one too large, or
        past what one wake carries, makes it a plain wake.
        """
        a, b = self.member("a"), self.member("b")
        for user in ("bob", "carol", "dan"):
            self.connect(b, user)
        m = Message("$sktalent/clients/bob", "你好".encode(), 1)
        first = Outgoing(7, m, queued_at=1_700_000_000_000, notice='{"kind":"order_chat"}')
        second = Outgoing(8, attrs.evolve(m, retain=True), queued_at=1_700_000_000_001)
        a.node.queued_elsewhere("bob", first)
        a.node.queued_elsewhere("bob", second)
        a.node.queued_elsewhere("carol", Outgoing(1, Message("t", b"x" * (MAX_BYTES + 1), 1)))
        a.node.queued_elsewhere("dan", Outgoing(1, Message("t", b"\xff", 1)))
        for seq in range(2, MAX_MESSAGES + 3):
            a.node.queued_elsewhere("dan", Outgoing(seq, Message("t", b"x", 1)))
        self.turn()
        self.assertEqual(sorted(b.local.woken), ["bob", "carol", "dan"])
        self.assertEqual(
            [attrs.asdict(uncarry(d)) for d in b.local.carried["bob"]],
            [attrs.asdict(first), attrs.asdict(second)],
        )
        self.assertNotIn("carol", b.local.carried)
        self.assertNotIn("dan", b.local.carried)

    def test_wake_bounded_in_bytes(self) -> None:
        """
        What one wake carries is bounded in the bytes it takes over Redis,
        not in characters: Chinese text (three bytes a character) and text
        that JSON escapes make a wake plain sooner; ASCII text up to the
        bound is carried.
        """
        a, b = self.member("a"), self.member("b")
        users = {
            "bob": ["好" * (MAX_BYTES // 4)] * 2,
            "carol": ['"' * (MAX_BYTES // 3)] * 2,
            "dan": ["\x01" * (MAX_BYTES // 3)],
            "eve": ["x" * (MAX_BYTES // 2 - 100)] * 2,
        }
        for user, payloads in users.items():
            self.connect(b, user)
            for seq, payload in enumerate(payloads, 1):
                a.node.queued_elsewhere(user, Outgoing(seq, Message("t", payload.encode(), 1)))
        self.turn()
        self.assertEqual(sorted(b.local.woken), sorted(users))
        self.assertEqual(list(b.local.carried), ["eve"])
        self.assertEqual(len(b.local.carried["eve"]), 2)

    def test_cancelled_open_releases(self) -> None:
        """
        An open given up after its claim landed (the broker's open timed out
        while the old node flushed) leaves no presence here behind it.
        """
        a, b = self.member("a"), self.member("b")
        self.connect(b, "bob")
        b.local.hold_flush = True
        opening = a.node.before_open("bob")
        self.assertEqual(self.where(a, "bob"), "a")
        opening.cancel()
        self.failureResultOf(opening)
        self.assertNotEqual(self.where(a, "bob"), "a")

    def test_offline_pushed(self) -> None:
        """What is committed for a user connected nowhere is pushed."""
        a = self.member("a")
        pushed: list[str] = []
        a.node.deliver("bob", lambda: pushed.append("bob"))
        self.assertEqual(pushed, [])
        self.turn()
        self.assertEqual(pushed, ["bob"])

    def test_batched(self) -> None:
        """
        Everything committed in one reactor turn costs one round trip to
        Redis (the lookup, and the wakes published by the same script),
        however many users, messages and nodes.
        """
        a, b = self.member("a"), self.member("b")
        for user in ("bob", "carol", "dan"):
            self.connect(b, user)
        a.backend.calls.clear()
        for user in ("bob", "carol", "dan", "bob", "erin"):
            a.node.deliver(user)
        self.turn()
        self.assertEqual(a.backend.calls, ["route"])
        self.assertEqual(sorted(b.local.woken), ["bob", "carol", "dan"])

    def test_woken_while_opening(self) -> None:
        """A wake that arrives while the user's session is opening is replayed once attached."""
        a, b = self.member("a"), self.member("b")
        self.successResultOf(b.node.before_open("bob"))
        a.node.deliver("bob")
        self.turn()
        self.assertEqual(b.local.woken, [])
        b.local.users["bob"] = 0
        b.node.opened("bob")
        self.assertEqual(b.local.woken, ["bob"])

    def test_left_meanwhile_pushed(self) -> None:
        """
        A wake that reaches a node the user has just left is routed again:
        the user connected nowhere now, what is queued is pushed there.
        """
        a, b = self.member("a"), self.member("b")
        self.connect(b, "bob")
        a.node.deliver("bob", lambda: self.fail("a must not push: bob was online"))
        # bob's connection on b ended; its release is still on its way.
        b.local.users.pop("bob")
        self.turn()
        self.assertEqual(b.local.woken, [])
        self.assertEqual(b.local.pushed, ["bob"])
        # Released, and a wake arrives: a fresh lookup finds bob nowhere.
        b.node.closed("bob")
        b.local.pushed.clear()
        b.backend.send("b", {"k": "wake", "u": ["bob"], "h": 1})
        self.turn()
        self.assertEqual(b.local.pushed, ["bob"])

    def test_moved_meanwhile_forwarded(self) -> None:
        """A wake that reaches a node the user has left for a third goes on there."""
        a, b, c = self.member("a"), self.member("b"), self.member("c")
        self.connect(b, "bob")
        a.node.deliver("bob")
        b.local.users.pop("bob")
        self.successResultOf(c.node.before_open("bob"))
        c.local.users["bob"] = 0
        c.node.opened("bob")
        b.local.woken.clear()
        self.turn()
        self.turn()
        self.assertEqual((b.local.woken, c.local.woken), ([], ["bob"]))

    def test_waits_for_redis(self) -> None:
        """
        Routing while Redis is down waits for it: then the holding node is
        woken, or the push made.
        """
        a, b = self.member("a"), self.member("b")
        self.connect(b, "bob")
        pushed: list[str] = []
        self.redis.go_down()
        a.node.deliver("bob")
        a.node.deliver("carol", lambda: pushed.append("carol"))
        self.turn()
        self.assertEqual((b.local.woken, pushed), ([], []))
        self.redis.come_back()
        self.turn()
        self.assertIn("bob", b.local.woken)
        self.assertEqual(pushed, ["carol"])


class CarriedTests(SynchronousTestCase):
    @given(st.lists(st.text(max_size=MAX_BYTES // 2), max_size=MAX_MESSAGES + 2))
    def test_size_is_what_the_wake_takes(self, payloads: list[str]) -> None:
        """
        The size kept of what a wake carries is the UTF-8 bytes of the
        carried messages in the wake's JSON, never past the bound.
        """
        carried = Carried()
        for seq, payload in enumerate(payloads):
            if not carried.add(Outgoing(seq, Message("t", payload.encode(), 1))):
                break
        encoded = encode_message(carried.docs).encode()
        # Less the list's brackets and commas.
        self.assertEqual(carried.size, len(encoded) - max(2, len(carried.docs) + 1))
        self.assertLessEqual(carried.size, MAX_BYTES)


class RecoveryTests(ClusterCase):
    def test_catch_up_when_redis_returns_empty(self) -> None:
        """
        Redis back, even empty: each node puts its lease and presences back
        and pages in every connected user's queue, for the wakes lost.
        """
        a, b = self.member("a"), self.member("b")
        self.connect(a, "alice")
        self.connect(b, "bob")
        self.redis.go_down()
        self.redis.come_back(empty=True)
        self.turn()
        self.assertEqual((a.local.woken, b.local.woken), (["alice"], ["bob"]))
        self.assertEqual(self.where(a, "bob"), "b")
        self.assertEqual(self.where(b, "alice"), "a")

    def test_taken_during_outage(self) -> None:
        """
        A node cut from Redis while its user connected to another node lets
        go of that user when its link comes back.
        """
        a, b = self.member("a"), self.member("b")
        self.connect(a, "alice")
        a.backend.cut = True
        a.backend.changed()
        self.connect(b, "alice")
        a.backend.cut = False
        a.backend.changed()
        self.assertEqual(a.local.released, ["alice"])
        self.assertEqual(self.where(b, "alice"), "b")

    def test_left_during_outage_released_after(self) -> None:
        """A user who left while Redis was down is not left online once it is back."""
        a, b = self.member("a"), self.member("b")
        self.connect(a, "alice")
        self.redis.go_down()
        self.leave(a, "alice")
        self.redis.come_back()
        self.assertIsNone(self.where(b, "alice"))

    def test_dead_node_users_pushed_once(self) -> None:
        """
        The users of a node killed while they were connected are taken over
        by exactly one live node, which pushes what is queued for them.
        """
        a, b, c = self.member("a"), self.member("b"), self.member("c")
        for user in ("u1", "u2", "u3"):
            self.connect(a, user)
        a.backend.cut = True
        assert a.node._ticker is not None
        a.node._ticker.stop()
        self.clock.pump([TICK] * 6)
        self.assertEqual(sorted(b.local.pushed + c.local.pushed), ["u1", "u2", "u3"])

    def test_reconnected_users_not_reaped(self) -> None:
        """A user of the dead node who already connected elsewhere is not pushed."""
        a, b = self.member("a"), self.member("b")
        self.connect(a, "u1")
        self.connect(a, "u2")
        a.backend.cut = True
        assert a.node._ticker is not None
        a.node._ticker.stop()
        self.connect(b, "u1")
        self.clock.pump([TICK] * 6)
        self.assertEqual(b.local.pushed, ["u2"])

    def test_safety_sweep_bounded(self) -> None:
        """
        Every connected user is woken now and then as a safety net, a few
        per tick: never all at once.
        """
        a = self.member("a")
        for i in range(400):
            a.local.users[f"u{i}"] = 0
        self.clock.advance(TICK)
        self.assertTrue(0 < len(a.local.woken) <= 50, len(a.local.woken))
        self.clock.pump([TICK] * 30)
        self.assertEqual(len(set(a.local.woken)), 400)
