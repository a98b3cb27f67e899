/* Unit tests for ipop's core: SHA-1 addressing, ring arithmetic, byte
 * cursors, the wire codec (round trips, every truncation, corrupted lengths),
 * the timer heap, config parsing, greedy next-hop choice, the contents list,
 * and two link engines handshaking back to back over loopback UDP. */
#include "../ipop.c"

static int t_pass, t_fail;

#define CHECK(cond) do { \
	if (cond) t_pass++; \
	else { t_fail++; fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); } \
} while (0)

static ring_addr addr_hex(const char *h)
{
	ring_addr a;
	if (!buf_unhex(h, a.b, RING_ADDR_BYTES))
		abort();
	return a;
}

static ring_addr addr_small(uint64_t v)
{
	ring_addr a = { { 0 } };
	for (int i = 0; i < 8; i++)
		a.b[RING_ADDR_BYTES - 1 - i] = (uint8_t)(v >> (8 * i));
	return a;
}

static ring_addr addr_top(uint8_t top)
{
	ring_addr a = { { 0 } };
	a.b[0] = top;
	return a;
}

static void test_sha1(void)
{
	static const struct { const char *ip; const char *hex; } v[] = {
		{ "10.128.0.5", "cc3cb7928471fdac73442a52cf6370d4f1fe4fb6" },
		{ "10.1.0.1", "b3cf76b83ffb850d78947216d759bb6688f149d4" },
		{ "192.168.1.1", "af46278784e183e2ec818b0286c11602701fc30c" },
	};
	uint8_t d[20];
	sec_sha1("abc", 3, d);
	ring_addr abc;
	memcpy(abc.b, d, 20);
	ring_addr want = addr_hex("a9993e364706816aba3e25717850c26c9cd0d89d");
	CHECK(wire_addr_eq(&abc, &want));
	for (unsigned i = 0; i < ARRAY_LEN(v); i++) {
		ring_addr a, b = addr_hex(v[i].hex);
		CHECK(ctl_parse_target(v[i].ip, &a) == 0);
		CHECK(wire_addr_eq(&a, &b));
		CHECK(ctl_parse_target(v[i].hex, &a) == 0 && wire_addr_eq(&a, &b));
	}
	ring_addr a;
	CHECK(ctl_parse_target("10.1.2", &a) < 0);
	CHECK(ctl_parse_target("zz3cb7928471fdac73442a52cf6370d4f1fe4fb6", &a) < 0);
	CHECK(ctl_parse_target("cc3cb7928471fdac73442a52cf6370d4f1fe4f", &a) < 0);
}

static void test_ring_arith(void)
{
	ring_addr zero = { { 0 } }, one = ring_one(), max;
	memset(max.b, 0xff, 20);
	ring_addr r = ring_add(&max, &one);
	CHECK(wire_addr_eq(&r, &zero));                    /* wraps at 2^160 */
	r = ring_sub(&zero, &one);
	CHECK(wire_addr_eq(&r, &max));
	ring_addr a = addr_small(10), b = addr_small(250);
	ring_addr d = ring_cw(&a, &b), want = addr_small(240);
	CHECK(wire_addr_eq(&d, &want));
	d = ring_cw(&b, &a);                               /* the long way round */
	ring_addr back = ring_add(&d, &want);
	CHECK(wire_addr_eq(&back, &zero));
	d = ring_dist(&a, &b);
	CHECK(wire_addr_eq(&d, &want));
	d = ring_dist(&b, &a);
	CHECK(wire_addr_eq(&d, &want));                    /* symmetric */
	/* Across zero: max and 5 are 6 apart. */
	ring_addr five = addr_small(5), six = addr_small(6);
	d = ring_dist(&max, &five);
	CHECK(wire_addr_eq(&d, &six));
	ring_addr eleven = addr_small(11), three = addr_small(3);
	CHECK(ring_between(&a, &eleven, &b));
	CHECK(!ring_between(&a, &a, &b));
	CHECK(!ring_between(&a, &b, &b));
	CHECK(ring_between(&max, &zero, &five));           /* the arc wraps */
	CHECK(!ring_between(&five, &three, &b));
	/* Metrics: SUCC of 100 prefers 120 over 90; PRED the other way. */
	ring_addr t = addr_small(100), x90 = addr_small(90), x120 = addr_small(120);
	ring_addr m90 = ring_metric(MODE_SUCC, &x90, &t), m120 = ring_metric(MODE_SUCC, &x120, &t);
	CHECK(wire_addr_cmp(&m120, &m90) < 0);
	m90 = ring_metric(MODE_PRED, &x90, &t);
	m120 = ring_metric(MODE_PRED, &x120, &t);
	CHECK(wire_addr_cmp(&m90, &m120) < 0);
	m90 = ring_metric(MODE_NEAREST, &x90, &t);
	m120 = ring_metric(MODE_NEAREST, &x120, &t);
	CHECK(wire_addr_cmp(&m90, &m120) < 0);
	ring_addr half = addr_top(0x80);
	CHECK(ring_fraction(&half) == 0.5);
	CHECK(ring_far_target(4) == 0);
	CHECK(ring_far_target(64) == 3);
	CHECK(ring_far_target(1e6) == 10);
}

