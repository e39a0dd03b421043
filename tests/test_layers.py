"""LayerSpec payload layouts and validation; ModelPlan stages, PP split and plan JSON."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from pytest_mnnvl.model import releases
from pytest_mnnvl.model.layers import (
    PLAN_SCHEMA_VERSION,
    SUPPORTED_KERNEL_TOP_K,
    DispatchPayload,
    LayerSpec,
    LayerSpecError,
    ModelPlan,
    PlanError,
    QuantFormat,
    pp_partition,
)
from pytest_mnnvl.model.sizing import MAX_TOP_K

H = 4096


def layer(quant: str = "nvfp4", **kw: Any) -> LayerSpec:
    args: dict[str, Any] = {"hidden_size": H, "top_k": 8, "num_experts": 64, "max_num_tokens": 256}
    args.update(kw)
    return LayerSpec(QuantFormat(quant), **args)


# ---- bytes per token -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quant", "hidden", "extra", "activation", "scales"),
    [
        ("bf16", H, {}, 2 * H, 0),
        ("fp16", H, {}, 2 * H, 0),
        ("nvfp4", H, {}, H // 2, H // 16),
        ("nvfp4", 7168, {}, 3584, 448),
        ("mxfp8", H, {}, H, H // 32),
        ("mxfp8", 2880, {}, 2880, 90),
        ("mxfp8", 2880, {"mx_alignment": 256}, 2880, 3072 // 32),  # vLLM pads H to mx_alignment
        ("mxfp8", 3072, {"mx_alignment": 256}, 3072, 96),
        ("fp8_block", 7168, {}, 7168, (7168 // 128) * 4),
    ],
)
def test_activation_and_scale_bytes(
    quant: str, hidden: int, extra: dict[str, int], activation: int, scales: int
) -> None:
    spec = layer(quant, hidden_size=hidden, **extra)
    assert spec.activation_bytes_per_token == activation
    assert spec.scale_bytes_per_token == scales
    assert spec.combine_bytes_per_token == 2 * hidden
    assert spec.dispatch_bytes_per_token == activation + scales + 8 * 4 + 8 * 4


@pytest.mark.parametrize(
    ("quant", "payloads"),
    [
        ("bf16", [("hidden_states", 2 * H, 2), ("topk_ids", 32, 4), ("topk_weights", 32, 4)]),
        ("nvfp4", [("hidden_states", H // 2, 1), ("scales", H // 16, 1), ("topk_ids", 32, 4), ("topk_weights", 32, 4)]),
        ("mxfp8", [("hidden_states", H, 1), ("scales", H // 32, 1), ("topk_ids", 32, 4), ("topk_weights", 32, 4)]),
        ("fp8_block", [("hidden_states", H, 1), ("scales", H // 32, 4), ("topk_ids", 32, 4), ("topk_weights", 32, 4)]),
    ],
)
def test_dispatch_payloads_in_vllm_order(quant: str, payloads: list[tuple[str, int, int]]) -> None:
    spec = layer(quant)
    assert spec.dispatch_payloads == tuple(DispatchPayload(*p) for p in payloads)
    assert spec.dispatch_payload_bytes_per_token == tuple(p[1] for p in payloads)
    assert spec.dispatch_payload_element_sizes == tuple(p[2] for p in payloads)


def test_extra_payload_goes_last() -> None:
    spec = layer("bf16", top_k=2, extra_payload_bytes_per_token=24)
    assert spec.dispatch_payloads[-1] == DispatchPayload("extra", 24, 1)
    assert spec.dispatch_bytes_per_token == 2 * H + 8 + 8 + 24


@pytest.mark.parametrize(
    ("quant", "extra", "format_bytes", "moe_ep_extra", "fi_name"),
    [
        ("bf16", {}, 2 * H, 0, "BF16"),
        ("fp16", {}, 2 * H, 0, "FP16"),
        ("nvfp4", {}, H // 2 + H // 16, 0, "NVFP4"),
        ("fp8_block", {}, H + 4 * (H // 128), 0, "DeepSeekFp8"),
        ("mxfp8", {"hidden_size": 2880, "mx_alignment": 256}, 2880 + 90, 6, "MXFP8"),
        ("mxfp8", {"extra_payload_bytes_per_token": 16}, H + H // 32, 16, "MXFP8"),
    ],
)
def test_flashinfer_format_sizing(
    quant: str, extra: dict[str, int], format_bytes: int, moe_ep_extra: int, fi_name: str
) -> None:
    spec = layer(quant, **extra)
    assert spec.quant.flashinfer_name == fi_name
    assert spec.flashinfer_format_bytes_per_token == format_bytes
    assert spec.moe_ep_extra_payload_bytes_per_token == moe_ep_extra


@pytest.mark.parametrize(
    ("ep", "quant", "expected"),
    [(2, "nvfp4", 5_427_584), (2, "bf16", 8_442_240), (4, "nvfp4", 10_809_728), (4, "bf16", 16_839_040)],
)
def test_need_matches_measured(ep: int, quant: str, expected: int) -> None:
    assert layer(quant, top_k=2, num_experts=8).need(ep) == expected


def test_need_grows_with_eplb() -> None:
    assert layer(eplb_stats_num_experts=64).need(2) == layer().need(2) + 512


def test_quant_accepts_json_string() -> None:
    spec = LayerSpec("mxfp8", 64, 2, 4, 8)  # type: ignore[arg-type]
    assert spec.quant is QuantFormat.MXFP8
    assert [q.value for q in QuantFormat] == ["bf16", "fp16", "nvfp4", "mxfp8", "fp8_block"]


# ---- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field", "allowed"),
    [
        ({"quant": "int4"}, "quant", "one of"),
        ({"quant": 3}, "quant", "one of"),
        ({"hidden_size": 0}, "hidden_size", ">= 1"),
        ({"hidden_size": 4096.0}, "hidden_size", "integer"),
        ({"quant": "nvfp4", "hidden_size": 4104}, "hidden_size", "multiple of 16"),
        ({"quant": "mxfp8", "hidden_size": 4112}, "hidden_size", "multiple of 32"),
        ({"quant": "fp8_block", "hidden_size": 4160}, "hidden_size", "multiple of 128"),
        ({"top_k": 0}, "top_k", "1..22"),
        ({"top_k": MAX_TOP_K + 1}, "top_k", "1..22"),
        ({"top_k": True}, "top_k", "integer"),
        ({"top_k": 8, "num_experts": 4}, "top_k", "num_experts"),
        ({"num_experts": 0}, "num_experts", ">= 1"),
        ({"max_num_tokens": 0}, "max_num_tokens", ">= 1"),
        ({"max_num_tokens": -5}, "max_num_tokens", ">= 1"),
        ({"name": 5}, "name", "string"),
        ({"extra_payload_bytes_per_token": -1}, "extra_payload_bytes_per_token", ">= 0"),
        ({"eplb_stats_num_experts": -1}, "eplb_stats_num_experts", ">= 0"),
        ({"eplb_stats_num_experts": 65}, "eplb_stats_num_experts", "num_experts"),
        ({"mx_alignment": 256}, "mx_alignment", "mxfp8 only"),
        ({"quant": "mxfp8", "mx_alignment": 48}, "mx_alignment", "multiple of 32"),
        ({"quant": "mxfp8", "mx_alignment": -32}, "mx_alignment", ">= 0"),
    ],
)
def test_layer_validation(kwargs: dict[str, Any], field: str, allowed: str) -> None:
    args: dict[str, Any] = {"quant": "bf16", "hidden_size": H, "top_k": 8, "num_experts": 64, "max_num_tokens": 256}
    args.update(kwargs)
    with pytest.raises(LayerSpecError, match=f"^{field}=") as info:
        LayerSpec(**args)
    err = info.value
    assert err.field == field
    assert err.value == args[field]
    assert allowed in err.allowed
    assert isinstance(err, ValueError)


def test_layer_error_names_layer() -> None:
    with pytest.raises(LayerSpecError, match=r"^layer 'mtp': top_k=0 is not allowed"):
        LayerSpec(QuantFormat.BF16, H, 0, 8, 1, name="mtp")


@pytest.mark.parametrize(
    ("kwargs", "ep", "field", "allowed"),
    [
        ({}, 0, "ep_size", "1..64"),
        ({}, 65, "ep_size", "1..64"),
        ({"num_experts": 60}, 8, "num_experts", "multiple of ep_size (8)"),
        ({"top_k": 3}, 2, "top_k", "supports only"),
        ({"top_k": 20}, 2, "top_k", "supports only"),
    ],
)
def test_validate_for_ep(kwargs: dict[str, Any], ep: int, field: str, allowed: str) -> None:
    spec = layer(**kwargs)
    with pytest.raises(LayerSpecError, match=f"^{field}=") as info:
        spec.validate_for_ep(ep, releases.V072)
    assert allowed in info.value.allowed


@pytest.mark.parametrize("top_k", sorted(SUPPORTED_KERNEL_TOP_K))
def test_validate_for_ep_accepts_kernel_top_k(top_k: int) -> None:
    layer(top_k=top_k).validate_for_ep(4, releases.V072)


@pytest.mark.parametrize(
    ("kwargs", "ep", "release", "message"),
    [
        (
            {"top_k": 3},
            2,
            releases.V072,
            "top_k=3 is not allowed: FlashInfer's dispatch kernel (0.7.2.post1) supports only "
            "[1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 22]",
        ),
        (
            {"top_k": 5},
            2,
            releases.V074,
            "top_k=5 is not allowed: FlashInfer's NVLinkOneSidedAlltoAll (0.7.4) supports only top_k in "
            "[1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 18, 22]",
        ),
        ({}, 257, releases.V074, "ep_size=257 is not allowed: must be an integer in 1..256 (FlashInfer 0.7.4)"),
        (
            {"num_experts": 60},
            8,
            releases.V074,
            "num_experts=60 is not allowed: must be a positive multiple of ep_size (8): FlashInfer 0.7.4's "
            "MoEEpCommunication requires num_experts divisible by the EP size",
        ),
    ],
)
def test_validate_for_ep_names_the_release_rule(kwargs: dict[str, Any], ep: int, release: str, message: str) -> None:
    """A layer only one release can express is a clear error on the other, naming that release's rule."""
    with pytest.raises(LayerSpecError) as info:
        layer(**kwargs).validate_for_ep(ep, release)
    assert str(info.value) == message


