/* kit_flood: a handshake flood from an outsider (issue 18, item 4).
 *
 * It holds what an outsider may hold: a certificate network's public
 * ca.crt (and, to play a member's leaked file, its network.key), or a
 * secret network's secret file.  From many UDP source ports, optionally on
 * many source IPs, it asks each port's cookie with a cookie-less HS_INIT,
 * then sends HS_INITs with that cookie and a fresh sender index each, at a
 * given total rate, all built by ipop's own encoders and mac1.  It never
 * answers an HS_RESP, so every link it makes the target start stays half
 * open.  At the end it prints one line: what it sent, what came back, and
 * how many HS_RESPs repeated one already received for the same index
 * (the attacker never retransmits, so those were resent unasked).
 *
 *   kit_flood --to IP:PORT (--secret-file F | --ca-crt F [--admission F])
 *             [--rate N] [--seconds S] [--linger S] [--ports N] [--src IP]...
 */
#include "../ipop.c"
#include <sys/resource.h>

enum { KIT_PORTS_MAX = 1024, KIT_SRC_MAX = 64 };

struct kit_sock {
	int fd;
	uint8_t cookie[SEC_MAC_BYTES];
	bool has_cookie;
};

struct kit {
	struct sec_creds sec;
	struct sec_rng rng;
	uint8_t e[32];
	struct sockaddr_in to;
	struct kit_sock socks[KIT_PORTS_MAX];
	unsigned n_socks;
	uint32_t next_idx;              /* sender indices 1, 2, ...: one per HS_INIT */
	uint8_t *answered;              /* a bit per sender index that got an HS_RESP */
	uint32_t idx_cap;
	uint64_t sent, sent_cookie, cookies, resps, resp_repeats, rejects, other;
};

static void kit_usage(void)
{
	fprintf(stderr, "usage: kit_flood --to IP:PORT (--secret-file F | --ca-crt F [--admission F])\n"
			"                 [--rate N] [--seconds S] [--linger S] [--ports N] [--src IP]...\n");
	exit(2);
}

static uint64_t kit_now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static int kit_creds(struct kit *k, const char *secret, const char *ca, const char *admission)
{
	char err[400];
	if (sec_rng_init(&k->rng) < 0 || sec_creds_init(&k->sec) < 0)
		return -1;
	int rc;
	if (secret)
		rc = sec_load_secret(&k->sec, secret, err, sizeof err);
	else
		rc = sec_parse_pem(ca, false, &k->sec.ctx->ca, NULL, &k->rng, err, sizeof err) < 0 ? -1 :
		     sec_cert_keys(&k->sec, admission, err, sizeof err);
	if (rc < 0) {
		fprintf(stderr, "kit_flood: %s\n", err);
		return -1;
	}
	uint8_t priv[32];
	return sec_x25519_keypair(&k->sec, &k->rng, priv, k->e);
}

static int kit_socket(const char *src)
{
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	struct sockaddr_in sa = { .sin_family = AF_INET };
	int big = 1 << 20;
	if (fd < 0 || inet_pton(AF_INET, src, &sa.sin_addr) != 1 ||
	    bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
		fprintf(stderr, "kit_flood: cannot bind a UDP socket to %s: %s\n", src, strerror(errno));
		exit(1);
	}
	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
	return fd;
}

/* One HS_INIT from s: with its cookie when it has one (that is the flood),
 * else without (asking for one). */
static void kit_send_init(struct kit *k, struct kit_sock *s)
{
	struct wire_hs_init m = { .sender = ++k->next_idx, .mode = (uint8_t)k->sec.mode };
	memcpy(m.e, k->e, 32);
	if (s->has_cookie)
		memcpy(m.cookie, s->cookie, SEC_MAC_BYTES);
	uint8_t pkt[WIRE_HS_INIT_BYTES];
	if (wire_hs_init_encode(pkt, sizeof pkt, &m) != WIRE_HS_INIT_BYTES)
		abort();
	sec_mac1(&k->sec, pkt, WIRE_HS_INIT_MAC1_OFFSET, pkt + WIRE_HS_INIT_MAC1_OFFSET);
	if (sendto(s->fd, pkt, sizeof pkt, 0, (struct sockaddr *)&k->to, sizeof k->to) == (ssize_t)sizeof pkt) {
		k->sent++;
		k->sent_cookie += s->has_cookie;
	}
}

static void kit_on_resp(struct kit *k, const uint8_t *p, size_t len)
{
	struct wire_hs_resp r;
	if (wire_hs_resp_decode(p, len, &r) < 0 || r.receiver == 0 || r.receiver > k->next_idx) {
		k->other++;
		return;
	}
	k->resps++;
	if (r.receiver >= k->idx_cap)
		return;
	uint8_t bit = (uint8_t)(1u << (r.receiver & 7));
	if (k->answered[r.receiver >> 3] & bit)
		k->resp_repeats++;
	k->answered[r.receiver >> 3] |= bit;
}

