// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * UDP and DNS probe families: udp (per-flow datagram and byte counts), dns (one
 * event per DNS query and reply, over UDP or TCP) and udp_peers (the remote end
 * of datagrams on unconnected sockets).
 *
 * Both udp and dns ride on the same hooks, sock_send_length and
 * sock_recv_length (v6.3+), which fire once per datagram in process context
 * with the socket and the byte count, for every send and receive syscall
 * (send, sendto, sendmsg, sendmmsg, write and their receive twins). For a
 * connected socket the socket holds both ends. An unconnected socket has no
 * peer: the cgroup sock_addr hooks sendmsg4/6 and recvmsg4/6 see the address
 * the caller passed or gets back, and leave it for the length tracepoint that
 * follows in the same syscall. Older kernels get the same datagrams from the
 * tracepoints of the six send and receive syscalls (v4.7+), which read the
 * remote end from the caller's own memory (alternative 3, at the end).
 *
 * Datagrams never cross the ring one by one: they are added to a flow in the
 * udp_flows map, which user space reads when the window ends. DNS messages are
 * rare enough to be events; user space pairs queries with replies.
 */
#include "common.bpf.h"
#include "sock.bpf.h"
#include "udp.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Anchors that put the event structs and enums into this object's BTF. */
struct kt_udp_flow_event _kt_udp_flow_event = {};
struct kt_udp_flow_key _kt_udp_flow_key = {};
struct kt_dns_event _kt_dns_event = {};
enum kt_kind _kt_kind = 0;
enum kt_family _kt_family = 0;
enum kt_direction _kt_direction = 0;
enum kt_dns_message _kt_dns_message = 0;
enum kt_dns_role _kt_dns_role = 0;
enum kt_udp_sizes _kt_udp_sizes = 0;

#define EINTR 4
#define EAGAIN 11
#define MSG_PEEK 2

/* Load-time settings of this object, written by the loader. */
const volatile __u8 kt_want_udp = 0;	/* count UDP flows (the udp family is on) */
const volatile __u8 kt_want_dns = 0;	/* emit DNS messages (the dns family is on) */
const volatile __u8 kt_dns_only = 0;	/* --dns-only: UDP flows on DNS ports only */
/*
 * --dns-ports (host byte order), unused slots 0. A constant array rather than a
 * map: every TCP send and receive on the node passes the DNS port test, and
 * sixteen compares cost less than two hash lookups.
 */
const volatile __u16 kt_dns_ports[KT_MAX_DNS_PORTS] = {};

static __always_inline bool kt_is_dns_port(__u16 port)
{
	int i;

	if (!port)
		return false;
	for (i = 0; i < KT_MAX_DNS_PORTS; i++)
		if (kt_dns_ports[i] == port)
			return true;
	return false;
}

/*
 * (tuple direction, process, netns) → the flow's counts. Inserted by the first
 * datagram of a flow; read at the end of the window, and idle flows are read
 * and deleted by user space while the window runs when the map fills up. Not
 * preallocated: a flow deleted while a datagram is being added to it (user
 * space only deletes idle ones) loses that datagram instead of corrupting the
 * element's next owner.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct kt_udp_flow_key);
	__type(value, struct kt_udp_flow_event);
} udp_flows SEC(".maps");

/* Flows ever inserted into udp_flows; user space compares it with what it deleted. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} udp_flows_inserted SEC(".maps");

/* Room to build a new flow off the 512-byte stack. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct kt_udp_flow_event);
} udp_scratch SEC(".maps");


/* The remote end of the datagram a thread is sending or receiving on an unconnected socket. */
struct kt_peer {
	__u64 pid_tgid;		/* the thread in whose syscall it was seen; 0 once consumed */
	__u64 cookie;		/* socket cookie, to check the consumer has the same socket */
	__u8 addr[KT_ADDR_LEN];
	__u16 port;
	__u16 family;
	__u32 _pad;
};

/*
 * Per CPU: the peer the cgroup sendmsg/recvmsg hook saw last, consumed by the
 * length tracepoint that follows in the same syscall. Checked against the
 * thread and the socket, so a syscall that moved to another CPU in between
 * finds no peer rather than a wrong one. A per-CPU slot instead of a hash
 * keyed by thread: no hashing, locking or deletion on every datagram.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct kt_peer);
} peers SEC(".maps");

/*
 * A field of a socket: a plain load when sk is a BTF pointer (the tp_btf
 * alternative), bpf_probe_read_kernel otherwise. Every send and receive on the
 * node comes through here, and helper calls were most of its cost. `direct` is
 * a constant at every call site, so each program keeps only one of the two.
 */