static void test_buf(void)
{
	static const uint8_t in[] = { 1, 2, 3, 4, 5, 6, 7 };
	struct buf b = buf_of(in, sizeof in);
	CHECK(buf_u16(&b) == 0x0102);
	CHECK(buf_u32(&b) == 0x03040506);
	CHECK(!b.bad);
	CHECK(buf_u16(&b) == 0);                           /* one byte left: short */
	CHECK(b.bad);
	CHECK(buf_u8(&b) == 0);                            /* sticky */
	uint8_t out[4];
	struct wbuf w = wbuf_of(out, sizeof out);
	wbuf_u32(&w, 0xdeadbeef);
	CHECK(wbuf_done(&w) == 4 && out[0] == 0xde && out[3] == 0xef);
	wbuf_u8(&w, 1);
	CHECK(wbuf_done(&w) == -1);
	char hex[9];
	buf_hex(out, 4, hex);
	CHECK(!strcmp(hex, "deadbeef"));
	uint8_t back[4];
	CHECK(buf_unhex("DEADbeef", back, 4) && !memcmp(back, out, 4));
	CHECK(!buf_unhex("deadbee", back, 4));
	CHECK(!buf_unhex("deadbeeg", back, 4));
}

/* Decode every proper prefix of a valid packet (all must fail), the packet
 * plus a trailing byte (must fail), and the packet itself (must pass). */
typedef int decode_fn(const uint8_t *p, size_t len);

static void check_truncations(decode_fn *dec, const uint8_t *pkt, size_t len)
{
	uint8_t tmp[WIRE_MAX_PACKET_BYTES + 1];
	int bad = 0;
	for (size_t i = 0; i < len; i++) {
		memcpy(tmp, pkt, i);
		bad += dec(tmp, i) == 0;
	}
	CHECK(bad == 0);
	memcpy(tmp, pkt, len);
	tmp[len] = 0;
	CHECK(dec(tmp, len + 1) < 0);
	CHECK(dec(tmp, len) == 0);
}

static int dec_hello(const uint8_t *p, size_t len)
{
	struct wire_hello h;
	return wire_hello_decode(p, len, &h);
}

static int dec_routed(const uint8_t *p, size_t len)
{
	struct wire_routed r;
	return wire_routed_decode(p, len, &r);
}

static int dec_ctm_req(const uint8_t *p, size_t len)
{
	struct wire_ctm_req m;
	return wire_ctm_req_decode(p, len, &m);
}

static int dec_ctm_reply(const uint8_t *p, size_t len)
{
	struct wire_ctm_reply m;
	return wire_ctm_reply_decode(p, len, &m);
}

static int dec_ping(const uint8_t *p, size_t len)
{
	struct wire_ping m;
	return wire_ping_decode(p, len, &m);
}

static int dec_echo_reply(const uint8_t *p, size_t len)
{
	struct wire_echo m;
	return wire_echo_decode(p, len, true, &m);
}

