"""`drb events`: a pair's life, one timestamped line an event, followed as
it happens and read back after the pair is down; the counters `drb
metrics` shows for the same life stay monotonic across a worker's death."""
import json
import os
import re
import select
import signal
import subprocess
import textwrap
import time

import pytest
from ops_env import MON, MONITORED, events, forget_events, pair, wait_for
from pair_env import DRB, drb, leftovers, rogue_pair, wait_gone

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (\S+) ([a-z-]+)( .*)?$")

# Reads until told to go on (a line on stdin), then more reads; a worker's
# death in between is carried over (monitored) or fails the channel, and a
# new channel then reads on.
HOLDER = textwrap.dedent("""
    import sys
    from drb_uring.channel.client import Channel, ChannelFailed
    ch = Channel({sock!r}, 1 << 20)
    for _ in range(100):
        ch.pread(0, 4096)
    print("read", flush=True)
    sys.stdin.readline()
    try:
        for _ in range(50):
            ch.pread(0, 4096)
        print("carried on", ch.restarts, flush=True)
        ch.close()
    except ChannelFailed as e:
        print("failed", e, flush=True)
        with Channel({sock!r}, 1 << 20) as again:
            for _ in range(50):
                again.pread(0, 4096)
""")


def _workers_of(name: str) -> list[int]:
    """The pair's worker processes, in its driver domain's cgroup."""
    out = []
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and "drb_uring.channel.worker" in open(f"/proc/{p}/cmdline").read() \
                    and f"/drb/{name}/driver" in open(f"/proc/{p}/cgroup").read():
                out.append(int(p))
        except OSError:
            pass
    return out


def _metric(name: str, metric: str, user: str) -> float:
    text = drb("metrics", name).stdout
    m = re.search(rf'^{metric}{{pair="{name}",user="{user}"}} (\S+)$', text, re.M)
    assert m, (metric, text)
    return float(m.group(1))


