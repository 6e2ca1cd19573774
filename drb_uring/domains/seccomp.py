"""System call filters: the domains' profile and the worker's own allowlist.

The domain profile starts from the field's default, containers-common's
``seccomp.json`` (what podman applies), resolved for a process with no
capability at all. That file leans on capabilities for much of its safety
and allows, among others, ptrace, process_vm_*, pidfd_getfd, mount, setns
and unshare outright; here those are refused by name (EPERM), clone may not
make namespaces, clone3 (whose flags seccomp cannot see) falls back to clone,
and only the calls drb itself needs are added: io_uring_enter in the driver
domain, where workers use the ring they inherit. Only the native
architecture is allowed: a call through the i386 or x32 entry kills the
process.

The profile is an OCI ``linux.seccomp`` object: runc applies it to every
process of a domain it made, and :func:`load` applies it with libseccomp to
a process drb puts into a container another runtime made.
"""

from __future__ import annotations

import errno
import json
import platform

from drb_uring.domains.config import FAMILIES
from drb_uring.errors import DrbError

CONTAINERS_COMMON = "/usr/share/containers/seccomp.json"

# Refused in every domain, whatever the base profile says.
DENY = (
    "bpf", "perf_event_open",
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp", "process_madvise",
    "open_by_handle_at", "name_to_handle_at",
    "mount", "umount", "umount2", "pivot_root", "chroot",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "setns", "unshare",
    "io_uring_setup", "io_uring_register",
    "keyctl", "add_key", "request_key",
    "userfaultfd", "syslog", "acct", "quotactl", "lookup_dcookie", "fanotify_init",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
)
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
CLONE_NEW_ANY = 0x7E020000
AF_MAX = 46                # address families of this kernel (AF_MCTP = 45 is the last)
NATIVE = {"x86_64": ("SCMP_ARCH_X86_64", "amd64"), "aarch64": ("SCMP_ARCH_AARCH64", "arm64")}


class SeccompError(DrbError):
    pass


def _kernel() -> tuple[int, int]:
    major, minor = platform.release().split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _applies(rule: dict, goarch: str) -> bool:
    """Whether a containers-common rule applies to a process with no
    capability on this architecture and kernel."""
    inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
    if inc.get("caps"):
        return False
    if inc.get("arches") and goarch not in inc["arches"]:
        return False
    if exc.get("arches") and goarch in exc["arches"]:
        return False
    if inc.get("minKernel"):
        want = tuple(int(x) for x in inc["minKernel"].split(".")[:2])
        if _kernel() < want:
            return False
    return True


def domain_profile(role: str, deny_families: tuple[str, ...] = (),
                   io_uring: bool = False) -> dict:
    """The OCI seccomp profile of a user (role "user") or driver domain.
    `io_uring`: a user domain may use a ring it is handed, as a driver
    domain may (for drb bench's direct baseline only)."""
    try:
        with open(CONTAINERS_COMMON) as f:
            base = json.load(f)
    except OSError as e:
        raise SeccompError(f"the base seccomp profile {CONTAINERS_COMMON} is missing "
                           f"({e.strerror}): install golang-github-containers-common "
                           "(make setup does)") from None
    scmp_arch, goarch = NATIVE[platform.machine()]
    own = set(DENY) | {"clone", "clone3", "socket", "io_uring_enter"}
    rules = []
    for rule in base["syscalls"]:
        if not _applies(rule, goarch):
            continue
        names = [n for n in rule["names"] if n not in own]
        if names:
            r = {"names": names, "action": rule["action"]}
            for key in ("errnoRet", "args"):
                if rule.get(key):
                    r[key] = rule[key]
            rules.append(r)
    rules.append({"names": sorted(DENY), "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM})
    rules.append({"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                  "args": [{"index": 0, "value": CLONE_NEW_ANY, "valueTwo": 0,
                            "op": "SCMP_CMP_MASKED_EQ"}]})
    rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS})
    # socket(): the families the domain may not use are refused here too
    # (the cgroup hook sees inet sockets only). libseccomp lets an
    # unconditional rule win over a conditional one and takes one comparison
    # per argument, so each family is a rule of its own.
    denied = {FAMILIES[f] for f in deny_families}
    for fam in range(AF_MAX):
        rules.append({"names": ["socket"],
                      "action": "SCMP_ACT_ERRNO" if fam in denied else "SCMP_ACT_ALLOW",
                      **({"errnoRet": errno.EPERM} if fam in denied else {}),
                      "args": [{"index": 0, "value": fam, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]})
    if role == "driver" or io_uring:
        # Using a ring the worker inherited; creating or changing one stays refused.
        rules.append({"names": ["io_uring_enter"], "action": "SCMP_ACT_ALLOW"})
    return {"defaultAction": base.get("defaultAction", "SCMP_ACT_ERRNO"),
            "defaultErrnoRet": base.get("defaultErrnoRet", errno.ENOSYS),
            "architectures": [scmp_arch], "syscalls": rules}


def _action(seccomp, name: str, errno_ret: int | None, default_errno: int):
    if name == "SCMP_ACT_ALLOW":
        return seccomp.ALLOW
    if name == "SCMP_ACT_ERRNO":
        return seccomp.ERRNO(errno_ret if errno_ret is not None else default_errno)
    if name in ("SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD"):
        return seccomp.KILL
    if name == "SCMP_ACT_KILL_PROCESS":
        return seccomp.KILL_PROCESS
    if name == "SCMP_ACT_LOG":
        return seccomp.LOG
    raise SeccompError(f"seccomp action {name} is not supported")


def load(profile: dict) -> None:
    """Apply an OCI seccomp profile to this process (and its children), as
    runc would. Sets no_new_privs."""
    import seccomp
    ops = {"SCMP_CMP_EQ": seccomp.EQ, "SCMP_CMP_NE": seccomp.NE, "SCMP_CMP_LT": seccomp.LT,
           "SCMP_CMP_LE": seccomp.LE, "SCMP_CMP_GT": seccomp.GT, "SCMP_CMP_GE": seccomp.GE,
           "SCMP_CMP_MASKED_EQ": seccomp.MASKED_EQ}
    default = profile.get("defaultErrnoRet", errno.EPERM)
    f = seccomp.SyscallFilter(_action(seccomp, profile["defaultAction"], default, default))
    for rule in profile["syscalls"]:
        act = _action(seccomp, rule["action"], rule.get("errnoRet"), errno.EPERM)
        args = [seccomp.Arg(c["index"], ops[c["op"]], c["value"], c.get("valueTwo", 0))
                for c in rule.get("args") or []]
        for name in rule["names"]:
            try:
                f.add_rule(act, name, *args)
            except (RuntimeError, ValueError, OSError):
                pass     # unknown to this libseccomp, or equal to the default action
    f.load()
