"""The evaluation's parts, for real: every transport between real domains
moves the right bytes; the per-I/O counters agree with a hand count; the
report turns a stored result into a table and plots that decode."""
import hashlib
import json
import os
import shutil
import subprocess

import pytest
from pair_env import DRB, leftovers, wait_gone

from drb_uring.enforce.client import EnforceClient
from drb_uring.tools import bench, benchpair, report

DATA = os.path.join(os.path.dirname(__file__), "data", "bench-quick.json")


@pytest.fixture(scope="module")
def device():
    path = bench.data_file(bench.EXTENT, lambda _: None)
    bench.warm(path)
    return path


@pytest.fixture(scope="module")
def pairs(device, tmp_path_factory):
    """The pairs drb bench makes: the drb pair (also the baselines'
    domains), the polling one and the direct one; torn down after,
    leaving nothing."""
    enforcer = EnforceClient()
    made = {}
    log = os.open(tmp_path_factory.mktemp("bench") / "cells.log",
                  os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for key in (("drb", True), ("drb-poll", True), ("direct", True)):
            made[key] = bench.BenchPair(key, device, enforcer, None)
        yield made, log
    finally:
        for p in made.values():
            p.close()
        enforcer.close()
        os.close(log)
    prefix = f"bench-{os.getpid()}-"
    assert wait_gone(lambda: not leftovers(prefix)), leftovers(prefix)


def _cell(pairs, device, transport, op="randread", bs=4096, qd=8, seconds=0.3):
    made, log = pairs
    cell = bench.Cell(transport, op, bs, qd)
    return bench.run_cell(made[benchpair.pair_key(cell)], cell, device, seconds, log)


def _sha_at(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        return hashlib.sha256(f.read(n)).hexdigest()


@pytest.mark.parametrize("transport", bench.TRANSPORTS)
def test_every_transport_moves_the_right_bytes(pairs, device, transport):
    r = _cell(pairs, device, transport)
    v = r["integrity"]
    assert len(v["read_offsets"]) == 8 and v["bs"] == 4096
    # Read through the transport in one batch: what the device file holds.
    for off, got in zip(v["read_offsets"], v["read_sha256"], strict=True):
        assert got == _sha_at(device, off, 4096), off
    # Written through it: on the device, and read back the same.
    for off, want in zip(v["write_offsets"], v["write_sha256"], strict=True):
        assert _sha_at(device, off, 4096) == want, off
    assert v["read_back_ok"]
    assert r["ios"] > 0


def test_the_check_fails_on_other_bytes(pairs, device, tmp_path):
    r = _cell(pairs, device, "socket", qd=4)
    other = tmp_path / "other.img"
    other.write_bytes(os.urandom(bench.EXTENT >> 4) + bytes(bench.EXTENT - (bench.EXTENT >> 4)))
    with pytest.raises(bench.BenchError, match="integrity check failed"):
        benchpair.check_bytes(str(other), r["integrity"], "socket")


def test_per_io_counters_agree_with_a_hand_count(pairs, device):
    # grant-map at depth 1: per request exactly one mmap, one pread and one
    # munmap in the driver domain, and none in the user domain.
    g = _cell(pairs, device, "grant-map", qd=1)
    n, drv, usr = g["counted"]["ios"], g["counted"]["driver"], g["counted"]["user"]
    assert n > 100
    assert drv["mmap"] == n and drv["munmap"] == n and drv["pread64"] == n
    assert usr["mmap"] == 0 and usr["munmap"] == 0 and usr["pread64"] == 0
    assert g["per_io"]["map_ops"] == 2.0
    # drb: no mapping call on either side, no pread (the I/O is io_uring's).
    d = _cell(pairs, device, "drb", qd=32)
    for side in ("user", "driver"):
        c = d["counted"][side]
        assert c["mmap"] == 0 and c["munmap"] == 0 and c["pread64"] == 0, (side, c)
    assert d["per_io"]["map_ops"] == 0.0
    # direct: no driver side at all.
    x = _cell(pairs, device, "direct", qd=32)
    assert x["counted"]["driver"]["syscalls"] == 0 and x["counted"]["user"]["syscalls"] > 0


def _png_ok(path):
    import matplotlib.image as mpimg
    img = mpimg.imread(path)                       # decodes, or raises
    h, w = img.shape[:2]
    assert h >= 300 and w >= 500
    flat = img.reshape(-1, img.shape[2])[:, :3]
    colours = {tuple((px * 255).astype(int)) for px in flat[::97]}
    assert len(colours) > 8, f"{path} looks blank"


def test_report_from_a_stored_result(tmp_path):
    out = tmp_path / "rep"
    proc = subprocess.run([DRB, "report", DATA, "--out", str(out)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text()
    rep = json.load(open(DATA))
    # The paper-style table: each transport a column, the ratios last.
    header = next(line for line in md.splitlines() if line.startswith("| metric |"))
    assert header.split("|")[2:-1] == [" drb ", " drb-poll ", " grant-map ", " socket ",
                                       " direct ", " drb / grant-map ", " drb / direct "]
    qd1 = {r["transport"]: r for r in rep["runs"] if (r["op"], r["bs"], r["qd"],
                                                       r["monitor"]) == ("randread", 4096, 1,
                                                                         True)}
    ratio = round(qd1["drb"]["iops"] / qd1["grant-map"]["iops"], 3)
    row = next(line for line in md.splitlines() if line.startswith("| 4k randread qd1 IOPS"))
    assert f"{ratio:.3f}" in row
    assert "| mmap + munmap per I/O, grant-map | 2 | 2.000 | yes |" in md
    assert "@usecs_drb_randread_4k_qd1:" in md            # the histograms
    for name in report.PLOTS:
        assert f"![{name}]({name})" in md
        _png_ok(out / name)
    assert "16 user domains" in proc.stdout


def test_report_refuses_what_is_not_a_result(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"runs": []}')
    proc = subprocess.run([DRB, "report", str(bad), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "is not a drb bench result" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_fio_reference_runs_on_the_same_file(device):
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed (make setup installs it)")
    # fio ran and its JSON was read: real counts and ordered percentiles.
    r = bench.fio_cell(device, "randread", 4096, 4, 1, None)
    assert r["iops"] > 0 and r["mb_s"] > 0
    assert 0 < r["lat_us"]["p50"] <= r["lat_us"]["p99"]


IO_URING_ENTER = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
r = libc.syscall(426, -1, 0, 0, 0, 0, 0)          # io_uring_enter on no ring
print(r, os.strerror(ctypes.get_errno()))
"""


def test_only_the_direct_pair_lets_the_user_domain_enter_a_ring(pairs):
    made, _ = pairs
    out = {}
    for key in (("drb", True), ("direct", True)):
        st = made[key].state
        proc = subprocess.run([DRB, "exec", made[key].name, "user", "--", "python3", "-c",
                               IO_URING_ENTER], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        out[key[0]] = proc.stdout.strip()
        assert st["domains"]["user"]["pid"] > 0
    # A pair drb up makes: the call never reaches the kernel's io_uring.
    assert out["drb"] == f"-1 {os.strerror(38)}"          # ENOSYS, the profile's default
    # The direct baseline's pair: it does (and finds no ring).
    assert out["direct"] == f"-1 {os.strerror(9)}"        # EBADF


def test_the_direct_ring_does_only_fixed_io(device):
    """The ring handed to the direct pair's user domain is restricted as a
    grant ring is: through it the domain gets no socket and no open file
    that its seccomp profile refuses it."""
    import errno
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
    import rogue_worker as R

    from drb_uring.tools import baselines
    dev = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    p = baselines.plumb("direct", dev, 2, 4096, 2)
    try:
        ring = R.RawRing(p.user_fds[0], bytes.fromhex(p.user_args["params"]))
        for op, fields in ((45, dict(fd=2, off=1)),                      # IORING_OP_SOCKET
                           (18, dict(fd=-100, addr=0)),                   # IORING_OP_OPENAT
                           (22, dict(fd=0, flags=R.IOSQE_FIXED_FILE, len=1))):   # READ
            ring.submit(opcode=op, user_data=op, **fields)
            assert ring.reap() == (op, -errno.EACCES), op
        ring.close()
    finally:
        p.close()
        os.close(dev)
