"""
Messages carried in a wake: what one node committed for a user connected to
another, sent along so that node can deliver it without reading it back from
the store.  Past the bounds a wake is plain and its node reads the store.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from ..mqtt.session import Outgoing
from ..store.interfaces import Message
from .interfaces import encode_message

# Messages one wake carries for a user, and the bytes they take in it.
MAX_MESSAGES = 32
MAX_BYTES = 16_384


@attrs.define(eq=False)
class Carried:
    """The messages one wake carries for a user."""

    docs: list[dict[str, Any]] = attrs.Factory(list)
    # What they take in the wake as it goes over Redis: the UTF-8 bytes of
    # their JSON (encode_message keeps non-ASCII as it is; quotes,
    # backslashes and control characters count escaped).  Kept as they are
    # added, so that no payload is encoded twice.
    size: int = 0

    def add(self, out: Outgoing) -> bool:
        """Carry out too; False, nothing added, when it is not worth carrying or does not fit."""
        # The payload's bytes are the least its JSON takes: too many, and it
        # is not even decoded.
        if len(self.docs) >= MAX_MESSAGES or self.size + len(out.message.payload) > MAX_BYTES:
            return False
        doc = _carry(out)
        if doc is None:
            return False
        size = len(encode_message(doc).encode())
        if self.size + size > MAX_BYTES:
            return False
        self.docs.append(doc)
        self.size += size
        return True


def _carry(out: Outgoing) -> dict[str, Any] | None:
    """out as a wake carries it (JSON); None when it is not text."""
    m = out.message
    try:
        payload = m.payload.decode()
    except UnicodeDecodeError:
        return None  # Not text: read from the store.
    doc: dict[str, Any] = {"s": out.seq, "t": m.topic, "p": payload, "q": m.qos, "a": out.queued_at}
    if m.retain:
        doc["r"] = True
    if out.notice is not None:
        doc["n"] = out.notice
    return doc


def uncarry(doc: Mapping[str, Any]) -> Outgoing:
    """The message a wake carried."""
    message = Message(str(doc["t"]), str(doc["p"]).encode(), int(doc["q"]), bool(doc.get("r")))
    notice = doc.get("n")
    return Outgoing(
        int(doc["s"]),
        message,
        queued_at=int(doc["a"]),
        notice=None if notice is None else str(notice),
    )
