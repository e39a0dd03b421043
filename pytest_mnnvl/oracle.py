"""What a correct manager must (and may) do after each ``initialize``: the model observations meet.

Two growth policies are correct and ship today, and they give different sizes for the same plan:

- ``total`` (vLLM PR #42976, 0.32): keep the largest *total* need, ``max_l need(l)``, and the largest
  token count; rebuild when a layer needs more bytes or more tokens. Cheap, but the workspace may
  not cover a combination no layer had (``max T`` × ``max payload``).
- ``per_dimension`` (vLLM 0.33): keep the largest tokens, dispatch bytes and combine bytes
  separately and size for their product: more memory, and every combination is covered.

"Covers" is judged by FlashInfer's own host checks on the handle's real geometry, not by
``size >= need(layer)``: the aux regions (and so the payload offset) grow with the handle's *max
tokens*, so a layer whose ``need()`` at its own token count fits can still overflow a handle that
another layer built for more tokens. The ``total`` policy (vLLM 0.32) has exactly this gap: bf16 at
64 tokens, then nvfp4 at 128 tokens (rebuilt at the same byte size for 128 tokens), then the bf16
layer again fails combine (``examples/plans/total-need-gap.json``). It stays latent in vLLM because
every layer there gets the same max tokens.

So the MUST invariants are policy-free (the live handle covers the layer; capacity never shrinks;
a layer dominated by one the handle already serves changes nothing), and the policy models below
only answer the SHOULD questions: how many rebuilds the declared policy needs at least, and what
the cross-product need is. Pure Python: the parent checks observations with it, and the
explain/predict tools walk plans with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pytest_mnnvl import sizing
from pytest_mnnvl.layers import LayerSpec

POLICIES = ("total", "per_dimension", "first_call")


@dataclass(frozen=True)
class Capacity:
    """What a handle is built for: bytes per rank and max tokens, plus the largest per-token bytes."""

    size_per_rank: int
    max_num_tokens: int
    dispatch_bytes_per_token: int = 0
    combine_bytes_per_token: int = 0
    eplb_stats_num_experts: int = 0

    def geometry(self, ep_size: int) -> sizing.WorkspaceGeometry:
        """What FlashInfer's host checks see of a handle built for this capacity."""
        return sizing.WorkspaceGeometry(ep_size, self.max_num_tokens, self.size_per_rank, self.eplb_stats_num_experts)


@dataclass(frozen=True)
class Step:
    """The expected outcome of one ``initialize`` call under a policy."""

    layer_index: int
    rebuilt: bool
    capacity: Capacity
    #: Index of the layer whose ``initialize`` built the live handle. An index, not the list of layers served:
    #: a tuple per step grew with the plan, and memory with the square of its layer count.
    built_by: int = 0

    @property
    def served(self) -> tuple[int, ...]:
        """The layers the live handle has served, this one included (they are consecutive)."""
        return tuple(range(self.built_by, self.layer_index + 1))


def need(layer: LayerSpec, ep_size: int) -> int:
    """FlashInfer's bytes per rank for ``layer`` at its own max tokens."""
    return layer.need(ep_size)


def dominates(big: LayerSpec, small: LayerSpec) -> bool:
    """``big`` needs at least as much as ``small`` in every dimension (tokens, dispatch, combine)."""
    return (
        big.max_num_tokens >= small.max_num_tokens
        and big.dispatch_bytes_per_token >= small.dispatch_bytes_per_token
        and big.combine_bytes_per_token >= small.combine_bytes_per_token
        and big.eplb_stats_num_experts >= small.eplb_stats_num_experts
    )


def dominated_by_any(layer: LayerSpec, served: Iterable[LayerSpec]) -> bool:
    """The no-needless-rebuild premise: one layer the live handle already serves dominates ``layer``."""
    return any(dominates(other, layer) for other in served)


def cross_product_need(layers: Sequence[LayerSpec], ep_size: int) -> int:
    """Bytes per rank covering max tokens × max dispatch × max combine of all ``layers``."""
    return sizing.workspace_size_per_rank(
        ep_size,
        max(layer.max_num_tokens for layer in layers),
        max(layer.dispatch_bytes_per_token for layer in layers),
        max(layer.combine_bytes_per_token for layer in layers),
        max(layer.eplb_stats_num_experts for layer in layers),
    )


def covers(capacity: Capacity, layer: LayerSpec, ep_size: int) -> bool:
    """The MUST: at the layer's full token count, dispatch and combine both pass on this handle."""
    if capacity.max_num_tokens < layer.max_num_tokens:
        return False
    return sizing.layer_round_trip(layer, capacity.geometry(ep_size), layer.max_num_tokens).fits


def _total(prev: Capacity | None, layer: LayerSpec, ep: int) -> Capacity | None:
    """``None`` when the live handle is kept."""
    want = need(layer, ep)
    if prev is not None and want <= prev.size_per_rank and layer.max_num_tokens <= prev.max_num_tokens:
        return None
    size = max(want, prev.size_per_rank if prev else 0)
    tokens = max(layer.max_num_tokens, prev.max_num_tokens if prev else 0)
    eplb = max(layer.eplb_stats_num_experts, prev.eplb_stats_num_experts if prev else 0)
    return Capacity(size, tokens, eplb_stats_num_experts=eplb)


def _per_dimension(prev: Capacity | None, layer: LayerSpec, ep: int) -> Capacity | None:
    if prev is not None and (
        layer.max_num_tokens <= prev.max_num_tokens
        and layer.dispatch_bytes_per_token <= prev.dispatch_bytes_per_token
        and layer.combine_bytes_per_token <= prev.combine_bytes_per_token
    ):
        return None
    tokens = max(layer.max_num_tokens, prev.max_num_tokens if prev else 0)
    dispatch = max(layer.dispatch_bytes_per_token, prev.dispatch_bytes_per_token if prev else 0)
    combine = max(layer.combine_bytes_per_token, prev.combine_bytes_per_token if prev else 0)
    eplb = max(layer.eplb_stats_num_experts, prev.eplb_stats_num_experts if prev else 0)
    size = sizing.workspace_size_per_rank(ep, tokens, dispatch, combine, eplb)
    return Capacity(size, tokens, dispatch, combine, eplb)


def _first_call(prev: Capacity | None, layer: LayerSpec, ep: int) -> Capacity | None:
    """vLLM before PR #42976: the first layer sizes the workspace for good (a known-bad policy)."""
    if prev is not None:
        return None
    return Capacity(need(layer, ep), layer.max_num_tokens, eplb_stats_num_experts=layer.eplb_stats_num_experts)


_STEPS = {"total": _total, "per_dimension": _per_dimension, "first_call": _first_call}


def trajectory(policy: str, layers: Sequence[LayerSpec], ep_size: int) -> list[Step]:
    """The decisions ``policy`` takes for ``layers`` in order, starting uninitialized."""
    if policy not in _STEPS:
        raise ValueError(f"unknown policy {policy!r}; allowed: {', '.join(POLICIES)}")
    step_fn = _STEPS[policy]
    steps: list[Step] = []
    capacity: Capacity | None = None
    built_by = 0
    for index, layer in enumerate(layers):
        grown = step_fn(capacity, layer, ep_size)
        if grown is not None:
            capacity, built_by = grown, index
        assert capacity is not None
        steps.append(Step(index, grown is not None, capacity, built_by))
    return steps


def minimal_rebuilds(policy: str, layers: Sequence[LayerSpec], ep_size: int) -> int:
    """Builds (the first included) the declared policy needs for ``layers``."""
    return sum(step.rebuilt for step in trajectory(policy, layers, ep_size))
