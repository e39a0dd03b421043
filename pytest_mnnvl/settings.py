"""The plugin's settings: one place that reads options and ini twins and validates them.

Every bad value becomes an :class:`~pytest_mnnvl.errors.MnnvlUsageError` naming the option, the
value and what is allowed; the plugin turns it into ``pytest.UsageError`` (exit code 4).
Precedence, as in pytest-timeout: command line, then ini, then the default.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from pytest_mnnvl.backends import BACKEND_CHOICES
from pytest_mnnvl.errors import MnnvlUsageError
from pytest_mnnvl.worlds.sharing import AUTO, RanksPerGpu

LAUNCHER_CHOICES = ("spawn", "torchrun")
MPS_CHOICES = ("auto", "off", "start")
#: What a torchrun worker finds in its environment and a torchrun session cannot do without.
TORCHRUN_ENV = ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
BUILTIN_MANAGERS = ("reference", "moe_ep_reference", "vllm", "mutant:<name>")
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_WORLD_SIZES = (2, 4)
DEFAULT_PP = (1, 2)
MAX_WORLD_SIZE = 64
#: Bounds of every timeout, in seconds (options, ini twins, the mnnvl marker, ``repro --timeout``). Below a
#: second even a warm world cannot answer a call; above a day is a typo; ``inf`` once reached the selector
#: and ended in ``OverflowError``.
MIN_TIMEOUT_S = 1.0
MAX_TIMEOUT_S = 86_400.0
#: ASCII only: ``str.isdigit()``, ``int()`` and ``float()`` also take '²', '١' and '４'.
_ASCII_INT = re.compile(r"[+-]?[0-9]{1,18}")  # and short: int() refuses over 4,300 digits
_ASCII_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_MANAGER_SPEC = re.compile(r"^((moe_ep_)?reference|vllm|mutant:[A-Za-z0-9_\-]+|[A-Za-z_][\w.]*:[A-Za-z_][\w.]*)$")

# Help texts are shared by the option and its ini twin.
BACKEND_HELP = (
    "Where ranks run: auto (FlashInfer when it is installed and >=2 NVLink GPUs are visible, or >=1 GPU "
    "with --mnnvl-ranks-per-gpu=auto or N>1; else sim), sim (FlashInfer's Python on CPU) or flashinfer (real GPUs)."
)
TIMEOUT_HELP = (
    "Seconds a call on a rank world may take before it is reported as a deadlock, or as a world too slow for "
    "its timeout when every rank is computing (default 60)."
)
STRICT_HELP = "Fail instead of skip when a test carrying an mnnvl marker cannot run, and gate on SHOULD checks."
WORLD_SIZES_HELP = "Comma-separated world sizes the conformance topologies use (default 2,4)."
PP_HELP = "Comma-separated pipeline-parallel sizes the conformance topologies use (default 1,2)."
REPORT_HELP = "Write the conformance report as JSON to this path (Markdown next to it)."
MANAGER_HELP = "Manager under test: reference, vllm, mutant:<name>, or package.module:Class (default reference)."
LAUNCHER_HELP = (
    "Who starts the ranks: spawn (this pytest process starts a pool of rank processes; default) or "
    "torchrun (every torchrun worker runs this pytest session and is one rank: multi-node)."
)
WARM_WORLDS_HELP = "How many rank worlds stay warm at once (default 2)."
RANKS_PER_GPU_HELP = (
    "Ranks of one world per GPU on the flashinfer backend: 1 (default: one GPU per rank, NVLink between them), "
    "N (up to N consecutive ranks share a GPU) or auto (as many as a world needs when there are fewer GPUs "
    "than ranks). A shared world builds its groups on gloo and does not exercise NVLink."
)
MPS_HELP = (
    "CUDA MPS for the flashinfer ranks: auto (default: a running MPS control daemon is used, none is started), "
    "off (the ranks run without MPS) or start (this session starts a private daemon and stops it at its end)."
)
STARTUP_TIMEOUT_HELP = (
    "Seconds a rank world may take to start (default 120 on sim, 900 on flashinfer: a cold JIT build "
    "of FlashInfer's one-sided module takes minutes)."
)


@dataclass(frozen=True)
class Option:
    """One ``--mnnvl-*`` option and its ini twin: the one place each is named, for ``pytest_addoption`` and for
    :func:`from_config` alike (``name`` is the dest and the ini key; the flag is it with dashes)."""

    name: str
    metavar: str | None
    help: str
    #: A flag (``store_true``); its ini twin is read as a boolean.
    flag: bool = False
    #: The ini value's type: ``paths`` makes a relative path relative to the ini file.
    ini_type: str | None = None

    @property
    def flag_text(self) -> str:
        return "--" + self.name.replace("_", "-")


WAIVERS_HELP = (
    "JSON or TOML file of waivers: known failures (by invariant or test id, manager glob, reason, expiry date) "
    "reported as xfailed instead of failing the run."
)
OPTIONS = (
    Option("mnnvl_backend", "auto|sim|flashinfer", BACKEND_HELP),
    Option("mnnvl_timeout", "SECONDS", TIMEOUT_HELP),
    Option("mnnvl_strict", None, STRICT_HELP, flag=True),
    Option("mnnvl_world_sizes", "N[,N…]", WORLD_SIZES_HELP),
    Option("mnnvl_pp", "N[,N…]", PP_HELP),
    Option("mnnvl_report", "PATH", REPORT_HELP),
    Option("mnnvl_manager", "SPEC", MANAGER_HELP),
    Option("mnnvl_warm_worlds", "N", WARM_WORLDS_HELP),
    Option("mnnvl_startup_timeout", "SECONDS", STARTUP_TIMEOUT_HELP),
    Option("mnnvl_launcher", "spawn|torchrun", LAUNCHER_HELP),
    Option("mnnvl_waivers", "FILE", WAIVERS_HELP, ini_type="paths"),
    Option("mnnvl_ranks_per_gpu", "N|auto", RANKS_PER_GPU_HELP),
    Option("mnnvl_mps", "auto|off|start", MPS_HELP),
)


@dataclass(frozen=True)
class Settings:
    backend: str = "auto"
    timeout: float = DEFAULT_TIMEOUT_S
    strict: bool = False
    world_sizes: tuple[int, ...] = DEFAULT_WORLD_SIZES
    pp_sizes: tuple[int, ...] = DEFAULT_PP
    report: str | None = None
    manager: str = "reference"
    warm_worlds: int = 2
    startup_timeout: float | None = None
    launcher: str = "spawn"
    #: ``--mnnvl-waivers`` (read and validated by :mod:`pytest_mnnvl.conformance.waivers` at configure time).
    waivers: str | None = None
    #: ``--mnnvl-ranks-per-gpu``: an integer >= 1 or ``"auto"`` (:mod:`pytest_mnnvl.worlds.sharing`).
    ranks_per_gpu: RanksPerGpu = 1
    #: ``--mnnvl-mps``: one of :data:`MPS_CHOICES` (:mod:`pytest_mnnvl.worlds.mps`).
    mps: str = "auto"
    #: What the session should be warned about (a given PP size that no topology uses).
    notices: tuple[str, ...] = ()

    def pp_without_topology(self) -> tuple[int, ...]:
        """PP sizes that fit none of the world sizes (a PP that fits some is kept for those only, on purpose:
        ``--mnnvl-pp=1,2`` on a 2-GPU machine runs PP 1 and skips the PP tests)."""
        used = {pp for _ws, pp in self.topologies()}
        return tuple(pp for pp in self.pp_sizes if pp not in used)

    def topologies(self) -> list[tuple[int, int]]:
        """(world size, pp) pairs the suite runs: every pp that divides a world size into >=2 EP ranks."""
        pairs = [(ws, pp) for ws in self.world_sizes for pp in self.pp_sizes if ws % pp == 0 and ws // pp >= 2]
        if not pairs:
            raise MnnvlUsageError(
                f"no topology fits --mnnvl-world-sizes={_join(self.world_sizes)} and "
                f"--mnnvl-pp={_join(self.pp_sizes)}: each pp must divide a world size into EP groups of >= 2 ranks"
            )
        return pairs


def _join(values: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in values)


def parse_backend(value: str) -> str:
    value = value.strip().lower()
    if value not in BACKEND_CHOICES:
        raise MnnvlUsageError(f"--mnnvl-backend={value!r} is not valid; allowed: {', '.join(BACKEND_CHOICES)}")
    return value


def parse_launcher(value: str, environ: Mapping[str, str]) -> str:
    value = value.strip().lower()
    if value not in LAUNCHER_CHOICES:
        raise MnnvlUsageError(f"--mnnvl-launcher={value!r} is not valid; allowed: {', '.join(LAUNCHER_CHOICES)}")
    missing = [name for name in TORCHRUN_ENV if not environ.get(name)]
    if value == "torchrun" and missing:
        raise MnnvlUsageError(
            f"--mnnvl-launcher=torchrun needs torchrun's environment, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set; start the session with "
            "`torchrun --nproc-per-node N -m pytest -p pytest_mnnvl ... --mnnvl-launcher=torchrun`"
        )
    return value


def parse_ranks_per_gpu(value: Any, source: str = "--mnnvl-ranks-per-gpu") -> RanksPerGpu:
    text = str(value).strip().lower()
    if text == AUTO:
        return AUTO
    number = ascii_int(text)
    if number is None or not 1 <= number <= MAX_WORLD_SIZE:
        raise MnnvlUsageError(f"{source}={value!r} is not valid; allowed: an integer 1..{MAX_WORLD_SIZE} or auto")
    return number


def parse_mps(value: Any, source: str = "--mnnvl-mps") -> str:
    text = str(value).strip().lower()
    if text not in MPS_CHOICES:
        raise MnnvlUsageError(f"{source}={value!r} is not valid; allowed: {', '.join(MPS_CHOICES)}")
    return text


def ascii_int(value: Any) -> int | None:
    """``value`` as an integer written in ASCII digits (at most 18, an optional sign), else None."""
    text = str(value).strip()
    return int(text) if _ASCII_INT.fullmatch(text) else None


def _seconds(value: Any) -> float | None:
    text = str(value).strip()
    return float(text) if _ASCII_NUMBER.fullmatch(text) else None


def timeout_range(value: Any) -> float | None:
    """``value`` as seconds in ``MIN_TIMEOUT_S..MAX_TIMEOUT_S``, else None."""
    seconds = _seconds(value)
    return seconds if seconds is not None and MIN_TIMEOUT_S <= seconds <= MAX_TIMEOUT_S else None


def parse_timeout(value: Any, source: str = "--mnnvl-timeout") -> float:
    allowed = f"allowed: {MIN_TIMEOUT_S:g}..{MAX_TIMEOUT_S:g} seconds"
    if _seconds(value) is None:
        raise MnnvlUsageError(f"{source}={value!r} is not a number of seconds; {allowed}")
    seconds = timeout_range(value)
    if seconds is None:
        raise MnnvlUsageError(f"{source}={value!r} is not valid; {allowed}")
    return seconds


def parse_int_list(value: str, option: str, low: int, high: int) -> tuple[int, ...]:
    parts = [p.strip() for p in str(value).split(",")]
    if not parts or any(not p for p in parts):
        raise MnnvlUsageError(f"{option}={value!r} is not valid; allowed: comma-separated integers {low}..{high}")
    numbers = []
    for part in parts:
        number = ascii_int(part)
        if number is None or not low <= number <= high:
            raise MnnvlUsageError(
                f"{option}={value!r}: {part!r} is not valid; allowed: comma-separated integers {low}..{high}"
            )
        numbers.append(number)
    return tuple(dict.fromkeys(numbers))


def parse_manager(value: str) -> str:
    value = value.strip()
    if not _MANAGER_SPEC.match(value):
        raise MnnvlUsageError(
            f"--mnnvl-manager={value!r} is not valid; allowed: {', '.join(BUILTIN_MANAGERS)} or package.module:Class"
        )
    return value


def parse_bool(value: Any, source: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise MnnvlUsageError(f"{source}={value!r} is not valid; allowed: true, false")


def parse_positive_int(value: Any, source: str) -> int:
    number = ascii_int(value)
    if number is None or number < 1:
        raise MnnvlUsageError(f"{source}={value!r} is not valid; allowed: an integer >= 1")
    return number


def parse_waivers_path(value: Any) -> str:
    """The command line gives a string; the ini twin (type ``paths``) a list resolved against the ini file."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise MnnvlUsageError(f"mnnvl_waivers={' '.join(map(str, value))!r} is not valid; allowed: one file")
        value = value[0]
    text = str(value).strip()
    if not text:
        raise MnnvlUsageError("--mnnvl-waivers='' is not valid; allowed: a JSON or TOML file")
    return text


