/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Process lifecycle (exec, fork, exit) and OOM kill event families. */
#ifndef KTRACE_PROCESS_H
#define KTRACE_PROCESS_H

#include "common.h"

enum kt_process_sizes {
	KT_PATH_LEN = 256,	/* exec filename, as given to execve(); longer ones are cut */
	KT_ARGS_LEN = 256,	/* argv bytes kept with --with-args; longer ones are cut */
};

/* Where the fields of an OOM event come from. */
enum kt_oom_source {
	/* tp_btf: the victim's task_struct, so its task block is complete */
	KT_OOM_TASK = 1,
	/*
	 * the classic tracepoint: pid, comm and uid of the victim only; its other
	 * task fields are the allocating task's, unless the victim is that task
	 */
	KT_OOM_TRACEPOINT = 2,
};

/* Counters of the process family that never become events, summed over CPUs at the end. */
enum kt_proc_counter {
	KT_PROC_THREADS_CREATED = 0,	/* clone(CLONE_THREAD): a new thread, not a new process */
	KT_PROC_COUNTER_MAX = 1,
};

/*
 * The OOM killer chose a victim (mark_victim). The task block is the victim;
 * trigger_* is the task that was allocating when the OOM hit (current at
 * mark_victim). Sizes are in kB. RSS comes from the mm's percpu counters
 * (get_mm_counter), which are approximate by up to a batch per CPU, exactly
 * as the kernel's own "Killed process" line reports them.
 */
struct kt_oom_event {
	struct kt_hdr hdr;
	struct kt_task task;	/* the victim */
	__u64 total_vm_kb;
	__u64 anon_rss_kb;
	__u64 file_rss_kb;
	__u64 shmem_rss_kb;
	__u64 pgtables_kb;
	__u32 trigger_pid;	/* tgid of the allocating task */
	__u32 trigger_tid;
	__s16 oom_score_adj;
	__u8 source;		/* enum kt_oom_source */
	__u8 _pad[5];
	__u8 trigger_comm[KT_COMM_LEN];
};
_Static_assert(sizeof(struct kt_oom_event) == 184, "kt_oom_event layout");

/*
 * A successful execve(). The task block is the process after the exec (new
 * comm). args is argv with NULs between the arguments, only with --with-args
 * (arguments hold secrets): args_len is 0 otherwise.
 */
struct kt_exec_event {
	struct kt_hdr hdr;
	struct kt_task task;
	__u32 old_tid;		/* the thread that called execve (a non-leader thread becomes the leader) */
	__u16 args_len;		/* bytes of args copied */
	__u8 args_truncated;	/* argv was longer than KT_ARGS_LEN */
	__u8 _pad;
	__u8 filename[KT_PATH_LEN];
	__u8 args[KT_ARGS_LEN];
};
_Static_assert(sizeof(struct kt_exec_event) == 632, "kt_exec_event layout");

/*
 * A new process (a child that leads its own thread group). The task block is
 * the task that called fork/clone. New threads are only counted.
 */
struct kt_fork_event {
	struct kt_hdr hdr;
	struct kt_task task;	/* the caller */
	__u32 child_pid;
	__u32 child_ppid;	/* the child's real parent (differs from the caller with CLONE_PARENT) */
};
_Static_assert(sizeof(struct kt_fork_event) == 120, "kt_fork_event layout");

/*
 * A thread group leader exited. exit_code is the kernel's raw wait status:
 * (status << 8) for exit(status), the signal number (| 0x80 with a core dump)
 * for a kill.
 */
struct kt_exit_event {
	struct kt_hdr hdr;
	struct kt_task task;
	__u64 runtime_ns;	/* since the process started (task start_time) */
	__u32 exit_code;
	__u32 _pad;
};
_Static_assert(sizeof(struct kt_exit_event) == 128, "kt_exit_event layout");

#endif /* KTRACE_PROCESS_H */
