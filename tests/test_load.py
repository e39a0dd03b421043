"""The load board: one byte per xdist worker in a shared file, the ranks of its world computing now."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_mnnvl.worlds import load


def test_marks_add_up_over_slots_and_readers_see_them(tmp_path: Path) -> None:
    board = load.LoadBoard.create(str(tmp_path))
    reader = load.LoadBoard.open(board.path)
    try:
        assert reader.busy_ranks() == 0
        board.mark(0, 2)
        board.mark(3, 4)
        assert reader.busy_ranks() == 6
        board.mark(3, 0)
        assert reader.busy_ranks() == 2
        board.mark(load.SLOTS + 1, 1)  # a replacement worker's number wraps onto slot 1
        assert reader.busy_ranks() == 3
        board.mark(5, 10_000)  # a byte per slot
        assert reader.busy_ranks() == 3 + load.MAX_RANKS
    finally:
        reader.close()
        board.close()


def test_the_owner_removes_the_file_a_reader_does_not(tmp_path: Path) -> None:
    board = load.LoadBoard.create(str(tmp_path))
    load.LoadBoard.open(board.path).close()
    assert Path(board.path).exists()
    board.close()
    assert not Path(board.path).exists()
    board.close()  # twice is harmless


def test_a_file_that_is_not_a_board_is_refused_by_size(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(b"x" * 10)
    with pytest.raises(OSError, match=rf"{other} is not a load board: 10 bytes, a board has {load.SLOTS}"):
        load.LoadBoard.open(str(other))
    with pytest.raises(FileNotFoundError):
        load.LoadBoard.open(str(tmp_path / "gone"))


def test_a_seat_is_marked_during_a_call_and_cleared_after_even_on_error(tmp_path: Path) -> None:
    board = load.LoadBoard.create(str(tmp_path))
    seat = load.Seat(load.LoadBoard.open(board.path, writable=True), 7)
    try:
        with seat.computing(4):
            assert board.busy_ranks() == 4
        assert board.busy_ranks() == 0
        with pytest.raises(RuntimeError), seat.computing(2):
            assert board.busy_ranks() == 2
            raise RuntimeError("the call failed")
        assert board.busy_ranks() == 0
    finally:
        seat.board.close()
        board.close()


@pytest.mark.parametrize(
    ("worker", "slot"), [("gw0", 0), ("gw13", 13), (f"gw{load.SLOTS + 2}", 2), ("master", None), ("gw", None)]
)
def test_slot_of_an_xdist_worker(worker: str, slot: int | None) -> None:
    assert load.slot_of(worker) == slot