#define kt_sk_field(direct, sk, field) ((direct) ? (sk)->field : BPF_CORE_READ(sk, field))

static __always_inline __u32 kt_sk_netns_of(const struct sock *sk, bool direct)
{
	return direct ? sk->__sk_common.skc_net.net->ns.inum : kt_sk_netns(sk);
}

/*
 * The socket's tuple, local end first. The local port is skc_num: a UDP
 * socket's ports do not change, and unlike inet_sport it is a field of struct
 * sock, which a BTF pointer allows.
 */
static __always_inline void kt_sk_tuple_of(const struct sock *sk, bool direct, __u16 family, struct kt_tuple *t)
{
	t->family = family;
	t->sport = kt_sk_field(direct, sk, __sk_common.skc_num);
	t->dport = bpf_ntohs(kt_sk_field(direct, sk, __sk_common.skc_dport));
	if (family == AF_INET6) {
		if (direct) {
			__builtin_memcpy(t->saddr, &sk->__sk_common.skc_v6_rcv_saddr, KT_ADDR_LEN);
			__builtin_memcpy(t->daddr, &sk->__sk_common.skc_v6_daddr, KT_ADDR_LEN);
		} else {
			BPF_CORE_READ_INTO((struct in6_addr *)t->saddr, sk, __sk_common.skc_v6_rcv_saddr);
			BPF_CORE_READ_INTO((struct in6_addr *)t->daddr, sk, __sk_common.skc_v6_daddr);
		}
	} else {
		__u32 saddr = kt_sk_field(direct, sk, __sk_common.skc_rcv_saddr);
		__u32 daddr = kt_sk_field(direct, sk, __sk_common.skc_daddr);

		__builtin_memcpy(t->saddr, &saddr, 4);
		__builtin_memcpy(t->daddr, &daddr, 4);
	}
}

static __always_inline void kt_count_flow(struct kt_udp_flow_event *f, int ret, __u64 now)
{
	if (ret >= 0) {
		__sync_fetch_and_add(&f->packets, 1);
		__sync_fetch_and_add(&f->bytes, ret);
	} else {
		__sync_fetch_and_add(&f->errors, 1);
		f->last_error = ret;
	}
	f->last_ns = now;
}

/* Add one datagram (or one failed send/receive) to its flow. t is the local socket's view. */
static __always_inline void kt_udp_flow(const struct sock *sk, const struct kt_tuple *t, int ret, __u8 direction,
					bool is_dns, bool direct)
{
	struct kt_udp_flow_key key = {};
	struct kt_udp_flow_event *f, *fresh, *e;
	__u64 now = bpf_ktime_get_boot_ns();
	__u32 zero = 0;
	__u64 *inserted;

	kt_count(KT_FAMILY_UDP, seen);
	if ((kt_dns_only && !is_dns) || !kt_ports_allow(t->sport, t->dport)) {
		kt_count(KT_FAMILY_UDP, filtered);
		return;
	}
	if (!kt_sample_ports(t->sport, t->dport)) {
		kt_count(KT_FAMILY_UDP, sampled_out);
		return;
	}
	if (direction == KT_DIR_EGRESS) {
		__builtin_memcpy(key.saddr, t->saddr, KT_ADDR_LEN);
		__builtin_memcpy(key.daddr, t->daddr, KT_ADDR_LEN);
		key.sport = t->sport;
		key.dport = t->dport;
	} else {
		__builtin_memcpy(key.saddr, t->daddr, KT_ADDR_LEN);
		__builtin_memcpy(key.daddr, t->saddr, KT_ADDR_LEN);
		key.sport = t->dport;
		key.dport = t->sport;
	}
	key.family = t->family;
	key.direction = direction;
	key.tgid = bpf_get_current_pid_tgid() >> 32;
	key.netns = kt_sk_netns_of(sk, direct);

	f = bpf_map_lookup_elem(&udp_flows, &key);
	if (f) {
		kt_count_flow(f, ret, now);
		kt_count(KT_FAMILY_UDP, aggregated);
		return;
	}
	fresh = bpf_map_lookup_elem(&udp_scratch, &zero);
	if (!fresh)
		return;
	fresh->hdr.ts_ns = now;
	fresh->hdr.kind = KT_KIND_UDP_FLOW;
	fresh->hdr.size = sizeof(*fresh);
	fresh->hdr.cpu = bpf_get_smp_processor_id();
	kt_fill_current(&fresh->task);
	fresh->last_ns = now;
	fresh->packets = ret >= 0 ? 1 : 0;
	fresh->bytes = ret >= 0 ? ret : 0;
	fresh->errors = ret >= 0 ? 0 : 1;
	fresh->last_error = ret >= 0 ? 0 : ret;
	__builtin_memcpy(fresh->saddr, key.saddr, KT_ADDR_LEN);
	__builtin_memcpy(fresh->daddr, key.daddr, KT_ADDR_LEN);
	fresh->netns = key.netns;
	fresh->sport = key.sport;
	fresh->dport = key.dport;
	fresh->family = key.family;
	fresh->direction = direction;
	fresh->_pad = 0;
	if (bpf_map_update_elem(&udp_flows, &key, fresh, BPF_NOEXIST) == 0) {
		kt_count(KT_FAMILY_UDP, aggregated);
		inserted = bpf_map_lookup_elem(&udp_flows_inserted, &zero);
		if (inserted)
			__sync_fetch_and_add(inserted, 1);
		return;
	}
	/* another CPU inserted the same flow first */
	f = bpf_map_lookup_elem(&udp_flows, &key);
	if (f) {
		kt_count_flow(f, ret, now);
		kt_count(KT_FAMILY_UDP, aggregated);
		return;
	}
	/* the map is full: this datagram crosses the ring on its own */
	e = kt_reserve(KT_FAMILY_UDP, KT_KIND_UDP_FLOW, sizeof(*e));
	if (!e)
		return;
	__builtin_memcpy(&e->task, &fresh->task, sizeof(*e) - sizeof(e->hdr));
	e->hdr.ts_ns = now;
	kt_submit(e, sizeof(*e));
}

