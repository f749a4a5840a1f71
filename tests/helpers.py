"""
What many test modules build the same way: msgids, chat envelopes, and a
MongoDB database of a test's own.
"""

from __future__ import annotations

import os
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from twisted.trial.unittest import SkipTest


def msgid(n: int) -> str:
    """The nth msgid: 24 hex characters, as clients write them."""
    return f"{n:024x}"


def chat(
    sender: str,
    to: str,
    n: int,
    content: str | None = None,
    *,
    o_id: str = "o1",
    expert: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """
    An order_chat envelope with msgid(n), its content m<n> unless given;
    extra goes into the payload.
    """
    return {
        "msgid": msgid(n),
        "from": sender,
        "to": to,
        "type": "order_chat",
        "payload": {
            "o_id": o_id,
            "expert": expert,
            "content": f"m{n}" if content is None else content,
            **extra,
        },
    }


def with_database(uri: str, database: str) -> str:
    """uri naming database instead of its own."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(path="/" + database))


def mongo_store() -> str:
    """
    The URI of a fresh database on the test MongoDB server
    (SKTALENT_TEST_MONGO_URI); the test is skipped without one, except in
    CI, where it must run.
    """
    uri = os.environ.get("SKTALENT_TEST_MONGO_URI")
    if not uri:
        if os.environ.get("CI") == "true":
            raise AssertionError("CI=true but SKTALENT_TEST_MONGO_URI is unset: run .ci/ferretdb")
        raise SkipTest('SKTALENT_TEST_MONGO_URI is unset (eval "$(.ci/ferretdb)" to set it)')
    return with_database(uri, f"sktalent_test_{uuid.uuid4().hex[:12]}")
