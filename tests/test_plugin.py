"""Options, ini twins, markers, strict mode, header, hooks and import cost of the plugin."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "args,message",
    [
        (["--mnnvl-backend=gpu"], "--mnnvl-backend='gpu' is not valid; allowed: auto, sim, flashinfer"),
        (["--mnnvl-timeout=abc"], "--mnnvl-timeout='abc' is not a number of seconds; allowed: 1..86400 seconds"),
        (["--mnnvl-timeout=-1"], "--mnnvl-timeout='-1' is not valid; allowed: 1..86400 seconds"),
        (
            ["--mnnvl-world-sizes=2,x"],
            "--mnnvl-world-sizes='2,x': 'x' is not valid; allowed: comma-separated*",
        ),
        (["--mnnvl-world-sizes=65"], "*'65' is not valid; allowed: comma-separated integers 1..64"),
        (["--mnnvl-pp=0"], "--mnnvl-pp='0': '0' is not valid*"),
        (
            ["--mnnvl-manager=not a spec"],
            "--mnnvl-manager='not a spec' is not valid; allowed: reference, moe_ep_reference, vllm*",
        ),
        (
            ["--mnnvl-world-sizes=3", "--mnnvl-pp=2"],
            "no topology fits --mnnvl-world-sizes=3 and --mnnvl-pp=2*",
        ),
        (["--mnnvl-warm-worlds=0"], "--mnnvl-warm-worlds='0' is not valid; allowed: an integer >= 1"),
        (["--mnnvl-startup-timeout=0"], "--mnnvl-startup-timeout='0' is not valid; allowed: 1..86400 seconds"),
        (["--mnnvl-manager=mutant:nope"], "*there is no mutant named 'nope'*first_call_wins*"),
        (["--mnnvl-manager=no_such_pkg.mod:Cls"], "*no_such_pkg*"),
    ],
)
def test_bad_options_are_usage_errors(pytester: pytest.Pytester, args: list[str], message: str) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "pytest_mnnvl", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}"])


def test_ini_twins(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nmnnvl_timeout = 7\nmnnvl_backend = sim\nmnnvl_world_sizes = 2\nmnnvl_pp = 1\n")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "pytest_mnnvl")
    result.stdout.fnmatch_lines(["mnnvl: backend=sim, timeout=7s, topologies=ws2-pp1, manager=reference, strict=off"])
    # The command line wins over the ini file.
    result = pytester.runpytest_subprocess("-p", "pytest_mnnvl", "--mnnvl-timeout=3")
    result.stdout.fnmatch_lines(["mnnvl: backend=sim, timeout=3s*"])

    pytester.makeini("[pytest]\nmnnvl_timeout = zero\n")
    result = pytester.runpytest_subprocess("-p", "pytest_mnnvl")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--mnnvl-timeout='zero' is not a number of seconds*"])


def test_markers_are_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("-p", "pytest_mnnvl", "--markers")
    result.stdout.fnmatch_lines(
        [
            "@pytest.mark.requires_multi_gpu(n=2): *",
            "@pytest.mark.requires_one_sided: *",
            "@pytest.mark.requires_ptrace: *",
            "@pytest.mark.mnnvl(world_size=2, pp=1, timeout=None): *",
        ]
    )


@pytest.mark.parametrize(
    "ci, args, hypothesis_line",
    [
        (False, ["--hypothesis-seed=42"], "mnnvl: hypothesis profile=default, seed=42"),
        (
            True,
            ["--hypothesis-seed=42"],
            "mnnvl: hypothesis profile=ci, seed=derandomized (fixed per test); --hypothesis-seed=42 has no effect",
        ),
        (False, [], "mnnvl: hypothesis profile=default, seed=random (printed on failure)"),
        # No Hypothesis option: nothing has imported Hypothesis when the header is printed.
        (True, [], "mnnvl: hypothesis profile=ci, seed=derandomized (fixed per test)"),
    ],
    ids=["developer-seeded", "ci-seeded", "developer", "ci"],
)
def test_header_names_what_matters(
    pytester: pytest.Pytester, no_ci_environment: pytest.MonkeyPatch, ci: bool, args: list[str], hypothesis_line: str
) -> None:
    """Under a CI variable Hypothesis runs its own derandomized ``ci`` profile: the header says so."""
    if ci:
        no_ci_environment.setenv("CI", "true")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "pytest_mnnvl", *args)
    result.stdout.fnmatch_lines(
        [
            "mnnvl: backend=auto -> sim, timeout=60s, topologies=ws2-pp1 ws4-pp1 ws4-pp2*",
            "mnnvl: GPUs: 0*",
            "mnnvl: links: *",
            "mnnvl: FlashInfer: *",
            "mnnvl: handle type: *",
            "mnnvl: fd exchange: *",
            "mnnvl: ptrace: *",
            hypothesis_line,
        ]
    )


CAPABILITY_TESTS = """
import pytest