static __always_inline void kt_dns_message(const struct sock *sk, const struct kt_tuple *t, int ret,
					   __u8 direction, __u16 protocol, bool remote_is_dns, bool direct)
{
	struct kt_dns_event *e;
	__u8 role = remote_is_dns ? KT_DNS_CLIENT : KT_DNS_SERVER;

	kt_count(KT_FAMILY_DNS, seen);
	/* the same decision as the socket's UDP flow, and as the other end's */
	if (!kt_sample_ports(t->sport, t->dport)) {
		kt_count(KT_FAMILY_DNS, sampled_out);
		return;
	}
	e = kt_reserve_rare(KT_FAMILY_DNS, KT_KIND_DNS, sizeof(*e));
	if (!e)
		return;
	kt_fill_current(&e->task);
	e->skaddr = (__u64)sk;
	e->sk_ino = BPF_CORE_READ(sk, sk_socket, file, f_inode, i_ino);
	e->ret = ret;
	e->netns = kt_sk_netns_of(sk, direct);
	kt_copy_tuple(t, e->saddr, e->daddr, &e->sport, &e->dport, &e->family);
	e->protocol = protocol;
	/* a client sends queries and receives replies; a server the other way round */
	e->message = (role == KT_DNS_CLIENT) == (direction == KT_DIR_EGRESS) ? KT_DNS_QUERY : KT_DNS_REPLY;
	e->role = role;
	__builtin_memset(e->_pad, 0, sizeof(e->_pad));
	kt_submit_rare(e, sizeof(*e));
}

/*
 * The remote end of a datagram on an unconnected socket, as the cgroup hook of
 * this syscall saw it, or given by the caller. Consumes the thread's entry.
 */
static __always_inline void kt_take_peer(const struct sock *sk, struct kt_tuple *t, const struct kt_peer *given,
					 bool direct)
{
	struct kt_peer *stashed = NULL;
	const struct kt_peer *p = given;
	__u32 zero = 0;

	if (!p) {
		stashed = bpf_map_lookup_elem(&peers, &zero);
		if (!stashed || stashed->pid_tgid != bpf_get_current_pid_tgid())
			return;
		p = stashed;
	}
	if (!p->cookie || p->cookie == kt_sk_field(direct, sk, __sk_common.skc_cookie.counter)) {
		__builtin_memcpy(t->daddr, p->addr, KT_ADDR_LEN);
		t->dport = p->port;
	}
	if (stashed)
		stashed->pid_tgid = 0;
}

