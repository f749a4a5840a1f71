"""
sktalent next to a reference broker (mosquitto), measured in the same run
with the same load on 127.0.0.1.

    python bench/run.py [--quick] [--only N ...]

Each scenario starts a fresh server of each kind, runs the load generator
against it and stops it; the figures are printed as one table.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from loadgen import (  # noqa: E402
    Chat,
    FanIn,
    Idle,
    PacedChat,
    PacedPairs,
    Pacing,
    Pairs,
    Result,
    Scenario,
    ServerProbe,
)

from sktalent.testing.server import ServerProcess, free_port, listening, wait_for  # noqa: E402

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
# Not the per-user limit under test here: the bench measures the data path.
SKTALENT_ARGS = ("--chat-rate", "1000000")


@attrs.frozen
class Sizes:
    fanin: int
    pairs: int
    idle: int
    chat: int
    # Seconds of the paced chat, at PACED_RATE.
    paced: float
    limit: float


FULL = Sizes(fanin=300_000, pairs=200_000, idle=2000, chat=30_000, paced=30.0, limit=60.0)
QUICK = Sizes(fanin=20_000, pairs=10_000, idle=500, chat=2000, paced=5.0, limit=10.0)
# Chats a second of scenario 5, all senders together.
PACED_RATE = 1000.0


# -- servers ----------------------------------------------------------------


@contextmanager
def sktalent(anonymous: bool) -> Iterator[ServerProcess]:
    args = [*SKTALENT_ARGS, *(["--anonymous"] if anonymous else [])]
    server = ServerProcess(args).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


@contextmanager
def mosquitto(persistence: bool) -> Iterator[tuple[int, int]]:
    """(port, pid) of a mosquitto on 127.0.0.1, with sktalent's queue limits."""
    directory = Path(tempfile.mkdtemp(prefix="mosquitto-"))
    port = free_port()
    config = directory / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        f"persistence {'true' if persistence else 'false'}\n"
        f"persistence_location {directory}/\n"
        # The same as sktalent's broker: 32 in flight, 10,000 queued.
        "max_inflight_messages 32\n"
        "max_queued_messages 10000\n"
    )
    with open(directory / "mosquitto.log", "wb") as log:
        process = subprocess.Popen(
            [MOSQUITTO, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_for(lambda: _listening(process, port), what=f"mosquitto on port {port}")
        yield port, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        shutil.rmtree(directory, ignore_errors=True)


def _listening(process: subprocess.Popen[bytes], port: int) -> bool:
    if process.poll() is not None:
        raise RuntimeError(f"mosquitto exited with status {process.returncode}")
    return listening(port)


# -- cases ------------------------------------------------------------------


@attrs.frozen
class Case:
    """
    One scenario run against sktalent and against mosquitto.  ``load`` makes
    the scenario from the sktalent server (the chat needs its secret).
    """

    name: str
    load: Callable[[ServerProcess | None], Scenario]
    anonymous: bool = True
    persistence: bool = False


def cases(sizes: Sizes, persistent_chat: bool = False) -> list[Case]:
    limit = sizes.limit
    pacing = Pacing(PACED_RATE, sizes.paced)
    return [
        Case("1 fan-in QoS 0, 10 -> 1", lambda _: FanIn(messages=sizes.fanin, limit=limit)),
        Case("2 QoS 1, 50 pairs", lambda _: Pairs(messages=sizes.pairs, limit=limit)),
        Case(f"3 idle, {sizes.idle} clients", lambda _: Idle(clients=sizes.idle, limit=limit)),
        Case(
            "4 durable chat, 50 pairs",
            lambda server: (
                Chat(server.secret, messages=sizes.chat, limit=limit, durable=persistent_chat)
                if server is not None
                else Pairs(messages=sizes.chat, limit=limit, durable=True)
            ),
            anonymous=False,
            persistence=True,
        ),
        Case(
            f"5 paced chat, 10 pairs, {PACED_RATE:,.0f}/s",
            lambda server: (
                PacedChat(server.secret, pacing, limit=limit, durable=persistent_chat)
                if server is not None
                else PacedPairs(pacing, limit=limit)
            ),
            anonymous=False,
            persistence=True,
        ),
        # Scenario 5's pacing through both servers as plain brokers (clean
        # sessions, no store): what the reads, writes and wake-ups of a
        # message cost at this rate, before any chat or commit work.
        Case(
            f"6 paced QoS 1, 10 pairs, {PACED_RATE:,.0f}/s",
            lambda _: PacedPairs(pacing, limit=limit, durable=False),
        ),
    ]


def measure(scenario: Scenario, port: int, pid: int) -> Result:
    async def measured() -> Result:
        return await scenario(port, ServerProbe(pid))

    return asyncio.run(measured())


def run_case(case: Case) -> tuple[Result, Result]:
    with sktalent(case.anonymous) as server:
        assert server.process is not None
        print(f"  {case.name}: sktalent ...", file=sys.stderr, flush=True)
        ours = measure(case.load(server), server.mqtt_port, server.process.pid)
    with mosquitto(case.persistence) as (port, pid):
        print(f"  {case.name}: mosquitto ...", file=sys.stderr, flush=True)
        theirs = measure(case.load(None), port, pid)
    return ours, theirs


# -- the table --------------------------------------------------------------

# (scenario, metric, sktalent's figure, mosquitto's figure)
Row = tuple[str, str, float | None, float | None]


def number(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None or math.isnan(ours) or math.isnan(theirs) or not theirs:
        return "-"
    return f"{ours / theirs:.2f}x"


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, its columns padded to line up."""
    cells = [header, *rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def table(rows: Sequence[Row]) -> str:
    return markdown(
        ("scenario", "metric", "sktalent", "mosquitto", "ratio"),
        [
            (scenario, metric, number(ours), number(theirs), _ratio(ours, theirs))
            for scenario, metric, ours, theirs in rows
        ],
    )


def rows_of(case: Case, ours: Result, theirs: Result) -> list[Row]:
    names = list(ours.figures) + [n for n in theirs.figures if n not in ours.figures]
    rows: list[Row] = [
        (case.name, name, ours.figures.get(name), theirs.figures.get(name)) for name in names
    ]
    cpu = ("load generator CPU %", ours.loadgen_cpu * 100, theirs.loadgen_cpu * 100)
    rows.append((case.name, *cpu))
    return rows


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: under a minute")
    parser.add_argument(
        "--persistent-chat",
        action="store_true",
        help="the chat scenarios' users connect with cleansession=0, as the apps do",
    )
    parser.add_argument(
        "--only",
        type=int,
        action="append",
        choices=range(1, 7),
        metavar="N",
        help="run scenario N only (repeatable)",
    )
    options = parser.parse_args(argv)
    sizes = QUICK if options.quick else FULL
    raise_fd_limit()
    version = subprocess.run(
        [MOSQUITTO, "-h"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]
    started = time.monotonic()
    rows = []
    timed_out = []
    for index, case in enumerate(cases(sizes, options.persistent_chat), start=1):
        if options.only and index not in options.only:
            continue
        ours, theirs = run_case(case)
        rows += rows_of(case, ours, theirs)
        timed_out += [
            f"{case.name} ({who})"
            for who, result in (("sktalent", ours), ("mosquitto", theirs))
            if result.timed_out
        ]
    print(
        f"sktalent vs {version}; Python {platform.python_version()} ({sys.executable}); "
        f"{len(os.sched_getaffinity(0))} CPUs; sizes {attrs.asdict(sizes)}"
    )
    print("ratio = sktalent / mosquitto; msg/s: higher is better, the rest: lower is better")
    print(
        '4: sktalent CallTalent order_chat on SQLite (ack = "sent"); '
        "mosquitto: QoS 1 pairs, persistence true, cleansession false"
    )
    print(f"5: the same at a steady {PACED_RATE:,.0f} messages/s for {sizes.paced:g} s")
    print("6: QoS 1 pairs (cleansession true) at 5's pace: both servers as plain brokers")
    print()
    print(table(rows))
    if timed_out:
        print(f"\nhit the wall-clock limit ({sizes.limit}s): " + ", ".join(timed_out))
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
