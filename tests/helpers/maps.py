"""Where this process mapped a ring's memory, read from /proc/self/maps
(tests poke at the pages themselves to prove their protection)."""


def address(memfd_name: str, perms: str) -> int:
    """Start of the last mapping of memfd `memfd_name` with `perms` (e.g.
    "rw-s" for a writable shared mapping, "r--s" for a read-only one)."""
    found = None
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[1] == perms and parts[5] == f"/memfd:{memfd_name}":
                found = int(parts[0].split("-")[0], 16)
    if found is None:
        raise LookupError(f"no {perms} mapping of memfd {memfd_name}")
    return found
