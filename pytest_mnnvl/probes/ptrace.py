"""Whether sibling rank processes may ``pidfd_getfd`` each other, which FlashInfer < 0.6.16 needs to
fetch its peers' fds, and the skip reason when they may not.

A ``PTRACE_MODE_ATTACH`` check must pass: CAP_SYS_PTRACE (bit 19 of ``CapEff``), Yama's ``ptrace_scope``
and seccomp all play a part, so a live probe between two sibling child processes gives the verdict.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Callable

from pytest_mnnvl.probes.flashinfer import flashinfer_info
from pytest_mnnvl.probes.probe import Probe, _cached

CAP_SYS_PTRACE = 19
"""Bit of CAP_SYS_PTRACE in the capability masks of ``/proc/<pid>/status``."""

YAMA_PTRACE_SCOPE = "/proc/sys/kernel/yama/ptrace_scope"


FIX_PTRACE = (
    "run the container with --cap-add=SYS_PTRACE (this also lifts Docker's default seccomp block on "
    "pidfd_getfd), or set kernel.yama.ptrace_scope=0 with every rank under the same uid, or install "
    "flashinfer-python >= 0.6.16, which passes fds over SCM_RIGHTS and needs no ptrace"
)


def parse_cap_eff(status_text: str) -> int | None:
    """The ``CapEff`` mask from the text of ``/proc/<pid>/status`` (pure); ``None`` if absent."""
    match = re.search(r"^CapEff:\s*([0-9a-fA-F]+)\s*$", status_text, re.MULTILINE)
    return int(match.group(1), 16) if match else None


def has_cap_sys_ptrace(cap_eff: int) -> bool:
    return bool(cap_eff >> CAP_SYS_PTRACE & 1)


def parse_yama_scope(text: str | None) -> int | None:
    """``ptrace_scope`` from the file's text (pure); ``None`` when the file is absent/unreadable."""
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def static_ptrace_verdict(cap_eff: int | None, yama_text: str | None) -> Probe[bool | None]:
    """Whether a process may ``pidfd_getfd`` a same-uid *sibling*, from the credentials alone (pure).

    Seccomp and other LSMs are not visible here: :func:`live_sibling_probe` settles it.
    """
    scope = parse_yama_scope(yama_text)
    if yama_text is None:
        yama = "Yama absent (no /proc/sys/kernel/yama/ptrace_scope): classic same-uid ptrace rules"
    elif scope is None:
        yama = f"Yama ptrace_scope unreadable ({yama_text.strip()!r})"
    else:
        yama = f"Yama ptrace_scope={scope}"
    if cap_eff is None:
        return Probe(None, f"CapEff not found in /proc/self/status; {yama}")
    cap = has_cap_sys_ptrace(cap_eff)
    caps = f"CapEff {cap_eff:016x}: CAP_SYS_PTRACE {'present' if cap else 'missing'}"
    if scope == 3:
        return Probe(
            False,
            f"{caps}; {yama}: no process may attach, not even root, until reboot; "
            "install flashinfer-python >= 0.6.16 (SCM_RIGHTS, no ptrace)",
        )
    if cap:
        return Probe(True, f"{caps}; {yama}")
    if yama_text is None or scope == 0:
        return Probe(True, f"{caps}; {yama}: same-uid siblings may attach")
    if scope == 1:
        return Probe(
            False,
            f"{caps}; {yama} lets a process attach only to its descendants, and ranks are siblings: " + FIX_PTRACE,
        )
    if scope == 2:
        return Probe(False, f"{caps}; {yama} requires CAP_SYS_PTRACE: {FIX_PTRACE}")
    return Probe(None, f"{caps}; {yama}")


# Child B of the live probe: pidfd_open + pidfd_getfd on child A, reporting what the kernel said.
_SIBLING_CHILD = """
import ctypes, sys
nr_open, nr_getfd, pid, fd = (int(a) for a in sys.argv[1:5])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(*args):
    ctypes.set_errno(0)
    r = libc.syscall(*(ctypes.c_long(a) for a in args))
    return r, ctypes.get_errno()
pidfd, err = call(nr_open, pid, 0)
if pidfd < 0:
    print("pidfd_open", err)
    raise SystemExit(0)
got, err = call(nr_getfd, pidfd, fd, 0)
print("pidfd_getfd", 0 if got >= 0 else err)
"""

_TARGET_CHILD = "import sys; sys.stdout.write('ready\\n'); sys.stdout.flush(); sys.stdin.read()"


def _syscall_numbers(machine: str) -> tuple[int, int] | None:
    """pidfd_open / pidfd_getfd: one number on every Linux ABI since 5.1's unified table, but alpha."""
    if machine.startswith("alpha") or machine.startswith("ia64"):
        return None
    return 434, 438


