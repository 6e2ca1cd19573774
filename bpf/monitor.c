/*
 * The monitor's eBPF program: enforce the I/O task table on grant rings and
 * trace per-stage latency. Loaded with bcc; every offset into a kernel
 * struct comes from BTF at load time (-D OFF_*), never from headers.
 *
 * A grant ring is recognised by its io_ring_ctx pointer, which the host's
 * enforcement service registers in `grants` (ring -> row; the grant itself
 * is `grant_rows[row]`) when a pair's broker has created the ring. For
 * each submission on a
 * grant ring the program checks the request against the channel's task
 * table (an mmapable array written by the user side) and the channel's
 * extent (set by the broker alone). On a violation it kills the submitter
 * (the worker) with SIGKILL before the I/O runs, marks the channel failed
 * and reports an event. A channel that ended stays granted, closed, until
 * the broker has the kernel's word that its ring is gone: any submission on
 * it meanwhile is a violation.
 */
#include <uapi/linux/ptrace.h>
#include "drb_task.h"

#define SIGKILL 9

/* A plain load that the compiler may neither merge with another nor move:
 * the sequence-lock reader below must really read `seq` twice. */
#define DRB_READ_ONCE(x) (*(volatile typeof(x) *)&(x))
/* Orders the reads of the entry's fields between the two reads of `seq`.
 * A compiler barrier suffices: the JIT keeps the program's load order and
 * x86 does not reorder loads with loads. */
#define drb_barrier() asm volatile("" ::: "memory")

