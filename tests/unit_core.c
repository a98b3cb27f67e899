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

/* RFC 1071 done the plain way, 16 bits a step, from a starting sum: what
 * ip_sum_add's lanes and the tap's chained sums must agree with. */
static uint16_t sum_plain(uint64_t s, const uint8_t *p, size_t len)
{
	for (size_t i = 0; i + 1 < len; i += 2)
		s += (uint32_t)(p[i] << 8 | p[i + 1]);
	if (len & 1)
		s += (uint32_t)p[len - 1] << 8;
	while (s >> 16)
		s = (s & 0xffff) + (s >> 16);
	return (uint16_t)~s;
}

static bool sum_agrees(const uint8_t *p, size_t len, uint16_t got)
{
	uint16_t want = sum_plain(0, p, len);
	uint8_t g[2];
	memcpy(g, &got, 2);
	return g[0] == (uint8_t)(want >> 8) && g[1] == (uint8_t)want;
}

/* The vector sum (lw_checksums_put) against the plain one: every length
 * and alignment up to 300 bytes, sums chained at even splits, and all-ones
 * buffers past a lane block (IP_SUM_BLOCK_BYTES) where every carry counts. */
static void test_ip_sum(void)
{
	static uint8_t buf[3 * IP_SUM_BLOCK_BYTES];
	for (size_t i = 0; i < 320; i++)
		buf[i] = (uint8_t)(i * 37 + 11 + (i >> 3) * 200);
	for (size_t off = 0; off < 8; off++)
		for (size_t len = 0; len <= 300; len++)
			CHECK(sum_agrees(buf + off, len, ip_sum_fold(ip_sum_add(0, buf + off, len))));
	for (size_t cut = 0; cut <= 300; cut += 2)
		CHECK(sum_agrees(buf, 301, ip_sum_fold(ip_sum_add(ip_sum_add(0, buf, cut), buf + cut, 301 - cut))));
	CHECK(ntohs(ip_sum_fold(ip_sum_add(0, buf + 3, 201))) == ip_checksum(buf + 3, 201));
	memset(buf, 0xff, sizeof buf);
	size_t lens[] = { 31, 32, 63, 1500, IP_SUM_BLOCK_BYTES - 1, IP_SUM_BLOCK_BYTES + 33, sizeof buf - 1 };
	for (size_t i = 0; i < ARRAY_LEN(lens); i++)
		CHECK(sum_agrees(buf, lens[i], ip_sum_fold(ip_sum_add(0, buf, lens[i]))));
	for (size_t i = 0; i < sizeof buf; i++)
		buf[i] = (uint8_t)(0xf0 | i);  /* near-ones with every lane different */
	CHECK(sum_agrees(buf + 1, sizeof buf - 1, ip_sum_fold(ip_sum_add(0, buf + 1, sizeof buf - 1))));
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

static int dec_hs_init(const uint8_t *p, size_t len)
{
	struct wire_hs_init m;
	return wire_hs_init_decode(p, len, &m);
}

static int dec_hs_resp(const uint8_t *p, size_t len)
{
	struct wire_hs_resp m;
	return wire_hs_resp_decode(p, len, &m);
}

static int dec_hs_fin(const uint8_t *p, size_t len)
{
	struct wire_hs_fin m;
	return wire_hs_fin_decode(p, len, &m);
}

static int dec_hs_cookie(const uint8_t *p, size_t len)
{
	struct wire_hs_cookie m;
	return wire_hs_cookie_decode(p, len, &m);
}

static int dec_hs_reject(const uint8_t *p, size_t len)
{
	struct wire_hs_reject m;
	return wire_hs_reject_decode(p, len, &m);
}

static int dec_identity(const uint8_t *p, size_t len)
{
	struct wire_identity m;
	return wire_identity_decode(p, len, &m);
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
	struct peer_info pi = { .vip = 0x0a800005u + seed, .n_endpoints = n_ep,
				.instance = 0x0102030405060708ull * seed, .started = 1700000000u + seed };
	for (int i = 0; i < RING_ADDR_BYTES; i++)
		pi.addr.b[i] = (uint8_t)(seed * 7 + i);
	for (uint8_t i = 0; i < n_ep; i++)
		pi.endpoints[i] = (struct endpoint){ i % 2 ? PROTO_TCP : PROTO_UDP, 0x7f000001u + i,
						     (uint16_t)(4000 + i) };
	return pi;
}

static bool info_eq(const struct peer_info *a, const struct peer_info *b)
{
	if (!wire_addr_eq(&a->addr, &b->addr) || a->vip != b->vip || a->n_endpoints != b->n_endpoints ||
	    a->instance != b->instance || a->started != b->started)
		return false;
	for (unsigned i = 0; i < a->n_endpoints; i++)
		if (a->endpoints[i].proto != b->endpoints[i].proto || a->endpoints[i].ip != b->endpoints[i].ip ||
		    a->endpoints[i].port != b->endpoints[i].port)
			return false;
	return true;
}

static void test_wire_handshake(void)
{
	uint8_t pkt[WIRE_MAX_PACKET_BYTES], type;
	struct wire_hs_init i = { .sender = 0xa1b2c3d4, .mode = SEC_PSK }, i2;
	memset(i.e, 7, 32);
	memset(i.cookie, 8, sizeof i.cookie);
	memset(i.mac1, 9, sizeof i.mac1);
	ssize_t len = wire_hs_init_encode(pkt, sizeof pkt, &i);
	CHECK(len == WIRE_HS_INIT_BYTES && pkt[WIRE_HS_INIT_MAC1_OFFSET] == 9 &&
	      pkt[WIRE_HS_INIT_COOKIE_OFFSET] == 8 && pkt[WIRE_HS_INIT_COOKIE_OFFSET - 1] == 7);
	CHECK(wire_classify(pkt, (size_t)len, false, &type) == WIRE_OK && type == WIRE_HS_INIT);
	CHECK(wire_classify(pkt, (size_t)len, true, &type) == WIRE_BAD_TYPE);  /* never inside DATA */
	CHECK(wire_hs_init_decode(pkt, (size_t)len, &i2) == 0 && i2.sender == i.sender && i2.mode == SEC_PSK &&
	      !memcmp(i2.e, i.e, 32) && !memcmp(i2.mac1, i.mac1, 16));
	check_truncations(dec_hs_init, pkt, (size_t)len);
	pkt[6] = SEC__MODE_END;
	CHECK(wire_hs_init_decode(pkt, (size_t)len, &i2) < 0);

	uint8_t sealed[200];
	memset(sealed, 0x5a, sizeof sealed);
	struct wire_hs_resp r = { .sender = 1, .receiver = 2, .len = sizeof sealed, .sealed = sealed }, r2;
	memset(r.e, 3, 32);
	len = wire_hs_resp_encode(pkt, sizeof pkt, &r);
	CHECK(len > 0 && wire_hs_resp_decode(pkt, (size_t)len, &r2) == 0 && r2.sender == 1 &&
	      r2.receiver == 2 && r2.len == sizeof sealed && !memcmp(r2.sealed, sealed, sizeof sealed));
	check_truncations(dec_hs_resp, pkt, (size_t)len);
	pkt[WIRE_HDR_BYTES + 8 + 32] = 0xff;               /* sealed length past the end */
	CHECK(wire_hs_resp_decode(pkt, (size_t)len, &r2) < 0);

	struct wire_hs_fin f = { .receiver = 5, .len = 17, .sealed = sealed }, f2;
	len = wire_hs_fin_encode(pkt, sizeof pkt, &f);
	CHECK(len > 0 && wire_hs_fin_decode(pkt, (size_t)len, &f2) == 0 && f2.receiver == 5 && f2.len == 17);
	check_truncations(dec_hs_fin, pkt, (size_t)len);

	struct wire_hs_cookie c = { .receiver = 6 }, c2;
	memset(c.cookie, 4, sizeof c.cookie);
	len = wire_hs_cookie_encode(pkt, sizeof pkt, &c);
	CHECK(len > 0 && wire_hs_cookie_decode(pkt, (size_t)len, &c2) == 0 && c2.receiver == 6 && c2.cookie[15] == 4);
	check_truncations(dec_hs_cookie, pkt, (size_t)len);

	struct wire_hs_reject j = { .receiver = 7, .reason = REJECT_MODE_MISMATCH, .mode = SEC_INSECURE }, j2;
	len = wire_hs_reject_encode(pkt, sizeof pkt, &j);
	CHECK(len > 0 && wire_hs_reject_decode(pkt, (size_t)len, &j2) == 0 && j2.mode == SEC_INSECURE);
	check_truncations(dec_hs_reject, pkt, (size_t)len);
	pkt[len - 2] = 9;                                  /* unknown reason */
	CHECK(wire_hs_reject_decode(pkt, (size_t)len, &j2) < 0);

	uint8_t cert[300], sig[70];
	memset(cert, 0x30, sizeof cert);
	memset(sig, 0x31, sizeof sig);
	struct wire_identity id = { .info = sample_info(4, 2), .observed = { PROTO_TCP, 0x0a000001u, 99 },
				    .cert_len = sizeof cert, .cert = cert, .sig_len = sizeof sig, .sig = sig,
				    .ciphers = 3 }, id2;
	len = wire_identity_encode(pkt, sizeof pkt, &id);
	CHECK(len > 0 && wire_identity_decode(pkt, (size_t)len, &id2) == 0 && info_eq(&id.info, &id2.info) &&
	      id2.observed.port == 99 && id2.cert_len == sizeof cert && id2.sig_len == sizeof sig &&
	      !memcmp(id2.cert, cert, sizeof cert) && !memcmp(id2.sig, sig, sizeof sig) && id2.ciphers == 3);
	pkt[len - 1] = 2;                                  /* no ChaCha: refused */
	CHECK(wire_identity_decode(pkt, (size_t)len, &id2) < 0);
	pkt[len - 1] = 3;
	check_truncations(dec_identity, pkt, (size_t)len);

	/* DATA: header round trip; an empty body is refused. */
	struct wire_data d = { .receiver = 0x01020304, .epoch = 3, .counter = 0x1122334455667788ull }, d2;
	wire_data_header_put(pkt, &d);
	pkt[WIRE_DATA_HDR_BYTES] = 0xee;
	CHECK(wire_data_decode(pkt, WIRE_DATA_HDR_BYTES + 1, &d2) == 0 && d2.receiver == d.receiver &&
	      d2.epoch == 3 && d2.counter == d.counter && d2.len == 1 && d2.body[0] == 0xee);
	CHECK(wire_data_decode(pkt, WIRE_DATA_HDR_BYTES, &d2) < 0);
	CHECK(wire_data_decode(pkt, WIRE_DATA_HDR_BYTES - 1, &d2) < 0);

	/* Version and type checks. */
	pkt[0] = 1;
	CHECK(wire_classify(pkt, 20, false, &type) == WIRE_BAD_VERSION);
	pkt[0] = WIRE_VERSION;
	pkt[1] = 0;
	CHECK(wire_classify(pkt, 20, false, &type) == WIRE_BAD_TYPE);
	pkt[1] = WIRE_PING;                                /* inner types never travel bare */
	CHECK(wire_classify(pkt, 20, false, &type) == WIRE_BAD_TYPE);
	CHECK(wire_classify(pkt, 20, true, &type) == WIRE_OK);
	CHECK(wire_classify(pkt, 1, false, &type) == WIRE_SHORT);
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

/* RELAY/RELAYED round trip, size limits, and the outer receiver peek. */
static void test_wire_relay(void)
{
	uint8_t rec[WIRE_MAX_RECORD_BYTES + 1], msg[WIRE_MAX_MSG_BYTES + 64], type;
	memset(rec, 0x5a, sizeof rec);
	rec[0] = WIRE_VERSION;
	rec[1] = WIRE_DATA;
	struct wire_relay m = { .rec = rec, .len = WIRE_MAX_RECORD_BYTES }, d;
	memset(m.addr.b, 0xa7, RING_ADDR_BYTES);
	ssize_t len = wire_relay_encode(msg, sizeof msg, WIRE_RELAY, &m);
	CHECK(len == WIRE_MAX_MSG_BYTES);
	CHECK(wire_classify(msg, (size_t)len, true, &type) == WIRE_OK && type == WIRE_RELAY);
	CHECK(wire_relay_decode(msg, (size_t)len, &d) == 0 && wire_addr_eq(&d.addr, &m.addr) &&
	      d.len == m.len && memcmp(d.rec, rec, d.len) == 0);
	m.len = WIRE_MAX_RECORD_BYTES + 1;              /* a record never exceeds its limit */
	len = wire_relay_encode(msg, sizeof msg, WIRE_RELAYED, &m);
	CHECK(len > 0 && wire_relay_decode(msg, (size_t)len, &d) < 0);
	m.len = 1;                                      /* nor is it shorter than a header */
	len = wire_relay_encode(msg, sizeof msg, WIRE_RELAYED, &m);
	CHECK(len > 0 && wire_relay_decode(msg, (size_t)len, &d) < 0);
	uint32_t idx = 0;
	uint8_t resp[12] = { WIRE_VERSION, WIRE_HS_RESP, 0, 0, 0, 1, 0, 0, 0, 9 };
	CHECK(wire_outer_receiver(resp, sizeof resp, &idx) && idx == 9);       /* after the sender */
	uint8_t fin[6] = { WIRE_VERSION, WIRE_HS_FIN, 0, 0, 1, 2 };
	CHECK(wire_outer_receiver(fin, sizeof fin, &idx) && idx == 0x102);
	CHECK(!wire_outer_receiver(fin, 5, &idx));
}

/* NAT classification and what a node advertises from its observations. */
static void nat_observe(struct node *n, uint32_t ip, uint16_t port, uint8_t who)
{
	struct nat_state *s = n->nat;
	s->seen[s->n_seen] = (struct endpoint){ PROTO_UDP, ip, port };
	s->local[s->n_seen] = (struct endpoint){ PROTO_UDP, 0x0a000002, 4000 };
	memset(s->reporter[s->n_seen].b, who, RING_ADDR_BYTES);
	s->n_seen++;
}

static void test_nat_classify(void)
{
	static struct node n;
	static struct nat_state ns;
	uint16_t top = 0;
	memset(&n, 0, sizeof n);
	n.nat = &ns;
	n.nat->own[0] = (struct endpoint){ PROTO_UDP, 0x0a000002, 4000 };
	n.nat->n_own = 1;
	CHECK(nat_classify(&n) == NAT_UNKNOWN);
	nat_observe(&n, 0xcb007101, 4000, 1);
	CHECK(nat_classify(&n) == NAT_UNKNOWN);         /* one reporter tells nothing */
	nat_advertise(&n);
	CHECK(n.self.n_endpoints == 2 && n.self.endpoints[0].ip == 0xcb007101 &&
	      n.self.endpoints[1].ip == 0x0a000002);     /* public first, then the LAN's */
	nat_observe(&n, 0xcb007101, 4000, 2);
	CHECK(nat_classify(&n) == NAT_PORT_PRESERVING);
	n.nat->n_seen = 0;
	nat_observe(&n, 0xcb007101, 31000, 1);
	nat_observe(&n, 0xcb007101, 31000, 2);
	CHECK(nat_classify(&n) == NAT_CONE);
	n.nat->n_seen = 0;                               /* +2 per new peer: predictable */
	nat_observe(&n, 0xcb007101, 31004, 3);
	nat_observe(&n, 0xcb007101, 31000, 1);
	nat_observe(&n, 0xcb007101, 31002, 2);
	CHECK(nat_classify(&n) == NAT_SYMMETRIC_STEP);
	CHECK(nat_port_step(n.nat, &top) == 2 && top == 31004);
	nat_advertise(&n);
	CHECK(n.self.n_endpoints == NAT_PREDICT + 1 && n.self.endpoints[0].port == 31006 &&
	      n.self.endpoints[1].port == 31008 && n.self.endpoints[2].port == 4000);
	nat_observe(&n, 0xcb007101, 40111, 4);          /* uneven: random */
	CHECK(nat_classify(&n) == NAT_SYMMETRIC && !nat_port_step(n.nat, &top));
	nat_advertise(&n);
	CHECK(n.self.n_endpoints == 1 && n.self.endpoints[0].port == 4000);  /* no useless mappings */
	n.nat->n_seen = 0;
	nat_observe(&n, 0xcb007101, 31000, 1);
	nat_observe(&n, 0xcb007101, 31000 + NAT_STEP_MAX + 1, 2);
	nat_observe(&n, 0xcb007101, 31000 + 2 * (NAT_STEP_MAX + 1), 3);
	CHECK(nat_classify(&n) == NAT_SYMMETRIC);       /* too large a step to trust */
	n.nat->n_seen = 0;
	nat_observe(&n, 0x0a000002, 4000, 1);
	nat_observe(&n, 0x0a000002, 4000, 2);
	CHECK(nat_classify(&n) == NAT_NONE);
	/* A wildcard listener (local 0.0.0.0:4000): its own interface
	 * addresses tell a public node from one behind a NAT. */
	n.nat->n_seen = 0;
	nat_observe(&n, 0x0a000002, 4000, 1);
	nat_observe(&n, 0x0a000002, 4000, 2);
	n.nat->local[0].ip = n.nat->local[1].ip = 0;
	CHECK(nat_classify(&n) == NAT_NONE);
	n.nat->n_seen = 0;
	nat_observe(&n, 0xcb007101, 4000, 1);
	nat_observe(&n, 0xcb007101, 4000, 2);
	n.nat->local[0].ip = n.nat->local[1].ip = 0;
	CHECK(nat_classify(&n) == NAT_PORT_PRESERVING);         /* was "none" */
	/* A peer on our LAN sees our own address: it tells nothing about the
	 * NAT (it made a cone NAT look symmetric). */
	n.nat->n_seen = 0;
	nat_observe(&n, 0x0a000002, 4000, 3);
	nat_observe(&n, 0xcb007101, 4000, 1);
	nat_observe(&n, 0xcb007101, 4000, 2);
	n.nat->local[0].ip = n.nat->local[1].ip = n.nat->local[2].ip = 0;
	CHECK(nat_classify(&n) == NAT_PORT_PRESERVING);
	nat_advertise(&n);
	CHECK(n.self.n_endpoints == 2 && n.self.endpoints[0].ip == 0xcb007101 &&
	      n.self.endpoints[1].ip == 0x0a000002);
	n.nat->n_seen = 0;                              /* stepping, beside the LAN peer */
	nat_observe(&n, 0x0a000002, 4000, 3);
	nat_observe(&n, 0xcb007101, 31000, 1);
	nat_observe(&n, 0xcb007101, 31002, 2);
	nat_observe(&n, 0xcb007101, 31004, 4);
	CHECK(nat_classify(&n) == NAT_SYMMETRIC_STEP && nat_port_step(n.nat, &top) == 2 && top == 31004);
}

/* Issue 17: no endpoint inside the overlay is advertised, learnt or dialled. */
static void test_overlay_endpoints(void)
{
	static struct node n;
	static struct link peer;
	memset(&n, 0, sizeof n);
	n.tap.fd = -1;
	n.udp_dial_fd = -1;
	n.self.vip = 0x0a800001;                        /* 10.128.0.1/16 */
	n.ip.net = 0x0a800000;
	n.ip.mask = 0xffff0000;
	CHECK(link_overlay_ip(&n, 0x0a800003) && link_overlay_ip(&n, n.self.vip));
	CHECK(!link_overlay_ip(&n, 0xc0a80a02) && !link_overlay_ip(&n, 0));
	struct ip_route r = { 0xac100000, 24 };         /* --route-for 172.16.0.0/24 */
	n.ip.routes = &r;
	n.ip.n_routes = 1;
	CHECK(link_overlay_ip(&n, 0xac100007) && !link_overlay_ip(&n, 0xac100107));
	peer.peer_known = true;                         /* a router-only node knows no prefix, */
	peer.peer.vip = 0x0b000005;                     /* but its peers' virtual IPs */
	n.links = &peer;
	CHECK(link_overlay_ip(&n, 0x0b000005));
	n.links = NULL;
	struct peer_info pi = { .vip = 0x0a800009, .n_endpoints = 3 };
	pi.endpoints[0] = (struct endpoint){ PROTO_UDP, 0x0a800009, 4000 };     /* its own tap */
	pi.endpoints[1] = (struct endpoint){ PROTO_UDP, 0xcb007105, 4000 };
	pi.endpoints[2] = (struct endpoint){ PROTO_TCP, 0x0a800002, 4000 };
	link_scrub_endpoints(&n, &pi);
	CHECK(pi.n_endpoints == 1 && pi.endpoints[0].ip == 0xcb007105);
	/* A dial to the overlay never starts, and counts. */
	struct endpoint bad = { PROTO_UDP, 0x0a800002, 4000 };
	uint64_t before = n.drops.count[DROP_OVERLAY_ENDPOINT];
	CHECK(link_dial(&n, &bad, NULL, 0, NULL) == NULL);
	CHECK(n.drops.count[DROP_OVERLAY_ENDPOINT] == before + 1 && n.links == NULL);
	/* A wildcard listener's endpoints: never loopback, never the overlay. */
	n.listeners[0].proto = PROTO_UDP;
	n.listeners[0].sa = link_sockaddr_of(&(struct endpoint){ PROTO_UDP, 0, 4000 });
	n.n_listeners = 1;
	struct endpoint own[LINK_ENDPOINTS_MAX];
	unsigned k = nat_collect_own(&n, own);
	CHECK(k >= 1);
	for (unsigned i = 0; i < k; i++)
		CHECK(!link_overlay_ip(&n, own[i].ip) && own[i].port == 4000);
	n.ip.routes = NULL;
	n.ip.n_routes = 0;
}

/* Remembered peers: links we dialled, newest first, no duplicates, capped. */
static void test_remember(void)
{
	static struct node n;
	static struct link l;
	memset(&n, 0, sizeof n);
	memset(&l, 0, sizeof l);
	l.initiator = true;
	l.proto = PROTO_UDP;
	for (unsigned i = 0; i < RING_REMEMBER_MAX + 3; i++) {
		l.remote = link_sockaddr_of(&(struct endpoint){ PROTO_UDP, 0xcb007100 + i, 4000 });
		ring_remember(&n, &l);
	}
	CHECK(n.ring.n_remembered == RING_REMEMBER_MAX);
	CHECK(n.ring.remembered[0].ip == 0xcb007100 + RING_REMEMBER_MAX + 2);
	l.remote = link_sockaddr_of(&n.ring.remembered[5]);
	ring_remember(&n, &l);                          /* seen again: moves to the front */
	CHECK(n.ring.n_remembered == RING_REMEMBER_MAX && n.ring.remembered[0].ip == ntohl(l.remote.sin_addr.s_addr));
	unsigned dups = 0;
	for (unsigned i = 1; i < n.ring.n_remembered; i++)
		dups += n.ring.remembered[i].ip == n.ring.remembered[0].ip;
	CHECK(dups == 0);
	l.initiator = false;                            /* a peer's TCP dial: an ephemeral port */
	l.proto = PROTO_TCP;
	l.remote = link_sockaddr_of(&(struct endpoint){ PROTO_UDP, 0xcb0071ff, 4000 });
	ring_remember(&n, &l);
	CHECK(n.ring.remembered[0].ip != 0xcb0071ff);
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
	size_t count_at = 4 + 1 + 37 + 7;                  /* token, want, from with 1 endpoint */
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
/* The tests below edit link fields directly, where the real events that
 * change them (up, down, stalls, ICMP) also bump links_gen and so void
 * ring_next_hop's memo. */
static struct link *next_hop_fresh(struct node *n, uint8_t mode, const ring_addr *target)
{
	n->links_gen++;
	return ring_next_hop(n, mode, target);
}

static void fake_node(struct node *n, const ring_addr *self, const ring_addr *peers, unsigned k)
{
	*n = (struct node){ .udp_dial_fd = -1 };
	ev_init(&n->loop);
	sec_rng_init(&n->rng);
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
	link_free_all(n);
	ring_free(n);
	sec_rng_free(&n->rng);
	ev_fini(&n->loop);
}

static void test_next_hop(void)
{
	struct node n;
	ring_addr self = addr_top(0x10);
	ring_addr peers[] = { addr_top(0x20), addr_top(0x30), addr_top(0x08), addr_top(0x90), addr_top(0xf0) };
	fake_node(&n, &self, peers, ARRAY_LEN(peers));
	for (struct link *l = n.links; l; l = l->next)
		l->last_rx_ms = ev_now(&n.loop);           /* none quiet */
	ring_addr t = addr_top(0x85);
	struct link *h = next_hop_fresh(&n, MODE_NEAREST, &t);
	CHECK(h && wire_addr_eq(&h->peer.addr, &peers[3]));
	t = addr_top(0x12);                                /* we are closest: deliver here */
	CHECK(next_hop_fresh(&n, MODE_NEAREST, &t) == NULL);
	h = next_hop_fresh(&n, MODE_SUCC, &t);              /* first at or after 0x12: 0x20 */
	CHECK(h && wire_addr_eq(&h->peer.addr, &peers[0]));
	t = addr_top(0x0c);                                /* PRED of 0x0c is 0x08 */
	h = next_hop_fresh(&n, MODE_PRED, &t);
	CHECK(h && wire_addr_eq(&h->peer.addr, &peers[2]));
	t = addr_top(0xf8);                                /* nearest across zero: 0xf0 */
	h = next_hop_fresh(&n, MODE_NEAREST, &t);
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

/* UDP batching (issue 20): a turn's small records to one peer (ACKs) make
 * UDP_SEGMENT messages of at most LINK_GSO_MAX_SEGS segments, which the
 * kernel takes; messages of 600 were refused with EINVAL, and the node
 * gave up segmentation for good: half its throughput from then on. */
static void test_gso_batch(void)
{
	struct node n;
	ring_addr self = addr_top(0x10);
	fake_node(&n, &self, NULL, 0);
	int rx = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0), tx = socket(AF_INET, SOCK_DGRAM, 0);
	int big = 4 << 20;
	setsockopt(rx, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big);
	struct sockaddr_in to = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t sl = sizeof to;
	CHECK(rx >= 0 && tx >= 0 && bind(rx, (struct sockaddr *)&to, sizeof to) == 0 &&
	      getsockname(rx, (struct sockaddr *)&to, &sl) == 0);
	uint8_t rec[100];
	unsigned sent = 0;
	for (int round = 0; round < LINK_GSO_REFUSALS_MAX + 1; round++) {
		for (unsigned i = 0; i < 600; i++, sent++) {   /* 60 KB: one turn's batch buffer */
			memset(rec, (int)i, sizeof rec);
			CHECK(link_udp_queue(&n, tx, &to, rec, sizeof rec) == 0);
		}
		link_tx_flush(&n);
	}
	CHECK(n.tx && !n.tx->no_gso && n.tx->gso_refusals == 0);
	unsigned got = 0;
	for (uint8_t buf[2048]; recv(rx, buf, sizeof buf, 0) == (ssize_t)sizeof rec;)
		got++;
	CHECK(got == sent);                     /* each record its own datagram, none lost */
	close(rx);
	close(tx);
	free(n.tx->buf);
	free(n.tx);
	n.tx = NULL;
	fake_node_free(&n);
}

/* Handshake admission (issue 18, item 4): the per-IP bucket admits a
 * burst of LINK_HS_BURST, then LINK_HS_PER_IP_PER_S a second, per IP; the
 * half-open cap closes the oldest unasked responder link. */
static void test_hs_admission(void)
{
	struct node n;
	ring_addr self = addr_top(0x10);
	fake_node(&n, &self, NULL, 0);
	n.sec.mode = SEC_PSK;
	n.loop.now_ms = 1000000;
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(0xc0a80001) };
	struct sockaddr_in b = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(0xc0a80002) };
	int ok = 0;
	for (int i = 0; i < 100; i++)
		ok += link_hs_admit(&n, &a);
	CHECK(ok == LINK_HS_BURST);
	CHECK(link_hs_admit(&n, &b));                       /* another IP has its own bucket */
	struct sockaddr_in lo = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000001) };
	for (ok = 0; ok < 100 && link_hs_admit(&n, &lo);)
		ok++;
	CHECK(ok == 100);                                   /* this host's own nodes: no bucket */
	n.loop.now_ms += 1000;                              /* a second later: ten more */
	for (ok = 0; ok < 100 && link_hs_admit(&n, &a);)
		ok++;
	CHECK(ok == LINK_HS_PER_IP_PER_S);
	n.sec.mode = SEC_INSECURE;                          /* no public-key work: no bucket */
	CHECK(link_hs_admit(&n, &a));
	struct sockaddr_in sa = { .sin_family = AF_INET };
	struct link *first = NULL;
	for (int i = 0; i < LINK_HALF_OPEN_MAX + 1; i++) {
		n.loop.now_ms++;
		link_half_open_make_room(&n);
		struct link *l = link_new(&n, PROTO_UDP, -1, &sa, false);
		link_half_open_begin(l);
		l->state = LINK_AWAIT_FIN;
		if (!first)
			first = l;
	}
	CHECK(n.n_half_open == LINK_HALF_OPEN_MAX);
	CHECK(first->state == LINK_CLOSED && !first->half_open);
	CHECK(n.drops.count[DROP_HALF_OPEN] == 1);
	fake_node_free(&n);
}

