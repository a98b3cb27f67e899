/* libFuzzer target: certificates and the revocation list (section 04 sec_).
 * A certificate is the first thing a peer sends in a certificate network
 * (its identity, link_cert_refusal) and what every DHT record carries
 * (dht_authorized); the mac1 key derives from the public ca.crt, so
 * anyone holding ca.crt reaches sec_cert_check with any bytes.
 *
 * LLVMFuzzerInitialize runs the real `ipop ca init` and `ipop cert issue`
 * (cli_ca_init, cli_cert_issue) into a temporary directory and loads the
 * node's directory with sec_load_cert_dir, as `ipop up --cert-dir` does; it
 * keeps the CA key and the node key to issue more certificates.
 *
 * Input: byte 0 selects the mode, the rest is its data:
 *   0 DER    a certificate as a peer sends it, to sec_cert_check; and,
 *            whatever the signature, sec_grant_of on what parses (it reads
 *            the subject alternative names and the name)
 *   1 PATCH  the issued certificate with patches [u16 offset][xor byte]
 *            applied (near-valid certificates), then as DER
 *   2 PEM    text, to mbedtls_x509_crt_parse (ca.crt, node.crt, --cert)
 *   3 ISSUE  `cert issue` flags (--name, --ip, --route-for, --days), split
 *            at spaces, parsed by cli_parse_args and issued as cli_cert_issue
 *            does (sec_cert_write with the CA key)
 *   4 CRL    a revocation list, to sec_crl_parse; each '@' in it stands
 *            for the issued certificate's serial (in hex)
 * Invariants checked:
 *  - no access out of bounds, no leak (ASan), whatever the bytes;
 *  - a grant never holds more than SEC_CERT_IPS_MAX IPs or
 *    SEC_CERT_ROUTES_MAX routes, prefix lengths are 0..32, the name and
 *    serial fit their buffers (NUL-terminated name);
 *  - DER: sec_cert_check accepts only certificates this CA signed (a
 *    certificate it accepts verifies again on its own);
 *  - ISSUE: every certificate cert issue makes passes sec_cert_check, fits
 *    one handshake packet (SEC_CERT_MAX_BYTES, what sec_load_cert_dir
 *    demands of node.crt), and grants exactly the IPs, routes and name asked;
 *  - CRL: a list that parses holds at most SEC_REVOKED_MAX serials of 1..20
 *    bytes; each listed serial is revoked; written back as `ca revoke` lines
 *    it parses to the same list; the issued certificate is refused as
 *    revoked exactly when its serial is listed; a list that does not parse
 *    says why.
 * Corpus: tests/corpus/fuzz_cert (tests/gen_corpus.py; regress* are inputs
 * that crashed it once). */
/* The mbedTLS parsers a certificate goes through (ASN.1, X.509, PEM, OIDs),
 * compiled into this target so that libFuzzer sees their branches and ASan
 * their memory accesses: the library archives are built with neither.  The
 * archives' copies are then not linked.  (Found through mbedTLS's include
 * directory, which the build puts on the path: no version in this file.) */
#include "../library/asn1parse.c"
#include "../library/base64.c"
#include "../library/oid.c"
#include "../library/pem.c"
#include "../library/x509.c"
#include "../library/x509_crt.c"
#include "../ipop.c"

enum { M_DER, M_PATCH, M_PEM, M_ISSUE, M_CRL, M__END };

static struct sec_creds fz_sec;
static struct sec_rng fz_rng;
static mbedtls_pk_context fz_ca_key, fz_node_key;
static mbedtls_x509_crt fz_ca;
static char fz_issuer[256];
static uint8_t fz_good[SEC_CERT_MAX_BYTES];
static size_t fz_good_len;

