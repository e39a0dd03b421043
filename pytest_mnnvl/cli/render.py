"""Human-readable tables and arithmetic, and the ``--json`` documents, for ``explain`` and ``predict``.

Runs of identical consecutive layers with identical outcomes collapse into one table row
(``0-57  moe ×58``); the JSON always lists every layer. Every output names the FlashInfer release
it modelled; on 0.7.4 a failure names its region (dispatch or combine), FlashInfer's need and
capacity bytes and the runtime token count at which it trips.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pytest_mnnvl.cli.analysis import VERDICT_TEXT, LayerOutcome, PlanWalk, RegionCheck, StageWalk, Trip
from pytest_mnnvl.model import releases, sizing, sizing_v074

JSON_SCHEMA_VERSION = 1


def n(value: int) -> str:
    """Thousands separators: 5,427,584."""
    return f"{value:,}"


# ---- grouping ---------------------------------------------------------------------------------


def _same_row(a: LayerOutcome, b: LayerOutcome) -> bool:
    return (
        a.layer == b.layer
        and a.verdict == b.verdict
        and a.geometry == b.geometry
        and a.first_failing_tokens == b.first_failing_tokens
        and a.is_mtp == b.is_mtp
        and a.built_by == b.built_by
        and not a.rebuilt
        and not b.rebuilt
    )


def groups(stage: StageWalk) -> list[list[LayerOutcome]]:
    """Consecutive outcomes that read the same in a table; a rebuild starts a new row, the layers it
    then keeps serving join the following row."""
    out: list[list[LayerOutcome]] = []
    for outcome in stage.outcomes:
        if out and _same_row(out[-1][-1], outcome):
            out[-1].append(outcome)
        else:
            out.append([outcome])
    return out


def _index_text(group: Sequence[LayerOutcome]) -> str:
    first, last = group[0].index, group[-1].index
    return str(first) if first == last else f"{first}-{last}"


def _label_text(group: Sequence[LayerOutcome]) -> str:
    label = group[0].label
    if group[0].is_mtp and group[0].layer.name:
        label = f"{label} (mtp)"
    return f"{label} ×{len(group)}" if len(group) > 1 else label


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    numeric = [
        all(r[i].replace(",", "").isdigit() or r[i] == "-" for r in rows) and any(r[i] != "-" for r in rows)
        for i in range(len(header))
    ]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric, strict=True)]
        return (indent + "  ".join(parts)).rstrip()

    return [line(header), *(line(r) for r in rows)]


# ---- explain ----------------------------------------------------------------------------------


def _headline(walk: PlanWalk, command: str) -> list[str]:
    plan = walk.loaded.plan
    count = sum(len(plan.layers_of_stage(s)) for s in range(plan.pp))
    mtp = f" (MTP head: {len(plan.mtp_head)} on stage {plan.pp - 1})" if plan.mtp_head else ""
    title = plan.name or walk.loaded.source
    return [
        f"{command}: {title}: {plan.pp} PP stage(s), {count} MoE layer initialize(s){mtp}, ep={walk.ep}",
        f"manager: {walk.model.describe()}",
        modelled_line(walk),
    ]


def modelled_line(walk: PlanWalk) -> str:
    """Which release's arithmetic and rules the output is, and why that one."""
    why = "the installed release" if walk.release_source == "installed" else "chosen by --flashinfer"
    return f"modelled: FlashInfer {walk.release} ({why})"


def trip_text(trip: Trip) -> str:
    """Where one round trip fails, with FlashInfer's own numbers: the region, need vs capacity, the token count."""
    check = trip.check
    at = f"at runtime T={trip.tokens}"
    if isinstance(check, RegionCheck) and trip.verdict in ("dispatch", "combine"):
        region = check.dispatch if trip.verdict == "dispatch" else check.combine
        return (
            f"{trip.verdict} region {at}: {region.detail} ({n(region.need - region.capacity)} B over); "
            f"FlashInfer raises {trip.error_type}"
        )
    if isinstance(check, sizing.RoundTripCheck) and trip.verdict in ("dispatch", "combine"):
        part = check.dispatch if trip.verdict == "dispatch" else check.combine
        return (
            f"{trip.verdict} {at}: required {n(part.required_size)} B > size per rank {n(part.size_per_rank)} B "
            f"({n(part.shortfall)} B short); FlashInfer raises {trip.error_type}: {trip.error}"
        )
    if trip.error is None:
        return f"{VERDICT_TEXT[trip.verdict]} ({at})"
    return f"{VERDICT_TEXT[trip.verdict]} {at}: {trip.error_type}: {trip.error}"


