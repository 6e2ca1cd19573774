"""`drb metrics` scraped by a real Prometheus (Debian's, started here on a
free local port with its own configuration and data directory), asked
through its HTTP API for rate() of the request counter and
histogram_quantile() of the latency, and checked against what a workload
inside the pair's user domain did; --textfile and the one-shot print."""
import json
import os
import shutil
import subprocess
import textwrap
import threading
import time
import urllib.parse
import urllib.request

import pytest
from ops_env import MONITORED, free_port, pair, wait_for
from pair_env import DRB, drb

from drb_uring.ops import metrics

PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None,
                                      reason="Debian's prometheus is missing (make setup)")


def _get(url: str, timeout=5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


class Prometheus:
    """A Prometheus of the test's own, scraping `targets` every second."""

    def __init__(self, tmp_path, targets: list[str]):
        self.port = free_port()
        cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
               "scrape_configs": [{"job_name": "drb", "static_configs": [{"targets": targets}]}]}
        path = tmp_path / "prometheus.yml"
        path.write_text(json.dumps(cfg))          # JSON is YAML
        self.log = open(tmp_path / "prometheus.log", "w+")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        ready = wait_for(lambda: self._ready(), timeout=60, every=0.2)
        assert ready, self.logs()

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.logs()
        try:
            return _get(f"http://127.0.0.1:{self.port}/-/ready", 1) is not None
        except OSError:
            return False

    def logs(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def query(self, q: str, at: float | None = None) -> list[dict]:
        args = {"query": q, **({"time": f"{at:.3f}"} if at else {})}
        got = json.loads(_get(f"http://127.0.0.1:{self.port}/api/v1/query?"
                              + urllib.parse.urlencode(args)))
        assert got["status"] == "success", got
        return got["data"]["result"]

    def value(self, q: str, at: float | None = None) -> float | None:
        res = self.query(q, at)
        return float(res[0]["value"][1]) if res else None

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


@pytest.fixture
def prometheus(tmp_path):
    made = []

    def start(targets):
        made.append(Prometheus(tmp_path, targets))
        return made[-1]
    try:
        yield start
    finally:
        for p in made:
            p.stop()


# ---- the exporter's buckets, in Prometheus ---------------------------------------------

class Growing:
    """A pair's snapshot that grows by a known distribution at each look:
    60% of requests in [8, 16) us, 30% in [16, 32), 10% in [64, 128)."""

    def __init__(self):
        self.t0 = time.time()

    def collect(self):
        n = int((time.time() - self.t0) * 1000)         # 1000 requests a second
        snap = {"monitor": True, "users": {"user0": {
            "ring_requests": n,
            "latency_us_log2": {"post_to_reap": {"5": n * 6 // 10, "6": n * 3 // 10,
                                                 "7": 0, "8": n // 10}}}}}
        return metrics.families({"ops-syn": snap})


@needs_prometheus
def test_log2_histogram_quantiles_in_prometheus(prometheus):
    from prometheus_client import CollectorRegistry, start_http_server
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Growing())
    port = free_port()
    server, _ = start_http_server(port, "127.0.0.1", reg)
    try:
        prom = prometheus([f"127.0.0.1:{port}"])
        sel = '{pair="ops-syn",user="user0",stage="post_to_reap"}'
        assert wait_for(lambda: (prom.value(
            "count_over_time(drb_ring_requests_total[30s])") or 0) >= 6, timeout=30,
            every=0.5), prom.logs()
        q = {p: prom.value(f"histogram_quantile({p}, rate(drb_stage_latency_seconds_bucket"
                           f"{sel}[5s]))") for p in (0.3, 0.5, 0.95)}
        assert 8e-6 <= q[0.3] <= 16e-6 and 8e-6 <= q[0.5] <= 16e-6, q
        assert 64e-6 <= q[0.95] <= 128e-6, q
        rate = prom.value('rate(drb_ring_requests_total{pair="ops-syn"}[5s])')
        assert 900 <= rate <= 1100, rate
    finally:
        server.shutdown()


# ---- a live pair, scraped while a workload runs --------------------------------------

WORKLOAD = textwrap.dedent("""
    import json, time
    from drb_uring.channel.client import Channel
    with Channel({sock!r}, 1 << 20) as ch:
        ch.pwrite(0, b"w" * 65536)
        print("ready", flush=True)
        start = time.time()
        n, marks, lat = 0, [[start, 0]], []
        mark = start + 0.25
        while True:
            t0 = time.perf_counter()
            ch.pread((n % 16) * 4096, 4096)
            if n % 4 == 0:
                lat.append(time.perf_counter() - t0)
            n += 1
            now = time.time()
            if now >= mark:
                marks.append([now, n])
                mark += 0.25
                if now - start >= {seconds}:
                    break
        lat.sort()
        print(json.dumps({{"marks": marks, "p50": lat[len(lat) // 2]}}), flush=True)
""")


def _count_at(marks, t):
    """The workload's requests done by time t (linear between its marks)."""
    for (t0, n0), (t1, n1) in zip(marks, marks[1:], strict=False):
        if t0 <= t <= t1:
            return n0 + (n1 - n0) * (t - t0) / (t1 - t0)
    raise AssertionError(f"{t} is outside the workload's {marks[0][0]}..{marks[-1][0]}")


@needs_prometheus
def test_prometheus_scrapes_a_running_pair(prometheus):
    name = "ops-m"
    port = free_port()
    with pair(name, "--size", "32m") as st:
        exporter = subprocess.Popen([DRB, "metrics", "--listen", f"127.0.0.1:{port}",
                                     "--mode-switches", name],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
        try:
            assert wait_for(lambda: _up(port), timeout=30), exporter.stderr.read()
            prom = prometheus([f"127.0.0.1:{port}"])
            up = f'drb_pair_up{{pair="{name}"}}'
            # Scraped a few times first: each scrape keeps the monitor collecting.
            assert wait_for(lambda: (prom.value(f"count_over_time({up}[30s])") or 0) >= 3,
                            timeout=30, every=0.5), prom.logs()
            assert prom.value(up) == 1
            load = subprocess.Popen([DRB, "exec", name, "user", "--", "python3", "-c",
                                     WORKLOAD.format(sock=st["socket"], seconds=10)],
                                    stdout=subprocess.PIPE, text=True)
            assert load.stdout.readline().strip() == "ready"
            did = json.loads(load.stdout.readline())
            assert load.wait(30) == 0
            time.sleep(2.5)                          # the last scrapes are in
            _check(prom, name, did)
        finally:
            exporter.terminate()
            assert exporter.wait(15) == 0


def _up(port) -> bool:
    try:
        return b"drb_pair_up" in _get(f"http://127.0.0.1:{port}/metrics", 2)
    except OSError:
        return False


def _check(prom, name, did):
    marks = did["marks"]
    sel = f'{{pair="{name}",user="user0"}}'
    # Two scrapes inside the workload, past its start: Prometheus's rate
    # over a window that starts half a second before the first of them is
    # their counts' difference over their time apart, no extrapolation.
    raw = prom.query(f"drb_ring_requests_total{sel}[60s]", at=marks[-1][0])[0]["values"]
    inside = [float(ts) for ts, _ in raw if marks[0][0] + 1 <= float(ts) <= marks[-1][0] - 0.2]
    assert len(inside) >= 5, (raw, marks[0][0], marks[-1][0])
    ta, tb = inside[0], inside[-1]
    window, at = f"{int((tb - ta + 0.5) * 1000)}ms", tb
    want = (_count_at(marks, tb) - _count_at(marks, ta)) / (tb - ta)
    rate = prom.value(f"rate(drb_ring_requests_total{sel}[{window}])", at=at)
    assert rate == pytest.approx(want, rel=0.15), (rate, want)
    # By operation: the monitor counts the kernel's completions (only
    # with it).
    assert bool(prom.query(f"drb_requests_total{sel}")) == MONITORED
    if MONITORED:
        by_op = prom.value(f"sum(rate(drb_requests_total{sel}[{window}]))", at=at)
        assert by_op == pytest.approx(want, rel=0.2), (by_op, want)
        reads = prom.value(f'rate(drb_bytes_total{{pair="{name}",user="user0",op="read"}}'
                           f"[{window}])", at=at)
        assert reads == pytest.approx(want * 4096, rel=0.2), (reads, want)
    if not MONITORED:
        assert prom.value(f'drb_pair_monitored{{pair="{name}"}}') == 0
        assert not prom.query(f"drb_stage_latency_seconds_count{sel}")
        return
    # Each read the user side reaped is one post->reap sample; its median is
    # at most what the workload itself saw per read (the monitor's part of
    # it), give or take the log2 bucket Prometheus interpolates in.
    stage = f'{{pair="{name}",user="user0",stage="post_to_reap"}}'
    counted = prom.value(f"rate(drb_stage_latency_seconds_count{stage}[{window}])", at=at)
    assert counted == pytest.approx(want, rel=0.2), (counted, want)
    p50 = prom.value(f"histogram_quantile(0.5, rate(drb_stage_latency_seconds_bucket{stage}"
                     f"[{window}]))", at=at)
    assert 0 < p50 <= 2 * did["p50"], (p50, did["p50"])
    done = prom.value(f'rate(drb_domain_ios_total{{pair="{name}",domain="driver"}}'
                      f"[{window}])", at=at)
    assert done == pytest.approx(want, rel=0.25), (done, want)
    per_io = prom.value(f'rate(drb_domain_syscalls_total{{pair="{name}",domain="user0"}}'
                        f'[{window}]) / rate(drb_domain_ios_total{{pair="{name}",'
                        f'domain="user0"}}[{window}])', at=at)
    # Per I/O, as docs/operating.md asks for it: defined (I/Os were counted)
    # and small (the user side posts and reaps without the kernel's help).
    assert per_io is not None and 0 <= per_io < 10, per_io


def _hooked() -> set[str]:
    """The raw tracepoints that have a program attached (bpftool's links)."""
    out = subprocess.run(["bpftool", "link", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {line.split("'")[1] for line in out.splitlines() if line.strip().startswith("tp '")}


def _mode_switches_while_asked(name, tmp_path):
    """--mode-switches attaches the counters' hooks for the lease (3 x
    --interval) and reports the domains' system calls; they go when the
    lease runs out."""
    writer = subprocess.Popen([DRB, "metrics", name, "--textfile", str(tmp_path),
                               "--interval", "1", "--mode-switches"], stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: {"sys_enter", "sched_switch"} <= _hooked(), timeout=10)
        assert wait_for(lambda: "drb_domain_syscalls_total{domain=\"driver\"" in
                        (tmp_path / "drb.prom").read_text(), timeout=10)
    finally:
        writer.terminate()
        writer.wait(10)
    assert wait_for(lambda: not {"sys_enter", "sched_switch"} & _hooked(), timeout=15), _hooked()


def test_textfile_and_print(tmp_path):
    """--textfile writes DIR/drb.prom whole (node_exporter's collector never
    sees half a file); without it, one snapshot is printed."""
    name = "ops-t"
    with pair(name, "--size", "16m", "--users", "2"):
        drb("metrics", name, "--textfile", str(tmp_path))
        text = (tmp_path / "drb.prom").read_text()
        assert f'drb_pair_up{{pair="{name}"}} 1.0' in text
        assert f'drb_channels_open{{pair="{name}",user="user1"}} 0.0' in text
        assert [p.name for p in tmp_path.iterdir()] == ["drb.prom"]
        out = drb("metrics", name).stdout
        assert f'drb_user_domains{{pair="{name}"}} 2.0' in out
        assert f'drb_pair_monitored{{pair="{name}"}} {1.0 if MONITORED else 0.0}' in out
        # A writer every second: the file is always whole.
        writer = subprocess.Popen([DRB, "metrics", name, "--textfile", str(tmp_path),
                                   "--interval", "1"], stderr=subprocess.PIPE)
        try:
            seen = []
            stop = threading.Event()

            def reader():
                while not stop.is_set():
                    try:
                        seen.append((tmp_path / "drb.prom").read_text())
                    except FileNotFoundError:
                        seen.append("")
            t = threading.Thread(target=reader)
            t.start()
            time.sleep(3)
            stop.set()
            t.join()
            # Scraped without --mode-switches: the host-wide hooks stay off,
            # and their series are absent rather than zero.
            hooked = _hooked()
        finally:
            writer.terminate()
            writer.wait(10)
        assert seen and all(s.rstrip().endswith(f'drb_domain_ios_total{{domain="user1",'
                                                f'pair="{name}"}} 0.0') for s in seen)
        assert "io_uring_submit_req" in hooked or not MONITORED, hooked
        assert not {"sys_enter", "sched_switch"} & hooked, hooked
        assert "drb_domain_syscalls_total" not in seen[-1]
        if MONITORED:
            _mode_switches_while_asked(name, tmp_path)
    assert not os.path.exists(tmp_path / "drb.prom.tmp")
    bad = drb("metrics", "--textfile", "/nonexistent", check=False)
    assert bad.returncode == 1 and "not a directory" in bad.stderr
