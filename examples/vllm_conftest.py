"""A conftest.py for vLLM's own test tree: run the one-sided all-to-all manager tests on pytest-mnnvl.

Drop it in as ``tests/distributed/conftest.py`` (or merge it into the one there). pytest-mnnvl loads
through its ``pytest11`` entry point once installed (``pip install pytest-mnnvl``; on CPU-only CI also
``pip install --no-deps flashinfer-python``), so nothing here imports it at collection time.

What changes for vLLM's tests, helper by helper:

- ``_spawn_workers(world_size, fn)`` joined its processes without a timeout and ignored exit codes (a
  deadlock hung pytest; a worker killed by a signal let the test pass). Use ``mnnvl_world(world_size,
  pp=...)`` and ``world.run(fn, ...)``: a warm pool reused across tests, a per-call timeout
  (``--mnnvl-timeout``) with every rank's stack on a deadlock, and a crash named with its signal.
- the ``requires_ptrace`` helper read only CAP_SYS_PTRACE; ``@pytest.mark.requires_ptrace`` asks the
  installed FlashInfer how it exchanges handles (0.7.x: SCM_RIGHTS, no ptrace needed) and skips only
  when it really needs ptrace and does not have it. ``@pytest.mark.requires_one_sided`` replaces the
  "2 GPUs + FlashInfer one-sided" skip; on CPU CI ``--mnnvl-backend=sim`` runs the same tests on
  FlashInfer's own Python with the CUDA leaves simulated, vLLM's manager unmodified.
- a reproduction of a field failure: ``python -m pytest_mnnvl repro PLAN.json --manager vllm`` (or a packaged
  plan's name: ``repro deepseek-v3-r1-nvfp4-mtp --manager vllm``).

A test in this directory then reads::

    from vllm.distributed.device_communicators.all2all import FlashInferNVLinkOneSidedManager  # noqa

    def _grow(ctx, factory, layers):                      # module level: every rank imports it by name
        adapter = factory.adapter(factory(ctx.cpu_group))
        sizes = []
        for layer in layers:
            adapter.initialize(layer)
            sizes.append(adapter.state().size_per_rank)
        adapter.cleanup()
        return sizes

    @pytest.mark.requires_ptrace
    @pytest.mark.mnnvl(world_size=2)
    def test_workspace_grows_for_a_bf16_mtp_head(mnnvl_world, vllm_manager, nvfp4_then_bf16):
        sizes = mnnvl_world().run(_grow, vllm_manager, nvfp4_then_bf16)
        assert sizes == [[5_427_584, 8_442_240]] * 2        # measured on 2×H100, ep=2: vLLM 0.32, FlashInfer 0.7.2

To run pytest-mnnvl's full conformance suite against vLLM's manager from here::

    pytest -p pytest_mnnvl --pyargs <conformance suite> --mnnvl-manager=vllm --mnnvl-backend=sim
"""

from __future__ import annotations

from typing import Any

import pytest


def pytest_mnnvl_rank_env(config: pytest.Config, spec: Any) -> dict[str, str]:
    """Environment for every rank of a pytest-mnnvl world started from vLLM's tests."""
    return {
        # vLLM's has_flashinfer() otherwise wants flashinfer-cubin or nvcc + ninja on PATH.
        "VLLM_HAS_FLASHINFER_CUBIN": "1",
        "VLLM_LOGGING_LEVEL": "WARNING",
        # A rank world is one process per rank with its own group set-up: no V1 engine core subprocess.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }


@pytest.fixture(scope="session")
def vllm_manager() -> Any:
    """vLLM's ``FlashInferNVLinkOneSidedManager`` as a picklable factory ranks build on their EP group.

    Resolving reads vLLM's version from its metadata (0.32: PR #42976 shape, 0.33: ``flashinfer.moe_ep``
    shape) and imports vLLM only inside the ranks.
    """
    from pytest_mnnvl.errors import MnnvlUsageError
    from pytest_mnnvl.managers import resolve

    try:
        return resolve("vllm")
    except MnnvlUsageError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def nvfp4_then_bf16() -> list[Any]:
    """The plan of the field failure: NVFP4 decoder layers, then a bf16 MTP head (T=256, H=4096, top_k=2)."""
    from pytest_mnnvl.model.layers import LayerSpec, QuantFormat

    return [
        LayerSpec(quant, hidden_size=4096, top_k=2, num_experts=8, max_num_tokens=256, name=name)
        for quant, name in ((QuantFormat.NVFP4, "decoder"), (QuantFormat.BF16, "mtp"))
    ]


@pytest.fixture
def example_plan() -> Any:
    """Load a plan shipped with pytest-mnnvl (``example_plan("deepseek-v3-r1-nvfp4-mtp")``; ``python -m pytest_mnnvl
    list-plans`` names them), or ``NAME.json`` from ``directory``."""
    from pathlib import Path

    from pytest_mnnvl.model import plans as model_plans
    from pytest_mnnvl.model.layers import ModelPlan

    def load(name: str, directory: str | None = None) -> ModelPlan:
        base = Path(directory) if directory else model_plans.PLANS_DIR
        return ModelPlan.load(base / f"{name}.json")

    return load
