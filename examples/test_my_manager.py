"""How a vendor tests its own MoE all-to-all workspace manager with pytest-mnnvl.

    pytest -p pytest_mnnvl examples/test_my_manager.py                                 # the reference manager
    pytest -p pytest_mnnvl examples/test_my_manager.py --mnnvl-manager=mypkg.a2a:MyManager
    pytest -p pytest_mnnvl examples/test_my_manager.py --mnnvl-manager=mutant:first_call_wins   # watch it fail
    pytest -p pytest_mnnvl examples/test_my_manager.py --mnnvl-backend=flashinfer       # on >= 2 NVLink GPUs

Your class needs ``__init__(cpu_group)`` (the EP group's gloo group), ``initialize(...)`` in one of the
two shapes vLLM uses (PR #42976: ``max_num_tokens, top_k, num_experts, hidden_size, x_bytes_per_token,
x_sf_bytes_per_token``; or 0.33's ``..., dispatch_format, extra_payload_bytes_per_token``) and
``cleanup()``. The plugin's adapters turn a ``LayerSpec`` into the call and read back the workspace
the live FlashInfer handle was *really* built with; ``pytest_mnnvl.model.oracle`` judges it by the
installed FlashInfer's own arithmetic (0.7.2.post1's ``MoeAlltoAll`` or 0.7.4's ``flashinfer.moe_ep``).

What is used here: the ``mnnvl_world`` fixture (a warm pool of rank processes, one per EP rank;
``world.run(fn, ...)`` calls a module-level ``fn(ctx, ...)`` on every rank), the ``mnnvl`` and
``requires_one_sided`` markers, ``LayerSpec``/``ModelPlan`` (the plan JSON the CLI reads), and
Hypothesis. ``pytest_mnnvl.conformance.strategies`` will carry ready-made strategies; the small one below is
the same idea. When a test fails it saves the plan and prints the ``python -m pytest_mnnvl``
commands that explain and reproduce it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pytest_mnnvl.model import oracle
from pytest_mnnvl.model import plans as model_plans
from pytest_mnnvl.model.layers import SUPPORTED_KERNEL_TOP_K, LayerSpec, ModelPlan, QuantFormat

#: The real-model plans shipped with pytest-mnnvl (this directory's ``plans`` links to them in a clone).
PLANS = model_plans.PLANS_DIR


# ---- inside every rank --------------------------------------------------------------------------


def initialize_each_layer(ctx: Any, factory: Any, plan: ModelPlan) -> list[dict[str, Any]]:
    """Build the manager on this rank's EP group; for each layer of this rank's PP stage, in load order,
    ``initialize`` it and round-trip it at full tokens right away (a defect can hide behind a later,
    larger layer). All ranks of the EP group agree on each outcome before going on."""
    import torch.distributed as dist

    from pytest_mnnvl.conformance.roundtrip import round_trip

    adapter = factory.adapter(factory(ctx.cpu_group))
    seen: list[dict[str, Any]] = []
    for layer in plan.layers_of_stage(ctx.pp_stage):
        adapter.initialize(layer)
        state = adapter.state()
        error = None
        try:
            round_trip(state.moe_alltoall, layer, ctx.ep_rank, ctx.ep_size, layer.max_num_tokens, ctx.device)
        except (RuntimeError, AssertionError, ValueError) as exc:  # host checks (0.7.4: ValueError too), wrong bytes
            error = f"{type(exc).__name__}: {exc}"
        outcomes: list[Any] = [None] * ctx.ep_size
        dist.all_gather_object(outcomes, error, group=ctx.cpu_group)  # also keeps the ranks in step
        seen.append({"state": state.record(), "error": error})
        if any(outcomes):
            return seen  # after a failed combine FlashInfer's handle is unusable: stop at the first failure
    adapter.cleanup()
    return seen


# ---- in the pytest process ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def manager_factory(pytestconfig: pytest.Config) -> Any:
    """``--mnnvl-manager`` (or the ``mnnvl_manager`` ini value), resolved once."""
    from pytest_mnnvl.managers import resolve

    spec = pytestconfig.getoption("mnnvl_manager") or pytestconfig.getini("mnnvl_manager") or "reference"
    return resolve(spec)


def check_plan(world: Any, factory: Any, plan: ModelPlan, where: Path) -> None:
    ep = world.world_size // world.pp
    results = world.run(initialize_each_layer, factory, plan)
    for rank, seen in enumerate(results):
        layers = plan.layers_of_stage(rank // ep)
        for index, (layer, step) in enumerate(zip(layers, seen, strict=False)):
            problem = step["error"]
            # Covers = FlashInfer's host checks pass at full tokens on the handle's real geometry, by the
            # installed release's arithmetic (0.7.2: one byte size per rank; 0.7.4: fixed regions).
            held = oracle.capacity_of(step["state"])
            if problem is None and not oracle.covers(held, layer, ep):
                problem = f"the handle holds {oracle.observed(held)}, the layer needs {oracle.requirement(layer, ep)}"
            if problem is not None:
                where.parent.mkdir(parents=True, exist_ok=True)
                plan.save(where)
                pytest.fail(
                    f"rank {rank}, stage {rank // ep}, layer {index} ({layer.name or layer.quant.value}): {problem}\n"
                    f"plan saved to {where}; explain it and reproduce it with\n"
                    f"  python -m pytest_mnnvl explain {where} --manager {factory.spec} --ep {ep}\n"
                    f"  python -m pytest_mnnvl repro {where} --manager {factory.spec} --ep {ep}",
                    pytrace=False,
                )
    # EP symmetry: every rank of a stage holds the same workspace after every layer.
    for stage in range(world.pp):
        ranks = results[stage * ep : (stage + 1) * ep]
        views = [[oracle.observed(oracle.capacity_of(s["state"])) for s in r] for r in ranks]
        assert all(v == views[0] for v in views), f"stage {stage}: ranks disagree: {views}"


def measured_layer(quant: QuantFormat, name: str) -> LayerSpec:
    """The measured failure's shape: hidden 4096, top_k 2, 8 experts, 256 tokens per rank."""
    return LayerSpec(quant, hidden_size=4096, top_k=2, num_experts=8, max_num_tokens=256, name=name)


