"""
What a cluster's nodes cost: chat within one node next to chat between nodes.

    python bench/cluster.py mongodb://HOST:PORT/DB [--rate 40] [--seconds 20]
        [--pairs 12]

For each layout a fresh cluster (a redis-server of its own and sktalent
nodes with --cluster, all on 127.0.0.1, a database of its own named DB with
a random suffix, dropped afterwards) takes a steady RATE chats a second from
PAIRS user pairs for SECONDS:

- same node: two nodes up, every user on node a;
- 2 nodes: senders on a, recipients on b;
- 3 nodes: pair i's sender on node i mod 3, its recipient on the next node.

Printed per layout: the server CPU per chat (utime + stime of every node,
from /proc, over the measured phase, until every chat was answered ``sent``
and delivered), each node's share, the latency from publish to ``sent``
and to delivery (p50, p99), and the commands the store and Redis served per
chat (the store's count is its whole server's: give the bench one of its own;
Redis counts the calls made inside its scripts too).  RATE must be one the
store sustains: the figures are the nodes' own cost, not the store's.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import pymongo

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from loadgen import (  # noqa: E402
    BenchError,
    ChatLoad,
    Latencies,
    Pacing,
    Run,
    ServerProbe,
    close_all,
)

from sktalent.testing.cluster import RedisProcess  # noqa: E402
from sktalent.testing.server import ServerProcess  # noqa: E402

SECRET = b"bench-cluster-secret-0123456789abcdef"


@attrs.frozen
class Layout:
    name: str
    nodes: int
    # Node index of pair i's sender and recipient.
    sender: int
    recipient: int
    # Pair i's nodes are shifted by i times this, modulo the nodes.
    spread: int


LAYOUTS = (
    Layout("same node", 2, 0, 0, 0),
    Layout("2 nodes", 2, 0, 1, 0),
    Layout("3 nodes", 3, 0, 1, 1),
)


@attrs.frozen
class Figures:
    chats: int
    cpu: list[float]
    to_sent: Latencies
    to_delivery: Latencies
    timed_out: bool
    # Commands the store and Redis served meanwhile.
    store_commands: int = 0
    redis_commands: int = 0

    @property
    def per_chat_us(self) -> float:
        return sum(self.cpu) / max(self.chats, 1) * 1e6


@attrs.define(eq=False)
class Cluster:
    """A redis-server and count nodes on one new database, stopped by close()."""

    uri: str
    count: int
    redis: RedisProcess = attrs.Factory(RedisProcess)
    files: Path = attrs.Factory(lambda: Path(tempfile.mkdtemp(prefix="sktalent-bench-")))
    database: str = attrs.Factory(lambda: f"bench_{uuid.uuid4().hex[:8]}")
    nodes: list[ServerProcess] = attrs.Factory(list)

    def start(self) -> Cluster:
        self.redis.start()
        (self.files / "secret").write_bytes(SECRET)
        store = f"{self.uri.rsplit('/', 1)[0]}/{self.database}"

        def node(i: int) -> ServerProcess:
            name = "abcdefgh"[i]
            args = ["--cluster", self.redis.uri, "--node", name]
            args += ["--auth-secret-file", str(self.files / "secret"), "--chat-rate", "1000000"]
            return ServerProcess(args, store=store).start()

        with ThreadPoolExecutor(self.count) as pool:
            self.nodes = list(pool.map(node, range(self.count)))
        return self

    def probes(self) -> list[ServerProbe]:
        return [ServerProbe(n.process.pid) for n in self.nodes if n.process is not None]

    def close(self) -> None:
        for node in self.nodes:
            try:
                node.stop()
            except AssertionError:
                print(f"a node ignored SIGTERM and was killed:\n{node.log}", file=sys.stderr)
            shutil.rmtree(node.directory, ignore_errors=True)
        self.redis.stop()
        shutil.rmtree(self.redis.directory, ignore_errors=True)
        shutil.rmtree(self.files, ignore_errors=True)
        client: pymongo.MongoClient[dict[str, object]]
        with pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=5000) as client:
            client.drop_database(self.database)


async def paced(
    ports: Sequence[tuple[int, int]], rate: float, seconds: float, probes: list[ServerProbe]
) -> Figures:
    """
    Pair i's sender on ports[i][0] chats to its recipient on ports[i][1];
    together they send rate chats a second for seconds.
    """
    run = Run(seconds + 60)
    run.start()
    load = ChatLoad(SECRET, len(ports), 40, clean=True)
    try:
        await load.connect(run, 0, ports)

        def sender(i: int) -> Callable[[int], None]:
            conn = load.senders[i]
            return lambda now: conn.write(load.chat(i, conn.packet_id(), now))

        before = [probe.cpu_seconds() for probe in probes]
        pacing = Pacing(rate, seconds)
        load.expected = await pacing.drive(run, [sender(i) for i in range(len(ports))])
        await load.done()
        cpu = [probe.cpu_seconds() - b for probe, b in zip(probes, before, strict=True)]
        if load.counts["other"]:
            raise BenchError(f"{load.counts['other']} chats were refused")
        return Figures(load.expected, cpu, load.to_sent, load.to_delivery, run.expired)
    finally:
        run.cancel()
        await close_all([*load.senders, *load.recipients])


def store_commands(uri: str) -> int:
    """Commands the MongoDB server has served (serverStatus metrics, as FerretDB keeps them)."""
    client: pymongo.MongoClient[dict[str, Any]]
    with pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000) as client:
        status = client.admin.command("serverStatus")
    commands = status.get("metrics", {}).get("commands", {})
    if not commands:  # MongoDB itself counts them in opcounters.
        return sum(int(v) for v in status.get("opcounters", {}).values())
    return sum(int(c.get("total", 0)) for c in commands.values())


def redis_commands(port: int) -> int:
    """Commands redis-server has served (INFO stats)."""
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(b"INFO stats\r\n")
        data = b""
        while b"total_commands_processed" not in data or not data.endswith(b"\r\n"):
            data += s.recv(65536)
    [line] = [x for x in data.split(b"\r\n") if x.startswith(b"total_commands_processed:")]
    return int(line.split(b":")[1])


def measure(uri: str, layout: Layout, options: argparse.Namespace) -> Figures:
    cluster = Cluster(uri, layout.nodes).start()
    try:
        ports = [
            (
                cluster.nodes[(layout.sender + i * layout.spread) % layout.nodes].mqtt_port,
                cluster.nodes[(layout.recipient + i * layout.spread) % layout.nodes].mqtt_port,
            )
            for i in range(options.pairs)
        ]
        counted = store_commands(uri), redis_commands(cluster.redis.port)
        figures = asyncio.run(paced(ports, options.rate, options.seconds, cluster.probes()))
        return attrs.evolve(
            figures,
            # Less this count's own INFO.
            store_commands=store_commands(uri) - counted[0] - 1,
            redis_commands=redis_commands(cluster.redis.port) - counted[1] - 1,
        )
    finally:
        cluster.close()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("uri", help="mongodb://HOST:PORT/DB")
    parser.add_argument("--rate", type=float, default=40.0, help="chats a second, all pairs")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--pairs", type=int, default=12)
    options = parser.parse_args(argv)
    print(f"{options.pairs} pairs, {options.rate:g} chats/s for {options.seconds:g} s\n")
    print(
        "| layout | chats | CPU µs/chat, all nodes | per node"
        " | sent p50 / p99 ms | delivery p50 / p99 ms | store / Redis commands per chat |"
    )
    print("|" + "---|" * 7)
    results: dict[str, Figures] = {}
    for layout in LAYOUTS:
        figures = results[layout.name] = measure(options.uri, layout, options)
        shares = " / ".join(f"{c / max(figures.chats, 1) * 1e6:.0f}" for c in figures.cpu)
        sent, delivery = figures.to_sent, figures.to_delivery
        chats = max(figures.chats, 1)
        print(
            f"| {layout.name} | {figures.chats} | {figures.per_chat_us:.0f} | {shares} "
            f"| {sent.percentile_ms(0.5):.1f} / {sent.percentile_ms(0.99):.1f} "
            f"| {delivery.percentile_ms(0.5):.1f} / {delivery.percentile_ms(0.99):.1f} "
            f"| {figures.store_commands / chats:.1f} / {figures.redis_commands / chats:.1f} |"
            + (" (timed out)" if figures.timed_out else ""),
            flush=True,
        )
    same, two, three = (results[layout.name] for layout in LAYOUTS)
    print()
    print(f"cross-node / same-node CPU per chat:   {two.per_chat_us / same.per_chat_us:.2f}x")
    print(f"3 nodes / 2 nodes CPU per chat:        {three.per_chat_us / two.per_chat_us:.2f}x")
    gap = two.to_delivery.percentile_ms(0.99) - same.to_delivery.percentile_ms(0.99)
    print(f"cross-node - same-node delivery p99:   {gap:+.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
