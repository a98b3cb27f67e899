/* libFuzzer target: the two state files a node reads back at start
 * (section 10 ip_lease_load: the --ip auto lease; section 16
 * cli_remember_load: the remembered peers ring_remember_save wrote).
 * Both are the node's own files, but a crash, a full disk or an editor
 * may leave anything in them, and a bad file must never stop a start.
 *
 * The input is written to a file and read by both loaders (net 10.128.0.0/16,
 * virtual IP 10.128.0.1).  Invariants checked:
 *  - no read out of bounds (ASan), whatever the lines, their length or NULs;
 *  - the lease: the address loaded is 0 or a usable host address of the
 *    network (never the network, gateway or broadcast address, never off
 *    the network);
 *  - the lease round trip: ip_lease_save of what was loaded, loaded again,
 *    gives the same address and ring address;
 *  - the peers: at most RING_REMEMBER_MAX, each UDP or TCP with a port
 *    1..65535 and never an overlay address (the network, our own);
 *  - the peers round trip: ring_remember_save of what was loaded, loaded
 *    again, gives the same list in the same order.
 * Corpus: tests/corpus/fuzz_state (files as the node writes them, and
 * damaged ones; tests/gen_corpus.py). */
#include "../ipop.c"

static char fz_dir[64], fz_in[96], fz_lease[96];
static struct node fz_node;
static struct cli_opts fz_opts;

static void fz_cleanup(void)
{
	char path[160];
	static const char *const names[] = { "in", "in.base.peers", "in.base.peers.tmp", "lease", "lease.tmp" };
	for (unsigned i = 0; i < ARRAY_LEN(names); i++) {
		snprintf(path, sizeof path, "%s/%s", fz_dir, names[i]);
		unlink(path);
	}
	rmdir(fz_dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc, (void)argv;
	log_cfg.level = getenv("IPOP_FUZZ_LOG") ? LOG_DEBUG : -1;
	/* Files in memory where there is such a place: a few file operations per input. */
	snprintf(fz_dir, sizeof fz_dir, "%s/ipop-fuzz-state-XXXXXX", access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
	if (!mkdtemp(fz_dir))
		abort();
	atexit(fz_cleanup);
	snprintf(fz_in, sizeof fz_in, "%s/in", fz_dir);
	snprintf(fz_lease, sizeof fz_lease, "%s/lease", fz_dir);
	/* cli_remember_path: the peers of a node with a state file are STATE.peers. */
	snprintf(fz_opts.state_file, sizeof fz_opts.state_file, "%s/in.base", fz_dir);
	return 0;
}

static void fz_write(const char *path, const uint8_t *data, size_t size)
{
	FILE *f = fopen(path, "wb");
	if (!f || fwrite(data, 1, size, f) != size || fclose(f) != 0)
		abort();
}

static void fz_lease_check(const uint8_t *data, size_t size)
{
	struct ip_state ip = { .net = 0x0a800000u, .mask = 0xffff0000u };
	uint32_t vip, vip2;
	ring_addr addr = { 0 }, addr2 = { 0 };
	bool have, have2;
	fz_write(fz_in, data, size);
	ip_lease_load(fz_in, &ip, &vip, &addr, &have);
	if (vip && !ip_lease_usable(&ip, vip))
		abort();
	if (!vip)
		return;
	struct node *n = &fz_node;
	*n = (struct node){ .self = { .vip = vip, .addr = have ? addr : (ring_addr){ { 0 } } } };
	n->ip.net = ip.net;
	n->ip.mask = ip.mask;
	snprintf(n->ip.lease.path, sizeof n->ip.lease.path, "%s", fz_lease);
	ip_lease_save(n);
	ip_lease_load(fz_lease, &ip, &vip2, &addr2, &have2);
	if (vip2 != vip || !have2 || !wire_addr_eq(&addr2, &n->self.addr))
		abort();
}

static void fz_peers_load(struct node *n)
{
	*n = (struct node){ .self = { .vip = 0x0a800001u } };
	n->ip.net = 0x0a800000u;
	n->ip.mask = 0xffff0000u;
	cli_remember_load(n, &fz_opts);
}

static void fz_peers_check(const uint8_t *data, size_t size)
{
	static struct node again;
	struct node *n = &fz_node;
	char path[160];
	snprintf(path, sizeof path, "%s.peers", fz_opts.state_file);
	fz_write(path, data, size);
	fz_peers_load(n);
	if (n->ring.n_remembered > RING_REMEMBER_MAX)
		abort();
	for (unsigned i = 0; i < n->ring.n_remembered; i++) {
		const struct endpoint *e = &n->ring.remembered[i];
		if ((e->proto != PROTO_UDP && e->proto != PROTO_TCP) || !e->port || link_overlay_ip(n, e->ip))
			abort();
	}
	n->ring.remember_dirty = true;
	ring_remember_save(n);
	fz_peers_load(&again);
	if (again.ring.n_remembered != n->ring.n_remembered)
		abort();
	for (unsigned i = 0; i < n->ring.n_remembered; i++) {
		const struct endpoint *a = &n->ring.remembered[i], *b = &again.ring.remembered[i];
		if (a->proto != b->proto || a->ip != b->ip || a->port != b->port)
			abort();
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	fz_lease_check(data, size);
	fz_peers_check(data, size);
	return 0;
}
