"""`drb bench --disk --smoke`: every step of the disk's bench runs here (two
pairs, fuse-local's mount, the bind mounts, fio inside the user domain on
all three files, sqlite and fio on the file system), and `drb report`
makes its table; nothing is left behind."""
import glob
import json
import re
import subprocess

from pair_env import DRB, leftovers, monitor_args, wait_gone

from drb_uring.tools import diskbench


def _monitor():
    return ["--monitor", "off"] if monitor_args() else []


def test_disk_bench_smoke_runs_every_step(tmp_path):
    out = tmp_path / "disk.json"
    proc = subprocess.run([DRB, "bench", "--disk", "--smoke", "--json", str(out), *_monitor()],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "a smoke run" in proc.stdout
    rep = json.loads(out.read_text())
    d = rep["disk"]
    assert rep["schema"] == 1 and rep["runs"] == [] and d["smoke"] is True
    assert {(r["job"], r["target"]) for r in d["jobs"]} == \
        {(j, t) for j in diskbench.JOBS for t in diskbench.TARGETS}
    assert {(r["job"], r["target"]) for r in d["fs_jobs"]} == \
        {(j, t) for j in diskbench.FS_JOBS for t in diskbench.FS_TARGETS}
    for r in d["jobs"] + d["fs_jobs"]:
        assert r["iops"] > 0 and r["mb_s"] > 0, r
    assert sorted(s["target"] for s in d["sqlite"]) == sorted(diskbench.FS_TARGETS)
    assert all(s["integrity"] == "ok" and s["inserts_per_s"] > 0 for s in d["sqlite"])
    assert [g["measured"] is not None for g in d["goals"]] == [True] * 3
    assert d["monitor"] == (not _monitor())
    # The report: its table and the goals, said on the terminal too.
    rp = subprocess.run([DRB, "report", str(out), "--out", str(tmp_path / "rep")],
                        capture_output=True, text=True, timeout=60)
    assert rp.returncode == 0, rp.stderr
    assert "drb-disk / fuse-local, 4k (worst job)" in rp.stdout
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## The disk (drb bench --disk)" in md and "| 1M seq write |" in md
    # Its pairs (bench-PID-disk, bench-PID-fs), its files and mounts: gone.
    mine = lambda: [x for x in leftovers("bench-") if re.search(r"\bbench-\d+-(disk|fs)", x)]  # noqa: E731
    assert wait_gone(lambda: not mine(), 10), mine()
    assert not glob.glob("/dev/shm/drb-diskbench-*")
    with open("/proc/self/mountinfo") as f:
        mounts = f.read()
    assert "drb-diskbench" not in mounts and "/dev/drb/local" not in mounts


def test_disk_bench_says_what_does_not_go_with_it(tmp_path):
    for args, said in ((["--quick"], "--disk runs the disk's own fio jobs: not with --quick"),
                       (["--qd", "8"], "not with --qd"),
                       (["--monitor", "on,off"], "--disk takes one --monitor setting")):
        proc = subprocess.run([DRB, "bench", "--disk", *args], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)
        assert proc.returncode == 1 and said in proc.stderr, (args, proc.stderr)
        assert proc.stderr.count("\n") <= 2, proc.stderr
