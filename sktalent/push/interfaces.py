"""
Offline push, as the rest of the server sees it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs
from twisted.internet.defer import Deferred, gatherResults
from zope.interface import Interface

# What a push is about; each has its body shape in seed section 6.
KINDS = ("order_chat", "order", "note", "feedback", "expert", "webview")

# Why a message is pushed (INTERFACE section 8), a label of the push metrics.
REASONS = ("offline", "unacknowledged", "connection_lost")

# Asked just before a push leaves: False when it is no longer wanted (the
# message it is for was acknowledged meanwhile).
Wanted = Callable[[], bool]


@attrs.frozen
class PushNotice:
    kind: str
    alert: str
    o_id: str | None = None
    note_id: str | None = None
    status: str | None = None
    url: str | None = None
    # The message pushed, so that the app can drop a push for one it has.
    msgid: str | None = None
    # The user's unacknowledged messages (iOS aps.badge); None: not counted.
    badge: int | None = None
    reason: str = "offline"


class IPusher(Interface):
    """
    Sends pushes in the background: calls return at once, never raise, and
    never wait for the push service.

    A push to a user is *settled* when the pusher is done with it for good:
    the push service accepted it, or it never will be sent because the user
    logged out, the service refused it for good (no device carries the
    alias, or any error that is not retried), it was given up after its
    attempts, it cannot be made to fit the size limit, it is invalid, it was
    dropped at a full queue, it was withdrawn (no longer wanted), or push is
    off.  A push is not settled when the pusher stops first: held, queued,
    being sent or waiting to be retried.  A push coalesced into a later one
    is settled with it.
    """

    def push_to_users(
        user_ids: Sequence[str], notice: PushNotice, wanted: Wanted | None = None
    ) -> Deferred[bool]:
        """
        Queue a push to each user (customizedcast by alias).  Fire with True
        once it is settled for every one of them, with False when the pusher
        stopped before that; never fail.  wanted, if given, is asked just
        before the push leaves: False withdraws it.
        """

    def push_to_tag(tag: str, notice: PushNotice) -> None:
        """Queue a push to every device carrying tag (groupcast)."""

    def stop() -> None:
        """Drop what is queued and cancel retries: what they were for is not settled."""


def all_settled(settled: Sequence[Deferred[bool]]) -> Deferred[bool]:
    """Fire with True when each of settled fires with True, else False."""
    if len(settled) == 1:
        return settled[0]
    return gatherResults(list(settled)).addCallback(all)