def test_a_pairs_life_as_events():
    name = "ops-e"
    forget_events(name)
    follow = subprocess.Popen([DRB, "events", name, "--follow"], stdout=subprocess.PIPE)
    try:
        with pair(name, "--size", "32m", "--extent", "8m", keep_events=True) as st:
            assert drb("user", "add", name).stdout.startswith(f"drb: added user1 to pair {name}")
            holder = subprocess.Popen([DRB, "exec", name, "user1", "--", "python3", "-c",
                                       HOLDER.format(sock=st["socket"])],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert holder.stdout.readline().strip() == "read"
            assert _metric(name, "drb_ring_requests_total", "user1") >= 100
            workers = _workers_of(name)
            assert len(workers) == 1, workers
            os.kill(workers[0], signal.SIGKILL)
            holder.stdin.write("go\n")
            holder.stdin.flush()
            said = holder.stdout.readline().split()
            assert holder.wait(60) == 0
            assert said[0] == ("carried" if MONITORED else "failed"), said
            # Monotonic across the death: 100 + 50 reads, whichever worker served them.
            assert _metric(name, "drb_ring_requests_total", "user1") >= 150
            assert _metric(name, "drb_worker_deaths_total", "user1") == 1
            assert _metric(name, "drb_worker_restarts_total", "user1") == (1 if MONITORED else 0)
            assert _metric(name, "drb_channels_opened_total", "user1") == (1 if MONITORED else 2)
            drb("user", "rm", name, "user1")
            assert wait_for(lambda: any(e["event"] == "user-removed" for e in events(name)))
        # Down, and still there.
        got = events(name)
        kinds = [e["event"] for e in got]
        want = ["user-added", "pair-up", "user-added", "channel-opened", "worker-died"]
        want += (["worker-restarted", "channel-closed"] if MONITORED else
                 ["channel-closed", "channel-opened", "channel-closed"])
        want += ["user-removed", "pair-down"]
        assert kinds == want, kinds
        assert all(e["pair"] == name for e in got)
        assert [e["ts"] for e in got] == sorted(e["ts"] for e in got)
        added = [e for e in got if e["event"] == "user-added"]
        assert [e["user"] for e in added] == ["user0", "user1"]
        died = next(e for e in got if e["event"] == "worker-died")
        assert died["user"] == "user1" and died["pid"] > 0 and "signal 9" in died["how"]
        closed = [e for e in got if e["event"] == "channel-closed"]
        if not MONITORED:
            assert "backend worker" in closed[0]["reason"] and "signal 9" in closed[0]["reason"]
        assert got[-1]["reason"] == "stopped"
        text = drb("events", name).stdout.splitlines()
        assert len(text) == len(got)
        for line, e in zip(text, got, strict=True):
            m = LINE.match(line)
            assert m and m.group(1) == name and m.group(2) == e["event"], line
        assert "user=user1 channel=1" in next(x for x in text if " channel-opened " in x)
        # --follow printed the same, as it happened.
        seen = _read_lines(follow, len(got))
        assert [LINE.match(x).group(2) for x in seen] == kinds, seen
    finally:
        follow.terminate()
        follow.wait(10)
        forget_events(name)


def _read_lines(proc, n, timeout=10.0):
    """The first n lines a process printed, or what it printed within timeout."""
    buf, fd = b"", proc.stdout.fileno()
    end = time.monotonic() + timeout
    while buf.count(b"\n") < n and time.monotonic() < end:
        if select.select([fd], [], [], 0.2)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
    return buf.decode().splitlines()


def test_a_dead_daemons_end_is_recorded_by_drb_down():
    name = "ops-d"
    try:
        with pair(name, "--size", "16m", keep_events=True) as st:
            os.kill(st["daemon_pid"], signal.SIGKILL)
            assert wait_gone(lambda: drb("status", name, check=False).returncode == 3, 10)
            drb("down", name)
        last = events(name)[-1]
        assert last["event"] == "pair-down" and "daemon was gone" in last["reason"]
    finally:
        forget_events(name)


def test_events_of_all_pairs_and_mistakes():
    for name in ("ops-x1", "ops-x2"):
        forget_events(name)
    try:
        for name in ("ops-x1", "ops-x2"):
            drb("up", name, *MON, "--size", "16m")
            drb("down", name)
        every = [json.loads(x) for x in drb("events", "--json").stdout.splitlines()]
        mine = [(e["pair"], e["event"]) for e in every if e["pair"] in ("ops-x1", "ops-x2")]
        assert mine == [("ops-x1", "user-added"), ("ops-x1", "pair-up"), ("ops-x1", "pair-down"),
                        ("ops-x2", "user-added"), ("ops-x2", "pair-up"), ("ops-x2", "pair-down")]
        assert [e["ts"] for e in every] == sorted(e["ts"] for e in every)
        none = drb("events", "ops-nosuch", check=False)
        assert none.returncode == 1 and "no events recorded for pair 'ops-nosuch'" in none.stderr
        bad = drb("events", "Bad!", check=False)
        assert bad.returncode == 1 and "bad pair name" in bad.stderr
    finally:
        for name in ("ops-x1", "ops-x2"):
            drb("down", name, check=False)
            forget_events(name)
        assert wait_gone(lambda: not leftovers("ops-x"), 10)


MISBEHAVE = textwrap.dedent("""
    from drb_uring.channel.client import Channel, ChannelFailed
    with Channel({sock!r}, 1 << 20) as ch:
        try:
            ch.pread(0, 4096)
            print("no failure")
        except ChannelFailed as e:
            print("failed:", e)
""")


@pytest.mark.skipif(not MONITORED, reason="a violation needs the eBPF monitor")
def test_a_violation_is_an_event_and_a_counter():
    name = "ops-v"
    forget_events(name)
    proc = rogue_pair(name, "read-untasked")
    try:
        st = json.loads(drb("status", name, "--json").stdout)
        out = drb("exec", name, "user", "--", "python3", "-c",
                  MISBEHAVE.format(sock=st["socket"])).stdout
        assert "failed: monitor killed backend worker" in out, out
        reason = "no active task for the slot"
        viol = wait_for(lambda: [e for e in events(name) if e["event"] == "violation"])
        assert viol and viol[0]["user"] == "user0" and viol[0]["channel"] == 1
        assert viol[0]["reason"] == reason
        text = drb("metrics", name).stdout
        assert f'drb_violations_total{{pair="{name}",reason="{reason}",user="user0"}} 1.0' \
            in text, text
        assert f'drb_worker_deaths_total{{pair="{name}",user="user0"}} 1.0' in text
    finally:
        drb("down", name)
        proc.wait(10)
        forget_events(name)
