"""Member offsets of kernel structs, read from BTF (/sys/kernel/btf/vmlinux).

The headers bcc compiles against are not this kernel's, so every offset the
eBPF programs use comes from here at load time and is passed as a -D flag.
A small reader of the BTF format: enough to walk structs and unions,
including anonymous members, through typedefs and qualifiers.
"""

from __future__ import annotations

import struct

VMLINUX = "/sys/kernel/btf/vmlinux"

# kinds
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, \
    FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(1, 20)
_QUALIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}
# Bytes of kind-specific data after the 12-byte btf_type: (fixed, per vlen item)
_EXTRA = {INT: (4, 0), ARRAY: (12, 0), STRUCT: (0, 12), UNION: (0, 12), ENUM: (0, 8),
          FUNC_PROTO: (0, 8), VAR: (4, 0), DATASEC: (0, 12), DECL_TAG: (4, 0),
          ENUM64: (0, 12)}


class BTFError(Exception):
    pass


class BTF:
    def __init__(self, data: bytes):
        if len(data) < 24:
            raise BTFError(f"not BTF data ({len(data)} bytes)")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = \
            struct.unpack_from("<HBBIIIII", data)
        if magic != 0xEB9F:
            raise BTFError("not BTF data (bad magic)")
        types = data[hdr_len + type_off: hdr_len + type_off + type_len]
        self.strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        self.types: list[tuple | None] = [None]      # id 0 is void
        self.by_name: dict[tuple[int, str], int] = {}
        pos = 0
        while pos < len(types):
            name_off, info, size_type = struct.unpack_from("<III", types, pos)
            kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
            pos += 12
            fixed, per = _EXTRA.get(kind, (0, 0))
            extra = types[pos: pos + fixed + per * vlen]
            pos += fixed + per * vlen
            tid = len(self.types)
            self.types.append((kind, name_off, vlen, kflag, size_type, extra))
            if kind in (STRUCT, UNION, TYPEDEF) and name_off:
                self.by_name.setdefault((kind, self._str(name_off)), tid)

    @classmethod
    def load(cls, path: str = VMLINUX) -> "BTF":
        try:
            with open(path, "rb") as f:
                return cls(f.read())
        except OSError as e:
            raise BTFError(f"cannot read {path}: {e.strerror}; the kernel needs "
                           "CONFIG_DEBUG_INFO_BTF") from None

    def _str(self, off: int) -> str:
        end = self.strings.index(b"\0", off)
        return self.strings[off:end].decode()

    def _resolve(self, tid: int) -> int:
        while self.types[tid] and self.types[tid][0] in _QUALIFIERS:
            tid = self.types[tid][4]
        return tid

    def _members(self, tid: int):
        kind, _, vlen, kflag, _, extra = self.types[tid]
        for i in range(vlen):
            name_off, mtype, off = struct.unpack_from("<III", extra, 12 * i)
            bit = off & 0xFFFFFF if kflag else off
            yield (self._str(name_off) if name_off else ""), mtype, bit

    def _find(self, tid: int, name: str) -> tuple[int, int] | None:
        """(bit offset, member type id) of `name` in struct/union tid,
        looking through anonymous members."""
        for mname, mtype, bit in self._members(tid):
            if mname == name:
                return bit, mtype
            if not mname:
                inner = self._resolve(mtype)
                if self.types[inner][0] in (STRUCT, UNION):
                    got = self._find(inner, name)
                    if got:
                        return bit + got[0], got[1]
        return None

    def offset(self, struct_name: str, path: str) -> int:
        """Byte offset of `path` (e.g. "kiocb.ki_pos") in `struct struct_name`."""
        tid = self.by_name.get((STRUCT, struct_name))
        if tid is None:
            raise BTFError(f"struct {struct_name} is not in the kernel's BTF")
        bits = 0
        for part in path.split("."):
            tid = self._resolve(tid)
            if self.types[tid][0] not in (STRUCT, UNION):
                raise BTFError(f"{struct_name}.{path}: {part!r} is inside a non-struct")
            got = self._find(tid, part)
            if got is None:
                raise BTFError(f"struct {struct_name} has no member {path} in this "
                               "kernel's BTF")
            bits += got[0]
            tid = got[1]
        if bits % 8:
            raise BTFError(f"{struct_name}.{path} is a bit field")
        return bits // 8


# What the monitor's programs read, as (-D name, struct, member path).
NEEDED = (
    ("OFF_REQ_BUF_INDEX", "io_kiocb", "buf_index"),
    ("OFF_REQ_CTX", "io_kiocb", "ctx"),
    ("OFF_REQ_OPCODE", "io_kiocb", "opcode"),
    ("OFF_REQ_USER_DATA", "io_kiocb", "cqe.user_data"),
    ("OFF_REQ_CMD", "io_kiocb", "cmd"),
    ("OFF_RW_ADDR", "io_rw", "addr"),
    ("OFF_RW_LEN", "io_rw", "len"),
    ("OFF_RW_POS", "io_rw", "kiocb.ki_pos"),
    ("OFF_RW_FLAGS", "io_rw", "flags"),
    ("OFF_REQ_RES", "io_kiocb", "cqe.res"),
)


def has_tracepoint(name: str, btf: BTF | None = None) -> bool:
    """Whether the kernel has tracepoint `name` (e.g. "io_uring_submit_req").

    Every tracepoint has a ``btf_trace_<name>`` typedef in the kernel's BTF,
    and raw tracepoints attach by that name alone, so unlike tracefs's
    events/ directory this needs nothing mounted."""
    btf = btf or BTF.load()
    return (TYPEDEF, f"btf_trace_{name}") in btf.by_name


def monitor_offsets(btf: BTF | None = None) -> dict[str, int]:
    btf = btf or BTF.load()
    return {d: btf.offset(s, m) for d, s, m in NEEDED}