def live_sibling_probe(timeout: float = 2.0) -> Probe[bool | None]:
    """Really try ``pidfd_getfd`` from one child process on an fd of its sibling.

    Child A holds a pipe as its stdin; child B, a sibling (not an ancestor) of A, as the ranks of
    a world are, opens a pidfd on A and fetches A's fd 0. Both children are always reaped within
    ``timeout`` seconds. ``None`` when the probe itself could not run.
    """
    if not sys.platform.startswith("linux"):
        return Probe(None, f"pidfd_getfd is Linux-only (platform {sys.platform})")
    import errno
    import platform
    import select
    import subprocess

    numbers = _syscall_numbers(platform.machine())
    if numbers is None:
        return Probe(None, f"pidfd syscall numbers unknown on {platform.machine()}")
    if not sys.executable:
        return Probe(None, "sys.executable is unknown: cannot start probe children")
    deadline = time.monotonic() + timeout
    target: subprocess.Popen[str] | None = None
    prober: subprocess.Popen[str] | None = None
    try:
        target = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _TARGET_CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert target.stdout is not None
        ready, _, _ = select.select([target.stdout], [], [], max(deadline - time.monotonic(), 0))
        if not ready or target.stdout.readline().strip() != "ready":
            return Probe(None, "live probe: the target child did not start in time")
        prober = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _SIBLING_CHILD, *map(str, numbers), str(target.pid), "0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = prober.communicate(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            return Probe(None, f"live probe: no answer within {timeout:g} s")
        words = out.split()
        if len(words) != 2 or not words[1].isdigit():
            return Probe(None, f"live probe failed to run: {(err or out).strip()[-300:]!r}")
        call, code = words[0], int(words[1])
        if code == 0:
            return Probe(True, "live probe: a child fetched its sibling's fd with pidfd_getfd")
        name = errno.errorcode.get(code, str(code))
        text = f"live probe: {call} on a sibling failed with {name} ({os.strerror(code)})"
        if code == errno.ENOSYS:
            return Probe(False, f"{text}: the kernel predates 5.6 or seccomp hides the call")
        if code == errno.EPERM and call == "pidfd_getfd":
            return Probe(False, f"{text}: ptrace access to sibling ranks is denied: {FIX_PTRACE}")
        return Probe(False, f"{text}: {FIX_PTRACE}")
    except OSError as exc:
        return Probe(None, f"live probe could not start a child: {exc}")
    finally:
        for child in (prober, target):
            if child is None:
                continue
            if child.stdin is not None:
                with contextlib.suppress(OSError):
                    child.stdin.close()
            try:
                child.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            for stream in (child.stdout, child.stderr):
                if stream is not None:
                    stream.close()


def combine_ptrace(static: Probe[bool | None], live: Probe[bool | None] | None) -> Probe[bool | None]:
    """The live verdict when there is one, else the static one; the reason keeps both (pure)."""
    if live is None:
        return Probe(static.value, f"{static.reason}; live probe skipped")
    if live.value is None:
        return Probe(static.value, f"{static.reason}; {live.reason}")
    if live.value is False and static.value:
        return Probe(False, f"{live.reason} (credentials look sufficient: {static.reason}; likely seccomp)")
    return Probe(live.value, f"{live.reason}; {static.reason}")


@_cached
def ptrace_credentials() -> Probe[bool | None]:
    """CapEff + Yama only (cheap, no child process)."""
    status = _read("/proc/self/status")
    return static_ptrace_verdict(parse_cap_eff(status or ""), _read(YAMA_PTRACE_SCOPE))


@_cached
def ptrace_status() -> Probe[bool | None]:
    """Whether this process's children could ``pidfd_getfd`` each other (sibling ranks): CapEff bit
    19, Yama's ptrace_scope and a live probe between two sibling children (about 50 ms)."""
    return combine_ptrace(ptrace_credentials(), live_sibling_probe())


def ptrace_required() -> Probe[bool | None]:
    """True iff the installed FlashInfer fetches peer fds with ``pidfd_getfd`` (< 0.6.16)."""
    info = flashinfer_info()
    if not info.installed:
        return Probe(False, "FlashInfer is not installed: nothing needs ptrace")
    if info.fd_exchange is None:
        return Probe(None, info.reason)
    if info.fd_exchange == "scm_rights":
        return Probe(False, f"FlashInfer {info.version} passes fds over SCM_RIGHTS: no ptrace needed")
    return Probe(True, f"FlashInfer {info.version} fetches peer fds with pidfd_getfd: ptrace rights needed")


def ptrace_reason(required: Probe[bool | None], status: Callable[[], Probe[bool | None]]) -> str | None:
    """Pure core of :func:`missing_for_ptrace`; ``status`` is only called when ptrace matters."""
    if required.value is False:
        return None
    current = status()
    if current.value is True:
        return None
    head = (
        "needs ptrace rights over sibling ranks (pidfd_getfd)"
        if required.value
        else f"may need ptrace rights ({required.reason})"
    )
    if current.value is None:
        return f"{head}, which could not be verified: {current.reason}"
    return f"{head}: {current.reason}"


def missing_for_ptrace() -> str | None:
    """``None`` when nothing needs ptrace (FlashInfer uses SCM_RIGHTS, or is absent) or when sibling
    processes can ``pidfd_getfd`` each other; else what is missing and how to get it."""
    return ptrace_reason(ptrace_required(), ptrace_status)
