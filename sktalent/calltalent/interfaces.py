"""
What the CallTalent application offers the backend HTTP API.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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

    def is_online(user_id: str) -> bool:
        """True while the user has a live MQTT connection."""

    def history(o_id: str, limit: int, before: str | None) -> Deferred[list[ChatRecord]]:
        """The order's stored chat, oldest first."""

    def health() -> Deferred[None]:
        """Fire when the store answers; fail otherwise."""
