"""``explain``/``predict`` per FlashInfer release: ``--flashinfer``, the release named in every output,
0.7.4's fixed regions, and the plan rules only one release has.

The 0.7.4 numbers are checked against :mod:`pytest_mnnvl.model.sizing_v074` (the arithmetic proven
against the real 0.7.4) called directly, through ``NVLinkOneSidedAlltoAll``'s own sizing path
(:func:`~pytest_mnnvl.model.sizing_v074.nvlink_one_sided_layout`), not through the CLI's walk.
Tests that depend on the installed release say so with a ``skipif`` on ``releases.current()``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_mnnvl.model import plans as model_plans
from pytest_mnnvl.model import releases, sizing_v074
from pytest_mnnvl.model.layers import RELEASE_RULES, LayerSpec, QuantFormat

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "plans"
MEASURED_PLAN = EXAMPLES / "facts-nvfp4-then-bf16.json"
DEEPSEEK = EXAMPLES / "deepseek-v3-r1-nvfp4-mtp.json"
FIRST_CALL = ("--manager", "mutant:first_call_wins")
BOTH = pytest.mark.parametrize("release", releases.SUPPORTED)
ON_V072 = pytest.mark.skipif(releases.current() != releases.V072, reason="needs FlashInfer 0.7.2.post1 installed")
ON_V074 = pytest.mark.skipif(releases.current() != releases.V074, reason="needs FlashInfer 0.7.4 installed")


def cli(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_mnnvl", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )


def in_process(capsys: pytest.CaptureFixture[str], *args: str | os.PathLike[str]) -> tuple[int, dict[str, Any]]:
    from pytest_mnnvl.cli.main import main

    status = main([*map(str, args), "--json"])
    return status, json.loads(capsys.readouterr().out)


def assert_input_error(done: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == "" and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def layers(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [layer for stage in document["stages"] for layer in stage["layers"]]


def plan_file(tmp_path: Path, stage: list[dict[str, Any]], mtp: list[dict[str, Any]] | None = None) -> Path:
    path = tmp_path / "plan.json"
    plan: dict[str, Any] = {"schema_version": 1, "name": "t", "stages": [stage]}
    if mtp:
        plan["mtp_head"] = mtp
    path.write_text(json.dumps(plan))
    return path


def layer(quant: str, hidden: int, top_k: int = 2, tokens: int = 256, name: str = "") -> dict[str, Any]:
    return {
        "name": name or quant,
        "quant": quant,
        "hidden_size": hidden,
        "top_k": top_k,
        "num_experts": 8,
        "max_num_tokens": tokens,
    }


def v074_layout(spec: LayerSpec, ep: int) -> sizing_v074.WorkspaceLayout:
    """The layout ``NVLinkOneSidedAlltoAll`` asks for ``spec`` alone, by 0.7.4's own sizing path."""
    return sizing_v074.nvlink_one_sided_layout(
        ep,
        spec.max_num_tokens,
        spec.hidden_size,
        spec.top_k,
        dispatch_format=spec.quant.flashinfer_name,
        extra_payload_bytes_per_token=spec.extra_payload_bytes_per_token,
        eplb_stats_num_experts=spec.eplb_stats_num_experts,
    )


# ---- the release is chosen, and named ------------------------------------------------------------


@BOTH
@pytest.mark.parametrize("command", ["explain", "predict"])
def test_every_output_names_the_release_it_modelled(
    capsys: pytest.CaptureFixture[str], release: str, command: str
) -> None:
    status, doc = in_process(capsys, command, MEASURED_PLAN, *FIRST_CALL, "--flashinfer", release)
    assert status == 1
    assert (doc["flashinfer"], doc["flashinfer_source"]) == (release, "--flashinfer")
    done = cli(command, MEASURED_PLAN, *FIRST_CALL, "--flashinfer", release)
    assert done.returncode == 1, done.stderr
    assert f"\nmodelled: FlashInfer {release} (chosen by --flashinfer)\n" in done.stdout


def test_the_installed_release_is_modelled_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    _status, doc = in_process(capsys, "explain", MEASURED_PLAN, *FIRST_CALL)
    assert (doc["flashinfer"], doc["flashinfer_source"]) == (releases.current(), "installed")
    done = cli("predict", MEASURED_PLAN)
    assert f"modelled: FlashInfer {releases.current()} (the installed release)" in done.stdout


