"""
The twistd plugin's options: defaults, the environment, and bad values.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from unittest import mock

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

import sktalent
from sktalent.calltalent.delivery import PushDelivery
from sktalent.calltalent.pushtexts import TextTable
from sktalent.cluster import RedisAddress
from sktalent.metrics import QueueFigures
from sktalent.mqtt.router import RetainedLimits
from sktalent.push.disabled import DisabledPusher
from sktalent.reload import Reloader
from sktalent.retention import Retention
from sktalent.store.interfaces import StoreUnavailable
from sktalent.store.memory import MemoryStore
from sktalent.tap import (
    GC_THRESHOLDS,
    Core,
    Listener,
    Options,
    makeService,
    node_name,
    tune_collector,
)

from .mqttclient import Harness
from .umengstub import APPS

ROOT = Path(sktalent.__file__).resolve().parent.parent

MONGO = "mongodb://127.0.0.1:27017/sktalent"


class OptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp())
        self.secret = str(self.directory / "secret")

    def parse(self, argv: list[str], env: Mapping[str, str] | None = None) -> Options:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("SKTALENT_")}
        with mock.patch.dict(os.environ, {**clean, **(env or {})}, clear=True):
            options = Options()
            options.parseOptions(["--auth-secret-file", self.secret, *argv])
        return options

    def refused(self, argv: list[str], env: Mapping[str, str] | None = None) -> str:
        with self.assertRaises(SystemExit) as caught:
            self.parse(argv, env)
        return str(caught.exception.code)

    def test_defaults(self) -> None:
        """Without options the server uses INTERFACE defaults and creates the secret."""
        options = self.parse([])
        self.assertEqual(options["listen"], ["tcp:8075"])
        self.assertEqual(options["api"], "tcp:8076:interface=127.0.0.1")
        self.assertEqual(options["store"], "sqlite:sktalent.sqlite3")
        self.assertEqual(options["max-packet"], 65536)
        self.assertEqual((options["max-queued"], options["max-queued-bytes"]), (10000, 16 << 20))
        self.assertEqual(options["push-after"], 5.0)
        self.assertIsNone(options["tokens"])
        self.assertEqual(os.stat(self.secret).st_mode & 0o777, 0o600)

    def test_environment(self) -> None:
        """SKTALENT_<NAME> sets an option; the command line wins over it."""
        env = {
            "SKTALENT_STORE": f"sqlite:{self.directory}/x.sqlite3",
            "SKTALENT_LISTEN": "tcp:1883 tcp:1884",
            "SKTALENT_MAX_QUEUED": "5",
            "SKTALENT_ANONYMOUS": "true",
            "SKTALENT_REFUSE_SUBSCRIBE": "test/nosubscribe a/#",
        }
        options = self.parse([], env)
        self.assertEqual(options["store"], env["SKTALENT_STORE"])
        self.assertEqual(options["listen"], ["tcp:1883", "tcp:1884"])
        self.assertEqual(options["max-queued"], 5)
        self.assertTrue(options["anonymous"])
        self.assertEqual(options["refuse-subscribe"], ["test/nosubscribe", "a/#"])
        options = self.parse(["--listen", "tcp:9", "--max-queued", "7"], env)
        self.assertEqual((options["listen"], options["max-queued"]), (["tcp:9"], 7))

    def test_retained_limits(self) -> None:
        """
        With --anonymous the retained limits are the options', by default
        those of INTERFACE section 7.
        """
        self.assertEqual(
            self.parse(["--anonymous"])["retained"], RetainedLimits(10_000, 64 * 1024 * 1024)
        )
        argv = ["--anonymous", "--max-retained", "5", "--max-retained-bytes", "3000"]
        self.assertEqual(self.parse(argv)["retained"], RetainedLimits(5, 3000))
        env = {"SKTALENT_ANONYMOUS": "1", "SKTALENT_MAX_RETAINED_BYTES": "7"}
        self.assertEqual(self.parse([], env)["retained"], RetainedLimits(10_000, 7))

    def test_push_after_fractions(self) -> None:
        """--push-after takes fractions of a second, also from the environment."""
        self.assertEqual(self.parse(["--push-after", "0.5"])["push-after"], 0.5)
        self.assertEqual(self.parse([], {"SKTALENT_PUSH_AFTER": "2.25"})["push-after"], 2.25)

    def test_node_name(self) -> None:
        """The node name is the host name with the first MQTT listener's port."""
        host = socket.gethostname()
        self.assertEqual(node_name(["tcp:8075", "ssl:8883"]), f"{host}:8075")
        self.assertEqual(node_name(["tcp:port=1883:interface=::"]), f"{host}:1883")
        self.assertEqual(node_name(["unix:/run/mqtt.sock"]), host)

    def test_cluster(self) -> None:
        """
        --cluster with a MongoDB store makes a node, named by --node or else
        by the host name and first MQTT port; without it there is none.
        """
        options = self.parse(["--store", MONGO, "--cluster", "redis://:pw@10.0.0.5:6380/3"])
        self.assertEqual(options["redis"], RedisAddress("10.0.0.5", 6380, 3, "pw"))
        self.assertEqual(str(options["redis"]), "redis://10.0.0.5:6380/3")
        self.assertEqual(options["node"], node_name(["tcp:8075"]))
        env = {"SKTALENT_CLUSTER": "redis://r", "SKTALENT_NODE": "mqtt-2", "SKTALENT_STORE": MONGO}
        options = self.parse([], env)
        self.assertEqual((options["redis"], options["node"]), (RedisAddress("r"), "mqtt-2"))
        self.assertIsNone(self.parse([])["redis"])

    def test_bad_values_one_line(self) -> None:
        """Each bad value stops the start with one line that names it."""
        cases = [
            (["--store", "foo:bar"], "--store"),
            (["--store", "sqlite:"], "sqlite:"),
            (["--store", f"sqlite:{self.directory}/none/x.sqlite3"], "does not exist"),
            (["--store", "mongodb://127.0.0.1:1"], "names no database"),
            (["--store", "memory:x"], "memory:x"),
            (["--max-packet", "abc"], "abc"),
            (["--max-packet", "0"], "positive"),
            (["--listen", "nonsense:1"], "nonsense:1"),
            (["--listen", "ssl:0:privateKey=/no/such.pem"], "/no/such.pem"),
            (["--api-token-file", str(self.directory / "none")], "none"),
            (["--auth-url", "ftp://x"], "--auth-url"),
            (["--no-such-option"], "no-such-option"),
            (["--refuse-subscribe", "x"], "--anonymous"),
            (["--max-queued-bytes", "65535"], "--max-queued-bytes (65535) must be at least"),
            (["--max-queued-bytes", "9999", "--max-packet", "10000"], "--max-packet (10000)"),
            (
                ["--max-retained", "5"],
                "--max-retained and --max-retained-bytes go with --anonymous",
            ),
            (["--max-retained-bytes", "5"], "go with --anonymous"),
            (["--anonymous", "--max-retained", "0"], "positive"),
            (["--push-after", "0"], "positive"),
            (["--push-after", "nan"], "nan"),
            (["--push-after", "inf"], "inf"),
            (["--push-after", "soon"], "soon"),
            (["--cluster", "redis://127.0.0.1:6379/0"], "--cluster needs a MongoDB store"),
            (["--node", "a"], "--node goes with --cluster"),
            (["--store", MONGO, "--cluster", "http://x"], "--cluster: 'http://x'"),
            (["--store", MONGO, "--cluster", "redis://h:99999/0"], "port 99999"),
            (["--store", MONGO, "--cluster", "redis://h:1/16"], "database 16"),
            (["--store", MONGO, "--cluster", "redis://h/0", "--node", "a b"], "--node"),
            (["--store", MONGO, "--cluster", "redis://h/0", "--anonymous"], "--anonymous"),
        ]
        for argv, named in cases:
            message = self.refused(argv)
            self.assertTrue(message.startswith("sktalent: "), message)
            self.assertNotIn("\n", message)
            self.assertIn(named, message)
        self.assertIn("SKTALENT_MAX_PACKET", self.refused([], {"SKTALENT_MAX_PACKET": "zz"}))

    def test_push_texts(self) -> None:
        """
        --push-texts (or SKTALENT_PUSH_TEXTS) overrides the default texts; a
        bad file stops the start with one line naming the file and the key.
        """
        self.assertEqual(self.parse([])["texts"], TextTable())
        good = self.directory / "texts.json"
        good.write_text(json.dumps({"note": {"replied": "专家回答了"}}), encoding="utf-8")
        for options in (
            self.parse(["--push-texts", str(good)]),
            self.parse([], {"SKTALENT_PUSH_TEXTS": str(good)}),
        ):
            self.assertEqual(options["texts"].texts["note.replied"], "专家回答了")
        bad = self.directory / "bad.json"
        bad.write_text(json.dumps({"order": {"paid": "{price}"}}), encoding="utf-8")
        message = self.refused(["--push-texts", str(bad)])
        self.assertTrue(message.startswith("sktalent: "), message)
        self.assertNotIn("\n", message)
        self.assertIn(str(bad), message)
        self.assertIn("order.paid", message)
        self.assertIn(
            str(self.directory / "none"),
            self.refused(["--push-texts", str(self.directory / "none")]),
        )

    def test_reloaded_files_documented(self) -> None:
        """
        Each file SIGHUP reloads, with every reloadable option given, is
        named by its option where the README and the deployment notes say
        what a reload rereads.
        """
        files = {"tokens": "t0ken\n", "texts.json": "{}", "umeng.json": json.dumps(APPS)}
        for name, content in files.items():
            (self.directory / name).write_text(content, encoding="utf-8")
        options = self.parse(
            ["--store", "memory:"]
            + ["--api-token-file", str(self.directory / "tokens")]
            + ["--push-texts", str(self.directory / "texts.json")]
            + ["--umeng-config", str(self.directory / "umeng.json")]
        )
        [reloader] = [
            s for s in makeService(options, MemoryReactorClock()) if isinstance(s, Reloader)
        ]
        with capturedLogs() as events:
            reloader.reload()
        reloaded = {e["option"] for e in events if "option" in e}
        self.assertEqual(len(reloaded), 4, reloaded)
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        deploy = (ROOT / "deploy" / "README.md").read_text(encoding="utf-8")
        for text, marker in ((readme, "- SIGHUP"), (deploy, "systemctl reload sktalent`: it")):
            paragraph = next(p for p in text.split("\n- ") if marker.lstrip("- ") in p)
            for option in reloaded:
                with self.subTest(option=option, marker=marker):
                    self.assertIn(f"`{option}`", paragraph)

    def test_bad_values_name_the_option(self) -> None:
        """A bad value, and a file that cannot be used, name their option."""
        cases = [
            (["--max-content", "-1"], "--max-content: -1 "),
            (["--max-queued", "many"], "--max-queued: 'many' "),
            (["--api-token-file", "nosuch"], "--api-token-file: "),
            (["--umeng-config", "nosuch"], "--umeng-config: "),
            (["--auth-secret-file", str(self.directory / "none" / "s")], "--auth-secret-file: "),
        ]
        for argv, named in cases:
            with self.subTest(argv=argv):
                message = self.refused(argv)
                self.assertNotIn("\n", message)
                self.assertIn(named, message)

    def test_boolean_variables(self) -> None:
        """
        A flag's variable is true or false in the usual spellings; anything
        else is refused, naming the variable, rather than read as false.
        """
        for value, expected in [("1", 1), ("On", 1), ("yes", 1), ("false", 0), ("0", 0), ("", 0)]:
            with self.subTest(value=value):
                self.assertEqual(
                    self.parse([], {"SKTALENT_ANONYMOUS": value})["anonymous"], expected
                )
        message = self.refused([], {"SKTALENT_ANONYMOUS": "maybe"})
        self.assertIn("SKTALENT_ANONYMOUS='maybe'", message)

    def test_unknown_variables(self) -> None:
        """
        An unknown SKTALENT_* variable is warned about once, with the option
        it most resembles; the tests' own SKTALENT_TEST_* are not.
        """
        env = {"SKTALENT_LISTN": "tcp:1", "SKTALENT_QWERTY": "1", "SKTALENT_TEST_MONGO_URI": "x"}
        with capturedLogs() as events:
            self.parse([], env)
        warnings = [
            formatEvent(e) for e in events if e["log_level"] == LogLevel.warn and "name" in e
        ]
        self.assertEqual(
            warnings,
            [
                "Unknown variable SKTALENT_LISTN ignored: did you mean SKTALENT_LISTEN (--listen)?",
                "Unknown variable SKTALENT_QWERTY ignored: no option has that name",
            ],
        )


