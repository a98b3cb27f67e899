/* Seed corpora for the fuzz targets, made with ipop's own encoders:
 *   tests/corpus/fuzz_wire    one valid packet per decoder (and a few near misses)
 *   tests/corpus/fuzz_link    handshake and record sequences that reach each
 *                             message type on the secret and insecure nodes,
 *                             over UDP and TCP (layout: tests/fuzz_link.c)
 *   tests/corpus/fuzz_config  config files
 * (tests/gen_corpus.py makes the seeds of the other targets.)
 * It includes the link harness, so the seeds use its exact constants, and
 * after writing them it replays every link seed through the harness and
 * prints what each reached (links up, records, packets to the local stack).
 * Not part of the build; to regenerate (from the repository root):
 *   eval clang -std=c11 -D_GNU_SOURCE -DIPOP_NO_MAIN -I. "$(./build.sh flags host cflags)" \
 *       tests/gen_corpus.c -o build/gen_corpus "$(./build.sh flags host libs)"
 *   rm -rf tests/corpus/fuzz_link tests/corpus/fuzz_wire tests/corpus/fuzz_config
 *   ./build/gen_corpus tests/corpus */
#include <dirent.h>
#include "fuzz_link.c"

static const char *out_root;

static void put_file(const char *target, const char *name, const void *p, size_t len)
{
	char path[512];
	snprintf(path, sizeof path, "%s/%s", out_root, target);
	mkdir(path, 0755);
	snprintf(path, sizeof path, "%s/%s/%s", out_root, target, name);
	FILE *f = fopen(path, "wb");
	if (!f || fwrite(p, 1, len, f) != len || fclose(f) != 0) {
		perror(path);
		exit(1);
	}
}

/* ---- a growing byte string -------------------------------------------- */

struct seq {
	uint8_t b[8192];
	size_t len;
};

static void seq_raw(struct seq *s, const void *p, size_t len)
{
	if (s->len + len > sizeof s->b)
		abort();
	memcpy(s->b + s->len, p, len);
	s->len += len;
}

static void seq_u8(struct seq *s, uint8_t v)
{
	seq_raw(s, &v, 1);
}

/* A chunk of the link harness input: [u16 len][bytes]. */
static void seq_chunk(struct seq *s, const void *p, size_t len)
{
	uint8_t h[2] = { (uint8_t)(len >> 8), (uint8_t)len };
	seq_raw(s, h, 2);
	seq_raw(s, p, len);
}

/* A TCP frame of ipop's stream framing, wrapped in one chunk. */
static void seq_tcp_frame(struct seq *s, const void *p, size_t len)
{
	uint8_t f[2 + WIRE_MAX_RECORD_BYTES];
	f[0] = (uint8_t)(len >> 8);
	f[1] = (uint8_t)len;
	memcpy(f + 2, p, len);
	seq_chunk(s, f, len + 2);
}

/* ---- packets -------------------------------------------------------------- */

#define PEER_VIP 0x0a800002u            /* 10.128.0.2 */

static struct peer_info peer_info_of(uint32_t vip, uint8_t n_ep)
{
	struct peer_info pi = { .addr = sec_addr_of_ip(vip), .vip = vip, .n_endpoints = n_ep };
	for (uint8_t i = 0; i < n_ep; i++)
		pi.endpoints[i] = (struct endpoint){ i % 2 ? PROTO_TCP : PROTO_UDP, FUZZ_SRC_IP + (vip & 0xff),
						     (uint16_t)(FUZZ_SRC_PORT + i) };
	return pi;
}

static size_t pkt_hs_init(uint8_t *out, struct node *n, bool fix)
{
	struct wire_hs_init m = { .sender = 0x51525354, .mode = (uint8_t)n->sec.mode };
	for (int i = 0; i < 32; i++)
		m.e[i] = (uint8_t)(9 * i + 1);
	ssize_t len = wire_hs_init_encode(out, WIRE_HS_INIT_BYTES, &m);
	if (len != WIRE_HS_INIT_BYTES)
		abort();
	if (fix)
		fixup_hs_init(n, out, (size_t)len);
	else if (n->sec.mode != SEC_INSECURE)   /* TCP: no cookie, but mac1 */
		sec_mac1(&n->sec, out, WIRE_HS_INIT_MAC1_OFFSET, out + WIRE_HS_INIT_MAC1_OFFSET);
	return (size_t)len;
}

static size_t identity_plain(uint8_t *out, size_t cap)
{
	struct wire_identity id = { .info = peer_info_of(PEER_VIP, 2),
				    .observed = { PROTO_UDP, 0x7f000001u, 9999 }, .ciphers = SEC_CIPHERS_BASE };
	ssize_t len = wire_identity_encode(out, cap, &id);
	if (len < 0)
		abort();
	return (size_t)len;
}

