"""
Messages carried in a wake: what one node committed for a user connected to
another, sent along so that node can deliver it without reading it back from
the store.  Past the bounds a wake is plain and its node reads the store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..mqtt.session import Outgoing
from ..store.interfaces import Message

# Messages and payload bytes one wake carries for a user.
MAX_MESSAGES = 32
MAX_BYTES = 16_384


def carry(out: Outgoing) -> dict[str, Any] | None:
    """out as a wake carries it (JSON); None when it is not worth carrying."""
    m = out.message
    if len(m.payload) > MAX_BYTES:
        return None
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


def fits(carried: Sequence[Mapping[str, Any]], doc: Mapping[str, Any]) -> bool:
    """Whether doc may join carried in one wake."""
    size = sum(len(d["p"]) for d in carried) + len(doc["p"])
    return len(carried) < MAX_MESSAGES and size <= MAX_BYTES


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
