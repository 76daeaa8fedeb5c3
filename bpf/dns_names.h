/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* dns_names event family: host name lookups through the libc resolver. */
#ifndef KTRACE_DNS_NAMES_H
#define KTRACE_DNS_NAMES_H

#include "common.h"

enum kt_dns_names_sizes {
	KT_NAME_LEN = 256,	/* a DNS name has at most 253 characters; longer names are cut */
};

/* The libc entry point a lookup went through. */
enum kt_lookup_function {
	KT_LOOKUP_GETADDRINFO = 1,
	KT_LOOKUP_GETHOSTBYNAME = 2,
	KT_LOOKUP_GETHOSTBYNAME2 = 3,
	KT_LOOKUP_GETHOSTBYNAME_R = 4,
	KT_LOOKUP_GETHOSTBYNAME2_R = 5,
};

/*
 * One name lookup by a process, from the call into libc to its return. The task
 * block is the calling thread (attribution current).
 *
 * ret is what the function returned:
 *   getaddrinfo                       0 or an EAI_* code (negative, netdb.h)
 *   gethostbyname_r, gethostbyname2_r 0 or an errno (ERANGE, EAGAIN); 0 also when the name was not found
 *   gethostbyname, gethostbyname2     0 when it returned a host entry, -1 when it returned NULL
 * h_errno completes it for the gethostbyname family: 0 when a host entry came
 * back, otherwise the h_errno the call left (netdb.h: -1 NETDB_INTERNAL,
 * 1 HOST_NOT_FOUND, 2 TRY_AGAIN, 3 NO_RECOVERY, 4 NO_DATA), 0 when unknown.
 */
struct kt_dns_lookup_event {
	struct kt_hdr hdr;	/* ts_ns: when the call returned */
	struct kt_task task;
	__u64 latency_ns;	/* from the call to its return */
	__s32 ret;
	__s32 h_errno;		/* gethostbyname family only; 0 for getaddrinfo */
	__u16 family;		/* requested address family: AF_INET, AF_INET6 or AF_UNSPEC (0) */
	__u8 function;		/* enum kt_lookup_function */
	__u8 _pad[5];
	__u8 name[KT_NAME_LEN];	/* the name asked for, NUL-terminated */
};
_Static_assert(sizeof(struct kt_dns_lookup_event) == 392, "kt_dns_lookup_event layout");

#endif /* KTRACE_DNS_NAMES_H */
