"""One interface over both manager shapes: a ``LayerSpec`` in, a normalized state out.

Two ``initialize`` signatures exist in the wild, and the suite must drive both:

- ``pr42976`` (vLLM ≤ 0.32, the reference): ``initialize(max_num_tokens, top_k, num_experts,
  hidden_size, x_bytes_per_token, x_sf_bytes_per_token)``; at the PR itself the last two were
  ``dispatch_dtype_bytes_per_elem`` (0 meaning packed fp4, ``H/2`` bytes) and
  ``dispatch_scale_bytes_per_token``. The handle is ``manager.moe_alltoall`` (a ``MoeAlltoAll`` on
  FlashInfer 0.7.2.post1; on 0.7.4, which has none, an ``NVLinkOneSidedAlltoAll``).
- ``moe_ep`` (vLLM 0.33): ``initialize(max_num_tokens, top_k, num_experts, hidden_size,
  dispatch_format=QuantFormat | None, extra_payload_bytes_per_token=0)``. The handle is
  ``manager.communication`` (a ``flashinfer.moe_ep`` ``NVLinkOneSidedAlltoAll``), wrapping a
  ``MoeAlltoAll`` on 0.7.2 and owning its workspace on 0.7.4.

The state is read from the FlashInfer objects, never from the manager's own bookkeeping, through the
installed release's handle module (:mod:`pytest_mnnvl.managers.handles`): bytes per rank and max
tokens the live handle was built with, its ``top_k`` and ``num_experts``, and on 0.7.4 its whole
layout (where its fixed regions are: bytes per rank alone do not say whether a layer fits). The
handle is identified by a kept (weak) reference and a per-process stamp, never by ``id()``, which
CPython reuses as soon as the old handle is freed.
"""

from __future__ import annotations

import inspect
import itertools
import weakref
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from pytest_mnnvl.managers import handles
from pytest_mnnvl.managers.handles import InjectedBuildFailure
from pytest_mnnvl.model.layers import LayerSpec, QuantFormat

__all__ = [
    "InjectedBuildFailure",
    "ManagerAdapter",
    "ManagerState",
    "StateRecord",
    "adapter_for",
    "inject_build_failure",
]

BASE_PARAMETERS = ("max_num_tokens", "top_k", "num_experts", "hidden_size")
#: Keyword families, per shape, in the order they are tried.
KEYWORDS = {
    "x_bytes": ("x_bytes_per_token", "x_sf_bytes_per_token"),
    "dtype_elem": ("dispatch_dtype_bytes_per_elem", "dispatch_scale_bytes_per_token"),
    "moe_ep": ("dispatch_format", "extra_payload_bytes_per_token"),
}
_SHAPE_OF_KEYWORDS = {"x_bytes": "pr42976", "dtype_elem": "pr42976", "moe_ep": "moe_ep"}


class ShapeError(TypeError):
    """A manager class whose ``initialize`` matches neither shape; the message says what it has."""


class UnsupportedLayer(ValueError):
    """A layer the manager's shape cannot express (e.g. EPLB stats: neither shape takes them)."""


@dataclass(frozen=True)
class Shape:
    """``name`` is ``pr42976`` or ``moe_ep``; ``keywords`` the argument family within it."""

    name: str
    keywords: str
    declared: bool = False


def _initialize_parameters(cls: type) -> tuple[list[inspect.Parameter], bool]:
    raw = inspect.getattr_static(cls, "initialize", None)
    if raw is None:
        raise ShapeError(f"{cls.__qualname__} has no initialize method")
    function = getattr(cls, "initialize")  # noqa: B009 - mypy: `type` has no initialize
    if not callable(function):
        raise ShapeError(f"{cls.__qualname__}.initialize is not callable")
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError) as exc:
        raise ShapeError(f"the signature of {cls.__qualname__}.initialize cannot be read ({exc})") from None
    params = list(signature.parameters.values())
    if not isinstance(raw, (staticmethod, classmethod)) and params:
        params = params[1:]  # self
    var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return [p for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)], var_keyword