def _check_cells(outcome: LayerOutcome) -> tuple[str, str]:
    if outcome.check is None:
        return "-", "-"
    if outcome.verdict == "misaligned":
        return "MISALIGNED", "-"
    dispatch = "ok" if outcome.check.dispatch.fits else "FAIL"
    if not outcome.check.dispatch.fits:
        return dispatch, "-"
    return dispatch, "ok" if outcome.check.combine.fits else "FAIL"


def _explain_rows(stage: StageWalk) -> list[list[str]]:
    rows = []
    for group in groups(stage):
        o = group[0]
        dispatch, combine = _check_cells(o)
        init = "built" if o.rebuilt else f"kept ({o.built_by})"
        held = [init, n(o.geometry.size_per_rank), str(o.geometry.max_num_tokens)]
        if o.verdict == "unreached":
            held = ["-", "-", "-"]
        rows.append(
            [
                _index_text(group),
                _label_text(group),
                o.layer.quant.value,
                str(o.layer.hidden_size),
                n(o.layer.dispatch_bytes_per_token),
                n(o.need),
                *held,
                str(o.runtime_tokens),
                dispatch,
                combine,
                "fits" if o.fits else o.verdict.upper(),
            ]
        )
    return rows


EXPLAIN_HEADER = (
    "#",
    "layer",
    "quant",
    "H",
    "disp B/tok",
    "need",
    "initialize",
    "size/rank",
    "max T",
    "T",
    "dispatch",
    "combine",
    "verdict",
)


def arithmetic_lines(o: LayerOutcome, ep: int, indent: str = "    ") -> list[str]:
    """The numbers FlashInfer's checks compare for ``o`` at its full token count."""
    if isinstance(o.check, RegionCheck) or o.release == releases.V074:
        return _region_lines(o, ep, indent)
    layer = o.layer
    where = f"stage {o.stage}, layer {o.index} {o.label!r} ({o.origin})"
    lines = [
        f"{where}: {layer.quant.value}, hidden {layer.hidden_size}, top_k {layer.top_k}, "
        f"{layer.num_experts} experts, runtime T={o.runtime_tokens}"
    ]
    parts = " + ".join(f"{p.name} {n(p.bytes_per_token)}" for p in layer.dispatch_payloads)
    rows: list[tuple[str, str]] = [
        (
            "payload per token",
            f"{parts} = {n(layer.dispatch_bytes_per_token)} B dispatch; "
            f"combine {n(layer.combine_bytes_per_token)} B (bf16 output)",
        ),
        ("need(layer)", f"{n(o.need)} B per rank (FlashInfer's size at max_num_tokens {layer.max_num_tokens})"),
    ]
    rows += _handle_rows(o)
    if rows[-1][0] not in _SETTLED and isinstance(o.check, sizing.RoundTripCheck):
        d, c = o.check.dispatch, o.check.combine
        rows.append(
            ("payload offset", f"{n(d.payload_offset)} (aux regions for max_num_tokens {o.geometry.max_num_tokens})")
        )
        total = f"{ep} × {o.runtime_tokens} × {n(layer.dispatch_bytes_per_token)}"
        verdict = "fits" if d.fits else f"FAILS, {n(d.shortfall)} B short"
        rel = "<=" if d.fits else ">"
        rows.append(
            (
                "dispatch",
                f"{n(d.payload_offset)} + {total} = {n(d.required_size)} {rel} "
                f"{n(d.size_per_rank)} size per rank: {verdict}",
            )
        )
        rows.append(("combinePayloadOffset", f"align128({n(d.required_size)}) = {n(d.combine_payload_offset)}"))
        rows.append(
            (
                "combine payloadBytes",
                f"{ep} × {o.runtime_tokens} × {n(layer.combine_bytes_per_token)} = {n(c.payload_bytes)}",
            )
        )
        verdict = "fits" if c.fits else f"FAILS, {n(c.shortfall)} B short"
        rel = "<=" if c.fits else ">"
        rows.append(
            (
                "combine",
                f"{n(c.combine_payload_offset)} + {n(c.payload_bytes)} = {n(c.required_size)} {rel} "
                f"{n(c.size_per_rank)} size per rank: {verdict}"
                + ("" if d.fits else " (not reached: dispatch fails first)"),
            )
        )
        if o.error is not None:
            rows.append(("FlashInfer raises", f"{o.error_type}: {o.error}"))
    rows += _first_failing_rows(o)
    width = max(len(k) for k, _ in rows)
    lines += [f"{indent}{k.ljust(width)}  {v}" for k, v in rows]
    return lines


