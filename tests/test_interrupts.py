"""Interrupts and report truth, run for real: SIGTERM (``timeout``, CI cancellation, ``docker stop``), Ctrl-C
twice, SIGKILL, on real ``pytest -p pytest_mnnvl`` sessions and ``python -m pytest_mnnvl repro``.

Every session gets a private TMPDIR, so "no ``mnnvl-world-*`` directory left" and "no rank left" are checked
on that session alone. The rank function writes a marker file once every rank is inside the call, and the
signal is sent then (the moment an interrupt costs the most: a warm world busy in a call).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_mnnvl.worlds import pool

ROOT = Path(__file__).resolve().parent.parent
DEEPSEEK = ROOT / "examples" / "plans" / "deepseek-v3-r1-nvfp4-mtp.json"

BUSY_TESTS = """
import os, time
import pytest

def busy(ctx, marker_dir):
    with open(os.path.join(marker_dir, f"rank-{ctx.rank}"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)

def noop(ctx):
    return ctx.rank

@pytest.mark.conformance("covers")
def test_finishes():
    pass

@pytest.mark.conformance("cleanup")
def test_busy(mnnvl_world):
    mnnvl_world(2, backend="plain").run(busy, os.environ["MARKER_DIR"])

def test_world_and_out(mnnvl_world):
    assert mnnvl_world(2, backend="plain").run(noop) == [0, 1]
"""


@dataclass
class Session:
    """A real pytest (or CLI) process with its output in files (no pipe to fill) and its own TMPDIR."""

    process: subprocess.Popen[bytes]
    tmpdir: Path
    markers: Path
    out: Path
    err: Path

    def wait_busy(self, ranks: int = 2, timeout: float = 90.0) -> None:
        """Until every rank is inside ``busy`` (the process must still be running)."""
        deadline = time.monotonic() + timeout
        while len(list(self.markers.glob("rank-*"))) < ranks:
            assert self.process.poll() is None, f"ended early ({self.process.returncode}):\n{self.output()}"
            assert time.monotonic() < deadline, f"no rank became busy in {timeout} s:\n{self.output()}"
            time.sleep(0.05)

    def wait_for(self, text: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.out.read_text(errors="replace"):
            assert self.process.poll() is None, f"ended early ({self.process.returncode}):\n{self.output()}"
            assert time.monotonic() < deadline, f"{text!r} not printed in {timeout} s:\n{self.output()}"
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"still running {timeout} s later:\n{self.output()}") from None

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def output(self) -> str:
        return f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"

    def world_dirs(self) -> list[Path]:
        return sorted(self.tmpdir.glob("mnnvl-world-*"))


def live_ranks(tmpdir: Path) -> list[int]:
    """PIDs of rank processes still alive whose world lived under ``tmpdir`` (their boot names its socket)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        boot = next((v for v in environ if v.startswith(b"PYTEST_MNNVL_RANK_BOOT=")), b"")
        if str(tmpdir).encode() in boot and state != "Z":
            found.append(int(entry))
    return found


def assert_nothing_left(tmpdir: Path) -> None:
    deadline = time.monotonic() + 3.0  # ranks die with their parent (PR_SET_PDEATHSIG), within a moment
    while live_ranks(tmpdir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_ranks(tmpdir) == []
    assert sorted(p.name for p in tmpdir.glob("mnnvl-world-*")) == []


@pytest.fixture
def project(pytester: pytest.Pytester) -> Path:
    pytester.makeconftest('pytest_plugins = ["pytest_mnnvl.conformance.plugin"]\n')
    pytester.makepyfile(test_busy=BUSY_TESTS)
    return pytester.path


#: Every process :func:`start` started in the current test: one a failing test left running is killed after it.
_STARTED: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _kill_leftovers() -> Iterator[None]:
    yield
    while _STARTED:
        process = _STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A private TMPDIR with a short path: a world's control socket path must fit AF_UNIX's 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="irq-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start(project: Path, tmp: Path, *args: str, name: str = "s", cli: bool = False, shared: bool = False) -> Session:
    base = project / f"run-{name}"
    base.mkdir()
    private = tmp if shared else tmp / name
    private.mkdir(exist_ok=True)
    markers = base / "markers"
    markers.mkdir()
    env = dict(
        os.environ,
        TMPDIR=str(private),
        MARKER_DIR=str(markers),
        GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
        PYTHONUNBUFFERED="1",
        PYTHONWARNINGS="ignore",
    )
    env.pop("PYTEST_ADDOPTS", None)
    command = [sys.executable, "-m", "pytest_mnnvl"] if cli else [sys.executable, "-m", "pytest", "-p", "pytest_mnnvl"]
    if not cli:
        command += ["-p", "no:cacheprovider", "-s", "-v"]
    out, err = base / "stdout.txt", base / "stderr.txt"
    with out.open("wb") as fo, err.open("wb") as fe:
        process = subprocess.Popen(
            [*command, *args], cwd=project, env=env, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe
        )
    _STARTED.append(process)
    return Session(process, private, markers, out, err)


def read_report(path: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads(path.read_text())
    return data


# ---- SIGTERM and Ctrl-C twice -----------------------------------------------------------------------


def test_sigterm_ends_the_session_as_ctrl_c_does(project: Path, short_tmp: Path) -> None:
    """Both summaries, a report that says it was interrupted (by SIGTERM, exit status 2 = the process's),
    the ranks stopped and the world's directory removed."""
    report = project / "out" / "r.json"
    session = start(
        project, short_tmp, "test_busy.py::test_finishes", "test_busy.py::test_busy", f"--mnnvl-report={report}"
    )
    session.wait_busy()
    assert len(session.world_dirs()) == 1
    session.signal(signal.SIGTERM)
    t0 = time.monotonic()
    rc = session.wait()
    took = time.monotonic() - t0
    out = session.stdout
    assert rc == pytest.ExitCode.INTERRUPTED, session.output()
    assert re.search(r"!+ KeyboardInterrupt: SIGTERM", out), out
    assert re.search(r"=+ 1 passed in [\d.]+s", out), out  # pytest's summary: test_finishes ran
    assert "mnnvl conformance" in out and "interrupted by SIGTERM" in out, out  # the conformance summary
    data = read_report(report)
    assert data["interrupted"] is True
    assert data["interruption"] == {"signals": ["SIGTERM"], "reason": "KeyboardInterrupt: SIGTERM"}
    assert data["exit_status"] == rc
    invariants = data["invariants"]
    assert isinstance(invariants, dict) and invariants["covers"]["status"] == "pass"
    assert "interrupted" in report.with_suffix(".md").read_text()
    assert_nothing_left(session.tmpdir)
    print(f"ended {took:.2f} s after SIGTERM")
    assert took < 10, took


@pytest.mark.parametrize("gap_s", [0.05, 0.5])
def test_ctrl_c_twice_never_reports_success(project: Path, short_tmp: Path, gap_s: float) -> None:
    """The second Ctrl-C (0.05 s or 0.5 s after the first) does not cut the session's end short: the report
    says interrupted with the process's non-zero status, nothing is left behind."""
    report = project / "r.json"
    session = start(
        project, short_tmp, "test_busy.py::test_finishes", "test_busy.py::test_busy", f"--mnnvl-report={report}"
    )
    session.wait_busy()
    session.signal(signal.SIGINT)
    time.sleep(gap_s)
    session.signal(signal.SIGINT)
    t0 = time.monotonic()
    rc = session.wait()
    took = time.monotonic() - t0
    out = session.stdout
    assert rc == pytest.ExitCode.INTERRUPTED, session.output()
    assert re.search(r"=+ 1 passed in [\d.]+s", out), out
    assert "interrupted by SIGINT" in out, out
    assert "mnnvl: SIGINT: stopping the ranks without waiting" in session.stderr
    data = read_report(report)
    assert data["interrupted"] is True and data["exit_status"] == rc
    # The signals received before the report was written: one or both, depending on when it was.
    interruption = data["interruption"]
    assert isinstance(interruption, dict) and interruption["reason"] == "KeyboardInterrupt: SIGINT"
    assert interruption["signals"] in (["SIGINT"], ["SIGINT", "SIGINT"])
    assert not [p.name for p in project.iterdir() if p.name.endswith(".tmp")]  # no half-written report aside
    assert_nothing_left(session.tmpdir)
    print(f"ended {took:.2f} s after the second SIGINT; report signals {interruption['signals']}")
    assert took < 5, took  # the second signal skipped the ranks' grace periods


def test_a_finished_session_reports_no_interruption(project: Path, short_tmp: Path) -> None:
    report = project / "r.json"
    session = start(
        project,
        short_tmp,
        "test_busy.py::test_finishes",
        "test_busy.py::test_world_and_out",
        f"--mnnvl-report={report}",
    )
    rc = session.wait(90)
    assert rc == 0, session.output()
    data = read_report(report)
    assert data["interrupted"] is False and data["interruption"] is None and data["exit_status"] == 0
    assert "interrupted" not in session.stdout
    assert_nothing_left(session.tmpdir)


def test_repro_cli_stops_its_world_on_sigterm(project: Path, short_tmp: Path) -> None:
    session = start(project, short_tmp, "repro", str(DEEPSEEK), "--ep", "2", cli=True)
    session.wait_for("stage 0 layer")  # the world is up and running steps
    session.signal(signal.SIGTERM)
    rc = session.wait()
    assert rc == 128 + signal.SIGTERM, session.output()
    assert "python -m pytest_mnnvl: interrupted by SIGTERM" in session.stderr
    assert "Traceback" not in session.stderr
    assert_nothing_left(session.tmpdir)


# ---- SIGKILL: a dead owner's world directory is reaped, a live one's never ------------------------------


def test_sigkilled_sessions_world_dir_is_reaped_by_the_next_world_not_a_live_ones(
    project: Path, short_tmp: Path
) -> None:
    shared = short_tmp
    killed = start(project, short_tmp, "test_busy.py::test_busy", name="killed", shared=True)
    killed.wait_busy()
    (dead_dir,) = killed.world_dirs()
    killed.process.kill()
    assert killed.wait() == -signal.SIGKILL
    deadline = time.monotonic() + 3
    while live_ranks(shared) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_ranks(shared) == []  # the ranks died with their parent
    assert dead_dir.is_dir()  # nothing could clean up after a SIGKILL

    alive = start(project, short_tmp, "test_busy.py::test_busy", name="alive", shared=True)
    alive.wait_busy()
    live_dir = next(p for p in alive.world_dirs() if p != dead_dir)

    later = start(project, short_tmp, "test_busy.py::test_world_and_out", name="later", shared=True)
    assert later.wait(90) == 0, later.output()
    assert not dead_dir.exists()  # its owner is dead: reaped when the later session started its world
    assert live_dir.is_dir() and alive.process.poll() is None  # a live owner's is never touched

    alive.signal(signal.SIGTERM)
    assert alive.wait() == pytest.ExitCode.INTERRUPTED, alive.output()
    assert_nothing_left(shared)


def test_reap_keeps_what_it_cannot_prove_dead(tmp_path: Path) -> None:
    """The reaper removes a directory only when its owner record names a process that is gone."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        dead = Path(tempfile.mkdtemp(prefix="mnnvl-world-", dir=tmp_path))
        pool.WorldOwner.of(gone.pid).write(str(dead))
        live = Path(tempfile.mkdtemp(prefix="mnnvl-world-", dir=tmp_path))
        pool.WorldOwner.of(sleeper.pid).write(str(live))
        anonymous = Path(tempfile.mkdtemp(prefix="mnnvl-world-", dir=tmp_path))  # no owner record (yet)
        other = tmp_path / "not-a-world"
        other.mkdir()
        assert pool.reap_dead_worlds(str(tmp_path)) == [str(dead)]
        assert not dead.exists() and live.is_dir() and anonymous.is_dir() and other.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert pool.reap_dead_worlds(str(tmp_path)) == [str(live)]


# ---- the report path: checked before the run, one session at a time ------------------------------------


@pytest.mark.parametrize("case", ["a directory", "under a file", "unwritable directory"])
def test_unwritable_report_path_is_a_usage_error_before_any_test(pytester: pytest.Pytester, case: str) -> None:
    ran = pytester.path / "ran.txt"
    pytester.makeconftest('pytest_plugins = ["pytest_mnnvl.conformance.plugin"]\n')  # a session that writes it
    pytester.makepyfile(f"def test_x():\n    open({str(ran)!r}, 'w').close()\n")
    (pytester.path / "a-file").write_text("")
    path, why = {
        "a directory": (str(pytester.path), "is a directory"),
        "under a file": (str(pytester.path / "a-file" / "r.json"), "is not a directory"),
        # sysfs: no one, root included, may create a file there (mode bits would not stop root); the reason is
        # "Permission denied", or "Read-only file system" in a container
        "unwritable directory": ("/sys/mnnvl-report.json", "cannot create a file in /sys: "),
    }[case]
    result = pytester.runpytest_subprocess("-p", "pytest_mnnvl", f"--mnnvl-report={path}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: --mnnvl-report={path!r}: *{why}*"])
    assert not ran.exists()


def test_two_sessions_on_one_report_path_warn(project: Path, short_tmp: Path) -> None:
    report = project / "r.json"
    first = start(project, short_tmp, "test_busy.py::test_busy", f"--mnnvl-report={report}", name="first")
    first.wait_busy()
    second = start(project, short_tmp, "test_busy.py::test_finishes", f"--mnnvl-report={report}", name="second")
    assert second.wait(60) == 0, second.output()
    expected = f"--mnnvl-report={str(report)!r} is in use by another session (pid {first.process.pid}"
    assert expected in second.stdout, second.output()
    first.signal(signal.SIGTERM)
    assert first.wait() == pytest.ExitCode.INTERRUPTED
    # The last to finish wrote the report (atomically): the first, interrupted one.
    assert read_report(report)["interrupted"] is True
    assert not Path(f"{report}.lock").exists()
