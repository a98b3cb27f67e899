/* libFuzzer target: the DHT message codec (section 08, dht_decode and
 * dht_encode), which every DHT operation a peer routes to us goes through.
 *
 * Invariants checked:
 *  - dht_decode never reads past the input (ASan) and accepts only messages
 *    within the limits: a known op and status, a key of 1..DHT_KEY_MAX_BYTES,
 *    value, certificate and signature within their caps, TTL within a day;
 *    every view it returns lies inside the input;
 *  - round trip: a message that decodes encodes back to exactly the input
 *    bytes (every byte consumed, nothing invented), and decoding those gives
 *    the same fields;
 *  - the other direction: any message built within the limits (fields taken
 *    from the input) encodes, decodes to the same fields, and re-encodes to
 *    the same bytes; dht_sig_hash, which the signature covers, is the same
 *    for both.
 * Corpus: tests/corpus/fuzz_dht (one message per op and near misses;
 * tests/gen_corpus.py). */
#include "../ipop.c"

static bool fz_in(const uint8_t *v, size_t vlen, const uint8_t *p, size_t len)
{
	return !vlen || (v >= p && v + vlen <= p + len);
}

static bool fz_same(const struct wire_dht *a, const struct wire_dht *b)
{
	return a->op == b->op && a->status == b->status && a->token == b->token && a->key_len == b->key_len &&
	       !memcmp(a->key, b->key, a->key_len) && wire_addr_eq(&a->owner, &b->owner) &&
	       a->ttl_s == b->ttl_s && a->value_len == b->value_len &&
	       (!a->value_len || !memcmp(a->value, b->value, a->value_len)) && a->cert_len == b->cert_len &&
	       (!a->cert_len || !memcmp(a->cert, b->cert, a->cert_len)) && a->sig_len == b->sig_len &&
	       (!a->sig_len || !memcmp(a->sig, b->sig, a->sig_len));
}

static void fz_decoded(const struct wire_dht *m, const uint8_t *p, size_t len)
{
	if (m->op < DHT_PUT || m->op >= DHT__OP_END || m->status > DHT_FULL || !m->key_len ||
	    m->key_len > DHT_KEY_MAX_BYTES || m->value_len > DHT_VALUE_MAX_BYTES ||
	    m->cert_len > SEC_CERT_MAX_BYTES || m->sig_len > SEC_SIG_MAX_BYTES || m->ttl_s > DHT_TTL_MAX_S ||
	    !fz_in(m->key, m->key_len, p, len) || !fz_in(m->value, m->value_len, p, len) ||
	    !fz_in(m->cert, m->cert_len, p, len) || !fz_in(m->sig, m->sig_len, p, len))
		abort();
}

/* decode(p) == m: encode(m) must give p back, byte for byte. */
static void fz_round_trip(const struct wire_dht *m, const uint8_t *p, size_t len)
{
	static uint8_t out[WIRE_MAX_PACKET_BYTES * 2];
	struct wire_dht again;
	uint8_t h1[32], h2[32];
	ssize_t n = dht_encode(out, sizeof out, m);
	if (n < 0 || (size_t)n != len || memcmp(out, p, len) != 0)
		abort();
	if (dht_decode(out, (size_t)n, &again) < 0 || !fz_same(m, &again))
		abort();
	dht_sig_hash(m, h1);
	dht_sig_hash(&again, h2);
	if (memcmp(h1, h2, 32))
		abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct wire_dht m;
	if (dht_decode(data, size, &m) == 0) {
		fz_decoded(&m, data, size);
		fz_round_trip(&m, data, size);
	}
	/* Build one within the limits from the input, whatever it is. */
	if (size < 8)
		return 0;
	struct buf b = buf_of(data, size);
	struct wire_dht w = { .op = (uint8_t)(DHT_PUT + buf_u8(&b) % (DHT__OP_END - DHT_PUT)),
			      .status = (uint8_t)(buf_u8(&b) % (DHT_FULL + 1)), .token = buf_u32(&b) };
	const uint8_t *rest = data + 6;
	size_t rl = size - 6;
	w.key_len = (uint8_t)(1 + rest[0] % DHT_KEY_MAX_BYTES);
	w.key = rest;
	w.ttl_s = (uint32_t)rl % (DHT_TTL_MAX_S + 1);
	memcpy(w.owner.b, rest + rl / 2, rl / 2 < RING_ADDR_BYTES ? rl / 2 : RING_ADDR_BYTES);
	w.value_len = (uint16_t)(rl % (DHT_VALUE_MAX_BYTES + 1));
	w.cert_len = (uint16_t)((rl * 7) % (SEC_CERT_MAX_BYTES + 1));
	w.sig_len = (uint8_t)(rl % (SEC_SIG_MAX_BYTES + 1));
	static uint8_t pool[DHT_KEY_MAX_BYTES + DHT_VALUE_MAX_BYTES + SEC_CERT_MAX_BYTES + SEC_SIG_MAX_BYTES];
	for (size_t i = 0; i < sizeof pool; i++)
		pool[i] = rest[i % rl];
	if (w.key_len > rl)
		w.key = pool;
	w.value = pool + DHT_KEY_MAX_BYTES;
	w.cert = w.value + DHT_VALUE_MAX_BYTES;
	w.sig = w.cert + SEC_CERT_MAX_BYTES;
	static uint8_t enc[WIRE_MAX_PACKET_BYTES * 2];
	ssize_t n = dht_encode(enc, sizeof enc, &w);
	struct wire_dht back;
	if (n < 0 || dht_decode(enc, (size_t)n, &back) < 0 || !fz_same(&w, &back))
		abort();
	fz_round_trip(&back, enc, (size_t)n);
	return 0;
}
