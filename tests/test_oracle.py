"""The oracle's policy models against hand-worked cases (FACTS §1, research §1.1 and §4.4)."""

from __future__ import annotations

import pytest

from pytest_mnnvl import oracle
from pytest_mnnvl.layers import LayerSpec

H = 4096


def layer(quant: str, tokens: int = 256, hidden: int = H) -> LayerSpec:
    return LayerSpec(quant, hidden_size=hidden, top_k=2, num_experts=8, max_num_tokens=tokens)


NVFP4, BF16 = layer("nvfp4"), layer("bf16")


def test_total_need_grows_to_the_bigger_layer_and_then_skips() -> None:
    steps = oracle.trajectory("total", [NVFP4, BF16, NVFP4, layer("nvfp4", 128)], 2)
    assert [s.rebuilt for s in steps] == [True, True, False, False]
    assert [s.capacity.size_per_rank for s in steps] == [5_427_584, 8_442_240, 8_442_240, 8_442_240]
    assert steps[-1].served == (1, 2, 3)


def test_first_call_never_grows() -> None:
    steps = oracle.trajectory("first_call", [NVFP4, BF16], 2)
    assert [s.rebuilt for s in steps] == [True, False]
    assert not oracle.covers(steps[1].capacity, BF16, 2)


def test_total_leaves_the_cross_product_uncovered_per_dimension_covers_it() -> None:
    """research §1.1: bf16 at T=1024 then nvfp4 at T=2048 (ep=2, H=4096, top_k=2)."""
    layers = [layer("bf16", 1024), layer("nvfp4", 2048)]
    total = oracle.trajectory("total", layers, 2)[-1].capacity
    per_dim = oracle.trajectory("per_dimension", layers, 2)[-1].capacity
    assert total.size_per_rank == 43_417_984 and total.max_num_tokens == 2048
    assert oracle.cross_product_need(layers, 2) == 67_535_232 > total.size_per_rank
    assert per_dim.size_per_rank == oracle.cross_product_need(layers, 2)


def test_per_dimension_rebuilds_when_any_dimension_grows() -> None:
    # bf16 then nvfp4 at more tokens: total-need may skip or not; per-dimension must grow tokens.
    layers = [BF16, layer("nvfp4", 512), layer("bf16", 512)]
    assert [s.rebuilt for s in oracle.trajectory("per_dimension", layers, 2)] == [True, True, False]
    assert [s.rebuilt for s in oracle.trajectory("total", layers, 2)] == [True, True, True]
    assert oracle.minimal_rebuilds("total", layers, 2) == 3


@pytest.mark.parametrize("policy", oracle.POLICIES)
def test_dominated_layers_never_rebuild(policy: str) -> None:
    big, small = layer("bf16", 512), layer("nvfp4", 256)
    assert oracle.dominates(big, small) and not oracle.dominates(small, big)
    assert [s.rebuilt for s in oracle.trajectory(policy, [big, small, small], 2)] == [True, False, False]


def test_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown policy 'fancy'; allowed: total, per_dimension, first_call"):
        oracle.trajectory("fancy", [NVFP4], 2)


def test_total_need_leaves_a_layer_uncovered_after_a_token_growth() -> None:
    """The aux regions grow with the handle's max tokens: need() at the layer's own tokens is not enough."""
    wide, long = layer("bf16", 64), LayerSpec("nvfp4", hidden_size=1024, top_k=2, num_experts=8, max_num_tokens=128)
    steps = oracle.trajectory("total", [wide, long, wide], 2)
    assert [s.rebuilt for s in steps] == [True, True, False]
    handle = steps[-1].capacity
    assert handle.size_per_rank >= wide.need(2) and handle.max_num_tokens >= wide.max_num_tokens
    assert not oracle.covers(handle, wide, 2)
    per_dim = oracle.trajectory("per_dimension", [wide, long, wide], 2)[-1].capacity
    assert oracle.covers(per_dim, wide, 2) and oracle.covers(per_dim, long, 2)


@pytest.mark.parametrize("policy", ["total", "per_dimension"])
def test_correct_policies_cover_each_layer_right_after_its_initialize(policy: str) -> None:
    layers = [NVFP4, BF16, layer("nvfp4", 512), layer("bf16", 128, hidden=7168)]
    for step, spec in zip(oracle.trajectory(policy, layers, 4), layers, strict=True):
        assert oracle.covers(step.capacity, spec, 4)
