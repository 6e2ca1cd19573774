"""The OCI hook with Debian's podman and runc: a container started with
--annotation io.drb.pair=NAME is a user domain of pair NAME from its first
instruction, and leaves the pair when it stops; bad annotations, a missing
pair and a pair at its user-domain limit fail the container's start with
one line, and leave nothing behind.

The container's root is built here (the host's /usr, read-only, and empty
directories): no image is pulled. It runs in a user namespace of its own
(--uidmap): attach mode refuses the host's."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from ops_env import events, left_of, pair, wait_for
from pair_env import drb

from drb_uring import linux

PODMAN = shutil.which("podman")
pytestmark = [
    pytest.mark.skipif(PODMAN is None or shutil.which("runc") is None,
                       reason="Debian's podman and runc are missing (make setup)"),
]
ROOT = "/run/ops-hook-root"          # traversable by the container's root (a mapped uid)
RUNS = "ops-hook"                    # the containers' names start so
# In a chroot whose root is a plain directory (../shared/tools/fresh-machine-check),
# runc, as podman drives it, makes "/" rslave before it starts a container, and the
# kernel refuses that where "/" is not a mount (EINVAL: "error preparing rootfs:
# mount /, flags: 0x84000"); nor may a chrooted process make a user namespace
# (EPERM, which runc reports as "can't get final child's PID from pipe: EOF").
# There podman runs in a mount namespace of its own, re-rooted at the chroot's
# tree as drb's own domains are (linux.private_mount_namespace): the same files
# and sockets, "/" a mount, and no chroot.
_REROOTED = ("import os, sys; from drb_uring import linux; "
             "linux.private_mount_namespace(); os.execv(sys.argv[1], sys.argv[1:])")


def _podman(*args: str) -> list[str]:
    if linux.root_is_mount_point():
        return [PODMAN, *args]
    return [sys.executable, "-c", _REROOTED, PODMAN, *args]


class Podman:
    """podman run with the hooks.d that `drb install-hook` wrote, and the root
    built here."""

    def __init__(self, hooks: str):
        self.hooks = hooks

    def argv(self, cid: str, annotations: dict, *cmd: str) -> list[str]:
        ann = [x for k, v in annotations.items() for x in ("--annotation", f"{k}={v}")]
        return _podman("--hooks-dir", self.hooks, "run", "--rm", "-i", "--name", cid,
                "--runtime", "runc", "--uidmap", "0:200000:65536", "--gidmap", "0:200000:65536",
                "--network", "none", "--ulimit", "nofile=1024:1024",
                "--ulimit", "nproc=4096:4096", "--tmpfs", "/run", "-v", "/usr:/usr:ro",
                "--env", "PYTHONPATH=/run/drb-lib", *ann, "--rootfs", ROOT, *cmd)

    def run(self, cid: str, annotations: dict, *cmd: str):
        return subprocess.run(self.argv(cid, annotations, *cmd), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    hooks = tmp_path_factory.mktemp("hooks.d")
    said = drb("install-hook", "--dir", str(hooks)).stdout
    assert f"wrote {hooks}/50-drb.json" in said
    shutil.rmtree(ROOT, ignore_errors=True)
    for d in ("usr", "etc", "proc", "dev", "sys", "run", "tmp", "var"):
        os.makedirs(os.path.join(ROOT, d))
    for link in ("bin", "lib", "lib64", "sbin"):
        os.symlink(f"usr/{link}", os.path.join(ROOT, link))
    # What podman mounts over (its root may not make them: they are the host's).
    for f in ("etc/hosts", "etc/hostname", "etc/resolv.conf"):
        open(os.path.join(ROOT, f), "w").close()
    os.chmod(ROOT, 0o755)
    try:
        yield Podman(str(hooks))
    finally:
        for name in _ours():
            subprocess.run(_podman("rm", "-f", name), capture_output=True)
        shutil.rmtree(ROOT, ignore_errors=True)


def _ours() -> list[str]:
    out = subprocess.run(_podman("ps", "-a", "--format", "{{.Names}}"),
                         capture_output=True, text=True, check=True).stdout.split()
    return [n for n in out if n.startswith(RUNS)]


USER = textwrap.dedent("""
    import json, signal, socket, sys
    from drb_uring.channel.client import Channel
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))     # PID 1 has no default
    with Channel("/run/drb/{pair}/monitor.sock", 1 << 20) as ch:
        ch.pwrite(0, b"from-the-container")
        ch.flush()
        got = ch.pread(0, 18)
    print(json.dumps({{"got": got.decode(), "host": socket.gethostname()}}), flush=True)
    sys.stdin.readline()          # until stopped: the test looks at the pair meanwhile
