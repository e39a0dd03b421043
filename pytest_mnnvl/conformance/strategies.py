"""Hypothesis strategies for conformance plans: layer specs, orderings, PP plans with MTP heads, tokens.

Imported only by the conformance suite and by users' tests: importing this module imports
Hypothesis, so the plugin never imports it at load time.

Plans vary what managers get wrong — max tokens, payload layout (quant format, hidden size, extra
payload), order — while ``top_k``/``num_experts`` stay fixed within a plan (a different value is
the shape-mismatch check's business). Every size is drawn from the domain real models and FlashInfer
use (:func:`model_plans` says which bounds and why), kept cheap by a per-stage budget the sim can move on
two CPU cores. Shrinking goes towards fewer, smaller, bf16-free layers. :func:`known_failures` lists the
pinned examples (known shipped bugs and real-size regressions).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

from hypothesis import event
from hypothesis import strategies as st

from pytest_mnnvl.conformance.observations import PlanObservation
from pytest_mnnvl.model import releases, sizing
from pytest_mnnvl.model.layers import RELEASE_RULES, LayerSpec, ModelPlan, QuantFormat

QUANTS = (QuantFormat.NVFP4, QuantFormat.BF16, QuantFormat.FP8_BLOCK, QuantFormat.MXFP8, QuantFormat.FP16)
#: Hidden sizes of shipped MoE models (gpt-oss 2880; Qwen3-30B/Mixtral 4096; Llama 4 5120; DeepSeek V3/R1 and
#: Kimi K2 7168), drawn as themselves often enough that every plan family meets them.
REAL_HIDDEN_SIZES = (2880, 4096, 5120, 7168)
#: Every real hidden size is a multiple of 16; a quant format may need a coarser one (fp8_block 128).
HIDDEN_GRANULE = 16
#: Up to DeepSeek's 7168 and a step past it.
MAX_HIDDEN = 8192
#: Max tokens per rank up to a long chunked-prefill chunk; any count, odd ones included (DP splits).
MAX_TOKENS = 4096
#: DeepSeek V3 has 256 routed experts, Kimi K2 384; 512 covers both on every EP size.
MAX_EXPERTS = 512
#: ``extra_payload_bytes_per_token`` up to this (it is one uint8 payload sent last, any count is aligned).
MAX_EXTRA_PAYLOAD = 512
#: The sim moves every byte on CPU: per stage, the largest max tokens times the largest per-token bytes
#: (dispatch + combine) stays under this, because the cross-product probe round-trips every layout of the
#: stage at the stage's largest max tokens. 256 KiB per peer is twice the old fixed domain's largest stage
#: (64 tokens of bf16 512): a plan at 1 MiB cost about 3x an old one on the 2-core box, which the CI budget
#: (+25 %) cannot carry. It still allows 8 tokens of bf16 7168, 22 of bf16 2880, ~1000 of a 64-wide layer.
STAGE_BYTES_BUDGET = 1 << 18
#: The round trip's host-side routing check is Python over tokens x top_k per peer (and per EP rank): bounded
#: the same way, so 2048 tokens at top_k 1, 256 at top_k 8, 93 at top_k 22.
STAGE_ROUTES_BUDGET = 2048
#: The EP size :func:`model_plans` assumes when none is given: expert counts that are multiples of 8 split
#: evenly over 1, 2, 4 and 8 ranks.
DEFAULT_EP_SIZE = 8


def top_k_values(release: str | None = None, num_experts: int = sizing.MAX_TOP_K) -> tuple[int, ...]:
    """``top_k`` values ``release`` (default: the installed one) dispatches, up to ``num_experts``, smallest
    first (so shrinking goes to 1): 0.7.2's kernel has 1, 2, 4, ..., 18, 22; 0.7.4 adds 3."""
    allowed = RELEASE_RULES[releases.resolve(release)].top_k
    return tuple(k for k in sorted(allowed) if k <= num_experts)


