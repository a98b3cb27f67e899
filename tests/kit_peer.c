/* The hostile-peer kit's member (issue 18): a real ipop node, built from
 * ipop.c itself, that a test scripts into lying.
 *
 *   kit_peer [KIT OPTIONS] -- [ipop up flags]
 *
 * It joins like `ipop up` (same flags, same handshakes, same ring code), so
 * it is a genuine member (or, with a certificate from another CA and
 * --mac-ca, an outsider holding only the network's public ca.crt).  What it
 * claims about itself comes from the options below; what it sends after
 * joining comes from commands on standard input, one per line, each answered
 * by one line on standard output ("ok ..." or "err ...").
 *
 * Kit options (before "--"):
 *   --claim-started N     the start time it reports (1: "older than anyone")
 *   --claim-addr HEX|IP   the ring address it claims (an IP: its SHA-1)
 *   --claim-vip IP        the virtual IP it reports
 *   --mac-ca DIR          derive the handshake cookie/MAC keys from DIR/ca.crt
 *                         and DIR/network.key if there (an outsider's own CA
 *                         signs its identity; what it knows of the network)
 *
 * Commands:
 *   links                       one "link ADDR VIP PROTO" line per up link, then "ok N"
 *   bye REASON [ADDR]           close every up link (or the one to ADDR) with this BYE reason
 *   ctm-reply DST CLAIM STARTED send DST an unasked CONNECT-TO-ME reply that lists a
 *                               neighbour at ring address CLAIM started at STARTED
 *   routed MODE DST INNER HEX   send any routed message (MODE 1 exact .. 4 pred)
 *   ctm-flood req|reply DST N ROTATE EP...
 *                               send DST N connect-to-me requests (or unasked replies)
 *                               whose sender lists the endpoints EP (udp:IP:PORT or
 *                               tcp:IP:PORT, up to 4); ROTATE 1: each from another
 *                               made-up ring address (the routed source too)
 *   ip-flood N DST NET ROTATE   send N INNER_IP packets (UDP, 28 bytes) to virtual IP DST,
 *                               the sources random, half inside NET (A.B.C.D/P), half
 *                               outside; ROTATE 1: each from a made-up ring address
 *   dht-forge VALUE|off [KEY]   answer every DHT GET that reaches us, delivered or in
 *                               transit, with OK, VALUE (text) and no certificate; with
 *                               KEY, a record for KEY instead, signed as ourselves
 *   dht-flood OP N PREFIX [DST [VIA]]
 *                               write N records PREFIX0 .. PREFIX<N-1> (a 16-byte value,
 *                               24 h lease, signed as ourselves in certificate networks):
 *                               OP put routes each like ipop dht put; OP replica sends each
 *                               as a REPLICA to DST (through VIA), or to every up link.
 *                               KIT_FLOOD_PER_MS a millisecond; "flooded N" when done
 *   quit                        leave (as on SIGTERM)
 * ADDR, DST and CLAIM are 40 hex digits or a dotted IPv4 address (its SHA-1).
 */
#include "../ipop.c"

static struct kit {
	struct node n;
	struct ctl ctl;
	char line[8192];
	size_t line_len;
	char forge[DHT_VALUE_MAX_BYTES + 1];    /* dht-forge's value; empty: off */
	char forge_key[DHT_KEY_MAX_BYTES + 1];  /* dht-forge's other key; empty: the one asked */
	void (*routed)(struct node *n, struct link *l, const uint8_t *pkt, size_t len);
	struct kit_flood {
		bool replica, to_all, has_via;
		unsigned next, count;
		char prefix[64];
		ring_addr dst, via;
		struct ev_timer timer;
	} flood;
} kit;

enum { KIT_FLOOD_PER_MS = 10 };         /* 10,000 records a second: about what a holder stores */

static void kit_say(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
	fflush(stdout);
}

static bool kit_addr(const char *s, ring_addr *out)
{
	struct in_addr ia;
	if (inet_pton(AF_INET, s, &ia) == 1) {
		*out = sec_addr_of_ip(ntohl(ia.s_addr));
		return true;
	}
	return strlen(s) == 2 * RING_ADDR_BYTES && buf_unhex(s, out->b, RING_ADDR_BYTES);
}