static void rand_bytes(uint64_t *x, uint8_t *b, size_t len)
{
	for (size_t i = 0; i < len; i++) {
		*x = *x * 6364136223846793005ull + 1442695040888963407ull;
		b[i] = (uint8_t)(*x >> 56);
	}
}

/* The reference ring_next_hop: every up link read and classed, as the
 * ring view's one-read fast path must answer. */
static struct link *next_hop_reference(struct node *n, uint8_t mode, const ring_addr *target)
{
	ring_addr self = ring_metric(mode, &n->self.addr, target);
	ring_addr best[HOP__CLASSES] = { self, self, self };
	struct link *hop[HOP__CLASSES] = { NULL, NULL, NULL };
	for (unsigned s = 0; s < n->n_link_slots; s++) {
		struct link *l = n->link_slots[s];
		if (!l || !ring_link_usable(l))
			continue;
		ring_addr m = ring_metric(mode, &l->peer.addr, target);
		enum ring_hop_class c = ring_hop_class(n, l, &m);
		if (wire_addr_cmp(&m, &best[c]) < 0) {
			best[c] = m;
			hop[c] = l;
		}
	}
	if (mode == MODE_NEAREST)
		return hop[HOP_GOOD] ? hop[HOP_GOOD] : hop[HOP_SLOW];
	return hop[HOP_GOOD] ? hop[HOP_GOOD] : hop[HOP_SLOW] ? hop[HOP_SLOW] : hop[HOP_QUIET];
}

