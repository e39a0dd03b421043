"""Hypothesis strategies for conformance plans: layer specs, orderings, PP plans with MTP heads, tokens.

Imported only by the conformance suite and by users' tests: importing this module imports
Hypothesis, so the plugin never imports it at load time.

Plans vary what managers get wrong — max tokens, payload layout (quant format, hidden size, extra
payload), order — while ``top_k``/``num_experts`` stay fixed within a plan (a different value is
the shape-mismatch check's business). Sizes are small so the sim's host kernels stay fast; the
geometry still reproduces FlashInfer's failures. Shrinking goes towards fewer, smaller, bf16-free
layers. :func:`known_failures` lists the pinned examples (known shipped bugs).
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from pytest_mnnvl.model.layers import LayerSpec, ModelPlan, QuantFormat

HIDDEN_SIZES = (128, 256, 384, 512)
MAX_TOKENS = (8, 16, 24, 32, 48, 64)
QUANTS = (QuantFormat.NVFP4, QuantFormat.BF16, QuantFormat.FP8_BLOCK, QuantFormat.MXFP8, QuantFormat.FP16)
EXTRA_PAYLOAD = (0, 16, 64)
#: Routing shapes every supported FlashInfer release expresses on every EP size the suite runs (2, 4, 8):
#: ``top_k`` in both releases' kernels (0.7.4 alone adds 3; 0.7.2 alone nothing), experts divisible by the EP
#: size (0.7.4's ``MoEEpCommunication`` requires it). A plan one release cannot express would be that
#: release's error, not the manager's (tests/test_layers.py checks every drawn value on every release).
TOP_K = (2, 4)
NUM_EXPERTS = (8, 16)


@st.composite
def layer_specs(draw: Any, top_k: int = 2, num_experts: int = 8, name: str = "") -> LayerSpec:
    """One MoE layer with the given routing shape and drawn layout and token count."""
    quant = draw(st.sampled_from(QUANTS))
    hidden = draw(st.sampled_from(HIDDEN_SIZES))
    tokens = draw(st.sampled_from(MAX_TOKENS))
    extra = draw(st.sampled_from(EXTRA_PAYLOAD))
    return LayerSpec(quant, hidden, top_k, num_experts, tokens, name=name, extra_payload_bytes_per_token=extra)


@st.composite
def layer_sequences(
    draw: Any, top_k: int = 2, num_experts: int = 8, min_size: int = 1, max_size: int = 4, prefix: str = "l"
) -> list[LayerSpec]:
    """An ordering of layers (repeats allowed: equal layers are the no-needless-rebuild case)."""
    count = draw(st.integers(min_size, max_size))
    pool = draw(st.lists(layer_specs(top_k, num_experts), min_size=1, max_size=max(1, count)))
    order = draw(st.lists(st.integers(0, len(pool) - 1), min_size=count, max_size=count))
    return [_renamed(pool[i], f"{prefix}{n}") for n, i in enumerate(order)]


def _renamed(layer: LayerSpec, name: str) -> LayerSpec:
    d = layer.to_dict()
    d["name"] = name
    return LayerSpec(**d)


@st.composite
def model_plans(draw: Any, pp: int = 1, max_layers_per_stage: int = 4) -> ModelPlan:
    """A PP plan: per-stage layer orderings (a stage may have no MoE layer when pp > 1) and an
    optional MTP head on the last stage; one ``top_k``/``num_experts`` for the whole plan."""
    top_k = draw(st.sampled_from(TOP_K))
    num_experts = draw(st.sampled_from(NUM_EXPERTS))
    stages = []
    for s in range(pp):
        low = 1 if pp == 1 else 0
        stages.append(draw(layer_sequences(top_k, num_experts, low, max_layers_per_stage, prefix=f"s{s}l")))
    if pp > 1 and draw(st.booleans()):
        stages = [[_renamed(layer, f"s{s}l{i}") for i, layer in enumerate(stages[0])] for s in range(pp)]
    mtp = draw(st.lists(layer_specs(top_k, num_experts, name="mtp"), max_size=1))
    if not any(stages) and not mtp:
        stages[-1] = [draw(layer_specs(top_k, num_experts, name="s0l0"))]
    return ModelPlan(tuple(tuple(s) for s in stages), tuple(mtp), name="hypothesis")


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
    if pp > 1:
        stages = tuple(() if s == 0 else (_l("nvfp4"), _l("bf16")) for s in range(pp))
        plans.append(("a stage without MoE layers", ModelPlan(stages, name="empty-stage")))
    return plans


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
