"""
What a durable chat costs the SQLite store's own thread, without a server:
the CPU time of one commit of K chats as the server makes it (each chat
inserted with its delivery and its `sent` frame queued, and the messages
the commit before queued taken off the queues as their PUBACKs would),
for several K.

    python bench/commit.py [--chats 1,2,3,4,8,16,32] [--commits 2000] [--pause 0]

It calls the store's transaction code directly (sktalent/store/sqlite.py,
the same function its worker thread runs) on a fresh file in a temporary
directory on the same file system as the bench's servers, with the
server's settings (WAL, synchronous=FULL).  CPU is the calling thread's
(time.thread_time: user and system, the fsync's included); wall is the
time a commit takes.  A fit of CPU per commit = fixed + K * per chat is
printed at the end: what grouping more chats in a commit can and cannot
save.  ``--pause S`` sleeps S seconds before each commit, as the store's
thread waits between the commits of a paced load: the same commit then
costs more CPU, its code and data no longer in the processor's caches.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from sktalent.store import sqlite  # noqa: E402
from sktalent.store.interfaces import (  # noqa: E402
    ChatRecord,
    Dequeue,
    Enqueue,
    Guarded,
    InsertChat,
    Message,
    Op,
    Queued,
    Room,
)

USERS = 20
ROOM = Room(10_000, 10**8)
ENVELOPE = json.dumps(
    {"type": "order_chat", "msgid": "", "o_id": "o-1", "content": "x" * 40}, ensure_ascii=False
)


def chat_ops(n: int, first: int) -> list[Op]:
    """n chats between the USERS paired up, numbered from first."""
    ops: list[Op] = []
    for i in range(first, first + n):
        sender, recipient = f"u{(2 * i) % USERS}", f"u{(2 * i + 1) % USERS}"
        record = ChatRecord(f"m{i}", sender, recipient, "o-1", ENVELOPE, i)
        then = (
            Enqueue(recipient, Message(f"c/{recipient}", ENVELOPE.encode(), 1), i, "text", ROOM),
            Enqueue(sender, Message(f"c/{sender}", b'{"type":"sent"}', 1), i, None, ROOM),
        )
        ops.append(InsertChat(record, then, digest="d"))
    return ops


def measure(path: str, chats: int, commits: int, pause: float) -> tuple[float, float]:
    """
    (CPU, wall) seconds per commit of chats chats on a new store at path,
    pause seconds of sleep before each.
    """
    conn = sqlite.connect(path)
    try:
        sqlite.migrate(conn, path, sqlite.MIGRATIONS)
        acknowledged: list[Op] = []
        cpu = wall = 0.0
        for n in range(commits):
            ops = chat_ops(chats, n * chats)
            if pause:
                time.sleep(pause)
            started, started_cpu = time.perf_counter(), time.thread_time()
            results = sqlite._commit(conn, [*ops, *acknowledged])
            cpu += time.thread_time() - started_cpu
            wall += time.perf_counter() - started
            acknowledged = [
                Dequeue(queued_op.client_id, queued.seq)
                for op, result in zip(ops, results, strict=False)
                if isinstance(op, InsertChat) and isinstance(result, Guarded)
                for queued_op, queued in zip(op.then, result.then, strict=True)
                if isinstance(queued_op, Enqueue) and isinstance(queued, Queued)
            ]
            if len(acknowledged) != 2 * chats:
                raise RuntimeError(f"commit {n}: {results!r} did not queue every message")
        return cpu / commits, wall / commits
    finally:
        conn.close()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--chats", default="1,2,3,4,8,16,32", help="chats per commit, K")
    parser.add_argument("--commits", type=int, default=2000, help="commits per K")
    parser.add_argument(
        "--pause", type=float, default=0.0, help="seconds of sleep before each commit"
    )
    options = parser.parse_args(argv)
    sizes = [int(k) for k in options.chats.split(",")]
    if not sizes or min(sizes) < 1 or options.commits < 1:
        parser.error("--chats takes positive numbers, --commits a positive count")
    if not 0 <= options.pause <= 1:
        parser.error("--pause takes seconds from 0 to 1")
    points: list[tuple[int, float]] = []
    print(f"{'K':>4} {'CPU us/commit':>14} {'CPU us/chat':>12} {'wall us/commit':>15}")
    for k in sizes:
        directory = tempfile.mkdtemp(prefix="sktalent-commit-")
        try:
            cpu, wall = measure(
                str(Path(directory) / "store.db"), k, options.commits, options.pause
            )
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        points.append((k, cpu))
        print(f"{k:>4} {cpu * 1e6:>14.0f} {cpu / k * 1e6:>12.1f} {wall * 1e6:>15.0f}")
    if len(points) > 1:
        # Least squares: CPU per commit = fixed + K * per chat.
        mean_k = sum(k for k, _ in points) / len(points)
        mean_cpu = sum(c for _, c in points) / len(points)
        slope = sum((k - mean_k) * (c - mean_cpu) for k, c in points) / sum(
            (k - mean_k) ** 2 for k, _ in points
        )
        print(
            f"fit: {(mean_cpu - slope * mean_k) * 1e6:.0f} us a commit"
            f" + {slope * 1e6:.1f} us a chat"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
