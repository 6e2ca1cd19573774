"""``drb report``: a ``drb bench --json`` file as a paper-style table and plots.

Writes DIR/report.md (the machine, how the figures were taken, the table
of transports by metric with ratios to grant-map and to direct, the
targets with their measured values, fio's reference, the latency
histograms) and four PNG plots made with matplotlib.
"""

from __future__ import annotations

import json
import os

from drb_uring.errors import DrbError
from drb_uring.tools import hist

ORDER = ("drb", "drb-poll", "grant-map", "socket", "direct")
PLOTS = ("iops_vs_qd.png", "latency_vs_bs.png", "per_io_costs.png", "iops_vs_users.png")


class ReportError(DrbError):
    pass


def load(path: str) -> dict:
    try:
        with open(path) as f:
            rep = json.load(f)
    except OSError as e:
        raise ReportError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise ReportError(f"{path} is not JSON: {e}") from None
    if not isinstance(rep, dict) or rep.get("schema") != 1 or not isinstance(rep.get("runs"), list):
        raise ReportError(f"{path} is not a drb bench result (schema 1 with runs)")
    if not rep["runs"] and not isinstance(rep.get("disk"), dict):
        raise ReportError(f"{path} has no runs")
    return rep


def _runs(rep: dict) -> list[dict]:
    """One row per cell: the median-IOPS repeat, monitored double ring only
    (monitor-off rows are for the on/off ratio)."""
    by: dict = {}
    for r in rep["runs"]:
        if not r.get("monitor", True) and r["transport"].startswith("drb"):
            continue
        key = (r["transport"], r["op"], r["bs"], r["qd"], r.get("users", 1))
        by.setdefault(key, []).append(r)
    out = []
    for rows in by.values():
        rows.sort(key=lambda r: r["iops"])
        out.append(rows[len(rows) // 2])
    return sorted(out, key=lambda r: (_rank(r["transport"]), r["op"], r["bs"], r["qd"],
                                      r.get("users", 1)))


def _rank(t: str) -> int:
    return ORDER.index(t) if t in ORDER else len(ORDER)


def _cell(runs, transport, op, bs, qd, users=1):
    for r in runs:
        if (r["transport"], r["op"], r["bs"], r["qd"], r.get("users", 1)) == \
                (transport, op, bs, qd, users):
            return r
    return None


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a is not None and b not in (None, 0) else None


def targets(rep: dict) -> list[dict]:
    """The evaluation's targets, each with its measured value (None when
    the run did not have the cells); a disk run's (drb bench --disk) alone."""
    if not rep["runs"]:
        return list(rep.get("disk", {}).get("goals", []))
    runs = _runs(rep)

    def get(t, op, bs, qd, key, users=1):
        r = _cell(runs, t, op, bs, qd, users)
        if r is None:
            return None
        v = r
        for k in key.split("."):
            v = v.get(k)              # older results lack the newer fields
            if v is None:
                return None
        return v

    def per_io_max(t, qd):
        r = _cell(runs, t, "randread", 4096, qd)
        return None if r is None else max(r["per_io"]["syscalls_user"],
                                          r["per_io"]["syscalls_driver"])

    def qd(t, q, key):
        return get(t, "randread", 4096, q, key)

    def driver_sys(t, q):
        return qd(t, q, "per_io.syscalls_driver")

    mon = [m["iops_on_over_off"] for m in rep.get("monitor_ratio", [])
           if m["transport"] == "drb" and m["op"] == "randread" and m["bs"] == 4096
           and m["qd"] in (1, 32)]
    one = get("drb", "randread", 4096, 32, "iops")
    many = get("drb", "randread", 4096, 32, "iops", users=16)
    tail = _tail_ratio(runs)
    rows = [
        ("4k randread qd1 p50 latency, grant-map / drb", ">= 10",
         _ratio(get("grant-map", "randread", 4096, 1, "lat_us.p50"),
                get("drb", "randread", 4096, 1, "lat_us.p50")), 10, True),
        ("4k randread qd32 IOPS, drb / grant-map", ">= 10",
         _ratio(one, get("grant-map", "randread", 4096, 32, "iops")), 10, True),
        ("4k randread qd32 IOPS, drb / direct", ">= 0.7",
         _ratio(one, get("direct", "randread", 4096, 32, "iops")), 0.7, True),
        ("system calls per I/O at qd32, drb, the busier domain", "<= 0.05",
         per_io_max("drb", 32), 0.05, False),
        ("mmap + munmap per I/O, drb", "0", get("drb", "randread", 4096, 32, "per_io.map_ops"),
         0, False),
        ("mmap + munmap per I/O, grant-map", "2",
         get("grant-map", "randread", 4096, 32, "per_io.map_ops"), None, None),
        ("1 MiB sequential read MB/s, drb / direct", ">= 0.9",
         _ratio(get("drb", "read", 1 << 20, 8, "mb_s"), get("direct", "read", 1 << 20, 8, "mb_s")),
         0.9, True),
        ("16 user domains on one driver domain, aggregate / one domain's IOPS", ">= 0.8",
         _ratio(many, one), 0.8, True),
        ("16 user domains on one driver domain, smallest share / mean share", ">= 0.5",
         get("drb", "randread", 4096, 32, "fairness", users=16), 0.5, True),
        ("monitor on / off, drb 4k randread qd1 and qd32 (worst)", ">= 0.97",
         min(mon) if mon else None, 0.97, True),
        # Latency (the double ring against the direct ring at the same depth).
        ("4k randread qd1 p50, drb / direct", "<= 1.3",
         _ratio(qd("drb", 1, "lat_us.p50"), qd("direct", 1, "lat_us.p50")), 1.3, False),
        ("4k randread qd1 IOPS, drb / direct", ">= 0.75",
         _ratio(qd("drb", 1, "iops"), qd("direct", 1, "iops")), 0.75, True),
        ("4k randread qd32 IOPS, drb / direct (latency goal)", ">= 0.95",
         _ratio(one, qd("direct", 32, "iops")), 0.95, True),
        ("driver system calls per I/O at qd1, drb", "<= 1", driver_sys("drb", 1), 1.0, False),
        ("driver system calls per I/O at qd1, drb-poll", "0", driver_sys("drb-poll", 1),
         0.0, False),
        ("driver system calls per I/O at qd32, drb", "<= 0.05", driver_sys("drb", 32), 0.05,
         False),
        ("p99 / p50 at qd32 in 16 user domains, drb (the highest of the domains' each)",
         "<= 10", tail, 10, False),
    ]
    out = []
    for name, goal, value, bound, at_least in rows:
        if value is None:
            met = None
        elif bound is None:
            met = value == 2
        elif at_least:
            met = value >= bound
        else:
            met = value <= bound
        out.append({"target": name, "goal": goal, "measured": value, "met": met})
    return out


def _tail_ratio(runs) -> float | None:
    r = _cell(runs, "drb", "randread", 4096, 32, 16)
    return None if r is None else _ratio(r["lat_us"]["p99"], r["lat_us"]["p50"])


def floor_us(rep: dict) -> tuple[float, float, float] | None:
    """The depth-1 floor: direct's p50 plus two cache-line hand-offs (the
    request to the worker, the answer back), each half the measured raw
    round trip. Returns (direct p50, hand-offs, floor) in microseconds."""
    raw = rep.get("floor", {}).get("raw_rtt_ns")
    d = _cell(_runs(rep), "direct", "randread", 4096, 1)
    if raw is None or d is None:
        return None
    hand = raw["p50"] / 1000            # two one-way hand-offs = one round trip
    return d["lat_us"]["p50"], hand, d["lat_us"]["p50"] + hand


def floor_line(rep: dict) -> str | None:
    f = floor_us(rep)
    drb = _cell(_runs(rep), "drb", "randread", 4096, 1)
    if f is None or drb is None:
        return None
    return (f"Floor at depth 1: direct p50 {f[0]:.2f} us + two cache-line hand-offs "
            f"{f[1]:.2f} us (raw round trip between the two cores) = {f[2]:.2f} us; "
            f"drb p50 {drb['lat_us']['p50']:.2f} us ({drb['lat_us']['p50'] / f[2]:.2f} x "
            "the floor).")


def _fmt(v, nd=2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def table_md(rep: dict) -> str:
    """Transports by metric, with ratios to grant-map and to direct."""
    runs = _runs(rep)
    # The paper's two costs first: mode switches and mappings per I/O.
    metrics = [
        ("syscalls/I/O user, qd32", ("randread", 4096, 32),
         lambda r: r["per_io"]["syscalls_user"]),
        ("syscalls/I/O driver, qd32", ("randread", 4096, 32),
         lambda r: r["per_io"]["syscalls_driver"]),
        ("ctx switches/I/O, qd32", ("randread", 4096, 32), lambda r: r["per_io"]["ctx_switches"]),
        ("mmap+munmap/I/O, qd32", ("randread", 4096, 32), lambda r: r["per_io"]["map_ops"]),
        ("4k randread qd1 p50 (us)", ("randread", 4096, 1), lambda r: r["lat_us"]["p50"]),
        ("4k randread qd1 IOPS", ("randread", 4096, 1), lambda r: r["iops"]),
        ("4k randread qd32 IOPS", ("randread", 4096, 32), lambda r: r["iops"]),
        ("4k randread qd32 p99 (us)", ("randread", 4096, 32), lambda r: r["lat_us"]["p99"]),
        ("1 MiB read qd8 MB/s", ("read", 1 << 20, 8), lambda r: r["mb_s"]),
    ]
    transports = sorted({r["transport"] for r in runs}, key=_rank)
    lines = ["| metric | " + " | ".join(transports) + " | drb / grant-map | drb / direct |",
             "|---" * (len(transports) + 3) + "|"]
    for name, (op, bs, qd), get in metrics:
        vals = {t: (get(r) if (r := _cell(runs, t, op, bs, qd)) else None) for t in transports}
        if all(v is None for v in vals.values()):
            continue
        row = [name] + [_fmt(vals[t]) for t in transports]
        row.append(_fmt(_ratio(vals.get("drb"), vals.get("grant-map")), 3))
        row.append(_fmt(_ratio(vals.get("drb"), vals.get("direct")), 3))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def over_direct(runs, r) -> float | None:
    """A cell's IOPS over the direct ring's in the same cell (one user
    domain's direct cell for a many-domain one: direct has no domains)."""
    d = _cell(runs, "direct", r["op"], r["bs"], r["qd"])
    return None if d is None else _ratio(r["iops"], d["iops"])


def all_runs_md(rep: dict) -> str:
    lines = ["| transport | op | bs | qd | users | IOPS | IOPS / direct | MB/s | p50 us | p99 us "
             "| p99.9 us | sys/IO user | sys/IO driver | ctx/IO | mmap+munmap/IO |",
             "|---" * 15 + "|"]
    runs = _runs(rep)
    for r in runs:
        c, lat = r["per_io"], r["lat_us"]
        lines.append(f"| {r['transport']} | {r['op']} | {r['bs']} | {r['qd']} | "
                     f"{r.get('users', 1)} | {r['iops']} | {_fmt(over_direct(runs, r), 3)} | "
                     f"{r['mb_s']} | {lat['p50']:.2f} | "
                     f"{lat['p99']:.2f} | {lat['p999']:.2f} | {c['syscalls_user']} | "
                     f"{c['syscalls_driver']} | {c['ctx_switches']} | {c['map_ops']} |")
    return "\n".join(lines)


# ---- plots ---------------------------------------------------------------------------

def _plots(rep: dict, out: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    runs = _runs(rep)
    written = []

    def save(fig, name):
        fig.tight_layout()
        path = os.path.join(out, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    def finish(ax, xlabel, ylabel, title, name, **legend):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3, **({"axis": "y"} if name == PLOTS[2] else {}))
        ax.legend(**legend)
        save(ax.figure, name)

    def most_common(key):
        counts: dict = {}
        for r in runs:
            counts[key(r)] = counts.get(key(r), 0) + 1
        return max(counts, key=counts.get)

    # IOPS against queue depth, at the most measured op and block size.
    op, bs = most_common(lambda r: (r["op"], r["bs"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in sorted({r["transport"] for r in runs}, key=_rank):
        pts = sorted((r["qd"], r["iops"]) for r in runs
                     if (r["transport"], r["op"], r["bs"], r.get("users", 1)) == (t, op, bs, 1))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] / 1e3 for p in pts], marker="o", label=t)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    finish(ax, "queue depth (requests in flight)", "thousand I/Os per second",
           f"IOPS against queue depth, {op} {_size(bs)}", PLOTS[0])

    # Latency percentiles against block size, at the smallest queue depth.
    qd = min(r["qd"] for r in runs)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in sorted({r["transport"] for r in runs}, key=_rank):
        pts = sorted((r["bs"], r["lat_us"]["p50"], r["lat_us"]["p99"]) for r in runs
                     if r["transport"] == t and r["qd"] == qd and r.get("users", 1) == 1)
        if pts:
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                            label=f"{t} p50")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="x", linestyle="--",
                    color=line.get_color(), label=f"{t} p99")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: _size(int(v)) if v >= 1
                                                      else ""))
    finish(ax, "block size (bytes; k = 1024)", "latency (microseconds)",
           f"Latency percentiles against block size, queue depth {qd}", PLOTS[1],
           fontsize=7, ncol=2)

    # Per-I/O costs as bars, at 4k random reads and the deepest queue.
    deep = max((r["qd"] for r in runs if (r["op"], r["bs"]) == ("randread", 4096)), default=None)
    costs = [r for r in runs if (r["op"], r["bs"], r["qd"], r.get("users", 1))
             == ("randread", 4096, deep, 1)] if deep else runs[:5]
    keys = (("syscalls_user", "system calls, user domain"),
            ("syscalls_driver", "system calls, driver domain"),
            ("ctx_switches", "context switches"), ("map_ops", "mmap + munmap"))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(keys)
    for i, (k, label) in enumerate(keys):
        ax.bar([j + i * width for j in range(len(costs))],
               [r["per_io"][k] for r in costs], width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(costs))])
    ax.set_xticklabels([r["transport"] for r in costs])
    finish(ax, "transport", "per I/O (count)",
           f"Per-I/O costs, 4k random reads at queue depth {deep}" if deep else "Per-I/O costs",
           PLOTS[2], fontsize=8)

    # IOPS against the number of user domains on one driver domain.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in sorted({r["transport"] for r in runs}, key=_rank):
        pts = sorted((r.get("users", 1), r["iops"]) for r in runs
                     if (r["transport"], r["op"], r["bs"], r["qd"]) == (t, "randread", 4096, deep))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] / 1e3 for p in pts], marker="o", label=t)
    missing = [s for s in rep.get("skipped", []) if s["cell"].get("users", 1) > 1]
    if missing:
        ax.text(0.02, 0.04, "users > 1 not measured:\n" + missing[0]["reason"],
                transform=ax.transAxes, fontsize=7, wrap=True)
    finish(ax, "user domains served by one driver domain", "aggregate thousand I/Os per second",
           f"IOPS against user domains, randread 4k queue depth {deep}", PLOTS[3])
    return written


