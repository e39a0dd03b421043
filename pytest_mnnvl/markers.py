"""The plugin's markers: their signatures, argument checks and the skip reasons they give.

Decided in the pytest process, never initialising CUDA: GPU facts come from
:mod:`pytest_mnnvl.probes` (NVML and ``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pytest_mnnvl.errors import MnnvlUsageError
from pytest_mnnvl.worlds.sharing import RanksPerGpu

#: Marker lines for ``config.addinivalue_line("markers", ...)``.
MARKER_LINES = (
    "requires_multi_gpu(n=2): skip unless at least n GPUs are visible to this pytest process.",
    "requires_one_sided: skip unless FlashInfer's one-sided MoE all-to-all can run: "
    "its module installed and >=2 GPUs with NVLink P2P, or >=1 GPU for the ranks to share with "
    "--mnnvl-ranks-per-gpu=auto or N>1.",
    "requires_ptrace: skip unless the installed FlashInfer's handle exchange can work here "
    "(pidfd_getfd needs CAP_SYS_PTRACE; SCM_RIGHTS releases need nothing).",
    "mnnvl(world_size=2, pp=1, timeout=None): the rank world the mnnvl_world fixture gives this test "
    "by default; on the flashinfer backend, skip unless world_size GPUs are visible (fewer with "
    "--mnnvl-ranks-per-gpu).",
)
CAPABILITY_MARKERS = ("requires_multi_gpu", "requires_one_sided", "requires_ptrace", "mnnvl")


def _int_arg(marker: str, name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MnnvlUsageError(f"@pytest.mark.{marker}({name}={value!r}): {name} must be an integer >= {low}")
    return value


@dataclass(frozen=True)
class WorldMark:
    world_size: int | None = None
    pp: int | None = None
    timeout: float | None = None


def parse_mnnvl_mark(args: tuple[Any, ...], kwargs: dict[str, Any]) -> WorldMark:
    """``mnnvl(world_size=…, pp=…, timeout=…)``; ``world_size`` may also be the first positional."""
    allowed = ("world_size", "pp", "timeout")
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown or len(args) > 1:
        raise MnnvlUsageError(
            f"@pytest.mark.mnnvl got {', '.join(unknown) or 'too many positional arguments'}; "
            f"allowed: {', '.join(allowed)}"
        )
    world_size = kwargs.get("world_size", args[0] if args else None)
    pp = kwargs.get("pp")
    timeout = kwargs.get("timeout")
    if timeout is not None:
        from pytest_mnnvl.settings import parse_timeout

        timeout = parse_timeout(timeout, "@pytest.mark.mnnvl(timeout)")
    return WorldMark(
        world_size=_int_arg("mnnvl", "world_size", world_size, 1) if world_size is not None else None,
        pp=_int_arg("mnnvl", "pp", pp, 1) if pp is not None else None,
        timeout=timeout,
    )


def parse_gpu_count(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    unknown = sorted(set(kwargs) - {"n"})
    if unknown or len(args) > 1:
        raise MnnvlUsageError("@pytest.mark.requires_multi_gpu takes one argument, n (default 2)")
    return _int_arg("requires_multi_gpu", "n", kwargs.get("n", args[0] if args else 2), 1)


def skip_reason(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], backend: str, ranks_per_gpu: RanksPerGpu = 1
) -> str | None:
    """Why a test carrying marker ``name`` cannot run here, or ``None`` when it can. ``ranks_per_gpu`` is
    ``--mnnvl-ranks-per-gpu``: in shared mode one GPU serves a whole world (``requires_multi_gpu(n)`` still
    counts physical GPUs)."""
    from pytest_mnnvl.probes.backend import missing_for_one_sided_shared
    from pytest_mnnvl.probes.gpus import missing_for_multi_gpu
    from pytest_mnnvl.probes.ptrace import missing_for_ptrace

    if name == "requires_multi_gpu":
        return missing_for_multi_gpu(parse_gpu_count(args, kwargs))
    if name == "requires_one_sided":
        if args or kwargs:
            raise MnnvlUsageError("@pytest.mark.requires_one_sided takes no arguments")
        return missing_for_one_sided_shared(2, ranks_per_gpu)
    if name == "requires_ptrace":
        if args or kwargs:
            raise MnnvlUsageError("@pytest.mark.requires_ptrace takes no arguments")
        return missing_for_ptrace()
    if name == "mnnvl":
        mark = parse_mnnvl_mark(args, kwargs)
        if backend == "flashinfer":
            return missing_for_one_sided_shared(mark.world_size or 2, ranks_per_gpu)
        return None
    raise AssertionError(name)