def aligned_for_ep(quant: QuantFormat, hidden: int, extra: int, top_k: int, ep_size: int) -> bool:
    """Whether 0.7.2's dispatch accepts this payload layout at every token count on ``ep_size`` ranks.

    Its packed payloads must each start at a multiple of their element size; rows are ``ep_size x tokens``,
    so one token per rank decides it for all. A layout that fails is FlashInfer's refusal, not the manager's
    bug, so it is never drawn (0.7.4 aligns every payload itself; the rule only narrows its domain a little).
    """
    layer = LayerSpec(quant, hidden, top_k, max(top_k, ep_size), 1, extra_payload_bytes_per_token=extra)
    return (
        sizing.misaligned_payload_error(
            ep_size, 1, layer.dispatch_payload_bytes_per_token, layer.dispatch_payload_element_sizes
        )
        is None
    )


def hidden_granule(quant: QuantFormat, ep_size: int) -> int:
    """The step of drawn hidden sizes: 16 (every real size is a multiple), the format's own multiple, and for
    nvfp4/mxfp8 (activations and uint8 scales of ``33/32`` or ``9/16`` H bytes before the int32 ids) as many
    more as :func:`aligned_for_ep` needs on ``ep_size`` ranks."""
    granule = max(HIDDEN_GRANULE, quant.hidden_multiple)
    if quant in (QuantFormat.NVFP4, QuantFormat.MXFP8):
        granule = quant.hidden_multiple * (4 // math.gcd(4, ep_size))
        granule = granule * HIDDEN_GRANULE // math.gcd(granule, HIDDEN_GRANULE)
    return granule


@functools.cache
def hidden_sizes(quant: QuantFormat, ep_size: int = DEFAULT_EP_SIZE) -> st.SearchStrategy[int]:
    """Mostly small multiples of :func:`hidden_granule` (cheap, shrink to the granule), often a real model's
    size, sometimes any multiple up to :data:`MAX_HIDDEN`; every one aligned on ``ep_size`` ranks. Cached:
    building strategies on every draw costs more than the draw."""
    granule = hidden_granule(quant, ep_size)
    real = [h for h in REAL_HIDDEN_SIZES if h % quant.hidden_multiple == 0 and aligned_for_ep(quant, h, 0, 1, ep_size)]
    small = st.integers(1, max(1, 1024 // granule)).map(lambda k: k * granule)
    anywhere = st.integers(1, MAX_HIDDEN // granule).map(lambda k: k * granule)
    return st.one_of(small, st.sampled_from(real), anywhere) if real else st.one_of(small, anywhere)


#: Decode-batch sizes, three draws in four (:func:`layer_specs`); the rest any count up to :data:`MAX_TOKENS`.
SMALL_TOKENS = 64


#: No extra payload half the time, else any count up to :data:`MAX_EXTRA_PAYLOAD`.
EXTRA_PAYLOAD_STRATEGY = st.one_of(st.just(0), st.integers(0, MAX_EXTRA_PAYLOAD))
QUANT_STRATEGY = st.sampled_from(QUANTS)


@st.composite
def layer_specs(
    draw: Any, top_k: int = 2, num_experts: int = 8, name: str = "", ep_size: int = DEFAULT_EP_SIZE
) -> LayerSpec:
    """One MoE layer with the given routing shape and a drawn layout and token count (its layout is one
    FlashInfer accepts on ``ep_size`` ranks; its tokens are not yet within the stage budget)."""
    quant = draw(QUANT_STRATEGY)
    extra = draw(EXTRA_PAYLOAD_STRATEGY)
    hidden = draw(hidden_sizes(quant, ep_size))
    # Shrinks to the small branch (0); the stage budget scales a stage's counts down together when its sizes
    # are large.
    large = draw(st.integers(0, 3)) == 3
    tokens = draw(st.integers(1, MAX_TOKENS if large else SMALL_TOKENS))
    return LayerSpec(quant, hidden, top_k, num_experts, tokens, name=name, extra_payload_bytes_per_token=extra)


@st.composite
def layer_sequences(
    draw: Any,
    top_k: int = 2,
    num_experts: int = 8,
    min_size: int = 1,
    max_size: int = 4,
    prefix: str = "l",
    ep_size: int = DEFAULT_EP_SIZE,
) -> list[LayerSpec]:
    """An ordering of layers (repeats allowed: equal layers are the no-needless-rebuild case)."""
    count = draw(st.integers(min_size, max_size))
    pool = draw(st.lists(layer_specs(top_k, num_experts, ep_size=ep_size), min_size=1, max_size=max(1, count)))
    order = draw(st.lists(st.integers(0, len(pool) - 1), min_size=count, max_size=count))
    return [_renamed(pool[i], f"{prefix}{n}") for n, i in enumerate(order)]


def _renamed(layer: LayerSpec, name: str) -> LayerSpec:
    d = layer.to_dict()
    d["name"] = name
    return LayerSpec(**d)


def stage_cost(layers: Sequence[LayerSpec]) -> tuple[int, int]:
    """(bytes, routes) the sim moves per peer for a stage's worst round trip: its largest max tokens times
    its largest per-token bytes, and times ``top_k`` (the cross-product probe pairs them)."""
    if not layers:
        return 0, 0
    tokens = max(layer.max_num_tokens for layer in layers)
    per_token = max(layer.dispatch_bytes_per_token + layer.combine_bytes_per_token for layer in layers)
    return tokens * per_token, tokens * layers[0].top_k


def within_budget(layers: Sequence[LayerSpec]) -> list[LayerSpec]:
    """``layers`` with every max tokens scaled down by one factor until :func:`stage_cost` fits the budgets.

    One factor for the stage keeps the order of its token counts (more tokens and fewer bytes stay so) and
    odd counts stay possible; a count never goes below 1."""
    if not layers:
        return []
    per_token = max(layer.dispatch_bytes_per_token + layer.combine_bytes_per_token for layer in layers)
    cap = max(1, min(STAGE_BYTES_BUDGET // per_token, STAGE_ROUTES_BUDGET // layers[0].top_k))
    tokens = max(layer.max_num_tokens for layer in layers)
    if tokens <= cap:
        return list(layers)
    return [dataclasses.replace(x, max_num_tokens=max(1, x.max_num_tokens * cap // tokens)) for x in layers]


@st.composite
def model_plans(draw: Any, pp: int = 1, max_layers_per_stage: int = 4, ep_size: int = DEFAULT_EP_SIZE) -> ModelPlan:
    """A PP plan: per-stage layer orderings (a stage may have no MoE layer when pp > 1) and an
    optional MTP head on the last stage (its own layout, so often another hidden size); one
    ``top_k``/``num_experts`` for the whole plan, valid on ``ep_size`` ranks for the installed release.

    Bounds: experts ``ep_size x 1..`` up to :data:`MAX_EXPERTS`; ``top_k`` any value the release
    dispatches up to 22; hidden up to :data:`MAX_HIDDEN`; max tokens up to :data:`MAX_TOKENS`; each stage
    scaled into :data:`STAGE_BYTES_BUDGET` and :data:`STAGE_ROUTES_BUDGET` (:func:`within_budget`).
    """
    num_experts = ep_size * draw(st.integers(1, max(1, MAX_EXPERTS // ep_size)))
    top_k = draw(st.sampled_from(top_k_values(num_experts=num_experts)))
    stages = []
    for s in range(pp):
        low = 1 if pp == 1 else 0
        stages.append(
            draw(layer_sequences(top_k, num_experts, low, max_layers_per_stage, prefix=f"s{s}l", ep_size=ep_size))
        )
    if pp > 1 and draw(st.booleans()):
        stages = [[_renamed(layer, f"s{s}l{i}") for i, layer in enumerate(stages[0])] for s in range(pp)]
    mtp = draw(st.lists(layer_specs(top_k, num_experts, name="mtp", ep_size=ep_size), max_size=1))
    if not any(stages) and not mtp:
        stages[-1] = [draw(layer_specs(top_k, num_experts, name="s0l0", ep_size=ep_size))]
    last = within_budget([*stages[-1], *mtp])
    stages = [within_budget(stage) for stage in stages[:-1]] + [last[: len(stages[-1])]]
    mtp = last[len(stages[-1]) :]
    plan = ModelPlan(tuple(tuple(s) for s in stages), tuple(mtp), name="hypothesis")
    drawn_events(plan)
    return plan


def drawn_events(plan: ModelPlan) -> None:
    """Hypothesis ``event()``s for what a drawn plan covers (``--hypothesis-show-statistics`` counts them)."""
    layers = [layer for _s, _i, layer in plan.iter_layers()]
    first = layers[0]
    event("top_k", first.top_k)
    event("experts", "< 64" if first.num_experts < 64 else ">= 64")
    event("hidden", "real model size" if any(x.hidden_size in REAL_HIDDEN_SIZES for x in layers) else "other")
    event("hidden >= 2880", str(any(x.hidden_size >= 2880 for x in layers)))
    event("odd max tokens", str(any(x.max_num_tokens % 2 for x in layers)))
    event("max tokens > 64", str(any(x.max_num_tokens > 64 for x in layers)))
    if plan.mtp_head:
        head = plan.mtp_head[0].hidden_size
        event("mtp head", "other hidden size" if any(x.hidden_size != head for x in layers[:-1]) else "same hidden")
    else:
        event("mtp head", "none")


def observed_events(plan: ModelPlan, results: Sequence[PlanObservation]) -> None:
    """``event()``s for what a plan made the manager do: rebuilds per plan, whether stages rebuilt unequally
    (the PP-deadlock shape), and which dimensions grow from one layer to the next (one event name each:
    Hypothesis keeps one payload per name and test case, so a name is counted once per plan)."""
    per_stage: dict[int, int] = {}
    for r in results:
        if r.ep_rank == 0:
            per_stage[r.stage] = sum(1 for step in r.steps if step.rebuilt)
    event("rebuilds per plan", sum(per_stage.values()))
    moe_stages = {s: n for s, n in per_stage.items() if plan.layers_of_stage(s)}
    event("stages rebuild", "unequally" if len(set(moe_stages.values())) > 1 else "equally")
    for s in range(plan.pp):
        layers = plan.layers_of_stage(s)
        for before, after in itertools.pairwise(layers):
            grown = [
                name
                for name, a, b in (
                    ("tokens", before.max_num_tokens, after.max_num_tokens),
                    ("dispatch bytes", before.dispatch_bytes_per_token, after.dispatch_bytes_per_token),
                    ("combine bytes", before.combine_bytes_per_token, after.combine_bytes_per_token),
                )
                if b > a
            ]
            for name in grown:
                event(f"next layer grows: {name}")
            if (
                after.max_num_tokens > before.max_num_tokens
                and after.dispatch_bytes_per_token < before.dispatch_bytes_per_token
            ):
                event("next layer: more tokens, fewer dispatch bytes")
            if (
                after.max_num_tokens < before.max_num_tokens
                and after.dispatch_bytes_per_token > before.dispatch_bytes_per_token
            ):
                event("next layer: fewer tokens, more dispatch bytes")


def runtime_tokens(layer: LayerSpec) -> st.SearchStrategy[int]:
    """Runtime token counts for ``layer``: 1..max, the full count first when shrinking matters."""
    return st.one_of(st.just(layer.max_num_tokens), st.integers(1, layer.max_num_tokens))


# ---- pinned examples -------------------------------------------------------------------------

H, K, E, T = 512, 2, 8, 32


def _l(quant: QuantFormat | str, hidden: int = H, tokens: int = T, name: str = "") -> LayerSpec:
    fmt = QuantFormat(quant)
    return LayerSpec(fmt, hidden, K, E, tokens, name=name or f"{fmt.value}-{hidden}-{tokens}")


def known_failures(pp: int = 1) -> list[tuple[str, ModelPlan]]:
    """(why, plan) for the known bugs, mirrored onto ``pp`` stages (equal rebuild counts, so a
    world-scoped collective completes and must be caught by membership); the MTP-head plan makes
    the last stage rebuild more often; with pp > 1 one plan has a stage without MoE layers."""

    def mirrored(layers: list[LayerSpec], name: str) -> ModelPlan:
        return ModelPlan(tuple(tuple(layers) for _ in range(pp)), name=name)

    plans = [
        (
            "NVFP4 base + bf16 MTP head (vLLM before PR #42976: the combine check fails)",
            ModelPlan(tuple((_l("nvfp4"),) for _ in range(pp)), (_l("bf16", name="mtp-bf16"),), name="nvfp4-bf16-mtp"),
        ),
        (
            "scale bytes left out of the need (PR #44946), hidden behind a later bf16 layer",
            mirrored([_l("nvfp4"), _l("bf16")], "scale-bytes"),
        ),
        ("more tokens later (tokens must grow)", mirrored([_l("nvfp4"), _l("nvfp4", tokens=2 * T)], "tokens-grow")),
        ("a wide layer, then a rebuild for a narrower one", mirrored([_l("nvfp4", 2 * H), _l("bf16")], "wide-first")),
        ("a bigger layer first, then a dominated one", mirrored([_l("bf16"), _l("nvfp4")], "dominated")),
        ("more tokens, then more bytes with fewer tokens", mirrored([_l("nvfp4", tokens=2 * T), _l("bf16")], "asym")),
        (
            "covered by the union but by no single layer",
            mirrored([_l("nvfp4", tokens=2 * T), _l("bf16"), _l("bf16", tokens=2 * T)], "union"),
        ),
        (
            "bf16 at few tokens, nvfp4 at many (max tokens x max payload)",
            mirrored([_l("bf16"), _l("nvfp4", tokens=2 * T)], "cross-product"),
        ),
    ]
    plans.append(
        (
            # Found by Hypothesis on the sim (conformance/results/vllm/vllm-0.32.0-covers-counterexample.json);
            # pinned because derandomized draws differ between Hypothesis versions.
            "vLLM 0.32's total need: a narrower MTP head at more tokens, then the wide layer's combine must still fit",
            ModelPlan(
                tuple((_l("nvfp4", 384, 8, name=f"s{s}l0"),) for s in range(pp)),
                (_l("nvfp4", 128, 16, name="mtp"),),
                name="total-need-mtp",
            ),
        )
    )
    plans.extend(real_size_plans(pp))
    if pp > 1:
        stages = tuple(() if s == 0 else (_l("nvfp4"), _l("bf16")) for s in range(pp))
        plans.append(("a stage without MoE layers", ModelPlan(stages, name="empty-stage")))
    return plans


def real_size_plans(pp: int = 1) -> list[tuple[str, ModelPlan]]:
    """Pinned plans at real models' sizes, odd token counts and routing shapes outside 2/4 (the regression set
    of the drawn domain: derandomized draws change between Hypothesis versions, these do not). Valid on EP 2,
    4 and 8 on every release; each stage fits :func:`within_budget` unchanged."""

    def layer(quant: str, hidden: int, tokens: int, top_k: int, experts: int, name: str, extra: int = 0) -> LayerSpec:
        return LayerSpec(
            QuantFormat(quant), hidden, top_k, experts, tokens, name=name, extra_payload_bytes_per_token=extra
        )

    return [
        (
            "DeepSeek V3 shape (nvfp4 7168, top_k 8 of 256) at 7 tokens; mxfp8 2880 at 13 (more tokens, fewer "
            "dispatch bytes); bf16 2880 + 48 extra bytes at 9 (more bytes, fewer tokens); a bf16 2880 MTP head at 13",
            ModelPlan(
                tuple(
                    (
                        layer("nvfp4", 7168, 7, 8, 256, f"s{s}l0"),
                        layer("mxfp8", 2880, 13, 8, 256, f"s{s}l1"),
                        layer("bf16", 2880, 9, 8, 256, f"s{s}l2", extra=48),
                    )
                    for s in range(pp)
                ),
                (layer("bf16", 2880, 13, 8, 256, "mtp"),),
                name="real-sizes-mtp",
            ),
        ),
        (
            "top_k 1 of 8 at 1 token, then 991 tokens of a 64-wide nvfp4 layer (tokens grow 991x, bytes stay tiny)",
            ModelPlan(
                tuple(
                    (layer("bf16", 64, 1, 1, 8, f"s{s}l0"), layer("nvfp4", 64, 991, 1, 8, f"s{s}l1")) for s in range(pp)
                ),
                name="real-top1-tokens",
            ),
        ),
    ]


def deadlock_plans(pp: int) -> list[tuple[str, ModelPlan]]:
    """Plans whose stages rebuild different numbers of times (pp_deadlock_freedom)."""
    return [p for p in known_failures(pp) if p[1].name in ("nvfp4-bf16-mtp", "empty-stage")]


def mismatch_pair(field_name: str) -> tuple[LayerSpec, LayerSpec]:
    """(first, second) layers differing only in ``top_k`` or ``num_experts``."""
    first = _l("nvfp4")
    changed = {"top_k": 4} if field_name == "top_k" else {"num_experts": 16}
    d = {**first.to_dict(), **changed, "name": f"{field_name}-changed"}
    return first, LayerSpec(**d)


def growth_pair() -> tuple[LayerSpec, LayerSpec]:
    """(first, second) where the second needs a rebuild (failed-rebuild check)."""
    return _l("nvfp4"), _l("bf16", tokens=2 * T)
