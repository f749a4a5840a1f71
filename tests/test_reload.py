"""
Reloading the operator's files on SIGHUP.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from sktalent.reload import Reloadable, Reloader, hold_hangups


@implementer(IReactorFromThreads)
@attrs.define
class ImmediateReactor:
    """Runs what is called from a thread at once, and counts the calls."""

    calls: int = 0

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        self.calls += 1
        callable(*args, **kwargs)


def load_number(path: str) -> int:
    with open(path) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise ValueError(f"{path} holds no number")
    return int(text)


class ReloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        self.write("1")
        self.applied: list[int] = []
        self.file = Reloadable("--number-file", self.path, load_number, self.applied.append)

    def write(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(text)

    def reload(self, reloader: Reloader) -> list[tuple[LogLevel, str]]:
        with capturedLogs() as events:
            reloader.reload()
        return [(e["log_level"], formatEvent(e)) for e in events]

    def test_applies_a_good_file(self) -> None:
        """A file that loads is applied, and one info line says so."""
        self.write("42")
        lines = self.reload(Reloader(ImmediateReactor(), [self.file]))
        self.assertEqual(self.applied, [42])
        self.assertEqual(lines, [(LogLevel.info, f"Reload: --number-file {self.path} reloaded")])

    def test_refuses_a_bad_file(self) -> None:
        """
        A file that does not load, or cannot be read, is not applied: one
        error line names it and why, and the next good one is applied.
        """
        self.write("many")
        lines = self.reload(Reloader(ImmediateReactor(), [self.file]))
        self.assertEqual(self.applied, [])
        self.assertEqual(
            lines,
            [
                (
                    LogLevel.error,
                    f"Reload: refused --number-file {self.path}, the old one stays in force:"
                    f" {self.path} holds no number",
                )
            ],
        )
        os.remove(self.path)
        [(level, line)] = self.reload(Reloader(ImmediateReactor(), [self.file]))
        self.assertEqual(level, LogLevel.error)
        self.assertIn("No such file", line)
        self.write("7")
        self.reload(Reloader(ImmediateReactor(), [self.file]))
        self.assertEqual(self.applied, [7])

    def test_each_file_alone(self) -> None:
        """A bad file does not stop the others from being reloaded."""
        other: list[int] = []
        good = self.mktemp()
        with open(good, "w") as f:
            f.write("5")
        self.write("")
        files = [self.file, Reloadable("--other", good, load_number, other.append)]
        levels = [level for level, _ in self.reload(Reloader(ImmediateReactor(), files))]
        self.assertEqual(levels, [LogLevel.error, LogLevel.info])
        self.assertEqual((self.applied, other), ([], [5]))

    def test_nothing_to_reload(self) -> None:
        """Without a reloadable file a SIGHUP still gets its line."""
        self.assertEqual(
            self.reload(Reloader(ImmediateReactor(), [])),
            [(LogLevel.info, "Reload: no file to reload")],
        )

    def test_sighup(self) -> None:
        """
        While the service runs SIGHUP reloads, through the reactor; once it
        stops the signal's previous handler is back.
        """
        seen: list[int] = []
        previous = signal.signal(signal.SIGHUP, lambda number, frame: seen.append(number))
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        reactor = ImmediateReactor()
        reloader = Reloader(reactor, [self.file])
        reloader.startService()
        self.write("3")
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual((reactor.calls, self.applied), (1, [3]))
        reloader.stopService()
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual((reactor.calls, seen), (1, [signal.SIGHUP]))

    def test_sighup_held_while_starting(self) -> None:
        """
        A SIGHUP after hold_hangups and before the Reloader starts is only
        noted: the Reloader says in one line that it came and reloads once;
        a SIGHUP after that reloads as ever.
        """
        previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        hold_hangups()
        self.write("4")
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual(self.applied, [])
        reactor = ImmediateReactor()
        reloader = Reloader(reactor, [self.file])
        with capturedLogs() as events:
            reloader.startService()
        self.addCleanup(reloader.stopService)
        self.assertEqual(
            [formatEvent(e) for e in events],
            [
                "Reload: 2 SIGHUP came while the server was starting; reloading now",
                f"Reload: --number-file {self.path} reloaded",
            ],
        )
        self.assertEqual(self.applied, [4])
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual((reactor.calls, self.applied), (2, [4, 4]))
