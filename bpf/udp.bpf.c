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
 * follows in the same syscall.
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

static __always_inline __u64 kt_sk_cookie(const struct sock *sk)
{
	return BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);
}

/* A hash of the socket's tuple: the flow's 1-in-N sampling decision, the same for every datagram. */
static __always_inline __u32 kt_tuple_hash(const struct kt_tuple *t)
{
	__u32 h = ((__u32)t->sport << 16 | t->dport) ^ 0x9e3779b9;
	__u32 words[8];
	int i;

	__builtin_memcpy(words, t->saddr, sizeof(words));
	for (i = 0; i < 8; i++) {
		h ^= words[i];
		h *= 0x01000193;
	}
	/* murmur3 finalizer */
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

static __always_inline bool kt_sample_tuple(const struct kt_tuple *t)
{
	return kt_sample_every <= 1 || kt_tuple_hash(t) % kt_sample_every == 0;
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
					bool is_dns)
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
	if (!kt_sample_tuple(t)) {
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
	key.netns = kt_sk_netns(sk);

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
					   __u8 direction, __u16 protocol, bool remote_is_dns)
{
	struct kt_dns_event *e;
	__u8 role = remote_is_dns ? KT_DNS_CLIENT : KT_DNS_SERVER;

	kt_count(KT_FAMILY_DNS, seen);
	if (!kt_sample_tuple(t)) {
		kt_count(KT_FAMILY_DNS, sampled_out);
		return;
	}
	e = kt_reserve(KT_FAMILY_DNS, KT_KIND_DNS, sizeof(*e));
	if (!e)
		return;
	kt_fill_current(&e->task);
	e->skaddr = (__u64)sk;
	e->ret = ret;
	e->netns = kt_sk_netns(sk);
	kt_copy_tuple(t, e->saddr, e->daddr, &e->sport, &e->dport, &e->family);
	e->protocol = protocol;
	/* a client sends queries and receives replies; a server the other way round */
	e->message = (role == KT_DNS_CLIENT) == (direction == KT_DIR_EGRESS) ? KT_DNS_QUERY : KT_DNS_REPLY;
	e->role = role;
	__builtin_memset(e->_pad, 0, sizeof(e->_pad));
	kt_submit(e, sizeof(*e));
}

/*
 * The remote end of a datagram on an unconnected socket, as the cgroup hook of
 * this syscall saw it, or given by the caller. Consumes the thread's entry.
 */
static __always_inline void kt_take_peer(const struct sock *sk, struct kt_tuple *t, const struct kt_peer *given)
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
	if (!p->cookie || p->cookie == kt_sk_cookie(sk)) {
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
 */
static __always_inline int kt_datagram(const struct sock *sk, int ret, int flags, __u8 direction,
				       const struct kt_peer *peer)
{
	struct kt_tuple t = {};
	__u16 family, protocol;
	bool remote_is_dns = false, local_is_dns = false;

	if (!sk || ret == -EAGAIN || ret == -EINTR)
		return 0;
	/* a peeked datagram is read again later */
	if (direction == KT_DIR_INGRESS && (flags & MSG_PEEK))
		return 0;
	family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (family != AF_INET && family != AF_INET6)
		return 0;
	protocol = kt_sk_protocol(sk);
	if (protocol == IPPROTO_TCP) {
		/*
		 * TCP only for DNS over TCP, and a TCP socket's ports never change:
		 * test them before anything else. A zero-length read is the end of
		 * the stream.
		 */
		if (!kt_want_dns || ret == 0)
			return 0;
		if (!kt_is_dns_port(bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport))) &&
		    !kt_is_dns_port(BPF_CORE_READ(sk, __sk_common.skc_num)))
			return 0;
	} else if (protocol != IPPROTO_UDP) {
		return 0;
	}
	if (kt_is_self())
		return 0;
	kt_sk_tuple(sk, &t);
	if (protocol == IPPROTO_UDP)
		kt_take_peer(sk, &t, peer);
	if (kt_want_dns) {
		remote_is_dns = kt_is_dns_port(t.dport);
		local_is_dns = !remote_is_dns && kt_is_dns_port(t.sport);
	}
	if (protocol == IPPROTO_UDP && kt_want_udp)
		kt_udp_flow(sk, &t, ret, direction, remote_is_dns || local_is_dns);
	if (remote_is_dns || local_is_dns)
		kt_dns_message(sk, &t, ret, direction, protocol, remote_is_dns);
	return 0;
}

/* udp/dns, alternative 1: BTF-typed tracepoints (v6.3+). */
SEC("tp_btf/sock_send_length")
int BPF_PROG(kt_udp_send_btf, struct sock *sk, int ret, int flags)
{
	return kt_datagram(sk, ret, flags, KT_DIR_EGRESS, NULL);
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(kt_udp_recv_btf, struct sock *sk, int ret, int flags)
{
	return kt_datagram(sk, ret, flags, KT_DIR_INGRESS, NULL);
}

/* udp/dns, alternative 2: the classic tracepoints (v6.3+), which filter on the protocol without a read. */
SEC("tracepoint/sock/sock_send_length")
int kt_udp_send_tp(struct trace_event_raw_sock_msg_length *ctx)
{
	if (ctx->protocol != IPPROTO_UDP && ctx->protocol != IPPROTO_TCP)
		return 0;
	return kt_datagram(ctx->sk, ctx->ret, ctx->flags, KT_DIR_EGRESS, NULL);
}

SEC("tracepoint/sock/sock_recv_length")
int kt_udp_recv_tp(struct trace_event_raw_sock_msg_length *ctx)
{
	if (ctx->protocol != IPPROTO_UDP && ctx->protocol != IPPROTO_TCP)
		return 0;
	return kt_datagram(ctx->sk, ctx->ret, ctx->flags, KT_DIR_INGRESS, NULL);
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
