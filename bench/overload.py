"""
The MongoDB store driven past what it can commit, then left alone.

    python bench/overload.py mongodb://HOST:PORT/DB [--pairs 10] [--window 32]
        [--seconds 20] [--recover-limit 300]

One sktalent in CallTalent mode on a database of its own (DB with a random
suffix, dropped afterwards) takes the load of bench/loadgen.py's durable chat
scenario (PAIRS senders, each with WINDOW chats not yet answered ``sent``)
for SECONDS; then the senders disconnect and one new chat is sent.  Printed:
chats answered per second under the load and their latency, what /healthz
answered (once a second, from the start of the load until the new chat is
answered), the time from the end of the load until the new chat is answered
``sent`` (at most RECOVER_LIMIT), the server's peak memory, and how often it
logged the store unavailable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pymongo

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from loadgen import SERVER_TOPIC, Chat, Run, ServerProbe, connect  # noqa: E402

from sktalent.authsign import sign  # noqa: E402
from sktalent.mqtt import packets as p  # noqa: E402
from sktalent.mqtt.codec import encode  # noqa: E402
from sktalent.testing.server import ServerProcess  # noqa: E402


class Sampler(threading.Thread):
    """Peak RSS (five times a second) and /healthz (once a second) until stopped."""

    def __init__(self, server: ServerProcess, probe: ServerProbe) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.probe = probe
        self.peak = 0
        self.health: Counter[str] = Counter()
        self.stopped = threading.Event()

    def run(self) -> None:
        tick = 0
        while not self.stopped.wait(0.2):
            self.peak = max(self.peak, self.probe.rss_bytes())
            tick += 1
            if tick % 5 == 0:
                try:
                    self.health[str(self.server.api("/healthz")[0])] += 1
                except OSError:
                    self.health["no answer in 5 s"] += 1


async def recovery(server: ServerProcess, limit: float) -> float | None:
    """Seconds until a new chat is answered ``sent``; None past limit."""
    started = time.monotonic()
    run = Run(limit)
    run.start()
    user = "overload-probe"
    password = sign(server.secret, user).encode()
    conn = await connect(run, server.mqtt_port, p.Connect(user, True, 60, None, user, password))
    answered: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()

    def on_message(publish: p.Publish, now: int) -> None:
        if not answered.done():
            answered.set_result(json.loads(publish.payload))

    conn.on_message = on_message
    chat = {
        "msgid": "f" * 24,
        "from": user,
        "to": "overload-nobody",
        "type": "order_chat",
        "payload": {"o_id": "o-probe", "expert": True, "content": "x"},
    }
    conn.write(encode(p.Publish(SERVER_TOPIC, json.dumps(chat).encode(), 1, packet_id=1)))
    try:
        answer = await run.bounded(answered, "the new chat's answer")
    except Exception:  # noqa: BLE001 - any end but an answer is no recovery
        return None
    finally:
        run.cancel()
        await conn.close()
    if answer.get("type") != "sent":
        raise RuntimeError(f"the new chat was answered {answer}")
    return time.monotonic() - started


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("uri", help="mongodb://HOST:PORT/DB")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--recover-limit", type=float, default=300.0)
    options = parser.parse_args(argv)
    database = f"{options.uri.rsplit('/', 1)[1]}_{uuid.uuid4().hex[:8]}"
    store = f"{options.uri.rsplit('/', 1)[0]}/{database}"
    server = ServerProcess(["--chat-rate", "1000000"], store=store).start()
    assert server.process is not None
    probe = ServerProbe(server.process.pid)
    before = probe.rss_bytes()
    sampler = Sampler(server, probe)
    sampler.start()
    try:
        load = Chat(
            server.secret,
            pairs=options.pairs,
            messages=10**9,
            window=options.window,
            limit=options.seconds,
        )
        result = asyncio.run(load(server.mqtt_port, probe))
        recovered = asyncio.run(recovery(server, options.recover_limit))
    finally:
        sampler.stopped.set()
        sampler.join()
        try:
            server.stop()
        except AssertionError:
            print("the server ignored SIGTERM for 15 s and was killed", file=sys.stderr)
        log = server.log
        shutil.rmtree(server.directory, ignore_errors=True)
        client: pymongo.MongoClient[dict[str, object]]
        with pymongo.MongoClient(options.uri, serverSelectionTimeoutMS=5000) as client:
            client.drop_database(database)
    figures = result.figures
    print(f"{options.pairs} pairs x {options.window} chats in flight for {options.seconds:g} s")
    print(f"answered sent        {figures['acked msg/s']:.0f} chats/s")
    print(
        f"latency to sent      p50 {figures['ack latency p50 ms'] / 1000:.1f} s,"
        f" p99 {figures['ack latency p99 ms'] / 1000:.1f} s"
    )
    print(f"/healthz             {dict(sampler.health)}")
    print(
        "a new chat sent      "
        + (
            f"{recovered:.1f} s after the load stopped"
            if recovered is not None
            else f"not within {options.recover_limit:g} s"
        )
    )
    print(f"server RSS           {before / 2**20:.0f} MiB before, {sampler.peak / 2**20:.0f} peak")
    print(f"'unavailable' logged {log.count('is unavailable')} times")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
