/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* cgroups event family: the cgroups created during the window, so their ids resolve to paths. */
#ifndef KTRACE_CGROUPS_H
#define KTRACE_CGROUPS_H

#include "common.h"

enum kt_cgroups_sizes {
	KT_CGROUP_PATH_LEN = 256,
};

/*
 * A cgroup created (mkdir in any hierarchy). The task block is whoever made it
 * (kubelet, the container runtime, systemd). path is the cgroup's path from
 * its hierarchy's root, as /proc/<pid>/cgroup shows it, NUL-terminated and cut
 * at KT_CGROUP_PATH_LEN - 1 bytes.
 */
struct kt_cgroup_mkdir_event {
	struct kt_hdr hdr;
	struct kt_task task;
	__u64 id;		/* kernfs node id: the st_ino of the cgroup's directory */
	__s32 hierarchy_id;	/* cgroup_root.hierarchy_id: 0 is cgroup2 */
	__s32 level;		/* depth below the hierarchy's root (its children are level 1) */
	__u8 path[KT_CGROUP_PATH_LEN];
};
_Static_assert(sizeof(struct kt_cgroup_mkdir_event) == 384, "kt_cgroup_mkdir_event layout");

#endif /* KTRACE_CGROUPS_H */
