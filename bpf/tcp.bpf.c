// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * TCP probe families: tcp_state, connect, retransmit, reset.
 *
 * Every alternative of every family is compiled into this one object; the
 * loader keeps the first alternative of each family that works on the running
 * kernel and switches the others off before load (ktrace/probes.py).
 *
 * State changes, retransmits and resets often run in softirq context, where the
 * current task is whoever happened to be on the CPU. The sk_owner map remembers
 * the task that owned each socket, captured in process context, so those events
 * name the right process. The process that accept()s a socket, or that acts on
 * it in a syscall of its own (close, shutdown), owns it from then on: the worker
 * of a pre-fork server, not the master that listens.
 */
#include "common.bpf.h"
#include "sock.bpf.h"
#include "tcp.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Anchors that put the event structs and enums into this object's BTF. */
struct kt_tcp_state_event _kt_tcp_state_event = {};
struct kt_connect_event _kt_connect_event = {};
struct kt_retransmit_event _kt_retransmit_event = {};
struct kt_reset_event _kt_reset_event = {};
struct kt_held_states _kt_held_states = {};
enum kt_kind _kt_kind = 0;
enum kt_family _kt_family = 0;
enum kt_attribution _kt_attribution = 0;
enum kt_reset_direction _kt_reset_direction = 0;
enum kt_retransmit_kind _kt_retransmit_kind = 0;
enum kt_held_sizes _kt_held_sizes = 0;

/* TCP states, from include/net/tcp_states.h. */
enum {
	KT_TCP_ESTABLISHED = 1,
	KT_TCP_SYN_SENT = 2,
	KT_TCP_SYN_RECV = 3,
	KT_TCP_FIN_WAIT1 = 4,
	KT_TCP_CLOSE = 7,
	KT_TCP_CLOSE_WAIT = 8,
	KT_TCP_LAST_ACK = 9,
	KT_TCP_LISTEN = 10,
};

/* What ktrace remembers of a socket between its events. */
struct kt_sock {
	struct kt_task task;
	__u64 syn_ts;		/* when it entered SYN_SENT */
	__u8 attribution;	/* enum kt_attribution of task */
	__u8 sampled;		/* the flow's sampling decision: 1 = keep */
	__u8 held;		/* state changes of it wait in held_states */
	__u8 undecided;		/* --sample: a connecting socket waits for its local port to decide */
	__u8 _pad[4];
};

/*
 * Socket address → owner and sampling decision (kt_sample_ports of the
 * socket's two ports, so both ends of a connection on this node agree; a
 * listening socket is no flow and is always kept).
 * Inserted at a socket's first event (reset at SYN_SENT, LISTEN and LISTEN →
 * SYN_RECV, where a socket address starts a new life); set to the caller by
 * accept() and by every state change made by a syscall on the socket; deleted
 * when the socket enters CLOSE.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct kt_sock);
} sk_owner SEC(".maps");

struct kt_listen_key {
	__u32 netns;
	__u16 port;
	__u16 _pad;
};

/*
 * (netns, port) → task listening there, so that accepted sockets, which are
 * born in softirq context, are attributed to the server.
 * Inserted on → LISTEN, deleted on LISTEN → CLOSE.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct kt_listen_key);
	__type(value, struct kt_task);
} listeners SEC(".maps");

/*
 * Socket address → its state changes held until accept() (struct kt_held_states),
 * or, with --sample, a connecting socket's SYN_SENT held until its local port is
 * known (kt_settle).
 * Inserted at LISTEN → SYN_RECV of a socket no process owns yet, and at SYN_SENT
 * of a socket with no local port yet; deleted when they are sent (or, for a
 * SYN_SENT, counted sampled out): at accept(), at the socket's next event or
 * connect() return, or read by user space after the window. A plain hash, not
 * an LRU: when it is full, the changes are sent at once (attributed to the
 * listener) instead of being evicted and lost.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u64);
	__type(value, struct kt_held_states);
} held_states SEC(".maps");

/* Where a held entry is built before insertion: it is too big for the BPF stack. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct kt_held_states);
} held_scratch SEC(".maps");

struct kt_connect_args {
	__u64 ts;
	__u64 uaddr;		/* struct sockaddr __user * */
	__s32 fd;
	__u32 _pad;
};

/*
 * Thread (pid_tgid) → connect() in flight. Inserted at syscall entry for
 * AF_INET/AF_INET6 addresses, deleted at exit.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, __u64);
	__type(value, struct kt_connect_args);
} connects SEC(".maps");

/*
 * State changes that only a syscall on the socket makes, so the current task
 * owns the socket: connect(), listen(), close()/shutdown().
 */
static __always_inline bool kt_change_by_owner(int oldstate, int newstate)
{
	return newstate == KT_TCP_SYN_SENT || newstate == KT_TCP_LISTEN ||
	       (oldstate == KT_TCP_LISTEN && newstate == KT_TCP_CLOSE) ||
	       (oldstate == KT_TCP_ESTABLISHED && newstate == KT_TCP_FIN_WAIT1) ||
	       (oldstate == KT_TCP_CLOSE_WAIT && newstate == KT_TCP_LAST_ACK);
}