@pytest.mark.requires_multi_gpu(n=2)
def test_two_gpus(): pass

@pytest.mark.requires_multi_gpu(n=1)
def test_one_gpu(): pass

@pytest.mark.requires_one_sided
def test_one_sided(): pass

@pytest.mark.requires_ptrace
def test_ptrace(): pass

def test_plain(): pass
"""


def test_capability_markers_skip_with_reasons(pytester: pytest.Pytester) -> None:
    """This machine has no GPU and FlashInfer 0.7.x (SCM_RIGHTS): GPU markers skip, ptrace runs."""
    pytester.makepyfile(CAPABILITY_TESTS)
    result = pytester.runpytest_subprocess("-p", "pytest_mnnvl", "-rs", "--mnnvl-backend=sim")
    result.assert_outcomes(passed=2, skipped=3)
    result.stdout.fnmatch_lines(
        [
            "SKIPPED [[]1[]] test_*.py:3: needs 2 GPUs, 0 visible to this process*run on a machine with at least 2*",
            "SKIPPED [[]1[]] test_*.py:6: needs 1 GPU*, 0 visible*",
            "SKIPPED [[]1[]] test_*.py:9: one-sided all-to-all needs 2 GPUs*",
        ]
    )


def test_strict_turns_skips_into_failures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(CAPABILITY_TESTS)
    result = pytester.runpytest_subprocess("-p", "pytest_mnnvl", "--mnnvl-strict", "--mnnvl-backend=sim")
    # Decided in setup, so pytest counts them as errors: the run fails either way.
    result.assert_outcomes(passed=2, errors=3)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*--mnnvl-strict: this test may not be skipped: *GPU*"])


def test_strict_leaves_xfail_and_unmarked_skips_alone(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.xfail(reason="known")
        @pytest.mark.requires_ptrace
        def test_xfail(): assert False

        def test_unrelated_skip(): pytest.skip("not ours")
        """
    )
    result = pytester.runpytest_subprocess("-p", "pytest_mnnvl", "--mnnvl-strict")
    result.assert_outcomes(xfailed=1, skipped=1)


def test_bad_marker_arguments_fail_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.requires_multi_gpu(n=0)
        def test_zero(): pass

        @pytest.mark.mnnvl(world_size=2, size=3)
        def test_unknown(): pass

        @pytest.mark.mnnvl(timeout="soon")
        def test_timeout(): pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "pytest_mnnvl")
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines(["*@pytest.mark.requires_multi_gpu(n=0): n must be an integer >= 1*"])
    result.stdout.fnmatch_lines(["*@pytest.mark.mnnvl got size; allowed: world_size, pp, timeout*"])
    result.stdout.fnmatch_lines(["*@pytest.mark.mnnvl(timeout)='soon' is not a number of seconds*"])


