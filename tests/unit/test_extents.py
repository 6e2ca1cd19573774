"""Extent allocation (pure logic, no root)."""
import pytest

from drb_uring.channel.extents import ExtentError, Extents


def test_first_fit_and_merge_back():
    e = Extents(100)
    a, b, c = e.alloc(10), e.alloc(20), e.alloc(30)
    assert (a, b, c) == ((0, 10), (10, 20), (30, 30))
    e.release(*b)
    assert e.alloc(15) == (10, 15)          # first fit reuses the hole
    e.release(10, 15)
    e.release(*a)
    e.release(*c)
    assert e.free == [(0, 100)] and e.free_bytes == 100


def test_alignment_rounds_up_and_keeps_bases_aligned():
    e = Extents(1 << 20, align=4096)
    assert e.alloc(1000) == (0, 4096)
    assert e.alloc(5000) == (4096, 8192)


def test_exhaustion_names_the_largest_hole():
    e = Extents(100)
    e.alloc(60)
    with pytest.raises(ExtentError, match="no free extent of 50 bytes.*largest free: 40"):
        e.alloc(50)


@pytest.mark.parametrize("base, size", [(0, 10), (5, 10), (95, 10), (-1, 5), (0, 0)])
def test_release_refuses_what_was_not_handed_out(base, size):
    e = Extents(100)
    e.alloc(50)
    e.release(0, 50)
    with pytest.raises(ValueError, match="was not allocated"):
        e.release(base, size)


def test_bad_parameters():
    with pytest.raises(ValueError):
        Extents(100, align=3)
    with pytest.raises(ValueError):
        Extents(100).alloc(0)
