"""Log2 histograms printed exactly as bpftrace's hist() prints them.

Buckets follow bpftrace: index 0 holds negative values "(..., 0)", 1 holds
0 "[0]", 2 holds 1 "[1]", and index k+2 holds [2^k, 2^(k+1)) for k >= 1.
Only the rows from the lowest to the highest non-empty bucket are printed;
bars are 52 '@' wide at the largest count.
"""

from __future__ import annotations

from collections import Counter

from drb_uring.enforce.tasks import log2_bucket

BAR = 52
_SUFFIX = ["", "K", "M", "G", "T", "P", "E"]


def bucket(value: int) -> int:
    """The bucket of a value: 0 for negatives, else the one numbering that
    the eBPF program and the user side also use (bpf/drb_task.h)."""
    return 0 if value < 0 else log2_bucket(value)


def _num(power: int) -> str:
    """2**power with bpftrace's 1024-based suffixes."""
    unit = min(power // 10, len(_SUFFIX) - 1)
    return f"{(1 << power) >> (10 * unit)}{_SUFFIX[unit]}"


def label(index: int) -> str:
    if index == 0:
        return "(..., 0)"
    if index == 1:
        return "[0]"
    if index == 2:
        return "[1]"
    k = index - 2
    return f"[{_num(k)}, {_num(k + 1)})"


def counts(values) -> Counter:
    return Counter(bucket(int(v)) for v in values)


def format_hist(name: str, buckets: dict[int, int]) -> str:
    """The text bpftrace prints for `@name = hist(...)`, ending in a blank line."""
    nonzero = [i for i, c in buckets.items() if c]
    out = [f"@{name}: "]
    if nonzero:
        top = max(buckets[i] for i in nonzero)
        for i in range(min(nonzero), max(nonzero) + 1):
            c = buckets.get(i, 0)
            bar = "@" * (c * BAR // top)
            out.append(f"{label(i):<16}{c:>8} |{bar:<{BAR}}|")
    return "\n".join(out) + "\n\n"
