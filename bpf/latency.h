/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Latency families: run-queue latency (sched) and block I/O latency
 * (blockio). Both count every wait into a log2 histogram in a kernel map that
 * user space reads when the window ends; only waits over a threshold cross the
 * ring buffer as events.
 */
#ifndef KTRACE_LATENCY_H
#define KTRACE_LATENCY_H

#include "common.h"

enum kt_latency_sizes {
	/*
	 * Slots of a log2 histogram of microseconds: slot 0 holds waits under
	 * 1 us, slot i (1..30) waits of [2^(i-1), 2^i) us, and the last slot
	 * everything from 2^30 us (about 18 minutes) up.
	 */
	KT_HIST_SLOTS = 32,
};

/* Losses of these families that the per-family counters do not tell apart: indexes of the lat_losses map. */
enum kt_latency_loss {
	KT_LOSS_RUNQ_QUEUED_FULL = 0,	/* runq_queued was full: the task's wait was not measured */
	KT_LOSS_RUNQ_OUTLIER = 1,	/* a runq_latency event found the ring full (its wait is in the histogram) */
	KT_LOSS_BIO_INFLIGHT_FULL = 2,	/* bio_inflight was full: the request was not timed */
	KT_LOSS_BIO_OUTLIER = 3,	/* a bio_latency event found the ring full (its latency is in the histogram) */
	KT_LOSS_MAX = 4,
};

/* A log2 histogram of waits, one per key and CPU (a per-CPU hash: no atomics on every context switch). */
struct kt_hist {
	__u64 slots[KT_HIST_SLOTS];
	__u64 sum_ns;		/* total of the waits, for the mean */
	__u64 max_ns;		/* the longest wait */
};
_Static_assert(sizeof(struct kt_hist) == 272, "kt_hist layout");

/*
 * Key of the run-queue histograms: the cgroups of the task that waited. Both
 * ids are kept, so one map serves v2 hosts (cgroup_id) and v1/hybrid hosts,
 * where every task is in the v2 root and the v1 memory cgroup is what tells
 * pods apart (memcg_id). User space decides which one names the cgroup.
 */
struct kt_runq_key {
	__u64 cgroup_id;	/* cgroup v2 id (kernfs id of the unified cgroup) */
	__u64 memcg_id;		/* v1 (or v2) memory cgroup kernfs id */
};
_Static_assert(sizeof(struct kt_runq_key) == 16, "kt_runq_key layout");

/*
 * A task that waited longer than --sched-warn on a run queue between being
 * woken (or preempted) and running. task is the task that waited.
 */
struct kt_runq_latency_event {
	struct kt_hdr hdr;	/* ts_ns: when it finally ran; cpu: where */
	struct kt_task task;
	__u64 wait_ns;
	__u32 prev_pid;		/* the thread that ran on the CPU just before it */
	__u32 prev_tgid;
	__u8 prev_comm[KT_COMM_LEN];
};
_Static_assert(sizeof(struct kt_runq_latency_event) == 144, "kt_runq_latency_event layout");

/* What a block request does, from its REQ_OP. */
enum kt_bio_op {
	KT_BIO_READ = 1,
	KT_BIO_WRITE = 2,
	KT_BIO_FLUSH = 3,
	KT_BIO_DISCARD = 4,
	KT_BIO_OTHER = 5,
};

/* Key of the block I/O histograms: a disk and what the requests did. */
struct kt_bio_key {
	__u32 dev;		/* the disk's dev_t in the kernel's encoding: major << 20 | minor */
	__u8 op;		/* enum kt_bio_op */
	__u8 _pad[3];
};
_Static_assert(sizeof(struct kt_bio_key) == 8, "kt_bio_key layout");

/* A disk's histogram of one kind of request, and the bytes those requests moved. */
struct kt_bio_hist {
	struct kt_hist lat;
	__u64 bytes;
};
_Static_assert(sizeof(struct kt_bio_hist) == 280, "kt_bio_hist layout");

/*
 * A block request that took longer than --bio-warn from issue to the driver
 * to completion. task is the thread that issued it, as of block_rq_issue:
 * only pid, tgid and comm are filled (the completion runs in interrupt context,
 * and a full task block per request in flight would cost too much).
 */
struct kt_bio_latency_event {
	struct kt_hdr hdr;	/* ts_ns: the completion; cpu: where it completed */
	struct kt_task task;
	__u64 latency_ns;
	__u64 sector;
	__u32 dev;		/* major << 20 | minor of the disk */
	__u32 bytes;
	__s32 error;		/* blk_status_t of the completion, 0 when it succeeded */
	__u8 op;		/* enum kt_bio_op */
	__u8 _pad[3];
};
_Static_assert(sizeof(struct kt_bio_latency_event) == 144, "kt_bio_latency_event layout");

#endif /* KTRACE_LATENCY_H */
