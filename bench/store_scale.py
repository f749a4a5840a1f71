"""
The store as the source of truth, measured: how a server starts and what it
holds in memory with many stored sessions, and a long queue drained by the
user it is for.

    python bench/store_scale.py [--sizes 0,10000,1000000] [--backlog 10000]

For each size N a SQLite store is seeded (bench/seed.py) with N users who
never connected, each with one queued notification, and a real server
(``twistd -n sktalent``, CallTalent mode) is started on it: the time from
the process's start to its MQTT port accepting a connection, and its RSS
(VmRSS of /proc/PID/status) then, once its CPU has gone quiet, and at its
peak (VmHWM).  The last seeded user then connects and must get their message.

Then a store of --backlog-others such users and one user with --backlog
queued messages: once the server has settled (the idle figure) that user
connects with cleansession=false and acknowledges every QoS 1 PUBLISH.
Measured: the times to the first message and to the last from the start of
the TCP connection, whether every message came once and in order, and the
server's RSS sampled every 10 ms while the queue drains.

Everything runs on 127.0.0.1 on free ports, in temporary directories that
are removed afterwards.  A server that does not listen within --wait seconds,
or grows past --max-rss MiB while starting, is killed and reported so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from loadgen import BenchError, Run, ServerProbe, connect, login  # noqa: E402
from run import markdown, number  # noqa: E402
from seed import BACKLOG_USER, seed, user_id  # noqa: E402

from sktalent.mqtt import packets as p  # noqa: E402
from sktalent.testing.server import ServerProcess, listening  # noqa: E402

MiB = 2**20
# The server is taken to have settled when it uses less CPU than this.
QUIET_CPU = 0.05
# A connecting user's messages must all arrive within this.
DRAIN_LIMIT = 120.0


# -- the server ---------------------------------------------------------------


@attrs.frozen
class Started:
    """How a start went: seconds to listening, or None and why not."""

    seconds: float | None
    why: str = ""


def start(server: ServerProcess, wait: float, max_rss: int) -> Started:
    """
    Spawn server and poll every 10 ms until its MQTT port accepts, it exits,
    wait seconds pass or its RSS passes max_rss bytes.
    """
    began = time.monotonic()
    server.spawn()
    assert server.process is not None
    probe = ServerProbe(server.process.pid)
    while True:
        elapsed = time.monotonic() - began
        if server.process.poll() is not None:
            return Started(None, f"exited with status {server.process.returncode}")
        if listening(server.mqtt_port):
            return Started(elapsed)
        rss = probe.status_bytes("VmRSS")
        if rss > max_rss or elapsed > wait:
            return Started(
                None, f"not listening after {elapsed:.1f} s, at {rss / MiB:,.0f} MiB RSS: killed"
            )
        time.sleep(0.01)


def settle(probe: ServerProbe, limit: float = 60.0) -> None:
    """Wait, at most limit seconds, until the server's CPU has gone quiet."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = probe.cpu_seconds()
        time.sleep(0.5)
        if probe.cpu_seconds() - before < QUIET_CPU * 0.5:
            return


def stop(server: ServerProcess) -> str:
    """SIGTERM (SIGKILL if ignored); what went wrong, if anything."""
    try:
        server.stop()
    except AssertionError:
        return "ignored SIGTERM for 15 s: killed"
    return ""


@contextmanager
def sampling(probe: ServerProbe, interval: float = 0.01) -> Iterator[list[int]]:
    """VmRSS every interval seconds, on a thread of its own, while inside."""
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while True:
            samples.append(probe.status_bytes("VmRSS"))
            if done.wait(interval):
                return

    thread = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join()


# -- a user connecting --------------------------------------------------------


@attrs.frozen
class Drained:
    """A user's queue as it arrived: times in seconds from the TCP connect."""

    expected: int
    msgids: list[str]
    first: float | None
    last: float | None

    @property
    def complete(self) -> bool:
        """Every message once and in order (the seed's msgids sort by seq)."""
        ids = self.msgids
        return len(ids) == self.expected and all(a < b for a, b in pairwise(ids))


