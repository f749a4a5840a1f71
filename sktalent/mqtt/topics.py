"""
MQTT 3.1.1 topic names, topic filters and subscription matching (section 4.7).
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs


def validate_topic_name(name: str) -> None:
    """
    Raise ValueError unless name may be published to: not empty, no wildcard
    (MQTT-4.7.3-1, MQTT-3.3.2-2), no NUL (MQTT-4.7.3-2).
    """
    if not name:
        raise ValueError("empty topic name")
    if "+" in name or "#" in name:
        raise ValueError(f"wildcard in topic name {name!r}")
    if "\x00" in name:
        raise ValueError("NUL in topic name")


def validate_topic_filter(topic_filter: str) -> None:
    """
    Raise ValueError unless topic_filter may be subscribed to: not empty, '+'
    only as a whole level, '#' only as the whole last level (MQTT-4.7.1-2,
    MQTT-4.7.1-3), no NUL.
    """
    if not topic_filter:
        raise ValueError("empty topic filter")
    if "\x00" in topic_filter:
        raise ValueError("NUL in topic filter")
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise ValueError(f"misplaced '#' in topic filter {topic_filter!r}")
        if "+" in level and level != "+":
            raise ValueError(f"misplaced '+' in topic filter {topic_filter!r}")


def topic_matches(topic_filter: str, topic: str) -> bool:
    """
    Whether a valid topic_filter matches a valid topic name.

    '#' also matches the parent level ('a/#' matches 'a'), and a leading
    wildcard never matches a topic starting with '$' (MQTT-4.7.2-1).
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)


@attrs.define
class _Node:
    children: dict[str, _Node] = attrs.field(factory=dict)
    # subscriber -> granted QoS for the filter ending at this node
    subscribers: dict[str, int] = attrs.field(factory=dict)


def _is_wild(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


@attrs.define
class SubscriptionTrie:
    """
    All (topic filter, subscriber) pairs.  Filters without a wildcard, such
    as the fixed per-user topics of CallTalent, are one dictionary lookup
    away; the others are in a trie, one level per filter level, so a lookup
    only walks the branches that can match.
    """

    # filter without a wildcard -> (subscriber, granted QoS) while it has one
    # subscriber, as most such filters have (a tuple is 72 bytes, a dict
    # with one entry 184), else subscriber -> granted QoS
    _exact: dict[str, tuple[str, int] | dict[str, int]] = attrs.field(factory=dict, init=False)
    _root: _Node = attrs.field(factory=_Node, init=False)
    _count: int = attrs.field(default=0, init=False)

    def subscribe(self, topic_filter: str, subscriber: str, qos: int) -> None:
        """
        Subscribe subscriber to topic_filter at qos, replacing the QoS of an
        identical subscription (MQTT-3.8.4-3).
        """
        if not _is_wild(topic_filter):
            self._subscribe_exact(topic_filter, subscriber, qos)
            return
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        if subscriber not in node.subscribers:
            self._count += 1
        node.subscribers[subscriber] = qos

    def _subscribe_exact(self, topic_filter: str, subscriber: str, qos: int) -> None:
        entry = self._exact.get(topic_filter)
        if isinstance(entry, dict):
            self._count += subscriber not in entry
            entry[subscriber] = qos
        elif entry is None or entry[0] == subscriber:
            self._count += entry is None
            self._exact[topic_filter] = (subscriber, qos)
        else:
            self._exact[topic_filter] = dict((entry, (subscriber, qos)))
            self._count += 1

    def unsubscribe(self, topic_filter: str, subscriber: str) -> bool:
        """
        Remove one subscription; False when there was none.
        """
        if not _is_wild(topic_filter):
            return self._unsubscribe_exact(topic_filter, subscriber)
        path: list[tuple[_Node, str]] = []
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        if node.subscribers.pop(subscriber, None) is None:
            return False
        self._count -= 1
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.children or child.subscribers:
                break
            del parent.children[level]
        return True

    def _unsubscribe_exact(self, topic_filter: str, subscriber: str) -> bool:
        entry = self._exact.get(topic_filter)
        if isinstance(entry, dict):
            if entry.pop(subscriber, None) is None:
                return False
            if len(entry) == 1:
                [self._exact[topic_filter]] = entry.items()
        elif entry is not None and entry[0] == subscriber:
            del self._exact[topic_filter]
        else:
            return False
        self._count -= 1
        return True

    def remove_subscriber(self, subscriber: str, filters: Iterable[str]) -> None:
        """
        Remove subscriber's subscriptions to filters; the trie does not index
        by subscriber, so the caller names them.
        """
        for topic_filter in filters:
            self.unsubscribe(topic_filter, subscriber)

    def match(self, topic: str) -> dict[str, int]:
        """
        Every subscriber with a filter matching topic, mapped to the highest
        QoS granted over its matching filters.
        """
        exact = self._exact.get(topic)
        if exact is None:
            result = {}
        elif isinstance(exact, dict):
            result = exact.copy()
        else:
            result = dict((exact,))
        if not self._root.children:
            return result
        levels = topic.split("/")
        # A leading wildcard must not match a '$' topic (MQTT-4.7.2-1).
        wild_root = not topic.startswith("$")
        stack = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            wild = depth > 0 or wild_root
            if wild and (rest := node.children.get("#")) is not None:
                _collect(rest, result)
            if depth == len(levels):
                _collect(node, result)
                continue
            if (child := node.children.get(levels[depth])) is not None:
                stack.append((child, depth + 1))
            if wild and (child := node.children.get("+")) is not None:
                stack.append((child, depth + 1))
        return result

    def __len__(self) -> int:
        return self._count


def _collect(node: _Node, result: dict[str, int]) -> None:
    for subscriber, qos in node.subscribers.items():
        if qos > result.get(subscriber, -1):
            result[subscriber] = qos
