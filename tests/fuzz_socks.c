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
 * The same input, as text, goes to cli_parse_forward for -L.
 *
 * Negotiation (socks_on_greeting, socks_on_login): the input after byte 0,
 * cut at the same point, arrives in two reads at a client whose socket is a
 * socketpair; with byte 0 odd the node requires RFC 1929 logins
 * (--socks-auth: FZ_AUTH's lines).  The steps run as in socks_client_event
 * until the client awaits its request (the part above covers requests).
 * Invariants: the greeting is answered [5, method]: "no authentication" (0)
 * or username/password (2) when offered and required, else 0xff and the
 * client is dropped; a greeting of another version is dropped unanswered;
 * a step consumes exactly its message; a login is answered [1, 0] exactly
 * when its version is 1 and "USER:PASSWORD" is one of the configured lines,
 * else [1, 1] and the client is dropped; a full buffer drops the client.
 *
 * UDP relay (socks_udp_from_client): the input after byte 0 is one datagram
 * from the client to the association's socket (loopback).  Invariant: it is
 * taken (the association locks onto its sender) exactly when it has a whole
 * header (RSV 0, FRAG 0, ATYP IPv4, a destination in the network) and fits
 * the relay's buffer whole: a longer datagram is dropped, never forwarded cut
 * short.
 * Corpus: tests/corpus/fuzz_socks (logins and datagrams: tests/gen_corpus.py;
 * regress* are inputs that crashed it once). */
#include "../ipop.c"

static struct node fz_node;


static const char FZ_AUTH[] = "alice:secret\nbob:p:w\n\ncarol:\n";

static struct socks_udp fz_udp;
static int fz_udp_sender = -1;

static int fz_udp_init(void)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t sl = sizeof sa;
	int big = 1 << 20;
	fz_udp = (struct socks_udp){ .n = &fz_node, .tcp_fd = -1 };
	fz_udp.udp_fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	fz_udp_sender = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	setsockopt(fz_udp.udp_fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
	if (fz_udp.udp_fd < 0 || fz_udp_sender < 0 || bind(fz_udp.udp_fd, (struct sockaddr *)&sa, sizeof sa) < 0 ||
	    getsockname(fz_udp.udp_fd, (struct sockaddr *)&sa, &sl) < 0 ||
	    connect(fz_udp_sender, (struct sockaddr *)&sa, sizeof sa) < 0 || !(fz_udp.pcb = udp_new()) ||
	    udp_bind(fz_udp.pcb, IP_ADDR_ANY, 0) != ERR_OK)
		abort();
	return 0;
}

/* Whether the relay must take a datagram (an oracle written apart from
 * socks_udp_header): RSV and FRAG zero, and an IPv4 address in the network
 * or a name of 1..63 printable non-blank ASCII bytes (a dotted one: its address
 * in the network), and data that fits a packet. */
static bool fz_udp_wanted(const uint8_t *p, size_t len)
{
	struct buf b = buf_of(p, len);
	uint16_t rsv = buf_u16(&b);
	uint8_t frag = buf_u8(&b), atyp = buf_u8(&b), nl = 0;
	char name[256] = "";
	uint32_t ip = 0;
	struct in_addr ia;
	if (atyp == SOCKS_ATYP_IPV4) {
		ip = buf_u32(&b);
	} else if (atyp == SOCKS_ATYP_NAME) {
		nl = buf_u8(&b);
		buf_bytes(&b, name, nl);
		name[nl] = 0;
	} else {
		return false;
	}
	buf_u16(&b);
	if (b.bad || rsv || frag || (size_t)(b.end - b.p) > WIRE_MAX_PACKET_BYTES)
		return false;
	if (atyp == SOCKS_ATYP_NAME) {
		if (nl == 0 || nl >= 64)
			return false;
		for (unsigned i = 0; i < nl; i++)
			if ((unsigned char)name[i] < 0x21 || (unsigned char)name[i] > 0x7e)
				return false;
		if (nl > 5 && !strcmp(name + nl - 5, ".ipop"))
			name[nl - 5] = 0;
		if (inet_pton(AF_INET, name, &ia) != 1)
			return true;
		ip = ntohl(ia.s_addr);
	}
	return ip_on_net(&fz_node.ip, ip);
}

static void fz_udp_datagram(const uint8_t *p, size_t len)
{
	/* The TCP client is on 127.0.0.1 and named port 0: the sender's
	 * datagrams count (socks_udp_from_client takes only the client's IP). */
	fz_udp.client = (struct sockaddr_in){ .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	fz_udp.have_client = false;
	if (send(fz_udp_sender, p, len, 0) != (ssize_t)len)
		return;
	socks_udp_from_client(&fz_udp);
	if (fz_udp.have_client != fz_udp_wanted(p, len))
		abort();
	uint8_t junk[16];
	while (recv(fz_udp.udp_fd, junk, sizeof junk, MSG_DONTWAIT) >= 0)
		;
}

static bool fz_login_ok(const uint8_t *m)
{
	size_t ul = m[1], pl = m[2 + ul];
	for (const char *line = FZ_AUTH; *line;) {
		size_t ll = strcspn(line, "\n");
		if (ll == ul + 1 + pl && !memcmp(line, m + 2, ul) && line[ul] == ':' && !memcmp(line + ul + 1, m + 3 + ul, pl))
			return true;
		line += ll + (line[ll] == '\n');
	}
	return false;
}

/* One negotiation step as socks_client_event runs it, checked. */
static int fz_step(struct socks_client *c, int peer)
{
	uint8_t before[sizeof c->in], r[4];
	size_t had = c->in_len;
	enum socks_state st = c->state;
	memcpy(before, c->in, had);
	int rc = st == SOCKS_AWAIT_GREETING ? socks_on_greeting(c) : socks_on_login(c);
	ssize_t got = recv(peer, r, sizeof r, MSG_DONTWAIT);
	if (rc == 0) {
		if (got != -1 || c->in_len != had)
			abort();        /* incomplete: nothing said, nothing taken */
		return 0;
	}
	if (st == SOCKS_AWAIT_GREETING) {
		bool auth = c->n->lw.socks_auth != NULL, offered = false;
		uint8_t want = auth ? 2 : 0;
		for (unsigned i = 0; i < before[1]; i++)
			offered |= before[2 + i] == want;
		if (before[0] != SOCKS_VERSION) {
			if (rc != -1 || got != -1)
				abort();
			return -1;
		}
		if (got != 2 || r[0] != SOCKS_VERSION || r[1] != (offered ? want : 0xff) || (rc == 1) != offered)
			abort();
		if (rc == 1 && (c->in_len != had - 2u - before[1] || c->state != (auth ? SOCKS_AWAIT_LOGIN : SOCKS_AWAIT_REQUEST)))
			abort();
		return rc;
	}
	bool ok = before[0] == 1 && fz_login_ok(before);
	if (got != 2 || r[0] != 1 || r[1] != !ok || (rc == 1) != ok)
		abort();
	if (rc == 1 && (c->in_len != had - 3u - before[1] - before[2 + before[1]] || c->state != SOCKS_AWAIT_REQUEST))
		abort();
	return rc;
}

static void fz_negotiate(const uint8_t *p, size_t len, size_t cut, bool auth)
{
	static struct socks_client c;
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
		abort();
	fz_node.lw.socks_auth = auth ? (char *)FZ_AUTH : NULL;
	c = (struct socks_client){ .n = &fz_node, .fd = sv[0], .state = SOCKS_AWAIT_GREETING };
	size_t pieces[2] = { cut < len ? cut : len, len - (cut < len ? cut : len) };
	for (int i = 0, at = 0; i < 2; at += (int)pieces[i], i++) {
		size_t take = pieces[i] < sizeof c.in - c.in_len ? pieces[i] : sizeof c.in - c.in_len;
		if (!take)
			continue;
		memcpy(c.in + c.in_len, p + at, take);
		c.in_len += take;
		int rc = 1;
		while (rc > 0 && c.state != SOCKS_AWAIT_REQUEST)
			rc = fz_step(&c, sv[1]);
		if (rc < 0 || c.in_len == sizeof c.in || c.state == SOCKS_AWAIT_REQUEST)
			break;          /* dropped, or on to the request */
	}
	fz_node.lw.socks_auth = NULL;
	close(sv[0]);
	close(sv[1]);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc, (void)argv;
	fz_node.ip.net = 0x0a800000u;   /* 10.128.0.0/16 */
	fz_node.ip.mask = 0xffff0000u;
	FILE *null = getenv("IPOP_FUZZ_LOG") ? NULL : fopen("/dev/null", "w");
	if (null)
		stderr = null;
	signal(SIGPIPE, SIG_IGN);
	lwip_init();
	return fz_udp_init();
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
	fz_negotiate(data + 1, size - 1, cut, data[0] & 1);
	fz_udp_datagram(data + 1, size - 1);
	return 0;
}
