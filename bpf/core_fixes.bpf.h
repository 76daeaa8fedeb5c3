/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Kernel-version shims, one accessor per kernel change, each citing the commit.
 * Probes call these accessors; they never read a field whose layout moved.
 */
#ifndef KTRACE_CORE_FIXES_BPF_H
#define KTRACE_CORE_FIXES_BPF_H

#include <bpf/bpf_core_read.h>

/*
 * kernel_cap_t became a single u64 in v6.3, f122a08b197d ("capability: just use
 * a 'u64' instead of a 'u32[2]' array"). Both layouts are 8 bytes with the low
 * word first on little-endian machines, so one 8-byte read serves both.
 */
static __always_inline __u64 kt_cred_cap_effective(const struct cred *cred)
{
	__u64 caps = 0;

	bpf_probe_read_kernel(&caps, sizeof(caps), __builtin_preserve_access_index(&cred->cap_effective));
	return caps;
}

/*
 * sock::sk_protocol was a bitfield until v5.6, bf9765145b85 ("sock: Make
 * sk_protocol a 16-bit value"). The probed bitfield read relocates to either.
 */
static __always_inline __u16 kt_sk_protocol(const struct sock *sk)
{
	return BPF_CORE_READ_BITFIELD_PROBED(sk, sk_protocol);
}

#endif /* KTRACE_CORE_FIXES_BPF_H */