/* ---- commands ---------------------------------------------------------- */

static void kit_links(void)
{
	struct link *l;
	unsigned k = 0;
	link_for_each(&kit.n, l) {
		if (l->state != LINK_UP)
			continue;
		char a[2 * RING_ADDR_BYTES + 1], ip[16];
		ring_addr_hex(&l->peer.addr, a);
		buf_ip_str(l->peer.vip, ip);
		kit_say("link %s %s %s", a, ip, l->proto == PROTO_UDP ? "udp" : "tcp");
		k++;
	}
	kit_say("ok %u", k);
}

static void kit_bye(char **arg, int argc)
{
	ring_addr only;
	if (argc < 1 || (argc > 1 && !kit_addr(arg[1], &only)))
		return kit_say("err usage: bye REASON [ADDR]");
	struct link *l;
	unsigned k = 0;
	link_for_each(&kit.n, l)
		if (l->state == LINK_UP && (argc < 2 || wire_addr_eq(&l->peer.addr, &only))) {
			link_close(l, (uint8_t)atoi(arg[0]));
			k++;
		}
	kit_say("ok %u", k);
}

static void kit_ctm_reply(char **arg, int argc)
{
	struct wire_ctm_reply m = { .token = (uint32_t)sec_random_u64(&kit.n.rng), .from = kit.n.self };
	ring_addr dst;
	if (argc != 3 || !kit_addr(arg[0], &dst) || !kit_addr(arg[1], &m.neighbours[0].addr))
		return kit_say("err usage: ctm-reply DST CLAIM STARTED");
	m.neighbours[0].instance = sec_random_u64(&kit.n.rng);
	m.neighbours[0].started = (uint32_t)strtoul(arg[2], NULL, 10);
	m.n_neighbours = 1;
	uint8_t payload[WIRE_MAX_PACKET_BYTES];
	ssize_t len = wire_ctm_reply_encode(payload, sizeof payload, &m);
	if (len <= 0)
		return kit_say("err encode");
	ring_send(&kit.n, MODE_EXACT, &dst, NULL, INNER_CTM_REPLY, payload, (size_t)len);
	kit_say("ok");
}

static void kit_routed_cmd(char **arg, int argc)
{
	ring_addr dst;
	static uint8_t payload[WIRE_MAX_PACKET_BYTES];
	if (argc != 4 || !kit_addr(arg[1], &dst))
		return kit_say("err usage: routed MODE DST INNER HEX");
	size_t hl = strlen(arg[3]);
	if (hl % 2 || hl / 2 > sizeof payload || !buf_unhex(arg[3], payload, hl / 2))
		return kit_say("err bad hex");
	ring_send(&kit.n, (uint8_t)atoi(arg[0]), &dst, NULL, (uint8_t)atoi(arg[2]), payload, hl / 2);
	kit_say("ok");
}

static void kit_dht_forge(char **arg, int argc)
{
	if (argc < 1 || argc > 2 || strlen(arg[0]) > DHT_VALUE_MAX_BYTES ||
	    (argc > 1 && strlen(arg[1]) > DHT_KEY_MAX_BYTES))
		return kit_say("err usage: dht-forge VALUE|off [KEY]");
	snprintf(kit.forge, sizeof kit.forge, "%s", strcmp(arg[0], "off") ? arg[0] : "");
	snprintf(kit.forge_key, sizeof kit.forge_key, "%s", argc > 1 ? arg[1] : "");
	kit_say("ok");
}

/* m as a record for key, signed by us as dht_request signs (certificate
 * networks): genuine, but not what was asked. */
static void kit_sign(struct node *n, struct wire_dht *m, const uint8_t *key, uint8_t sig[SEC_SIG_MAX_BYTES])
{
	uint8_t h[32];
	size_t sig_len = 0;
	m->key = key;
	m->key_len = (uint8_t)strlen((const char *)key);
	if (n->sec.mode != SEC_CERT)
		return;
	m->wop = DHT_PUT;
	m->expires = dht_unix_now() + m->ttl_s;
	dht_sig_hash(m, h);
	if (sec_sign(&n->sec, &n->rng, h, sig, &sig_len) == 0) {
		m->cert = n->sec.ctx->own.raw.p;
		m->cert_len = (uint16_t)n->sec.ctx->own.raw.len;
		m->sig = sig;
		m->sig_len = (uint8_t)sig_len;
	}
}

