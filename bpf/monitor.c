/*
 * The monitor's eBPF program: enforce the I/O task table on grant rings and
 * trace per-stage latency. Loaded with bcc; every offset into a kernel
 * struct comes from BTF at load time (-D OFF_*), never from headers.
 *
 * A grant ring is recognised by its io_ring_ctx pointer, which the monitor
 * registers in `grants` when it creates the ring. For each submission on a
 * grant ring the program checks the request against the channel's task
 * table (an mmapable array written by the user side) and the channel's
 * extent (set by the monitor alone). On a violation it kills the submitter
 * (the worker) with SIGKILL before the I/O runs, marks the channel failed
 * and reports an event.
 */
#include <uapi/linux/ptrace.h>

#ifndef MAX_SLOTS
#define MAX_SLOTS 1024
#endif

#define OP_FSYNC 3
#define OP_READ_FIXED 4
#define OP_WRITE_FIXED 5
#define TASK_ACTIVE 1
#define SIGKILL 9
#define HIST_SLOTS 64

enum reason {
    R_NONE = 0,
    R_OPCODE = 1,         /* not a data opcode of this channel */
    R_SLOT = 2,           /* buffer index beyond the channel's slots */
    R_TASK_INACTIVE = 3,  /* no active task for that slot */
    R_TORN = 4,           /* task entry changed while being read */
    R_OP_MISMATCH = 5,    /* opcode differs from the task's */
    R_BUF_RANGE = 6,      /* address/length outside the task's slot */
    R_LEN_MISMATCH = 7,
    R_EXTENT = 8,         /* device range outside the channel's extent */
    R_OFFSET_MISMATCH = 9,
    R_REGISTER = 10,      /* io_uring_register on an enabled grant ring */
};

/* One entry of the I/O task table; see drb_uring/tasktable.py. */
struct drb_task {
    u32 seq;              /* odd while the user side writes the entry */
    u32 state;
    u32 op;
    u32 len;
    u64 offset;           /* channel-relative device offset */
    u64 post_ns;          /* CLOCK_MONOTONIC, as bpf_ktime_get_ns */
};

struct grant {
    u32 channel;
    u32 slot_size;
    u32 slot_count;
    u32 failed;           /* enum reason, written here, read by the monitor */
    u64 pool_base;
    u64 extent_base;
    u64 extent_size;
};

struct event {
    u32 channel;
    u32 reason;
    u32 pid;
    u32 slot;
    u64 user_data;
    u64 addr;
    u64 len;
    u64 pos;
    u32 opcode;
    u32 task_state;
};

struct hkey {
    u32 channel;
    u32 stage;            /* 0 post->submit, 1 submit->complete */
    u32 slot;             /* log2 bucket, bpftrace numbering */
};

BPF_F_TABLE("array", u32, struct drb_task, task_tmpl, MAX_SLOTS, BPF_F_MMAPABLE);
BPF_HASH_OF_MAPS(task_tables, u32, "task_tmpl", 4096);
BPF_HASH(grants, u64, struct grant, 4096);
BPF_HASH(started, u64, u64, 65536);        /* req pointer -> submit time */
BPF_HASH(lat, struct hkey, u64, 65536);
BPF_RINGBUF_OUTPUT(events, 16);

static __always_inline u32 log2_slot(u64 v)
{
    /* bpftrace's hist() numbering: 1 for 0, 2 for 1, k+2 for [2^k, 2^(k+1)) */
    u32 r = 0;
    if (v == 0)
        return 1;
#pragma unroll
    for (int i = 32; i > 0; i >>= 1) {
        if (v >= (1ULL << i)) {
            v >>= i;
            r += i;
        }
    }
    return r + 2;
}

static __always_inline void hist_add(u32 channel, u32 stage, u64 ns)
{
    struct hkey k = {.channel = channel, .stage = stage, .slot = log2_slot(ns / 1000)};
    u64 zero = 0, *c = lat.lookup_or_try_init(&k, &zero);
    if (c)
        __sync_fetch_and_add(c, 1);
}

static __always_inline int violation(struct grant *g, u32 reason, u32 slot, u64 user_data,
                                     u64 addr, u64 len, u64 pos, u32 opcode, u32 tstate)
{
    bpf_send_signal(SIGKILL);
    if (g->failed == 0)
        g->failed = reason;
    struct event *e = events.ringbuf_reserve(sizeof(struct event));
    if (e) {
        e->channel = g->channel;
        e->reason = reason;
        e->pid = bpf_get_current_pid_tgid() >> 32;
        e->slot = slot;
        e->user_data = user_data;
        e->addr = addr;
        e->len = len;
        e->pos = pos;
        e->opcode = opcode;
        e->task_state = tstate;
        events.ringbuf_submit(e, 0);
    }
    return 0;
}

