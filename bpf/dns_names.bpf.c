// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * dns_names probe family (--with-dns-names): the host names processes look up
 * through the libc resolver, with the result and the time the lookup took.
 *
 * A uprobe on each entry point (getaddrinfo, gethostbyname, gethostbyname2 and
 * their _r twins) copies the name and the start time into the lookups map; a
 * uretprobe on the same function emits one event when the call returns. The
 * sections are generic: user space attaches every program to each libc file it
 * finds (the host's and the ones containers map), by function name. Uprobes
 * belong to a file's inode, so every process mapping an attached libc, whenever
 * it starts, is covered. Resolvers that bypass libc (Go, static binaries, dig)
 * are not.
 *
 * Names cross the ring: this family is opt-in because it records them.
 */
#include "common.bpf.h"
#include "dns_names.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Anchors that put the event struct and enums into this object's BTF. */
struct kt_dns_lookup_event _kt_dns_lookup_event = {};
enum kt_kind _kt_kind = 0;
enum kt_family _kt_family = 0;
enum kt_lookup_function _kt_lookup_function = 0;
enum kt_dns_names_sizes _kt_dns_names_sizes = 0;

#define AF_UNSPEC 0

/*
 * A lookup entry older than this is left over from a call whose return was
 * never seen (the caller longjmp'ed out of it); a new call replaces it. Longer
 * than the slowest lookup glibc makes: 30 s with the default resolv.conf
 * (timeout 5 s, 2 attempts, 3 nameservers).
 */
#define KT_STALE_NS (120ULL * 1000000000ULL)
/* Two uprobes on the same call (one libc inode attached through two paths) run back to back. */
#define KT_TWIN_NS (10ULL * 1000000ULL)

/* A lookup in flight on one thread. */
struct kt_lookup {
	__u64 start_ns;		/* bpf_ktime_get_boot_ns() at the call */
	__u64 task_start;	/* task->start_time: tells a reused thread id from the caller */
	__u64 sp;		/* user stack pointer at the call: a call nested in it has a lower one */
	__u64 result;		/* struct hostent ** of the _r call (a user address), 0 if none */
	__u64 h_errnop;		/* int * of the _r call (a user address), 0 if none */
	__s32 h_errno;		/* as the nested _r call left it */
	__u16 family;
	__u8 function;		/* enum kt_lookup_function */
	__u8 depth;		/* resolver calls in flight inside this one */
	__u8 name[KT_NAME_LEN];
};

/*
 * Thread (pid_tgid) → the lookup it is in. Inserted by the entry uprobes,
 * deleted by the return uprobe of the same call. A thread that dies inside a
 * lookup leaves its entry behind: the LRU evicts it, and a new thread with the
 * same id replaces it (task_start differs). Sized by the loader.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct kt_lookup);
} lookups SEC(".maps");

/* Room to build a lookup off the 512-byte stack. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct kt_lookup);
} lookup_scratch SEC(".maps");

/*
 * Arguments 6 and 7 of a user function; bpf_tracing.h of libbpf 1.1 names only
 * 1 to 5. The x86-64 ABI passes six in registers and the seventh on the stack,
 * just above the return address; arm64 passes eight in registers.
 */
#if defined(__TARGET_ARCH_x86)
static __always_inline __u64 kt_uarg6(struct pt_regs *ctx)
{
	return ctx->r9;
}

static __always_inline __u64 kt_uarg7(struct pt_regs *ctx)
{
	__u64 v = 0;

	bpf_probe_read_user(&v, sizeof(v), (void *)(PT_REGS_SP(ctx) + 8));
	return v;
}
#elif defined(__TARGET_ARCH_arm64)
static __always_inline __u64 kt_uarg6(struct pt_regs *ctx)
{
	return ((struct user_pt_regs *)ctx)->regs[5];
}

static __always_inline __u64 kt_uarg7(struct pt_regs *ctx)
{
	return ((struct user_pt_regs *)ctx)->regs[6];
}
#else
#error "dns_names: arguments 6 and 7 are not known for this architecture"
#endif

/*
 * An address literal ("10.0.0.1", "::1", "fe80::1%eth0") is converted, not
 * looked up: programs pass them to getaddrinfo for every connection, so they are
 * counted as filtered instead of crossing the ring. A host name has no ':' and
 * at least one character other than digits and dots.
 */
static __always_inline bool kt_is_address(const __u8 *name)
{
	bool other = false;
	int i;

	for (i = 0; i < 64; i++) {
		__u8 c = name[i];

		if (c == 0)
			return i > 0 && !other;
		if (c == ':')
			return true;
		if ((c < '0' || c > '9') && c != '.')
			other = true;
	}
	return false;
}

static __always_inline int kt_lookup_enter(struct pt_regs *ctx, const char *name, __u16 family, __u8 function,
					   __u64 result, __u64 h_errnop)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u64 now = bpf_ktime_get_boot_ns();
	__u64 sp = PT_REGS_SP(ctx);
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u64 task_start = BPF_CORE_READ(task, start_time);
	struct kt_lookup *l;
	__u32 zero = 0;

	if (!name || kt_is_self())
		return 0;
	l = bpf_map_lookup_elem(&lookups, &id);
	if (l && l->task_start == task_start && now - l->start_ns < KT_STALE_NS) {
		if (sp < l->sp) {
			/*
			 * A resolver call inside the one in flight: glibc's and musl's
			 * gethostbyname2 call gethostbyname2_r (the exported symbol's
			 * address), and retry it with a bigger buffer on ERANGE. The outer
			 * call is the lookup; the inner one only leaves its h_errno.
			 */
			if (l->depth < 255)
				l->depth++;
			if (result) {
				l->result = result;
				l->h_errnop = h_errnop;
			}
			return 0;
		}
		if (sp == l->sp && l->function == function && now - l->start_ns < KT_TWIN_NS)
			return 0;	/* the same call, seen by a second uprobe on the same inode */
	}
	l = bpf_map_lookup_elem(&lookup_scratch, &zero);
	if (!l)
		return 0;
	l->start_ns = now;
	l->task_start = task_start;
	l->sp = sp;
	l->result = result;
	l->h_errnop = h_errnop;
	l->h_errno = 0;
	l->family = family;
	l->function = function;
	l->depth = 0;
	if (bpf_probe_read_user_str(l->name, sizeof(l->name), name) < 0)
		l->name[0] = 0;
	if (kt_is_address(l->name)) {
		kt_count(KT_FAMILY_DNS_NAMES, seen);
		kt_count(KT_FAMILY_DNS_NAMES, filtered);
		return 0;
	}
	bpf_map_update_elem(&lookups, &id, l, BPF_ANY);
	return 0;
}