def _first_failing_rows(o: LayerOutcome) -> list[tuple[str, str]]:
    rows = [("first failing T", _first_failing_text(o))]
    trip = o.first_trip
    if trip is not None and trip.tokens != o.runtime_tokens:
        rows.append((f"at T={trip.tokens}", trip_text(trip)))
    return rows


def _region_lines(o: LayerOutcome, ep: int, indent: str) -> list[str]:
    """FlashInfer 0.7.4's checks: the token count, then the fixed dispatch region, then the fixed combine region."""
    layer = o.layer
    where = f"stage {o.stage}, layer {o.index} {o.label!r} ({o.origin})"
    lines = [
        f"{where}: {layer.quant.value}, hidden {layer.hidden_size}, top_k {layer.top_k}, "
        f"{layer.num_experts} experts, runtime T={o.runtime_tokens} (FlashInfer {o.release})"
    ]
    check = o.check if isinstance(o.check, RegionCheck) else None
    rows: list[tuple[str, str]] = []
    if check is not None:
        rows.append(
            (
                "payloads per token",
                f"{' + '.join(n(b) for b in check.payloads)} B as NVLinkOneSidedAlltoAll.dispatch sends them "
                f"(hidden row with its extra bytes, scales, ids, weights); combine {n(layer.combine_bytes_per_token)} "
                "B (bf16 output)",
            )
        )
    rows.append(("need(layer)", f"{n(o.need)} B per rank (its own layout at max_num_tokens {layer.max_num_tokens})"))
    rows += _handle_rows(o)
    if rows[-1][0] not in _SETTLED and check is not None:
        d, c, layout = check.dispatch, check.combine, check.layout
        rows.append(
            (
                "regions",
                f"dispatch {n(layout.dispatch_payload_size)} B at offset {n(layout.dispatch_payload_offset)}, "
                f"combine {n(layout.combine_input_size)} B at offset {n(layout.combine_input_offset)} "
                f"(fixed at allocation; top_k {layout.top_k})",
            )
        )
        rel, verdict = ("<=", "fits") if d.fits else (">", f"FAILS, {n(d.need - d.capacity)} B over")
        rows.append(
            (
                "dispatch",
                f"{ep} × {o.runtime_tokens} × ({' + '.join(n(b) for b in check.payloads)}), each buffer "
                f"{sizing_v074.CACHELINE_ALIGNMENT}-aligned = need {n(d.need)} {rel} capacity {n(d.capacity)}: "
                f"{verdict}",
            )
        )
        rel, verdict = ("<=", "fits") if c.fits else (">", f"FAILS, {n(c.need - c.capacity)} B over")
        rows.append(
            (
                "combine",
                f"{ep} × {o.runtime_tokens} × {layer.hidden_size} × 2 = need {n(c.need)} {rel} capacity "
                f"{n(c.capacity)}: {verdict}" + ("" if d.fits else " (not reached: dispatch fails first)"),
            )
        )
        if o.error is not None:
            rows.append(("FlashInfer raises", f"{o.error_type}: {o.error}"))
    rows += _first_failing_rows(o)
    width = max(len(k) for k, _ in rows)
    lines += [f"{indent}{k.ljust(width)}  {v}" for k, v in rows]
    return lines