static struct peer_info sample_info(uint8_t seed, uint8_t n_ep)
{
	struct peer_info pi = { .vip = 0x0a800005u + seed, .n_endpoints = n_ep };
	for (int i = 0; i < RING_ADDR_BYTES; i++)
		pi.addr.b[i] = (uint8_t)(seed * 7 + i);
	for (uint8_t i = 0; i < n_ep; i++)
		pi.endpoints[i] = (struct endpoint){ i % 2 ? PROTO_TCP : PROTO_UDP, 0x7f000001u + i,
						     (uint16_t)(4000 + i) };
	return pi;
}

static bool info_eq(const struct peer_info *a, const struct peer_info *b)
{
	if (!wire_addr_eq(&a->addr, &b->addr) || a->vip != b->vip || a->n_endpoints != b->n_endpoints)
		return false;
	for (unsigned i = 0; i < a->n_endpoints; i++)
		if (a->endpoints[i].proto != b->endpoints[i].proto || a->endpoints[i].ip != b->endpoints[i].ip ||
		    a->endpoints[i].port != b->endpoints[i].port)
			return false;
	return true;
}

static void test_wire_hello(void)
{
	uint8_t pkt[WIRE_MAX_PACKET_BYTES], auth[5] = { 1, 2, 3, 4, 5 };
	struct wire_hello h = { .nonce = 0x0102030405060708ull, .info = sample_info(3, 3),
				.observed = { PROTO_UDP, 0x7f000001u, 4242 }, .auth_len = 5, .auth = auth };
	ssize_t len = wire_hello_encode(pkt, sizeof pkt, WIRE_HELLO, &h);
	CHECK(len > 0);
	uint8_t type;
	CHECK(wire_classify(pkt, (size_t)len, &type) == WIRE_OK && type == WIRE_HELLO);
	struct wire_hello g;
	CHECK(wire_hello_decode(pkt, (size_t)len, &g) == 0);
	CHECK(g.nonce == h.nonce && info_eq(&g.info, &h.info) && g.observed.port == 4242 &&
	      g.auth_len == 5 && !memcmp(g.auth, auth, 5));
	check_truncations(dec_hello, pkt, (size_t)len);
	/* Corrupt the endpoint count (offset 2+8+20+4): over the cap, then off by one. */
	uint8_t bad[WIRE_MAX_PACKET_BYTES];
	memcpy(bad, pkt, (size_t)len);
	bad[34] = LINK_ENDPOINTS_MAX + 1;
	CHECK(wire_hello_decode(bad, (size_t)len, &g) < 0);
	bad[34] = 4;
	CHECK(wire_hello_decode(bad, (size_t)len, &g) < 0);
	bad[34] = 2;
	CHECK(wire_hello_decode(bad, (size_t)len, &g) < 0);
	/* A bad endpoint protocol byte. */
	memcpy(bad, pkt, (size_t)len);
	bad[35] = 9;
	CHECK(wire_hello_decode(bad, (size_t)len, &g) < 0);
	/* Auth length larger than what follows, and over the cap. */
	memcpy(bad, pkt, (size_t)len);
	bad[len - 6] = 6;                                  /* auth_len 6, 5 bytes follow */
	CHECK(wire_hello_decode(bad, (size_t)len, &g) < 0);
	bad[len - 7] = 0xff;
	CHECK(wire_hello_decode(bad, (size_t)len, &g) < 0);
	/* Version and type checks. */
	memcpy(bad, pkt, (size_t)len);
	bad[0] = 2;
	CHECK(wire_classify(bad, (size_t)len, &type) == WIRE_BAD_VERSION);
	bad[0] = WIRE_VERSION;
	bad[1] = 0;
	CHECK(wire_classify(bad, (size_t)len, &type) == WIRE_BAD_TYPE);
	bad[1] = WIRE__TYPE_END;
	CHECK(wire_classify(bad, (size_t)len, &type) == WIRE_BAD_TYPE);
	CHECK(wire_classify(bad, 1, &type) == WIRE_SHORT);
}