static void kit_receive(struct kit *k, struct kit_sock *s)
{
	uint8_t p[2048];
	ssize_t n;
	while ((n = recv(s->fd, p, sizeof p, 0)) > 0) {
		struct wire_hs_cookie c;
		if (n < 2 || p[0] != WIRE_VERSION) {
			k->other++;
		} else if (p[1] == WIRE_HS_COOKIE && wire_hs_cookie_decode(p, (size_t)n, &c) == 0) {
			k->cookies++;
			memcpy(s->cookie, c.cookie, SEC_MAC_BYTES);
			s->has_cookie = true;
		} else if (p[1] == WIRE_HS_RESP) {
			kit_on_resp(k, p, (size_t)n);
		} else if (p[1] == WIRE_HS_REJECT) {
			k->rejects++;
		} else {
			k->other++;
		}
	}
}

int main(int argc, char **argv)
{
	static struct kit k;
	const char *secret = NULL, *ca = NULL, *admission = NULL, *src[KIT_SRC_MAX];
	unsigned n_src = 0, ports = 64;
	double rate = 2000, seconds = 5, linger = 1;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (!v)
			kit_usage();
		i++;
		if (!strcmp(a, "--to")) {
			char ip[32];
			unsigned port;
			if (sscanf(v, "%31[0-9.]:%u", ip, &port) != 2 || inet_pton(AF_INET, ip, &k.to.sin_addr) != 1)
				kit_usage();
			k.to.sin_family = AF_INET;
			k.to.sin_port = htons((uint16_t)port);
		} else if (!strcmp(a, "--secret-file")) {
			secret = v;
		} else if (!strcmp(a, "--ca-crt")) {
			ca = v;
		} else if (!strcmp(a, "--admission")) {
			admission = v;
		} else if (!strcmp(a, "--rate")) {
			rate = atof(v);
		} else if (!strcmp(a, "--linger")) {
			linger = atof(v);
		} else if (!strcmp(a, "--seconds")) {
			seconds = atof(v);
		} else if (!strcmp(a, "--ports")) {
			ports = (unsigned)atoi(v);
		} else if (!strcmp(a, "--src") && n_src < KIT_SRC_MAX) {
			src[n_src++] = v;
		} else {
			kit_usage();
		}
	}
	if (!k.to.sin_port || !!secret == !!ca || rate <= 0 || seconds <= 0 || !ports || ports > KIT_PORTS_MAX)
		kit_usage();
	if (!n_src)
		src[n_src++] = "0.0.0.0";
	if (kit_creds(&k, secret, ca, admission) < 0)
		return 1;
	k.idx_cap = (uint32_t)(rate * seconds) + ports + 1024;
	k.answered = calloc(k.idx_cap / 8 + 1, 1);
	int ep = epoll_create1(EPOLL_CLOEXEC);
	for (unsigned i = 0; i < ports; i++) {
		k.socks[i].fd = kit_socket(src[i % n_src]);
		struct epoll_event ev = { .events = EPOLLIN, .data.u32 = i };
		epoll_ctl(ep, EPOLL_CTL_ADD, k.socks[i].fd, &ev);
	}
	k.n_socks = ports;
	uint64_t t0 = kit_now_us(), end = t0 + (uint64_t)(seconds * 1e6), rr = 0;
	/* Send what the rate owes, then wait at most 1 ms for answers.  The
	 * last `linger` seconds only listen: answers to the last HS_INITs, and
	 * resends. */
	for (uint64_t now = t0; now < end + (uint64_t)(linger * 1e6); now = kit_now_us()) {
		uint64_t owed = now < end ? (uint64_t)((double)(now - t0) * rate / 1e6) : k.sent;
		while (k.sent < owed && k.next_idx + 1 < k.idx_cap)
			kit_send_init(&k, &k.socks[rr++ % k.n_socks]);
		struct epoll_event evs[64];
		int n = epoll_wait(ep, evs, 64, 1);
		for (int i = 0; i < n; i++)
			kit_receive(&k, &k.socks[evs[i].data.u32]);
	}
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	double cpu = (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
		     (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
	printf("kit_flood: sent=%llu with_cookie=%llu rate=%.0f/s seconds=%.1f ports=%u ips=%u "
	       "cookies=%llu resp=%llu resp_repeats=%llu rejects=%llu other=%llu cpu_s=%.2f\n",
	       (unsigned long long)k.sent, (unsigned long long)k.sent_cookie, (double)k.sent / seconds,
	       seconds, ports, n_src, (unsigned long long)k.cookies, (unsigned long long)k.resps,
	       (unsigned long long)k.resp_repeats, (unsigned long long)k.rejects, (unsigned long long)k.other, cpu);
	return 0;
}
