"""The I/O task table, named for Python.

Every number here comes from the contract header bpf/drb_task.h through the
compiled module drb_uring.enforce._task; this module only adds names,
derived sizes and the text of each violation.
"""

from __future__ import annotations

from drb_uring.enforce import _task

VERSION = _task.VERSION
MAX_SLOTS = _task.MAX_SLOTS
ENTRY_SIZE = _task.ENTRY_SIZE
HIST_BUCKETS = _task.HIST_BUCKETS
ACTIVE = _task.ACTIVE
OP_FSYNC = _task.OP_FSYNC
OP_READ_FIXED = _task.OP_READ_FIXED
OP_WRITE_FIXED = _task.OP_WRITE_FIXED
log2_bucket = _task.log2_bucket

# The table: one entry per slot, then the user side's post->reap histogram.
ENTRIES = MAX_SLOTS + _task.EXTRA_ENTRIES
REAP_HIST_OFFSET = MAX_SLOTS * ENTRY_SIZE
TABLE_BYTES = (ENTRIES * ENTRY_SIZE + 4095) & ~4095
STATUS_ENTRY = _task.STATUS_ENTRY
# Where the program writes the channel's violation code: the status entry's state.
STATUS_OFFSET = STATUS_ENTRY * ENTRY_SIZE + _task.FIELD_OFFSETS["state"]
assert REAP_HIST_OFFSET + HIST_BUCKETS * 8 <= STATUS_ENTRY * ENTRY_SIZE

_TEXT = {
    "opcode": "opcode",
    "slot": "slot out of range",
    "task_inactive": "no active task for the slot",
    "torn": "task entry torn",
    "op_mismatch": "opcode differs from the task",
    "buf_range": "buffer outside the task's slot",
    "len_mismatch": "length differs from the task",
    "extent": "device range outside the channel's extent",
    "offset_mismatch": "device offset differs from the task",
    "register": "io_uring_register on a grant ring",
    "refused": "a request the grant ring refused before submitting it",
    "overflow": "a completion the grant ring could not post",
    "flags": "read/write flags a task never asks for",
    "closed": "a submission on the ring of a channel that ended",
}
assert set(_TEXT) == set(_task.REASON_CODES), "a violation reason has no text"
REASONS = {_task.REASON_CODES[k]: v for k, v in _TEXT.items()}

STAGES = {0: "post_to_submit", 1: "submit_to_complete", 2: "post_to_reap"}
