"""
The texts of offline pushes: the defaults from the seed, the --push-texts
file that overrides them, and the push built for a delivered frame.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.trial.unittest import SynchronousTestCase

from sktalent.calltalent.notifications import PAYLOADS
from sktalent.calltalent.pushtexts import (
    DEFAULT_TEXTS,
    PushTexts,
    TextTable,
    check_text,
    load_texts,
    parse_texts,
)
from sktalent.push.interfaces import PushNotice

from .helpers import temp_file


def every_key() -> set[str]:
    keys = set()
    for type, fields in PAYLOADS.items():
        statuses = fields.get("status")
        keys |= {type} if statuses is None else {f"{type}.{s}" for s in statuses}
    return keys


class TextTableTests(SynchronousTestCase):
    def test_defaults_cover_every_status(self) -> None:
        """There is one default text for every type and status, and each is valid."""
        self.assertEqual(set(DEFAULT_TEXTS), every_key())
        for key, text in DEFAULT_TEXTS.items():
            self.assertEqual(check_text(key, text), text)

    def test_placeholders_and_braces(self) -> None:
        """Placeholders take the payload's values, as they are; {{ }} are braces."""
        table = parse_texts(
            {"feedback": "{{回复}} {content}", "order": {"paid": "{o_id}/{status}"}}
        )
        self.assertEqual(table.alert("feedback", {"content": "{o_id} 好"}), "{回复} {o_id} 好")
        self.assertEqual(table.alert("order", {"status": "paid", "o_id": "o-1"}), "o-1/paid")

    def test_chat_says_its_content(self) -> None:
        """A chat push says the chat's content, whatever the table."""
        payload = {"o_id": "o1", "expert": True, "content": "在吗？", "t": "1"}
        self.assertEqual(TextTable().alert("order_chat", payload), "在吗？")


class FileTests(SynchronousTestCase):
    def test_overrides_some_keeps_the_rest(self) -> None:
        """The texts of the file replace their defaults; the others stay."""
        doc = {
            "order": {"pending": "新订单 {o_id}"},
            "feedback": "客服：{content}",
            "expert": {"fail": "未通过（{content}）", "verified": "已通过"},
        }
        table = load_texts(temp_file(self, json.dumps(doc, ensure_ascii=False)))
        self.assertEqual(
            dict(table.texts),
            dict(
                DEFAULT_TEXTS,
                **{
                    "order.pending": "新订单 {o_id}",
                    "feedback": "客服：{content}",
                    "expert.fail": "未通过（{content}）",
                    "expert.verified": "已通过",
                },
            ),
        )
        self.assertEqual(load_texts(temp_file(self, "{}")), TextTable())

    def assertRefused(self, content: str | bytes, *words: str) -> None:
        path = temp_file(self, content)
        with self.assertRaises(ValueError) as raised:
            load_texts(path)
        message = str(raised.exception)
        self.assertIn(path, message)
        self.assertNotIn("\n", message)
        for word in words:
            self.assertIn(word, message)

    def test_bad_files_refused(self) -> None:
        """Each mistake is refused with one line naming the file and the key."""
        for doc, words in [
            ({"orders": {}}, ("unknown key orders",)),
            ({"order": {"shipped": "x"}}, ("unknown key order.shipped", "toBeFinished")),
            ({"order": "订单有更新"}, ("order must be an object",)),
            ({"feedback": {"content": "x"}}, ("feedback must be a non-empty string",)),
            ({"note": {"paid": 7}}, ("note.paid must be a non-empty string",)),
            ({"note": {"paid": ""}}, ("note.paid must be",)),
            ({"feedback": "回复：{text}"}, ("feedback", "{text}", "{content}")),
            ({"order": {"paid": "{content}"}}, ("order.paid", "{content}", "{o_id}")),
            ({"expert": {"fail": "{}"}}, ("expert.fail", "{}")),
            ({"expert": {"fail": "{0}"}}, ("expert.fail", "{0}")),
            ({"feedback": "{content.__class__}"}, ("feedback", "{content.__class__}")),
            ({"feedback": "{content!r}"}, ("feedback", "no conversion")),
            ({"feedback": "{content:>9}"}, ("feedback", "no conversion or format")),
            ({"feedback": "回复 {content"}, ("feedback", "{{")),
            ({"feedback": "回复 }"}, ("feedback", "}}")),
            ([], ("top level",)),
        ]:
            self.assertRefused(json.dumps(doc, ensure_ascii=False), *words)
        self.assertRefused('{"feedback": "\\ud800"}', "feedback must be")
        self.assertRefused("{not json", "not valid JSON")
        self.assertRefused(b'{"feedback": "\xff"}', "not valid JSON")

    def test_unreadable_file(self) -> None:
        """A missing file is refused with its path."""
        path = self.mktemp()
        with self.assertRaises(ValueError) as raised:
            load_texts(path)
        self.assertIn(f"Cannot read the push texts file {path}", str(raised.exception))


class NoticeTests(SynchronousTestCase):
    def test_chat(self) -> None:
        """A delivered chat is pushed as order_chat with its content, o_id and msgid."""
        frame = {
            "msgid": "65f1c0a2e4b0a1b2c3d4e5f6",
            "from": "alice",
            "to": "bob",
            "type": "order_chat",
            "payload": {"o_id": "o-1", "expert": False, "content": "你好", "t": "17"},
        }
        self.assertEqual(
            PushTexts().notice(frame, badge=4, reason="unacknowledged"),
            PushNotice(
                "order_chat",
                "你好",
                o_id="o-1",
                msgid="65f1c0a2e4b0a1b2c3d4e5f6",
                badge=4,
                reason="unacknowledged",
            ),
        )

    def test_notification(self) -> None:
        """A notification takes the table's text, unless the backend gave an alert."""
        frame: dict[str, Any] = {
            "msgid": "65f1c0a2e4b0a1b2c3d4e5f7",
            "from": "system",
            "to": "bob",
            "type": "note",
            "payload": {"status": "paid", "note_id": "n-1"},
        }
        texts = PushTexts()
        expected = PushNotice(
            "note", "小纸条提出，待专家回答", note_id="n-1", status="paid", msgid=frame["msgid"]
        )
        self.assertEqual(texts.notice(frame), expected)
        self.assertEqual(texts.notice(frame, "快看"), attrs.evolve(expected, alert="快看"))
        texts.use(parse_texts({"note": {"paid": "新纸条"}}))
        self.assertEqual(texts.notice(frame).alert, "新纸条")