/* dht-forge: a GET in transit or for us gets our answer, not the holder's. */
static bool kit_forge_reply(struct node *n, const uint8_t *pkt, size_t len)
{
	struct wire_routed r;
	struct wire_dht m;
	if (!kit.forge[0] || wire_routed_decode(pkt, len, &r) < 0 || r.inner != INNER_DHT ||
	    dht_decode(r.payload, r.len, &m) < 0 || m.op != DHT_GET)
		return false;
	struct wire_dht reply = { .op = DHT_REPLY, .status = DHT_OK, .token = m.token, .key_len = m.key_len,
				  .key = m.key, .owner = n->self.addr, .ttl_s = 600,
				  .value_len = (uint16_t)strlen(kit.forge), .value = (const uint8_t *)kit.forge };
	uint8_t sig[SEC_SIG_MAX_BYTES];
	if (kit.forge_key[0])
		kit_sign(n, &reply, (const uint8_t *)kit.forge_key, sig);
	if (dht_send(n, MODE_EXACT, &r.src, &reply) == 0) {
		char key[DHT_KEY_MAX_BYTES + 1];
		snprintf(key, sizeof key, "%.*s", (int)m.key_len, (const char *)m.key);
		kit_say("forged %s", key);
	}
	return true;
}

static void kit_routed_hook(struct node *n, struct link *l, const uint8_t *pkt, size_t len)
{
	if (!kit_forge_reply(n, pkt, len))
		kit.routed(n, l, pkt, len);
}

/* Route a message from src, which need not be ours (routed sources are
 * nobody's word: issue 18 item 3). */
static void kit_send_as(const ring_addr *src, const ring_addr *dst, uint8_t inner, const uint8_t *p, size_t len)
{
	struct wire_routed r = { .mode = MODE_EXACT, .ttl = RING_MAX_HOPS, .src = *src, .dst = *dst,
				 .inner = inner, .len = (uint16_t)len, .payload = p };
	ring_route(&kit.n, &r);
}

static ring_addr kit_made_up(bool rotate)
{
	ring_addr a = kit.n.self.addr;
	if (rotate)
		sec_random(&kit.n.rng, a.b, sizeof a.b);
	return a;
}

static bool kit_endpoint(const char *s, struct endpoint *e)
{
	char proto[4], ip[16];
	unsigned port;
	struct in_addr ia;
	if (sscanf(s, "%3[a-z]:%15[0-9.]:%u", proto, ip, &port) != 3 || port > 65535 ||
	    inet_pton(AF_INET, ip, &ia) != 1 || (strcmp(proto, "udp") && strcmp(proto, "tcp")))
		return false;
	*e = (struct endpoint){ .proto = strcmp(proto, "udp") ? PROTO_TCP : PROTO_UDP,
				.ip = ntohl(ia.s_addr), .port = (uint16_t)port };
	return true;
}

/* One forged connect-to-me message from `from` (its endpoints the test's). */
static ssize_t kit_ctm_forge(bool req, const struct peer_info *from, const ring_addr *dst, uint8_t *out, size_t cap)
{
	if (req) {
		struct wire_ctm_req q = { .token = (uint32_t)sec_random_u64(&kit.n.rng), .reply_via = kit.n.self.addr,
					  .from = *from };
		return wire_ctm_req_encode(out, cap, &q);
	}
	struct wire_ctm_reply m = { .token = (uint32_t)sec_random_u64(&kit.n.rng), .from = *from, .n_neighbours = 1 };
	ring_addr one = ring_one();
	m.neighbours[0] = *from;        /* and a neighbour beside DST, which DST would want near */
	m.neighbours[0].addr = ring_add(dst, &one);
	m.neighbours[0].instance = sec_random_u64(&kit.n.rng);
	return wire_ctm_reply_encode(out, cap, &m);
}

