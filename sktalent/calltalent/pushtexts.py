"""
What an offline push says (INTERFACE section 8): a chat its content; a
notification the backend sent without an alert the text of its type and
status, from the seed's tables (sections 5.1 to 5.4), which the
``--push-texts`` file may override.

The file is one UTF-8 JSON object.  Every key is optional, and a text not
given keeps its default:

    {"order": {"pending": TEXT, "confirmed": TEXT, "rejected": TEXT,
               "paid": TEXT, "toBeFinished": TEXT, "finished": TEXT},
     "note": {"paid": TEXT, "replied": TEXT},
     "feedback": TEXT,
     "expert": {"verified": TEXT, "fail": TEXT}}

A TEXT is a non-empty string.  It may name fields of the notification's
payload in braces, which are replaced by their values: ``{status}`` and
``{o_id}`` in order texts, ``{status}`` and ``{note_id}`` in note texts,
``{content}`` in the feedback text, ``{status}`` and ``{content}`` in expert
texts.  ``{{`` and ``}}`` stand for a brace.
"""

from __future__ import annotations

from collections.abc import Mapping
from string import Formatter
from typing import Any

import attrs

from ..jsonfile import load_json_file
from ..push.interfaces import PushNotice
from .notifications import PAYLOADS, nonempty_text

# Keys are "TYPE.STATUS", or "TYPE" for a type without statuses.
DEFAULT_TEXTS: Mapping[str, str] = {
    "order.pending": "订单提出，待专家确认",
    "order.confirmed": "专家已确认，待用户支付",
    "order.rejected": "专家已拒绝",
    "order.paid": "用户已支付，可以沟通",
    "order.toBeFinished": "专家已确认完成，待用户评价",
    "order.finished": "用户已评价",
    "note.paid": "小纸条提出，待专家回答",
    "note.replied": "专家已回答",
    "feedback": "客服回复了您的意见反馈：{content}",
    "expert.verified": "专家资格审核成功",
    "expert.fail": "专家资格审核失败：{content}",
}


def _statuses(type: str) -> tuple[str, ...] | None:
    """The statuses a type's texts are chosen by; None: one text for the type."""
    return PAYLOADS[type].get("status")


def text_key(type: str, payload: Mapping[str, object]) -> str:
    """The key of the text for a notification of type with payload."""
    return type if _statuses(type) is None else f"{type}.{payload['status']}"


def check_text(key: str, value: object) -> str:
    """value if it can be the text of key, else ValueError naming key."""
    text = nonempty_text(value)
    if text is None:
        raise ValueError(f"{key} must be a non-empty string.")
    fields = tuple(PAYLOADS[key.split(".")[0]])
    try:
        parts = list(Formatter().parse(text))
    except ValueError as e:
        raise ValueError(f"{key}: {e}; write {{{{ or }}}} for a brace.") from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in fields:
            allowed = ", ".join("{" + f + "}" for f in fields)
            raise ValueError(f"{key} has the placeholder {{{name}}}; it may use {allowed}.")
        if spec or conversion:
            raise ValueError(f"{key}: {{{name}}} takes no conversion or format.")
    return text


@attrs.frozen
class TextTable:
    """The text of every notification type and status, each checked."""

    texts: Mapping[str, str] = DEFAULT_TEXTS

    def alert(self, kind: str, payload: Mapping[str, Any]) -> str:
        """What a push of kind for payload says when no alert was given."""
        if kind == "order_chat":
            return str(payload["content"])
        # Checked placeholders name payload fields only: nothing else is reachable.
        return self.texts[text_key(kind, payload)].format_map(payload)


def parse_texts(data: object) -> TextTable:
    """The defaults overridden by a decoded file; ValueError names the first bad key."""
    if not isinstance(data, dict):
        raise ValueError("the top level must be a JSON object.")
    texts = dict(DEFAULT_TEXTS)
    for type, value in data.items():
        if type not in PAYLOADS:
            raise ValueError(f"unknown key {type}; the keys are {', '.join(PAYLOADS)}.")
        statuses = _statuses(type)
        if statuses is None:
            texts[type] = check_text(type, value)
            continue
        if not isinstance(value, dict):
            raise ValueError(
                f"{type} must be an object of texts by status ({', '.join(statuses)})."
            )
        for status, text in value.items():
            key = f"{type}.{status}"
            if status not in statuses:
                raise ValueError(f"unknown key {key}; {type} has {', '.join(statuses)}.")
            texts[key] = check_text(key, text)
    return TextTable(texts)


def load_texts(path: str) -> TextTable:
    """
    The texts of the file at path over the defaults; any problem is a
    ValueError whose message is one line naming the file and the key.
    """
    return load_json_file(path, "push texts file", parse_texts)


@attrs.define
class PushTexts:
    """
    The texts in force.  ``use`` puts a newly loaded table in force at once
    (a reload); pushes built after it say the new texts.
    """

    table: TextTable = attrs.Factory(TextTable)

    def use(self, table: TextTable) -> None:
        self.table = table

    def notice(
        self,
        frame: Mapping[str, Any],
        alert: str | None = None,
        *,
        badge: int | None = None,
        reason: str = "offline",
    ) -> PushNotice:
        """
        The push for a frame delivered to a user (a chat or a notification);
        alert, the backend's text, wins over the table.
        """
        kind, payload = frame["type"], frame["payload"]
        return PushNotice(
            kind,
            alert or self.table.alert(kind, payload),
            o_id=_text(payload, "o_id"),
            note_id=_text(payload, "note_id"),
            status=_text(payload, "status"),
            msgid=frame["msgid"],
            badge=badge,
            reason=reason,
        )


def _text(payload: Mapping[str, Any], name: str) -> str | None:
    value = payload.get(name)
    return value if isinstance(value, str) else None
