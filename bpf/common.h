/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The kernel/user contract shared by every ktrace event family: the common
 * header, the task block, event kinds, probe families and loss counters.
 *
 * Layout rules (the Python decoders are generated from the objects' BTF):
 * fixed-width fields, widest first, no bitfields, no unions, sizes as enums so
 * they reach BTF, and a _Static_assert on every struct size.
 */
#ifndef KTRACE_COMMON_H
#define KTRACE_COMMON_H

enum kt_sizes {
	KT_COMM_LEN = 16,
	KT_ADDR_LEN = 16,
};

/* One value per event struct: kind KT_KIND_<X> is decoded as struct kt_<x>_event. */
enum kt_kind {
	KT_KIND_TCP_STATE = 1,
	KT_KIND_CONNECT = 2,
	KT_KIND_RETRANSMIT = 3,
	KT_KIND_RESET = 4,
	KT_KIND_UDP_FLOW = 5,
	KT_KIND_DNS = 6,
	KT_KIND_DNS_LOOKUP = 7,
	KT_KIND_OOM = 8,
	KT_KIND_EXEC = 9,
	KT_KIND_FORK = 10,
	KT_KIND_EXIT = 11,
	KT_KIND_DROP = 14,
	KT_KIND_RUNQ_LATENCY = 12,
	KT_KIND_BIO_LATENCY = 13,
	KT_KIND_CGROUP_MKDIR = 15,
};

/* Index of a probe family in the loss counters. */
enum kt_family {
	KT_FAMILY_TCP_STATE = 0,
	KT_FAMILY_CONNECT = 1,
	KT_FAMILY_RETRANSMIT = 2,
	KT_FAMILY_RESET = 3,
	KT_FAMILY_UDP = 4,
	KT_FAMILY_DNS = 5,
	KT_FAMILY_DNS_NAMES = 6,
	KT_FAMILY_OOM = 7,
	KT_FAMILY_PROCESS = 8,
	KT_FAMILY_DROPS = 11,
	KT_FAMILY_SCHED = 9,
	KT_FAMILY_BLOCKIO = 10,
	KT_FAMILY_CGROUPS = 12,
	KT_FAMILY_MAX = 13,
};

/* How the task block of an event was obtained. */
enum kt_attribution {
	/* the task that ran the hook, in process context (a syscall) */
	KT_ATTR_CURRENT = 1,
	/* the task that owned the socket, recorded earlier in process context */
	KT_ATTR_SOCKET_OWNER = 2,
	/* an accepted socket, owned by the task that listens on its port */
	KT_ATTR_LISTENER = 3,
	/* the socket's owner is unknown: the task block is whoever was on the CPU */
	KT_ATTR_CPU = 4,
};

/* Common header of every ring buffer record. */
struct kt_hdr {
	__u64 ts_ns;		/* bpf_ktime_get_boot_ns() */
	__u16 kind;		/* enum kt_kind */
	__u16 size;		/* sizeof the whole event */
	__u32 cpu;
};
_Static_assert(sizeof(struct kt_hdr) == 16, "kt_hdr layout");

/* Who did it. pid is the thread id, tgid the process id as user space sees them. */
struct kt_task {
	__u64 cgroup_id;	/* cgroup v2 id (st_ino of the unified cgroup dir) */
	__u64 memcg_id;		/* v1 (or v2) memory cgroup kernfs id */
	__u64 cap_effective;
	__u32 pid;
	__u32 tgid;
	__u32 ppid;		/* tgid of the real parent */
	__u32 uid;
	__u32 gid;
	__u32 netns;		/* namespace inode numbers */
	__u32 mntns;
	__u32 pidns;
	__u32 userns;
	__u32 seccomp_mode;
	__u8 comm[KT_COMM_LEN];	/* the thread's name */
	__u8 pcomm[KT_COMM_LEN];	/* the process's name: the thread group leader's comm */
};
_Static_assert(sizeof(struct kt_task) == 96, "kt_task layout");

/* Per-family loss accounting, per CPU, summed in user space. */
struct kt_counters {
	__u64 seen;		/* events the hooks saw */
	__u64 filtered;		/* rejected by the port allowlist or --dns-only */
	__u64 sampled_out;	/* rejected by flow sampling */
	__u64 ringbuf_full;	/* bpf_ringbuf_reserve() failed */
	__u64 aggregated;	/* folded into a kernel map instead of crossing the ring */
};
_Static_assert(sizeof(struct kt_counters) == 40, "kt_counters layout");

#endif /* KTRACE_COMMON_H */
