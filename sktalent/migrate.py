"""
Copy a SQLite store into MongoDB, for a deployment that outgrows one machine:

    python3 -m sktalent.migrate [--batch N] SRC DST

SRC is the SQLite store as ``--store`` names it (``sqlite:PATH``, or the
path alone), DST the MongoDB store (``mongodb://HOST:PORT/DB``).  Every
session (subscriptions, seq counter, what its last connection sent, inbound
packet ids) with its queue (seqs, order, push and release state), chat
history and receipts, devices (logged out or not), bans and retained
messages are copied, a page at a time from one snapshot of SRC, which is
only read.

Each item is written under its key, replacing what DST holds under that
key (SRC wins): a session's queue in DST becomes exactly SRC's.  What DST
holds under other keys is left as it is.  So a second run, or one after an
interrupted run, leaves DST as one uninterrupted run would.

It refuses a SRC that a process (a running server) has open, and a DST
that a server has used within the last seconds, or that another copy is
going into: stop the server first.  A DST it refuses is only read.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import NoReturn, Protocol, TextIO

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from .store import check_store_uri
from .store.interfaces import StoreUnavailable
from .store.mongo import LIVE, Copied, MongoStore, where
from .store.sqlite import Snapshot, holder

# Pages of at most this many items are read and written, by default.
BATCH = 500
MAX_BATCH = 10_000
# Seconds between progress lines within a step.
EVERY = 2.0


class Refused(Exception):
    """The copy cannot be made, for the reason given in one line."""


class Target(Protocol):
    def copy_in(self, items: Sequence[Copied]) -> Deferred[None]: ...

    def copy_prune(self, clients: Sequence[str]) -> Deferred[None]: ...


@attrs.define
class Progress:
    """Lines telling how far each step has got: at its end, and every EVERY seconds within it."""

    _out: TextIO
    _clock: Callable[[], float] = time.monotonic
    _last: float = attrs.field(default=0.0, init=False)

    def say(self, line: str) -> None:
        print(line, file=self._out, flush=True)
        self._last = self._clock()

    def advance(self, counts: Sequence[tuple[str, int, int]], done: bool = False) -> None:
        """(what, copied, total) of the step under way."""
        if done or self._clock() - self._last >= EVERY:
            self.say(", ".join(f"{what}: {copied}/{total}" for what, copied, total in counts))


async def copy(source: Snapshot, target: Target, batch: int, progress: Progress) -> dict[str, int]:
    """Copy everything source holds into target, batch items a write; how many of each went."""
    totals = source.counts()
    copied = dict.fromkeys(totals, 0)

    def figures(*tables: str) -> list[tuple[str, int, int]]:
        return [(_NAMES[t], copied[t], totals[t]) for t in tables]

    progress.say(f"Copying {totals['sessions']} sessions and {totals['queue']} queued messages")
    after: tuple[str, int] | None = None

    async def queue_through(through: str | None) -> None:
        nonlocal after
        while entries := source.queue(after, through, batch):
            await target.copy_in(entries)
            copied["queue"] += len(entries)
            last = entries[-1]
            after = (last.client_id, last.queued.seq)
            progress.advance(figures("sessions", "queue"))

    # Each page of sessions, their queues, then what else DST queued for them.
    for sessions in source.sessions(batch):
        await target.copy_in(sessions)
        copied["sessions"] += len(sessions)
        await queue_through(sessions[-1].record.client_id)
        await target.copy_prune([s.record.client_id for s in sessions])
        progress.advance(figures("sessions", "queue"))
    # Messages of no session, which a store should not hold: copied all the same.
    await queue_through(None)
    progress.advance(figures("sessions", "queue"), done=True)
    pages: Iterable[tuple[str, Iterable[Sequence[Copied]]]] = (
        ("chats", source.chats(batch)),
        ("receipts", source.receipts(batch)),
        ("devices", source.devices(batch)),
        ("bans", source.bans(batch)),
        ("retained", source.retained(batch)),
    )
    for table, table_pages in pages:
        progress.say(f"Copying {totals[table]} {_NAMES[table]}")
        for page in table_pages:
            await target.copy_in(page)
            copied[table] += len(page)
            progress.advance(figures(table))
        progress.advance(figures(table), done=True)
    return copied


_NAMES = {
    "sessions": "sessions",
    "queue": "queued messages",
    "chats": "chat messages",
    "receipts": "receipts",
    "devices": "devices",
    "bans": "bans",
    "retained": "retained messages",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage and message.
        self.exit(2, f"sktalent.migrate: {message} (--help for usage)\n")


def _batch(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if not 0 < number <= MAX_BATCH:
        raise argparse.ArgumentTypeError(f"{number} is not between 1 and {MAX_BATCH}")
    return number


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python3 -m sktalent.migrate",
        description=(
            "Copy a SQLite store into MongoDB: sessions and their queues, chat history,"
            " receipts, devices, bans and retained messages.  SRC is only read.  What DST"
            " holds under a key SRC has is replaced (SRC wins); the rest of DST is kept, so"
            " the copy can be run again, also after an interrupted run.  Stop every server"
            " using SRC or DST first: a store in use is refused, and no server starts on DST"
            " while the copy runs."
        ),
    )
    parser.add_argument("src", metavar="SRC", help="the SQLite store: sqlite:PATH or PATH")
    parser.add_argument("dst", metavar="DST", help="the MongoDB store: mongodb://HOST:PORT/DB")
    parser.add_argument(
        "--batch",
        type=_batch,
        default=BATCH,
        metavar="N",
        help=f"items read and written at a time, 1 to {MAX_BATCH} (default {BATCH})",
    )
    return parser


def _sqlite_path(src: str) -> str:
    if src.startswith("mongodb://") or src == "memory:":
        raise Refused(f"SRC {src!r} is not a SQLite store: use sqlite:PATH or PATH")
    path = src.removeprefix("sqlite:")
    if not path:
        raise Refused(f"SRC {src!r} has no file name: use sqlite:PATH or PATH")
    return path


def _check_dst(dst: str) -> None:
    if not dst.startswith("mongodb://"):
        raise Refused(f"DST {dst!r} is not a MongoDB store: use mongodb://HOST:PORT/DB")
    try:
        check_store_uri(dst)
    except ValueError as e:
        raise Refused(f"DST: {e}") from None


def _unused(others: Sequence[tuple[str, float]]) -> None:
    if others:
        who, ago = others[0]
        raise Refused(
            f"DST is in use: {who} used it {ago:.0f} s ago; stop every server using it"
            f" (one that died is forgotten {LIVE:g} s after it was last heard of)"
        )


async def _run(reactor: IReactorTime, path: str, dst: str, batch: int) -> None:
    pid = holder(path)
    if pid is not None:
        raise Refused(
            f"the SQLite store {os.path.abspath(path)} is open in process {pid}"
            " (a running server?): stop it first"
        )
    try:
        source = Snapshot.open(path)
    except ValueError as e:
        raise Refused(str(e)) from None
    progress = Progress(sys.stdout)
    me = f"sktalent.migrate on {socket.gethostname()} pid {os.getpid()}"
    target = MongoStore(reactor, dst, holder=me, copying=True)
    try:
        try:
            # Only read first: starting on DST writes (indexes, schema, this
            # run's record), which a server or copy using it must not see.
            _unused(await target.others(forget=False))
            await target.start()
        except StoreUnavailable as e:
            raise Refused(f"DST cannot be reached: {e}") from None
        # The final word, now this run is on record: a server or copy that
        # started since the look above sees this run, or is seen here.
        _unused(await target.others())
        started = reactor.seconds()
        progress.say(f"Copying {os.path.abspath(path)} into {where(dst)}")
        copied = await copy(source, target, batch, progress)
        took = reactor.seconds() - started
        progress.say(
            f"Done in {took:.1f} s: "
            + ", ".join(f"{copied[table]} {name}" for table, name in _NAMES.items())
        )
    finally:
        source.close()
        await target.stop()


def _refuse(why: str, status: int) -> NoReturn:
    print(f"sktalent.migrate: {why}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        path = _sqlite_path(args.src)
        _check_dst(args.dst)
    except Refused as e:
        _refuse(str(e), 2)
    from twisted.internet import task

    async def run(reactor: IReactorTime) -> None:
        try:
            await _run(reactor, path, args.dst, args.batch)
        except Refused as e:
            _refuse(str(e), 1)
        except StoreUnavailable as e:
            _refuse(f"stopped: {e}; run it again once DST answers", 1)

    task.react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
