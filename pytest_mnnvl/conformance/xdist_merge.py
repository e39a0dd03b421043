"""The conformance report under pytest-xdist (``-n N``): the workers run the tests, the controller reports.

A worker's :class:`~pytest_mnnvl.conformance.recorder.Recorder` sees only that worker's tests and the controller
runs none, so every report a worker makes of a conformance test carries what that test added to the worker's
Recorder (:class:`Delta`), and the controller adds it to its own. The controller's Recorder then holds what one
process running every test would hold, and only the controller writes the report and prints the summary.
Per report rather than once at the worker's end (``workeroutput``): a worker that crashes never sends that,
and what it reported before must still count; the test it crashed in becomes an infrastructure failure.

Deltas are builtins only (:func:`plain`): reports cross xdist's channel as builtins, and anything else would
fail the worker's send.

:func:`make_topology_scheduling` keeps every test of one topology on one worker, in collection order: that
topology's world starts once, its observation cache serves all its tests, and a hang or crash skips the
rest of the topology, as it does without ``-n``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

from pytest_mnnvl.errors import FailureKind

if TYPE_CHECKING:
    from pytest_mnnvl.conformance.recorder import Failure, Halt, Recorder

#: The Recorder's totals that add up over workers (attribute names of :class:`Recorder`).
COUNTERS = ("examples", "plan_runs", "cache_hits", "plan_seconds", "initialize_calls", "rebuilds")
#: The report attribute that carries a :class:`Delta` from a worker (plain data, as ``mnnvl_waivers``).
ATTRIBUTE = "mnnvl_record"
#: ``--dist`` modes that may split a topology's tests between workers (``load`` is scheduled by topology).
SPLITTING = ("loadgroup", "worksteal")
#: The topology part of a test id: ``ws2-pp1`` in ``test_covers[ws2-pp1]`` or ``[ws2-pp1-top_k]``.
_TOPOLOGY_ID = re.compile(r"(?:^|-)(ws\d+-pp\d+)(?=-|$)")


def plain(value: Any) -> Any:
    """``value`` as builtins that execnet sends and ``json`` writes as before: containers copied, subclasses
    of str/int/float (enums) as their base value, anything else as its ``repr`` (what the report's JSON
    writer does with it)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {plain_key(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [plain(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    for base in (str, int, float):
        if isinstance(value, base):
            return base(value) if base is not str else str.__str__(value)
    return repr(value)


def plain_key(key: Any) -> Any:
    return key if key is None or type(key) in (str, int, float, bool) else str(plain(key))


def _failure_wire(failure: Failure) -> dict[str, Any]:
    return {"kind": failure.kind.value, "summary": failure.summary, "detail": failure.detail}


def _failure_from(data: dict[str, Any]) -> Failure:
    from pytest_mnnvl.conformance.recorder import Failure

    return Failure(FailureKind(data["kind"]), str(data["summary"]), str(data["detail"]))


def _halt_wire(key: tuple[int, int], halt: Halt) -> dict[str, Any]:
    return {
        "world_size": key[0],
        "pp": key[1],
        "nodeid": halt.nodeid,
        "topology": halt.topology,
        "kind": halt.kind.value,
        "summary": halt.summary,
        "skipped": list(halt.skipped),
    }


def _halt_from(data: dict[str, Any]) -> tuple[tuple[int, int], Halt]:
    from pytest_mnnvl.conformance.recorder import Halt

    halt = Halt(data["nodeid"], data["topology"], FailureKind(data["kind"]), data["summary"], list(data["skipped"]))
    return (int(data["world_size"]), int(data["pp"])), halt


@dataclass(frozen=True)
class Delta:
    """What one report of one test adds to a Recorder: the test's whole entry (replacing any earlier one),
    its place in the collection, the totals' increments, and the halts, failures and manager load error
    that are new or changed since the worker's previous delta."""

    nodeid: str
    index: int | None
    entry: dict[str, Any] | None
    counts: dict[str, float]
    max_size_per_rank: int
    halts: tuple[tuple[tuple[int, int], Halt], ...] = ()
    failures: tuple[tuple[str, Failure], ...] = ()
    load_error: tuple[str, str] | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "nodeid": self.nodeid,
            "index": self.index,
            "entry": plain(self.entry),
            "counts": dict(self.counts),
            "max_size_per_rank": self.max_size_per_rank,
            "halts": [_halt_wire(key, halt) for key, halt in self.halts],
            "failures": [[nodeid, _failure_wire(f)] for nodeid, f in self.failures],
            "load_error": list(self.load_error) if self.load_error else None,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Delta:
        load_error = data["load_error"]
        return cls(
            nodeid=data["nodeid"],
            index=data["index"],
            entry=data["entry"],
            counts={name: data["counts"][name] for name in COUNTERS},
            max_size_per_rank=int(data["max_size_per_rank"]),
            halts=tuple(_halt_from(h) for h in data["halts"]),
            failures=tuple((nodeid, _failure_from(f)) for nodeid, f in data["failures"]),
            load_error=(str(load_error[0]), str(load_error[1])) if load_error else None,
        )

    def apply(self, recorder: Recorder) -> None:
        """Add this delta to the controller's Recorder."""
        if self.index is not None:
            recorder.order[self.nodeid] = self.index
        if self.entry is not None:
            recorder.tests[self.nodeid] = dict(self.entry)
        for name, value in self.counts.items():
            setattr(recorder, name, getattr(recorder, name) + value)
        recorder.max_size_per_rank = max(recorder.max_size_per_rank, self.max_size_per_rank)
        for key, halt in self.halts:
            held = recorder.broken.get(key)
            if held is None or held.nodeid == halt.nodeid:
                recorder.broken[key] = halt
            else:  # another worker halted it first (a --dist that splits topologies): keep the first
                held.skipped.extend(n for n in halt.skipped if n not in held.skipped)
        recorder.failures.update(self.failures)
        if self.load_error is not None and (
            recorder.load_error is None
            or recorder.position(self.load_error[0]) < recorder.position(recorder.load_error[0])
        ):
            recorder.load_error = self.load_error


@dataclass
class Sender:
    """A worker's side: what it has already sent, so that each delta carries only what is new."""

    recorder: Recorder
    counts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    max_size_per_rank: int = 0
    halts: dict[tuple[int, int], tuple[str, int]] = field(default_factory=dict)
    failures: set[str] = field(default_factory=set)
    load_error: tuple[str, str] | None = None

    def delta(self, nodeid: str) -> Delta:
        r = self.recorder
        now = {name: getattr(r, name) for name in COUNTERS}
        counts = {name: now[name] - self.counts[name] for name in COUNTERS}
        self.counts = now
        self.max_size_per_rank = r.max_size_per_rank
        halts = tuple((k, h) for k, h in r.broken.items() if self.halts.get(k) != (h.nodeid, len(h.skipped)))
        self.halts.update({k: (h.nodeid, len(h.skipped)) for k, h in halts})
        failures = tuple((n, f) for n, f in r.failures.items() if n not in self.failures)
        self.failures.update(n for n, _ in failures)
        load_error = r.load_error if r.load_error != self.load_error else None
        self.load_error = r.load_error
        return Delta(
            nodeid,
            r.order.get(nodeid),
            r.tests.get(nodeid),
            counts,
            r.max_size_per_rank,
            halts,
            failures,
            load_error,
        )


SENDER_KEY = pytest.StashKey[Sender]()


def install(config: pytest.Config, recorder: Recorder) -> None:
    """On an xdist worker: send deltas. On a controller: receive them and schedule by topology."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    if hasattr(config, "workerinput"):
        config.stash[SENDER_KEY] = Sender(recorder)
        return
    dist = config.getoption("dist", "no")
    if dist == "each":
        raise pytest.UsageError(
            "--dist=each runs every test on every worker, so the conformance report would count each test once per "
            "worker; allowed with the conformance suite: --dist=load (the default of -n: each topology's tests on "
            "one worker), loadscope, loadfile, loadgroup, worksteal"
        )
    if dist in SPLITTING:
        config.issue_config_time_warning(
            pytest.PytestConfigWarning(
                f"--dist={dist} may split one topology's conformance tests between workers: each worker then starts "
                "its own worlds, and a hang or crash skips the topology's later tests only on its own worker; "
                "--dist=load (the default of -n) keeps each topology on one worker"
            ),
            stacklevel=2,
        )
    config.pluginmanager.register(Controller(recorder), "mnnvl-conformance-xdist")


def attach(item: pytest.Item, report: pytest.TestReport) -> None:
    """On a worker: put this report's :class:`Delta` on it (``report.mnnvl_record``)."""
    sender = item.config.stash.get(SENDER_KEY, None)
    if sender is not None:
        setattr(report, ATTRIBUTE, sender.delta(item.nodeid).to_wire())


def topology_scope(nodeid: str) -> str:
    """The work unit of a test under :class:`TopologyScheduling`: its topology, or the test by itself."""
    name = nodeid.rpartition("::")[2]
    start = name.find("[")
    if start != -1 and name.endswith("]"):
        found = _TOPOLOGY_ID.search(name[start + 1 : -1])
        if found:
            return f"mnnvl topology {found.group(1)}"
    return nodeid


class Controller:
    """The controller's hooks: add each worker's deltas to the Recorder; a crashed worker's test is an
    infrastructure failure; ``--dist=load`` becomes :class:`TopologyScheduling`."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        wire = getattr(report, ATTRIBUTE, None)
        if wire:
            Delta.from_wire(wire).apply(self.recorder)

    @pytest.hookimpl(optionalhook=True)
    def pytest_handlecrashitem(self, crashitem: str, report: pytest.TestReport, sched: Any) -> None:
        from pytest_mnnvl.conformance.catalog import INVARIANTS
        from pytest_mnnvl.conformance.recorder import Failure

        entry = self.recorder.tests.get(crashitem)
        invariant = entry.get("invariant") if entry else _invariant_of(crashitem, INVARIANTS)
        if not invariant:
            return
        failure = Failure(
            FailureKind.INFRASTRUCTURE,
            f"{report.longrepr} (the pytest-xdist worker process died: its output says why)",
        )
        entry = self.recorder.test(crashitem)
        entry.update(invariant=invariant, outcome="failed", failure_kind=failure.kind.value, failure=failure.to_dict())
        self.recorder.failures[crashitem] = failure

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        if config.getoption("dist", "no") != "load":
            return None
        return make_topology_scheduling(config, log)


def _invariant_of(nodeid: str, invariants: tuple[str, ...]) -> str | None:
    """The suite names each test ``test_<invariant>``: the invariant of a test that never reported."""
    name = nodeid.rpartition("::")[2].partition("[")[0]
    invariant = name[len("test_") :] if name.startswith("test_") else ""
    return invariant if invariant in invariants else None


def make_topology_scheduling(config: pytest.Config, log: Any) -> Any:
    """xdist's load-scope scheduler with :func:`topology_scope` as the scope (imported here: xdist is
    loaded only by sessions that use it)."""
    from xdist.scheduler import LoadScopeScheduling

    class TopologyScheduling(LoadScopeScheduling):
        """Also: the test a worker died in is not run again (load-scope puts it back with the rest of its
        unit, so a test that kills its worker would kill every replacement until xdist's restart limit)."""

        holding = False

        def _split_scope(self, nodeid: str) -> str:
            return topology_scope(nodeid)

        def _reschedule(self, node: Any) -> None:
            if not self.holding:
                super()._reschedule(node)

        def remove_node(self, node: Any) -> str | None:
            self.holding = True
            try:
                crashitem: str | None = super().remove_node(node)
            finally:
                self.holding = False
            if crashitem is not None:
                for scope, unit in list(self.workqueue.items()):
                    if crashitem in unit:
                        unit[crashitem] = True
                    if all(unit.values()):
                        del self.workqueue[scope]
            for other in list(self.assigned_work):
                self._reschedule(other)
            return crashitem

    return TopologyScheduling(config, log)