#: The row names that settle a layer before any check's arithmetic (the layer was not reached, the manager
#: refused it, the token count is over the handle's).
_SETTLED = ("not reached", "manager raises", "FlashInfer raises")


def _handle_rows(o: LayerOutcome) -> list[tuple[str, str]]:
    """The workspace the layer met, then the outcomes both releases word alike (ending in a :data:`_SETTLED`
    row), or just the workspace when the check's arithmetic follows."""
    if o.final_pass:
        held = f"built at layer {o.built_by}, the handle the stage ended with"
    elif o.rebuilt:
        held = "built by this initialize"
    else:
        held = f"built at layer {o.built_by}, kept by this initialize"
    workspace = f"{n(o.geometry.size_per_rank)} B per rank, max_num_tokens {o.geometry.max_num_tokens} ({held})"
    rows = [("workspace", workspace)]
    if o.verdict == "unreached":
        rows.append(("not reached", str(o.error)))
    elif o.verdict == "refused":
        rows.append(("manager raises", f"{o.error_type}: {o.error}"))
    elif o.verdict == "tokens":
        rows.append(("tokens", f"{o.runtime_tokens} > max_num_tokens {o.geometry.max_num_tokens}"))
        rows.append(("FlashInfer raises", f"{o.error_type}: {o.error}"))
    return rows


def _first_failing_text(o: LayerOutcome) -> str:
    if o.verdict == "refused":
        return "- (the manager refuses the layer)"
    if o.verdict == "unreached":
        return "- (never initialized)"
    t = o.first_failing_tokens
    if t is None:
        return f"never (every runtime token count up to {o.layer.max_num_tokens} fits)"
    if t == 1:
        return "1 (fails at every runtime token count)"
    return f"{t} (runtime token counts up to {t - 1} pass)"


def explain_text(walk: PlanWalk, verbose: bool = False) -> str:
    lines = _headline(walk, "explain")
    for stage in walk.stages:
        ranks = (
            f"ranks {stage.ep_ranks[0]}-{stage.ep_ranks[-1]}"
            if len(stage.ep_ranks) > 1
            else f"rank {stage.ep_ranks[0]}"
        )
        lines.append("")
        lines.append(f"stage {stage.stage} ({ranks}):")
        if not stage.outcomes:
            lines.append("  no MoE layer: the manager is never initialized")
            continue
        lines += _table(EXPLAIN_HEADER, _explain_rows(stage))
        shown = [g[0] for g in groups(stage) if g[0].verdict != "unreached" and (verbose or not g[0].fits)]
        for o in shown:
            lines.append("")
            lines += arithmetic_lines(o, walk.ep, indent="    ")
        lines += _final_pass_lines(stage, walk.ep, verbose)
    lines.append("")
    lines.append(_verdict_line(walk))
    return "\n".join(lines)


def _final_pass_lines(stage: StageWalk, ep: int, verbose: bool) -> list[str]:
    """The layers that fit their own step on an earlier handle, again on the handle the stage ended with."""
    if not stage.final:
        return []
    lines = [
        "",
        f"  final pass: {len(stage.final)} layer(s) again on the handle the stage ended with "
        f"({n(stage.final[0].geometry.size_per_rank)} B/rank, max T {stage.final[0].geometry.max_num_tokens}), "
        "as the next forward pass runs them:",
    ]
    for o in stage.final:
        verdict = "fits" if o.fits else VERDICT_TEXT[o.verdict]
        lines.append(f"    layer {o.index} {o.label!r} at T={o.runtime_tokens}: {verdict}")
        if verbose or not o.fits:
            lines += arithmetic_lines(o, ep, indent="      ")
    return lines