static void fz_cli(int (*fn)(struct cli_opts *), struct cli_opts *o)
{
	int out = dup(1), null = open("/dev/null", O_WRONLY);
	dup2(null, 1);                  /* "created ...", "issued ..." */
	int rc = fn(o);
	fflush(stdout);
	dup2(out, 1);
	close(out);
	close(null);
	if (rc != EXIT_OK)
		abort();
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc, (void)argv;
	char dir[] = "/tmp/ipop-fuzz-cert-XXXXXX", err[600], path[600];
	log_cfg.level = getenv("IPOP_FUZZ_LOG") ? LOG_DEBUG : -1;
	if (!mkdtemp(dir))
		abort();
	struct cli_opts o = { .cmd = CMD_CA_INIT };
	snprintf(o.out, sizeof o.out, "%s/ca", dir);
	fz_cli(cli_ca_init, &o);
	o = (struct cli_opts){ .cmd = CMD_CERT_ISSUE, .grant = { .ips = { 0x0a800005u }, .n_ips = 1,
								  .route_net = { 0x0ac80000u }, .route_len = { 24 },
								  .n_routes = 1 } };
	snprintf(o.name, sizeof o.name, "fuzz-node");
	snprintf(o.ca_dir, sizeof o.ca_dir, "%s/ca", dir);
	snprintf(o.out, sizeof o.out, "%s/node", dir);
	fz_cli(cli_cert_issue, &o);
	mbedtls_pk_init(&fz_ca_key);
	mbedtls_pk_init(&fz_node_key);
	mbedtls_x509_crt_init(&fz_ca);
	snprintf(path, sizeof path, "%s/node/node.key", dir);
	if (sec_creds_init(&fz_sec) < 0 || sec_rng_init(&fz_rng) < 0 ||
	    sec_load_cert_dir(&fz_sec, &fz_rng, o.out, err, sizeof err) < 0 ||
	    cli_ca_load(o.ca_dir, &fz_ca_key, &fz_ca, &fz_rng, err, sizeof err) < 0 ||
	    sec_parse_pem(path, true, NULL, &fz_node_key, &fz_rng, err, sizeof err) < 0 ||
	    mbedtls_x509_dn_gets(fz_issuer, sizeof fz_issuer, &fz_ca.subject) < 0) {
		fprintf(stderr, "fuzz_cert: %s\n", err);
		abort();
	}
	snprintf(fz_sec.ctx->crl_path, sizeof fz_sec.ctx->crl_path, "crl.txt");
	fz_good_len = fz_sec.ctx->own.raw.len;
	memcpy(fz_good, fz_sec.ctx->own.raw.p, fz_good_len);
	static const char *const files[] = { "ca/ca.key", "ca/ca.crt", "node/node.key", "node/node.crt",
					     "node/ca.crt", "ca", "node" };
	for (unsigned i = 0; i < ARRAY_LEN(files); i++) {
		snprintf(path, sizeof path, "%s/%s", dir, files[i]);
		if (unlink(path) < 0)
			rmdir(path);
	}
	rmdir(dir);
	return 0;
}

static void fz_grant_sane(const struct sec_grant *g)
{
	if (g->n_ips > SEC_CERT_IPS_MAX || g->n_routes > SEC_CERT_ROUTES_MAX ||
	    g->serial.len > SEC_SERIAL_MAX_BYTES || memchr(g->name, 0, sizeof g->name) == NULL)
		abort();
	for (unsigned i = 0; i < g->n_routes; i++)
		if (g->route_len[i] > 32)
			abort();
}

/* As a peer's certificate: checked, and its grant read whatever the check said. */
static void fz_der(const uint8_t *der, size_t len)
{
	mbedtls_x509_crt crt, raw;
	struct sec_grant g;
	const char *why = NULL;
	mbedtls_x509_crt_init(&crt);
	if (sec_cert_check(&fz_sec, der, len, &crt, &g, &why) == 0) {
		uint32_t flags = 0;
		fz_grant_sane(&g);
		if (mbedtls_x509_crt_verify(&crt, &fz_sec.ctx->ca, NULL, NULL, &flags, NULL, NULL) != 0)
			abort();
		ring_addr a;
		sec_cert_addr(&crt, &g, g.n_ips ? g.ips[0] : 0, &a);
	} else if (!why || !*why) {
		abort();
	}
	mbedtls_x509_crt_free(&crt);
	mbedtls_x509_crt_init(&raw);
	if (mbedtls_x509_crt_parse_der(&raw, der, len) == 0) {
		sec_grant_of(&raw, &g);
		fz_grant_sane(&g);
	}
	mbedtls_x509_crt_free(&raw);
}

