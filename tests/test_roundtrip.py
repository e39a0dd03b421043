"""The round trip's delivery check: rows compared as a multiset, byte for byte, fast."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from pytest_mnnvl.roundtrip import same_rows  # noqa: E402


def rows(n: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, width), dtype=torch.uint8, generator=generator)


def test_any_order_of_the_same_rows_matches() -> None:
    a = rows(300, 3584)
    assert same_rows(a[torch.randperm(300)], a)


@pytest.mark.parametrize("where", [(0, 0), (17, 3583), (299, 1000)])
def test_one_flipped_bit_anywhere_is_a_mismatch(where: tuple[int, int]) -> None:
    a = rows(300, 3584)
    b = a.clone()
    b[where] ^= 1
    assert not same_rows(b, a)


def test_a_missing_or_duplicated_row_is_a_mismatch() -> None:
    a = rows(8, 64)
    assert not same_rows(a[:7], a)
    assert not same_rows(torch.cat([a[:7], a[:1]]), a)


def test_bytes_swapped_within_a_row_are_a_mismatch() -> None:
    a = torch.tensor([[1, 2], [3, 4]], dtype=torch.uint8)
    assert same_rows(a.flip(0), a)
    assert not same_rows(torch.tensor([[2, 1], [3, 4]], dtype=torch.uint8), a)