static void test_wire_small(void)
{
	uint8_t pkt[64];
	struct wire_ping p = { .seq = 77, .t_us = 123456789 }, q;
	ssize_t len = wire_ping_encode(pkt, sizeof pkt, WIRE_PONG, &p);
	CHECK(len == 14 && wire_ping_decode(pkt, (size_t)len, &q) == 0 && q.seq == 77 && q.t_us == 123456789);
	check_truncations(dec_ping, pkt, (size_t)len);
	uint8_t v = 0;
	len = wire_byte_encode(pkt, sizeof pkt, WIRE_ROLES, ROLE_NEAR | ROLE_FAR);
	CHECK(len == 3 && wire_byte_decode(pkt, 3, &v) == 0 && v == (ROLE_NEAR | ROLE_FAR));
	CHECK(wire_byte_decode(pkt, 2, &v) < 0 && wire_byte_decode(pkt, 4, &v) < 0);
	struct wire_echo e = { .id = 9, .t_us = 5, .req_hops = 4 }, f;
	len = wire_echo_encode(pkt, sizeof pkt, true, &e);
	CHECK(len == 13 && wire_echo_decode(pkt, (size_t)len, true, &f) == 0 && f.req_hops == 4 && f.id == 9);
	CHECK(wire_echo_decode(pkt, (size_t)len, false, &f) < 0);
	check_truncations(dec_echo_reply, pkt, (size_t)len);
}

static void test_wire_routed(void)
{
	uint8_t payload[300], pkt[WIRE_MAX_PACKET_BYTES];
	for (unsigned i = 0; i < sizeof payload; i++)
		payload[i] = (uint8_t)i;
	for (int via = 0; via <= 1; via++) {
		struct wire_routed r = { .mode = MODE_SUCC, .flags = via ? ROUTED_HAS_VIA : 0, .ttl = 9,
					 .hops = 3, .src = addr_small(1), .dst = addr_small(2),
					 .via = via ? addr_small(3) : addr_small(0), .inner = INNER_ECHO_REQ,
					 .len = sizeof payload, .payload = payload }, g;
		ssize_t len = wire_routed_encode(pkt, sizeof pkt, &r);
		CHECK(len == (ssize_t)(WIRE_ROUTED_FIXED_BYTES + (via ? 20 : 0) + sizeof payload));
		CHECK(wire_routed_decode(pkt, (size_t)len, &g) == 0);
		CHECK(g.mode == r.mode && g.flags == r.flags && g.ttl == 9 && g.hops == 3 &&
		      wire_addr_eq(&g.src, &r.src) && wire_addr_eq(&g.dst, &r.dst) &&
		      wire_addr_eq(&g.via, &r.via) && g.len == r.len && !memcmp(g.payload, payload, r.len));
		CHECK(pkt[WIRE_ROUTED_TTL_OFFSET] == 9 && pkt[WIRE_ROUTED_HOPS_OFFSET] == 3);
		check_truncations(dec_routed, pkt, (size_t)len);
		/* The inner length field, one more and one less than the truth. */
		size_t lo = WIRE_ROUTED_FIXED_BYTES + (via ? 20 : 0) - 1;
		pkt[lo] = (uint8_t)(sizeof payload + 1);
		CHECK(wire_routed_decode(pkt, (size_t)len, &g) < 0);
		pkt[lo] = (uint8_t)(sizeof payload - 1);
		CHECK(wire_routed_decode(pkt, (size_t)len, &g) < 0);
		pkt[lo] = (uint8_t)sizeof payload;
		pkt[2] = MODE__END;                        /* unknown mode */
		CHECK(wire_routed_decode(pkt, (size_t)len, &g) < 0);
		pkt[2] = MODE_EXACT;
		pkt[3] = 0x80;                             /* unknown flag */
		CHECK(wire_routed_decode(pkt, (size_t)len, &g) < 0);
	}
}