/* The owner of a socket seen for the first time outside a syscall of its own. */
static __always_inline void kt_guess_owner(struct kt_sock *o, const struct sock *sk, __u16 sport)
{
	struct kt_listen_key key = { .netns = kt_sk_netns(sk), .port = sport };
	struct kt_task *listener = bpf_map_lookup_elem(&listeners, &key);

	if (listener) {
		o->task = *listener;
		o->attribution = KT_ATTR_LISTENER;
	} else {
		kt_fill_current(&o->task);
		o->attribution = KT_ATTR_CPU;
	}
}

/*
 * The remembered owner of sk, inserting one (decided by the ports of t) if
 * unknown. Falls back to *scratch when the map cannot take the entry.
 */
static __always_inline struct kt_sock *kt_owner_of(const struct sock *sk, const struct kt_tuple *t,
						   struct kt_sock *scratch)
{
	__u64 key = (__u64)sk;
	struct kt_sock *o = bpf_map_lookup_elem(&sk_owner, &key);

	if (o)
		return o;
	kt_guess_owner(scratch, sk, t->sport);
	scratch->sampled = kt_sample_ports(t->sport, t->dport);
	bpf_map_update_elem(&sk_owner, &key, scratch, BPF_ANY);
	o = bpf_map_lookup_elem(&sk_owner, &key);
	return o ? o : scratch;
}

/*
 * Send the state changes held for sk, as changes of owner (by accept() or by the
 * socket's next event); with owner NULL, as the task that made them.
 */
static __always_inline void kt_release_held(__u64 key, const struct kt_task *owner, __u8 attribution)
{
	struct kt_held_states *h = bpf_map_lookup_elem(&held_states, &key);
	struct kt_tcp_state_event *e;
	__u32 i;

	if (!h)
		return;
#pragma unroll
	for (i = 0; i < KT_HELD_STATES; i++) {
		if (i >= h->count)
			break;
		e = kt_reserve(KT_FAMILY_TCP_STATE, KT_KIND_TCP_STATE, sizeof(*e));
		if (!e)
			continue;
		/* the header too: the event keeps the time it happened */
		__builtin_memcpy(e, &h->events[i], sizeof(*e));
		if (owner) {
			e->task = *owner;
			e->attribution = attribution;
		}
		kt_submit(e, sizeof(*e));
	}
	bpf_map_delete_elem(&held_states, &key);
}

/*
 * Keep a state change of a socket no process owns yet until accept() names its
 * owner. False when it cannot be held (map full): the caller sends it now.
 */
static __always_inline bool kt_hold(__u64 key, const struct kt_tcp_state_event *e)
{
	struct kt_held_states *h = bpf_map_lookup_elem(&held_states, &key);
	__u32 zero = 0;

	if (h) {
		if (h->count != 1)
			return false;
		__builtin_memcpy(&h->events[1], e, sizeof(*e));
		h->count = 2;
		return true;
	}
	h = bpf_map_lookup_elem(&held_scratch, &zero);
	if (!h)
		return false;
	__builtin_memcpy(&h->events[0], e, sizeof(*e));
	h->count = 1;
	return bpf_map_update_elem(&held_states, &key, h, BPF_NOEXIST) == 0;
}

/*
 * --sample: keep a connecting socket's SYN_SENT until its local port is known.
 * tcp_v4_connect()/tcp_v6_connect() enter SYN_SENT before inet_hash_connect()
 * picks the port, so there is nothing to hash yet. False when it cannot be held
 * (map full, or an entry of a previous life of the address): the caller sends it.
 */
static __always_inline bool kt_hold_syn(__u64 key, const struct kt_tcp_state_event *e)
{
	struct kt_held_states *h;
	__u32 zero = 0;

	h = bpf_map_lookup_elem(&held_scratch, &zero);
	if (!h)
		return false;
	__builtin_memcpy(&h->events[0], e, sizeof(*e));
	h->count = 1;
	return bpf_map_update_elem(&held_states, &key, h, BPF_NOEXIST) == 0;
}

/*
 * The local port of a connecting socket is known now (connect() returned, or
 * the socket's next state change, SYN retransmit or reset): decide by the two
 * ports, as the other end does, and send the SYN_SENT held for it (with the port
 * it got) or count it sampled out.
 */
