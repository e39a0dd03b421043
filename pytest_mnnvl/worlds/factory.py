"""The ``mnnvl_world`` fixture's factory: a world's size, PP, backend and environment from the call, the test's
``mnnvl`` marker and its topology, then a warm world from the session's pool.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from pytest_mnnvl import settings as _settings
from pytest_mnnvl.errors import MnnvlUsageError
from pytest_mnnvl.session import SETTINGS_KEY, gpu_plan_for, mps_session, pool, resolve_backend
from pytest_mnnvl.worlds.layout import Topology

if TYPE_CHECKING:
    from pytest_mnnvl.worlds.world import RankWorld


class WorldFactory:
    """What the ``mnnvl_world`` fixture returns; defaults come from the marker, then the topology."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        _skip_unsupported_release()
        self._request = request

    def __call__(
        self,
        world_size: int | None = None,
        pp: int | None = None,
        *,
        backend: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> RankWorld:
        __tracebackhide__ = True
        from pytest_mnnvl.markers import parse_mnnvl_mark
        from pytest_mnnvl.worlds.world import WorldSpec

        config = self._request.config
        node_mark = self._request.node.get_closest_marker("mnnvl")
        mark = parse_mnnvl_mark(node_mark.args, dict(node_mark.kwargs)) if node_mark else None
        topology: Topology | None = None
        if "mnnvl_topology" in self._request.fixturenames:
            topology = self._request.getfixturevalue("mnnvl_topology")
        torchrun = config.stash[SETTINGS_KEY].launcher == "torchrun"
        default_size = int(os.environ["WORLD_SIZE"]) if torchrun else 2
        world_size = world_size or (mark and mark.world_size) or (topology and topology.world_size) or default_size
        pp = pp or (mark and mark.pp) or (topology and topology.pp) or 1
        chosen = backend or resolve_backend(config)
        from pytest_mnnvl.backends import BACKENDS

        if chosen not in BACKENDS:
            raise MnnvlUsageError(f"mnnvl_world(backend={chosen!r}) is not valid; allowed: {', '.join(BACKENDS)}")
        if not 1 <= world_size <= _settings.MAX_WORLD_SIZE:
            raise MnnvlUsageError(
                f"mnnvl_world(world_size={world_size!r}) is not valid; allowed: 1..{_settings.MAX_WORLD_SIZE}"
            )
        extra_env: dict[str, str] = {}
        plan = gpu_plan_for(config, world_size) if chosen == "flashinfer" and not torchrun else None
        if plan is not None:
            # --mnnvl-mps (and a shared rank's share of the SMs under MPS), before the hooks and env=
            extra_env.update(mps_session(config).state.rank_env(plan.ranks_per_gpu, os.environ))
        probe = WorldSpec(world_size, pp, chosen)
        for result in config.hook.pytest_mnnvl_rank_env(config=config, spec=probe):
            extra_env.update({str(k): str(v) for k, v in (result or {}).items()})
        extra_env.update({str(k): str(v) for k, v in (env or {}).items()})
        spec = WorldSpec(
            world_size,
            pp,
            chosen,
            tuple(sorted(extra_env.items())),
            # Under torchrun each rank takes GPU LOCAL_RANK of its own host.
            plan.devices if plan is not None else None,
            plan.ranks_per_gpu if plan is not None else 1,
        )
        world = pool(config).world(spec)
        world.timeout = timeout or (mark and mark.timeout) or config.stash[SETTINGS_KEY].timeout
        return world


def _skip_unsupported_release() -> None:
    """Skip every ``mnnvl_world`` test, at setup, when the installed FlashInfer is unsupported: one reason, raised
    from this one line (not the test's), so ``-rs`` reports them together instead of a rank traceback per test.
    At setup, because a skip inside a Hypothesis test prints its example; ``plain`` worlds, which would run,
    are skipped too (the fixture cannot know which backend the test will ask for)."""
    from pytest_mnnvl.backends import unsupported_release

    reason = unsupported_release()
    if reason is not None:
        pytest.skip(reason)
