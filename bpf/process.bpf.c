// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Process lifecycle and OOM probe families.
 *
 * process: one event per successful exec, per new process (a fork/clone whose
 * child leads its own thread group) and per exit of a thread group leader. New
 * threads are only counted (proc_counts). ktrace's own process is left out.
 *
 * oom: one event per victim the OOM killer marks (mark_victim), with its memory
 * sizes and the task that was allocating when the OOM hit.
 *
 * Each family has two alternatives in this object: tp_btf (v5.5+, BTF-typed
 * task_struct pointers) and the classic tracepoints (trace_event_raw_* structs).
 * These events are rare next to network traffic: they all cross the ring.
 */
#include "common.bpf.h"
#include "process.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Anchors that put the event structs and enums into this object's BTF. */
struct kt_oom_event _kt_oom_event = {};
struct kt_exec_event _kt_exec_event = {};
struct kt_fork_event _kt_fork_event = {};
struct kt_exit_event _kt_exit_event = {};
enum kt_kind _kt_kind = 0;
enum kt_family _kt_family = 0;
enum kt_oom_source _kt_oom_source = 0;
enum kt_proc_counter _kt_proc_counter = 0;
enum kt_process_sizes _kt_process_sizes = 0;

/* include/linux/mm_types_task.h: the mm counters (an anonymous enum, stable since v4.5) */
#define KT_MM_FILEPAGES 0
#define KT_MM_ANONPAGES 1
#define KT_MM_SHMEMPAGES 3

/* Load-time settings of this object, written by the loader. */
const volatile __u8 kt_with_args = 0;	/* --with-args: copy argv into exec events */
const volatile __u32 kt_page_shift = 12;	/* log2 of the page size (mm counters count pages) */

/* Thread creations (enum kt_proc_counter), per CPU; read once when the window ends. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, KT_PROC_COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
} proc_counts SEC(".maps");

static __always_inline void kt_proc_count(__u32 counter)
{
	__u64 *n;

	if (kt_is_self())
		return;
	n = bpf_map_lookup_elem(&proc_counts, &counter);
	if (n)
		*n += 1;	/* per CPU, and fork runs in process context: no other writer */
}

/* --- exec --- */

