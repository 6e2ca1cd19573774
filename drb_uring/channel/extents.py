"""Which part of the device each channel may touch.

The broker alone decides a channel's extent; the worker is told it and the
monitor's program enforces it. Pure logic, so it is tested without root.
"""

from __future__ import annotations

from drb_uring.errors import DrbError


class ExtentError(DrbError):
    """No free extent of the size asked for."""


class Extents:
    """First-fit allocation of disjoint (base, size) extents of [0, size)."""

    def __init__(self, size: int, align: int = 1):
        if size < 0 or align < 1 or align & (align - 1):
            raise ValueError(f"bad device size {size} or alignment {align}")
        self.size = size
        self.align = align
        self.free: list[tuple[int, int]] = [(0, size)] if size else []   # sorted, disjoint

    def alloc(self, size: int) -> tuple[int, int]:
        """An extent of `size` bytes (rounded up to the alignment)."""
        if size <= 0:
            raise ValueError(f"extent size must be positive, got {size}")
        size = -(-size // self.align) * self.align
        for i, (base, n) in enumerate(self.free):
            if n >= size:
                self.free[i:i + 1] = [(base + size, n - size)] if n > size else []
                return base, size
        raise ExtentError(f"no free extent of {size} bytes on the device "
                          f"(largest free: {max((n for _, n in self.free), default=0)})")

    def alloc_at(self, base: int, size: int) -> tuple[int, int]:
        """The extent [base, base + size) itself (size rounded up to the
        alignment), if every byte of it is free."""
        if size <= 0 or base < 0:
            raise ValueError(f"bad extent {base}+{size}")
        if base % self.align:
            raise ExtentError(f"offset {base} is not a multiple of the device's alignment "
                              f"({self.align})")
        size = -(-size // self.align) * self.align
        for i, (b, n) in enumerate(self.free):
            if b <= base and base + size <= b + n:
                rest = [(b, base - b)] if base > b else []
                if base + size < b + n:
                    rest.append((base + size, b + n - base - size))
                self.free[i:i + 1] = rest
                return base, size
        if base + size > self.size:
            raise ExtentError(f"{base}+{size} runs past the user domain's extent of "
                              f"{self.size} bytes")
        raise ExtentError(f"{base}+{size} overlaps another channel of the user domain")

    def fits(self, size: int, base: int | None = None) -> bool:
        """Whether alloc(size), or alloc_at(base, size), would succeed now."""
        size = -(-size // self.align) * self.align
        if base is not None:
            return any(b <= base and base + size <= b + n for b, n in self.free)
        return any(n >= size for _, n in self.free)

    def release(self, base: int, size: int) -> None:
        """Give an extent back; neighbours merge. Refuses what was not handed out."""
        end = base + size
        if size <= 0 or base < 0 or end > self.size or any(
                b < end and base < b + n for b, n in self.free):
            raise ValueError(f"extent {base}+{size} was not allocated")
        self.free.append((base, size))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for b, n in self.free:
            if merged and merged[-1][0] + merged[-1][1] == b:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((b, n))
        self.free = merged

    @property
    def free_bytes(self) -> int:
        return sum(n for _, n in self.free)
