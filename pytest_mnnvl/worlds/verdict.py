"""A call's verdict from what its ranks did, the same whichever launcher ran them: the results in rank order,
or the exception the caller sees (:class:`~pytest_mnnvl.errors.RankError`, a skip, :class:`~pytest_mnnvl.errors.
RankCrashed`, or :class:`~pytest_mnnvl.errors.WorldTimeout` with the slow-or-deadlock diagnosis of
:mod:`pytest_mnnvl.worlds.stall`). The launchers gather the evidence their own way (the pool from its rank
processes, torchrun's ranks from each other's published statuses) and build every verdict here, so the two
word them alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pytest_mnnvl.errors import PythonFrame, RankCrashed, RankError, WorldTimeout
from pytest_mnnvl.worlds import stall


def outcomes(results: Mapping[int, tuple[str, Any]], world_size: int) -> list[Any]:
    """The results in rank order when every rank returned ``("ok", result)``; else :class:`RankError` for the
    ranks that raised, else the lowest rank's skip. A rank without an outcome was still running when a peer's
    failure stopped the world; the error or skip says so."""
    __tracebackhide__ = True
    stuck = [rank for rank in range(world_size) if rank not in results]
    note = f"ranks {stuck} were still running and were stopped" if stuck else ""
    errors = {rank: detail for rank, (kind, detail) in results.items() if kind == "error"}
    if errors:
        raise RankError(errors, world_size, note)
    skips = sorted((rank, detail) for rank, (kind, detail) in results.items() if kind == "skip")
    if skips:
        import pytest

        pytest.skip(f"[rank {skips[0][0]}] {skips[0][1]}" + (f" ({note})" if note else ""))
    return [results[rank][1] for rank in range(world_size)]


def failed(results: Mapping[int, tuple[str, Any]], world_size: int) -> bool:
    """Whether :func:`outcomes` raises for ``results`` (a rank missing, raised or skipped)."""
    return len(results) < world_size or any(kind != "ok" for kind, _ in results.values())


def crashed(
    rank: int, returncode: int | None, during: str, stack: Sequence[PythonFrame] = (), more: str = ""
) -> RankCrashed:
    """Rank ``rank`` left the world during ``during``; ``more`` (its last output, the other ranks gone) follows
    the first line's text."""
    error = RankCrashed(rank, returncode, during, stack)
    if more:
        error.args = (error.args[0] + more,)
    return error


def late(
    ranks: Sequence[stall.RankAtDeadline],
    backend: str,
    timeout: float,
    stacks: Mapping[int, str],
    during: str,
    threads: str,
) -> WorldTimeout:
    """The call passed its ``timeout``: :class:`~pytest_mnnvl.errors.WorldTooSlow` when every rank still
    running gets somewhere, else :class:`~pytest_mnnvl.errors.WorldDeadlock`. On a GPU backend a busy host
    thread proves nothing (:mod:`pytest_mnnvl.worlds.stall`); ``threads`` says what the ranks ran with."""
    diagnosis = stall.diagnose(ranks, busy_is_progress=backend != "flashinfer")
    return diagnosis.error(timeout, stacks, during, stall.advice(threads))
