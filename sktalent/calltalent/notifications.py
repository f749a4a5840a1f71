"""
The rules for notifications from the business backend (seed section 5), shared
by the HTTP API, which checks them before anything reaches the application,
and by the application, which checks them again for every other caller.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..authsign import USER_ID_RULE, valid_user_id
from .interfaces import NOTIFICATION_TYPES, InvalidRequest

ORDER_STATUSES = ("pending", "confirmed", "rejected", "paid", "toBeFinished", "finished")
NOTE_STATUSES = ("paid", "replied")
EXPERT_STATUSES = ("verified", "fail")

# Each type's payload: its fields, all required, with the values a field is
# limited to (None: any non-empty string).
PAYLOADS: Mapping[str, Mapping[str, tuple[str, ...] | None]] = {
    "order": {"status": ORDER_STATUSES, "o_id": None},
    "note": {"status": NOTE_STATUSES, "note_id": None},
    "feedback": {"content": None},
    "expert": {"status": EXPERT_STATUSES, "content": None},
}
# Identifiers the server stores and passes on (an order, a note, a device
# token, a push tag) are at most this many characters: each must fit in a push.
MAX_ID_LENGTH = 128
ID_RULE = f"a non-empty string of at most {MAX_ID_LENGTH} characters"
_ID_FIELDS = frozenset({"o_id", "note_id"})


def nonempty_text(value: object) -> str | None:
    """
    value if it is a non-empty str that can be sent as UTF-8 (JSON escapes can
    produce lone surrogates, which cannot), else None.
    """
    if not isinstance(value, str) or not value:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def bounded_id(value: object) -> str | None:
    """value if it is text that can be an identifier (ID_RULE), else None."""
    text = nonempty_text(value)
    return None if text is None or len(text) > MAX_ID_LENGTH else text


def validate_user_id(user_id: object, field: str = "to") -> str:
    """
    Return user_id if it can name a user, or raise InvalidRequest
    ("bad_request") naming the field it came from.
    """
    text = nonempty_text(user_id)
    if text is None or not valid_user_id(text):
        raise InvalidRequest(
            "bad_request",
            f"{field} must be a userID: {USER_ID_RULE}.",
        )
    return text


def validate_notification(type: object, payload: object) -> tuple[str, Mapping[str, str]]:
    """
    Return (type, payload) if type is a notification type and payload has
    exactly that type's fields with allowed values; else raise InvalidRequest,
    "unknown_type" for the type, "bad_payload" for the payload.
    """
    if not isinstance(type, str) or type not in PAYLOADS:
        raise InvalidRequest(
            "unknown_type", f"type must be one of {', '.join(NOTIFICATION_TYPES)}."
        )
    fields = PAYLOADS[type]
    if not isinstance(payload, Mapping):
        raise InvalidRequest("bad_payload", "payload must be a JSON object.")
    unknown = sorted(set(payload) - set(fields))
    if unknown:
        raise InvalidRequest(
            "bad_payload",
            f"{type} payload has unknown field(s) {', '.join(map(str, unknown))};"
            f" it has exactly {', '.join(fields)}.",
        )
    checked = {}
    for name, allowed in fields.items():
        value = nonempty_text(payload.get(name))
        if value is None:
            raise InvalidRequest(
                "bad_payload", f"{type} payload needs {name} as a non-empty string."
            )
        if name in _ID_FIELDS and bounded_id(value) is None:
            raise InvalidRequest("bad_payload", f"{type} payload {name} must be {ID_RULE}.")
        if allowed is not None and value not in allowed:
            raise InvalidRequest(
                "bad_payload",
                f"{type} payload {name} must be one of {', '.join(allowed)}, not {value!r}.",
            )
        checked[name] = value
    return type, checked