/* h_errno of a returning _r call: 0 when it handed back a host entry (netdb.h values otherwise). */
static __always_inline __s32 kt_h_errno(const struct kt_lookup *l, int ret)
{
	__u64 hostent = 0;
	int h = 0;

	if (ret == 0 && l->result && bpf_probe_read_user(&hostent, sizeof(hostent), (void *)l->result) == 0 &&
	    hostent)
		return 0;
	if (l->h_errnop)
		bpf_probe_read_user(&h, sizeof(h), (void *)l->h_errnop);
	return h;
}

static __always_inline int kt_lookup_exit(struct pt_regs *ctx, __u8 function)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u64 rc = PT_REGS_RC(ctx);
	struct kt_dns_lookup_event *e;
	struct kt_lookup *l;

	l = bpf_map_lookup_elem(&lookups, &id);
	if (!l)
		return 0;	/* the call began before the window, or is ktrace's own */
	if (l->depth) {
		l->depth--;
		if (l->h_errnop)
			l->h_errno = kt_h_errno(l, (int)rc);
		return 0;
	}
	if (l->function != function) {
		/* a return without its call: the entry is stale */
		bpf_map_delete_elem(&lookups, &id);
		return 0;
	}
	kt_count(KT_FAMILY_DNS_NAMES, seen);
	e = kt_reserve_rare(KT_FAMILY_DNS_NAMES, KT_KIND_DNS_LOOKUP, sizeof(*e));
	if (e) {
		kt_fill_current(&e->task);
		e->latency_ns = e->hdr.ts_ns - l->start_ns;
		switch (function) {
		case KT_LOOKUP_GETADDRINFO:
			e->ret = (int)rc;
			e->h_errno = 0;
			break;
		case KT_LOOKUP_GETHOSTBYNAME_R:
		case KT_LOOKUP_GETHOSTBYNAME2_R:
			e->ret = (int)rc;
			e->h_errno = kt_h_errno(l, (int)rc);
			break;
		default:	/* gethostbyname, gethostbyname2: a struct hostent * */
			e->ret = rc ? 0 : -1;
			e->h_errno = rc ? 0 : l->h_errno;
			break;
		}
		e->family = l->family;
		e->function = function;
		__builtin_memset(e->_pad, 0, sizeof(e->_pad));
		__builtin_memcpy(e->name, l->name, sizeof(e->name));
		kt_submit_rare(e, sizeof(*e));
	}
	bpf_map_delete_elem(&lookups, &id);
	return 0;
}