TRACEPOINT_PROBE(io_uring, io_uring_submit_req)
{
    u64 ctx = (u64)args->ctx;
    struct grant *g = grants.lookup(&ctx);
    if (!g)
        return 0;                           /* not a grant ring */
    u64 now = bpf_ktime_get_ns();
    u8 op = args->opcode;
    u64 user_data = args->user_data;
    char *req = (char *)args->req;
    if (op == OP_FSYNC)
        return 0;                           /* touches no user memory */
    u16 slot = 0;
    u64 addr = 0, pos = 0;
    u32 len = 0;
    bpf_probe_read_kernel(&slot, sizeof(slot), req + OFF_REQ_BUF_INDEX);
    bpf_probe_read_kernel(&addr, sizeof(addr), req + OFF_REQ_CMD + OFF_RW_ADDR);
    bpf_probe_read_kernel(&len, sizeof(len), req + OFF_REQ_CMD + OFF_RW_LEN);
    bpf_probe_read_kernel(&pos, sizeof(pos), req + OFF_REQ_CMD + OFF_RW_POS);
    if (op != OP_READ_FIXED && op != OP_WRITE_FIXED)
        return violation(g, R_OPCODE, slot, user_data, addr, len, pos, op, 0);
    if (slot >= g->slot_count)
        return violation(g, R_SLOT, slot, user_data, addr, len, pos, op, 0);

    u32 ch = g->channel;
    void *tt = task_tables.lookup(&ch);
    if (!tt)
        return violation(g, R_TASK_INACTIVE, slot, user_data, addr, len, pos, op, 0);
    u32 key = slot;
    struct drb_task *t = bpf_map_lookup_elem(tt, &key);
    if (!t)
        return violation(g, R_SLOT, slot, user_data, addr, len, pos, op, 0);
    u32 seq = t->seq;
    u32 state = t->state;
    u32 top = t->op;
    u32 tlen = t->len;
    u64 toff = t->offset;
    u64 tpost = t->post_ns;
    if (seq & 1)
        return violation(g, R_TORN, slot, user_data, addr, len, pos, op, state);
    if (state != TASK_ACTIVE)
        return violation(g, R_TASK_INACTIVE, slot, user_data, addr, len, pos, op, state);
    if (top != op)
        return violation(g, R_OP_MISMATCH, slot, user_data, addr, len, pos, op, state);
    u64 base = g->pool_base + (u64)slot * g->slot_size;
    if (addr < base || addr + len > base + g->slot_size)
        return violation(g, R_BUF_RANGE, slot, user_data, addr, len, pos, op, state);
    if (len != tlen)
        return violation(g, R_LEN_MISMATCH, slot, user_data, addr, len, pos, op, state);
    if (pos < g->extent_base || pos + len > g->extent_base + g->extent_size)
        return violation(g, R_EXTENT, slot, user_data, addr, len, pos, op, state);
    if (pos != g->extent_base + toff)
        return violation(g, R_OFFSET_MISMATCH, slot, user_data, addr, len, pos, op, state);
    if (t->seq != seq)
        return violation(g, R_TORN, slot, user_data, addr, len, pos, op, state);

    if (tpost && now > tpost)
        hist_add(ch, 0, now - tpost);
    u64 r = (u64)req;
    started.update(&r, &now);
    return 0;
}

TRACEPOINT_PROBE(io_uring, io_uring_complete)
{
    u64 ctx = (u64)args->ctx;
    struct grant *g = grants.lookup(&ctx);
    if (!g)
        return 0;
    u64 r = (u64)args->req;
    u64 *t0 = started.lookup(&r);
    if (t0) {
        hist_add(g->channel, 1, bpf_ktime_get_ns() - *t0);
        started.delete(&r);
    }
    return 0;
}

TRACEPOINT_PROBE(io_uring, io_uring_register)
{
    u64 ctx = (u64)args->ctx;
    struct grant *g = grants.lookup(&ctx);
    if (!g)
        return 0;
    /* Registered only after enable: any register call now is the worker's. */
    return violation(g, R_REGISTER, 0, 0, 0, args->opcode, 0, 0, 0);
}

/* The monitor learns each grant ring's io_ring_ctx from its own creation of
 * the ring: (monitor tgid, fd) -> ctx. */
struct ckey {
    u32 tgid;
    s32 fd;
};
BPF_HASH(created, struct ckey, u64, 1024);

TRACEPOINT_PROBE(io_uring, io_uring_create)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (tgid != MONITOR_TGID)
        return 0;
    struct ckey k = {.tgid = tgid, .fd = args->fd};
    u64 c = (u64)args->ctx;
    created.update(&k, &c);
    return 0;
}
