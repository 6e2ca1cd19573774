"""Paired containers, as root, with real namespaces, cgroups and cgroup-BPF."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from channel_env import PRIVATE_NS, dead
from pair_env import (
    DRB,
    bpf_prog_ids,
    drb,
    in_domain,
    leftovers,
    pairs_made,
    rogue_pair,
    wait_gone,
)

from drb_uring import procs

PREFIX = "tdom"


@pytest.fixture
def clean():
    """Every test here must leave no pair state, cgroup, process, mount or
    BPF program behind; checked against the kernel's own lists."""
    progs = bpf_prog_ids()
    yield
    assert wait_gone(lambda: not leftovers(PREFIX)), leftovers(PREFIX)
    assert wait_gone(lambda: bpf_prog_ids() <= progs), bpf_prog_ids() - progs


@pytest.fixture
def pair(clean):
    with pairs_made() as up:
        yield up


def test_domains_see_neither_the_device_nor_device_nodes(pair):
    st = pair(f"{PREFIX}-a", "--size", "64m")
    backing = st["device"]
    assert os.path.exists(backing)                    # the host sees it
    code = textwrap.dedent(f"""
        import errno, os
        print(os.path.exists({backing!r}))
        for p in ("/dev/null", "/dev/vda", "/dev/loop0"):
            try:
                os.close(os.open(p, os.O_RDONLY)); print(p, "ok")
            except OSError as e:
                print(p, errno.errorcode[e.errno])
        try:
            os.mknod("/tmp/blk", 0o600 | 0o060000, os.makedev(7, 0)); print("mknod ok")
        except OSError as e:
            print("mknod", errno.errorcode[e.errno])
        print(sorted(os.listdir("/dev")))
    """)
    for role in ("user", "driver"):
        out = in_domain(st["name"], role, code).stdout.splitlines()
        # The driver domain too: it reaches the device only through its
        # workers' grant rings, which the trusted side built.
        assert out[0] == "False", (role, out)
        assert out[1:4] == ["/dev/null ok", "/dev/vda ENOENT", "/dev/loop0 ENOENT"], out
        assert out[4] == "mknod EPERM", out
        assert "vda" not in out[5] and "loop0" not in out[5]


def test_domains_are_isolated_from_each_other(pair):
    st = pair(f"{PREFIX}-b", "--size", "16m")
    code = ("import os, socket; print(socket.gethostname());"
            "print(open('/proc/1/cmdline').read().replace(chr(0), ' '));"
            "print(len([p for p in os.listdir('/proc') if p.isdigit()]))")
    u = in_domain(st["name"], "user", code).stdout.splitlines()
    d = in_domain(st["name"], "driver", code).stdout.splitlines()
    assert u[0] == f"{PREFIX}-b-user0" and d[0] == f"{PREFIX}-b-driver"
    assert "drb_uring.domains.init" in u[1] and "drb_uring.domains.init" in d[1]
    # Each sees only its own few processes (its init, and us).
    assert int(u[2]) <= 3 and int(d[2]) <= 3
    host_pids = {st["domains"]["driver"]["pid"], st["domains"]["user"]["pid"],
                 st["daemon_pid"]}
    seen = in_domain(st["name"], "user", "import os; print(' '.join(os.listdir('/proc')))"
                     ).stdout.split()
    assert not {str(p) for p in host_pids} & set(seen)


def test_user_domain_socket_policy(pair):
    st = pair(f"{PREFIX}-c", "--size", "16m")
    code = textwrap.dedent("""
        import errno, socket
        for fam, typ in ((socket.AF_INET, socket.SOCK_STREAM), (socket.AF_INET6, socket.SOCK_DGRAM),
                         (socket.AF_PACKET, socket.SOCK_RAW), (socket.AF_UNIX, socket.SOCK_STREAM)):
            try:
                socket.socket(fam, typ).close(); print(fam.name, "ok")
            except OSError as e:
                print(fam.name, errno.errorcode[e.errno])
    """)
    assert in_domain(st["name"], "user", code).stdout.split() == [
        "AF_INET", "EPERM", "AF_INET6", "EPERM", "AF_PACKET", "EPERM", "AF_UNIX", "ok"]
    # The driver domain has no such policy.
    out = in_domain(st["name"], "driver", "import socket; socket.socket(); print('ok')")
    assert out.stdout.strip() == "ok"


CHANNEL_READ = """
import sys
from drb_uring.channel.client import Channel
from drb_uring.ring import layout as L
with Channel({sock!r}, 1 << 20, geometry=L.Geometry(slot_size=65536, slot_count=8)) as ch:
    got = ch.pread(0, 16)
    ch.pwrite(4096, b"from-the-user-domain")
    ch.flush()
print(got.hex())
"""