static __always_inline void kt_settle(__u64 key, struct kt_sock *o, const struct kt_tuple *t)
{
	struct kt_held_states *h;
	struct kt_tcp_state_event *e;

	/* the decision first: a change on another CPU that sees the socket decided acts on it */
	o->sampled = kt_sample_ports(t->sport, t->dport);
	o->undecided = 0;
	if (!o->held)
		return;		/* it could not be held and was sent at once */
	o->held = 0;
	/*
	 * connect() returning and the handshake's end in softirq can settle the
	 * same socket at once on two CPUs: whoever deletes the held entry sends or
	 * counts it, so it is written or counted exactly once.
	 */
	if (!o->sampled) {
		if (bpf_map_delete_elem(&held_states, &key) == 0)
			kt_count(KT_FAMILY_TCP_STATE, sampled_out);
		return;
	}
	h = bpf_map_lookup_elem(&held_states, &key);
	if (!h)
		return;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		if (bpf_map_delete_elem(&held_states, &key) == 0)
			kt_count(KT_FAMILY_TCP_STATE, ringbuf_full);
		return;
	}
	/* the header too: the event keeps the time it happened */
	__builtin_memcpy(e, &h->events[0], sizeof(*e));
	if (!e->sport)
		e->sport = t->sport;
	if (bpf_map_delete_elem(&held_states, &key) == 0)
		kt_submit(e, sizeof(*e));
	else
		bpf_ringbuf_discard(e, BPF_RB_NO_WAKEUP);
}

static __always_inline void kt_fill_state(struct kt_tcp_state_event *e, const struct sock *sk, const struct kt_tuple *t,
					  const struct kt_sock *o, bool by_owner, int oldstate, int newstate, __u64 now)
{
	__u32 retrans = 0;

	e->task = o->task;
	e->attribution = by_owner ? KT_ATTR_CURRENT : o->attribution;
	e->skaddr = (__u64)sk;
	e->handshake_ns = oldstate == KT_TCP_SYN_SENT && o->syn_ts ? now - o->syn_ts : 0;
	kt_copy_tuple(t, e->saddr, e->daddr, &e->sport, &e->dport, &e->family);
	e->oldstate = oldstate;
	e->newstate = newstate;
	e->sk_err = newstate == KT_TCP_CLOSE ? BPF_CORE_READ(sk, sk_err) : 0;
	if (oldstate == KT_TCP_SYN_SENT) {
		/* in SYN_SENT every retransmitted segment is a SYN */
		retrans = BPF_CORE_READ((const struct tcp_sock *)sk, total_retrans);
	}
	e->syn_retransmits = retrans > 255 ? 255 : retrans;
	__builtin_memset(e->_pad, 0, sizeof(e->_pad));
}

/* A state change built where a held entry is built (held_scratch), with its header: for kt_hold and kt_hold_syn. */
static __always_inline struct kt_tcp_state_event *kt_state_to_hold(const struct sock *sk, const struct kt_tuple *t,
								   const struct kt_sock *o, bool by_owner,
								   int oldstate, int newstate, __u64 now)
{
	struct kt_held_states *scratch;
	struct kt_tcp_state_event *e;
	__u32 zero = 0;

	scratch = bpf_map_lookup_elem(&held_scratch, &zero);
	if (!scratch)
		return NULL;
	e = &scratch->events[1];
	kt_fill_state(e, sk, t, o, by_owner, oldstate, newstate, now);
	e->hdr.ts_ns = now;
	e->hdr.kind = KT_KIND_TCP_STATE;
	e->hdr.size = sizeof(*e);
	e->hdr.cpu = bpf_get_smp_processor_id();
	return e;
}

/* Send a copy of a state change built by kt_state_to_hold. */
static __always_inline void kt_send_copy(const struct kt_tcp_state_event *built)
{
	struct kt_tcp_state_event *e = kt_reserve(KT_FAMILY_TCP_STATE, KT_KIND_TCP_STATE, sizeof(*e));

	if (!e)
		return;
	__builtin_memcpy(e, built, sizeof(*e));
	kt_submit(e, sizeof(*e));
}

