"""
Load generator for MQTT 3.1.1 servers: many connections in one asyncio loop,
on raw sockets, speaking through the server's own codec, all on 127.0.0.1.

Each scenario is bounded twice: by a message count and by a wall-clock limit,
after which it stops and reports what it measured so far (``timed_out``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import attrs

from sktalent.mqtt import packets as p
from sktalent.mqtt.codec import MAX_REMAINING_LENGTH, Decoder, encode

HOST = "127.0.0.1"
SERVER_TOPIC = "$sktalent/server/mqttserver"
# A payload starts with its send time (perf_counter_ns) for delivery latency.
STAMP_SIZE = 8
# Connection attempts in flight at once: stays well under the listen backlog.
CONNECT_CONCURRENCY = 100
_CLOCK_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class BenchError(Exception):
    """The server refused or broke the exchange a scenario needs."""


# -- reading the server process --------------------------------------------


@attrs.frozen
class ServerProbe:
    """CPU time and memory of the server process, from /proc."""

    pid: int

    def cpu_seconds(self) -> float:
        """User plus system CPU time used so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            # The command name may hold spaces; the fields after it do not.
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICK

    def rss_bytes(self) -> int:
        """Resident set size (VmRSS)."""
        with open(f"/proc/{self.pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE

    def status_bytes(self, field: str) -> int:
        """A memory figure of /proc/PID/status, such as VmRSS or VmHWM (peak RSS)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name == field:
                    return int(value.split()[0]) * 1024
        raise KeyError(f"no {field} in /proc/{self.pid}/status")

    def reset_peak(self) -> None:
        """Start VmHWM afresh from the current RSS."""
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")


# -- one run's clock --------------------------------------------------------


@attrs.define(eq=False)
class Run:
    """
    The wall-clock bound of one scenario: when it expires every waiter is
    woken and finds ``expired`` set.
    """

    limit: float
    expired: bool = False
    _events: list[asyncio.Event] = attrs.Factory(list)
    _timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.limit, self.expire)

    def expire(self) -> None:
        self.expired = True
        for event in self._events:
            event.set()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def event(self) -> asyncio.Event:
        """An event that the expiry also sets."""
        event = asyncio.Event()
        self._events.append(event)
        return event

    async def bounded(self, awaitable: Awaitable[Any], what: str) -> Any:
        """awaitable's result, or BenchError once the run has expired."""
        remaining = self.limit if self._timer is None else self._timer.when() - _now()
        try:
            return await asyncio.wait_for(awaitable, max(remaining, 0.001))
        except TimeoutError:
            self.expired = True
            raise BenchError(f"timed out waiting for {what}") from None


def _now() -> float:
    return asyncio.get_running_loop().time()


# -- wire helpers -----------------------------------------------------------


@functools.cache
def puback(packet_id: int) -> bytes:
    return encode(p.PubAck(packet_id))


@attrs.frozen
class PublishTemplate:
    """
    A PUBLISH encoded once by the codec; each copy changes only the packet
    identifier and the send time at the head of the payload, so building one
    costs a few concatenations.
    """

    qos: int
    prefix: bytes
    suffix: bytes

    @classmethod
    def of(cls, topic: str, size: int, qos: int) -> PublishTemplate:
        if size < STAMP_SIZE:
            raise ValueError(f"payload of {size} bytes cannot hold a {STAMP_SIZE}-byte stamp")
        wire = encode(p.Publish(topic, bytes(size), qos, packet_id=1 if qos else None))
        start = len(wire) - size - (2 if qos else 0)
        return cls(qos, wire[:start], wire[len(wire) - size + STAMP_SIZE :])

    def build(self, packet_id: int, stamp: int) -> bytes:
        pid = packet_id.to_bytes(2, "big") if self.qos else b""
        return self.prefix + pid + stamp.to_bytes(STAMP_SIZE, "big") + self.suffix


def stamp_of(publish: p.Publish) -> int:
    return int.from_bytes(publish.payload[:STAMP_SIZE], "big")


# -- a connection -----------------------------------------------------------

OnMessage = Callable[[p.Publish, int], None]
OnAck = Callable[[int, int], None]


def _ignore(*_: object) -> None:
    pass


@attrs.define(eq=False)
class Connection(asyncio.Protocol):
    """
    One client connection.  Incoming QoS 1 PUBLISHes are acknowledged in
    one write per read; ``inflight`` counts own QoS 1 PUBLISHes not yet
    acknowledged, and ``room`` is set whenever one is.
    """

    room: asyncio.Event
    on_message: OnMessage = _ignore
    on_ack: OnAck = _ignore
    inflight: int = 0
    _next_id: int = 0
    _transport: asyncio.Transport | None = None
    _decoder: Decoder = attrs.Factory(lambda: Decoder(MAX_REMAINING_LENGTH))
    _replies: list[tuple[type[p.Packet], asyncio.Future[p.Packet]]] = attrs.Factory(list)
    _lost: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._lost = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        assert self._lost is not None
        self._lost.set_result(None)
        for _, future in self._replies:
            if not future.done():
                future.set_exception(BenchError("the server closed the connection"))
        self.room.set()

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        acks = []
        for packet in self._decoder.feed(data):
            if type(packet) is p.Publish:
                if packet.qos:
                    assert packet.packet_id is not None
                    acks.append(puback(packet.packet_id))
                self.on_message(packet, now)
            elif type(packet) is p.PubAck:
                self.inflight -= 1
                self.on_ack(packet.packet_id, now)
                self.room.set()
            else:
                self._reply(packet)
        if acks:
            self.write(b"".join(acks))

    def _reply(self, packet: p.Packet) -> None:
        for index, (kind, future) in enumerate(self._replies):
            if isinstance(packet, kind):
                del self._replies[index]
                future.set_result(packet)
                return
        raise BenchError(f"unexpected {packet!r}")

    def expect(self, kind: type[p.Packet]) -> asyncio.Future[p.Packet]:
        future: asyncio.Future[p.Packet] = asyncio.get_running_loop().create_future()
        self._replies.append((kind, future))
        return future

    def write(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    def packet_id(self) -> int:
        self._next_id = self._next_id % 0xFFFF + 1
        return self._next_id

    async def subscribe(self, run: Run, topic: str, qos: int) -> None:
        reply = self.expect(p.SubAck)
        self.write(encode(p.Subscribe(self.packet_id(), ((topic, qos),))))
        suback = await run.bounded(reply, f"SUBACK for {topic}")
        if suback.return_codes != (qos,):
            raise BenchError(f"subscription to {topic} refused: {suback.return_codes}")

    async def close(self) -> None:
        """DISCONNECT, then wait (briefly) for the close."""
        if self._transport is None or self._transport.is_closing():
            return
        self.write(encode(p.Disconnect()))
        self._transport.close()
        assert self._lost is not None
        await asyncio.wait([self._lost], timeout=5)


async def connect(
    run: Run, port: int, connect: p.Connect, on_message: OnMessage = _ignore
) -> Connection:
    """
    A connection the server has accepted (CONNACK 0); on_message is in place
    before the CONNACK, for what the server sends right after it.
    """
    loop = asyncio.get_running_loop()
    _, conn = await run.bounded(
        loop.create_connection(lambda: Connection(run.event(), on_message), HOST, port),
        "TCP connect",
    )
    reply = conn.expect(p.ConnAck)
    conn.write(encode(connect))
    connack = await run.bounded(reply, f"CONNACK for {connect.client_id}")
    if connack.return_code != p.ACCEPTED:
        raise BenchError(f"{connect.client_id} refused with CONNACK {connack.return_code}")
    return conn


async def connect_many(run: Run, port: int, connects: Sequence[p.Connect]) -> list[Connection]:
    """Connections for every CONNECT, a bounded number in progress at once."""
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(packet: p.Connect) -> Connection:
        async with gate:
            return await connect(run, port, packet)

    return list(await asyncio.gather(*map(one, connects)))


async def close_all(conns: Sequence[Connection]) -> None:
    await asyncio.gather(*(conn.close() for conn in conns))


async def publish_window(
    run: Run,
    conn: Connection,
    build: Callable[[int, int], bytes],
    count: int,
    window: int,
    outstanding: Callable[[], int] | None = None,
) -> int:
    """
    Pipeline count QoS 1 PUBLISHes with at most window outstanding: by
    default those not yet PUBACKed, else as outstanding() counts them (it
    must set conn.room when it drops).  Answer how many were sent before
    the run expired.  build(packet_id, now_ns) gives each packet's bytes.
    """
    pending = outstanding or (lambda: conn.inflight)
    sent = 0
    while sent < count and not run.expired:
        room = min(window - pending(), count - sent)
        if room <= 0:
            conn.room.clear()
            await conn.room.wait()
            continue
        now = time.perf_counter_ns()
        conn.write(b"".join([build(conn.packet_id(), now) for _ in range(room)]))
        conn.inflight += room
        sent += room
    return sent


@attrs.frozen
class Pacing:
    """A steady rate of messages, all senders together, for a bounded time."""

    rate: float
    seconds: float
    # How often the pacer wakes to send what has come due.
    tick: float = 0.002

    async def drive(self, run: Run, senders: Sequence[Callable[[int], None]]) -> int:
        """
        Call senders[i % len(senders)](now_ns) for message i at its due time
        (i / rate seconds from the start, to within a tick), until seconds
        have passed or the run expires; answer how many were sent.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        total = int(self.rate * self.seconds)
        sent = 0
        while sent < total and not run.expired:
            due = min(total, int((loop.time() - started) * self.rate) + 1)
            now = time.perf_counter_ns()
            for i in range(sent, due):
                senders[i % len(senders)](now)
            sent = max(sent, due)
            await asyncio.sleep(self.tick)
        return sent


# -- results ----------------------------------------------------------------


@attrs.define(eq=False)
class Latencies:
    samples: list[int] = attrs.Factory(list)

    def add(self, nanoseconds: int) -> None:
        self.samples.append(nanoseconds)

    def percentile_ms(self, fraction: float) -> float:
        if not self.samples:
            return float("nan")
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1e6


@attrs.frozen
class Result:
    """A scenario's figures, by metric name, and how it ended."""

    figures: dict[str, float]
    timed_out: bool
    loadgen_cpu: float


# What run.py drives: a scenario against a server's MQTT port.
Scenario = Callable[[int, ServerProbe], Awaitable[Result]]


@attrs.define(eq=False)
class _Meter:
    """Wall and CPU time of the load generator and the server over a phase."""

    probe: ServerProbe
    _wall: float = 0.0
    _cpu: float = 0.0
    _server_cpu: float = 0.0

    def start(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        self._server_cpu = self.probe.cpu_seconds()

    def stop(self) -> tuple[float, float, float]:
        """(wall seconds, load generator CPU share, server CPU seconds)."""
        wall = max(time.perf_counter() - self._wall, 1e-9)
        return (
            wall,
            (time.process_time() - self._cpu) / wall,
            self.probe.cpu_seconds() - self._server_cpu,
        )


async def _scenario(limit: float, body: Callable[[Run], Awaitable[Result]]) -> Result:
    run = Run(limit)
    run.start()
    try:
        return await body(run)
    finally:
        run.cancel()


def _client(client_id: str, keepalive: int = 60, clean: bool = True) -> p.Connect:
    return p.Connect(client_id, clean_session=clean, keepalive=keepalive)


def login(secret: bytes, user_id: str, clean: bool = True, keepalive: int = 60) -> p.Connect:
    """A CallTalent CONNECT: clientid = username = userID, password = authSign."""
    # Imported here: only the CallTalent scenarios need the server's signing code.
    from sktalent.authsign import sign

    password = sign(secret, user_id).encode()
    return p.Connect(user_id, clean, keepalive, None, user_id, password)


# -- scenarios --------------------------------------------------------------


@attrs.frozen
class FanIn:
    """QoS 0 from many publishers to one subscriber of ``bench/fanin``."""

    publishers: int = 10
    messages: int = 100_000
    size: int = 100
    # Sent but not yet received, across all publishers: keeps both servers
    # clear of their queue limits so that nothing is dropped.
    window: int = 1000
    limit: float = 60.0

    async def __call__(self, port: int, probe: ServerProbe) -> Result:
        return await _scenario(self.limit, lambda run: self._run(run, port, probe))

    async def _run(self, run: Run, port: int, probe: ServerProbe) -> Result:
        sub = await connect(run, port, _client("fanin-sub"))
        await sub.subscribe(run, "bench/fanin", 0)
        pubs = await connect_many(
            run, port, [_client(f"fanin-pub-{i}") for i in range(self.publishers)]
        )
        # QoS 0 needs no packet identifier and fan-in no latency: one packet.
        packet = PublishTemplate.of("bench/fanin", self.size, 0).build(0, 0)
        credit = run.event()
        done = run.event()
        received = 0
        sent = 0

        def on_message(publish: p.Publish, now: int) -> None:
            nonlocal received
            received += 1
            if received >= self.messages:
                done.set()
            elif sent - received <= self.window // 2:
                credit.set()

        sub.on_message = on_message
        share = -(-self.messages // self.publishers)

        async def publisher(conn: Connection, quota: int) -> None:
            nonlocal sent
            mine = 0
            while mine < quota and not run.expired:
                room = min(self.window - (sent - received), quota - mine, 64)
                if room <= 0:
                    credit.clear()
                    await credit.wait()
                    continue
                conn.write(packet * room)
                mine += room
                sent += room
                # Let the other publishers and the subscriber have a turn.
                await asyncio.sleep(0)

        meter = _Meter(probe)
        meter.start()
        quotas = [min(share, self.messages - i * share) for i in range(self.publishers)]
        await asyncio.gather(*(publisher(c, q) for c, q in zip(pubs, quotas, strict=True)))
        if received < self.messages:
            await done.wait()
        wall, loadgen_cpu, server_cpu = meter.stop()
        await close_all([sub, *pubs])
        return Result(
            {
                "received msg/s": received / wall,
                "server CPU s per 10k msgs": server_cpu / max(received, 1) * 10_000,
                "lost msgs": sent - received,
            },
            run.expired,
            loadgen_cpu,
        )


@attrs.define(eq=False)
class _PairLoad:
    """
    QoS 1 publisher/subscriber pairs on topics of their own: the
    connections, what each publisher sends, and the latencies measured.
    """

    pairs: int
    size: int
    clean: bool
    subs: list[Connection] = attrs.Factory(list)
    pubs: list[Connection] = attrs.Factory(list)
    delivery: Latencies = attrs.Factory(Latencies)
    ack: Latencies = attrs.Factory(Latencies)
    received: int = 0
    expected: int = 0
    _done: asyncio.Event | None = None

    async def connect(self, run: Run, port: int) -> None:
        clean = self.clean
        self.subs = await connect_many(
            run, port, [_client(f"pair-sub-{i}", clean=clean) for i in range(self.pairs)]
        )
        for i, sub in enumerate(self.subs):
            await sub.subscribe(run, f"bench/pair/{i}", 1)
            sub.on_message = self._on_message
        self.pubs = await connect_many(
            run, port, [_client(f"pair-pub-{i}", clean=clean) for i in range(self.pairs)]
        )
        self._done = run.event()

    def _on_message(self, publish: p.Publish, now: int) -> None:
        self.received += 1
        self.delivery.add(now - stamp_of(publish))
        if self.received >= self.expected and self._done is not None:
            self._done.set()

    def builder(self, i: int) -> Callable[[int, int], bytes]:
        """build(packet_id, now_ns) for publisher i, which times its PUBACKs."""
        template = PublishTemplate.of(f"bench/pair/{i}", self.size, 1)
        sent_at: dict[int, int] = {}

        def build(packet_id: int, now: int) -> bytes:
            sent_at[packet_id] = now
            return template.build(packet_id, now)

        def on_ack(packet_id: int, now: int) -> None:
            self.ack.add(now - sent_at.pop(packet_id))

        self.pubs[i].on_ack = on_ack
        return build

    async def done(self) -> None:
        """Return once every message expected arrived (or the run expired)."""
        if self.received < self.expected and self._done is not None:
            await self._done.wait()

    @property
    def completed(self) -> int:
        """Messages done: delivered."""
        return self.received

    @property
    def connections(self) -> list[Connection]:
        return [*self.subs, *self.pubs]

    def figures(self, wall: float, server_cpu: float, probe: ServerProbe) -> dict[str, float]:
        return {
            "delivered msg/s": self.received / wall,
            "ack latency p50 ms": self.ack.percentile_ms(0.5),
            "ack latency p99 ms": self.ack.percentile_ms(0.99),
            "delivery latency p50 ms": self.delivery.percentile_ms(0.5),
            "delivery latency p99 ms": self.delivery.percentile_ms(0.99),
            "server CPU s per 10k msgs": server_cpu / max(self.received, 1) * 10_000,
            "server RSS after MiB": probe.rss_bytes() / 2**20,
        }


@attrs.frozen
class Pairs:
    """
    QoS 1 from each publisher to its own subscriber on a topic of its own,
    pipelined with a bounded window of unacknowledged PUBLISHes.
    """

    pairs: int = 50
    messages: int = 100_000
    size: int = 100
    window: int = 32
    limit: float = 60.0
    # Persistent sessions (cleansession=false), for a server that persists.
    durable: bool = False

    async def __call__(self, port: int, probe: ServerProbe) -> Result:
        return await _scenario(self.limit, lambda run: self._run(run, port, probe))

    async def _run(self, run: Run, port: int, probe: ServerProbe) -> Result:
        load = _PairLoad(self.pairs, self.size, not self.durable)
        await load.connect(run, port)
        share = self.messages // self.pairs
        load.expected = share * self.pairs

        def publisher(i: int) -> Awaitable[int]:
            return publish_window(run, load.pubs[i], load.builder(i), share, self.window)

        return await _measured(run, probe, load, asyncio.gather(*map(publisher, range(self.pairs))))


@attrs.frozen
class PacedPairs:
    """Pairs at a steady rate (all publishers together): the reference for PacedChat."""

    pacing: Pacing
    pairs: int = 10
    size: int = 100
    limit: float = 60.0
    durable: bool = True

    async def __call__(self, port: int, probe: ServerProbe) -> Result:
        return await _scenario(self.limit, lambda run: self._run(run, port, probe))

    async def _run(self, run: Run, port: int, probe: ServerProbe) -> Result:
        load = _PairLoad(self.pairs, self.size, not self.durable)
        await load.connect(run, port)
        load.expected = int(self.pacing.rate * self.pacing.seconds)

        def sender(i: int) -> Callable[[int], None]:
            conn, build = load.pubs[i], load.builder(i)
            return lambda now: conn.write(build(conn.packet_id(), now))

        drive = self.pacing.drive(run, [sender(i) for i in range(self.pairs)])
        return await _measured(run, probe, load, drive, paced=True)


class _Load(Protocol):
    """The pairs of a scenario, as _measured drives them."""

    expected: int

    async def done(self) -> None: ...

    @property
    def completed(self) -> int: ...

    @property
    def connections(self) -> list[Connection]: ...

    def figures(self, wall: float, server_cpu: float, probe: ServerProbe) -> dict[str, float]: ...


async def _measured(
    run: Run, probe: ServerProbe, load: _Load, drive: Awaitable[object], paced: bool = False
) -> Result:
    """
    Drive load (paced: drive answers how many messages it sent), wait
    until they are done, and close: the figures of the measured phase.
    """
    meter = _Meter(probe)
    meter.start()
    sent = await drive
    if paced:
        assert isinstance(sent, int)
        load.expected = sent
    await load.done()
    wall, loadgen_cpu, server_cpu = meter.stop()
    figures = load.figures(wall, server_cpu, probe)
    if paced:
        # CPU per message in microseconds: the throughput is the pacing's.
        per_message = {"server CPU us per msg": server_cpu / max(load.completed, 1) * 1e6}
        figures = per_message | {k: v for k, v in figures.items() if "CPU s per 10k" not in k}
    await close_all(load.connections)
    return Result(figures, run.expired, loadgen_cpu)


@attrs.frozen
class Idle:
    """Many connected, silent clients with one subscription each."""

    clients: int = 2000
    keepalive: int = 60
    # Time for the server to settle before RSS is read.
    settle: float = 1.0
    limit: float = 60.0

    async def __call__(self, port: int, probe: ServerProbe) -> Result:
        return await _scenario(self.limit, lambda run: self._run(run, port, probe))

    async def _run(self, run: Run, port: int, probe: ServerProbe) -> Result:
        # A first round trip so that lazily built server state is not counted.
        warm = await connect(run, port, _client("idle-warmup", self.keepalive))
        await warm.subscribe(run, "bench/idle/warmup", 1)
        await warm.close()
        await asyncio.sleep(self.settle)
        before = probe.rss_bytes()
        meter = _Meter(probe)
        meter.start()
        conns = await connect_many(
            run, port, [_client(f"idle-{i}", self.keepalive) for i in range(self.clients)]
        )
        await asyncio.gather(
            *(conn.subscribe(run, f"bench/idle/{i}", 1) for i, conn in enumerate(conns))
        )
        wall, loadgen_cpu, _ = meter.stop()
        await asyncio.sleep(self.settle)
        after = probe.rss_bytes()
        await close_all(conns)
        return Result(
            {
                "connect+subscribe /s": self.clients / wall,
                "RSS per connection KiB": (after - before) / self.clients / 1024,
                "server RSS with all MiB": after / 2**20,
            },
            run.expired,
            loadgen_cpu,
        )


@attrs.define(eq=False)
class ChatLoad:
    """
    CallTalent users in pairs, each sender chatting with its recipient: the
    connections, the chats' envelopes, their answers and latencies.
    """

    secret: bytes
    pairs: int
    content_size: int
    clean: bool
    senders: list[Connection] = attrs.Factory(list)
    recipients: list[Connection] = attrs.Factory(list)
    to_sent: Latencies = attrs.Factory(Latencies)
    to_delivery: Latencies = attrs.Factory(Latencies)
    counts: dict[str, int] = attrs.Factory(lambda: {"sent": 0, "order_chat": 0, "other": 0})
    expected: int = 0
    _sent_at: dict[str, int] = attrs.Factory(dict)
    _seq: list[int] = attrs.Factory(list)
    _done: asyncio.Event | None = None

    async def connect(self, run: Run, port: int, ports: Sequence[tuple[int, int]] = ()) -> None:
        """
        Log every user in on port, or pair i's sender on ports[i][0] and its
        recipient on ports[i][1].
        """
        secret, clean = self.secret, self.clean
        if ports:
            self.senders, self.recipients = [], []
            for i, (there, here) in enumerate(ports):
                self.senders.append(await connect(run, there, login(secret, f"bench-a{i}", clean)))
                self.recipients.append(
                    await connect(run, here, login(secret, f"bench-b{i}", clean))
                )
        else:
            self.senders = await connect_many(
                run, port, [login(secret, f"bench-a{i}", clean) for i in range(self.pairs)]
            )
            self.recipients = await connect_many(
                run, port, [login(secret, f"bench-b{i}", clean) for i in range(self.pairs)]
            )
        for conn in [*self.senders, *self.recipients]:
            conn.on_message = self.on_message
        self._seq = [0] * self.pairs
        self._done = run.event()

    def on_message(self, publish: p.Publish, now: int) -> None:
        frame = json.loads(publish.payload)
        kind = frame.get("type")
        if kind == "sent":
            self.to_sent.add(now - self._sent_at[frame["msgid"]])
        elif kind == "order_chat":
            self.to_delivery.add(now - self._sent_at[frame["msgid"]])
        else:
            kind = "other"
        self.counts[kind] += 1
        if self.answered and self._done is not None:
            self._done.set()

    @property
    def answered(self) -> bool:
        """Whether every chat expected was answered `sent` and delivered."""
        counts = self.counts
        return counts["sent"] >= self.expected and counts["order_chat"] >= self.expected

    def chat(self, i: int, packet_id: int, now: int) -> bytes:
        """Sender i's next chat, sent at now_ns."""
        seq = self._seq[i]
        self._seq[i] += 1
        msgid = f"{i:08x}{seq:016x}"
        self._sent_at[msgid] = now
        envelope = {
            "msgid": msgid,
            "from": f"bench-a{i}",
            "to": f"bench-b{i}",
            "type": "order_chat",
            "payload": {"o_id": f"o{i}", "expert": True, "content": "x" * self.content_size},
        }
        body = json.dumps(envelope, separators=(",", ":")).encode()
        return encode(p.Publish(SERVER_TOPIC, body, 1, packet_id=packet_id))

    async def done(self) -> None:
        """Return once every chat expected was answered (or the run expired)."""
        if not self.answered and self._done is not None:
            await self._done.wait()

    @property
    def completed(self) -> int:
        """Chats done: answered ``sent``."""
        return self.counts["sent"]

    @property
    def connections(self) -> list[Connection]:
        return [*self.senders, *self.recipients]

    def figures(self, wall: float, server_cpu: float, probe: ServerProbe) -> dict[str, float]:
        if self.counts["other"]:
            raise BenchError(f"{self.counts['other']} chats were refused")
        return {
            "acked msg/s": self.counts["sent"] / wall,
            "delivered msg/s": self.counts["order_chat"] / wall,
            "ack latency p50 ms": self.to_sent.percentile_ms(0.5),
            "ack latency p99 ms": self.to_sent.percentile_ms(0.99),
            "delivery latency p50 ms": self.to_delivery.percentile_ms(0.5),
            "delivery latency p99 ms": self.to_delivery.percentile_ms(0.99),
            "server CPU s per 10k msgs": server_cpu / max(self.counts["sent"], 1) * 10_000,
            "server RSS after MiB": probe.rss_bytes() / 2**20,
        }


@attrs.frozen
class Chat:
    """
    CallTalent order_chat between user pairs, each sender pipelined with a
    bounded window of chats not yet answered with ``sent``.
    """

    secret: bytes
    pairs: int = 50
    messages: int = 20_000
    window: int = 32
    content_size: int = 40
    limit: float = 60.0
    # Persistent sessions (cleansession=false), as the apps connect.
    durable: bool = False

    async def __call__(self, port: int, probe: ServerProbe) -> Result:
        return await _scenario(self.limit, lambda run: self._run(run, port, probe))

    async def _run(self, run: Run, port: int, probe: ServerProbe) -> Result:
        load = ChatLoad(self.secret, self.pairs, self.content_size, not self.durable)
        await load.connect(run, port)
        share = self.messages // self.pairs
        load.expected = share * self.pairs

        def sender(i: int) -> Awaitable[int]:
            conn = load.senders[i]
            # The window counts chats, not PUBACKs: a chat is done at "sent".
            outstanding = 0

            def chat(packet_id: int, now: int) -> bytes:
                nonlocal outstanding
                outstanding += 1
                return load.chat(i, packet_id, now)

            def on_answer(publish: p.Publish, now: int) -> None:
                nonlocal outstanding
                load.on_message(publish, now)
                outstanding -= 1
                conn.room.set()

            conn.on_message = on_answer
            return publish_window(run, conn, chat, share, self.window, lambda: outstanding)

        return await _measured(run, probe, load, asyncio.gather(*map(sender, range(self.pairs))))


@attrs.frozen
class PacedChat:
    """
    CallTalent order_chat at a steady rate (all senders together), each chat
    written on its own as the apps send them: the latency and CPU of a chat
    when the server is not saturated.
    """

    secret: bytes
    pacing: Pacing
    pairs: int = 10
    content_size: int = 40
    limit: float = 60.0
    durable: bool = False

    async def __call__(self, port: int, probe: ServerProbe) -> Result:
        return await _scenario(self.limit, lambda run: self._run(run, port, probe))

    async def _run(self, run: Run, port: int, probe: ServerProbe) -> Result:
        load = ChatLoad(self.secret, self.pairs, self.content_size, not self.durable)
        await load.connect(run, port)
        load.expected = int(self.pacing.rate * self.pacing.seconds)

        def sender(i: int) -> Callable[[int], None]:
            conn = load.senders[i]
            return lambda now: conn.write(load.chat(i, conn.packet_id(), now))

        drive = self.pacing.drive(run, [sender(i) for i in range(self.pairs)])
        return await _measured(run, probe, load, drive, paced=True)
