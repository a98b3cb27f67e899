/* libFuzzer target: the config parser (section 16 cli_).
 *
 * Every input is used three ways:
 *   1. written to a temp file (a memfd, opened by its /proc/self/fd path, so
 *      nothing touches the disk) and loaded with cli_load_config into a
 *      fresh struct cli_opts (cmd CMD_UP), as `ipop up --config FILE` does;
 *   2. split at newlines, each line fed NUL-terminated (in an exactly sized
 *      heap copy) to cli_config_line on another fresh cli_opts;
 *   3. each line also goes to cli_parse_uri (listening and dialling) and
 *      cli_parse_ip.
 * Results are checked for the invariants the rest of ipop relies on
 * (counts within their arrays, strings terminated, prefixes 1..32).
 * cli_fail's messages go to a /dev/null stream (IPOP_FUZZ_LOG=1 keeps them);
 * sanitizer and libFuzzer reports write to fd 2 and are not affected.
 * Corpus: tests/corpus/fuzz_config (see tests/gen_corpus.c). */
#include <sys/mman.h>
#include "../ipop.c"

static char cfg_path[64];
static int cfg_fd = -1;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc, (void)argv;
	cfg_fd = memfd_create("ipop-fuzz.conf", MFD_CLOEXEC);
	if (cfg_fd < 0)
		abort();
	snprintf(cfg_path, sizeof cfg_path, "/proc/self/fd/%d", cfg_fd);
	if (!getenv("IPOP_FUZZ_LOG")) {
		FILE *null = fopen("/dev/null", "w");
		if (null)
			stderr = null;
	}
	return 0;
}

/* Always: counts within their arrays, strings terminated.  When every line
 * was accepted (ok), also the values: a failed line may leave a half-set
 * field behind (the caller exits on the error), so those are not checked
 * after one. */
static void check_opts(const struct cli_opts *o, bool ok)
{
	if (o->n_listen > LISTEN_MAX || o->n_boot > BOOTSTRAP_MAX)
		abort();
	for (unsigned i = 0; i < o->n_listen; i++)
		if (strnlen(o->listen[i].host, sizeof o->listen[i].host) == sizeof o->listen[i].host)
			abort();
	for (unsigned i = 0; i < o->n_boot; i++)
		if (strnlen(o->boot[i].host, sizeof o->boot[i].host) == sizeof o->boot[i].host)
			abort();
	if (strnlen(o->secret_file, sizeof o->secret_file) == sizeof o->secret_file ||
	    strnlen(o->cert_dir, sizeof o->cert_dir) == sizeof o->cert_dir ||
	    strnlen(o->crl, sizeof o->crl) == sizeof o->crl ||
	    strnlen(o->control, sizeof o->control) == sizeof o->control ||
	    strnlen(o->dev, sizeof o->dev) == sizeof o->dev)
		abort();
	if (!ok)
		return;
	for (unsigned i = 0; i < o->n_listen; i++)
		if (o->listen[i].proto != PROTO_UDP && o->listen[i].proto != PROTO_TCP)
			abort();
	for (unsigned i = 0; i < o->n_boot; i++)
		if (o->boot[i].port == 0 || (o->boot[i].proto != PROTO_UDP && o->boot[i].proto != PROTO_TCP))
			abort();
	if (o->has_ip && (o->ip == 0 || o->prefix < 1 || o->prefix > 32))
		abort();
	if (o->log_level < LOG_ERROR || o->log_level > LOG_DEBUG)
		abort();
	if (o->mtu && (o->mtu < IP_MTU_MIN || o->mtu > IP_MTU_MAX))
		abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	/* 1: the whole input as a config file. */
	if (ftruncate(cfg_fd, 0) < 0 || (size && pwrite(cfg_fd, data, size, 0) != (ssize_t)size))
		abort();
	struct cli_opts o = { .cmd = CMD_UP, .log_level = LOG_INFO };
	int rc = cli_load_config(&o, cfg_path);
	if (rc != 0 && rc != -1)
		abort();
	check_opts(&o, rc == 0);

	/* 2 and 3: line by line. */
	struct cli_opts lo = { .cmd = CMD_UP, .log_level = LOG_INFO };
	const uint8_t *p = data, *end = data + size;
	int lineno = 0;
	bool all_ok = true;
	while (p < end) {
		const uint8_t *nl = memchr(p, '\n', (size_t)(end - p));
		size_t len = nl ? (size_t)(nl - p) : (size_t)(end - p);
		char *line = malloc(len + 1);
		if (!line)
			abort();
		memcpy(line, p, len);
		line[len] = 0;

		struct cli_uri u;
		struct cli_opts io = { .cmd = CMD_UP };
		if (cli_parse_uri(line, &u, true) == 0 &&
		    (strnlen(u.host, sizeof u.host) == sizeof u.host || (u.proto != PROTO_UDP && u.proto != PROTO_TCP)))
			abort();
		if (cli_parse_uri(line, &u, false) == 0 && u.port == 0)
			abort();
		if (cli_parse_ip(line, &io) == 0 && (io.ip == 0 || io.prefix < 1 || io.prefix > 32 || !io.has_ip))
			abort();

		all_ok &= cli_config_line(&lo, line, "fuzz", ++lineno) == 0;
		check_opts(&lo, all_ok);
		free(line);
		p += len + (nl ? 1 : 0);
	}
	return 0;
}