def test_io_through_channel_from_inside_user_domain(pair):
    st = pair(f"{PREFIX}-d", "--size", "16m")
    with open(st["device"], "r+b") as f:
        f.write(b"driver-data-0123")
    out = in_domain(st["name"], "user", CHANNEL_READ.format(sock=st["socket"]))
    assert bytes.fromhex(out.stdout.strip()) == b"driver-data-0123"
    with open(st["device"], "rb") as f:
        f.seek(4096)
        assert f.read(20) == b"from-the-user-domain"


def test_two_pairs_do_not_interfere(pair):
    a = pair(f"{PREFIX}-e1", "--size", "16m")
    b = pair(f"{PREFIX}-e2", "--size", "16m")
    assert a["socket"] != b["socket"] and a["device"] != b["device"]
    for st, tag in ((a, b"AAAA"), (b, b"BBBB")):
        with open(st["device"], "r+b") as f:
            f.write(tag * 4)
    ra = in_domain(a["name"], "user", CHANNEL_READ.format(sock=a["socket"])).stdout
    rb = in_domain(b["name"], "user", CHANNEL_READ.format(sock=b["socket"])).stdout
    assert bytes.fromhex(ra.strip()) == b"AAAA" * 4
    assert bytes.fromhex(rb.strip()) == b"BBBB" * 4
    # Each user domain sees only its own pair's socket.
    seen = in_domain(a["name"], "user", "import os; print(os.listdir('/run/drb'))").stdout
    assert a["name"] in seen and b["name"] not in seen


def test_down_leaves_nothing(clean):
    drb("up", f"{PREFIX}-f", "--size", "16m")
    st = json.loads(drb("status", f"{PREFIX}-f", "--json").stdout)
    assert bpf_prog_ids()
    pids = [st["daemon_pid"], st["domains"]["user"]["pid"], st["domains"]["driver"]["pid"]]
    out = drb("down", f"{PREFIX}-f").stdout
    assert f"stopped daemon {st['daemon_pid']}" in out
    for pid in pids:
        assert wait_gone(lambda p=pid: dead(p))
    assert drb("status", f"{PREFIX}-f", check=False).returncode == 1


