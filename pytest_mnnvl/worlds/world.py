"""What a test, the ``mnnvl_world`` factory and the conformance driver see of a world and of the pool it
comes from, whichever launcher started the ranks: spawned rank processes (:mod:`pytest_mnnvl.worlds.pool`) or
torchrun's workers, each one rank (:mod:`pytest_mnnvl.worlds.spmd`). Code that takes a world names these
Protocols, so a test written against one launcher runs under the other.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from pytest_mnnvl.errors import MnnvlUsageError
from pytest_mnnvl.worlds.layout import Layout


@dataclass(frozen=True)
class WorldSpec:
    """Everything that makes two worlds interchangeable; the pool's cache key."""

    world_size: int
    pp: int = 1
    backend: str = "sim"
    env: tuple[tuple[str, str], ...] = ()
    devices: tuple[str, ...] | None = None
    #: Consecutive ranks per GPU of ``devices`` (:mod:`pytest_mnnvl.worlds.sharing`); 1: one GPU per rank.
    ranks_per_gpu: int = 1

    def __post_init__(self) -> None:
        try:
            Layout(self.world_size, self.pp)
        except ValueError as exc:
            raise MnnvlUsageError(str(exc)) from None
        if isinstance(self.ranks_per_gpu, bool) or not isinstance(self.ranks_per_gpu, int) or self.ranks_per_gpu < 1:
            raise MnnvlUsageError(f"WorldSpec(ranks_per_gpu={self.ranks_per_gpu!r}) is not valid; allowed: >= 1")
        if self.devices is not None and len(self.devices) * self.ranks_per_gpu < self.world_size:
            raise MnnvlUsageError(
                f"WorldSpec: {len(self.devices)} GPU(s) at {self.ranks_per_gpu} rank(s) per GPU cannot hold "
                f"{self.world_size} ranks"
            )

    def describe(self) -> str:
        extra = f", env={dict(self.env)}" if self.env else ""
        gpus = f", gpus={','.join(self.devices)}" if self.devices else ""
        shared = f", {self.ranks_per_gpu} ranks per GPU" if self.ranks_per_gpu > 1 else ""
        return f"world(size={self.world_size}, pp={self.pp}, backend={self.backend}{extra}{gpus}{shared})"


def function_reference(fn: Callable[..., Any]) -> tuple[str, str | None, str]:
    """(module, file, qualname) by which a rank imports ``fn``; refuses what it cannot import. Both launchers
    apply it, so a function that one of them refuses is refused by the other too."""
    module_name = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not module_name or not qualname or "<locals>" in qualname or "<lambda>" in qualname:
        raise MnnvlUsageError(
            f"world.run() needs a function importable by name in every rank (defined at module level), "
            f"got {fn!r}; move it to module level"
        )
    if module_name == "__main__":
        raise MnnvlUsageError(f"world.run() cannot send {qualname!r} from __main__: ranks cannot import it")
    module = sys.modules.get(module_name)
    return module_name, getattr(module, "__file__", None), qualname


class RankWorld(Protocol):
    """A world of ranks that runs a function on every rank. The launchers subclass it for :meth:`run`; each
    supplies the rest."""

    spec: WorldSpec
    #: Seconds a call may take unless it says otherwise (the factory sets it per test).
    timeout: float
    #: Seconds the first call may take while the ranks start (imports, rendezvous, a JIT build).
    startup_timeout: float

    @property
    def world_size(self) -> int: ...

    @property
    def pp(self) -> int: ...

    @property
    def backend(self) -> str: ...

    @property
    def alive(self) -> bool:
        """Whether the next call can run on the ranks as they are (else the launcher starts or rebuilds them)."""
        ...

    @property
    def pids(self) -> list[int]:
        """PIDs of the rank processes, in rank order."""
        ...

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Call ``fn(ctx, *args, **kwargs)`` on every rank; results in rank order."""
        __tracebackhide__ = True
        return self.call(fn, args, kwargs)

    def call(
        self,
        fn: Callable[..., Any],
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> list[Any]:
        """Like :meth:`run`, with an explicit per-call ``timeout`` (seconds)."""
        ...

    def agree(self, value: Any, what: str = "value") -> Any:
        """Rank 0's ``value`` on every rank (e.g. the plan Hypothesis drew there); ``what`` names it."""
        ...

    def close(self) -> None:
        """Stop what this world started."""
        ...


class WorldPool(Protocol):
    """Where worlds come from: one per :class:`WorldSpec`, reused while it works."""

    def world(self, spec: WorldSpec) -> RankWorld: ...

    def close(self) -> None:
        """Close every world this pool holds."""
        ...