def from_config(getoption: Any, getini: Any, environ: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from pytest's ``config.getoption``/``config.getini`` (and torchrun's environment)."""
    environ = os.environ if environ is None else environ

    def pick(option: Option) -> Any:
        value = getoption(option.name)
        if option.flag:
            return bool(value) or parse_bool(getini(option.name) or False, option.name)
        if value is None:
            value = getini(option.name)
            if value in ("", None, []):
                return None
        return value

    given = {option.name: pick(option) for option in OPTIONS}
    backend = given["mnnvl_backend"]
    timeout = given["mnnvl_timeout"]
    world_sizes = given["mnnvl_world_sizes"]
    pp = given["mnnvl_pp"]
    manager = given["mnnvl_manager"]
    report = given["mnnvl_report"]
    warm = given["mnnvl_warm_worlds"]
    startup = given["mnnvl_startup_timeout"]
    waivers = given["mnnvl_waivers"]
    launcher = parse_launcher(str(given["mnnvl_launcher"] or "spawn"), environ)
    ranks_per_gpu = given["mnnvl_ranks_per_gpu"]
    mps = given["mnnvl_mps"]
    strict = given["mnnvl_strict"]
    if launcher == "torchrun" and world_sizes is None:
        # Under torchrun the one world there is has torchrun's size.
        world_sizes = environ["WORLD_SIZE"]
    settings = Settings(
        backend=parse_backend(backend) if backend is not None else "auto",
        timeout=parse_timeout(timeout) if timeout is not None else DEFAULT_TIMEOUT_S,
        strict=bool(strict),
        world_sizes=(
            parse_int_list(world_sizes, "--mnnvl-world-sizes", 1, MAX_WORLD_SIZE)
            if world_sizes is not None
            else DEFAULT_WORLD_SIZES
        ),
        pp_sizes=parse_int_list(pp, "--mnnvl-pp", 1, MAX_WORLD_SIZE) if pp is not None else DEFAULT_PP,
        report=str(report) if report is not None else None,
        manager=parse_manager(manager) if manager is not None else "reference",
        warm_worlds=parse_positive_int(warm, "--mnnvl-warm-worlds") if warm is not None else 2,
        startup_timeout=parse_timeout(startup, "--mnnvl-startup-timeout") if startup is not None else None,
        launcher=launcher,
        waivers=parse_waivers_path(waivers) if waivers is not None else None,
        ranks_per_gpu=parse_ranks_per_gpu(ranks_per_gpu) if ranks_per_gpu is not None else 1,
        mps=parse_mps(mps) if mps is not None else "auto",
    )
    if launcher == "torchrun" and (settings.ranks_per_gpu != 1 or settings.mps != "auto"):
        # torchrun starts the ranks and gives each its GPU (LOCAL_RANK): this session places none of them.
        raise MnnvlUsageError(
            f"--mnnvl-ranks-per-gpu={settings.ranks_per_gpu} --mnnvl-mps={settings.mps} is not valid with "
            "--mnnvl-launcher=torchrun; allowed there: --mnnvl-ranks-per-gpu=1 and --mnnvl-mps=auto (torchrun "
            "places the ranks on GPUs)"
        )
    settings.topologies()  # validates the combination now, not in the middle of collection
    if pp is not None:
        # Only a PP size the user gave: the default PP 2 on a 2-rank world is the intended 2-GPU case.
        notices = tuple(_unused_pp_notice(settings, pp_size) for pp_size in settings.pp_without_topology())
        settings = replace(settings, notices=notices)
    return settings


def _unused_pp_notice(settings: Settings, pp: int) -> str:
    return (
        f"--mnnvl-pp={_join(settings.pp_sizes)}: {pp} fits no world size of "
        f"--mnnvl-world-sizes={_join(settings.world_sizes)} and is not run; it needs a world size that is a "
        f"multiple of {pp} and at least {2 * pp} (EP groups of >= 2 ranks)"
    )
