"""The oracle's policy models against hand-worked cases (FlashInfer's sizing formula, vLLM's skip rule).

The first part is FlashInfer 0.7.2.post1's arithmetic (``release=V072`` given, so it holds whichever
release is installed); the second, 0.7.4's fixed regions."""

from __future__ import annotations

import pytest

from pytest_mnnvl.model import oracle, oracle_v074, releases
from pytest_mnnvl.model.layers import LayerSpec

V072, V074 = releases.V072, releases.V074

H = 4096


def layer(quant: str, tokens: int = 256, hidden: int = H) -> LayerSpec:
    return LayerSpec(quant, hidden_size=hidden, top_k=2, num_experts=8, max_num_tokens=tokens)


NVFP4, BF16 = layer("nvfp4"), layer("bf16")


def test_total_need_grows_to_the_bigger_layer_and_then_skips() -> None:
    steps = oracle.trajectory("total", [NVFP4, BF16, NVFP4, layer("nvfp4", 128)], 2, V072)
    assert [s.rebuilt for s in steps] == [True, True, False, False]
    assert [s.capacity.size_per_rank for s in steps] == [5_427_584, 8_442_240, 8_442_240, 8_442_240]
    assert steps[-1].served == (1, 2, 3)


def test_first_call_never_grows() -> None:
    steps = oracle.trajectory("first_call", [NVFP4, BF16], 2, V072)
    assert [s.rebuilt for s in steps] == [True, False]
    assert not oracle.covers(steps[1].capacity, BF16, 2, V072)


def test_total_leaves_the_cross_product_uncovered_per_dimension_covers_it() -> None:
    """research §1.1: bf16 at T=1024 then nvfp4 at T=2048 (ep=2, H=4096, top_k=2)."""
    layers = [layer("bf16", 1024), layer("nvfp4", 2048)]
    total = oracle.trajectory("total", layers, 2, V072)[-1].capacity
    per_dim = oracle.trajectory("per_dimension", layers, 2, V072)[-1].capacity
    assert total.size_per_rank == 43_417_984 and total.max_num_tokens == 2048
    assert oracle.cross_product_need(layers, 2, V072) == 67_535_232 > total.size_per_rank
    assert per_dim.size_per_rank == oracle.cross_product_need(layers, 2, V072)


def test_per_dimension_rebuilds_when_any_dimension_grows() -> None:
    # bf16 then nvfp4 at more tokens: total-need may skip or not; per-dimension must grow tokens.
    layers = [BF16, layer("nvfp4", 512), layer("bf16", 512)]
    assert [s.rebuilt for s in oracle.trajectory("per_dimension", layers, 2, V072)] == [True, True, False]
    assert [s.rebuilt for s in oracle.trajectory("total", layers, 2, V072)] == [True, True, True]
    assert oracle.minimal_rebuilds("total", layers, 2, V072) == 3


@pytest.mark.parametrize("policy", oracle.POLICIES)
def test_dominated_layers_never_rebuild(policy: str) -> None:
    big, small = layer("bf16", 512), layer("nvfp4", 256)
    assert oracle.dominates(big, small) and not oracle.dominates(small, big)
    assert [s.rebuilt for s in oracle.trajectory(policy, [big, small, small], 2, V072)] == [True, False, False]


def test_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown policy 'fancy'; allowed: total, per_dimension, first_call"):
        oracle.trajectory("fancy", [NVFP4], 2)


def test_total_need_leaves_a_layer_uncovered_after_a_token_growth() -> None:
    """The aux regions grow with the handle's max tokens: need() at the layer's own tokens is not enough."""
    wide, long = layer("bf16", 64), LayerSpec("nvfp4", hidden_size=1024, top_k=2, num_experts=8, max_num_tokens=128)
    steps = oracle.trajectory("total", [wide, long, wide], 2, V072)
    assert [s.rebuilt for s in steps] == [True, True, False]
    handle = steps[-1].capacity
    assert handle.size_per_rank >= wide.need(2) and handle.max_num_tokens >= wide.max_num_tokens
    assert not oracle.covers(handle, wide, 2, V072)
    per_dim = oracle.trajectory("per_dimension", [wide, long, wide], 2, V072)[-1].capacity
    assert oracle.covers(per_dim, wide, 2, V072) and oracle.covers(per_dim, long, 2, V072)


@pytest.mark.parametrize("policy", ["total", "per_dimension"])
def test_correct_policies_cover_each_layer_right_after_its_initialize(policy: str) -> None:
    layers = [NVFP4, BF16, layer("nvfp4", 512), layer("bf16", 128, hidden=7168)]
    for step, spec in zip(oracle.trajectory(policy, layers, 4, V072), layers, strict=True):
        assert oracle.covers(step.capacity, spec, 4, V072)


# ---- FlashInfer 0.7.4: fixed dispatch and combine regions, T x top_k tables ------------------------