/*
 * One send or receive on an AF_INET/AF_INET6 socket, in the syscall of the
 * process that made it. ret is the byte count or -errno. peer, when not NULL,
 * is the remote end of an unconnected socket's datagram as the caller read it.
 * direct: sk is a BTF pointer that plain loads may read.
 */
static __always_inline int kt_datagram(const struct sock *sk, int ret, int flags, __u8 direction,
				       const struct kt_peer *peer, bool direct)
{
	struct kt_tuple t = {};
	__u16 family, protocol;
	bool remote_is_dns = false, local_is_dns = false;

	if (!sk || ret == -EAGAIN || ret == -EINTR)
		return 0;
	/* a peeked datagram is read again later */
	if (direction == KT_DIR_INGRESS && (flags & MSG_PEEK))
		return 0;
	family = kt_sk_field(direct, sk, __sk_common.skc_family);
	if (family != AF_INET && family != AF_INET6)
		return 0;
	/* sk_protocol is a plain field wherever the sock_*_length tracepoints exist (v6.3+) */
	protocol = direct ? sk->sk_protocol : kt_sk_protocol(sk);
	if (protocol == IPPROTO_TCP) {
		/*
		 * TCP only for DNS over TCP, and a TCP socket's ports never change:
		 * test them before anything else. A zero-length read is the end of
		 * the stream.
		 */
		if (!kt_want_dns || ret == 0)
			return 0;
		if (!kt_is_dns_port(bpf_ntohs(kt_sk_field(direct, sk, __sk_common.skc_dport))) &&
		    !kt_is_dns_port(kt_sk_field(direct, sk, __sk_common.skc_num)))
			return 0;
	} else if (protocol != IPPROTO_UDP) {
		return 0;
	}
	if (kt_is_self())
		return 0;
	if (protocol == IPPROTO_UDP)
		kt_sk_tuple_of(sk, direct, family, &t);
	else
		kt_sk_tuple(sk, &t);	/* TCP: inet_sport, right through the close */
	if (protocol == IPPROTO_UDP)
		kt_take_peer(sk, &t, peer, direct);
	if (kt_want_dns) {
		remote_is_dns = kt_is_dns_port(t.dport);
		local_is_dns = !remote_is_dns && kt_is_dns_port(t.sport);
	}
	if (protocol == IPPROTO_UDP && kt_want_udp)
		kt_udp_flow(sk, &t, ret, direction, remote_is_dns || local_is_dns, direct);
	if (remote_is_dns || local_is_dns)
		kt_dns_message(sk, &t, ret, direction, protocol, remote_is_dns, direct);
	return 0;
}

