/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Socket accessors shared by the TCP and UDP families. */
#ifndef KTRACE_SOCK_BPF_H
#define KTRACE_SOCK_BPF_H

#include "common.bpf.h"

struct kt_tuple {
	__u8 saddr[KT_ADDR_LEN];
	__u8 daddr[KT_ADDR_LEN];
	__u16 sport;
	__u16 dport;
	__u16 family;
};

static __always_inline void kt_sk_tuple(const struct sock *sk, struct kt_tuple *t)
{
	t->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	/* inet_sport, not skc_num: unhashing on the way to CLOSE zeroes skc_num */
	t->sport = bpf_ntohs(BPF_CORE_READ((struct inet_sock *)sk, inet_sport));
	t->dport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (t->family == AF_INET6) {
		BPF_CORE_READ_INTO((struct in6_addr *)t->saddr, sk, __sk_common.skc_v6_rcv_saddr);
		BPF_CORE_READ_INTO((struct in6_addr *)t->daddr, sk, __sk_common.skc_v6_daddr);
	} else {
		BPF_CORE_READ_INTO((__u32 *)t->saddr, sk, __sk_common.skc_rcv_saddr);
		BPF_CORE_READ_INTO((__u32 *)t->daddr, sk, __sk_common.skc_daddr);
	}
}

static __always_inline void kt_copy_tuple(const struct kt_tuple *t, __u8 *saddr, __u8 *daddr,
					  __u16 *sport, __u16 *dport, __u16 *family)
{
	__builtin_memcpy(saddr, t->saddr, KT_ADDR_LEN);
	__builtin_memcpy(daddr, t->daddr, KT_ADDR_LEN);
	*sport = t->sport;
	*dport = t->dport;
	*family = t->family;
}

static __always_inline __u32 kt_sk_netns(const struct sock *sk)
{
	return BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
}

/* The socket behind a file descriptor of the current task, or NULL. */
static __always_inline struct sock *kt_sock_of_fd(int fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds = BPF_CORE_READ(fdt, fd);
	unsigned int max_fds = BPF_CORE_READ(fdt, max_fds);
	struct file *file = NULL;
	struct socket *sock;
	__u16 mode;

	if (fd < 0 || (unsigned int)fd >= max_fds)
		return NULL;
	bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]);
	if (!file)
		return NULL;
	mode = BPF_CORE_READ(file, f_inode, i_mode);
	if ((mode & 0170000) != 0140000)	/* S_IFSOCK */
		return NULL;
	sock = BPF_CORE_READ(file, private_data);
	return BPF_CORE_READ(sock, sk);
}

#endif /* KTRACE_SOCK_BPF_H */
