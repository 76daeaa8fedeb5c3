// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Latency families: sched (how long runnable tasks wait on a run queue before
 * they run) and blockio (how long block requests take from issue to the driver
 * to completion).
 *
 * Both run far too often for an event each: sched_switch fires on every context
 * switch of the node. Every wait goes into a log2 histogram of microseconds in a
 * per-CPU hash (per cgroup for sched, per disk and kind of request for blockio),
 * which user space reads once when the window ends. Only a wait over the
 * --sched-warn / --bio-warn threshold crosses the ring buffer, with who waited.
 *
 * Loss accounting (struct kt_counters, per family): seen = switch-ins (sched) or
 * completions (blockio) examined; filtered = those with no start time to
 * measure from (the task was queued, or the request issued, before the window,
 * or the idle task); aggregated = waits added to a histogram. User space writes
 * each histogram as a line of events.jsonl that stands for its count of waits,
 * so seen = written + filtered. Outlier events duplicate a histogram sample and
 * stand for no wait of their own.
 */
#include "common.bpf.h"
#include "latency.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Anchors that put the structs and enums into this object's BTF. */
struct kt_runq_latency_event _kt_runq_latency_event = {};
struct kt_bio_latency_event _kt_bio_latency_event = {};
struct kt_hist _kt_hist = {};
struct kt_bio_hist _kt_bio_hist = {};
struct kt_runq_key _kt_runq_key = {};
struct kt_bio_key _kt_bio_key = {};
enum kt_kind _kt_kind = 0;
enum kt_family _kt_family = 0;
enum kt_latency_sizes _kt_latency_sizes = 0;
enum kt_latency_loss _kt_latency_loss = 0;
enum kt_bio_op _kt_bio_op = 0;

#define TASK_RUNNING 0
#define REQ_OP_MASK 0xff

/* Load-time settings of this object, written by the loader. */
const volatile __u64 kt_sched_warn_ns = 10 * 1000 * 1000;	/* --sched-warn */
const volatile __u64 kt_bio_warn_ns = 100 * 1000 * 1000;	/* --bio-warn */

static const struct kt_hist kt_zero_hist = {};
static const struct kt_bio_hist kt_zero_bio_hist = {};

/*
 * Run-queue waits per cgroup. Inserted by the first wait of a cgroup; read at
 * the end of the window. When it is full, waits of new cgroups go to the
 * entry of key {0, 0}, which user space inserts before the window starts.
 * Not preallocated: 272 bytes per CPU per entry would be megabytes on a large
 * node for cgroups that never show up; an entry is allocated once per cgroup.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct kt_runq_key);
	__type(value, struct kt_hist);
} runq_hist SEC(".maps");

/*
 * Thread id → when it was queued (bpf_ktime_get_ns). Inserted when a task is
 * woken or preempted, deleted when it runs, so it holds the runnable tasks of
 * the node. A hash of fixed size rather than task storage: task storage was
 * measured 40-80 ns cheaper per wakeup here (README, "Cost"), but it grows
 * with the node's tasks instead of having a reported size, needs v5.11 and
 * works only with the BTF pointers of tp_btf, not on the raw_tp alternative.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u64);
} runq_queued SEC(".maps");

/* A block request between its issue and its completion. */
struct kt_bio_start {
	__u64 ts_ns;
	__u64 sector;
	__u64 pid_tgid;		/* who issued it */
	__u32 dev;
	__u32 bytes;
	__u8 comm[KT_COMM_LEN];
	__u8 pcomm[KT_COMM_LEN];	/* its process's name (the thread group leader's comm) */
	__u8 op;
	__u8 _pad[7];
};

/*
 * struct request * → its issue. Inserted at block_rq_issue, deleted at its
 * first block_rq_complete. A request whose completion was missed (issued as
 * the probes detached) is overwritten when the same request is issued again.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u64);
	__type(value, struct kt_bio_start);
} bio_inflight SEC(".maps");

/* Block I/O latency per disk and kind of request; {0, 0} is the overflow entry, as in runq_hist. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct kt_bio_key);
	__type(value, struct kt_bio_hist);
} bio_hist SEC(".maps");

/* enum kt_latency_loss → count. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, KT_LOSS_MAX);
	__type(key, __u32);
	__type(value, __u64);
} lat_losses SEC(".maps");

static __always_inline void kt_lat_loss(__u32 which)
{
	__u64 *n = bpf_map_lookup_elem(&lat_losses, &which);

	if (n)
		*n += 1;	/* per CPU, and the hooks of one family do not nest on a CPU */
}

