"""Turn the rows ``MNNVL_MATRIX_OUT=DIR pytest tests/test_conformance_mutants.py`` wrote into the
committed mutation matrix: ``python conformance/results/render_matrix.py DIR [WALL_SECONDS [NAME [OUTDIR]]]``.

NAME defaults to ``mutation_matrix`` and OUTDIR to this folder; the backend and a description of the GPUs
come from ``MNNVL_MATRIX_BACKEND`` (default ``sim``) and ``MNNVL_MATRIX_MACHINE`` (the GPU run sets both).
The FlashInfer release is the one the rows were run on (each row says; one matrix per release, e.g. NAME
``mutation_matrix-flashinfer-0.7.4``). A mutant is killed when the suite failed it on the invariant it
names for that release; a mutant whose defect cannot exist on the release is ``n/a`` (refused with its
reason), never counted as killed."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

from pytest_mnnvl.managers.mutants import MUTANTS


def main(directory: str, wall: str | None = None, name: str = "mutation_matrix", outdir: str | None = None) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))]
    flashinfer = sorted({row.get("flashinfer", "0.7.2.post1") for row in rows})
    here = Path(outdir) if outdir else Path(__file__).resolve().parent
    backend = os.environ.get("MNNVL_MATRIX_BACKEND", "sim")
    machine = os.environ.get("MNNVL_MATRIX_MACHINE", "")
    all_topologies = os.environ.get("MNNVL_MATRIX_TOPOLOGIES") == "all"
    topologies = "MNNVL_MATRIX_TOPOLOGIES=all " if all_topologies else ""
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.platform()})"
        f"{', ' + machine if machine else ''}, {backend} backend, ci profile",
        "flashinfer": ", ".join(flashinfer),
        # The command as run (benchmarks/gpu_suite.sh passes it), else the plain CI form of it.
        "command": os.environ.get("MNNVL_MATRIX_COMMAND")
        or f"MNNVL_MATRIX_BACKEND={backend} {topologies}MNNVL_MATRIX_OUT=DIR python -m pytest "
        "tests/test_conformance_mutants.py -n 2 -p no:randomly",
        "wall_seconds": float(wall) if wall else None,
        "rows": rows,
    }
    (here / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = [
        "# Mutation matrix (conformance suite vs the reference and every mutant)",
        "",
        f"- date: {meta['date']}; machine: {meta['machine']}; FlashInfer {meta['flashinfer']}",
        f"- command: `{meta['command']}`" + (f"; wall {wall} s" if wall else ""),
        "",
        "| manager | topology | expected | verdict | violated | exit | seconds | what the suite said |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    counts = {"killed": 0, "survived": 0, "n/a": 0}
    for row in rows:
        manager = row["manager"]
        if manager == "reference":
            skipped = row.get("skipped_for_want_of_topology", [])
            ran = {status for name, status in row["statuses"].items() if name not in skipped}
            verdict = "pass" if ran == {"pass"} and row["exit"] == 0 else "FAIL"
            said = "whole suite" + (
                f"; {', '.join(skipped)} skipped: the topology it needs cannot run here" if skipped else ""
            )
            lines.append(
                f"| reference | {', '.join(row.get('topologies', ['all']))} | all pass | {verdict} | - | "
                f"{row['exit']} | {row['seconds']} | {said} |"
            )
            continue
        if row["status"] == "n/a":
            counts["n/a"] += 1
            lines.append(
                f"| {manager} | - | not applicable | n/a | - | {row['exit']} (refused) | {row['seconds']} | "
                f"{row.get('detail') or ''} |"
            )
            continue
        invariant = row.get("invariant") or MUTANTS[manager.split(":", 1)[1]].mnnvl_invariant
        killed = row["status"] == "fail" and invariant in row["violated"]
        counts["killed" if killed else "survived"] += 1
        note = f" (on this release: {row['release_note']})" if row.get("release_note") else ""
        lines.append(
            f"| {manager} | {row.get('topology', '-')} | {row['expected']} ({row['level']}){note} | "
            f"{'killed' if killed else 'SURVIVED'} | "
            f"{', '.join(row['violated'])} | {row['exit']} | {row['seconds']} | {row.get('detail') or ''} |"
        )
    lines.insert(
        4,
        f"- mutants: {counts['killed']} killed, {counts['survived']} survived, {counts['n/a']} not applicable "
        "(their defect cannot exist on this release: not run, not counted)",
    )
    (here / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
