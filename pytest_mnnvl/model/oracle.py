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

The arithmetic is the installed FlashInfer release's (:mod:`pytest_mnnvl.model.releases`), one module
each: :mod:`pytest_mnnvl.model.oracle_v072` (one byte size per rank, a combine region that moves with the
dispatch bytes) and :mod:`pytest_mnnvl.model.oracle_v074` (fixed dispatch and combine regions, ``T × top_k``
tables, equal ``top_k``). The policies, the domination rule and the walk are shared; every function
takes ``release=`` to ask about another release than the installed one.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from pytest_mnnvl.model import releases, sizing
from pytest_mnnvl.model.layers import LayerSpec

#: Every policy the oracle knows; :func:`policies` gives the ones a release lets a manager follow.
POLICIES = ("total", "per_dimension", "first_call")
_ARITHMETIC = {releases.V072: "pytest_mnnvl.model.oracle_v072", releases.V074: "pytest_mnnvl.model.oracle_v074"}


def arithmetic(release: str | None = None) -> ModuleType:
    """The oracle module of ``release`` (default: the installed one)."""
    return importlib.import_module(_ARITHMETIC[releases.resolve(release)])


def policies(release: str | None = None) -> tuple[str, ...]:
    """The policies a manager can follow on ``release``."""
    return tuple(arithmetic(release).POLICIES)


@dataclass(frozen=True)
class Capacity:
    """What a handle is built for: bytes per rank and max tokens, plus the largest per-token bytes.

    ``top_k`` (0: not known) and ``layout`` (FlashInfer 0.7.4's 33-field metainfo; empty on 0.7.2,
    whose regions move with each call) come from the handle where there is one."""

    size_per_rank: int
    max_num_tokens: int
    dispatch_bytes_per_token: int = 0
    combine_bytes_per_token: int = 0
    eplb_stats_num_experts: int = 0
    top_k: int = 0
    layout: tuple[int, ...] = ()

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


def need(layer: LayerSpec, ep_size: int, release: str | None = None) -> int:
    """FlashInfer's bytes per rank for ``layer`` alone at its own max tokens."""
    return int(arithmetic(release).need(layer, ep_size))


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


def cross_product_need(layers: Sequence[LayerSpec], ep_size: int, release: str | None = None) -> int:
    """Bytes per rank covering max tokens × max dispatch × max combine of all ``layers``."""
    return int(arithmetic(release).cross_product_need(layers, ep_size))


def covers(capacity: Capacity, layer: LayerSpec, ep_size: int, release: str | None = None) -> bool:
    """The MUST: at the layer's full token count, dispatch and combine both pass on this handle (and its
    ``top_k``, where known, is the layer's: FlashInfer's dispatch takes no other)."""
    if capacity.top_k and capacity.top_k != layer.top_k:
        return False
    return bool(arithmetic(release).covers(capacity, layer, ep_size))


def shrunk(before: Capacity, after: Capacity, release: str | None = None) -> bool:
    """Whether ``after`` holds less than ``before`` in any dimension the release's handle has."""
    return bool(arithmetic(release).shrunk(before, after))


def oversized(capacity: Capacity, bound: Capacity, release: str | None = None) -> dict[str, tuple[int, int]]:
    """The dimensions the release's handle has in which ``capacity`` holds more than ``bound`` (name ->
    (observed, bound)); empty when it fits within ``bound`` everywhere."""
    return dict(arithmetic(release).oversized(capacity, bound))


def requirement(layer: LayerSpec, ep_size: int, release: str | None = None) -> dict[str, Any]:
    """What a handle needs to serve ``layer``, in the release's terms (violation messages)."""
    return dict(arithmetic(release).requirement(layer, ep_size))


def observed(capacity: Capacity, release: str | None = None) -> dict[str, Any]:
    """A handle's capacity in the release's terms (violation messages)."""
    return dict(arithmetic(release).observed(capacity))


def capacity_of(state: Any) -> Capacity:
    """The capacity a manager's live handle has, from its normalized state (a ``StateRecord``)."""
    return Capacity(
        int(state.size_per_rank or 0),
        int(state.max_num_tokens or 0),
        top_k=int(state.top_k or 0),
        layout=tuple(getattr(state, "layout", None) or ()),
    )


def _total(prev: Capacity | None, layer: LayerSpec, ep: int, release: str) -> Capacity | None:
    """``None`` when the live handle is kept."""
    want = need(layer, ep, release)
    if prev is not None and want <= prev.size_per_rank and layer.max_num_tokens <= prev.max_num_tokens:
        return None
    size = max(want, prev.size_per_rank if prev else 0)
    tokens = max(layer.max_num_tokens, prev.max_num_tokens if prev else 0)
    eplb = max(layer.eplb_stats_num_experts, prev.eplb_stats_num_experts if prev else 0)
    return Capacity(size, tokens, eplb_stats_num_experts=eplb)


def _per_dimension(prev: Capacity | None, layer: LayerSpec, ep: int, release: str) -> Capacity | None:
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
    size, layout = arithmetic(release).size_for(ep, tokens, dispatch, combine, eplb, layer.top_k)
    return Capacity(size, tokens, dispatch, combine, eplb, layer.top_k, layout)


def _first_call(prev: Capacity | None, layer: LayerSpec, ep: int, release: str) -> Capacity | None:
    """vLLM before PR #42976: the first layer sizes the workspace for good (a known-bad policy)."""
    if prev is not None:
        return None
    return _per_dimension(None, layer, ep, release)


_STEPS = {"total": _total, "per_dimension": _per_dimension, "first_call": _first_call}


def check_policy(policy: str, release: str | None = None) -> None:
    """``ValueError`` naming the policies allowed, or the release's rule when it cannot be followed there."""
    if policy not in _STEPS:
        raise ValueError(f"unknown policy {policy!r}; allowed: {', '.join(POLICIES)}")
    module = arithmetic(release)
    if policy not in module.POLICIES:
        raise ValueError(
            f"policy {policy!r} cannot be followed on FlashInfer {module.RELEASE}: {module.UNFOLLOWABLE[policy]}; "
            f"allowed there: {', '.join(module.POLICIES)}"
        )


def trajectory(policy: str, layers: Sequence[LayerSpec], ep_size: int, release: str | None = None) -> list[Step]:
    """The decisions ``policy`` takes for ``layers`` in order, starting uninitialized."""
    release = releases.resolve(release)
    check_policy(policy, release)
    step_fn = _STEPS[policy]
    steps: list[Step] = []
    capacity: Capacity | None = None
    built_by = 0
    for index, layer in enumerate(layers):
        grown = step_fn(capacity, layer, ep_size, release)
        if grown is not None:
            capacity, built_by = grown, index
        assert capacity is not None
        steps.append(Step(index, grown is not None, capacity, built_by))
    return steps


def minimal_rebuilds(policy: str, layers: Sequence[LayerSpec], ep_size: int, release: str | None = None) -> int:
    """Builds (the first included) the declared policy needs for ``layers``."""
    return sum(step.rebuilt for step in trajectory(policy, layers, ep_size, release))