@pytest.mark.parametrize("value", ["0.7.3", "latest", "0.7.2"])
@pytest.mark.parametrize("command", ["explain", "predict"])
def test_a_bad_flashinfer_value_is_an_input_error_naming_the_allowed_ones(command: str, value: str) -> None:
    assert_input_error(
        cli(command, MEASURED_PLAN, "--flashinfer", value),
        f"--flashinfer {value!r}: not allowed: must be one of {', '.join(releases.SUPPORTED)}",
    )


def test_a_policy_the_release_cannot_follow_is_an_input_error_naming_its_rule() -> None:
    for args in (("--policy", "total"), ("--manager", "mutant:total_need")):
        assert_input_error(
            cli("predict", MEASURED_PLAN, *args, "--flashinfer", releases.V074),
            "policy 'total' cannot be followed on FlashInfer 0.7.4",
            "takes no byte size per rank",
            "allowed there: per_dimension, first_call",
        )
    assert cli("predict", MEASURED_PLAN, "--policy", "total", "--flashinfer", releases.V072).returncode == 0


def test_observing_a_release_other_than_the_installed_one_is_an_input_error() -> None:
    other = next(r for r in releases.SUPPORTED if r != releases.current())
    assert_input_error(
        cli("explain", MEASURED_PLAN, "--observe", "--flashinfer", other),
        f"is observed on the installed FlashInfer {releases.current()}, so it cannot model --flashinfer {other}",
    )


# ---- 0.7.4's numbers ------------------------------------------------------------------------------


def test_v074_dispatch_region_numbers_are_sizing_v074s(capsys: pytest.CaptureFixture[str]) -> None:
    """The measured plan on 0.7.4: the bf16 head on the NVFP4 handle overflows the *dispatch* region
    (0.7.2: the combine region), with FlashInfer 0.7.4's exact message, first at T=73."""
    status, doc = in_process(capsys, "explain", MEASURED_PLAN, *FIRST_CALL, "--flashinfer", releases.V074)
    assert status == 1
    base, head = layers(doc)
    nvfp4 = LayerSpec(QuantFormat.NVFP4, 4096, 2, 8, 256)
    bf16 = LayerSpec(QuantFormat.BF16, 4096, 2, 8, 256)
    layout = v074_layout(nvfp4, 2)
    assert (base["need"], head["need"]) == (layout.workspace_size, v074_layout(bf16, 2).workspace_size)
    assert head["workspace"]["size_per_rank"] == layout.workspace_size == 5_387_776
    wire = [8192, 8, 8]  # bf16 row, top_k int32 ids, top_k fp32 weights
    dispatch = sizing_v074.check_dispatch(layout, 256, wire)
    assert (dispatch.need, dispatch.capacity) == (4_202_496, 2 * 256 * 2320 + 4 * 256)
    arithmetic = head["arithmetic"]
    assert arithmetic["layout"] == layout._asdict()
    assert arithmetic["dispatch_payload_bytes_per_token"] == wire
    assert (arithmetic["dispatch_need"], arithmetic["dispatch_capacity"]) == (dispatch.need, dispatch.capacity)
    assert not arithmetic["dispatch_fits"]
    assert head["verdict"] == "dispatch"
    assert head["error"] == {
        "type": "RuntimeError",
        "message": sizing_v074.dispatch_capacity_message(4_202_496, 1_188_864),
    }
    first = next(t for t in range(1, 257) if not sizing_v074.check_dispatch(layout, t, wire).fits)
    assert head["first_failing_tokens"] == first == 73
    at_first = sizing_v074.check_dispatch(layout, first, wire)
    assert head["first_failing"]["error"]["message"] == at_first.message
    assert doc["first_failure_summary"] == (
        f"dispatch region at runtime T=256: {dispatch.detail} (3,013,632 B over); FlashInfer raises RuntimeError"
    )
    text = cli("explain", MEASURED_PLAN, *FIRST_CALL, "--flashinfer", releases.V074).stdout
    assert (
        "dispatch region at runtime T=256: Dispatch payload exceeds its workspace capacity: need 4202496 bytes, "
        "capacity 1188864 (3,013,632 B over)" in text
    )
    assert "it first trips at runtime T=73" in text


