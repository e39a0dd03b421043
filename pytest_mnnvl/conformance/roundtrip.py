"""Inside a rank: one real dispatch + combine through a live FlashInfer handle with a layer's own payloads.

The payloads follow the layer's layout (activations, scales, int32 expert ids, fp32 weights, extra)
so the workspace regions are exercised at exactly the offsets the layer would use. The content is
deterministic per (source rank, token), so every receiver can verify what arrived without asking:

- dispatch: every source sends each token once to each distinct rank owning one of its experts;
  a receiver checks how many rows each source sent it and that every row is one of that source's
  tokens, byte for byte (arrival order is not defined, so rows are compared as a set); a receiver
  that got wrong rows says so only after the combine, which its peers wait in;
- combine: every rank returns ones for every received slot, so each token's combined value must
  be the number of distinct ranks its experts live on.

FlashInfer's own errors (the size checks, phase errors) propagate unchanged: a caller that wants
the first failure catches ``RuntimeError``/``AssertionError`` around :func:`round_trip`, and ``ValueError``
on 0.7.4 (its runtime token check: ``runtime_max_tokens_per_rank=N must be in (0, M]``).

One mechanism on every FlashInfer release: the payloads and both verifications are shared, only the
handle calls differ (:mod:`pytest_mnnvl.managers.handles`). On 0.7.2.post1 ``MoeAlltoAll.dispatch``
takes the layer's payload list as is; on 0.7.4 ``NVLinkOneSidedAlltoAll.dispatch`` takes hidden
states, scales, ids and weights (four payloads at most), and the layer's extra bytes ride at the end
of each hidden-state row, in the room ``extra_payload_bytes_per_token`` reserves for them.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from pytest_mnnvl.model.layers import LayerSpec


class RoundTripMismatch(AssertionError):
    """Dispatch or combine completed but delivered the wrong bytes or sums."""


@dataclass(frozen=True)
class RoundTripResult:
    tokens: int
    received_per_source: tuple[int, ...]
    combine_payload_offset: int | None


def build_alltoall(
    ctx: Any,
    *,
    max_num_tokens: int,
    top_k: int,
    num_experts: int,
    size_per_rank: int | None = None,
    dispatch_bytes_per_token: int | None = None,
    combine_bytes_per_token: int | None = None,
    comm: Any = None,
    **extra: Any,
) -> Any:
    """FlashInfer's own handle on this rank's EP group with exactly these sizes, the way vLLM builds it
    (``TorchDistBackend`` over the EP gloo group): for code that drives FlashInfer without a manager (the
    examples, ``repro``'s policy driver, the benchmarks). ``comm`` replaces that backend: FlashInfer 0.7.2's
    ``TorchDistBackend.Split`` makes new process groups, a collective over the whole world, so where PP stages
    build at different times (``repro --policy`` on a PP plan) pass one that stays on the EP group.

    FlashInfer 0.7.2.post1: a ``MoeAlltoAll`` of ``size_per_rank`` bytes (or, without it, FlashInfer's size
    for the per-token capacities); ``extra`` goes to ``MoeAlltoAll`` as is. FlashInfer 0.7.4: an
    ``NVLinkOneSidedAlltoAll`` for ``dispatch_bytes_per_token`` (activations, scales, ids, weights, extra)
    and ``combine_bytes_per_token``; it takes no byte size, so ``size_per_rank`` is an error there."""
    from pytest_mnnvl.managers import handles
    from pytest_mnnvl.model import releases

    release = releases.current()
    capacity = None
    if dispatch_bytes_per_token is not None and combine_bytes_per_token is not None:
        capacity = handles.Capacity(max_num_tokens, dispatch_bytes_per_token, combine_bytes_per_token)
    if release != releases.V072:
        if size_per_rank is not None or capacity is None or extra:
            raise ValueError(
                f"build_alltoall on FlashInfer {release}: NVLinkOneSidedAlltoAll sizes its workspace from per-token "
                "capacities, so pass dispatch_bytes_per_token and combine_bytes_per_token (and neither size_per_rank "
                f"nor other options); got size_per_rank={size_per_rank!r}, dispatch_bytes_per_token="
                f"{dispatch_bytes_per_token!r}, combine_bytes_per_token={combine_bytes_per_token!r}, options "
                f"{sorted(extra)}"
            )
        from flashinfer.comm.comm_backend import TorchDistBackend

        builder = handles.api(release).builder(ctx.ep_rank, ctx.ep_size)
        return builder.build(capacity, top_k, num_experts, comm or TorchDistBackend(ctx.cpu_group))
    if size_per_rank is None:
        if capacity is None:
            raise ValueError(
                "build_alltoall on FlashInfer 0.7.2.post1 needs size_per_rank, or dispatch_bytes_per_token and "
                "combine_bytes_per_token to size it with FlashInfer's formula"
            )
        size_per_rank = handles.api(release).builder(ctx.ep_rank, ctx.ep_size).size_for(capacity, top_k)
    import warnings

    from flashinfer.comm import Mapping, MoeAlltoAll
    from flashinfer.comm.comm_backend import TorchDistBackend
    from flashinfer.comm.mnnvl import MnnvlConfig

    ep = ctx.ep_size
    mapping = Mapping(world_size=ep, rank=ctx.ep_rank, gpus_per_node=ep, tp_size=ep, moe_ep_size=ep)
    with warnings.catch_warnings():
        # Deprecated in favour of flashinfer.moe_ep in 0.7.1; still what vLLM's managers use.
        warnings.filterwarnings("ignore", "MoeAlltoAll is deprecated", DeprecationWarning)
        return MoeAlltoAll(
            mapping,
            max_num_tokens=max_num_tokens,
            top_k=top_k,
            num_experts=num_experts,
            workspace_size_per_rank=size_per_rank,
            mnnvl_config=MnnvlConfig(comm_backend=comm or TorchDistBackend(ctx.cpu_group)),
            **extra,
        )


def build_union_alltoall(ctx: Any, layers: Sequence[LayerSpec]) -> Any:
    """:func:`build_alltoall` sized for the per-dimension union of ``layers`` (the largest max tokens, dispatch
    bytes and combine bytes, each over every layer), with the first layer's ``top_k`` and ``num_experts``."""
    if not layers:
        raise ValueError("build_union_alltoall needs at least one layer")
    return build_alltoall(
        ctx,
        max_num_tokens=max(layer.max_num_tokens for layer in layers),
        top_k=layers[0].top_k,
        num_experts=layers[0].num_experts,
        dispatch_bytes_per_token=max(layer.dispatch_bytes_per_token for layer in layers),
        combine_bytes_per_token=max(layer.combine_bytes_per_token for layer in layers),
    )


def ep_barrier(ctx: Any) -> None:
    """This rank's kernels are done and so are every EP peer's: the order two round trips of different
    payload layouts need on FlashInfer 0.7.2, whose combine region moves with them (TensorRT-LLM #19312)."""
    import torch
    import torch.distributed as dist

    if ctx.device != "cpu":
        torch.cuda.synchronize()
    dist.barrier(group=ctx.cpu_group)


def experts_owned(num_experts: int, ep_size: int) -> list[range]:
    """FlashInfer's contiguous expert blocks: ranks below ``E % ep`` own one extra expert."""
    base, rem = divmod(num_experts, ep_size)
    blocks, start = [], 0
    for rank in range(ep_size):
        size = base + (1 if rank < rem else 0)
        blocks.append(range(start, start + size))
        start += size
    return blocks


@functools.lru_cache(maxsize=64)
def expert_owners(num_experts: int, ep_size: int) -> tuple[int, ...]:
    """The owning rank of every expert id, in id order (:func:`experts_owned` flattened)."""
    return tuple(rank for rank, block in enumerate(experts_owned(num_experts, ep_size)) for _ in block)


def owner_of(expert: int, num_experts: int, ep_size: int) -> int:
    if not 0 <= expert < num_experts:
        raise ValueError(f"expert {expert} is outside 0..{num_experts - 1}")
    return expert_owners(num_experts, ep_size)[expert]


def selected_experts(layer: LayerSpec, source: int, tokens: int) -> torch.Tensor:
    """Distinct experts per token (``[tokens, top_k]`` int64), varied by source and token so routes cover
    several ranks: ``(token·7 + source·3 + j·stride) mod E`` with ``stride = max(1, E // top_k)``."""
    import torch

    stride = max(1, layer.num_experts // layer.top_k)
    token = torch.arange(tokens, dtype=torch.int64).unsqueeze(1)
    slot = torch.arange(layer.top_k, dtype=torch.int64).unsqueeze(0)
    return (token * 7 + source * 3 + slot * stride) % layer.num_experts


def route_owners(layer: LayerSpec, source: int, tokens: int, ep_size: int) -> torch.Tensor:
    """The owning rank of each of ``source``'s routes (``[tokens, top_k]``)."""
    import torch

    table = torch.tensor(expert_owners(layer.num_experts, ep_size), dtype=torch.int64)
    return table[selected_experts(layer, source, tokens)]


def tokens_routed_to(layer: LayerSpec, source: int, tokens: int, rank: int, ep_size: int) -> list[int]:
    """The tokens of ``source`` that ``rank`` receives: those with an expert that ``rank`` owns."""
    import torch

    hits = (route_owners(layer, source, tokens, ep_size) == rank).any(dim=1)
    return [int(t) for t in torch.nonzero(hits).flatten().tolist()]


def distinct_owner_counts(layer: LayerSpec, source: int, tokens: int, ep_size: int) -> torch.Tensor:
    """Per token of ``source``, how many distinct ranks own its experts (float32 ``[tokens]``): the combine of
    ones each token must come back with."""
    import torch

    owners = torch.sort(route_owners(layer, source, tokens, ep_size), dim=1).values
    return (1 + (owners[:, 1:] != owners[:, :-1]).sum(dim=1)).to(torch.float32)


def _dtype_for(element_size: int, name: str) -> torch.dtype:
    import torch

    if name == "topk_weights":
        return torch.float32
    if name == "topk_ids":
        return torch.int32
    return {1: torch.uint8, 2: torch.bfloat16, 4: torch.int32}[element_size]


#: The byte pattern's modulus (a prime: every column step and row step visits every value) and 7's inverse mod it.
_MODULUS, _INVERSE_OF_7 = 251, 36


def _payload_bytes(source: int, tokens: int, width: int, salt: int) -> torch.Tensor:
    """``(source·131 + token·31 + column·7 + salt·17) mod 251`` as bytes (``[tokens, width]`` uint8).

    Written as ``7·(column + 36·row) mod 251`` (36 is 7's inverse mod 251), every row is the same sequence
    ``7·k mod 251`` started at its own offset: one short sequence is built and each row copied out of it, which
    is a byte gather instead of integer arithmetic over the whole payload (this runs once per source and layer in
    every rank)."""
    import torch

    row = (source * 131 + salt * 17 + torch.arange(tokens, dtype=torch.int64) * 31) % _MODULUS
    start = (row * _INVERSE_OF_7) % _MODULUS
    sequence = ((torch.arange(width + _MODULUS, dtype=torch.int64) * 7) % _MODULUS).to(torch.uint8)
    return sequence.unfold(0, width, 1).index_select(0, start)


def make_inputs(layer: LayerSpec, source: int, tokens: int, device: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(token_selected_experts [T, top_k] int32, payload tensors in the layer's order) for one source."""
    import torch

    experts = selected_experts(layer, source, tokens).to(torch.int32)
    payloads: list[torch.Tensor] = []
    for salt, payload in enumerate(layer.dispatch_payloads):
        if payload.name == "topk_ids":
            payloads.append(experts.clone())
            continue
        if payload.name == "topk_weights":
            payloads.append(torch.full((tokens, layer.top_k), 0.5, dtype=torch.float32))
            continue
        raw = _payload_bytes(source, tokens, payload.bytes_per_token, salt)
        dtype = _dtype_for(payload.element_size, payload.name)
        payloads.append(raw.view(dtype).reshape(tokens, payload.bytes_per_token // payload.element_size))
    return experts.to(device), [p.to(device) for p in payloads]


#: Columns :func:`_row_keys` reads at most (spread over the row): enough to tell rows apart, few enough to be cheap.
_KEY_COLUMNS = 64


def _row_keys(rows: torch.Tensor) -> torch.Tensor:
    """A weighted checksum per row over up to :data:`_KEY_COLUMNS` columns spread over it; float64 is exact here
    (sums stay below 2**53) and a matmul is fast. Only an ordering: :func:`same_rows` compares whole rows."""
    import torch

    width = rows.shape[1]
    columns = torch.linspace(0, max(0, width - 1), min(width, _KEY_COLUMNS)).round().to(torch.int64).unique()
    weights = ((columns * 2654435761 + 97) % 1000003).to(torch.float64)
    return rows.index_select(1, columns).to(torch.float64) @ weights


def same_rows(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether two uint8 ``[n, width]`` tensors hold the same rows in any order, byte for byte.

    Rows are ordered by a checksum of some of their columns and then compared whole (vectorized: a 59-layer
    DeepSeek plan verifies in milliseconds, not minutes); only if that says "different" are they compared as
    sorted byte strings, so neither a checksum tie nor a difference outside the checksummed columns can decide
    the answer."""
    import numpy
    import torch

    if got.shape != want.shape:
        return False
    if got.numel() == 0:
        return True
    ordered_got = got.index_select(0, torch.argsort(_row_keys(got)))
    ordered_want = want.index_select(0, torch.argsort(_row_keys(want)))
    if numpy.array_equal(ordered_got.numpy(), ordered_want.numpy()):  # a memcmp: ~10x torch.equal on uint8
        return True
    return sorted(bytes(row.tolist()) for row in got) == sorted(bytes(row.tolist()) for row in want)


#: Tokens shown on each side of the first wrong one in a combine mismatch.
AROUND = 2


def _value(x: float) -> str:
    return f"{x:g}"


def combine_mismatch(combined: torch.Tensor, expected: torch.Tensor, ep_rank: int, layer_name: str) -> str | None:
    """Where a combine of ones went wrong, or None when it is right: how many tokens have a wrong sum in any
    hidden column, the first one, and the values around it. ``combined`` is ``[T, H]``, ``expected`` ``[T]``.

    One value per token is shown: its first wrong column's (else column 0's), so a token whose column 0 is
    right but some later column is not still shows what is wrong there."""
    import torch

    # Right when every token's smallest and largest column are its expected sum (a NaN makes both NaN): two
    # reductions in the combine's own dtype, no copy of it; only a wrong combine is converted to show what is wrong.
    sums = expected.float()
    if torch.equal(combined.amin(dim=1).float(), sums) and torch.equal(combined.amax(dim=1).float(), sums):
        return None
    combined = combined.float()
    wrong = combined != sums.unsqueeze(1)
    bad_tokens = torch.nonzero(wrong.any(dim=1)).flatten().tolist()
    if not bad_tokens:
        return None
    first = bad_tokens[0]
    tokens, hidden = combined.shape
    columns = torch.nonzero(wrong[first]).flatten().tolist()
    column = columns[0]
    shown = range(max(0, first - AROUND), min(tokens, first + AROUND + 1))
    got = []
    for t in shown:
        cols = torch.nonzero(wrong[t]).flatten()
        c = int(cols[0]) if len(cols) else 0
        got.append(_value(float(combined[t, c])) + ("*" if len(cols) else ""))
    want = [_value(float(expected[t])) for t in shown]
    return (
        f"rank {ep_rank}: combine of ones of layer {layer_name} is wrong at {len(bad_tokens)} of {tokens} tokens, "
        f"first at token {first} ({len(columns)} of {hidden} hidden columns wrong, first column {column}: "
        f"got {_value(float(combined[first, column]))}, expected {_value(float(expected[first]))}, the number of "
        f"distinct ranks owning its experts); tokens {shown.start}..{shown.stop - 1} got [{', '.join(got)}], "
        f"expected [{', '.join(want)}] (* = wrong, its first wrong column)"
    )


def dispatch_mismatch(
    got: torch.Tensor, want: torch.Tensor, tokens: Sequence[int], ep_rank: int, source: int, layer_name: str
) -> str | None:
    """Which activation rows from ``source`` did not arrive as sent, or None when they all did (in any order).

    ``want[i]`` is the row of token ``tokens[i]``; ``got`` holds as many rows (the slots this rank reads). Rows
    are compared as a multiset, byte for byte: a row sent but not received is missing, a row received but
    never sent is unexpected (all zero: a slot nothing was written to)."""
    if same_rows(got, want):
        return None
    got_rows = [row.tobytes() for row in got.contiguous().numpy()]
    want_rows = [row.tobytes() for row in want.contiguous().numpy()]
    unmatched = Counter(want_rows)
    extra_slots = []  # slots holding a row never sent, or one more copy of a sent row than was sent
    for slot, row in enumerate(got_rows):
        if unmatched[row] > 0:
            unmatched[row] -= 1
        else:
            extra_slots.append(slot)
    missing_tokens = []
    for token, row in zip(reversed(tokens), reversed(want_rows), strict=True):
        if unmatched[row] > 0:  # the last copies are the ones not received (rows are matched in any order)
            unmatched[row] -= 1
            missing_tokens.append(token)
    missing_tokens.reverse()
    sent = set(want_rows)
    zero = bytes(len(got_rows[0])) if got_rows else b""
    zeros = sum(1 for slot in extra_slots if got_rows[slot] == zero)
    copies = sum(1 for slot in extra_slots if got_rows[slot] in sent)
    kinds = [f"{zeros} all zero: never written"] * bool(zeros) + [f"{copies} extra copies of rows it sent"] * bool(
        copies
    )
    parts = [
        f"rank {ep_rank}: {len(want_rows)} activation rows expected from rank {source} of layer {layer_name}, "
        f"{len(got_rows)} read: {len(want_rows) - len(missing_tokens)} arrived as sent, {len(missing_tokens)} "
        f"missing, {len(extra_slots)} unexpected" + (f" ({', '.join(kinds)})" if kinds else "")
    ]
    if missing_tokens:
        listed = ", ".join(map(str, missing_tokens[:8])) + (", ..." if len(missing_tokens) > 8 else "")
        parts.append(f"missing tokens (of rank {source}): {listed}")
    if extra_slots:
        slot = extra_slots[0]
        head = ", ".join(str(b) for b in got_rows[slot][:8])
        parts.append(f"first unexpected row in slot {slot}, bytes [{head}, ...]")
    return "; ".join(parts)


def round_trip(a2a: Any, layer: LayerSpec, ep_rank: int, ep_size: int, tokens: int, device: Any) -> RoundTripResult:
    """Dispatch ``tokens`` tokens per rank with ``layer``'s payloads, verify, combine ones, verify."""
    import torch

    from pytest_mnnvl.managers import handles

    calls = handles.api()
    experts, payloads = make_inputs(layer, ep_rank, tokens, device)
    received, offset = calls.dispatch(a2a, layer, experts, payloads, tokens)

    counts = []
    width = layer.dispatch_payloads[0].bytes_per_token
    delivered_wrong: str | None = None
    for source in range(ep_size):
        mine = tokens_routed_to(layer, source, tokens, ep_rank, ep_size)
        counts.append(len(mine))
        # The activation payload's bytes (on 0.7.4 a layer's extra bytes follow them in the same row).
        got = received[source, : len(mine)].contiguous().view(torch.uint8)[:, :width].cpu()
        want = _payload_bytes(source, tokens, width, 0)[mine]
        delivered_wrong = delivered_wrong or dispatch_mismatch(
            got, want, mine, ep_rank, source, layer.name or layer.quant.value
        )

    # A rank whose dispatch delivered wrong rows still takes part in the combine (as an engine, which never
    # verifies, would): its peers' combine waits for this rank's flag, so skipping it would hang them.
    combine_in = torch.ones((ep_size, tokens, layer.hidden_size), dtype=torch.bfloat16, device=device)
    try:
        combined = calls.combine(a2a, combine_in, tokens).cpu()
    except Exception as exc:
        if delivered_wrong is not None:
            raise RoundTripMismatch(delivered_wrong) from exc
        raise
    if delivered_wrong is not None:
        raise RoundTripMismatch(delivered_wrong)
    expected = distinct_owner_counts(layer, ep_rank, tokens, ep_size)
    wrong = combine_mismatch(combined, expected, ep_rank, layer.name or layer.quant.value)
    if wrong is not None:
        raise RoundTripMismatch(wrong)
    return RoundTripResult(tokens, tuple(counts), offset)
