"""
Bulk loader for the store benchmarks: a SQLite store file holding many users
who never connected, each with one queued notification, and optionally one
user with a long queue.

    python bench/seed.py STORE USERS [--backlog M] [--backlog-user ID]

The rows are written by the store's own migrations and statements
(``sktalent.store.sqlite``), so the file is what the server itself would have
written for the same sessions and messages, whatever its schema version.  The
sessions are those a notification to a user without a connection leaves: the
user's own topic subscribed, never connected, the message queued with its push
notice and marked pushed (it was pushed when it was committed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sktalent.calltalent.delivery import encode_notice  # noqa: E402
from sktalent.calltalent.pushtexts import PushTexts  # noqa: E402
from sktalent.calltalent.rules import client_topic  # noqa: E402
from sktalent.store.interfaces import (  # noqa: E402
    Attach,
    Detach,
    Enqueue,
    MarkPushed,
    Message,
    Op,
    PutSession,
)
from sktalent.store.sqlite import MIGRATIONS, _commit, connect, create_private, migrate  # noqa: E402

BACKLOG_USER = "backlog-user"
# Operations per transaction: big enough that a commit costs nothing per row.
BATCH = 200_000
_TEXTS = PushTexts()
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_STATUSES = ("pending", "confirmed", "paid", "toBeFinished", "finished")


def user_id(index: int) -> str:
    """The userID of the index-th seeded user (zero-based)."""
    return f"seed-{index:07d}"


def msgid(seconds: int, index: int) -> str:
    """A msgid of the ObjectId form (24 hex digits) that sorts by index."""
    return f"{seconds & 0xFFFFFFFF:08x}{index:016x}"


def notification(to: str, msgid: str, index: int) -> tuple[bytes, str]:
    """An order notification for to, as queued: the frame's bytes and its push notice."""
    frame = {
        "msgid": msgid,
        "from": "system",
        "to": to,
        "type": "order",
        "payload": {"status": _STATUSES[index % len(_STATUSES)], "o_id": f"o{index}"},
    }
    body = _JSON(frame).encode()
    return body, encode_notice(_TEXTS.notice(frame))


def _queued(
    client_id: str, has_connected: bool, messages: int, now_ms: int, first: int = 0
) -> Iterator[Op]:
    topic = client_topic(client_id)
    subscriptions = ((topic, 1),)
    if has_connected:
        # Connected once, and left having been sent nothing of what follows.
        yield Attach(client_id, subscriptions)
        yield Detach(client_id, 0)
    else:
        yield PutSession(client_id, subscriptions)
    for seq in range(1, messages + 1):
        index = first + seq
        body, notice = notification(client_id, msgid(now_ms // 1000, index), index)
        # The store gives a new session's messages seqs 1, 2, ...
        yield Enqueue(client_id, Message(topic, body, 1), now_ms, notice)
        # Pushed when it was committed, as its user had no connection.
        yield MarkPushed(client_id, seq)


def operations(users: int, backlog: int, backlog_user: str, now_ms: int) -> Iterator[Op]:
    """Every operation of the seed: the users in the order their keys sort, then the backlog."""
    for index in range(users):
        yield from _queued(user_id(index), False, 1, now_ms, first=index)
    if backlog:
        # A user who has been here before, away while the backlog built up.
        yield from _queued(backlog_user, True, backlog, now_ms, first=users)


def seed(
    path: str | os.PathLike[str],
    users: int,
    backlog: int = 0,
    backlog_user: str = BACKLOG_USER,
    now_ms: int | None = None,
) -> None:
    """
    Write the sessions into the store file at path, created if absent (with
    the schema brought up to date if not): a file of its own, as seeding
    one again queues the messages again.
    """
    path = os.fspath(path)
    create_private(path)
    conn = connect(path)
    try:
        migrate(conn, path, MIGRATIONS)
        # A loader's file is written again if the machine stops half way.
        conn.execute("PRAGMA synchronous=OFF")
        at = int(time.time() * 1000) if now_ms is None else now_ms
        batch: list[Op] = []
        for op in operations(users, backlog, backlog_user, at):
            batch.append(op)
            if len(batch) >= BATCH:
                _commit(conn, batch)
                batch = []
        if batch:
            _commit(conn, batch)
        # Leave a file the server opens without replaying a large WAL.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("store", help="SQLite store file, created if absent")
    parser.add_argument("users", type=int, help="never-connected users, one notification each")
    parser.add_argument("--backlog", type=int, default=0, help="messages queued for one more user")
    parser.add_argument("--backlog-user", default=BACKLOG_USER, help="that user's userID")
    options = parser.parse_args(argv)
    if options.users < 0 or options.backlog < 0:
        parser.error("counts must not be negative")
    started = time.perf_counter()
    seed(options.store, options.users, options.backlog, options.backlog_user)
    print(
        f"{options.store}: {options.users:,} users with one message each"
        f"{f', {options.backlog_user} with {options.backlog:,}' if options.backlog else ''}"
        f" in {time.perf_counter() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
