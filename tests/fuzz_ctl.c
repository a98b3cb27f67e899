/* libFuzzer target: the control socket's and --metrics' request parsers
 * (section 15 ctl_): the command line a client sends (ctl_client_readable,
 * ctl_execute and every ctl_cmd_*), ctl_parse_target, and the HTTP request
 * of a metrics scrape (ctl_metrics_request).
 *
 * One real node (10.128.0.1/16, insecure, mode none) with its control
 * socket open (ctl_open on a temporary path).  Each input is one client,
 * accepted as ctl_accept does but over a socketpair; its bytes arrive in
 * pieces and ctl_client_readable runs after each, as the event loop would.
 *
 * Input: byte 0 = flags, then pieces [u8 length][bytes].
 *   FL_HTTP  the client came to the --metrics listener (HTTP/1.0)
 *   FL_EOF   the client shuts its writing side after the last piece
 * After the pieces the client's timer fires once (ctl_client_timeout: a
 * pending ping answers "timeout", anything else is closed), as the loop
 * would after CTL_IDLE_TIMEOUT_MS.
 * Invariants checked:
 *  - no access out of bounds, no leak (ASan);
 *  - every client ends closed with its slot free, and no DHT lookup is
 *    left pointing at it;
 *  - a control client that sent a whole line, or too long a line, gets an
 *    answer: newline-terminated text ("error ..." for what is not a
 *    command), and "status json" is balanced JSON with closed strings;
 *  - a metrics client that sent a whole request gets one HTTP/1.0 answer:
 *    200 for GET /metrics (or /), 404 for another GET, 405 otherwise, with
 *    a Content-Length equal to the body's length;
 *  - ctl_parse_target accepts exactly 40 hex digits or a dotted IPv4
 *    address, and a hex target reads back as the same address.
 * Corpus: tests/corpus/fuzz_ctl (tests/gen_corpus.py; regress* are inputs
 * that crashed it once). */
#include "../ipop.c"

enum { FL_HTTP = 1, FL_EOF = 2 };

static struct node fz_node;
static struct ctl fz_ctl;

static int fz_write_local(struct node *n, const uint8_t *pkt, size_t len)
{
	(void)n, (void)pkt, (void)len;
	return 0;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc, (void)argv;
	char err[512], path[64];
	log_cfg.level = getenv("IPOP_FUZZ_LOG") ? LOG_DEBUG : -1;
	signal(SIGPIPE, SIG_IGN);
	struct cli_opts o = { .cmd = CMD_UP, .n_listen = 1, .insecure = true, .has_ip = true,
			      .ip = 0x0a800001u, .prefix = 16, .mode = MODE_NONE, .log_level = -1 };
	o.listen[0] = (struct cli_uri){ PROTO_UDP, "127.0.0.1", 0 };
	struct node *n = &fz_node;
	if (cli_node_init(n, &o, err, sizeof err) < 0) {
		fprintf(stderr, "fuzz_ctl: node init: %s\n", err);
		abort();
	}
	snprintf(n->name, sizeof n->name, "fuzz-node");
	link_start(n);
	ring_start(n);
	dht_start(n);
	n->ip.local = true;
	n->up.write_local = fz_write_local;
	snprintf(path, sizeof path, "/tmp/ipop-fuzz-ctl-%d.sock", (int)getpid());
	if (ctl_open(&fz_ctl, n, path, err, sizeof err) < 0) {
		fprintf(stderr, "fuzz_ctl: %s\n", err);
		abort();
	}
	unlink(path);                   /* the fuzzer never connects to it */
	return 0;
}

/* Balanced braces and brackets, strings closed, no raw control bytes in them. */
static bool fz_json_ok(const char *s, size_t len)
{
	int depth = 0;
	bool in_str = false;
	for (size_t i = 0; i < len; i++) {
		char ch = s[i];
		if (in_str) {
			if ((unsigned char)ch < 0x20)
				return false;
			if (ch == '\\')
				i++;
			else if (ch == '"')
				in_str = false;
			continue;
		}
		if (ch == '"')
			in_str = true;
		else if (ch == '{' || ch == '[')
			depth++;
		else if ((ch == '}' || ch == ']') && --depth < 0)
			return false;
	}
	return !in_str && depth == 0;
}

static void fz_check_http(const char *req, const char *out, size_t len)
{
	if (!strstr(req, "\r\n\r\n") && !strstr(req, "\n\n"))
		return;                 /* incomplete: closed unanswered, or still waiting */
	bool get = !strncmp(req, "GET ", 4);
	bool ok = get && (!strncmp(req + 4, "/metrics", 8) || !strncmp(req + 4, "/ ", 2));
	const char *want = ok ? "HTTP/1.0 200 OK\r\n" : get ? "HTTP/1.0 404 Not Found\r\n" :
			   "HTTP/1.0 405 Method Not Allowed\r\n";
	const char *cl = strstr(out, "Content-Length: "), *body = strstr(out, "\r\n\r\n");
	if (strncmp(out, want, strlen(want)) || !cl || !body ||
	    strtoul(cl + 16, NULL, 10) != len - (size_t)(body + 4 - out))
		abort();
}

