"""`drb bench-ring` end to end, and the installed (non-editable) build."""
import json
import os
import subprocess
import sys

VENV_BIN = os.path.dirname(sys.executable)


def test_bench_ring_json_and_table(tmp_path):
    out = tmp_path / "ring.json"
    proc = subprocess.run([os.path.join(VENV_BIN, "drb"), "bench-ring", "--iters", "20000",
                           "--count", "1000000", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(out.read_text())
    for key in ("ring_rtt_ns", "raw_rtt_ns"):
        assert set(rep[key]) == {"p50", "p99"}
        assert 0 < rep[key]["p50"] <= rep[key]["p99"]
    assert set(rep["stream_eps"]) == {"batch1", "batch32"}
    assert rep["stream_eps"]["batch1"] > 0 and rep["stream_eps"]["batch32"] > 0
    assert "ring round trip (ns)" in proc.stdout
    assert "one-way stream, batch 32" in proc.stdout


def test_bench_ring_rejects_bad_input(tmp_path):
    proc = subprocess.run([os.path.join(VENV_BIN, "drb"), "bench-ring", "--iters", "0"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    assert "must be a positive integer, got 0" in proc.stderr


def test_installed_build_imports_outside_the_tree(tmp_path):
    # Run from an unrelated directory so only the installed package is seen.
    code = ("import drb_uring, drb_uring.ring._spsc, drb_uring.ring._bench, "
            "drb_uring.channel._worker, drb_uring.channel._grant, drb_uring.enforce._task, "
            "drb_uring.tools._load, sys; print(drb_uring.__file__)")
    proc = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "site-packages" in proc.stdout


def test_installed_package_carries_the_current_ebpf_sources(tmp_path):
    # The installed `drb` loads its programs from the package; a stale copy
    # would run yesterday's monitor.
    code = "import drb_uring.bpf as b; print(b.DIR)"
    proc = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    installed = proc.stdout.strip()
    assert "site-packages" in installed, proc.stderr
    tree = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bpf")
    for name in ("monitor.c", "policy_device.c", "policy_sock.c", "drb_task.h"):
        with open(os.path.join(tree, name)) as a, open(os.path.join(installed, name)) as b:
            assert a.read() == b.read(), name