static __always_inline int kt_handle_state(const struct sock *sk, int oldstate, int newstate)
{
	struct kt_tcp_state_event *e;
	struct kt_tuple t = {};
	struct kt_sock fresh = {};
	struct kt_sock *o;
	__u64 key = (__u64)sk;
	__u64 now = bpf_ktime_get_boot_ns();
	bool accepted_child = oldstate == KT_TCP_LISTEN && newstate == KT_TCP_SYN_RECV;
	bool born = newstate == KT_TCP_SYN_SENT || newstate == KT_TCP_LISTEN || accepted_child;
	/* a listening socket is no flow: always kept (they are few, and accepted sockets name their listener) */
	bool listening = newstate == KT_TCP_LISTEN || (oldstate == KT_TCP_LISTEN && newstate == KT_TCP_CLOSE);
	/* --sample and a connecting socket with no local port yet: its decision waits for the port */
	bool wait_port = kt_sample_every > 1 && newstate == KT_TCP_SYN_SENT;
	/* the owner itself is making this change, in a syscall on the socket */
	bool by_owner = kt_change_by_owner(oldstate, newstate);

	if (kt_sk_protocol(sk) != IPPROTO_TCP)
		return 0;
	kt_count(KT_FAMILY_TCP_STATE, seen);
	kt_sk_tuple(sk, &t);
	if (!kt_ports_allow(t.sport, t.dport)) {
		kt_count(KT_FAMILY_TCP_STATE, filtered);
		return 0;
	}

	o = born ? NULL : bpf_map_lookup_elem(&sk_owner, &key);
	if (!o) {
		if (by_owner) {
			kt_fill_current(&fresh.task);
			fresh.attribution = KT_ATTR_SOCKET_OWNER;
		} else {
			kt_guess_owner(&fresh, sk, t.sport);
		}
		if (kt_self_tgid && fresh.task.tgid == kt_self_tgid) {
			/* ktrace's own sockets */
			kt_count(KT_FAMILY_TCP_STATE, filtered);
			return 0;
		}
		if (listening) {
			fresh.sampled = 1;
		} else {
			fresh.sampled = kt_sample_ports(t.sport, t.dport);
			wait_port = wait_port && !t.sport;
			fresh.undecided = wait_port;
		}
		if (newstate != KT_TCP_CLOSE) {
			bpf_map_update_elem(&sk_owner, &key, &fresh, BPF_ANY);
			o = bpf_map_lookup_elem(&sk_owner, &key);
		}
		if (!o) {
			/* not remembered: nothing would settle it later, so it is decided now */
			wait_port = false;
			o = &fresh;
		}
	} else if (by_owner) {
		/*
		 * Whoever acts on the socket in a syscall owns it from now on: the
		 * worker of a pre-fork server closing a connection that its master
		 * listened for, or a process the socket was passed to. Most of the
		 * time it is the owner already, whose task block is up to date.
		 */
		__u64 id = bpf_get_current_pid_tgid();

		if (o->attribution != KT_ATTR_SOCKET_OWNER || o->task.tgid != id >> 32 || o->task.pid != (__u32)id) {
			kt_fill_current(&o->task);
			o->attribution = KT_ATTR_SOCKET_OWNER;
		}
	}
	if (kt_sample_every > 1 && o->undecided && !born)
		kt_settle(key, o, &t);

	if (newstate == KT_TCP_SYN_SENT)
		o->syn_ts = now;
	if (newstate == KT_TCP_LISTEN) {
		struct kt_listen_key lk = { .netns = kt_sk_netns(sk), .port = t.sport };

		bpf_map_update_elem(&listeners, &lk, &o->task, BPF_ANY);
	} else if (oldstate == KT_TCP_LISTEN && newstate == KT_TCP_CLOSE) {
		struct kt_listen_key lk = { .netns = kt_sk_netns(sk), .port = t.sport };

		bpf_map_delete_elem(&listeners, &lk);
	}

	if (wait_port) {
		e = kt_state_to_hold(sk, &t, o, by_owner, oldstate, newstate, now);
		if (!e)
			goto out;
		/* a previous life of this socket address left changes held: they go out first, as they were */
		kt_release_held(key, NULL, 0);
		if (kt_hold_syn(key, e)) {
			o->held = 1;
			goto out;
		}
		/* nowhere to hold it: sent now; the socket's later events are still decided by its ports */
		kt_send_copy(e);
		goto out;
	}
	if (!o->sampled && !listening) {
		kt_count(KT_FAMILY_TCP_STATE, sampled_out);
		goto out;
	}
	if (o->attribution != KT_ATTR_SOCKET_OWNER &&
	    (accepted_child || (oldstate == KT_TCP_SYN_RECV && newstate == KT_TCP_ESTABLISHED))) {
		/* an accepted socket before accept(): wait for the process that takes it */
		if (accepted_child) {
			/* a new life of this socket address: what a previous one left behind goes out first */
			kt_release_held(key, &o->task, o->attribution);
		}
		e = kt_state_to_hold(sk, &t, o, by_owner, oldstate, newstate, now);
		if (!e)
			goto out;
		if (kt_hold(key, e)) {
			o->held = 1;
			goto out;
		}
		/* nowhere to hold it: send what waits, then this change */
		kt_release_held(key, &o->task, o->attribution);
		o->held = 0;
		e = kt_state_to_hold(sk, &t, o, by_owner, oldstate, newstate, now);
		if (e)
			kt_send_copy(e);
		goto out;
	}
	if (o->held) {
		/* what waited for an owner goes first, with the owner known now */
		kt_release_held(key, &o->task, o->attribution);
		o->held = 0;
	}
	e = kt_reserve(KT_FAMILY_TCP_STATE, KT_KIND_TCP_STATE, sizeof(*e));
	if (!e)
		goto out;
	kt_fill_state(e, sk, &t, o, by_owner, oldstate, newstate, now);
	kt_submit(e, sizeof(*e));
out:
	if (newstate == KT_TCP_CLOSE)
		bpf_map_delete_elem(&sk_owner, &key);
	return 0;
}

/* tcp_state, alternative 1: BTF-typed tracepoint (v5.5+), direct arguments. */
SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(kt_tcp_st_btf, const struct sock *sk, const int oldstate, const int newstate)
{
	return kt_handle_state(sk, oldstate, newstate);
}

/* tcp_state, alternative 2: the classic tracepoint (v4.16+). */
SEC("tracepoint/sock/inet_sock_set_state")
int kt_tcp_st_tp(struct trace_event_raw_inet_sock_set_state *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return 0;
	return kt_handle_state(ctx->skaddr, ctx->oldstate, ctx->newstate);
}

