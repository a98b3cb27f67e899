/* libFuzzer target: the *.ipop resolver (section 10 dns_).
 *
 * The input is one DNS datagram as the tap delivers it to the gateway
 * address.  dns_parse_query must accept it, answer an rcode, or ignore it;
 * a parsed name is NUL-terminated, at most 253 bytes, and the question it
 * claims lies inside the datagram.  dns_answer's output must fit its
 * buffer and read back as a response to the same id.  Then the whole path
 * runs (dns_on_query on a node without a DHT, which answers SERVFAIL, or
 * with our own name): every packet handed to the local stack must be an
 * IPv4 UDP datagram from the gateway to the asker, port 53, whose lengths
 * agree. */
#include "../ipop.c"

static struct node fz_node;
static unsigned fz_written;

static int fz_write_local(struct node *n, const uint8_t *pkt, size_t len)
{
	struct ip_head h;
	(void)n;
	if (!ip_parse(pkt, len, &h) || h.proto != IP_PROTOCOL_UDP || h.src != ip_gateway(&fz_node.ip) ||
	    h.dst != 0x0a800005u || len < IP_HDR_MIN_BYTES + UDP_HDR_BYTES + DNS_HDR_BYTES)
		abort();
	struct buf b = buf_of(pkt + IP_HDR_MIN_BYTES, len - IP_HDR_MIN_BYTES);
	uint16_t sport = buf_u16(&b);
	buf_u16(&b);
	uint16_t ulen = buf_u16(&b);
	if (sport != DNS_PORT || ulen != len - IP_HDR_MIN_BYTES || ip_checksum(pkt, IP_HDR_MIN_BYTES) != 0)
		abort();
	fz_written++;
	return 0;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc, (void)argv;
	fz_node.ip.net = 0x0a800000u;   /* 10.128.0.0/16 */
	fz_node.ip.mask = 0xffff0000u;
	fz_node.up.write_local = fz_write_local;
	fz_node.self.vip = 0x0a800005u;
	snprintf(fz_node.name, sizeof fz_node.name, "alice");
	FILE *null = getenv("IPOP_FUZZ_LOG") ? NULL : fopen("/dev/null", "w");
	if (null)
		stderr = null;
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct dns_query q;
	uint8_t out[DNS_MSG_MAX_BYTES + 16];
	int rc = dns_parse_query(data, size, &q);
	if (rc != -1 && rc != 0 && rc != DNS_FORMERR && rc != DNS_NOTIMP)
		abort();
	if (strlen(q.name) > DNS_NAME_MAX_BYTES)
		abort();
	if (rc == 0 && (q.question_end <= DNS_HDR_BYTES || q.question_end > size))
		abort();
	if (rc >= 0) {
		ssize_t n = dns_answer(out, sizeof out, data, &q, (uint8_t)(rc ? rc : DNS_NOERROR),
				       rc ? 0 : 0x0a800007u);
		if (n < DNS_HDR_BYTES || (size_t)n > sizeof out)
			abort();
		struct dns_query back;
		if (dns_parse_query(out, (size_t)n, &back) != -1 || back.id != q.id)
			abort();                /* a response: never taken for a query */
	}
	unsigned before = fz_written;
	dns_on_query(&fz_node, 0x0a800005u, 40000, data, size);
	if (rc >= 0 && size <= DNS_MSG_MAX_BYTES && fz_written != before + 1)
		abort();                        /* every query gets exactly one answer */
	return 0;
}
