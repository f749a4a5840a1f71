"""
One node of a cluster: presence, routing between nodes and takeover, over a
backend (Redis, redis.py) and the server it runs in (ILocalNode).

The store is the truth; Redis only says who is where.  A message for a user
is committed to the store first, then the node holding the user is told to
page it in (a wake).  Every step is ordered so that a lost wake only delays:

- A node claims a user's presence before it reads the user's queue from the
  store, and a sender looks the recipient up only after its commit: a
  commit the new node's read missed finds the new node in the lookup.
- A node whose link to Redis comes back wakes every user connected to it,
  and wakes a few of them every tick besides, as a safety net.
- A wake that reaches a node the user has left is routed again from a fresh
  lookup: to the user's new node, or, for a user connected nowhere, to the
  push of what is unacknowledged (INTERFACE section 8).
- The users of a node that died are taken over by one live node, which
  pushes what is queued for them, as a restart would.

Lookups are batched: one Redis round trip per reactor turn, whatever the
number of messages committed in it.
"""

from __future__ import annotations

import itertools
import math
import os
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..failures import StartFailure
from ..mqtt.interfaces import ISessionGate
from ..mqtt.session import Outgoing
from .carried import Carried
from .interfaces import BackendDown, Holder, IClusterBackend, ILocalNode

log = Logger()

Offline = Callable[[], object]

# A lease outlives this many missed renewals.
_RENEWALS_PER_LEASE = 4
# How long a user's rate limit state waits for the node it connects to next.
_RATE_MS = 5_000
# Users whose routing waits for Redis, at most; past it they are pushed.
_MAX_UNDECIDED = 100_000
# Safety net: every connected user is woken about this often, in seconds...
_SWEEP_EVERY = 60.0
# ...but no more than this many per tick, so that it stays cheap.
_SWEEP_MAX = 50
# Users taken from a dead node per call.
_REAP_BATCH = 500
# A wake is routed again at most this many times.
_MAX_HOPS = 2


@attrs.define(eq=False)
class _Opening:
    """A session being opened here: claimed, its queue being read."""

    # Clock seconds when the last CONNECT for it called before_open().
    since: float
    # CONNECTs for it under way here.
    count: int = 0
    # A wake came meanwhile: replayed once it is open.
    woken: bool = False


