"""The round trip's delivery check: rows compared as a multiset, byte for byte, fast."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from pytest_mnnvl.conformance.roundtrip import same_rows  # noqa: E402


def rows(n: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, width), dtype=torch.uint8, generator=generator)


def test_any_order_of_the_same_rows_matches() -> None:
    a = rows(300, 3584)
    assert same_rows(a[torch.randperm(300)], a)


@pytest.mark.parametrize("where", [(0, 0), (17, 3583), (299, 1000), (5, 1)])
def test_one_flipped_bit_anywhere_is_a_mismatch(where: tuple[int, int]) -> None:
    a = rows(300, 3584)
    b = a.clone()
    b[where] ^= 1
    assert not same_rows(b, a)


def test_rows_alike_where_the_checksum_reads_still_match_in_any_order() -> None:
    """Rows that differ only outside the checksummed columns tie: the answer comes from the whole rows."""
    a = rows(2, 3584)
    a[1] = a[0]
    a[1, 1] ^= 0x80  # column 1: not among the 64 columns the checksum reads of a 3584-byte row
    assert same_rows(a.flip(0), a)
    assert not same_rows(torch.stack([a[0], a[0]]), a)


def test_empty_rows_match() -> None:
    assert same_rows(rows(0, 16), rows(0, 16))
    assert not same_rows(rows(0, 16), rows(0, 8))


def test_the_payload_bytes_are_the_documented_formula() -> None:
    from pytest_mnnvl.conformance.roundtrip import _payload_bytes

    for source, tokens, width, salt in ((0, 1, 1, 0), (3, 37, 251, 2), (7, 300, 600, 4), (1, 9, 3584, 1)):
        written_out = [[(source * 131 + t * 31 + c * 7 + salt * 17) % 251 for c in range(width)] for t in range(tokens)]
        got = _payload_bytes(source, tokens, width, salt)
        assert got.dtype == torch.uint8 and got.is_contiguous() and got.tolist() == written_out


def test_a_missing_or_duplicated_row_is_a_mismatch() -> None:
    a = rows(8, 64)
    assert not same_rows(a[:7], a)
    assert not same_rows(torch.cat([a[:7], a[:1]]), a)


def test_bytes_swapped_within_a_row_are_a_mismatch() -> None:
    a = torch.tensor([[1, 2], [3, 4]], dtype=torch.uint8)
    assert same_rows(a.flip(0), a)
    assert not same_rows(torch.tensor([[2, 1], [3, 4]], dtype=torch.uint8), a)


# ---- the mismatch messages: where the data differs, not the first values (often right) ----------------------

from pytest_mnnvl.conformance.roundtrip import combine_mismatch, dispatch_mismatch  # noqa: E402


def test_a_right_combine_has_no_message() -> None:
    expected = torch.tensor([1.0, 2.0, 2.0, 1.0])
    assert combine_mismatch(expected.unsqueeze(1).repeat(1, 16), expected, 0, "bf16") is None


def test_a_right_bf16_combine_has_no_message_and_a_nan_is_wrong() -> None:
    expected = torch.tensor([1.0, 3.0, 2.0])
    combined = expected.unsqueeze(1).repeat(1, 7168).to(torch.bfloat16)
    assert combine_mismatch(combined, expected, 0, "bf16") is None
    combined[1, 5000] = float("nan")
    message = combine_mismatch(combined, expected, 0, "bf16")
    assert message is not None and "wrong at 1 of 3 tokens, first at token 1 (1 of 7168 hidden columns" in message


def test_a_combine_wrong_only_past_column_0_names_the_tokens_columns_and_values() -> None:
    """The old message showed column 0 of the first 8 tokens: here all right, so got and expected read alike."""
    expected = torch.full((64,), 2.0)
    combined = expected.unsqueeze(1).repeat(1, 256)
    combined[17, 128:] = 1.0  # half of token 17's hidden columns got one rank's ones only
    combined[40, 255] = 0.0
    message = combine_mismatch(combined, expected, 1, "nvfp4-512")
    assert message == (
        "rank 1: combine of ones of layer nvfp4-512 is wrong at 2 of 64 tokens, first at token 17 (128 of 256 "
        "hidden columns wrong, first column 128: got 1, expected 2, the number of distinct ranks owning its "
        "experts); tokens 15..19 got [2, 2, 1*, 2, 2], expected [2, 2, 2, 2, 2] (* = wrong, its first wrong column)"
    )


def test_a_combine_wrong_at_the_first_token_shows_the_tokens_after_it() -> None:
    expected = torch.tensor([2.0, 1.0, 2.0, 1.0, 1.0])
    combined = expected.unsqueeze(1).repeat(1, 8)
    combined[0] = float("nan")
    message = combine_mismatch(combined, expected, 0, "bf16")
    assert message is not None
    assert "wrong at 1 of 5 tokens, first at token 0 (8 of 8 hidden columns wrong, first column 0: got nan" in message
    assert "tokens 0..2 got [nan*, 1, 2], expected [2, 1, 2]" in message


def test_rows_that_arrived_in_another_order_have_no_message() -> None:
    a = rows(50, 64)
    assert dispatch_mismatch(a[torch.randperm(50)], a, range(100, 150), 0, 1, "bf16") is None


def test_a_dispatch_mismatch_counts_missing_and_unexpected_rows_and_names_the_tokens() -> None:
    want = rows(20, 32, seed=3)
    tokens = list(range(0, 40, 2))  # the source's tokens routed to this rank
    got = want.clone()
    got[5] = 0  # a slot nothing was written to: token 10 is missing
    got[9] ^= 1  # one flipped bit in every byte of token 18's row
    message = dispatch_mismatch(got, want, tokens, 1, 0, "mxfp8")
    assert message == (
        "rank 1: 20 activation rows expected from rank 0 of layer mxfp8, 20 read: 18 arrived as sent, 2 missing, "
        "2 unexpected (1 all zero: never written); missing tokens (of rank 0): 10, 18; first unexpected row in "
        "slot 5, bytes [0, 0, 0, 0, 0, 0, 0, 0, ...]"
    )


def test_a_duplicated_row_is_one_missing_and_one_unexpected() -> None:
    want = rows(6, 16, seed=5)
    got = torch.cat([want[:5], want[2:3]])
    message = dispatch_mismatch(got, want, [3, 4, 5, 6, 7, 8], 0, 1, "bf16")
    assert message is not None
    assert (
        "6 read: 5 arrived as sent, 1 missing, 1 unexpected (1 extra copies of rows it sent); "
        "missing tokens (of rank 1): 8; first unexpected row in slot 5"
    ) in message


@pytest.mark.parametrize(
    ("num_experts", "ep_size", "top_k", "tokens"),
    [(8, 2, 2, 37), (256, 8, 8, 13), (10, 4, 3, 50), (7, 3, 1, 9), (24, 8, 22, 5), (8, 8, 8, 1)],
)
def test_routes_and_their_owners_are_the_documented_formula(
    num_experts: int, ep_size: int, top_k: int, tokens: int
) -> None:
    """The vectorized routes, receivers and combine targets against the formula written out per token."""
    from pytest_mnnvl.conformance.roundtrip import (
        distinct_owner_counts,
        experts_owned,
        owner_of,
        selected_experts,
        tokens_routed_to,
    )
    from pytest_mnnvl.model.layers import LayerSpec, QuantFormat

    layer = LayerSpec(QuantFormat.BF16, 128, top_k, num_experts, tokens)
    blocks = experts_owned(num_experts, ep_size)

    def owner(expert: int) -> int:
        return next(rank for rank, block in enumerate(blocks) if expert in block)

    stride = max(1, num_experts // top_k)
    for source in range(ep_size):
        routes = [[(t * 7 + source * 3 + j * stride) % num_experts for j in range(top_k)] for t in range(tokens)]
        assert selected_experts(layer, source, tokens).tolist() == routes
        assert distinct_owner_counts(layer, source, tokens, ep_size).tolist() == [
            float(len({owner(e) for e in row})) for row in routes
        ]
        for rank in range(ep_size):
            assert tokens_routed_to(layer, source, tokens, rank, ep_size) == [
                t for t, row in enumerate(routes) if rank in {owner(e) for e in row}
            ]
    assert [owner_of(e, num_experts, ep_size) for e in range(num_experts)] == [owner(e) for e in range(num_experts)]
    for outside in (-1, num_experts):
        with pytest.raises(ValueError, match=f"expert {outside} is outside 0..{num_experts - 1}"):
            owner_of(outside, num_experts, ep_size)


def test_union_handle_needs_a_layer() -> None:
    from pytest_mnnvl.conformance.roundtrip import build_union_alltoall

    with pytest.raises(ValueError, match="build_union_alltoall needs at least one layer"):
        build_union_alltoall(object(), [])