/* udp/dns, alternative 1: BTF-typed tracepoints (v6.3+). */
SEC("tp_btf/sock_send_length")
int BPF_PROG(kt_udp_send_btf, struct sock *sk, int ret, int flags)
{
	return kt_datagram(sk, ret, flags, KT_DIR_EGRESS, NULL, true);
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(kt_udp_recv_btf, struct sock *sk, int ret, int flags)
{
	return kt_datagram(sk, ret, flags, KT_DIR_INGRESS, NULL, true);
}

/* udp/dns, alternative 2: the classic tracepoints (v6.3+), which filter on the protocol without a read. */
SEC("tracepoint/sock/sock_send_length")
int kt_udp_send_tp(struct trace_event_raw_sock_msg_length *ctx)
{
	if (ctx->protocol != IPPROTO_UDP && ctx->protocol != IPPROTO_TCP)
		return 0;
	return kt_datagram(ctx->sk, ctx->ret, ctx->flags, KT_DIR_EGRESS, NULL, false);
}

SEC("tracepoint/sock/sock_recv_length")
int kt_udp_recv_tp(struct trace_event_raw_sock_msg_length *ctx)
{
	if (ctx->protocol != IPPROTO_UDP && ctx->protocol != IPPROTO_TCP)
		return 0;
	return kt_datagram(ctx->sk, ctx->ret, ctx->flags, KT_DIR_INGRESS, NULL, false);
}

/*
 * udp_peers: the address an unconnected UDP socket sends to (sendmsg4/6, which
 * do not run for connected sockets) or receives from (recvmsg4/6, which run
 * when the caller asks for the source address). Attached to the cgroup2 root,
 * so they see every process. They must return 1: 0 would refuse the datagram.
 */
static __always_inline int kt_stash_peer(struct bpf_sock_addr *ctx, __u16 family)
{
	struct kt_peer *p;
	__u64 id = bpf_get_current_pid_tgid();
	__u32 zero = 0;

	if (ctx->protocol != IPPROTO_UDP || (!kt_want_udp && !kt_want_dns))
		return 1;
	if (kt_self_tgid && (id >> 32) == kt_self_tgid)
		return 1;
	p = bpf_map_lookup_elem(&peers, &zero);
	if (!p)
		return 1;
	p->pid_tgid = id;
	p->cookie = bpf_get_socket_cookie(ctx);
	p->family = family;
	p->port = bpf_ntohs((__u16)ctx->user_port);
	if (family == AF_INET) {
		__u32 ip4 = ctx->user_ip4;

		__builtin_memset(p->addr, 0, KT_ADDR_LEN);
		__builtin_memcpy(p->addr, &ip4, 4);
	} else {
		__u32 ip6[4];

		ip6[0] = ctx->user_ip6[0];
		ip6[1] = ctx->user_ip6[1];
		ip6[2] = ctx->user_ip6[2];
		ip6[3] = ctx->user_ip6[3];
		__builtin_memcpy(p->addr, ip6, KT_ADDR_LEN);
	}
	return 1;
}

SEC("cgroup/sendmsg4")
int kt_peer_send4(struct bpf_sock_addr *ctx)
{
	return kt_stash_peer(ctx, AF_INET);
}

SEC("cgroup/sendmsg6")
int kt_peer_send6(struct bpf_sock_addr *ctx)
{
	return kt_stash_peer(ctx, AF_INET6);
}

SEC("cgroup/recvmsg4")
int kt_peer_recv4(struct bpf_sock_addr *ctx)
{
	return kt_stash_peer(ctx, AF_INET);
}

SEC("cgroup/recvmsg6")
int kt_peer_recv6(struct bpf_sock_addr *ctx)
{
	return kt_stash_peer(ctx, AF_INET6);
}

/*
 * udp/dns, alternative 3: the tracepoints of the send and receive syscalls
 * (v4.7+, CONFIG_FTRACE_SYSCALLS), for kernels without sock_send_length.
 *
 * Entry resolves the fd to its socket and keeps only AF_INET/AF_INET6 UDP
 * sockets (and TCP ones on a DNS port), so that every other send and receive
 * on the node (unix sockets, TCP connections) costs a few reads and no map
 * update. Exit reads the remote end from the caller's memory: the sendto
 * address, msg_name of a msghdr, or of each mmsghdr; for a receive the kernel
 * has just written it there. No msg_name (a connected socket) means the socket
 * holds the peer, as in the other alternatives.
 *
 * Not covered, unlike sock_*_length: write()/read() and writev()/readv() on a
 * connected UDP socket (tracing them would mean an fd lookup on every file
 * write and read of the node), io_uring, sendfile/splice, and 32-bit (compat)
 * syscalls, which these tracepoints do not report (ARCH_TRACE_IGNORE_COMPAT_SYSCALLS).
 * A sendmmsg/recvmmsg counts its first KT_MMSG_MAX messages only.
 */
#define KT_MMSG_MAX 8
#define ERESTARTSYS 512
#define ERESTART_RESTARTBLOCK 516

/* The user ABI (64-bit) of the structs read from the caller's memory. */
#define KT_MSGHDR_NAMELEN 8	/* struct user_msghdr: void *msg_name at 0, int msg_namelen at 8 */
#define KT_MMSGHDR_LEN 56	/* struct mmsghdr: struct user_msghdr, then unsigned int msg_len */
#define KT_MMSGHDR_SIZE 64
#define KT_SOCKADDR_IN_LEN 16	/* family, port, 4-byte address at 4 */
#define KT_SOCKADDR_IN6_LEN 24	/* family, port, flowinfo, 16-byte address at 8 (scope id optional) */

enum kt_udp_syscall {
	KT_CALL_SENDTO = 1,
	KT_CALL_SENDMSG = 2,
	KT_CALL_SENDMMSG = 3,
	KT_CALL_RECVFROM = 4,
	KT_CALL_RECVMSG = 5,
	KT_CALL_RECVMMSG = 6,
};

/* A send or receive syscall between its entry and its exit. */
struct kt_udp_call {
	__u64 sk;		/* the socket behind the fd, at entry */
	__u64 uaddr;		/* sendto/recvfrom: struct sockaddr __user *; the others: their (m)msghdr __user * */
	__u64 ulen;		/* recvfrom: int __user *, where the kernel writes the address length */
	__u32 namelen;		/* sendto: addr_len; recvfrom, recvmsg: the size of the address buffer at entry */
	__u32 flags;		/* the syscall's flags (MSG_PEEK) */
	__u16 family;		/* the socket's */
	__u8 call;		/* enum kt_udp_syscall, so an exit never takes another syscall's entry */
	__u8 _pad[5];
};

/*
 * Thread (pid_tgid) → its send or receive syscall in flight on a socket
 * alternative 3 counts. Inserted at syscall entry, deleted at its exit. The
 * exit of a syscall that was already running when the probes attached finds
 * nothing. A plain hash, not an LRU one: an LRU update costs about 140 ns more
 * on this path, which runs for every datagram, and entries cannot pile up
 * (one per thread, overwritten by its next syscall; only an exit missed while
 * the probes attach leaves one behind). When it is full, the syscalls of more
 * threads than it holds, all blocked at once, go uncounted.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u64);
	__type(value, struct kt_udp_call);
} udp_calls SEC(".maps");

/* A TCP socket either end of which is a DNS port: the only TCP traffic these families count. */
static __always_inline bool kt_sk_on_dns_port(const struct sock *sk)
{
	__u16 sport = bpf_ntohs(BPF_CORE_READ((struct inet_sock *)sk, inet_sport));
	__u16 dport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));

	return kt_is_dns_port(sport) || kt_is_dns_port(dport);
}

