"""What a new user hits in the first hour: interrupts, bad input, odd files.

Each case must end in one clear line (or a clean interrupt), a non-zero
exit, and nothing left behind: no pair state, cgroup, mount or process.
"""
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
from pair_env import DRB, drb, in_domain, leftovers, wait_gone

from drb_uring import procs
from drb_uring.domains import cgroup
from drb_uring.tools.cli import build_parser

PREFIX = "tfh"


@pytest.fixture
def clean():
    yield
    assert wait_gone(lambda: not leftovers(PREFIX), 10), leftovers(PREFIX)


def _one_error(proc, words):
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if x.startswith("drb: error")]
    assert len(lines) == 1, proc.stderr
    assert "drb: error: drb:" not in lines[0]
    assert words in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def _interrupt_when(argv, marker: str, delay: float = 0.0):
    """Start argv in its own process group, wait for `marker` on stderr,
    then send SIGINT to the group, as a terminal's Ctrl-C does."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            break
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=90)
    return proc.returncode, out, "".join(seen) + err


def test_ctrl_c_during_up_leaves_no_pair(clean):
    rc, _, err = _interrupt_when([DRB, "up", f"{PREFIX}-a", "--size", "16m"], "bringing up")
    assert rc == 130, err
    assert f"pair {PREFIX}-a was not brought up" in err
    assert "Traceback" not in err
    assert drb("status", f"{PREFIX}-a", check=False).returncode == 1


@pytest.mark.parametrize("delay", [0.0, 0.3, 1.0])
def test_ctrl_c_during_up_foreground_is_orderly(clean, delay):
    rc, _, err = _interrupt_when([DRB, "up", f"{PREFIX}-b", "--size", "16m", "--foreground"],
                                 "", delay)
    assert "Traceback" not in err and "preexec_fn" not in err, err
    assert rc in (0, 1, 130), err


def test_ctrl_c_in_demo_has_no_traceback(clean):
    rc, _, err = _interrupt_when([DRB, "demo", "--seconds", "5"], "running the workload", 1.0)
    assert rc == 130, err
    assert "interrupted; tearing down" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "nothing left behind" in err
    assert wait_gone(lambda: not leftovers("demo-"), 10), leftovers("demo-")


def test_demo_reads_the_devices_own_data(clean):
    proc = drb("demo", "--seconds", "0.3", timeout=180)
    assert "sha256 matches the file" in proc.stdout, proc.stdout
    assert "on the device" in proc.stdout
    assert "nothing left behind" in proc.stderr
    assert re.search(r"^randread_4k_qd32\s+\d+", proc.stdout, re.M)
    # The disk step: dd and sqlite3 inside the user domain, their bytes on the device.
    assert "inside the user domain" in proc.stdout and "sha256 matches the device" in proc.stdout
    assert "integrity ok; the rows are on the device" in proc.stdout
    assert not leftovers("demo-")


@pytest.mark.parametrize("args, words", [
    (["--interval", "0"], "--interval must be between 0.1 and 3600 seconds, got 0"),
    (["--seconds", "0"], "--seconds must be more than 0, got 0"),
    (["--seconds", "-1"], "--seconds must be more than 0, got -1"),
])
def test_trace_refuses_silly_timing(clean, args, words):
    _one_error(drb("trace", f"{PREFIX}-none", *args, check=False), words)


def test_backing_that_is_a_directory_or_read_only(clean, tmp_path):
    _one_error(drb("up", f"{PREFIX}-c", "--backing", str(tmp_path), check=False),
               f"backing file {tmp_path} is a directory")
    ro = tmp_path / "ro"
    ro.mkdir()
    img = ro / "disk.img"
    img.write_bytes(bytes(2 << 20))
    subprocess.run(["mount", "--bind", str(ro), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        _one_error(drb("up", f"{PREFIX}-c", "--backing", str(img), check=False),
                   "is on a read-only file system")
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_size_suffixes_and_free_space(clean):
    _one_error(drb("up", f"{PREFIX}-d", "--size", "12q", check=False),
               "a number with an optional suffix k, m, g or t")
    _one_error(drb("up", f"{PREFIX}-d", "--size", "9999t", check=False),
               "free on /run/drb")
    assert not os.path.exists(f"/run/drb/{PREFIX}-d")


def test_state_commands_as_non_root_say_so(clean):
    for cmd in (["ls"], ["status"], ["down", f"{PREFIX}-x"], ["trace", f"{PREFIX}-x"]):
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               DRB, *cmd], capture_output=True, text=True, timeout=60)
        _one_error(proc, "must run as root")
        assert proc.stdout == ""


def test_every_argument_has_help():
    parser = build_parser()
    missing = []
    sub = next(a for a in parser._actions if a.dest == "cmd")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest != "help" and not action.help:
                missing.append(f"{name} {action.dest}")
    assert not missing, missing


def test_exec_into_an_attached_pair_whose_container_is_gone(clean):
    groups, conts = [], []
    name = f"{PREFIX}-att"
    try:
        for role in ("user", "driver"):
            g = os.path.join(cgroup.cgroup2_root(), f"{PREFIX}-att-{role}")
            os.mkdir(g)
            groups.append(g)
            conts.append(subprocess.Popen(
                [sys.executable, PRIVATE_NS, "unshare", "--uts", "--pid", "--fork", "--mount",
                 "--mount-proc", "--propagation", "unchanged", "sh", "-c",
                 f"hostname their-{role}; exec sleep 600"], env=procs.module_env(),
                preexec_fn=lambda g=g: cgroup.join(g)))
        pids = []
        for p in conts:
            assert wait_gone(lambda p=p: open(f"/proc/{p.pid}/task/{p.pid}/children").read())
            pids.append(int(open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()[0]))
        assert wait_gone(lambda: b"sleep" in open(f"/proc/{pids[0]}/cmdline", "rb").read())
        drb("up", name, "--size", "16m", "--attach-user", str(pids[0]),
            "--attach-driver", str(pids[1]), "--allow-host-userns")
        st = json.loads(drb("status", name, "--json").stdout)
        assert st["state"] == "up"
        assert st["domains"]["user"]["hostname"] == "their-user"    # theirs, not ours
        os.kill(pids[0], signal.SIGKILL)          # the user container is removed
        conts[0].wait()
        assert wait_gone(lambda: dead(pids[0]))
        _one_error(drb("exec", name, "user", "--", "true", check=False),
                   f"the user domain of pair '{name}' (pid {pids[0]}) is gone")
        st = json.loads(drb("status", name, "--json", check=False).stdout)
        assert st["state"] == "degraded"
        status = drb("status", name, check=False)
        assert "DEGRADED: a domain is gone" in status.stdout and status.returncode == 3
    finally:
        drb("down", name, check=False)
        for p in conts:
            p.kill()
            p.wait()
        for g in groups:
            cgroup.kill_and_remove(g)


BROKEN_BTF = """
set -e
mount -t tmpfs tmpfs /run
mount --bind /dev/null /sys/kernel/btf/vmlinux
exec "$@"
"""


def test_bench_that_fails_at_start_leaves_no_cgroup(clean):
    # No BTF: the monitor cannot start. In a private mount namespace with a
    # private /run, so the host's own enforcement service is not touched.
    root = os.path.join(cgroup.cgroup2_root(), "drb")
    before = set(os.listdir(root)) if os.path.isdir(root) else set()
    proc = subprocess.run([sys.executable, PRIVATE_NS, "sh", "-c",
                           BROKEN_BTF, "sh", DRB, "bench", "--seconds", "0.2"],
                          env=procs.module_env(),
                          capture_output=True, text=True, timeout=120)
    _one_error(proc, "eBPF monitor cannot start")
    after = set(os.listdir(root)) if os.path.isdir(root) else set()
    assert not {n for n in after - before if n.startswith("bench-")}


O_DIRECT_EXAMPLE = textwrap.dedent("""
    from drb_uring.channel.client import Channel
    with Channel({sock!r}, 1 << 20) as ch:
        ch.pwrite(0, b"hello")
        print(ch.align, ch.pread(0, 5).decode())
""")


def test_readme_example_on_an_o_direct_pair(clean):
    name = f"{PREFIX}-od"
    drb("up", name, "--size", "16m", "--o-direct")
    try:
        st = json.loads(drb("status", name, "--json").stdout)
        out = in_domain(name, "user", O_DIRECT_EXAMPLE.format(sock=st["socket"])).stdout
        align, text = out.split()
        assert int(align) > 1 and text == "hello"
    finally:
        drb("down", name)
    assert sys.executable
