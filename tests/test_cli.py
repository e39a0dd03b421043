"""``python -m pytest_mnnvl explain|predict|repro``, run as users run it: in a subprocess.

Exit statuses: 0 fits / nothing reproduced, 1 fails / reproduced, 2 bad input (one line on stderr,
never a traceback). The verdicts asserted for the example plans are the table in
examples/plans/README.md; the arithmetic is the measured example (ep=2, T=256, H=4096, top_k=2:
NVFP4 workspace 5,427,584 B, bf16 8,442,240 B, payload offset 45,440), measured from FlashInfer's
own function on 2×H100.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_mnnvl.model import releases, sizing
from pytest_mnnvl.model.layers import LayerSpec, ModelPlan, QuantFormat

#: Every number and message here is 0.7.2.post1's (the CLI models the installed release by default);
#: tests/test_cli_releases.py runs explain, predict and repro on both releases.
pytestmark = pytest.mark.skipif(
    releases.current() != releases.V072, reason="0.7.2.post1's arithmetic and messages; see test_cli_releases.py"
)

ROOT = Path(__file__).resolve().parent.parent
PLANS = ROOT / "examples" / "plans"
DEEPSEEK = PLANS / "deepseek-v3-r1-nvfp4-mtp.json"
MEASURED_PLAN = PLANS / "facts-nvfp4-then-bf16.json"
COMBINE_MESSAGE = (
    "Check failed: (combinePayloadOffset >= 0 && combinePayloadOffset + payloadBytes <= sizePerRank) is false: "
    "workspace insufficient for combine payload region"
)
FIRST_CALL = ["--manager", "mutant:first_call_wins"]


def cli(*args: str | os.PathLike[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    return subprocess.run(
        [sys.executable, "-m", "pytest_mnnvl", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def cli_json(*args: str | os.PathLike[str]) -> tuple[int, dict[str, Any]]:
    done = cli(*args, "--json")
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def layers(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [layer for stage in document["stages"] for layer in stage["layers"]]


# ---- The measured example: ep=2, T=256, H=4096, top_k=2 ---------------------------------------------


def test_measured_arithmetic_explained_exactly() -> None:
    status, doc = cli_json("explain", MEASURED_PLAN, *FIRST_CALL, "--ep", "2")
    assert status == 1
    base, head = layers(doc)
    assert (base["need"], head["need"]) == (5_427_584, 8_442_240)
    assert base["arithmetic"]["payload_offset"] == head["arithmetic"]["payload_offset"] == 45_440
    assert base["verdict"] == "ok" and base["workspace"]["rebuilt"]
    # The bf16 head keeps the NVFP4 workspace: dispatch fits, the combine region does not.
    assert head["workspace"] == {
        "rebuilt": False,
        "built_by": 0,
        "size_per_rank": 5_427_584,
        "max_num_tokens": 256,
        "eplb_stats_num_experts": 0,
    }
    assert head["payload"]["dispatch_bytes_per_token"] == 8192 + 8 + 8
    assert head["arithmetic"] == {
        "size_per_rank": 5_427_584,
        "payload_offset": 45_440,
        "dispatch_payload_bytes": [2 * 256 * 8192, 2 * 256 * 8, 2 * 256 * 8],
        "dispatch_required_size": 4_247_936,
        "dispatch_fits": True,
        "combine_payload_offset": 4_247_936,
        "combine_payload_bytes": 4_194_304,
        "combine_required_size": 8_442_240,
        "combine_fits": False,
    }
    assert head["verdict"] == "combine"
    assert head["error"] == {"type": "RuntimeError", "message": COMBINE_MESSAGE}
    geometry = sizing.WorkspaceGeometry(2, 256, 5_427_584)
    head_spec = LayerSpec(QuantFormat.BF16, hidden_size=4096, top_k=2, num_experts=8, max_num_tokens=256)
    expected_first = sizing.smallest_failing_runtime_tokens(head_spec, geometry)
    assert head["first_failing_tokens"] == expected_first == 165


def test_measured_table_shows_the_arithmetic() -> None:
    done = cli("explain", MEASURED_PLAN, *FIRST_CALL)
    assert done.returncode == 1, done.stderr
    out = done.stdout
    assert "payload offset        45,440" in out
    assert "dispatch              45,440 + 2 × 256 × 8,208 = 4,247,936 <= 5,427,584 size per rank: fits" in out
    assert "combinePayloadOffset  align128(4,247,936) = 4,247,936" in out
    assert "combine               4,247,936 + 4,194,304 = 8,442,240 > 5,427,584 size per rank: FAILS" in out
    assert f"FlashInfer raises     RuntimeError: {COMBINE_MESSAGE}" in out
    assert "first failing T       165 (runtime token counts up to 164 pass)" in out


@pytest.mark.parametrize("manager", [["--manager", "reference"], ["--policy", "total"], ["--manager", "vllm"]])
def test_measured_plan_fits_when_the_workspace_grows(manager: list[str]) -> None:
    status, doc = cli_json("explain", MEASURED_PLAN, *manager)
    assert status == 0 and doc["fits"] and doc["first_failure"] is None
    assert [layer["workspace"]["size_per_rank"] for layer in layers(doc)] == [5_427_584, 8_442_240]


# ---- DeepSeek-V3/R1 NVFP4 + bf16 MTP --------------------------------------------------------------------


def test_deepseek_explain_first_call_fails_at_the_mtp_head() -> None:
    status, doc = cli_json("explain", DEEPSEEK, *FIRST_CALL)
    assert status == 1
    assert doc["policy"] == "first_call" and doc["ep"] == 2
    all_layers = layers(doc)
    assert len(all_layers) == 59
    assert [layer["verdict"] for layer in all_layers] == ["ok"] * 58 + ["combine"]
    assert {layer["workspace"]["size_per_rank"] for layer in all_layers} == {9_482_624}
    assert doc["first_failure"] == {
        "stage": 0,
        "index": 58,
        "name": "mtp.moe",
        "verdict": "combine",
        "error": {"type": "RuntimeError", "message": COMBINE_MESSAGE},
        "first_failing_tokens": 165,
        "final_pass": False,
    }
    assert doc["stages"][0]["final_pass"] == []  # one handle for every layer: nothing to judge again
    mtp = all_layers[58]
    assert mtp["mtp"] and mtp["origin"] == "mtp_head[0]"
    assert mtp["need"] == 14_758_272
    assert mtp["arithmetic"]["dispatch_required_size"] == 7_418_240
    assert mtp["arithmetic"]["combine_required_size"] == 14_758_272


def test_deepseek_explain_reference_fits() -> None:
    done = cli("explain", DEEPSEEK)
    assert done.returncode == 0, done.stderr
    assert "policy per_dimension" in done.stdout
    assert "verdict: every layer fits at its full runtime token count" in done.stdout
    assert "58    mtp.moe (mtp)" in done.stdout and "14,758,272" in done.stdout


def test_deepseek_predict() -> None:
    done = cli("predict", DEEPSEEK, *FIRST_CALL, "--ep", "8")
    assert done.returncode == 1, done.stderr
    assert "smallest batch that fails is 165 tokens per rank (stage 0 layer 58 'mtp.moe')" in done.stdout
    assert cli("predict", DEEPSEEK, "--ep", "8").returncode == 0


def test_deepseek_pp2_stage_selection() -> None:
    plan = PLANS / "deepseek-v3-r1-nvfp4-mtp-pp2.json"
    status, doc = cli_json("explain", plan, *FIRST_CALL, "--stage", "0")
    assert status == 0 and [s["stage"] for s in doc["stages"]] == [0] and len(layers(doc)) == 28
    status, doc = cli_json("explain", plan, *FIRST_CALL, "--stage", "1")
    assert status == 1 and doc["stages"][0]["ep_ranks"] == [2, 3]
    assert doc["first_failure"]["index"] == 30 and doc["first_failure"]["name"] == "mtp.moe"


# ---- the verdict table of examples/plans/README.md --------------------------------------------------------

#: plan -> {policy flag: (stage, index, first failing T) of the first failing layer, or None: fits}
VERDICTS: dict[str, dict[str, tuple[int, int, int] | None]] = {
    "deepseek-v3-r1-nvfp4-mtp": {"first_call": (0, 58, 165), "reference": None, "total": None},
    "deepseek-v3-r1-nvfp4-mtp-pp2": {"first_call": (1, 30, 165), "reference": None, "total": None},
    "qwen3-235b-a22b-fp8": {"first_call": None, "reference": None, "total": None},
    "gpt-oss-120b-bf16": {"first_call": None, "reference": None, "total": None},
    "kimi-k2-fp8": {"first_call": None, "reference": None, "total": None},
    "llama4-maverick-bf16": {"first_call": None, "reference": None, "total": None},
    "facts-nvfp4-then-bf16": {"first_call": (0, 1, 165), "reference": None, "total": None},
    "total-need-gap": {"first_call": (0, 1, 65), "reference": None, "total": (0, 2, 64)},
}
FLAGS = {"first_call": FIRST_CALL, "reference": ["--manager", "reference"], "total": ["--policy", "total"]}


def test_every_example_plan_is_in_the_table() -> None:
    assert sorted(p.stem for p in PLANS.glob("*.json")) == sorted(VERDICTS)


def in_process(capsys: pytest.CaptureFixture[str], *args: str | os.PathLike[str]) -> tuple[int, dict[str, Any]]:
    """The same command in this process (the table has 48 cells; a subprocess each would cost ~15 s)."""
    from pytest_mnnvl.cli.main import main

    status = main([*map(str, args), "--json"])
    return status, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("plan", sorted(VERDICTS))
@pytest.mark.parametrize("ep", ["2", "8"])
def test_example_plan_verdicts(capsys: pytest.CaptureFixture[str], plan: str, ep: str) -> None:
    for policy, expected in VERDICTS[plan].items():
        status, doc = in_process(capsys, "predict", PLANS / f"{plan}.json", *FLAGS[policy], "--ep", ep)
        failing = [
            (layer["stage"], layer["index"], layer["first_failing_tokens"])
            for layer in layers(doc)
            if layer["first_failing_tokens"] is not None
        ]
        assert (failing[0] if failing else None) == expected, (plan, policy, ep)
        assert status == (0 if expected is None else 1)


def test_example_plans_hold_the_public_config_facts() -> None:
    def plan(name: str) -> ModelPlan:
        return ModelPlan.load(PLANS / f"{name}.json")

    facts = {  # name: (hidden, experts, top_k, MoE layers, quant of the decoder layers, MTP quants)
        "deepseek-v3-r1-nvfp4-mtp": (7168, 256, 8, 58, "nvfp4", ["bf16"]),
        "qwen3-235b-a22b-fp8": (4096, 128, 8, 94, "fp8_block", []),
        "gpt-oss-120b-bf16": (2880, 128, 4, 36, "bf16", []),
        "kimi-k2-fp8": (7168, 384, 8, 60, "fp8_block", []),
        "llama4-maverick-bf16": (5120, 128, 1, 24, "bf16", []),
    }
    for name, (hidden, experts, top_k, count, quant, mtp) in facts.items():
        p = plan(name)
        decoder = [layer for stage in p.stages for layer in stage]
        assert len(decoder) == count, name
        assert {(x.hidden_size, x.num_experts, x.top_k, x.quant.value, x.max_num_tokens) for x in decoder} == {
            (hidden, experts, top_k, quant, 256)
        }, name
        assert [x.quant.value for x in p.mtp_head] == mtp, name
    pp2 = plan("deepseek-v3-r1-nvfp4-mtp-pp2")
    assert [len(s) for s in pp2.stages] == [28, 30] and len(pp2.mtp_head) == 1


# ---- repro on the sim (each spawns a 2-rank world: a few seconds) -------------------------------------


def test_repro_first_call_reproduces_the_exact_combine_error() -> None:
    done = cli("repro", MEASURED_PLAN, *FIRST_CALL, "--ep", "2", "--json")
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    failure = doc["first_failure"]
    assert doc["reproduced"] and doc["backend"] == "sim" and doc["manager"] == "mutant:first_call_wins"
    assert (failure["stage"], failure["index"], failure["name"], failure["rank"]) == (0, 1, "head", 0)
    assert failure["check"] == "combine" and failure["ranks"] == [0, 1]
    assert failure["type"] == "RuntimeError"
    assert failure["message"] == COMBINE_MESSAGE
    assert failure["predicted"]["error"]["message"] == COMBINE_MESSAGE  # the arithmetic and the run agree
    assert failure["predicted"]["workspace"]["size_per_rank"] == 5_427_584
    base = doc["stages"][0]["layers"][0]
    assert (base["size_per_rank"], base["round_trip"]) == (5_427_584, "ok")
    # With --json the progress goes to stderr.
    assert "stage 0 layer 1 'head' (bf16): kept 5,427,584 B/rank" in done.stderr
    assert "FAILED in combine on rank(s) 0, 1" in done.stderr


@pytest.mark.parametrize("manager", [["--manager", "reference"], ["--policy", "total"]])
def test_repro_passes_when_the_workspace_grows(manager: list[str]) -> None:
    done = cli("repro", MEASURED_PLAN, *manager)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "stage 0 layer 1 'head' (bf16): built 8,442,240 B/rank, max_num_tokens 256; round trip at T=256 ok" in (
        done.stdout
    )
    assert "no failure: every layer initialized and round-tripped" in done.stdout


#: vLLM 0.32's covers counterexample (found by the suite on the sim): each layer fits its own step, the first
#: one no longer fits the handle the MTP head leaves behind.
TOTAL_NEED_GAP = ROOT / "conformance" / "results" / "vllm" / "vllm-0.32.0-covers-counterexample.json"


def test_repro_final_pass_catches_a_layer_the_last_handle_no_longer_fits() -> None:
    done = cli("repro", TOTAL_NEED_GAP, "--manager", "mutant:total_need", "--ep", "2", "--json")
    assert done.returncode == 1, done.stderr
    failure = json.loads(done.stdout)["first_failure"]
    where = (failure["phase"], failure["index"], failure["name"], failure["check"])
    assert where == ("final_pass", 0, "s0l0", "combine")
    assert failure["message"] == COMBINE_MESSAGE and failure["ranks"] == [0, 1]
    assert failure["predicted"]["error"]["message"] == COMBINE_MESSAGE  # explain's final pass agrees
    assert failure["predicted"]["final_pass"] is True
    assert "stage 0 layer 1 'mtp' (nvfp4): built 17,920 B/rank, max_num_tokens 16; round trip at T=16 ok" in done.stderr
    assert "stage 0 final pass: layer 0 's0l0' again on the handle the stage ended with: FAILED in combine" in (
        done.stderr
    )


def test_repro_final_pass_passes_when_the_handle_covers_every_layer() -> None:
    done = cli("repro", TOTAL_NEED_GAP, "--manager", "reference", "--ep", "2", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["first_failure"] is None and doc["stages"][0]["final_pass"] == [0]
    assert "stage 0 final pass: layer(s) 0 again on the handle the stage ended with: ok" in done.stderr


def test_explain_final_pass_judges_earlier_layers_on_the_last_handle(capsys: pytest.CaptureFixture[str]) -> None:
    """The arithmetic's twin of repro's final pass: the total-need rule leaves a handle the first layer overflows."""
    status, doc = in_process(capsys, "explain", TOTAL_NEED_GAP, "--policy", "total", "--ep", "2")
    assert status == 1 and not doc["fits"]
    assert [layer["verdict"] for layer in layers(doc)] == ["ok", "ok"]  # each fits its own step
    (again,) = doc["stages"][0]["final_pass"]
    assert (again["index"], again["name"], again["verdict"], again["final_pass"]) == (0, "s0l0", "combine", True)
    assert again["workspace"] == {
        "rebuilt": False,
        "built_by": 1,
        "size_per_rank": 17_920,
        "max_num_tokens": 16,
        "eplb_stats_num_experts": 0,
    }
    assert again["arithmetic"]["combine_required_size"] == 19_200  # 6,912 + 2 x 8 x 768 > 17,920
    assert doc["first_failure"]["final_pass"] is True and doc["first_failure"]["index"] == 0
    assert again["error"]["message"] == COMBINE_MESSAGE
    status, doc = in_process(capsys, "explain", TOTAL_NEED_GAP, "--policy", "per_dimension", "--ep", "2")
    assert status == 0 and [o["verdict"] for o in doc["stages"][0]["final_pass"]] == ["ok"]


def test_explain_final_pass_text(capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_mnnvl.cli.main import main

    assert main(["explain", str(TOTAL_NEED_GAP), "--policy", "total", "--ep", "2"]) == 1
    out = capsys.readouterr().out
    assert "  final pass: 1 layer(s) again on the handle the stage ended with (17,920 B/rank, max T 16)" in out
    assert "    layer 0 's0l0' at T=8: dispatch fits, combine does not fit" in out
    assert "17,920 B per rank, max_num_tokens 16 (built at layer 1, the handle the stage ended with)" in out
    assert out.rstrip().endswith(
        "first: stage 0 layer 0 's0l0' (final pass: on the handle the stage ended with): "
        "dispatch fits, combine does not fit"
    )


def test_explain_observes_a_manager_no_policy_models() -> None:
    """A mutant that leaves the scale bytes out (PR #44946's bug): its real workspace, read from the sim."""
    status, doc = cli_json("explain", MEASURED_PLAN, "--manager", "mutant:scale_bytes_left_out")
    assert status == 1 and doc["policy"] is None
    base, head = layers(doc)
    assert base["workspace"]["size_per_rank"] == 5_427_584 - 2 * 256 * 256  # the NVFP4 scales are missing
    assert base["verdict"] == "combine" and base["first_failing_tokens"] == 250
    assert head["verdict"] == "ok"  # the later, larger bf16 layer hides the defect


def test_repro_failure_text(capsys: pytest.CaptureFixture[str]) -> None:
    """How ``repro`` prints the first failure (rendering only: the run itself is tested above)."""
    from pytest_mnnvl.cli import analysis, inputs, repro
    from pytest_mnnvl.conformance.observations import CallError, LayerStep, Phase
    from pytest_mnnvl.managers.adapters import StateRecord

    loaded = inputs.load_plan(str(MEASURED_PLAN))
    record = repro.StageRecord(0)
    held = StateRecord(True, 1, 5_427_584, 256, 2, 8)
    record.steps = [LayerStep(0, None, held, True, (), "ok"), LayerStep(1, None, held, False, ())]
    error = CallError("RuntimeError", COMBINE_MESSAGE)
    record.failure = (1, Phase.ROUND_TRIP, {0: error, 1: error})
    predicted = {0: analysis.walk_stage(loaded, 2, 0, repro._holdings(record, loaded.plan.layers_of_stage(0)))}
    repro._print_verdict(loaded, repro._first_failure({0: record}), predicted, 1.0)
    out = capsys.readouterr().out
    assert "FIRST FAILURE: stage 0, layer 1 'head' (mtp_head[0]), rank 0, combine:\n" in out
    assert f"\nRuntimeError: {COMBINE_MESSAGE}\nraised by rank(s) 0, 1\n" in out
    assert "dispatch fits, combine does not fit (the same text)" in out
    assert "combine               4,247,936 + 4,194,304 = 8,442,240 > 5,427,584 size per rank: FAILS" in out


# ---- bad input: one line naming the field and what is allowed, exit 2 ---------------------------------

GOOD = {"hidden_size": 4096, "top_k": 2, "num_experts": 8, "max_num_tokens": 64}


def _plan_file(tmp_path: Path, content: Any) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


BAD_PLANS: dict[str, tuple[Any, str]] = {
    "truncated JSON": ('{"stages": [[{"quant": "bf16"', "not valid JSON at line 1"),
    "not an object": ([1, 2], "a plan must be a JSON object"),
    "unknown format": (
        {"stages": [[{**GOOD, "quant": "fp6"}]]},
        "stages[0][0].quant: 'fp6' is not allowed: must be one of 'bf16', 'fp16', 'nvfp4', 'mxfp8', 'fp8_block'",
    ),
    "hidden 0": (
        {"stages": [[{**GOOD, "quant": "bf16", "hidden_size": 0}]]},
        "stages[0][0].hidden_size: 0 is not allowed",
    ),
    "nvfp4 hidden": ({"stages": [[{**GOOD, "quant": "nvfp4", "hidden_size": 4100}]]}, "nvfp4 needs a multiple of 16"),
    "top_k too big": (
        {"stages": [[{**GOOD, "quant": "bf16", "top_k": 23}]]},
        "top_k: 23 is not allowed: must be an integer in 1..22",
    ),
    "top_k > experts": ({"stages": [[{**GOOD, "quant": "bf16", "top_k": 10}]]}, "must be <= num_experts (8)"),
    "negative tokens": (
        {"stages": [[{**GOOD, "quant": "bf16", "max_num_tokens": -1}]]},
        "max_num_tokens: -1 is not allowed",
    ),
    "string size": (
        {"stages": [[{**GOOD, "quant": "bf16", "hidden_size": "4096"}]]},
        "hidden_size: '4096' is not allowed",
    ),
    "unknown key": (
        {"stages": [[{**GOOD, "quant": "bf16", "hidden": 1}]]},
        "stages[0][0].hidden: 'hidden' is not allowed: unknown key",
    ),
    "missing key": ({"stages": [[{"quant": "bf16"}]]}, "stages[0][0].hidden_size: None is not allowed: required"),
    "no stages": ({"stages": []}, "stages: [] is not allowed: must hold at least one stage"),
    "schema version": ({"schema_version": 2, "stages": [[]]}, "schema_version: 2 is not allowed: must be 1"),
    "kernel top_k": (
        {"stages": [[{**GOOD, "quant": "bf16", "top_k": 3}]]},
        "top_k: 3 is not allowed with --ep 2: FlashInfer's dispatch",
    ),
    "experts vs ep": (
        {"stages": [[{**GOOD, "quant": "bf16", "num_experts": 9}]]},
        "num_experts: 9 is not allowed with --ep 2",
    ),
    "repeat 0": ({"stages": [[{**GOOD, "quant": "bf16", "repeat": 0}]]}, "stages[0][0].repeat: 0 is not allowed"),
}


def assert_usage_error(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("case", sorted(BAD_PLANS))
def test_bad_plan(tmp_path: Path, case: str) -> None:
    content, fragment = BAD_PLANS[case]
    path = _plan_file(tmp_path, content)
    command = "predict" if case.startswith("t") else "explain"
    assert_usage_error(cli(command, path), fragment)


BAD_ARGUMENTS: dict[str, tuple[list[str | Path], str]] = {
    "missing file": (["explain", "no/such/plan.json"], "PLAN 'no/such/plan.json': no such file"),
    "directory": (["explain", "examples"], "is a directory"),
    "ep 0": (["explain", MEASURED_PLAN, "--ep", "0"], "argument --ep: 0 is not allowed: must be >= 1"),
    "ep 65": (["predict", MEASURED_PLAN, "--ep", "65"], "--ep 65: not allowed: must be an integer in 1..64"),
    "ep text": (["explain", MEASURED_PLAN, "--ep", "two"], "argument --ep: 'two' is not an integer"),
    "ep experts": (["explain", MEASURED_PLAN, "--ep", "3"], "stages[0][0].num_experts: 8 is not allowed with --ep 3"),
    "stage": (
        ["explain", MEASURED_PLAN, "--stage", "1"],
        "--stage 1: not allowed: the plan has 1 stage(s), allowed 0..0",
    ),
    "manager": (["explain", MEASURED_PLAN, "--manager", "bogus"], "--manager 'bogus': not allowed: must be reference"),
    "mutant": (["explain", MEASURED_PLAN, "--manager", "mutant:nope"], "there is no mutant named 'nope'"),
    "module": (["predict", MEASURED_PLAN, "--manager", "no_such_module:Cls"], "module 'no_such_module' not found"),
    "policy": (["explain", MEASURED_PLAN, "--policy", "max"], "argument --policy: invalid choice: 'max'"),
    "policy and observe": (["explain", MEASURED_PLAN, "--policy", "total", "--observe"], "not allowed together"),
    "backend": (["repro", MEASURED_PLAN, "--backend", "gpu"], "argument --backend: invalid choice: 'gpu' (choose from"),
    "timeout": (
        ["repro", MEASURED_PLAN, "--timeout", "-1"],
        "argument --timeout: -1 is not allowed; allowed: 1..86400",
    ),
    "command": (
        ["frobnicate", MEASURED_PLAN],
        "invalid choice: 'frobnicate' (choose from 'explain', 'predict', 'repro', 'list-plans')",
    ),
    "no command": ([], "the following arguments are required"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_arguments(case: str) -> None:
    args, fragment = BAD_ARGUMENTS[case]
    assert_usage_error(cli(*args), fragment)


def test_flashinfer_backend_without_gpus_is_a_usage_error() -> None:
    from pytest_mnnvl.probes.backend import missing_for_one_sided

    if missing_for_one_sided(2) is None:
        pytest.skip("this machine can run the flashinfer backend")
    assert_usage_error(
        cli("repro", MEASURED_PLAN, "--backend", "flashinfer"), "--backend flashinfer: cannot run 2 ranks"
    )


def test_a_saved_plan_round_trips_through_the_commands(tmp_path: Path) -> None:
    """What the conformance suite will save for a Hypothesis failure: ``ModelPlan.save`` output."""

    def layer(quant: QuantFormat) -> LayerSpec:
        return LayerSpec(quant, hidden_size=256, top_k=2, num_experts=4, max_num_tokens=16)

    plan = ModelPlan.split([layer(QuantFormat.NVFP4), layer(QuantFormat.BF16)] * 2, pp=2)
    path = tmp_path / "falsifying.json"
    plan.save(path)
    status, doc = cli_json("explain", path, *FIRST_CALL)
    assert status == 1 and [s["fits"] for s in doc["stages"]] == [False, False]
    assert cli("predict", path).returncode == 0


# ---- the plans shipped with the package, by name ---------------------------------------------------------


def cli_in(cwd: Path, *args: str | os.PathLike[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The CLI run from ``cwd`` (a directory with no plans in it, as a vendor's CI job is)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    command = [sys.executable, "-m", "pytest_mnnvl", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


PACKAGED = sorted(p.stem for p in (ROOT / "pytest_mnnvl" / "plans").glob("*.json"))


def test_a_packaged_plan_is_taken_by_name_from_any_directory(tmp_path: Path) -> None:
    by_name = cli_in(tmp_path, "explain", "deepseek-v3-r1-nvfp4-mtp", *FIRST_CALL, "--json")
    by_path = cli("explain", DEEPSEEK, *FIRST_CALL, "--json")
    assert by_name.returncode == by_path.returncode == 1, by_name.stderr
    named, pathed = json.loads(by_name.stdout), json.loads(by_path.stdout)
    assert named.pop("source") == str(ROOT / "pytest_mnnvl" / "plans" / "deepseek-v3-r1-nvfp4-mtp.json")
    pathed.pop("source")
    assert named == pathed
    repro = cli_in(tmp_path, "repro", "deepseek-v3-r1-nvfp4-mtp", *FIRST_CALL, timeout=240)
    assert repro.returncode == 1, repro.stdout[-2000:] + repro.stderr[-2000:]
    assert COMBINE_MESSAGE in repro.stdout


def test_an_unknown_plan_name_is_an_input_error_listing_the_packaged_ones(tmp_path: Path) -> None:
    done = cli_in(tmp_path, "repro", "deepseek-v9", *FIRST_CALL)
    assert_usage_error(
        done, "PLAN 'deepseek-v9': no packaged plan has this name and there is no such file", ", ".join(PACKAGED)
    )
    # A path is still a path: a missing file is named as one, not looked up among the packaged plans.
    assert_usage_error(cli_in(tmp_path, "explain", "deepseek-v9.json"), "PLAN 'deepseek-v9.json': no such file")


def test_list_plans_names_every_packaged_plan(tmp_path: Path) -> None:
    done = cli_in(tmp_path, "list-plans")
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()[:-1]] == PACKAGED
    assert "deepseek-v3-r1-nvfp4-mtp-pp2  pp 2   59 MoE layers" in done.stdout
    listed = json.loads(cli_in(tmp_path, "list-plans", "--json").stdout)["plans"]
    assert [p["name"] for p in listed] == PACKAGED
    for plan in listed:
        assert ModelPlan.load(Path(plan["path"])).name == plan["name"]