def detect_shape(cls: type) -> Shape:
    """The shape of ``cls``: its ``mnnvl_shape`` attribute if declared, else its ``initialize`` signature.

    Either way the signature must accept the shape's keywords (or ``**kwargs``), since the adapter
    passes everything by keyword, and must require nothing else.
    """
    params, var_keyword = _initialize_parameters(cls)
    names = [p.name for p in params]
    listing = f"initialize({', '.join(names + (['**kwargs'] if var_keyword else []))})"
    positional_only = [p.name for p in params if p.kind is p.POSITIONAL_ONLY]
    if positional_only:
        raise ShapeError(f"{listing}: positional-only parameters {positional_only} cannot be passed by keyword")
    missing = [name for name in BASE_PARAMETERS if name not in names and not var_keyword]
    if missing:
        raise ShapeError(f"{listing} lacks {', '.join(missing)} (every shape takes {', '.join(BASE_PARAMETERS)})")

    declared = getattr(cls, "mnnvl_shape", None)
    if declared is not None and declared not in ("pr42976", "moe_ep"):
        raise ShapeError(f"{cls.__qualname__}.mnnvl_shape={declared!r}; allowed: 'pr42976', 'moe_ep'")
    candidates = [k for k, shape in _SHAPE_OF_KEYWORDS.items() if declared in (None, shape)]
    for keywords in candidates:
        wanted = KEYWORDS[keywords]
        if all(name in names for name in wanted) or (declared is not None and var_keyword):
            known = set(BASE_PARAMETERS) | set(wanted)
            extra = [p.name for p in params if p.name not in known and p.default is p.empty]
            if extra:
                raise ShapeError(f"{listing} also requires {', '.join(extra)}, which no shape provides")
            return Shape(_SHAPE_OF_KEYWORDS[keywords], keywords, declared is not None)
    expected = "; ".join(f"{_SHAPE_OF_KEYWORDS[k]}: {', '.join(KEYWORDS[k])}" for k in candidates)
    raise ShapeError(f"{listing} takes neither shape's payload keywords ({expected})")


# ---- LayerSpec -> initialize(...) keywords ---------------------------------------------------


def _require_expressible(layer: LayerSpec) -> None:
    if layer.eplb_stats_num_experts:
        raise UnsupportedLayer(
            f"layer {layer.name or layer.quant.value}: eplb_stats_num_experts={layer.eplb_stats_num_experts}, but "
            "neither manager shape passes EPLB stats to FlashInfer"
        )


def pr42976_kwargs(layer: LayerSpec, keywords: str = "x_bytes") -> dict[str, Any]:
    """PR #42976-shape arguments. The extra payload (no keyword of its own there) rides with the
    scale bytes: FlashInfer only sees their sum."""
    _require_expressible(layer)
    kwargs: dict[str, Any] = {
        "max_num_tokens": layer.max_num_tokens,
        "top_k": layer.top_k,
        "num_experts": layer.num_experts,
        "hidden_size": layer.hidden_size,
    }
    scale = layer.scale_bytes_per_token + layer.extra_payload_bytes_per_token
    if keywords == "x_bytes":
        kwargs["x_bytes_per_token"] = layer.activation_bytes_per_token
        kwargs["x_sf_bytes_per_token"] = scale
    elif keywords == "dtype_elem":
        # 0 meant "packed fp4, hidden/2 bytes"; otherwise bytes per element times hidden.
        kwargs["dispatch_dtype_bytes_per_elem"] = (
            0 if layer.quant is QuantFormat.NVFP4 else layer.quant.activation_element_size
        )
        kwargs["dispatch_scale_bytes_per_token"] = scale
    else:
        raise ValueError(f"unknown pr42976 keyword family {keywords!r}")
    return kwargs


def moe_ep_kwargs(layer: LayerSpec, formats: Any = None) -> dict[str, Any]:
    """vLLM 0.33-shape arguments. ``formats`` is ``flashinfer.fused_moe.QuantFormat`` (imported when
    not given); whatever the format's own sizing misses (mxfp8 padding, extra payload) goes into
    ``extra_payload_bytes_per_token``, so FlashInfer's total equals the layer's dispatch bytes."""
    _require_expressible(layer)
    if formats is None:
        from flashinfer.fused_moe import QuantFormat as formats
    name = layer.quant.flashinfer_name
    fmt = formats[name] if isinstance(formats, Mapping) else getattr(formats, name)
    return {
        "max_num_tokens": layer.max_num_tokens,
        "top_k": layer.top_k,
        "num_experts": layer.num_experts,
        "hidden_size": layer.hidden_size,
        "dispatch_format": fmt,
        "extra_payload_bytes_per_token": layer.moe_ep_extra_payload_bytes_per_token,
    }


