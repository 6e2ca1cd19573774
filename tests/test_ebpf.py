"""The eBPF monitor end to end: offsets from BTF, enforcement of the I/O
task table against a misbehaving worker, and the histogram format."""
import os
import re
import struct
import subprocess
import sys

import pytest
from channel_env import MonitorProc, wait_until

from drb_uring import _ringbench, btf, hist
from drb_uring import layout as L
from drb_uring.frontend import Channel, ChannelFailed
from drb_uring.layout import OP_READ_FIXED

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
    made = []

    def start(mode: int) -> MonitorProc:
        m = MonitorProc(tmp_path, env={"DRB_WORKER_MISBEHAVE": str(mode)})
        made.append(m)
        return m
    yield start
    for m in made:
        m.stop()
        assert wait_until(lambda m=m: not m.workers())


def _expect_kill(m, ch, call, reason):
    pid = ch.worker_pid
    with pytest.raises(ChannelFailed) as e:
        call()
    assert f"monitor killed backend worker {pid}: {reason}" in str(e.value)
    assert wait_until(lambda: not os.path.exists(f"/proc/{pid}"))
    assert wait_until(lambda: f"VIOLATION channel 1: {reason}" in m.log_text()), m.log_text()


@pytest.mark.parametrize("mode, reason", [
    (1, "no active task for the slot"),
    (2, "buffer outside the task's slot"),
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
    m = misbehaving(3)
    with Channel(m.sock_path, EXTENT, geometry=GEO) as ch:
        _expect_kill(m, ch, lambda: ch.pwrite(0, b"W" * 4096),
                     "device range outside the channel's extent")
    with open(m.backing, "rb") as f:
        assert f.read(4096) == bytes(4096)
        f.seek(EXTENT)
        assert f.read(4096) == bytes(4096)


def test_worker_register_call_is_killed(misbehaving):
    m = misbehaving(4)
    with Channel(m.sock_path, EXTENT, geometry=GEO) as ch:
        _expect_kill(m, ch, lambda: ch.pread(0, 10), "io_uring_register on a grant ring")


def test_a_million_good_requests_no_violation(tmp_path, no_fd_leak):
    m = MonitorProc(tmp_path)
    try:
        with Channel(m.sock_path, EXTENT, geometry=GEO) as ch:
            assert ch.monitored
            done = 0
            while done < 1_000_000:
                r = _ringbench.channel_workload(ch.end, OP_READ_FIXED, 4096, 16, 0.5,
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
    m = MonitorProc(tmp_path)
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


def test_task_entry_layout_matches_the_program():
    # The same layout in three places: the C program, Cython, Python.
    from drb_uring import ebpf, frontend
    src = (ebpf.BPF_DIR / "monitor.c").read_text()
    struct_c = src[src.index("struct drb_task {"):src.index("};", src.index("struct drb_task {"))]
    fields = re.findall(r"^\s+(u32|u64) (\w+);", struct_c, re.M)
    assert [f for _, f in fields] == ["seq", "state", "op", "len", "offset", "post_ns",
                                      "submit_ns"]
    assert ebpf.TASK.format == "<IIIIQQQ" and ebpf.TASK.size == 40
    assert frontend.TASK_VERSION == ebpf.TASK_VERSION == 1


def test_trace_ebpf_prints_the_program_with_btf_flags():
    drb = os.path.join(os.path.dirname(sys.executable), "drb")
    out = subprocess.run([drb, "trace", "--ebpf"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    flags = out.splitlines()[0]
    offs = btf.monitor_offsets()
    assert f"-DOFF_RW_POS={offs['OFF_RW_POS']}" in flags
    assert "RAW_TRACEPOINT_PROBE(io_uring_submit_req)" in out