def test_v074_combine_region_numbers_are_sizing_v074s(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A wider nvfp4 layer on a bf16 handle: its dispatch row is smaller, its combine row twice as big, and
    0.7.4's combine region is fixed, so combine fails from T=129 (the region holds 2 × 256 × 2048 × 2 B)."""
    path = plan_file(tmp_path, [layer("bf16", 2048, name="narrow"), layer("nvfp4", 4096, name="wide")])
    status, doc = in_process(capsys, "predict", path, *FIRST_CALL, "--flashinfer", releases.V074)
    assert status == 1
    _narrow, wide = layers(doc)
    layout = v074_layout(LayerSpec(QuantFormat.BF16, 2048, 2, 8, 256), 2)
    combine = sizing_v074.check_combine(layout, 256, 4096, 2)
    assert (combine.need, combine.capacity) == (2 * 256 * 4096 * 2, 2 * 256 * 2048 * 2)
    assert wide["verdict"] == "combine"
    assert wide["arithmetic"]["dispatch_fits"] and not wide["arithmetic"]["combine_fits"]
    assert (wide["arithmetic"]["combine_need"], wide["arithmetic"]["combine_capacity"]) == (
        combine.need,
        combine.capacity,
    )
    assert wide["error"]["message"] == sizing_v074.combine_capacity_message(combine.need, combine.capacity)
    assert wide["first_failing_tokens"] == 129
    trip = wide["first_failing"]
    at_129 = sizing_v074.check_combine(layout, 129, 4096, 2)
    assert trip["runtime_tokens"] == 129 and trip["verdict"] == "combine"
    assert trip["error"]["message"] == at_129.message
    assert sizing_v074.check_combine(layout, 128, 4096, 2).fits
    text = cli("predict", path, *FIRST_CALL, "--flashinfer", releases.V074).stdout
    assert (
        "the smallest batch that fails is 129 tokens per rank (stage 0 layer 1 'wide'): combine region at runtime "
        f"T=129: Combine payload exceeds its fixed workspace region: need {at_129.need} bytes, capacity "
        f"{at_129.capacity} (16,384 B over)"
    ) in text


def test_v074_token_count_over_the_handle_is_the_python_value_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = plan_file(tmp_path, [layer("bf16", 2048, tokens=64, name="short"), layer("bf16", 2048, name="long")])
    _status, doc = in_process(capsys, "predict", path, *FIRST_CALL, "--flashinfer", releases.V074)
    long = layers(doc)[1]
    assert long["verdict"] == "tokens" and long["first_failing_tokens"] == 65
    assert long["error"] == {"type": "ValueError", "message": sizing_v074.runtime_tokens_value_error(256, 64)}
    assert long["first_failing"]["error"]["message"] == "runtime_max_tokens_per_rank=65 must be in (0, 64]"


@pytest.mark.parametrize("name", model_plans.names())
def test_both_releases_walk_every_shipped_plan(capsys: pytest.CaptureFixture[str], name: str) -> None:
    """Per-dimension growth covers every layer on both releases; the 0.7.4 sizes are the ones
    ``NVLinkOneSidedAlltoAll`` asks for, and its handle's regions hold each layer at its full token count."""
    spec = model_plans.path_of(name)
    assert spec is not None
    docs = {}
    for release in releases.SUPPORTED:
        status, doc = in_process(
            capsys, "predict", name, "--policy", "per_dimension", "--ep", "8", "--flashinfer", release
        )
        assert status == 0 and doc["fits"] and doc["flashinfer"] == release, doc["first_failure"]
        docs[release] = doc
    for entry in layers(docs[releases.V074]):
        spec_layer = LayerSpec(**{**entry["layer"], "quant": QuantFormat(entry["layer"]["quant"])})
        assert entry["need"] == v074_layout(spec_layer, 8).workspace_size
        arithmetic = entry["arithmetic"]
        assert (
            arithmetic["dispatch_need"]
            <= arithmetic["dispatch_capacity"]
            == arithmetic["layout"]["dispatch_payload_size"]
        )
        assert arithmetic["combine_need"] == 8 * spec_layer.max_num_tokens * spec_layer.hidden_size * 2
    # The releases disagree on the bytes: 0.7.2's need is its packed row, 0.7.4's the fixed-region layout.
    assert [e["need"] for e in layers(docs[releases.V072])] != [e["need"] for e in layers(docs[releases.V074])]
    assert "layout" not in (layers(docs[releases.V072])[0]["arithmetic"] or {})


# ---- plan rules only one release has -----------------------------------------------------------------


def _top_k_rule(release: str) -> str:
    rules = RELEASE_RULES[release]
    return f"{rules.top_k_rule} {sorted(rules.top_k)}"


@pytest.mark.parametrize(("top_k", "refused_by"), [(3, releases.V072), (5, releases.V074)])
@pytest.mark.parametrize("command", ["explain", "predict"])
def test_a_top_k_one_release_rejects_is_an_input_error_naming_its_rule(
    tmp_path: Path, command: str, top_k: int, refused_by: str
) -> None:
    path = plan_file(tmp_path, [layer("bf16", 2048, top_k=top_k, name="odd")])
    message = assert_input_error(
        cli(command, path, "--flashinfer", refused_by),
        f"{path}: stages[0][0].top_k: {top_k} is not allowed",
        _top_k_rule(refused_by),
    )
    assert f"({refused_by})" in message
    accepted = next(r for r in releases.SUPPORTED if r != refused_by)
    if top_k in RELEASE_RULES[accepted].top_k:
        done = cli(command, path, "--flashinfer", accepted)
        assert done.returncode == 0, done.stderr
        assert f"modelled: FlashInfer {accepted}" in done.stdout


def test_the_v074_top_k_rule_is_the_models_one_list() -> None:
    assert RELEASE_RULES[releases.V074].top_k == frozenset(sizing_v074.SUPPORTED_TOP_K)
    assert sorted(sizing_v074.SUPPORTED_TOP_K) == [1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 18, 22]


def test_the_ep_bound_is_the_releases(capsys: pytest.CaptureFixture[str]) -> None:
    """0.7.2's kernels take at most 64 EP ranks, 0.7.4's 256: DeepSeek's 256 experts on 128 ranks."""
    assert_input_error(
        cli("predict", DEEPSEEK, "--ep", "128", "--flashinfer", releases.V072),
        "--ep 128: not allowed: must be an integer in 1..64 on FlashInfer 0.7.2.post1",
    )
    status, doc = in_process(capsys, "predict", DEEPSEEK, "--ep", "128", "--flashinfer", releases.V074)
    assert status == 0 and doc["ep"] == 128


@ON_V074
def test_repro_refuses_a_top_k_the_installed_074_rejects_before_any_rank(tmp_path: Path) -> None:
    path = plan_file(tmp_path, [layer("bf16", 2048, top_k=5, name="odd")])
    assert_input_error(cli("repro", path), "stages[0][0].top_k: 5 is not allowed", _top_k_rule(releases.V074))


@ON_V072
def test_repro_refuses_a_top_k_the_installed_072_rejects_before_any_rank(tmp_path: Path) -> None:
    path = plan_file(tmp_path, [layer("bf16", 2048, top_k=3, name="odd")])
    assert_input_error(cli("repro", path), "stages[0][0].top_k: 3 is not allowed", _top_k_rule(releases.V072))


@ON_V074
def test_repro_of_first_call_wins_on_the_installed_074_shows_its_own_dispatch_failure() -> None:
    """The first-call-wins defect reproduced on 0.7.4: the mtp head's dispatch overflows the region sized for
    the nvfp4 layer, with 0.7.4's own message and the numbers explain predicts (1,188,864 B region,
    4,202,496 B needed at T=256), classified as the dispatch check (it read ``other`` before 0.7.4's texts)."""
    done = cli("repro", MEASURED_PLAN, *FIRST_CALL, "--ep", "2")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED in dispatch on rank(s) 0, 1" in done.stdout
    assert sizing_v074.dispatch_capacity_message(4202496, 1188864) in done.stdout
    assert "FIRST FAILURE: stage 0, layer 1 'head' (mtp_head[0]), rank 0, dispatch:" in done.stdout


def test_repro_policy_on_a_pp_plan_keeps_its_collectives_on_each_stage() -> None:
    """``--policy`` on a PP plan: the two stages build their handles at different steps, so an allocation whose
    collectives reach the whole world (FlashInfer 0.7.2's ``TorchDistBackend.Split``) deadlocked the driver; it
    builds on an EP-scoped comm now, on either release."""
    plan = EXAMPLES / "deepseek-v3-r1-nvfp4-mtp-pp2.json"
    done = cli("repro", plan, "--policy", "per_dimension", "--ep", "2", "--timeout", "60")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "stage 1 final pass" in done.stdout and "no failure" in done.stdout