def initialize_kwargs(shape: Shape, layer: LayerSpec, formats: Any = None) -> dict[str, Any]:
    if shape.name == "moe_ep":
        return moe_ep_kwargs(layer, formats)
    return pr42976_kwargs(layer, shape.keywords)


# ---- handle identity -------------------------------------------------------------------------

_STAMPS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_STAMP_ATTRIBUTE = "_pytest_mnnvl_stamp"
_COUNTER = itertools.count(1)


def stamp(handle: Any) -> int | None:
    """A number unique to ``handle`` for the life of this process (``None`` for no handle).

    Kept in a weak dictionary, so stamping never keeps a superseded workspace alive; a new object
    that lands at a freed one's address gets a new stamp, unlike ``id()``.
    """
    if handle is None:
        return None
    try:
        found = _STAMPS.get(handle)
        if found is None:
            found = _STAMPS[handle] = next(_COUNTER)
        return found
    except TypeError:  # not weak-referenceable: stamp the object itself
        found = getattr(handle, _STAMP_ATTRIBUTE, None)
        if found is None:
            found = next(_COUNTER)
            try:
                setattr(handle, _STAMP_ATTRIBUTE, found)
            except AttributeError:  # a built-in's instance, or __slots__ without it
                raise TypeError(
                    f"a handle of type {type(handle).__qualname__} can be neither weakly referenced nor given the "
                    f"attribute {_STAMP_ATTRIBUTE}, so its identity cannot be followed"
                ) from None
        return int(found)


# ---- normalized state ------------------------------------------------------------------------


@dataclass(frozen=True)
class StateRecord:
    """The picklable part of :class:`ManagerState`: what a rank sends back to the parent."""

    initialized: bool
    stamp: int | None
    size_per_rank: int | None
    max_num_tokens: int | None
    top_k: int | None
    num_experts: int | None
    #: FlashInfer 0.7.4's 33-field layout of the live handle (``None`` on 0.7.2 or without a handle).
    layout: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ManagerState:
    """A manager's state as FlashInfer sees it; ``handle`` is the live handle itself (compare with ``is``)."""

    initialized: bool
    handle: Any = field(compare=False, repr=False)
    moe_alltoall: Any = field(compare=False, repr=False)
    stamp: int | None
    size_per_rank: int | None
    max_num_tokens: int | None
    top_k: int | None
    num_experts: int | None
    layout: tuple[int, ...] | None = None

    def same_handle(self, other: ManagerState) -> bool:
        return self.handle is not None and self.handle is other.handle

    def record(self) -> StateRecord:
        return StateRecord(
            self.initialized,
            self.stamp,
            self.size_per_rank,
            self.max_num_tokens,
            self.top_k,
            self.num_experts,
            self.layout,
        )


class ManagerAdapter:
    """Drives one manager instance: ``initialize(layer)``, ``cleanup()``, ``state()``."""

    def __init__(self, manager: Any, shape: Shape) -> None:
        self.manager = manager
        self.shape = shape
        #: An engine's own dispatch path for this manager (``manager -> DispatchPath``), set by the factory.
        self.engine_path: Callable[[Any, LayerSpec], DispatchPath | None] | None = None

    def kwargs(self, layer: LayerSpec) -> dict[str, Any]:
        return initialize_kwargs(self.shape, layer)

    def initialize(self, layer: LayerSpec) -> None:
        self.manager.initialize(**self.kwargs(layer))

    def cleanup(self) -> None:
        self.manager.cleanup()

    def handle(self) -> Any:
        """The shape's live handle object, or ``None``."""
        raise NotImplementedError

    def moe_alltoall(self) -> Any:
        """The FlashInfer object round trips dispatch through (0.7.2: the ``MoeAlltoAll`` behind the
        handle; 0.7.4: the ``NVLinkOneSidedAlltoAll``), or ``None``."""
        raise NotImplementedError

    def state(self) -> ManagerState:
        handle = self.handle()
        a2a = self.moe_alltoall()
        facts = handles.api().facts(a2a) if a2a is not None else handles.HandleFacts(None, None, None, None)
        flag = getattr(self.manager, "initialized", None)
        return ManagerState(
            # A manager with no such flag is initialized while it holds a handle.
            initialized=handle is not None if flag is None else bool(flag),
            handle=handle,
            moe_alltoall=a2a,
            stamp=stamp(handle),
            size_per_rank=facts.size_per_rank,
            max_num_tokens=facts.max_num_tokens,
            top_k=facts.top_k,
            num_experts=facts.num_experts,
            layout=facts.layout,
        )

    def dispatch_path(self, layer: LayerSpec) -> DispatchPath | None:
        """The manager's own forward-pass dispatch and combine, or ``None`` where it provides none.

        The suite's round trips call FlashInfer directly, with the harness's keywords, so they cannot see a
        manager whose engine calls FlashInfer another way (vLLM 0.33's prepare/finalize passes a keyword that
        FlashInfer 0.7.4 renamed). A manager class offers its path as two methods (:func:`own_dispatch_path`);
        for vLLM the factory wires in vLLM's own prepare/finalize (``engine_path``), built for ``layer``."""
        if self.engine_path is not None:
            return self.engine_path(self.manager, layer)
        return own_dispatch_path(self.manager)


