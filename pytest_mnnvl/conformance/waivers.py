"""Waivers (``--mnnvl-waivers=FILE``): known conformance failures a vendor carries while CI stays a gate.

A waiver names an invariant (every test of it) or a test (node id or glob), optionally a manager spec
glob, a reason and an expiry date. A matching test that fails (a MUST violation, a SHOULD one under
``--mnnvl-strict``, or any other error in setup or call) is reported as xfailed with the waiver's reason,
so the run passes while the violation stays in the report. Waivers must not outlive their bug: one whose
tests all passed is *stale* (exit :data:`STALE_EXIT` under ``--mnnvl-strict``), one past its date is
*ignored* (the test fails as usual), one that matched nothing is *unused* (informational).

File format (JSON, or TOML with ``[[waivers]]`` tables on Python >= 3.11; chosen by extension)::

    {"waivers": [{"invariant": "covers_cross_product", "manager": "mypkg.*", "reason": "total-need policy",
                  "expires": "2027-03-31", "issue": "https://example.com/bugs/12"}]}

Loading imports nothing heavy: the invariant names are read only when a file is given.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from pytest_mnnvl.errors import MnnvlUsageError

#: Exit status of a session whose gates all passed but which carries a stale waiver under ``--mnnvl-strict``.
#: Distinct from 1 so that CI can tell "the manager regressed" from "the waiver file needs cleaning".
STALE_EXIT = 6
KEYS = ("invariant", "test", "manager", "reason", "expires", "issue")
OPTION = "--mnnvl-waivers"
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True)
class Waiver:
    """One entry of the file; ``index`` is its position in ``waivers`` (0-based), as errors name it."""

    index: int
    reason: str
    expires: datetime.date
    invariant: str | None = None
    test: str | None = None
    manager: str = "*"
    issue: str | None = None

    @property
    def target(self) -> str:
        return f"invariant {self.invariant}" if self.invariant else f"test {self.test}"

    def matches(self, nodeid: str, invariant: str | None, manager: str) -> bool:
        if not fnmatch.fnmatchcase(manager, self.manager):
            return False
        if self.invariant is not None:
            return invariant == self.invariant
        assert self.test is not None
        # Exact first: a parametrized id's "[ws2-pp1]" would read as a character class in a glob.
        return nodeid == self.test or fnmatch.fnmatchcase(nodeid, self.test)

    def expired(self, today: datetime.date) -> bool:
        """Valid through its ``expires`` day."""
        return today > self.expires

    def xfail_reason(self) -> str:
        tail = f"expires {self.expires.isoformat()}" + (f", {self.issue}" if self.issue else "")
        return f"waived: {self.reason} ({tail})"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        out["invariant" if self.invariant else "test"] = self.invariant or self.test
        out.update(manager=self.manager, reason=self.reason, expires=self.expires.isoformat(), issue=self.issue)
        return out


# ---- loading -------------------------------------------------------------------------------------


def load(path: str) -> list[Waiver]:
    """Read and validate ``path``; every problem is an :class:`MnnvlUsageError` naming the file and value."""
    head = f"{OPTION}={path}"
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".toml"):
        raise MnnvlUsageError(f"{head}: extension {ext or '(none)'!r} is not valid; allowed: .json, .toml")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise MnnvlUsageError(f"{head}: cannot read the file ({exc.strerror}); allowed: a readable file") from None
    if ext == ".toml":
        data = _parse_toml(raw, head)
    else:
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise MnnvlUsageError(f"{head}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise MnnvlUsageError(
                f"{head}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
            ) from None
    return parse(data, head)


def _parse_toml(raw: bytes, head: str) -> Any:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise MnnvlUsageError(f"{head}: TOML waiver files need Python >= 3.11 (tomllib); allowed here: .json") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise MnnvlUsageError(f"{head}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        # The message carries "(at line L, column C)".
        raise MnnvlUsageError(f"{head}: not valid TOML: {exc}") from None


def parse(data: Any, head: str = OPTION) -> list[Waiver]:
    """Validate parsed JSON or TOML (one code path for both)."""
    if not isinstance(data, Mapping):
        raise MnnvlUsageError(f"{head}: the top level is {_kind(data)}; allowed: an object with a 'waivers' list")
    unknown = [k for k in data if k != "waivers"]
    if unknown:
        raise MnnvlUsageError(f"{head}: unknown top-level key {unknown[0]!r}; allowed: waivers")
    entries = data.get("waivers")
    if not isinstance(entries, list):
        got = "missing" if entries is None else _kind(entries)
        raise MnnvlUsageError(f"{head}: 'waivers' is {got}; allowed: a list of entries")
    return [_entry(i, entry, head) for i, entry in enumerate(entries)]


def _entry(index: int, entry: Any, head: str) -> Waiver:
    from pytest_mnnvl.conformance.catalog import INVARIANTS

    where = f"{head}: waivers[{index}]"
    if not isinstance(entry, Mapping):
        raise MnnvlUsageError(f"{where} is {_kind(entry)}; allowed: an object with keys {', '.join(KEYS)}")
    for key in entry:
        if key not in KEYS:
            raise MnnvlUsageError(f"{where}: unknown key {key!r}; allowed: {', '.join(KEYS)}")
    targets = [k for k in ("invariant", "test") if k in entry]
    if len(targets) != 1:
        got = "both" if targets else "neither"
        raise MnnvlUsageError(f"{where}: has {got} of 'invariant' and 'test'; allowed: exactly one of them")
    invariant = entry.get("invariant")
    if invariant is not None and invariant not in INVARIANTS:
        raise MnnvlUsageError(f"{where}: invariant={invariant!r} is not known; allowed: {', '.join(INVARIANTS)}")
    test = _text(entry, "test", where, "a node id or node id glob") if "test" in entry else None
    manager = _text(entry, "manager", where, "a manager spec glob") if "manager" in entry else "*"
    if "reason" not in entry:
        raise MnnvlUsageError(f"{where}: 'reason' is missing; allowed: a non-empty string saying why")
    reason = _text(entry, "reason", where, "a non-empty string saying why")
    issue = entry.get("issue")
    if issue is not None:
        if not isinstance(issue, (str, int)) or isinstance(issue, bool) or not str(issue).strip():
            raise MnnvlUsageError(f"{where}: issue={issue!r} is not valid; allowed: a non-empty URL or id")
        issue = str(issue).strip()
    return Waiver(index, reason, _date(entry, where), invariant=invariant, test=test, manager=manager, issue=issue)


def _text(entry: Mapping[str, Any], key: str, where: str, allowed: str) -> str:
    value = entry[key]
    if not isinstance(value, str) or not value.strip():
        raise MnnvlUsageError(f"{where}: {key}={value!r} is not valid; allowed: {allowed}")
    return value.strip()


def _date(entry: Mapping[str, Any], where: str) -> datetime.date:
    if "expires" not in entry:
        raise MnnvlUsageError(f"{where}: 'expires' is missing; allowed: a date YYYY-MM-DD")
    value = entry["expires"]
    # TOML gives a bare date as datetime.date; normalize to the string JSON gives.
    text = value.isoformat() if type(value) is datetime.date else value
    if isinstance(text, str) and _DATE.match(text):
        try:
            return datetime.date.fromisoformat(text)
        except ValueError:
            pass
    raise MnnvlUsageError(f"{where}: expires={value!r} is not a valid date; allowed: YYYY-MM-DD")


def _kind(value: Any) -> str:
    names: dict[type, str] = {dict: "an object", list: "a list", str: "a string"}
    return names.get(type(value), f"a {type(value).__name__}")


# ---- the session's ledger ------------------------------------------------------------------------


@dataclass
class Ledger:
    """The waivers of this session and what each did: nodeid → ``waived`` | ``passed`` | ``skipped`` |
    ``failed`` per waiver. Reports are converted where they are made (:meth:`apply`, on an xdist worker
    too) and counted where they are logged (:meth:`record`, on the controller)."""

    path: str
    waivers: list[Waiver]
    manager: str
    strict: bool
    today: datetime.date = field(default_factory=datetime.date.today)
    tests: dict[int, dict[str, str]] = field(default_factory=dict)

    def apply(self, item: pytest.Item, report: pytest.TestReport) -> None:
        """Turn a failed setup or call of a waived test into an xfail; tag the report with its waivers."""
        if report.when not in ("setup", "call"):
            return
        marker = item.get_closest_marker("conformance")
        invariant = str(marker.args[0]) if marker and marker.args else None
        matched = [w for w in self.waivers if w.matches(item.nodeid, invariant, self.manager)]
        if not matched:
            return
        active = [w for w in matched if not w.expired(self.today)]
        applied: list[int] = []
        xfailed = report.skipped and hasattr(report, "wasxfail")
        if active and (report.failed or xfailed):
            # A non-gating SHOULD violation is already an xfail: the waiver still covers it (not stale).
            report.outcome = "skipped"
            report.wasxfail = active[0].xfail_reason()
            applied = [w.index for w in active]
        # Plain data: reports travel from xdist workers as JSON.
        report.mnnvl_waivers = {"matched": [w.index for w in matched], "applied": applied}  # type: ignore[attr-defined]

    def record(self, report: pytest.TestReport) -> None:
        info = getattr(report, "mnnvl_waivers", None)
        if not info:
            return
        if report.passed and report.when != "call":
            return  # a passed setup says nothing yet
        for index in info["matched"]:
            outcome = "waived" if index in info["applied"] else report.outcome
            seen = self.tests.setdefault(index, {})
            if seen.get(report.nodeid) not in ("waived", "failed"):
                seen[report.nodeid] = outcome

    def status(self, waiver: Waiver) -> str:
        """applied (it turned a failure into an xfail), stale (its tests ran and passed), expired, or unused."""
        outcomes = set(self.tests.get(waiver.index, {}).values())
        if waiver.expired(self.today):
            return "expired"
        if "waived" in outcomes:
            return "applied"
        if "passed" in outcomes:
            return "stale"
        return "unused"

    def entries(self) -> list[dict[str, Any]]:
        """The report's ``waivers.entries``: each waiver, its status and the tests it matched."""
        return [
            {**w.to_dict(), "status": self.status(w), "tests": dict(sorted(self.tests.get(w.index, {}).items()))}
            for w in self.waivers
        ]

    def section(self) -> dict[str, Any]:
        entries = self.entries()
        counts = {s: sum(1 for e in entries if e["status"] == s) for s in ("applied", "stale", "expired", "unused")}
        return {"file": self.path, "today": self.today.isoformat(), "counts": counts, "entries": entries}

    def stale(self) -> list[Waiver]:
        return [w for w in self.waivers if self.status(w) == "stale"]