async def drain(port: int, secret: bytes, user: str, expected: int, limit: float) -> Drained:
    """Connect as user (cleansession=false) and take expected messages."""
    run = Run(limit)
    run.start()
    done = run.event()
    msgids: list[str] = []
    arrived: list[int] = []

    def on_message(publish: p.Publish, now: int) -> None:
        msgids.append(json.loads(publish.payload)["msgid"])
        arrived.append(now)
        if len(msgids) >= expected:
            done.set()

    began = time.perf_counter_ns()
    try:
        conn = await connect(run, port, login(secret, user, clean=False, keepalive=30), on_message)
        if len(msgids) < expected:
            await done.wait()
        await conn.close()
    finally:
        run.cancel()

    def since(at: int) -> float:
        return (at - began) / 1e9

    return Drained(
        expected,
        msgids,
        since(arrived[0]) if arrived else None,
        since(arrived[-1]) if arrived else None,
    )


# -- the scenarios ------------------------------------------------------------


@attrs.frozen
class Options:
    sizes: Sequence[int]
    backlog: int
    backlog_others: int
    wait: float
    max_rss: int


def seeded(directory: Path, users: int, backlog: int = 0) -> tuple[Path, float]:
    """A store file seeded in directory, and the seconds it took."""
    path = directory / f"store-{users}-{backlog}.sqlite3"
    began = time.perf_counter()
    seed(path, users, backlog)
    return path, time.perf_counter() - began


@attrs.frozen
class Start:
    """One size's start; memory in bytes, None where the server never listened."""

    users: int
    seeding: float
    store_bytes: int
    started: Started
    listening_rss: int | None
    settled_rss: int | None
    peak_rss: int
    delivered: str
    stopped: str

    def cells(self, baseline: int | None) -> list[str]:
        def mib(value: int | None) -> str:
            return "-" if value is None else number(value / MiB)

        settled = self.settled_rss
        more = "-" if settled is None or baseline is None else f"{(settled - baseline) / MiB:+,.1f}"
        seconds = self.started.seconds
        return [
            f"{self.users:,}",
            f"{self.seeding:.1f}",
            mib(self.store_bytes),
            self.started.why if seconds is None else f"{seconds:.2f}",
            mib(self.listening_rss),
            mib(settled),
            mib(self.peak_rss),
            more,
            self.delivered,
            self.stopped or "-",
        ]


def measure_start(directory: Path, users: int, options: Options) -> Start:
    """Seed users, start a server on them, measure it and stop it."""
    path, seeding = seeded(directory, users)
    store_bytes = path.stat().st_size
    server = ServerProcess(store=f"sqlite:{path}")
    try:
        print(f"  {users:,} stored sessions: starting ...", file=sys.stderr, flush=True)
        started = start(server, options.wait, options.max_rss)
        assert server.process is not None
        probe = ServerProbe(server.process.pid)
        if started.seconds is None:
            peak = probe.status_bytes("VmHWM")
            server.kill()
            return Start(users, seeding, store_bytes, started, None, None, peak, "-", "")
        listening_rss = probe.status_bytes("VmRSS")
        settle(probe)
        settled = probe.status_bytes("VmRSS")
        peak = probe.status_bytes("VmHWM")
        delivered = "-"
        if users:
            try:
                last = asyncio.run(
                    drain(server.mqtt_port, server.secret, user_id(users - 1), 1, 10.0)
                )
                delivered = "yes" if last.complete else f"no: {len(last.msgids)} messages"
            except BenchError as e:
                delivered = f"no: {e}"
        stopped = stop(server)
        return Start(
            users, seeding, store_bytes, started, listening_rss, settled, peak, delivered, stopped
        )
    finally:
        shutil.rmtree(server.directory, ignore_errors=True)
        path.unlink()


