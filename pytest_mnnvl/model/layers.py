"""MoE layers as the all-to-all sees them, and model plans (PP stages of such layers) as JSON.

A manager only ever learns a layer through its sizes: hidden size, top_k, expert count, max tokens
and how many bytes each dispatched token carries. :class:`LayerSpec` holds exactly that and derives
the per-payload byte counts vLLM sends (activations, scales, ``top_k`` int32 ids and fp32 weights),
so the oracle, the sim backend and the explain tool agree on one layout. :class:`ModelPlan` orders
layers into pipeline stages, with an optional MTP head that exists on the last stage only (vLLM
builds the drafter there alone), which is what makes stages rebuild a different number of times.

Plan JSON schema (version 1)
----------------------------
A plan is one JSON object::

    {
      "schema_version": 1,               # optional; if present it must be 1
      "name": "dsr1-nvfp4-mtp",          # optional string
      "description": "...",              # optional string
      "defaults": {"top_k": 8, ...},     # optional: layer keys merged under every layer entry
      "stages": [[LAYER, ...], ...],     # required: one list per PP stage; [] = no MoE layer
      "mtp_head": [LAYER, ...]           # optional: runs on the last stage, after its layers
    }

A ``LAYER`` entry is an object with the keys

    ``quant``                 one of "bf16", "fp16", "nvfp4", "mxfp8", "fp8_block" (required)
    ``hidden_size``           int >= 1, a multiple of 16 (nvfp4), 32 (mxfp8), 128 (fp8_block) (required)
    ``top_k``                 int in 1..22, <= num_experts (required)
    ``num_experts``           int >= 1 (required)
    ``max_num_tokens``        int >= 1 (required)
    ``name``                  string (default "")
    ``extra_payload_bytes_per_token``  int >= 0 (default 0): one more uint8 payload sent last
    ``eplb_stats_num_experts``         int in 0..num_experts (default 0)
    ``mx_alignment``          int >= 0, 0 or a multiple of 32, mxfp8 only (default 0)
    ``repeat``                int >= 1 (default 1): the entry stands for that many identical layers

Required keys may come from ``defaults`` instead. A plan holds at most :data:`MAX_PLAN_LAYERS` (10,000) layers
in all: every stage and the MTP head, each ``repeat`` counted. Unknown keys anywhere are errors. Every error is a
:class:`PlanError` naming the JSON path (``stages[1][3].quant``), the bad value and what is allowed.
``ModelPlan.to_dict`` writes the compact form back: runs of equal layers become one entry with
``repeat`` and optional keys at their default are left out (``defaults`` is never written).
"""

from __future__ import annotations

import json
import os
import reprlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, NamedTuple

from pytest_mnnvl.model import releases, sizing, sizing_v074

PLAN_SCHEMA_VERSION = 1
#: The most layers a plan may hold in all (every stage and the MTP head, each ``repeat`` counted). Real
#: models have at most a few hundred MoE layers; the bound is checked before any layer is built, so a
#: hostile plan (``repeat`` 10**7) fails at once instead of filling memory.
MAX_PLAN_LAYERS = 10_000

#: ``top_k`` values FlashInfer's dispatch kernel is instantiated for (``SWITCH_TOP_K`` in
#: moeAlltoAllKernels.cu); any other value in 1..22 passes the host checks and then fails at
#: launch with "Unsupported top_k".
SUPPORTED_KERNEL_TOP_K: frozenset[int] = frozenset({1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 22})


class ReleaseRules(NamedTuple):
    """What a FlashInfer release accepts of a layer on an EP group (:meth:`LayerSpec.validate_for_ep`)."""

    release: str
    max_ranks: int
    top_k: frozenset[int]
    #: Who refuses another ``top_k``, in the release's own terms.
    top_k_rule: str
    #: Who requires ``num_experts % ep_size == 0``.
    experts_rule: str