/* Random nodes: links up, closed, quiet, slow, duplicated; the view-based
 * answer equals the full scan's for every mode, and a closed link leaves
 * the view once links_gen moves. */
static void test_next_hop_view(void)
{
	uint64_t x = 7;
	unsigned differ = 0, found = 0;
	for (int round = 0; round < 300; round++) {
		ring_addr self, peers[24];
		unsigned k = 1 + round % 24;
		rand_bytes(&x, self.b, sizeof self.b);
		for (unsigned i = 0; i < k; i++) {
			rand_bytes(&x, peers[i].b, sizeof peers[i].b);
			if (i && round % 5 == 0)
				peers[i] = peers[i - 1];        /* two links to one peer */
		}
		struct node n;
		fake_node(&n, &self, peers, k);
		n.loop.now_ms = 100000;
		unsigned i = 0;
		for (struct link *l = n.links; l; l = l->next, i++) {
			unsigned pick = (unsigned)((x = x * 6364136223846793005ull + 1442695040888963407ull) >> 33) % 8;
			l->last_rx_ms = pick == 0 ? 1000 : n.loop.now_ms;         /* quiet */
			l->rtt_spike_ms = pick == 1 ? n.loop.now_ms - 10 : 0;     /* slow */
			if (pick == 2)
				link_teardown(l, 0, false);                       /* closed, not yet reaped */
		}
		n.links_gen++;
		for (int q = 0; q < 20; q++) {
			ring_addr t;
			rand_bytes(&x, t.b, sizeof t.b);
			if (q == 0)
				t = peers[0];
			for (uint8_t mode = MODE_EXACT; mode <= MODE_PRED; mode++) {
				n.loop.now_ms++;                /* no memo */
				struct link *want = next_hop_reference(&n, mode, &t), *got = ring_next_hop(&n, mode, &t);
				differ += want != got;
				found += got != NULL;
			}
		}
		link_reap(&n);
		for (struct link *l = n.links; l; l = l->next)
			CHECK(l->state != LINK_CLOSED);
		ring_addr side[RING_NEAR_PER_SIDE];
		unsigned got = ring_side_nearest(&n, true, side, RING_NEAR_PER_SIDE);
		unsigned usable = 0;
		for (struct link *l = n.links; l; l = l->next)
			usable += ring_link_usable(l);
		CHECK(got == (usable < RING_NEAR_PER_SIDE ? usable : RING_NEAR_PER_SIDE) || round % 5 == 0);
		fake_node_free(&n);
	}
	CHECK(differ == 0);
	CHECK(found > 10000);
}

/* --ip auto: candidates stay inside the net and off its reserved
 * addresses; the gateway is the last host address. */
static void test_lease_pick(void)
{
	struct ip_state ip = { .net = 0x0a800000u, .mask = 0xffff0000u };
	CHECK(ip_gateway(&ip) == 0x0a80fffeu);
	ring_addr a = addr_small(7);
	bool differ = false;
	for (unsigned t = 0; t < 2000; t++) {
		uint32_t c = ip_lease_pick(ip.net, ip.mask, &a, t);
		CHECK(ip_lease_usable(&ip, c));
		differ |= c != ip_lease_pick(ip.net, ip.mask, &a, 0);
	}
	CHECK(differ);
	CHECK(ip_lease_pick(ip.net, ip.mask, &a, 3) == ip_lease_pick(ip.net, ip.mask, &a, 3));
	struct ip_state p30 = { .net = 0xc0a80004u, .mask = 0xfffffffcu };     /* one usable host */
	CHECK(ip_lease_pick(p30.net, p30.mask, &a, 9) == 0xc0a80005u);
	CHECK(ip_gateway(&p30) == 0xc0a80006u);
	CHECK(ip_lease_pick(0xc0a80004u, 0xfffffffeu, &a, 0) == 0);          /* /31: none */
	CHECK(!ip_lease_usable(&ip, 0x0a800000u) && !ip_lease_usable(&ip, 0x0a80ffffu) &&
	      !ip_lease_usable(&ip, 0x0a80fffeu) && !ip_lease_usable(&ip, 0x0a810001u));
}

/* The resolver's parser and encoder, table-driven: what each query gets. */
static void test_dns(void)
{
	static const struct {
		const char *hex;
		int rc;
		const char *name;
	} cases[] = {
		/* id 1234, RD, one question alice.ipop A IN */
		{ "123401000001000000000000" "05616c69636504697070f0" "00010001", DNS_FORMERR, "alice" },
		{ "123401000001000000000000" "05416c696365" "0469706f7000" "00010001", 0, "alice.ipop" },
		{ "123401000001000000000001" "03626f62" "0469706f7000" "001c0001" "0000291000000000000000", 0,
		  "bob.ipop" },                                   /* AAAA with an EDNS OPT record */
		{ "123409000001000000000000" "0178046970" "6f7000" "00010001", DNS_NOTIMP, "" },  /* IQUERY */
		{ "123401000002000000000000" "0178046970" "6f7000" "00010001", DNS_FORMERR, "" }, /* 2 questions */
		{ "123401000001000000000000" "c00c" "00010001", DNS_FORMERR, "" },               /* pointer */
		{ "123401000001000000000000" "0178046970" "6f7000" "0001", DNS_FORMERR, "x.ipop" }, /* short */
		{ "123481800001000000000000" "0178046970" "6f7000" "00010001", -1, "" },         /* a response */
		{ "1234", -1, "" },
		{ "123401000001000000000000" "03612e62" "0469706f7000" "00010001", 0, "a?b.ipop" },
	};
	for (unsigned i = 0; i < ARRAY_LEN(cases); i++) {
		uint8_t msg[128];
		size_t len = strlen(cases[i].hex) / 2;
		struct dns_query q;
		CHECK(buf_unhex(cases[i].hex, msg, len));
		int rc = dns_parse_query(msg, len, &q);
		CHECK(rc == cases[i].rc);
		if (rc >= 0 && cases[i].name[0])
			CHECK(!strcmp(q.name, cases[i].name) || rc != 0);
	}
	uint8_t msg[64], out[128];
	size_t len = 28;
	struct dns_query q;
	CHECK(buf_unhex("abcd01000001000000000000" "05616c696365046970" "6f7000" "00010001", msg, len));
	CHECK(dns_parse_query(msg, len, &q) == 0 && q.qtype == DNS_TYPE_A && q.question_end == len);
	char label[DNS_LABEL_MAX_BYTES + 1];
	CHECK(dns_ipop_label(q.name, label) && !strcmp(label, "alice"));
	CHECK(!dns_ipop_label("a.b.ipop", label) && !dns_ipop_label("ipop", label) &&
	      !dns_ipop_label("example.com", label));
	ssize_t n = dns_answer(out, sizeof out, msg, &q, DNS_NOERROR, 0x0a800005u);
	CHECK(n == (ssize_t)len + 16);
	char hex[2 * 128 + 1];
	buf_hex(out, (size_t)n, hex);
	CHECK(!strcmp(hex, "abcd85000001000100000000" "05616c696365046970" "6f7000" "00010001"
		      "c00c00010001" "0000000a" "0004" "0a800005"));
	n = dns_answer(out, sizeof out, msg, &q, DNS_NXDOMAIN, 0);
	CHECK(n == (ssize_t)len && out[3] == 3 && out[7] == 0);
	CHECK(dns_answer(out, 20, msg, &q, DNS_NOERROR, 1) == -1);
}

/* ipop map: labels are escaped for XML and cut whole, never mid-entity. */
/* The word-at-a-time checksum equals RFC 1071's byte-pair definition for
 * every length and alignment, chained sums included. */
static void test_csum(void)
{
	uint8_t b[2100];
	uint32_t x = 12345;
	for (size_t i = 0; i < sizeof b; i++)
		b[i] = (uint8_t)((x = x * 1103515245u + 12345u) >> 16);
	int bad = 0;
	for (size_t off = 0; off < 8; off++)
		for (size_t len = 0; len < 2048; len += (len < 64 ? 1 : 97))
			bad += tap_csum_fold(tap_csum_add(7, b + off, len)) != sum_plain(7, b + off, len);
	CHECK(bad == 0);
	memset(b, 0xff, sizeof b);                         /* many carries */
	CHECK(tap_csum_fold(tap_csum_add(0, b, 2000)) == 0);
	CHECK(tap_csum_fold(tap_csum_add(tap_csum_add(0, b, 20), b + 20, 1381)) == tap_csum_fold(0xff00 + 700 * 0xffffu));
}

/* What lwIP sends leaves with both checksums right (lwIP makes neither):
 * the IP header's sums to zero, and TCP's with its pseudo-header. */
static void test_lw_checksums(void)
{
	uint8_t pkt[20 + 20 + 333];
	for (size_t i = 0; i < sizeof pkt; i++)
		pkt[i] = (uint8_t)(i * 13 + 5);
	ip_head_put(pkt, 0, sizeof pkt, IP_PROTOCOL_TCP, 0x0a800001, 0x0a800002);
	pkt[10] = pkt[11] = 0x77;                          /* stale: lwIP leaves its own */
	pkt[32] = 0x50;
	lw_checksums_put(pkt, sizeof pkt);
	CHECK(ip_checksum(pkt, 20) == 0);
	uint8_t pseudo[12] = { 10, 128, 0, 1, 10, 128, 0, 2, 0, IP_PROTOCOL_TCP, (sizeof pkt - 20) >> 8, (sizeof pkt - 20) & 255 };
	CHECK(ip_sum_fold(ip_sum_add(ip_sum_add(0, pseudo, 12), pkt + 20, sizeof pkt - 20)) == 0);
	pkt[9] = IP_PROTOCOL_UDP;                          /* not TCP: the header's sum only */
	pkt[40] ^= 1;
	lw_checksums_put(pkt, sizeof pkt);
	CHECK(ip_checksum(pkt, 20) == 0);
}

/* lwIP's heap: a freed block comes back for the next request of its size
 * class, zeroed by calloc; sizes past the classes go straight to malloc. */
static void test_lw_heap(void)
{
	uint8_t *a = ipop_lwip_malloc(100);
	CHECK(a && ((uintptr_t)a & 7) == 0);
	memset(a, 0xee, 100);
	ipop_lwip_free(a);
	uint8_t *b = ipop_lwip_calloc(1, 200);             /* the same class: the same block */
	CHECK(b == a && b[0] == 0 && b[199] == 0);
	uint8_t *c = ipop_lwip_malloc(1500), *d = ipop_lwip_malloc(70000);
	CHECK(c && d && c != b);
	memset(d, 1, 70000);
	ipop_lwip_free(b);
	ipop_lwip_free(c);
	ipop_lwip_free(d);
	ipop_lwip_free(NULL);
	CHECK(ipop_lwip_calloc(SIZE_MAX / 2, 4) == NULL);
}

/* The heap cache trims to what an idle node keeps. */
static void test_lw_heap_trim(void)
{
	void *p[200];
	for (int i = 0; i < 200; i++)
		CHECK((p[i] = ipop_lwip_malloc(100)) != NULL);
	for (int i = 0; i < 200; i++)
		ipop_lwip_free(p[i]);
	CHECK(lw_heap.n_free[0] >= 200);
	lw_heap_trim(LW_HEAP_KEEP_IDLE);
	CHECK(lw_heap.n_free[0] == LW_HEAP_KEEP_IDLE);
}

/* The small class keeps what uploads' segments in flight hold: three
 * blocks each, some 800 segments a stream, four streams.  Kept only 1024
 * (or 4096 with four streams), the rest went back to musl and came back
 * from it on every ACK. */
static void test_lw_heap_keep(void)
{
	enum { N = 10000 };
	static void *p[N];
	lw_heap_trim(0);
	for (int i = 0; i < N; i++)
		CHECK((p[i] = ipop_lwip_malloc(60)) != NULL);
	for (int i = 0; i < N; i++)
		ipop_lwip_free(p[i]);
	CHECK(lw_heap.n_free[0] == N);
	lw_heap_trim(LW_HEAP_KEEP_IDLE);
}

/* A relay's held pbufs as iovecs: chains of two, partial writes inside a
 * pbuf and across chains, the ring growing past its first 64 while
 * wrapped, and the count of bytes matching what went in. */
static void test_lw_held(void)
{
	struct lw_held h = { 0 };
	uint8_t want[200 * 30], got[sizeof want];
	size_t in = 0, out = 0;
	for (int i = 0; i < 200; i++) {
		u16_t a = (u16_t)(1 + i % 13), b = (u16_t)(i % 3 ? 17 : 0);
		struct pbuf *p = pbuf_alloc(PBUF_RAW, a, PBUF_RAM);
		CHECK(p != NULL);
		for (u16_t k = 0; k < a; k++, in++)
			want[in] = ((uint8_t *)p->payload)[k] = (uint8_t)(in * 7);
		if (b) {
			struct pbuf *q = pbuf_alloc(PBUF_RAW, b, PBUF_RAM);
			for (u16_t k = 0; k < b; k++, in++)
				want[in] = ((uint8_t *)q->payload)[k] = (uint8_t)(in * 7);
			pbuf_cat(p, q);
		}
		CHECK(lw_held_push(&h, p));
		if (i == 39 || i == 59) {      /* drain some, in odd-sized writes */
			for (size_t w = 5; out + w <= in - 50; w = w * 3 % 97 + 1) {
				struct iovec iov[4];
				int k = lw_held_iov(&h, iov, 4);
				size_t take = 0;
				for (int j = 0; j < k && take < w; j++) {
					size_t c = iov[j].iov_len < w - take ? iov[j].iov_len : w - take;
					memcpy(got + out + take, iov[j].iov_base, c);
					take += c;
				}
				lw_held_consume(&h, take);
				out += take;
			}
		}
	}
	CHECK(h.cap >= 128);
	struct iovec iov[LW_FLUSH_IOVS];
	int k = lw_held_iov(&h, iov, LW_FLUSH_IOVS);
	for (int j = 0; j < k; j++) {
		memcpy(got + out, iov[j].iov_base, iov[j].iov_len);
		out += iov[j].iov_len;
	}
	CHECK(out == in && memcmp(got, want, in) == 0);
	lw_held_consume(&h, SIZE_MAX);
	CHECK(h.n == 0 && h.off == 0);
	free(h.q);
}

/* A record opened in the spare buffer is taken in where it lies: the
 * pbuf points into it and the next record gets another buffer; a packet
 * from anywhere else is copied, and the spare stays. */