""")


def test_a_container_is_a_user_domain_while_it_runs(podman):
    name = "ops-h"
    with pair(name, "--size", "16m", "--extent", "4m") as st:
        device = st["device"]
        r, w = os.pipe()
        seen = {}

        def look():
            # While the container waits on its stdin: it is user1, by its id.
            now = json.loads(drb("status", name, "--json").stdout)
            seen.update(now)
            return "user1" in now["domains"]
        run = subprocess.Popen(
            podman.argv(f"{RUNS}-a", {"io.drb.pair": name}, "python3", "-c",
                        USER.format(pair=name)),
            stdin=r, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.close(r)
        try:
            said = json.loads(run.stdout.readline() or "{}")
            assert said.get("got") == "from-the-container", run.stderr.read() if not said \
                else said
            assert wait_for(look, timeout=10)
            cid = subprocess.run(_podman("inspect", "--format", "{{.Id}}", f"{RUNS}-a"),
                                 capture_output=True, text=True, check=True).stdout.strip()
            dm = seen["domains"]["user1"]
            assert dm["container"] == cid and dm["extent"] == [4 << 20, 4 << 20]
            assert said["host"] == dm["hostname"]
            with open(device, "rb") as f:
                f.seek(4 << 20)
                assert f.read(18) == b"from-the-container"      # in its own extent
            metrics = drb("metrics", name).stdout
            assert f'drb_channels_opened_total{{pair="{name}",user="user1"}} 1.0' in metrics
        finally:
            # Stopped as podman stops it (SIGTERM).
            subprocess.run(_podman("stop", "-t", "10", f"{RUNS}-a"), capture_output=True,
                           timeout=60)
            os.close(w)
            assert run.wait(60) == 0, run.stderr.read()
        # Stopped: it left the pair, and nothing of it is left there.
        assert wait_for(lambda: "user1" not in json.loads(
            drb("status", name, "--json").stdout)["domains"], timeout=15)
        now = json.loads(drb("status", name, "--json").stdout)
        assert now["users"] == ["user0"]
        assert not os.path.exists(f"/run/drb/{name}/users/user1")
        assert "user1" not in drb("metrics", name).stdout
        assert _ours() == []
        with open(device, "rb") as f:
            f.seek(4 << 20)
            assert f.read(4 << 20) == bytes(4 << 20)             # its bytes wiped
        kinds = [(e["event"], e.get("user"), e.get("container")) for e in events(name)]
        assert ("user-added", "user1", cid) in kinds and ("user-removed", "user1", None) in kinds
        again = drb("user", "add", name).stdout          # its place is free again
        assert again.startswith(f"drb: added user1 to pair {name}")


@pytest.mark.parametrize("annotations, says", [
    ({"io.drb.pair": "Bad!"}, "drb hook: io.drb.pair=Bad!: bad pair name"),
    ({"io.drb.pair": "ops-nosuch"}, "drb hook: pair 'ops-nosuch' is not up"),
    ({"io.drb.pair": "ops-l"}, "drb hook: pair ops-l has 1 user domains, the most it may "
                               "have (drb up --max-users 1)"),
    ({"io.drb.pair": "ops-l", "io.drb.disk": "2"}, "drb hook: io.drb.disk=2: say 1"),
    ({"io.drb.pair": "ops-l", "io.drb.pool": "x"}, "drb hook: unknown annotation io.drb.pool"),
])
def test_refusals_fail_the_start_with_one_line(podman, annotations, says):
    with pair("ops-l", "--size", "16m", "--extent", "4m", "--max-users", "1") as st:
        got = podman.run(f"{RUNS}-r", annotations, "true")
        assert got.returncode != 0
        errors = [x for x in got.stderr.splitlines() if x.strip()]
        assert len(errors) == 1 and says in errors[0], got.stderr
        now = json.loads(drb("status", "ops-l", "--json").stdout)
        assert now["users"] == ["user0"] and now["domains"]["user0"] == st["domains"]["user0"]
        assert sorted(os.listdir("/run/drb/ops-l/users")) == ["user0"]
        assert _ours() == []
        assert [e["event"] for e in events("ops-l")] == ["user-added", "pair-up"]
    assert not left_of("ops-l")
