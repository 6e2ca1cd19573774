"""Many user domains on one driver domain (drb up --users N, drb user add|rm),
as root, with real containers, cgroups and the monitor."""
import hashlib
import json
import os
import random
import subprocess
import textwrap

import pytest
from pair_env import DRB, bpf_prog_ids, drb, in_domain, leftovers, pairs_made, wait_gone

PREFIX = "tmu"
MIB = 1 << 20
BS = 16384


def _ids_of(prefix: str) -> list[str]:
    try:
        with open("/run/drb/ids.json") as f:
            return [n for n in json.load(f) if n.startswith(prefix)]
    except FileNotFoundError:
        return []


@pytest.fixture
def pair():
    """Pairs brought up with the CLI; every one must leave no state, cgroup,
    process, mount, id range or BPF program behind."""
    progs = bpf_prog_ids()
    with pairs_made() as up:
        yield up
    assert wait_gone(lambda: not leftovers(PREFIX)), leftovers(PREFIX)
    assert not _ids_of(PREFIX)
    assert wait_gone(lambda: bpf_prog_ids() <= progs), bpf_prog_ids() - progs


def _offsets(ext: int) -> list[int]:
    """Where a domain writes in its extent: its first and last blocks and two between."""
    return [0, ext // 3 // 4096 * 4096, 2 * ext // 3 // 4096 * 4096, ext - BS]


def _data(seed: int, n: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(BS) for _ in range(n)]


# Run inside a user domain: a channel on its whole extent; its own random
# data written at _offsets and read back, `rounds` times; the digests of
# what it wrote and of what it read back.
IO = """
import hashlib, json, random
from drb_uring.channel.client import Channel
from drb_uring.ring import layout as L
ext, seed, rounds, bs = {ext}, {seed}, {rounds}, {bs}
offs = [0, ext // 3 // 4096 * 4096, 2 * ext // 3 // 4096 * 4096, ext - bs]
rng = random.Random(seed)
data = [rng.randbytes(bs) for _ in offs]
bad = 0
with Channel({sock!r}, ext, geometry=L.Geometry(slot_size=bs, slot_count=4)) as ch:
    size = ch.size
    for _ in range(rounds):
        for o, d in zip(offs, data):
            ch.pwrite(o, d)
        ch.flush()
        back = [ch.pread(o, bs) for o in offs]
        bad += back != data
print(json.dumps({{"size": size, "bad_rounds": bad,
                  "wrote": hashlib.sha256(b"".join(data)).hexdigest(),
                  "read": hashlib.sha256(b"".join(back)).hexdigest()}}))
"""


def _start_io(st: dict, role: str, seed: int, rounds: int = 20) -> subprocess.Popen:
    ext = st["domains"][role]["extent"][1]
    code = IO.format(ext=ext, seed=seed, rounds=rounds, bs=BS, sock=st["socket"])
    return subprocess.Popen([DRB, "exec", st["name"], role, "--", "python3", "-c", code],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_device(st: dict, written: dict[str, int]) -> None:
    """The backing file as the host sees it: each domain's data where it
    wrote it, inside its own extent, and nothing anywhere else (the file
    started as zeros)."""
    size = st["device_size"]
    want = bytearray(size)
    for role, seed in written.items():
        base, ext = st["domains"][role]["extent"]
        for off, d in zip(_offsets(ext), _data(seed, 4), strict=True):
            assert off + BS <= ext
            want[base + off:base + off + BS] = d
    with open(st["device"], "rb") as f:
        have = f.read()
    assert len(have) == size
    if have != want:
        first = next(i for i in range(size) if have[i] != want[i])
        owner = [r for r in written if st["domains"][r]["extent"][0] <= first
                 < sum(st["domains"][r]["extent"])]
        raise AssertionError(f"the device differs from what the domains wrote, first at "
                             f"byte {first} (extent of {owner or 'no user domain'})")


def _run_all(st: dict, roles: list[str]) -> dict[str, int]:
    """Every domain of `roles` doing I/O at once; each checked by sha256."""
    seeds = {r: 1000 + i for i, r in enumerate(roles)}
    procs = {r: _start_io(st, r, seeds[r]) for r in roles}
    for r, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (r, err[-2000:])
        res = json.loads(out.strip().splitlines()[-1])
        want = hashlib.sha256(b"".join(_data(seeds[r], 4))).hexdigest()
        assert res["size"] == st["domains"][r]["extent"][1], (r, res)
        assert res["bad_rounds"] == 0 and res["wrote"] == want and res["read"] == want, (r, res)
    return seeds


def _users(st: dict) -> list[str]:
    return [r for r in st["domains"] if r.startswith("user") and r != "user"]


def test_two_user_domains_do_io_at_once_each_in_its_own_extent(pair):
    st = pair(f"{PREFIX}-a", "--size", "32m", "--users", "2")
    assert _users(st) == ["user0", "user1"]
    assert st["domains"]["user0"]["extent"] == [0, 16 * MIB]
    assert st["domains"]["user1"]["extent"] == [16 * MIB, 16 * MIB]
    _check_device(st, _run_all(st, ["user0", "user1"]))


def test_sixteen_user_domains_do_io_at_once(pair):
    st = pair(f"{PREFIX}-b", "--size", "64m", "--users", "16")
    users = _users(st)
    assert users == [f"user{k}" for k in range(16)]
    assert [st["domains"][u]["extent"] for u in users] == \
        [[k * 4 * MIB, 4 * MIB] for k in range(16)]
    # Sixteen containers, each its own: pid, cgroup, host ids, hostname.
    for key in ("pid", "cgroup", "host_id", "hostname", "runc_id"):
        assert len({st["domains"][u][key] for u in users}) == 16, key
    _check_device(st, _run_all(st, users))


def test_extent_option_and_a_channel_larger_than_the_extent(pair):
    st = pair(f"{PREFIX}-c", "--size", "32m", "--users", "2", "--extent", "4m")
    assert [st["domains"][u]["extent"] for u in ("user0", "user1")] == \
        [[0, 4 * MIB], [4 * MIB, 4 * MIB]]
    code = textwrap.dedent(f"""
        from drb_uring.channel.client import Channel
        from drb_uring.ring import layout as L
        geo = L.Geometry(slot_size=4096, slot_count=2)
        for size in ({4 * MIB + 4096}, {32 * MIB}):
            try:
                Channel({st['socket']!r}, size, geometry=geo).close()
                print("opened", size)
            except Exception as e:
                print("refused", size, type(e).__name__)
        with Channel({st['socket']!r}, {4 * MIB}, geometry=geo) as ch:
            print("opened", ch.size)
    """)
    out = in_domain(st["name"], "user1", code).stdout.split("\n")
    assert out[:3] == [f"refused {4 * MIB + 4096} ProtocolError",
                       f"refused {32 * MIB} ProtocolError", f"opened {4 * MIB}"], out


def test_user_domain_sees_no_other_user_domain(pair):
    st = pair(f"{PREFIX}-d", "--size", "32m", "--users", "3")
    name = st["name"]
    host = {u: os.stat(st["domains"][u]["socket_host"]) for u in ("user0", "user1", "user2")}
    assert len({s.st_ino for s in host.values()}) == 3
    # A process in user0 that user1 must not see.
    marker = f"marker-{os.getpid()}-{name}"
    sleeper = subprocess.Popen([DRB, "exec", name, "user0", "--", "python3", "-c",
                                f"import time; time.sleep(600)  # {marker}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        code = textwrap.dedent(f"""
            import errno, json, os, socket
            out = {{"run": os.listdir("/run/drb"), "dir": os.listdir("/run/drb/{name}"),
                    "ino": os.stat("/run/drb/{name}/monitor.sock").st_ino}}
            tries = {{}}
            for path in ["/run/drb/{name}/users/user0/monitor.sock",
                         "/run/drb/{name}/users/user2/monitor.sock",
                         "/run/drb/{name}/control.sock", {st['control']!r},
                         {st['domains']['user0']['socket_host']!r}]:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                try:
                    s.connect(path); tries[path] = "connected"
                except OSError as e:
                    tries[path] = errno.errorcode[e.errno]
                s.close()
            out["connect"] = tries
            seen = []
            for p in os.listdir("/proc"):
                if p.isdigit():
                    try:
                        seen.append(open(f"/proc/{{p}}/cmdline").read())
                    except OSError:
                        pass
            marker = {marker[:7]!r} + {marker[7:]!r}     # not in this program's own cmdline
            out["marker"] = any(marker in c for c in seen)
            print(json.dumps(out))
        """)
        # The marker runs: user0 itself sees it (the check below can fail).
        assert wait_gone(lambda: json.loads(in_domain(name, "user0", code).stdout)["marker"],
                         30)
        for me in ("user1", "user2"):
            got = json.loads(in_domain(name, me, code).stdout)
            assert got["run"] == [name] and got["dir"] == ["monitor.sock"], (me, got)
            assert got["ino"] == host[me].st_ino, me           # its own socket, no other
            assert set(got["connect"].values()) == {"ENOENT"}, (me, got["connect"])
            assert got["marker"] is False, me
    finally:
        sleeper.kill()
        sleeper.wait()


def test_status_lists_every_user_domain(pair):
    st = pair(f"{PREFIX}-e", "--size", "48m", "--users", "3")
    name = st["name"]
    assert st["users"] == ["user0", "user1", "user2"]
    assert st["domains"]["user"] == st["domains"]["user0"]       # the old name
    assert "driver" in st["domains"] and "extent" not in st["domains"]["driver"]
    for k in range(3):
        dm = st["domains"][f"user{k}"]
        assert dm["extent"] == [k * 16 * MIB, 16 * MIB]
        assert dm["hostname"] == f"{name}-user{k}"
        assert dm["cgroup"].endswith(f"/drb/{name}/user{k}") and os.path.isdir(dm["cgroup"])
        assert os.path.exists(f"/proc/{dm['pid']}")
    text = drb("status", name).stdout
    for k in range(3):
        dm = st["domains"][f"user{k}"]
        assert (f"user{k} domain: pid {dm['pid']}, hostname {name}-user{k}, cgroup "
                f"{dm['cgroup']}, extent {k * 16 * MIB}+{16 * MIB}") in text, text
    assert "driver domain: pid" in text
    # "user" is user0 for drb exec too.
    code = "import socket; print(socket.gethostname())"
    assert in_domain(name, "user", code).stdout.strip() == f"{name}-user0"
    assert in_domain(name, "user2", code).stdout.strip() == f"{name}-user2"
    bad = drb("exec", name, "user3", "--", "true", check=False)
    assert bad.returncode == 1 and "has no user domain user3" in bad.stderr, bad.stderr


def _loop(st: dict, role: str, seed: int) -> subprocess.Popen:
    """I/O in a loop until its stdin closes: a line per 50 rounds, then the
    number of rounds whose read-back differed."""
    ext = st["domains"][role]["extent"][1]
    code = textwrap.dedent(f"""
        import random, select, sys
        from drb_uring.channel.client import Channel
        from drb_uring.ring import layout as L
        rng = random.Random({seed})
        offs = [0, {ext} - {BS}]
        with Channel({st['socket']!r}, {ext}, geometry=L.Geometry(slot_size={BS},
                                                                   slot_count=4)) as ch:
            n = bad = 0
            while not select.select([sys.stdin], [], [], 0)[0]:
                data = [rng.randbytes({BS}) for _ in offs]
                for o, d in zip(offs, data):
                    ch.pwrite(o, d)
                bad += [ch.pread(o, {BS}) for o in offs] != data
                n += 1
                if n % 50 == 0:
                    print("rounds", n, bad, flush=True)
        print("done", n, bad, flush=True)
    """)
    return subprocess.Popen([DRB, "exec", st["name"], role, "--", "python3", "-c", code],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_removing_a_user_domain_leaves_the_others_running(pair):
    st = pair(f"{PREFIX}-f", "--size", "48m", "--users", "3")
    name = st["name"]
    ids_before = json.load(open("/run/drb/ids.json"))[name]
    gone = st["domains"]["user1"]
    loops = {r: _loop(st, r, 7 + i) for i, r in enumerate(("user0", "user1", "user2"))}
    try:
        for p in loops.values():
            assert p.stdout.readline().startswith("rounds ")     # all three are doing I/O
        out = drb("user", "rm", name, "user1").stdout
        assert "removed user1" in out
        # user1's I/O ended with its domain; the others go on: more rounds after the removal.
        assert loops["user1"].wait(60) != 0
        for r in ("user0", "user2"):
            line = loops[r].stdout.readline().split()
            assert line[0] == "rounds" and line[2] == "0", (r, line)
        for r in ("user0", "user2"):
            loops[r].stdin.close()
            out = loops[r].stdout.read()
            assert loops[r].wait(60) == 0, (r, loops[r].stderr.read()[-2000:])
            last = out.strip().splitlines()[-1].split()
            assert last[0] == "done" and last[2] == "0", (r, last)
    finally:
        for p in loops.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    # Everything of user1 is gone; the others are as they were.
    st2 = json.loads(drb("status", name, "--json").stdout)
    assert st2["users"] == ["user0", "user2"] and "user1" not in st2["domains"]
    assert st2["domains"]["user0"] == st["domains"]["user0"]
    assert st2["domains"]["user2"] == st["domains"]["user2"]
    assert st2["state"] == "up"
    assert wait_gone(lambda: not os.path.exists(f"/proc/{gone['pid']}"))
    assert not os.path.exists(gone["cgroup"])
    assert not os.path.exists(os.path.dirname(gone["socket_host"]))
    runc = subprocess.run(["runc", "--root", st["runc_root"], "list", "-q"],
                          capture_output=True, text=True).stdout.split()
    assert gone["runc_id"] not in runc and st["domains"]["user0"]["runc_id"] in runc
    assert len(json.load(open("/run/drb/ids.json"))[name]) == len(ids_before) - 1
    bad = drb("user", "rm", name, "user1", check=False)
    assert bad.returncode == 1 and "has no user domain user1" in bad.stderr, bad.stderr


def test_adding_a_user_domain_to_a_running_pair(pair):
    st = pair(f"{PREFIX}-g", "--size", "32m", "--extent", "8m")
    name = st["name"]
    assert st["users"] == ["user0"]
    out = drb("user", "add", name).stdout
    assert "added user1" in out and f"extent {8 * MIB}+{8 * MIB}" in out, out
    st = json.loads(drb("status", name, "--json").stdout)
    assert st["users"] == ["user0", "user1"]
    assert st["domains"]["user1"]["extent"] == [8 * MIB, 8 * MIB]
    _check_device(st, _run_all(st, ["user0", "user1"]))
    # Two more fit (16m and 24m), then the device is full.
    drb("user", "add", name, "--extent", "16m")
    st = json.loads(drb("status", name, "--json").stdout)
    assert st["domains"]["user2"]["extent"] == [16 * MIB, 16 * MIB]
    full = drb("user", "add", name, check=False)
    assert full.returncode == 1 and "no free extent of 8388608 bytes" in full.stderr, full.stderr
    assert json.loads(drb("status", name, "--json").stdout)["users"] == \
        ["user0", "user1", "user2"]


def test_clear_errors_and_nothing_left(pair, tmp_path):
    small = tmp_path / "small.img"
    small.write_bytes(bytes(8 * MIB))
    for args, said in ((["--users", "65"], "--users must be in [1, 64], got 65"),
                       (["--size", "16m", "--users", "2", "--extent", "16m"],
                        "2 user domains of --extent 16777216 bytes need 33554432 bytes; "
                        "the device has 16777216"),
                       (["--backing", str(small), "--users", "16"],
                        "leaves less than 1 MiB each"),
                       (["--size", "16m", "--extent", "1000k"], "multiple of 4k")):
        proc = drb("up", f"{PREFIX}-x", *args, check=False)
        assert proc.returncode == 1, args
        errors = [line for line in proc.stderr.splitlines() if line.startswith("drb: error: ")]
        assert len(errors) == 1 and said in errors[0], (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert drb("status", f"{PREFIX}-x", check=False).returncode == 1
    # A user domain that cannot be added leaves nothing of itself.
    st = pair(f"{PREFIX}-h", "--size", "32m", "--users", "2", "--extent", "8m")
    ids = json.load(open("/run/drb/ids.json"))[st["name"]]
    bad = drb("user", "add", st["name"], "--attach", "999999999", check=False)
    assert bad.returncode == 1 and "no such process" in bad.stderr, bad.stderr
    after = json.loads(drb("status", st["name"], "--json").stdout)
    assert after["users"] == ["user0", "user1"] and after["state"] == "up"
    assert sorted(os.listdir(f"/run/drb/{st['name']}/users")) == ["user0", "user1"]
    assert json.load(open("/run/drb/ids.json"))[st["name"]] == ids
    for cmd, said in ((["user", "rm", st["name"], "driver"], "not a user domain: 'driver'"),
                      (["user", "rm", st["name"]], "which user domain?"),
                      (["user", "add", f"{PREFIX}-nope"], f"pair '{PREFIX}-nope' is not up")):
        proc = drb(*cmd, check=False)
        assert proc.returncode == 1 and said in proc.stderr, (cmd, proc.stderr)


def test_a_dead_daemon_with_many_user_domains_is_cleaned_up(pair):
    """drb down after the daemon was killed: every user domain's container,
    cgroup and id range goes (the fixture checks the kernel's lists)."""
    import signal
    st = pair(f"{PREFIX}-k", "--size", "32m", "--users", "4")
    os.kill(st["daemon_pid"], signal.SIGKILL)
    assert wait_gone(lambda: "DOWN" in drb("status", st["name"], check=False).stdout)
    out = drb("down", st["name"]).stdout
    for k in range(4):
        assert f"removed container drb-{st['name']}-user{k}" in out, out
    assert f"removed container drb-{st['name']}-driver" in out
    for k in range(4):
        assert not os.path.exists(st["domains"][f"user{k}"]["cgroup"])
