"""CUDA MPS for the flashinfer ranks (``--mnnvl-mps``): detection, ``off``, and a private daemon's whole life,
including a session that is SIGKILLed.

NVIDIA's ``nvidia-cuda-mps-control`` only exists on GPU machines. On this CPU machine these tests run the
lifecycle against a STAND-IN for it, a small script written by the test (:func:`stand_in`) that does, on the
commands the harness uses, what the real program was seen doing on an H200 (CUDA 13.0's control program): ``-f``
runs a foreground daemon that listens on the Unix socket ``$CUDA_MPS_PIPE_DIRECTORY/control`` and writes its pid
file; without arguments it is a client that sends stdin to that socket, or prints ``Cannot find MPS control
daemon process`` and exits 1 when nothing listens; ``quit`` ends the daemon, which leaves its socket file behind.
The tests marked ``requires_multi_gpu`` at the end run the real program on a GPU machine instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_mnnvl.worlds import mps
from tests.conftest import pid_alive

STAND_IN = '''#!{python}
"""STAND-IN for NVIDIA's nvidia-cuda-mps-control (which only exists on GPU machines), written by tests/test_mps.py."""
import os, socket, sys, time
pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
path = os.path.join(pipe, "control")
if sys.argv[1:] == ["-f"]:
    if os.environ.get("MNNVL_TEST_MPS_FAIL"):
        print("An instance of this daemon is already running", flush=True)
        sys.exit(1)
    record = os.environ.get("MNNVL_TEST_MPS_RECORD")
    if record:
        with open(record, "a") as f:
            f.write(f"{{os.getpid()}} {{os.getppid()}} {{pipe}}\\n")
    time.sleep(float(os.environ.get("MNNVL_TEST_MPS_SLOW_START", "0")))
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(8)
    with open(os.path.join(pipe, "nvidia-cuda-mps-control.pid"), "w") as f:
        f.write(str(os.getpid()))
    print(f"Starting control daemon using socket {{path}}", flush=True)
    while True:
        conn, _ = server.accept()
        command = conn.recv(4096).decode().strip()
        print(f"Cmd:{{command}}", flush=True)
        if command == "quit":
            conn.close()
            sys.exit(0)
        conn.sendall(b"\\n")
        conn.close()
client = socket.socket(socket.AF_UNIX)
try:
    client.connect(path)
except OSError:
    print("Cannot find MPS control daemon process")
    sys.exit(1)