def test_validate_for_ep_accepts_what_only_0_7_4_expresses() -> None:
    layer(top_k=3).validate_for_ep(2, releases.V074)  # 0.7.4's kernels added top_k 3
    layer(num_experts=128).validate_for_ep(128, releases.V074)  # kMaxRanks 256 (0.7.2: 64)
    with pytest.raises(LayerSpecError, match=r"ep_size=128 is not allowed: must be an integer in 1\.\.64"):
        layer(num_experts=128).validate_for_ep(128, releases.V072)


def test_supported_top_k_set() -> None:
    assert sorted(SUPPORTED_KERNEL_TOP_K) == [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 22]


# ---- ModelPlan ----------------------------------------------------------------------------------


BASE = layer("nvfp4", hidden_size=7168, num_experts=256, name="moe")
MTP = layer("bf16", hidden_size=7168, num_experts=256, name="mtp")


@pytest.mark.parametrize(
    ("num_layers", "pp", "counts"),
    [
        (58, 1, (58,)),
        (58, 2, (29, 29)),
        (61, 2, (31, 30)),
        (61, 4, (15, 15, 16, 15)),  # remainder 1 goes to the stage before the last
        (63, 4, (16, 16, 16, 15)),
        (62, 4, (15, 16, 16, 15)),
        (10, 3, (3, 4, 3)),
        (1, 2, (1, 0)),
        (0, 3, (0, 0, 0)),
        (3, 4, (1, 1, 1, 0)),
    ],
)
def test_pp_partition_like_vllm(num_layers: int, pp: int, counts: tuple[int, ...]) -> None:
    assert pp_partition(num_layers, pp) == counts
    plan = ModelPlan.split([BASE] * num_layers, pp)
    assert tuple(len(s) for s in plan.stages) == counts


