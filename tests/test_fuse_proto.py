"""The disk's FUSE wire structs and constants against the literal values of
the kernel's header (include/uapi/linux/fuse.h, protocol 7.45), and the
backend contract on LocalFile, one request at a time. No mount here."""
import errno
import os

import pytest

from drb_uring.disk import _backend, _fuseloop, fuse

# sizeof() and offsetof() as fuse_kernel.h 7.45 lays the structs out.
LITERAL = {
    "fuse_in_header": (40, {"len": 0, "opcode": 4, "unique": 8, "nodeid": 16, "uid": 24,
                            "gid": 28, "pid": 32, "total_extlen": 36}),
    "fuse_out_header": (16, {"len": 0, "error": 4, "unique": 8}),
    "fuse_init_in": (64, {"max_readahead": 8, "flags": 12, "flags2": 16}),
    "fuse_init_out": (64, {"flags": 12, "max_background": 16, "congestion_threshold": 18,
                           "max_write": 20, "time_gran": 24, "max_pages": 28, "flags2": 32,
                           "max_stack_depth": 36, "request_timeout": 40}),
    "fuse_attr": (88, {"size": 8, "atimensec": 48, "mode": 60, "uid": 68, "blksize": 80,
                       "flags": 84}),
    "fuse_attr_out": (104, {"attr": 16}),
    "fuse_entry_out": (128, {"attr": 40}),
    "fuse_setattr_in": (88, {"size": 16, "mode": 68, "uid": 76, "gid": 80}),
    "fuse_getattr_in": (16, {}),
    "fuse_open_in": (8, {}),
    "fuse_open_out": (16, {}),
    "fuse_release_in": (24, {}),
    "fuse_flush_in": (24, {}),
    "fuse_read_in": (40, {"offset": 8, "size": 16, "flags": 32}),
    "fuse_write_in": (40, {"offset": 8, "size": 16, "write_flags": 20, "flags": 32}),
    "fuse_write_out": (8, {}),
    "fuse_kstatfs": (80, {"bsize": 40}),
    "fuse_statfs_out": (80, {}),
    "fuse_fsync_in": (16, {}),
    "fuse_access_in": (8, {}),
    "fuse_interrupt_in": (8, {}),
    "fuse_forget_in": (8, {}),
    "fuse_batch_forget_in": (8, {}),
    "fuse_fallocate_in": (32, {"mode": 24}),
    "fuse_uring_ent_in_out": (32, {"commit_id": 8, "payload_sz": 16}),
    "fuse_uring_req_header": (288, {"op_in": 128, "ring_ent_in_out": 256}),
    "fuse_uring_cmd_req": (24, {"commit_id": 8, "qid": 16}),
}


@pytest.mark.parametrize("name", sorted(LITERAL))
def test_struct_layout_is_the_kernels(name):
    size, fields = LITERAL[name]
    got_size, got_fields = fuse.LAYOUT[name]
    assert got_size == size
    for field, off in fields.items():
        assert got_fields[field] == off, field


def test_every_struct_is_checked():
    assert set(fuse.LAYOUT) == set(LITERAL)


