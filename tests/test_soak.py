"""`drb soak` for half a minute on a fixed seed (make soak runs it for 30
minutes): a pair of two user domains under mixed reads, writes and flushes
while its workers, a user side and the monitor are killed. Every acknowledged write must be on the
device, no read may return bytes nobody wrote, and the daemon's and the
monitor's descriptors and the BPF objects must come back to their count."""
import json

from pair_env import drb, leftovers


def test_a_minute_of_kills_loses_nothing(tmp_path):
    out = tmp_path / "soak.json"
    r = drb("soak", "--seconds", "30", "--seed", "1", "--json", str(out), timeout=300,
          check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "drb soak: PASS" in r.stdout
    s = json.loads(out.read_text())
    assert s["mismatches"] == {"reads": 0, "device blocks": 0}
    assert s["leaked objects"] == {}
    assert s["channels failed"] == 0
    # Each kind of death happened, and was recovered from.
    assert s["kills"]["worker"] >= 5 and s["kills"]["user side"] >= 1
    assert s["kills"]["monitor"] >= 1 and s["recoveries"]["monitor back"] >= 1
    assert s["recoveries"]["worker (channels carried on)"] >= 1
    assert s["requests"] > 1000 and s["flushes"] > 0
    assert leftovers("soak-") == []
