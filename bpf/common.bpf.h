/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * BPF-side helpers shared by every family: the ring buffer with lazy wakeup,
 * per-family loss counters, load-time settings and the task block.
 */
#ifndef KTRACE_COMMON_BPF_H
#define KTRACE_COMMON_BPF_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>
#include "common.h"
#include "core_fixes.bpf.h"

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17

/* Load-time settings, written by the loader into .rodata before load. */
const volatile __u32 kt_self_tgid = 0;		/* ktrace's own events are never recorded */
const volatile __u32 kt_sample_every = 1;	/* keep 1 flow in N; 0 and 1 keep all */
const volatile __u8 kt_filter_ports = 0;	/* only flows with a port in kt_ports */
const volatile __u64 kt_wake_bytes = 256 * 1024;

/*
 * The events of the busy families (TCP, UDP, drops, latency) cross this ring.
 * Sized by the loader (--ring-size).
 */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 * 1024 * 1024);
} events SEC(".maps");

/*
 * The rare, precious families (oom, process, cgroups, dns, dns_names) have a
 * ring of their own, so a flood of TCP or UDP events can never take the place
 * of the one exec or OOM kill that explains an incident. Sized by the loader
 * (--rare-ring-size).
 */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1024 * 1024);
} rare SEC(".maps");

/*
 * Loss counters, indexed by enum kt_family. Updated in every hook; read once at
 * the end of the window.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, KT_FAMILY_MAX);
	__type(key, __u32);
	__type(value, struct kt_counters);
} counters SEC(".maps");

/*
 * Port allowlist (host byte order). Inserted by the loader before attach when
 * --ports is given; never changed during the window.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u16);
	__type(value, __u8);
} ports SEC(".maps");

static __always_inline struct kt_counters *kt_counters_of(__u32 family)
{
	return bpf_map_lookup_elem(&counters, &family);
}

/*
 * Count one event of a family under a kind of outcome. Atomic, because a softirq
 * hook can interrupt a process-context hook on the same CPU and the totals must
 * add up exactly (seen = written + each kind of loss).
 */
#define kt_count(family, field)                                           \
	do {                                                              \
		struct kt_counters *__c = kt_counters_of(family);         \
		if (__c)                                                  \
			__sync_fetch_and_add(&__c->field, 1);             \
	} while (0)

static __always_inline bool kt_is_self(void)
{
	return kt_self_tgid && (bpf_get_current_pid_tgid() >> 32) == kt_self_tgid;
}

/* True when the flow may be recorded under --ports. */
static __always_inline bool kt_ports_allow(__u16 sport, __u16 dport)
{
	if (!kt_filter_ports)
		return true;
	return bpf_map_lookup_elem(&ports, &sport) || bpf_map_lookup_elem(&ports, &dport);
}

/*
 * The 1-in-N sampling decision of a flow, from its two ports only and the same
 * at both ends: the ports are put in order first, so a client and the server it
 * talks to (in two namespaces of one node, or on two nodes each running ktrace)
 * keep or drop the flow together: a DNS query and its reply, the two halves of
 * one TCP connection. The
 * addresses are left out on purpose: a server bound to the wildcard address sees
 * 0.0.0.0 where its client sees the server's address, and a Service's DNAT shows
 * the client a virtual IP the server never sees. Ports survive both (a NAT that
 * rewrites ports, e.g. SNAT on a collision, splits the decision).
 */
static __always_inline bool kt_sample_ports(__u16 port_a, __u16 port_b)
{
	__u32 h;

	if (kt_sample_every <= 1)
		return true;
	h = port_a < port_b ? (__u32)port_a << 16 | port_b : (__u32)port_b << 16 | port_a;
	/* murmur3 finalizer: neighbouring ephemeral ports land far apart */
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h % kt_sample_every == 0;
}

