"""
An in-memory stand-in for the cluster's Redis (the semantics of the Lua
scripts of sktalent/cluster/redis.py, which tests/test_cluster_redis.py checks
against a real redis-server), and a recording stand-in for the local server.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from sktalent.cluster.interfaces import BackendDown, Claimed, Holder


@attrs.define(eq=False)
class FakeRedis:
    """The shared state: leases, presences, rate states, listeners."""

    clock: Clock
    up: bool = True
    # name -> (incarnation, expires at)
    leases: dict[str, tuple[str, float]] = attrs.Factory(dict)
    presence: dict[str, Holder] = attrs.Factory(dict)
    # (name, incarnation) -> users claimed
    members: dict[tuple[str, str], set[str]] = attrs.Factory(dict)
    rates: dict[str, tuple[str, float]] = attrs.Factory(dict)
    backends: list[FakeBackend] = attrs.Factory(list)

    def live(self, holder: Holder | None) -> bool:
        if holder is None:
            return False
        lease = self.leases.get(holder.node)
        return lease is not None and lease[0] == holder.incarnation and lease[1] > self.now

    @property
    def now(self) -> float:
        return self.clock.seconds()

    def go_down(self) -> None:
        self.up = False
        for backend in self.backends:
            backend.changed()

    def come_back(self, empty: bool = False) -> None:
        if empty:
            self.leases.clear()
            self.presence.clear()
            self.members.clear()
        self.up = True
        for backend in self.backends:
            backend.changed()


@attrs.define(eq=False)
class FakeBackend:
    """One node's link to FakeRedis; ``cut`` severs this node alone."""

    redis: FakeRedis
    node: str
    cut: bool = False
    calls: list[str] = attrs.Factory(list)
    sent: list[tuple[str, dict[str, Any]]] = attrs.Factory(list)
    # Calls so named wait, in held, until answer_held().
    hold: set[str] = attrs.Factory(set)
    held: list[tuple[Deferred[Any], Callable[[], Any]]] = attrs.Factory(list)
    _on_message: Callable[[Mapping[str, Any]], None] | None = None
    _on_up: Callable[[], None] | None = None
    _on_down: Callable[[], None] | None = None
    _was_up: bool = False

    @property
    def up(self) -> bool:
        return self._on_message is not None and self.redis.up and not self.cut

    def changed(self) -> None:
        if self.up != self._was_up:
            self._was_up = self.up
            callback = self._on_up if self.up else self._on_down
            if callback is not None:
                callback()

    def start(
        self,
        on_message: Callable[[Mapping[str, Any]], None],
        on_up: Callable[[], None],
        on_down: Callable[[], None],
    ) -> None:
        self._on_message, self._on_up, self._on_down = on_message, on_up, on_down
        self.redis.backends.append(self)
        self.changed()

    def stop(self) -> Deferred[None]:
        self.redis.backends.remove(self)
        self._on_message = None
        return succeed(None)

    def _call(self, name: str, answer: Callable[[], Any]) -> Deferred[Any]:
        self.calls.append(name)
        if name in self.hold:
            d: Deferred[Any] = Deferred()
            self.held.append((d, answer))
            return d
        return self._answer(answer)

    def _answer(self, answer: Callable[[], Any]) -> Deferred[Any]:
        if not self.up:
            return fail(BackendDown("down"))
        return succeed(answer())

    def answer_held(self) -> None:
        """The held calls are answered, as Redis is now."""
        held, self.held = self.held, []
        for d, answer in held:
            self._answer(answer).chainDeferred(d)

    def lease(self, incarnation: str, milliseconds: int) -> Deferred[str | None]:
        def lease() -> str | None:
            current = self.redis.leases.get(self.node)
            if current is not None and current[1] > self.redis.now and current[0] != incarnation:
                return current[0]
            if milliseconds == 0:
                self.redis.leases.pop(self.node, None)
            else:
                self.redis.leases[self.node] = (incarnation, self.redis.now + milliseconds / 1000)
                self.redis.members.setdefault((self.node, incarnation), set())
            return None

        return self._call("lease", lease)

    def claim(self, user: str, holder: Holder) -> Deferred[Claimed]:
        def claim() -> Claimed:
            r = self.redis
            old = r.presence.get(user)
            r.presence[user] = holder
            r.members.setdefault((holder.node, holder.incarnation), set()).add(user)
            rate = r.rates.get(user)
            return Claimed(
                old if r.live(old) else None,
                rate[0] if rate is not None and rate[1] > r.now else None,
            )

        return self._call("claim", claim)

    def release(self, user: str, holder: Holder, rate: str | None, rate_ms: int) -> Deferred[None]:
        def release() -> None:
            r = self.redis
            current = r.presence.get(user)
            if current is not None and (current.node, current.incarnation) == (
                holder.node,
                holder.incarnation,
            ):
                del r.presence[user]
            r.members.get((holder.node, holder.incarnation), set()).discard(user)
            if rate:
                r.rates[user] = (rate, r.now + rate_ms / 1000)

        return self._call("release", release)

    def locate(self, users: Sequence[str]) -> Deferred[list[Holder | None]]:
        def locate() -> list[Holder | None]:
            found = [self.redis.presence.get(user) for user in users]
            return [h if self.redis.live(h) else None for h in found]

        return self._call("locate", locate)

    def route(
        self,
        incarnation: str,
        hops: int,
        users: Sequence[str],
        carried: Mapping[str, Sequence[Mapping[str, Any]]],
    ) -> Deferred[list[Holder | None]]:
        def route() -> list[Holder | None]:
            found = [self.redis.presence.get(user) for user in users]
            holders = [h if self.redis.live(h) else None for h in found]
            wakes: dict[str, dict[str, Any]] = {}
            for user, holder in zip(users, holders, strict=True):
                if holder is None or (holder.node, holder.incarnation) == (self.node, incarnation):
                    continue
                wake = wakes.setdefault(holder.node, {"k": "wake", "h": hops, "u": []})
                wake["u"].append(user)
                if carried.get(user):
                    wake.setdefault("m", {})[user] = list(carried[user])
            for node, wake in wakes.items():
                self._deliver([b for b in self.redis.backends if b.node == node], wake, node)
            return holders

        return self._call("route", route)

    def reassert(self, incarnation: str, holders: Mapping[str, Holder]) -> Deferred[list[str]]:
        def reassert() -> list[str]:
            r = self.redis
            taken = []
            mine = r.members.setdefault((self.node, incarnation), set())
            for user, holder in holders.items():
                current = r.presence.get(user)
                if (
                    current is not None
                    and (current.node, current.incarnation) != (self.node, incarnation)
                    and r.live(current)
                ):
                    taken.append(user)
                else:
                    r.presence[user] = holder
                    mine.add(user)
            for user in mine - set(holders):
                current = r.presence.get(user)
                if current is not None and current.incarnation == incarnation:
                    del r.presence[user]
                mine.discard(user)
            return taken

        return self._call("reassert", reassert)

    def reap(self, batch: int) -> Deferred[list[str]]:
        def reap() -> list[str]:
            r = self.redis
            taken: list[str] = []
            for (node, incarnation), users in list(r.members.items()):
                lease = r.leases.get(node)
                if lease is not None and lease[0] == incarnation and lease[1] > r.now:
                    continue
                while users and len(taken) < batch:
                    user = users.pop()
                    current = r.presence.get(user)
                    if current is not None and (current.node, current.incarnation) == (
                        node,
                        incarnation,
                    ):
                        del r.presence[user]
                        taken.append(user)
                if not users:
                    del r.members[(node, incarnation)]
            return taken

        return self._call("reap", reap)

    def send(self, node: str, message: Mapping[str, Any]) -> Deferred[int]:
        return self._publish([b for b in self.redis.backends if b.node == node], message, node)

    def broadcast(self, message: Mapping[str, Any]) -> Deferred[int]:
        return self._publish(list(self.redis.backends), message, "*")

    def _publish(
        self, to: list[FakeBackend], message: Mapping[str, Any], where: str
    ) -> Deferred[int]:
        return self._call("publish", lambda: self._deliver(to, message, where))

    def _deliver(self, to: list[FakeBackend], message: Mapping[str, Any], where: str) -> int:
        # Through JSON, as Redis carries it.
        text = json.dumps(message)
        self.sent.append((where, json.loads(text)))
        heard = [b for b in to if b.up]
        for backend in heard:
            assert backend._on_message is not None
            backend._on_message(json.loads(text))
        return len(heard)