KNOWN_BAD = ModelPlan.single_stage(
    [measured_layer(QuantFormat.NVFP4, "nvfp4 base")],
    mtp_head=[measured_layer(QuantFormat.BF16, "bf16 MTP head")],
    name="nvfp4-then-bf16",
)


@pytest.mark.mnnvl(world_size=2)
def test_nvfp4_layers_then_a_bf16_mtp_head(mnnvl_world: Any, manager_factory: Any, tmp_path: Path) -> None:
    """The bug that started it all: sized for NVFP4, then a bf16 head does not fit (0.7.2.post1: its combine;
    0.7.4: its dispatch)."""
    check_plan(mnnvl_world(), manager_factory, KNOWN_BAD, tmp_path / "nvfp4-then-bf16.json")


@pytest.mark.parametrize(
    "plan_file", ["deepseek-v3-r1-nvfp4-mtp.json", "deepseek-v3-r1-nvfp4-mtp-pp2.json", "total-need-gap.json"]
)
def test_model_plan(mnnvl_world: Any, manager_factory: Any, tmp_path: Path, plan_file: str) -> None:
    """Real model plans (the packaged ones), EP 2 on every PP stage: the MTP head lives on the last one."""
    plan = ModelPlan.load(PLANS / plan_file)
    check_plan(mnnvl_world(world_size=2 * plan.pp, pp=plan.pp), manager_factory, plan, tmp_path / plan_file)


@st.composite
def small_plans(draw: st.DrawFn) -> ModelPlan:
    """1-4 layers sharing top_k and num_experts (managers refuse a change), any format, small sizes."""
    top_k = draw(st.sampled_from(sorted(k for k in SUPPORTED_KERNEL_TOP_K if k <= 4)))
    layers = draw(
        st.lists(
            st.builds(
                LayerSpec,
                quant=st.sampled_from(list(QuantFormat)),
                hidden_size=st.integers(1, 8).map(lambda n: 128 * n),
                top_k=st.just(top_k),
                num_experts=st.just(8),
                max_num_tokens=st.integers(1, 64),
            ),
            min_size=1,
            max_size=4,
        )
    )
    return ModelPlan.single_stage(layers, name="hypothesis")


@pytest.mark.mnnvl(world_size=2)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=small_plans())
@example(plan=KNOWN_BAD)
def test_any_small_plan(mnnvl_world: Any, manager_factory: Any, tmp_path: Path, plan: ModelPlan) -> None:
    """Every example reuses the same warm world: no process is spawned per example."""
    check_plan(mnnvl_world(), manager_factory, plan, tmp_path / "falsifying-plan.json")


@pytest.mark.requires_one_sided
@pytest.mark.mnnvl(world_size=2)
def test_on_real_gpus(mnnvl_world: Any, manager_factory: Any, tmp_path: Path) -> None:
    """Always on FlashInfer itself; skipped (with the reason) where 2 NVLink GPUs are not available."""
    check_plan(mnnvl_world(backend="flashinfer"), manager_factory, KNOWN_BAD, tmp_path / "gpu.json")