static size_t pkt_hs_resp(uint8_t *out, uint32_t receiver, bool secure)
{
	uint8_t sealed[600];
	size_t slen = identity_plain(sealed, sizeof sealed);
	if (secure) {           /* cannot be opened without the keys: the auth-failure path */
		memset(sealed + slen, 0xab, SEC_TAG_BYTES);
		slen += SEC_TAG_BYTES;
	}
	struct wire_hs_resp r = { .sender = 0x61626364, .receiver = receiver, .len = (uint16_t)slen,
				  .sealed = sealed };
	memset(r.e, 0x42, 32);
	return (size_t)wire_hs_resp_encode(out, WIRE_MAX_RECORD_BYTES, &r);
}

static size_t pkt_hs_fin(uint8_t *out, uint32_t receiver)
{
	uint8_t sealed[600];
	size_t slen = identity_plain(sealed, sizeof sealed);
	struct wire_hs_fin f = { .receiver = receiver, .len = (uint16_t)slen, .sealed = sealed };
	return (size_t)wire_hs_fin_encode(out, WIRE_MAX_RECORD_BYTES, &f);
}

static size_t pkt_cookie(uint8_t *out, uint32_t receiver)
{
	struct wire_hs_cookie c = { .receiver = receiver };
	memset(c.cookie, 0x77, sizeof c.cookie);
	return (size_t)wire_hs_cookie_encode(out, 64, &c);
}

static size_t pkt_reject(uint8_t *out, uint32_t receiver, uint8_t mode)
{
	struct wire_hs_reject j = { .receiver = receiver, .reason = REJECT_MODE_MISMATCH, .mode = mode };
	return (size_t)wire_hs_reject_encode(out, 64, &j);
}

/* A plaintext DATA record (insecure nodes) around one inner message. */
static size_t pkt_data(uint8_t *out, uint32_t receiver, uint64_t counter, const uint8_t *msg, size_t len)
{
	struct wire_data d = { .receiver = receiver, .epoch = 0, .counter = counter };
	wire_data_header_put(out, &d);
	memcpy(out + WIRE_DATA_HDR_BYTES, msg, len);
	return WIRE_DATA_HDR_BYTES + len;
}

static size_t msg_routed(uint8_t *out, uint8_t mode, const ring_addr *dst, uint8_t inner,
			 const uint8_t *payload, size_t len, const ring_addr *via)
{
	struct wire_routed r = { .mode = mode, .ttl = 9, .hops = 1, .src = sec_addr_of_ip(PEER_VIP),
				 .dst = *dst, .inner = inner, .len = (uint16_t)len, .payload = payload };
	if (via) {
		r.flags = ROUTED_HAS_VIA;
		r.via = *via;
	}
	ssize_t n = wire_routed_encode(out, WIRE_MAX_PACKET_BYTES, &r);
	if (n < 0)
		abort();
	return (size_t)n;
}

/* The inner messages a peer may send on an up link. */
enum { N_INNER = 10 };

