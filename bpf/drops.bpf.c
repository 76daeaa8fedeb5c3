// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * drops: every packet the kernel drops, from the kfree_skb tracepoint, which
 * fires with the kernel's own reason (enum skb_drop_reason, v5.17+) wherever
 * an skb is freed as dropped. Consumed skbs (delivered, or freed because they
 * were done with) are not drops: since v6.1 they go to consume_skb instead,
 * and a kfree_skb with reason SKB_CONSUMED is skipped for older kernels.
 *
 * On a busy node this fires constantly, so drops never cross the ring one by
 * one: each is counted in the drop_counts map by (reason, ethertype, IP
 * protocol), which user space reads when the window ends. Only TCP and UDP
 * packets on a --ports port cross the ring (per-flow detail), and so does a
 * drop whose key no longer fits in a full map. Without --ports there is no
 * per-flow event at all. With --dns-only only TCP/UDP drops on a DNS port are
 * kept (as events: the DNS ports are the selected ports); the rest is filtered.
 */
#include "common.bpf.h"
#include "drops.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Anchors that put the event structs and enums into this object's BTF. */
struct kt_drop_event _kt_drop_event = {};
struct kt_drop_key _kt_drop_key = {};
enum kt_kind _kt_kind = 0;
enum kt_family _kt_family = 0;
enum kt_attribution _kt_attribution = 0;

/* --dns-only: drops of TCP/UDP packets on a DNS port only (the ports map holds the DNS ports); others are
 * counted as filtered, neither in drop_counts nor as events. */
const volatile __u8 kt_dns_only = 0;

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define TCP_TIME_WAIT 6
#define TCP_NEW_SYN_RECV 12

/*
 * (reason, ethertype, IP protocol) → drops, per CPU (no cache line bounces
 * between CPUs dropping at once; user space sums the CPUs). Inserted by the
 * first drop of a key, never deleted, read once after the window.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct kt_drop_key);
	__type(value, __u64);
} drop_counts SEC(".maps");

/* The L3/L4 facts of a dropped packet that the key and the detail event need. */
struct kt_drop_packet {
	__u8 saddr[KT_ADDR_LEN];
	__u8 daddr[KT_ADDR_LEN];
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u8 ip_proto;
};

/*
 * Read the IP header at skb->head + network_header, and the ports right after
 * it. Bounded: one fixed-size read per header, no walk over IPv6 extension
 * headers (a packet with one is counted with its next-header value). A header
 * that does not look like IPv4/IPv6 (a packet dropped before its network
 * header was set) leaves ip_proto 0.
 */
static __always_inline void kt_parse(const unsigned char *head, __u16 nh, __u16 protocol, struct kt_drop_packet *p)
{
	const unsigned char *ip = head + nh;
	__u8 hdr[40];
	__u32 hlen;
	__u16 ports[2];

	if (!head || nh == (__u16)~0U)
		return;
	if (protocol == ETH_P_IP) {
		if (bpf_probe_read_kernel(hdr, 20, ip))
			return;
		if ((hdr[0] >> 4) != 4 || (hdr[0] & 0xf) < 5)
			return;
		hlen = (hdr[0] & 0xf) * 4;
		p->family = AF_INET;
		p->ip_proto = hdr[9];
		__builtin_memcpy(p->saddr, &hdr[12], 4);
		__builtin_memcpy(p->daddr, &hdr[16], 4);
		/* a non-first fragment carries no ports */
		if (((__u16)hdr[6] << 8 | hdr[7]) & 0x1fff)
			return;
	} else if (protocol == ETH_P_IPV6) {
		if (bpf_probe_read_kernel(hdr, 40, ip))
			return;
		if ((hdr[0] >> 4) != 6)
			return;
		hlen = 40;
		p->family = AF_INET6;
		p->ip_proto = hdr[6];
		__builtin_memcpy(p->saddr, &hdr[8], KT_ADDR_LEN);
		__builtin_memcpy(p->daddr, &hdr[24], KT_ADDR_LEN);
	} else {
		return;
	}
	if (p->ip_proto != IPPROTO_TCP && p->ip_proto != IPPROTO_UDP)
		return;
	if (bpf_probe_read_kernel(ports, sizeof(ports), ip + hlen))
		return;
	p->sport = bpf_ntohs(ports[0]);
	p->dport = bpf_ntohs(ports[1]);
}

/* Count one drop under its key. False when the map is full and the key is new. */
static __always_inline bool kt_count_drop(const struct kt_drop_key *key)
{
	__u64 one = 1, *n;

	n = bpf_map_lookup_elem(&drop_counts, key);
	if (n) {
		/* only this program writes this CPU's slot, and a program never runs nested on one CPU */
		*n += 1;
		return true;
	}
	if (bpf_map_update_elem(&drop_counts, key, &one, BPF_NOEXIST) == 0)
		return true;
	/* another CPU inserted the same key first; or the map is full */
	n = bpf_map_lookup_elem(&drop_counts, key);
	if (n) {
		*n += 1;
		return true;
	}
	return false;
}