def test_select_backend_hook_and_gpu_worlds_skip_without_gpus(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        def pytest_mnnvl_select_backend(config, requested):
            return "flashinfer"
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.mnnvl(world_size=2)
        def test_on_gpus(mnnvl_world):
            mnnvl_world()
        """
    )
    result = pytester.runpytest_subprocess("-p", "pytest_mnnvl", "-rs")
    result.stdout.fnmatch_lines(["mnnvl: backend=auto -> flashinfer*"])
    result.assert_outcomes(skipped=1)


def test_topologies_parametrize(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_topo(mnnvl_topology): assert mnnvl_topology.world_size % mnnvl_topology.pp == 0")
    result = pytester.runpytest_subprocess(
        "-p", "pytest_mnnvl", "--co", "-q", "--mnnvl-world-sizes=2,4,8", "--mnnvl-pp=1,2"
    )
    result.stdout.fnmatch_lines(
        [
            "*test_topo[[]ws2-pp1[]]",
            "*test_topo[[]ws4-pp1[]]",
            "*test_topo[[]ws4-pp2[]]",
            "*test_topo[[]ws8-pp1[]]",
            "*test_topo[[]ws8-pp2[]]",
            "*5 tests collected*",
        ]
    )


def test_marker_world_rank_env_hook_and_multicast_off(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        def pytest_mnnvl_rank_env(config, spec):
            return {"MY_FLAG": f"ws{spec.world_size}", "NCCL_NVLS_ENABLE": "1"}
        """
    )
    pytester.makepyfile(
        rankfns="""
        import os

        def env(ctx, names):
            return {n: os.environ.get(n) for n in names} | {"pp": ctx.pp_size, "ws": ctx.world_size}
        """
    )
    pytester.makepyfile(
        """
        import pytest
        import rankfns

        @pytest.mark.mnnvl(world_size=4, pp=2)
        def test_env(mnnvl_world):
            names = ["MY_FLAG", "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"]
            out = mnnvl_world(backend="plain", env={"OTHER": "1"}).run(rankfns.env, names)
            assert out == [{"MY_FLAG": "ws4", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                            "NVSHMEM_DISABLE_NVLS": "1", "pp": 2, "ws": 4}] * 4
        """
    )
    result = pytester.runpytest_subprocess("-p", "pytest_mnnvl")
    result.assert_outcomes(passed=1)


def test_xdist_workers_each_get_a_pool(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        rankfns="""
        import os

        def worker(ctx):
            return os.environ.get("PYTEST_XDIST_WORKER")
        """
    )
    pytester.makepyfile(
        """
        import pytest
        import rankfns

        @pytest.mark.parametrize("i", range(2))
        def test_world(mnnvl_world, i):
            out = mnnvl_world(2, backend="plain").run(rankfns.worker)
            assert out[0] == out[1] and out[0].startswith("gw")
        """
    )
    result = pytester.runpytest_subprocess("-p", "pytest_mnnvl", "-n", "2")
    result.assert_outcomes(passed=2)


def test_plugin_load_imports_no_heavy_modules() -> None:
    code = (
        "import importlib, pkgutil, sys, pytest_mnnvl, pytest_mnnvl.plugin, pytest_mnnvl.probes as probes;"
        "names = [m.name for m in pkgutil.iter_modules(probes.__path__)];"
        "[importlib.import_module(f'pytest_mnnvl.probes.{name}') for name in names];"
        "heavy = [m for m in ('torch', 'flashinfer', 'hypothesis', 'pynvml', 'numpy') if m in sys.modules];"
        "print(names, heavy); sys.exit(1 if heavy or 'header' not in names else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_collect_only_session_imports_no_torch(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import sys

        def pytest_collection_finish(session):
            heavy = [m for m in ("torch", "flashinfer") if m in sys.modules]
            assert not heavy, heavy
        """
    )
    pytester.makepyfile("def test_x(mnnvl_world): pass")
    result = pytester.runpytest_subprocess("-p", "pytest_mnnvl", "--co")
    assert result.ret == 0
