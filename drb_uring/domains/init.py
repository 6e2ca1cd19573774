"""PID 1 of a domain that drb makes (python -m drb_uring.domains.init).

runc sets the domain up (namespaces, root, mounts, host name, filters);
this process only does what a PID 1 must: reap whatever is reparented to
it, and end the domain on SIGTERM or SIGINT. When it exits the kernel ends
every process of the domain.
"""

from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    wanted = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)    # taken, not delivered
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        got = signal.sigtimedwait(wanted, 60.0)
        if got is not None and got.si_signo != signal.SIGCHLD:
            return 0


if __name__ == "__main__":
    sys.exit(main())