class NeverStarts(MemoryStore):
    """A store whose start never answers."""

    def start(self) -> Deferred[None]:
        return Deferred()


class BrokenStart(MemoryStore):
    """A store that cannot start."""

    def start(self) -> Deferred[None]:
        return fail(StoreUnavailable("no database here"))


class CountsPurges(MemoryStore):
    """A MemoryStore that counts its purges."""

    purges = 0

    def purge(self, older_than: int) -> Deferred[int]:
        self.purges += 1
        return super().purge(older_than)


class CoreTests(SynchronousTestCase):
    settled = 0

    def core(self, store: MemoryStore) -> tuple[Core, MemoryReactorClock]:
        reactor = MemoryReactorClock()
        h = Harness(store=store)
        listeners = [Listener("--listen", "tcp:0", h.factory)]
        pusher = DisabledPusher(h.metrics)
        retention = Retention(reactor, store, h.broker, h.metrics)
        delivery = PushDelivery(h.broker, store, pusher, reactor)
        figures = QueueFigures(reactor, store)
        core = Core(
            reactor,
            store,
            h.broker,
            h.factory,
            listeners,
            pusher,
            retention,
            delivery,
            figures,
            settle=self.settle,
        )
        return core, reactor

    def settle(self) -> None:
        self.settled += 1

    def test_settles_once_listening(self) -> None:
        """
        A start tunes the collector once, after its listeners are open; a
        start that fails does not.
        """
        core, reactor = self.core(MemoryStore())
        core.startService()
        self.assertEqual(self.settled, 1)
        self.successResultOf(core.stopService())
        core, reactor = self.core(BrokenStart())
        core.startService()
        self.assertEqual(self.settled, 1)

    def test_tune_collector(self) -> None:
        """
        The collector, tuned, leaves what is loaded frozen out of its
        generations and collects the youngest far less often than Python's
        700 allocations; collecting cycles still works.
        """
        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        self.addCleanup(gc.unfreeze)
        tune_collector()
        self.assertEqual(gc.get_threshold(), GC_THRESHOLDS)
        self.assertGreater(GC_THRESHOLDS[0], 700)
        self.assertGreater(gc.get_freeze_count(), 1000)
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle
        self.assertGreaterEqual(gc.collect(), 1)

    def test_stopped_while_starting(self) -> None:
        """A stop before the store answered is a clean stop, not a failure."""
        core, reactor = self.core(NeverStarts())
        core.startService()
        self.successResultOf(core.stopService())
        self.assertEqual(reactor.triggers, {})
        self.assertFalse(reactor.hasStopped)

    def test_start_fails(self) -> None:
        """
        A store that cannot start stops the server with a failing status and
        one critical line, no traceback; a store that fails at once does so
        before the reactor runs, and the stop waits for it to run.
        """
        core, reactor = self.core(BrokenStart())
        with capturedLogs() as events:
            core.startService()
        self.assertFalse(reactor.hasStopped)
        reactor.run()
        self.assertTrue(reactor.hasStopped)
        self.assertIn("shutdown", reactor.triggers["after"])
        self.assertEqual(
            [formatEvent(e) for e in events if e["log_level"] == LogLevel.critical],
            ["Cannot start: no database here"],
        )
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_listener_fails(self) -> None:
        """A listener that cannot listen fails the start, naming its option."""
        core, reactor = self.core(MemoryStore())
        taken = CannotListenError("", 1883, OSError("in use"))
        with capturedLogs() as events, mock.patch.object(reactor, "listenTCP", side_effect=taken):
            core.startService()
        reactor.run()
        self.assertTrue(reactor.hasStopped)
        [line] = [formatEvent(e) for e in events if e["log_level"] == LogLevel.critical]
        self.assertTrue(line.startswith("Cannot start: --listen tcp:0: "), line)
        self.assertIn("in use", line)

    def test_purges_at_start_and_every_six_hours(self) -> None:
        """
        Once started, the server purges what is past retention at once, then
        every six hours, until it stops.
        """
        store = CountsPurges()
        core, reactor = self.core(store)
        core.startService()
        self.assertEqual(store.purges, 1)
        reactor.advance(6 * 3600 - 1)
        self.assertEqual(store.purges, 1)
        reactor.advance(1)
        self.assertEqual(store.purges, 2)
        self.successResultOf(core.stopService())
        reactor.advance(24 * 3600)
        self.assertEqual(store.purges, 2)


