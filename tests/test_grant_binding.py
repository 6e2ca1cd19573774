"""Which steps of building a grant ring the PyPI liburing binding can do.

The broker builds grant rings in drb_uring.channel._grant with raw
io_uring_register calls. The binding (PyPI `liburing`, the version pinned
in requirements-dev.txt) was tried for each step; these tests pin what it
can and cannot do, so that a release that closes the gaps shows up here.
"""
import ctypes
import errno
import os

import pytest

L = pytest.importorskip("liburing", reason="the PyPI liburing binding is not installed")


@pytest.fixture
def disabled_ring():
    r = L.Ring()
    assert L.io_uring_queue_init(8, r, L.IORING_SETUP_R_DISABLED) == 0
    yield r
    L.io_uring_queue_exit(r)


def test_it_can_make_a_disabled_ring_register_a_file_and_enable(disabled_ring, tmp_path):
    path = tmp_path / "dev"
    path.write_bytes(bytes(4096))
    fd = os.open(path, os.O_RDWR)
    try:
        assert L.io_uring_register_files(disabled_ring, L.FileIndex([fd])) == 0
        assert L.io_uring_enable_rings(disabled_ring) == 0
    finally:
        os.close(fd)


def test_it_cannot_restrict_a_ring(disabled_ring):
    # Restriction has neither constructor arguments nor fields: there is no
    # way to say which opcodes and flags are allowed.
    with pytest.raises(OSError) as e:
        L.io_uring_register_restrictions(disabled_ring, L.Restriction())
    assert e.value.errno == errno.EINVAL


def test_it_cannot_hand_a_ring_to_another_process():
    # The worker maps the grant ring from its fd and io_uring_params. The
    # binding exposes no params (Param wraps a NULL pointer) and cannot
    # adopt a ring someone else created (ring_fd is read-only).
    with pytest.raises(RuntimeError, match="not initialized"):
        _ = L.Param().sq_entries
    with pytest.raises(AttributeError, match="not writable"):
        L.Ring().ring_fd = 3


@pytest.mark.parametrize("tags", [[1], 1, (ctypes.c_uint64 * 1)(1), None])
def test_it_cannot_update_a_buffer_with_a_tag(disabled_ring, tags):
    # (ring, iovecs, offset, tags, nr): no type of `tags` is accepted.
    with pytest.raises(TypeError, match="Invalid type for argument: tags"):
        L.io_uring_register_buffers_update_tag(disabled_ring, L.Iovec([bytearray(4096)]), 0,
                                               tags, 1)