static size_t inner_msg(int k, uint8_t *out)
{
	ring_addr self = sec_addr_of_ip(FUZZ_VIP), peer = sec_addr_of_ip(PEER_VIP);
	ring_addr far = sec_addr_of_ip(0x0a800063u);
	uint8_t payload[WIRE_MAX_PACKET_BYTES];
	ssize_t plen;
	switch (k) {
	case 0: {
		struct wire_ping p = { .seq = 1, .t_us = 1000 };
		return (size_t)wire_ping_encode(out, 64, WIRE_PING, &p);
	}
	case 1: {
		struct wire_ping p = { .seq = 1, .t_us = 1000 };
		return (size_t)wire_ping_encode(out, 64, WIRE_PONG, &p);
	}
	case 2:
		return (size_t)wire_byte_encode(out, 8, WIRE_ROLES, ROLE_NEAR);
	case 3: {
		struct wire_echo e = { .id = 7, .t_us = 5 };
		plen = wire_echo_encode(payload, sizeof payload, false, &e);
		return msg_routed(out, MODE_EXACT, &self, INNER_ECHO_REQ, payload, (size_t)plen, NULL);
	}
	case 4: {
		struct wire_echo e = { .id = 7, .t_us = 5, .req_hops = 2 };
		plen = wire_echo_encode(payload, sizeof payload, true, &e);
		return msg_routed(out, MODE_NEAREST, &self, INNER_ECHO_REPLY, payload, (size_t)plen, &self);
	}
	case 5: {
		struct wire_ctm_req q = { .token = 3, .want = ROLE_NEAR, .reply_via = peer,
					  .from = peer_info_of(PEER_VIP, 2) };
		plen = wire_ctm_req_encode(payload, sizeof payload, &q);
		return msg_routed(out, MODE_SUCC, &self, INNER_CTM_REQ, payload, (size_t)plen, NULL);
	}
	case 6: {
		struct wire_ctm_reply m = { .token = 3, .want = ROLE_FAR, .from = peer_info_of(PEER_VIP, 1),
					    .n_neighbours = 2 };
		m.neighbours[0] = peer_info_of(0x0a800003u, 2);
		m.neighbours[1] = peer_info_of(0x0a800004u, 1);
		plen = wire_ctm_reply_encode(payload, sizeof payload, &m);
		return msg_routed(out, MODE_EXACT, &self, INNER_CTM_REPLY, payload, (size_t)plen, NULL);
	}
	case 7: {       /* an IPv4/UDP packet from the peer's virtual IP to ours */
		uint8_t ip[28] = { 0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0,
				   10, 128, 0, 2, 10, 128, 0, 1, 0x30, 0x39, 0x30, 0x39, 0, 8, 0, 0 };
		return msg_routed(out, MODE_EXACT, &self, INNER_IP, ip, sizeof ip, NULL);
	}
	case 8: {       /* routed on towards a node we do not know: the undeliverable path */
		uint8_t ip[28] = { 0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0,
				   10, 128, 0, 1, 10, 128, 0, 99, 8, 0, 0, 0, 0, 0, 0, 0 };
		return msg_routed(out, MODE_EXACT, &far, INNER_IP_UNREACH, ip, sizeof ip, NULL);
	}
	default:
		return (size_t)wire_byte_encode(out, 8, WIRE_BYE, BYE_LEAVING);
	}
}

/* Every inner message in records to receiver idx, the BYE last. */
static void seq_records(struct seq *s, uint32_t idx, bool tcp)
{
	for (int k = 0; k < N_INNER; k++) {
		uint8_t msg[WIRE_MAX_PACKET_BYTES], rec[WIRE_MAX_RECORD_BYTES];
		size_t mlen = inner_msg(k, msg);
		size_t rlen = pkt_data(rec, idx, (uint64_t)k, msg, mlen);
		if (tcp)
			seq_tcp_frame(s, rec, rlen);
		else
			seq_chunk(s, rec, rlen);
	}
}

/* ---- the corpora ----------------------------------------------------------- */

