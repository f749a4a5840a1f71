"""
Log formats: the JSON lines of --log-format json, where twistd puts them (a
real server logging to stdout and to --logfile), and no secret in any log.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, LogLevel, capturedLogs, formatEvent
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase

from sktalent.authsign import sign
from sktalent.logs import ThrottledLog, event_as_json, without_credentials
from sktalent.testing.server import ServerProcess, running, wait_for

from .helpers import paho_user
from .pahoclient import PahoUser
from .umengstub import ANDROID, IOS, UmengStub

TOKEN = "backend-Token.7f3a9c"
WRONG_TOKEN = "someone-elses-Token.55e1"
NEW_TOKEN = "backend-Token.rotated.91c4"
# Not a bearer token (a space): the file is refused on reload.
BROKEN_TOKEN = "half-pasted Token.0d7e"
HOOK_PASSWORD = "hook-Password-91b2"


def logged(server: ServerProcess, text: str) -> Callable[[], bool]:
    """Whether the server has logged text yet."""
    return lambda: text in server.log


def records(text: str) -> list[dict[str, Any]]:
    """Every line of text as a JSON object; fails on a line that is not one."""
    parsed = []
    for line in text.splitlines():
        record = json.loads(line)
        assert isinstance(record, dict), line
        parsed.append(record)
    return parsed


class JsonFormatTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.log = Logger(
            namespace="sktalent.test", observer=cast(ILogObserver, self.events.append)
        )

    def record(self) -> dict[str, Any]:
        [event] = self.events
        line = event_as_json(event)
        self.assertTrue(line.endswith("\n"))
        self.assertNotIn("\n", line[:-1])
        parsed = json.loads(line)
        self.assertIsInstance(parsed, dict)
        return dict(parsed)

    def test_fields(self) -> None:
        """An event is time, level, namespace, its message, and its own fields."""
        self.log.info(
            "Refused a message from {client}: {code}",
            client="张三",
            code="bad_msgid",
            msgid="ab" * 12,
            count=3,
        )
        record = self.record()
        when = record.pop("time")
        self.assertRegex(when, r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\Z")
        self.assertEqual(
            record,
            {
                "level": "info",
                "namespace": "sktalent.test",
                "message": "Refused a message from 张三: bad_msgid",
                "client": "张三",
                "code": "bad_msgid",
                "msgid": "ab" * 12,
                "count": 3,
            },
        )

    def test_failure(self) -> None:
        """A logged failure carries its traceback."""
        try:
            1 / 0  # noqa: B018 - the failure to log
        except ZeroDivisionError:
            self.log.failure("Dividing failed for {client}", client="alice")
        record = self.record()
        self.assertEqual(
            (record["level"], record["message"]), ("critical", "Dividing failed for alice")
        )
        self.assertIn("ZeroDivisionError", record["traceback"])

    def test_odd_values(self) -> None:
        """
        Fields that are not JSON values become text, a field named like a
        record key is kept beside it, and newlines stay inside one line.
        """
        self.log.warn(
            "{what}",
            what="two\nlines",
            namespace="mine",
            traceback=7,
            peer=("127.0.0.1", 5),
            ratio=float("nan"),
        )
        record = self.record()
        self.assertEqual(record["message"], "two\nlines")
        self.assertEqual(record["level"], "warn")
        self.assertEqual(record["namespace"], "sktalent.test")
        self.assertEqual((record["field_namespace"], record["field_traceback"]), ("mine", 7))
        self.assertEqual((record["peer"], record["ratio"]), ("('127.0.0.1', 5)", "nan"))

    def test_legacy(self) -> None:
        """An event of twisted.python.log is its text, level and system."""
        now = time.time()
        event = {
            "message": ('"127.0.0.1" - - "GET /healthz HTTP/1.1" 200',),
            "isError": 0,
            "system": "HTTPChannel,0,127.0.0.1",
            "time": now,
            "log_time": now,
            "log_text": '"127.0.0.1" - - "GET /healthz HTTP/1.1" 200',
            "log_format": "{log_text}",
            "log_level": LogLevel.info,
            "log_namespace": "log_legacy",
            "log_system": "HTTPChannel,0,127.0.0.1",
        }
        record = json.loads(event_as_json(event))
        del record["time"]
        self.assertEqual(
            record,
            {
                "level": "info",
                "namespace": "log_legacy",
                "message": '"127.0.0.1" - - "GET /healthz HTTP/1.1" 200',
                "system": "HTTPChannel,0,127.0.0.1",
            },
        )


class WithoutCredentialsTests(SynchronousTestCase):
    def test_cut(self) -> None:
        """user:password@ is cut out of a URL; a URL without one is kept."""
        cases = {
            "http://hook:pw@login.example.com:8080/auth?x=1": "http://***@login.example.com:8080/auth?x=1",
            "https://user@h/": "https://***@h/",
            "https://login.example.com/auth": "https://login.example.com/auth",
            "http://[::1": "(an unreadable URL)",
        }
        for url, shown in cases.items():
            self.assertEqual(without_credentials(url), shown)


class TwistdOptionsTests(SynchronousTestCase):
    def refused(self, argv: list[str]) -> str:
        with self.assertRaises(SystemExit) as caught:
            ServerOptions().parseOptions(argv)
        return str(caught.exception.code)

    def test_refused(self) -> None:
        """
        --log-format takes text or json, and json goes to a file or stdout:
        not with --syslog, and not to stdout from a daemon.
        """
        secret = os.path.join(tempfile.mkdtemp(), "secret")
        common = ["--auth-secret-file", secret, "--store", "memory:"]
        cases = [
            (["-n", "sktalent", *common, "--log-format", "xml"], "'xml'"),
            (["-n", "--syslog", "sktalent", *common, "--log-format", "json"], "--syslog"),
            (["--logfile=-", "sktalent", *common, "--log-format", "json"], "-n"),
        ]
        for argv, named in cases:
            message = self.refused(argv)
            self.assertTrue(message.startswith("sktalent: "), message)
            self.assertIn(named, message)

    def test_accepted(self) -> None:
        """json with -n, with --logfile, and text with --syslog are fine."""
        secret = os.path.join(tempfile.mkdtemp(), "secret")
        common = ["--auth-secret-file", secret, "--store", "memory:"]
        for argv in (
            ["-n", "sktalent", *common, "--log-format", "json"],
            ["--logfile", "x.log", "sktalent", *common, "--log-format", "json"],
            ["-n", "--syslog", "sktalent", *common],
        ):
            config = ServerOptions()
            config.parseOptions(argv)
            self.assertIn(config.subOptions["log-format"], ("text", "json"))


class JsonLogsEndToEnd(SynchronousTestCase):
    """A real server with --log-format json."""

    def refuse_one(self, server: ServerProcess) -> None:
        alice = paho_user(self, server, "alice")
        alice.send({"msgid": "ab" * 12, "from": "mallory", "to": "bob", "type": "order_chat"})
        [refusal] = alice.frames(1)
        self.assertEqual(refusal["error"], "from_mismatch")

    def assertRefusalLogged(self, logged: list[dict[str, Any]]) -> None:
        refusals = [r for r in logged if r.get("code") == "from_mismatch"]
        self.assertEqual(len(refusals), 1, logged)
        [refusal] = refusals
        self.assertEqual(
            (refusal["level"], refusal["namespace"], refusal["client"], refusal["msgid"]),
            ("info", "sktalent.calltalent.app", "alice", "ab" * 12),
        )
        self.assertIn("from_mismatch", refusal["message"])

    def test_stdout(self) -> None:
        """
        With -n and no --logfile (as under systemd) every line on stdout is
        a JSON event, twistd's own included, and a refusal carries its fields.
        """
        server = running(self, ServerProcess(["--log-format", "json"]))
        self.refuse_one(server)
        self.assertEqual(server.stop(), 0)
        logged = records(server.log)
        for record in logged:
            self.assertLessEqual({"time", "level", "namespace", "message"}, set(record))
        messages = [r["message"] for r in logged]
        self.assertTrue(any(m.startswith("twistd ") for m in messages), messages)
        self.assertIn(
            f"Listening on tcp:{server.mqtt_port}:interface=127.0.0.1 (--listen)", messages
        )
        self.assertEqual(messages[-1], "Server Shut Down.")
        self.assertRefusalLogged(logged)

    def test_logfile(self) -> None:
        """With --logfile the JSON lines go to that file and nothing to stdout."""
        path = Path(tempfile.mkdtemp()) / "sktalent.json"
        server = running(
            self,
            ServerProcess(["--log-format", "json"], twistd_args=["--logfile", str(path)]),
        )
        self.refuse_one(server)
        self.assertEqual(server.stop(), 0)
        self.assertEqual(server.log, "")
        self.assertRefusalLogged(records(path.read_text()))

    def test_text_is_default(self) -> None:
        """Without the option the log is twistd's text lines."""
        server = running(self, ServerProcess())
        self.assertEqual(server.stop(), 0)
        lines = server.log.splitlines()
        self.assertTrue(lines)
        for line in lines:
            self.assertRegex(line, r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[")
        self.assertIn("[sktalent.tap#info] Listening on", server.log)


class SecretsNotLoggedTests(SynchronousTestCase):
    """
    No authSign, API token, secret or hook password reaches the log in
    either format, whatever a client sends and whatever fails.
    """

    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="sktalent-secrets-"))
        self.stub = UmengStub()
        self.addCleanup(self.stub.close)
        (self.directory / "tokens").write_text(f"{TOKEN}\n")
        self.umeng = self.directory / "umeng.json"
        self.umeng.write_text(
            json.dumps(
                {
                    "endpoint": self.stub.endpoint,
                    "production_mode": False,
                    "alias_type": "calltalent",
                    "ios": {"appkey": IOS.appkey, "app_master_secret": IOS.app_master_secret},
                    "android": {
                        "appkey": ANDROID.appkey,
                        "app_master_secret": ANDROID.app_master_secret,
                        "activity": "com.calltalent.app.MainActivity",
                    },
                }
            )
        )

    def api(self, server: ServerProcess, token: str) -> int:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(
            f"http://127.0.0.1:{server.api_port}/v1/users/alice/presence",
            headers={"Authorization": f"Bearer {token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as e:
            return e.code

    def connack(self, server: ServerProcess, user: str, auth_sign: str) -> int:
        client = PahoUser(server.mqtt_port, user, user, auth_sign)
        self.addCleanup(client.close)
        return client.rc

    def assertClean(self, log: str, secrets: list[str]) -> None:
        self.assertTrue(log)
        for secret in secrets:
            self.assertNotIn(secret, log)

    def check_secret_checker(self, log_format: str) -> None:
        """
        Logins with good, expiring, wrong and expired signs, API calls with
        good and wrong tokens, a push, and a token file reloaded and refused.
        """
        server = ServerProcess(
            [
                "--log-format",
                log_format,
                "--api-token-file",
                str(self.directory / "tokens"),
                "--umeng-config",
                str(self.umeng),
            ]
        )
        running(self, server)
        secret = server.secret
        signs = [
            sign(secret, "alice"),
            sign(secret, "carol", int(time.time()) + 3600),
            sign(b"not the secret", "bob"),
            sign(secret, "alice", int(time.time()) - 10),
        ]
        self.assertEqual(self.connack(server, "alice", signs[0]), 0)
        self.assertEqual(self.connack(server, "carol", signs[1]), 0)
        self.assertEqual(self.connack(server, "bob", signs[2]), 4)
        self.assertEqual(self.connack(server, "alice", signs[3]), 4)
        self.assertEqual(self.api(server, TOKEN), 200)
        self.assertEqual(self.api(server, WRONG_TOKEN), 401)
        # A chat to bob, offline: pushed through the stand-in.
        alice = PahoUser(server.mqtt_port, "alice", "alice", signs[0])
        self.addCleanup(alice.close)
        alice.send(
            {
                "msgid": "cd" * 12,
                "from": "alice",
                "to": "bob",
                "type": "order_chat",
                "payload": {"o_id": "o-1", "expert": False, "content": "hello"},
            }
        )
        alice.frames(1)
        wait_for(lambda: "Umeng push" in server.log, what="the push to be logged")
        # SIGHUP: a new token file is taken, then a broken one refused.
        tokens = self.directory / "tokens"
        for content, said in (
            (NEW_TOKEN, f"--api-token-file {tokens} reloaded"),
            (BROKEN_TOKEN, f"refused --api-token-file {tokens}"),
        ):
            tokens.write_text(f"{content}\n")
            assert server.process is not None
            server.process.send_signal(signal.SIGHUP)
            wait_for(logged(server, said), what=said)
        self.assertEqual(self.api(server, NEW_TOKEN), 200)
        self.assertEqual(server.stop(), 0)
        self.assertClean(
            server.log,
            [
                secret.decode(),
                *signs,
                TOKEN,
                WRONG_TOKEN,
                NEW_TOKEN,
                BROKEN_TOKEN,
                IOS.app_master_secret,
                ANDROID.app_master_secret,
            ],
        )

    def check_hook(self, log_format: str) -> None:
        # Nothing listens there: every login finds the hook down.
        url = f"http://hook:{HOOK_PASSWORD}@127.0.0.1:1/mqtt-auth"
        server = running(self, ServerProcess(["--log-format", log_format, "--auth-url", url]))
        self.assertEqual(self.connack(server, "alice", "alice-Sign-0e4f"), 3)
        wait_for(lambda: "auth hook" in server.log, what="the hook failure to be logged")
        self.assertEqual(server.stop(), 0)
        self.assertIn("***@127.0.0.1:1/mqtt-auth", server.log)
        self.assertClean(server.log, [HOOK_PASSWORD, "alice-Sign-0e4f"])

    def test_text_secret(self) -> None:
        """Text format, authSign checked against the secret, with push and API."""
        self.check_secret_checker("text")

    def test_json_secret(self) -> None:
        """JSON format, authSign checked against the secret, with push and API."""
        self.check_secret_checker("json")

    def test_text_hook(self) -> None:
        """Text format, authSign checked by a hook whose URL has a password."""
        self.check_hook("text")

    def test_json_hook(self) -> None:
        """JSON format, authSign checked by a hook whose URL has a password."""
        self.check_hook("json")


class ThrottledLogTests(SynchronousTestCase):
    """A client's doings logged sparingly, timed with a Clock."""

    def test_bounded_with_summary(self) -> None:
        """
        Of a flood of lines, the first few of each second are logged and the
        rest summed up in one line at the end of that second; a later line
        starts a new second.
        """
        clock = Clock()
        throttled = ThrottledLog(Logger(), clock, "{count} more in {seconds} s", lines=3)
        with capturedLogs() as events:
            for n in range(100):
                throttled.info("line {n}", n=n)
                clock.advance(0.005)
            self.assertEqual([formatEvent(e) for e in events], ["line 0", "line 1", "line 2"])
            clock.advance(0.5)
            self.assertEqual(formatEvent(events[-1]), "97 more in 1.0 s")
            clock.advance(10)
            self.assertEqual(len(events), 4)
            throttled.info("line {n}", n=100)
            self.assertEqual(formatEvent(events[-1]), "line 100")

    def test_stop_sums_up(self) -> None:
        """stop logs what is held at once and leaves no call pending."""
        clock = Clock()
        throttled = ThrottledLog(Logger(), clock, "{count} more", lines=1)
        with capturedLogs() as events:
            for _ in range(3):
                throttled.info("line")
            throttled.stop()
        self.assertEqual([formatEvent(e) for e in events], ["line", "2 more"])
        self.assertEqual(clock.getDelayedCalls(), [])