static void test_wire_ctm(void)
{
	uint8_t pkt[WIRE_MAX_PACKET_BYTES];
	struct wire_ctm_req q = { .token = 5, .want = ROLE_FAR, .reply_via = addr_small(8),
				  .from = sample_info(1, 2) }, q2;
	ssize_t len = wire_ctm_req_encode(pkt, sizeof pkt, &q);
	CHECK(len > 0 && wire_ctm_req_decode(pkt, (size_t)len, &q2) == 0);
	CHECK(q2.token == 5 && q2.want == ROLE_FAR && wire_addr_eq(&q2.reply_via, &q.reply_via) &&
	      info_eq(&q2.from, &q.from));
	check_truncations(dec_ctm_req, pkt, (size_t)len);
	struct wire_ctm_reply m = { .token = 6, .want = 0, .from = sample_info(2, 1),
				    .n_neighbours = RING_CTM_NEIGHBOURS_MAX }, m2;
	for (unsigned i = 0; i < RING_CTM_NEIGHBOURS_MAX; i++)
		m.neighbours[i] = sample_info((uint8_t)(10 + i), LINK_ENDPOINTS_MAX);
	len = wire_ctm_reply_encode(pkt, sizeof pkt, &m);
	/* The largest reply still fits one control packet with the routed header. */
	CHECK(len > 0 && (size_t)len + WIRE_ROUTED_FIXED_BYTES + RING_ADDR_BYTES <= WIRE_MAX_PACKET_BYTES);
	CHECK(wire_ctm_reply_decode(pkt, (size_t)len, &m2) == 0 && m2.n_neighbours == m.n_neighbours);
	bool same = true;
	for (unsigned i = 0; i < m.n_neighbours; i++)
		same &= info_eq(&m.neighbours[i], &m2.neighbours[i]);
	CHECK(same && info_eq(&m.from, &m2.from));
	check_truncations(dec_ctm_reply, pkt, (size_t)len);
	size_t count_at = 4 + 1 + 25 + 7;                  /* token, want, from with 1 endpoint */
	pkt[count_at] = RING_CTM_NEIGHBOURS_MAX + 1;
	CHECK(wire_ctm_reply_decode(pkt, (size_t)len, &m2) < 0);
}

static int64_t test_timer_fired[8], test_timer_n;

static int64_t test_timer_fn(struct ev_loop *loop, struct ev_timer *t)
{
	test_timer_fired[test_timer_n++] = (int64_t)t->when_ms - (int64_t)loop->now_ms;
	return EV_TIMER_STOP;
}

static void test_timers(void)
{
	struct ev_loop loop;
	CHECK(ev_init(&loop) == 0);
	struct ev_timer t[6];
	uint64_t base = loop.now_ms;
	static const int delays[6] = { 50, 10, 40, 20, 30, 60 };
	for (int i = 0; i < 6; i++) {
		ev_timer_init(&t[i], test_timer_fn);
		ev_timer_arm(&loop, &t[i], (uint64_t)delays[i]);
	}
	ev_timer_cancel(&loop, &t[2]);                     /* the 40 ms one */
	ev_timer_arm(&loop, &t[5], 5);                     /* re-arm to the front */
	CHECK(loop.heap_len == 5 && loop.heap[0] == &t[5]);
	uint64_t order[5];
	int k = 0;
	while (loop.heap_len) {
		order[k++] = loop.heap[0]->when_ms - base;
		ev_timer_cancel(&loop, loop.heap[0]);
	}
	CHECK(k == 5 && order[0] == 5 && order[1] == 10 && order[2] == 20 && order[3] == 30 && order[4] == 50);
	CHECK(!ev_timer_armed(&t[0]));
	ev_fini(&loop);
}

