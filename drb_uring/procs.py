"""Starting the project's own helper processes (workers, ring peers)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def module_env() -> dict[str, str]:
    """Environment in which ``python -m drb_uring.X`` imports this very build
    (an in-place build or an installed one)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def spawn_module(module: str, args: list[str], fds: list[int], **kw) -> subprocess.Popen:
    """Run ``python -m module args`` inheriting exactly ``fds``."""
    return subprocess.Popen([sys.executable, "-m", module, *args], pass_fds=fds,
                            env=kw.pop("env", None) or module_env(), **kw)
