/* libFuzzer target: the tap offloads (section 11): TSO splitting of the
 * super-frames the kernel hands us with a virtio-net header
 * (tap_vnet_frame, tap_tso_segment, tap_uso_segment), GRO coalescing of the packets we
 * write (tap_gro_add, tap_gro_flush, through tap_write_ip), and the UDP_GRO
 * segment size read from a control message (section 06 link_gro_size).
 *
 * One real node (10.128.0.1/16, insecure, mode none) with a fake tap: its fd
 * is one end of a datagram socketpair, offloads on.  Segments cut from a
 * super-frame reach ip_from_local; those for FZ_DST wait in its IP map
 * (created unresolved before each input), where they are checked.
 *
 * Input: byte 0 = mode | flags, then:
 *   MODE_TSO  a virtio-net header (10 bytes) and a frame, to tap_vnet_frame
 *   MODE_GRO  packets [u16 big-endian length][IPv4 packet], to tap_write_ip
 *             one after the other, then a flush
 *   MODE_CMSG control messages [level][type][length][data], written as the
 *             kernel would into ipop's buffer, for link_gro_size
 *   FL_FIXUP  make the IPv4 header's version 4, source 10.128.0.1 and
 *             destination FZ_DST (TSO: also the EtherType), so that
 *             mutations reach past ip_from_local's checks
 * Invariants checked:
 *  - no access out of bounds (ASan; the frame is an exact-size allocation);
 *  - TSO: every segment is at most the MTU (n->ip.mtu) and at most the
 *    super-frame's headers plus its gso_size; the count matches
 *    tso_segments; the segments the IP map holds (the first
 *    IP_MAP_QUEUE_MAX) carry, in order, the super-frame's payload, each at
 *    its sequence number, with correct IPv4 header and TCP checksums, and
 *    FIN and PSH only on the last; UDP_SEGMENT super-frames (GSO_UDP_L4)
 *    likewise, each datagram with its UDP length and checksum;
 *  - GRO: every frame written is at most a virtio-net header plus 14 + 65535
 *    bytes; reading the frames back (super-frames cut at their gso_size),
 *    every packet written comes back once, in order, with its own
 *    sequence number and payload, and whole packets unchanged;
 *  - CMSG: link_gro_size returns the value of the first whole SOL_UDP/UDP_GRO
 *    message, or 0 (none, or not positive), for control messages laid out
 *    as the kernel writes them into ipop's buffer.
 * Corpus: tests/corpus/fuzz_tap (tests/gen_corpus.py; regress* are inputs
 * that crashed it once). */
#include "../ipop.c"

enum { MODE_TSO = 0, MODE_GRO = 1, MODE_CMSG = 2, FL_FIXUP = 4 };

#define FZ_SELF 0x0a800001u
#define FZ_DST 0x0a800002u

static struct node fz_node;
static int fz_tap_peer = -1;

