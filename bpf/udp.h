/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* UDP event family (per-flow datagram and byte counts) and DNS messages. */
#ifndef KTRACE_UDP_H
#define KTRACE_UDP_H

#include "common.h"

enum kt_udp_sizes {
	KT_MAX_DNS_PORTS = 16,
};

/* Which way datagrams of a flow travel, seen from the local socket. */
enum kt_direction {
	KT_DIR_EGRESS = 1,	/* sent by the local process */
	KT_DIR_INGRESS = 2,	/* received by the local process */
};

/*
 * A UDP flow: the datagrams that went one way between two endpoints, as one
 * local process sent or received them. saddr/sport is where the datagrams came
 * from, daddr/dport where they went. For a socket bound to a wildcard address
 * the local address is 0.0.0.0 (or ::); the port is real.
 *
 * Kept in the udp_flows map and read when the window ends. When that map is
 * full, a datagram of a new flow crosses the ring as a record of this layout
 * with packets or errors = 1, and user space adds it to its flow.
 */
struct kt_udp_flow_event {
	struct kt_hdr hdr;	/* ts_ns: the flow's first datagram */
	struct kt_task task;	/* the process, as of the first datagram */
	__u64 last_ns;		/* the flow's last datagram or error */
	__u64 packets;
	__u64 bytes;		/* UDP payload bytes */
	__u64 errors;		/* sends or receives on the socket that failed */
	__u8 saddr[KT_ADDR_LEN];
	__u8 daddr[KT_ADDR_LEN];
	__u32 netns;		/* the socket's network namespace inode */
	__s32 last_error;	/* -errno of the last failure, 0 if none */
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u8 direction;		/* enum kt_direction */
	__u8 _pad;
};
_Static_assert(sizeof(struct kt_udp_flow_event) == 192, "kt_udp_flow_event layout");

/* Key of the udp_flows map: a direction of a tuple, per process and namespace. */
struct kt_udp_flow_key {
	__u8 saddr[KT_ADDR_LEN];
	__u8 daddr[KT_ADDR_LEN];
	__u32 tgid;
	__u32 netns;
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u8 direction;
	__u8 _pad;
};
_Static_assert(sizeof(struct kt_udp_flow_key) == 48, "kt_udp_flow_key layout");

enum kt_dns_message {
	KT_DNS_QUERY = 1,
	KT_DNS_REPLY = 2,
};

enum kt_dns_role {
	KT_DNS_CLIENT = 1,	/* the remote port is a DNS port */
	KT_DNS_SERVER = 2,	/* the local port is a DNS port */
};

/*
 * One DNS message sent or received by a local socket: a datagram (or a TCP
 * read or write) to or from a DNS port. Metadata only: the payload is never
 * read, so there is no name, id or rcode. saddr/sport is the local socket,
 * daddr/dport the remote end.
 *
 * skaddr alone does not name a socket: the kernel gives a closed socket's
 * memory to the next one. sk_ino, the socket's inode number (socket:[ino] in
 * /proc/PID/fd, ino in ss -e), is new for every socket, so replies are paired
 * with queries of the same socket only.
 */
struct kt_dns_event {
	struct kt_hdr hdr;
	struct kt_task task;
	__u64 skaddr;
	__u64 sk_ino;		/* 0 when the socket has no file (never for a send or receive syscall) */
	__s32 ret;		/* bytes, or -errno of a failed send or receive */
	__u32 netns;		/* the socket's network namespace inode */
	__u8 saddr[KT_ADDR_LEN];
	__u8 daddr[KT_ADDR_LEN];
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u16 protocol;		/* IPPROTO_UDP or IPPROTO_TCP */
	__u8 message;		/* enum kt_dns_message */
	__u8 role;		/* enum kt_dns_role */
	__u8 _pad[6];
};
_Static_assert(sizeof(struct kt_dns_event) == 184, "kt_dns_event layout");

#endif /* KTRACE_UDP_H */
