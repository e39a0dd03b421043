"""How many intra-op threads each rank's torch runs: its share of the machine, unless the user says otherwise.

torch sizes its intra-op (OpenMP) pool for the whole machine in every process, so N ranks run N pools of all
the cores: on 16 cores a 2-rank sim world ran 32 busy threads, and DeepSeek-sized plans passed their 60 s
timeout (with one thread per rank the same tests took a quarter of the time). So every rank the pool spawns
gets ``OMP_NUM_THREADS`` = the rank's share::

    share = max(1, usable cores // (ranks of the world × worlds running at once))

*usable cores*: the CPUs this process may run on (``os.sched_getaffinity``: taskset, cpusets), capped by a
cgroup CPU quota (a container's ``--cpus``), not ``os.cpu_count()``. *Worlds running at once*: the xdist
workers (``PYTEST_XDIST_WORKER_COUNT``); one session runs one world's call at a time, and warm worlds that
wait for their next call use no CPU.

A user's setting wins: ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` in pytest's environment, from a
``pytest_mnnvl_rank_env`` hook or ``mnnvl_world(env=...)``; ``torch.set_num_threads()`` in a rank's code
runs after this anyway. ``PYTEST_MNNVL_RANK_THREADS`` chooses what ranks get otherwise: ``share`` (the
default), ``torch`` (torch's own default, a pool of all usable cores per rank: the old behaviour, for
comparisons) or a count. The variable has to reach the rank before torch is imported there, so it is set in
the environment a rank is spawned with; under torchrun the ranks are the pytest processes, and
:func:`apply_in_process` calls ``torch.set_num_threads`` instead (torchrun itself sets
``OMP_NUM_THREADS=1`` for its workers when ``--nproc-per-node`` > 1 and the variable is unset, and that is
left alone: it cannot be told from a user's own 1).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from pytest_mnnvl.errors import MnnvlUsageError

#: The variables torch (OpenMP, MKL) sizes its intra-op pool by; either one set is the user's choice.
USER_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: What ranks get when the user set neither: ``share``, ``torch`` or a count.
POLICY_ENV = "PYTEST_MNNVL_RANK_THREADS"
SHARE, TORCH = "share", "torch"
XDIST_WORKERS_ENV = "PYTEST_XDIST_WORKER_COUNT"


@dataclass(frozen=True)
class Policy:
    """``PYTEST_MNNVL_RANK_THREADS`` parsed: ``kind`` is ``share``, ``torch`` or ``count`` (then ``count``)."""

    kind: str = SHARE
    count: int = 0


def policy(environ: Mapping[str, str] | None = None) -> Policy:
    """The policy the environment asks for; a bad value is a usage error naming it and what is allowed."""
    environ = os.environ if environ is None else environ
    raw = environ.get(POLICY_ENV, "")
    text = raw.strip().lower()
    if text in ("", SHARE):
        return Policy()
    if text == TORCH:
        return Policy(TORCH)
    if text.isascii() and text.isdigit() and 1 <= int(text) <= 4096:
        return Policy("count", int(text))
    raise MnnvlUsageError(f"{POLICY_ENV}={raw!r} is not valid; allowed: share (the default), torch, or a count >= 1")


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in cores (``2.5`` for ``--cpus=2.5``), or None without one.

    cgroup v2: ``cpu.max`` ("QUOTA PERIOD", or "max PERIOD"); v1: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``
    of the ``cpu`` controller's hierarchy (-1 is no quota). Looked up at the process's own cgroup path and then at
    the root (inside a container the namespace often shows ``/``)."""
    try:
        with open(proc_cgroup, encoding="utf-8") as f:
            entries = [line.strip().split(":", 2) for line in f if line.count(":") >= 2]
    except OSError:
        entries = []
    for _id, controllers, path in entries:
        names = controllers.split(",") if controllers else []
        if not names:  # v2: one unified hierarchy
            for base in _candidates(root, path):
                limit = _read_v2(os.path.join(base, "cpu.max"))
                if limit is not None:
                    return limit
        elif "cpu" in names:
            for mount in (controllers, "cpu", "cpu,cpuacct"):
                for base in _candidates(os.path.join(root, mount), path):
                    limit = _read_v1(base)
                    if limit is not None:
                        return limit
    return None


def _candidates(root: str, path: str) -> list[str]:
    own = os.path.join(root, path.lstrip("/"))
    return [own, root] if own.rstrip("/") != root.rstrip("/") else [root]


