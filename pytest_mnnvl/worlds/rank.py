"""The rank side of the pool: ``python -m pytest_mnnvl.worlds.rank`` runs one rank of a world.

A rank connects back to the pool over a Unix socket, joins torch.distributed through a FileStore
(no ports to race for), builds the PP × EP groups, installs the backend, then serves calls until
told to stop or until the pool goes away. Each call's outcome goes back as one message:
``("ok", value)``, ``("error", traceback)`` or ``("skip", reason)``.
"""

from __future__ import annotations

import ctypes
import faulthandler
import importlib
import importlib.util
import json
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from pytest_mnnvl.worlds.sharing import gpu_of_rank

#: Environment variable carrying the boot parameters (JSON) from the pool to a rank.
BOOT_ENV = "PYTEST_MNNVL_RANK_BOOT"
#: Signal the pool sends to make a rank dump every thread's stack (works while stuck in C).
DUMP_SIGNAL = signal.SIGUSR1


def die_with_parent_signal() -> int:
    """SIGKILL when the parent dies (PR_SET_PDEATHSIG); exit at once if it died before that was set. The
    parent's pid, for a check where the signal is not available (a rank's watchdog, a zygote's loop)."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(70)
    return parent


def _die_with_parent() -> None:
    """Never outlive the pool: PR_SET_PDEATHSIG plus a watchdog for the race before it is set."""
    parent = die_with_parent_signal()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(70)

    threading.Thread(target=watch, name="mnnvl-parent-watch", daemon=True).start()


def _resolve(module_name: str, module_file: str | None, qualname: str) -> Any:
    """Import the function's module by name, falling back to its file (pytest's importlib mode)."""
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            if not module_file:
                raise
            spec = importlib.util.spec_from_file_location(module_name, module_file)
            if spec is None or spec.loader is None:
                raise
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
    target: Any = module
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _outcome(fn: Any, ctx: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, Any]:
    from _pytest.outcomes import Skipped

    # Every world starts a call only once all its ranks finished the previous one: an EP-wide order
    # the sim's race detector must know of (nothing of the previous call can still be reading).
    hazards = sys.modules.get("pytest_mnnvl.backends._hazards")
    if hazards is not None:
        hazards.synchronised()
    try:
        return "ok", fn(ctx, *args, **kwargs)
    except Skipped as skip:
        return "skip", str(skip.msg)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        # Drop this frame: the rank's traceback starts in the user's function.
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        return "error", "".join(traceback.format_exception(type(exc), exc, tb))


def _send(conn: Connection, outcome: tuple[str, Any]) -> None:
    try:
        data = pickle.dumps(outcome)
    except Exception as exc:
        data = pickle.dumps(("error", f"the result could not be pickled for the pool: {exc!r}"))
    conn.send_bytes(data)


def main() -> None:
    boot = json.loads(os.environ[BOOT_ENV])
    _die_with_parent()
    rank: int = boot["rank"]
    sys.path[:0] = [p for p in boot["sys_path"] if p not in sys.path]

    stack_file = open(boot["stack_path"], "w")  # noqa: SIM115 - kept open for faulthandler
    faulthandler.register(DUMP_SIGNAL, file=stack_file, all_threads=True, chain=False)
    fatal_file = open(boot["fatal_path"], "w")  # noqa: SIM115 - kept open for faulthandler

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(boot["address"])
    conn = Connection(sock.detach())
    conn.send(("hello", rank, os.getpid()))

    try:
        ctx = _start_world(boot)
    except BaseException:
        conn.send(("start-error", traceback.format_exc()))
        raise SystemExit(71) from None
    conn.send(("ready", rank))

    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            break
        kind, *rest = pickle.loads(message)
        if kind == "stop":
            break
        module_name, module_file, qualname, payload = rest
        try:
            fn = _resolve(module_name, module_file, qualname)
            args, kwargs = pickle.loads(payload)
        except BaseException:
            _send(conn, ("error", "could not load the function for this rank:\n" + traceback.format_exc()))
            continue
        _arm_fatal_dump(fatal_file)
        _send(conn, _outcome(fn, ctx, args, kwargs))
    _shutdown()


def _arm_fatal_dump(fatal_file: Any) -> None:
    """Write the Python stack to ``fatal_file`` on a fatal signal (SIGSEGV, SIGABRT, ...), for the pool's
    crash report. Armed again before every call, on top of whatever crash handler a library installed
    since (FlashInfer's FFI library installs one that prints only C frames and does not chain):
    faulthandler writes first, then hands the signal to the handler it found."""
    faulthandler.disable()
    faulthandler.enable(file=fatal_file, all_threads=True)


def _start_world(boot: dict[str, Any]) -> Any:
    import torch.distributed as dist

    from pytest_mnnvl.worlds import audit
    from pytest_mnnvl.worlds.layout import Layout

    rank, world_size = boot["rank"], boot["world_size"]
    audit.install(boot["status_path"])
    store = dist.FileStore(boot["store_path"], world_size)
    # The pool gives every rank the same CUDA_VISIBLE_DEVICES: the world's GPUs, each taken by ranks_per_gpu
    # consecutive ranks (one GPU per rank unless the world shares GPUs).
    per_gpu = int(boot.get("ranks_per_gpu", 1))
    device = init_world(
        store, rank, world_size, boot["backend"], device_index=gpu_of_rank(rank, per_gpu), shared=per_gpu > 1
    )
    return make_context(Layout(world_size, boot["pp"]), rank, boot["backend"], device, ranks_per_gpu=per_gpu)


def init_world(
    store: Any,
    rank: int,
    world_size: int,
    backend: str,
    device_index: int,
    timeout: Any = None,
    shared: bool = False,
) -> Any:
    """Join the default process group (gloo; NCCL + gloo on GPUs, gloo alone on a GPU that ranks ``shared``)
    and bind the rank's GPU.

    Shared by the pool's ranks and by torchrun's (:mod:`pytest_mnnvl.worlds.spmd`); returns the rank's device.
    """
    import torch.distributed as dist

    from pytest_mnnvl.worlds.sharing import group_backends

    extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    if backend == "flashinfer":
        import torch

        torch.cuda.set_device(device_index)
        default = group_backends(True, shared).default
        dist.init_process_group(default, store=store, rank=rank, world_size=world_size, **extra)
        return torch.device("cuda", device_index)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, **extra)
    return "cpu"


def make_context(layout: Any, rank: int, backend: str, device: Any, ranks_per_gpu: int = 1) -> Any:
    """Build the PP x EP groups of ``layout`` (collective on WORLD), the rank's context, and install the backend."""
    from pytest_mnnvl.worlds.layout import RankContext, build_groups

    gpu = backend == "flashinfer"
    ep_group, cpu_group, world_cpu = build_groups(layout, rank, gpu, shared=gpu and ranks_per_gpu > 1)
    ctx = RankContext(
        rank=rank,
        world_size=layout.world_size,
        pp_size=layout.pp,
        pp_stage=layout.stage_of(rank),
        ep_rank=layout.ep_rank_of(rank),
        ep_size=layout.ep,
        ep_group=ep_group,
        cpu_group=cpu_group,
        ep_group_ranks=layout.ep_group_ranks(layout.stage_of(rank)),
        device=device,
        backend=backend,
        world_group=world_cpu,
        ranks_per_gpu=ranks_per_gpu,
    )
    importlib.import_module(f"pytest_mnnvl.backends.{backend}").install(ctx)
    return ctx


def _shutdown() -> None:
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: destructors of half-torn-down backends can hang it.
    os._exit(0)


if __name__ == "__main__":
    main()