/* tcp_state, alternative 3: fentry on tcp_set_state (trampolines, v5.5+). */
SEC("fentry/tcp_set_state")
int BPF_PROG(kt_tcp_st_fe, struct sock *sk, int state)
{
	int oldstate = BPF_CORE_READ(sk, __sk_common.skc_state);

	if (oldstate == state)
		return 0;
	return kt_handle_state(sk, oldstate, state);
}

/* tcp_state, alternative 4: kprobe on tcp_set_state. */
SEC("kprobe/tcp_set_state")
int BPF_KPROBE(kt_tcp_st_kp, struct sock *sk, int state)
{
	int oldstate = BPF_CORE_READ(sk, __sk_common.skc_state);

	if (oldstate == state)
		return 0;
	return kt_handle_state(sk, oldstate, state);
}

static __always_inline int kt_connect_enter(int fd, const void *uaddr)
{
	struct kt_connect_args args = {};
	__u64 id = bpf_get_current_pid_tgid();
	__u16 family = 0;

	if (kt_is_self())
		return 0;
	bpf_probe_read_user(&family, sizeof(family), uaddr);
	if (family != AF_INET && family != AF_INET6)
		return 0;
	args.ts = bpf_ktime_get_boot_ns();
	args.uaddr = (__u64)uaddr;
	args.fd = fd;
	bpf_map_update_elem(&connects, &id, &args, BPF_ANY);
	return 0;
}

static __always_inline int kt_connect_exit(long ret)
{
	struct kt_connect_event *e;
	struct kt_connect_args *args;
	struct kt_tuple t = {};
	struct sock *sk;
	__u64 id = bpf_get_current_pid_tgid();
	__u64 now = bpf_ktime_get_boot_ns();
	__u16 protocol = 0;
	__u16 port = 0;

	args = bpf_map_lookup_elem(&connects, &id);
	if (!args)
		return 0;
	sk = kt_sock_of_fd(args->fd);
	if (sk) {
		protocol = kt_sk_protocol(sk);
		kt_sk_tuple(sk, &t);
	}
	if (protocol != IPPROTO_TCP && protocol != IPPROTO_UDP)
		goto done;
	kt_count(KT_FAMILY_CONNECT, seen);
	/* the destination as the caller asked for it, whatever became of the socket */
	bpf_probe_read_user(&t.family, sizeof(t.family), (void *)args->uaddr);
	bpf_probe_read_user(&port, sizeof(port), (void *)args->uaddr + 2);
	t.dport = bpf_ntohs(port);
	if (t.family == AF_INET6) {
		bpf_probe_read_user(t.daddr, KT_ADDR_LEN, (void *)args->uaddr + 8);
	} else {
		__builtin_memset(t.daddr, 0, KT_ADDR_LEN);
		bpf_probe_read_user(t.daddr, 4, (void *)args->uaddr + 4);
	}
	if (!kt_ports_allow(t.sport, t.dport)) {
		kt_count(KT_FAMILY_CONNECT, filtered);
		goto done;
	}
	if (kt_sample_every > 1 && protocol == IPPROTO_TCP) {
		/* the local port is known now: the socket's SYN_SENT waited for it */
		__u64 key = (__u64)sk;
		struct kt_sock *o = bpf_map_lookup_elem(&sk_owner, &key);

		if (o && o->undecided)
			kt_settle(key, o, &t);
	}
	/* by the ports, as the socket's own events and the other end decide */
	if (!kt_sample_ports(t.sport, t.dport)) {
		kt_count(KT_FAMILY_CONNECT, sampled_out);
		goto done;
	}
	e = kt_reserve(KT_FAMILY_CONNECT, KT_KIND_CONNECT, sizeof(*e));
	if (!e)
		goto done;
	kt_fill_current(&e->task);
	e->skaddr = (__u64)sk;
	e->duration_ns = now - args->ts;
	e->ret = ret;
	e->fd = args->fd;
	kt_copy_tuple(&t, e->saddr, e->daddr, &e->sport, &e->dport, &e->family);
	e->protocol = protocol;
	kt_submit(e, sizeof(*e));
done:
	bpf_map_delete_elem(&connects, &id);
	return 0;
}

/* connect, alternative 1: syscall tracepoints. */
SEC("tracepoint/syscalls/sys_enter_connect")
int kt_conn_enter_tp(struct trace_event_raw_sys_enter *ctx)
{
	return kt_connect_enter((int)ctx->args[0], (const void *)ctx->args[1]);
}

SEC("tracepoint/syscalls/sys_exit_connect")
int kt_conn_exit_tp(struct trace_event_raw_sys_exit *ctx)
{
	return kt_connect_exit(ctx->ret);
}

/* connect, alternative 2: fentry/fexit on __sys_connect (trampolines). */
SEC("fentry/__sys_connect")
int BPF_PROG(kt_conn_enter_fe, int fd, struct sockaddr *uaddr, int addrlen)
{
	return kt_connect_enter(fd, uaddr);
}

SEC("fexit/__sys_connect")
int BPF_PROG(kt_conn_exit_fe, int fd, struct sockaddr *uaddr, int addrlen, int ret)
{
	return kt_connect_exit(ret);
}