static int fz_write_local(struct node *n, const uint8_t *pkt, size_t len)
{
	(void)n, (void)pkt, (void)len;
	return 0;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc, (void)argv;
	char err[512];
	log_cfg.level = getenv("IPOP_FUZZ_LOG") ? LOG_DEBUG : -1;
	signal(SIGPIPE, SIG_IGN);
	struct cli_opts o = { .cmd = CMD_UP, .n_listen = 1, .insecure = true, .has_ip = true,
			      .ip = FZ_SELF, .prefix = 16, .mode = MODE_NONE, .log_level = -1 };
	o.listen[0] = (struct cli_uri){ PROTO_UDP, "127.0.0.1", 0 };
	struct node *n = &fz_node;
	if (cli_node_init(n, &o, err, sizeof err) < 0) {
		fprintf(stderr, "fuzz_tap: node init: %s\n", err);
		abort();
	}
	link_start(n);
	ring_start(n);
	dht_start(n);
	n->ip.local = true;
	n->up.write_local = fz_write_local;
	int sv[2], big = 1 << 22;
	if (socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
		abort();
	setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
	setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
	n->tap.fd = sv[0];
	fz_tap_peer = sv[1];
	n->tap.vnet = true;
	memcpy(n->tap.gw_mac, tap_gw_mac, 6);
	return 0;
}

/* RFC 1071, written out here so the check does not share ipop's code. */
static uint16_t fz_csum(uint32_t sum, const uint8_t *p, size_t len)
{
	for (size_t i = 0; i + 1 < len; i += 2)
		sum += (uint32_t)(p[i] << 8 | p[i + 1]);
	if (len & 1)
		sum += (uint32_t)p[len - 1] << 8;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

static uint32_t fz_get32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void fz_fixup_ip(uint8_t *ip, size_t len)
{
	if (len >= 20) {
		ip[0] = (uint8_t)(0x40 | (ip[0] & 15));
		wbuf_u32(&(struct wbuf){ ip + 12, ip + 16 }, FZ_SELF);
		wbuf_u32(&(struct wbuf){ ip + 16, ip + 20 }, FZ_DST);
	}
}

static void fz_reset(struct node *n)
{
	uint8_t junk[64];
	while (recv(fz_tap_peer, junk, sizeof junk, MSG_DONTWAIT) >= 0)
		;                       /* ARP answers and the like, from earlier inputs */
	while (n->ip.n_cache)
		ip_map_drop(n, &n->ip.cache[0]);
	ip_map_new(n, FZ_DST);
}

/* ---- TSO ------------------------------------------------------------- */

static void fz_tso(struct node *n, const uint8_t *data, size_t size, bool fixup)
{
	/* as tap_readable reads: with room for the routed header before it */
	uint8_t *room = malloc(WIRE_ROUTED_ROOM_BYTES + (size ? size : 1)), *buf = room + WIRE_ROUTED_ROOM_BYTES;
	memcpy(buf, data, size);
	size_t ip_off = TAP_VNET_HDR_BYTES + TAP_ETH_HDR_BYTES;
	if (fixup && size > ip_off) {
		buf[TAP_VNET_HDR_BYTES + 12] = TAP_ETH_P_IP >> 8;
		buf[TAP_VNET_HDR_BYTES + 13] = TAP_ETH_P_IP & 255;
		fz_fixup_ip(buf + ip_off, size - ip_off);
	}
	/* What tap_vnet_frame will see, kept before it runs (it may write). */
	uint8_t *orig = malloc(size ? size : 1);
	memcpy(orig, buf, size);
	uint64_t segs0 = n->tap.tso_segments, frames0 = n->tap.tso_frames;
	tap_vnet_frame(n, buf, size);
	free(room);
	if (n->tap.tso_frames == frames0) {
		free(orig);
		return;
	}
	/* A super-frame was cut: check what came out for FZ_DST. */
	const uint8_t *f = orig + TAP_VNET_HDR_BYTES;
	size_t len = size - TAP_VNET_HDR_BYTES;
	size_t gso = (size_t)(orig[4] | orig[5] << 8);
	size_t ihl = (size_t)(f[TAP_ETH_HDR_BYTES] & 15) * 4, tcp_off = TAP_ETH_HDR_BYTES + ihl;
	bool udp = (orig[1] & 0x7f) == TAP_VNET_GSO_UDP_L4;     /* else TCP: the one other type cut */
	size_t hlen = tcp_off + (udp ? 8 : (size_t)(f[tcp_off + 12] >> 4) * 4), plen = len - hlen;
	uint64_t k = n->tap.tso_segments - segs0;
	if (k != (plen + gso - 1) / gso || hlen - TAP_ETH_HDR_BYTES + gso > (size_t)n->ip.mtu)
		abort();
	struct ip_map *m = ip_map_find(n, FZ_DST);
	bool ours = fz_get32(f + TAP_ETH_HDR_BYTES + 12) == FZ_SELF && fz_get32(f + TAP_ETH_HDR_BYTES + 16) == FZ_DST;
	if (!m || !ours) {
		free(orig);
		return;
	}
	uint32_t seq0 = fz_get32(f + tcp_off + 4);
	size_t off = 0, iph = hlen - TAP_ETH_HDR_BYTES;
	for (unsigned i = 0; i < m->n_queued; i++) {
		const struct ip_queued *q = m->queue[i];
		const uint8_t *ip = q->data, *tcp = ip + ihl;
		if (q->inbound || q->len < iph || q->len > (size_t)n->ip.mtu || q->len - iph > gso ||
		    off + q->len - iph > plen || memcmp(ip + iph, f + hlen + off, q->len - iph) ||
		    (!udp && fz_get32(tcp + 4) != seq0 + (uint32_t)off) || (size_t)(ip[2] << 8 | ip[3]) != q->len ||
		    (udp && (size_t)(tcp[4] << 8 | tcp[5]) != q->len - ihl) || fz_csum(0, ip, ihl) != 0)
			abort();
		uint32_t pseudo = (fz_get32(ip + 12) >> 16) + (fz_get32(ip + 12) & 0xffff) +
				  (fz_get32(ip + 16) >> 16) + (fz_get32(ip + 16) & 0xffff) + (udp ? 17 : 6) +
				  (uint32_t)(q->len - ihl);
		if (fz_csum(pseudo, tcp, q->len - ihl) != 0)
			abort();
		off += q->len - iph;
		if (udp)
			continue;
		bool last = off == plen;
		if (!last && (tcp[13] & 0x09))
			abort();
	}
	free(orig);
}

/* ---- GRO ------------------------------------------------------------- */

struct fz_pkt {
	const uint8_t *p;
	size_t len;
};

static void fz_gro_check(struct fz_pkt *sent, unsigned n_sent)
{
	static uint8_t fr[TAP_VNET_HDR_BYTES + TAP_ETH_HDR_BYTES + 65536 + 16];
	unsigned next = 0;
	ssize_t r;
	while ((r = recv(fz_tap_peer, fr, sizeof fr, MSG_DONTWAIT)) >= 0) {
		if ((size_t)r < TAP_VNET_HDR_BYTES + TAP_ETH_HDR_BYTES ||
		    (size_t)r > TAP_VNET_HDR_BYTES + TAP_GRO_MAX_BYTES)
			abort();
		const uint8_t *ip = fr + TAP_VNET_HDR_BYTES + TAP_ETH_HDR_BYTES;
		size_t iplen = (size_t)r - TAP_VNET_HDR_BYTES - TAP_ETH_HDR_BYTES;
		if (fr[1] == 0) {               /* a packet on its own: unchanged */
			if (next >= n_sent || sent[next].len != iplen || memcmp(sent[next].p, ip, iplen))
				abort();
			next++;
			continue;
		}
		/* A super-frame: cut it at gso_size as the kernel would. */
		size_t hlen = (size_t)(fr[2] | fr[3] << 8) - TAP_ETH_HDR_BYTES, mss = (size_t)(fr[4] | fr[5] << 8);
		if (fr[1] != TAP_VNET_GSO_TCPV4 || !mss || hlen < 40 || hlen >= iplen ||
		    (size_t)(ip[2] << 8 | ip[3]) != iplen)
			abort();
		uint32_t seq0 = fz_get32(ip + 24);
		for (size_t off = 0; off < iplen - hlen; off += mss) {
			size_t seg = iplen - hlen - off < mss ? iplen - hlen - off : mss;
			if (next >= n_sent)
				abort();
			const uint8_t *p = sent[next].p;
			size_t thl = (size_t)(p[32] >> 4) * 4;
			if (20 + thl != hlen || sent[next].len - hlen != seg || memcmp(p + hlen, ip + hlen + off, seg) ||
			    fz_get32(p + 24) != seq0 + (uint32_t)off)
				abort();
			next++;
		}
	}
	if (next != n_sent)
		abort();
}

static void fz_gro(struct node *n, const uint8_t *data, size_t size, bool fixup)
{
	static uint8_t copy[65536];
	struct fz_pkt sent[4096];
	unsigned n_sent = 0;
	size_t used = 0;
	memcpy(copy, data, size);
	for (size_t at = 0; at + 2 <= size && n_sent < ARRAY_LEN(sent);) {
		size_t len = (size_t)(copy[at] << 8 | copy[at + 1]);
		at += 2;
		if (len > size - at)
			len = size - at;
		uint8_t *p = copy + at;
		at += len;
		if (fixup) {
			fz_fixup_ip(p, len);
			if (len >= 4) {         /* and its length field */
				p[2] = (uint8_t)(len >> 8);
				p[3] = (uint8_t)len;
			}
		}
		/* tap_write_ip copies it into a frame: hand it an exact-size copy. */
		uint8_t *exact = malloc(len ? len : 1);
		memcpy(exact, p, len);
		if (tap_write_ip(n, exact, len) == 0)
			sent[n_sent++] = (struct fz_pkt){ p, len };
		free(exact);
		used = at;
	}
	(void)used;
	tap_gro_flush(n);
	fz_gro_check(sent, n_sent);
}

/* ---- UDP_GRO control message ------------------------------------------
 * The kernel writes control messages as put_cmsg does: whole headers, a
 * cmsg_len cut to what fits, msg_controllen = what it wrote; and ipop's
 * buffer holds one int's message (struct link_rx).  The input is a list of
 * [level][type][data length][data] put that way. */

static void fz_cmsg(const uint8_t *data, size_t size)
{
	static const int levels[] = { SOL_UDP, SOL_SOCKET, SOL_IP };
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} ctl;
	memset(&ctl, 0xa5, sizeof ctl);
	size_t room = sizeof ctl.buf, at = 0, want = 0;
	bool first_gro = true;
	for (size_t i = 0; i + 3 <= size && room >= sizeof(struct cmsghdr);) {
		struct cmsghdr h = { .cmsg_level = data[i] < 3 ? levels[data[i]] : data[i],
				     .cmsg_type = data[i + 1] ? data[i + 1] : UDP_GRO };
		size_t dlen = data[i + 2] % 16;
		i += 3;
		if (dlen > size - i)
			dlen = size - i;
		size_t cmlen = CMSG_LEN(dlen) < room ? CMSG_LEN(dlen) : room;
		h.cmsg_len = cmlen;
		memcpy(ctl.buf + at, &h, sizeof h);
		memcpy(ctl.buf + at + sizeof h, data + i, cmlen - sizeof h < dlen ? cmlen - sizeof h : dlen);
		if (first_gro && h.cmsg_level == SOL_UDP && h.cmsg_type == UDP_GRO && cmlen >= CMSG_LEN(sizeof(int))) {
			int v;
			memcpy(&v, data + i, sizeof v);
			want = v > 0 ? (size_t)v : 0;
			first_gro = false;
		}
		i += dlen;
		size_t used = CMSG_SPACE(dlen) < room ? CMSG_SPACE(dlen) : room;
		at += used;
		room -= used;
	}
	struct msghdr m = { .msg_control = ctl.buf, .msg_controllen = at };
	if (link_gro_size(&m) != want)
		abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct node *n = &fz_node;
	if (size < 1 || size > 65535)
		return 0;
	uint8_t sel = data[0];
	fz_reset(n);
	switch (sel & 3) {
	case MODE_TSO:
		fz_tso(n, data + 1, size - 1, sel & FL_FIXUP);
		break;
	case MODE_GRO:
		fz_gro(n, data + 1, size - 1, sel & FL_FIXUP);
		break;
	default:
		fz_cmsg(data + 1, size - 1);
	}
	fz_reset(n);
	return 0;
}
