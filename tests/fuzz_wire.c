/* libFuzzer target: every decoder of section 05 (wire_).
 *
 * Input: byte 0 picks the decoder (modulo the number of cases), the rest is
 * the packet.  Every successful decode is re-encoded and must give back the
 * input byte for byte: every codec here is canonical (fixed widths, lengths
 * that must match exactly, every enum and flag validated, nothing optional
 * that is not announced by a flag).  The exceptions are spelled out:
 *   - the decoders behind wire_body() skip the version/type header without
 *     looking at it (wire_classify's job), so only bytes 2.. are compared;
 *   - DATA has no whole-record encoder: its header round-trips through
 *     wire_data_header_put and the body must be the rest of the input.
 * Each encoder is also run into a heap buffer one byte too small, which must
 * fail cleanly (ASan catches a write past it).
 * Corpus: tests/corpus/fuzz_wire (see tests/fuzz_seeds.c). */
#include "../ipop.c"

enum {
	F_CLASSIFY_OUTER, F_CLASSIFY_INNER, F_HS_INIT, F_HS_COOKIE, F_HS_RESP, F_HS_FIN,
	F_HS_REJECT, F_DATA, F_IDENTITY, F_PING, F_BYTE, F_ROUTED, F_CTM_REQ, F_CTM_REPLY,
	F_ECHO_REQ, F_ECHO_REPLY, F_RELAY, F__COUNT
};

static void die(const char *what, size_t len)
{
	fprintf(stderr, "fuzz_wire: %s (input length %zu)\n", what, len);
	abort();
}

/* Re-encode into an exact buffer and into one a byte short. */
typedef ssize_t enc_fn(uint8_t *out, size_t cap, const void *m, uint8_t type, bool reply);

static void round_trip(const uint8_t *p, size_t len, size_t skip, enc_fn *enc, const void *m,
		       uint8_t type, bool reply)
{
	uint8_t *out = malloc(len ? len : 1);
	if (!out)
		abort();
	ssize_t r = enc(out, len, m, type, reply);
	if (r != (ssize_t)len)
		die("re-encoded length differs", len);
	if (memcmp(out + skip, p + skip, len - skip) != 0)
		die("re-encoded bytes differ", len);
	if (skip == WIRE_HDR_BYTES && (out[0] != WIRE_VERSION || out[1] != type))
		die("re-encoded header wrong", len);
	free(out);
	if (len > 0) {
		uint8_t *small = malloc(len - 1 ? len - 1 : 1);
		if (!small)
			abort();
		if (enc(small, len - 1, m, type, reply) >= 0)
			die("encoder fit into a buffer one byte short", len);
		free(small);
	}
}

static ssize_t enc_hs_init(uint8_t *o, size_t c, const void *m, uint8_t t, bool r)
{
	(void)t, (void)r;
	return wire_hs_init_encode(o, c, m);
}

static ssize_t enc_hs_cookie(uint8_t *o, size_t c, const void *m, uint8_t t, bool r)
{
	(void)t, (void)r;
	return wire_hs_cookie_encode(o, c, m);
}

static ssize_t enc_hs_resp(uint8_t *o, size_t c, const void *m, uint8_t t, bool r)
{
	(void)t, (void)r;
	return wire_hs_resp_encode(o, c, m);
}

static ssize_t enc_hs_fin(uint8_t *o, size_t c, const void *m, uint8_t t, bool r)
{
	(void)t, (void)r;
	return wire_hs_fin_encode(o, c, m);
}

static ssize_t enc_hs_reject(uint8_t *o, size_t c, const void *m, uint8_t t, bool r)
{
	(void)t, (void)r;
	return wire_hs_reject_encode(o, c, m);
}

static ssize_t enc_identity(uint8_t *o, size_t c, const void *m, uint8_t t, bool r)
{
	(void)t, (void)r;
	return wire_identity_encode(o, c, m);
}

static ssize_t enc_ping(uint8_t *o, size_t c, const void *m, uint8_t t, bool r)
{
	(void)r;
	return wire_ping_encode(o, c, t, m);
}

static ssize_t enc_relay(uint8_t *o, size_t c, const void *m, uint8_t t, bool r)
{
	(void)r;
	return wire_relay_encode(o, c, t, m);
}

static ssize_t enc_byte(uint8_t *o, size_t c, const void *m, uint8_t t, bool r)
{
	(void)r;
	return wire_byte_encode(o, c, t, *(const uint8_t *)m);
}

