"""
Where a publish goes: the subscriptions of every session, and the retained
messages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs
from twisted.logger import Logger

from ..metrics import Metrics
from ..store.interfaces import Message, SetRetained
from .plan import Plan
from .session import Session
from .topics import SubscriptionTrie, topic_matches

log = Logger()


@attrs.frozen
class RetainedLimits:
    """
    How much a plain broker retains: MQTT 3.1.1 sets no bound, memory and
    the store do.
    """

    max_count: int = 10_000
    # Topic and payload bytes of every retained message together.
    max_bytes: int = 64 * 1024 * 1024


# For an application whose clients have no use for retained messages.
NOTHING_RETAINED = RetainedLimits(0, 0)


def _retained_size(message: Message) -> int:
    return len(message.topic.encode("utf-8")) + len(message.payload)


@attrs.define(eq=False)
class Router:
    """
    Matches topics against the subscriptions and keeps the retained messages.

    Invariants:

    - The trie holds the subscriptions of the sessions in memory, as their
      ``subscriptions`` say (both change together, here), and for a plain
      broker also those of every stored persistent session: publishes reach
      a client who is not connected as durable queue entries.
    - The retained messages in memory change only in the effects of
      committed plans, so they are what the store holds.  Their count and
      size are tracked as they will be once every plan under way has landed,
      and the limits are checked against that: plans under way together
      cannot exceed them.
    - A retained publish the limits refuse is still delivered, and still
      clears its topic's older retained message.
    """

    _metrics: Metrics
    limits: RetainedLimits = RetainedLimits()
    _trie: SubscriptionTrie = attrs.Factory(SubscriptionTrie)
    _retained: dict[str, Message] = attrs.Factory(dict)
    _retained_sizes: dict[str, int] = attrs.Factory(dict)
    _retained_bytes: int = 0
    # Refusing retained messages at the limits since space was last freed.
    _retained_full: bool = False

    # -- subscriptions -------------------------------------------------------

    def add(self, client_id: str, subscriptions: Mapping[str, int]) -> None:
        """Route to client_id by these subscriptions."""
        for filter_, qos in subscriptions.items():
            self._trie.subscribe(filter_, client_id, qos)

    def forget(self, client_id: str, subscriptions: Iterable[str]) -> None:
        """Route nothing more to client_id by these filters."""
        for filter_ in subscriptions:
            self._trie.unsubscribe(filter_, client_id)

    def subscribe(self, session: Session, granted: Iterable[tuple[str, int]]) -> None:
        for filter_, qos in granted:
            session.subscriptions[filter_] = qos
            self._trie.subscribe(filter_, session.client_id, qos)

    def unsubscribe(self, session: Session, filters: Iterable[str]) -> None:
        for filter_ in filters:
            if session.subscriptions.pop(filter_, None) is not None:
                self._trie.unsubscribe(filter_, session.client_id)

    # -- routing -------------------------------------------------------------

    def route(self, plan: Plan, message: Message) -> list[tuple[str, Message]]:
        """
        Keep or clear message as retained with plan, and answer which client
        gets which copy of it: the QoS of each is at most the subscription's.
        """
        if message.retain:
            self._retain(plan, message)
            message = attrs.evolve(message, retain=False)
        # One copy per lower QoS delivered, shared by every subscriber at it.
        top = message.qos
        lower: dict[int, Message] = {}
        deliveries = []
        for client_id, granted in self._trie.match(message.topic).items():
            if granted >= top:
                deliveries.append((client_id, message))
                continue
            copy = lower.get(granted)
            if copy is None:
                copy = lower[granted] = attrs.evolve(message, qos=granted)
            deliveries.append((client_id, copy))
        return deliveries

    # -- retained messages ---------------------------------------------------

    @property
    def retained_count(self) -> int:
        return len(self._retained)

    def retained_for(self, granted: list[tuple[str, int]]) -> list[Message]:
        """The retained messages matching newly granted (filter, QoS) pairs."""
        matching = []
        for topic, retained in self._retained.items():
            qos = max((q for f, q in granted if topic_matches(f, topic)), default=None)
            if qos is not None:
                matching.append(attrs.evolve(retained, qos=min(qos, retained.qos)))
        return matching

    def restore(self, messages: Iterable[Message]) -> Plan:
        """
        Keep the stored retained messages that fit the limits; answer the
        plan that removes the rest from the store.
        """
        # The limits may be lower than when the messages were retained (and
        # nothing at all for an application that keeps none).
        beyond = Plan()
        for message in messages:
            size = _retained_size(message)
            if self._fits(message.topic, size):
                self._retained[message.topic] = message
                self._retained_sizes[message.topic] = size
                self._retained_bytes += size
            else:
                beyond.add(SetRetained(message.topic, None))
        if not beyond.empty:
            removed = len(beyond.ops)
            beyond.add(None, lambda _: self._removed(removed))
        return beyond

    def _removed(self, removed: int) -> None:
        self._metrics.dropped.labels("retained_limit").inc(removed)
        log.warn(
            "Removed {removed} stored retained messages beyond the limits"
            " ({count} messages, {bytes} bytes)",
            removed=removed,
            count=self.limits.max_count,
            bytes=self.limits.max_bytes,
        )

    def _retain(self, plan: Plan, message: Message) -> None:
        """Keep message as its topic's retained message, or clear it, within the limits."""
        topic = message.topic
        if not message.payload:
            if topic in self._retained_sizes:
                self._retained_full = False  # Space freed: a new episode may start.
            self._unretain(plan, topic)
            return
        size = _retained_size(message)
        if self._fits(topic, size):
            self._retained_bytes += size - self._retained_sizes.get(topic, 0)
            self._retained_sizes[topic] = size
            plan.add(
                SetRetained(topic, message), lambda _: self._retained.__setitem__(topic, message)
            )
            return
        self._metrics.dropped.labels("retained_limit").inc()
        if not self._retained_full:
            # Once per episode: a client at the limits may keep trying.
            self._retained_full = True
            log.warn(
                "Retained messages at their limits ({count} messages, {bytes} bytes);"
                " further retained publishes are delivered but not retained",
                count=self.limits.max_count,
                bytes=self.limits.max_bytes,
            )
        if topic in self._retained_sizes:
            # The message it could not keep still supersedes the old one.
            self._unretain(plan, topic)

    def _unretain(self, plan: Plan, topic: str) -> None:
        self._retained_bytes -= self._retained_sizes.pop(topic, 0)
        plan.add(SetRetained(topic, None), lambda _: self._retained.pop(topic, None))

    def _fits(self, topic: str, size: int) -> bool:
        """Whether topic's retained message may be one of size bytes."""
        old = self._retained_sizes.get(topic)
        count = len(self._retained_sizes) + (old is None)
        limits = self.limits
        return count <= limits.max_count and (
            self._retained_bytes - (old or 0) + size <= limits.max_bytes
        )