static void fz_patch(const uint8_t *p, size_t len)
{
	uint8_t der[SEC_CERT_MAX_BYTES];
	memcpy(der, fz_good, fz_good_len);
	for (size_t i = 0; i + 3 <= len; i += 3)
		der[(size_t)(p[i] << 8 | p[i + 1]) % fz_good_len] ^= p[i + 2];
	fz_der(der, fz_good_len);
}

static void fz_pem(const uint8_t *p, size_t len)
{
	char *text = malloc(len + 1);
	memcpy(text, p, len);
	text[len] = 0;
	mbedtls_x509_crt crt;
	mbedtls_x509_crt_init(&crt);
	/* sec_parse_pem hands mbedTLS the file with its terminator counted. */
	mbedtls_x509_crt_parse(&crt, (const uint8_t *)text, len + 1);
	for (const mbedtls_x509_crt *c = &crt; c && c->raw.p; c = c->next) {
		struct sec_grant g;
		sec_grant_of(c, &g);
		fz_grant_sane(&g);
	}
	mbedtls_x509_crt_free(&crt);
	free(text);
}

static void fz_issue(const uint8_t *p, size_t len)
{
	char text[512], *argv[32];
	int argc = 0;
	size_t tl = len < sizeof text - 1 ? len : sizeof text - 1;
	memcpy(text, p, tl);
	text[tl] = 0;
	for (char *save = NULL, *t = strtok_r(text, " \n", &save); t && argc < 32; t = strtok_r(NULL, " \n", &save))
		argv[argc++] = t;
	struct cli_opts o = { .cmd = CMD_CERT_ISSUE };
	int err = dup(2), null = open("/dev/null", O_WRONLY);
	dup2(null, 2);                  /* cli_fail's "bad --ip ..." */
	int rc = cli_parse_args(&o, argc, argv, "cert issue");
	dup2(err, 2);
	close(err);
	close(null);
	if (rc != 0)
		return;
	/* What cli_cert_issue does once its flags are read, but the key. */
	char subject[128];
	uint8_t pem[4096];
	snprintf(subject, sizeof subject, "CN=%s,O=ipop", o.name[0] ? o.name : "ipop node");
	snprintf(o.grant.name, sizeof o.grant.name, "%s", o.name);
	if (sec_cert_write(&fz_rng, &fz_node_key, &fz_ca_key, subject, fz_issuer, &o.grant,
			   o.days ? (int)o.days : 365, pem, sizeof pem) < 0)
		abort();
	mbedtls_x509_crt crt, chk;
	mbedtls_x509_crt_init(&crt);
	mbedtls_x509_crt_init(&chk);
	struct sec_grant g;
	const char *why;
	if (mbedtls_x509_crt_parse(&crt, pem, strlen((char *)pem) + 1) != 0 || crt.raw.len > SEC_CERT_MAX_BYTES ||
	    sec_cert_check(&fz_sec, crt.raw.p, crt.raw.len, &chk, &g, &why) != 0)
		abort();
	fz_grant_sane(&g);
	/* The same sets: mbedTLS writes the names in reverse, order means nothing. */
	if (g.n_ips != o.grant.n_ips || g.n_routes != o.grant.n_routes ||
	    strcmp(g.name, o.name[0] ? o.name : "ipop node"))
		abort();
	for (unsigned i = 0; i < g.n_ips; i++)
		if (!sec_grant_has_ip(&o.grant, g.ips[i]) || !sec_grant_has_ip(&g, o.grant.ips[i]))
			abort();
	for (unsigned i = 0; i < g.n_routes; i++) {
		bool found = false;
		for (unsigned j = 0; j < g.n_routes; j++)
			found |= g.route_net[i] == o.grant.route_net[j] && g.route_len[i] == o.grant.route_len[j];
		if (!found)
			abort();
	}
	mbedtls_x509_crt_free(&crt);
	mbedtls_x509_crt_free(&chk);
}