static void test_lw_rx_adopt(void)
{
	static struct node n;
	memset(&n, 0, sizeof n);
	uint8_t *plain = lw_rx_plain(&n);
	CHECK(plain && lw_rx_plain(&n) == plain);
	memset(plain, 0x5a, 200);
	struct pbuf *p = lw_pkt_new(&n.lw, plain + 51, 120);
	CHECK(p && p->payload == plain + 51 && p->tot_len == 120 && n.lw.spare == NULL);
	uint8_t *next = lw_rx_plain(&n);
	CHECK(next && next != plain);
	uint8_t other[64] = { 1, 2, 3 };
	struct pbuf *q = lw_pkt_new(&n.lw, other, sizeof other);
	CHECK(q && q->payload != other && memcmp(q->payload, other, sizeof other) == 0 && n.lw.spare);
	pbuf_free(p);
	pbuf_free(q);
	CHECK(n.lw.n_pkt_free == 2);
	free(n.lw.spare);
	while (n.lw.pkt_free) {
		struct lw_pkt *k = n.lw.pkt_free;
		n.lw.pkt_free = k->next;
		free(k);
	}
}

/* A routed message written in front of its payload (lwIP's packets) is
 * the one encoded behind a header, with and without a via. */
static void test_routed_in_place(void)
{
	uint8_t room[WIRE_ROUTED_ROOM_BYTES + 100], *pkt = room + WIRE_ROUTED_ROOM_BYTES;
	for (int i = 0; i < 100; i++)
		pkt[i] = (uint8_t)(i * 5 + 1);
	for (int via = 0; via < 2; via++) {
		struct wire_routed r = { .mode = MODE_EXACT, .flags = via ? ROUTED_HAS_VIA : 0, .ttl = 7,
					 .hops = 2, .src = addr_top(1), .dst = addr_top(2), .via = addr_top(3),
					 .inner = INNER_IP, .len = 100, .payload = pkt };
		uint8_t copy[WIRE_MAX_PACKET_BYTES], buf[WIRE_MAX_PACKET_BYTES], *msg;
		ssize_t want = wire_routed_encode(copy, sizeof copy, &r);
		CHECK(ring_encode(&r, buf, &msg) == want && msg == buf);
		r.writable = pkt;
		CHECK(ring_encode(&r, buf, &msg) == want && msg == pkt - (want - 100));
		CHECK(want > 0 && memcmp(msg, copy, (size_t)want) == 0);
		struct wire_routed d;
		CHECK(wire_routed_decode(msg, (size_t)want, &d) == 0 && d.writable == NULL && d.len == 100);
	}
}

/* How many datagrams a wake-up asks for: all slots for single records,
 * about LINK_RX_TURN_BYTES of coalesced trains, never none. */
static void test_rx_slots(void)
{
	struct link_rx x = { 0 };
	CHECK(link_rx_slots(&x, LINK_RX_TURN_BYTES) == LINK_BATCH);
	x.avg_bytes = 1400;
	CHECK(link_rx_slots(&x, LINK_RX_TURN_BYTES) == LINK_BATCH);
	x.avg_bytes = 60000;
	CHECK(link_rx_slots(&x, LINK_RX_TURN_BYTES) == LINK_RX_TURN_BYTES / 60000);
	CHECK(link_rx_slots(&x, 100) == 1);
}

/* A pure ACK: IPv4 without options, TCP without options or data, flags
 * ACK alone, the given ports and ack number. */
static void ack_make(uint8_t *pkt, uint16_t sport, uint32_t ack, uint8_t flags)
{
	memset(pkt, 0, LW_ACK_BYTES);
	pkt[0] = 0x45;
	pkt[3] = LW_ACK_BYTES;
	pkt[8] = 64;
	pkt[9] = IP_PROTOCOL_TCP;
	pkt[12] = 10, pkt[13] = 128, pkt[15] = 1;
	pkt[16] = 10, pkt[17] = 128, pkt[19] = 2;
	pkt[20] = (uint8_t)(sport >> 8), pkt[21] = (uint8_t)sport;
	pkt[22] = 0x14, pkt[23] = 0x51;
	pkt[28] = (uint8_t)(ack >> 24), pkt[29] = (uint8_t)(ack >> 16);
	pkt[30] = (uint8_t)(ack >> 8), pkt[31] = (uint8_t)ack;
	pkt[32] = 0x50;
	pkt[33] = flags;
}

/* ACK thinning: a newer pure ACK of a flow replaces the one waiting;
 * duplicates, window updates, other flags and other packets do not merge. */
static void test_lw_ack_thinning(void)
{
	static struct node n;
	uint8_t a[LW_ACK_BYTES], big[LW_ACK_BYTES + 1];
	memset(&n, 0, sizeof n);
	ack_make(a, 40000, 1000, 0x10);
	CHECK(lw_ack_is_pure(a, LW_ACK_BYTES));
	CHECK(!lw_ack_is_pure(a, LW_ACK_BYTES - 1));
	memcpy(big, a, LW_ACK_BYTES);
	CHECK(!lw_ack_is_pure(big, sizeof big));           /* carries data */
	ack_make(a, 40000, 1000, 0x18);
	CHECK(!lw_ack_is_pure(a, LW_ACK_BYTES));           /* PSH */
	ack_make(a, 40000, 1000, 0x11);
	CHECK(!lw_ack_is_pure(a, LW_ACK_BYTES));           /* FIN */
	ack_make(a, 40000, 1000, 0x10);
	a[32] = 0x60;
	CHECK(!lw_ack_is_pure(a, LW_ACK_BYTES));           /* options */
	ack_make(a, 40000, 1000, 0x10);
	a[6] = 0x20;
	CHECK(!lw_ack_is_pure(a, LW_ACK_BYTES));           /* a fragment */

	ack_make(a, 40000, 1000, 0x10);
	CHECK(lw_ack_hold(&n, a) && n.lw.n_acks == 1);
	ack_make(a, 40000, 5000, 0x10);
	CHECK(lw_ack_hold(&n, a) && n.lw.n_acks == 1 && lw_ack_number(n.lw.acks[0]) == 5000);
	ack_make(a, 40000, 5000, 0x10);
	CHECK(!lw_ack_hold(&n, a) && n.lw.n_acks == 1);    /* a duplicate goes now */
	ack_make(a, 40000, 4000, 0x10);
	CHECK(!lw_ack_hold(&n, a));                        /* older: never replaces */
	ack_make(a, 40000, 0xfffffff0u, 0x10);
	CHECK(!lw_ack_hold(&n, a));                        /* "older" across the wrap */
	ack_make(a, 40001, 7, 0x10);
	CHECK(lw_ack_hold(&n, a) && n.lw.n_acks == 2);     /* another flow */
	for (uint16_t port = 40002; n.lw.n_acks < LW_ACKS_HELD; port++) {
		ack_make(a, port, 1, 0x10);
		CHECK(lw_ack_hold(&n, a));
	}
	ack_make(a, 50000, 1, 0x10);
	CHECK(!lw_ack_hold(&n, a) && n.lw.n_acks == LW_ACKS_HELD);  /* full: goes now */
	n.lw.n_acks = 0;
}