def _verdict_line(walk: PlanWalk) -> str:
    failures = walk.failures
    if not failures:
        return "verdict: every layer fits at its full runtime token count, also on the handle its stage ends with"
    first = failures[0]
    when = " (final pass: on the handle the stage ended with)" if first.final_pass else ""
    line = (
        f"verdict: {len(failures)} layer(s) fail at their full runtime token count; first: stage {first.stage} "
        f"layer {first.index} {first.label!r}{when}: {VERDICT_TEXT[first.verdict]}"
    )
    if first.verdict in ("refused", "unreached") or first.release != releases.V074:
        return line  # 0.7.2's messages carry no numbers: its arithmetic block above has them
    line += f"; {trip_text(_full_trip(first))}"
    if first.first_trip is not None and first.first_trip.tokens != first.runtime_tokens:
        line += f"; it first trips at runtime T={first.first_trip.tokens}"
    return line


def _full_trip(o: LayerOutcome) -> Trip:
    return Trip(o.runtime_tokens, o.verdict, o.error_type, o.error, o.check)


# ---- predict ----------------------------------------------------------------------------------

PREDICT_HEADER = ("#", "layer", "quant", "max T", "size/rank", "handle max T", "first failing T", "at full T")


def predict_text(walk: PlanWalk) -> str:
    lines = _headline(walk, "predict")
    for stage in walk.stages:
        lines.append("")
        lines.append(f"stage {stage.stage}:")
        if not stage.outcomes:
            lines.append("  no MoE layer")
            continue
        rows = []
        for group in groups(stage):
            o = group[0]
            first: str
            if o.verdict in ("refused", "unreached"):
                first = str(o.verdict)
            elif o.first_failing_tokens is None:
                first = f"never (<= {o.layer.max_num_tokens})"
            else:
                first = str(o.first_failing_tokens)
            unreached = o.verdict == "unreached"
            rows.append(
                [
                    _index_text(group),
                    _label_text(group),
                    o.layer.quant.value,
                    str(o.layer.max_num_tokens),
                    "-" if unreached else n(o.geometry.size_per_rank),
                    "-" if unreached else str(o.geometry.max_num_tokens),
                    first,
                    "fits" if o.fits else o.verdict.upper(),
                ]
            )
        lines += _table(PREDICT_HEADER, rows)
        for o in stage.final:
            lines.append(
                f"  final pass, on the handle the stage ended with: layer {o.index} {o.label!r}: first failing T "
                f"{_first_failing_text(o)}"
            )
    failing = [o for s in walk.stages for o in (*s.outcomes, *s.final) if o.first_failing_tokens is not None]
    refused = [o for s in walk.stages for o in s.outcomes if o.verdict == "refused"]
    lines.append("")
    if refused:
        o = refused[0]
        lines.append(
            f"prediction: the manager refuses stage {o.stage} layer {o.index} {o.label!r} at initialize, "
            f"whatever the batch: {o.error_type}: {o.error}"
        )
    if failing:
        worst = min(failing, key=lambda o: (o.first_failing_tokens or 0, o.stage, o.index))
        lines.append(
            f"prediction: {len(failing)} layer(s) fail at some runtime token count; the smallest batch that fails is "
            f"{worst.first_failing_tokens} tokens per rank (stage {worst.stage} layer {worst.index} {worst.label!r})"
            + ("" if worst.first_trip is None else f": {trip_text(worst.first_trip)}")
        )
    elif not refused:
        lines.append("prediction: no layer fails at any runtime token count up to its max tokens")
    return "\n".join(lines)


# ---- JSON -------------------------------------------------------------------------------------


def _region_json(check: RegionCheck) -> dict[str, Any]:
    d, c = check.dispatch, check.combine
    return {
        "layout": check.layout._asdict(),
        "dispatch_payload_bytes_per_token": list(check.payloads),
        "dispatch_recv_offsets": list(d.recv_offsets),
        "dispatch_need": d.need,
        "dispatch_capacity": d.capacity,
        "dispatch_fits": d.fits,
        "combine_need": c.need,
        "combine_capacity": c.capacity,
        "combine_fits": c.fits,
    }