static bool fz_good_refused_as_revoked(void)
{
	mbedtls_x509_crt crt;
	struct sec_grant g;
	const char *why = NULL;
	mbedtls_x509_crt_init(&crt);
	int rc = sec_cert_check(&fz_sec, fz_good, fz_good_len, &crt, &g, &why);
	mbedtls_x509_crt_free(&crt);
	if (rc < 0 && strcmp(why, "certificate revoked"))
		abort();                /* refused for another reason: impossible */
	return rc < 0;
}

static void fz_crl(const uint8_t *p, size_t len)
{
	struct sec_ctx *x = fz_sec.ctx;
	char err[400] = "", good_hex[2 * SEC_SERIAL_MAX_BYTES + 1];
	struct sec_serial good;
	mbedtls_x509_crt crt;
	mbedtls_x509_crt_init(&crt);
	if (mbedtls_x509_crt_parse_der(&crt, fz_good, fz_good_len) != 0)
		abort();
	sec_serial_of(&crt, &good);
	mbedtls_x509_crt_free(&crt);
	buf_hex(good.b, good.len, good_hex);
	/* Each '@' stands for the issued certificate's serial, so that inputs
	 * can revoke it. */
	char *text = malloc(len * strlen(good_hex) + 1), *t = text;
	for (size_t i = 0; i < len; i++)
		if (p[i] == '@')
			t = stpcpy(t, good_hex);
		else
			*t++ = (char)p[i];
	*t = 0;
	x->n_revoked = 0;               /* parsed straight into the list in force */
	if (sec_crl_parse("fuzz", text, x->revoked, &x->n_revoked, err, sizeof err) < 0) {
		if (!err[0])
			abort();
		x->n_revoked = 0;
		free(text);
		return;
	}
	free(text);
	unsigned n = x->n_revoked;
	if (n > SEC_REVOKED_MAX)
		abort();
	bool listed = false;
	for (unsigned i = 0; i < n; i++) {
		const struct sec_serial *s = &x->revoked[i];
		if (!s->len || s->len > SEC_SERIAL_MAX_BYTES || !sec_revoked(&fz_sec, s))
			abort();
		listed |= s->len == good.len && !memcmp(s->b, good.b, good.len);
	}
	if (fz_good_refused_as_revoked() != listed)
		abort();
	/* Written back as `ipop ca revoke` writes lines, it reads the same. */
	struct buf_str w = { 0 };
	char hex[2 * SEC_SERIAL_MAX_BYTES + 1];
	static struct sec_serial before[SEC_REVOKED_MAX];
	memcpy(before, x->revoked, n * sizeof *before);
	for (unsigned i = 0; i < n; i++) {
		buf_hex(x->revoked[i].b, x->revoked[i].len, hex);
		buf_printf(&w, "%s  # %s\n", hex, "fuzz");
	}
	x->n_revoked = 0;
	if (sec_crl_parse("fuzz", w.s ? w.s : "", x->revoked, &x->n_revoked, err, sizeof err) < 0 || x->n_revoked != n)
		abort();
	for (unsigned i = 0; i < n; i++)
		if (x->revoked[i].len != before[i].len || memcmp(x->revoked[i].b, before[i].b, before[i].len))
			abort();
	buf_str_free(&w);
	x->n_revoked = 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1)
		return 0;
	const uint8_t *p = data + 1;
	size_t len = size - 1;
	switch (data[0] % M__END) {
	case M_DER:
		fz_der(p, len);
		break;
	case M_PATCH:
		fz_patch(p, len);
		break;
	case M_PEM:
		fz_pem(p, len);
		break;
	case M_ISSUE:
		fz_issue(p, len);
		break;
	default:
		fz_crl(p, len);
	}
	return 0;
}