/* The histogram slot of a wait: 0 under 1 us, i for [2^(i-1), 2^i) us, the last for anything longer. */
static __always_inline __u32 kt_slot(__u64 ns)
{
	__u64 us = ns / 1000;
	__u32 slot = 0;

	if (us >= (1ULL << 32)) { us >>= 32; slot += 32; }
	if (us >= (1ULL << 16)) { us >>= 16; slot += 16; }
	if (us >= (1ULL << 8)) { us >>= 8; slot += 8; }
	if (us >= (1ULL << 4)) { us >>= 4; slot += 4; }
	if (us >= (1ULL << 2)) { us >>= 2; slot += 2; }
	if (us >= (1ULL << 1)) { slot += 1; }
	/* slot is now floor(log2(us)) for us >= 1 */
	if (ns < 1000)
		return 0;
	slot += 1;
	return slot < KT_HIST_SLOTS ? slot : KT_HIST_SLOTS - 1;
}

static __always_inline void kt_hist_add(struct kt_hist *h, __u64 ns)
{
	__u32 slot = kt_slot(ns);

	/* per-CPU value: plain adds, and no other program adds to it on this CPU at the same time */
	if (slot < KT_HIST_SLOTS)
		h->slots[slot] += 1;
	h->sum_ns += ns;
	if (ns > h->max_ns)
		h->max_ns = ns;
}

/* The histogram of a key, created on first use; the overflow entry when the map is full. */
static __always_inline void *kt_hist_of(void *map, void *key, const void *zero, void *overflow_key)
{
	void *h = bpf_map_lookup_elem(map, key);

	if (h)
		return h;
	bpf_map_update_elem(map, key, zero, BPF_NOEXIST);
	h = bpf_map_lookup_elem(map, key);
	if (h)
		return h;
	return bpf_map_lookup_elem(map, overflow_key);
}

/* --- sched: run-queue latency --- */

/*
 * task_struct::state became __state in v5.14, 2f064a59a11f ("sched: Change
 * task_struct::state"). A 0 state at a switch-out means the task was preempted
 * and goes straight back on the run queue.
 */
struct task_struct___o {
	volatile long state;
} __attribute__((preserve_access_index));

static __always_inline bool kt_still_runnable(struct task_struct *prev, bool direct)
{
	if (bpf_core_field_exists(prev->__state))
		return (direct ? prev->__state : BPF_CORE_READ(prev, __state)) == TASK_RUNNING;
	return BPF_CORE_READ((struct task_struct___o *)prev, state) == TASK_RUNNING;
}

static __always_inline void kt_runq_queue(__u32 pid, __u64 now)
{
	if (!pid)	/* the idle task is never queued */
		return;
	if (bpf_map_update_elem(&runq_queued, &pid, &now, BPF_ANY))
		kt_lat_loss(KT_LOSS_RUNQ_QUEUED_FULL);
}

static __always_inline void kt_runq_key_of(struct task_struct *t, bool direct, struct kt_runq_key *key)
{
	int memcg = bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id);

	if (direct) {
		key->cgroup_id = t->cgroups->dfl_cgrp->kn->id;
		if (memcg >= 0 && memcg < CGROUP_SUBSYS_COUNT)
			key->memcg_id = t->cgroups->subsys[memcg]->cgroup->kn->id;
	} else {
		key->cgroup_id = BPF_CORE_READ(t, cgroups, dfl_cgrp, kn, id);
		if (memcg >= 0 && memcg < CGROUP_SUBSYS_COUNT)
			key->memcg_id = BPF_CORE_READ(t, cgroups, subsys[memcg], cgroup, kn, id);
	}
}