/* int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res) */
SEC("uprobe")
int kt_gai_enter(struct pt_regs *ctx)
{
	const void *hints = (const void *)PT_REGS_PARM3(ctx);
	int family = AF_UNSPEC;

	/* struct addrinfo starts with int ai_flags, int ai_family on every Linux ABI */
	if (hints)
		bpf_probe_read_user(&family, sizeof(family), hints + 4);
	return kt_lookup_enter(ctx, (const char *)PT_REGS_PARM1(ctx), family, KT_LOOKUP_GETADDRINFO, 0, 0);
}

SEC("uretprobe")
int kt_gai_exit(struct pt_regs *ctx)
{
	return kt_lookup_exit(ctx, KT_LOOKUP_GETADDRINFO);
}

/* struct hostent *gethostbyname(const char *name): IPv4 only since glibc 2.26 dropped RES_USE_INET6 */
SEC("uprobe")
int kt_ghbn_enter(struct pt_regs *ctx)
{
	return kt_lookup_enter(ctx, (const char *)PT_REGS_PARM1(ctx), AF_INET, KT_LOOKUP_GETHOSTBYNAME, 0, 0);
}

SEC("uretprobe")
int kt_ghbn_exit(struct pt_regs *ctx)
{
	return kt_lookup_exit(ctx, KT_LOOKUP_GETHOSTBYNAME);
}

/* struct hostent *gethostbyname2(const char *name, int af) */
SEC("uprobe")
int kt_ghbn2_enter(struct pt_regs *ctx)
{
	return kt_lookup_enter(ctx, (const char *)PT_REGS_PARM1(ctx), (__u16)PT_REGS_PARM2(ctx),
			       KT_LOOKUP_GETHOSTBYNAME2, 0, 0);
}

SEC("uretprobe")
int kt_ghbn2_exit(struct pt_regs *ctx)
{
	return kt_lookup_exit(ctx, KT_LOOKUP_GETHOSTBYNAME2);
}

/*
 * int gethostbyname_r(const char *name, struct hostent *ret, char *buf, size_t buflen,
 *                     struct hostent **result, int *h_errnop)
 */
SEC("uprobe")
int kt_ghbn_r_enter(struct pt_regs *ctx)
{
	return kt_lookup_enter(ctx, (const char *)PT_REGS_PARM1(ctx), AF_INET, KT_LOOKUP_GETHOSTBYNAME_R,
			       PT_REGS_PARM5(ctx), kt_uarg6(ctx));
}

SEC("uretprobe")
int kt_ghbn_r_exit(struct pt_regs *ctx)
{
	return kt_lookup_exit(ctx, KT_LOOKUP_GETHOSTBYNAME_R);
}

/*
 * int gethostbyname2_r(const char *name, int af, struct hostent *ret, char *buf, size_t buflen,
 *                      struct hostent **result, int *h_errnop)
 */
SEC("uprobe")
int kt_ghbn2_r_enter(struct pt_regs *ctx)
{
	return kt_lookup_enter(ctx, (const char *)PT_REGS_PARM1(ctx), (__u16)PT_REGS_PARM2(ctx),
			       KT_LOOKUP_GETHOSTBYNAME2_R, kt_uarg6(ctx), kt_uarg7(ctx));
}

SEC("uretprobe")
int kt_ghbn2_r_exit(struct pt_regs *ctx)
{
	return kt_lookup_exit(ctx, KT_LOOKUP_GETHOSTBYNAME2_R);
}
