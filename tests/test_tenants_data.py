"""Tenants' data stays theirs: a removed user domain's extent is wiped
before anyone else gets it, a channel finds its own bytes again at its
offset, devices that are not free are not taken, an O_DIRECT pair's extents
are enforced by the kernel (a loop device each), the domains see nothing
of the host's devices, and programs get in through --share.

Real pairs (drb up), real domains, real devices; each test leaves nothing.
"""
import json
import os
import subprocess
import textwrap

import pytest
from pair_env import DRB, drb, in_domain, leftovers, pairs_made, rogue_pair, wait_gone

PREFIX = "tten"

WRITE_AT = textwrap.dedent("""
    import sys
    from drb_uring.channel.client import Channel
    with Channel({sock!r}, 1 << 20, offset={off}) as ch:
        ch.pwrite(0, {data!r})
        print(ch.base, ch.pread(0, {n}).hex())
""")

READ_AT = textwrap.dedent("""
    from drb_uring.channel.client import Channel
    with Channel({sock!r}, 1 << 20, offset={off}) as ch:
        print(ch.base, ch.pread(0, {n}).hex())
""")


@pytest.fixture
def pair():
    with pairs_made() as up:
        yield up
    assert wait_gone(lambda: not leftovers(PREFIX), 10), leftovers(PREFIX)


def _status(name):
    return json.loads(drb("status", name, "--json").stdout)


