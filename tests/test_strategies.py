"""The conformance suite's drawn plans reach the real domain (issue 19) and stay valid and cheap.

Each reach test asks Hypothesis to *find* a drawn plan with the property; the fixed-list strategies before
issue 19 (max tokens 8..64, all even; hidden 128..512; ``top_k`` 2 or 4; 8 or 16 experts) have none, so
``find`` raises ``NoSuchExample`` there. The validity tests draw for EP sizes 2..8, as the suite does on
world sizes up to 16.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from pytest_mnnvl.conformance import strategies
from pytest_mnnvl.model import releases, sizing
from pytest_mnnvl.model.layers import LayerSpec, ModelPlan

#: Enough tries for every property below (each is met by well over 1 % of draws); derandomized, so a
#: failure reproduces.
FIND = settings(max_examples=2000, database=None, derandomize=True, suppress_health_check=list(HealthCheck))


def _layers(plan: ModelPlan) -> list[LayerSpec]:
    return [layer for _s, _i, layer in plan.iter_layers()]


def _find(condition: Callable[[ModelPlan], bool], pp: int = 1) -> ModelPlan:
    return find(strategies.model_plans(pp), condition, settings=FIND)


def test_draws_reach_odd_token_counts() -> None:
    plan = _find(lambda p: any(x.max_num_tokens % 2 for x in _layers(p)))
    assert any(x.max_num_tokens % 2 for x in _layers(plan))


def test_draws_reach_thousands_of_tokens() -> None:
    plan = _find(lambda p: any(x.max_num_tokens >= 1000 for x in _layers(p)))
    assert max(x.max_num_tokens for x in _layers(plan)) >= 1000


@pytest.mark.parametrize("wanted", [1, 6, 8, 22])
def test_draws_reach_top_k_outside_2_and_4(wanted: int) -> None:
    plan = _find(lambda p: _layers(p)[0].top_k == wanted)
    assert _layers(plan)[0].top_k == wanted


@pytest.mark.parametrize("wanted", [2880, 4096, 5120, 7168])
def test_draws_reach_real_hidden_sizes(wanted: int) -> None:
    plan = _find(lambda p: any(x.hidden_size == wanted for x in _layers(p)))
    assert wanted in {x.hidden_size for x in _layers(plan)}


def test_draws_reach_hundreds_of_experts() -> None:
    plan = _find(lambda p: _layers(p)[0].num_experts >= 256)
    assert _layers(plan)[0].num_experts >= 256


def test_draws_reach_a_real_size_mtp_head_with_another_hidden_size() -> None:
    def wanted(p: ModelPlan) -> bool:
        if not p.mtp_head:
            return False
        head = p.mtp_head[0].hidden_size
        return head >= 2880 and any(x.hidden_size != head for s in p.stages for x in s)

    assert wanted(_find(wanted, pp=2))


def test_draws_reach_tokens_and_bytes_moving_in_opposite_directions() -> None:
    """A later layer with more tokens and fewer dispatch bytes at a real hidden size (the ``asym`` family)."""

    def wanted(p: ModelPlan) -> bool:
        layers = p.layers_of_stage(0)
        return any(
            b.max_num_tokens > a.max_num_tokens
            and b.dispatch_bytes_per_token < a.dispatch_bytes_per_token
            and a.hidden_size >= 2880
            for a, b in itertools.pairwise(layers)
        )

    assert wanted(_find(wanted))


@settings(max_examples=300, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data(), ep=st.integers(2, 8), pp=st.integers(1, 2))
def test_every_draw_is_valid_for_the_installed_release_and_within_budget(data: st.DataObject, ep: int, pp: int) -> None:
    """Every drawn layer passes the installed release's EP checks and 0.7.2's payload alignment at every token
    count, one ``top_k``/``num_experts`` per plan, and every stage fits the sim's budgets (a layer never drops
    below one token to fit)."""
    plan = data.draw(strategies.model_plans(pp, ep_size=ep))
    layers = _layers(plan)
    assert len({(x.top_k, x.num_experts) for x in layers}) == 1
    for x in layers:
        x.validate_for_ep(ep)
        assert x.top_k in strategies.top_k_values(releases.current())
        for tokens in (1, 3, x.max_num_tokens):
            assert (
                sizing.misaligned_payload_error(
                    ep, tokens, x.dispatch_payload_bytes_per_token, x.dispatch_payload_element_sizes
                )
                is None
            ), x
    for s in range(plan.pp):
        stage = plan.layers_of_stage(s)
        cost, routes = strategies.stage_cost(stage)
        if max((x.max_num_tokens for x in stage), default=0) > 1:
            assert cost <= strategies.STAGE_BYTES_BUDGET and routes <= strategies.STAGE_ROUTES_BUDGET, stage


def test_within_budget_keeps_the_order_of_token_counts() -> None:
    big = LayerSpec("bf16", 7168, 8, 256, 4001, name="a")
    small = LayerSpec("nvfp4", 64, 8, 256, 999, name="b")
    scaled = strategies.within_budget([big, small])
    assert scaled[0].max_num_tokens > scaled[1].max_num_tokens >= 1
    assert strategies.stage_cost(scaled)[0] <= strategies.STAGE_BYTES_BUDGET
    assert strategies.within_budget([small]) == [LayerSpec("nvfp4", 64, 8, 256, 2048 // 8, name="b")]


def test_pinned_real_size_plans_fit_the_budget_unchanged() -> None:
    """The regression set is what the drawn domain reaches, so the budget never rewrites it."""
    for _why, plan in strategies.real_size_plans(2):
        for s in range(plan.pp):
            stage = list(plan.layers_of_stage(s))
            assert strategies.within_budget(stage) == stage, plan.name
