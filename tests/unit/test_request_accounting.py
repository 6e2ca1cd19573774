"""A request split in pieces: how its pieces' results add up (pure logic)."""
import errno

from drb_uring.channel.client import Request
from drb_uring.enforce.tasks import OP_FSYNC, OP_READ_FIXED


class _NoChannel:
    """Request.result() drives its channel; these tests finish requests by hand."""

    def _drive(self, until, timeout=None):
        assert until()


def _req(n, pieces):
    r = Request(_NoChannel(), OP_READ_FIXED, bytearray(n), n)
    r.pending = pieces
    return r


def test_all_pieces_full():
    r = _req(300, 3)
    done = []
    r.callbacks.append(done.append)
    r._piece_done(200, 100, 100)
    r._piece_done(0, 100, 100)
    assert not r.done and not done
    r._piece_done(100, 100, 100)
    assert r.done and done == [r] and r.result() == 300


def test_a_short_piece_ends_the_data_there_whatever_the_order():
    r = _req(300, 3)
    r._piece_done(200, 100, 100)
    r._piece_done(100, 100, 40)     # short: the device ended at 140
    r._piece_done(0, 100, 100)
    assert r.result() == 140


def test_the_first_error_wins():
    r = _req(200, 2)
    r._piece_done(0, 100, -errno.EIO)
    r._piece_done(100, 100, -errno.ERANGE)
    try:
        r.result()
    except OSError as e:
        assert e.errno == errno.EIO
    else:
        raise AssertionError("no error")


def test_failure_finishes_at_once():
    r = _req(200, 2)
    r._fail(ConnectionError("gone"))
    assert r.done and r.pending == 0
    try:
        r.result()
    except ConnectionError as e:
        assert str(e) == "gone"


def test_flush_has_no_byte_count():
    r = Request(_NoChannel(), OP_FSYNC, None, 0)
    r.pending = 1
    r._piece_done(0, 0, 0)
    assert r.result() is None
