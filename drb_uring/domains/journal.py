"""A pair's events, one JSON object a line, kept where `drb down` leaves them.

The pair's daemon appends what happens to the pair (up and down, user
domains added and removed, channels opened and closed, violations, worker
deaths and restarts, the monitor's going and return); `drb down` adds the
end of a pair whose daemon died. The log is /var/log/drb/NAME/events.log,
root's alone, rotated at ROTATE_BYTES into events.log.1 .. events.log.KEEP:
it outlives the pair's state under /run/drb/NAME, which goes with the pair.

Each line: {"ts": seconds since the epoch, "pair": NAME, "event": KIND,
...what the event says}. drb_uring.ops.events reads and prints them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time

LOG_DIR = "/var/log/drb"
ROTATE_BYTES = 1 << 20
KEEP = 3

log = logging.getLogger("drb.journal")


def events_dir(name: str) -> str:
    return os.path.join(LOG_DIR, name)


def events_path(name: str) -> str:
    return os.path.join(events_dir(name), "events.log")


def rotated(name: str) -> list[str]:
    """The pair's event files, oldest first."""
    base = events_path(name)
    return [p for p in [f"{base}.{k}" for k in range(KEEP, 0, -1)] + [base]
            if os.path.exists(p)]


def logged_pairs() -> list[str]:
    try:
        return sorted(n for n in os.listdir(LOG_DIR)
                      if os.path.isdir(os.path.join(LOG_DIR, n)))
    except FileNotFoundError:
        return []


def _rotate(base: str) -> None:
    for k in range(KEEP - 1, 0, -1):
        if os.path.exists(f"{base}.{k}"):
            os.replace(f"{base}.{k}", f"{base}.{k + 1}")
    os.replace(base, f"{base}.1")


def record(name: str, event: str, **fields) -> None:
    """Append one event of pair `name`. Writers (the daemon, `drb down`)
    take the lock file beside the log, so that a rotation never splits a
    line nor loses one."""
    line = json.dumps({"ts": round(time.time(), 6), "pair": name, "event": event, **fields},
                      separators=(",", ":"), default=str) + "\n"
    d = events_dir(name)
    os.makedirs(d, mode=0o700, exist_ok=True)
    base = events_path(name)
    lock = os.open(os.path.join(d, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if os.path.getsize(base) + len(line) > ROTATE_BYTES:
                _rotate(base)
        fd = os.open(base, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    finally:
        os.close(lock)


class Journal:
    """The daemon's writer: an event that cannot be written is logged, never
    raised (the pair matters more than its record)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, event: str, **fields) -> None:
        try:
            record(self.name, event, **fields)
        except OSError as e:
            log.error("event %s not recorded in %s: %s", event, events_path(self.name), e)