static __always_inline void kt_runq_outlier(struct task_struct *prev, struct task_struct *next, __u64 wait_ns)
{
	struct kt_runq_latency_event *e;

	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		/* the wait is in its histogram: only the detail is lost, not a counted event */
		kt_lat_loss(KT_LOSS_RUNQ_OUTLIER);
		return;
	}
	e->hdr.ts_ns = bpf_ktime_get_boot_ns();
	e->hdr.kind = KT_KIND_RUNQ_LATENCY;
	e->hdr.size = sizeof(*e);
	e->hdr.cpu = bpf_get_smp_processor_id();
	kt_fill_task(&e->task, next);
	e->wait_ns = wait_ns;
	e->prev_pid = BPF_CORE_READ(prev, pid);
	e->prev_tgid = BPF_CORE_READ(prev, tgid);
	BPF_CORE_READ_STR_INTO(&e->prev_comm, prev, comm);
	kt_submit(e, sizeof(*e));
}

/* prev leaves the CPU, next gets it. direct: the pointers are BTF pointers that plain loads may read. */
static __always_inline int kt_runq_switch(struct task_struct *prev, struct task_struct *next, bool direct)
{
	struct kt_runq_key key = {}, overflow = {};
	__u64 now = bpf_ktime_get_ns(), *queued, wait;
	__u32 pid;
	struct kt_hist *h;

	if (kt_still_runnable(prev, direct))
		kt_runq_queue(direct ? prev->pid : BPF_CORE_READ(prev, pid), now);
	kt_count(KT_FAMILY_SCHED, seen);
	pid = direct ? next->pid : BPF_CORE_READ(next, pid);
	queued = pid ? bpf_map_lookup_elem(&runq_queued, &pid) : NULL;
	if (!queued) {
		kt_count(KT_FAMILY_SCHED, filtered);
		return 0;
	}
	wait = now - *queued;
	bpf_map_delete_elem(&runq_queued, &pid);
	kt_runq_key_of(next, direct, &key);
	h = kt_hist_of(&runq_hist, &key, &kt_zero_hist, &overflow);
	if (!h) {	/* only if user space did not insert the overflow entry */
		kt_count(KT_FAMILY_SCHED, filtered);
		return 0;
	}
	kt_hist_add(h, wait);
	kt_count(KT_FAMILY_SCHED, aggregated);
	if (wait > kt_sched_warn_ns)
		kt_runq_outlier(prev, next, wait);
	return 0;
}