/* Reserve an event of the given kind on ring; counts a reservation failure against family. */
static __always_inline void *kt_reserve_on(void *ring, __u32 family, __u16 kind, __u32 size)
{
	struct kt_hdr *hdr = bpf_ringbuf_reserve(ring, size, 0);

	if (!hdr) {
		kt_count(family, ringbuf_full);
		return NULL;
	}
	hdr->ts_ns = bpf_ktime_get_boot_ns();
	hdr->kind = kind;
	hdr->size = size;
	hdr->cpu = bpf_get_smp_processor_id();
	return hdr;
}

/*
 * Submit without waking the reader, except on the one record that takes the
 * backlog of its ring past kt_wake_bytes. The reader also polls on a short
 * timer. Waking user space for every record is what slows a traced workload
 * most; forcing a wakeup on every record past the mark (not just the crossing
 * one) turns into backpressure once the reader falls behind. ring must be the
 * ring the event was reserved on: its backlog is the one that counts.
 */
static __always_inline void kt_submit_on(void *ring, void *event, __u32 size)
{
	/* each record carries an 8-byte header and is rounded up to 8 bytes */
	__u64 record = ((size + 7) & ~7) + 8;
	__u64 avail = bpf_ringbuf_query(ring, BPF_RB_AVAIL_DATA);
	__u64 flags = BPF_RB_NO_WAKEUP;

	if (avail >= kt_wake_bytes && avail - record < kt_wake_bytes)
		flags = BPF_RB_FORCE_WAKEUP;
	bpf_ringbuf_submit(event, flags);
}

/* The busy families' ring. */
static __always_inline void *kt_reserve(__u32 family, __u16 kind, __u32 size)
{
	return kt_reserve_on(&events, family, kind, size);
}

static __always_inline void kt_submit(void *event, __u32 size)
{
	kt_submit_on(&events, event, size);
}

/* The rare families' ring: an event reserved with kt_reserve_rare goes out with kt_submit_rare. */
static __always_inline void *kt_reserve_rare(__u32 family, __u16 kind, __u32 size)
{
	return kt_reserve_on(&rare, family, kind, size);
}

static __always_inline void kt_submit_rare(void *event, __u32 size)
{
	kt_submit_on(&rare, event, size);
}

/* Fill the task block from a task_struct (usually the current task). */
static __always_inline void kt_fill_task(struct kt_task *t, struct task_struct *task)
{
	const struct cred *cred = BPF_CORE_READ(task, cred);
	struct nsproxy *ns = BPF_CORE_READ(task, nsproxy);
	int memcg = bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id);

	t->pid = BPF_CORE_READ(task, pid);
	t->tgid = BPF_CORE_READ(task, tgid);
	t->ppid = BPF_CORE_READ(task, real_parent, tgid);
	t->uid = BPF_CORE_READ(cred, uid.val);
	t->gid = BPF_CORE_READ(cred, gid.val);
	t->cap_effective = kt_cred_cap_effective(cred);
	t->seccomp_mode = BPF_CORE_READ(task, seccomp.mode);
	t->cgroup_id = BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id);
	/* on v1/hybrid hosts the memory controller's cgroup is where pods are charged */
	if (memcg >= 0 && memcg < CGROUP_SUBSYS_COUNT)
		t->memcg_id = BPF_CORE_READ(task, cgroups, subsys[memcg], cgroup, kn, id);
	t->netns = BPF_CORE_READ(ns, net_ns, ns.inum);
	t->mntns = BPF_CORE_READ(ns, mnt_ns, ns.inum);
	t->pidns = BPF_CORE_READ(ns, pid_ns_for_children, ns.inum);
	t->userns = BPF_CORE_READ(cred, user_ns, ns.inum);
	BPF_CORE_READ_STR_INTO(&t->comm, task, comm);
	/* a worker thread may be named apart (prctl PR_SET_NAME: dig's isc-net-0000); rows keyed by process use this */
	BPF_CORE_READ_STR_INTO(&t->pcomm, task, group_leader, comm);
}

static __always_inline void kt_fill_current(struct kt_task *t)
{
	kt_fill_task(t, (struct task_struct *)bpf_get_current_task());
}

#endif /* KTRACE_COMMON_BPF_H */
