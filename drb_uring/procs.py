"""The one way drb starts its own helper processes.

A helper is ``python -m drb_uring.<part>.<module> SPEC``: the same
interpreter, an environment in which it imports this very build, and a
single JSON spec (see drb_uring.spec) as its only argument. The child
parses it with :func:`spec_from_argv`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from drb_uring.spec import Spec, SpecError


def module_env() -> dict[str, str]:
    """Environment in which ``python -m drb_uring.X`` imports this very build
    (an in-place build or an installed one)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def argv(module: str, spec: Spec) -> list[str]:
    """The command line of helper `module` with `spec`. -P: the working
    directory is not put on the module path, so a `drb_uring` directory
    wherever drb runs (another checkout, say) cannot stand in for this one."""
    return [sys.executable, "-P", "-m", module, spec.to_json()]


def spawn(module: str, spec: Spec, fds=(), **kw) -> subprocess.Popen:
    """Start helper `module` with `spec`, inheriting exactly `fds`."""
    env = kw.pop("env", None) or module_env()
    return subprocess.Popen(argv(module, spec), pass_fds=list(fds), env=env, **kw)


def spec_from_argv(cls: type[Spec], args: list[str] | None = None):
    """In the helper: its spec, or exit 2 naming what is wrong with it."""
    args = sys.argv[1:] if args is None else args
    if len(args) != 1:
        sys.exit(f"{cls.__name__}: expected one JSON spec argument, got {len(args)}")
    try:
        return cls.from_json(args[0])
    except SpecError as e:
        print(f"drb: bad spec: {e}", file=sys.stderr)
        sys.exit(2)
