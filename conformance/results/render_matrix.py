"""Turn the rows ``MNNVL_MATRIX_OUT=DIR pytest tests/test_conformance_mutants.py`` wrote into the
committed mutation matrix: ``python conformance/results/render_matrix.py DIR [WALL_SECONDS [NAME [OUTDIR]]]``.

NAME defaults to ``mutation_matrix`` and OUTDIR to this folder; the backend and a description of the GPUs
come from ``MNNVL_MATRIX_BACKEND`` (default ``sim``) and ``MNNVL_MATRIX_MACHINE`` (the GPU run sets both)."""

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
    here = Path(outdir) if outdir else Path(__file__).resolve().parent
    backend = os.environ.get("MNNVL_MATRIX_BACKEND", "sim")
    machine = os.environ.get("MNNVL_MATRIX_MACHINE", "")
    all_topologies = os.environ.get("MNNVL_MATRIX_TOPOLOGIES") == "all"
    topologies = "MNNVL_MATRIX_TOPOLOGIES=all " if all_topologies else ""
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.platform()})"
        f"{', ' + machine if machine else ''}, {backend} backend, ci profile",
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
        f"- date: {meta['date']}; machine: {meta['machine']}",
        f"- command: `{meta['command']}`" + (f"; wall {wall} s" if wall else ""),
        "",
        "| manager | topology | expected | verdict | violated | exit | seconds | what the suite said |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
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
        mutant = MUTANTS[manager.split(":", 1)[1]]
        killed = row["status"] == "fail" and mutant.mnnvl_invariant in row["violated"]
        lines.append(
            f"| {manager} | {row.get('topology', '-')} | {row['expected']} ({row['level']}) | "
            f"{'killed' if killed else 'SURVIVED'} | "
            f"{', '.join(row['violated'])} | {row['exit']} | {row['seconds']} | {row.get('detail') or ''} |"
        )
    (here / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