def _arithmetic_json(check: sizing.RoundTripCheck | RegionCheck | None) -> dict[str, Any] | None:
    if check is None:
        return None
    if isinstance(check, RegionCheck):
        return _region_json(check)
    d, c = check.dispatch, check.combine
    return {
        "size_per_rank": d.size_per_rank,
        "payload_offset": d.payload_offset,
        "dispatch_payload_bytes": list(d.payload_bytes),
        "dispatch_required_size": d.required_size,
        "dispatch_fits": d.fits,
        "combine_payload_offset": d.combine_payload_offset,
        "combine_payload_bytes": c.payload_bytes,
        "combine_required_size": c.required_size,
        "combine_fits": c.fits,
    }


def outcome_json(o: LayerOutcome) -> dict[str, Any]:
    layer = o.layer
    return {
        "stage": o.stage,
        "index": o.index,
        "name": layer.name,
        "origin": o.origin,
        "mtp": o.is_mtp,
        "layer": layer.to_dict(),
        "payload": {
            "dispatch": [
                {"name": p.name, "bytes_per_token": p.bytes_per_token, "element_size": p.element_size}
                for p in layer.dispatch_payloads
            ],
            "dispatch_bytes_per_token": layer.dispatch_bytes_per_token,
            "combine_bytes_per_token": layer.combine_bytes_per_token,
        },
        "need": o.need,
        "workspace": {
            "rebuilt": o.rebuilt,
            "built_by": o.built_by,
            "size_per_rank": o.geometry.size_per_rank,
            "max_num_tokens": o.geometry.max_num_tokens,
            "eplb_stats_num_experts": o.geometry.eplb_stats_num_experts,
        },
        "runtime_tokens": o.runtime_tokens,
        "arithmetic": _arithmetic_json(o.check),
        "verdict": o.verdict,
        "fits": o.fits,
        "error": None if o.error is None else {"type": o.error_type, "message": o.error},
        "first_failing_tokens": o.first_failing_tokens,
        "first_failing": _trip_json(o.first_trip),
        "final_pass": o.final_pass,
    }


def _trip_json(trip: Trip | None) -> dict[str, Any] | None:
    """The round trip at one runtime token count: the verdict, FlashInfer's error, the arithmetic there."""
    if trip is None:
        return None
    return {
        "runtime_tokens": trip.tokens,
        "verdict": trip.verdict,
        "error": None if trip.error is None else {"type": trip.error_type, "message": trip.error},
        "arithmetic": _arithmetic_json(trip.check),
    }


def walk_json(walk: PlanWalk, command: str) -> dict[str, Any]:
    failures = walk.failures
    first = failures[0] if failures else None
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "command": command,
        "plan": walk.loaded.plan.name,
        "source": walk.loaded.source,
        "ep": walk.ep,
        "manager": walk.model.spec,
        "policy": walk.model.policy,
        "policy_source": walk.model.source,
        "flashinfer": walk.release,
        "flashinfer_source": walk.release_source,
        "modelled": modelled_line(walk).removeprefix("modelled: "),
        "alignment": sizing.ALIGNMENT if walk.release != releases.V074 else sizing_v074.WORKSPACE_ALIGNMENT,
        "fits": walk.fits,
        "first_failure": None
        if first is None
        else {
            "stage": first.stage,
            "index": first.index,
            "name": first.layer.name,
            "verdict": first.verdict,
            "error": {"type": first.error_type, "message": first.error},
            "first_failing_tokens": first.first_failing_tokens,
            "final_pass": first.final_pass,
        },
        # Where the first failure trips, in words with FlashInfer's numbers (region, need vs capacity, T).
        "first_failure_summary": None
        if first is None or first.verdict in ("refused", "unreached")
        else trip_text(_full_trip(first)),
        "stages": [
            {
                "stage": s.stage,
                "ep_ranks": list(s.ep_ranks),
                "fits": s.fits,
                "layers": [outcome_json(o) for o in s.outcomes],
                "final_pass": [outcome_json(o) for o in s.final],
            }
            for s in walk.stages
        ],
    }