@attrs.define(eq=False)
class FakeLocal:
    """The server a node runs in, reduced to its users and what was asked of it."""

    clock: Clock
    # user -> accepted at (ms)
    users: dict[str, int] = attrs.Factory(dict)
    woken: list[str] = attrs.Factory(list)
    # user -> the messages wakes carried
    carried: dict[str, list[Mapping[str, Any]]] = attrs.Factory(dict)
    pushed: list[str] = attrs.Factory(list)
    disconnected: list[str] = attrs.Factory(list)
    released: list[str] = attrs.Factory(list)
    # Flushes asked of release() and not yet done.
    flushing: list[Deferred[None]] = attrs.Factory(list)
    hold_flush: bool = False
    rates: dict[str, str] = attrs.Factory(dict)
    seeded: dict[str, str] = attrs.Factory(dict)

    def connected(self) -> list[tuple[str, int]]:
        return list(self.users.items())

    def is_connected(self, user: str) -> bool:
        return user in self.users

    def wake(
        self, user: str, carried: Sequence[Mapping[str, Any]] | None = None, routed: bool = False
    ) -> None:
        self.woken.append(user)
        if carried:
            self.carried.setdefault(user, []).extend(carried)

    def release(self, user: str) -> Deferred[None]:
        self.released.append(user)
        self.users.pop(user, None)
        if not self.hold_flush:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.flushing.append(d)
        return d

    def disconnect(self, user: str) -> None:
        self.disconnected.append(user)

    def push_unpushed(self, user: str) -> None:
        self.pushed.append(user)

    def rate_state(self, user: str) -> str | None:
        return self.rates.get(user)

    def seed_rate(self, user: str, state: str) -> None:
        self.seeded[user] = state