static void fz_check_line(const char *line, const char *out, size_t len, bool too_long)
{
	if (too_long) {
		if (strcmp(out, "error line too long\n"))
			abort();
		return;
	}
	if (getenv("FZ_DEBUG"))
		fprintf(stderr, "line [%s] -> [%s]\n", line, out);
	if (!len || out[len - 1] != '\n')
		abort();
	/* The words, split as ctl_execute splits them (at most 6 count). */
	char copy[CTL_LINE_MAX_BYTES], *a[6] = { 0 }, *save = NULL;
	int na = 0;
	snprintf(copy, sizeof copy, "%s", line);
	for (char *t = strtok_r(copy, " \t\r", &save); t && na < 6; t = strtok_r(NULL, " \t\r", &save))
		a[na++] = t;
	const char *cmd = a[0] ? a[0] : "";
	if (!strcmp(cmd, "status") && a[1] && !strcmp(a[1], "json") && !fz_json_ok(out, len))
		abort();
	/* "ns" hands out namespace fds: this node has none, so it refuses */
	if (!strcmp(cmd, "ns") && strcmp(out, "error this node has no namespace (start it with --mode ns)\n"))
		abort();
	bool is_known = !strcmp(cmd, "status") || !strcmp(cmd, "map") || !strcmp(cmd, "ping") ||
			!strcmp(cmd, "ns") || (!strcmp(cmd, "route") && na == 3) || (!strcmp(cmd, "dht") && na >= 2);
	if (is_known == !strcmp(out, "error unknown command\n"))
		abort();
}

static void fz_target(const uint8_t *data, size_t size)
{
	char s[64];
	size_t l = size < sizeof s - 1 ? size : sizeof s - 1;
	memcpy(s, data, l);
	s[l] = 0;
	ring_addr a;
	struct in_addr ia;
	uint8_t b[RING_ADDR_BYTES];
	bool hex = buf_unhex(s, b, RING_ADDR_BYTES), ip = inet_pton(AF_INET, s, &ia) == 1;
	int rc = ctl_parse_target(s, &a);
	if ((rc == 0) != (hex || ip) || (hex && memcmp(a.b, b, RING_ADDR_BYTES)))
		abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct node *n = &fz_node;
	if (size < 1)
		return 0;
	fz_target(data + 1, size - 1);
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
		abort();
	int big = 1 << 21;
	setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
	setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
	/* ctl_accept, for a fd of ours. */
	struct ctl_client *c = &fz_ctl.clients[0];
	if (ev_fd_watch(&n->loop, sv[0], EPOLLIN, ctl_client_event, c) < 0)
		abort();
	c->fd = sv[0];
	c->in_len = 0;
	c->in[0] = 0;
	c->out_off = 0;
	c->http = data[0] & FL_HTTP;
	ev_timer_arm(&n->loop, &c->timer, c->http ? CTL_METRICS_TIMEOUT_MS : CTL_IDLE_TIMEOUT_MS);
	/* What the node saw, to judge its answer by. */
	static char seen[CTL_LINE_MAX_BYTES + 1];
	size_t seen_len = 0;
	/* The loop delivers input only while the client is watched for it
	 * (the node stops once it has its line or request; a half-close is
	 * then not seen either: no EPOLLHUP for it). */
#define FZ_READING() (c->fd >= 0 && (n->loop.files[c->fd].events & EPOLLIN))
	for (size_t at = 1; at < size && FZ_READING();) {
		size_t len = data[at++];
		if (len > size - at)
			len = size - at;
		ssize_t w = len ? send(sv[1], data + at, len, MSG_NOSIGNAL) : 0;
		at += len;
		if (w > 0 && seen_len < CTL_LINE_MAX_BYTES - 1) {
			size_t keep = (size_t)w < CTL_LINE_MAX_BYTES - 1 - seen_len ? (size_t)w : CTL_LINE_MAX_BYTES - 1 - seen_len;
			memcpy(seen + seen_len, data + at - len, keep);
			seen_len += keep;
		}
		ctl_client_readable(c);
	}
	if (FZ_READING() && (data[0] & FL_EOF)) {
		shutdown(sv[1], SHUT_WR);
		ctl_client_readable(c);
	}
	bool answered_by_now = c->fd < 0;
	if (c->fd >= 0)
		ctl_client_timeout(&n->loop, &c->timer);
	if (c->fd >= 0 || c->ping_id)
		abort();                /* the timer must end every client */
	for (unsigned i = 0; i < CTL_CLIENTS_MAX; i++)
		if (fz_ctl.clients[i].fd >= 0)
			abort();
	for (unsigned i = 0; i < n->dht.n_pending; i++)
		if (n->dht.pending[i].arg == c)
			abort();
	static char out[1 << 21];
	ssize_t r, got = 0;
	while ((r = recv(sv[1], out + got, sizeof out - 1 - (size_t)got, 0)) > 0)
		got += r;
	out[got] = 0;
	close(sv[1]);
	seen[seen_len] = 0;
	/* The node reads at most a line's buffer; what it judged is what it read. */
	char *nl = memchr(seen, '\n', seen_len);
	bool nul_early = memchr(seen, 0, nl ? (size_t)(nl - seen) : seen_len) != NULL;
	if (c->http) {
		if (!nul_early)
			fz_check_http(seen, out, (size_t)got);
	} else if (nl && !nul_early && (answered_by_now || !strncmp(seen, "ping", 4))) {
		*nl = 0;
		fz_check_line(seen, out, (size_t)got, false);
	} else if (!nl && seen_len == CTL_LINE_MAX_BYTES - 1) {
		fz_check_line(seen, out, (size_t)got, true);
	}
	return 0;
}