/*
 * accept() returned fd: the caller owns the socket from now on. The state
 * changes the socket went through before (in softirq, attributed to the
 * listener) are sent now with this owner.
 */
static __always_inline int kt_accept_exit(long fd)
{
	struct kt_sock fresh = {};
	struct kt_sock *o;
	struct sock *sk;
	__u64 key;
	__u16 family;

	if (fd < 0 || kt_is_self())
		return 0;
	sk = kt_sock_of_fd(fd);
	if (!sk || kt_sk_protocol(sk) != IPPROTO_TCP)
		return 0;
	family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (family != AF_INET && family != AF_INET6)
		return 0;
	key = (__u64)sk;
	o = bpf_map_lookup_elem(&sk_owner, &key);
	if (!o) {
		/* born before the window, or filtered */
		struct kt_tuple t = {};

		kt_sk_tuple(sk, &t);
		if (!kt_ports_allow(t.sport, t.dport))
			return 0;
		kt_fill_current(&fresh.task);
		fresh.attribution = KT_ATTR_SOCKET_OWNER;
		fresh.sampled = kt_sample_ports(t.sport, t.dport);
		bpf_map_update_elem(&sk_owner, &key, &fresh, BPF_ANY);
		kt_release_held(key, &fresh.task, KT_ATTR_SOCKET_OWNER);
		return 0;
	}
	kt_fill_current(&o->task);
	o->attribution = KT_ATTR_SOCKET_OWNER;
	if (o->held) {
		kt_release_held(key, &o->task, KT_ATTR_SOCKET_OWNER);
		o->held = 0;
	}
	return 0;
}

/* accept, alternative 1: the syscall tracepoints of accept(2) and accept4(2). */
SEC("tracepoint/syscalls/sys_exit_accept4")
int kt_accept4_tp(struct trace_event_raw_sys_exit *ctx)
{
	return kt_accept_exit(ctx->ret);
}

SEC("tracepoint/syscalls/sys_exit_accept")
int kt_accept_tp(struct trace_event_raw_sys_exit *ctx)
{
	return kt_accept_exit(ctx->ret);
}

/* accept, alternative 2: fexit on __sys_accept4, behind both syscalls (v4.17+, trampolines). */
SEC("fexit/__sys_accept4")
int BPF_PROG(kt_accept_fe, int fd, void *upeer_sockaddr, int *upeer_addrlen, int flags, int ret)
{
	return kt_accept_exit(ret);
}

/* tcp_skb_pcount(skb): the TCP segments a (GSO/TSO) skb stands for. */
static __always_inline __u32 kt_skb_pcount(const struct sk_buff *skb)
{
	const struct tcp_skb_cb *cb = (const struct tcp_skb_cb *)&skb->cb[0];

	return BPF_CORE_READ(cb, tcp_gso_segs);
}

/* One retransmit event: a data skb (kind data) or a SYN-ACK (kind synack), owned by o. */
static __always_inline void kt_send_retransmit(const struct kt_sock *o, const struct kt_tuple *t, __u64 skaddr,
					       __u32 total_retrans, __u32 snd_cwnd, __u32 srtt_us, __s32 err,
					       __u32 segments, __u8 state, __u8 kind)
{
	struct kt_retransmit_event *e = kt_reserve(KT_FAMILY_RETRANSMIT, KT_KIND_RETRANSMIT, sizeof(*e));

	if (!e)
		return;
	e->task = o->task;
	e->attribution = o->attribution;
	e->skaddr = skaddr;
	e->total_retrans = total_retrans;
	e->snd_cwnd = snd_cwnd;
	e->srtt_us = srtt_us;
	e->err = err;
	e->segments = segments;
	kt_copy_tuple(t, e->saddr, e->daddr, &e->sport, &e->dport, &e->family);
	e->state = state;
	e->kind = kind;
	__builtin_memset(e->_pad, 0, sizeof(e->_pad));
	kt_submit(e, sizeof(*e));
}

static __always_inline int kt_handle_retransmit(const struct sock *sk, const struct sk_buff *skb, int err)
{
	struct kt_tuple t = {};
	struct kt_sock scratch = {};
	struct kt_sock *o;
	const struct tcp_sock *tp = (const struct tcp_sock *)sk;

	kt_count(KT_FAMILY_RETRANSMIT, seen);
	kt_sk_tuple(sk, &t);
	if (!kt_ports_allow(t.sport, t.dport)) {
		kt_count(KT_FAMILY_RETRANSMIT, filtered);
		return 0;
	}
	o = kt_owner_of(sk, &t, &scratch);
	if (kt_sample_every > 1 && o->undecided)
		kt_settle((__u64)sk, o, &t);	/* a SYN sent again: the port is known */
	if (!o->sampled) {
		kt_count(KT_FAMILY_RETRANSMIT, sampled_out);
		return 0;
	}
	kt_send_retransmit(o, &t, (__u64)sk, BPF_CORE_READ(tp, total_retrans), BPF_CORE_READ(tp, snd_cwnd),
			   BPF_CORE_READ(tp, srtt_us) >> 3, err, skb ? kt_skb_pcount(skb) : 1,
			   BPF_CORE_READ(sk, __sk_common.skc_state), KT_RETX_DATA);
	return 0;
}