static void test_config(void)
{
	struct cli_opts o = { .cmd = CMD_UP, .log_level = LOG_INFO };
	char l1[] = "listen = udp://127.0.0.1:4000  # comment";
	char l2[] = "bootstrap tcp://localhost:5000";
	char l3[] = "ip=10.128.0.5/24";
	char l4[] = "  # only a comment";
	char l5[] = "log-level debug";
	CHECK(cli_config_line(&o, l1, "t", 1) == 0 && o.n_listen == 1 && o.listen[0].port == 4000 &&
	      o.listen[0].proto == PROTO_UDP && !strcmp(o.listen[0].host, "127.0.0.1"));
	CHECK(cli_config_line(&o, l2, "t", 2) == 0 && o.n_boot == 1 && o.boot[0].proto == PROTO_TCP);
	CHECK(cli_config_line(&o, l3, "t", 3) == 0 && o.has_ip && o.ip == 0x0a800005u && o.prefix == 24);
	CHECK(cli_config_line(&o, l4, "t", 4) == 0);
	CHECK(cli_config_line(&o, l5, "t", 5) == 0 && o.log_level == LOG_DEBUG);
	fprintf(stderr, "(expected error lines follow)\n");
	char b1[] = "nosuchkey 1", b2[] = "listen", b3[] = "listen = http://x:1", b4[] = "ip 10.1.2.300";
	char b5[] = "verbose", b6[] = "bootstrap udp://host:0", b7[] = "ip = 0.0.0.0";
	CHECK(cli_config_line(&o, b1, "t", 6) < 0);
	CHECK(cli_config_line(&o, b2, "t", 7) < 0);
	CHECK(cli_config_line(&o, b3, "t", 8) < 0);
	CHECK(cli_config_line(&o, b4, "t", 9) < 0);
	CHECK(cli_config_line(&o, b5, "t", 10) < 0);       /* switches are not config keys */
	CHECK(cli_config_line(&o, b6, "t", 11) < 0);       /* port 0 cannot be dialled */
	CHECK(cli_config_line(&o, b7, "t", 12) < 0);
	struct cli_uri u;
	CHECK(cli_parse_uri("udp://0.0.0.0:0", &u, true) == 0);
	CHECK(cli_parse_uri("udp://:4000", &u, false) < 0);
	CHECK(cli_parse_uri("udp://h:65536", &u, false) < 0);
	CHECK(cli_parse_uri("udp://h:12x", &u, false) < 0);
	CHECK(cli_parse_uri("garbage", &u, false) < 0);
}

/* A fake node with up links to the given addresses, for next-hop checks. */
static void fake_node(struct node *n, const ring_addr *self, const ring_addr *peers, unsigned k)
{
	*n = (struct node){ .udp_dial_fd = -1 };
	ev_init(&n->loop);
	n->self.addr = *self;
	struct sockaddr_in sa = { .sin_family = AF_INET };
	for (unsigned i = 0; i < k; i++) {
		struct link *l = link_new(n, PROTO_UDP, -1, &sa, true);
		l->state = LINK_UP;
		l->peer.addr = peers[i];
		l->peer_known = true;
	}
}

static void fake_node_free(struct node *n)
{
	for (struct link *l = n->links; l; l = l->next)
		l->state = LINK_CLOSED;
	link_reap(n);
	ev_fini(&n->loop);
}

static void test_next_hop(void)
{
	struct node n;
	ring_addr self = addr_top(0x10);
	ring_addr peers[] = { addr_top(0x20), addr_top(0x30), addr_top(0x08), addr_top(0x90), addr_top(0xf0) };
	fake_node(&n, &self, peers, ARRAY_LEN(peers));
	ring_addr t = addr_top(0x85);
	struct link *h = ring_next_hop(&n, MODE_NEAREST, &t);
	CHECK(h && wire_addr_eq(&h->peer.addr, &peers[3]));
	t = addr_top(0x12);                                /* we are closest: deliver here */
	CHECK(ring_next_hop(&n, MODE_NEAREST, &t) == NULL);
	h = ring_next_hop(&n, MODE_SUCC, &t);              /* first at or after 0x12: 0x20 */
	CHECK(h && wire_addr_eq(&h->peer.addr, &peers[0]));
	t = addr_top(0x0c);                                /* PRED of 0x0c is 0x08 */
	h = ring_next_hop(&n, MODE_PRED, &t);
	CHECK(h && wire_addr_eq(&h->peer.addr, &peers[2]));
	t = addr_top(0xf8);                                /* nearest across zero: 0xf0 */
	h = ring_next_hop(&n, MODE_NEAREST, &t);
	CHECK(h && wire_addr_eq(&h->peer.addr, &peers[4]));
	ring_addr side[2];
	CHECK(ring_side_nearest(&n, true, side, 2) == 2 && wire_addr_eq(&side[0], &peers[0]) &&
	      wire_addr_eq(&side[1], &peers[1]));
	CHECK(ring_side_nearest(&n, false, side, 2) == 2 && wire_addr_eq(&side[0], &peers[2]) &&
	      wire_addr_eq(&side[1], &peers[4]));
	ring_addr cand = addr_top(0x18), far = addr_top(0x60);
	CHECK(ring_would_be_near(&n, &cand));
	CHECK(!ring_would_be_near(&n, &far));
	double est = ring_estimate_n(&n);                  /* 4 gaps over 0xf0..0x30 = 64/256 */
	CHECK(est > 15.9 && est < 16.1);
	fake_node_free(&n);
}