static __always_inline int kt_call_enter(__u8 call, int fd, __u64 uaddr, __u64 arg, __u32 flags)
{
	struct kt_udp_call c = {};
	__u64 id = bpf_get_current_pid_tgid();
	struct sock *sk;
	__u16 protocol;

	if (kt_is_self())
		return 0;
	sk = kt_sock_of_fd(fd);
	if (!sk)
		return 0;
	c.family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (c.family != AF_INET && c.family != AF_INET6)
		return 0;
	protocol = kt_sk_protocol(sk);
	if (protocol == IPPROTO_TCP) {
		if (!kt_want_dns || !kt_sk_on_dns_port(sk))
			return 0;
	} else if (protocol != IPPROTO_UDP) {
		return 0;
	}
	c.sk = (__u64)sk;
	c.uaddr = uaddr;
	c.flags = flags;
	c.call = call;
	if (call == KT_CALL_SENDTO) {
		c.namelen = arg;
	} else if (call == KT_CALL_RECVFROM) {
		/*
		 * The kernel writes back the address's full length, even when it
		 * copied less into a short buffer: remember the buffer's size.
		 */
		c.ulen = arg;
		if (uaddr && arg)
			bpf_probe_read_user(&c.namelen, sizeof(c.namelen), (void *)arg);
	} else if (call == KT_CALL_RECVMSG && uaddr) {
		bpf_probe_read_user(&c.namelen, sizeof(c.namelen), (void *)uaddr + KT_MSGHDR_NAMELEN);
	}
	bpf_map_update_elem(&udp_calls, &id, &c, BPF_ANY);
	return 0;
}

/*
 * The entry of this thread's syscall, copied out of the map and deleted. Also
 * drops what the udp_peers cgroup hooks stashed during the syscall: here the
 * caller's memory says where each datagram went, and a leftover entry would be
 * taken by a later datagram of the thread.
 */
static __always_inline bool kt_call_take(__u8 call, struct kt_udp_call *c)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct kt_udp_call *found = bpf_map_lookup_elem(&udp_calls, &id);
	struct kt_peer *stashed;
	__u32 zero = 0;

	if (!found)
		return false;
	__builtin_memcpy(c, found, sizeof(*c));
	bpf_map_delete_elem(&udp_calls, &id);
	stashed = bpf_map_lookup_elem(&peers, &zero);
	if (stashed && stashed->pid_tgid == id)
		stashed->pid_tgid = 0;
	return c->call == call;
}

/*
 * A restarted syscall (a signal arrived while it blocked) exits with an
 * internal -ERESTART* code and enters again: not a failure the caller sees.
 */
static __always_inline bool kt_restarted(long ret)
{
	return ret <= -ERESTARTSYS && ret >= -ERESTART_RESTARTBLOCK;
}

/*
 * The remote end from a sockaddr in user memory, len bytes of it valid, in the
 * family of the socket: an AF_INET6 socket may send to an AF_INET address, which
 * it reaches as ::ffff:a.b.c.d. False when there is no usable address.
 */