def _size(bs: int) -> str:
    for unit, shift in (("M", 20), ("k", 10)):
        if bs >= 1 << shift and bs % (1 << shift) == 0:
            return f"{bs >> shift}{unit}"
    return str(bs)


# ---- the document ------------------------------------------------------------------------

def write(rep: dict, out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    if not rep["runs"]:
        return _write_disk(rep, out)
    plots = _plots(rep, out)
    m = rep.get("machine", {})
    parts = ["# drb bench report", "",
             f"Machine: {_machine_line(m)}", "",
             f"Domains: {rep.get('domains', 'not recorded')}.", "",
             f"Page cache: {rep.get('page_cache', 'not recorded')}.", "",
             "All transports run the same workload loop (C, no GIL) on the same device "
             "file; per-I/O costs are the eBPF monitor's counters of each domain's cgroup "
             "during a counted pass after the timed one.", "",
             "## Transports by metric", "", table_md(rep), "",
             *([line, ""] if (line := floor_line(rep)) else []),
             "## Targets", "",
             "| target | goal | measured | met |", "|---|---|---|---|"]
    for t in targets(rep):
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        parts.append(f"| {t['target']} | {t['goal']} | {_fmt(t['measured'], 3)} | {met} |")
    if rep.get("monitor_ratio"):
        parts += ["", "Monitor on / off (median IOPS): " + "; ".join(
            f"{x['transport']} {x['op']} {_size(x['bs'])} qd{x['qd']}: {x['iops_on_over_off']}"
            for x in rep["monitor_ratio"])]
    if rep.get("fio"):
        parts += ["", "## fio reference (io_uring engine, same file, same CPU as the user "
                  "domain)", "", "| op | bs | qd | IOPS | MB/s | p50 us | p99 us |",
                  "|---|---|---|---|---|---|---|"]
        for f in rep["fio"]:
            parts.append(f"| {f['op']} | {f['bs']} | {f['qd']} | {f['iops']} | {f['mb_s']} | "
                         f"{f['lat_us']['p50']:.2f} | {f['lat_us']['p99']:.2f} |")
        parts += ["", f"Command: `fio {rep['fio'][0]['command']}` (op, bs and depth per row)."]
    if rep.get("skipped"):
        parts += ["", "Not measured: " + "; ".join(
            f"{s['cell']['transport']} users={s['cell'].get('users')} ({s['reason']})"
            for s in rep["skipped"])]
    parts += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})"
                                     for p in plots]
    parts += ["", "## Every cell", "", all_runs_md(rep), "", "## Latency histograms", ""]
    for r in _runs(rep):
        if r.get("hist_us"):
            b = {int(k): v for k, v in r["hist_us"].items()}
            parts += ["```", hist.format_hist(
                f"usecs_{r['transport']}_{r['op']}_{_size(r['bs'])}_qd{r['qd']}", b).rstrip(),
                "```", ""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")
    return [path, *plots]


def _write_disk(rep: dict, out: str) -> list[str]:
    """A drb bench --disk run: its tables only (no transports, no plots)."""
    from drb_uring.tools import diskbench
    parts = ["# drb bench --disk report", "", f"Machine: {_machine_line(rep.get('machine', {}))}",
             "", *diskbench.report_md(rep)]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")
    return [path]


def _machine_line(m: dict) -> str:
    keys = ("cpu", "cpus", "kernel", "python")
    vals = [f"{k} {m[k]}" for k in keys if k in m]
    return ", ".join(vals) if vals else json.dumps(m)

