"""Inside ranks: one tiny batch through the manager's own forward-pass dispatch path, once per world.

The suite's round trips (:mod:`pytest_mnnvl.conformance.roundtrip`) call FlashInfer with the harness's own
keywords; an engine calls it with its own (vLLM 0.33's prepare/finalize passes ``max_tokens_per_rank=``, which
FlashInfer 0.7.4 renamed). So where a manager comes with its own path
(:meth:`pytest_mnnvl.managers.adapters.ManagerAdapter.dispatch_path`), the world's set-up builds it, initializes
it for :data:`PROBE_LAYER` and sends a few bf16 tokens through that path: a FlashInfer API the release lacks is a
compatibility verdict ("fails at dispatch"), a wrong combine or any other error the manager's. Managers
without a path skip it (nothing is built).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pytest_mnnvl.errors import HarnessFault
from pytest_mnnvl.managers import ManagerFactory
from pytest_mnnvl.model.layers import LayerSpec, QuantFormat

#: Small enough to cost nothing, large enough that every rank owns experts some token picks.
PROBE_LAYER = LayerSpec(QuantFormat.BF16, 256, 2, 8, 4, name="dispatch-path")


class DispatchPathMismatch(AssertionError):
    """The manager's own path ran but combined the wrong values (the harness's round trip would say where)."""


def check(ctx: Any, factory: ManagerFactory) -> str:
    """Run :data:`PROBE_LAYER` through the manager's own dispatch and combine on this rank; ``ok``. Called only for
    a manager the factory says has a path (:meth:`ManagerFactory.has_dispatch_path`), so an adapter that builds none
    is the harness losing it (a :class:`~pytest_mnnvl.errors.HarnessFault`), never a manager that passes unchecked."""
    import torch

    from pytest_mnnvl.conformance.roundtrip import combine_mismatch, distinct_owner_counts, ep_barrier, make_inputs
    from pytest_mnnvl.managers import handles
    from pytest_mnnvl.managers.compat import Stage, verdict_on

    layer = dataclasses.replace(PROBE_LAYER, num_experts=max(PROBE_LAYER.num_experts, 2 * ctx.ep_size))
    handles.api().evict_all()
    adapter = factory.adapter(factory(ctx.cpu_group))
    adapter.initialize(layer)
    try:
        with verdict_on(factory.label, Stage.DISPATCH, [adapter.handle(), adapter.moe_alltoall()]):
            path = adapter.dispatch_path(layer)
            if path is None:
                raise HarnessFault(
                    f"{factory.label}: the manager has its own dispatch path (known from its class), but the adapter "
                    "built none, so the suite would not check it"
                )
            ep_barrier(ctx)
            tokens = layer.max_num_tokens
            experts, payloads = make_inputs(layer, ctx.ep_rank, tokens, ctx.device)
            by_name = {p.name: t for p, t in zip(layer.dispatch_payloads, payloads, strict=True)}
            hidden = by_name["hidden_states"].view(torch.bfloat16)
            path.dispatch(hidden, experts, by_name["topk_weights"])
            ones = torch.ones((ctx.ep_size, tokens, layer.hidden_size), dtype=torch.bfloat16, device=ctx.device)
            combined = path.combine(ones).float().cpu()
        expected = distinct_owner_counts(layer, ctx.ep_rank, tokens, ctx.ep_size)
        wrong = combine_mismatch(combined.reshape(tokens, layer.hidden_size), expected, ctx.ep_rank, path.name)
        if wrong is not None:
            raise DispatchPathMismatch(f"the manager's own dispatch path ({path.name}): {wrong}")
        return "ok"
    finally:
        adapter.cleanup()
        handles.api().evict_all()
