// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * cgroups probe family: one event per cgroup created, in any hierarchy, with
 * its kernfs id, hierarchy and path. Events name cgroups by id; user space
 * resolves ids by walking the mounted hierarchies, which misses a cgroup that
 * is created and removed during the window (a short-lived container, a cron
 * job's scope). These events give it the path when the cgroup is born.
 * cgroup creation is rare (a few per container start): every one crosses the ring.
 *
 * tp_btf/cgroup_mkdir (v5.5+) reads the struct cgroup directly; the classic
 * tracepoint (v4.19+, the cgroup events arrived with commit ed1777fb) has the
 * same fields, its path as a __data_loc string.
 */
#include "common.bpf.h"
#include "cgroups.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Anchors that put the event structs and enums into this object's BTF. */
struct kt_cgroup_mkdir_event _kt_cgroup_mkdir_event = {};
enum kt_kind _kt_kind = 0;
enum kt_family _kt_family = 0;
enum kt_cgroups_sizes _kt_cgroups_sizes = 0;

static __always_inline struct kt_cgroup_mkdir_event *kt_mkdir_reserve(void)
{
	struct kt_cgroup_mkdir_event *e;

	/* ktrace's own cgroups too: a cgroup is named whoever made it */
	kt_count(KT_FAMILY_CGROUPS, seen);
	e = kt_reserve_rare(KT_FAMILY_CGROUPS, KT_KIND_CGROUP_MKDIR, sizeof(*e));
	if (!e)
		return NULL;
	kt_fill_current(&e->task);
	return e;
}

SEC("tp_btf/cgroup_mkdir")
int BPF_PROG(kt_cgroup_mkdir_btf, struct cgroup *cgrp, const char *path)
{
	struct kt_cgroup_mkdir_event *e = kt_mkdir_reserve();

	if (!e)
		return 0;
	e->id = BPF_CORE_READ(cgrp, kn, id);
	e->hierarchy_id = BPF_CORE_READ(cgrp, root, hierarchy_id);
	e->level = BPF_CORE_READ(cgrp, level);
	if (bpf_probe_read_kernel_str(e->path, sizeof(e->path), path) < 0)
		e->path[0] = 0;
	kt_submit_rare(e, sizeof(*e));
	return 0;
}

SEC("tracepoint/cgroup/cgroup_mkdir")
int kt_cgroup_mkdir_tp(struct trace_event_raw_cgroup *ctx)
{
	struct kt_cgroup_mkdir_event *e = kt_mkdir_reserve();
	__u32 loc = BPF_CORE_READ(ctx, __data_loc_path);

	if (!e)
		return 0;
	e->id = BPF_CORE_READ(ctx, id);
	e->hierarchy_id = BPF_CORE_READ(ctx, root);
	e->level = BPF_CORE_READ(ctx, level);
	/* __data_loc: the low 16 bits are the string's offset from the record's start */
	if (bpf_probe_read_kernel_str(e->path, sizeof(e->path), (void *)ctx + (loc & 0xffff)) < 0)
		e->path[0] = 0;
	kt_submit_rare(e, sizeof(*e));
	return 0;
}
