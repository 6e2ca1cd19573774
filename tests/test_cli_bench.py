"""`drb bench` end to end: real monitor, worker, channel and file."""
import json
import os
import subprocess
import sys

DRB = os.path.join(os.path.dirname(sys.executable), "drb")


def test_bench_json_shape(tmp_path):
    out = tmp_path / "io.json"
    proc = subprocess.run([DRB, "bench", "--transport", "drb,drb-poll", "--op",
                           "randread,write", "--bs", "4k,64k", "--qd", "1,8",
                           "--seconds", "0.2", "--monitor", "on,off", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(out.read_text())
    assert rep["schema"] == 1 and "kernel" in rep["machine"]
    cells = {(r["transport"], r["op"], r["bs"], r["qd"], r["monitor"]) for r in rep["runs"]}
    assert cells == {(t, o, b, q, m) for t in ("drb", "drb-poll") for o in ("randread", "write")
                     for b in (4096, 65536) for q in (1, 8) for m in (True, False)}
    assert len(rep["monitor_ratio"]) == 16
    assert all(m["iops_on_over_off"] > 0 for m in rep["monitor_ratio"])
    for r in rep["runs"]:
        assert r["ios"] > 0 and r["iops"] > 0 and r["pairs"] == 1
        assert abs(r["mb_s"] - r["iops"] * r["bs"] / 1e6) <= 0.01 * r["mb_s"] + 0.1
        lat = r["lat_us"]
        assert 0 < lat["p50"] <= lat["p99"] <= lat["p999"]
        assert set(r["per_io"]) == {"syscalls_user", "syscalls_driver", "ctx_switches",
                                    "map_ops"}
        # Counted per domain by the eBPF counters: the driver enters the
        # kernel to submit; nobody maps memory per request.
        assert r["per_io"]["syscalls_driver"] > 0
        assert r["per_io"]["map_ops"] < 0.01
        assert r["violations"] == (0 if r["monitor"] else None)
    assert "randread" in proc.stdout and "IOPS" in proc.stdout


def test_bench_rejects_unknown_transport(tmp_path):
    proc = subprocess.run([DRB, "bench", "--transport", "carrier-pigeon"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1
    assert "unknown carrier-pigeon; choose from drb, drb-poll" in proc.stderr