def test_v074_need_is_the_hand_derived_layout() -> None:
    """ep 2, bf16 H=128, top_k 4, T 24 (tests/test_sim_v074.py walks the same layout by hand): dispatch region
    48*(256+32)+1024 = 14,848 bytes from 1024, combine region 48*128*2 = 12,288 from 16,128, row 28,416."""
    bf16 = LayerSpec("bf16", hidden_size=128, top_k=4, num_experts=8, max_num_tokens=24)
    assert oracle.need(bf16, 2, V074) == 28_416
    (step,) = oracle.trajectory("per_dimension", [bf16], 2, V074)
    layout = oracle_v074.layout_of(step.capacity)
    assert (layout.dispatch_payload_offset, layout.dispatch_payload_size) == (1024, 14_848)
    assert (layout.combine_input_offset, layout.combine_input_size) == (16_128, 12_288)
    assert oracle.covers(step.capacity, bf16, 2, V074)


def test_v074_first_call_fails_the_bf16_layer_at_dispatch() -> None:
    """NVFP4-sized (H 4096, T 256, ep 2), then bf16: 0.7.4's fixed dispatch region is what is short, by the
    numbers its kernel prints (tests/test_sim_v074.py: need 4,202,496 bytes, capacity 1,188,864)."""
    steps = oracle.trajectory("first_call", [NVFP4, BF16], 2, V074)
    assert [s.rebuilt for s in steps] == [True, False]
    assert not oracle.covers(steps[1].capacity, BF16, 2, V074)
    layout = oracle_v074.layout_of(steps[1].capacity)
    check = oracle_v074.dispatch_check(layout, BF16)
    assert (check.need, check.capacity) == (4_202_496, 1_188_864)
    assert oracle.requirement(BF16, 2, V074)["dispatch_capacity"] == ">= 4202496"


def test_v074_a_layer_cannot_borrow_dispatch_room_for_its_combine() -> None:
    """A handle with ample dispatch room but a narrow combine region: enough on 0.7.2 (its combine region
    starts after this call's payloads), not on 0.7.4 (the combine region is fixed: ep x T x 2H of its own)."""
    bf16 = LayerSpec("bf16", hidden_size=1024, top_k=2, num_experts=8, max_num_tokens=64)
    size_072, _ = oracle.arithmetic(V072).size_for(2, 64, 20_000, 1_000, 0, 2)
    assert oracle.covers(oracle.Capacity(size_072, 64), bf16, 2, V072)
    size, layout = oracle.arithmetic(V074).size_for(2, 64, 20_000, 1_000, 0, 2)
    handle = oracle.Capacity(size, 64, top_k=2, layout=layout)
    assert size > oracle.need(bf16, 2, V074)  # more bytes in all than the layer needs
    assert not oracle.covers(handle, bf16, 2, V074)
    assert oracle_v074.combine_check(oracle_v074.layout_of(handle), bf16).need == 2 * 64 * 1024 * 2
    # ... and a handle that grows in all but shrinks its combine region has shrunk on 0.7.4 only.
    narrow = oracle.trajectory("per_dimension", [bf16], 2, V074)[0].capacity
    assert oracle.shrunk(narrow, handle, V074)
    assert not oracle.shrunk(oracle.Capacity(narrow.size_per_rank, 64), oracle.Capacity(size, 64), V072)


def test_v074_top_k_and_tokens_must_fit_the_layout() -> None:
    (step,) = oracle.trajectory("per_dimension", [NVFP4], 2, V074)
    top4 = LayerSpec("nvfp4", hidden_size=H, top_k=4, num_experts=8, max_num_tokens=128)
    assert not oracle.covers(step.capacity, top4, 2, V074)  # fewer tokens, but top_k differs from the layout's
    assert not oracle.covers(step.capacity, layer("nvfp4", 257), 2, V074)
    assert oracle.covers(step.capacity, layer("nvfp4", 255), 2, V074)
    assert not oracle.covers(oracle.Capacity(0, 0), NVFP4, 2, V074)  # no handle serves nothing
    with pytest.raises(ValueError, match="need the handle's 33-field layout; this capacity has 0 fields"):
        oracle.covers(oracle.Capacity(5_427_584, 256), NVFP4, 2, V074)


def test_v074_per_dimension_covers_each_layer_and_the_cross_product() -> None:
    layers = [NVFP4, BF16, layer("nvfp4", 512), layer("bf16", 128, hidden=7168)]
    steps = oracle.trajectory("per_dimension", layers, 4, V074)
    for step, spec in zip(steps, layers, strict=True):
        assert oracle.covers(step.capacity, spec, 4, V074)
    assert steps[-1].capacity.size_per_rank == oracle.cross_product_need(layers, 4, V074)


def test_v074_total_need_cannot_be_followed() -> None:
    assert oracle.policies(V074) == ("per_dimension", "first_call")
    with pytest.raises(
        ValueError, match=r"policy 'total' cannot be followed on FlashInfer 0\.7\.4: .* takes no byte size"
    ):
        oracle.trajectory("total", [NVFP4], 2, V074)
