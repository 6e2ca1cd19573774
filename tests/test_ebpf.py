"""The eBPF monitor end to end: offsets from BTF, enforcement of the I/O
task table against a misbehaving worker, and the histogram format."""
import json
import os
import re
import struct
import subprocess
import sys

import pytest
from channel_env import BrokerProc, brokers_made, expect_killed, granted_rings, wait_until

from drb_uring.channel.client import Channel
from drb_uring.enforce import _task, btf, tasks
from drb_uring.enforce.tasks import OP_READ_FIXED
from drb_uring.ring import layout as L
from drb_uring.tools import _load, hist

GEO = L.Geometry(sq_entries=64, cq_entries=128, slot_size=64 * 1024, slot_count=16)
EXTENT = 64 << 20
SLOT = GEO.slot_size


def _bpftool_members(struct_name: str) -> dict[str, int]:
    out = subprocess.run(["bpftool", "btf", "dump", "file", btf.VMLINUX], check=True,
                         capture_output=True, text=True).stdout
    m = re.search(rf"^\[\d+\] STRUCT '{struct_name}' size=\d+ vlen=\d+\n((?:\t.*\n)+)",
                  out, re.M)
    assert m, struct_name
    return {name: int(bits) // 8 for name, bits in
            re.findall(r"'(\w+)' type_id=\d+ bits_offset=(\d+)", m.group(1))}


def test_btf_offsets_match_bpftool():
    b = btf.BTF.load()
    rw = _bpftool_members("io_rw")
    kiocb = _bpftool_members("kiocb")
    req = _bpftool_members("io_kiocb")
    assert b.offset("io_rw", "addr") == rw["addr"]
    assert b.offset("io_rw", "len") == rw["len"]
    assert b.offset("io_rw", "kiocb.ki_pos") == rw["kiocb"] + kiocb["ki_pos"]
    assert b.offset("io_kiocb", "buf_index") == req["buf_index"]
    assert b.offset("io_kiocb", "opcode") == req["opcode"]
    offs = btf.monitor_offsets(b)
    assert offs["OFF_RW_POS"] == kiocb["ki_pos"]


def test_btf_missing_member_is_named():
    with pytest.raises(btf.BTFError, match="struct io_rw has no member nosuch"):
        btf.BTF.load().offset("io_rw", "nosuch")
    with pytest.raises(btf.BTFError, match="struct no_such_struct is not in"):
        btf.BTF.load().offset("no_such_struct", "x")


def test_histogram_matches_bpftrace_line_for_line():
    values = [-3, 0, 1, 1, 5, 1500, 3000000, 700, 64, 65]
    prog = "BEGIN { " + " ".join(f"@x = hist({v});" for v in values) + " exit(); }"
    out = subprocess.run(["bpftrace", "-e", prog], capture_output=True, text=True,
                         timeout=60).stdout
    theirs = out[out.index("@x: "):]
    theirs = theirs[:theirs.index("\n\n") + 2]
    assert hist.format_hist("x", hist.counts(values)) == theirs


@pytest.fixture
def misbehaving(tmp_path, no_fd_leak):
    with brokers_made(tmp_path) as started:
        yield lambda mode: started(rogue=mode)


def _expect_kill(m, ch, call, reason):
    expect_killed(ch, call, reason)
    assert wait_until(lambda: f"VIOLATION channel 1: {reason}" in m.log_text()), m.log_text()


@pytest.mark.parametrize("mode, reason", [
    ("read-untasked", "no active task for the slot"),
    ("cross-slot", "buffer outside the task's slot"),
])
def test_worker_reaching_another_slot_is_killed_before_the_read(misbehaving, mode, reason):
    m = misbehaving(mode)
    with open(m.backing, "r+b") as f:
        f.write(b"F" * SLOT)                        # what the read would bring in
    with Channel(m.sock_path, EXTENT, geometry=GEO) as ch:
        assert ch.monitored
        ch.pool[SLOT:2 * SLOT] = b"P" * SLOT         # slot 1, the target
        _expect_kill(m, ch, lambda: ch.pread(0, 4096), reason)
        assert bytes(ch.pool[SLOT:2 * SLOT]) == b"P" * SLOT


def test_worker_writing_beyond_the_extent_is_killed_before_the_write(misbehaving):
    m = misbehaving("beyond-extent")
    with Channel(m.sock_path, EXTENT, geometry=GEO) as ch:
        _expect_kill(m, ch, lambda: ch.pwrite(0, b"W" * 4096),
                     "device range outside the channel's extent")
    with open(m.backing, "rb") as f:
        assert f.read(4096) == bytes(4096)
        f.seek(EXTENT)
        assert f.read(4096) == bytes(4096)


def test_worker_register_call_is_killed(misbehaving):
    m = misbehaving("register")
    with Channel(m.sock_path, EXTENT, geometry=GEO) as ch:
        _expect_kill(m, ch, lambda: ch.pread(0, 10), "io_uring_register on a grant ring")


def test_a_million_good_requests_no_violation(tmp_path, no_fd_leak):
    m = BrokerProc(tmp_path)
    try:
        with Channel(m.sock_path, EXTENT, geometry=GEO) as ch:
            assert ch.monitored
            done = 0
            while done < 1_000_000:
                r = _load.run(ch.end, OP_READ_FIXED, 4096, 16, 0.5,
                                                EXTENT, True, done + 1, 1)
                assert r["error"] is None and r["errors"] == 0
                done += r["done"]
            ch.pwrite(0, b"still alive")
            assert ch.pread(0, 11) == b"still alive"
        assert "VIOLATION" not in m.log_text()
    finally:
        m.stop()


