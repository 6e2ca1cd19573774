"""`drb events [NAME] [--follow] [--json]`: what happened to pairs, one line
an event, from the logs their daemons keep (domains.journal), which stay
after the pair is down.

A line: the time (local, ISO 8601 with milliseconds and the offset), the
pair, the event, then what the event says as key=value (a value with a
space or a quote is a JSON string). With --json, each line is the event's
JSON object with "time" added.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

from drb_uring.domains import journal
from drb_uring.domains.config import check_name
from drb_uring.domains.state import require_root
from drb_uring.errors import DrbError

FIRST = ("user", "channel", "reason")
POLL = 0.2


class EventsError(DrbError):
    pass


def when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="milliseconds")


def _text(v) -> str:
    if isinstance(v, str) and v and not any(c in v for c in ' "=\\\n'):
        return v
    return json.dumps(v, separators=(",", ":"))


def format_event(ev: dict, as_json: bool = False) -> str:
    if as_json:
        return json.dumps({"time": when(ev.get("ts", 0)), **ev}, separators=(",", ":"))
    rest = {k: v for k, v in ev.items() if k not in ("ts", "pair", "event")}
    keys = [k for k in FIRST if k in rest] + [k for k in rest if k not in FIRST]
    fields = " ".join(f"{k}={_text(rest[k])}" for k in keys if rest[k] is not None)
    return f"{when(ev.get('ts', 0))} {ev.get('pair', '?')} {ev.get('event', '?')}" + \
        (f" {fields}" if fields else "")


def parse_line(line: str) -> dict | None:
    try:
        ev = json.loads(line)
    except ValueError:
        return None
    return ev if isinstance(ev, dict) and "event" in ev else None


def read(names: list[str]) -> list[dict]:
    """Every event kept for these pairs, in time order."""
    out = []
    for name in names:
        for path in journal.rotated(name):
            with open(path, errors="replace") as f:
                out += [ev for ev in map(parse_line, f) if ev is not None]
    out.sort(key=lambda ev: ev.get("ts", 0))
    return out


class Tail:
    """New lines of one pair's log, across rotations."""

    def __init__(self, name: str, from_start: bool):
        self.path = journal.events_path(name)
        self.f = None
        self.partial = ""
        self._open(from_start)

    def _open(self, from_start: bool) -> None:
        try:
            self.f = open(self.path, errors="replace")
        except FileNotFoundError:
            self.f = None
            return
        if not from_start:
            self.f.seek(0, os.SEEK_END)

    def lines(self) -> list[str]:
        if self.f is None:
            self._open(True)
            if self.f is None:
                return []
        got = self._drain()
        try:
            rotated = os.stat(self.path).st_ino != os.fstat(self.f.fileno()).st_ino
        except FileNotFoundError:
            rotated = False
        if rotated:
            # The rest of the old file, then the new one from its start.
            self.f.close()
            self._open(True)
            got += self._drain()
        return got

    def _drain(self) -> list[str]:
        text = self.partial + self.f.read()
        *whole, self.partial = text.split("\n")
        return whole

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def run(name: str | None, follow: bool, as_json: bool, out=sys.stdout) -> int:
    require_root()
    if name:
        check_name(name)
    names = [name] if name else journal.logged_pairs()
    if name and not journal.rotated(name) and not follow:
        raise EventsError(f"no events recorded for pair {name!r} "
                          f"(none in {journal.events_dir(name)})")
    for ev in read(names):
        print(format_event(ev, as_json), file=out)
    out.flush()
    if not follow:
        return 0
    tails = {n: Tail(n, from_start=False) for n in names}
    try:
        while True:
            time.sleep(POLL)
            if name is None:
                for n in journal.logged_pairs():
                    if n not in tails:
                        tails[n] = Tail(n, from_start=True)
            batch = [ev for t in tails.values() for ev in map(parse_line, t.lines())
                     if ev is not None]
            for ev in sorted(batch, key=lambda ev: ev.get("ts", 0)):
                print(format_event(ev, as_json), file=out)
            if batch:
                out.flush()
    except KeyboardInterrupt:
        return 0
    finally:
        for t in tails.values():
            t.close()
