"""
Starting, stopping and reloading as an operator sees it, against real server
processes: a start that cannot succeed stops before any listener opens with
one line and status 1, SIGHUP reloads the operator's files without dropping a
connection, and the files the server creates are its user's alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from sktalent.authsign import sign
from sktalent.store.sqlite import MIGRATIONS, connect, migrate
from sktalent.testing.server import ServerProcess, free_port, listening, running, wait_for

from .helpers import port_taken
from .pahoclient import PahoUser
from .umengstub import APPS, UmengStub

OLD_TOKEN = "old-token"
NEW_TOKEN = "new-token"


def one_line(case: SynchronousTestCase, output: str, *words: str) -> str:
    """The one line of output that holds every word; and no traceback anywhere."""
    case.assertNotIn("Traceback", output)
    lines = [line for line in output.splitlines() if all(word in line for word in words)]
    case.assertEqual(len(lines), 1, f"one line with {words} wanted in:\n{output}")
    return lines[0]


def read_only(case: SynchronousTestCase, path: Path) -> None:
    """
    Make path read-only to the server until the test ends: by its mode, and
    for root, whom modes do not stop, by the immutable flag.
    """
    mode = path.stat().st_mode
    path.chmod(mode & ~0o222)
    case.addCleanup(path.chmod, mode)
    if os.geteuid() != 0:
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(path)]).returncode != 0:
        raise SkipTest("running as root, where only the immutable flag stops a write")
    case.addCleanup(subprocess.run, [chattr, "-i", str(path)], check=True)


def store_file(path: Path, sessions: int = 0) -> None:
    """A store as the server leaves it, holding sessions sessions."""
    conn = connect(str(path))
    migrate(conn, str(path), MIGRATIONS)
    conn.executemany(
        "INSERT INTO sessions (client_id, subscriptions) VALUES (?, '[]')",
        [(f"user-{n:06d}-{'x' * 100}",) for n in range(sessions)],
    )
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


class StartFailureTests(SynchronousTestCase):
    """
    Each start that cannot succeed: exit status 1, no listener opened, no
    traceback, and one line naming the option or file and the cause.
    """

    def setUp(self) -> None:
        self.server = ServerProcess()
        self.addCleanup(shutil.rmtree, self.server.directory, True)
        self.store = self.server.directory / "store.sqlite3"

    def refused(self, *words: str, taken: tuple[int, ...] = ()) -> str:
        self.assertEqual(self.server.start_failing(*taken), 1, self.server.log)
        return one_line(self, self.server.log, *words)

    def test_read_only_store(self) -> None:
        """A store file the server cannot write: today it ran and acknowledged nothing."""
        store_file(self.store)
        read_only(self, self.store)
        self.refused(str(self.store), "read-only")

    def test_corrupt_store(self) -> None:
        """A file that is not an SQLite database."""
        self.store.write_bytes(b"not a database at all\n" * 100)
        self.refused(str(self.store), "not an SQLite database")

    def test_truncated_store(self) -> None:
        """A store cut short, as a full disk or a bad copy leaves it."""
        store_file(self.store, sessions=2000)
        with self.store.open("r+b") as f:
            f.truncate(self.store.stat().st_size // 2)
        self.refused(str(self.store), "truncated")

    def test_damaged_store(self) -> None:
        """
        A store whose tables are damaged deep inside, which a start does not
        read: found when the server first reads there, it stops at once,
        status 1, with one line and no traceback.
        """
        store_file(self.store, sessions=3000)
        with self.store.open("r+b") as f:
            f.seek(self.store.stat().st_size // 2)
            f.write(b"\xff" * 8192)
        self.assertEqual(self.server.run_to_exit(), 1, self.server.log)
        one_line(self, self.server.log, "Cannot go on", str(self.store), "damaged")

    def test_store_is_a_directory(self) -> None:
        """A store path that names a directory."""
        self.store.mkdir()
        self.refused(str(self.store), "is a directory")

    def test_store_directory_not_writable(self) -> None:
        """
        A store whose directory is read-only: SQLite could not create its
        -wal and -shm files next to it.
        """
        data = self.server.directory / "data"
        data.mkdir()
        self.server.store = f"sqlite:{data / 'store.sqlite3'}"
        store_file(data / "store.sqlite3")
        read_only(self, data)
        self.refused("--store", str(data), "not writable")

    def test_store_directory_missing(self) -> None:
        """A store in a directory that does not exist."""
        missing = self.server.directory / "missing"
        self.server.store = f"sqlite:{missing / 'store.sqlite3'}"
        self.refused("--store", str(missing), "does not exist")

    def test_api_port_taken(self) -> None:
        """An API port in use: today the server ran on without its API."""
        self.server.api_port = port_taken(self)
        self.refused("--api", str(self.server.api_port), "in use", taken=(self.server.api_port,))

    def test_api_interface_missing(self) -> None:
        """An API interface this host does not have (192.0.2.1: TEST-NET-1)."""
        self.server.args = ["--api", f"tcp:{self.server.api_port}:interface=192.0.2.1"]
        self.refused("--api", "192.0.2.1", "assign")

    def test_mqtt_port_taken_memory_store(self) -> None:
        """
        With a store that starts at once, a taken MQTT port stops the server:
        today its reactor was stopped before it ran, so it ran forever.
        """
        self.server.store = "memory:"
        self.server.mqtt_port = port_taken(self)
        # The API opens first, and closes again at once: not watched here.
        taken = (self.server.mqtt_port, self.server.api_port)
        self.refused("--listen", str(self.server.mqtt_port), "in use", taken=taken)

    def test_option_values(self) -> None:
        """Bad values name their option (or variable), whatever their kind."""
        for args, env, words in [
            (["--max-content", "-1"], {}, ("--max-content", "-1")),
            (["--api-token-file", "nosuch"], {}, ("--api-token-file", "nosuch")),
            ([], {"SKTALENT_ANONYMOUS": "maybe"}, ("SKTALENT_ANONYMOUS", "maybe")),
        ]:
            with self.subTest(args=args, env=env):
                self.server.args, self.server.env = args, env
                self.refused(*words)

    def test_unreachable_mongodb(self) -> None:
        """A MongoDB store that does not answer is named by host and port."""
        port = free_port()
        self.server.store = f"mongodb://127.0.0.1:{port}/sktalent"
        self.refused(f"127.0.0.1:{port}")


class UnknownVariableTests(SynchronousTestCase):
    def test_misspelt_variable(self) -> None:
        """
        A misspelt SKTALENT_* variable is named in a warning with the option
        it probably means, and the server starts; test settings are not.
        """
        server = running(
            self,
            ServerProcess(env={"SKTALENT_LISTN": "tcp:1", "SKTALENT_TEST_ANYTHING": "1"}),
        )
        one_line(self, server.log, "SKTALENT_LISTN", "SKTALENT_LISTEN", "--listen")
        self.assertNotIn("SKTALENT_TEST_ANYTHING", server.log)


class ReloadTests(SynchronousTestCase):
    """SIGHUP to a running server with a connected client."""

    def setUp(self) -> None:
        self.stubs = [UmengStub(), UmengStub()]
        for stub in self.stubs:
            self.addCleanup(stub.close)
        self.server = ServerProcess()
        directory = self.server.directory
        self.tokens = directory / "tokens"
        self.tokens.write_text(f"{OLD_TOKEN}\n")
        self.umeng = directory / "umeng.json"
        self.write_umeng(self.stubs[0])
        self.texts = directory / "texts.json"
        self.write_texts("已支付")
        self.server.args = [
            *("--api-token-file", str(self.tokens)),
            *("--umeng-config", str(self.umeng)),
            *("--push-texts", str(self.texts)),
        ]
        running(self, self.server)

    def write_umeng(self, stub: UmengStub) -> None:
        self.umeng.write_text(json.dumps({"endpoint": stub.endpoint, **APPS}))

    def write_texts(self, paid: object) -> None:
        self.texts.write_text(json.dumps({"order": {"paid": paid}}), encoding="utf-8")

    def alerts(self, stub: UmengStub) -> list[object]:
        return [r.body["payload"]["aps"]["alert"] for r in stub.received() if r.body]

    def user(self, name: str, secret: bytes) -> PahoUser:
        user = PahoUser(self.server.mqtt_port, name, name, sign(secret, name))
        self.addCleanup(user.client.loop_stop)
        return user

    def hangup(self, outcome: str, count: int) -> None:
        """SIGHUP, and wait for the server to log count lines of outcome."""
        before = self.server.log.count(outcome)
        self.server.signal(signal.SIGHUP)
        wait_for(
            lambda: self.server.log.count(outcome) >= before + count,
            what=f"{count} lines with {outcome!r}",
        )

    def notify(self, user_id: str, token: str) -> int:
        body = {"to": user_id, "type": "order", "payload": {"status": "paid", "o_id": "o-1"}}
        return self.server.api("/v1/notifications", "POST", body, token)[0]

    def test_reload(self) -> None:
        """
        New files are in force without a dropped connection; bad ones are
        refused with one line each and the old ones stay in force.
        """
        old_secret = self.server.secret
        alice = self.user("alice", old_secret)
        self.assertEqual(alice.rc, 0)
        self.assertEqual(
            self.server.api(
                "/v1/users/zoe/device", "PUT", {"platform": "ios", "device_token": "t"}, OLD_TOKEN
            )[0],
            204,
        )

        new_secret = b"the new secret"
        self.tokens.write_text(f"{NEW_TOKEN}\n")
        (self.server.directory / "sktalent.secret").write_bytes(new_secret + b"\n")
        self.write_umeng(self.stubs[1])
        self.write_texts("用户付款了")
        self.hangup("reloaded", 4)
        for option in ("--api-token-file", "--auth-secret-file", "--umeng-config", "--push-texts"):
            one_line(self, self.server.log, option, "reloaded")

        self.assertEqual(self.notify("alice", OLD_TOKEN), 401)
        self.assertEqual(self.notify("alice", NEW_TOKEN), 202)
        [frame] = alice.frames(1)
        self.assertEqual(frame["type"], "order")
        self.assertTrue(alice.client.is_connected())
        self.assertEqual(self.user("bob", old_secret).rc, 4)
        self.assertEqual(self.user("bob", new_secret).rc, 0)
        self.assertEqual(self.notify("zoe", NEW_TOKEN), 202)
        self.stubs[1].wait(1)
        self.assertEqual(self.stubs[0].received(), [])
        self.assertEqual(self.alerts(self.stubs[1]), ["用户付款了"])

        self.tokens.write_text("")
        (self.server.directory / "sktalent.secret").unlink()
        self.umeng.write_text("{not json")
        self.write_texts(3)
        self.hangup("refused", 4)
        for option, why in [
            ("--api-token-file", "holds no token"),
            ("--auth-secret-file", "No such file"),
            ("--umeng-config", "not valid JSON"),
            ("--push-texts", "order.paid"),
        ]:
            one_line(self, self.server.log, option, "refused", why)

        self.assertEqual(self.notify("alice", NEW_TOKEN), 202)
        self.assertEqual(len(alice.frames(1)), 1)
        self.assertEqual(self.user("carol", new_secret).rc, 0)
        self.assertEqual(self.notify("zoe", NEW_TOKEN), 202)
        self.stubs[1].wait(2)
        self.assertEqual(self.alerts(self.stubs[1]), ["用户付款了", "用户付款了"])
        self.assertEqual(self.server.stop(), 0)


def takes_sighup(pid: int) -> bool:
    """Whether process pid catches or ignores SIGHUP, by its /proc status."""
    with open(f"/proc/{pid}/status") as status:
        masks = [line.split()[1] for line in status if line.startswith(("SigCgt:", "SigIgn:"))]
    return any(int(mask, 16) >> (signal.SIGHUP - 1) & 1 for mask in masks)


class EarlyHangupTests(SynchronousTestCase):
    def test_sighup_while_starting(self) -> None:
        """
        A SIGHUP as soon as the server's code can take it, well before it
        listens (systemctl reload right after start), does not end it: it
        starts, says in one line that the signal came, and reloads once up.
        """
        if not os.path.exists("/proc/self/status"):
            raise SkipTest("needs /proc to see when the process takes SIGHUP")
        server = ServerProcess()
        (server.directory / "tokens").write_text(f"{OLD_TOKEN}\n")
        server.args = ["--api-token-file", str(server.directory / "tokens")]
        self.addCleanup(shutil.rmtree, server.directory, True)
        self.addCleanup(server.stop)
        server.spawn()
        assert server.process is not None
        deadline = time.monotonic() + 20
        # Polled closely: the moment matters, the server being up in a fraction of a second.
        while not takes_sighup(server.process.pid):
            self.assertIsNone(server.process.poll(), server.log)
            self.assertLess(time.monotonic(), deadline, "the server never took SIGHUP")
            time.sleep(0.001)
        server.signal(signal.SIGHUP)
        wait_for(lambda: listening(server.mqtt_port), what=f"the server to listen\n{server.log}")
        wait_for(lambda: "reloaded" in server.log, what=f"the reload\n{server.log}")
        one_line(self, server.log, "SIGHUP came while the server was starting")
        one_line(self, server.log, "--api-token-file", "reloaded")
        self.assertIsNone(server.process.poll())
        self.assertEqual(server.stop(), 0)


class CreatedFileTests(SynchronousTestCase):
    def test_private_whatever_the_umask(self) -> None:
        """
        With umask 0 the store, its -wal and -shm files and the new secret are
        still 0600, and the start says where the new secret is.
        """
        server = running(self, ServerProcess(umask=0))
        for name in ("store.sqlite3", "store.sqlite3-wal", "store.sqlite3-shm", "sktalent.secret"):
            with self.subTest(name=name):
                self.assertEqual((server.directory / name).stat().st_mode & 0o777, 0o600)
        secret = server.directory / "sktalent.secret"
        one_line(self, server.log, "Created a new authSign secret", str(secret))

    def test_existing_modes_kept(self) -> None:
        """A store and a secret that exist keep their modes; no secret is created."""
        server = ServerProcess(umask=0)
        self.addCleanup(shutil.rmtree, server.directory, True)
        store, secret = server.directory / "store.sqlite3", server.directory / "sktalent.secret"
        store_file(store)
        secret.write_text("an old secret\n")
        store.chmod(0o640)
        secret.chmod(0o640)
        running(self, server)
        self.assertEqual(store.stat().st_mode & 0o777, 0o640)
        self.assertEqual(secret.stat().st_mode & 0o777, 0o640)
        self.assertNotIn("Created a new authSign secret", server.log)
