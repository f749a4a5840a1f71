"""
What the CallTalent application offers the backend HTTP API.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from ..store.interfaces import ChatRecord, Device

NOTIFICATION_TYPES = ("order", "note", "feedback", "expert")


class InvalidRequest(ValueError):
    """
    Input the application refuses; str(exc) is the message for the caller
    and ``code`` the machine-readable error.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class QueueFull(Exception):
    """
    The recipient's queue is full: nothing was stored or pushed; the message
    may be sent again once the recipient has read its queue.
    """


@attrs.frozen
class SessionInfo:
    """A user's session as operators see it; times in milliseconds since the epoch."""

    online: bool
    # The server holding its connection; None while offline.
    node: str | None
    connected_since: int | None
    queued: int
    oldest_queued_at: int | None
    # Of the registered device; None without one.
    platform: str | None


class ICallTalent(Interface):
    metrics = Attribute("The server's Metrics.")

    def notify(
        to: str, type: str, payload: Mapping[str, object], alert: str | None
    ) -> Deferred[str]:
        """
        Validate (raising InvalidRequest), store and deliver a notification
        from "system"; fire with its msgid once durable.  An offline user is
        also pushed.  Raise QueueFull when the user's queue has no room.
        """

    def push_webview(users: Sequence[str] | None, tag: str | None, url: str, alert: str) -> None:
        """Queue a webview push to the users or to the tag (exactly one given)."""

    def register_device(device: Device) -> Deferred[None]:
        """Remember the user's platform and token; fire when durable."""

    def log_out(user_id: str) -> Deferred[None]:
        """
        The user logged out: no pushes to them until their next device is
        registered, while their messages keep queuing; fire when durable.
        """

    def is_online(user_id: str) -> Deferred[bool]:
        """
        True while the user has a live MQTT connection (on any node of a
        cluster).
        """

    def session_info(user_id: str) -> Deferred[SessionInfo | None]:
        """The user's session, or None for a user without one."""

    def disconnect(user_id: str, ban_seconds: int | None) -> Deferred[bool]:
        """
        Close the user's connection (on whichever node of a cluster holds
        it); ban_seconds, when given, refuses the user (CONNACK 5) until that
        many seconds from now, also after a restart, 0 lifting a ban: the
        connection is closed once that is durable.  False for a user without
        a session (connected or stored).
        """

    def delete_user(user_id: str) -> Deferred[None]:
        """
        The account is gone: close its connection, forget its session, queue,
        device and ban (not its chat history); fire when durable.
        """

    def history(o_id: str, limit: int, before: str | None) -> Deferred[list[ChatRecord]]:
        """The order's stored chat, oldest first."""

    def health() -> Deferred[dict[str, bool]]:
        """
        Whether each part the server depends on answers: the store, and in
        a cluster Redis.
        """
