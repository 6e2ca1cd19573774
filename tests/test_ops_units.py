"""drb as a service: the systemd units `drb install-units` writes pass
`systemd-analyze verify` (no running systemd needed), and a pair's
configuration written by `drb status NAME --config` brings it up again,
also as drb@NAME.service runs it (`drb up NAME --config FILE --foreground`,
stopped with SIGTERM, then `drb down NAME`)."""
import json
import os
import shutil
import signal
import subprocess

import pytest
from ops_env import MON, MONITORED, forget_events, left_of, pair, wait_for
from pair_env import DRB, drb, wait_gone

ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is missing (make setup)")
def test_units_verify(tmp_path):
    out = drb("install-units", "--dir", str(tmp_path)).stdout
    assert out.count("drb: wrote ") == 2
    for unit in ("drb-ebpfd.service", "drb@ops-u.service"):
        proc = subprocess.run([ANALYZE, "verify", str(tmp_path / unit)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and not proc.stderr.strip(), (unit, proc.stderr)
    text = (tmp_path / "drb@.service").read_text()
    assert f"ExecStart={DRB} up %i --config /etc/drb/%i.toml --foreground" in text
    assert f"ExecStopPost=-{DRB} down %i" in text
    assert f"ExecStart={DRB} ebpfd" in (tmp_path / "drb-ebpfd.service").read_text()
    # A unit systemd would refuse is refused here too: the check is real.
    (tmp_path / "bad@.service").write_text(text.replace(DRB, "/nonexistent/drb"))
    bad = subprocess.run([ANALYZE, "verify", str(tmp_path / "bad@x.service")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "/nonexistent/drb" in bad.stderr


def _config(name):
    st = json.loads(drb("status", name, "--json").stdout)
    return st["config"]


def test_config_file_brings_a_pair_up_again(tmp_path):
    name = "ops-c"
    share = tmp_path / "app"
    share.mkdir()
    args = ["--size", "16m", "--users", "2", "--extent", "4m", "--max-users", "3",
            "--max-channels", "7", "--max-pinned", "8m", "--share", f"{share}:/app"]
    path = tmp_path / f"{name}.toml"
    with pair(name, *args):
        path.write_text(drb("status", name, "--config").stdout)
        first = _config(name)
    text = path.read_text()
    for line in ['name = "ops-c"', 'size = "16m"', "users = 2", 'extent = "4m"', "max-users = 3",
                 f'share = ["{share}:/app"]', f"no-monitor = {'false' if MONITORED else 'true'}"]:
        assert line in text.splitlines(), (line, text)
    try:
        drb("up", name, "--config", str(path))
        assert _config(name) == first
        st = json.loads(drb("status", name, "--json").stdout)
        assert st["users"] == ["user0", "user1"] and st["max_users"] == 3
        drb("down", name)
        # Options on the command line win over the file's.
        drb("up", name, "--config", str(path), "--max-channels", "9")
        assert _config(name) == {**first, "max_channels": 9}
    finally:
        drb("down", name, check=False)
        forget_events(name)
    other = drb("up", "ops-c2", "--config", str(path), check=False)
    assert other.returncode == 1 and "the configuration of another pair" in other.stderr
    (tmp_path / "bad.toml").write_text('sise = "1g"\n')
    bad = drb("up", name, "--config", str(tmp_path / "bad.toml"), check=False)
    assert bad.returncode == 1 and "'sise' is no option of drb up" in bad.stderr
    assert wait_gone(lambda: not left_of("ops-c"), 10), left_of("ops-c")


def test_a_pair_as_its_unit_runs_it(tmp_path):
    """What drb@NAME.service does: up in the foreground from its file, down
    on SIGTERM (systemctl stop), then `drb down NAME` (ExecStopPost)."""
    name = "ops-s"
    path = tmp_path / f"{name}.toml"
    path.write_text(f'size = "16m"\nusers = 1\n{"no-monitor = true" if MON else ""}\n')
    unit = subprocess.Popen([DRB, "up", name, "--config", str(path), "--foreground"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: drb("status", name, check=False).returncode == 0
                        or unit.poll() is not None, timeout=60)
        assert unit.poll() is None, unit.stderr.read()
        assert drb("metrics", name).stdout.count(f'drb_pair_up{{pair="{name}"}} 1.0') == 1
        unit.send_signal(signal.SIGTERM)
        assert unit.wait(60) == 0, unit.stderr.read()
    finally:
        if unit.poll() is None:
            unit.kill()
            unit.wait()
        drb("down", name, check=False)          # ExecStopPost: nothing left to do, or it is
        forget_events(name)
    assert wait_gone(lambda: not left_of(name), 10), left_of(name)
    assert not os.path.exists(f"/run/drb/{name}")