def _read(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


@pytest.fixture
def loopdev(tmp_path):
    """A loop device over a file, as a host's spare disk would be."""
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(48 << 20)
    dev = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def _wipe_round(name, dev):
    """user1 writes, is removed; the next user1, on the same extent, reads zeros."""
    st = _status(name)
    base, size = st["domains"]["user1"]["extent"]
    sock = st["socket"]
    mine = os.urandom(4096)
    out = in_domain(name, "user1", WRITE_AT.format(sock=sock, off=0, data=mine, n=4096)).stdout
    assert out.split()[1] == mine.hex()
    assert _read(dev, base, 4096) == mine
    drb("user", "rm", name, "user1")
    drb("user", "add", name)
    st = _status(name)
    assert st["domains"]["user1"]["extent"] == [base, size]
    # Nothing of it: not through a channel of the new user domain, not on the device.
    out = in_domain(name, "user1", READ_AT.format(sock=sock, off=0, n=4096)).stdout
    assert out.split()[1] == bytes(4096).hex()
    assert _read(dev, base, size) == bytes(size)
    log = open(os.path.join("/run/drb", name, "daemon.log")).read()
    return log


def test_a_removed_user_domain_is_wiped_before_the_next_one(pair, tmp_path):
    name = f"{PREFIX}-w"
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.write(b"old tenant data " * (3 << 20))          # 48 MiB, nothing zero
    pair(name, "--backing", str(backing), "--users", "3")
    log = _wipe_round(name, str(backing))
    assert "wiped (a punched hole)" in log, log
    # The other user domains kept their bytes.
    st = _status(name)
    for u in ("user0", "user2"):
        base, size = st["domains"][u]["extent"]
        assert _read(str(backing), base, 16) == b"old tenant data "


def test_a_removed_user_domain_is_wiped_on_a_block_device(pair, loopdev):
    name = f"{PREFIX}-wb"
    with open(loopdev, "r+b") as f:
        f.write(b"Z" * (4 << 20))
    pair(name, "--blockdev", loopdev, "--users", "3")
    log = _wipe_round(name, loopdev)
    assert "wiped (BLKZEROOUT)" in log, log


def test_a_channel_at_its_offset_finds_its_own_bytes_again(pair, tmp_path):
    """Within a user domain the data stays put: a channel asks for its
    place (offset=), whatever else is open, and finds it again, even after
    the pair went down and came up on the same backing file."""
    name = f"{PREFIX}-o"
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(32 << 20)
    st = pair(name, "--backing", str(backing), "--users", "2")
    sock = st["socket"]
    code = textwrap.dedent(f"""
        from drb_uring.channel.client import Channel
        other = Channel({sock!r}, 1 << 20)            # first-fit: the start of the extent
        with Channel({sock!r}, 1 << 20, offset=3 << 20) as ch:
            ch.pwrite(0, b"mine at 3 MiB")
            print(other.base, ch.base)
        other.close()
        with Channel({sock!r}, 1 << 20, offset=3 << 20) as ch:
            print(ch.pread(0, 13).decode())
        try:
            Channel({sock!r}, 1 << 20, offset=(16 << 20) - 4096)
        except Exception as e:
            print("past:", e)
    """)
    out = in_domain(name, "user1", code).stdout.splitlines()
    assert out[0] == f"0 {3 << 20}" and out[1] == "mine at 3 MiB", out
    assert "runs past the user domain's extent" in out[2], out
    base1 = st["domains"]["user1"]["extent"][0]
    assert _read(str(backing), base1 + (3 << 20), 13) == b"mine at 3 MiB"
    drb("down", name)
    st = pair(name, "--backing", str(backing), "--users", "2")
    out = in_domain(name, "user1", READ_AT.format(sock=sock, off=3 << 20, n=13)).stdout
    assert out.split()[1] == b"mine at 3 MiB".hex()


def test_devices_that_are_not_free_are_not_taken(pair, tmp_path, loopdev):
    # A block device with a mounted file system on it.
    subprocess.run(["mkfs.ext4", "-q", "-F", loopdev], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", loopdev, str(mnt)], check=True)
    try:
        r = drb("up", f"{PREFIX}-m", "--blockdev", loopdev, check=False)
        assert r.returncode == 1 and f"block device {loopdev} is in use" in r.stderr, r.stderr
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    # The same backing file for two pairs: the second names the first.
    backing = tmp_path / "shared.img"
    with open(backing, "wb") as f:
        f.truncate(16 << 20)
    pair(f"{PREFIX}-a1", "--backing", str(backing))
    r = drb("up", f"{PREFIX}-a2", "--backing", str(backing), check=False)
    assert r.returncode == 1 and f"is in use by pair {PREFIX}-a1" in r.stderr, r.stderr
    # A file whose mode says read-only: refused, unless forced.
    ro = tmp_path / "ro.img"
    with open(ro, "wb") as f:
        f.truncate(16 << 20)
    os.chmod(ro, 0o444)
    r = drb("up", f"{PREFIX}-r", "--backing", str(ro), check=False)
    assert r.returncode == 1 and "read-only by its mode (0444)" in r.stderr, r.stderr
    pair(f"{PREFIX}-r", "--backing", str(ro), "--force")


DIRECT_WRITE_PAST = textwrap.dedent("""
    from drb_uring.channel.client import Channel, ChannelFailed
    with Channel({sock!r}, {size}) as ch:       # the user domain's whole extent
        try:
            ch.pwrite(0, b"W" * 4096)
            print("no failure")
        except ChannelFailed as e:
            print("failed:", e)
""")


def test_an_o_direct_pairs_extents_are_the_kernels(tmp_path):
    """On an O_DIRECT pair each user domain's grant rings reach a loop device
    that is its extent: a rogue worker's direct write at the first byte past
    user0's extent (user1's first) fails in the block layer, and the monitor
    kills it too. The monitor's kill alone comes too late for O_DIRECT."""
    name = f"{PREFIX}-dx"
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(16 << 20)        # never written: where a stray direct write lands
    proc = rogue_pair(name, "beyond-extent", backing=str(backing), users=2, o_direct=True)
    try:
        st = _status(name)
        (b0, s0), (b1, s1) = st["domains"]["user0"]["extent"], st["domains"]["user1"]["extent"]
        assert b0 + s0 == b1
        loops = [st["domains"][u]["device"] for u in ("user0", "user1")]
        assert all(d and d.startswith("/dev/loop") for d in loops), loops
        out = in_domain(name, "user", DIRECT_WRITE_PAST.format(sock=st["socket"],
                                                               size=s0)).stdout
        assert "failed: monitor killed backend worker" in out, out
        assert _read(str(backing), b1, s1) == bytes(s1)       # user1's, every byte
    finally:
        drb("down", name)
        proc.wait(10)
    assert wait_gone(lambda: not leftovers(PREFIX), 10), leftovers(PREFIX)


FIND = textwrap.dedent("""
    import os, sys
    needle = sys.stdin.readline().strip().encode()
    found, n = [], 0
    for top in ("/sys", "/proc"):
        for d, dirs, files in os.walk(top):
            if d == "/proc":    # other processes' files: only our own
                dirs[:] = [x for x in dirs if not x.isdigit() or x == str(os.getpid())]
            for f in files:
                p = os.path.join(d, f)
                if p in ("/proc/kmsg", "/proc/kcore"):
                    continue
                try:
                    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
                except OSError:
                    continue
                try:
                    n += 1
                    if needle in os.read(fd, 1 << 16):
                        found.append(p)
                except OSError:
                    pass
                finally:
                    os.close(fd)
    print(n, found)
""")


def test_the_domains_see_nothing_of_the_hosts_devices(pair, tmp_path):
    """Nothing readable inside either domain names the backing file's path;
    the host's block devices and partitions are masked."""
    name = f"{PREFIX}-h"
    backing = tmp_path / "secret-backing-name.img"
    with open(backing, "wb") as f:
        f.truncate(16 << 20)
    pair(name, "--backing", str(backing), "--o-direct")       # with a loop device
    # The host can read it where the loop device says what backs it.
    loops = _status(name)["domains"]["user0"]["device"]
    with open(f"/sys/block/{os.path.basename(loops)}/loop/backing_file") as f:
        assert "secret-backing-name" in f.read()
    for role in ("user", "driver"):
        out = drb("exec", name, role, "--", "python3", "-c", FIND,
                  input="secret-backing-name\n").stdout.split(maxsplit=1)
        assert int(out[0]) > 1000 and out[1].strip() == "[]", (role, out)
        listed = in_domain(name, role, "import os; print([len(os.listdir(p)) for p in "
                           "('/sys/block', '/sys/class/block', '/sys/dev/block')], "
                           "open('/proc/partitions').read() == '')").stdout.strip()
        assert listed == "[0, 0, 0] True", (role, listed)


def test_programs_get_in_through_share(pair, tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.py").write_text("import socket\nprint('hello from', socket.gethostname())\n")
    name = f"{PREFIX}-s"
    pair(name, "--size", "16m", "--share", f"{app}:/app")
    r = drb("exec", name, "user", "--", "python3", "/app/app.py")
    assert r.stdout.strip() == f"hello from {name}-user0"
    r = drb("exec", name, "user", "--", "sh", "-c", "echo x > /app/new", check=False)
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    assert not (app / "new").exists()
    # A command the domain does not have: one line of ours, as a shell's 127.
    r = drb("exec", name, "user", "--", "nosuchcmd", check=False)
    assert r.returncode == 127
    assert r.stderr.strip().splitlines() == [
        "drb exec: nosuchcmd: no such command in the user domain (its /usr is the host's; "
        "a host directory gets in with drb up --share)"], r.stderr


@pytest.mark.parametrize("args, words", [
    (["--share", "relative:/app"], "give HOST_DIR:DOMAIN_DIR, both absolute"),
    (["--share", "/tmp:/proc/x"], "/proc/x is the domain's own"),
    (["--share", "/nonexistent-dir-x:/app"], "/nonexistent-dir-x is not a directory"),
    (["--user-rootfs", "EMPTY"], "lacks: /usr/bin/python3 (drb's client runs on it); "
                                 "the mount point /proc"),
])
def test_bad_shares_and_roots_are_named_before_anything_starts(args, words, tmp_path):
    args = [str(tmp_path) if a == "EMPTY" else a for a in args]
    r = drb("up", f"{PREFIX}-bad", "--size", "16m", *args, check=False)
    assert r.returncode == 1 and words in r.stderr, r.stderr
    assert r.stderr.count("\n") <= 2, r.stderr                # no traceback
    assert not leftovers(f"{PREFIX}-bad")


def test_the_help_examples_work_as_printed(pair, tmp_path):
    """drb --help shows a pair of four user domains with room for a fifth."""
    name = f"{PREFIX}-web"
    st = pair(name, "--size", "64m", "--users", "4", "--extent", "8m")
    got = drb("user", "add", name).stdout
    assert got.startswith(f"drb: added user4 to pair {name}")
    assert drb("exec", name, "user2", "--", "hostname").stdout.strip() == f"{name}-user2"
    assert st["users"] == ["user0", "user1", "user2", "user3"]
    help_text = subprocess.run([DRB, "--help"], capture_output=True, text=True).stdout
    assert "--users 4 --extent 128m" in help_text and "--share $PWD:/app" in help_text
