"""`drb bench` end to end: real pairs, monitor, workers, baselines and file."""
import json
import os
import re
import subprocess
import sys

import pytest
from pair_env import leftovers, wait_gone

DRB = os.path.join(os.path.dirname(sys.executable), "drb")


def test_bench_json_shape(tmp_path):
    out = tmp_path / "io.json"
    proc = subprocess.run([DRB, "bench", "--transport", "drb,grant-map", "--op",
                           "randread,write", "--bs", "4k,64k", "--qd", "1,8", "--users", "1",
                           "--seconds", "0.2", "--monitor", "on,off", "--no-fio",
                           "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(out.read_text())
    assert rep["schema"] == 1 and "kernel" in rep["machine"] and rep["machine"]["cpus"] >= 1
    cells = {(r["transport"], r["op"], r["bs"], r["qd"], r["monitor"]) for r in rep["runs"]}
    # The monitor setting is the double ring's: the baseline runs once per cell.
    assert cells == ({("drb", o, b, q, m) for o in ("randread", "write") for b in (4096, 65536)
                      for q in (1, 8) for m in (True, False)}
                     | {("grant-map", o, b, q, True) for o in ("randread", "write")
                        for b in (4096, 65536) for q in (1, 8)})
    assert len(rep["monitor_ratio"]) == 8
    assert all(m["iops_on_over_off"] > 0 and m["transport"] == "drb"
               for m in rep["monitor_ratio"])
    assert rep["skipped"] == []
    for r in rep["runs"]:
        assert r["ios"] > 0 and r["iops"] > 0 and r["users"] == 1
        assert abs(r["mb_s"] - r["iops"] * r["bs"] / 1e6) <= 0.01 * r["mb_s"] + 0.1
        lat = r["lat_us"]
        assert 0 < lat["p50"] <= lat["p99"] <= lat["p999"]
        assert {"syscalls_user", "syscalls_driver", "ctx_switches", "mmap", "munmap",
                "map_ops"} <= set(r["per_io"])
        if r["transport"] == "drb":
            # The driver enters the kernel to submit; nobody maps per request.
            assert r["per_io"]["syscalls_driver"] > 0
            assert r["per_io"]["map_ops"] == 0
            assert r["violations"] == (0 if r["monitor"] else None)
        else:
            assert r["per_io"]["mmap"] == 1 and r["per_io"]["munmap"] == 1
    assert "randread" in proc.stdout and "IOPS" in proc.stdout
    prefix = "bench-"
    assert wait_gone(lambda: not [x for x in leftovers(prefix) if "state" in x
                                  or "cgroup" in x]), leftovers(prefix)


def test_bench_many_user_domains_report_their_shares(tmp_path):
    out = tmp_path / "users.json"
    proc = subprocess.run([DRB, "bench", "--transport", "drb,grant-map", "--qd", "8",
                           "--users", "2", "--seconds", "0.5", "--no-fio", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(out.read_text())
    (r,) = rep["runs"]
    assert (r["transport"], r["users"]) == ("drb", 2)
    # Each user domain's IOPS; together the aggregate.
    assert len(r["shares"]) == 2 and all(s > 0 for s in r["shares"])
    assert sum(r["shares"]) == r["iops"]
    assert r["share_domains"] == ["user0", "user1"]
    assert r["fairness"] == round(min(r["shares"]) / (sum(r["shares"]) / 2), 3)
    # Each domain's integrity check ran on its own extent.
    assert len(r["integrity"]) == 2
    assert r["counted"]["ios"] > 0 and r["per_io"]["map_ops"] == 0
    # The baseline has no shared driver domain: said, not run.
    assert [s["cell"]["transport"] for s in rep["skipped"]] == ["grant-map"]
    assert "double ring only" in rep["skipped"][0]["reason"]
    assert "in 2 user domains" in proc.stdout
    assert wait_gone(lambda: not [x for x in leftovers("bench-") if "state" in x
                                  or "cgroup" in x]), leftovers("bench-")


def test_bench_rejects_unknown_transport(tmp_path):
    proc = subprocess.run([DRB, "bench", "--transport", "carrier-pigeon"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1
    assert ("unknown carrier-pigeon; choose from drb, drb-poll, grant-map, socket, direct"
            in proc.stderr)


def test_bench_bad_combinations(tmp_path):
    for args, said in ((["--quick", "--full"], "--quick and --full exclude each other"),
                       (["--users", "4", "--transport", "socket"],
                        "nothing to run: more than one user domain runs for the double ring "
                        "only"),
                       (["--users", "0"], "--users must be in [1, 64]"),
                       (["--seconds", "0"], "--seconds must be in (0, 3600]")):
        proc = subprocess.run([DRB, "bench", *args, "--no-fio"], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
        assert proc.returncode == 1, args
        assert said in proc.stderr, (args, proc.stderr)
        assert proc.stderr.count("\n") <= 2, proc.stderr     # one clear line, no traceback


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_leaves_nothing(tmp_path, sig):
    import signal
    import time
    sig = getattr(signal, sig)
    proc = subprocess.Popen([DRB, "bench", "--transport", "drb,grant-map", "--qd", "1",
                             "--seconds", "2", "--no-fio"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    # Interrupted mid-run, twice: the second must not cut the tear-down short.
    for line in proc.stderr:
        if "cell 2 of 2" in line:
            break
    proc.send_signal(sig)
    time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "drb: interrupted" in err
    prefix = f"bench-{proc.pid}-"
    assert wait_gone(lambda: not leftovers(prefix), 10), leftovers(prefix)


def test_quick_smoke_runs_every_quick_cell(tmp_path):
    """`drb bench --quick --smoke`: the exact cells of --quick, through the
    same steps (pairs, 16 user domains, integrity checks, counted passes,
    fio), a fraction of a second each: the README's headline command runs
    here, whatever it would measure."""
    from drb_uring.tools import bench
    out = tmp_path / "smoke.json"
    proc = subprocess.run([DRB, "bench", "--quick", "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "a smoke run" in proc.stdout
    rep = json.loads(out.read_text())
    ran = [(r["transport"], r["op"], r["bs"], r["qd"], r["users"], r["monitor"])
           for r in rep["runs"]]
    want = [(c.transport, c.op, c.bs, c.qd, c.users, c.monitor) for c in bench.quick_cells()]
    assert ran == want and rep["skipped"] == []
    for r in rep["runs"]:
        assert r["ios"] > 0 and r["seconds"] < 2, r
        assert r["counted"]["ios"] > 0
    (u16,) = [r for r in rep["runs"] if r["users"] == 16]
    assert len(u16["shares"]) == 16 and sum(u16["shares"]) == u16["iops"]
    assert {(f["op"], f["bs"], f["qd"]) for f in rep["fio"]} == {
        ("randread", 4096, 1), ("randread", 4096, 32), ("randread", 65536, 1),
        ("read", 1 << 20, 8)}
    # The run's pairs are named bench-PID-KIND: state, groups and processes.
    mine = lambda: [x for x in leftovers("bench-") if re.search(r"\bbench-\d+-", x)]  # noqa: E731
    assert wait_gone(lambda: not mine(), 10), mine()
