"""A pair's configuration: what ``drb up`` was asked for, validated once.

The CLI builds it from its arguments, the pair's daemon receives it as its
spec, and nothing else decides what a pair is. Pure logic: tested without
root.
"""

from __future__ import annotations

import dataclasses
import re

from drb_uring.spec import Spec, SpecError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,30}$")
FAMILIES = {"unix": 1, "inet": 2, "inet6": 10, "netlink": 16, "packet": 17}
DEFAULT_DENY = ("inet", "inet6", "packet")
MIN_SIZE = 1 << 20
MAX_USERS = 64                     # user domains on one driver domain
FILE_SYSTEMS = ("ext4",)           # what --fs can put on the disk (formatted in the domain)
EXTENT_UNIT = 1 << 20              # a default split rounds each user domain's extent down to this
EXTENT_ALIGN = 4096                # an --extent must be a multiple of this
USER_RE = re.compile(r"^user(0|[1-9][0-9]?)$")
_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'4k', '64m', '1g', '2t' or plain bytes; powers of 1024."""
    t = str(text).strip().lower()
    mult = _UNITS.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in _UNITS else t
    if not digits.isdigit():
        raise SpecError(f"not a size: {text!r} (a number with an optional suffix "
                        f"k, m, g or t, e.g. 4k, 256m, 1g)")
    n = int(digits) * mult
    if n <= 0:
        raise SpecError(f"size must be positive: {text!r}")
    return n


def user_index(name: str) -> int:
    """K of user domain 'userK' ('user' is user0); -1 for anything else."""
    if name == "user":
        return 0
    m = USER_RE.match(name)
    return int(m.group(1)) if m else -1


def user_name(name: str) -> str:
    """'user' -> 'user0'; other names as they are."""
    return "user0" if name == "user" else name


def check_extent(extent: int) -> None:
    if extent < MIN_SIZE or extent % EXTENT_ALIGN:
        raise SpecError(f"--extent must be at least 1m and a multiple of 4k, got {extent}")


def split_device(device_size: int, users: int, extent: int | None = None,
                 align: int = 0) -> list[tuple[int, int]]:
    """Each user domain's extent of the device, (base, size), user0 first:
    `extent` bytes each, or by default the device split evenly, each part
    rounded down to 1 MiB (a multiple of any O_DIRECT alignment up to it).
    `align` is the device's O_DIRECT alignment (0: none)."""
    if not 1 <= users <= MAX_USERS:
        raise SpecError(f"--users must be in [1, {MAX_USERS}], got {users}")
    if extent is None:
        each = device_size // users // EXTENT_UNIT * EXTENT_UNIT
        if each < MIN_SIZE:
            raise SpecError(f"a device of {device_size} bytes split among {users} user "
                            f"domains leaves less than 1 MiB each; use a larger device "
                            f"or fewer --users")
    else:
        check_extent(extent)
        each = extent
        if users * each > device_size:
            raise SpecError(f"{users} user domains of --extent {each} bytes need "
                            f"{users * each} bytes; the device has {device_size}")
    if align and each % align:
        raise SpecError(f"--extent {each} is not a multiple of the device's O_DIRECT "
                        f"alignment ({align})")
    return [(k * each, each) for k in range(users)]


def free_extent(device_size: int, taken: list[tuple[int, int]], size: int,
                align: int = 0) -> tuple[int, int]:
    """The first gap of `size` bytes among the extents `taken` (for a user
    domain added to a running pair)."""
    check_extent(size)
    if align and size % align:
        raise SpecError(f"--extent {size} is not a multiple of the device's O_DIRECT "
                        f"alignment ({align})")
    at = 0
    for base, n in sorted(taken):
        if base - at >= size:
            break
        at = max(at, base + n)
    if at + size > device_size:
        raise SpecError(f"no free extent of {size} bytes for another user domain: the device's "
                        f"{device_size} bytes are taken by {len(taken)} user domain(s); remove "
                        "one (drb user rm) or give a smaller --extent")
    return at, size


