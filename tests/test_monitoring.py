"""
The monitoring files in deploy/: the Prometheus alerting rules (checked and
unit-tested with promtool), the Grafana dashboard, their runbook, and that
every metric they name is one a running server exports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from sktalent.testing.server import ROOT, ServerProcess, running

DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "sktalent.json"
RUNBOOK = DEPLOY / "README.md"
METRICS_DOC = ROOT / "docs" / "metrics.md"
# What a metric name in a query looks like; `up` is Prometheus's own.
METRIC = re.compile(r"\b(?:sktalent|process)_[a-z0-9_]+\b")
# A counter selected by label values in a rule, and one matcher of it.
SELECTOR = re.compile(r"\b(sktalent_[a-z0-9_]+_total)\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|=)\s*"([^"]*)"')
# Grafana's variables, replaced by what they stand for in a plain query.
VARIABLES = {
    "$__rate_interval": "5m",
    "$__range": "1h",
    "$job": "sktalent",
    "$instance": ".*",
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def dashboard_queries() -> list[str]:
    return [
        target["expr"] for panel in dashboard()["panels"] for target in panel.get("targets", ())
    ]


def promtool() -> str:
    """promtool's path; a skip without it, a failure in CI (CI=true)."""
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            raise AssertionError("CI=true but promtool is missing: apt-get install prometheus")
        raise SkipTest("promtool is not installed (Debian: apt-get install prometheus)")
    return found


