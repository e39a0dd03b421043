"""Two measurements with real FlashInfer that the conformance suite only judges pass/fail:

1. **superseded bytes**: a manager initialized with N layers that each need a larger workspace; after
   every ``initialize``, the bytes this rank still backs, read from FlashInfer's own allocation
   records (``MnnvlMemory.allocated_map`` + ``MoeAlltoAll._WORKSPACE_CACHE``, see
   ``pytest_mnnvl/backends/records.py``), never from free-memory deltas. Reference vs vLLM's manager
   (when importable) vs the ``leaks_superseded`` mutant.
2. **layout race** (TensorRT-LLM #19312): round trip a small-payload layer (NVFP4), then immediately
   dispatch a larger one (bf16) on the same workspace, no barrier. The combine region starts right
   after the *current* dispatch payloads, so the fast ranks' next dispatch lands inside the combine
   region a slow rank may still be reading. Rank 0 carries the full batch (slow), the others one token
   (fast). Counted: combines of the first layer with wrong sums. Controls: the same with a device
   sync + EP barrier between the rounds, and with no skew.

Run::

    python benchmarks/findings.py OUT.json --backend flashinfer     # >= 2 NVLink GPUs
    python benchmarks/findings.py OUT.json --backend sim            # CPU, same code
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (HERE, ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import _findings_fns as fns  # noqa: E402  (ranks import it by this name)
from _environment import environment  # noqa: E402

from pytest_mnnvl.model.layers import LayerSpec, QuantFormat  # noqa: E402
from pytest_mnnvl.worlds.pool import World, WorldSpec  # noqa: E402

HIDDEN, TOP_K, EXPERTS = 7168, 8, 256  # DeepSeek-V3/R1 (examples/plans)


def growing_layers(count: int) -> list[LayerSpec]:
    """NVFP4 and bf16 alternating, tokens doubling every second layer: each call needs more."""
    layers = []
    for i in range(count):
        quant = QuantFormat.NVFP4 if i % 2 == 0 else QuantFormat.BF16
        tokens = 128 * 2 ** (i // 2)
        layers.append(LayerSpec(quant, HIDDEN, TOP_K, EXPERTS, tokens, name=f"{quant.value}@{tokens}"))
    return layers


def make_world(ep: int, backend: str) -> World:
    devices: tuple[str, ...] | None = None
    if backend == "flashinfer":
        from pytest_mnnvl.probes.backend import missing_for_one_sided
        from pytest_mnnvl.probes.gpus import gpu_inventory

        missing = missing_for_one_sided(ep)
        if missing is not None:
            raise SystemExit(f"findings.py: --backend flashinfer cannot run {ep} ranks here: {missing}")
        devices = tuple(gpu.uuid or str(gpu.nvml_index) for gpu in gpu_inventory().gpus)[:ep]
    return World(WorldSpec(ep, 1, backend, devices=devices), timeout=300.0)


def managers_to_compare(requested: str) -> list[Any]:
    from pytest_mnnvl.errors import MnnvlUsageError
    from pytest_mnnvl.managers import resolve

    out = []
    for spec in requested.split(","):
        try:
            out.append(resolve(spec))
        except MnnvlUsageError as exc:
            print(f"findings.py: skipping manager {spec!r}: {exc}", file=sys.stderr)
    return out


def superseded(world: World, managers: list[Any], rebuilds: int) -> list[dict[str, Any]]:
    layers = growing_layers(rebuilds)
    out = []
    for factory in managers:
        t0 = time.monotonic()
        try:
            results = world.call(fns.superseded_bytes, (factory, layers), {})
        except Exception as exc:
            out.append({"manager": factory.spec, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            continue
        out.append(
            {
                "manager": factory.spec,
                "description": factory.describe() if hasattr(factory, "describe") else factory.spec,
                "rows_rank0": results[0]["rows"],
                "final_live_bytes_per_rank": [r["rows"][-1]["live_bytes_per_rank"] for r in results],
                "after_cleanup_and_evict_bytes": [r["after_cleanup_and_evict_bytes"] for r in results],
                "seconds": round(time.monotonic() - t0, 2),
            }
        )
    return out


def race(world: World, tokens: int, iterations: int) -> list[dict[str, Any]]:
    small = LayerSpec(QuantFormat.NVFP4, HIDDEN, TOP_K, EXPERTS, tokens, name="nvfp4")
    large = LayerSpec(QuantFormat.BF16, HIDDEN, TOP_K, EXPERTS, tokens, name="bf16")
    cases = [
        ("nvfp4 -> bf16, no barrier, skewed batch", small, large, False, True),
        ("nvfp4 -> bf16, sync + EP barrier, skewed batch", small, large, True, True),
        ("nvfp4 -> nvfp4 (same layout), no barrier, skewed batch", small, small, False, True),
        ("nvfp4 -> bf16, no barrier, equal batches", small, large, False, False),
    ]
    out: list[dict[str, Any]] = []
    for label, first, second, barrier, skew in cases:
        try:
            results = world.call(fns.layout_race, (first, second, tokens, iterations, barrier, skew), {})
        except Exception as exc:
            out.append({"case": label, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            continue
        out.append(
            {
                "case": label,
                "iterations": iterations,
                "tokens": tokens,
                "bad_iterations_per_rank": [r["bad_iterations"] for r in results],
                "bad_tokens_per_rank": [r["bad_tokens"] for r in results],
                "local_tokens_per_rank": [r["local_tokens"] for r in results],
                "combine_payload_offsets": results[0]["combine_payload_offsets"],
                "workspace_size_per_rank": results[0]["workspace_size_per_rank"],
                "seconds_rank0": results[0]["seconds"],
            }
        )
        print(json.dumps(out[-1]), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="JSON file to write")
    parser.add_argument("--backend", choices=("sim", "flashinfer"), default="sim")
    parser.add_argument("--ep", default="2", help="EP sizes, e.g. 2,4")
    parser.add_argument("--managers", default="reference,vllm,mutant:leaks_superseded")
    parser.add_argument("--rebuilds", type=int, default=6, help="layers initialized, each needing more")
    parser.add_argument("--tokens", type=int, default=4096, help="runtime max tokens of the race rounds")
    parser.add_argument("--iterations", type=int, default=200, help="round pairs per race case")
    parser.add_argument("--skip", default="", help="comma list of experiments to skip: superseded,race")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    data: dict[str, Any] = {"environment": environment(args.backend), "superseded": {}, "race": {}}
    managers = managers_to_compare(args.managers) if "superseded" not in skip else []
    for ep in (int(x) for x in args.ep.split(",")):
        world = make_world(ep, args.backend)
        try:
            if managers:
                data["superseded"][f"ep{ep}"] = superseded(world, managers, args.rebuilds)
                print(json.dumps(data["superseded"][f"ep{ep}"])[:3000], flush=True)
            if "race" not in skip:
                data["race"][f"ep{ep}"] = race(world, args.tokens, args.iterations)
        finally:
            world.close()
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
    print(f"findings.py: wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
