"""Hostile input: each case once crashed (a traceback, the wrong exit status) or was silently accepted.

CLI input errors exit 2 with one line naming the value and what is allowed; the plugin's usage errors exit 4
(pytest's USAGE_ERROR). Every command runs as users run it, in a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pytest_mnnvl.model.layers import MAX_PLAN_LAYERS

ROOT = Path(__file__).resolve().parent.parent
MEASURED_PLAN = ROOT / "examples" / "plans" / "facts-nvfp4-then-bf16.json"
SUITE = ROOT / "conformance" / "test_invariants.py"
LAYER = {"quant": "bf16", "hidden_size": 1024, "top_k": 2, "num_experts": 8, "max_num_tokens": 8}


def cli(
    cwd: Path, *args: str | os.PathLike[str], timeout: float = 60, python: str = ""
) -> subprocess.CompletedProcess[str]:
    """``python -m pytest_mnnvl ARGS`` from ``cwd`` (not the checkout: the package is the installed one)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    command = [sys.executable, *(["-c", python] if python else ["-m", "pytest_mnnvl"]), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def assert_input_error(done: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(lines[0]) < 600, lines[0][:1000]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def write(path: Path, content: Any) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


# ---- CLI: plans that crashed the reader --------------------------------------------------------------


@pytest.mark.parametrize("command", ["explain", "predict", "repro"])
def test_deeply_nested_json_is_an_input_error(tmp_path: Path, command: str) -> None:
    plan = write(tmp_path / "deep.json", "[" * 200_000)
    assert_input_error(cli(tmp_path, command, plan), "deep.json", "nested deeper than")


def test_a_deep_value_inside_a_plan_is_named_in_one_short_line(tmp_path: Path) -> None:
    nested = "[" * 900 + "]" * 900
    plan = write(tmp_path / "deep.json", '{"stages": [[{"quant": "bf16", "hidden_size": ' + nested + "}]]}")
    assert_input_error(cli(tmp_path, "explain", plan), "stages[0][0].hidden_size: [[[")


def test_a_huge_repeat_is_refused_at_once_naming_the_limit(tmp_path: Path) -> None:
    plan = write(tmp_path / "plan.json", {"stages": [[{**LAYER, "repeat": 10_000_000}]]})
    t0 = time.monotonic()
    assert_input_error(
        cli(tmp_path, "explain", plan), "stages[0][0].repeat: 10000000 is not allowed", f"at most {MAX_PLAN_LAYERS}"
    )
    assert time.monotonic() - t0 < 20
    write(plan, {"stages": [[{**LAYER, "repeat": 10**30}]]})
    assert_input_error(cli(tmp_path, "predict", plan), f"repeat: {10**30} is not allowed")


def test_too_many_layers_in_all_are_refused_naming_the_limit(tmp_path: Path) -> None:
    half = MAX_PLAN_LAYERS // 2
    plan = {"stages": [[{**LAYER, "repeat": half}], [{**LAYER, "repeat": half}]], "mtp_head": [LAYER]}
    write(tmp_path / "plan.json", plan)
    assert_input_error(
        cli(tmp_path, "explain", tmp_path / "plan.json"),
        f"mtp_head[0]: {MAX_PLAN_LAYERS + 1} is not allowed",
        f"at most {MAX_PLAN_LAYERS} layers",
    )
    # Exactly at the limit is fine.
    plan["stages"][1][0]["repeat"] = half - 1
    write(tmp_path / "plan.json", plan)
    assert cli(tmp_path, "predict", tmp_path / "plan.json").returncode == 0


#: Peak RSS of one ``explain`` run, printed by the child itself (RUSAGE_CHILDREN would mix in other children).
RSS_OF_EXPLAIN = """
import resource, runpy, sys
sys.argv = ["pytest_mnnvl", "explain", sys.argv[1]]
try:
    runpy.run_module("pytest_mnnvl", run_name="__main__")
except SystemExit:
    pass
sys.stdout = sys.__stdout__
print("RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def _peak_rss_kb(tmp_path: Path, layers: int) -> int:
    entries = [{**LAYER, "hidden_size": 1024 + 16 * (i % 7), "max_num_tokens": 64 + i % 5} for i in range(layers)]
    plan = write(tmp_path / f"plan{layers}.json", {"stages": [entries]})
    done = cli(tmp_path, plan, python=RSS_OF_EXPLAIN, timeout=120)
    line = [x for x in done.stderr.splitlines() if x.startswith("RSS_KB")]
    assert line, done.stderr[-2000:]
    return int(line[0].split()[1])


def test_explain_memory_grows_linearly_with_the_layer_count(tmp_path: Path) -> None:
    """It grew with the square (10,000 layers: 520 MB, 20,000: 2 GB): every oracle step kept a tuple of
    every layer its handle had served."""
    small, large = _peak_rss_kb(tmp_path, 1_000), _peak_rss_kb(tmp_path, MAX_PLAN_LAYERS)
    assert large - small < 80_000, f"1,000 layers: {small} KB, {MAX_PLAN_LAYERS}: {large} KB"


def test_a_plan_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    from pytest_mnnvl.cli.inputs import MAX_PLAN_BYTES

    plan = write(tmp_path / "big.json", '{"name": "' + "x" * MAX_PLAN_BYTES + '", "stages": [[]]}')
    assert_input_error(cli(tmp_path, "explain", plan), "big.json", f"at most {MAX_PLAN_BYTES:,} bytes")


# ---- CLI: options --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "0.001", "1e9", "-inf"])
def test_repro_timeout_is_checked_before_any_rank_starts(tmp_path: Path, value: str) -> None:
    t0 = time.monotonic()
    line = assert_input_error(cli(tmp_path, "repro", MEASURED_PLAN, f"--timeout={value}"), "argument --timeout")
    assert "allowed: 1..86400 seconds" in line, line
    assert time.monotonic() - t0 < 20


def test_cli_integers_take_ascii_digits_only(tmp_path: Path) -> None:
    """``int('١')`` is 1: an Arabic-Indic digit was taken as ``--ep 1``."""
    assert_input_error(cli(tmp_path, "explain", MEASURED_PLAN, "--ep", "١"), "argument --ep: '١' is not an integer")


BAD_INIT = """
from pytest_mnnvl.managers.reference import ReferenceManager


class BadInit(ReferenceManager):
    def __init__(self, cpu_group):
        raise RuntimeError("no NVLink fabric here (cluster UUID missing)")
"""


def test_explain_names_the_exception_a_manager_constructor_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "bad_init.py", BAD_INIT)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    done = cli(tmp_path, "explain", MEASURED_PLAN, "--manager", "bad_init:BadInit", timeout=120)
    assert_input_error(done, "--manager 'bad_init:BadInit'", "RuntimeError: no NVLink fabric here (cluster UUID")


# ---- the plugin's options: usage errors, exit 4 ------------------------------------------------------


def run_plugin(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    pytester.makepyfile("def test_x(): pass")
    return pytester.runpytest_subprocess("-p", "pytest_mnnvl", *args)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--mnnvl-world-sizes", "²"),
        ("--mnnvl-world-sizes", "2,４"),
        ("--mnnvl-pp", "¹"),
        ("--mnnvl-warm-worlds", "²"),
        ("--mnnvl-timeout", "١٢"),
        ("--mnnvl-startup-timeout", "٣٠٠"),
    ],
)
def test_option_numbers_take_ascii_digits_only(pytester: pytest.Pytester, option: str, value: str) -> None:
    result = run_plugin(pytester, f"{option}={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stderr.str()[-2000:]
    result.stderr.fnmatch_lines([f"*{option}={value!r}*allowed*"])


@pytest.mark.parametrize("option", ["--mnnvl-timeout", "--mnnvl-startup-timeout"])
def test_timeouts_outside_the_allowed_range_are_usage_errors(pytester: pytest.Pytester, option: str) -> None:
    """1e-9 s was accepted (and the reference then failed); 1e309 is infinity."""
    for value in ("1e-9", "0.5", "1e9", "1e309"):
        result = run_plugin(pytester, f"{option}={value}")
        assert result.ret == pytest.ExitCode.USAGE_ERROR, (value, result.stderr.str()[-2000:])
        result.stderr.fnmatch_lines([f"*{option}={value!r} is not valid; allowed: 1..86400 seconds*"])
    for value in ("1", "86400"):  # the bounds themselves are allowed
        result = run_plugin(pytester, f"{option}={value}")
        assert result.ret == 0, (value, result.stderr.str()[-2000:])


EXITS_AT_IMPORT = """
import sys

sys.exit("this module refuses to be imported here")
"""


def test_a_manager_module_calling_sys_exit_at_import_is_a_usage_error(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(exits_at_import=EXITS_AT_IMPORT)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pytester.path), os.environ.get("PYTHONPATH", "")]))
    result = run_plugin(pytester, "--mnnvl-manager=exits_at_import:Manager")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stderr.str()[-2000:]
    result.stderr.fnmatch_lines(
        ["*--mnnvl-manager='exits_at_import:Manager': importing module 'exits_at_import' called sys.exit(*"]
    )


def test_a_pp_that_fits_no_world_size_is_reported(pytester: pytest.Pytester) -> None:
    """PP sizes that fit some world sizes but not others are filtered on purpose (``--mnnvl-pp=1,2`` on a
    2-GPU machine); one that fits none is named, with the world sizes it would need."""
    result = run_plugin(pytester, "--mnnvl-world-sizes=2,4", "--mnnvl-pp=1,3")
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        [
            "*PytestConfigWarning: --mnnvl-pp=1,3: 3 fits no world size of --mnnvl-world-sizes=2,4 and is not run; "
            "it needs a world size that is a multiple of 3 and at least 6*"
        ]
    )
    quiet = run_plugin(pytester, "--mnnvl-world-sizes=2,4")
    assert "fits no world size" not in quiet.stdout.str()


# ---- the conformance suite ------------------------------------------------------------------------------


@pytest.mark.skipif(not SUITE.exists(), reason="the conformance suite is not in this checkout")
@pytest.mark.parametrize("ci", [False, True], ids=["developer", "ci"])
def test_the_header_names_the_hypothesis_profile_in_effect(
    pytester: pytest.Pytester, no_ci_environment: pytest.MonkeyPatch, ci: bool
) -> None:
    """The suite loads its ``ci`` profile (derandomized); the header said ``profile=default, seed=random``. The
    same on a CI machine, where ``dev`` once inherited Hypothesis' own derandomized ``ci`` profile."""
    if ci:
        no_ci_environment.setenv("CI", "true")
    for args, line in [
        ([], "mnnvl: hypothesis profile=ci, seed=derandomized (fixed per test)"),
        (["--hypothesis-seed=7"], "mnnvl: hypothesis profile=ci-seeded, seed=7"),
        (["--hypothesis-profile=dev"], "mnnvl: hypothesis profile=dev, seed=random (printed on failure)"),
    ]:
        result = pytester.runpytest_subprocess("-p", "pytest_mnnvl", str(SUITE), "--co", "--mnnvl-backend=sim", *args)
        assert result.ret == 0, result.stdout.str()[-2000:]
        result.stdout.fnmatch_lines([line])


SLOW_INIT = '''
import os
import time

from pytest_mnnvl.managers.reference import ReferenceManager


class SlowInit(ReferenceManager):
    """The reference, whose ``initialize`` takes a minute: the controller is interrupted in the middle of it."""

    def initialize(self, *args, **kwargs):
        open(os.environ["STARTED_FILE"], "a").close()
        time.sleep(60)
        return super().initialize(*args, **kwargs)
'''


@pytest.mark.skipif(not SUITE.exists(), reason="the conformance suite is not in this checkout")
def test_ctrl_c_in_an_explicit_example_is_not_a_failing_example(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hypothesis reported the plan it was interrupted in as a 'Failing explicit example'; an interrupt is not
    a failure of the plan, and the run ends as interrupted."""
    pytester.makepyfile(slow_init=SLOW_INIT)
    started = pytester.path / "started"
    monkeypatch.setenv("STARTED_FILE", str(started))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pytester.path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    report = pytester.path / "report.json"
    args = [
        "-p",
        "pytest_mnnvl",
        "-p",
        "no:randomly",
        f"{SUITE}::test_covers",
        "--mnnvl-manager=slow_init:SlowInit",
        "--mnnvl-backend=sim",
        "--mnnvl-world-sizes=2",
        "--mnnvl-pp=1",
        f"--mnnvl-report={report}",
    ]
    proc = pytester.popen([sys.executable, "-m", "pytest", *args], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the first explicit example never started"
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = out.decode() + err.decode()
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, text[-3000:]
    assert "KeyboardInterrupt" in text, text[-3000:]
    assert "Failing explicit example" not in text, text[-3000:]
    assert "Falsifying" not in text, text[-3000:]
