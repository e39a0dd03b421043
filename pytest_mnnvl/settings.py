"""The plugin's settings: one place that reads options and ini twins and validates them.

Every bad value becomes an :class:`~pytest_mnnvl.errors.MnnvlUsageError` naming the option, the
value and what is allowed; the plugin turns it into ``pytest.UsageError`` (exit code 4).
Precedence, as in pytest-timeout: command line, then ini, then the default.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pytest_mnnvl.errors import MnnvlUsageError

BACKEND_CHOICES = ("auto", "sim", "flashinfer")
LAUNCHER_CHOICES = ("spawn", "torchrun")
#: What a torchrun worker finds in its environment and a torchrun session cannot do without.
TORCHRUN_ENV = ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
BUILTIN_MANAGERS = ("reference", "vllm", "mutant:<name>")
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_WORLD_SIZES = (2, 4)
DEFAULT_PP = (1, 2)
MAX_WORLD_SIZE = 64
_MANAGER_SPEC = re.compile(r"^(reference|vllm|mutant:[A-Za-z0-9_\-]+|[A-Za-z_][\w.]*:[A-Za-z_][\w.]*)$")

# Help texts are shared by the option and its ini twin.
BACKEND_HELP = (
    "Where ranks run: auto (FlashInfer when it is installed and >=2 NVLink GPUs are visible, "
    "else sim), sim (FlashInfer's Python on CPU) or flashinfer (real GPUs)."
)
TIMEOUT_HELP = "Seconds a call on a rank world may take before it is reported as a deadlock (default 60)."
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
STARTUP_TIMEOUT_HELP = (
    "Seconds a rank world may take to start (default 120 on sim, 900 on flashinfer: a cold JIT build "
    "of FlashInfer's one-sided module takes minutes)."
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
    #: ``--mnnvl-waivers`` (read and validated by :mod:`pytest_mnnvl.waivers` at configure time).
    waivers: str | None = None

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


def parse_timeout(value: Any, source: str = "--mnnvl-timeout") -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise MnnvlUsageError(f"{source}={value!r} is not a number of seconds; allowed: a number > 0") from None
    if not seconds > 0 or seconds == float("inf"):
        raise MnnvlUsageError(f"{source}={value!r} is not valid; allowed: a finite number of seconds > 0")
    return seconds


def parse_int_list(value: str, option: str, low: int, high: int) -> tuple[int, ...]:
    parts = [p.strip() for p in str(value).split(",")]
    if not parts or any(not p for p in parts):
        raise MnnvlUsageError(f"{option}={value!r} is not valid; allowed: comma-separated integers {low}..{high}")
    numbers = []
    for part in parts:
        if not part.isdigit() or not low <= int(part) <= high:
            raise MnnvlUsageError(
                f"{option}={value!r}: {part!r} is not valid; allowed: comma-separated integers {low}..{high}"
            )
        numbers.append(int(part))
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
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise MnnvlUsageError(f"{source}={value!r} is not valid; allowed: an integer >= 1")
    return int(text)


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

    def pick(option: str, ini: str) -> Any:
        value = getoption(option)
        if value is None:
            value = getini(ini)
            if value in ("", None, []):
                return None
        return value

    backend = pick("mnnvl_backend", "mnnvl_backend")
    timeout = pick("mnnvl_timeout", "mnnvl_timeout")
    world_sizes = pick("mnnvl_world_sizes", "mnnvl_world_sizes")
    pp = pick("mnnvl_pp", "mnnvl_pp")
    manager = pick("mnnvl_manager", "mnnvl_manager")
    report = pick("mnnvl_report", "mnnvl_report")
    warm = pick("mnnvl_warm_worlds", "mnnvl_warm_worlds")
    startup = pick("mnnvl_startup_timeout", "mnnvl_startup_timeout")
    waivers = pick("mnnvl_waivers", "mnnvl_waivers")
    launcher = parse_launcher(str(pick("mnnvl_launcher", "mnnvl_launcher") or "spawn"), environ)
    if launcher == "torchrun" and world_sizes is None:
        # Under torchrun the one world there is has torchrun's size.
        world_sizes = environ["WORLD_SIZE"]
    strict = getoption("mnnvl_strict") or parse_bool(getini("mnnvl_strict") or False, "mnnvl_strict")
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
    )
    settings.topologies()  # validates the combination now, not in the middle of collection
    return settings
