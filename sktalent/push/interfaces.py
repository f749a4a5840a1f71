"""
Offline push, as the rest of the server sees it.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from zope.interface import Interface

# What a push is about; each has its body shape in seed section 6.
KINDS = ("order_chat", "order", "note", "feedback", "expert", "webview")

# Why a message is pushed (INTERFACE section 8), a label of the push metrics.
REASONS = ("offline", "unacknowledged", "connection_lost")


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
    """

    def push_to_users(user_ids: Sequence[str], notice: PushNotice) -> None:
        """Queue a push to each user (customizedcast by alias)."""

    def push_to_tag(tag: str, notice: PushNotice) -> None:
        """Queue a push to every device carrying tag (groupcast)."""

    def stop() -> None:
        """Drop what is queued and cancel retries."""