struct grant {
    u32 channel;
    u32 slot_size;
    u32 slot_count;
    u32 failed;           /* enum drb_reason, written here, read by the service */
    u32 row;              /* this channel's index in task_tables and `lat` (< MAX_CHANNELS) */
    u32 closed;           /* the channel ended: every submission is a violation (the
                           * grant stays until the kernel says the ring is gone) */
    u64 pool_base;
    u64 extent_base;
    u64 extent_size;
    u64 ring;             /* the io_ring_ctx this row is the grant of; 0 once it is not */
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
#error "MAX_CHANNELS comes from drb_uring/enforce/programs.py (-DMAX_CHANNELS=...)"
#endif

/* DRB_MAX_SLOTS task entries, then room for the user side's own post->reap
 * histogram (see drb_task.h). */
BPF_F_TABLE("array", u32, struct drb_task, task_tmpl, DRB_MAX_SLOTS + DRB_TASK_EXTRA,
            BPF_F_MMAPABLE);
/* Indexed by the channel's row (struct grant.row): an array lookup is
 * cheaper than a hash one, and this is on every request's path. */
BPF_ARRAY_OF_MAPS(task_tables, "task_tmpl", MAX_CHANNELS);
/* ring (io_ring_ctx address) -> row; the grant is grant_rows[row]. */
BPF_HASH(grants, u64, u32, MAX_CHANNELS);
BPF_ARRAY(grant_rows, struct grant, MAX_CHANNELS);
/* Bumped after every removal from `grants`: [0] by the service (ungrant),
 * [1] by io_uring_create below. A CPU's cached ring -> row is trusted only
 * while their sum is what it was before the lookup, so no ring has lost
 * its grant since. Two counters with one writer each: the service cannot
 * add atomically, and a read-modify-write of one shared counter could
 * undo the programs' bumps and make a stale entry current again. */
BPF_ARRAY(grants_gen, u64, 2);
/* Each CPU's last grant ring: a hash lookup is about 25 ns, and the
 * submission and completion hooks of a worker's ring run on its CPU one
 * after the other. Programs run with preemption off, so a CPU's entry has
 * one user at a time. */
struct grant_cache {
    u64 ring;
    u64 gen;
    u32 row;
    u32 pad;
};
BPF_PERCPU_ARRAY(grant_cache, struct grant_cache, 1);

/* The grant of the ring at `ring`, or NULL if it is none. */
static __always_inline struct grant *grant_of(u64 ring)
{
    u32 zero = 0, one = 1, row;
    u64 *svc = grants_gen.lookup(&zero), *prog = grants_gen.lookup(&one);
    struct grant_cache *c = grant_cache.lookup(&zero);
    if (!svc || !prog || !c)
        return 0;
    /* Read before the lookup: a removal after it bumps past this sum (both
     * counters only grow). */
    u64 now = DRB_READ_ONCE(*svc) + DRB_READ_ONCE(*prog);
    drb_barrier();
    if (c->ring == ring && c->gen == now && ring) {
        row = c->row;
        /* And the row must still be this ring's: it names its ring, and
         * loses the name before it is reused or dropped. This alone would
         * hold the cache to the truth; the counters keep a row that lost
         * its name and got it back from being trusted in between. */
        struct grant *g = grant_rows.lookup(&row);
        if (g && g->ring == ring)
            return g;
    }
    u32 *r = grants.lookup(&ring);
    if (!r)
        return 0;
    row = *r;
    c->ring = ring;
    c->gen = now;
    c->row = row;
    struct grant *g = grant_rows.lookup(&row);
    return g && g->ring == ring ? g : 0;
}
/* The brokers' processes (tgid), registered by the service: trusted. */
BPF_HASH(brokers, u32, u32, 256);
/* Latency histograms: row (hist * 2 + stage), 64 log2 buckets per row. An
 * array, not a hash: this is on every request's path; per CPU, so that an
 * update is a plain add on this CPU's copy, not a locked one (the reader
 * sums the copies). */
BPF_PERCPU_ARRAY(lat, u64, MAX_CHANNELS * 2 * DRB_HIST_BUCKETS);
/* [0]: nonzero while someone traces (drb trace holds a lease that the host
 * service expires): the stage histograms cost two clock reads and a
 * completion hook per request, so they are kept only while wanted. */
BPF_ARRAY(config, u64, 1);
/* The monitor's two stage histograms time one request in this many (a
 * power of two), chosen at random at submission. */
#define DRB_HIST_SAMPLE 64

/* Per channel (row): reads, bytes read, writes, bytes written, flushes,
 * as the kernel completed them (drb metrics). Counted only while someone
 * looks, as the histograms are. */
#define IO_COUNTS 5
BPF_PERCPU_ARRAY(io, u64, MAX_CHANNELS * IO_COUNTS);

/* Per-CPU counters: a tracepoint's programs run with preemption off, so
 * a plain add on this CPU's copy is exact. */
static __always_inline void io_add(u32 row, u32 what, u64 n)
{
    u32 k = row * IO_COUNTS + what;
    u64 *c = io.lookup(&k);
    if (c)
        *c += n;
}

static __always_inline int tracing(void)
{
    u32 zero = 0;
    u64 *on = config.lookup(&zero);
    return on && *on;
}
BPF_RINGBUF_OUTPUT(events, 16);

static __always_inline void hist_add(u32 row, u32 stage, u64 ns)
{
    u32 b = drb_log2_bucket(ns / 1000);
    if (b >= DRB_HIST_BUCKETS || row >= MAX_CHANNELS)
        return;
    u32 k = (row * 2 + stage) * DRB_HIST_BUCKETS + b;
    u64 *c = lat.lookup(&k);
    if (c)
        *c += 1;
}

/* The channel's status entry in its task table (see drb_task.h). */
static __always_inline void mark_failed(struct grant *g, u32 reason)
{
    u32 row = g->row, key = DRB_STATUS_ENTRY;
    if (g->failed == 0)
        g->failed = reason;
    void *tt = task_tables.lookup(&row);
    if (!tt)
        return;
    struct drb_task *st = bpf_map_lookup_elem(tt, &key);
    if (st && st->state == 0)
        st->state = reason;
}

static __always_inline int violation(struct grant *g, u32 reason, u32 slot, u64 user_data,
                                     u64 addr, u64 len, u64 pos, u32 opcode, u32 tstate)
{
    bpf_send_signal(SIGKILL);
    mark_failed(g, reason);
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
    struct grant *g = grant_of(ring);
    if (!g)
        return 0;                           /* not a grant ring */
    u8 op = *(u8 *)(head + OFF_REQ_OPCODE);
    u64 user_data = *(u64 *)(head + OFF_REQ_USER_DATA);
    /* A channel that ended has no task, and its worker said it let go:
     * whoever still submits on the ring is hostile. */
    if (g->closed)
        return violation(g, DRB_R_CLOSED, 0, user_data, 0, 0, 0, op, 0);
    if (op == DRB_OP_FSYNC)
        return 0;                           /* touches no user memory */
    u16 slot = *(u16 *)(head + OFF_REQ_BUF_INDEX);
    u64 addr = *(u64 *)(head + OFF_REQ_CMD + OFF_RW_ADDR);
    u32 len = *(u32 *)(head + OFF_REQ_CMD + OFF_RW_LEN);
    u64 pos = *(u64 *)(head + OFF_REQ_CMD + OFF_RW_POS);
    u32 rwf = *(u32 *)(head + OFF_REQ_CMD + OFF_RW_FLAGS);
    if (op != DRB_OP_READ_FIXED && op != DRB_OP_WRITE_FIXED)
        return violation(g, DRB_R_OPCODE, slot, user_data, addr, len, pos, op, 0);
    if (slot >= g->slot_count)
        return violation(g, DRB_R_SLOT, slot, user_data, addr, len, pos, op, 0);

    u32 row = g->row;
    void *tt = task_tables.lookup(&row);
    if (!tt)
        return violation(g, DRB_R_TASK_INACTIVE, slot, user_data, addr, len, pos, op, 0);
    u32 key = slot;
    struct drb_task *t = bpf_map_lookup_elem(tt, &key);
    if (!t)
        return violation(g, DRB_R_SLOT, slot, user_data, addr, len, pos, op, 0);
    /* Counted before the entry is read, whatever the verdict: a request
     * stopped below may still move data (O_DIRECT), and the user side
     * reuses the slot only when the count is back to zero. The atomic add
     * is a full barrier; it pairs with the user's clear-fence-read. */
    __sync_fetch_and_add(&t->inflight, 1);
    u32 seq = DRB_READ_ONCE(t->seq);
    drb_barrier();
    u32 state = DRB_READ_ONCE(t->state);
    u32 top = DRB_READ_ONCE(t->op);
    u32 tlen = DRB_READ_ONCE(t->len);
    u64 toff = DRB_READ_ONCE(t->offset);
    u64 tpost = DRB_READ_ONCE(t->post_ns);
    if (seq & 1)
        return violation(g, DRB_R_TORN, slot, user_data, addr, len, pos, op, state);
    if (state != DRB_TASK_ACTIVE)
        return violation(g, DRB_R_TASK_INACTIVE, slot, user_data, addr, len, pos, op, state);
    if (top != op)
        return violation(g, DRB_R_OP_MISMATCH, slot, user_data, addr, len, pos, op, state);
    /* A request starts at its slot's start (the client never asks for
     * anything else, and the user side reads its data from there), and
     * fits the slot. */
    u64 base = g->pool_base + (u64)slot * g->slot_size;
    if (addr != base || len > g->slot_size)
        return violation(g, DRB_R_BUF_RANGE, slot, user_data, addr, len, pos, op, state);
    /* RWF_APPEND would write at the file's end, RWF_NOWAIT fail a read the
     * worker could then call a success: a task asks for no flag. */
    if (rwf)
        return violation(g, DRB_R_FLAGS, slot, user_data, addr, len, pos, op, state);
    if (len != tlen)
        return violation(g, DRB_R_LEN_MISMATCH, slot, user_data, addr, len, pos, op, state);
    /* A negative position (-1: "the file's current position") is no place
     * in the extent at all. */
    if ((s64)pos < 0 || pos < g->extent_base || pos - g->extent_base > g->extent_size ||
        len > g->extent_size - (pos - g->extent_base))
        return violation(g, DRB_R_EXTENT, slot, user_data, addr, len, pos, op, state);
    if (pos != g->extent_base + toff)
        return violation(g, DRB_R_OFFSET_MISMATCH, slot, user_data, addr, len, pos, op, state);
    drb_barrier();
    if (DRB_READ_ONCE(t->seq) != seq)
        return violation(g, DRB_R_TORN, slot, user_data, addr, len, pos, op, state);

    /* One request in DRB_HIST_SAMPLE is timed: two clock reads and two
     * histogram updates on every request cost about a tenth of a 4 KiB
     * page-cache read while someone traces or scrapes, and one in 8 still
     * kept only 0.89 of the untraced IOPS at depth 32 (one in 64: 0.98).
     * The completion times only a request whose submit_ns is set. */
    if (tracing() && (bpf_get_prandom_u32() & (DRB_HIST_SAMPLE - 1)) == 0) {
        u64 now = bpf_ktime_get_ns();
        if (tpost && now > tpost)
            hist_add(g->row, 0, now - tpost);
        t->submit_ns = now;
    }
    return 0;
}

/* Every completion of a request the ring submitted: the slot's count goes
 * down. A completion without a request is a resource tag (none are used).
 * Requests the ring refused before submitting them complete here too, with
 * a stale buf_index; io_uring_req_failed below makes each of those a
 * violation, so a wrong count can only follow a failed channel. */
RAW_TRACEPOINT_PROBE(io_uring_complete)
{
    u64 ring = ctx->args[0];
    struct grant *g = grant_of(ring);
    if (!g)
        return 0;
    char *req = (char *)ctx->args[1];
    if (!req)
        return 0;
    /* opcode, buf_index and the result in one read (the span is from BTF
     * too). The result is what the kernel says the request did, and the
     * user side holds the worker's answer against it: the request's own
     * cqe, which the kernel has just copied whole into the ring's entry
     * (args[2]) before this tracepoint (io_fill_cqe_req). */
    char f[REQ_OP_SPAN];
    if (bpf_probe_read_kernel(f, sizeof(f), req + OFF_REQ_OP_FIRST))
        return 0;
    u8 op = *(u8 *)(f + OFF_REQ_OPCODE - OFF_REQ_OP_FIRST);
    u16 slot = *(u16 *)(f + OFF_REQ_BUF_INDEX - OFF_REQ_OP_FIRST);
    s32 res = *(s32 *)(f + OFF_REQ_RES - OFF_REQ_OP_FIRST);
    /* A flush moves no bytes of a slot: its successes are counted in the
     * status entry, so a flush the kernel never ran shows. */
    u32 key = op == DRB_OP_FSYNC ? DRB_STATUS_ENTRY : slot;
    if (op != DRB_OP_FSYNC &&
        ((op != DRB_OP_READ_FIXED && op != DRB_OP_WRITE_FIXED) || slot >= g->slot_count))
        return 0;
    u32 row = g->row;
    void *tt = task_tables.lookup(&row);
    if (!tt)
        return 0;
    struct drb_task *t = bpf_map_lookup_elem(tt, &key);
    if (!t)
        return 0;
    if (op == DRB_OP_FSYNC) {
        if (res == 0) {
            __sync_fetch_and_add(&t->moved, 1);
            if (tracing())
                io_add(row, 4, 1);
        }
        return 0;
    }
    __sync_fetch_and_add(&t->inflight, -1);
    if (res > 0)
        __sync_fetch_and_add(&t->moved, (u32)res);
    if (tracing()) {
        if (res >= 0) {
            u32 w = op == DRB_OP_WRITE_FIXED ? 2 : 0;
            io_add(row, w, 1);
            io_add(row, w + 1, (u64)res);
        }
        if (t->submit_ns) {
            hist_add(g->row, 1, bpf_ktime_get_ns() - t->submit_ns);
            t->submit_ns = 0;
        }
    }
    return 0;
}

/* The ring refused a request before submitting it (a restriction, a bad
 * field): the worker is hostile or broken, since it checks every request
 * it passes on. Runs in the submitter. */
RAW_TRACEPOINT_PROBE(io_uring_req_failed)
{
    char *req = (char *)ctx->args[1];
    u64 ring = 0;
    bpf_probe_read_kernel(&ring, sizeof(ring), req + OFF_REQ_CTX);
    struct grant *g = grant_of(ring);
    if (!g)
        return 0;
    return violation(g, DRB_R_REFUSED, 0, 0, 0, 0, 0, 0, 0);
}

/* A completion the ring could not post (its completion queue was full):
 * the count for its slot never comes down, so the user side fails the
 * channel when it checks the slot. Recorded, without a signal: this may
 * run outside the worker. */
RAW_TRACEPOINT_PROBE(io_uring_cqe_overflow)
{
    u64 ring = ctx->args[0];
    struct grant *g = grant_of(ring);
    if (g)
        mark_failed(g, DRB_R_OVERFLOW);
    return 0;
}

RAW_TRACEPOINT_PROBE(io_uring_register)
{
    /* A broker builds its rings with register calls; it is trusted. */
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (brokers.lookup(&tgid))
        return 0;
    u64 ring = ctx->args[0];
    struct grant *g = grant_of(ring);
    if (!g)
        return 0;
    /* Registered only after enable: any register call now is the worker's. */
    return violation(g, DRB_R_REGISTER, 0, 0, 0, (u32)ctx->args[1], 0, 0, 0);
}

/* The service learns each grant ring's io_ring_ctx from the broker's own
 * creation of the ring: (broker tgid, fd) -> ctx. Only processes listed in
 * `brokers` (registered by the service) are recorded. */
struct ckey {
    u32 tgid;
    s32 fd;
};
BPF_HASH(created, struct ckey, u64, 1024);

RAW_TRACEPOINT_PROBE(io_uring_create)
{
    u64 c = ctx->args[1];
    /* A ring made at this address means the ring that had it is gone: a
     * grant still keyed by it is stale (its worker died a moment ago and
     * the broker has not ungranted yet). Left in place, it would check the
     * new ring, whoever made it, against a dead channel's task table. */
    u32 *r = grants.lookup(&c);
    if (r) {
        u32 row = *r;
        struct grant *g = grant_rows.lookup(&row);
        if (g && g->ring == c)
            g->ring = 0;
        grants.delete(&c);
    }
    /* Every new ring makes every cached entry for its address stale, even
     * one whose grant the service removed a moment ago. */
    u32 one = 1;
    u64 *gen = grants_gen.lookup(&one);
    if (gen)
        __sync_fetch_and_add(gen, 1);
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!brokers.lookup(&tgid))
        return 0;
    struct ckey k = {.tgid = tgid, .fd = (s32)ctx->args[0]};
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
 * so the client keeps that histogram itself in its task table map, after
 * the task entries; see drb_task.h. */
