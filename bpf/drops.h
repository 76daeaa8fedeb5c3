/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Packet drop family: every freed-as-dropped skb, counted by reason and protocol. */
#ifndef KTRACE_DROPS_H
#define KTRACE_DROPS_H

#include "common.h"

/*
 * Key of the drop_counts map: a drop reason (enum skb_drop_reason of the
 * running kernel; names come from its BTF) and the packet's protocols.
 */
struct kt_drop_key {
	__u32 reason;
	__u16 protocol;		/* skb->protocol: the ethertype, host byte order (0x0800 IPv4) */
	__u8 ip_proto;		/* IPPROTO_* of an IPv4/IPv6 packet whose header was readable, else 0 */
	__u8 _pad;
};
_Static_assert(sizeof(struct kt_drop_key) == 8, "kt_drop_key layout");

/*
 * One dropped packet, crossing the ring only when it is asked for: a TCP or
 * UDP packet on a --ports port (per-flow detail), or any drop whose (reason,
 * protocol) could not be counted because the drop_counts map was full.
 * saddr/sport and daddr/dport are the packet's own source and destination.
 * The task block is whoever was on the CPU (drops mostly happen in softirq);
 * the sk_* fields identify the socket the packet was for or from, when the
 * kernel knew it (rx_sk of the tracepoint, else skb->sk).
 */
struct kt_drop_event {
	struct kt_hdr hdr;
	struct kt_task task;
	__u64 location;		/* kernel address of the code that dropped it */
	__u64 skaddr;		/* the socket, 0 if none */
	__u64 sk_cgroup_id;	/* cgroup v2 id of the socket's creator (a pod's container) */
	__u64 sk_ino;		/* inode number of the socket (socket:[ino] in /proc/PID/fd) */
	__u8 saddr[KT_ADDR_LEN];
	__u8 daddr[KT_ADDR_LEN];
	__u32 reason;		/* enum skb_drop_reason */
	__u32 sk_uid;		/* the socket's owner uid */
	__u32 netns;		/* network namespace inode of the socket, else of the device */
	__u16 protocol;		/* ethertype, host byte order */
	__u16 sport;
	__u16 dport;
	__u16 family;		/* AF_INET / AF_INET6, 0 when the packet was not parsed */
	__u8 ip_proto;
	__u8 attribution;	/* enum kt_attribution: always KT_ATTR_CPU */
	__u8 _pad[2];
};
_Static_assert(sizeof(struct kt_drop_event) == 200, "kt_drop_event layout");

#endif /* KTRACE_DROPS_H */