/*
 * A listener's SYN-ACK sent again for a request socket (tcp_rtx_synack, which
 * fires the tracepoint only when it was sent and then adds 1 to TcpRetransSegs
 * and TcpExtTCPSynRetrans).
 */
static __always_inline int kt_handle_synack(const struct sock *sk, const struct request_sock *req)
{
	const struct sock_common *rc = (const struct sock_common *)req;
	struct kt_tuple t = {};
	struct kt_sock scratch = {};
	struct kt_sock *o;

	kt_count(KT_FAMILY_RETRANSMIT, seen);
	t.family = BPF_CORE_READ(rc, skc_family);
	t.sport = BPF_CORE_READ(rc, skc_num);
	t.dport = bpf_ntohs(BPF_CORE_READ(rc, skc_dport));
	if (t.family == AF_INET6) {
		BPF_CORE_READ_INTO((struct in6_addr *)t.saddr, rc, skc_v6_rcv_saddr);
		BPF_CORE_READ_INTO((struct in6_addr *)t.daddr, rc, skc_v6_daddr);
	} else {
		BPF_CORE_READ_INTO((__u32 *)t.saddr, rc, skc_rcv_saddr);
		BPF_CORE_READ_INTO((__u32 *)t.daddr, rc, skc_daddr);
	}
	if (!kt_ports_allow(t.sport, t.dport)) {
		kt_count(KT_FAMILY_RETRANSMIT, filtered);
		return 0;
	}
	/* the request has no owner of its own yet: the listener's; the decision is the request's, by its ports */
	o = kt_owner_of(sk, &t, &scratch);
	if (!kt_sample_ports(t.sport, t.dport)) {
		kt_count(KT_FAMILY_RETRANSMIT, sampled_out);
		return 0;
	}
	/* total_retrans: SYN-ACKs of this request sent again before this one (counted once it is sent) */
	kt_send_retransmit(o, &t, (__u64)req, BPF_CORE_READ(req, num_retrans), 0, 0, 0, 1,
			   BPF_CORE_READ(rc, skc_state), KT_RETX_SYNACK);
	return 0;
}

/* retransmit, alternative 1: BTF-typed tracepoint. */
SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(kt_retx_btf, const struct sock *sk, const struct sk_buff *skb, int err)
{
	return kt_handle_retransmit(sk, skb, err);
}

SEC("tp_btf/tcp_retransmit_synack")
int BPF_PROG(kt_synack_btf, const struct sock *sk, const struct request_sock *req)
{
	return kt_handle_synack(sk, req);
}

/* retransmit, alternative 2: the classic tracepoint. */
SEC("tracepoint/tcp/tcp_retransmit_skb")
int kt_retx_tp(struct trace_event_raw_tcp_retransmit_skb *ctx)
{
	return kt_handle_retransmit(ctx->skaddr, ctx->skbaddr, ctx->err);
}

SEC("tracepoint/tcp/tcp_retransmit_synack")
int kt_synack_tp(struct trace_event_raw_tcp_retransmit_synack *ctx)
{
	return kt_handle_synack(ctx->skaddr, ctx->req);
}

/* retransmit, alternative 3: kprobe on __tcp_retransmit_skb. */
SEC("kprobe/__tcp_retransmit_skb")
int BPF_KPROBE(kt_retx_kp, struct sock *sk)
{
	return kt_handle_retransmit(sk, NULL, 0);
}

static __always_inline int kt_emit_reset(const struct sock *sk, struct kt_tuple *t, __u32 reason,
					 __u8 state, __u8 direction, __u32 netns)
{
	struct kt_reset_event *e;
	struct kt_sock scratch = {};
	struct kt_sock *o = NULL;
	bool sampled;

	kt_count(KT_FAMILY_RESET, seen);
	if (!kt_ports_allow(t->sport, t->dport)) {
		kt_count(KT_FAMILY_RESET, filtered);
		return 0;
	}
	if (sk) {
		o = kt_owner_of(sk, t, &scratch);
		if (kt_sample_every > 1 && o->undecided)
			kt_settle((__u64)sk, o, t);	/* a reset in SYN_SENT: the port is known */
	}
	if (sk && state != KT_TCP_LISTEN) {
		sampled = o->sampled;		/* the socket's decision */
	} else {
		/* no socket (a closed port), or a listener's for a packet: by the packet's ports */
		sampled = kt_sample_ports(t->sport, t->dport);
	}
	if (!sampled) {
		kt_count(KT_FAMILY_RESET, sampled_out);
		return 0;
	}
	e = kt_reserve(KT_FAMILY_RESET, KT_KIND_RESET, sizeof(*e));
	if (!e)
		return 0;
	if (o) {
		e->task = o->task;
		e->attribution = o->attribution;
	} else {
		/* a reset with no socket (a closed port) belongs to no process */
		kt_fill_current(&e->task);
		e->attribution = KT_ATTR_CPU;
	}
	e->skaddr = (__u64)sk;
	e->reason = reason;
	e->netns = netns;
	kt_copy_tuple(t, e->saddr, e->daddr, &e->sport, &e->dport, &e->family);
	e->state = state;
	e->direction = direction;
	__builtin_memset(e->_pad1, 0, sizeof(e->_pad1));
	kt_submit(e, sizeof(*e));
	return 0;
}

