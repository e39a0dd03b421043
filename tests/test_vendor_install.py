"""A vendor's install, end to end: the wheel built from this checkout, installed into a fresh virtualenv outside
it, runs the packaged conformance suite from an empty directory against a manager defined in that directory
(pass, exit 0, on two xdist workers) and against a mutant (fail, exit 1), with ``pytest -p pytest_mnnvl
--pyargs pytest_mnnvl.conformance``, as the README's vendor section says.

The virtualenv gets pytest-mnnvl from the wheel only. Its dependencies (torch, FlashInfer, Hypothesis, pytest,
xdist: GBs to download) come from this environment through a ``.pth`` file naming a view of its
site-packages without pytest-mnnvl (the editable install's finder there would shadow the wheel), and the test
checks that every process, the pytest session and the ranks, imported ``pytest_mnnvl`` from the new virtualenv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: What the wheel is built from (pyproject.toml names README.md as the long description).
WHEEL_SOURCES = ("pyproject.toml", "README.md", "pytest_mnnvl")

VENDOR_MANAGER = '''
"""A vendor's manager: the reference's behaviour, defined outside pytest-mnnvl. Every process that imports it
(the pytest session and each rank) writes down where pytest_mnnvl came from."""
import os

import pytest_mnnvl
from pytest_mnnvl.managers.reference import ReferenceManager

with open(os.environ["MNNVL_IMPORTED_FROM"], "a") as out:
    out.write(pytest_mnnvl.__file__ + "\\n")


class MyManager(ReferenceManager):
    pass
'''


@dataclass
class Vendor:
    python: Path
    venv: Path
    workdir: Path
    seconds: dict[str, float]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHON"))}
        return {
            **env,
            "PYTHONPATH": str(self.workdir),
            "GLOO_SOCKET_IFNAME": "lo",
            "MNNVL_IMPORTED_FROM": str(self.workdir / "imported-from.txt"),
        }

    def run(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.python), *args],
            cwd=self.workdir,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _check(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}: {done.stdout[-3000:]}{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> Vendor:
    from importlib.metadata import version

    if int(version("setuptools").split(".")[0]) < 77:  # the build backend pyproject.toml requires
        pytest.fail(f"setuptools {version('setuptools')} cannot build the wheel; install the dev extra (.[dev])")
    root = tmp_path_factory.mktemp("vendor")
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    # The wheel, built from a copy of its sources: setuptools' build/ directory never touches the checkout.
    src = root / "src"
    src.mkdir()
    for name in WHEEL_SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    dist = root / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _check([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(src)])
    (wheel,) = dist.glob("pytest_mnnvl-*.whl")
    seconds["wheel"] = time.monotonic() - t0
    # A fresh virtualenv from the base interpreter; its dependencies through a view of this environment.
    venv = root / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    _check([base, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deps = root / "deps"
    deps.mkdir()
    here = Path(sysconfig.get_paths()["purelib"])
    for entry in here.iterdir():
        if "mnnvl" not in entry.name.lower():
            (deps / entry.name).symlink_to(entry)
    (Path(purelib) / "mnnvl-test-deps.pth").write_text(f"{deps}\n")
    # pip itself comes through the view too; it installs into the new virtualenv.
    _check(
        [
            str(python),
            "-m",
            "pip",
            "--disable-pip-version-check",
            "-q",
            "install",
            "--no-deps",
            "--no-index",
            str(wheel),
        ]
    )
    seconds["install"] = time.monotonic() - t0 - seconds["wheel"]
    workdir = root / "ci-job"
    workdir.mkdir()
    (workdir / "my_manager.py").write_text(VENDOR_MANAGER)
    return Vendor(python, venv, workdir, seconds)


def test_pip_show_lists_the_suite_and_the_plans(vendor: Vendor) -> None:
    done = vendor.run("-m", "pip", "--disable-pip-version-check", "show", "-f", "pytest-mnnvl")
    assert done.returncode == 0, done.stderr
    files = {line.strip() for line in done.stdout.splitlines()}
    assert {
        "pytest_mnnvl/conformance/__init__.py",
        "pytest_mnnvl/conformance/conftest.py",
        "pytest_mnnvl/conformance/test_invariants.py",
        "pytest_mnnvl/plans/README.md",
        "pytest_mnnvl/plans/deepseek-v3-r1-nvfp4-mtp.json",
    } <= files, done.stdout
    packaged = sorted(p.name for p in (REPO / "pytest_mnnvl" / "plans").glob("*.json"))
    assert sorted(
        f.rpartition("/")[2] for f in files if f.startswith("pytest_mnnvl/plans/") and f.endswith(".json")
    ) == (packaged)
    listed = vendor.run("-m", "pytest_mnnvl", "list-plans", "--json")
    assert listed.returncode == 0, listed.stderr
    for plan in json.loads(listed.stdout)["plans"]:
        assert Path(plan["path"]).is_relative_to(vendor.venv), plan["path"]


def test_the_packaged_suite_gates_a_vendor_manager_from_an_empty_directory(vendor: Vendor) -> None:
    suite = ("-m", "pytest", "-p", "pytest_mnnvl", "-p", "no:cacheprovider", "-p", "no:randomly", "--pyargs")
    passing = vendor.run(
        *suite,
        "pytest_mnnvl.conformance",
        "--mnnvl-manager=my_manager:MyManager",
        "-k",
        "ws2-pp1 and (no_shrink or shape_mismatch)",
        "--mnnvl-report=reference/report.json",
        # On two xdist workers: the controller collects nothing, so only the plugin's own loading of the
        # suite's hooks for --pyargs gives it a report to write.
        "-n",
        "2",
    )
    assert passing.returncode == 0, passing.stdout[-4000:] + passing.stderr[-2000:]
    report = json.loads((vendor.workdir / "reference" / "report.json").read_text())
    assert report["manager"]["spec"] == "my_manager:MyManager"
    statuses = {name: v["status"] for name, v in report["invariants"].items() if v["status"] != "not_run"}
    assert statuses == {"no_shrink": "pass", "shape_mismatch": "pass"}, statuses
    assert report["examples_run"] > 0
    # The node ids a vendor's waiver file names (the README says so): relative to the packaged suite.
    nodeids = [t["nodeid"] for v in report["invariants"].values() for t in v["tests"]]
    assert "test_invariants.py::test_no_shrink[ws2-pp1]" in nodeids, nodeids
    # The session and every rank imported pytest_mnnvl from the wheel, nothing from this checkout.
    imported = set((vendor.workdir / "imported-from.txt").read_text().split())
    assert len(imported) == 1 and Path(imported.pop()).is_relative_to(vendor.venv)

    failing = vendor.run(
        *suite,
        "pytest_mnnvl.conformance",
        "--mnnvl-manager=mutant:first_call_wins",
        "-k",
        "ws2-pp1 and covers and not cross_product",
        "--mnnvl-report=mutant/report.json",
    )
    assert failing.returncode == 1, failing.stdout[-4000:] + failing.stderr[-2000:]
    report = json.loads((vendor.workdir / "mutant" / "report.json").read_text())
    assert report["invariants"]["covers"]["status"] == "fail"
    assert report["failure_kinds"]["violation"] == 1
    assert "CoversViolation" in failing.stdout
    print(f"vendor install: {vendor.seconds}")


def test_a_clone_collects_the_packaged_tests_once_under_its_own_node_ids(pytester: pytest.Pytester) -> None:
    def collected(*args: str) -> list[str]:
        result = pytester.runpytest_subprocess("-p", "pytest_mnnvl", "-p", "no:randomly", "--co", "-q", *args)
        assert result.ret == 0, result.stdout.str()[-2000:] + result.stderr.str()[-2000:]
        return [line for line in result.stdout.lines if "::test_" in line]

    clone = collected(str(REPO / "conformance"))
    packaged = collected("--pyargs", "pytest_mnnvl.conformance")
    assert len(clone) == len(set(clone)) == len(packaged) > 0
    assert all(nodeid.startswith("conformance/test_invariants.py::test_") for nodeid in clone), clone[:3]
    assert [n.rpartition("::")[2] for n in clone] == [n.rpartition("::")[2] for n in packaged]
    ws2 = collected(str(REPO / "conformance"), "-k", "ws2-pp1")
    assert ws2 and all("[ws2-pp1" in n for n in ws2) and len(ws2) == sum("[ws2-pp1" in n for n in clone)
