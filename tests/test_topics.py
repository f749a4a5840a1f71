"""
Tests for sktalent.mqtt.topics.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sktalent.mqtt.topics import (
    SubscriptionTrie,
    topic_matches,
    validate_topic_filter,
    validate_topic_name,
)


class ValidationTests(SynchronousTestCase):
    """
    validate_topic_name and validate_topic_filter.
    """

    def test_valid_filters(self) -> None:
        """
        The filters section 4.7.1 calls valid pass.
        """
        for topic_filter in (
            "sport/tennis/player1/#",
            "sport/#",
            "#",
            "+",
            "+/tennis/#",
            "sport/+/player1",
            "/+",
            "+/+",
            "/",
            "$SYS/#",
        ):
            validate_topic_filter(topic_filter)

    def test_invalid_filters(self) -> None:
        """
        '#' not alone in the last level, '+' not alone in its level, the empty
        filter and NUL are refused.
        """
        for topic_filter in (
            "sport/tennis#",
            "sport/tennis/#/ranking",
            "#/",
            "##",
            "sport+",
            "sport/+x/a",
            "",
            "a\x00b",
        ):
            with self.assertRaises(ValueError, msg=topic_filter):
                validate_topic_filter(topic_filter)

    def test_valid_names(self) -> None:
        """
        Names with empty levels, spaces and a leading '$' pass.
        """
        for name in ("a", "/", "/finance", "Accounts payable", "$SYS/x", "a//b"):
            validate_topic_name(name)

    def test_invalid_names(self) -> None:
        """
        Empty names, wildcards and NUL are refused.
        """
        for name in ("", "a/+", "a/#", "a+b", "#", "a\x00"):
            with self.assertRaises(ValueError, msg=name):
                validate_topic_name(name)


class MatchingTests(SynchronousTestCase):
    """
    topic_matches and SubscriptionTrie.match on the examples of section 4.7.
    """

    def assertMatches(self, topic_filter: str, topic: str, expected: bool) -> None:
        self.assertEqual(topic_matches(topic_filter, topic), expected, (topic_filter, topic))
        trie = SubscriptionTrie()
        trie.subscribe(topic_filter, "s", 1)
        self.assertEqual(trie.match(topic), {"s": 1} if expected else {})

    def test_multi_level_wildcard(self) -> None:
        """
        '#' matches its level and every level below, including the parent.
        """
        for topic in (
            "sport/tennis/player1",
            "sport/tennis/player1/ranking",
            "sport/tennis/player1/score/wimbledon",
        ):
            self.assertMatches("sport/tennis/player1/#", topic, True)
        self.assertMatches("sport/#", "sport", True)
        self.assertMatches("sport/tennis/player1/#", "sport/tennis", False)
        self.assertMatches("sport/tennis/player1/#", "sport/tennis/player2", False)
        self.assertMatches("#", "anything/at/all", True)

    def test_single_level_wildcard(self) -> None:
        """
        '+' matches exactly one level, which may be empty.
        """
        self.assertMatches("sport/tennis/+", "sport/tennis/player1", True)
        self.assertMatches("sport/tennis/+", "sport/tennis/player2", True)
        self.assertMatches("sport/tennis/+", "sport/tennis/player1/ranking", False)
        self.assertMatches("sport/+", "sport", False)
        self.assertMatches("sport/+", "sport/", True)
        self.assertMatches("+/+", "/finance", True)
        self.assertMatches("/+", "/finance", True)
        self.assertMatches("+", "/finance", False)
        self.assertMatches("sport/+/player1", "sport/tennis/player1", True)
        self.assertMatches("+/tennis/#", "sport/tennis", True)

    def test_literal_levels(self) -> None:
        """
        Levels compare exactly: case matters and a leading '/' is a level.
        """
        self.assertMatches("ACCOUNTS", "Accounts", False)
        self.assertMatches("Accounts payable", "Accounts payable", True)
        self.assertMatches("/finance", "finance", False)
        self.assertMatches("finance", "finance/", False)
        self.assertMatches("a/b", "a/b", True)

    def test_dollar_topics(self) -> None:
        """
        A filter starting with a wildcard does not match a topic starting with
        '$', but one naming the '$' level does (MQTT-4.7.2-1).
        """
        self.assertMatches("#", "$SYS/monitor/Clients", False)
        self.assertMatches("+/monitor/Clients", "$SYS/monitor/Clients", False)
        self.assertMatches("+", "$SYS", False)
        self.assertMatches("$SYS/#", "$SYS/monitor/Clients", True)
        self.assertMatches("$SYS/monitor/+", "$SYS/monitor/Clients", True)
        self.assertMatches("a/+", "a/$b", True)
        self.assertMatches("a/#", "a/$b", True)


class SubscriptionTrieTests(SynchronousTestCase):
    """
    SubscriptionTrie bookkeeping.
    """

    def test_overlapping_subscriptions(self) -> None:
        """
        A subscriber matched by several filters gets the highest QoS among
        them; each subscriber appears once.
        """
        trie = SubscriptionTrie()
        trie.subscribe("a/#", "x", 0)
        trie.subscribe("a/+", "x", 2)
        trie.subscribe("a/b", "x", 1)
        trie.subscribe("a/b", "y", 0)
        trie.subscribe("#", "z", 1)
        self.assertEqual(trie.match("a/b"), {"x": 2, "y": 0, "z": 1})
        self.assertEqual(trie.match("a"), {"x": 0, "z": 1})

    def test_resubscribe_replaces_qos(self) -> None:
        """
        Subscribing again with the same filter replaces the QoS, in either
        direction, without adding a subscription.
        """
        trie = SubscriptionTrie()
        trie.subscribe("a", "x", 2)
        trie.subscribe("a", "x", 0)
        self.assertEqual(len(trie), 1)
        self.assertEqual(trie.match("a"), {"x": 0})

    def test_unsubscribe(self) -> None:
        """
        unsubscribe removes one subscription and says whether it existed.
        """
        trie = SubscriptionTrie()
        trie.subscribe("a/+", "x", 1)
        trie.subscribe("a/+", "y", 1)
        self.assertTrue(trie.unsubscribe("a/+", "x"))
        self.assertFalse(trie.unsubscribe("a/+", "x"))
        self.assertFalse(trie.unsubscribe("a/b", "y"))
        self.assertFalse(trie.unsubscribe("a", "y"))
        self.assertEqual(trie.match("a/b"), {"y": 1})
        self.assertEqual(len(trie), 1)

    def test_prunes_empty_nodes(self) -> None:
        """
        Removing the last subscriptions leaves no nodes (nor entries for
        filters without wildcards) behind, while nodes still on the path of
        another filter stay.
        """
        trie = SubscriptionTrie()
        trie.subscribe("a/+/c", "x", 1)
        trie.subscribe("a/+", "x", 1)
        trie.subscribe("a/b", "x", 1)
        trie.unsubscribe("a/+/c", "x")
        self.assertEqual(list(trie._root.children), ["a"])
        self.assertEqual(trie._root.children["a"].children["+"].children, {})
        trie.unsubscribe("a/+", "x")
        self.assertEqual(trie._root.children, {})
        trie.unsubscribe("a/b", "x")
        self.assertEqual(trie._exact, {})

    def test_fixed_filters_skip_the_trie(self) -> None:
        """
        Filters without a wildcard are found without a trie node; a topic
        matched by both kinds gets each subscriber's highest QoS.
        """
        trie = SubscriptionTrie()
        trie.subscribe("u/alice", "alice", 1)
        trie.subscribe("$sys/x", "bob", 0)
        self.assertEqual(trie._root.children, {})
        self.assertEqual(trie.match("u/alice"), {"alice": 1})
        self.assertEqual(trie.match("$sys/x"), {"bob": 0})
        trie.subscribe("u/+", "alice", 2)
        trie.subscribe("u/#", "bob", 0)
        self.assertEqual(trie.match("u/alice"), {"alice": 2, "bob": 0})
        self.assertEqual(trie.match("u/alice"), {"alice": 2, "bob": 0})
        self.assertEqual(len(trie), 4)

    def test_fixed_filter_subscribers(self) -> None:
        """
        A filter without a wildcard keeps its subscribers and their QoS as
        they come and go, down to none.
        """
        trie = SubscriptionTrie()
        trie.subscribe("t", "a", 0)
        trie.subscribe("t", "a", 1)
        self.assertEqual((trie.match("t"), len(trie)), ({"a": 1}, 1))
        self.assertFalse(trie.unsubscribe("t", "b"))
        trie.subscribe("t", "b", 2)
        trie.subscribe("t", "c", 0)
        self.assertEqual((trie.match("t"), len(trie)), ({"a": 1, "b": 2, "c": 0}, 3))
        self.assertTrue(trie.unsubscribe("t", "a"))
        self.assertTrue(trie.unsubscribe("t", "c"))
        self.assertFalse(trie.unsubscribe("t", "c"))
        trie.subscribe("t", "b", 1)
        self.assertEqual((trie.match("t"), len(trie)), ({"b": 1}, 1))
        self.assertTrue(trie.unsubscribe("t", "b"))
        self.assertEqual((trie.match("t"), len(trie), trie._exact), ({}, 0, {}))

    def test_remove_subscriber(self) -> None:
        """
        remove_subscriber drops the named filters of one subscriber only.
        """
        trie = SubscriptionTrie()
        for topic_filter in ("a", "a/#", "b"):
            trie.subscribe(topic_filter, "x", 1)
            trie.subscribe(topic_filter, "y", 0)
        trie.remove_subscriber("x", ["a", "a/#"])
        self.assertEqual(trie.match("a"), {"y": 0})
        self.assertEqual(trie.match("b"), {"x": 1, "y": 0})
        self.assertEqual(len(trie), 4)


_LEVELS = ("a", "b", "", "$x")
_topics = st.lists(st.sampled_from(_LEVELS), min_size=1, max_size=3).map("/".join)
_filters = st.builds(
    lambda levels, rest: "/".join(levels + rest),
    st.lists(st.sampled_from((*_LEVELS, "+")), max_size=3),
    st.sampled_from(([], ["#"])),
).filter(bool)
_operations = st.lists(
    st.tuples(
        # Mostly subscribes, so that subscriptions overlap.
        st.sampled_from((True, True, False)),
        _filters,
        st.sampled_from(("p", "q", "r")),
        st.integers(0, 2),
    ),
    max_size=40,
)


class TrieAgreesWithBruteForceTests(SynchronousTestCase):
    """
    SubscriptionTrie against a plain dict of subscriptions and topic_matches.
    """

    @settings(max_examples=300)
    @given(_operations, st.lists(_topics, min_size=1, max_size=10))
    def test_match_agrees(
        self,
        operations: list[tuple[bool, str, str, int]],
        topics: list[str],
    ) -> None:
        """
        After any sequence of subscribes and unsubscribes, match gives for
        every topic what checking each subscription one by one gives.
        """
        trie = SubscriptionTrie()
        model: dict[tuple[str, str], int] = {}
        for is_subscribe, topic_filter, subscriber, qos in operations:
            if is_subscribe:
                trie.subscribe(topic_filter, subscriber, qos)
                model[topic_filter, subscriber] = qos
            else:
                existed = model.pop((topic_filter, subscriber), None) is not None
                self.assertEqual(trie.unsubscribe(topic_filter, subscriber), existed)
        self.assertEqual(len(trie), len(model))
        for topic in topics:
            expected: dict[str, int] = {}
            for (topic_filter, subscriber), qos in model.items():
                if topic_matches(topic_filter, topic):
                    expected[subscriber] = max(qos, expected.get(subscriber, 0))
            self.assertEqual(trie.match(topic), expected, topic)
