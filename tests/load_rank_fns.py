"""Functions the load-following tests run in ranks (module level, importable by name in every rank)."""

from __future__ import annotations

import os
from typing import Any


def threads_now(ctx: Any) -> int:
    import torch

    return torch.get_num_threads()


def set_own_threads(ctx: Any, count: int) -> int:
    """What a rank's own code may do: choose its count (the follower must leave it alone from then on)."""
    import torch

    torch.set_num_threads(count)
    return torch.get_num_threads()


def threads_around_a_round_trip(ctx: Any, slot: int, ranks: int) -> tuple[int, int]:
    """The count at the call's start, then after a sim round trip begun once slot ``slot`` of the board (a
    pretend worker) runs ``ranks`` ranks: the kernel launches follow the board mid-call."""
    import torch

    from pytest_mnnvl.conformance.roundtrip import build_union_alltoall, round_trip
    from pytest_mnnvl.model.layers import LayerSpec, QuantFormat
    from pytest_mnnvl.worlds.load import BOARD_ENV, LoadBoard

    layer = LayerSpec(QuantFormat.BF16, hidden_size=128, top_k=2, num_experts=8, max_num_tokens=8)
    a2a = build_union_alltoall(ctx, [layer])
    before = torch.get_num_threads()
    board = LoadBoard.open(os.environ[BOARD_ENV], writable=True)
    board.mark(slot, ranks)
    try:
        round_trip(a2a, layer, ctx.ep_rank, ctx.ep_size, 8, ctx.device)
        return before, torch.get_num_threads()
    finally:
        board.mark(slot, 0)
        board.close()


def board_seen(ctx: Any) -> tuple[bool, int]:
    """Whether this rank was given the session's board, and the ranks it says are computing now."""
    from pytest_mnnvl.worlds.load import BOARD_ENV, LoadBoard

    path = os.environ.get(BOARD_ENV)
    if not path:
        return False, 0
    board = LoadBoard.open(path)
    try:
        return True, board.busy_ranks()
    finally:
        board.close()
