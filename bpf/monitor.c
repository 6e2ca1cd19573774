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
    u64 submit_ns;        /* written here: when the worker submitted it */
};

struct grant {
    u32 channel;
    u32 slot_size;
    u32 slot_count;
    u32 failed;           /* enum reason, written here, read by the monitor */
    u32 hist;             /* this channel's rows in `lat` (< MAX_CHANNELS) */
    u32 pad;
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

#ifndef MAX_CHANNELS
#define MAX_CHANNELS 1024
#endif

/* MAX_SLOTS task entries, then 16 entries' worth (>= 64 u64 buckets) of
 * the user side's own post->reap histogram. */
BPF_F_TABLE("array", u32, struct drb_task, task_tmpl, MAX_SLOTS + 16, BPF_F_MMAPABLE);
BPF_HASH_OF_MAPS(task_tables, u32, "task_tmpl", MAX_CHANNELS);
BPF_HASH(grants, u64, struct grant, MAX_CHANNELS);
/* Latency histograms: row (hist * 2 + stage), 64 log2 buckets per row. An
 * array, not a hash: this is on every request's path. */
BPF_ARRAY(lat, u64, MAX_CHANNELS * 2 * HIST_SLOTS);
/* [0]: nonzero while someone traces (drb trace holds a lease that the host
 * service expires): the stage histograms cost two clock reads and a
 * completion hook per request, so they are kept only while wanted. */
BPF_ARRAY(config, u64, 1);

static __always_inline int tracing(void)
{
    u32 zero = 0;
    u64 *on = config.lookup(&zero);
    return on && *on;
}
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

static __always_inline void hist_add(u32 hist, u32 stage, u64 ns)
{
    u32 b = log2_slot(ns / 1000);
    if (b >= HIST_SLOTS || hist >= MAX_CHANNELS)
        return;
    u32 k = (hist * 2 + stage) * HIST_SLOTS + b;
    u64 *c = lat.lookup(&k);
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

/* Raw tracepoints: the regular ones build a whole trace record (with the
 * opcode's name as a string) before the program runs, on every request. */
RAW_TRACEPOINT_PROBE(io_uring_submit_req)
{
    char *req = (char *)ctx->args[0];
    /* One read of the head of the request (REQ_READ_LEN bytes, covering
     * every field below) instead of one read per field. */
    char head[REQ_READ_LEN];
    if (bpf_probe_read_kernel(head, sizeof(head), req))
        return 0;
    u64 ring = *(u64 *)(head + OFF_REQ_CTX);
    struct grant *g = grants.lookup(&ring);
    if (!g)
        return 0;                           /* not a grant ring */
    u8 op = *(u8 *)(head + OFF_REQ_OPCODE);
    u64 user_data = *(u64 *)(head + OFF_REQ_USER_DATA);
    if (op == OP_FSYNC)
        return 0;                           /* touches no user memory */
    u16 slot = *(u16 *)(head + OFF_REQ_BUF_INDEX);
    u64 addr = *(u64 *)(head + OFF_REQ_CMD + OFF_RW_ADDR);
    u32 len = *(u32 *)(head + OFF_REQ_CMD + OFF_RW_LEN);
    u64 pos = *(u64 *)(head + OFF_REQ_CMD + OFF_RW_POS);
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

    if (tracing()) {
        u64 now = bpf_ktime_get_ns();
        if (tpost && now > tpost)
            hist_add(g->hist, 0, now - tpost);
        t->submit_ns = now;
    }
    return 0;
}

/* Attached only under a trace lease (it is on every completion's path). */
int on_complete(struct bpf_raw_tracepoint_args *ctx)
{
    if (!tracing())
        return 0;
    u64 ring = ctx->args[0];
    struct grant *g = grants.lookup(&ring);
    if (!g)
        return 0;
    char *req = (char *)ctx->args[1];
    u16 slot = 0;
    bpf_probe_read_kernel(&slot, sizeof(slot), req + OFF_REQ_BUF_INDEX);
    u32 ch = g->channel, key = slot;
    void *tt = task_tables.lookup(&ch);
    if (!tt)
        return 0;
    struct drb_task *t = bpf_map_lookup_elem(tt, &key);
    if (t && t->submit_ns) {
        hist_add(g->hist, 1, bpf_ktime_get_ns() - t->submit_ns);
        t->submit_ns = 0;
    }
    return 0;
}

RAW_TRACEPOINT_PROBE(io_uring_register)
{
    u64 ring = ctx->args[0];
    struct grant *g = grants.lookup(&ring);
    if (!g)
        return 0;
    /* Registered only after enable: any register call now is the worker's. */
    return violation(g, R_REGISTER, 0, 0, 0, (u32)ctx->args[1], 0, 0, 0);
}

/* A pair's monitor learns each grant ring's io_ring_ctx from its own
 * creation of the ring: (monitor tgid, fd) -> ctx. Only processes listed in
 * `monitors` (registered by the host service) are recorded. */
struct ckey {
    u32 tgid;
    s32 fd;
};
BPF_HASH(created, struct ckey, u64, 1024);
BPF_HASH(monitors, u32, u32, 256);

RAW_TRACEPOINT_PROBE(io_uring_create)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!monitors.lookup(&tgid))
        return 0;
    struct ckey k = {.tgid = tgid, .fd = (s32)ctx->args[0]};
    u64 c = ctx->args[1];
    created.update(&k, &c);
    return 0;
}

/* Mode switches per domain: system calls, context switches and mapping
 * calls of every task in a watched cgroup (v2 id = the group's inode). */
struct counts {
    u64 syscalls;
    u64 ctx_switches;
    u64 mmap;
    u64 munmap;
    u64 mprotect;
    u64 pread64;
};
BPF_HASH(counters, u64, struct counts, 256);

#define NR_PREAD64 17
#define NR_MMAP 9
#define NR_MPROTECT 10
#define NR_MUNMAP 11

/* Attached only while some domain is watched (they run on every system
 * call and context switch of the host). */
int count_sys_enter(struct bpf_raw_tracepoint_args *ctx)
{
    u64 cg = bpf_get_current_cgroup_id();
    struct counts *c = counters.lookup(&cg);
    if (!c)
        return 0;
    __sync_fetch_and_add(&c->syscalls, 1);
    long id = (long)ctx->args[1];
    if (id == NR_MMAP)
        __sync_fetch_and_add(&c->mmap, 1);
    else if (id == NR_MUNMAP)
        __sync_fetch_and_add(&c->munmap, 1);
    else if (id == NR_MPROTECT)
        __sync_fetch_and_add(&c->mprotect, 1);
    else if (id == NR_PREAD64)
        __sync_fetch_and_add(&c->pread64, 1);
    return 0;
}

int count_sched_switch(struct bpf_raw_tracepoint_args *ctx)
{
    /* Runs in the task being switched out. */
    u64 cg = bpf_get_current_cgroup_id();
    struct counts *c = counters.lookup(&cg);
    if (c)
        __sync_fetch_and_add(&c->ctx_switches, 1);
    return 0;
}

/* The user side's last stage (post -> reap) happens without a system call,
 * so the frontend keeps that histogram itself in its task table map, after
 * the task entries; see drb_uring/ebpf.py. */
