"""What a fresh machine lacks must not matter: the monitor starts and
enforces with neither tracefs nor debugfs mounted (raw tracepoints attach
by name, and tracepoints are found in the kernel's BTF)."""
import os
import subprocess
import sys
import textwrap

from channel_env import PRIVATE_NS

from drb_uring import procs

INSIDE = textwrap.dedent("""
    import os, pathlib, tempfile
    for p in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing", "/sys/kernel/debug"):
        assert not os.path.ismount(p), p + " is mounted"
    assert not pathlib.Path("/sys/kernel/tracing/events").exists()
    from channel_env import BrokerProc
    from drb_uring.channel.client import Channel
    from drb_uring.ring import layout as L
    with tempfile.TemporaryDirectory() as d:
        m = BrokerProc(pathlib.Path(d), size=16 << 20)
        try:
            with Channel(m.sock_path, 1 << 20,
                         geometry=L.Geometry(slot_size=65536, slot_count=4)) as ch:
                ch.pwrite(0, b"fresh")
                print(ch.monitored, ch.pread(0, 5).decode())
        finally:
            m.stop()
""")

# In a private mount namespace (helpers/private_ns.py): tracefs and debugfs
# unmounted (if this host has them), and a private /run, so that this test
# starts its own enforcement service instead of reusing the host's.
SHELL = """
set -e
for m in /sys/kernel/debug/tracing /sys/kernel/tracing /sys/kernel/debug; do
    while mountpoint -q "$m"; do umount -l "$m"; done
done
mount -t tmpfs tmpfs /run
exec "$@"
"""


def test_monitor_starts_without_tracefs_or_debugfs():
    env = procs.module_env()
    env["PYTHONPATH"] += os.pathsep + os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, PRIVATE_NS, "sh", "-c",
                           SHELL, "sh", sys.executable, "-c", INSIDE],
                          capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "fresh"]
