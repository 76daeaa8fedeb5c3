/*
 * Loopback socket churn for the ktrace overhead benchmark.
 *
 *   wl tcp N [-t SEC]   N cycles of: connect / accept / server writes 8 bytes /
 *                       server closes / client reads to EOF / client closes.
 *   wl udp N [-t SEC]   N round trips of a 32-byte datagram (sendto/recvfrom
 *                       both ways); fires no TCP state changes (a control).
 *
 * One thread, 127.0.0.1 only. The server closes first so TIME_WAIT stays on
 * the server side (local port = the listening port) and the client's ephemeral
 * ports are free again at once. Stops after N operations or SEC seconds
 * (default 60), whichever comes first. The last line printed is the rate in
 * operations (cycles or round trips) per second.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define TIME_CHECK_EVERY 64

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static struct sockaddr_in loopback(void)
{
	struct sockaddr_in a;

	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return a;
}

/* Bind to 127.0.0.1 on a kernel-chosen port; returns the fd, fills *addr. */
static int bound_socket(int type, struct sockaddr_in *addr)
{
	socklen_t len = sizeof(*addr);
	int fd = socket(AF_INET, type | SOCK_CLOEXEC, 0);

	if (fd < 0)
		die("socket");
	*addr = loopback();
	if (bind(fd, (struct sockaddr *)addr, sizeof(*addr)) < 0)
		die("bind");
	if (getsockname(fd, (struct sockaddr *)addr, &len) < 0)
		die("getsockname");
	return fd;
}

static void tcp_cycle(int lfd, const struct sockaddr_in *srv)
{
	static const char msg[8] = "ktrace\n";
	char buf[64];
	ssize_t n;
	int cfd, sfd;

	cfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (cfd < 0)
		die("socket");
	if (connect(cfd, (const struct sockaddr *)srv, sizeof(*srv)) < 0)
		die("connect");
	sfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
	if (sfd < 0)
		die("accept");
	if (write(sfd, msg, sizeof(msg)) != (ssize_t)sizeof(msg))
		die("write");
	close(sfd);
	do {
		n = read(cfd, buf, sizeof(buf));
	} while (n > 0 || (n < 0 && errno == EINTR));
	if (n < 0)
		die("read");
	close(cfd);
}

static void udp_round_trip(int cfd, int sfd, const struct sockaddr_in *srv)
{
	char out[32], in[64];
	struct sockaddr_in from;
	socklen_t len = sizeof(from);

	memset(out, 'k', sizeof(out));
	if (sendto(cfd, out, sizeof(out), 0, (const struct sockaddr *)srv, sizeof(*srv)) != sizeof(out))
		die("sendto");
	if (recvfrom(sfd, in, sizeof(in), 0, (struct sockaddr *)&from, &len) != sizeof(out))
		die("recvfrom");
	if (sendto(sfd, in, sizeof(out), 0, (struct sockaddr *)&from, len) != sizeof(out))
		die("sendto");
	if (recvfrom(cfd, in, sizeof(in), 0, NULL, NULL) != sizeof(out))
		die("recvfrom");
}

static long run_tcp(long n, double deadline)
{
	struct sockaddr_in srv;
	int lfd = bound_socket(SOCK_STREAM, &srv);
	long i;

	if (listen(lfd, 128) < 0)
		die("listen");
	for (i = 0; i < n; i++) {
		if (i % TIME_CHECK_EVERY == 0 && now() > deadline)
			break;
		tcp_cycle(lfd, &srv);
	}
	close(lfd);
	return i;
}

static long run_udp(long n, double deadline)
{
	struct sockaddr_in srv, cli;
	int sfd = bound_socket(SOCK_DGRAM, &srv);
	int cfd = bound_socket(SOCK_DGRAM, &cli);
	long i;

	for (i = 0; i < n; i++) {
		if (i % TIME_CHECK_EVERY == 0 && now() > deadline)
			break;
		udp_round_trip(cfd, sfd, &srv);
	}
	close(cfd);
	close(sfd);
	return i;
}

static void usage(const char *prog)
{
	fprintf(stderr, "usage: %s tcp|udp N [-t SEC]\n", prog);
	exit(2);
}

int main(int argc, char **argv)
{
	double cap = 60, start, elapsed;
	long n, done;
	char *end;

	if (argc != 3 && !(argc == 5 && strcmp(argv[3], "-t") == 0))
		usage(argv[0]);
	n = strtol(argv[2], &end, 10);
	if (*end || n <= 0)
		usage(argv[0]);
	if (argc == 5) {
		cap = strtod(argv[4], &end);
		if (*end || cap <= 0)
			usage(argv[0]);
	}

	start = now();
	if (strcmp(argv[1], "tcp") == 0)
		done = run_tcp(n, start + cap);
	else if (strcmp(argv[1], "udp") == 0)
		done = run_udp(n, start + cap);
	else
		usage(argv[0]);
	elapsed = now() - start;

	printf("%s: %ld of %ld ops in %.3f s%s\n", argv[1], done, n, elapsed,
	       done < n ? " (time cap reached)" : "");
	printf("%.1f\n", elapsed > 0 ? done / elapsed : 0.0);
	return 0;
}