static void gen_link(void)
{
	uint8_t pkt[WIRE_MAX_RECORD_BYTES];
	struct seq s;
	size_t len;
	char name[64];

	for (int secure = 0; secure <= 1; secure++) {
		struct node *n = secure ? &node_secure : &node_insecure;
		uint8_t ins = secure ? 0 : FL_INSECURE;
		const char *tag = secure ? "psk" : "insecure";

		/* UDP responder: HS_INIT (valid cookie) -> link 2; FIN; records. */
		s.len = 0;
		seq_u8(&s, ins);
		seq_chunk(&s, pkt, pkt_hs_init(pkt, n, true));
		seq_chunk(&s, pkt, pkt_hs_init(pkt, n, true));  /* a retransmit */
		seq_chunk(&s, pkt, pkt_hs_fin(pkt, 2));
		if (!secure)
			seq_records(&s, 2, false);
		snprintf(name, sizeof name, "udp-%s-responder", tag);
		put_file("fuzz_link", name, s.b, s.len);

		/* The same HS_INIT, cookie and mac1 zeroed, with FL_FIXUP. */
		s.len = 0;
		seq_u8(&s, ins | FL_FIXUP);
		len = pkt_hs_init(pkt, n, false);
		memset(pkt + WIRE_HS_INIT_COOKIE_OFFSET, 0, 2 * SEC_MAC_BYTES);
		seq_chunk(&s, pkt, len);
		seq_chunk(&s, pkt, pkt_hs_fin(pkt, 2));
		snprintf(name, sizeof name, "udp-%s-fixup", tag);
		put_file("fuzz_link", name, s.b, s.len);

		/* No cookie: answered with HS_COOKIE, no link. */
		s.len = 0;
		seq_u8(&s, ins);
		len = pkt_hs_init(pkt, n, false);
		seq_chunk(&s, pkt, len);
		pkt[6] ^= 1;                    /* the other mode: a reject */
		seq_chunk(&s, pkt, len);
		snprintf(name, sizeof name, "udp-%s-nocookie", tag);
		put_file("fuzz_link", name, s.b, s.len);

		/* UDP initiator (link 1): COOKIE, then RESP, then records. */
		s.len = 0;
		seq_u8(&s, ins);
		seq_chunk(&s, pkt, pkt_cookie(pkt, 1));
		seq_chunk(&s, pkt, pkt_hs_resp(pkt, 1, secure));
		seq_chunk(&s, pkt, pkt_hs_resp(pkt, 1, secure));  /* a repeat: resend FIN */
		if (!secure)
			seq_records(&s, 1, false);
		snprintf(name, sizeof name, "udp-%s-initiator", tag);
		put_file("fuzz_link", name, s.b, s.len);

		/* Our dial is rejected. */
		s.len = 0;
		seq_u8(&s, ins);
		seq_chunk(&s, pkt, pkt_reject(pkt, 1, secure ? SEC_INSECURE : SEC_PSK));
		snprintf(name, sizeof name, "udp-%s-reject", tag);
		put_file("fuzz_link", name, s.b, s.len);

		/* TCP accepted stream (link 2): HS_INIT, FIN, records, split mid-frame. */
		s.len = 0;
		seq_u8(&s, ins | FL_TCP);
		seq_tcp_frame(&s, pkt, pkt_hs_init(pkt, n, false));
		seq_tcp_frame(&s, pkt, pkt_hs_fin(pkt, 2));
		if (!secure)
			seq_records(&s, 2, true);
		snprintf(name, sizeof name, "tcp-%s-responder", tag);
		put_file("fuzz_link", name, s.b, s.len);

		/* TCP dial (link 2): RESP, records, then EOF. */
		s.len = 0;
		seq_u8(&s, ins | FL_TCP | FL_TCP_DIAL | FL_TCP_EOF);
		seq_tcp_frame(&s, pkt, pkt_hs_resp(pkt, 2, secure));
		if (!secure)
			seq_records(&s, 2, true);
		snprintf(name, sizeof name, "tcp-%s-dial", tag);
		put_file("fuzz_link", name, s.b, s.len);
	}

	/* One TCP frame cut in two segments, then a bad frame length. */
	s.len = 0;
	seq_u8(&s, FL_INSECURE | FL_TCP);
	len = pkt_hs_init(pkt, &node_insecure, false);
	uint8_t fr[2 + WIRE_HS_INIT_BYTES] = { 0, WIRE_HS_INIT_BYTES };
	memcpy(fr + 2, pkt, len);
	seq_chunk(&s, fr, 10);
	seq_chunk(&s, fr + 10, sizeof fr - 10);
	seq_chunk(&s, "\xff\xff", 2);
	put_file("fuzz_link", "tcp-split-badframe", s.b, s.len);

	/* Garbage the classifier refuses. */
	s.len = 0;
	seq_u8(&s, FL_INSECURE);
	seq_chunk(&s, "\x01\x01", 2);
	seq_chunk(&s, "\x02\x07", 2);
	seq_chunk(&s, "\x02", 1);
	seq_chunk(&s, "\x02\x06\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01", 16);
	put_file("fuzz_link", "udp-garbage", s.b, s.len);
}