def test_constants_are_the_kernels():
    c = fuse.CONSTANTS
    assert (c["FUSE_KERNEL_VERSION"], c["FUSE_KERNEL_MINOR_VERSION"]) == (7, 45)
    assert {k: c[k] for k in ("FUSE_LOOKUP", "FUSE_FORGET", "FUSE_GETATTR", "FUSE_SETATTR",
                              "FUSE_OPEN", "FUSE_READ", "FUSE_WRITE", "FUSE_STATFS",
                              "FUSE_RELEASE", "FUSE_FSYNC", "FUSE_FLUSH", "FUSE_INIT",
                              "FUSE_ACCESS", "FUSE_INTERRUPT", "FUSE_DESTROY",
                              "FUSE_BATCH_FORGET", "FUSE_FALLOCATE")} == {
        "FUSE_LOOKUP": 1, "FUSE_FORGET": 2, "FUSE_GETATTR": 3, "FUSE_SETATTR": 4,
        "FUSE_OPEN": 14, "FUSE_READ": 15, "FUSE_WRITE": 16, "FUSE_STATFS": 17,
        "FUSE_RELEASE": 18, "FUSE_FSYNC": 20, "FUSE_FLUSH": 25, "FUSE_INIT": 26,
        "FUSE_ACCESS": 34, "FUSE_INTERRUPT": 36, "FUSE_DESTROY": 38,
        "FUSE_BATCH_FORGET": 42, "FUSE_FALLOCATE": 43}
    assert c["FUSE_NOTIFY_RESEND"] == 7
    assert c["FUSE_ASYNC_READ"] == 1 << 0
    assert c["FUSE_ATOMIC_O_TRUNC"] == 1 << 3
    assert c["FUSE_BIG_WRITES"] == 1 << 5
    assert c["FUSE_ASYNC_DIO"] == 1 << 15
    assert c["FUSE_PARALLEL_DIROPS"] == 1 << 18
    assert c["FUSE_ABORT_ERROR"] == 1 << 21
    assert c["FUSE_MAX_PAGES"] == 1 << 22
    assert c["FUSE_INIT_EXT"] == 1 << 30
    assert c["FUSE_HAS_RESEND"] == 1 << 39
    assert c["FUSE_OVER_IO_URING"] == 1 << 41
    assert c["FUSE_UNIQUE_RESEND"] == 1 << 63
    assert c["FOPEN_DIRECT_IO"] == 1 << 0
    assert c["FOPEN_KEEP_CACHE"] == 1 << 1
    assert c["FOPEN_PARALLEL_DIRECT_WRITES"] == 1 << 6
    assert (c["FATTR_SIZE"], c["FATTR_FH"]) == (1 << 3, 1 << 6)
    assert (c["FUSE_IO_URING_CMD_REGISTER"], c["FUSE_IO_URING_CMD_COMMIT_AND_FETCH"]) == (1, 2)
    # A WRITE's payload starts right after the header area the loop reads into.
    assert c["HDR"] == LITERAL["fuse_in_header"][0] + LITERAL["fuse_write_in"][0]
    assert c["HDR_WORDS"] * 8 == c["HDR"]


def test_opcode_names():
    assert fuse.opcode_name(16) == "FUSE_WRITE"
    assert fuse.opcode_name(9999) == "opcode 9999"


@pytest.fixture
def local(tmp_path):
    path = tmp_path / "backing"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    be = _backend.LocalFile(str(path), slot_size=64 << 10, slot_count=4)
    try:
        yield be, path, data
    finally:
        be.close()


def test_local_file_reads_writes_and_flushes(local):
    be, path, data = local
    assert (be.slot_size, be.slot_count, be.size) == (64 << 10, 4, 1 << 20)
    assert be.ops == {"read", "write", "fsync", "fallocate"}
    assert be.call("read", 2, 4096, 8192) == 8192
    assert bytes(be.slot(2)[:8192]) == data[4096:12288]
    be.slot(1)[:4096] = b"\xab" * 4096
    assert be.call("write", 1, 65536, 4096) == 4096
    assert be.call("fsync", _backend.NO_SLOT, 0, 0, _backend.F_DATASYNC) == 0
    assert path.read_bytes()[65536:69632] == b"\xab" * 4096
    # At the end of the file a read is short, as pread() is.
    assert be.call("read", 0, (1 << 20) - 100, 4096) == 100


def test_local_file_punches_holes(local):
    be, path, _ = local
    falloc_keep_size_punch_hole = 0x01 | 0x02
    assert be.call("fallocate", _backend.NO_SLOT, 8192, 8192, falloc_keep_size_punch_hole) == 0
    got = path.read_bytes()
    assert got[8192:16384] == bytes(8192) and len(got) == 1 << 20


def test_local_file_refuses_what_is_outside_its_pool(local):
    be, _, _ = local
    with pytest.raises(OSError) as e:
        be.call("read", 4, 0, 4096)           # no slot 4
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        be.call("read", 0, 0, (64 << 10) + 1)  # more than a slot
    assert e.value.errno == errno.EINVAL
    with pytest.raises(IndexError):
        be.slot(4)


def test_local_file_refuses_a_size_beyond_the_file(tmp_path):
    (tmp_path / "b").write_bytes(b"x" * 4096)
    with pytest.raises(ValueError):
        _backend.LocalFile(str(tmp_path / "b"), size=8192)
    with pytest.raises(ValueError):
        _backend.LocalFile(str(tmp_path / "b"), slot_size=1000)


def test_server_limits_must_fit_the_pool(local):
    be, _, _ = local
    # 1 MiB writes need 16 slots of 64 KiB; this pool has 4.
    with pytest.raises(ValueError):
        _fuseloop.FuseServer(-1, be, max_write=1 << 20)
    with pytest.raises(ValueError):
        _fuseloop.FuseServer(-1, be, max_write=5000)
    s = _fuseloop.FuseServer(-1, be, max_write=128 << 10)
    assert (s.k, s.max_write, s.size) == (2, 128 << 10, 1 << 20)