/* sched, alternative 1: BTF-typed tracepoints (v5.5+). */
SEC("tp_btf/sched_wakeup")
int BPF_PROG(kt_runq_wakeup_btf, struct task_struct *p)
{
	kt_runq_queue(p->pid, bpf_ktime_get_ns());
	return 0;
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(kt_runq_wakeup_new_btf, struct task_struct *p)
{
	kt_runq_queue(p->pid, bpf_ktime_get_ns());
	return 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(kt_runq_switch_btf, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	return kt_runq_switch(prev, next, true);
}

/* sched, alternative 2: raw tracepoints (v4.17+), the same arguments as plain u64 values. */
SEC("raw_tp/sched_wakeup")
int BPF_PROG(kt_runq_wakeup_raw, struct task_struct *p)
{
	kt_runq_queue(BPF_CORE_READ(p, pid), bpf_ktime_get_ns());
	return 0;
}

SEC("raw_tp/sched_wakeup_new")
int BPF_PROG(kt_runq_wakeup_new_raw, struct task_struct *p)
{
	kt_runq_queue(BPF_CORE_READ(p, pid), bpf_ktime_get_ns());
	return 0;
}

SEC("raw_tp/sched_switch")
int BPF_PROG(kt_runq_switch_raw, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	return kt_runq_switch(prev, next, false);
}

/* --- blockio: block request latency --- */

static __always_inline __u8 kt_bio_op_of(__u32 cmd_flags)
{
	switch (cmd_flags & REQ_OP_MASK) {
	case 0: return KT_BIO_READ;	/* REQ_OP_READ */
	case 1: return KT_BIO_WRITE;	/* REQ_OP_WRITE */
	case 2: return KT_BIO_FLUSH;	/* REQ_OP_FLUSH */
	case 3: return KT_BIO_DISCARD;	/* REQ_OP_DISCARD */
	default: return KT_BIO_OTHER;
	}
}

/* The disk's dev_t, as block_rq_issue's own dev field has it: disk_devt(rq->q->disk). */
static __always_inline __u32 kt_rq_dev(struct request *rq)
{
	struct gendisk *disk = BPF_CORE_READ(rq, q, disk);

	if (!disk)
		return 0;
	return (__u32)BPF_CORE_READ(disk, major) << 20 | (__u32)BPF_CORE_READ(disk, first_minor);
}

static __always_inline int kt_bio_issue(struct request *rq)
{
	struct kt_bio_start s = {};
	__u64 key = (__u64)rq;

	s.ts_ns = bpf_ktime_get_ns();
	s.sector = BPF_CORE_READ(rq, __sector);
	s.bytes = BPF_CORE_READ(rq, __data_len);
	s.op = kt_bio_op_of(BPF_CORE_READ(rq, cmd_flags));
	s.dev = kt_rq_dev(rq);
	s.pid_tgid = bpf_get_current_pid_tgid();
	bpf_get_current_comm(&s.comm, sizeof(s.comm));
	BPF_CORE_READ_STR_INTO(&s.pcomm, (struct task_struct *)bpf_get_current_task(), group_leader, comm);
	if (bpf_map_update_elem(&bio_inflight, &key, &s, BPF_ANY))
		kt_lat_loss(KT_LOSS_BIO_INFLIGHT_FULL);
	return 0;
}

static __always_inline void kt_bio_outlier(const struct kt_bio_start *s, __u64 latency, int error)
{
	struct kt_bio_latency_event *e;

	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		kt_lat_loss(KT_LOSS_BIO_OUTLIER);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->hdr.ts_ns = bpf_ktime_get_boot_ns();
	e->hdr.kind = KT_KIND_BIO_LATENCY;
	e->hdr.size = sizeof(*e);
	e->hdr.cpu = bpf_get_smp_processor_id();
	e->task.pid = (__u32)s->pid_tgid;
	e->task.tgid = s->pid_tgid >> 32;
	__builtin_memcpy(e->task.comm, s->comm, KT_COMM_LEN);
	__builtin_memcpy(e->task.pcomm, s->pcomm, KT_COMM_LEN);
	e->latency_ns = latency;
	e->sector = s->sector;
	e->dev = s->dev;
	e->bytes = s->bytes;
	e->error = error;
	e->op = s->op;
	kt_submit(e, sizeof(*e));
}

static __always_inline int kt_bio_complete(struct request *rq, int error)
{
	struct kt_bio_key hkey = {}, overflow = {};
	struct kt_bio_start s;
	struct kt_bio_start *found;
	struct kt_bio_hist *h;
	__u64 key = (__u64)rq, latency;

	kt_count(KT_FAMILY_BLOCKIO, seen);
	found = bpf_map_lookup_elem(&bio_inflight, &key);
	if (!found) {
		kt_count(KT_FAMILY_BLOCKIO, filtered);
		return 0;
	}
	__builtin_memcpy(&s, found, sizeof(s));
	bpf_map_delete_elem(&bio_inflight, &key);
	latency = bpf_ktime_get_ns() - s.ts_ns;
	hkey.dev = s.dev;
	hkey.op = s.op;
	h = kt_hist_of(&bio_hist, &hkey, &kt_zero_bio_hist, &overflow);
	if (!h) {
		kt_count(KT_FAMILY_BLOCKIO, filtered);
		return 0;
	}
	kt_hist_add(&h->lat, latency);
	h->bytes += s.bytes;
	kt_count(KT_FAMILY_BLOCKIO, aggregated);
	if (latency > kt_bio_warn_ns)
		kt_bio_outlier(&s, latency, error);
	return 0;
}

/* blockio, alternative 1: BTF-typed tracepoints (v5.5+). */
SEC("tp_btf/block_rq_issue")
int BPF_PROG(kt_bio_issue_btf, struct request *rq)
{
	return kt_bio_issue(rq);
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(kt_bio_done_btf, struct request *rq, int error, unsigned int nr_bytes)
{
	return kt_bio_complete(rq, error);
}

/* blockio, alternative 2: raw tracepoints (v4.17+); the classic tracepoints carry no request pointer to key by. */
SEC("raw_tp/block_rq_issue")
int BPF_PROG(kt_bio_issue_raw, struct request *rq)
{
	return kt_bio_issue(rq);
}

SEC("raw_tp/block_rq_complete")
int BPF_PROG(kt_bio_done_raw, struct request *rq, int error, unsigned int nr_bytes)
{
	return kt_bio_complete(rq, error);
}