static __always_inline void kt_emit_exec(struct task_struct *task, __u32 old_tid, const char *filename)
{
	struct kt_exec_event *e;

	if (kt_is_self())
		return;
	kt_count(KT_FAMILY_PROCESS, seen);
	e = kt_reserve_rare(KT_FAMILY_PROCESS, KT_KIND_EXEC, sizeof(*e));
	if (!e)
		return;
	kt_fill_task(&e->task, task);
	e->old_tid = old_tid;
	e->args_len = 0;
	e->args_truncated = 0;
	e->_pad = 0;
	if (bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), filename) < 0)
		e->filename[0] = 0;
	if (kt_with_args) {
		/*
		 * The new image's argv, laid out by the binfmt loader before this
		 * tracepoint and just written by the kernel, so it is resident.
		 */
		struct mm_struct *mm = BPF_CORE_READ(task, mm);
		__u64 start = BPF_CORE_READ(mm, arg_start);
		__u64 end = BPF_CORE_READ(mm, arg_end);
		__u64 len = end > start ? end - start : 0;

		if (len > KT_ARGS_LEN) {
			len = KT_ARGS_LEN;
			e->args_truncated = 1;
		}
		if (len && bpf_probe_read_user(e->args, len, (const void *)start) == 0)
			e->args_len = len;
	}
	kt_submit_rare(e, sizeof(*e));
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(kt_exec_btf, struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{
	kt_emit_exec(p, old_pid, BPF_CORE_READ(bprm, filename));
	return 0;
}

SEC("tracepoint/sched/sched_process_exec")
int kt_exec_tp(struct trace_event_raw_sched_process_exec *ctx)
{
	/* __data_loc: the low 16 bits are the string's offset from the start of the record */
	__u32 loc = BPF_CORE_READ(ctx, __data_loc_filename);

	kt_emit_exec((struct task_struct *)bpf_get_current_task(), BPF_CORE_READ(ctx, old_pid),
		     (const char *)ctx + (loc & 0xffff));
	return 0;
}

/* --- fork --- */

static __always_inline void kt_emit_fork(struct task_struct *parent, __u32 child_pid, __u32 child_ppid)
{
	struct kt_fork_event *e;

	if (kt_is_self())
		return;
	kt_count(KT_FAMILY_PROCESS, seen);
	e = kt_reserve_rare(KT_FAMILY_PROCESS, KT_KIND_FORK, sizeof(*e));
	if (!e)
		return;
	kt_fill_task(&e->task, parent);
	e->child_pid = child_pid;
	e->child_ppid = child_ppid;
	kt_submit_rare(e, sizeof(*e));
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(kt_fork_btf, struct task_struct *parent, struct task_struct *child)
{
	__u32 pid = BPF_CORE_READ(child, pid);

	if (pid != BPF_CORE_READ(child, tgid)) {
		kt_proc_count(KT_PROC_THREADS_CREATED);
		return 0;
	}
	kt_emit_fork(parent, pid, BPF_CORE_READ(child, real_parent, tgid));
	return 0;
}

SEC("tracepoint/sched/sched_process_fork")
int kt_fork_tp(struct trace_event_raw_sched_process_fork *ctx)
{
	struct task_struct *parent = (struct task_struct *)bpf_get_current_task();
	__u32 child = BPF_CORE_READ(ctx, child_pid);
	struct list_head *last = BPF_CORE_READ(parent, signal, thread_head.prev);
	struct task_struct *newest;

	/*
	 * The record names the child by thread id only. copy_process() appends a
	 * new thread to its group's thread list (signal->thread_head), so when the
	 * caller's group now ends with the child, the child is a thread. A thread
	 * added concurrently by another thread of the group can hide that: then it
	 * is reported as a process.
	 */
	newest = (void *)last - bpf_core_field_offset(struct task_struct, thread_node);
	if (BPF_CORE_READ(newest, pid) == child) {
		kt_proc_count(KT_PROC_THREADS_CREATED);
		return 0;
	}
	/* the child's real parent is the caller's group, unless CLONE_PARENT, which this path cannot see */
	kt_emit_fork(parent, child, BPF_CORE_READ(parent, tgid));
	return 0;
}

/* --- exit --- */

static __always_inline void kt_emit_exit(struct task_struct *task)
{
	struct kt_exit_event *e;

	/* only the group leader: a process ends once, its threads are not processes */
	if (BPF_CORE_READ(task, pid) != BPF_CORE_READ(task, tgid) || kt_is_self())
		return;
	kt_count(KT_FAMILY_PROCESS, seen);
	e = kt_reserve_rare(KT_FAMILY_PROCESS, KT_KIND_EXIT, sizeof(*e));
	if (!e)
		return;
	kt_fill_task(&e->task, task);
	/* start_time is CLOCK_MONOTONIC, like bpf_ktime_get_ns() */
	e->runtime_ns = bpf_ktime_get_ns() - BPF_CORE_READ(task, start_time);
	e->exit_code = BPF_CORE_READ(task, exit_code);
	e->_pad = 0;
	kt_submit_rare(e, sizeof(*e));
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(kt_exit_btf, struct task_struct *p)
{
	kt_emit_exit(p);
	return 0;
}

/*
 * Since v6.9 the exit record has its own layout (comm inline, group_dead), no
 * longer sched_process_template's: declaring the context as the template reads
 * garbage. The task is current either way, which is all this program reads.
 */
SEC("tracepoint/sched/sched_process_exit")
int kt_exit_tp(struct trace_event_raw_sched_process_exit *ctx)
{
	kt_emit_exit((struct task_struct *)bpf_get_current_task());
	return 0;
}

/* --- oom --- */

/*
 * Before v6.2 the mm counters were atomics in struct mm_rss_stat; f1a7941243c1
 * ("mm: convert mm's rss stats into percpu_counter") made them percpu_counters.
 */
struct mm_rss_stat___pre62 {
	long count[4];
} __attribute__((preserve_access_index));

struct mm_struct___pre62 {
	struct mm_rss_stat___pre62 rss_stat;
} __attribute__((preserve_access_index));

/* get_mm_counter(): the counter's global value, which lags its per-CPU batches; never below 0 */
static __always_inline __u64 kt_mm_pages(struct mm_struct *mm, int counter)
{
	long pages;

	/* 4 atomics before v6.2, 4 percpu_counters since; the branch not taken is dead code at load */
	if (bpf_core_field_size(mm->rss_stat) == sizeof(struct mm_rss_stat___pre62))
		pages = BPF_CORE_READ((struct mm_struct___pre62 *)mm, rss_stat.count[counter]);
	else
		pages = BPF_CORE_READ(mm, rss_stat[counter].count);
	return pages > 0 ? pages : 0;
}

static __always_inline struct kt_oom_event *kt_oom_reserve(void)
{
	struct task_struct *current = (struct task_struct *)bpf_get_current_task();
	struct kt_oom_event *e;

	kt_count(KT_FAMILY_OOM, seen);
	e = kt_reserve_rare(KT_FAMILY_OOM, KT_KIND_OOM, sizeof(*e));
	if (!e)
		return NULL;
	e->trigger_pid = BPF_CORE_READ(current, tgid);
	e->trigger_tid = BPF_CORE_READ(current, pid);
	BPF_CORE_READ_STR_INTO(&e->trigger_comm, current, comm);
	__builtin_memset(e->_pad, 0, sizeof(e->_pad));
	return e;
}

SEC("tp_btf/mark_victim")
int BPF_PROG(kt_oom_btf, struct task_struct *task, uid_t uid)
{
	struct kt_oom_event *e = kt_oom_reserve();
	struct mm_struct *mm;
	__u32 shift = kt_page_shift > 10 ? kt_page_shift - 10 : 0;

	if (!e)
		return 0;
	kt_fill_task(&e->task, task);
	e->source = KT_OOM_TASK;
	mm = BPF_CORE_READ(task, mm);
	e->total_vm_kb = BPF_CORE_READ(mm, total_vm) << shift;
	e->anon_rss_kb = kt_mm_pages(mm, KT_MM_ANONPAGES) << shift;
	e->file_rss_kb = kt_mm_pages(mm, KT_MM_FILEPAGES) << shift;
	e->shmem_rss_kb = kt_mm_pages(mm, KT_MM_SHMEMPAGES) << shift;
	e->pgtables_kb = BPF_CORE_READ(mm, pgtables_bytes.counter) >> 10;
	e->oom_score_adj = BPF_CORE_READ(task, signal, oom_score_adj);
	kt_submit_rare(e, sizeof(*e));
	return 0;
}

SEC("tracepoint/oom/mark_victim")
int kt_oom_tp(struct trace_event_raw_mark_victim *ctx)
{
	struct kt_oom_event *e = kt_oom_reserve();
	__u32 pid = BPF_CORE_READ(ctx, pid);
	__u32 loc = BPF_CORE_READ(ctx, __data_loc_comm);

	if (!e)
		return 0;
	/* the victim is only named here; often it is the allocating task itself */
	kt_fill_current(&e->task);
	e->source = KT_OOM_TRACEPOINT;
	if (e->task.pid != pid) {
		__builtin_memset(&e->task, 0, sizeof(e->task));
		e->task.pid = pid;
		e->task.tgid = pid;	/* the victim is the group leader the OOM killer chose */
		e->task.uid = BPF_CORE_READ(ctx, uid);
		bpf_probe_read_kernel_str(e->task.comm, sizeof(e->task.comm), (void *)ctx + (loc & 0xffff));
		__builtin_memcpy(e->task.pcomm, e->task.comm, KT_COMM_LEN);
		/* the memory cgroup charged is the allocating task's (or an ancestor of it) */
		{
			struct task_struct *current = (struct task_struct *)bpf_get_current_task();
			int memcg = bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id);

			e->task.cgroup_id = BPF_CORE_READ(current, cgroups, dfl_cgrp, kn, id);
			if (memcg >= 0 && memcg < CGROUP_SUBSYS_COUNT)
				e->task.memcg_id = BPF_CORE_READ(current, cgroups, subsys[memcg], cgroup, kn, id);
		}
	}
	e->total_vm_kb = BPF_CORE_READ(ctx, total_vm);
	e->anon_rss_kb = BPF_CORE_READ(ctx, anon_rss);
	e->file_rss_kb = BPF_CORE_READ(ctx, file_rss);
	e->shmem_rss_kb = BPF_CORE_READ(ctx, shmem_rss);
	e->pgtables_kb = BPF_CORE_READ(ctx, pgtables);
	e->oom_score_adj = BPF_CORE_READ(ctx, oom_score_adj);
	kt_submit_rare(e, sizeof(*e));
	return 0;
}