#: One entry per supported release (:mod:`pytest_mnnvl.model.releases`): a layer only one of them can express
#: (``top_k`` 3 is 0.7.4's alone) fails on the other with that release's rule.
RELEASE_RULES: dict[str, ReleaseRules] = {
    releases.V072: ReleaseRules(
        releases.V072,
        sizing.MAX_RANKS,
        SUPPORTED_KERNEL_TOP_K,
        "FlashInfer's dispatch kernel (0.7.2.post1) supports only",
        "vLLM's managers and flashinfer.moe_ep split experts evenly over the ranks",
    ),
    releases.V074: ReleaseRules(
        releases.V074,
        sizing_v074.MAX_RANKS,
        frozenset(sizing_v074.SUPPORTED_TOP_K),
        "FlashInfer's NVLinkOneSidedAlltoAll (0.7.4) supports only top_k in",
        "FlashInfer 0.7.4's MoEEpCommunication requires num_experts divisible by the EP size",
    ),
}

INT32_BYTES = 4
FP32_BYTES = 4
#: Combine output is bf16 in every vLLM layout.
COMBINE_ELEMENT_SIZE = 2


class QuantFormat(str, Enum):
    """How a layer's activations cross the all-to-all; the value is the JSON spelling."""

    BF16 = "bf16"
    FP16 = "fp16"
    NVFP4 = "nvfp4"
    MXFP8 = "mxfp8"
    FP8_BLOCK = "fp8_block"  # DeepSeek block FP8: e4m3 values, one fp32 scale per 128 elements

    @property
    def hidden_multiple(self) -> int:
        """``hidden_size`` must be a multiple of this for the scale count to be whole."""
        return _HIDDEN_MULTIPLE[self]

    @property
    def flashinfer_name(self) -> str:
        """Member name of ``flashinfer.fused_moe.QuantFormat`` (vLLM 0.33's ``dispatch_format``)."""
        return _FLASHINFER_NAME[self]

    @property
    def activation_element_size(self) -> int:
        """Element size of the activation payload tensor (packed fp4 and fp8 travel as 1 byte)."""
        return 2 if self in (QuantFormat.BF16, QuantFormat.FP16) else 1

    @property
    def scale_element_size(self) -> int:
        """Element size of the scale payload (0: no scale payload)."""
        return _SCALE_ELEMENT_SIZE[self]


_HIDDEN_MULTIPLE = {
    QuantFormat.BF16: 1,
    QuantFormat.FP16: 1,
    QuantFormat.NVFP4: 16,
    QuantFormat.MXFP8: 32,
    QuantFormat.FP8_BLOCK: 128,
}
_FLASHINFER_NAME = {
    QuantFormat.BF16: "BF16",
    QuantFormat.FP16: "FP16",
    QuantFormat.NVFP4: "NVFP4",
    QuantFormat.MXFP8: "MXFP8",
    QuantFormat.FP8_BLOCK: "DeepSeekFp8",
}
# nvfp4: e4m3 block scales viewed as uint8; mxfp8: ue8m0 uint8; block fp8: fp32.
_SCALE_ELEMENT_SIZE = {
    QuantFormat.BF16: 0,
    QuantFormat.FP16: 0,
    QuantFormat.NVFP4: 1,
    QuantFormat.MXFP8: 1,
    QuantFormat.FP8_BLOCK: 4,
}
_QUANT_VALUES = ", ".join(repr(q.value) for q in QuantFormat)


class LayerSpecError(ValueError):
    """A layer field with a value FlashInfer or vLLM would not accept."""

    def __init__(self, field_name: str, value: object, allowed: str, layer_name: str = "") -> None:
        self.field = field_name
        self.value = value
        self.allowed = allowed
        where = f"layer {layer_name!r}: " if layer_name else ""
        super().__init__(f"{where}{field_name}={value!r} is not allowed: {allowed}")


