/* Instruction-count driver for `make perfcheck` (issue 7).
 *
 * Two nodes in one process over loopback UDP (no tap: --mode none, with a
 * counting write_local on the receiver).  After the link is up and the
 * sender's IP mapping has resolved, perf_measured() pushes PKTS IPv4/UDP
 * packets of SIZE bytes through ip_from_local on A, in bursts of BURST:
 * ip_from_local x BURST, link_tx_flush(A) (sendmmsg), then B's event loop
 * turns (recvmmsg, link_input, decrypt, ring routing, ip_on_packet,
 * ip_to_local) until the burst has been delivered.
 *
 * Run it under `valgrind --tool=callgrind --toggle-collect=perf_measured`
 * (tests/perfcheck.sh does): the Ir count of perf_measured divided by PKTS
 * is the user-space instructions per forwarded packet, send and receive
 * sides together.  Kernel work (the syscalls themselves) is not counted.
 * Without valgrind it just runs and prints what it delivered.
 *
 *   perf_fwd secure|insecure SIZE PKTS
 */
#include "../ipop.c"

#define BURST 16

static uint64_t delivered;

static int count_local(struct node *n, const uint8_t *pkt, size_t len)
{
	(void)n;
	(void)pkt;
	(void)len;
	delivered++;
	return 0;
}

static char dir[64];

static int node_up(struct node *n, uint32_t ip, const char *secret)
{
	char err[512];
	struct cli_opts o = { .cmd = CMD_UP, .n_listen = 1, .insecure = secret == NULL, .has_ip = true,
			      .ip = ip, .prefix = 16, .mode = MODE_NONE };
	o.listen[0] = (struct cli_uri){ PROTO_UDP, "127.0.0.1", 0 };
	if (secret)
		snprintf(o.secret_file, sizeof o.secret_file, "%s", secret);
	if (cli_node_init(n, &o, err, sizeof err) < 0) {
		fprintf(stderr, "perf_fwd: node init: %s\n", err);
		return -1;
	}
	n->ip.local = true;
	n->up.write_local = count_local;
	n->loop.max_wait_ms = 1;
	link_start(n);
	ring_start(n);
	return 0;
}

static void pump(struct node *a, struct node *b, int turns)
{
	for (int i = 0; i < turns; i++) {
		ev_run_once(&a->loop);          /* each ends its turn: link_turn_end */
		ev_run_once(&b->loop);
	}
}

static void make_packet(uint8_t *p, size_t size, uint32_t src, uint32_t dst)
{
	memset(p, 0xa5, size);
	ip_head_put(p, 0, size, IP_PROTOCOL_UDP, src, dst);
	struct wbuf w = wbuf_of(p + IP_HDR_MIN_BYTES, size - IP_HDR_MIN_BYTES);
	wbuf_u16(&w, 40000);               /* UDP: sport, dport, length, no checksum */
	wbuf_u16(&w, 9);
	wbuf_u16(&w, (uint16_t)(size - IP_HDR_MIN_BYTES));
	wbuf_u16(&w, 0);
}

/* One burst: BURST packets into A, flushed, delivered by B.  0 if all
 * arrived. */
static int fwd_burst(struct node *a, struct node *b, uint8_t *pkt, size_t size)
{
	uint64_t want = delivered + BURST;
	for (int i = 0; i < BURST; i++)
		ip_from_local(a, pkt, size, pkt);   /* room before it, as lwIP's output leaves */
	link_tx_flush(a);
	for (int t = 0; t < 50 && delivered < want; t++)
		ev_run_once(&b->loop);
	link_tx_flush(b);
	return delivered == want ? 0 : -1;
}

/* What callgrind counts (--toggle-collect=perf_measured). */
int perf_measured(struct node *a, struct node *b, uint8_t *pkt, size_t size, int bursts);
__attribute__((noipa)) int perf_measured(struct node *a, struct node *b, uint8_t *pkt,
					  size_t size, int bursts)
{
	int lost = 0;
	for (int i = 0; i < bursts; i++)
		lost += fwd_burst(a, b, pkt, size) < 0;
	return lost;
}

int main(int argc, char **argv)
{
	static struct node a, b;
	static uint8_t buf[WIRE_ROUTED_ROOM_BYTES + 2000], *pkt = buf + WIRE_ROUTED_ROOM_BYTES;
	if (argc != 4 || (strcmp(argv[1], "secure") && strcmp(argv[1], "insecure"))) {
		fprintf(stderr, "usage: perf_fwd secure|insecure SIZE PKTS\n");
		return 2;
	}
	bool secure = !strcmp(argv[1], "secure");
	size_t size = (size_t)atoi(argv[2]);
	int bursts = atoi(argv[3]) / BURST;
	if (size < 28 || size > IP_MTU_DEFAULT || bursts < 1) {
		fprintf(stderr, "perf_fwd: SIZE 28..1360, PKTS >= %d\n", BURST);
		return 2;
	}
	log_cfg.level = LOG_ERROR;
	const char *key = NULL;
	char keyp[128];
	if (secure) {
		snprintf(dir, sizeof dir, "/tmp/ipop-perf-XXXXXX");
		if (!mkdtemp(dir))
			return 1;
		snprintf(keyp, sizeof keyp, "%s/net.key", dir);
		FILE *f = fopen(keyp, "w");
		fprintf(f, "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n");
		fclose(f);
		chmod(keyp, 0600);
		key = keyp;
	}
	uint32_t ip_a = 0x0a800001u, ip_b = 0x0a800002u;
	if (node_up(&a, ip_a, key) < 0 || node_up(&b, ip_b, key) < 0)
		return 1;
	if (key) {
		unlink(keyp);
		rmdir(dir);
	}
	link_dial(&a, &b.self.endpoints[0], &b.self.addr, 0, NULL);
	for (int i = 0; i < 2000 && !(link_find_peer(&a, &b.self.addr, true) &&
				      link_find_peer(&b, &a.self.addr, true)); i++)
		pump(&a, &b, 1);
	pump(&a, &b, 50);
	make_packet(pkt, size, ip_a, ip_b);
	/* The first packet resolves B's IP through the DHT; wait for it. */
	for (int i = 0; i < 2000 && delivered == 0; i++) {
		if (i % 100 == 0)
			ip_from_local(&a, pkt, size, NULL);
		pump(&a, &b, 1);
	}
	if (!delivered) {
		fprintf(stderr, "perf_fwd: no packet delivered (link %s, mapping %s)\n",
			link_find_peer(&a, &b.self.addr, true) ? "up" : "down",
			ip_map_find(&a, ip_b) ? "present" : "absent");
		return 1;
	}
	pump(&a, &b, 20);
	int lost = 0;
	for (int i = 0; i < 20; i++)                       /* warm up caches and pools */
		lost += fwd_burst(&a, &b, pkt, size) < 0;
	uint64_t d0 = delivered;
	lost += perf_measured(&a, &b, pkt, size, bursts);
	uint64_t got = delivered - d0;
	printf("perf_fwd: %s size %zu: %llu of %d packets delivered, %d short bursts\n",
	       secure ? "secure" : "insecure", size, (unsigned long long)got, bursts * BURST, lost);
	cli_node_free(&a);
	cli_node_free(&b);
	return got == (uint64_t)bursts * BURST ? 0 : 1;
}
