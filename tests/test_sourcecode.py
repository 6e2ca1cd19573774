"""Lint as a test, so style holds without anyone remembering it."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_clean():
    ruff = os.path.join(os.path.dirname(sys.executable), "ruff")
    proc = subprocess.run([ruff, "check", "."],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr



def test_parts_stay_small():
    """No Python file of the package over 600 lines, the broker a router
    under 400: a part that grows past that is two parts."""
    big = []
    for dirpath, _dirs, files in os.walk(os.path.join(ROOT, "drb_uring")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                with open(path) as fh:
                    n = sum(1 for _ in fh)
                limit = 400 if f == "broker.py" else 600
                if n >= limit:
                    big.append((os.path.relpath(path, ROOT), n))
    assert big == []