client.sendall(sys.stdin.read().encode())
client.shutdown(socket.SHUT_WR)
sys.stdout.write(client.recv(4096).decode())
'''


@pytest.fixture
def stand_in(tmp_path: Path) -> Path:
    """A directory holding the stand-in ``nvidia-cuda-mps-control`` (see the module docstring)."""
    directory = tmp_path / "bin"
    directory.mkdir()
    program = directory / mps.CONTROL
    program.write_text(STAND_IN.format(python=sys.executable))
    program.chmod(0o755)
    return directory


def _control(stand_in: Path) -> str:
    return str(stand_in / mps.CONTROL)


def _records(path: Path) -> list[tuple[int, int, str]]:
    """(daemon pid, its parent's pid, pipe directory) per daemon the stand-in started."""
    if not path.exists():
        return []
    return [(int(a), int(b), c) for a, b, c in (line.split(" ", 2) for line in path.read_text().splitlines())]


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_private_daemon_starts_answers_and_is_stopped(stand_in: Path, tmp_path: Path) -> None:
    session = mps.open_session("start", True, {}, _control(stand_in), str(tmp_path))
    state, daemon = session.state, session.daemon
    assert daemon is not None and state.on is True and state.started_pid == daemon.pid
    env = dict(state.env)
    assert env == {mps.PIPE_ENV: daemon.pipe_dir, mps.LOG_ENV: daemon.log_dir}
    # Under the session's temporary directory, unless that is too deep for the daemon's sockets (then the
    # system's: a clone under /tmp gives pytester paths that are).
    probe = Path(mps.make_root(str(tmp_path), prefix="probe-"))
    shutil.rmtree(probe)
    assert Path(daemon.root).parent == probe.parent
    assert pid_alive(daemon.pid)
    assert mps.daemon_answers(_control(stand_in), daemon.pipe_dir).value is True
    assert mps.detect(env, _control(stand_in)).value is True
    assert "Starting control daemon" in (Path(daemon.log_dir) / "control.log").read_text()
    session.close()
    assert daemon.stopped == "the session asked: quit"
    assert not pid_alive(daemon.pid)
    assert not Path(daemon.root).exists()
    session.close()  # idempotent


def test_a_start_that_fails_names_the_command_and_its_output(
    stand_in: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MNNVL_TEST_MPS_FAIL", "1")
    with pytest.raises(mps.MpsStartError) as caught:
        mps.open_session("start", True, {}, _control(stand_in), str(tmp_path))
    text = str(caught.value)
    assert text.startswith("--mnnvl-mps=start: `CUDA_MPS_PIPE_DIRECTORY=")
    assert f"{_control(stand_in)} -f` did not start: the daemon exited with status 1" in text
    assert text.endswith("its output: An instance of this daemon is already running")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]  # nothing left behind


def test_start_without_the_control_program_is_a_clear_error() -> None:
    with pytest.raises(mps.MpsStartError, match=r"nvidia-cuda-mps-control is not on PATH .*--mnnvl-mps=auto"):
        mps.open_session("start", True, {}, None, None)


def _foreign_daemon(stand_in: Path, pipe_dir: Path) -> subprocess.Popen[bytes]:
    """A daemon this session did not start (say, the machine's own)."""
    pipe_dir.mkdir()
    env = dict(os.environ, **{mps.PIPE_ENV: str(pipe_dir)})
    daemon = subprocess.Popen([_control(stand_in), "-f"], env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not (pipe_dir / "control").exists():
        assert time.monotonic() < deadline and daemon.poll() is None
        time.sleep(0.02)
    return daemon


def test_a_daemon_this_session_did_not_start_is_used_or_refused_never_touched(stand_in: Path, tmp_path: Path) -> None:
    pipe_dir = tmp_path / "theirs"
    daemon = _foreign_daemon(stand_in, pipe_dir)
    environ = {mps.PIPE_ENV: str(pipe_dir)}
    try:
        auto = mps.open_session("auto", True, environ, _control(stand_in), str(tmp_path))
        assert (auto.state.on, auto.state.env) == (True, ())  # the ranks inherit the environment: they use it
        assert "not started by this session" in auto.state.reason
        auto.close()
        with pytest.raises(mps.MpsStartError, match=r"a control daemon answers at .*theirs, not started by this"):
            mps.open_session("start", True, environ, _control(stand_in), str(tmp_path))
        off = mps.open_session("off", True, environ, _control(stand_in), str(tmp_path))
        assert "is left alone" in off.state.reason
        off.close()
        assert daemon.poll() is None and (pipe_dir / "control").exists()  # still there, still answering
        assert mps.daemon_answers(_control(stand_in), str(pipe_dir)).value is True
    finally:
        daemon.kill()
        daemon.wait()


def test_off_points_the_ranks_at_an_empty_directory(stand_in: Path, tmp_path: Path) -> None:
    session = mps.open_session("off", True, {}, _control(stand_in), str(tmp_path))
    (name, empty), *rest = session.state.env
    assert (name, rest, session.state.on) == (mps.PIPE_ENV, [], False)
    assert Path(empty).is_dir() and not list(Path(empty).iterdir())
    assert mps.detect({mps.PIPE_ENV: empty}, _control(stand_in)).value is False
    session.close()
    assert not Path(empty).exists()


def test_a_stale_control_socket_is_no_daemon(stand_in: Path, tmp_path: Path) -> None:
    pipe_dir = tmp_path / "stale"
    daemon = _foreign_daemon(stand_in, pipe_dir)
    daemon.send_signal(signal.SIGKILL)
    daemon.wait()
    assert (pipe_dir / "control").exists()
    probe = mps.detect({mps.PIPE_ENV: str(pipe_dir)}, _control(stand_in))
    assert probe.value is False and "Cannot find MPS control daemon process" in probe.reason
    absent = mps.detect({mps.PIPE_ENV: str(tmp_path / "nowhere")}, _control(stand_in))
    assert absent.value is False and "control is absent" in absent.reason
    unknown = mps.detect({mps.PIPE_ENV: str(pipe_dir)}, None)
    assert unknown.value is None and "not on PATH" in unknown.reason


def test_a_deep_temporary_directory_falls_back_to_a_short_one(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    root = mps.make_root(str(deep))
    try:
        assert not root.startswith(str(deep)) and len(os.path.join(root, "pipe/control_privileged")) <= 107
        assert list(deep.iterdir()) == []
    finally:
        os.rmdir(root)


def test_ranks_sharing_a_gpu_under_mps_get_their_share_of_the_sms() -> None:
    """FlashInfer's combine blocks spin on their peers' flags: under MPS, ranks whose kernels fill the GPU starve
    the peers they wait for (a 4-rank world hung on an H200). Each rank gets 1/k of the SMs, as the user left it."""
    on = mps.MpsState("start", True, "private", ((mps.PIPE_ENV, "/p"), (mps.LOG_ENV, "/l")), 1)
    assert dict(on.rank_env(4, {})) == {mps.PIPE_ENV: "/p", mps.LOG_ENV: "/l", mps.ACTIVE_THREAD_ENV: "25"}
    assert dict(on.rank_env(3, {}))[mps.ACTIVE_THREAD_ENV] == "33"
    assert mps.ACTIVE_THREAD_ENV not in dict(on.rank_env(1, {}))  # a GPU per rank: nothing to share
    assert mps.ACTIVE_THREAD_ENV not in dict(on.rank_env(4, {mps.ACTIVE_THREAD_ENV: "50"}))  # the user's choice
    unknown = mps.MpsState("auto", None, "cannot tell")
    assert dict(unknown.rank_env(2, {})) == {mps.ACTIVE_THREAD_ENV: "50"}  # harmless without MPS
    off = mps.MpsState("off", False, "empty", ((mps.PIPE_ENV, "/empty"),))
    assert dict(off.rank_env(4, {})) == {mps.PIPE_ENV: "/empty"}


def test_the_states_travel_to_xdist_workers_whole() -> None:
    state = mps.MpsState("start", True, "private", (("A", "1"), ("B", "2")), 42)
    assert mps.MpsState.from_dict(state.to_dict()) == state


# ---- the plugin ------------------------------------------------------------------------------------

SLEEPER = """
import time

def test_sleeps():
    time.sleep(120)
"""


#: A pytest session that starts a private daemon (``--basetemp`` added by each test).
SESSION = [sys.executable, "-m", "pytest", "-p", "pytest_mnnvl", "-p", "no:cacheprovider", "-q"]
SESSION += ["--mnnvl-backend=flashinfer", "--mnnvl-mps=start"]


def _session_env(stand_in: Path, record: Path) -> dict[str, str]:
    return {"PATH": f"{stand_in}{os.pathsep}{os.environ['PATH']}", "MNNVL_TEST_MPS_RECORD": str(record)}


def test_a_session_starts_its_daemon_and_stops_it_at_its_end(
    pytester: pytest.Pytester, stand_in: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "daemons.txt"
    for name, value in _session_env(stand_in, record).items():
        monkeypatch.setenv(name, value)
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "pytest_mnnvl", "--mnnvl-backend=flashinfer", "--mnnvl-mps=start")
    assert result.ret == pytest.ExitCode.OK
    (pid, keeper, pipe_dir), *more = _records(record)
    assert more == []
    result.stdout.fnmatch_lines(
        ["mnnvl: GPU worlds (*--mnnvl-mps=start): *MPS on", f"mnnvl: MPS: private daemon (pid {pid}) at *"]
    )
    assert not pid_alive(pid) and not pid_alive(keeper)
    assert not Path(pipe_dir).parent.exists()


def test_a_sigkilled_session_leaves_no_daemon_and_no_directory(
    pytester: pytest.Pytester, stand_in: Path, tmp_path: Path
) -> None:
    """The daemon's keeper sees the session's end of its stdin close, whatever killed it, and cleans up."""
    record = tmp_path / "daemons.txt"
    pytester.makepyfile(SLEEPER)
    env = dict(os.environ, **_session_env(stand_in, record))
    session = subprocess.Popen(
        [*SESSION, f"--basetemp={tmp_path / 'base'}"],
        cwd=pytester.path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not _records(record):
            assert time.monotonic() < deadline and session.poll() is None, "the session never started its daemon"
            time.sleep(0.05)
        ((pid, keeper, pipe_dir),) = _records(record)
        assert pid_alive(pid) and Path(pipe_dir).is_dir()
        session.send_signal(signal.SIGKILL)
        session.wait()
        assert _gone_within(pid, 20) and _gone_within(keeper, 20)
        assert not Path(pipe_dir).parent.exists()
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()


def test_xdist_workers_use_the_controllers_daemon(
    pytester: pytest.Pytester, stand_in: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The controller starts the one daemon before its workers; they use it and neither start nor stop one."""
    pytest.importorskip("xdist")
    record = tmp_path / "daemons.txt"
    pytester.makepyfile(
        """
        import json, os
        from pytest_mnnvl.session import mps_session

        def _state(request):
            state = json.dumps(mps_session(request.config).state.to_dict())
            print("STATE", os.environ["PYTEST_XDIST_WORKER"], state)

        def test_a(request): _state(request)
        def test_b(request): _state(request)
        """
    )
    for name, value in _session_env(stand_in, record).items():
        monkeypatch.setenv(name, value)
    result = pytester.runpytest_subprocess(
        "-p", "pytest_mnnvl", "--mnnvl-backend=flashinfer", "--mnnvl-mps=start", "-n", "2", "-p", "no:randomly", "-rP"
    )
    result.assert_outcomes(passed=2)
    ((pid, _keeper, pipe_dir),) = _records(record)  # one daemon, the controller's
    states = [line for line in result.stdout.lines if line.startswith("STATE gw")]
    assert len(states) == 2 and all(f'"started_pid": {pid}' in line and pipe_dir in line for line in states)
    assert not pid_alive(pid) and not Path(pipe_dir).parent.exists()


# ---- the real control program, on a GPU machine ------------------------------------------------------

CUDA_CLIENT = "import torch; x = torch.ones(4, device='cuda'); assert x.sum().item() == 4.0; print('client ok')"


def _real_control() -> str:
    control = mps.find_control()
    if control is None:
        pytest.skip(f"{mps.CONTROL} is not on PATH (it comes with the NVIDIA driver)")
    return control


@pytest.mark.requires_multi_gpu(n=1)
def test_gpu_a_real_private_daemon_serves_a_cuda_client_and_is_stopped(tmp_path: Path) -> None:
    control = _real_control()
    session = mps.open_session("start", True, os.environ, control, str(tmp_path))
    daemon = session.daemon
    assert daemon is not None
    try:
        client = subprocess.run(
            [sys.executable, "-c", CUDA_CLIENT],
            env=dict(os.environ, **dict(session.state.env)),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert client.returncode == 0, client.stderr
        log = (Path(daemon.log_dir) / "control.log").read_text()
        assert "NEW CLIENT" in log or "Starting new server" in log, log[-2000:]
    finally:
        session.close()
    assert not pid_alive(daemon.pid) and not Path(daemon.root).exists()


@pytest.mark.requires_multi_gpu(n=1)
def test_gpu_a_sigkilled_session_leaves_no_real_daemon(pytester: pytest.Pytester, tmp_path: Path) -> None:
    _real_control()
    pytester.makepyfile(
        """
        import time
        from pytest_mnnvl.session import mps_session

        def test_sleeps(request):
            state = mps_session(request.config).state
            with open(request.config.rootpath / "state.txt", "w") as f:
                f.write(f"{state.started_pid} {dict(state.env)['CUDA_MPS_PIPE_DIRECTORY']}")
            time.sleep(120)
        """
    )
    session = subprocess.Popen(
        [*SESSION, f"--basetemp={tmp_path / 'base'}"],
        cwd=pytester.path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = pytester.path / "state.txt"
    try:
        deadline = time.monotonic() + 120
        while not state.exists() or not state.read_text().strip():
            assert time.monotonic() < deadline and session.poll() is None, "the session never started its daemon"
            time.sleep(0.1)
        pid_text, pipe_dir = state.read_text().split(" ", 1)
        assert pid_alive(int(pid_text))
        session.send_signal(signal.SIGKILL)
        session.wait()
        assert _gone_within(int(pid_text), 30)
        assert not Path(pipe_dir).parent.exists()
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()


def test_stand_in_speaks_the_control_protocol(stand_in: Path, tmp_path: Path) -> None:
    """The stand-in itself: what the lifecycle tests rely on it doing (see the module docstring)."""
    pipe_dir = tmp_path / "pipe"
    daemon = _foreign_daemon(stand_in, pipe_dir)
    env = dict(os.environ, **{mps.PIPE_ENV: str(pipe_dir)})
    listed = subprocess.run([_control(stand_in)], input=b"get_server_list\n", env=env, capture_output=True, timeout=10)
    assert listed.returncode == 0
    subprocess.run([_control(stand_in)], input=b"quit\n", env=env, check=True, timeout=10)
    assert daemon.wait(timeout=10) == 0
    assert (pipe_dir / "control").exists()  # left behind, as the real daemon leaves its sockets
    with socket.socket(socket.AF_UNIX) as probe, pytest.raises(OSError):
        probe.connect(str(pipe_dir / "control"))
    shutil.rmtree(pipe_dir)


def test_a_keeper_that_gets_sigterm_still_quits_its_daemon_and_cleans_up(stand_in: Path, tmp_path: Path) -> None:
    session = mps.open_session("start", True, {}, _control(stand_in), str(tmp_path))
    daemon = session.daemon
    assert daemon is not None and daemon._keeper is not None
    keeper = daemon._keeper.pid
    os.kill(keeper, signal.SIGTERM)
    assert _gone_within(daemon.pid, 20)
    assert daemon.stop() == "the keeper got SIGTERM: quit"
    assert not pid_alive(keeper) and not Path(daemon.root).exists()


def test_a_keeper_that_gets_sigterm_while_its_daemon_starts_ends_it_and_cleans_up(
    stand_in: Path, tmp_path: Path
) -> None:
    """SIGTERM before the daemon's socket exists: no ``quit`` can reach it, so it is ended by signal at once."""
    record, root = tmp_path / "record", tmp_path / "root"
    env = dict(os.environ, MNNVL_TEST_MPS_RECORD=str(record), MNNVL_TEST_MPS_SLOW_START="60")
    keeper = subprocess.Popen(
        [sys.executable, "-I", "-S", mps._mps_keeper.__file__, _control(stand_in), str(root), "120"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while not _records(record):
        assert time.monotonic() < deadline and keeper.poll() is None
        time.sleep(0.02)
    ((daemon_pid, _parent, _pipe),) = _records(record)
    keeper.send_signal(signal.SIGTERM)
    out, _ = keeper.communicate(timeout=20)
    assert keeper.returncode == 0
    said = out.decode().strip()
    assert said == "stopped the keeper got SIGTERM while the daemon started: no socket yet, then SIGTERM"
    assert _gone_within(daemon_pid, 5) and not root.exists()
