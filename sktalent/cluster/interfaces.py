"""
The seams of cluster mode: what a node needs of Redis (IClusterBackend), and
what it needs of the server it runs in (ILocalNode).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred

from ..mqtt.interfaces import ServiceUnavailable


def encode_message(message: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> str:
    """
    JSON as the cluster's messages go over Redis: compact, non-ASCII as it
    is (UTF-8 on the wire, as the Redis link encodes text), not escaped.
    """
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


@attrs.frozen
class Holder:
    """Who holds a user's connection: a node, in one incarnation (one process)."""

    node: str
    incarnation: str
    # Milliseconds since the epoch when the connection was accepted.
    since: int


@attrs.frozen
class Claimed:
    """What a claim of a user's presence found."""

    # The live node holding the user before, if any (possibly this one).
    previous: Holder | None
    # The user's rate limit state as its last node left it, if recent.
    rate: str | None = None


class BackendDown(ServiceUnavailable):
    """
    Redis cannot be reached: cluster-wide decisions cannot be made now (a
    CONNECT is answered 3, server unavailable; an API call 503).
    """


class IClusterBackend(Protocol):
    """
    Presence, leases and messages between nodes, as kept in Redis.
    Every call fails with BackendDown while Redis cannot be reached.
    """

    @property
    def up(self) -> bool:
        """Whether Redis answers and this node hears its channel."""

    def start(
        self,
        on_message: Callable[[Mapping[str, Any]], None],
        on_up: Callable[[], None],
        on_down: Callable[[], None],
    ) -> None:
        """
        Connect and keep reconnecting.  on_message gets what other nodes
        sent this one or everyone; on_up is called once Redis answers and the
        channels are heard again, on_down when that stops.
        """

    def stop(self) -> Deferred[None]:
        """Disconnect for good."""

    def lease(self, incarnation: str, milliseconds: int) -> Deferred[str | None]:
        """
        Take or renew this node's lease for incarnation; fire with None, or
        with the incarnation of another live process holding this node's name.
        """

    def claim(self, user: str, holder: Holder) -> Deferred[Claimed]:
        """Make holder the user's presence."""

    def release(self, user: str, holder: Holder, rate: str | None, rate_ms: int) -> Deferred[None]:
        """
        Remove the user's presence if holder still has it; keep rate for
        rate_ms for the node the user connects to next.
        """

    def locate(self, users: Sequence[str]) -> Deferred[list[Holder | None]]:
        """The live holder of each user, None for users not connected anywhere."""

    def route(
        self,
        incarnation: str,
        hops: int,
        users: Sequence[str],
        carried: Mapping[str, Sequence[Mapping[str, Any]]],
    ) -> Deferred[list[Holder | None]]:
        """
        locate(users), and in the same round trip send each node holding
        some of them (but this node's incarnation) one wake for them, with
        hops and the messages carried for each.
        """

    def reassert(self, incarnation: str, holders: Mapping[str, Holder]) -> Deferred[list[str]]:
        """
        Make this node's presences in Redis (its incarnation's) exactly
        holders: Redis may have restarted empty, or missed a release.  Fire
        with the users another live node holds now, which are left to it.
        """

    def reap(self, batch: int) -> Deferred[list[str]]:
        """
        Take up to batch users still recorded as held by nodes whose lease
        ran out, remove their presence and fire with them: each such user is
        taken by one node only.
        """

    def send(self, node: str, message: Mapping[str, Any]) -> Deferred[int]:
        """Send message to one node; fire with how many listeners heard it."""

    def broadcast(self, message: Mapping[str, Any]) -> Deferred[int]:
        """Send message to every node, this one included."""


class ILocalNode(Protocol):
    """What cluster mode needs of the server it runs in."""

    def connected(self) -> Iterable[tuple[str, int]]:
        """(user, accepted at in milliseconds) of every user connected here."""

    def is_connected(self, user: str) -> bool:
        """Whether user has a live connection here."""

    def wake(
        self, user: str, carried: Sequence[Mapping[str, Any]] | None = None, routed: bool = False
    ) -> None:
        """
        The store may have new messages for user: page them in if connected
        here.  carried: some of them, as the wake carried them (carried.py).
        routed: another node committed them (not a sweep or a catch-up), so
        they are waited for to be acknowledged, or pushed.
        """

    def release(self, user: str) -> Deferred[None]:
        """
        user connected to another node: close the connection here without
        pushing (it is not the user's doing), and fire once everything it
        did (its acknowledgements) is durable.
        """

    def disconnect(self, user: str) -> None:
        """Close user's connection here (an operator's disconnect)."""

    def push_unpushed(self, user: str) -> None:
        """
        user is connected nowhere: push, as the push rules say for an
        offline user, what is queued for them with a notice and not pushed.
        """

    def rate_state(self, user: str) -> str | None:
        """user's rate limit state, to hand to the node it connects to next."""

    def seed_rate(self, user: str, state: str) -> None:
        """Continue user's rate limits from what its last node handed over."""
