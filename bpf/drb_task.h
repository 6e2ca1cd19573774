/*
 * The I/O task table: the one definition of the contract between
 *   - the user side (Cython), which writes an entry per request it posts,
 *   - the monitor's eBPF program (bpf/monitor.c), which checks every
 *     submission on a grant ring against that entry,
 *   - the monitor's Python side, which creates the table and names the
 *     violations (it reads every value below from the compiled module
 *     drb_uring.enforce._task; a test compares them with this file).
 *
 * Included by bcc programs (bcc compiles them as kernel code: __KERNEL__)
 * and by the Cython extensions (cdef extern from "drb_task.h").
 */
#ifndef DRB_TASK_H
#define DRB_TASK_H

#if defined(__KERNEL__)
typedef u32 drb_u32;
typedef u64 drb_u64;
#else
#include <stdint.h>
typedef uint32_t drb_u32;
typedef uint64_t drb_u64;
#endif

/* Bump when struct drb_task or the table's shape changes: the client
 * refuses a table of another version. */
#define DRB_TASK_VERSION 2

/* Slots per channel: the task table has one entry per slot and the grant
 * ring one fixed buffer per slot. The ring layout takes its limit from
 * here too, so there is one slot limit. */
#define DRB_MAX_SLOTS 1024

/* After the DRB_MAX_SLOTS entries the table holds DRB_TASK_EXTRA entries'
 * worth of room: first the user side's own post->reap histogram
 * (DRB_HIST_BUCKETS u64 counters), and in the very last entry the channel's
 * status, whose `state` the program sets to the drb_reason of the first
 * violation. The user side checks it after it copies data out of a slot:
 * a violation is recorded before the I/O it stops can move any data, so
 * data seen before a clean status is the device's. */
#define DRB_TASK_EXTRA 16
#define DRB_HIST_BUCKETS 64
#define DRB_STATUS_ENTRY (DRB_MAX_SLOTS + DRB_TASK_EXTRA - 1)

#define DRB_TASK_ACTIVE 1

/* The request opcodes a channel carries: io_uring's own IORING_OP_* values
 * (the Cython side checks them against <linux/io_uring.h> at compile time). */
#define DRB_OP_FSYNC 3
#define DRB_OP_READ_FIXED 4
#define DRB_OP_WRITE_FIXED 5

/* Why the program stopped a worker (struct grant.failed, event.reason). */
enum drb_reason {
    DRB_R_NONE = 0,
    DRB_R_OPCODE = 1,          /* not a data opcode of this channel */
    DRB_R_SLOT = 2,            /* buffer index beyond the channel's slots */
    DRB_R_TASK_INACTIVE = 3,   /* no active task for that slot */
    DRB_R_TORN = 4,            /* task entry changed while being read */
    DRB_R_OP_MISMATCH = 5,     /* opcode differs from the task's */
    DRB_R_BUF_RANGE = 6,       /* address/length outside the task's slot */
    DRB_R_LEN_MISMATCH = 7,    /* length differs from the task's */
    DRB_R_EXTENT = 8,          /* device range outside the channel's extent */
    DRB_R_OFFSET_MISMATCH = 9, /* device offset differs from the task's */
    DRB_R_REGISTER = 10,       /* io_uring_register on an enabled grant ring */
    DRB_R_REFUSED = 11,        /* a request the ring refused before submitting it */
    DRB_R_OVERFLOW = 12,       /* a completion the grant ring could not post */
    DRB_R_FLAGS = 13,          /* read/write flags (RWF_*) a task never asks for */
    DRB_R_CLOSED = 14,         /* a submission on the ring of a channel that ended */
    DRB_R_COUNT = 15,
};

/* One entry. The user side writes the first six fields with a sequence
 * lock: seq is odd while they change, so the program never acts on a
 * half-written entry. The program alone writes the last three.
 *
 * `inflight` is the kernel's word on the slot: the program adds one when a
 * request on the slot is submitted on the grant ring (before it reads the
 * entry) and takes one away when the request completes. The user side
 * clears the entry, fences, then reads it: zero means no request on the
 * slot can still move data, whatever the worker says.
 *
 * `moved` only grows: the user side reads it before it posts and again
 * when the response comes. An answer of n bytes is true only if it grew by
 * exactly n: otherwise the worker made it up (a request it never ran, one
 * that failed, or one it changed). The status entry's `moved` counts the
 * flushes (fsync) the kernel completed with success, for the same check. */
struct drb_task {
    drb_u32 seq;
    drb_u32 state;        /* DRB_TASK_ACTIVE, or 0 */
    drb_u32 op;           /* DRB_OP_READ_FIXED or DRB_OP_WRITE_FIXED */
    drb_u32 len;
    drb_u64 offset;       /* channel-relative device offset */
    drb_u64 post_ns;      /* CLOCK_MONOTONIC, as bpf_ktime_get_ns() reads it */
    drb_u64 submit_ns;    /* written by the program: when the worker submitted */
    drb_u32 inflight;     /* written by the program: requests on the slot in the kernel */
    drb_u32 moved;        /* written by the program: bytes the kernel's successful
                           * completions on the slot moved, ever (wraps) */
};

/* bpftrace's hist() numbering: 1 for 0, 2 for 1, k + 2 for [2^k, 2^(k+1)).
 * Unrolled so that the eBPF verifier accepts it; the kernel's histograms,
 * the user side's reap histogram and the printer all bucket with this. */
static inline drb_u32 drb_log2_bucket(drb_u64 v)
{
    drb_u32 r = 0;
    if (v == 0)
        return 1;
#if defined(__clang__)
#pragma unroll
#endif
    for (int i = 32; i > 0; i >>= 1) {
        if (v >= (1ULL << i)) {
            v >>= i;
            r += i;
        }
    }
    return r + 2;
}

#endif /* DRB_TASK_H */
