"""The domains' cgroup-BPF policies (device and socket), loaded with bcc.

Programs live in bpf/ and are specialised with -D flags. The owner keeps
the BPF objects for as long as the pair lives and detaches every program it
attached when it closes; if it dies instead, the attachments stay on the
groups (the kernel holds them) until the groups are removed, so a running
domain is never left without its policy.
"""

from __future__ import annotations

import os

from drb_uring import bpf
from drb_uring.domains.config import FAMILIES
from drb_uring.errors import DrbError


class PolicyError(DrbError):
    pass


def _bcc():
    try:
        from bcc import BPF, BPFAttachType
    except ImportError as e:
        raise PolicyError(f"bcc is missing ({e}); install python3-bpfcc "
                          "(make setup does)") from None
    return BPF, BPFAttachType


def family_mask(deny: tuple[str, ...]) -> int:
    mask = 0
    for name in deny:
        if name not in FAMILIES:
            raise PolicyError(f"unknown address family {name!r}; "
                              f"choose from {', '.join(FAMILIES)}")
        mask |= 1 << FAMILIES[name]
    return mask


class Policies:
    def __init__(self):
        self.objs = []
        self.loaded: dict[tuple, object] = {}                # one program per text and flags
        self.attached: list[tuple[object, int, int, str]] = []   # (fn, cgroup fd, type, path)

    def prepare(self, deny: tuple[str, ...]) -> None:
        """Compile what device() and sockets() will attach, ahead of time
        (clang runs outside the GIL: this may run in a thread)."""
        self._device_fn(None)
        self._sockets_fn(deny)

    def _load(self, src: str, fn: str, prog_type_name: str, cflags: list[str]):
        key = (src, fn, tuple(cflags))
        if key in self.loaded:
            return self.loaded[key]
        BPF, _ = _bcc()
        try:
            b = BPF(src_file=str(bpf.DIR / src), cflags=cflags)
            f = b.load_func(fn, getattr(BPF, prog_type_name))
        except Exception as e:
            raise PolicyError(f"bcc could not compile or load bpf/{src}: {e}") from None
        self.objs.append(b)
        self.loaded[key] = f
        return f

    def _attach(self, fn, group: str, attach_type_name: str) -> None:
        BPF, T = _bcc()
        fd = os.open(group, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            BPF.attach_func(fn, fd, getattr(T, attach_type_name))
        except Exception as e:
            os.close(fd)
            raise PolicyError(f"attaching {fn.name.decode()} to {group}: {e}") from None
        self.attached.append((fn, fd, getattr(T, attach_type_name), group))

    def _device_fn(self, block: tuple[int, int] | None):
        major, minor = block or (-1, -1)
        return self._load("policy_device.c", "drb_dev_policy", "CGROUP_DEVICE",
                          [f"-DALLOW_BLOCK_MAJOR={major}", f"-DALLOW_BLOCK_MINOR={minor}"])

    def _sockets_fn(self, deny: tuple[str, ...]):
        mask = family_mask(tuple(d for d in deny if d != "packet"))
        return self._load("policy_sock.c", "drb_sock_policy", "CGROUP_SOCK",
                          [f"-DDENY_MASK={mask}ULL"])

    def device(self, group: str, block: tuple[int, int] | None) -> None:
        self._attach(self._device_fn(block), group, "CGROUP_DEVICE")

    def sockets(self, group: str, deny: tuple[str, ...]) -> None:
        self._attach(self._sockets_fn(deny), group, "CGROUP_INET_SOCK_CREATE")

    def detach(self, group: str) -> None:
        """Detach what is attached to one group (a user domain removed)."""
        BPF, _ = _bcc()
        keep = []
        for fn, fd, kind, path in self.attached:
            if path != group:
                keep.append((fn, fd, kind, path))
                continue
            try:
                BPF.detach_func(fn, fd, kind)
            except Exception:
                pass        # the group is already gone: nothing to detach
            os.close(fd)
        self.attached = keep

    def close(self) -> None:
        """Detach everything attached here and free the programs. Idempotent."""
        BPF, _ = _bcc()
        while self.attached:
            fn, fd, kind, _path = self.attached.pop()
            try:
                BPF.detach_func(fn, fd, kind)
            except Exception:
                pass        # the group is already gone: nothing to detach
            os.close(fd)
        for b in self.objs:
            b.cleanup()
        self.objs.clear()
        self.loaded.clear()