def _read_v2(path: str) -> float | None:
    try:
        with open(path, encoding="utf-8") as f:
            quota, _, period = f.read().strip().partition(" ")
        if quota == "max":
            return None
        return int(quota) / int(period or "100000")
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _read_v1(base: str) -> float | None:
    try:
        with open(os.path.join(base, "cpu.cfs_quota_us"), encoding="utf-8") as f:
            quota = int(f.read().strip())
        with open(os.path.join(base, "cpu.cfs_period_us"), encoding="utf-8") as f:
            period = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cores() -> int:
    """CPUs this process may run on (affinity), capped by the cgroup quota rounded down (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, max(1, math.floor(limit)))
    return max(1, cpus)


def worlds_at_once(environ: Mapping[str, str] | None = None) -> int:
    """How many worlds may compute at the same time on this machine: one per xdist worker."""
    environ = os.environ if environ is None else environ
    text = environ.get(XDIST_WORKERS_ENV, "").strip()
    return int(text) if text.isascii() and text.isdigit() and int(text) > 0 else 1


def share(world_size: int, cores: int | None = None, worlds: int | None = None) -> int:
    """One rank's share: ``max(1, cores // (world_size × worlds))``."""
    cores = usable_cores() if cores is None else cores
    worlds = worlds_at_once() if worlds is None else worlds
    return max(1, cores // (max(1, world_size) * max(1, worlds)))


def user_setting(env: Mapping[str, str]) -> tuple[str, str] | None:
    """The user's own ``(variable, value)`` among :data:`USER_VARIABLES`, or None."""
    for name in USER_VARIABLES:
        value = env.get(name)
        if value is not None and value.strip():
            return name, value
    return None


def threads_for(world_size: int, env: Mapping[str, str], environ: Mapping[str, str] | None = None) -> int | None:
    """What a rank of a ``world_size`` world should run, given the environment it is about to get (``env``:
    pytest's, the hooks' and the fixture's), or None to leave it alone (the user's setting, or ``torch``)."""
    if user_setting(env) is not None:
        return None
    chosen = policy(environ)
    if chosen.kind == TORCH:
        return None
    if chosen.kind == "count":
        return chosen.count
    return share(world_size, worlds=worlds_at_once(environ))


def set_in_rank_env(env: dict[str, str], world_size: int) -> int | None:
    """Give a spawned rank its thread count through ``OMP_NUM_THREADS`` (read by torch at import); the count,
    or None where it is the user's or torch's to choose."""
    count = threads_for(world_size, env, env)
    if count is not None:
        env["OMP_NUM_THREADS"] = str(count)
    return count


def describe(env: Mapping[str, str], ranks: int) -> str:
    """What ``ranks`` ranks given ``env`` run with, for a slow world's advice."""
    user = user_setting(env)
    setting = f"{user[0]}={user[1]}" if user is not None else "torch's default, a thread per core"
    return f"each of the {ranks} ranks runs {setting}, on {usable_cores()} usable cores; see {POLICY_ENV}"


def apply_in_process(local_ranks: int) -> int | None:
    """Under torchrun (the ranks are the pytest processes, torch is imported already): ``torch.set_num_threads``
    to the share of ``local_ranks`` ranks on this host, unless a variable says otherwise; returns what it set."""
    count = threads_for(local_ranks, os.environ)
    if count is None:
        return None
    import torch

    torch.set_num_threads(count)
    return count


def header_line(world_sizes: tuple[int, ...], workers: int, torchrun_local_ranks: int | None = None) -> str:
    """What the session header says about the ranks' threads (``workers``: xdist workers, 1 without xdist)."""
    chosen = policy()
    user = user_setting(os.environ)
    if user is not None:
        name, value = user
        how = f"{name}={value} from the environment"
        if torchrun_local_ranks is not None and name == "OMP_NUM_THREADS":
            how += " (torchrun sets OMP_NUM_THREADS=1 when --nproc-per-node > 1 and it is unset)"
        return f"mnnvl: rank threads: {how}"
    if chosen.kind == TORCH:
        return f"mnnvl: rank threads: torch's default ({POLICY_ENV}=torch): {usable_cores()} per rank"
    if chosen.kind == "count":
        return f"mnnvl: rank threads: {chosen.count} intra-op threads per rank ({POLICY_ENV}={chosen.count})"
    cores = usable_cores()
    sizes = (torchrun_local_ranks,) if torchrun_local_ranks is not None else tuple(sorted(set(world_sizes)))
    worlds = 1 if torchrun_local_ranks is not None else max(1, workers)
    parts = []
    for i, size in enumerate(sizes):
        count = share(size, cores, worlds)
        noun = "intra-op thread" + ("s" if count != 1 else "")
        head = f"{count} {noun} per rank" if i == 0 else f"{count} per rank"
        what = f"of {size} ranks on this host" if torchrun_local_ranks is not None else f"of a {size}-rank world"
        parts.append(f"{head} {what}")
    at_once = f"{worlds} world{'s' if worlds != 1 else ''} at a time" + (": xdist workers" if worlds > 1 else "")
    return (
        f"mnnvl: rank threads: {', '.join(parts)} ({cores} usable cores, {at_once}; "
        f"OMP_NUM_THREADS or {POLICY_ENV} sets it)"
    )
