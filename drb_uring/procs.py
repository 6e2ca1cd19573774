"""The one way drb starts its own helper processes.

A helper is ``python -m drb_uring.<part>.<module> SPEC``: the same
interpreter, an environment in which it imports this very build, and a
single JSON spec (see drb_uring.spec) as its only argument. The child
parses it with :func:`spec_from_argv`.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
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


class Child:
    """A child process started by :func:`spawn_at`: the part of
    subprocess.Popen's interface the callers use."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            if self.returncode is None:
                self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            return self.returncode
        end = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() >= end:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.005)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


NULL = -1      # for spawn_at's stdio: /dev/null


def spawn_at(argv: list[str], fds, *, env: dict | None = None, stdin: int | None = NULL,
             stdout: int | None = NULL, stderr: int | None = NULL,
             die_with_parent: bool = True, new_session: bool = True,
             before_exec=None) -> Child:
    """Start argv with fds[i] as its file descriptor 3 + i, and no other fd
    beyond stdio: what `runc exec --preserve-fds N` passes on. (Popen cannot
    place descriptors: it keeps them at their numbers.) Each stdio stream
    is an fd, NULL for /dev/null, or None to inherit ours.

    `before_exec`, if given, runs in the child after the fds are in place
    (for joining a container); it must not return if it fails."""
    fds = list(fds)
    env = module_env() if env is None else env
    # Out of the way of 3..3+n first, so that placing one cannot clobber another.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 1024) for fd in fds]
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        pid = os.fork()
        if pid == 0:
            try:
                if new_session:
                    os.setsid()
                if die_with_parent:
                    from drb_uring import linux
                    linux.die_with_parent()
                for n, fd in enumerate((stdin, stdout, stderr)):
                    if fd is not None:
                        os.dup2(null if fd == NULL else fd, n)
                for i, h in enumerate(high):
                    os.dup2(h, 3 + i)            # dup2 leaves the copy inheritable
                os.closerange(3 + len(high), 0x7FFFFFFF)    # close_range(2): no fd beyond
                if before_exec is not None:
                    before_exec()
                os.execvpe(argv[0], argv, env)
            except BaseException as e:           # never return into the parent's code
                os.write(2, f"drb: cannot start {argv[0]}: {e}\n".encode())
            os._exit(127)
        return Child(pid)
    finally:
        for h in high:
            os.close(h)
        os.close(null)