/* What the kernel knows of the socket; rare path (detail events only), so plain CO-RE reads. */
static __always_inline void kt_drop_socket(struct kt_drop_event *e, const struct sock *sk, const struct sk_buff *skb)
{
	__u8 state;

	if (!sk) {
		e->netns = BPF_CORE_READ(skb, dev, nd_net.net, ns.inum);
		return;
	}
	e->skaddr = (__u64)sk;
	e->netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	/* skb->sk may be a request or timewait socket, which end before these fields */
	state = BPF_CORE_READ(sk, __sk_common.skc_state);
	if (state == TCP_TIME_WAIT || state == TCP_NEW_SYN_RECV)
		return;
	e->sk_uid = BPF_CORE_READ(sk, sk_uid.val);
	if (bpf_core_field_exists(sk->sk_cgrp_data.cgroup))
		e->sk_cgroup_id = BPF_CORE_READ(sk, sk_cgrp_data.cgroup, kn, id);
	e->sk_ino = BPF_CORE_READ(sk, sk_socket, file, f_inode, i_ino);
}

/*
 * One drop. protocol is skb->protocol in host byte order. direct: skb is a BTF
 * pointer that plain loads may read (tp_btf); this runs for every drop on the
 * node, so that alternative avoids a helper call per field.
 */
static __always_inline int kt_drop(struct sk_buff *skb, __u64 location, __u32 reason, struct sock *rx_sk,
				   __u16 protocol, bool direct)
{
	struct kt_drop_packet p = {};
	struct kt_drop_key key = {};
	struct kt_counters *c;
	struct kt_drop_event *e;
	const unsigned char *head;
	struct sock *sk;
	__u16 nh;

	if (bpf_core_enum_value_exists(enum skb_drop_reason, SKB_CONSUMED) &&
	    reason == bpf_core_enum_value(enum skb_drop_reason, SKB_CONSUMED))
		return 0;
	c = kt_counters_of(KT_FAMILY_DROPS);
	if (c)
		__sync_fetch_and_add(&c->seen, 1);
	if (direct) {
		head = skb->head;
		nh = skb->network_header;
	} else {
		head = BPF_CORE_READ(skb, head);
		nh = BPF_CORE_READ(skb, network_header);
	}
	kt_parse(head, nh, protocol, &p);
	key.reason = reason;
	key.protocol = protocol;
	key.ip_proto = p.ip_proto;
	if (kt_dns_only && !((p.sport || p.dport) && kt_ports_allow(p.sport, p.dport))) {
		if (c)
			__sync_fetch_and_add(&c->filtered, 1);
		return 0;
	}
	/* per-flow detail: TCP/UDP on a selected port; everything else is only counted */
	if (!(kt_filter_ports && (p.sport || p.dport) && kt_ports_allow(p.sport, p.dport))) {
		if (kt_count_drop(&key)) {
			if (c)
				__sync_fetch_and_add(&c->aggregated, 1);
			return 0;
		}
	}
	e = kt_reserve(KT_FAMILY_DROPS, KT_KIND_DROP, sizeof(*e));
	if (!e)
		return 0;
	kt_fill_current(&e->task);
	sk = rx_sk;
	if (!sk)
		sk = direct ? skb->sk : BPF_CORE_READ(skb, sk);
	e->location = location;
	e->skaddr = 0;
	e->sk_cgroup_id = 0;
	e->sk_ino = 0;
	e->sk_uid = 0;
	e->netns = 0;
	kt_drop_socket(e, sk, skb);
	__builtin_memcpy(e->saddr, p.saddr, KT_ADDR_LEN);
	__builtin_memcpy(e->daddr, p.daddr, KT_ADDR_LEN);
	e->reason = reason;
	e->protocol = protocol;
	e->sport = p.sport;
	e->dport = p.dport;
	e->family = p.family;
	e->ip_proto = p.ip_proto;
	e->attribution = KT_ATTR_CPU;
	e->_pad[0] = e->_pad[1] = 0;
	kt_submit(e, sizeof(*e));
	return 0;
}

/* drops, alternative 1: the BTF-typed tracepoint with the receiving socket (rx_sk, v6.11+). */
SEC("tp_btf/kfree_skb")
int BPF_PROG(kt_drop_btf, struct sk_buff *skb, void *location, enum skb_drop_reason reason, struct sock *rx_sk)
{
	return kt_drop(skb, (__u64)location, reason, rx_sk, bpf_ntohs(skb->protocol), true);
}

/* drops, alternative 2: the classic tracepoint (reason v5.17+, rx_sk v6.11+). */
SEC("tracepoint/skb/kfree_skb")
int kt_drop_tp(struct trace_event_raw_kfree_skb *ctx)
{
	struct sock *rx_sk = NULL;

	if (bpf_core_field_exists(ctx->rx_sk))
		rx_sk = ctx->rx_sk;
	/* the tracepoint's protocol is already in host byte order */
	return kt_drop(ctx->skbaddr, (__u64)ctx->location, ctx->reason, rx_sk, ctx->protocol, false);
}