static ssize_t enc_routed(uint8_t *o, size_t c, const void *m, uint8_t t, bool r)
{
	(void)t, (void)r;
	return wire_routed_encode(o, c, m);
}

static ssize_t enc_ctm_req(uint8_t *o, size_t c, const void *m, uint8_t t, bool r)
{
	(void)t, (void)r;
	return wire_ctm_req_encode(o, c, m);
}

static ssize_t enc_ctm_reply(uint8_t *o, size_t c, const void *m, uint8_t t, bool r)
{
	(void)t, (void)r;
	return wire_ctm_reply_encode(o, c, m);
}

static ssize_t enc_echo(uint8_t *o, size_t c, const void *m, uint8_t t, bool r)
{
	(void)t;
	return wire_echo_encode(o, c, r, m);
}

static void check_peer_info(const struct peer_info *pi, size_t len)
{
	if (pi->n_endpoints > LINK_ENDPOINTS_MAX)
		die("peer_info endpoint count past the cap", len);
	for (unsigned i = 0; i < pi->n_endpoints; i++)
		if (pi->endpoints[i].proto != PROTO_UDP && pi->endpoints[i].proto != PROTO_TCP)
			die("peer_info endpoint with unknown proto accepted", len);
}

/* A payload view must lie inside the input. */
static void check_view(const uint8_t *p, size_t len, const uint8_t *v, size_t vlen)
{
	if (vlen && (v < p || v + vlen > p + len))
		die("view outside the packet", len);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1)
		return 0;
	unsigned which = data[0] % F__COUNT;
	const uint8_t *p = data + 1;
	size_t len = size - 1;
	uint8_t type = 0xee;

	switch (which) {
	case F_CLASSIFY_OUTER:
	case F_CLASSIFY_INNER: {
		bool inner = which == F_CLASSIFY_INNER;
		enum wire_verdict v = wire_classify(p, len, inner, &type);
		if (v == WIRE_OK) {
			if (len < WIRE_HDR_BYTES || p[0] != WIRE_VERSION || type != p[1])
				die("classify accepted a bad header", len);
			if (inner ? (type < WIRE_FIRST_INNER || type >= WIRE__TYPE_END)
				  : (type < WIRE_HS_INIT || type >= WIRE_FIRST_INNER))
				die("classify type out of range", len);
		} else if (v == WIRE_SHORT && len >= WIRE_HDR_BYTES) {
			die("classify called a full header short", len);
		}
		break;
	}
	case F_HS_INIT: {
		struct wire_hs_init m;
		if (wire_hs_init_decode(p, len, &m) == 0) {
			if (len != WIRE_HS_INIT_BYTES || m.mode >= SEC__MODE_END)
				die("hs_init accepted", len);
			round_trip(p, len, WIRE_HDR_BYTES, enc_hs_init, &m, WIRE_HS_INIT, false);
		}
		break;
	}
	case F_HS_COOKIE: {
		struct wire_hs_cookie m;
		if (wire_hs_cookie_decode(p, len, &m) == 0)
			round_trip(p, len, WIRE_HDR_BYTES, enc_hs_cookie, &m, WIRE_HS_COOKIE, false);
		break;
	}
	case F_HS_RESP: {
		struct wire_hs_resp m;
		if (wire_hs_resp_decode(p, len, &m) == 0) {
			check_view(p, len, m.sealed, m.len);
			round_trip(p, len, WIRE_HDR_BYTES, enc_hs_resp, &m, WIRE_HS_RESP, false);
		}
		break;
	}
	case F_HS_FIN: {
		struct wire_hs_fin m;
		if (wire_hs_fin_decode(p, len, &m) == 0) {
			check_view(p, len, m.sealed, m.len);
			round_trip(p, len, WIRE_HDR_BYTES, enc_hs_fin, &m, WIRE_HS_FIN, false);
		}
		break;
	}
	case F_HS_REJECT: {
		struct wire_hs_reject m;
		if (wire_hs_reject_decode(p, len, &m) == 0) {
			/* The reason set grows with the protocol: the decoder's own
			 * range check is what the round trip exercises. */
			if (m.mode >= SEC__MODE_END)
				die("hs_reject accepted a bad mode", len);
			round_trip(p, len, WIRE_HDR_BYTES, enc_hs_reject, &m, WIRE_HS_REJECT, false);
		}
		break;
	}
	case F_DATA: {
		struct wire_data m;
		if (wire_data_decode(p, len, &m) == 0) {
			if (len <= WIRE_DATA_HDR_BYTES || m.len != len - WIRE_DATA_HDR_BYTES ||
			    m.body != p + WIRE_DATA_HDR_BYTES)
				die("data body wrong", len);
			uint8_t hdr[WIRE_DATA_HDR_BYTES];
			wire_data_header_put(hdr, &m);
			if (hdr[0] != WIRE_VERSION || hdr[1] != WIRE_DATA ||
			    memcmp(hdr + WIRE_HDR_BYTES, p + WIRE_HDR_BYTES, WIRE_DATA_HDR_BYTES - WIRE_HDR_BYTES))
				die("data header round trip differs", len);
		} else if (len > WIRE_DATA_HDR_BYTES) {
			die("data refused a record with a body", len);
		}
		break;
	}
	case F_IDENTITY: {
		struct wire_identity m;
		if (wire_identity_decode(p, len, &m) == 0) {
			check_peer_info(&m.info, len);
			check_view(p, len, m.cert, m.cert_len);
			check_view(p, len, m.sig, m.sig_len);
			if (m.cert_len > SEC_CERT_MAX_BYTES || m.sig_len > SEC_SIG_MAX_BYTES)
				die("identity cert/sig past the cap", len);
			round_trip(p, len, 0, enc_identity, &m, 0, false);
		}
		break;
	}
	case F_PING: {
		struct wire_ping m;
		if (wire_ping_decode(p, len, &m) == 0) {
			type = len && (p[1] & 1) ? WIRE_PONG : WIRE_PING;
			round_trip(p, len, WIRE_HDR_BYTES, enc_ping, &m, type, false);
		}
		break;
	}
	case F_BYTE: {
		uint8_t v;
		if (wire_byte_decode(p, len, &v) == 0) {
			type = len && (p[1] & 1) ? WIRE_BYE : WIRE_ROLES;
			round_trip(p, len, WIRE_HDR_BYTES, enc_byte, &v, type, false);
		}
		break;
	}
	case F_ROUTED: {
		struct wire_routed r;
		if (wire_routed_decode(p, len, &r) == 0) {
			check_view(p, len, r.payload, r.len);
			/* Flag and inner-type sets grow with the protocol; only what
			 * every version must hold is checked here. */
			if (r.mode < MODE_EXACT || r.mode >= MODE__END || r.inner < INNER_CTM_REQ ||
			    r.inner >= INNER__END)
				die("routed accepted a bad mode/inner", len);
			/* The fixed offsets the forwarding code patches in place. */
			if (p[WIRE_ROUTED_TTL_OFFSET] != r.ttl || p[WIRE_ROUTED_HOPS_OFFSET] != r.hops)
				die("routed ttl/hops offsets", len);
			round_trip(p, len, WIRE_HDR_BYTES, enc_routed, &r, WIRE_ROUTED, false);
		}
		break;
	}
	case F_CTM_REQ: {
		struct wire_ctm_req m;
		if (wire_ctm_req_decode(p, len, &m) == 0) {
			check_peer_info(&m.from, len);
			round_trip(p, len, 0, enc_ctm_req, &m, 0, false);
		}
		break;
	}
	case F_CTM_REPLY: {
		struct wire_ctm_reply m;
		if (wire_ctm_reply_decode(p, len, &m) == 0) {
			if (m.n_neighbours > RING_CTM_NEIGHBOURS_MAX)
				die("ctm_reply neighbour count past the cap", len);
			check_peer_info(&m.from, len);
			for (unsigned i = 0; i < m.n_neighbours; i++)
				check_peer_info(&m.neighbours[i], len);
			round_trip(p, len, 0, enc_ctm_reply, &m, 0, false);
		}
		break;
	}
	case F_ECHO_REQ:
	case F_ECHO_REPLY: {
		bool reply = which == F_ECHO_REPLY;
		struct wire_echo m;
		if (wire_echo_decode(p, len, reply, &m) == 0)
			round_trip(p, len, 0, enc_echo, &m, 0, reply);
		break;
	}
	case F_RELAY: {
		struct wire_relay m;
		uint32_t idx;
		if (wire_relay_decode(p, len, &m) == 0) {
			check_view(p, len, m.rec, m.len);
			if (m.len < WIRE_HDR_BYTES || m.len > WIRE_MAX_RECORD_BYTES)
				die("relay accepted a record of a bad size", len);
			(void)wire_outer_receiver(m.rec, m.len, &idx);
			round_trip(p, len, WIRE_HDR_BYTES, enc_relay, &m, len && (p[1] & 1) ? WIRE_RELAYED
										 : WIRE_RELAY, false);
		}
		break;
	}
	}
	return 0;
}
