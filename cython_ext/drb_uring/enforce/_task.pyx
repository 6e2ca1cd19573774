# cython: language_level=3
"""The task table contract as Python values (drb_uring.enforce._task).

Every value comes from bpf/drb_task.h through the C compiler, so Python,
Cython and the eBPF program cannot disagree; drb_uring.enforce.tasks gives
them names and meaning.
"""
from drb_uring.enforce.tasks cimport (
    drb_task, drb_log2_bucket, DRB_TASK_VERSION, DRB_MAX_SLOTS, DRB_TASK_EXTRA,
    DRB_HIST_BUCKETS, DRB_TASK_ACTIVE, DRB_STATUS_ENTRY, DRB_OP_FSYNC, DRB_OP_READ_FIXED, DRB_OP_WRITE_FIXED,
    DRB_R_OPCODE, DRB_R_SLOT, DRB_R_TASK_INACTIVE, DRB_R_TORN, DRB_R_OP_MISMATCH,
    DRB_R_BUF_RANGE, DRB_R_LEN_MISMATCH, DRB_R_EXTENT, DRB_R_OFFSET_MISMATCH, DRB_R_REGISTER,
    DRB_R_REFUSED, DRB_R_OVERFLOW, DRB_R_FLAGS, DRB_R_CLOSED, DRB_R_COUNT)
from drb_uring.includes.io_uring cimport IORING_OP_FSYNC, IORING_OP_READ_FIXED, IORING_OP_WRITE_FIXED

# The channel's opcodes are io_uring's own: refuse to build otherwise.
cdef extern from *:
    """
    #include <linux/io_uring.h>
    #include "drb_task.h"
    _Static_assert(DRB_OP_FSYNC == IORING_OP_FSYNC, "DRB_OP_FSYNC");
    _Static_assert(DRB_OP_READ_FIXED == IORING_OP_READ_FIXED, "DRB_OP_READ_FIXED");
    _Static_assert(DRB_OP_WRITE_FIXED == IORING_OP_WRITE_FIXED, "DRB_OP_WRITE_FIXED");
    """

VERSION = DRB_TASK_VERSION
MAX_SLOTS = DRB_MAX_SLOTS
EXTRA_ENTRIES = DRB_TASK_EXTRA
HIST_BUCKETS = DRB_HIST_BUCKETS
STATUS_ENTRY = DRB_STATUS_ENTRY
ACTIVE = DRB_TASK_ACTIVE
ENTRY_SIZE = sizeof(drb_task)
OP_FSYNC = DRB_OP_FSYNC
OP_READ_FIXED = DRB_OP_READ_FIXED
OP_WRITE_FIXED = DRB_OP_WRITE_FIXED
REASON_CODES = {
    "opcode": DRB_R_OPCODE, "slot": DRB_R_SLOT, "task_inactive": DRB_R_TASK_INACTIVE,
    "torn": DRB_R_TORN, "op_mismatch": DRB_R_OP_MISMATCH, "buf_range": DRB_R_BUF_RANGE,
    "len_mismatch": DRB_R_LEN_MISMATCH, "extent": DRB_R_EXTENT,
    "offset_mismatch": DRB_R_OFFSET_MISMATCH, "register": DRB_R_REGISTER,
    "refused": DRB_R_REFUSED, "overflow": DRB_R_OVERFLOW, "flags": DRB_R_FLAGS,
    "closed": DRB_R_CLOSED,
}
REASON_COUNT = DRB_R_COUNT
FIELD_OFFSETS = {
    "seq": <size_t>&(<drb_task *>0).seq, "state": <size_t>&(<drb_task *>0).state,
    "op": <size_t>&(<drb_task *>0).op, "len": <size_t>&(<drb_task *>0).len,
    "offset": <size_t>&(<drb_task *>0).offset, "post_ns": <size_t>&(<drb_task *>0).post_ns,
    "submit_ns": <size_t>&(<drb_task *>0).submit_ns,
    "inflight": <size_t>&(<drb_task *>0).inflight,
    "moved": <size_t>&(<drb_task *>0).moved,
}


def log2_bucket(unsigned long long v):
    """The histogram bucket of v (bpftrace's hist() numbering)."""
    return drb_log2_bucket(v)