def test_split_keeps_order_and_mtp_on_last_stage() -> None:
    layers = [dataclasses.replace(BASE, name=f"l{i}") for i in range(5)]
    plan = ModelPlan.split(layers, 2, mtp_head=[MTP], name="p")
    assert plan.pp == 2
    assert [x.name for x in plan.stages[0]] == ["l0", "l1", "l2"]
    assert [x.name for x in plan.layers_of_stage(0)] == ["l0", "l1", "l2"]
    assert [x.name for x in plan.layers_of_stage(1)] == ["l3", "l4", "mtp"]
    assert [(s, i, x.name) for s, i, x in plan.iter_layers()][-1] == (1, 2, "mtp")


def test_single_stage_and_empty_stage() -> None:
    plan = ModelPlan.single_stage([BASE, BASE], mtp_head=(MTP,))
    assert plan.pp == 1 and plan.layers_of_stage(0) == (BASE, BASE, MTP)
    empty_first = ModelPlan(((), (BASE,)))
    assert empty_first.layers_of_stage(0) == ()
    assert ModelPlan.from_json(empty_first.to_json()) == empty_first


@pytest.mark.parametrize("stage", [-1, 2, "0"])
def test_layers_of_stage_bad_index(stage: Any) -> None:
    with pytest.raises(PlanError, match="stage"):
        ModelPlan(((BASE,), (BASE,))).layers_of_stage(stage)


