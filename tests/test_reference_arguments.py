"""The reference's own argument check (``_require_int``), on a real 2-rank sim world: a value no FlashInfer release
can serve (0 tokens, top_k, experts, hidden or activation bytes, negative scale bytes, a bool) is refused at
``initialize`` and leaves the manager's state as it was; the smallest valid values pass the check.

Not a conformance invariant: vLLM 0.33's manager checks only ``extra_payload_bytes_per_token`` and takes a 0-token
layer on a live workspace as served (dominated), which is sound, so no MUST or SHOULD may ask for this; it is the
reference's own contract, tested here."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_mnnvl.managers import ManagerFactory, resolve
from tests.manager_rank_fns import NV, require_sim

VALID = {
    "max_num_tokens": NV.max_num_tokens,
    "top_k": NV.top_k,
    "num_experts": NV.num_experts,
    "hidden_size": NV.hidden_size,
    "x_bytes_per_token": NV.activation_bytes_per_token,
    "x_sf_bytes_per_token": NV.scale_bytes_per_token,
}
#: One argument made unservable per case; each is refused by name and value.
UNSERVABLE = [
    ("max_num_tokens", 0),
    ("top_k", 0),
    ("num_experts", 0),
    ("hidden_size", 0),
    ("x_bytes_per_token", 0),
    ("x_sf_bytes_per_token", -1),
    ("max_num_tokens", True),
    ("top_k", 2.0),
]
#: The smallest values the check admits, on a live workspace that already serves them (no rebuild, no collective).
SMALLEST = {"max_num_tokens": 1, "hidden_size": 1, "x_bytes_per_token": 1, "x_sf_bytes_per_token": 0}


def _snapshot(manager: Any) -> tuple[Any, ...]:
    return (manager.initialized, manager.moe_alltoall, manager.capacity, manager.top_k, manager.num_experts)


def refusals(ctx: Any, factory: ManagerFactory) -> dict[str, Any]:
    """On a fresh manager and on one that serves ``NV``: what each unservable call raised and whether the state
    moved; then what the smallest valid values and ``num_experts=1`` did on the live one."""
    out: dict[str, Any] = {"fresh": {}, "live": {}, "smallest": {}}
    for when in ("fresh", "live"):
        manager = factory(ctx.cpu_group)
        if when == "live":
            manager.initialize(**VALID)
        for name, value in UNSERVABLE:
            before = _snapshot(manager)
            try:
                manager.initialize(**{**VALID, name: value})
                raised = None
            except Exception as exc:
                raised = f"{type(exc).__name__}: {exc}"
            out[when][f"{name}={value!r}"] = (raised, _snapshot(manager) == before)
        if when == "live":
            for name, value in [*SMALLEST.items(), ("num_experts", 1)]:
                before = _snapshot(manager)
                try:
                    manager.initialize(**{**VALID, name: value})
                    raised = None
                except Exception as exc:
                    raised = f"{type(exc).__name__}: {exc}"
                out["smallest"][f"{name}={value!r}"] = (raised, _snapshot(manager) == before)
        manager.cleanup()
    return out


def test_unservable_arguments_are_refused_and_change_nothing(mnnvl_world: Any, pytestconfig: pytest.Config) -> None:
    require_sim(pytestconfig)
    for result in mnnvl_world(2, 1).run(refusals, resolve("reference")):
        for when in ("fresh", "live"):
            for name, value in UNSERVABLE:
                raised, unchanged = result[when][f"{name}={value!r}"]
                assert raised == f"ValueError: {name}={value!r} must be an integer >= {0 if 'sf' in name else 1}", (
                    when,
                    name,
                    raised,
                )
                assert unchanged, (when, name)
        for name, value in SMALLEST.items():
            assert result["smallest"][f"{name}={value!r}"] == (None, True), name  # served by the live handle
        raised, unchanged = result["smallest"]["num_experts=1"]
        assert raised is not None and raised.startswith("ShapeMismatch: "), raised  # not the argument check's
        assert unchanged
