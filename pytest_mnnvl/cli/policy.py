"""What a ``--manager`` spec stands for: an oracle policy, or the real manager observed on the sim.

The oracle (:mod:`pytest_mnnvl.model.oracle`) knows three policies: ``total`` (vLLM PR #42976 / 0.32:
keep the largest total need), ``per_dimension`` (vLLM 0.33 and the reference manager: largest
tokens, dispatch and combine bytes, sized for their product) and ``first_call`` (the pre-fix bug:
the first layer sizes the workspace for good). The built-in specs map onto them:

- ``reference``: the policy its class declares (``mnnvl_policy``; the managers package says
  ``per_dimension``), ``total`` when the managers package is absent;
- ``vllm``: from the installed vLLM's version, without importing it (0.33 and later grow per
  dimension, 0.32 and earlier the total); when vLLM is not installed, the current release (0.33);
- ``mutant:first_call_wins`` → ``first_call`` and ``mutant:total_need`` → ``total``.

Every other spec (the other mutants, ``package.module:Class``) cannot be trusted to follow a
declared policy (a mutant declares the reference's, as buggy code claims to be correct), so
``explain``/``predict`` run the real manager on a sim world and read the workspace it really holds
(``observed`` mode). ``--policy`` names a policy outright; ``--observe`` forces observation.

A policy must be one the modelled FlashInfer release lets a manager follow (0.7.4 takes no byte size,
so ``total`` cannot be followed there): otherwise the spec is an input error naming that release's
rule. Observation runs the installed FlashInfer, so it models that release only.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from pytest_mnnvl.cli.inputs import UsageError
from pytest_mnnvl.errors import MnnvlUsageError
from pytest_mnnvl.model import oracle, releases
from pytest_mnnvl.model.oracle import POLICIES

#: Mutants whose defect is exactly one of the oracle's policies.
MUTANT_POLICIES = {"first_call_wins": "first_call", "total_need": "total"}
SPEC_HELP = (
    "reference (default), moe_ep_reference, vllm, mutant:<name> (e.g. mutant:first_call_wins) or package.module:Class"
)


@dataclass(frozen=True)
class ManagerModel:
    """A manager spec and how its decisions are known."""

    spec: str
    #: The oracle policy that predicts the manager, or None: observe the real manager on the sim.
    policy: str | None
    #: Why (shown in every output, so a reader can challenge it).
    source: str

    @property
    def observed(self) -> bool:
        return self.policy is None

    def describe(self) -> str:
        how = f"policy {self.policy}" if self.policy else "observed on the sim"
        return f"{self.spec} -> {how} ({self.source})"


def managers_module() -> Any | None:
    """``pytest_mnnvl.managers`` if this checkout has it (it resolves specs without importing torch)."""
    try:
        return importlib.import_module("pytest_mnnvl.managers")
    except ImportError:
        return None


def resolve_factory(spec: str) -> Any:
    """The managers package's picklable factory for ``spec`` (for ranks to build the manager)."""
    managers = managers_module()
    if managers is None:
        raise UsageError(
            f"--manager {spec!r}: running a manager needs pytest_mnnvl.managers, which this installation lacks; "
            f"pass --policy {{{','.join(POLICIES)}}} to drive FlashInfer by an oracle policy instead"
        )
    try:
        return managers.resolve(spec)
    except MnnvlUsageError as exc:
        raise UsageError(str(exc).replace("--mnnvl-manager=", "--manager ")) from None


def _vllm_model() -> ManagerModel:
    managers = managers_module()
    found = managers.installed_vllm() if managers is not None else None
    if managers is None or found is None:
        return ManagerModel(
            "vllm",
            "per_dimension",
            "vLLM is not installed here: assuming the current release 0.33 (per-dimension growth); "
            "pass --policy total for vLLM <= 0.32",
        )
    dist, version = found
    _shape, policy = managers.vllm_shape_for(version)
    return ManagerModel("vllm", policy, f"{dist}=={version} is installed")


def resolve_model(
    spec: str | None, policy: str | None = None, observe: bool = False, release: str | None = None
) -> ManagerModel:
    """How ``spec``'s decisions are known on ``release`` (default: the installed FlashInfer); ``policy``
    (``--policy``) and ``observe`` override."""
    release = releases.resolve(release)
    model = _resolve_model(spec, policy, observe)
    if model.policy is not None:
        try:
            oracle.check_policy(model.policy, release)
        except ValueError as exc:
            flag = f"--policy {model.policy}" if policy is not None else f"--manager {model.spec}"
            raise UsageError(f"{flag} ({model.source}): {exc}") from None
    elif release != (here := releases.installed() or releases.DEFAULT):
        raise UsageError(
            f"--manager {model.spec} is observed on the installed FlashInfer {here}, so it cannot "
            f"model --flashinfer {release}: pass --policy {{{','.join(oracle.policies(release))}}} to model "
            f"{release} by an oracle policy"
        )
    return model


def _resolve_model(spec: str | None, policy: str | None, observe: bool) -> ManagerModel:
    name = (spec or "reference").strip()
    if policy is not None:
        if policy not in POLICIES:
            raise UsageError(f"--policy {policy!r}: not allowed: must be one of {', '.join(POLICIES)}")
        if observe:
            raise UsageError("--policy and --observe: not allowed together: choose the oracle or the real manager")
        return ManagerModel(f"policy:{policy}", policy, "--policy given on the command line; --manager not used")
    if observe:
        factory = resolve_factory(name)
        return ManagerModel(name, None, f"--observe: the real {factory.module}.{factory.qualname}")
    if name == "reference":
        managers = managers_module()
        if managers is None:
            return ManagerModel(name, "total", "the reference grows the total need (vLLM PR #42976's rule)")
        factory = managers.resolve(name)
        return ManagerModel(name, factory.policy or "total", f"declared by {factory.qualname}.mnnvl_policy")
    if name == "moe_ep_reference":
        factory = resolve_factory(name)
        return ManagerModel(name, factory.policy, f"declared by {factory.qualname}.mnnvl_policy")
    if name == "vllm":
        return _vllm_model()
    if name.startswith("mutant:") and name.partition(":")[2] in MUTANT_POLICIES:
        mutant = name.partition(":")[2]
        why = {
            "first_call": "the first initialize sizes the workspace for good",
            "total": "grows the total need, as vLLM 0.32 does",
        }[MUTANT_POLICIES[mutant]]
        return ManagerModel(name, MUTANT_POLICIES[mutant], why)
    if name.startswith("mutant:") or ":" in name:
        factory = resolve_factory(name)
        return ManagerModel(
            name, None, f"no oracle policy models it: the real {factory.module}.{factory.qualname} was run"
        )
    raise UsageError(f"--manager {name!r}: not allowed: must be {SPEC_HELP}")
