"""Helpers for the operating tests (metrics, events, units, the OCI hook).

Their pairs run under the eBPF monitor, as `drb up` makes them, unless
DRB_TEST_NO_MONITOR=1 (then with --no-monitor: what the monitor alone
measures, latency and per-domain counters, is not checked).
"""
import contextlib
import json
import os
import shutil
import socket
import time

from pair_env import drb, leftovers, wait_gone

from drb_uring.domains import journal

PREFIX = "ops-"
MONITORED = os.environ.get("DRB_TEST_NO_MONITOR") != "1"
MON = [] if MONITORED else ["--no-monitor"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def forget_events(name: str) -> None:
    shutil.rmtree(journal.events_dir(name), ignore_errors=True)


@contextlib.contextmanager
def pair(name: str, *args, keep_events=False):
    """A pair brought up with the CLI (its events log fresh), its status;
    down at the end, nothing of it left (but its events log, if asked)."""
    assert name.startswith(PREFIX)
    drb("down", name, check=False)
    forget_events(name)
    try:
        drb("up", name, *MON, *args)
        yield json.loads(drb("status", name, "--json").stdout)
    finally:
        drb("down", name, check=False)
        assert wait_gone(lambda: not left_of(name), 10), left_of(name)
        if not keep_events:
            forget_events(name)


def left_of(name: str) -> list[str]:
    """What is left of a pair (a `drb events NAME --follow` reader is not)."""
    return [x for x in leftovers(name) if "/drb events " not in x]


def events(name: str) -> list[dict]:
    return [json.loads(line) for line in drb("events", name, "--json").stdout.splitlines()]


def wait_for(pred, timeout=10.0, every=0.05):
    end = time.monotonic() + timeout
    while True:
        got = pred()
        if got or time.monotonic() > end:
            return got
        time.sleep(every)