/* The contents list at the top of ipop.c names every section banner. */
static void test_contents(void)
{
	char path[512];
	snprintf(path, sizeof path, "%s", __FILE__);
	char *slash = strrchr(path, '/');
	snprintf(slash ? slash + 1 : path, sizeof path - (size_t)(slash ? slash + 1 - path : 0), "../ipop.c");
	FILE *f = fopen(path, "r");
	CHECK(f != NULL);
	if (!f)
		return;
	char line[512], listed[64][8], banners[64][8];
	int nl = 0, nb = 0;
	bool in_contents = false;
	while (fgets(line, sizeof line, f)) {
		char num[3], prefix[16];
		if (strstr(line, " * Contents"))
			in_contents = true;
		else if (in_contents && !strncmp(line, " */", 3))
			in_contents = false;
		if (in_contents && sscanf(line, " * %2[0-9] %15s", num, prefix) == 2 && nl < 64)
			snprintf(listed[nl++], 8, "%s", num);
		if (!strncmp(line, "/* ====", 7) && sscanf(line, "/* %*[=] %2[0-9]", num) == 1 && nb < 64)
			snprintf(banners[nb++], 8, "%s", num);
	}
	fclose(f);
	CHECK(nl >= 8 && nl == nb);
	bool same = nl == nb;
	for (int i = 0; same && i < nl; i++)
		same = !strcmp(listed[i], banners[i]);
	CHECK(same);
}

/* Two nodes in one process handshake over loopback UDP and exchange pings. */
static void test_link_pair(void)
{
	static struct node a, b;
	char err[256];
	struct cli_opts oa = { .cmd = CMD_UP, .n_listen = 1 }, ob = oa;
	oa.listen[0] = (struct cli_uri){ PROTO_UDP, "127.0.0.1", 0 };
	ob.listen[0] = oa.listen[0];
	CHECK(cli_node_init(&a, &oa, err, sizeof err) == 0);
	CHECK(cli_node_init(&b, &ob, err, sizeof err) == 0);
	ring_start(&a);
	ring_start(&b);
	struct link *l = link_dial(&a, &b.self.endpoints[0], &b.self.addr, 0);
	CHECK(l != NULL);
	for (int i = 0; i < 200 && !(a.ring.joined && b.ring.joined); i++) {
		ev_run_once(&a.loop);
		ev_run_once(&b.loop);
	}
	struct link *la = link_find_peer(&a, &b.self.addr, true), *lb = link_find_peer(&b, &a.self.addr, true);
	CHECK(la && lb && (la->local_roles & ROLE_NEAR) && (lb->local_roles & ROLE_NEAR));
	CHECK(la && la->initiator && lb && !lb->initiator);
	/* A graceful leave reaches the other side at once. */
	ring_leave(&a);
	for (int i = 0; i < 20 && link_find_peer(&b, &a.self.addr, true); i++)
		ev_run_once(&b.loop);
	CHECK(link_find_peer(&b, &a.self.addr, true) == NULL);
	link_reap(&a);
	cli_node_free(&a);
	cli_node_free(&b);
}

int main(void)
{
	log_cfg.level = LOG_ERROR;
	test_sha1();
	test_ring_arith();
	test_buf();
	test_wire_hello();
	test_wire_small();
	test_wire_routed();
	test_wire_ctm();
	test_timers();
	test_config();
	test_next_hop();
	test_contents();
	test_link_pair();
	printf("%d passed, %d failed\n", t_pass, t_fail);
	return t_fail ? 1 : 0;
}