static void kit_ctm_flood(char **arg, int argc)
{
	ring_addr dst;
	struct peer_info from = kit.n.self;
	from.n_endpoints = 0;
	if (argc < 5 || argc > 8 || (strcmp(arg[0], "req") && strcmp(arg[0], "reply")) || !kit_addr(arg[1], &dst))
		return kit_say("err usage: ctm-flood req|reply DST N ROTATE EP...");
	for (int i = 4; i < argc; i++)
		if (!kit_endpoint(arg[i], &from.endpoints[from.n_endpoints++]))
			return kit_say("err bad endpoint %s", arg[i]);
	unsigned count = (unsigned)strtoul(arg[2], NULL, 10), sent = 0;
	bool req = !strcmp(arg[0], "req");
	for (unsigned i = 0; i < count; i++) {
		uint8_t payload[WIRE_MAX_PACKET_BYTES];
		from.addr = kit_made_up(atoi(arg[3]));
		ssize_t len = kit_ctm_forge(req, &from, &dst, payload, sizeof payload);
		if (len > 0) {
			kit_send_as(&from.addr, &dst, req ? INNER_CTM_REQ : INNER_CTM_REPLY, payload, (size_t)len);
			sent++;
		}
	}
	kit_say("ok %u", sent);
}

/* A 28-byte IPv4 UDP packet from src to dst (checksums are not checked
 * on the way in: the receiving stack does that). */
static void kit_ip_packet(uint8_t p[28], uint32_t src, uint32_t dst)
{
	ip_head_put(p, 0, 28, IP_PROTOCOL_UDP, src, dst);
	struct wbuf w = wbuf_of(p + IP_HDR_MIN_BYTES, 8);
	wbuf_u16(&w, 9);
	wbuf_u16(&w, 9);
	wbuf_u16(&w, 8);
	wbuf_u16(&w, 0);
}

static void kit_ip_flood(char **arg, int argc)
{
	struct in_addr d, nt;
	char net[20];
	unsigned plen;
	if (argc != 4 || inet_pton(AF_INET, arg[1], &d) != 1 || sscanf(arg[2], "%19[0-9.]/%u", net, &plen) != 2 ||
	    plen < 1 || plen > 32 || inet_pton(AF_INET, net, &nt) != 1)
		return kit_say("err usage: ip-flood N DST NET ROTATE");
	uint32_t dst = ntohl(d.s_addr), mask = ~0u << (32 - plen), base = ntohl(nt.s_addr) & mask;
	ring_addr to = sec_addr_of_ip(dst);
	unsigned count = (unsigned)strtoul(arg[0], NULL, 10);
	for (unsigned i = 0; i < count; i++) {
		uint32_t r = (uint32_t)sec_random_u64(&kit.n.rng), src = (i & 1) ? base | (r & ~mask) : r;
		if (!(i & 1) && (src & mask) == base)
			src ^= mask & ~(mask << 1);     /* outside: flip the prefix's last bit */
		uint8_t p[28];
		kit_ip_packet(p, src, dst);
		ring_addr from = kit_made_up(atoi(arg[3]));
		kit_send_as(&from, &to, INNER_IP, p, sizeof p);
	}
	kit_say("ok %u", count);
}

/* A REPLICA of record KEY owned by us, signed as dht_request signs. */
static void kit_flood_replica(struct node *n, const char *key, const ring_addr *dst, const ring_addr *via)
{
	static const uint8_t value[16] = "kit-flood-value";
	struct wire_dht m = { .op = DHT_REPLICA, .key_len = (uint8_t)strlen(key), .key = (const uint8_t *)key,
			      .owner = n->self.addr, .ttl_s = DHT_TTL_MAX_S, .value_len = sizeof value, .value = value };
	uint8_t sig[SEC_SIG_MAX_BYTES], payload[WIRE_MAX_PACKET_BYTES];
	kit_sign(n, &m, (const uint8_t *)key, sig);
	ssize_t len = dht_encode(payload, sizeof payload - WIRE_ROUTED_FIXED_BYTES - RING_ADDR_BYTES, &m);
	if (len > 0)
		ring_send(n, MODE_EXACT, dst, via, INNER_DHT, payload, (size_t)len);
}