static void test_svg_escape(void)
{
	char out[32];
	cli_xml_escape("a<b>&\"c'\x01", out, sizeof out);
	CHECK(!strcmp(out, "a&lt;b&gt;&amp;&quot;c&apos;?"));
	cli_xml_escape("&&&&&&&", out, 12);
	CHECK(!strcmp(out, "&amp;&amp;"));
	CHECK(cli_map_style("near") == 0 && cli_map_style("relayed") == 3 &&
	      cli_map_styles[cli_map_style("something-new")].kind == NULL);
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

/* ---- two link engines back to back over loopback ------------------------ */

static char unit_dir[64];

static const char *unit_key(const char *name, const char *hex)
{
	static char paths[4][128];
	static int k;
	char *p = paths[k++ % 4];
	snprintf(p, 128, "%s/%s", unit_dir, name);
	FILE *f = fopen(p, "w");
	fprintf(f, "%s\n", hex);
	fclose(f);
	chmod(p, 0600);
	return p;
}

static const char KEY_A[] = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
static const char KEY_B[] = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

static int node_up(struct node *n, uint8_t proto, const char *secret)
{
	char err[512];
	struct cli_opts o = { .cmd = CMD_UP, .n_listen = 1, .insecure = secret == NULL };
	o.listen[0] = (struct cli_uri){ proto, "127.0.0.1", 0 };
	if (secret)
		snprintf(o.secret_file, sizeof o.secret_file, "%s", secret);
	int rc = cli_node_init(n, &o, err, sizeof err);
	if (rc < 0) {
		fprintf(stderr, "node init: %s\n", err);
		return rc;
	}
	n->loop.max_wait_ms = 2;        /* pump() turns both loops quickly */
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

static bool pair_up(struct node *a, struct node *b)
{
	return link_find_peer(a, &b->self.addr, true) && link_find_peer(b, &a->self.addr, true);
}

static void pump_until_up(struct node *a, struct node *b, int turns)
{
	for (int i = 0; i < turns && !pair_up(a, b); i++)
		pump(a, b, 1);
}

/* from dials to, both loops turn until the link is up at both ends, then
 * a few more turns drain what is still in flight. */
static bool pair_link(struct node *from, struct node *to, struct node *a, struct node *b)
{
	if (!link_dial(from, &to->self.endpoints[0], &to->self.addr, 0, NULL))
		return false;
	pump_until_up(a, b, 400);
	pump(a, b, 20);
	return pair_up(a, b);
}

static uint32_t echo_got;

static void echo_seen(struct node *n, uint32_t id, uint64_t rtt_us, uint8_t hops)
{
	(void)n;
	(void)rtt_us;
	(void)hops;
	echo_got = id;
}

/* A secure pair handshakes over proto, routes an echo, ratchets its keys
 * across several epochs, and leaves gracefully. */
static void test_secure_pair(uint8_t proto)
{
	static struct node a, b;
	const char *key = unit_key("a.key", KEY_A);
	CHECK(node_up(&a, proto, key) == 0 && node_up(&b, proto, key) == 0);
	CHECK(link_dial(&a, &b.self.endpoints[0], &b.self.addr, 0, NULL) != NULL);
	pump_until_up(&a, &b, 400);
	struct link *la = link_find_peer(&a, &b.self.addr, true), *lb = link_find_peer(&b, &a.self.addr, true);
	CHECK(la && lb && la->initiator && !lb->initiator);
	CHECK(la && lb && la->peer_idx == lb->local_idx && lb->peer_idx == la->local_idx);
	CHECK(la && lb && !memcmp(la->keys->tx, lb->keys->rx, 32) && !memcmp(la->keys->rx, lb->keys->tx, 32));
	CHECK(la && memcmp(la->keys->tx, la->keys->rx, 32) != 0);
	uint8_t want = sodium_runtime_has_aesni() && sodium_runtime_has_avx() ? SEC_AEGIS256
		       : crypto_aead_aes256gcm_is_available() ? SEC_AES256_GCM : SEC_CHACHA20_POLY1305;
	CHECK(la && lb && la->keys->cipher == want && lb->keys->cipher == want);
	pump(&a, &b, 20);
	la = link_find_peer(&a, &b.self.addr, true);
	lb = link_find_peer(&b, &a.self.addr, true);
	CHECK(la && lb && (la->local_roles & ROLE_NEAR) && (lb->local_roles & ROLE_NEAR));
	/* Ratchet every 5 ms; pings keep flowing across epochs. */
	a.rekey_ms = b.rekey_ms = 5;
	a.up.echo_reply = echo_seen;
	for (uint32_t id = 1; id <= 8; id++) {
		echo_got = 0;
		usleep(6000);
		ring_echo_send(&a, &b.self.addr, id);
		pump(&a, &b, 10);
		CHECK(echo_got == id);
	}
	/* Stop ratcheting, then one more echo: b has seen a's last epoch even
	 * if a ratcheted for a keepalive at the end of a busy pump. */
	a.rekey_ms = b.rekey_ms = 3600000;
	echo_got = 0;
	ring_echo_send(&a, &b.self.addr, 9);
	for (int i = 0; i < 100 && echo_got != 9; i++)
		pump(&a, &b, 1);
	CHECK(echo_got == 9);
	la = link_find_peer(&a, &b.self.addr, true);
	lb = link_find_peer(&b, &a.self.addr, true);
	CHECK(la && lb && la->keys->tx_epoch >= 4 && lb->keys->rx_epoch == la->keys->tx_epoch);
	CHECK(a.drops.count[DROP_AUTH_FAILED] == 0 && b.drops.count[DROP_AUTH_FAILED] == 0);
	ring_leave(&a);
	link_tx_flush(&a);                                 /* the end of a's loop turn */
	for (int i = 0; i < 50 && link_find_peer(&b, &a.self.addr, true); i++)
		ev_run_once(&b.loop);
	CHECK(link_find_peer(&b, &a.self.addr, true) == NULL);
	link_reap(&a);
	cli_node_free(&a);
	cli_node_free(&b);
}

/* Proximity neighbour selection probes a far candidate without a link: a
 * cookie-less HS_INIT (valid mac1) comes back as HS_COOKIE with an RTT, and
 * the winner is dialled with that cookie (no second round trip) and comes
 * up far.  A probe from another network is dropped as a non-member: no
 * answer, no link, and the request frees itself. */
static void test_pns_probe(void)
{
	static struct node a, b, c;
	CHECK(node_up(&a, PROTO_UDP, unit_key("a.key", KEY_A)) == 0 && node_up(&b, PROTO_UDP, unit_key("a.key", KEY_A)) == 0);
	CHECK(node_up(&c, PROTO_UDP, unit_key("b.key", KEY_B)) == 0);
	nat_start(&a);
	nat_start(&b);
	CHECK(!ring_reachable(&a) && !ring_reachable(&b));
	struct ring_far_req *f = &a.ring.far[0];
	struct wire_ctm_reply m = { .from = b.self };
	*f = (struct ring_far_req){ .state = FAR_ASKED, .token = 7, .until_ms = ev_now(&a.loop) + 60000 };
	CHECK(ring_far_waiting(&a, 7) == f);
	ring_pns_start(&a, f, &m);
	CHECK(f->state == FAR_PROBING && f->n == 1 && f->cand[0].rtt_us < 0);
	CHECK(a.n_links == 0 && b.n_links == 0);
	for (int i = 0; i < 50 && f->state == FAR_PROBING; i++)
		pump(&a, &b, 1);
	CHECK(f->state == FAR_DIALLING && f->cand[0].rtt_us >= 0 && f->cand[0].ep.port == b.self.endpoints[0].port);
	struct link *l = link_find_peer(&a, &b.self.addr, false);
	CHECK(l && l->initiator && l->hs.s && l->hs.s->has_cookie && (l->want_roles & ROLE_FAR));
	pump_until_up(&a, &b, 400);
	l = link_find_peer(&a, &b.self.addr, true);
	CHECK(l && (l->local_roles & ROLE_FAR));
	/* b took a link a began unasked, but from loopback: a private address
	 * proves nothing for the rest of the world. */
	CHECK(!ring_reachable(&b) && !ring_reachable(&a));
	/* From a public address never contacted: reachable (a far target that
	 * need not dial back).  One we dialled, probed or had a link with:
	 * that came through our hole, not evidence. */
	struct link pub = { .proto = PROTO_UDP, .node = &b };
	pub.remote.sin_family = AF_INET;
	pub.remote.sin_addr.s_addr = htonl(0xCB007105);  /* 203.0.113.5 */
	pub.remote.sin_port = htons(4000);
	pub.node = &a;
	link_note_contact(&a, &pub.remote);
	ring_note_inbound(&a, &pub);
	CHECK(!ring_reachable(&a) && link_contacted(&a, &pub.remote));
	ring_note_inbound(&b, &pub);
	CHECK(ring_reachable(&b) && !link_contacted(&b, &pub.remote));
	CHECK(ring_public_ip(0xCB007105) && !ring_public_ip(0x0A000001) && !ring_public_ip(0xAC100001) &&
	      !ring_public_ip(0xC0A80101) && !ring_public_ip(0x7F000001) && !ring_public_ip(0x64400001) &&
	      ring_public_ip(0xAC200001) && ring_public_ip(0x08080808));
	pump(&a, &b, 5);
	ring_pns_upkeep(&a);
	CHECK(f->state == FAR_FREE);
	CHECK(b.drops.count[DROP_NOT_MEMBER] == 0 && b.drops.count[DROP_UNKNOWN_SENDER] == 0);

	/* c is of another network: b does not answer its probe. */
	struct ring_far_req *g = &c.ring.far[0];
	*g = (struct ring_far_req){ .state = FAR_ASKED, .token = 9, .until_ms = ev_now(&c.loop) + 60000 };
	ring_pns_start(&c, g, &m);
	pump(&c, &b, 20);
	CHECK(g->state == FAR_PROBING && g->cand[0].rtt_us < 0 && b.drops.count[DROP_NOT_MEMBER] == 1);
	/* No answer by the deadline: the replier is dialled as any peer (with
	 * the NAT section's fallbacks), which fails the same way. */
	g->until_ms = 0;
	ring_pns_upkeep(&c);
	CHECK(g->state == FAR_DIALLING && c.n_links == 1);
	pump(&c, &b, 20);
	CHECK(b.drops.count[DROP_NOT_MEMBER] >= 2 && !link_find_peer(&c, &b.self.addr, true));
	g->until_ms = 0;
	ring_pns_upkeep(&c);
	CHECK(g->state == FAR_FREE);
	cli_node_free(&a);
	cli_node_free(&b);
	cli_node_free(&c);

	/* TCP only: no probes (they are UDP); the replier is dialled and made far. */
	static struct node d, e;
	CHECK(node_up(&d, PROTO_TCP, unit_key("a.key", KEY_A)) == 0 && node_up(&e, PROTO_TCP, unit_key("a.key", KEY_A)) == 0);
	struct ring_far_req *h = &d.ring.far[0];
	struct wire_ctm_reply me = { .from = e.self };
	*h = (struct ring_far_req){ .state = FAR_ASKED, .token = 5, .until_ms = ev_now(&d.loop) + 60000 };
	ring_pns_start(&d, h, &me);
	CHECK(h->state == FAR_DIALLING);
	pump_until_up(&d, &e, 400);
	l = link_find_peer(&d, &e.self.addr, true);
	CHECK(l && l->proto == PROTO_TCP && (l->local_roles & ROLE_FAR));
	ring_pns_upkeep(&d);
	CHECK(h->state == FAR_FREE);
	cli_node_free(&d);
	cli_node_free(&e);
}

/* A NAT'd peer (public and private endpoints) dialled unasked gets its
 * hellos at the punch TTL; once it dials us (a connect-to-me answer), the
 * dial under way sends at the usual TTL with a full round of tries, and no
 * second dial starts.  Left at the punch TTL, a symmetric NAT'd node's
 * answer to a full cone peer never reached it (t_natlab's F-S pair). */
static void test_punch_lift(void)
{
	static struct node a;
	CHECK(node_up(&a, PROTO_UDP, unit_key("a.key", KEY_A)) == 0);
	nat_start(&a);
	struct peer_info pi = { .addr = addr_top(0x77), .n_endpoints = 2 };
	pi.endpoints[0] = (struct endpoint){ PROTO_UDP, 0xCB007115u, 4000 };  /* 203.0.113.21 */
	pi.endpoints[1] = (struct endpoint){ PROTO_UDP, 0x0A010002u, 4000 };  /* 10.1.0.2: not our scope */
	ring_dial(&a, &pi, 0);
	struct link *l = link_find_peer(&a, &pi.addr, false);
	CHECK(l && a.n_links == 1 && l->state == LINK_AWAIT_RESP && l->punch_ttl == NAT_PUNCH_TTL);
	l->hs.tries = LINK_HELLO_TRIES - 1;
	ring_dial(&a, &pi, 0);                  /* unasked again: no change */
	CHECK(a.n_links == 1 && l->punch_ttl == NAT_PUNCH_TTL && l->hs.tries == LINK_HELLO_TRIES - 1);
	ring_dial_answer(&a, &pi, 0);
	CHECK(a.n_links == 1 && l->state == LINK_AWAIT_RESP && l->punch_ttl == 0 && l->hs.tries == 0);
	cli_node_free(&a);
}

/* Nodes that offer different record ciphers (no AES-NI, or IPOP_CIPHER)
 * agree on the fastest both offer, whichever end dials, and records of
 * every size pass both ways.  The software implementations stand in where
 * this CPU lacks AES-NI: the test is about the agreement and the tag
 * lengths, not the speed. */
static void test_cipher_mix(void)
{
	const uint8_t all = SEC_CIPHERS_BASE | 1u << SEC_AES256_GCM | 1u << SEC_AEGIS256;
	const struct { uint8_t a, b, want; } mix[] = {
		{ SEC_CIPHERS_BASE, all, SEC_CHACHA20_POLY1305 },
		{ SEC_CIPHERS_BASE | 1u << SEC_AES256_GCM, all, SEC_AES256_GCM },
		{ SEC_CIPHERS_BASE | 1u << SEC_AEGIS256, all, SEC_AEGIS256 },
		{ all, all, SEC_AEGIS256 },
		{ SEC_CIPHERS_BASE | 1u << SEC_AEGIS256, SEC_CIPHERS_BASE | 1u << SEC_AES256_GCM,
		  SEC_CHACHA20_POLY1305 },
	};
	for (size_t m = 0; m < sizeof mix / sizeof mix[0]; m++) {
		if (mix[m].want == SEC_AES256_GCM && !crypto_aead_aes256gcm_is_available())
			continue;       /* libsodium has no software AES-GCM */
		CHECK(sec_cipher_pick(mix[m].a, mix[m].b) == mix[m].want &&
		      sec_cipher_pick(mix[m].b, mix[m].a) == mix[m].want);
		for (int dialer = 0; dialer < 2; dialer++) {
			static struct node a, b;
			const char *key = unit_key("a.key", KEY_A);
			CHECK(node_up(&a, PROTO_UDP, key) == 0 && node_up(&b, PROTO_UDP, key) == 0);
			a.sec.ciphers = mix[m].a;
			b.sec.ciphers = mix[m].b;
			CHECK(dialer ? pair_link(&b, &a, &a, &b) : pair_link(&a, &b, &a, &b));
			struct link *la = link_find_peer(&a, &b.self.addr, true);
			struct link *lb = link_find_peer(&b, &a.self.addr, true);
			CHECK(la && lb && la->keys->cipher == mix[m].want && lb->keys->cipher == mix[m].want);
			a.up.echo_reply = echo_seen;
			echo_got = 0;
			ring_echo_send(&a, &b.self.addr, 41);
			pump(&a, &b, 10);
			CHECK(echo_got == 41);
			/* The largest message fits one 1472-byte record with any tag
			 * and opens (a wrong tag length would fail as AUTH_FAILED). */
			uint8_t big[WIRE_MAX_PACKET_BYTES];
			memset(big, 0, sizeof big);
			big[0] = WIRE_PING;      /* too long for a ping: opened, then dropped as malformed */
			uint64_t before = lb ? lb->rx_packets : 0;
			CHECK(la && link_send(la, big, sizeof big) == 0);
			pump(&a, &b, 5);
			CHECK(lb && lb->rx_packets == before + 1);
			CHECK(a.drops.count[DROP_AUTH_FAILED] == 0 && b.drops.count[DROP_AUTH_FAILED] == 0);
			cli_node_free(&a);
			cli_node_free(&b);
		}
	}
}

/* Every record cipher opens what it sealed, at every size a record holds,
 * and refuses a flipped bit in the ciphertext, the tag or the header it
 * authenticates, and a wrong epoch or counter. */
static void test_record_ciphers(void)
{
	uint8_t key[SEC_KEY_BYTES], aad[WIRE_DATA_HDR_BYTES], in[WIRE_MAX_PACKET_BYTES];
	uint8_t out[WIRE_MAX_PACKET_BYTES + SEC_TAG_MAX_BYTES], back[WIRE_MAX_PACKET_BYTES];
	for (size_t i = 0; i < sizeof key; i++)
		key[i] = (uint8_t)(i * 7 + 1);
	for (size_t i = 0; i < sizeof in; i++)
		in[i] = (uint8_t)(i * 13);
	memset(aad, 0x5a, sizeof aad);
	CHECK(WIRE_DATA_HDR_BYTES + WIRE_MAX_PACKET_BYTES + SEC_TAG_MAX_BYTES == 1472);
	CHECK(sec_tag_bytes(SEC_AEGIS256) == 32 && sec_tag_bytes(SEC_AES256_GCM) == 16 &&
	      sec_tag_bytes(SEC_CHACHA20_POLY1305) == 16);
	const size_t lens[] = { 0, 1, 15, 16, 17, 31, 32, 33, 64, 1360, WIRE_MAX_PACKET_BYTES };
	for (uint8_t c = 0; c < SEC__CIPHER_END; c++) {
		if (c == SEC_AES256_GCM && !crypto_aead_aes256gcm_is_available())
			continue;
		size_t tag = sec_tag_bytes(c);
		for (size_t k = 0; k < sizeof lens / sizeof lens[0]; k++) {
			size_t len = lens[k];
			sec_seal(c, key, 3, 1000 + k, aad, sizeof aad, in, len, out);
			memset(back, 0xee, sizeof back);
			CHECK(sec_open(c, key, 3, 1000 + k, aad, sizeof aad, out, len + tag, back) &&
			      !memcmp(back, in, len));
			CHECK(!sec_open(c, key, 4, 1000 + k, aad, sizeof aad, out, len + tag, back));
			CHECK(!sec_open(c, key, 3, 1001 + k, aad, sizeof aad, out, len + tag, back));
			CHECK(!sec_open(c, key, 3, 1000 + k, aad, sizeof aad, out, len + tag - 1, back));
			out[len + tag - 1] ^= 1;        /* the tag's last byte */
			CHECK(!sec_open(c, key, 3, 1000 + k, aad, sizeof aad, out, len + tag, back));
			out[len + tag - 1] ^= 1;
			if (len) {
				out[len / 2] ^= 0x80;
				CHECK(!sec_open(c, key, 3, 1000 + k, aad, sizeof aad, out, len + tag, back));
				out[len / 2] ^= 0x80;
			}
			aad[2] ^= 1;
			CHECK(!sec_open(c, key, 3, 1000 + k, aad, sizeof aad, out, len + tag, back));
			aad[2] ^= 1;
		}
	}
	CHECK(!sec_open(SEC_AEGIS256, key, 3, 0, aad, sizeof aad, out, 31, back));
}

/* A peer whose process died (its port closed) is found out from the ICMP
 * "port unreachable" our next datagrams provoke: the link closes within a
 * few hundred ms of the first send, not after LINK_DEAD_MS of silence. */
static void test_icmp_refused(void)
{
	static struct node a, b;
	const char *key = unit_key("a.key", KEY_A);
	CHECK(node_up(&a, PROTO_UDP, key) == 0 && node_up(&b, PROTO_UDP, key) == 0);
	CHECK(pair_link(&a, &b, &a, &b));
	close(b.listeners[0].fd);                          /* b "crashes": its port is gone */
	uint64_t t0 = ev_clock_us();
	ring_echo_send(&a, &b.self.addr, 77);
	while (link_find_peer(&a, &b.self.addr, true) && ev_clock_us() - t0 < 3000000) {
		ev_run_once(&a.loop);
	}
	uint64_t took_ms = (ev_clock_us() - t0) / 1000;
	CHECK(link_find_peer(&a, &b.self.addr, true) == NULL);
	CHECK(took_ms < LINK_DEAD_MS / 2);
	cli_node_free(&a);
	cli_node_free(&b);
}

/* Replayed and tampered records are dropped and counted; a fresh one passes. */
static void test_replay_tamper(void)
{
	static struct node a, b;
	const char *key = unit_key("a.key", KEY_A);
	CHECK(node_up(&a, PROTO_UDP, key) == 0 && node_up(&b, PROTO_UDP, key) == 0);
	pair_link(&a, &b, &a, &b);
	struct link *la = link_find_peer(&a, &b.self.addr, true), *lb = link_find_peer(&b, &a.self.addr, true);
	CHECK(la && lb);
	if (!la || !lb)
		return;
	/* Capture two records on their way to b. */
	uint8_t pkt[2][2048];
	ssize_t r[2];
	struct sockaddr_in from;
	int fd = b.listeners[0].fd;
	for (int i = 0; i < 2; i++) {
		link_send_ping(la, WIRE_PING, 77 + (uint32_t)i, 1);
		link_tx_flush(&a);
		usleep(2000);
		socklen_t fl = sizeof from;
		r[i] = recvfrom(fd, pkt[i], sizeof pkt[i], MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
		CHECK(r[i] > WIRE_DATA_OVERHEAD_BYTES && pkt[i][1] == WIRE_DATA);
	}
	uint64_t rx0 = lb->rx_packets, replay0 = b.drops.count[DROP_REPLAY], auth0 = b.drops.count[DROP_AUTH_FAILED];
	link_input(&b, NULL, fd, &from, pkt[0], (size_t)r[0]);
	CHECK(b.drops.count[DROP_REPLAY] == replay0 && b.drops.count[DROP_AUTH_FAILED] == auth0);
	link_input(&b, NULL, fd, &from, pkt[0], (size_t)r[0]);   /* the same record again */
	CHECK(b.drops.count[DROP_REPLAY] == replay0 + 1);
	pkt[1][r[1] - 20] ^= 0x01;                         /* a flipped ciphertext bit */
	link_input(&b, NULL, fd, &from, pkt[1], (size_t)r[1]);
	CHECK(b.drops.count[DROP_AUTH_FAILED] == auth0 + 1);
	pkt[1][r[1] - 20] ^= 0x01;
	pkt[1][10] ^= 0x80;                                /* a tampered header counter */
	link_input(&b, NULL, fd, &from, pkt[1], (size_t)r[1]);
	CHECK(b.drops.count[DROP_AUTH_FAILED] == auth0 + 2);
	pkt[1][10] ^= 0x80;                                /* the genuine record still passes */
	link_input(&b, NULL, fd, &from, pkt[1], (size_t)r[1]);
	CHECK(b.drops.count[DROP_AUTH_FAILED] == auth0 + 2 && b.drops.count[DROP_REPLAY] == replay0 + 1);
	CHECK(lb->rx_packets == rx0 + 5 && lb->state == LINK_UP);
	/* The window: far-behind counters are refused, unseen recent ones pass. */
	struct sec_replay w = { 0 };
	CHECK(sec_replay_ok(&w, 0));
	sec_replay_commit(&w, 0);
	CHECK(!sec_replay_ok(&w, 0));
	sec_replay_commit(&w, 5000);
	CHECK(!sec_replay_ok(&w, 5000) && sec_replay_ok(&w, 4999) && sec_replay_ok(&w, 5000 - 1900));
	CHECK(!sec_replay_ok(&w, 100));                   /* older than the window */
	sec_replay_commit(&w, 4999);
	CHECK(!sec_replay_ok(&w, 4999) && sec_replay_ok(&w, 4998) && sec_replay_ok(&w, 6000));
	cli_node_free(&a);
	cli_node_free(&b);
}

/* Wrong secret: no link, the responder counts a non-member and keeps no
 * state.  Mixed modes: refused with a reject. */
static void test_refusals(void)
{
	static struct node a, b;
	CHECK(node_up(&a, PROTO_UDP, unit_key("a.key", KEY_A)) == 0);
	CHECK(node_up(&b, PROTO_UDP, unit_key("b.key", KEY_B)) == 0);
	link_dial(&a, &b.self.endpoints[0], &b.self.addr, 0, NULL);
	pump(&a, &b, 100);
	CHECK(!pair_up(&a, &b) && b.drops.count[DROP_NOT_MEMBER] > 0 && b.n_links == 0);
	cli_node_free(&a);
	cli_node_free(&b);
	log_cfg.level = -1;                                /* the mode error is expected */
	CHECK(node_up(&a, PROTO_UDP, NULL) == 0);
	CHECK(node_up(&b, PROTO_UDP, unit_key("b.key", KEY_B)) == 0);
	struct link *l = link_dial(&a, &b.self.endpoints[0], &b.self.addr, 0, NULL);
	CHECK(l != NULL);
	pump(&a, &b, 50);
	CHECK(!pair_up(&a, &b) && b.drops.count[DROP_MODE_MISMATCH] > 0 && b.n_links == 0 && a.n_links == 0);
	log_cfg.level = LOG_ERROR;
	cli_node_free(&a);
	cli_node_free(&b);
}

/* Two nodes with one virtual IP in a secret network: a claim proves
 * nothing (a member may say anything), so neither stops; the one that met
 * the other's claim counts it (issue 18). */
static void test_duplicate_ip(void)
{
	static struct node a, b;
	char err[512];
	struct cli_opts o = { .cmd = CMD_UP, .n_listen = 1, .has_ip = true, .ip = 0x0a800005u,
			      .prefix = 16, .mode = MODE_NONE };
	o.listen[0] = (struct cli_uri){ PROTO_UDP, "127.0.0.1", 0 };
	snprintf(o.secret_file, sizeof o.secret_file, "%s", unit_key("a.key", KEY_A));
	CHECK(cli_node_init(&a, &o, err, sizeof err) == 0 && cli_node_init(&b, &o, err, sizeof err) == 0);
	a.loop.max_wait_ms = b.loop.max_wait_ms = 2;
	link_start(&a);
	ring_start(&a);
	link_start(&b);
	ring_start(&b);
	b.self.started = a.self.started + 1;
	CHECK(wire_addr_eq(&a.self.addr, &b.self.addr) && a.self.instance != b.self.instance);
	log_cfg.level = -1;
	link_dial(&b, &a.self.endpoints[0], NULL, ROLE_LEAF, NULL);
	for (int i = 0; i < 200 && !b.drops.count[DROP_ADDRESS_CLAIM]; i++)
		pump(&a, &b, 1);
	log_cfg.level = LOG_ERROR;
	CHECK(b.drops.count[DROP_ADDRESS_CLAIM] > 0 && !b.loop.stop && b.exit_code == 0);
	CHECK(!a.loop.stop && a.exit_code == 0);
	cli_node_free(&a);
	cli_node_free(&b);
}

/* A link closed with a BYE still routes what the peer sent before the BYE
 * reached it (a flash crowd's extra far candidates are closed while their
 * peers route over them: docs/SCALING.md), and is freed after the drain. */
/* Unproven TCP streams (issue 18 item 5): a source past its share loses its
 * own oldest; a full table loses the oldest of all; a closed one leaves. */
static void test_link_unproven(void)
{
	static struct node n;
	ring_addr self = addr_top(0x10);
	fake_node(&n, &self, NULL, 0);
	struct sockaddr_in x = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(0x0a000001) };
	struct link *from_x[LINK_UNPROVEN_PER_IP_MAX + 1];
	for (unsigned i = 0; i <= LINK_UNPROVEN_PER_IP_MAX; i++) {
		from_x[i] = link_new(&n, PROTO_TCP, -1, &x, false);
		from_x[i]->state = LINK_AWAIT_INIT;
		CHECK(link_unproven_add(&n, from_x[i]));
	}
	CHECK(from_x[0]->state == LINK_CLOSED && from_x[1]->state == LINK_AWAIT_INIT);
	CHECK(n.n_unproven == LINK_UNPROVEN_PER_IP_MAX && n.drops.count[DROP_PENDING_EVICTED] == 1);
	struct link *first_other = NULL;
	for (unsigned i = 0; n.n_unproven < LINK_UNPROVEN_MAX; i++) {
		struct sockaddr_in o = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(0x0b000000 + i) };
		struct link *l = link_new(&n, PROTO_TCP, -1, &o, false);
		l->state = LINK_AWAIT_INIT;
		CHECK(link_unproven_add(&n, l));
		if (!first_other)
			first_other = l;
	}
	struct sockaddr_in y = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(0x0c000001) };
	struct link *l = link_new(&n, PROTO_TCP, -1, &y, false);
	l->state = LINK_AWAIT_INIT;
	CHECK(link_unproven_add(&n, l));
	CHECK(from_x[1]->state == LINK_CLOSED && first_other->state == LINK_AWAIT_INIT);
	CHECK(n.n_unproven == LINK_UNPROVEN_MAX);
	link_close(l, 0);
	CHECK(n.n_unproven == LINK_UNPROVEN_MAX - 1 && n.unproven[n.n_unproven - 1] != l);
	fake_node_free(&n);
	CHECK(n.unproven == NULL && n.n_unproven == 0);
}

