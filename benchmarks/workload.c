/*
 * Loopback socket churn for the ktrace overhead benchmark.
 *
 *   wl tcp N [-t SEC] [-r RATE]   N cycles of: connect / accept / server
 *                                 writes 8 bytes / server closes / client
 *                                 reads to EOF / client closes (ten TCP
 *                                 state changes).
 *   wl udp N [-t SEC] [-r RATE]   N round trips of a 32-byte datagram
 *                                 (sendto/recvfrom both ways); fires no TCP
 *                                 state changes (a control).
 *
 * One thread, 127.0.0.1 only. The server closes first so TIME_WAIT stays on
 * the server side (local port = the listening port) and the client's ephemeral
 * ports are free again at once. Stops after N operations or SEC seconds
 * (default 60), whichever comes first.
 *
 * Unpaced (no -r) it runs flat out. With -r it offers RATE operations per
 * second: operation i is due at start + i / RATE, and after each batch of a
 * millisecond's worth of operations it sleeps to the next one's due time
 * (clock_nanosleep to an absolute deadline, so sleeping late or running slow
 * never shifts the schedule; behind it, it runs without sleeping until it has
 * caught up).
 *
 * The last line printed is "ops_per_s=R done=D port=P elapsed_s=T": the rate
 * achieved, the operations done, the server's port (the one every TCP state
 * change of the run carries) and the run time.
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
#define BATCH_S 0.001 /* paced: sleep once per millisecond's worth of operations */

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

/* Paced runs: operations per sleep, and the offered rate (0: unpaced). */
struct pace {
	double rate;
	long batch;
	double start;
};

static struct pace pace_for(double rate, double start)
{
	struct pace p = { rate, 1, start };

	if (rate > 0 && rate * BATCH_S > 1)
		p.batch = (long)(rate * BATCH_S);
	return p;
}

/* Called before operation i: sleeps until it is due, once per batch. */
static void pace_wait(const struct pace *p, long i)
{
	struct timespec due;
	double t;
	int err;

	if (p->rate <= 0 || i == 0 || i % p->batch != 0)
		return;
	t = p->start + i / p->rate;
	due.tv_sec = (time_t)t;
	due.tv_nsec = (long)((t - due.tv_sec) * 1e9);
	do
		err = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &due, NULL);
	while (err == EINTR);
	if (err) {
		errno = err;
		die("clock_nanosleep");
	}
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

static long run_tcp(long n, double deadline, const struct pace *p, int *port)
{
	struct sockaddr_in srv;
	int lfd = bound_socket(SOCK_STREAM, &srv);
	long i;

	if (listen(lfd, 128) < 0)
		die("listen");
	*port = ntohs(srv.sin_port);
	for (i = 0; i < n; i++) {
		if (i % TIME_CHECK_EVERY == 0 && now() > deadline)
			break;
		pace_wait(p, i);
		tcp_cycle(lfd, &srv);
	}
	close(lfd);
	return i;
}

static long run_udp(long n, double deadline, const struct pace *p, int *port)
{
	struct sockaddr_in srv, cli;
	int sfd = bound_socket(SOCK_DGRAM, &srv);
	int cfd = bound_socket(SOCK_DGRAM, &cli);
	long i;

	*port = ntohs(srv.sin_port);
	for (i = 0; i < n; i++) {
		if (i % TIME_CHECK_EVERY == 0 && now() > deadline)
			break;
		pace_wait(p, i);
		udp_round_trip(cfd, sfd, &srv);
	}
	close(cfd);
	close(sfd);
	return i;
}

static void usage(const char *prog)
{
	fprintf(stderr, "usage: %s tcp|udp N [-t SEC] [-r RATE]\n", prog);
	exit(2);
}

static double positive(const char *arg, const char *prog)
{
	char *end;
	double v = strtod(arg, &end);

	if (*end || !(v > 0))
		usage(prog);
	return v;
}

int main(int argc, char **argv)
{
	double cap = 60, rate = 0, start, elapsed;
	struct pace p;
	long n, done;
	int port = 0, i;
	char *end;

	if (argc < 3 || argc % 2 == 0)
		usage(argv[0]);
	n = strtol(argv[2], &end, 10);
	if (*end || n <= 0)
		usage(argv[0]);
	for (i = 3; i < argc; i += 2) {
		if (strcmp(argv[i], "-t") == 0)
			cap = positive(argv[i + 1], argv[0]);
		else if (strcmp(argv[i], "-r") == 0)
			rate = positive(argv[i + 1], argv[0]);
		else
			usage(argv[0]);
	}

	start = now();
	p = pace_for(rate, start);
	if (strcmp(argv[1], "tcp") == 0)
		done = run_tcp(n, start + cap, &p, &port);
	else if (strcmp(argv[1], "udp") == 0)
		done = run_udp(n, start + cap, &p, &port);
	else
		usage(argv[0]);
	elapsed = now() - start;

	printf("%s: %ld of %ld ops in %.3f s%s\n", argv[1], done, n, elapsed,
	       done < n ? " (time cap reached)" : "");
	printf("ops_per_s=%.1f done=%ld port=%d elapsed_s=%.6f\n",
	       elapsed > 0 ? done / elapsed : 0.0, done, port, elapsed);
	return 0;
}
