/* libFuzzer target: the SOCKS5 parsers (section 13 socks_) and the -L/-R
 * forward specs (section 16).
 *
 * A SOCKS client's bytes arrive split anywhere, so the input is cut at a
 * point the first byte chooses and fed the way socks_client_event sees it:
 * the greeting is judged complete or not, then socks_request_len decides
 * when a request is whole and socks_parse_request parses exactly that much.
 * Invariants: a request is never parsed past its claimed length, a parse
 * either fails with an RFC 1928 reply code (1..8) or yields a destination
 * (0), a name to look up (1) or a UDP association (2), and names are
 * NUL-terminated.
 * The same input, as text, goes to cli_parse_forward for -L. */
#include "../ipop.c"

static struct node fz_node;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc, (void)argv;
	fz_node.ip.net = 0x0a800000u;   /* 10.128.0.0/16 */
	fz_node.ip.mask = 0xffff0000u;
	FILE *null = getenv("IPOP_FUZZ_LOG") ? NULL : fopen("/dev/null", "w");
	if (null)
		stderr = null;
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 1)
		return 0;
	size_t cut = data[0] % (size);
	const uint8_t *p = data + 1;
	size_t len = size - 1;
	/* Greeting: version, count, methods. */
	if (len >= 2 && len >= 2u + p[1] && cut <= len) {
		size_t used = 2u + p[1];
		p += used;
		len -= used;
	}
	for (size_t have = cut < len ? cut : len; ; have = len) {
		size_t need = socks_request_len(p, have);
		if (need && have >= need) {
			uint32_t ip = 0;
			uint16_t port = 0;
			char name[256];
			int rc = socks_parse_request(&fz_node, p, need, &ip, &port, name);
			if (rc < -8 || rc > 2)     /* 2: UDP ASSOCIATE */
				abort();
			if (rc == 1 && strlen(name) > 255)
				abort();
			if (rc == 0 && !ip_on_net(&fz_node.ip, ip))
				abort();
			break;
		}
		if (have == len)
			break;
	}
	char text[512];
	size_t tl = size < sizeof text - 1 ? size : sizeof text - 1;
	memcpy(text, data, tl);
	text[tl] = 0;
	/* -L only: -R resolves its HOST, and a fuzzer must not send DNS queries. */
	static struct cli_opts o;
	o = (struct cli_opts){ .cmd = CMD_UP };
	if (cli_parse_forward(&o, text, false) == 0 && (o.n_fwd != 1 || !o.fwd[0].vport || !o.fwd[0].local.port))
		abort();
	return 0;
}