static void gen_wire(void)
{
	uint8_t pkt[1 + WIRE_MAX_RECORD_BYTES], *p = pkt + 1;
	ssize_t len;
	char name[64];
#define PUT(sel, nm, l) do { pkt[0] = (uint8_t)(sel); snprintf(name, sizeof name, "%02d-%s", (int)(sel), nm); \
			     put_file("fuzz_wire", name, pkt, (size_t)(l) + 1); } while (0)

	struct wire_hs_init hi = { .sender = 1, .mode = SEC_PSK };
	memset(hi.e, 3, 32);
	len = wire_hs_init_encode(p, WIRE_MAX_RECORD_BYTES, &hi);
	PUT(0, "classify-outer", len);
	PUT(2, "hs-init", len);
	struct wire_ping pg = { .seq = 9, .t_us = 77 };
	len = wire_ping_encode(p, 64, WIRE_PING, &pg);
	PUT(1, "classify-inner", len);
	PUT(9, "ping", len);
	struct wire_hs_cookie c = { .receiver = 2 };
	memset(c.cookie, 5, sizeof c.cookie);
	PUT(3, "hs-cookie", wire_hs_cookie_encode(p, 64, &c));
	PUT(4, "hs-resp", pkt_hs_resp(p, 3, true));
	PUT(5, "hs-fin", pkt_hs_fin(p, 4));
	PUT(6, "hs-reject", pkt_reject(p, 5, SEC_INSECURE));
	uint8_t msg[WIRE_MAX_PACKET_BYTES];
	size_t mlen = inner_msg(0, msg);
	PUT(7, "data", pkt_data(p, 6, 99, msg, mlen));
	PUT(8, "identity", identity_plain(p, WIRE_MAX_RECORD_BYTES));
	uint8_t cert[40], sig[8];
	memset(cert, 0x30, sizeof cert);
	memset(sig, 0x31, sizeof sig);
	struct wire_identity id = { .info = peer_info_of(PEER_VIP, 8), .observed = { PROTO_TCP, 1, 2 },
				    .cert_len = sizeof cert, .cert = cert, .sig_len = sizeof sig, .sig = sig, .ciphers = 3 };
	PUT(8, "identity-cert", wire_identity_encode(p, WIRE_MAX_RECORD_BYTES, &id));
	PUT(10, "byte", wire_byte_encode(p, 8, WIRE_ROLES, ROLE_FAR));
	for (int k = 3; k <= 8; k++) {
		snprintf((char *)msg, 16, "routed-%d", k);
		char nm[16];
		memcpy(nm, msg, 16);
		PUT(11, nm, inner_msg(k, p));
	}
	/* The routed payloads on their own, for the inner decoders. */
	struct wire_routed r;
	uint8_t tmp[WIRE_MAX_PACKET_BYTES];
	struct { int k, sel; const char *nm; } in[] = {
		{ 5, 12, "ctm-req" }, { 6, 13, "ctm-reply" }, { 3, 14, "echo-req" }, { 4, 15, "echo-reply" },
	};
	for (unsigned i = 0; i < ARRAY_LEN(in); i++) {
		size_t tl = inner_msg(in[i].k, tmp);
		if (wire_routed_decode(tmp, tl, &r) < 0)
			abort();
		memcpy(p, r.payload, r.len);
		PUT(in[i].sel, in[i].nm, r.len);
	}
#undef PUT
}

static void gen_config(void)
{
	static const struct { const char *name, *text; } cf[] = {
		{ "basic", "# a node\nlisten = udp://0.0.0.0:4000\nlisten tcp://127.0.0.1:4001\n"
			   "bootstrap = udp://10.0.0.1:4000\nip = 10.128.0.5/16\nsecret-file = /etc/ipop/net.key\n"
			   "log-level = debug\ncontrol = /run/ipop.sock\n" },
		{ "cert", "cert-dir /etc/ipop/node\ncrl = /etc/ipop/crl.pem\nip 10.128.0.7\nmode = tap\n"
			  "dev = ipop0\nmtu = 1360\n" },
		{ "insecure", "  insecure  # plain\n\tlisten=tcp://[::1]:0\nmode none\n" },
		{ "errors", "nosuchkey 1\n" },
		{ "empty-values", "listen\n=\n#\n\n   \nip = 0.0.0.0\n" },
	};
	for (unsigned i = 0; i < ARRAY_LEN(cf); i++)
		put_file("fuzz_config", cf[i].name, cf[i].text, strlen(cf[i].text));
}

/* Replay each link seed and say what it reached. */
static void check_link(void)
{
	char dir[512];
	snprintf(dir, sizeof dir, "%s/fuzz_link", out_root);
	DIR *d = opendir(dir);
	struct dirent *e;
	while (d && (e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		char path[1024];
		snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
		static uint8_t buf[65536];
		FILE *f = fopen(path, "rb");
		size_t len = fread(buf, 1, sizeof buf, f);
		fclose(f);
		struct node *n = buf[0] & FL_INSECURE ? &node_insecure : &node_secure;
		struct log_drops before = n->drops;
		uint64_t tx0 = fuzz_tx_packets, loc0 = fuzz_local_packets, del0 = n->counters_delivered;
		LLVMFuzzerTestOneInput(buf, len);
		printf("%-28s tx %3llu delivered %llu local %llu drops:", e->d_name,
		       (unsigned long long)(fuzz_tx_packets - tx0),
		       (unsigned long long)(n->counters_delivered - del0),
		       (unsigned long long)(fuzz_local_packets - loc0));
		for (int i = 0; i < DROP__COUNT; i++)
			if (n->drops.count[i] != before.count[i])
				printf(" %s=%llu", drop_names[i],
				       (unsigned long long)(n->drops.count[i] - before.count[i]));
		printf("\n");
	}
	if (d)
		closedir(d);
}

int main(int argc, char **argv)
{
	out_root = argc > 1 ? argv[1] : "tests/corpus";
	mkdir(out_root, 0755);
	LLVMFuzzerInitialize(&argc, &argv);
	gen_link();
	gen_wire();
	gen_config();
	check_link();
	return 0;
}