static void unit_ev_ignore(struct ev_loop *loop, int fd, void *arg, uint32_t events)
{
	(void)loop, (void)fd, (void)arg, (void)events;
}

/* A resting fd reports nothing until its rest is over; forgetting it ends
 * the rest. */
static void test_ev_rest(void)
{
	struct ev_loop loop;
	int sv[2];
	struct epoll_event ev;
	CHECK(ev_init(&loop) == 0 && socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
	CHECK(write(sv[1], "x", 1) == 1);
	CHECK(ev_fd_watch(&loop, sv[0], EPOLLIN, unit_ev_ignore, NULL) == 0);
	CHECK(epoll_wait(loop.epfd, &ev, 1, 0) == 1);
	ev_fd_rest(&loop, sv[0]);
	CHECK(epoll_wait(loop.epfd, &ev, 1, 0) == 0);
	loop.now_ms += EV_REST_MS - 1;
	ev_run_timers(&loop);
	CHECK(epoll_wait(loop.epfd, &ev, 1, 0) == 0);
	loop.now_ms += 1;
	ev_run_timers(&loop);
	CHECK(epoll_wait(loop.epfd, &ev, 1, 0) == 1);
	ev_fd_rest(&loop, sv[0]);
	CHECK(ev_rest_find(&loop, sv[0]) != NULL && loop.heap_len == 1);
	ev_fd_forget(&loop, sv[0]);
	CHECK(ev_rest_find(&loop, sv[0]) == NULL && loop.heap_len == 0);
	close(sv[0]);
	close(sv[1]);
	ev_fini(&loop);
}

static void test_link_drain(void)
{
	static struct node a, b;
	const char *key = unit_key("a.key", KEY_A);
	CHECK(node_up(&a, PROTO_UDP, key) == 0 && node_up(&b, PROTO_UDP, key) == 0);
	CHECK(pair_link(&a, &b, &a, &b));
	struct link *la = link_find_peer(&a, &b.self.addr, true);
	CHECK(la != NULL);
	if (!la)
		return;
	uint64_t delivered = a.counters_delivered, unknown = a.drops.count[DROP_UNKNOWN_SENDER];
	ring_echo_send(&b, &a.self.addr, 5);               /* on its way when a closes */
	link_tx_flush(&b);
	link_close(la, BYE_UNNEEDED);
	link_tx_flush(&a);
	usleep(2000);
	ev_run_once(&a.loop);
	link_reap(&a);
	CHECK(a.counters_delivered == delivered + 1 && a.drops.count[DROP_UNKNOWN_SENDER] == unknown);
	CHECK(la->state == LINK_CLOSED && la->drain_until_ms > ev_now(&a.loop) && !link_find_peer(&a, &b.self.addr, false));
	unsigned links = a.n_links;
	CHECK(a.reap_drain_ms == la->drain_until_ms);     /* the next walk: when the drain ends */
	la->drain_until_ms = a.reap_drain_ms = 1;          /* the drain is over, as 2 s later */
	link_reap(&a);
	CHECK(a.n_links == links - 1);
	cli_node_free(&a);
	cli_node_free(&b);
}

/* An insecure pair (both --insecure) still links and carries plain records. */
static void test_insecure_pair(void)
{
	static struct node a, b;
	log_cfg.level = -1;
	CHECK(node_up(&a, PROTO_TCP, NULL) == 0 && node_up(&b, PROTO_TCP, NULL) == 0);
	log_cfg.level = LOG_ERROR;
	link_dial(&a, &b.self.endpoints[0], &b.self.addr, 0, NULL);
	pump_until_up(&a, &b, 400);
	CHECK(pair_up(&a, &b));
	cli_node_free(&a);
	cli_node_free(&b);
}

/* Shortcuts: the decayed rate, the trimming choice, the traffic table,
 * the stall test on RTT samples, and routing around a stalled neighbour. */
static void test_shortcuts(void)
{
	double r = 0;
	for (int i = 0; i < 40; i++)                       /* 100 pps, 20 s of 500 ms ticks */
		r = ring_rate_decay(r, 50, 500, RING_SC_WINDOW_MS);
	CHECK(r > 99 && r < 101);
	CHECK(ring_rate_decay(r, 0, 0, RING_SC_WINDOW_MS) == r);       /* no time, no change */
	double first = ring_rate_decay(0, 500, 500, RING_SC_WINDOW_MS);  /* 1000 pps starts */
	CHECK(first > 20 * 10);                            /* past a 20 pps threshold in one tick */
	for (int i = 0; i < 4; i++)                        /* stopped for one window: 1/e */
		r = ring_rate_decay(r, 0, 500, RING_SC_WINDOW_MS);
	CHECK(r > 100 / M_E - 1 && r < 100 / M_E + 1);
	r = ring_rate_decay(100, 0, 2000, RING_SC_WINDOW_MS);  /* one long tick: the same */
	CHECK(r > 100 / M_E - 1 && r < 100 / M_E + 1);

	double rates[] = { 5, 1, 3 };
	CHECK(ring_sc_victim(rates, 3, 10) == 1);          /* the least used goes */
	CHECK(ring_sc_victim(rates, 3, 2) == -1);          /* not twice as busy: keep it */
	CHECK(ring_sc_victim(rates, 3, INFINITY) == 1);
	CHECK(ring_sc_victim(rates, 0, 10) == -1);

	CHECK(!link_rtt_spiked(-1, 500));                  /* no floor yet */
	CHECK(!link_rtt_spiked(0.3, 10));                  /* jitter on loopback */
	CHECK(link_rtt_spiked(0.3, 60));
	CHECK(!link_rtt_spiked(20, 100) && link_rtt_spiked(20, 120));

	struct node n;
	ring_addr self = addr_top(0x10);
	ring_addr peers[] = { addr_top(0x20), addr_top(0x30), addr_top(0x08), addr_top(0x90), addr_top(0xf0) };
	fake_node(&n, &self, peers, ARRAY_LEN(peers));
	uint64_t now = ev_now(&n.loop);
	struct link *l90 = NULL;
	for (struct link *l = n.links; l; l = l->next) {
		l->last_rx_ms = now;                       /* none quiet */
		if (wire_addr_eq(&l->peer.addr, &peers[3]))
			l90 = l;
	}
	ring_addr t = addr_top(0x85);
	CHECK(next_hop_fresh(&n, MODE_NEAREST, &t) == l90);
	CHECK(ring_next_hop(&n, MODE_NEAREST, &t) == l90);       /* the memo's answer */
	CHECK(ring_next_hop(&n, MODE_NEAREST, &peers[1]) != l90);  /* another target: asked anew */
	l90->rtt_spike_ms = now;                           /* 0x90 stalled: 0x30 is next best */
	struct link *h = next_hop_fresh(&n, MODE_NEAREST, &t);
	CHECK(h && wire_addr_eq(&h->peer.addr, &peers[1]));
	CHECK(next_hop_fresh(&n, MODE_EXACT, &peers[3]) == l90);   /* still the way to itself */
	for (struct link *l = n.links; l; l = l->next)
		l->rtt_spike_ms = now;                     /* all stalled: greedy as before */
	CHECK(next_hop_fresh(&n, MODE_NEAREST, &t) == l90);

	/* A quiet link (a likely crash): NEAREST takes the next best, or ends
	 * here rather than go that way; EXACT to the peer itself still goes. */
	for (struct link *l = n.links; l; l = l->next)
		l->rtt_spike_ms = 0;
	n.loop.now_ms += LINK_QUIET_MS + 1;
	for (struct link *l = n.links; l; l = l->next)
		l->last_rx_ms = n.loop.now_ms;
	l90->last_rx_ms = now;
	h = next_hop_fresh(&n, MODE_NEAREST, &t);
	CHECK(h && wire_addr_eq(&h->peer.addr, &peers[1]));
	for (struct link *l = n.links; l; l = l->next)
		l->last_rx_ms = now;                       /* every link quiet: end here */
	CHECK(next_hop_fresh(&n, MODE_NEAREST, &t) == NULL);
	CHECK(next_hop_fresh(&n, MODE_SUCC, &t) != NULL);   /* other modes: greedy as before */
	CHECK(next_hop_fresh(&n, MODE_EXACT, &peers[3]) == l90);

	/* DHT holders: the quiet 0x90 does not count, so for a key at 0x60 we
	 * (0x10) are among the 3 nearest live nodes with 0x30 and 0x20... */
	for (struct link *l = n.links; l; l = l->next)
		l->last_rx_ms = n.loop.now_ms;
	l90->last_rx_ms = now;
	struct link *hl[DHT_REPLICAS];
	bool self_in;
	ring_addr k60 = addr_top(0x60);
	unsigned kh = dht_holders(&n, &k60, false, hl, &self_in);
	CHECK(kh == 2 && self_in && wire_addr_eq(&hl[0]->peer.addr, &peers[1]) &&
	      wire_addr_eq(&hl[1]->peer.addr, &peers[0]));
	/* ...and leaving, we name three others: 0x08 in our place. */
	kh = dht_holders(&n, &k60, true, hl, &self_in);
	CHECK(kh == 3 && !self_in && wire_addr_eq(&hl[2]->peer.addr, &peers[2]));
	/* REPLICAs: 0x08 is the fourth nearest we see (0x90 quiet), an old
	 * holder handing over: taken; with 0x90 awake it is the fifth: not. */
	struct link *l08 = NULL;
	for (struct link *l = n.links; l; l = l->next)
		if (wire_addr_eq(&l->peer.addr, &peers[2]))
			l08 = l;
	CHECK(l08 && dht_replica_from_holder(&n, l08, &k60));
	l90->last_rx_ms = n.loop.now_ms;
	CHECK(!dht_replica_from_holder(&n, l08, &k60) && dht_replica_from_holder(&n, l90, &k60));
	l90->last_rx_ms = now;

	/* The table: a peer is found again; a full probe window evicts the
	 * quietest; an uncounted peer has no rate. */
	n.ring.sc.pps = 20;
	ring_addr a = addr_top(0x42);
	for (int i = 0; i < 1000; i++)
		ring_sc_count(&n, &a);
	struct ring_sc_peer *p = ring_sc_find(&n, &a, false);
	CHECK(p && p->packets == 1000);
	p->pps = 50;
	CHECK(ring_sc_rate(&n, &a) == 50);
	for (unsigned i = 1; i < RING_SC_PROBE + 4; i++) {  /* same hash, other addresses */
		ring_addr b = a;
		b.b[19] = (uint8_t)i;
		ring_sc_count(&n, &b);
	}
	CHECK(ring_sc_find(&n, &a, false) != NULL);        /* the busy one stays */
	ring_addr none = addr_top(0x77);
	CHECK(ring_sc_rate(&n, &none) < 0);
	n.ring.sc.pps = 0;
	ring_sc_count(&n, &none);                          /* off: nothing counted */
	CHECK(ring_sc_rate(&n, &none) < 0);

	/* Closing the hop ring_next_hop remembered voids its memo. */
	for (struct link *l = n.links; l; l = l->next)
		l->last_rx_ms = ev_now(&n.loop);
	CHECK(next_hop_fresh(&n, MODE_EXACT, &peers[3]) == l90);
	CHECK(ring_next_hop(&n, MODE_EXACT, &peers[3]) == l90);
	link_teardown(l90, 0, false);
	CHECK(ring_next_hop(&n, MODE_EXACT, &peers[3]) != l90);
	fake_node_free(&n);
}

/* ---- credentials: revocation list swap, issuing limits ------------------ */

static void unit_write(const char *path, const char *text, time_t mtime)
{
	FILE *f = fopen(path, "w");
	fputs(text, f);
	fclose(f);
	struct timespec ts[2] = { { mtime, 0 }, { mtime, 0 } };
	utimensat(AT_FDCWD, path, ts, 0);       /* a new mtime even within one clock tick */
}

static bool unit_revoked(struct sec_creds *s, const char *hex)
{
	struct sec_serial ser = { .len = (uint8_t)(strlen(hex) / 2) };
	return buf_unhex(hex, ser.b, ser.len) && sec_revoked(s, &ser);
}

/* A list that fails to parse leaves the one in force whole (the old code
 * had already copied the lines before the bad one over it), is reported
 * once, not every tick, and a fixed file is read again. */
static void test_crl_swap(void)
{
	struct sec_creds s;
	char err[300], path[128];
	CHECK(sec_creds_init(&s) == 0);
	snprintf(path, sizeof path, "%s/crl.txt", unit_dir);
	snprintf(s.ctx->crl_path, sizeof s.ctx->crl_path, "%s", path);
	unit_write(path, "aa01  # one\nbb02\n", 1000000);
	CHECK(sec_crl_refresh(&s, err, sizeof err) == 1 && s.ctx->n_revoked == 2 && s.ctx->crl_gen == 1);
	CHECK(sec_crl_refresh(&s, err, sizeof err) == 0);
	unit_write(path, "cc03\nnot-hex\nbb02\n", 1000001);
	CHECK(sec_crl_refresh(&s, err, sizeof err) == -1 && strstr(err, ":2:"));
	CHECK(s.ctx->n_revoked == 2 && s.ctx->crl_gen == 1);
	CHECK(unit_revoked(&s, "aa01") && unit_revoked(&s, "bb02") && !unit_revoked(&s, "cc03"));
	CHECK(sec_crl_refresh(&s, err, sizeof err) == 0);        /* one warning per bad file */
	unit_write(path, "cc03\n", 1000002);
	CHECK(sec_crl_refresh(&s, err, sizeof err) == 1 && s.ctx->n_revoked == 1 && s.ctx->crl_gen == 2);
	CHECK(unit_revoked(&s, "cc03") && !unit_revoked(&s, "aa01"));
	unlink(path);
	CHECK(sec_crl_refresh(&s, err, sizeof err) == -1 && sec_crl_refresh(&s, err, sizeof err) == 0);
	CHECK(s.ctx->n_revoked == 1 && unit_revoked(&s, "cc03"));
	sec_creds_free(&s);
}

/* cert issue refuses what nodes refuse at start (a prefix wider than
 * IP_ROUTE_MIN_PREFIX) before it writes anything; --valid-for sets the
 * end to the second; genkey's file creation refuses a symbolic link. */
static void test_cert_issue_limits(void)
{
	static struct cli_opts o;
	char ca[128], out[128], path[160], err[300];
	struct stat st;
	snprintf(ca, sizeof ca, "%s/ca", unit_dir);
	o = (struct cli_opts){ .cmd = CMD_CA_INIT };
	snprintf(o.out, sizeof o.out, "%s", ca);
	CHECK(cli_ca_init(&o) == EXIT_OK);
	fprintf(stderr, "(expected error lines follow)\n");
	o = (struct cli_opts){ .cmd = CMD_CERT_ISSUE };
	snprintf(o.ca_dir, sizeof o.ca_dir, "%s", ca);
	snprintf(out, sizeof out, "%s/wide", unit_dir);
	snprintf(o.out, sizeof o.out, "%s", out);
	CHECK(cli_grant_route(&o, "10.9.0.0/16") == 0);          /* parses; issuing refuses */
	CHECK(cli_cert_issue(&o) == EXIT_USAGE && stat(out, &st) < 0);
	CHECK(ip_route_width_check(0x0a090000, 16, err, sizeof err) < 0 && strstr(err, "at most /24"));
	CHECK(ip_route_width_check(0x0a090000, IP_ROUTE_MIN_PREFIX, err, sizeof err) == 0);
	o.grant.n_routes = 0;
	CHECK(cli_grant_route(&o, "10.9.7.0/24") == 0);
	const struct cli_flag *vf = cli_flag_find("valid-for", 0, CMD_CERT_ISSUE);
	CHECK(vf && cli_apply(&o, vf, "90s") == 0 && o.valid_s == 90);
	snprintf(out, sizeof out, "%s/short", unit_dir);
	snprintf(o.out, sizeof o.out, "%s", out);
	time_t now = time(NULL);
	CHECK(cli_cert_issue(&o) == EXIT_OK);
	mbedtls_x509_crt crt;
	struct sec_grant g;
	mbedtls_x509_crt_init(&crt);
	snprintf(path, sizeof path, "%s/node.crt", out);
	CHECK(sec_parse_pem(path, false, &crt, NULL, NULL, err, sizeof err) == 0);
	sec_grant_of(&crt, &g);
	CHECK(g.n_routes == 1 && g.route_len[0] == 24);
	CHECK(g.not_after_s >= now + 89 && g.not_after_s <= time(NULL) + 91);
	mbedtls_x509_crt_free(&crt);
	o.days = 30;
	CHECK(cli_cert_issue(&o) == EXIT_USAGE);                 /* --days and --valid-for */
	CHECK(cli_parse_valid_for(&o, "2h") == 0 && o.valid_s == 7200);
	CHECK(cli_parse_valid_for(&o, "400d") == 0 && o.valid_s == 400 * 86400);
	const char *bad[] = { "0s", "-5s", "5", "5x", "s", "", " 5s", "5s ", "36501d" };
	for (unsigned i = 0; i < sizeof bad / sizeof bad[0]; i++)
		CHECK(cli_parse_valid_for(&o, bad[i]) < 0);
	char link_path[160], target[160];
	snprintf(target, sizeof target, "%s/elsewhere", unit_dir);
	snprintf(link_path, sizeof link_path, "%s/net.key", unit_dir);
	CHECK(symlink(target, link_path) == 0);
	CHECK(sec_write_new_file(link_path, "k\n", 2, true, err, sizeof err) < 0 && stat(target, &st) < 0);
	unlink(link_path);
	CHECK(sec_write_new_file(link_path, "k\n", 2, true, err, sizeof err) == 0 && stat(link_path, &st) == 0 &&
	      (st.st_mode & 0777) == 0600);
	CHECK(sec_write_new_file(link_path, "k\n", 2, true, err, sizeof err) < 0 && strstr(err, "overwrite"));
}

/* Issue 18 item 6: a peer's endpoints are dialled only in scopes we live
 * in, never our own; dial-backs follow a generic cell rate. */
static void test_ring_scopes(void)
{
	static struct node n;
	n.self.n_endpoints = 1;
	n.self.endpoints[0] = (struct endpoint){ PROTO_UDP, 0x7f000001u, 4000 };
	CHECK(ring_scope_of(0x00000001u) == RING_SCOPE_NEVER && ring_scope_of(0xe0000001u) == RING_SCOPE_NEVER &&
	      ring_scope_of(0xffffffffu) == RING_SCOPE_NEVER && ring_scope_of(0x7f000002u) == RING_SCOPE_LOOPBACK &&
	      ring_scope_of(0xa9fe0101u) == RING_SCOPE_LINK_LOCAL && ring_scope_of(0x0a000001u) == RING_SCOPE_PRIVATE &&
	      ring_scope_of(0x64400001u) == RING_SCOPE_PRIVATE && ring_scope_of(0xc0a80101u) == RING_SCOPE_PRIVATE &&
	      ring_scope_of(0x08080808u) == RING_SCOPE_PUBLIC);
	struct endpoint lo = { PROTO_UDP, 0x7f000001u, 4001 }, self = { PROTO_UDP, 0x7f000001u, 4000 },
			lan = { PROTO_TCP, 0x0a000001u, 22 }, pub = { PROTO_UDP, 0x08080808u, 53 },
			any = { PROTO_UDP, 0, 4001 }, mc = { PROTO_UDP, 0xe0000001u, 4001 },
			ll = { PROTO_UDP, 0xa9fe0101u, 4001 };
	CHECK(ring_endpoint_dialable(&n, &lo) && ring_endpoint_dialable(&n, &pub));
	CHECK(!ring_endpoint_dialable(&n, &self) && !ring_endpoint_dialable(&n, &lan) &&
	      !ring_endpoint_dialable(&n, &any) && !ring_endpoint_dialable(&n, &mc) && !ring_endpoint_dialable(&n, &ll));
	CHECK(n.drops.count[DROP_DIAL_SCOPE] == 5);
	n.ring.boot[n.ring.n_boot++] = (struct endpoint){ PROTO_UDP, 0x0a010203u, 4000 };
	CHECK(ring_endpoint_dialable(&n, &lan) && !ring_endpoint_dialable(&n, &any));
	uint64_t due = 0;
	/* Our own address on another port is this host: only if we live on loopback. */
	static struct node h;
	h.self.n_endpoints = 1;
	h.self.endpoints[0] = (struct endpoint){ PROTO_UDP, 0x0a000005u, 4000 };
	struct endpoint host_ssh = { PROTO_TCP, 0x0a000005u, 22 }, lan_ssh = { PROTO_TCP, 0x0a000006u, 22 };
	CHECK(!ring_endpoint_dialable(&h, &host_ssh) && ring_endpoint_dialable(&h, &lan_ssh));
	h.ring.boot[h.ring.n_boot++] = (struct endpoint){ PROTO_UDP, 0x7f000001u, 4001 };
	CHECK(ring_endpoint_dialable(&h, &host_ssh));
	CHECK(ring_rate_take(&due, 1000, 100, 2) && ring_rate_take(&due, 1000, 100, 2) &&
	      !ring_rate_take(&due, 1000, 100, 2) && !ring_rate_take(&due, 1099, 100, 2) &&
	      ring_rate_take(&due, 1100, 100, 2) && !ring_rate_take(&due, 1100, 100, 2));
}

/* DHT messages: the signed lease fields round trip; a write other than
 * PUT or CREATE is malformed. */
static void test_dht_wire(void)
{
	uint8_t buf[512], sig[8] = "sigbytes";
	struct wire_dht m = { .op = DHT_REPLICA, .token = 7, .key_len = 5, .key = (const uint8_t *)"name:",
			      .owner = addr_top(0x42), .ttl_s = 60, .wop = DHT_CREATE, .expires = 0x123456789aull,
			      .value_len = 4, .value = (const uint8_t *)"\x0a\0\0\1", .sig_len = 8, .sig = sig };
	ssize_t len = dht_encode(buf, sizeof buf, &m);
	struct wire_dht d;
	CHECK(len == 45 + 5 + 4 + 8 && dht_decode(buf, (size_t)len, &d) == 0);
	CHECK(d.wop == DHT_CREATE && d.expires == m.expires && d.ttl_s == 60 && d.value_len == 4 &&
	      d.sig_len == 8 && !memcmp(d.sig, sig, 8) && wire_addr_eq(&d.owner, &m.owner));
	m.wop = DHT_GET;
	len = dht_encode(buf, sizeof buf, &m);
	CHECK(len > 0 && dht_decode(buf, (size_t)len, &d) < 0);
}

/* Per-owner quotas: one owner past DHT_OWNER_RECORDS_MAX is refused
 * "full", and REPLICAs count against their owner; another owner is not
 * refused, and the full owner still renews a key it has. */
static void test_dht_quota(void)
{
	struct node n;
	ring_addr self = addr_top(0x10), peers[] = { addr_top(0x20) };
	fake_node(&n, &self, peers, 1);
	char key[32];
	struct wire_dht m = { .op = DHT_REPLICA, .owner = addr_top(0xa0), .ttl_s = 60, .value_len = 1,
			      .value = (const uint8_t *)"x", .key = (const uint8_t *)key };
	unsigned ok = 0;
	for (unsigned i = 0; i < DHT_OWNER_RECORDS_MAX + 10; i++) {
		m.key_len = (uint8_t)snprintf(key, sizeof key, "k%u", i);
		ok += dht_store(&n, &m, false) == DHT_OK;
	}
	CHECK(ok == DHT_OWNER_RECORDS_MAX && n.dht.n_records == DHT_OWNER_RECORDS_MAX);
	m.key_len = (uint8_t)snprintf(key, sizeof key, "k%u", DHT_OWNER_RECORDS_MAX + 1);
	CHECK(dht_store(&n, &m, false) == DHT_FULL);
	m.key_len = (uint8_t)snprintf(key, sizeof key, "k0");
	m.ttl_s = 120;
	CHECK(dht_store(&n, &m, false) == DHT_OK);
	m.owner = addr_top(0xb0);
	m.op = DHT_PUT;
	m.key_len = (uint8_t)snprintf(key, sizeof key, "name:b");
	CHECK(dht_store(&n, &m, false) == DHT_OK && n.dht.n_records == DHT_OWNER_RECORDS_MAX + 1);
	/* The indexes follow removals (the last record moves into the gap)
	 * and rebuilds: every record is found, and the counts add up. */
	unsigned found = 0, k = 0;
	for (unsigned i = 0; i < 3000; i++)
		dht_record_free(&n.dht, &n.dht.records[(i * 7919u) % n.dht.n_records]);
	for (unsigned i = 0; i < 2000; i++) {
		m.owner = addr_top((uint8_t)(0xc0 + i % 8));
		m.key_len = (uint8_t)snprintf(key, sizeof key, "again%u", i);
		k += dht_store(&n, &m, false) == DHT_OK;
	}
	for (unsigned i = 0; i < n.dht.n_records; i++)
		found += dht_find(&n.dht, n.dht.records[i].key, strlen(n.dht.records[i].key)) == &n.dht.records[i];
	m.key_len = (uint8_t)snprintf(key, sizeof key, "k%u", DHT_OWNER_RECORDS_MAX + 5);
	CHECK(k == 2000 && found == n.dht.n_records && !dht_find(&n.dht, key, m.key_len));
	unsigned counted[3] = { 0 }, owners[3] = { 0xa0, 0xb0, 0xc7 };
	for (unsigned i = 0; i < n.dht.n_records; i++)
		for (unsigned j = 0; j < 3; j++)
			counted[j] += n.dht.records[i].owner.b[0] == owners[j];
	CHECK(dht_owned(&n.dht, &self) == 0 && counted[2] == 250 && counted[0] + counted[1] == DHT_OWNER_RECORDS_MAX + 1 - 3000);
	for (unsigned j = 0; j < 3; j++)
		CHECK(dht_owned(&n.dht, &(ring_addr){ .b = { (uint8_t)owners[j] } }) == counted[j]);
	dht_stop(&n);
	fake_node_free(&n);
}

/* RELEASE answers a surplus holder's REPLICA whether we store it or not
 * (t_dht case 3: a node pushed a copy in error kept it 12 s).  Key K; we
 * and three links are nearer to it than the sender, the fifth we see:
 * its REPLICA is refused (not a holder), and it must hear RELEASE, since
 * that push is the only time it asks.  A fourth (one link fewer) is
 * stored and told too; a routed REPLICA (not over the sender's link) is
 * neither.  Datagrams are caught by n->udp_send, per link by port. */
static unsigned rel_sent[8];

static int rel_catch(struct node *n, const struct sockaddr_in *to, const uint8_t *pkt, size_t len)
{
	(void)n;
	static const uint8_t rel[] = { DHT_RELEASE, 0, 0, 0, 0, 0, 3, 'r', 'e', 'l' };
	for (size_t i = 0; i + sizeof rel <= len; i++)
		if (!memcmp(pkt + i, rel, sizeof rel) && ntohs(to->sin_port) < ARRAY_LEN(rel_sent))
			rel_sent[ntohs(to->sin_port)]++;
	return 0;
}

static void test_dht_release(void)
{
	ring_addr h = dht_hash("rel", 3), self = h, peers[4];
	self.b[0] = (uint8_t)(h.b[0] + 4);              /* distances: links 1, 2, 3; us 4; sender 5 */
	for (unsigned i = 0; i < 4; i++) {
		peers[i] = h;
		peers[i].b[0] = (uint8_t)(h.b[0] - (i == 3 ? 5 : i + 1));
	}
	struct node n;
	fake_node(&n, &self, peers, 4);
	n.udp_send = rel_catch;
	struct link *from = NULL, *l2 = NULL;
	for (struct link *l = n.links; l; l = l->next) {
		l->last_rx_ms = ev_now(&n.loop);
		for (unsigned i = 0; i < 4; i++)
			if (wire_addr_eq(&l->peer.addr, &peers[i]))
				l->remote.sin_port = htons((uint16_t)(i + 1));
		from = wire_addr_eq(&l->peer.addr, &peers[3]) ? l : from;
		l2 = wire_addr_eq(&l->peer.addr, &peers[2]) ? l : l2;
	}
	struct wire_dht m = { .op = DHT_REPLICA, .key_len = 3, .key = (const uint8_t *)"rel",
			      .owner = addr_top(0xa0), .ttl_s = 60, .value_len = 1, .value = (const uint8_t *)"x" };
	struct wire_routed rt = { .mode = MODE_EXACT, .src = peers[3], .dst = self, .inner = INNER_DHT };
	n.ring.rx = from;
	CHECK(from && l2 && !dht_replica_from_holder(&n, from, &h));
	dht_on_replica(&n, &rt, &m);
	CHECK(n.dht.n_records == 0 && rel_sent[4] == 1);        /* refused, and told */
	n.ring.rx = NULL;                                       /* routed: proves nothing */
	dht_on_replica(&n, &rt, &m);
	CHECK(n.dht.n_records == 0 && rel_sent[4] == 1);
	l2->last_rx_ms = ev_now(&n.loop) - LINK_QUIET_MS - 1;   /* link 3 quiet: the sender is fourth */
	n.ring.rx = from;
	dht_on_replica(&n, &rt, &m);
	CHECK(n.dht.n_records == 1 && rel_sent[4] == 2);        /* stored (a holder handing over), told */
	dht_stop(&n);
	fake_node_free(&n);
}

/* A lost HS_FIN (issue 18 made responders resend HS_RESP only when asked):
 * the initiator counts the link up and sends DATA; the responder, still
 * awaiting HS_FIN, answers it with HS_RESP once more, and the initiator
 * with its cached HS_FIN.  Two simulated nodes (no sockets: n->udp_send),
 * the first HS_FIN dropped on the way. */
struct fin_pkt {
	unsigned to;
	struct sockaddr_in from;
	size_t len;
	uint8_t data[WIRE_MAX_RECORD_BYTES];
};
static struct fin_pkt fin_q[32];
static unsigned fin_qn;

static int fin_send(struct node *n, const struct sockaddr_in *to, const uint8_t *pkt, size_t len)
{
	if (fin_qn == 32 || len > sizeof fin_q[0].data)
		return -1;
	struct fin_pkt *p = &fin_q[fin_qn++];
	p->to = (ntohl(to->sin_addr.s_addr) & 0xff) - 1;
	p->from = n->listeners[0].sa;
	p->len = len;
	memcpy(p->data, pkt, len);
	return 0;
}

static void fin_node(struct node *n, unsigned i)
{
	*n = (struct node){ .udp_dial_fd = -1, .tap.fd = -1, .tap.ns_fd = { -1, -1 }, .lw.socks_fd = -1,
			    .udp_send = fin_send };
	n->loop = (struct ev_loop){ .epfd = -1, .now_ms = 1000, .max_wait_ms = 1000, .virtual_time = true };
	sec_rng_init(&n->rng);
	n->rekey_ms = LINK_REKEY_MS;
	sec_cookie_rotate(&n->sec, &n->rng, n->loop.now_ms);
	n->self.addr = addr_top((uint8_t)(0x10 + i));
	n->self.instance = 1 + i;
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(4000), .sin_addr.s_addr = htonl(0x0a000001 + i) };
	n->listeners[0] = (struct listener){ .proto = PROTO_UDP, .fd = SIM_FD, .sa = sa };
	n->n_listeners = 1;
	n->self.endpoints[0] = link_endpoint_of(PROTO_UDP, &sa);
	n->self.n_endpoints = 1;
}