RESERVED_IN_DOMAIN = ("/proc", "/sys", "/dev", "/run", "/tmp", "/usr", "/etc")


def check_share(item: str) -> tuple[str, str]:
    """HOST_DIR:DOMAIN_DIR, both absolute; the domain's own places are not
    to be covered."""
    host, sep, inside = item.partition(":")
    if not sep or not host.startswith("/") or not inside.startswith("/"):
        raise SpecError(f"--share {item!r}: give HOST_DIR:DOMAIN_DIR, both absolute "
                        "(e.g. /srv/app:/app)")
    norm = "/" + inside.strip("/")
    if norm == "/" or any(norm == r or norm.startswith(r + "/") for r in RESERVED_IN_DOMAIN):
        raise SpecError(f"--share {item!r}: {norm} is the domain's own; choose another "
                        "place (e.g. /app, /data, /srv)")
    return host, norm


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise SpecError(f"bad pair name {name!r}: use 1-31 of a-z, 0-9, '-', '_', "
                        "starting with a letter or digit")


@dataclasses.dataclass(frozen=True)
class PairConfig(Spec):
    name: str
    backing: str | None = None         # an existing file as the device
    size: int = 256 << 20              # or a new file of this size
    blockdev: str | None = None        # or a block device
    o_direct: bool = False
    attach_user: int | None = None     # pair existing containers instead
    attach_driver: int | None = None
    deny: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_DENY))
    no_monitor: bool = False
    max_channels: int = 64              # per user domain
    max_pinned: int = 512 << 20         # bytes of user memory pinned, per user domain
    user_rootfs: str | None = None      # an unpacked image as the user domain's root
    driver_rootfs: str | None = None
    domain_pids: int = 512              # processes per domain
    domain_memory: int = 4 << 30        # bytes of memory per domain
    worker_spin_ns: int | None = None   # how long an idle worker polls before it sleeps
    # The user domain may drive an io_uring it is handed: only for drb
    # bench's `direct` baseline (the ceiling without isolation), never drb up.
    user_io_uring: bool = False
    users: int = 1                      # user domains user0 .. user{N-1}
    extent: int | None = None           # bytes of the device per user domain (default: split)
    # CPUs the driver domain's workers (one per user domain) may run on: the
    # first N this host gives the daemon; 0 = any.
    driver_cpus: int = 1
    # Bring the eBPF monitor back if it dies, and carry the channels on
    # (drb up --restart); without it they fail with the reason.
    restart: bool = False
    # Use a backing file its mode says is read-only (drb would write it).
    force: bool = False
    # Hold the backing file (or block device) exclusively: drb bench's
    # pairs share one data file, one cell at a time, and say False.
    exclusive: bool = True
    # Host directories shown read-only in every user domain: ["HOST:DOMAIN", ...].
    share: list[str] = dataclasses.field(default_factory=list)
    # Attach mode: pair a container in the host's user (pid, mount) namespace.
    allow_host_userns: bool = False
    # Every user domain gets its extent as a disk, a regular file at
    # disk_path inside (drb up --disk), served by a FUSE server of its own;
    # with fs ("ext4") formatted once and mounted at fs_mount by fuse2fs.
    disk: bool = False
    disk_path: str = "/dev/drb/disk"
    fs: str | None = None
    fs_mount: str = "/data"
    disk_page_cache: bool = False
    # User domains the pair may have at once, however they come (drb user
    # add, the OCI hook).
    max_users: int = MAX_USERS
    # Give each user domain a loop device that is its extent (the kernel
    # then refuses I/O past it): None = with O_DIRECT, where the monitor's
    # kill comes too late to stop a direct write (see docs/security.md).
    loop_extents: bool | None = None

    def check(self) -> None:
        check_name(self.name)
        if not 0 <= self.driver_cpus <= 1024:
            raise SpecError(f"--driver-cpus must be in [0, 1024] (0: any), got "
                            f"{self.driver_cpus}")
        if self.backing is not None and self.blockdev is not None:
            raise SpecError("--backing and --blockdev exclude each other")
        if self.size < MIN_SIZE:
            raise SpecError(f"size {self.size} is too small (at least 1m)")
        if (self.attach_user is None) != (self.attach_driver is None):
            raise SpecError("--attach-user and --attach-driver go together")
        for pid in (self.attach_user, self.attach_driver):
            if pid is not None and pid <= 1:
                raise SpecError(f"cannot attach to pid {pid}")
        if self.max_channels < 1 or self.max_channels > 1024:
            raise SpecError(f"--max-channels must be in [1, 1024], got {self.max_channels}")
        if self.max_pinned < 1 << 20:
            raise SpecError(f"--max-pinned must be at least 1m, got {self.max_pinned}")
        if self.domain_pids < 16 or self.domain_memory < 64 << 20:
            raise SpecError("a domain needs at least 16 processes and 64m of memory")
        for opt, path in (("--user-rootfs", self.user_rootfs),
                          ("--driver-rootfs", self.driver_rootfs)):
            if path is not None and self.attached:
                raise SpecError(f"{opt} makes no sense with --attach-*: the containers "
                                "have their roots")
            if path is not None and not path.startswith("/"):
                raise SpecError(f"{opt} must be an absolute path, got {path!r}")
        if self.worker_spin_ns is not None and not 0 <= self.worker_spin_ns <= 3_600 * 10**9:
            raise SpecError(f"worker spin must be in [0, 1h], got {self.worker_spin_ns} ns")
        if self.user_io_uring and self.attached:
            raise SpecError("user_io_uring is for pairs drb makes, not attached containers")
        if not 1 <= self.users <= MAX_USERS:
            raise SpecError(f"--users must be in [1, {MAX_USERS}], got {self.users}")
        if not 1 <= self.max_users <= MAX_USERS:
            raise SpecError(f"--max-users must be in [1, {MAX_USERS}], got {self.max_users}")
        if self.users > self.max_users:
            raise SpecError(f"--users {self.users} is more than --max-users {self.max_users}")
        if self.attached and self.users != 1:
            raise SpecError("--attach-user pairs one user domain; add more to the running "
                            "pair with: drb user add NAME --attach PID")
        if self.extent is not None:
            check_extent(self.extent)
        if self.backing is None and self.blockdev is None:
            split_device(self.size, self.users, self.extent)    # a new file: its size is known
        for item in self.share:
            check_share(item)
            if self.attached:
                raise SpecError("--share is for domains drb makes; an attached container "
                                "has its own mounts")
        if self.fs is not None and self.fs not in FILE_SYSTEMS:
            raise SpecError(f"--fs {self.fs!r}: choose from {', '.join(FILE_SYSTEMS)}")
        if self.fs and not self.disk:
            raise SpecError("--fs goes with --disk (the file system is on the disk)")
        for opt, path in (("--disk-path", self.disk_path), ("--fs-mount", self.fs_mount)):
            if not path.startswith("/") or path.rstrip("/") in ("", "/proc", "/sys", "/run",
                                                                "/usr", "/etc", "/tmp"):
                raise SpecError(f"{opt} must be an absolute path of its own, got {path!r}")
        if self.allow_host_userns and not self.attached:
            raise SpecError("--allow-host-userns is for --attach-* only")
        bad = [f for f in self.deny if f not in FAMILIES]
        if bad:
            raise SpecError(f"unknown address family {bad[0]!r}; choose from "
                            f"{', '.join(FAMILIES)}")

    @property
    def attached(self) -> bool:
        return self.attach_user is not None

    @property
    def uses_loop_extents(self) -> bool:
        return self.o_direct if self.loop_extents is None else self.loop_extents