def exported_names(exposition: str) -> set[str]:
    """Every series name an exposition has or would have once its labels are used."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.update({family.name + "_total", family.name + "_created"})
        elif family.type == "histogram":
            names.update(
                family.name + suffix for suffix in ("_bucket", "_count", "_sum", "_created")
            )
        elif family.type == "info":
            names.add(family.name + "_info")
        else:
            names.add(family.name)
    return names


class PromtoolTests(SynchronousTestCase):
    def promtool(self, *args: str) -> None:
        done = subprocess.run(
            [promtool(), *args], capture_output=True, text=True, timeout=120, cwd=ROOT
        )
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)

    def test_check_rules(self) -> None:
        """promtool check rules accepts alerts.yml."""
        self.promtool("check", "rules", str(ALERTS))

    def test_rules_unit_tests(self) -> None:
        """
        Each alert fires on the failure it is for and stays quiet on a
        healthy node (promtool test rules on alerts_test.yml).
        """
        self.promtool("test", "rules", str(ALERT_TESTS))

    def test_dashboard_queries_parse(self) -> None:
        """Every query of the dashboard is valid PromQL once its variables are set."""
        rules = []
        for n, query in enumerate(dashboard_queries()):
            for variable, value in sorted(VARIABLES.items(), key=lambda kv: -len(kv[0])):
                query = query.replace(variable, value)
            self.assertNotIn("$", query)
            rules.append({"record": f"dashboard:query_{n}", "expr": query})
        path = Path(tempfile.mkdtemp()) / "dashboard_rules.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        self.promtool("check", "rules", str(path))


class AlertTests(SynchronousTestCase):
    def test_every_alert_tested(self) -> None:
        """alerts_test.yml shows every alert firing at least once."""
        fired = {
            case["alertname"]
            for test in load_yaml(ALERT_TESTS)["tests"]
            for case in test["alert_rule_test"]
            if case["exp_alerts"]
        }
        self.assertEqual(fired, {rule["alert"] for rule in alert_rules()})

    def test_every_alert_explained(self) -> None:
        """
        Every alert has a severity, a summary, a description and a runbook
        entry, and deploy/README.md has that entry.
        """
        entries = dict(
            re.findall(r"(?m)^- \*\*(\w+)\*\* \((\w+)\): ", RUNBOOK.read_text(encoding="utf-8"))
        )
        for rule in alert_rules():
            name = rule["alert"]
            with self.subTest(alert=name):
                self.assertIn(rule["labels"]["severity"], ("critical", "warning"))
                self.assertTrue(rule["annotations"]["summary"])
                self.assertTrue(rule["annotations"]["description"])
                self.assertEqual(
                    rule["annotations"]["runbook"], f"deploy/README.md, Alerts: {name}"
                )
                self.assertEqual(entries.get(name), rule["labels"]["severity"])


class DashboardTests(SynchronousTestCase):
    def test_structure(self) -> None:
        """
        The dashboard has its data source, job and node variables; its
        panels have distinct ids, fit the grid, and query through the
        chosen data source.
        """
        board = dashboard()
        self.assertEqual(board["uid"], "sktalent")
        variables = [v["name"] for v in board["templating"]["list"]]
        self.assertEqual(variables, ["datasource", "job", "instance"])
        ids = [panel["id"] for panel in board["panels"]]
        self.assertEqual(len(ids), len(set(ids)))
        for panel in board["panels"]:
            with self.subTest(panel=panel["title"]):
                place = panel["gridPos"]
                self.assertLessEqual(place["x"] + place["w"], 24)
                if panel["type"] == "row":
                    continue
                self.assertEqual(panel["datasource"]["uid"], "${datasource}")
                self.assertTrue(panel["targets"])
                for target in panel["targets"]:
                    self.assertIn('job=~"$job"', target["expr"])

    def test_topics(self) -> None:
        """The dashboard shows what operators look for, by title."""
        titles = {panel["title"] for panel in dashboard()["panels"]}
        for wanted in (
            "Connections by node",
            "Logins and refused logins",
            "Messages in by type",
            "Messages out by type",
            "Refusals by code",
            "Queued messages by node",
            "Oldest queued message",
            "Pushes by outcome",
            "Pushes by reason",
            "Push failures by Umeng code",
            "Store commit",
            "Store outages",
            "API requests by status",
            "Publish to sent",
        ):
            self.assertIn(wanted, titles)


class MetricNamesTests(SynchronousTestCase):
    def exposition(self) -> str:
        """A running server's /metrics."""
        server = running(self, ServerProcess())
        status, body = server.api("/metrics")
        self.assertEqual(status, 200)
        return body.decode()

    def test_every_metric_documented(self) -> None:
        """docs/metrics.md lists exactly the metrics a running server exports."""
        exported = set()
        for family in text_string_to_metric_families(self.exposition()):
            # The parser takes a counter's _created series for a gauge of its own.
            if not family.name.endswith("_created"):
                exported.add(family.name + ("_total" if family.type == "counter" else ""))
        listed = set(re.findall(r"(?m)^\| `([a-z_]+)` \|", METRICS_DOC.read_text(encoding="utf-8")))
        self.assertEqual(listed, exported)

    def test_watched_series_start_at_zero(self) -> None:
        """
        Every counter series an alert selects by label value is exported at 0
        by a server that has seen no traffic: rate() and increase() see a
        counter's first step only when a sample precedes it.
        """
        samples = {
            (sample.name, name, value)
            for family in text_string_to_metric_families(self.exposition())
            for sample in family.samples
            for name, value in sample.labels.items()
        }
        watched: set[tuple[str, str, str]] = set()
        for metric, matchers in SELECTOR.findall(ALERTS.read_text(encoding="utf-8")):
            for label, _, values in MATCHER.findall(matchers):
                if label != "job":
                    watched.update((metric, label, value) for value in values.split("|"))
        self.assertIn(("sktalent_api_requests_total", "status", "500"), watched)
        self.assertEqual(watched - samples, set())

    def test_every_name_exported(self) -> None:
        """
        Every metric the dashboard, the alerts and their tests name is one a
        running server exports: renaming a metric breaks this, not a board.
        """
        exported = exported_names(self.exposition())
        sources = {
            "dashboard": "\n".join(dashboard_queries()),
            "alerts": ALERTS.read_text(encoding="utf-8"),
            "alert tests": ALERT_TESTS.read_text(encoding="utf-8"),
        }
        for source, text in sources.items():
            used = set(METRIC.findall(text))
            self.assertTrue(used, source)
            with self.subTest(source=source):
                self.assertEqual(used - exported, set())