/* Deliver what was sent; drop the first HS_FIN if drop_fin. */
static void fin_pump(struct node *nodes[2], bool *drop_fin)
{
	for (unsigned i = 0; i < fin_qn; i++) {
		struct fin_pkt *p = &fin_q[i];
		if (*drop_fin && p->len > 1 && p->data[1] == WIRE_HS_FIN) {
			*drop_fin = false;
			continue;
		}
		link_input(nodes[p->to], NULL, SIM_FD, &p->from, p->data, p->len);
	}
	fin_qn = 0;
}

static void test_lost_hs_fin(void)
{
	static struct node a, b;
	struct node *nodes[2] = { &a, &b };
	fin_node(&a, 0);
	fin_node(&b, 1);
	bool drop = true;
	struct link *la = link_dial(&a, &b.self.endpoints[0], &b.self.addr, 0, NULL);
	for (int i = 0; i < 4 && fin_qn; i++)
		fin_pump(nodes, &drop);
	struct link *lb = b.links;
	CHECK(la && la->state == LINK_UP && !drop && lb && lb->state == LINK_AWAIT_FIN);
	link_send_byte(la, WIRE_ROLES, 0);                  /* a counts the link up: DATA */
	for (int i = 0; i < 4 && fin_qn; i++)
		fin_pump(nodes, &drop);
	CHECK(lb->state == LINK_UP);
	link_send_byte(la, WIRE_ROLES, 0);
	fin_pump(nodes, &drop);
	CHECK(b.drops.count[DROP_WRONG_STATE] == 1 && fin_qn == 0);    /* one resend, then quiet */
	link_free_all(&a);
	link_free_all(&b);
	sec_rng_free(&a.rng);
	sec_rng_free(&b.rng);
}

