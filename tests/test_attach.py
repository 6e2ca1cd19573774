"""Attach mode with containers that another runtime started: runc, driven
here as another tool would drive it (its own state directory, its own
cgroups, its own bundle, no drb code inside), then paired with `drb up
--attach-*`, used, and left as it was found."""
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
from channel_env import PRIVATE_NS, dead
from pair_env import drb, in_domain, leftovers, wait_gone

from drb_uring.domains import runtime

PREFIX = "tatt"
ROOT = "/run/tatt-runc"          # the other tool's runc state, not drb's
BUNDLES = "/run/tatt-bundles"    # traversable: their runc init is their unprivileged root


def _run(*args):
    # Never a pipe: a detached container keeps runc's stdio. Started from a
    # private mount namespace re-rooted as drb's daemon is: a chrooted
    # process (a fresh-machine root) may not make a user namespace.
    with tempfile.TemporaryFile() as err:
        proc = subprocess.run([sys.executable, PRIVATE_NS, "runc", "--root", ROOT, *args],
                              stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=err, timeout=30)
        err.seek(0)
        assert proc.returncode == 0, err.read().decode()


def _foreign(role: str, host_id: int) -> tuple[str, int]:
    """A container made without drb's help: no socket, no drb package, its
    own process as PID 1 (sleep), in a user namespace of its own."""
    spec = runtime.DomainSpec(pair=f"{PREFIX}-foreign", role=role, host_id=host_id)
    os.makedirs(os.path.join(BUNDLES, role), exist_ok=True)
    for d in (BUNDLES, os.path.join(BUNDLES, role)):
        os.chmod(d, 0o711)
    dom = runtime.Domain(os.path.join(BUNDLES, role), spec)
    dom.write_bundle()
    cfg_path = os.path.join(dom.bundle, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["mounts"] = [m for m in cfg["mounts"] if "drb" not in m["destination"]]
    cfg["process"]["args"] = ["/usr/bin/sleep", "infinity"]
    cfg["linux"]["cgroupsPath"] = f"/{PREFIX}-foreign/{role}"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    cid = f"{PREFIX}-{role}"
    _run("run", "--detach", "--bundle", dom.bundle, cid)
    state = json.loads(subprocess.run(["runc", "--root", ROOT, "state", cid], check=True,
                                      capture_output=True, text=True).stdout)
    return cid, state["pid"]


def _in_theirs(cid: str, *cmd: str) -> str:
    """What their own runtime shows inside their container."""
    return subprocess.run(["runc", "--root", ROOT, "exec", cid, *cmd], capture_output=True,
                          text=True, timeout=30).stdout


def _remove(cids):
    for cid in cids:
        subprocess.run(["runc", "--root", ROOT, "delete", "--force", cid],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(["rm", "-rf", ROOT, BUNDLES])
    for base in os.listdir("/sys/fs/cgroup"):
        g = os.path.join("/sys/fs/cgroup", base, f"{PREFIX}-foreign")
        if os.path.isdir(g):
            for sub in sorted(os.listdir(g)):
                if os.path.isdir(os.path.join(g, sub)):
                    os.rmdir(os.path.join(g, sub))
            os.rmdir(g)


@pytest.fixture
def containers():
    made = []
    try:
        for role, host_id in (("user", 3 << 24), ("driver", (3 << 24) + (1 << 16))):
            made.append(_foreign(role, host_id))
        yield made
    finally:
        _remove([cid for cid, _ in made])
        assert wait_gone(lambda: not leftovers(PREFIX), 10), leftovers(PREFIX)


CHANNEL = textwrap.dedent("""
    import time
    from drb_uring.channel.client import Channel
    from drb_uring.ring import layout as L
    with Channel({sock!r}, 1 << 20, geometry=L.Geometry(slot_size=65536, slot_count=4)) as ch:
        got = ch.pread(0, 16)
        ch.pwrite(4096, b"from-their-user")
        ch.flush()
        print(ch.worker_pid, got.hex(), flush=True)
        time.sleep({linger})
""")


def test_pairing_runc_containers(containers):
    (ucid, upid), (dcid, dpid) = containers
    before = {c: _in_theirs(c, "ls", "-a", "/run") for c in (ucid, dcid)}
    name = f"{PREFIX}-p"
    drb("up", name, "--size", "16m", "--attach-user", str(upid), "--attach-driver", str(dpid))
    try:
        st = json.loads(drb("status", name, "--json").stdout)
        assert st["attached"] and st["state"] == "up"
        with open(st["device"], "r+b") as f:
            f.write(b"attached-device!")
        proc = subprocess.Popen([os.path.join(os.path.dirname(__import__("sys").executable),
                                              "drb"), "exec", name, "user", "--", "python3",
                                 "-c", CHANNEL.format(sock=st["socket"], linger=2)],
                                stdout=subprocess.PIPE, text=True)
        worker, got = proc.stdout.readline().split()
        assert bytes.fromhex(got) == b"attached-device!"
        # The worker: in their driver container, as a user of its own there,
        # without capabilities, with no_new_privs and two filters.
        with open(f"/proc/{worker}/status") as f:
            s = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        uid = int(s["Uid"].split()[0])
        assert (3 << 24) + (1 << 16) + 20000 <= uid < (3 << 24) + (1 << 16) + 60000, uid
        assert int(s["CapEff"], 16) == 0 and int(s["CapBnd"], 16) == 0
        assert s["NoNewPrivs"] == "1" and s["Seccomp_filters"] == "2"
        assert os.readlink(f"/proc/{worker}/ns/pid") == os.readlink(f"/proc/{dpid}/ns/pid")
        proc.wait(30)
        with open(st["device"], "rb") as f:
            f.seek(4096)
            assert f.read(15) == b"from-their-user"
        # The policies sit on their groups.
        assert in_domain(name, "user", "import socket; socket.socket()",
                         check=False).returncode != 0
    finally:
        drb("down", name)
    assert wait_gone(lambda: dead(int(worker)))
    # Their containers run on, as they were: nothing of drb left inside.
    for cid, pid in containers:
        assert not dead(pid)
        assert _in_theirs(cid, "ls", "-a", "/run") == before[cid]
    tree = subprocess.run(["bpftool", "cgroup", "show", st["domains"]["user"]["cgroup"]],
                          capture_output=True, text=True).stdout
    assert "drb_" not in tree


def test_user_add_attaches_a_container_to_a_running_pair(containers):
    """drb user add --attach PID: an existing container as one more user
    domain of a pair drb made; drb user rm gives it back as it was."""
    (ucid, upid), _ = containers
    before = _in_theirs(ucid, "ls", "-a", "/run")
    name = f"{PREFIX}-m"
    drb("up", name, "--size", "16m", "--extent", "4m")
    try:
        out = drb("user", "add", name, "--attach", str(upid)).stdout
        assert "added user1" in out and f"pid {upid}" in out, out
        st = json.loads(drb("status", name, "--json").stdout)
        u1 = st["domains"]["user1"]
        assert u1["pid"] == upid and u1["runc_id"] is None and u1["extent"] == [4 << 20, 4 << 20]
        proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "drb"), "exec",
                               name, "user1", "--", "python3", "-c",
                               CHANNEL.format(sock=st["socket"], linger=0)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        with open(st["device"], "rb") as f:     # at user1's extent, not at user0's
            f.seek((4 << 20) + 4096)
            assert f.read(15) == b"from-their-user"
            f.seek(4096)
            assert f.read(15) == bytes(15)
        assert in_domain(name, "user1", "import socket; socket.socket()",
                         check=False).returncode != 0
        drb("user", "rm", name, "user1")
        # Their container runs on, as it was; user0 too.
        assert not dead(upid)
        assert _in_theirs(ucid, "ls", "-a", "/run") == before
        tree = subprocess.run(["bpftool", "cgroup", "show", u1["cgroup"]],
                              capture_output=True, text=True).stdout
        assert "drb_" not in tree
        st = json.loads(drb("status", name, "--json").stdout)
        assert st["users"] == ["user0"] and st["state"] == "up"
    finally:
        drb("down", name)
    assert not dead(upid)


def test_a_driver_container_that_cannot_run_the_worker():
    """Without python3 in the driver container drb up says why, and leaves
    nothing."""
    made = []
    try:
        cid_u, upid = _foreign("user", 3 << 24)
        made.append(cid_u)
        from pathlib import Path
        bundle = Path(BUNDLES) / "bare"
        (bundle / "rootfs").mkdir(parents=True)
        os.chmod(bundle, 0o711)
        sleep = "/usr/bin/sleep"
        subprocess.run(["cp", sleep, str(bundle / "rootfs" / "sleep")], check=True)
        subprocess.run(["sh", "-c", f"cd {bundle}/rootfs && mkdir -p proc dev run tmp lib64 "
                        "lib/x86_64-linux-gnu && cp /lib64/ld-linux-x86-64.so.2 lib64/ && "
                        "cp /lib/x86_64-linux-gnu/libc.so.6 lib/x86_64-linux-gnu/"], check=True)
        cfg = {"ociVersion": "1.0.2", "root": {"path": "rootfs", "readonly": True},
               "process": {"args": ["/sleep", "infinity"], "cwd": "/", "user": {"uid": 0,
                                                                               "gid": 0}},
               "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                          {"destination": "/run", "type": "tmpfs", "source": "tmpfs"}],
               "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts")],
                         "cgroupsPath": f"/{PREFIX}-foreign/bare"}}
        with open(bundle / "config.json", "w") as f:
            json.dump(cfg, f)
        _run("run", "--detach", "--bundle", str(bundle), f"{PREFIX}-bare")
        made.append(f"{PREFIX}-bare")
        dpid = json.loads(subprocess.run(["runc", "--root", ROOT, "state", f"{PREFIX}-bare"],
                                         capture_output=True, text=True).stdout)["pid"]
        proc = drb("up", f"{PREFIX}-q", "--size", "16m", "--attach-user", str(upid),
                   "--attach-driver", str(dpid), "--allow-host-userns", check=False)
        assert proc.returncode == 1
        assert "cannot run drb's worker" in proc.stderr, proc.stderr
        assert drb("status", f"{PREFIX}-q", check=False).returncode == 1
        assert _in_theirs(cid_u, "ls", "/run") == ""
    finally:
        _remove(made)