def test_cleared_task_is_revoked(tmp_path, no_fd_leak):
    """After a response is reaped its task is inactive: the table says so."""
    m = BrokerProc(tmp_path)
    try:
        with Channel(m.sock_path, EXTENT, geometry=GEO) as ch:
            req = ch.submit_read(8192, 100)
            seq, state, op, length, off, post = struct.unpack_from("<IIIIQQ", ch.tasks, 0)
            assert (state, op, length, off) == (1, OP_READ_FIXED, 100, 8192)
            assert seq % 2 == 0 and post > 0
            req.result()
            seq2, state2 = struct.unpack_from("<II", ch.tasks, 0)
            assert state2 == 0 and seq2 == seq + 2
    finally:
        m.stop()


def test_task_contract_has_one_definition():
    """bpf/drb_task.h is the only definition: the compiled module's values
    (which Python uses) are the header's, and the program includes it."""
    from drb_uring import bpf
    h = (bpf.DIR / "drb_task.h").read_text()
    body = h[h.index("struct drb_task {"):h.index("};", h.index("struct drb_task {"))]
    fields = re.findall(r"^\s+drb_u(32|64) (\w+);", body, re.M)
    assert [f for _, f in fields] == list(_task.FIELD_OFFSETS)
    assert tasks.ENTRY_SIZE == sum(int(b) // 8 for b, _ in fields) == 48
    offs = [_task.FIELD_OFFSETS[f] for _, f in fields]
    assert offs == sorted(offs) and offs[0] == 0
    assert _task.STATUS_ENTRY == tasks.MAX_SLOTS + _task.EXTRA_ENTRIES - 1
    for name, value in re.findall(r"^#define (DRB_\w+) (\d+)", h, re.M):
        key = name.removeprefix("DRB_")
        expect = {"TASK_VERSION": tasks.VERSION, "MAX_SLOTS": tasks.MAX_SLOTS,
                  "TASK_EXTRA": _task.EXTRA_ENTRIES, "HIST_BUCKETS": tasks.HIST_BUCKETS,
                  "TASK_ACTIVE": tasks.ACTIVE, "OP_FSYNC": tasks.OP_FSYNC,
                  "OP_READ_FIXED": tasks.OP_READ_FIXED,
                  "OP_WRITE_FIXED": tasks.OP_WRITE_FIXED}[key]
        assert int(value) == expect, name
    codes = dict(re.findall(r"^\s+DRB_R_(\w+) = (\d+),", h, re.M))
    assert {k.lower(): int(v) for k, v in codes.items()
            if k not in ("NONE", "COUNT")} == _task.REASON_CODES
    assert set(tasks.REASONS) == set(range(1, _task.REASON_COUNT))
    src = (bpf.DIR / "monitor.c").read_text()
    assert '#include "drb_task.h"' in src and "struct drb_task {" not in src
    from drb_uring.ring import layout
    assert layout.LIMITS["slot_count"] == (1, tasks.MAX_SLOTS)


def test_histogram_buckets_are_the_headers():
    for v in (0, 1, 2, 3, 4, 7, 8, 1023, 1024, 2**40, 2**64 - 1):
        assert hist.bucket(v) == tasks.log2_bucket(v) == (1 if v == 0 else v.bit_length() + 1)
    assert hist.bucket(-5) == 0


def test_trace_ebpf_prints_the_program_with_btf_flags():
    drb = os.path.join(os.path.dirname(sys.executable), "drb")
    out = subprocess.run([drb, "trace", "--ebpf"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    flags = out.splitlines()[0]
    offs = btf.monitor_offsets()
    assert f"-DOFF_RW_POS={offs['OFF_RW_POS']}" in flags
    assert "RAW_TRACEPOINT_PROBE(io_uring_submit_req)" in out


def _removals() -> int:
    """The service's count of grants it removed (grants_gen[0])."""
    out = subprocess.run(["bpftool", "map", "lookup", "name", "grants_gen", "key", "0", "0", "0",
                          "0", "-j"], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["formatted"]["value"]


def test_a_ring_at_a_reused_address_is_checked_against_its_own_table(tmp_path, no_fd_leak):
    """Each CPU caches its last ring -> grant; a ring that loses its grant
    (ungranted, or its address taken by a new ring) must never be found
    through a stale entry. The kernel hands a new ring the address of one
    just freed, so channels opened one after another on one broker reuse
    ring addresses: each must be checked against its own task table, so
    every read succeeds and nothing is killed. Rows are reused as addresses
    are (both last-freed first), so a stale entry could still name the
    right row by luck: the service's count of removals, which makes every
    cached entry stale, must also have grown by one per channel."""
    m = BrokerProc(tmp_path)
    seen: list[int] = []
    try:
        with Channel(m.sock_path, EXTENT, geometry=GEO) as ch:
            assert ch.monitored                   # the service and its maps are up
        assert wait_until(lambda: not granted_rings(), timeout=10)
        before = _removals()
        for k in range(40):
            with Channel(m.sock_path, EXTENT, geometry=GEO) as ch:
                assert ch.monitored
                ch.pwrite(4096 * k, b"channel %02d" % k)
                assert ch.pread(4096 * k, 10) == b"channel %02d" % k
                seen += sorted(granted_rings())
            assert wait_until(lambda: not granted_rings(), timeout=10)
        assert "VIOLATION" not in m.log_text()
        assert _removals() - before == 40
    finally:
        m.stop()
    if len(set(seen)) == len(seen):
        pytest.skip(f"the kernel gave {len(seen)} grant rings {len(seen)} different "
                    "addresses: no reuse to check")