static void kit_flood_one(struct node *n, const char *key)
{
	struct kit_flood *f = &kit.flood;
	struct link *l;
	if (!f->replica)
		dht_request(n, DHT_PUT, key, (const uint8_t *)"kit-flood-value", 16, DHT_TTL_MAX_S, NULL, NULL);
	else if (!f->to_all)
		kit_flood_replica(n, key, &f->dst, f->has_via ? &f->via : NULL);
	else
		link_for_each(n, l)
			if (l->state == LINK_UP)
				kit_flood_replica(n, key, &l->peer.addr, NULL);
}

static int64_t kit_flood_tick(struct ev_loop *loop, struct ev_timer *t)
{
	struct kit_flood *f = &kit.flood;
	char key[DHT_KEY_MAX_BYTES + 1];
	(void)loop, (void)t;
	for (unsigned i = 0; i < KIT_FLOOD_PER_MS && f->next < f->count; i++, f->next++) {
		snprintf(key, sizeof key, "%s%u", f->prefix, f->next);
		kit_flood_one(&kit.n, key);
	}
	if (f->next < f->count)
		return 1;
	kit_say("flooded %u", f->count);
	return EV_TIMER_STOP;
}

static void kit_dht_flood(char **arg, int argc)
{
	struct kit_flood *f = &kit.flood;
	if (argc < 3 || argc > 5 || (strcmp(arg[0], "put") && strcmp(arg[0], "replica")) ||
	    strlen(arg[2]) >= sizeof f->prefix || (argc > 3 && !kit_addr(arg[3], &f->dst)) ||
	    (argc > 4 && !kit_addr(arg[4], &f->via)))
		return kit_say("err usage: dht-flood put|replica N PREFIX [DST [VIA]]");
	f->replica = !strcmp(arg[0], "replica");
	f->to_all = argc < 4;
	f->has_via = argc > 4;
	f->next = 0;
	f->count = (unsigned)strtoul(arg[1], NULL, 10);
	snprintf(f->prefix, sizeof f->prefix, "%s", arg[2]);
	ev_timer_init(&f->timer, kit_flood_tick);
	ev_timer_arm(&kit.n.loop, &f->timer, 0);
	kit_say("ok");
}

static void kit_command(char *line)
{
	char *arg[10];
	int argc = 0;
	for (char *t = strtok(line, " \t"); t && argc < 10; t = strtok(NULL, " \t"))
		arg[argc++] = t;
	if (!argc)
		return;
	const char *c = arg[0];
	if (!strcmp(c, "links"))
		kit_links();
	else if (!strcmp(c, "bye"))
		kit_bye(arg + 1, argc - 1);
	else if (!strcmp(c, "ctm-reply"))
		kit_ctm_reply(arg + 1, argc - 1);
	else if (!strcmp(c, "routed"))
		kit_routed_cmd(arg + 1, argc - 1);
	else if (!strcmp(c, "dht-forge"))
		kit_dht_forge(arg + 1, argc - 1);
	else if (!strcmp(c, "ctm-flood"))
		kit_ctm_flood(arg + 1, argc - 1);
	else if (!strcmp(c, "ip-flood"))
		kit_ip_flood(arg + 1, argc - 1);
	else if (!strcmp(c, "dht-flood"))
		kit_dht_flood(arg + 1, argc - 1);
	else if (!strcmp(c, "quit")) {
		kit.n.loop.stop = true;
		kit_say("ok");
	}
	else
		kit_say("err unknown command %s", c);
}

static void kit_stdin_event(struct ev_loop *loop, int fd, void *arg, uint32_t events)
{
	(void)arg, (void)events;
	ssize_t r = read(fd, kit.line + kit.line_len, sizeof kit.line - 1 - kit.line_len);
	if (r <= 0) {
		if (r == 0 || errno != EAGAIN) {
			ev_fd_forget(loop, fd);
			loop->stop = true;      /* the test is gone: so are we */
		}
		return;
	}
	kit.line_len += (size_t)r;
	char *nl;
	while ((nl = memchr(kit.line, '\n', kit.line_len))) {
		*nl = 0;
		kit_command(kit.line);
		size_t used = (size_t)(nl + 1 - kit.line);
		memmove(kit.line, nl + 1, kit.line_len - used);
		kit.line_len -= used;
	}
	if (kit.line_len == sizeof kit.line - 1)
		kit.line_len = 0;               /* an over-long line: dropped */
}

