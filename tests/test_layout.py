"""The shared layout against the kernel's ABI and its own rules."""
import fcntl
import os
import subprocess

import pytest

from drb_uring import ring
from drb_uring.ring import layout as L

UAPI_PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/io_uring.h>
#define F(s, f) printf(#s " " #f " %zu\n", offsetof(struct s, f))
int main(void) {
    printf("size io_uring_sqe %zu\n", sizeof(struct io_uring_sqe));
    printf("size io_uring_cqe %zu\n", sizeof(struct io_uring_cqe));
    F(io_uring_sqe, opcode); F(io_uring_sqe, flags); F(io_uring_sqe, ioprio);
    F(io_uring_sqe, fd); F(io_uring_sqe, off); F(io_uring_sqe, addr);
    F(io_uring_sqe, len); F(io_uring_sqe, rw_flags); F(io_uring_sqe, user_data);
    F(io_uring_sqe, buf_index); F(io_uring_sqe, personality);
    F(io_uring_sqe, file_index); F(io_uring_sqe, addr3);
    F(io_uring_cqe, user_data); F(io_uring_cqe, res); F(io_uring_cqe, flags);
    return 0;
}
"""


@pytest.fixture(scope="module")
def uapi(tmp_path_factory):
    """Sizes and offsets as the kernel's uapi header defines them."""
    d = tmp_path_factory.mktemp("uapi")
    (d / "probe.c").write_text(UAPI_PROBE)
    subprocess.run(["cc", "-o", str(d / "probe"), str(d / "probe.c")], check=True)
    out = subprocess.run([str(d / "probe")], check=True, capture_output=True, text=True).stdout
    # Lines are "size STRUCT N" or "STRUCT FIELD OFFSET".
    return {(a, b): int(n) for a, b, n in (line.split() for line in out.splitlines())}


def test_entry_sizes_match_kernel(uapi):
    assert uapi[("size", "io_uring_sqe")] == 64 == L.SQE_SIZE == L.SQE.size
    assert uapi[("size", "io_uring_cqe")] == 16 == L.CQE_SIZE == L.CQE.size


def test_sqe_field_offsets_match_kernel(uapi):
    ours = L.field_offsets(L.SQE, L.SQE_FIELDS)
    for field in ("opcode", "flags", "ioprio", "fd", "off", "addr", "len", "rw_flags",
                  "user_data", "buf_index", "personality", "file_index", "addr3"):
        assert ours[field] == uapi[("io_uring_sqe", field)], field


def test_cqe_field_offsets_match_kernel(uapi):
    ours = L.field_offsets(L.CQE, L.CQE_FIELDS)
    for field in L.CQE_FIELDS:
        assert ours[field] == uapi[("io_uring_cqe", field)], field


def test_layout_literals():
    # The index words each own a cache line and never share one.
    offs = [L.OFF_SQ_TAIL, L.OFF_CQ_HEAD, L.OFF_USER_FLAGS]
    assert offs == [128, 192, 256]
    assert [L.OFF_SQ_HEAD, L.OFF_CQ_TAIL, L.OFF_DRIVER_FLAGS] == [128, 192, 256]
    assert L.OFF_ENTRIES == 4096 and L.HEADER.size == 72
    g = L.Geometry(sq_entries=256, cq_entries=512, slot_size=65536, slot_count=64)
    assert g.ctl_user_size == 4096 + 256 * 64
    assert g.ctl_driver_size == 4096 + 8192
    assert g.pool_size == 4 << 20


@pytest.mark.parametrize("kw, words", [
    ({"sq_entries": 3}, "sq_entries must be a power of two"),
    ({"sq_entries": 1 << 16, "cq_entries": 1 << 16}, "sq_entries must be in"),
    ({"slot_size": 512}, "slot_size must be in"),
    ({"sq_entries": 64, "cq_entries": 32}, "cq_entries (32) must be >= sq_entries (64)"),
    ({"features": 0x3}, "unsupported feature bits 0x2"),
    ({"slot_count": 0}, "slot_count must be a power of two"),
])
def test_geometry_refuses(kw, words):
    with pytest.raises(L.LayoutError) as e:
        L.Geometry(**kw)
    assert words in str(e.value)


def test_header_round_trip():
    g = L.Geometry(sq_entries=32, cq_entries=64, slot_size=8192, slot_count=4)
    assert L.decode_header(g.header(L.MAGIC_USER), L.MAGIC_USER) == g


def _patched(raw: bytes, offset: int, value: bytes) -> bytes:
    return raw[:offset] + value + raw[offset + len(value):]


@pytest.mark.parametrize("offset, value, words", [
    (0, b"NOTARING", "bad magic"),
    (8, (2).to_bytes(4, "little"), "unsupported layout version 2"),
    (16, (128).to_bytes(4, "little"), "sqe_size 128"),
    (24, (7).to_bytes(4, "little"), "sq_entries must be a power of two"),
    (64, (1).to_bytes(8, "little"), "pool_size 1 does not match"),
])
def test_bad_header_is_named(offset, value, words):
    raw = _patched(L.Geometry().header(L.MAGIC_USER), offset, value)
    with pytest.raises(L.LayoutError) as e:
        L.decode_header(raw, L.MAGIC_USER)
    assert words in str(e.value)


def test_truncated_header():
    with pytest.raises(L.LayoutError, match="header truncated: 10 of 72"):
        L.decode_header(b"x" * 10, L.MAGIC_USER)


# ---- the same checks on real memfds, through attach() --------------------

def _fresh():
    return ring.create(L.Geometry(sq_entries=8, cq_entries=8, slot_size=4096, slot_count=2))


def _swap(peer, name, fd):
    os.close(getattr(peer, name))
    setattr(peer, name, fd)


def _sealed_memfd(size: int, header: bytes) -> int:
    """A memfd that passes every check but the one a test breaks."""
    fd = os.memfd_create("fake", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    os.pwrite(fd, header, 0)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


def _unsealed_memfd(size: int) -> int:
    fd = os.memfd_create("unsealed")
    os.ftruncate(fd, size)
    return fd


def _pipe_read_end() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


@pytest.mark.parametrize("field, make, words", [
    ("ctl_user", lambda g: _sealed_memfd(4096, g.header(L.MAGIC_USER)),
     r"ctl_user memfd too small: 4096 bytes, layout needs 8192"),
    ("ctl_user", lambda g: _sealed_memfd(g.ctl_user_size, g.header(b"DRBRINGX")),
     r"bad magic b'DRBRINGX'"),
    ("pool", lambda g: _unsealed_memfd(g.pool_size),
     r"pool memfd is not sealed against shrinking"),
    ("user_efd", lambda g: _pipe_read_end(),
     r"user_efd: fd \d+ is 'pipe:\[\d+\]', not an eventfd"),
])
def test_attach_refuses_a_bad_fd(no_fd_leak, field, make, words):
    u, peer = _fresh()
    with u:
        _swap(peer, field, make(u.geometry))
        with pytest.raises(L.LayoutError, match=words):
            ring.attach(peer)


def test_attach_refuses_swapped_fds(no_fd_leak):
    u, peer = _fresh()
    with u:
        peer.ctl_user, peer.ctl_driver = peer.ctl_driver, peer.ctl_user
        with pytest.raises(L.LayoutError, match="bad magic b'DRBRINGD', expected b'DRBRINGU'"):
            ring.attach(peer)


def test_peer_fd_count_checked():
    with pytest.raises(ValueError, match="a ring needs 5 file descriptors, got 2"):
        ring.PeerFds.from_list([1, 2])
