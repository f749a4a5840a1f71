"""
Where sktalent spends its CPU under one bench scenario: py-spy samples the
server while the scenario runs, and the samples are summed by the part of
the server they fall in, with each part's share of a message's CPU time.

    python bench/profile.py N [--rate 500] [--raw FILE]

N is a scenario of bench/run.py (1, 2, 4, 5 or 6; 3 is idle).  Needs py-spy
(pip install py-spy) and the right to trace the server (root, or
kernel.yama.ptrace_scope 0).  py-spy stops the server at each sample, so
the server runs slower than in run.py; the shares are what to read.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from run import FULL, cases, measure, raise_fd_limit, sktalent  # noqa: E402

# Frames of the worker threads waiting for work.
_IDLE = ("threading.py", "queue.py")
# Innermost frames that are waits in C, which py-spy samples as busy: the
# reactor in epoll_wait, the SQLite thread waiting for its next call.
_WAITING = re.compile(r"^(EPollReactor\.doPoll \(.*epollreactor\.py|Worker\._work \(.*worker\.py)")
# The transport's side of writing: from transport.write to the send call.
_WRITES = frozenset(
    (
        "FileDescriptor.write",
        "FileDescriptor.startWriting",
        "FileDescriptor.doWrite",
        "ConnectionMixin.write",
        "Connection.writeSomeData",
        "EPollReactor.addWriter",
        "EPollReactor.removeWriter",
        "FileDescriptor.stopWriting",
    )
)
_BROKER = ("session", "broker", "plan", "registry", "router", "topics", "keepalive")
_FRAME = re.compile(r"(?P<function>.*) \((?P<where>[^()]*)\)$")


def part(stack: Sequence[str]) -> str | None:
    """The part of the server a sample's stack (outermost first) is in; None when idle."""
    if any(idle in frame for frame in stack for idle in _IDLE) and not any(
        "sktalent" in frame for frame in stack
    ):
        return None
    if stack and _WAITING.match(stack[-1]):
        return None
    for frame in reversed(stack):
        match = _FRAME.match(frame)
        if match is None:
            continue
        function, where = match["function"], match["where"]
        if "prometheus_client" in where or "sktalent/metrics.py" in where:
            return "metrics"
        if "sktalent" in where:
            return _sktalent_part(function, where)
        if function in _WRITES:
            return "writes: transport and send()"
    return "reactor: poll, recv(), dispatch"


def _sktalent_part(function: str, where: str) -> str:
    if "mqtt/codec.py" in where:
        encoding = function.startswith(("encode", "_encode", "_framed", "_uint16", "_string"))
        return "codec: encode" if encoding else "codec: decode"
    if "mqtt.packets." in where:
        return "packet values (attrs)"
    if "store.interfaces." in where:
        return "message values (attrs)"
    if "mqtt/protocol.py" in where or "mqtt.protocol." in where:
        return "connection (protocol.py)"
    if any(f"mqtt/{name}.py" in where or f"mqtt.{name}." in where for name in _BROKER):
        return "broker: session, plan, router, topics"
    if "calltalent" in where:
        return "CallTalent application"
    if "store" in where:
        return "store"
    return "other: " + where.rsplit("/", 1)[-1].split(":")[0]


def summarise(lines: Iterable[str]) -> tuple[collections.Counter[str], int]:
    """Samples per part, and the samples counted, from py-spy's raw output."""
    parts: collections.Counter[str] = collections.Counter()
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        name = part(stack.split(";"))
        if name is not None and count.isdigit():
            parts[name] += int(count)
    return parts, sum(parts.values())


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("scenario", type=int, choices=(1, 2, 4, 5, 6))
    parser.add_argument("--rate", type=int, default=500, help="samples a second")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw samples here")
    options = parser.parse_args(argv)
    spy = shutil.which("py-spy")
    if spy is None:
        parser.error("py-spy is not installed (pip install py-spy)")
    raise_fd_limit()
    case = cases(FULL)[options.scenario - 1]
    with tempfile.TemporaryDirectory() as scratch, sktalent(case.anonymous) as server:
        assert server.process is not None
        pid = server.process.pid
        raw = options.raw or Path(scratch) / "samples.txt"
        command = [spy, "record", "--pid", str(pid), "--rate", str(options.rate)]
        sampler = subprocess.Popen(
            [*command, "--format", "raw", "--output", str(raw)], stdout=subprocess.DEVNULL
        )
        time.sleep(1)  # py-spy attaches
        result = measure(case.load(server), server.mqtt_port, pid)
        sampler.send_signal(signal.SIGINT)
        sampler.wait(30)
        parts, total = summarise(raw.read_text().splitlines())
    per_message = next(
        (
            value if "us per" in name else value / 10_000 * 1e6
            for name, value in result.figures.items()
            if "CPU" in name
        ),
        None,
    )
    print(f"scenario {case.name}: {total} samples")
    for name, value in result.figures.items():
        print(f"  {name}: {value:,.3g}")
    print(f"\n{'part':40} {'share':>6} {'us/msg':>7}")
    for name, count in parts.most_common():
        share = count / max(total, 1)
        cost = "" if per_message is None else f"{share * per_message:7.2f}"
        print(f"{name:40} {share * 100:5.1f}% {cost}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