static __always_inline bool kt_user_peer(__u64 uaddr, __u32 len, __u16 sk_family, struct kt_peer *p)
{
	struct {
		__u16 family;
		__be16 port;
		__u32 addr4;	/* sockaddr_in: the address; sockaddr_in6: flowinfo */
	} head;

	if (!uaddr || len < sizeof(head) || bpf_probe_read_user(&head, sizeof(head), (void *)uaddr))
		return false;
	__builtin_memset(p, 0, sizeof(*p));
	if (head.family == AF_INET && len >= KT_SOCKADDR_IN_LEN) {
		if (sk_family == AF_INET6) {
			p->addr[10] = 0xff;
			p->addr[11] = 0xff;
			__builtin_memcpy(&p->addr[12], &head.addr4, 4);
		} else {
			__builtin_memcpy(p->addr, &head.addr4, 4);
		}
	} else if (head.family == AF_INET6 && len >= KT_SOCKADDR_IN6_LEN && sk_family == AF_INET6) {
		if (bpf_probe_read_user(p->addr, KT_ADDR_LEN, (void *)uaddr + 8))
			return false;
	} else {
		return false;
	}
	p->port = bpf_ntohs(head.port);
	p->family = sk_family;
	return true;
}

/* The remote end named by a msghdr (or the msghdr of an mmsghdr) in user memory; len_cap 0 = no cap. */
static __always_inline bool kt_msghdr_peer(__u64 msghdr, __u32 len_cap, __u16 sk_family, struct kt_peer *p)
{
	struct {
		__u64 name;
		__u32 namelen;
	} h;

	if (!msghdr || bpf_probe_read_user(&h, sizeof(h), (void *)msghdr))
		return false;
	if (len_cap && h.namelen > len_cap)
		h.namelen = len_cap;
	return kt_user_peer(h.name, h.namelen, sk_family, p);
}

/* sendto and sendmsg: one datagram, or one failure. */
static __always_inline int kt_send_exit(__u8 call, long ret)
{
	struct kt_udp_call c;
	struct kt_peer p;
	bool named;

	if (!kt_call_take(call, &c) || kt_restarted(ret))
		return 0;
	if (call == KT_CALL_SENDTO)
		named = kt_user_peer(c.uaddr, c.namelen, c.family, &p);
	else
		named = kt_msghdr_peer(c.uaddr, 0, c.family, &p);
	return kt_datagram((struct sock *)c.sk, ret, c.flags, KT_DIR_EGRESS, named ? &p : NULL, false);
}

/* recvfrom and recvmsg: one datagram, whose source the kernel wrote to the caller's buffer, or one failure. */
static __always_inline int kt_recv_exit(__u8 call, long ret)
{
	struct kt_udp_call c;
	struct kt_peer p;
	bool named = false;
	__u32 len = 0;

	if (!kt_call_take(call, &c) || kt_restarted(ret))
		return 0;
	if (ret >= 0 && c.uaddr) {
		if (call == KT_CALL_RECVFROM) {
			if (c.ulen && !bpf_probe_read_user(&len, sizeof(len), (void *)c.ulen))
				named = kt_user_peer(c.uaddr, len < c.namelen ? len : c.namelen, c.family, &p);
		} else {
			named = kt_msghdr_peer(c.uaddr, c.namelen, c.family, &p);
		}
	}
	return kt_datagram((struct sock *)c.sk, ret, c.flags, KT_DIR_INGRESS, named ? &p : NULL, false);
}

/*
 * sendmmsg and recvmmsg: ret is the number of messages sent or received, and
 * each is one datagram of its msg_len bytes to or from its own msg_name. A
 * failed call is one failure (of the first message, when sending). A message
 * that fails after others were sent is not reported by the syscall, so it is
 * not counted; and the address lengths recvmmsg writes back are trusted (a
 * buffer shorter than the address is not detected, unlike recvfrom/recvmsg).
 */
