"""Run a command in a private mount namespace (as drb's own daemon does),
so that what it mounts never reaches the host, chroot or not:

    python private_ns.py CMD ARGS...
"""
import os
import sys

from drb_uring import linux

linux.private_mount_namespace()
os.execvp(sys.argv[1], sys.argv[1:])