class ClusterCodeTests(SynchronousTestCase):
    def loaded(self, *argv: str) -> list[str]:
        """The Redis modules a server built with argv has loaded (in a fresh interpreter)."""
        program = (
            "import sys\n"
            "from twisted.internet.testing import MemoryReactorClock\n"
            "from sktalent.tap import Options, makeService\n"
            "options = Options()\n"
            f"options.parseOptions({list(argv)!r})\n"
            "makeService(options, MemoryReactorClock())\n"
            "print(sorted(m for m in sys.modules if 'redis' in m))\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKTALENT_")}
        done = subprocess.run(
            [sys.executable, "-c", program],
            capture_output=True,
            text=True,
            cwd=tempfile.mkdtemp(),
            env={**env, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
            timeout=60,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        loaded: list[str] = json.loads(done.stdout.strip().replace("'", '"'))
        return loaded

    def test_no_redis_without_cluster(self) -> None:
        """A server without --cluster loads no Redis code at all."""
        self.assertEqual(self.loaded(), [])

    def test_redis_with_cluster(self) -> None:
        """A cluster node loads the Redis client (the check above can fail)."""
        loaded = self.loaded("--store", MONGO, "--cluster", "redis://127.0.0.1:1/0")
        self.assertIn("txredisapi", loaded)
