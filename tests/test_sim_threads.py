"""The sim's kernel launches follow the session's load board within a call (on every supported FlashInfer
release: the launches are each release's own op module's)."""

from __future__ import annotations

from pytest_mnnvl.worlds.load import LoadBoard
from pytest_mnnvl.worlds.pool import Pool
from pytest_mnnvl.worlds.world import WorldSpec

from . import load_rank_fns as fns


def test_sim_kernel_launches_follow_the_load_within_a_call(
    seated_pool: tuple[Pool, LoadBoard], follow_cores: int
) -> None:
    """Slot 9 starts computing after the call began: the round trip's launches halve the one-rank world's pool."""
    pool, _board = seated_pool
    (seen,) = pool.world(WorldSpec(1, backend="sim")).run(fns.threads_around_a_round_trip, 9, 1)
    assert seen == (follow_cores, max(1, follow_cores // 2))