/* A SOCKS UDP datagram's destination: addresses, names, ".ipop", bad ones. */
static void test_socks_udp_header(void)
{
	static const struct {
		const char *hex;        /* the header, then data "ab" */
		int rc;
		uint32_t ip;
		const char *name;
	} v[] = {
		{ "0000000180000102" "0035" "6162", 0, 0x80000102, "" },
		{ "00000003" "03" "626f62" "0035" "6162", 0, 0, "bob" },
		{ "00000003" "08" "626f622e69706f70" "0035" "6162", 0, 0, "bob" },              /* bob.ipop */
		{ "00000003" "08" "31302e302e302e39" "0035" "6162", 0, 0x0a000009, "" },        /* 10.0.0.9 */
		{ "00000003" "03" "626f01" "0035" "6162", -1, 0, "" },                          /* control char */
		{ "00000003" "04" "626f6220" "0035" "6162", -1, 0, "" },                        /* blank */
		{ "00000003" "00" "0035" "6162", -1, 0, "" },                                   /* empty */
		{ "00000003" "40" "0035", -1, 0, "" },                                          /* 64 bytes */
		{ "00000103" "03" "626f62" "0035" "6162", -1, 0, "" },                          /* fragment */
		{ "00000004" "0000000000000000", -1, 0, "" },                                   /* IPv6 */
		{ "00000003" "05" "626f62", -1, 0, "" },                                        /* short */
	};
	for (unsigned i = 0; i < ARRAY_LEN(v); i++) {
		uint8_t d[128];
		char name[SOCKS_UDP_NAME_BYTES];
		uint32_t ip = 1;
		uint16_t port = 0;
		size_t len = strlen(v[i].hex) / 2, at = 0;
		CHECK(buf_unhex(v[i].hex, d, len));
		int rc = socks_udp_header(d, len, &ip, name, &port, &at);
		CHECK(rc == v[i].rc);
		if (rc == 0) {
			CHECK(ip == v[i].ip && !strcmp(name, v[i].name) && port == 53);
			CHECK(at == len - 2 && !memcmp(d + at, "ab", 2));
		}
	}
}

/* The hand-written rtnetlink request for a veth pair: every length nests. */
static void test_veth_request(void)
{
	struct tap_nl m;
	tap_nl_veth_request(&m, "ipop0", "ipop0p", 1360);
	uint32_t total;
	memcpy(&total, m.buf, 4);
	CHECK(total == m.len && m.len < TAP_NL_BYTES && m.len % 4 == 0);
	/* after nlmsghdr and ifinfomsg: IFNAME, MTU, LINKINFO{KIND, DATA{PEER{ifinfomsg, IFNAME, MTU}}} */
	size_t at = sizeof(struct tap_nl_hdr) + sizeof(struct tap_nl_ifinfo);
	uint16_t len, type;
	unsigned seen = 0;
	while (at + 4 <= m.len) {
		memcpy(&len, m.buf + at, 2);
		memcpy(&type, m.buf + at + 2, 2);
		CHECK(len >= 4 && at + len <= m.len);
		if (type == TAP_IFLA_IFNAME)
			CHECK(!strcmp((char *)m.buf + at + 4, "ipop0") && ++seen);
		if (type == TAP_IFLA_LINKINFO) {
			CHECK(at + len == m.len && ++seen);     /* the last, holding the rest */
			CHECK(!memcmp(m.buf + at + 8, "veth", 5));
			size_t data = at + 4 + 12;      /* KIND's attribute: 4 + "veth\0" padded to 8 */
			uint16_t dlen, plen;
			memcpy(&dlen, m.buf + data, 2);
			memcpy(&plen, m.buf + data + 4, 2);
			CHECK(data + dlen == m.len && plen == dlen - 4);
			CHECK(!strcmp((char *)m.buf + data + 8 + sizeof(struct tap_nl_ifinfo) + 4, "ipop0p"));
		}
		at += (len + 3u) & ~3u;
	}
	CHECK(seen == 2 && at == m.len);
}

int main(void)
{
	log_cfg.level = LOG_ERROR;
	test_sha1();
	test_ip_sum();
	test_ring_arith();
	test_buf();
	test_wire_handshake();
	test_wire_small();
	test_wire_routed();
	test_wire_relay();
	test_nat_classify();
	test_overlay_endpoints();
	test_remember();
	test_wire_ctm();
	test_timers();
	test_config();
	test_next_hop();
	test_gso_batch();
	test_hs_admission();
	test_next_hop_view();
	test_shortcuts();
	test_dht_wire();
	test_dht_quota();
	test_dht_release();
	test_contents();
	test_lease_pick();
	test_dns();
	test_socks_udp_header();
	test_veth_request();
	test_svg_escape();
	test_csum();
	test_lw_heap();
	test_lw_heap_trim();
	test_lw_heap_keep();
	test_lw_checksums();
	test_lw_held();
	test_routed_in_place();
	test_lw_rx_adopt();
	test_rx_slots();
	test_lw_ack_thinning();
	snprintf(unit_dir, sizeof unit_dir, "/tmp/ipop-unit-XXXXXX");
	CHECK(mkdtemp(unit_dir) != NULL);
	test_secure_pair(PROTO_UDP);
	test_pns_probe();
	test_punch_lift();
	test_secure_pair(PROTO_TCP);
	test_replay_tamper();
	test_cipher_mix();
	test_record_ciphers();
	test_icmp_refused();
	test_refusals();
	test_insecure_pair();
	test_link_unproven();
	test_ev_rest();
	test_link_drain();
	test_duplicate_ip();
	test_lost_hs_fin();
	test_crl_swap();
	test_cert_issue_limits();
	test_ring_scopes();
	char cmd[128];
	snprintf(cmd, sizeof cmd, "rm -rf %s", unit_dir);
	CHECK(system(cmd) == 0);
	printf("%d passed, %d failed\n", t_pass, t_fail);
	return t_fail ? 1 : 0;
}