class DispatchPayload(NamedTuple):
    """One tensor of a dispatch, per token: FlashInfer packs them back to back in this order."""

    name: str
    bytes_per_token: int
    element_size: int


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class LayerSpec:
    """One MoE layer's all-to-all geometry. A ``str`` ``quant`` is accepted and converted."""

    quant: QuantFormat
    hidden_size: int
    top_k: int
    num_experts: int
    max_num_tokens: int
    name: str = ""
    extra_payload_bytes_per_token: int = 0
    eplb_stats_num_experts: int = 0
    #: vLLM's ``quant_config.mx_alignment``: mxfp8 scales cover ``hidden`` rounded up to it (0: none).
    mx_alignment: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise LayerSpecError("name", self.name, "must be a string")
        if not isinstance(self.quant, QuantFormat):
            try:
                object.__setattr__(self, "quant", QuantFormat(self.quant))
            except ValueError:
                self._fail("quant", self.quant, f"must be one of {_QUANT_VALUES}")
        self._int("hidden_size", 1)
        multiple = self.quant.hidden_multiple
        if self.hidden_size % multiple:
            self._fail("hidden_size", self.hidden_size, f"{self.quant.value} needs a multiple of {multiple}")
        self._int("num_experts", 1)
        self._int("top_k", 1, sizing.MAX_TOP_K)
        if self.top_k > self.num_experts:
            self._fail("top_k", self.top_k, f"must be <= num_experts ({self.num_experts})")
        self._int("max_num_tokens", 1)
        self._int("extra_payload_bytes_per_token", 0)
        self._int("eplb_stats_num_experts", 0)
        if self.eplb_stats_num_experts > self.num_experts:
            self._fail(
                "eplb_stats_num_experts",
                self.eplb_stats_num_experts,
                f"must be <= num_experts ({self.num_experts})",
            )
        self._int("mx_alignment", 0)
        if self.mx_alignment and self.quant is not QuantFormat.MXFP8:
            self._fail("mx_alignment", self.mx_alignment, f"must be 0 for {self.quant.value} (mxfp8 only)")
        if self.mx_alignment % 32:
            self._fail("mx_alignment", self.mx_alignment, "must be 0 or a multiple of 32")

    def _fail(self, field_name: str, value: object, allowed: str) -> None:
        raise LayerSpecError(field_name, value, allowed, self.name)

    def _int(self, field_name: str, minimum: int, maximum: int | None = None) -> None:
        value = getattr(self, field_name)
        allowed = f"must be an integer >= {minimum}"
        if maximum is not None:
            allowed = f"must be an integer in {minimum}..{maximum}"
        if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
            self._fail(field_name, value, allowed)

    # ---- bytes per token -------------------------------------------------------------------

    @property
    def activation_bytes_per_token(self) -> int:
        """vLLM's ``x_bytes_per_token``: 2H (bf16/fp16), H/2 (nvfp4), H (mxfp8, block fp8)."""
        h = self.hidden_size
        if self.quant in (QuantFormat.BF16, QuantFormat.FP16):
            return 2 * h
        if self.quant is QuantFormat.NVFP4:
            return h // 2
        return h

    @property
    def scale_bytes_per_token(self) -> int:
        """vLLM's ``x_sf_bytes_per_token``: H/16 (nvfp4), padded_H/32 (mxfp8), (H/128)*4 (block fp8).

        mxfp8 pads H up to ``mx_alignment`` when that is > 0, as vLLM's
        ``all2all_utils`` does; its activation payload stays H bytes.
        """
        h = self.hidden_size
        if self.quant is QuantFormat.NVFP4:
            return h // 16
        if self.quant is QuantFormat.MXFP8:
            return sizing.align(h, self.mx_alignment) // 32 if self.mx_alignment else h // 32
        if self.quant is QuantFormat.FP8_BLOCK:
            return (h // 128) * FP32_BYTES
        return 0

    @property
    def dispatch_payloads(self) -> tuple[DispatchPayload, ...]:
        """Payload tensors in the order vLLM passes them to ``dispatch``.

        Activations, scales (if any), int32 expert ids, fp32 routing weights, then the extra
        bytes (if any) as one uint8 tensor.
        """
        payloads = [
            DispatchPayload("hidden_states", self.activation_bytes_per_token, self.quant.activation_element_size)
        ]
        if self.quant.scale_element_size:
            payloads.append(DispatchPayload("scales", self.scale_bytes_per_token, self.quant.scale_element_size))
        payloads.append(DispatchPayload("topk_ids", self.top_k * INT32_BYTES, INT32_BYTES))
        payloads.append(DispatchPayload("topk_weights", self.top_k * FP32_BYTES, FP32_BYTES))
        if self.extra_payload_bytes_per_token:
            payloads.append(DispatchPayload("extra", self.extra_payload_bytes_per_token, 1))
        return tuple(payloads)

    @property
    def dispatch_payload_bytes_per_token(self) -> tuple[int, ...]:
        return tuple(p.bytes_per_token for p in self.dispatch_payloads)

    @property
    def dispatch_payload_element_sizes(self) -> tuple[int, ...]:
        return tuple(p.element_size for p in self.dispatch_payloads)

    @property
    def dispatch_bytes_per_token(self) -> int:
        """``total_dispatch_payload_size_per_token`` for FlashInfer's size formula."""
        return sum(self.dispatch_payload_bytes_per_token)

    @property
    def combine_bytes_per_token(self) -> int:
        """The combine input is bf16 ``[ep, T, hidden]``: 2H per token."""
        return COMBINE_ELEMENT_SIZE * self.hidden_size

    @property
    def flashinfer_format_bytes_per_token(self) -> int:
        """Activation + scale bytes as ``flashinfer.moe_ep`` sizes ``dispatch_format`` (no padding)."""
        h = self.hidden_size
        if self.quant in (QuantFormat.BF16, QuantFormat.FP16):
            return 2 * h
        if self.quant is QuantFormat.NVFP4:
            return -(-h // 2) + -(-h // 16)
        if self.quant is QuantFormat.MXFP8:
            return h + -(-h // 32)
        return h + 4 * -(-h // 128)

    @property
    def moe_ep_extra_payload_bytes_per_token(self) -> int:
        """What a vLLM-0.33-shape caller passes as ``extra_payload_bytes_per_token``: the bytes the
        format's own sizing misses (mxfp8 padding) plus this layer's extra payload."""
        own = self.activation_bytes_per_token + self.scale_bytes_per_token
        return own - self.flashinfer_format_bytes_per_token + self.extra_payload_bytes_per_token

    # ---- sizing ------------------------------------------------------------------------------

    def need(self, ep_size: int) -> int:
        """Bytes per rank FlashInfer 0.7.2.post1's formula gives for this layer alone at its max tokens (the
        byte size ``MoeAlltoAll`` takes and vLLM's managers compute), whatever release is installed: 0.7.4 sizes
        by per-token capacities, so for the installed release's requirement use
        :func:`pytest_mnnvl.model.oracle.need`."""
        return sizing.need(self, ep_size)

    def check_round_trip(
        self, geometry: sizing.WorkspaceGeometry, runtime_max_tokens_per_rank: int | None = None
    ) -> sizing.RoundTripCheck:
        """FlashInfer 0.7.2.post1's host checks of one dispatch + combine of this layer on a byte-sized workspace
        (default: at its own max tokens); the installed release's verdict is :mod:`pytest_mnnvl.model.oracle`'s."""
        tokens = self.max_num_tokens if runtime_max_tokens_per_rank is None else runtime_max_tokens_per_rank
        return sizing.layer_round_trip(self, geometry, tokens)

    def validate_for_ep(self, ep_size: int, release: str | None = None) -> None:
        """Checks that depend on the EP size or on FlashInfer's kernel, not on the layer alone, by the rules of
        ``release`` (default: the installed FlashInfer's, :data:`RELEASE_RULES`).

        FlashInfer 0.7.2's ``MoeAlltoAll`` only needs ``num_experts >= ep_size``, but vLLM and
        ``flashinfer.moe_ep`` require an even split of experts over ranks (0.7.4's base class refuses
        anything else), so that is enforced on every release.
        """
        rules = RELEASE_RULES[releases.resolve(release)]
        if not _is_int(ep_size) or not 1 <= ep_size <= rules.max_ranks:
            self._fail("ep_size", ep_size, f"must be an integer in 1..{rules.max_ranks} (FlashInfer {rules.release})")
        if self.num_experts % ep_size:
            self._fail(
                "num_experts",
                self.num_experts,
                f"must be a positive multiple of ep_size ({ep_size}): {rules.experts_rule}",
            )
        if self.top_k not in rules.top_k:
            self._fail("top_k", self.top_k, f"{rules.top_k_rule} {sorted(rules.top_k)}")

    # ---- JSON ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Required keys always, optional ones only when not at their default."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _REQUIRED_LAYER_KEYS:
                out[f.name] = value.value if isinstance(value, QuantFormat) else value
            elif value != f.default:
                out[f.name] = value
        return out


_REQUIRED_LAYER_KEYS = ("quant", "hidden_size", "top_k", "num_experts", "max_num_tokens")
_LAYER_FIELDS = tuple(f.name for f in fields(LayerSpec))
_LAYER_KEYS = (*_LAYER_FIELDS, "repeat")
_DEFAULTS_KEYS = tuple(k for k in _LAYER_FIELDS if k != "name")
_PLAN_KEYS = ("schema_version", "name", "description", "defaults", "stages", "mtp_head")


#: How a bad value is shown: short and never recursing deeply (a value nested 900 levels deep, or
#: megabytes of it, must still give a one-line error).
_VALUE_REPR = reprlib.Repr()
_VALUE_REPR.maxlevel, _VALUE_REPR.maxlist, _VALUE_REPR.maxdict = 6, 8, 8
_VALUE_REPR.maxstring = _VALUE_REPR.maxother = _VALUE_REPR.maxlong = 80


class PlanError(ValueError):
    """A plan (or its JSON) that cannot be used; ``path`` is where in the JSON it went wrong."""

    def __init__(self, path: str, value: object, allowed: str, source: str = "") -> None:
        self.path = path
        self.value = value
        self.allowed = allowed
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__(f"{prefix}{path or '<plan>'}: {_VALUE_REPR.repr(value)} is not allowed: {allowed}")


def _keys_text(keys: Iterable[str]) -> str:
    return ", ".join(keys)


def _check_keys(path: str, obj: Mapping[str, Any], allowed: Sequence[str]) -> None:
    for key in obj:
        if key not in allowed:
            where = f"{path}.{key}" if path else key
            raise PlanError(where, key, f"unknown key; allowed keys: {_keys_text(allowed)}")


def _expect_list(path: str, value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise PlanError(path, value, f"must be a JSON array of {what}")
    return value


def _expect_str(path: str, value: object) -> str:
    if not isinstance(value, str):
        raise PlanError(path, value, "must be a string")
    return value


def _too_many_layers(total: int) -> str:
    return (
        f"a plan holds at most {MAX_PLAN_LAYERS} layers in all (every stage and the MTP head, each repeat "
        f"counted); this entry brings it to {total}"
    )


def _layers_from_entries(
    path: str, entries: object, defaults: Mapping[str, Any], before: int = 0
) -> tuple[LayerSpec, ...]:
    """The layers of one stage (or the MTP head); ``before`` layers came earlier in the plan (for the bound)."""
    out: list[LayerSpec] = []
    for i, entry in enumerate(_expect_list(path, entries, "layer objects")):
        out.extend(_layers_from_entry(f"{path}[{i}]", entry, defaults, before + len(out)))
    return tuple(out)


def _layers_from_entry(path: str, entry: object, defaults: Mapping[str, Any], before: int = 0) -> list[LayerSpec]:
    if not isinstance(entry, dict):
        raise PlanError(path, entry, "must be a JSON object describing a layer")
    _check_keys(path, entry, _LAYER_KEYS)
    repeat = entry.get("repeat", 1)
    if not _is_int(repeat) or repeat < 1:
        raise PlanError(f"{path}.repeat", repeat, "must be an integer >= 1")
    if before + repeat > MAX_PLAN_LAYERS:
        # Checked before the layers are built: ``[layer] * repeat`` is what ran out of memory.
        where, value = (f"{path}.repeat", repeat) if "repeat" in entry else (path, before + repeat)
        raise PlanError(where, value, _too_many_layers(before + repeat))
    merged = {**defaults, **{k: v for k, v in entry.items() if k != "repeat"}}

    def origin(key: str) -> str:
        return f"{path}.{key}" if key in entry else f"defaults.{key} (used by {path})"

    for key, value in merged.items():
        if key == "quant":
            if not isinstance(value, str) or value not in {q.value for q in QuantFormat}:
                raise PlanError(origin(key), value, f"must be one of {_QUANT_VALUES}")
        elif key == "name":
            _expect_str(origin(key), value)
        elif not _is_int(value):
            raise PlanError(origin(key), value, "must be an integer")
    for key in _REQUIRED_LAYER_KEYS:
        if key not in merged:
            raise PlanError(f"{path}.{key}", None, "required (in the layer entry or in defaults)")
    try:
        layer = LayerSpec(**merged)
    except LayerSpecError as exc:
        raise PlanError(origin(exc.field), exc.value, exc.allowed) from exc
    return [layer] * repeat


def _entries_from_layers(layers: Sequence[LayerSpec]) -> list[dict[str, Any]]:
    """Consecutive equal layers collapse into one entry with ``repeat``."""
    entries: list[dict[str, Any]] = []
    i = 0
    while i < len(layers):
        j = i + 1
        while j < len(layers) and layers[j] == layers[i]:
            j += 1
        entry = layers[i].to_dict()
        if j - i > 1:
            entry["repeat"] = j - i
        entries.append(entry)
        i = j
    return entries


def pp_partition(num_layers: int, pp: int) -> tuple[int, ...]:
    """Layers per stage the way vLLM's ``get_pp_indices`` splits them (no manual override).

    Every stage gets ``num_layers // pp``; the remainder goes one each to the stages just before
    the last, walking towards the first (the last stage also holds the final norm / head).
    """
    if not _is_int(num_layers) or num_layers < 0:
        raise PlanError("num_layers", num_layers, "must be an integer >= 0")
    if not _is_int(pp) or pp < 1:
        raise PlanError("pp", pp, "must be an integer >= 1")
    counts = [num_layers // pp] * pp
    for k in range(num_layers % pp):  # remainder <= pp - 1, so never reaches the last stage
        counts[pp - 2 - k] += 1
    return tuple(counts)


@dataclass(frozen=True)
class ModelPlan:
    """MoE layers per PP stage, in load order; ``mtp_head`` runs on the last stage after its layers."""

    stages: tuple[tuple[LayerSpec, ...], ...]
    mtp_head: tuple[LayerSpec, ...] = ()
    name: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.stages, (str, bytes)) or not isinstance(self.stages, Iterable):
            raise PlanError("stages", self.stages, "must be a sequence of stages (sequences of LayerSpec)")
        stages = tuple(tuple(_layer_seq(f"stages[{s}]", stage)) for s, stage in enumerate(self.stages))
        if not stages:
            raise PlanError("stages", [], "must hold at least one stage (pp >= 1)")
        object.__setattr__(self, "stages", stages)
        object.__setattr__(self, "mtp_head", tuple(_layer_seq("mtp_head", self.mtp_head)))
        total = sum(map(len, stages)) + len(self.mtp_head)
        if total > MAX_PLAN_LAYERS:
            raise PlanError(
                "stages", total, f"a plan holds at most {MAX_PLAN_LAYERS} layers in all (MTP head included)"
            )
        _expect_str("name", self.name)
        _expect_str("description", self.description)

    # ---- constructors ------------------------------------------------------------------------

    @classmethod
    def single_stage(
        cls,
        layers: Iterable[LayerSpec],
        mtp_head: Iterable[LayerSpec] = (),
        name: str = "",
        description: str = "",
    ) -> ModelPlan:
        """PP = 1."""
        return cls((tuple(layers),), tuple(mtp_head), name, description)

    @classmethod
    def split(
        cls,
        layers: Iterable[LayerSpec],
        pp: int,
        mtp_head: Iterable[LayerSpec] = (),
        name: str = "",
        description: str = "",
    ) -> ModelPlan:
        """Split a flat layer list into ``pp`` contiguous stages with :func:`pp_partition`.

        vLLM partitions *all* decoder layers, dense ones included; for models whose first layers are
        dense, build ``stages`` explicitly instead.
        """
        flat = tuple(layers)
        stages = []
        start = 0
        for count in pp_partition(len(flat), pp):
            stages.append(flat[start : start + count])
            start += count
        return cls(tuple(stages), tuple(mtp_head), name, description)

    # ---- queries -----------------------------------------------------------------------------

    @property
    def pp(self) -> int:
        return len(self.stages)

    def layers_of_stage(self, stage: int) -> tuple[LayerSpec, ...]:
        """The layers stage ``stage`` initializes, in order; the last stage ends with the MTP head."""
        if not _is_int(stage) or not 0 <= stage < self.pp:
            raise PlanError("stage", stage, f"must be an integer in 0..{self.pp - 1}")
        if stage == self.pp - 1:
            return self.stages[stage] + self.mtp_head
        return self.stages[stage]

    def iter_layers(self) -> Iterator[tuple[int, int, LayerSpec]]:
        """``(stage, index within the stage, layer)`` over every stage, MTP head included."""
        for s in range(self.pp):
            for i, layer in enumerate(self.layers_of_stage(s)):
                yield s, i, layer

    # ---- JSON --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema_version": PLAN_SCHEMA_VERSION}
        if self.name:
            out["name"] = self.name
        if self.description:
            out["description"] = self.description
        out["stages"] = [_entries_from_layers(stage) for stage in self.stages]
        if self.mtp_head:
            out["mtp_head"] = _entries_from_layers(self.mtp_head)
        return out

    @classmethod
    def from_dict(cls, data: object) -> ModelPlan:
        if not isinstance(data, dict):
            raise PlanError("", data, "a plan must be a JSON object")
        _check_keys("", data, _PLAN_KEYS)
        version = data.get("schema_version", PLAN_SCHEMA_VERSION)
        if not _is_int(version) or version != PLAN_SCHEMA_VERSION:
            raise PlanError("schema_version", version, f"must be {PLAN_SCHEMA_VERSION}")
        name = _expect_str("name", data.get("name", ""))
        description = _expect_str("description", data.get("description", ""))
        defaults = data.get("defaults", {})
        if not isinstance(defaults, dict):
            raise PlanError("defaults", defaults, "must be a JSON object of layer keys")
        _check_keys("defaults", defaults, _DEFAULTS_KEYS)
        if "stages" not in data:
            raise PlanError("stages", None, "required: a JSON array with one array of layers per PP stage")
        raw_stages = _expect_list("stages", data["stages"], "stages (arrays of layers)")
        if not raw_stages:
            raise PlanError("stages", [], "must hold at least one stage (pp >= 1)")
        stages: list[tuple[LayerSpec, ...]] = []
        for s, stage in enumerate(raw_stages):
            stages.append(_layers_from_entries(f"stages[{s}]", stage, defaults, sum(map(len, stages))))
        mtp_head = _layers_from_entries("mtp_head", data.get("mtp_head", []), defaults, sum(map(len, stages)))
        return cls(tuple(stages), mtp_head, name, description)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> ModelPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError("", text[:80], f"must be valid JSON ({exc})") from exc
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json())
            fh.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ModelPlan:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        try:
            return cls.from_json(text)
        except PlanError as exc:
            raise PlanError(exc.path, exc.value, exc.allowed, source=os.fspath(path)) from exc


def _layer_seq(path: str, layers: object) -> Iterator[LayerSpec]:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise PlanError(path, layers, "must be a sequence of LayerSpec")
    for i, layer in enumerate(layers):
        if not isinstance(layer, LayerSpec):
            raise PlanError(f"{path}[{i}]", layer, "must be a LayerSpec")
        yield layer