@dataclass(frozen=True)
class DispatchPath:
    """What an engine's forward pass calls around its experts: ``dispatch(hidden_states, topk_ids, topk_weights)``
    returns the received hidden states; ``combine(expert_output)`` the combined ``[T, H]`` rows. ``name`` says
    whose code it is."""

    name: str
    dispatch: Callable[[Any, Any, Any], Any]
    combine: Callable[[Any], Any]


#: The methods a manager class defines to offer its own dispatch path.
DISPATCH_PATH_METHODS = ("mnnvl_dispatch", "mnnvl_combine")


def has_own_dispatch_path(cls: type) -> bool:
    """Whether ``cls`` defines both :data:`DISPATCH_PATH_METHODS` (known from the class: nothing is built)."""
    return all(callable(getattr(cls, name, None)) for name in DISPATCH_PATH_METHODS)


def own_dispatch_path(manager: Any) -> DispatchPath | None:
    """``manager.mnnvl_dispatch(hidden_states, topk_ids, topk_weights)`` (the received hidden states) and
    ``manager.mnnvl_combine(expert_output)`` (the combined rows), or ``None`` without them."""
    if not has_own_dispatch_path(type(manager)):
        return None
    name = f"{type(manager).__qualname__}.{'/'.join(DISPATCH_PATH_METHODS)}"
    return DispatchPath(name, manager.mnnvl_dispatch, manager.mnnvl_combine)


class Pr42976Adapter(ManagerAdapter):
    def handle(self) -> Any:
        return getattr(self.manager, "moe_alltoall", None)

    def moe_alltoall(self) -> Any:
        return self.handle()


class MoeEpAdapter(ManagerAdapter):
    def __init__(self, manager: Any, shape: Shape) -> None:
        super().__init__(manager, shape)
        self._formats: Any = None

    def kwargs(self, layer: LayerSpec) -> dict[str, Any]:
        if self._formats is None:
            from flashinfer.fused_moe import QuantFormat as formats

            self._formats = formats
        return moe_ep_kwargs(layer, self._formats)

    def handle(self) -> Any:
        return getattr(self.manager, "communication", None)

    def moe_alltoall(self) -> Any:
        handle = self.handle()
        return None if handle is None else handles.api().round_trip_handle(handle)


def adapter_for(manager: Any, shape: Shape | None = None) -> ManagerAdapter:
    """The adapter of ``manager``'s shape (detected from its class unless given)."""
    shape = shape or detect_shape(type(manager))
    return MoeEpAdapter(manager, shape) if shape.name == "moe_ep" else Pr42976Adapter(manager, shape)


# ---- failure injection -----------------------------------------------------------------------


def inject_build_failure() -> AbstractContextManager[None]:
    """Make every FlashInfer handle construction in this rank fail before it allocates
    (:class:`InjectedBuildFailure`): ``MoeAlltoAll.get_workspace`` on 0.7.2, ``NVLinkOneSidedAlltoAll``'s
    workspace acquisition on 0.7.4; both manager shapes build through it.

    It tests what a manager leaves behind when a rebuild fails. Use it on every rank of the EP group
    alike: a failure on one rank only would leave the others in the allocation collective.
    """
    return handles.api().inject_build_failure()