def backlog_rows(directory: Path, options: Options) -> list[tuple[str, str]]:
    """The long queue drained: (metric, value) rows."""
    path, _ = seeded(directory, options.backlog_others, options.backlog)
    server = ServerProcess(store=f"sqlite:{path}")
    rows: list[tuple[str, str]] = []
    try:
        print(f"  {options.backlog:,} queued for one user ...", file=sys.stderr, flush=True)
        started = start(server, options.wait, options.max_rss)
        assert server.process is not None
        if started.seconds is None:
            server.kill()
            return [("start", started.why)]
        probe = ServerProbe(server.process.pid)
        settle(probe)
        idle = probe.status_bytes("VmRSS")
        probe.reset_peak()
        with sampling(probe) as samples:
            drained = asyncio.run(
                drain(server.mqtt_port, server.secret, BACKLOG_USER, options.backlog, DRAIN_LIMIT)
            )
        peak = max([*samples, probe.status_bytes("VmHWM")])
        settle(probe)
        after = probe.status_bytes("VmRSS")
        last = drained.last or float("nan")
        rows = [
            ("start to listening s", f"{started.seconds:.2f}"),
            ("idle RSS MiB", number(idle / MiB)),
            ("first message ms", number((drained.first or float("nan")) * 1000)),
            ("last message s", f"{last:.2f}"),
            ("messages/s", number(len(drained.msgids) / last)),
            (
                "delivered",
                f"{len(drained.msgids):,} of {options.backlog:,}"
                f", {'each once, in order' if drained.complete else 'NOT each once in order'}",
            ),
            ("peak RSS while draining MiB", number(peak / MiB)),
            ("peak - idle MiB", f"{(peak - idle) / MiB:+.1f}"),
            ("RSS samples (10 ms)", f"{len(samples):,}"),
            ("RSS after, settled MiB", number(after / MiB)),
        ]
        trouble = stop(server)
        if trouble:
            rows.append(("stop", trouble))
    finally:
        shutil.rmtree(server.directory, ignore_errors=True)
        path.unlink()
    return rows


def commit() -> str:
    """The commit measured, with a mark when the tree has changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head


def _sizes(text: str) -> list[int]:
    sizes = [int(size) for size in text.split(",")]
    if not sizes or min(sizes) < 0:
        raise argparse.ArgumentTypeError("sizes are counts, 0 or more")
    return sizes


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=[0, 10_000, 1_000_000],
        help="stored sessions to start with, comma-separated; the first is the baseline",
    )
    parser.add_argument("--backlog", type=int, default=10_000, help="one user's queued messages")
    parser.add_argument(
        "--backlog-others", type=int, default=10_000, help="other stored sessions with it"
    )
    parser.add_argument("--wait", type=float, default=600.0, help="seconds a start may take")
    parser.add_argument(
        "--max-rss", type=int, default=8192, help="MiB a starting server may grow to"
    )
    args = parser.parse_args(argv)
    options = Options(args.sizes, args.backlog, args.backlog_others, args.wait, args.max_rss * MiB)
    began = time.monotonic()
    directory = Path(tempfile.mkdtemp(prefix="sktalent-scale-"))
    try:
        starts = [measure_start(directory, users, options) for users in options.sizes]
        drained = backlog_rows(directory, options) if options.backlog else []
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(
        f"sktalent {commit()}; Python {platform.python_version()};"
        f" {len(os.sched_getaffinity(0))} CPUs; SQLite store"
    )
    print()
    print(
        markdown(
            (
                "stored sessions",
                "seed s",
                "store MiB",
                "start to listening s",
                "RSS listening MiB",
                "RSS settled MiB",
                "peak RSS MiB",
                f"settled - {options.sizes[0]:,} MiB",
                "seeded user gets its message",
                "stop",
            ),
            [measured.cells(starts[0].settled_rss) for measured in starts],
        )
    )
    if drained:
        print()
        print(
            f"{options.backlog:,} messages queued for one user,"
            f" {options.backlog_others:,} other stored sessions"
        )
        print()
        print(markdown(("metric", "value"), drained))
    print(f"\ntotal {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as e:
        sys.exit(f"store_scale: {e}")