def test_interrupted_demo_leaves_nothing(clean):
    proc = subprocess.Popen([DRB, "demo", "--seconds", "5"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "running the workload" in line:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted; tearing down" in err
    assert wait_gone(lambda: not leftovers("demo-")), leftovers("demo-")


def test_killing_the_monitor_stops_workers_and_fails_calls(pair):
    st = pair(f"{PREFIX}-g", "--size", "16m")
    code = textwrap.dedent(f"""
        import sys, time
        from drb_uring.channel.client import Channel, ChannelFailed
        from drb_uring.ring import layout as L
        ch = Channel({st['socket']!r}, 1 << 20, geometry=L.Geometry(slot_size=65536,
                                                                     slot_count=8))
        print(ch.worker_pid, flush=True)
        last = time.monotonic()
        try:
            while True:
                ch.pread(0, 4096)
                last = time.monotonic()
        except ChannelFailed as e:
            print(f"failed {{time.monotonic() - last:.3f}} {{e}}", flush=True)
    """)
    proc = subprocess.Popen([DRB, "exec", st["name"], "user", "--", "python3", "-c", code],
                            stdout=subprocess.PIPE, text=True)
    worker_ns_pid = int(proc.stdout.readline())
    assert worker_ns_pid > 0
    workers = [int(p) for p in os.listdir("/proc") if p.isdigit()
               and "drb_uring.channel.worker" in open(f"/proc/{p}/cmdline").read()]
    assert workers
    os.kill(st["daemon_pid"], signal.SIGKILL)
    line = proc.stdout.readline().split(maxsplit=2)
    proc.wait(10)
    assert line[0] == "failed", line
    assert float(line[1]) < 1.0, line          # the call failed within one second
    for w in workers:
        assert wait_gone(lambda w=w: dead(w), 2.0), (w, open(f"/proc/{w}/cmdline").read()[:300],
                                                    workers)
    status = drb("status", st["name"], check=False)
    assert "DOWN: its monitor is not running" in status.stdout
    assert status.returncode == 3              # as systemctl status: not running


def test_attach_mode_with_unshare_containers(clean, tmp_path):
    from drb_uring.domains import cgroup
    groups, conts = [], []
    try:
        for role in ("user", "driver"):
            g = os.path.join(cgroup.cgroup2_root(), f"{PREFIX}-att-{role}")
            os.mkdir(g)
            groups.append(g)
            p = subprocess.Popen([sys.executable, PRIVATE_NS, "unshare", "--mount", "--pid",
                                  "--ipc", "--uts", "--net", "--fork", "--mount-proc",
                                  "--propagation", "unchanged", "sleep", "600"],
                                 env=procs.module_env(),
                                 preexec_fn=lambda g=g: cgroup.join(g))
            conts.append(p)
        pids = []
        for p in conts:
            assert wait_gone(lambda p=p: open(f"/proc/{p.pid}/task/{p.pid}/children").read())
            pids.append(int(open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()[0]))
        name = f"{PREFIX}-att"
        # Bare unshare containers share the host's user namespace: refused,
        # unless asked for, since drb exec there runs as host uid 0.
        try:
            refused = drb("up", name, "--size", "16m", "--attach-user", str(pids[0]),
                          "--attach-driver", str(pids[1]), check=False)
            assert refused.returncode == 1 and "the host's user namespace" in refused.stderr, \
                refused.stderr
            assert "--allow-host-userns" in refused.stderr
            drb("up", name, "--size", "16m", "--attach-user", str(pids[0]),
                "--attach-driver", str(pids[1]), "--allow-host-userns")
            st = json.loads(drb("status", name, "--json").stdout)
            assert st["attached"] and st["domains"]["user"]["cgroup"] == groups[0]
            with open(st["device"], "r+b") as f:
                f.write(b"attached-device!")
            out = in_domain(name, "user", CHANNEL_READ.format(sock=st["socket"]))
            assert bytes.fromhex(out.stdout.strip()) == b"attached-device!"
            assert in_domain(name, "user", "import socket; socket.socket()",
                             check=False).returncode != 0      # policy on their group
        finally:
            drb("down", name)
        # Their containers are theirs: still running, policies gone from their groups.
        assert all(p.poll() is None for p in conts)
        tree = subprocess.run(["bpftool", "cgroup", "show", groups[0]], capture_output=True,
                              text=True).stdout
        assert "drb_" not in tree
    finally:
        for p in conts:
            p.kill()
            p.wait()
        for g in groups:
            cgroup.kill_and_remove(g)


@pytest.mark.parametrize("args, words", [
    (["up", "Bad/Name"], "bad pair name 'Bad/Name'"),
    (["up", f"{PREFIX}-x", "--backing", "/nonexistent/disk.img"],
     "backing file /nonexistent/disk.img does not exist"),
    (["down", f"{PREFIX}-nothing"], f"no pair named '{PREFIX}-nothing'"),
    (["up", f"{PREFIX}-z", "--size", "12q"], "not a size: '12q'"),
    (["exec", f"{PREFIX}-nothing", "user", "--", "true"], f"pair '{PREFIX}-nothing' is not up"),
    (["up", f"{PREFIX}-y", "--attach-user", "1"], "--attach-user and --attach-driver go together"),
])
def test_errors_are_one_clear_line(clean, args, words):
    proc = drb(*args, check=False)
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if x.startswith("drb: error")]
    assert len(lines) == 1 and words in lines[0], proc.stderr


def test_backing_too_small_and_name_in_use(pair, tmp_path):
    small = tmp_path / "small.img"
    small.write_bytes(b"x" * 1000)
    proc = drb("up", f"{PREFIX}-h", "--backing", str(small), check=False)
    assert proc.returncode == 1
    assert "too small (1000 bytes; at least 1 MiB)" in proc.stderr
    pair(f"{PREFIX}-i", "--size", "16m")
    proc = drb("up", f"{PREFIX}-i", "--size", "16m", check=False)
    assert proc.returncode == 1 and f"pair '{PREFIX}-i' is already up" in proc.stderr


def test_not_root_is_refused(clean):
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           DRB, "up", f"{PREFIX}-nr"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert "must run as root" in proc.stderr


def _trace(sock_path: str) -> dict:
    import socket

    from drb_uring import protocol
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with s:
        s.connect(sock_path)
        return protocol.request(s, {"op": "trace", "lease": 5})


def test_counters_count_preads_in_a_domain_exactly(pair):
    st = pair(f"{PREFIX}-k", "--size", "16m")
    prog = ("import os; fd = os.open('/dev/zero', os.O_RDONLY)\n"
            "for _ in range({n}): os.pread(fd, 1, 0)\n")
    # Counted per domain, by its own name: "user" runs in user0.
    t0 = _trace(st["control"])["counters"]
    c0 = t0["user0"]
    in_domain(st["name"], "user", prog.format(n=0))
    c1 = _trace(st["control"])["counters"]["user0"]
    in_domain(st["name"], "user", prog.format(n=1000))
    c2 = _trace(st["control"])["counters"]["user0"]
    # Same program twice, one with 1000 more preads: exactly 1000 more.
    assert (c2["pread64"] - c1["pread64"]) - (c1["pread64"] - c0["pread64"]) == 1000
    assert c2["syscalls"] - c1["syscalls"] >= 1000
    # None of this ran in the driver domain.
    assert _trace(st["control"])["counters"]["driver"]["pread64"] == t0["driver"]["pread64"]


def test_trace_prints_bpftrace_histograms_and_rates(pair):
    st = pair(f"{PREFIX}-l", "--size", "64m")
    load = subprocess.Popen(
        [DRB, "exec", st["name"], "user", "--", "python3", "-c", textwrap.dedent(f"""
            from drb_uring.channel.client import Channel
            from drb_uring.ring import layout as L; from drb_uring.tools import _load
            with Channel({st['socket']!r}, 32 << 20,
                         geometry=L.Geometry(slot_size=65536, slot_count=16)) as ch:
                print("open", flush=True)
                _load.run(ch.end, 4, 4096, 8, 3.0, 32 << 20, True, 1, 1)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        # Traced once the load runs: its start-up (imports) is not per I/O.
        assert load.stdout.readline().strip() == "open"
        out = drb("trace", st["name"], "--seconds", "2", "--interval", "1").stdout
    finally:
        load.wait(30)
    assert re.search(r"^@usecs_post_to_submit_ch1: $", out, re.M), out
    assert re.search(r"^@usecs_submit_to_complete_ch1: $", out, re.M), out
    assert re.search(r"^@usecs_post_to_reap_ch1: $", out, re.M), out
    assert re.search(r"^\[\d+[KM]?, \d+[KM]?\)\s+\d+ \|@+\s*\|$", out, re.M), out
    rows = re.findall(r"^user0\s+syscalls\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert rows and float(rows[-1][1]) < 0.05, out     # the user side barely enters the kernel


MISBEHAVE = """
from drb_uring.channel.client import Channel, ChannelFailed
from drb_uring.ring import layout as L
S = 65536
with Channel({sock!r}, 1 << 20, geometry=L.Geometry(slot_size=S, slot_count=8)) as ch:
    ch.pool[S:2 * S] = b"P" * S
    try:
        ch.pwrite(0, b"W" * 4096) if {write} else ch.pread(0, 4096)
        print("no failure")
    except ChannelFailed as e:
        print("failed:", e)
    print("slot1 unchanged:", bytes(ch.pool[S:2 * S]) == b"P" * S)
"""


@pytest.mark.parametrize("mode, reason", [
    ("read-untasked", "no active task for the slot"),
    ("cross-slot", "buffer outside the task's slot"),
    ("beyond-extent", "device range outside the channel's extent"),
])
def test_misbehaving_worker_in_the_driver_domain(clean, mode, reason):
    """A rogue worker, started through the pair's spawn hook inside the real
    driver domain; the monitor kills it before it touches anything."""
    name = f"{PREFIX}-mb{mode[:4]}"
    proc = rogue_pair(name, mode)
    try:
        st = json.loads(drb("status", name, "--json").stdout)
        with open(st["device"], "r+b") as f:
            f.write(b"F" * 65536)
        out = in_domain(name, "user", MISBEHAVE.format(sock=st["socket"],
                                                        write=mode == "beyond-extent")).stdout
        m = re.search(r"failed: monitor killed backend worker (\d+): (.*)$", out, re.M)
        assert m and m.group(2) == reason, out
        assert wait_gone(lambda: dead(m.group(1)))
        assert "slot1 unchanged: True" in out
        with open(st["device"], "rb") as f:
            disk = f.read(2 << 20)
        assert disk[:65536] == b"F" * 65536                   # nothing written at 0
        assert disk[1 << 20:(1 << 20) + 4096] == bytes(4096)  # nor past the extent
        log = open(os.path.join("/run/drb", name, "daemon.log")).read()
        assert f"VIOLATION channel 1: {reason}" in log
    finally:
        drb("down", name)
        proc.wait(10)


def test_register_call_never_reaches_the_ring_in_a_driver_domain(clean):
    """In the driver domain io_uring_register is refused by its seccomp
    profile before io_uring sees it (the monitor's own check is the second
    wall, tested without domains in test_ebpf.py)."""
    name = f"{PREFIX}-mbreg"
    proc = rogue_pair(name, "register")
    try:
        st = json.loads(drb("status", name, "--json").stdout)
        out = in_domain(name, "user", MISBEHAVE.format(sock=st["socket"], write=False),
                        timeout=60).stdout
        # The rogue, refused, gives up (status 3). That is a death, not a
        # violation: workers are started again until a domain's channels
        # fail with the reason.
        assert re.search(r"failed: backend worker \d+ exited with status \d+, the 6th "
                         r"death in 10 s: not started again", out), out
        log = open(os.path.join("/run/drb", name, "daemon.log")).read()
        assert re.search(r"backend worker \d+ exited with status 3; starting another", log)
        with open(os.path.join("/run/drb", name, "workers.log")) as f:
            assert f"rogue: register -> -{errno.EPERM}" in f.read()
    finally:
        drb("down", name)
        proc.wait(10)
