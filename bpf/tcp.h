/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* TCP event family: state changes, connect() calls, retransmits, resets. */
#ifndef KTRACE_TCP_H
#define KTRACE_TCP_H

#include "common.h"

/*
 * Addresses are 16 bytes in network order; an IPv4 address fills the first 4.
 * family is AF_INET (2) or AF_INET6 (10).
 */

/* inet_sock_set_state for a TCP socket. */
struct kt_tcp_state_event {
	struct kt_hdr hdr;
	struct kt_task task;
	__u64 skaddr;
	__u64 handshake_ns;	/* leaving SYN_SENT: time since entering it, else 0 */
	__u8 saddr[KT_ADDR_LEN];
	__u8 daddr[KT_ADDR_LEN];
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u8 oldstate;
	__u8 newstate;
	__u8 attribution;	/* enum kt_attribution */
	__u8 sk_err;		/* sk->sk_err when entering CLOSE (ETIMEDOUT, ECONNREFUSED, ...) */
	__u8 syn_retransmits;	/* leaving SYN_SENT: SYNs retransmitted (tcp_sock total_retrans, capped at 255) */
	__u8 _pad[5];
};
_Static_assert(sizeof(struct kt_tcp_state_event) == 176, "kt_tcp_state_event layout");

/* One connect(2) on an AF_INET/AF_INET6 socket, from entry to return. */
struct kt_connect_event {
	struct kt_hdr hdr;
	struct kt_task task;
	__u64 skaddr;
	__u64 duration_ns;	/* time inside the syscall */
	__s32 ret;		/* 0 or -errno (-EINPROGRESS for non-blocking sockets) */
	__s32 fd;
	__u8 saddr[KT_ADDR_LEN];
	__u8 daddr[KT_ADDR_LEN];
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u16 protocol;		/* IPPROTO_TCP or IPPROTO_UDP */
};
_Static_assert(sizeof(struct kt_connect_event) == 176, "kt_connect_event layout");

enum kt_retransmit_kind {
	/* tcp_retransmit_skb: an skb of a socket's retransmit queue (data, SYN, FIN) */
	KT_RETX_DATA = 1,
	/* tcp_retransmit_synack: a listener's SYN-ACK for a request not yet accepted */
	KT_RETX_SYNACK = 2,
};

/*
 * One retransmitted skb. A GSO/TSO skb carries several segments: the kernel
 * adds tcp_skb_pcount(skb) to TcpRetransSegs for it (__tcp_retransmit_skb, only
 * when err is 0) and 1 for each SYN-ACK (tcp_rtx_synack).
 */
struct kt_retransmit_event {
	struct kt_hdr hdr;
	struct kt_task task;
	__u64 skaddr;		/* the socket; for a SYN-ACK, the request socket */
	__u32 total_retrans;	/* tcp_sock counters after this retransmit; SYN-ACK: request_sock num_retrans */
	__u32 snd_cwnd;
	__u32 srtt_us;
	__s32 err;		/* result of the transmit */
	__u32 segments;		/* TCP segments in the skb (tcp_skb_pcount); 1 for a SYN-ACK */
	__u8 saddr[KT_ADDR_LEN];
	__u8 daddr[KT_ADDR_LEN];
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u8 state;
	__u8 attribution;
	__u8 kind;		/* enum kt_retransmit_kind */
	__u8 _pad[3];
};
_Static_assert(sizeof(struct kt_retransmit_event) == 184, "kt_retransmit_event layout");

enum kt_reset_direction {
	KT_RESET_SENT = 1,
	KT_RESET_RECEIVED = 2,
};

/* tcp_send_reset / tcp_receive_reset. Ports and addresses are the local socket's view. */
struct kt_reset_event {
	struct kt_hdr hdr;
	struct kt_task task;
	__u64 skaddr;		/* 0 when no socket matched (RST to a closed port) */
	__u32 reason;		/* enum sk_rst_reason of the running kernel; sent only */
	__u32 netns;		/* the socket's network namespace; with no socket, the packet's (its device's) */
	__u8 saddr[KT_ADDR_LEN];
	__u8 daddr[KT_ADDR_LEN];
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u8 state;
	__u8 direction;		/* enum kt_reset_direction */
	__u8 attribution;
	__u8 _pad1[7];
};
_Static_assert(sizeof(struct kt_reset_event) == 176, "kt_reset_event layout");

enum kt_held_sizes {
	KT_HELD_STATES = 2,
};

/*
 * The state changes of an accepted socket before accept(): LISTEN→SYN_RECV and
 * SYN_RECV→ESTABLISHED run in softirq, before any process has the socket. They
 * wait in the kernel (map held_states) for the accept() that names the worker
 * owning the socket, or for the socket's next event, and are then sent with
 * that owner; what still waits when the window ends is read by user space.
 * With --sample, a connecting socket's SYN_SENT waits here too (count 1) until
 * its local port is known and decides whether the connection is kept.
 */
struct kt_held_states {
	struct kt_tcp_state_event events[KT_HELD_STATES];
	__u32 count;
	__u32 _pad;
};
_Static_assert(sizeof(struct kt_held_states) == KT_HELD_STATES * sizeof(struct kt_tcp_state_event) + 8,
	       "kt_held_states layout");

#endif /* KTRACE_TCP_H */
