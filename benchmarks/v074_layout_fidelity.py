"""Is ``pytest_mnnvl.model.sizing_v074`` FlashInfer 0.7.4's own layout arithmetic? Asked of the real module.

Run where FlashInfer 0.7.4's ``nvlink_one_sided_alltoall`` JIT module loads (a CUDA machine; no second GPU
needed: the layout functions are host code)::

    python benchmarks/v074_layout_fidelity.py out.json

Compares, field by field: the metainfo index pairs and constants; ``moe_a2a_get_workspace_layout`` (all 33
fields) on a grid of EP sizes, token capacities, top_k, dispatch formats, hidden sizes, EPLB and CFT; the
errors it raises for bad inputs (the exact text); ``moe_a2a_lamport_row_bytes`` (four numbers per format,
hidden size and top_k, or its error). Exit status 1 on any disagreement.
"""

from __future__ import annotations

import itertools
import json
import sys
from typing import Any

from _environment import environment

from pytest_mnnvl.model import sizing_v074 as model

HIDDEN = (128, 2880, 4096, 7168)
FORMATS = (("BF16", 2), ("NVFP4", 2), ("MXFP8", 2), ("FP16", 2))
EP = (1, 2, 3, 4, 8, 64, 256)
TOKENS = (1, 7, 64, 256, 1024, 8192)
TOP_K = (1, 2, 4, 8, 22)
EPLB = (0, 256)


def _real_layout(module: Any, args: tuple[Any, ...]) -> tuple[int, ...] | str:
    import torch

    out = torch.empty(model.NUM_METAINFO_FIELDS, dtype=torch.int64)
    try:
        module.moe_a2a_get_workspace_layout(*args, out)
    except Exception as exc:  # the real module's host checks
        return f"{type(exc).__name__}: {exc}"
    return tuple(int(v) for v in out.tolist())


def _model_layout(args: tuple[Any, ...]) -> tuple[int, ...] | str:
    try:
        return tuple(model.workspace_layout(*args))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _same(real: Any, mine: Any) -> bool:
    if isinstance(real, str) or isinstance(mine, str):
        # The real error may carry a traceback or a location prefix; the model's text must be in it.
        return isinstance(real, str) and isinstance(mine, str) and mine.split(": ", 1)[-1] in real
    return bool(real == mine)


def cases() -> list[tuple[Any, ...]]:
    grid = []
    for ep, tokens, top_k, (fmt, itemsize), hidden, eplb in itertools.product(EP, TOKENS, TOP_K, FORMATS, HIDDEN, EPLB):
        if ep * tokens * hidden > 2**33:
            continue
        per_token = model.dispatch_bytes_per_token(hidden, fmt, itemsize)
        dispatch = model.dispatch_bytes(ep, tokens, per_token, top_k)
        combine = model.combine_input_bytes(ep, tokens, hidden, itemsize)
        grid.append((ep, tokens, top_k, dispatch, combine, 0, eplb, False))
        if tokens <= 256 and ep <= 8:
            grid.append((ep, tokens, top_k, dispatch, combine, combine // 2, eplb, True))
    bad = [
        (0, 8, 2, 4096, 4096, 0, 0, False),
        (257, 8, 2, 4096, 4096, 0, 0, False),
        (2, 0, 2, 4096, 4096, 0, 0, False),
        (2, 8, 0, 4096, 4096, 0, 0, False),
        (2, 8, 23, 4096, 4096, 0, 0, False),
        (2, 8, 2, -1, 4096, 0, 0, False),
        (2, 8, 2, 4096, -1, 0, 0, False),
        (2, 8, 2, 4096, 4096, 1024, 0, False),
        (2, 8, 2, 4096, 4096, 0, -1, False),
    ]
    return grid + bad


def main() -> int:
    from flashinfer.moe_ep.backends.split.comm.nvlink_one_sided.kernels import get_nvlink_one_sided_alltoall_module

    module = get_nvlink_one_sided_alltoall_module()
    disagreements: list[dict[str, Any]] = []
    names, values = module.moe_a2a_get_metainfo_index_pairs()
    real_pairs = [(str(n).removeprefix("MOE_A2A_"), int(v)) for n, v in zip(names, values, strict=True)]
    mine_pairs = [(n, i) for i, n in enumerate(model.METAINFO_INDEX_NAMES)] + list(model.MODULE_CONSTANTS)
    if real_pairs != mine_pairs:
        disagreements.append({"what": "index pairs", "real": real_pairs, "model": mine_pairs})
    layouts = 0
    for args in cases():
        real, modelled = _real_layout(module, args), _model_layout(args)
        layouts += 1
        if not _same(real, modelled):
            disagreements.append({"what": "layout", "args": list(args), "real": real, "model": modelled})
    # The real function returns [payload bytes, scale bytes as received, dispatch blocks per token,
    # Lamport bytes per row] (read off the 2026-12-01 H200 run; the wire scale bytes are not among them).
    lamport_rows = []
    for (name, fmt), hidden, top_k in itertools.product(model.LAMPORT_FORMATS.items(), HIDDEN, TOP_K):
        try:
            real_row: Any = [int(v) for v in module.moe_a2a_lamport_row_bytes(fmt, hidden, top_k)]
        except Exception as exc:
            real_row = f"{type(exc).__name__}: {exc}"
        try:
            row = model.lamport_row_bytes(fmt, hidden)
            mine: Any = [
                row.payload,
                row.scale,
                model.lamport_dispatch_blocks_per_token(row),
                model.lamport_bytes_per_row(top_k, row, hidden),
            ]
        except Exception as exc:
            mine = f"{type(exc).__name__}: {exc}"
        lamport_rows.append({"format": name, "hidden": hidden, "top_k": top_k, "real": real_row, "model": mine})
        if not _same(real_row, mine):
            disagreements.append(
                {"what": "lamport_row_bytes", "args": [name, hidden, top_k], "real": real_row, "model": mine}
            )
    out = {
        "environment": environment("flashinfer"),
        "lamport_available": bool(module.moe_a2a_lamport_available()),
        "layouts_compared": layouts,
        "lamport_rows": lamport_rows,
        "index_pairs_compared": len(real_pairs),
        "disagreements": disagreements[:50],
        "disagreement_count": len(disagreements),
    }
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)
    print(
        f"layouts {layouts}, lamport rows {len(lamport_rows)}, index pairs {len(real_pairs)}: "
        f"{len(disagreements)} disagreement(s)"
    )
    for d in disagreements[:10]:
        print(json.dumps(d)[:600])
    return 1 if disagreements else 0


if __name__ == "__main__":
    raise SystemExit(main())