/* Read a struct sockaddr_in/sockaddr_in6 as the tracepoint stored it. */
static __always_inline void kt_read_sockaddr(const __u8 *sa, __u8 *addr, __u16 *port, __u16 *family)
{
	__u16 be_port = 0;

	bpf_probe_read_kernel(family, sizeof(*family), sa);
	bpf_probe_read_kernel(&be_port, sizeof(be_port), sa + 2);
	*port = bpf_ntohs(be_port);
	if (*family == AF_INET6)
		bpf_probe_read_kernel(addr, KT_ADDR_LEN, sa + 8);
	else
		bpf_probe_read_kernel(addr, 4, sa + 4);
}

/* reset, alternative 1: the tcp tracepoints (v5.5 send/receive, v6.10 reason). */
SEC("tracepoint/tcp/tcp_send_reset")
int kt_rst_send_tp(struct trace_event_raw_tcp_send_reset *ctx)
{
	const struct sock *sk = ctx->skaddr;
	struct kt_tuple t = {};
	__u32 reason = 0;
	__u32 netns;

	/* saddr is the side that sends the reset, also when no socket matched */
	kt_read_sockaddr(ctx->saddr, t.saddr, &t.sport, &t.family);
	kt_read_sockaddr(ctx->daddr, t.daddr, &t.dport, &t.family);

	if (bpf_core_field_exists(ctx->reason))
		reason = BPF_CORE_READ(ctx, reason);
	if (sk) {
		netns = kt_sk_netns(sk);
	} else {
		/* no socket: the namespace the packet arrived in, not that of whoever is on the CPU */
		netns = BPF_CORE_READ((const struct sk_buff *)ctx->skbaddr, dev, nd_net.net, ns.inum);
		if (!netns)
			netns = BPF_CORE_READ((struct task_struct *)bpf_get_current_task(), nsproxy, net_ns, ns.inum);
	}
	return kt_emit_reset(sk, &t, reason, ctx->state, KT_RESET_SENT, netns);
}

SEC("tracepoint/tcp/tcp_receive_reset")
int kt_rst_recv_tp(struct trace_event_raw_tcp_event_sk *ctx)
{
	const struct sock *sk = ctx->skaddr;
	struct kt_tuple t = {};

	kt_sk_tuple(sk, &t);
	return kt_emit_reset(sk, &t, 0, BPF_CORE_READ(sk, __sk_common.skc_state), KT_RESET_RECEIVED, kt_sk_netns(sk));
}

/*
 * socket_owners: one pass over every task's open files when the window starts,
 * so sockets opened before it (long-lived connections, servers already
 * listening) are attributed to their owner rather than to whoever is on the
 * CPU. Runs after the other programs are attached; never overwrites an entry
 * they made.
 */
SEC("iter/task_file")
int kt_iter_socks(struct bpf_iter__task_file *ctx)
{
	struct task_struct *task = ctx->task;
	struct file *file = ctx->file;
	struct socket *sock;
	struct sock *sk;
	__u16 family, mode;
	__u8 state;

	if (!task || !file)
		return 0;
	mode = BPF_CORE_READ(file, f_inode, i_mode);
	if ((mode & 0170000) != 0140000)	/* S_IFSOCK */
		return 0;
	if (kt_self_tgid && BPF_CORE_READ(task, tgid) == kt_self_tgid)
		return 0;
	sock = BPF_CORE_READ(file, private_data);
	sk = BPF_CORE_READ(sock, sk);
	if (!sk || kt_sk_protocol(sk) != IPPROTO_TCP)
		return 0;
	family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (family != AF_INET && family != AF_INET6)
		return 0;
	state = BPF_CORE_READ(sk, __sk_common.skc_state);
	if (state == KT_TCP_LISTEN) {
		struct kt_listen_key key = {
			.netns = kt_sk_netns(sk),
			.port = BPF_CORE_READ(sk, __sk_common.skc_num),
		};
		struct kt_task owner = {};

		kt_fill_task(&owner, task);
		bpf_map_update_elem(&listeners, &key, &owner, BPF_NOEXIST);
	} else {
		__u64 key = (__u64)sk;
		struct kt_sock owner = {};
		struct kt_tuple t = {};

		kt_fill_task(&owner.task, task);
		kt_sk_tuple(sk, &t);
		owner.attribution = KT_ATTR_SOCKET_OWNER;
		owner.sampled = kt_sample_ports(t.sport, t.dport);
		bpf_map_update_elem(&sk_owner, &key, &owner, BPF_NOEXIST);
	}
	return 0;
}