static __always_inline int kt_mmsg_exit(__u8 call, long ret, __u8 direction)
{
	struct kt_udp_call c;
	struct kt_peer p;
	__u64 entry;
	__u32 len;
	bool named;
	int i;

	if (!kt_call_take(call, &c) || kt_restarted(ret) || ret == 0)
		return 0;
	if (ret < 0) {
		named = direction == KT_DIR_EGRESS && kt_msghdr_peer(c.uaddr, 0, c.family, &p);
		return kt_datagram((struct sock *)c.sk, ret, c.flags, direction, named ? &p : NULL, false);
	}
	/* a bounded loop (v5.3+, older than the ring buffer this object needs anyway) */
	for (i = 0; i < KT_MMSG_MAX; i++) {
		if (i >= ret)
			break;
		entry = c.uaddr + (__u64)i * KT_MMSGHDR_SIZE;
		len = 0;
		if (bpf_probe_read_user(&len, sizeof(len), (void *)entry + KT_MMSGHDR_LEN))
			break;
		named = kt_msghdr_peer(entry, 0, c.family, &p);
		kt_datagram((struct sock *)c.sk, len, c.flags, direction, named ? &p : NULL, false);
	}
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_sendto")
int kt_sendto_in(struct trace_event_raw_sys_enter *ctx)
{
	/* sendto(fd, buf, len, flags, addr, addr_len); send() is sendto with no address */
	return kt_call_enter(KT_CALL_SENDTO, (int)ctx->args[0], ctx->args[4], ctx->args[5], (__u32)ctx->args[3]);
}

SEC("tracepoint/syscalls/sys_exit_sendto")
int kt_sendto_out(struct trace_event_raw_sys_exit *ctx)
{
	return kt_send_exit(KT_CALL_SENDTO, ctx->ret);
}

SEC("tracepoint/syscalls/sys_enter_sendmsg")
int kt_sendmsg_in(struct trace_event_raw_sys_enter *ctx)
{
	/* sendmsg(fd, msg, flags) */
	return kt_call_enter(KT_CALL_SENDMSG, (int)ctx->args[0], ctx->args[1], 0, (__u32)ctx->args[2]);
}

SEC("tracepoint/syscalls/sys_exit_sendmsg")
int kt_sendmsg_out(struct trace_event_raw_sys_exit *ctx)
{
	return kt_send_exit(KT_CALL_SENDMSG, ctx->ret);
}

SEC("tracepoint/syscalls/sys_enter_sendmmsg")
int kt_sendmmsg_in(struct trace_event_raw_sys_enter *ctx)
{
	/* sendmmsg(fd, mmsg, vlen, flags) */
	return kt_call_enter(KT_CALL_SENDMMSG, (int)ctx->args[0], ctx->args[1], 0, (__u32)ctx->args[3]);
}

SEC("tracepoint/syscalls/sys_exit_sendmmsg")
int kt_sendmmsg_out(struct trace_event_raw_sys_exit *ctx)
{
	return kt_mmsg_exit(KT_CALL_SENDMMSG, ctx->ret, KT_DIR_EGRESS);
}

SEC("tracepoint/syscalls/sys_enter_recvfrom")
int kt_recvfrom_in(struct trace_event_raw_sys_enter *ctx)
{
	/* recvfrom(fd, buf, size, flags, addr, addr_len); recv() is recvfrom with no address */
	return kt_call_enter(KT_CALL_RECVFROM, (int)ctx->args[0], ctx->args[4], ctx->args[5], (__u32)ctx->args[3]);
}

SEC("tracepoint/syscalls/sys_exit_recvfrom")
int kt_recvfrom_out(struct trace_event_raw_sys_exit *ctx)
{
	return kt_recv_exit(KT_CALL_RECVFROM, ctx->ret);
}

SEC("tracepoint/syscalls/sys_enter_recvmsg")
int kt_recvmsg_in(struct trace_event_raw_sys_enter *ctx)
{
	/* recvmsg(fd, msg, flags) */
	return kt_call_enter(KT_CALL_RECVMSG, (int)ctx->args[0], ctx->args[1], 0, (__u32)ctx->args[2]);
}

SEC("tracepoint/syscalls/sys_exit_recvmsg")
int kt_recvmsg_out(struct trace_event_raw_sys_exit *ctx)
{
	return kt_recv_exit(KT_CALL_RECVMSG, ctx->ret);
}

SEC("tracepoint/syscalls/sys_enter_recvmmsg")
int kt_recvmmsg_in(struct trace_event_raw_sys_enter *ctx)
{
	/* recvmmsg(fd, mmsg, vlen, flags, timeout) */
	return kt_call_enter(KT_CALL_RECVMMSG, (int)ctx->args[0], ctx->args[1], 0, (__u32)ctx->args[3]);
}

SEC("tracepoint/syscalls/sys_exit_recvmmsg")
int kt_recvmmsg_out(struct trace_event_raw_sys_exit *ctx)
{
	return kt_mmsg_exit(KT_CALL_RECVMMSG, ctx->ret, KT_DIR_INGRESS);
}