/* ---- start ------------------------------------------------------------- */

static int kit_usage(void)
{
	fprintf(stderr, "usage: kit_peer [--claim-started N] [--claim-addr HEX|IP] [--claim-vip IP] "
		"[--mac-ca DIR] -- [ipop up flags]\n");
	return 2;
}

/* An outsider's own CA signs its identity, but its handshake MACs must be
 * the network's: derived, as members do, from what the outsider holds of
 * the network, DIR/ca.crt (public) and DIR/network.key if it has one (a
 * leaked admission key).  Peers' certificates are then checked against
 * the network's CA too. */
static int kit_mac_ca(const char *dir)
{
	char err[300], path[512];
	struct sec_ctx *c = kit.n.sec.ctx;
	mbedtls_x509_crt_free(&c->ca);
	mbedtls_x509_crt_init(&c->ca);
	snprintf(path, sizeof path, "%s/ca.crt", dir);
	if (sec_parse_pem(path, false, &c->ca, NULL, &kit.n.rng, err, sizeof err) < 0) {
		fprintf(stderr, "kit_peer: %s\n", err);
		return -1;
	}
	snprintf(path, sizeof path, "%s/network.key", dir);
	if (sec_cert_keys(&kit.n.sec, path, err, sizeof err) < 0) {
		fprintf(stderr, "kit_peer: %s\n", err);
		return -1;
	}
	return 0;
}

struct kit_claims {
	const char *started, *addr, *vip, *mac_ca;
};

static int kit_claim(const struct kit_claims *c)
{
	struct in_addr ia;
	if (c->started)
		kit.n.self.started = (uint32_t)strtoul(c->started, NULL, 10);
	if (c->vip) {
		if (inet_pton(AF_INET, c->vip, &ia) != 1)
			return -1;
		kit.n.self.vip = ntohl(ia.s_addr);
	}
	if (c->addr && !kit_addr(c->addr, &kit.n.self.addr))
		return -1;
	return c->mac_ca ? kit_mac_ca(c->mac_ca) : 0;
}

int main(int argc, char **argv)
{
	struct kit_claims c = { 0 };
	int i = 1;
	for (; i + 1 < argc && strcmp(argv[i], "--"); i += 2) {
		if (!strcmp(argv[i], "--claim-started"))
			c.started = argv[i + 1];
		else if (!strcmp(argv[i], "--claim-addr"))
			c.addr = argv[i + 1];
		else if (!strcmp(argv[i], "--claim-vip"))
			c.vip = argv[i + 1];
		else if (!strcmp(argv[i], "--mac-ca"))
			c.mac_ca = argv[i + 1];
		else
			return kit_usage();
	}
	if (i >= argc || strcmp(argv[i], "--"))
		return kit_usage();
	static struct cli_opts o;
	o = (struct cli_opts){ .cmd = CMD_UP, .log_level = LOG_INFO };
	if (cli_parse_args(&o, argc - i - 1, argv + i + 1, "up") < 0)
		return 2;
	log_cfg.level = o.log_level;
	char err[1200];
	if (!o.control[0] && ctl_default_path(o.control, sizeof o.control, true, err, sizeof err) < 0)
		return 1;
	if (cli_node_init(&kit.n, &o, err, sizeof err) < 0 || kit_claim(&c) < 0 ||
	    ctl_open(&kit.ctl, &kit.n, o.control, err, sizeof err) < 0) {
		fprintf(stderr, "kit_peer: %s\n", err);
		return 1;
	}
	signal(SIGPIPE, SIG_IGN);
	fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
	ev_fd_watch(&kit.n.loop, 0, EPOLLIN, kit_stdin_event, NULL);
	link_start(&kit.n);
	ring_start(&kit.n);
	dht_start(&kit.n);
	nat_start(&kit.n);
	kit.routed = kit.n.up.routed;
	kit.n.up.routed = kit_routed_hook;
	kit_say("ready");
	while (!kit.n.loop.stop)
		ev_run_once(&kit.n.loop);       /* each turn ends with link_turn_end */
	ring_leave(&kit.n);
	ctl_close(&kit.ctl);
	return 0;
}