@implementer(ISessionGate)
@attrs.define(eq=False)
class ClusterNode:
    """
    This process as a node, the server's ISessionGate: before_open() when a
    client sends CONNECT, opened() once its session is open here, closed()
    when its connection here ends (not when another connection of the same
    client takes it over); deliver() for what the server committed for a
    user not connected here.
    """

    name: str
    _backend: IClusterBackend
    _clock: IReactorTime
    lease_ms: int = 10_000
    # How long a takeover waits for the old node to close and flush.
    release_timeout: float = 3.0
    # How long the start waits for Redis.
    start_timeout: float = 10.0
    incarnation: str = attrs.Factory(lambda: os.urandom(8).hex())
    _local: ILocalNode | None = None
    # How long a session may take to open after before_open(): an opening
    # older than this failed (its connection went) and holds nothing.
    open_timeout: float = 30.0
    # user -> the presence this node claimed for it last.
    _holders: dict[str, Holder] = attrs.Factory(dict)
    # Users whose sessions are opening here.
    _opening: dict[str, _Opening] = attrs.Factory(dict)
    # Users whose sessions are open here.
    _here: set[str] = attrs.Factory(set)
    # Users another node took while they were opening here.
    _revoked: set[str] = attrs.Factory(set)
    # Routing asked for this reactor turn: user -> (hops, offline callbacks).
    _routes: dict[str, tuple[int, list[Offline]]] = attrs.Factory(dict)
    _routing: IDelayedCall | None = None
    # The messages committed this turn for users routed, as their wakes
    # carry them; None for a user with more than one wake carries.
    _carried: dict[str, Carried | None] = attrs.Factory(dict)
    # Routing that waits for Redis to come back.
    _undecided: dict[str, tuple[int, list[Offline]]] = attrs.Factory(dict)
    # Takeovers under way: request id -> the answer awaited.
    _releases: dict[str, Deferred[Mapping[str, Any]]] = attrs.Factory(dict)
    _ids: Any = attrs.Factory(itertools.count)
    _sweep: deque[str] = attrs.Factory(deque)
    _sweep_per_tick: int = 0
    _ticker: LoopingCall | None = None
    _ready: Deferred[None] | None = None
    _stopped: bool = False

    def attach(self, local: ILocalNode) -> None:
        """The server this node runs in: set once, before start()."""
        self._local = local

    @property
    def up(self) -> bool:
        """Whether Redis answers and this node hears it."""
        return self._backend.up

    @property
    def local(self) -> ILocalNode:
        assert self._local is not None, "attach() the local server before start()"
        return self._local

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    # -- start and stop -------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Connect, take this node's lease; fire once the node may serve."""
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self._ready = Deferred()
        self._backend.start(self._received, self._came_up, self._went_down)
        try:
            await self._ready.addTimeout(self.start_timeout, self._clock)
        except TimeoutError:
            raise StartFailure(
                f"--cluster: Redis did not answer within {self.start_timeout:g} s"
            ) from None
        # A previous process of this node (killed, restarting) holds the name
        # until its lease runs out; another live process keeps renewing it.
        deadline = self._clock.seconds() + self.lease_ms / 1000 + 1
        while (other := await self._backend.lease(self.incarnation, self.lease_ms)) is not None:
            if self._clock.seconds() > deadline:
                raise StartFailure(
                    f"--node {self.name}: another live process is node {self.name}"
                    f" (incarnation {other}); node names must be unique"
                )
            log.info(
                "Node {node}: waiting for the lease of its previous process to run out",
                node=self.name,
            )
            await _sleep(self._clock, 1.0)
        log.info(
            "Cluster node {node} (incarnation {incarnation}) joined",
            node=self.name,
            incarnation=self.incarnation,
        )
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = self._clock
        self._ticker.start(self.lease_ms / 1000 / _RENEWALS_PER_LEASE, now=False)

    def stop(self) -> Deferred[None]:
        """Give the lease back and disconnect: this node's users are offline at once."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._stopped = True
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        if self._routing is not None and self._routing.active():
            self._routing.cancel()
        if self._backend.up:
            try:
                await self._backend.lease(self.incarnation, 0)
            except Exception as e:  # noqa: BLE001 - the lease runs out by itself anyway
                log.info("Could not give the lease back: {e}", e=e)
        await self._backend.stop()

    def _tick(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._renew())
        d.addErrback(lambda f: log.info("Cluster tick failed: {e}", e=f.value))
        return d

    async def _renew(self) -> None:
        if not self._backend.up:
            return
        other = await self._backend.lease(self.incarnation, self.lease_ms)
        if other is not None:
            log.critical(
                "Node {node}: another process (incarnation {other}) took this node's name;"
                " node names must be unique",
                node=self.name,
                other=other,
            )
            return
        self._forget_failed_openings()
        await self._reap()
        self._safety_sweep()

    async def _reap(self) -> None:
        """Take over the users of nodes that died, and push what waits for them."""
        while users := await self._backend.reap(_REAP_BATCH):
            log.info("Took over {n} users of a node that is gone", n=len(users))
            for user in users:
                if not self.local.is_connected(user):
                    self.local.push_unpushed(user)

    def _safety_sweep(self) -> None:
        if not self._sweep:
            self._sweep.extend(user for user, _ in self.local.connected())
            ticks = _SWEEP_EVERY * _RENEWALS_PER_LEASE * 1000 / self.lease_ms
            self._sweep_per_tick = min(_SWEEP_MAX, math.ceil(len(self._sweep) / ticks))
        for _ in range(min(self._sweep_per_tick, len(self._sweep))):
            user = self._sweep.popleft()
            if self.local.is_connected(user):
                self.local.wake(user)

    # -- Redis coming and going -----------------------------------------------

    def _came_up(self) -> None:
        if self._ready is not None and not self._ready.called:
            self._ready.callback(None)
            return
        log.info("Cluster: Redis is back; catching up")
        Deferred.fromCoroutine(self._catch_up()).addErrback(
            lambda f: log.warn("Catching up after Redis came back failed: {e}", e=f.value)
        )

    def _went_down(self) -> None:
        if not self._stopped:
            log.warn("Cluster: Redis is unavailable; delivery between nodes waits for it")

    async def _catch_up(self) -> None:
        """
        Redis is back, maybe empty: put this node's lease and presences back,
        let go of users another node took meanwhile, then page in every
        connected user's queue (wakes sent meanwhile were lost) and route
        what waited.
        """
        await self._backend.lease(self.incarnation, self.lease_ms)
        users = self._here | self._opening.keys()
        here = {user: self._holders[user] for user in users if user in self._holders}
        for user in await self._backend.reassert(self.incarnation, here):
            log.info("{user} connected to another node meanwhile; closing it here", user=user)
            self._revoke(user)
        for user, _ in list(self.local.connected()):
            self.local.wake(user)
        undecided, self._undecided = self._undecided, {}
        for user, (hops, offline) in undecided.items():
            self._route(user, hops, offline)

    # -- connections here -----------------------------------------------------

    def before_open(self, user: str) -> Deferred[None]:
        """
        A client of user sent CONNECT here: claim the user's presence and
        make any other node holding the user close and flush it.  Fails with
        BackendDown while Redis is unavailable.
        """
        opening = self._opening.setdefault(user, _Opening(self._clock.seconds()))
        opening.count += 1
        opening.since = self._clock.seconds()
        d = Deferred.fromCoroutine(self._before_open(user))
        d.addErrback(self._not_opened, user)
        return d

    def _not_opened(self, failure: Failure, user: str) -> Failure:
        self._end_opening(user)
        if user not in self._opening and user not in self._here:
            # Claimed, maybe, before it failed (Redis lost meanwhile, the
            # open timed out): a presence here with no session would draw
            # every wake for the user here.
            self._release_presence(user)
        return failure

    def _end_opening(self, user: str) -> _Opening | None:
        opening = self._opening.get(user)
        if opening is not None:
            opening.count -= 1
            if opening.count <= 0:
                del self._opening[user]
        return opening

    async def _before_open(self, user: str) -> None:
        if not self._backend.up:
            raise BackendDown("Redis is unavailable")
        holder = Holder(self.name, self.incarnation, self._now_ms())
        claimed = await self._backend.claim(user, holder)
        self._holders[user] = holder
        self._revoked.discard(user)
        rate = claimed.rate
        previous = claimed.previous
        if previous is not None and previous.node != self.name:
            answer = await self._ask_release(previous.node, user)
            rate = answer.get("rate") or rate
        if rate:
            self.local.seed_rate(user, rate)

    async def _ask_release(self, node: str, user: str) -> Mapping[str, Any]:
        request = f"{self.incarnation}-{next(self._ids)}"
        answer: Deferred[Mapping[str, Any]] = Deferred()
        self._releases[request] = answer
        try:
            message = {"k": "release", "u": user, "to": self.name, "id": request}
            if not await self._backend.send(node, message):
                return {}  # Nobody listens there: the node is gone.
            return await answer.addTimeout(self.release_timeout, self._clock)
        except TimeoutError:
            log.warn(
                "Node {node} did not release {user} within {t} s; taking it over anyway",
                node=node,
                user=user,
                t=self.release_timeout,
            )
            return {}
        finally:
            self._releases.pop(request, None)

    def opened(self, user: str) -> None:
        """user's session is open here: wakes that came meanwhile are replayed."""
        opening = self._end_opening(user)
        self._here.add(user)
        if user in self._revoked and user not in self._opening:
            self._revoked.discard(user)
            self._release_here(user)
        elif opening is not None and opening.woken:
            self.local.wake(user)

    def closed(self, user: str) -> None:
        """user's connection here ended: its presence goes, unless it is connecting again."""
        self._here.discard(user)
        if user not in self._opening:
            self._release_presence(user)

    def _release_presence(self, user: str) -> None:
        holder = self._holders.pop(user, None)
        self._revoked.discard(user)
        if holder is None or not self._backend.up:
            return  # Never claimed, or Redis is down: its return reasserts.
        self._backend.release(user, holder, self.local.rate_state(user), _RATE_MS).addErrback(
            _log_info, "Releasing {user}'s presence failed: {e}", user=user
        )

    def _forget_failed_openings(self) -> None:
        """Openings whose connection went before the session opened hold nothing."""
        cut = self._clock.seconds() - self.open_timeout
        for user, opening in list(self._opening.items()):
            if opening.since < cut:
                del self._opening[user]
                if user not in self._here:
                    self._release_presence(user)

    def queued_elsewhere(self, user: str, out: Outgoing | None = None) -> None:
        """
        Wake the node holding user, if any: the store has new messages for
        it, out among them (carried along when it can be).
        """
        carried = self._carried.setdefault(user, Carried())
        if carried is None or out is None or not carried.add(out):
            self._carried[user] = None
        self.deliver(user)

    def _revoke(self, user: str) -> Deferred[None] | None:
        """Another node holds user now: let go of it here."""
        if user in self._opening:
            self._revoked.add(user)  # Closed once open.
        if self.local.is_connected(user):
            return self._release_here(user)
        return None

    def _release_here(self, user: str) -> Deferred[None]:
        self._holders.pop(user, None)
        d = self.local.release(user)
        d.addErrback(lambda f: log.failure("Releasing {user} here failed", f, user=user))
        return d

    # -- routing ----------------------------------------------------------------

    def deliver(self, user: str, offline: Offline | None = None) -> None:
        """
        Something was committed for user, who is not connected here: wake
        the node holding user, or call offline when none does.
        """
        self._route(user, 0, [offline] if offline is not None else [])

    def _route(self, user: str, hops: int, offline: list[Offline]) -> None:
        if self._stopped:
            return
        known = self._routes.get(user)
        if known is not None:
            known[1].extend(offline)
        else:
            self._routes[user] = (hops, offline)
        if self._routing is None:
            self._routing = self._clock.callLater(0, self._flush_routes)

    def _flush_routes(self) -> None:
        self._routing = None
        routes, self._routes = self._routes, {}
        carried, self._carried = self._carried, {}
        Deferred.fromCoroutine(self._locate(routes, carried)).addErrback(
            lambda f: log.failure("Routing {n} users failed", f, n=len(routes))
        )

    async def _locate(
        self,
        routes: dict[str, tuple[int, list[Offline]]],
        carried: Mapping[str, Carried | None],
    ) -> None:
        # One round trip for the users of each hop count (almost always one):
        # looked up, and their holders woken by the same script.
        by_hops: dict[int, list[str]] = {}
        for user, (hops, _) in routes.items():
            by_hops.setdefault(hops, []).append(user)
        messages = {user: c.docs for user, c in carried.items() if c is not None}
        for n, (hops, users) in enumerate(by_hops.items()):
            try:
                if not self._backend.up:
                    raise BackendDown("Redis is unavailable")
                # Not heard: the node is gone, and its users are reaped with
                # their queues once its lease runs out.
                holders = await self._backend.route(self.incarnation, hops + 1, users, messages)
            except Exception as e:  # noqa: BLE001 - any failure: decide once Redis is back
                log.debug("Routing waits for Redis: {e}", e=e)
                left = [u for group in list(by_hops.values())[n:] for u in group]
                self._wait_for_redis({user: routes[user] for user in left})
                return
            for user, holder in zip(users, holders, strict=True):
                offline = routes[user][1]
                if holder is None:
                    for callback in offline:
                        callback()
                elif holder.node == self.name and holder.incarnation == self.incarnation:
                    self._wake_here(user, hops, offline, looked_up=True)

    def _wait_for_redis(self, routes: dict[str, tuple[int, list[Offline]]]) -> None:
        for user, (hops, offline) in routes.items():
            known = self._undecided.get(user)
            if known is not None:
                known[1].extend(offline)
            elif len(self._undecided) < _MAX_UNDECIDED:
                self._undecided[user] = (hops, offline)
            else:
                # Better a push that proves needless than none.
                for callback in offline:
                    callback()

    def _wake_here(
        self,
        user: str,
        hops: int,
        offline: list[Offline],
        looked_up: bool = False,
        carried: list[dict[str, Any]] | None = None,
    ) -> None:
        opening = self._opening.get(user)
        if opening is not None:
            opening.woken = True
        if self.local.is_connected(user):
            self.local.wake(user, carried, routed=True)
        elif opening is not None:
            pass  # Replayed once open.
        elif looked_up:
            # Redis says here, this node knows better: it left, its release
            # is under way.  Connected nowhere.
            for callback in offline or [lambda: self.local.push_unpushed(user)]:
                callback()
        elif hops < _MAX_HOPS:
            # Left since the sender looked it up: where is it now?
            self._route(user, hops, [lambda: self.local.push_unpushed(user)])
        else:
            log.debug("A wake for {user} went round; its node pages it in", user=user)

    # -- messages from other nodes ------------------------------------------------

    def _received(self, message: Mapping[str, Any]) -> None:
        kind = message.get("k")
        if kind == "wake":
            hops = int(message.get("h", 1))
            carried = message.get("m") or {}
            for user in message["u"]:
                self._wake_here(user, hops, [], carried=carried.get(user))
        elif kind == "release":
            Deferred.fromCoroutine(self._release_for(message)).addErrback(
                lambda f: log.failure("Releasing {user} failed", f, user=message.get("u"))
            )
        elif kind == "released":
            answer = self._releases.get(message["id"])
            if answer is not None and not answer.called:
                answer.callback(message)
        elif kind == "disconnect":
            if self.local.is_connected(message["u"]):
                self.local.disconnect(message["u"])
        else:
            log.warn("Unknown cluster message {message!r} ignored", message=message)

    async def _release_for(self, message: Mapping[str, Any]) -> None:
        user = message["u"]
        released = self._revoke(user)
        if released is not None:
            await released
        rate = self.local.rate_state(user)
        await self._backend.send(
            message["to"], {"k": "released", "id": message["id"], "u": user, "rate": rate}
        )

    # -- operators --------------------------------------------------------------

    async def locate(self, user: str) -> Holder | None:
        """Where user is connected now; BackendDown while Redis is unavailable."""
        if not self._backend.up:
            raise BackendDown("Redis is unavailable")
        (holder,) = await self._backend.locate([user])
        return holder

    async def disconnect(self, user: str) -> None:
        """Close user's connection, on whichever node holds it."""
        if not self._backend.up:
            raise BackendDown("Redis is unavailable")
        await self._backend.broadcast({"k": "disconnect", "u": user})


def _log_info(failure: Failure, what: str, **fields: object) -> None:
    log.info(what, e=failure.value, **fields)


def _sleep(clock: IReactorTime, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    clock.callLater(seconds, d.callback, None)
    return d