LEDGER_KEY = pytest.StashKey[Ledger]()


def describe(entry: Mapping[str, Any]) -> str:
    """One line per waiver for the terminal and the Markdown report; it says the status in words."""
    target = f"invariant {entry['invariant']}" if "invariant" in entry else f"test {entry['test']}"
    head = f"waivers[{entry['index']}] {target} (manager {entry['manager']})"
    tests = entry["tests"]
    status = entry["status"]
    if status == "applied":
        waived = sum(1 for o in tests.values() if o == "waived")
        why = f"{entry['reason']} (expires {entry['expires']}" + (f", {entry['issue']})" if entry["issue"] else ")")
        return f"{head}: applied to {waived} test{'s' * (waived != 1)}: {why}"
    if status == "stale":
        passed = sum(1 for o in tests.values() if o == "passed")
        return f"{head}: stale: no longer needed, {passed} matching test{'s' * (passed != 1)} passed; remove it"
    if status == "expired":
        failed = sum(1 for o in tests.values() if o == "failed")
        return f"{head}: expired waiver ignored (expired {entry['expires']}): {failed} matching test(s) failed"
    return f"{head}: unused: no matching test passed or failed"


class WaiverHooks:
    """Registered only when a waiver file is given; the report conversion itself runs in
    :func:`pytest_mnnvl.plugin.pytest_runtest_makereport`, after ``--mnnvl-strict``'s."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.ledger.record(report)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        # Before the conformance report is written, so that it carries the final exit status.
        if hasattr(session.config, "workerinput"):
            return
        if self.ledger.strict and self.ledger.stale() and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = STALE_EXIT

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter: Any, config: pytest.Config) -> None:
        section = self.ledger.section()
        counts = ", ".join(f"{n} {s}" for s, n in section["counts"].items())
        terminalreporter.section("mnnvl waivers")
        terminalreporter.write_line(f"{section['file']}: {counts}")
        for entry in section["entries"]:
            terminalreporter.write_line(describe(entry))
        if self.ledger.strict and self.ledger.stale():
            terminalreporter.write_line(
                f"ERROR: --mnnvl-strict: {len(self.ledger.stale())} stale waiver(s); exit status {STALE_EXIT} "
                "unless something failed",
                red=True,
            )


def install(config: pytest.Config, path: str, manager: str, strict: bool) -> Ledger:
    """Load ``path`` (usage error if it is bad) and register the hooks that account for it."""
    ledger = Ledger(path, load(path), manager, strict)
    config.stash[LEDGER_KEY] = ledger
    config.pluginmanager.register(WaiverHooks(ledger), "mnnvl-waivers")
    return ledger


def makereport(item: pytest.Item, report: pytest.TestReport) -> None:
    """Called from the plugin's makereport wrapper (a no-op without a waiver file)."""
    ledger = item.config.stash.get(LEDGER_KEY, None)
    if ledger is not None:
        ledger.apply(item, report)