@pytest.mark.parametrize(
    ("build", "path"),
    [
        (lambda: ModelPlan(()), "stages"),
        (lambda: ModelPlan("abc"), "stages"),  # type: ignore[arg-type]
        (lambda: ModelPlan(((BASE, "x"),)), r"stages\[0\]\[1\]"),  # type: ignore[arg-type]
        (lambda: ModelPlan(((BASE,),), mtp_head=(1,)), r"mtp_head\[0\]"),  # type: ignore[arg-type]
        (lambda: ModelPlan(((BASE,),), name=3), "name"),  # type: ignore[arg-type]
        (lambda: ModelPlan.split([BASE], 0), "pp"),
    ],
)
def test_plan_construction_errors(build: Any, path: str) -> None:
    with pytest.raises(PlanError, match=path):
        build()


def test_lists_become_tuples() -> None:
    plan = ModelPlan([[BASE]], mtp_head=[MTP])  # type: ignore[arg-type]
    assert plan.stages == ((BASE,),) and plan.mtp_head == (MTP,)
    hash(plan)


# ---- JSON ---------------------------------------------------------------------------------------


def test_json_round_trip_compact() -> None:
    other = layer(
        "fp8_block", hidden_size=7168, num_experts=256, eplb_stats_num_experts=256, extra_payload_bytes_per_token=16
    )
    plan = ModelPlan(
        ((BASE,) * 30, (BASE,) * 28 + (other,)), mtp_head=(MTP,), name="dsr1", description="58 NVFP4 layers + MTP"
    )
    data = plan.to_dict()
    assert data["schema_version"] == PLAN_SCHEMA_VERSION
    assert data["stages"][0] == [{**BASE.to_dict(), "repeat": 30}]
    assert len(data["stages"][1]) == 2 and data["stages"][1][1]["eplb_stats_num_experts"] == 256
    assert "mx_alignment" not in data["stages"][1][1]  # defaults are left out
    assert ModelPlan.from_dict(data) == plan
    assert ModelPlan.from_json(plan.to_json()) == plan
    assert ModelPlan.from_json(plan.to_json(indent=None)) == plan


def test_repeat_and_defaults_shorthand() -> None:
    text = json.dumps(
        {
            "name": "x",
            "defaults": {"hidden_size": 7168, "top_k": 8, "num_experts": 256, "max_num_tokens": 256},
            "stages": [[{"quant": "nvfp4", "repeat": 58, "name": "moe"}]],
            "mtp_head": [{"quant": "bf16", "name": "mtp"}],
        }
    )
    plan = ModelPlan.from_json(text)
    assert len(plan.stages[0]) == 58 and set(plan.stages[0]) == {BASE}
    assert plan.mtp_head == (MTP,)
    assert plan.layers_of_stage(0)[-1] == MTP
    assert plan.description == ""


def test_save_and_load(tmp_path: Path) -> None:
    plan = ModelPlan.split([BASE] * 5, 2, mtp_head=[MTP])
    path = tmp_path / "plan.json"
    plan.save(path)
    assert ModelPlan.load(path) == plan
    assert path.read_text().endswith("}\n")


def test_load_error_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"stages": [[{"quant": "nvfp5"}]]}')
    with pytest.raises(PlanError) as info:
        ModelPlan.load(path)
    assert info.value.path == "stages[0][0].quant"
    assert info.value.source == str(path)
    assert str(path) in str(info.value)


GOOD = {"quant": "bf16", "hidden_size": 64, "top_k": 2, "num_experts": 4, "max_num_tokens": 8}


@pytest.mark.parametrize(
    ("doc", "path", "value", "allowed"),
    [
        ([], "", [], "JSON object"),
        ({"stages": [[GOOD]], "schema_version": 2}, "schema_version", 2, "must be 1"),
        ({"stages": [[GOOD]], "version": 1}, "version", "version", "allowed keys: schema_version"),
        ({}, "stages", None, "required"),
        ({"stages": []}, "stages", [], "at least one stage"),
        ({"stages": {"0": []}}, "stages", {"0": []}, "JSON array"),
        ({"stages": [[GOOD], 5]}, "stages[1]", 5, "JSON array"),
        ({"stages": [[GOOD, "x"]]}, "stages[0][1]", "x", "JSON object"),
        ({"stages": [[GOOD, {**GOOD, "quant": "int4"}]]}, "stages[0][1].quant", "int4", "'nvfp4'"),
        ({"stages": [[], [GOOD, GOOD, GOOD, {**GOOD, "quant": "fp4"}]]}, "stages[1][3].quant", "fp4", "'bf16'"),
        ({"stages": [[{**GOOD, "top_k": 23}]]}, "stages[0][0].top_k", 23, "1..22"),
        ({"stages": [[{**GOOD, "top_k": 8}]]}, "stages[0][0].top_k", 8, "num_experts (4)"),
        ({"stages": [[{**GOOD, "hidden_size": "64"}]]}, "stages[0][0].hidden_size", "64", "integer"),
        ({"stages": [[{**GOOD, "max_num_tokens": 8.0}]]}, "stages[0][0].max_num_tokens", 8.0, "integer"),
        ({"stages": [[{**GOOD, "top_k": True}]]}, "stages[0][0].top_k", True, "integer"),
        (
            {"stages": [[{**GOOD, "quant": "nvfp4", "hidden_size": 72}]]},
            "stages[0][0].hidden_size",
            72,
            "multiple of 16",
        ),
        ({"stages": [[{**GOOD, "topk": 2}]]}, "stages[0][0].topk", "topk", "allowed keys: quant"),
        ({"stages": [[{k: v for k, v in GOOD.items() if k != "top_k"}]]}, "stages[0][0].top_k", None, "required"),
        ({"stages": [[{**GOOD, "repeat": 0}]]}, "stages[0][0].repeat", 0, ">= 1"),
        ({"stages": [[{**GOOD, "repeat": "2"}]]}, "stages[0][0].repeat", "2", ">= 1"),
        ({"stages": [[{**GOOD, "name": 7}]]}, "stages[0][0].name", 7, "string"),
        ({"stages": [[GOOD]], "mtp_head": [{**GOOD, "num_experts": 0}]}, "mtp_head[0].num_experts", 0, ">= 1"),
        ({"stages": [[GOOD]], "mtp_head": {}}, "mtp_head", {}, "JSON array"),
        ({"stages": [[GOOD]], "name": 1}, "name", 1, "string"),
        ({"stages": [[GOOD]], "description": None}, "description", None, "string"),
        ({"stages": [[GOOD]], "defaults": []}, "defaults", [], "JSON object"),
        ({"stages": [[GOOD]], "defaults": {"repeat": 2}}, "defaults.repeat", "repeat", "allowed keys"),
        ({"stages": [[GOOD]], "defaults": {"name": "a"}}, "defaults.name", "name", "allowed keys"),
        (
            {"defaults": {**GOOD, "top_k": 0}, "stages": [[{"name": "a"}]]},
            "defaults.top_k (used by stages[0][0])",
            0,
            "1..22",
        ),
        (
            {"defaults": {**GOOD, "quant": "x"}, "stages": [[{"name": "a"}]]},
            "defaults.quant (used by stages[0][0])",
            "x",
            "one of",
        ),
    ],
)
def test_plan_json_errors(doc: Any, path: str, value: Any, allowed: str) -> None:
    with pytest.raises(PlanError) as info:
        ModelPlan.from_json(json.dumps(doc))
    err = info.value
    assert err.path == path
    assert err.value == value and type(err.value) is type(value)
    assert allowed in err.allowed
    assert f"{path or '<plan>'}: {value!r} is not allowed" in str(err)


def test_invalid_json_text() -> None:
    with pytest.raises(PlanError, match="valid JSON"):
        ModelPlan.from_json("{stages: ")


def test_the_suite_draws_only_layers_every_release_expresses() -> None:
    """strategies.py's pinned plans and pairs are valid on every supported FlashInfer release, and the ``top_k``
    values it draws for a release are valid on that release (tests/test_strategies.py checks whole draws)."""
    from pytest_mnnvl.conformance import strategies

    pinned = [
        layer for pp in (1, 2) for _why, plan in strategies.known_failures(pp) for _s, _i, layer in plan.iter_layers()
    ]
    pairs = [*strategies.mismatch_pair("top_k"), *strategies.mismatch_pair("num_experts"), *strategies.growth_pair()]
    for release in releases.SUPPORTED:
        drawn = [layer(top_k=k, num_experts=8 * 22) for k in strategies.top_k_values(release)]
        for ep in (2, 4, 8):
            for spec in [*drawn, *pinned, *pairs]:
                spec.validate_for_ep(ep, release)
