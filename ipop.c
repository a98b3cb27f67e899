/*
 * ipop — IP over P2P: a self-configuring virtual IP network on a ring overlay.
 * SPDX-License-Identifier: MIT
 *
 * Every node has a 160-bit ring address (SHA-1 of its virtual IPv4 address, or
 * random for a router-only node).  Nodes keep "near" links to their two closest
 * neighbours on each side of the ring and a few "far" links at harmonically
 * distributed distances, so greedy routing reaches any address in O(log N)-ish
 * hops.  A new node knows only a bootstrap peer ("leaf" link); it asks the ring
 * for its successor and predecessor with connect-to-me requests, and both ends
 * of each answer dial each other at once.
 *
 * Contents — one banner per section, in dependency order; `grep -n '^/\* ==='`
 * lists them.  Every function carries its section's prefix.
 *   00  -      limits and shared types
 *   01  log_   log lines, rate limits, drop counters
 *   02  buf_   byte cursors: bounded big-endian get/put, hex, string builder
 *   03  ev_    epoll loop, fd table, timer heap, monotonic clock
 *   04  sec_   mbedTLS glue: addressing, random, handshake/record crypto, certificates
 *   05  wire_  overlay messages: one decode/encode pair per message type
 *   05b -      shared state: struct link, each section's state, the node
 *   06  link_  UDP/TCP links: the table, sending and batching, teardown,
 *              contacts, relay roaming, becoming up
 *   06b link_  links, continued: the handshake and its admission, sealed
 *              records, relayed links, input dispatch, ICMP errors, TCP streams
 *   07  ring_  ring arithmetic; near, far, leaf, shortcut roles; greedy routing;
 *              traffic counts and the shortcut cap
 *   07b ring_  the ring, continued: connect-to-me and joins, dials, address
 *              claims, echo, upkeep, rendezvous, shortcuts, link hooks
 *   08  dht_   a DHT in the ring: put/get/create, leases, replicas, hand-over
 *   09  nat_   public endpoints learned from peers, NAT classification
 *   10  ip_    virtual IPv4: local stack <-> ring, source checks, ICMP errors;
 *              the *.ipop resolver (dns_); --ip auto leases (ip_lease_)
 *   11  tap_   the tap device: frames, ARP answered on the host, TSO/USO cut,
 *              GRO; namespace mode (a tap, or a veth read by a packet socket)
 *   12  lw_    user mode: lwIP in-process, relays between sockets and lwIP TCP
 *   13  socks_ SOCKS5 server (RFC 1928) for user mode
 *   14  fwd_   -L and -R port forwards; namespace mode's -R as socket pipes
 *   15  ctl_   control socket: status text/JSON, overlay ping, dht, route,
 *              the namespace's fds for ipop exec
 *   15b sim_   ipop simulate: many nodes, virtual time, an in-memory network
 *   16  cli_   flags, usage texts, the config file, parsing
 *   16b cli_   ipop up: node setup, signals, the main loop
 *   16c cli_   the other subcommands (control clients, nc, exec, credentials,
 *              map), main
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#define IPOP_VERSION "0.2.1"
/* Error lines are built with snprintf into fixed buffers: a very long path
 * is cut short on purpose, so gcc's truncation guesses are noise here. */
#pragma GCC diagnostic ignored "-Wformat-truncation"
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <limits.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <netinet/udp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <net/if.h>
#include <netpacket/packet.h>
#include <poll.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/wait.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "mbedtls/ctr_drbg.h"
#include "mbedtls/entropy.h"
/* glibc's <netinet/tcp.h> names its TCP_MSS option like lwIP's MSS setting;
 * ours is lwIP's (vendor/lwipopts.h).  musl does not define it. */
#undef TCP_MSS
#include "lwip/init.h"
#include "lwip/ip4.h"
#include "lwip/netif.h"
#include "lwip/pbuf.h"
#include "lwip/tcp.h"
#include "lwip/timeouts.h"
#include "lwip/udp.h"
#include "sodium.h"
#include "mbedtls/ecdh.h"
#include "mbedtls/error.h"
#include "mbedtls/hkdf.h"
#include "mbedtls/md.h"
#include "mbedtls/oid.h"
#include "mbedtls/pem.h"
#include "mbedtls/pk.h"
#include "mbedtls/platform_util.h"
#include "mbedtls/sha1.h"
#include "mbedtls/sha256.h"
#include "mbedtls/x509_crt.h"
#include "mbedtls/ecp.h"

/* ===================================================================== 00 -
 * Limits and shared types.  Every limit is an enum with its unit in the name
 * and a comment deriving it; every table says what happens when it is full.
 * ========================================================================= */

enum {
	RING_ADDR_BYTES = 20,           /* SHA-1 output: the ring is 2^160 wide */
	RING_NEAR_PER_SIDE = 2,         /* Brunet: two on each side survive one death */
	RING_FAR_MAX = 12,              /* log2 of a million nodes is 20; half of that, plus slack */
	RING_PROBE_MS = 2000,           /* successor/predecessor re-check period */
	RING_TICK_MS = 500,             /* role upkeep, far links, bootstrap retries */
	RING_BOOT_RETRY_MAX_MS = 30000, /* backoff cap when no bootstrap answers */
	RING_CLAIM_BACKOFF_MS = 10000,  /* refused for our address: bootstrap again this much later */
	RING_MAX_HOPS = 64,             /* default TTL; greedy paths are far shorter */
	RING_DIAL_ENDPOINTS_MAX = 4,    /* parallel dial attempts to one peer */
	RING_CTM_NEIGHBOURS_MAX = 8,    /* peers listed in a connect-to-me reply */
};

enum {
	LINK_KEEPALIVE_MS = 1000,      /* ping every link this often: RTT + liveness */
	LINK_DEAD_MS = 4000,           /* silence after which a link is dead (< 5 s) */
	LINK_REFUSED_CONFIRM_MS = 100, /* a second "port unreachable" this long after the first closes */
	LINK_QUIET_MS = 1500,          /* silence after which routing avoids a link: one
	                                * keepalive missed, plus 500 ms of scheduling slack */
	LINK_HELLO_RETRY_MS = 500,     /* UDP handshake retransmit */
	LINK_HELLO_TRIES = 6,          /* 3 s of retries, then the dial failed */
	LINK_HANDSHAKE_TIMEOUT_MS = 5000, /* TCP connect + hello, or accepted and silent */
	LINK_UNNEEDED_GRACE_MS = 5000, /* a role-less link lives this long after up */
	LINK_ENDPOINTS_MAX = 8,        /* advertised endpoints per node (wire cap) */
	LINK_TCP_WQUEUE_BYTES = 1 << 20, /* per TCP link; over it packets are dropped */
	LINK_TABLE_MAX = 4096,         /* links per node; new dials/accepts refused past it */
	/* Accepted TCP streams not yet authenticated (link_unproven_add).  A
	 * joiner's stream is unproven for one round trip (HS_INIT, HS_RESP,
	 * HS_FIN), so a public node with ten joiners a second holds a few;
	 * 128 leaves room for a crowd and bounds what an outsider holds to
	 * 128 descriptors and links, far below LINK_TABLE_MAX and the fd limit. */
	LINK_UNPROVEN_MAX = 128,
	LINK_UNPROVEN_PER_IP_MAX = 16, /* a site's NAT: a dozen nodes behind it dialling at once */
	/* Responder links awaiting HS_FIN (UDP and relayed).  Legitimate ones
	 * live a round trip: even a bootstrap taking 100 joins/s over 300 ms
	 * paths holds 30.  At the cap the oldest is closed for the newcomer
	 * (link_half_open_make_room): an outsider's never finish, so they are
	 * the old ones, and the table's other 4032 slots stay for our own dials. */
	LINK_HALF_OPEN_MAX = 64,
	/* HS_INITs with a valid cookie that one source IP may have answered
	 * (each costs two X25519, 60 us, and with certificates an ECDSA
	 * signature, 1.5-2.5 ms): a token bucket per IP (link_hs_admit).  A
	 * dial is one such HS_INIT, plus a retransmit per lost packet, and a
	 * joining node dials a few peers: 5/s with a burst of 10 lets a NATed
	 * site of a dozen nodes rejoin through one public IP within seconds,
	 * and holds a flooding IP to about 1% of a core. */
	LINK_HS_PER_IP_PER_S = 5,
	LINK_HS_BURST = 10,
	LINK_HS_BUCKETS = 1024,        /* IPs hashed into these; a collision shares a bucket */
	LINK_CONTACT_SLOTS = 256,      /* addresses we sent a first packet to (link_note_contact) */
	LINK_CONTACT_MS = 300000,      /* ... remembered this long: longer than NATs keep a hole */
	LINK_UDP_BUFFER_BYTES = 4 << 20, /* socket buffers: ~3000 full packets of burst */
	/* A pong this much later than the link's floor RTT (plus LINK_SPIKE_FACTOR
	 * times the floor), or a peer's PING this much past its 1 s grid, means
	 * the peer stalled: an overloaded or paused process.  50 ms is far above
	 * loopback and LAN jitter and below what a stalled router costs a flow. */
	LINK_SPIKE_MS = 50,
	LINK_SPIKE_FACTOR = 3,
	LINK_BUSY_PACKETS = 4,         /* records per keepalive interval beyond pings: a busy link */
};

enum {
	WIRE_VERSION = 2,              /* 2: every link authenticated and encrypted */
	/* The largest message inside a record: a record of this plus its largest
	 * overhead (47 bytes: AEGIS-256's 32-byte tag) is 1472 bytes, the UDP
	 * payload of a 1500-byte IPv4 path, so nothing the overlay sends needs
	 * IP fragmentation. */
	WIRE_MAX_PACKET_BYTES = 1425,
	WIRE_TCP_FRAME_HDR_BYTES = 2,
};

enum {
	CTL_LINE_MAX_BYTES = 4096,     /* one command line: a 1 KiB DHT value in hex fits */
	CTL_CLIENTS_MAX = 64,          /* concurrent control clients; more are refused */
	CTL_PING_TIMEOUT_MAX_MS = 60000,
	LISTEN_MAX = 8,                /* --listen URIs */
	BOOTSTRAP_MAX = 16,            /* --bootstrap URIs */
	EV_FD_MAX = 65536,             /* fd table size; an fd past it is refused */
	EV_EVENTS_PER_WAIT = 256,
};

enum {
	IP_ROUTES_MAX = 16,            /* --route-for prefixes per node */
	IP_ROUTE_MIN_PREFIX = 24,      /* each routed IP is one DHT record: /24 is 256 */
	IP_MAP_CACHE_MAX = 4096,       /* IP -> ring address entries; the oldest is evicted */
	IP_MAP_QUEUE_MAX = 32,         /* packets held per IP while its first lookup runs: a TCP
	                                  * initial window and more */
	/* Lookups that packets from the ring begin (a source IP that is not its
	 * sender's own, so maybe behind a --route-for node): each holds a DHT
	 * request slot (DHT_PENDING_MAX: 1024) and up to IP_MAP_QUEUE_MAX
	 * packets.  Any member can send packets from any source, so a sender
	 * may have 8 under way (a host's VMs opening flows at once) and all
	 * senders 64: at most 64 slots and ~3 MB of queued packets. */
	IP_LOOKUPS_PER_SENDER = 8,
	IP_LOOKUPS_FROM_RING_MAX = 64,
};

enum exit_code {
	EXIT_OK = 0,
	EXIT_FAIL = 1,     /* runtime failure: port in use, no permission, ... */
	EXIT_USAGE = 2,    /* bad flags or bad config */
	EXIT_NO_NODE = 3,  /* status/ping: no node answers on the control socket */
};

typedef struct { uint8_t b[RING_ADDR_BYTES]; } ring_addr;

/* PROTO_RELAY links have no socket of their own: their records travel
 * inside another link's records through a peer both ends reach (section 06). */
enum link_proto { PROTO_UDP = 1, PROTO_TCP = 2, PROTO_RELAY = 3 };

/* A transport endpoint: IPv4 address and port in host order. */
struct endpoint {
	uint8_t proto;
	uint32_t ip;
	uint16_t port;
};

/* What a node tells others about itself: enough to dial it. */
struct peer_info {
	ring_addr addr;
	uint32_t vip;                  /* virtual IPv4, 0 for a router-only node */
	uint64_t instance;             /* random per process: tells two holders of one address apart */
	uint32_t started;              /* Unix time the process started: the older holder keeps it */
	uint8_t n_endpoints;
	struct endpoint endpoints[LINK_ENDPOINTS_MAX];
};

struct node;
struct ev_loop;
struct link;
struct ctl_client;
struct socks_client;

#define container_of(ptr, type, member) \
	((type *)(void *)((char *)(ptr) - offsetof(type, member)))
#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* ===================================================================== 01 log_
 * Log lines on stderr: "ipop[pid]: LEVEL section: message".  Anything a remote
 * party can trigger goes through a drop counter and log_drop's rate limit, so
 * a flood of garbage costs a counter increment, not a line each.
 * To add a drop reason: extend enum drop_reason and drop_names together.
 * ========================================================================= */

enum log_level { LOG_ERROR, LOG_WARN, LOG_INFO, LOG_DEBUG };

/* The log threshold is process-wide by nature (one stderr); set once by cli_. */
static struct { int level; } log_cfg = { LOG_INFO };

static const char *const log_level_names[] = { "error", "warn", "info", "debug" };

enum drop_reason {
	DROP_BAD_VERSION,
	DROP_BAD_TYPE,
	DROP_MALFORMED,
	DROP_UNKNOWN_SENDER,
	DROP_WRONG_STATE,
	DROP_TTL_EXPIRED,
	DROP_NO_ROUTE,
	DROP_TX_QUEUE_FULL,
	DROP_TX_ERROR,
	DROP_BAD_FRAME,
	DROP_SELF_LINK,
	DROP_LINK_TABLE_FULL,
	DROP_NOT_MEMBER,        /* handshake mac1 wrong: another network's secret or CA */
	DROP_MODE_MISMATCH,     /* handshake from a node with other security settings */
	DROP_REFUSED,           /* a peer's identity failed our checks */
	DROP_AUTH_FAILED,       /* a record or sealed block did not authenticate */
	DROP_REPLAY,            /* a record counter seen before */
	DROP_HS_TIMEOUT,        /* a dial got no handshake answer */
	DROP_NOT_IPV4,          /* tap frames other than IPv4 and ARP (IPv6, ...) */
	DROP_SPOOFED_SOURCE,    /* a local packet whose source is not ours */
	DROP_SOURCE_MISMATCH,   /* a remote packet whose source IP is not its sender's */
	DROP_NOT_FOR_US,        /* a remote packet for an IP we do not hold */
	DROP_OFF_NET,           /* a local packet for outside the virtual network */
	DROP_BAD_IP,            /* an IP header that does not parse */
	DROP_LOCAL_WRITE,       /* the local interface refused a packet */
	DROP_TOO_BIG,           /* a message grew past what its next link carries */
	DROP_OVERLAY_ENDPOINT,  /* an underlay address inside the virtual network (link_overlay_ip) */
	DROP_ADDRESS_CLAIM,     /* a peer's unproven word that another node holds our address */
	DROP_FD_LIMIT,          /* an accept found no file descriptor free: the listener rests */
	DROP_PENDING_EVICTED,   /* an accepted, unauthenticated TCP stream closed for a newer one */
	DROP_LOCAL_EVICTED,     /* a SOCKS client still negotiating, or a metrics client,
	                         * closed for a newer one */
	DROP_CTM_UNASKED,       /* a connect-to-me reply to no request of ours */
	DROP_CTM_RATIONED,      /* a connect-to-me request we answer without dialling back */
	DROP_DIAL_SCOPE,        /* a peer's endpoint outside the scopes we live in, or ours */
	DROP_OFF_NET_SOURCE,    /* a remote packet from outside the virtual network */
	DROP_LOOKUPS_FULL,      /* a remote packet whose source lookup is over the caps */
	DROP_HS_RATE,           /* an HS_INIT past its source IP's rate (link_hs_admit) */
	DROP_HALF_OPEN,         /* a half-open responder link closed for a newer one */
	DROP_FWD_REFUSED,       /* a connection to a namespace -R port over its source's or the limit */
	DROP__COUNT
};

static const char *const drop_names[DROP__COUNT] = {
	[DROP_BAD_VERSION] = "bad_version",
	[DROP_BAD_TYPE] = "bad_type",
	[DROP_MALFORMED] = "malformed",
	[DROP_UNKNOWN_SENDER] = "unknown_sender",
	[DROP_WRONG_STATE] = "wrong_state",
	[DROP_TTL_EXPIRED] = "ttl_expired",
	[DROP_NO_ROUTE] = "no_route",
	[DROP_TX_QUEUE_FULL] = "tx_queue_full",
	[DROP_TX_ERROR] = "tx_error",
	[DROP_BAD_FRAME] = "bad_frame",
	[DROP_SELF_LINK] = "self_link",
	[DROP_LINK_TABLE_FULL] = "link_table_full",
	[DROP_NOT_MEMBER] = "not_member",
	[DROP_MODE_MISMATCH] = "mode_mismatch",
	[DROP_REFUSED] = "refused",
	[DROP_AUTH_FAILED] = "auth_failed",
	[DROP_REPLAY] = "replay",
	[DROP_HS_TIMEOUT] = "handshake_timeout",
	[DROP_NOT_IPV4] = "not_ipv4",
	[DROP_SPOOFED_SOURCE] = "spoofed_source",
	[DROP_SOURCE_MISMATCH] = "source_mismatch",
	[DROP_NOT_FOR_US] = "not_for_us",
	[DROP_OFF_NET] = "off_net",
	[DROP_BAD_IP] = "bad_ip",
	[DROP_LOCAL_WRITE] = "local_write",
	[DROP_TOO_BIG] = "too_big",
	[DROP_OVERLAY_ENDPOINT] = "overlay_endpoint",
	[DROP_ADDRESS_CLAIM] = "address_claim",
	[DROP_FD_LIMIT] = "fd_limit",
	[DROP_PENDING_EVICTED] = "pending_evicted",
	[DROP_LOCAL_EVICTED] = "local_evicted",
	[DROP_CTM_UNASKED] = "ctm_unasked",
	[DROP_CTM_RATIONED] = "ctm_rationed",
	[DROP_DIAL_SCOPE] = "dial_scope",
	[DROP_OFF_NET_SOURCE] = "off_net_source",
	[DROP_LOOKUPS_FULL] = "lookups_full",
	[DROP_HS_RATE] = "handshake_rate",
	[DROP_HALF_OPEN] = "half_open_evicted",
	[DROP_FWD_REFUSED] = "fwd_refused",
};

struct log_drops {
	uint64_t count[DROP__COUNT];
	uint64_t last_log_ms[DROP__COUNT];
};

enum { LOG_DROP_INTERVAL_MS = 10000 }; /* at most one line per reason per 10 s */

__attribute__((format(printf, 3, 4)))
static void log_msg(int level, const char *section, const char *fmt, ...)
{
	if (level > log_cfg.level)
		return;
	char line[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(line, sizeof line, fmt, ap);
	va_end(ap);
	fprintf(stderr, "ipop[%d]: %s %s: %s\n", (int)getpid(),
		log_level_names[level], section, line);
}

#define log_err(sec, ...) log_msg(LOG_ERROR, sec, __VA_ARGS__)
#define log_warn(sec, ...) log_msg(LOG_WARN, sec, __VA_ARGS__)
#define log_info(sec, ...) log_msg(LOG_INFO, sec, __VA_ARGS__)
#define log_debug(sec, ...) log_msg(LOG_DEBUG, sec, __VA_ARGS__)

/* Count a dropped packet; log the reason at most once per interval. */
static void log_drop(struct log_drops *d, enum drop_reason why, uint64_t now_ms,
		     const char *who)
{
	d->count[why]++;
	if (d->last_log_ms[why] && now_ms - d->last_log_ms[why] < LOG_DROP_INTERVAL_MS)
		return;
	d->last_log_ms[why] = now_ms ? now_ms : 1;
	log_info("drop", "%s from %s (total %llu; further drops of this kind are "
		 "counted, logged at most every %d s)", drop_names[why], who,
		 (unsigned long long)d->count[why], LOG_DROP_INTERVAL_MS / 1000);
}

/* ===================================================================== 02 buf_
 * Byte cursors for untrusted input and for output.  A cursor holds the
 * position, the end and a sticky failure flag: getters return zero once the
 * input is short and set the flag, so a decoder reads every field and checks
 * the flag once at the end.  Packet memory is never cast to a struct.
 * Also: hex encoding, and a growable string builder for status output.
 * ========================================================================= */

struct buf {
	const uint8_t *p, *end;
	bool bad;
};

struct wbuf {
	uint8_t *p, *start, *end;
	bool bad;
};

static struct buf buf_of(const void *data, size_t len)
{
	const uint8_t *p = data;
	return (struct buf){ .p = p, .end = p + len, .bad = false };
}

/* The readers and writers of single fields are inline: they run for
 * every field of every packet (make perfcheck: 3-10 % fewer instructions
 * a packet than as calls). */
static inline bool buf_take(struct buf *b, size_t n)
{
	if (b->bad || (size_t)(b->end - b->p) < n) {
		b->bad = true;
		return false;
	}
	return true;
}

static inline uint8_t buf_u8(struct buf *b)
{
	if (!buf_take(b, 1))
		return 0;
	return *b->p++;
}

static inline uint16_t buf_u16(struct buf *b)
{
	if (!buf_take(b, 2))
		return 0;
	uint16_t v = (uint16_t)(b->p[0] << 8 | b->p[1]);
	b->p += 2;
	return v;
}

static inline uint32_t buf_u32(struct buf *b)
{
	if (!buf_take(b, 4))
		return 0;
	uint32_t v = (uint32_t)b->p[0] << 24 | (uint32_t)b->p[1] << 16 |
		     (uint32_t)b->p[2] << 8 | b->p[3];
	b->p += 4;
	return v;
}

static uint64_t buf_u64(struct buf *b)
{
	uint64_t hi = buf_u32(b);
	return hi << 32 | buf_u32(b);
}

static void buf_bytes(struct buf *b, void *dst, size_t n)
{
	if (!buf_take(b, n)) {
		memset(dst, 0, n);
		return;
	}
	memcpy(dst, b->p, n);
	b->p += n;
}

/* Borrow n bytes in place; NULL (and the flag set) when short. */
static const uint8_t *buf_view(struct buf *b, size_t n)
{
	if (!buf_take(b, n))
		return NULL;
	const uint8_t *p = b->p;
	b->p += n;
	return p;
}

static struct wbuf wbuf_of(void *data, size_t cap)
{
	uint8_t *p = data;
	return (struct wbuf){ .p = p, .start = p, .end = p + cap, .bad = false };
}

static inline bool wbuf_room(struct wbuf *w, size_t n)
{
	if (w->bad || (size_t)(w->end - w->p) < n) {
		w->bad = true;
		return false;
	}
	return true;
}

static inline void wbuf_u8(struct wbuf *w, uint8_t v)
{
	if (wbuf_room(w, 1))
		*w->p++ = v;
}

static inline void wbuf_u16(struct wbuf *w, uint16_t v)
{
	if (!wbuf_room(w, 2))
		return;
	w->p[0] = (uint8_t)(v >> 8);
	w->p[1] = (uint8_t)v;
	w->p += 2;
}

static inline void wbuf_u32(struct wbuf *w, uint32_t v)
{
	if (!wbuf_room(w, 4))
		return;
	for (int i = 0; i < 4; i++)
		w->p[i] = (uint8_t)(v >> (24 - 8 * i));
	w->p += 4;
}

static void wbuf_u64(struct wbuf *w, uint64_t v)
{
	wbuf_u32(w, (uint32_t)(v >> 32));
	wbuf_u32(w, (uint32_t)v);
}

static void wbuf_bytes(struct wbuf *w, const void *src, size_t n)
{
	if (!wbuf_room(w, n))
		return;
	if (n)
		memcpy(w->p, src, n);
	w->p += n;
}

/* Bytes written so far, or -1 if anything did not fit. */
static ssize_t wbuf_done(const struct wbuf *w)
{
	return w->bad ? -1 : (ssize_t)(w->p - w->start);
}

static void buf_hex(const uint8_t *src, size_t n, char *out /* [2n+1] */)
{
	static const char digits[] = "0123456789abcdef";
	for (size_t i = 0; i < n; i++) {
		out[2 * i] = digits[src[i] >> 4];
		out[2 * i + 1] = digits[src[i] & 15];
	}
	out[2 * n] = 0;
}

static int buf_hex_digit(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	c = tolower(c);
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

/* Decode exactly 2n hex digits; false on any other length or character. */
static bool buf_unhex(const char *s, uint8_t *out, size_t n)
{
	if (strlen(s) != 2 * n)
		return false;
	for (size_t i = 0; i < n; i++) {
		int hi = buf_hex_digit(s[2 * i]), lo = buf_hex_digit(s[2 * i + 1]);
		if (hi < 0 || lo < 0)
			return false;
		out[i] = (uint8_t)(hi << 4 | lo);
	}
	return true;
}

/* A growable string for status output; on allocation failure it stays
 * truncated and marks itself, and the reader sees a short answer. */
struct buf_str {
	char *s;
	size_t len, cap;
	bool oom;
};

__attribute__((format(printf, 2, 3)))
static void buf_printf(struct buf_str *b, const char *fmt, ...)
{
	for (;;) {
		va_list ap;
		va_start(ap, fmt);
		size_t room = b->cap - b->len;
		int n = vsnprintf(b->s ? b->s + b->len : NULL, b->s ? room : 0, fmt, ap);
		va_end(ap);
		if (n < 0 || b->oom)
			return;
		if ((size_t)n < room) {
			b->len += (size_t)n;
			return;
		}
		size_t cap = (b->cap ? b->cap * 2 : 1024) + (size_t)n;
		char *s = realloc(b->s, cap);
		if (!s) {
			b->oom = true;
			return;
		}
		b->s = s;
		b->cap = cap;
	}
}

static void buf_str_free(struct buf_str *b)
{
	free(b->s);
	*b = (struct buf_str){ 0 };
}

static void buf_ip_str(uint32_t ip, char out[16])
{
	snprintf(out, 16, "%u.%u.%u.%u", ip >> 24, (ip >> 16) & 255,
		 (ip >> 8) & 255, ip & 255);
}

/* ===================================================================== 03 ev_
 * The event loop: one epoll instance, an fd table indexed by fd (a callback and
 * a pointer each), and a binary min-heap of timers keyed by monotonic ms.
 * Timer records are embedded in their owners and remember their heap slot, so
 * arming, re-arming and cancelling cost O(log n) and allocate nothing.
 * A timer callback returns its next delay in ms, or EV_TIMER_STOP.
 * Time is read once per loop turn (ev_now): handlers see one consistent clock.
 * ========================================================================= */

typedef void ev_fd_fn(struct ev_loop *loop, int fd, void *arg, uint32_t events);

struct ev_timer;
typedef int64_t ev_timer_fn(struct ev_loop *loop, struct ev_timer *t);

enum { EV_TIMER_STOP = -1 };

struct ev_timer {
	uint64_t when_ms;
	int heap_idx;           /* -1 when not armed */
	ev_timer_fn *fn;
};

struct ev_file {
	ev_fd_fn *fn;
	void *arg;
	uint32_t events;
};

struct ev_loop {
	int epfd;
	struct ev_file *files;  /* EV_FD_MAX entries, indexed by fd */
	struct ev_timer **heap;
	size_t heap_len, heap_cap;
	uint64_t now_ms;
	int max_wait_ms;        /* cap on one epoll wait; tests shorten it */
	bool stop;
	bool virtual_time;      /* a simulated node (section 15b): now_ms is all there is */
	struct ev_rest *resting;        /* EV_RESTING_MAX, allocated by the first ev_fd_rest */
	/* The end of a turn, after callbacks and timers and before the next
	 * wait: its owner's batched work (Redis's beforesleep).  Drivers that
	 * run a node's code outside ev_run_once end their turn with
	 * ev_turn_end. */
	void (*turn_end)(struct ev_loop *loop);
};

static uint64_t ev_clock_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static uint64_t ev_now(const struct ev_loop *loop)
{
	return loop->now_ms;
}

/* Microseconds for round-trip times: the real clock, or in a simulation the
 * virtual one, so that RTT-driven choices stay deterministic there. */
static uint64_t ev_now_us(const struct ev_loop *loop)
{
	return loop->virtual_time ? loop->now_ms * 1000 : ev_clock_us();
}

static int ev_init(struct ev_loop *loop)
{
	*loop = (struct ev_loop){ .epfd = -1 };
	loop->files = calloc(EV_FD_MAX, sizeof *loop->files);
	if (!loop->files)
		return -ENOMEM;
	loop->epfd = epoll_create1(EPOLL_CLOEXEC);
	if (loop->epfd < 0)
		return -errno;
	loop->now_ms = ev_clock_us() / 1000;
	loop->max_wait_ms = 1000;
	return 0;
}

static void ev_fini(struct ev_loop *loop)
{
	if (loop->epfd >= 0)
		close(loop->epfd);
	free(loop->files);
	free(loop->heap);
	free(loop->resting);
	*loop = (struct ev_loop){ .epfd = -1 };
}

/* Watch fd for the given epoll events; re-adding an fd changes its mask. */
static int ev_fd_watch(struct ev_loop *loop, int fd, uint32_t events,
		       ev_fd_fn *fn, void *arg)
{
	if (fd < 0 || fd >= EV_FD_MAX)
		return -EMFILE;
	struct ev_file *f = &loop->files[fd];
	if (f->fn == fn && f->arg == arg && f->events == events)
		return 0;               /* no change: callers re-assert per packet */
	struct epoll_event ev = { .events = events, .data.fd = fd };
	int op = f->fn ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
	if (epoll_ctl(loop->epfd, op, fd, &ev) < 0)
		return -errno;
	*f = (struct ev_file){ .fn = fn, .arg = arg, .events = events };
	return 0;
}

static void ev_rest_end(struct ev_loop *loop, int fd);

static void ev_fd_forget(struct ev_loop *loop, int fd)
{
	if (fd < 0 || fd >= EV_FD_MAX || !loop->files[fd].fn)
		return;
	ev_rest_end(loop, fd);
	epoll_ctl(loop->epfd, EPOLL_CTL_DEL, fd, NULL);
	loop->files[fd] = (struct ev_file){ 0 };
}

static void ev_heap_set(struct ev_loop *loop, size_t i, struct ev_timer *t)
{
	loop->heap[i] = t;
	t->heap_idx = (int)i;
}

static void ev_heap_up(struct ev_loop *loop, size_t i)
{
	struct ev_timer *t = loop->heap[i];
	while (i > 0) {
		size_t parent = (i - 1) / 2;
		if (loop->heap[parent]->when_ms <= t->when_ms)
			break;
		ev_heap_set(loop, i, loop->heap[parent]);
		i = parent;
	}
	ev_heap_set(loop, i, t);
}

static void ev_heap_down(struct ev_loop *loop, size_t i)
{
	struct ev_timer *t = loop->heap[i];
	for (;;) {
		size_t child = 2 * i + 1;
		if (child >= loop->heap_len)
			break;
		if (child + 1 < loop->heap_len &&
		    loop->heap[child + 1]->when_ms < loop->heap[child]->when_ms)
			child++;
		if (t->when_ms <= loop->heap[child]->when_ms)
			break;
		ev_heap_set(loop, i, loop->heap[child]);
		i = child;
	}
	ev_heap_set(loop, i, t);
}

static void ev_timer_init(struct ev_timer *t, ev_timer_fn *fn)
{
	*t = (struct ev_timer){ .heap_idx = -1, .fn = fn };
}

static bool ev_timer_armed(const struct ev_timer *t)
{
	return t->heap_idx >= 0;
}

static void ev_timer_cancel(struct ev_loop *loop, struct ev_timer *t)
{
	if (t->heap_idx < 0)
		return;
	size_t i = (size_t)t->heap_idx;
	struct ev_timer *last = loop->heap[--loop->heap_len];
	t->heap_idx = -1;
	if (last == t)
		return;
	ev_heap_set(loop, i, last);
	ev_heap_up(loop, i);
	ev_heap_down(loop, (size_t)last->heap_idx);
}

/* Arm (or re-arm) t to fire delay_ms from now. */
static int ev_timer_arm(struct ev_loop *loop, struct ev_timer *t, uint64_t delay_ms)
{
	ev_timer_cancel(loop, t);
	if (loop->heap_len == loop->heap_cap) {
		size_t cap = loop->heap_cap ? loop->heap_cap * 2 : 64;
		struct ev_timer **h = realloc(loop->heap, cap * sizeof *h);
		if (!h)
			return -ENOMEM;
		loop->heap = h;
		loop->heap_cap = cap;
	}
	t->when_ms = loop->now_ms + delay_ms;
	ev_heap_set(loop, loop->heap_len++, t);
	ev_heap_up(loop, loop->heap_len - 1);
	return 0;
}

static int ev_next_timeout_ms(const struct ev_loop *loop)
{
	if (!loop->heap_len)
		return loop->max_wait_ms;
	uint64_t when = loop->heap[0]->when_ms;
	if (when <= loop->now_ms)
		return 0;
	uint64_t d = when - loop->now_ms;
	return d > (uint64_t)loop->max_wait_ms ? loop->max_wait_ms : (int)d;
}

static void ev_run_timers(struct ev_loop *loop)
{
	while (loop->heap_len && loop->heap[0]->when_ms <= loop->now_ms) {
		struct ev_timer *t = loop->heap[0];
		ev_timer_cancel(loop, t);
		int64_t next = t->fn(loop, t);
		if (next >= 0 && !ev_timer_armed(t))
			ev_timer_arm(loop, t, (uint64_t)next);
	}
}

/* ---- resting listeners ----------------------------------------------------
 * A listener whose accept failed for want of file descriptors (EMFILE,
 * ENFILE) stays readable: the loop, level-triggered, would call it again
 * at once and forever, at 100% CPU, while nothing gets better.  ev_fd_rest
 * takes the fd out of epoll's view for EV_REST_MS; its timer puts it back.
 * Meanwhile connections wait in the kernel's backlog, and descriptors that
 * close (links timing out, clients done) go to whoever needs one first. */

enum {
	EV_REST_MS = 250,               /* 4 accept tries a second per listener at the fd limit */
	EV_RESTING_MAX = 16,            /* LISTEN_MAX link listeners, SOCKS, control, metrics and
	                                 * a few -L forwards; more resting at once spin as before */
};

struct ev_rest {
	struct ev_timer timer;
	int fd;                         /* -1: free */
};

static int64_t ev_rest_done(struct ev_loop *loop, struct ev_timer *t)
{
	struct ev_rest *r = container_of(t, struct ev_rest, timer);
	struct epoll_event ev = { .events = loop->files[r->fd].events, .data.fd = r->fd };
	epoll_ctl(loop->epfd, EPOLL_CTL_MOD, r->fd, &ev);
	r->fd = -1;
	return EV_TIMER_STOP;
}

static struct ev_rest *ev_rest_find(struct ev_loop *loop, int fd)
{
	for (unsigned i = 0; loop->resting && i < EV_RESTING_MAX; i++)
		if (loop->resting[i].fd == fd)
			return &loop->resting[i];
	return NULL;
}

/* Stop reporting a watched fd for EV_REST_MS. */
static void ev_fd_rest(struct ev_loop *loop, int fd)
{
	if (fd < 0 || fd >= EV_FD_MAX || !loop->files[fd].fn || ev_rest_find(loop, fd))
		return;
	if (!loop->resting && (loop->resting = calloc(EV_RESTING_MAX, sizeof *loop->resting)))
		for (unsigned i = 0; i < EV_RESTING_MAX; i++) {
			loop->resting[i].fd = -1;
			ev_timer_init(&loop->resting[i].timer, ev_rest_done);
		}
	struct ev_rest *r = ev_rest_find(loop, -1);
	struct epoll_event ev = { .events = 0, .data.fd = fd };
	if (!r || epoll_ctl(loop->epfd, EPOLL_CTL_MOD, fd, &ev) < 0)
		return;
	r->fd = fd;
	ev_timer_arm(loop, &r->timer, EV_REST_MS);
}

/* The fd goes: its rest, if any, ends without touching epoll. */
static void ev_rest_end(struct ev_loop *loop, int fd)
{
	struct ev_rest *r = ev_rest_find(loop, fd);
	if (!r)
		return;
	ev_timer_cancel(loop, &r->timer);
	r->fd = -1;
}

/* After accept4 failed on listener lfd: true when the listener has no more
 * for now.  Out of descriptors (or of kernel memory for one), it rests and
 * the refusal is counted; a connection that died in the backlog
 * (ECONNABORTED) is skipped. */
static bool ev_accept_failed(struct ev_loop *loop, int lfd, struct log_drops *drops,
			     enum drop_reason why, const char *what)
{
	if (errno == ECONNABORTED || errno == EINTR)
		return false;
	if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
		log_drop(drops, why, loop->now_ms, what);
		ev_fd_rest(loop, lfd);
	}
	return true;
}

/* One turn: wait for I/O or the next timer, dispatch both. */
static void ev_turn_end(struct ev_loop *loop)
{
	if (loop->turn_end)
		loop->turn_end(loop);
}

static void ev_run_once(struct ev_loop *loop)
{
	struct epoll_event evs[EV_EVENTS_PER_WAIT];
	int n = epoll_wait(loop->epfd, evs, EV_EVENTS_PER_WAIT, ev_next_timeout_ms(loop));
	loop->now_ms = ev_clock_us() / 1000;
	for (int i = 0; i < n; i++) {
		int fd = evs[i].data.fd;
		/* Re-read the table: an earlier callback may have closed this fd. */
		struct ev_file f = loop->files[fd];
		if (f.fn)
			f.fn(loop, fd, f.arg, evs[i].events);
	}
	ev_run_timers(loop);
	ev_turn_end(loop);
}

/* ===================================================================== 04 sec_
 * mbedTLS glue.  SHA-1 maps virtual IPs to ring addresses; a CTR-DRBG seeded
 * from getrandom gives every other random byte (nonces, far-link targets).
 * Below that: the primitives of the link handshake and records, the replay
 * window, cookies, certificates and revocation (docs/SECURITY.md).  Two
 * primitives are not from mbedTLS: the AEAD, ChaCha20-Poly1305 (RFC 8439):
 * libsodium's vectorised code is three times mbedTLS's portable C here, and
 * it capped the data path (docs/PERFORMANCE.md, "Profile"); and X25519,
 * thirty times faster in libsodium, which bounds what a handshake flood
 * costs (sec_x25519).
 * ========================================================================= */

/* mbedTLS calls this for entropy (MBEDTLS_ENTROPY_HARDWARE_ALT): musl's
 * platform entropy would open /dev/urandom on each poll, getrandom never does.
 * Not static: the library links against it. */
int mbedtls_hardware_poll(void *data, unsigned char *output, size_t len, size_t *olen);
int mbedtls_hardware_poll(void *data, unsigned char *output, size_t len, size_t *olen)
{
	(void)data;
	size_t got = 0;
	while (got < len) {
		ssize_t r = getrandom(output + got, len - got, 0);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -1;
		got += (size_t)r;
	}
	*olen = got;
	return 0;
}

/* The entropy context (832 bytes) is out of line: a simulated node's
 * generator (section 15b) is seeded once from the seed and never reseeds,
 * so it has none, and its CTR-DRBG is the same as a real node's. */
struct sec_rng {
	mbedtls_ctr_drbg_context drbg;
	mbedtls_entropy_context *entropy;       /* NULL only on a simulated node */
};

static int sec_rng_init(struct sec_rng *r)
{
	mbedtls_ctr_drbg_init(&r->drbg);
	r->entropy = malloc(sizeof *r->entropy);
	if (!r->entropy)
		return -ENOMEM;
	mbedtls_entropy_init(r->entropy);
	static const char pers[] = "ipop node rng";
	int rc = mbedtls_ctr_drbg_seed(&r->drbg, mbedtls_entropy_func, r->entropy,
				       (const unsigned char *)pers, sizeof pers - 1);
	return rc ? -EIO : 0;
}

static void sec_rng_free(struct sec_rng *r)
{
	mbedtls_ctr_drbg_free(&r->drbg);
	if (r->entropy)
		mbedtls_entropy_free(r->entropy);
	free(r->entropy);
	r->entropy = NULL;
}

static void sec_random(struct sec_rng *r, void *out, size_t n)
{
	if (mbedtls_ctr_drbg_random(&r->drbg, out, n) != 0) {
		/* Reseed failure means getrandom failed: nothing safe is left. */
		log_err("sec", "random generator failed; exiting");
		abort();
	}
}

static uint64_t sec_random_u64(struct sec_rng *r)
{
	uint8_t b[8];
	sec_random(r, b, sizeof b);
	struct buf c = buf_of(b, sizeof b);
	return buf_u64(&c);
}

/* Uniform in [0, 1). */
static double sec_random_unit(struct sec_rng *r)
{
	return (double)(sec_random_u64(r) >> 11) / (double)(1ull << 53);
}

static void sec_sha1(const void *data, size_t len, uint8_t out[20])
{
	mbedtls_sha1(data, len, out);
}

/* A node's ring address is SHA-1 of its virtual IPv4 address in network order. */
static ring_addr sec_addr_of_ip(uint32_t ip)
{
	uint8_t b[4] = { (uint8_t)(ip >> 24), (uint8_t)(ip >> 16), (uint8_t)(ip >> 8), (uint8_t)ip };
	ring_addr a;
	sec_sha1(b, sizeof b, a.b);
	return a;
}

/* ---- handshake and record primitives ----------------------------------
 * Links run a Noise-style handshake built from mbedTLS primitives (see
 * docs/SECURITY.md and section 06): X25519 ephemerals for forward secrecy,
 * HKDF-SHA256 for keys, ChaCha20-Poly1305 for the identity blocks, the
 * fastest AEAD both ends run for the records (libsodium's), and for
 * certificate networks an ECDSA P-256 signature over the transcript.  These wrappers keep mbedTLS's return codes inside sec_: the
 * callers see 0 / -1 (or bool). */

enum {
	SEC_KEY_BYTES = 32,
	SEC_TAG_BYTES = 16,             /* identity blocks, ChaCha and AES-GCM records */
	SEC_TAG_MAX_BYTES = 32,         /* AEGIS-256 records */
	SEC_MAC_BYTES = 16,             /* truncated HMAC-SHA256 for mac1 and cookies */
	SEC_SIG_MAX_BYTES = 80,         /* DER ECDSA P-256 signature: at most 72 */
	SEC_CERT_MAX_BYTES = 1024,      /* a node certificate travels in one handshake packet */
	SEC_COOKIE_ROTATE_MS = 120000,  /* cookie secret lifetime; the previous one stays valid */
	SEC_REPLAY_WINDOW = 2048,       /* counters accepted behind the highest seen (WireGuard's) */
	SEC_REVOKED_MAX = 4096,         /* serials in a revocation list; more are refused */
	SEC_SERIAL_MAX_BYTES = 20,      /* RFC 5280 caps serial numbers at 20 octets */
	SEC_CERT_IPS_MAX = 8,           /* virtual IPs one certificate may bind */
	SEC_CERT_ROUTES_MAX = 8,        /* --route-for prefixes one certificate may carry */
	SEC_EXPIRY_WARN_S = 7 * 86400,  /* warn of our own certificate's end this long ahead: a week
	                                * to issue and copy a new one */
	SEC_EXPIRY_REPEAT_S = 86400,    /* ... and again daily */
};

/* The admission secret beside a CA's and a node's certificate (sec_cert_keys). */
#define SEC_ADMISSION_FILE "network.key"

enum sec_mode { SEC_INSECURE = 0, SEC_PSK = 1, SEC_CERT = 2, SEC__MODE_END };

/* The record AEAD.  ChaCha20-Poly1305 is the one every node has.  Where
 * the CPU has AES-NI, AEGIS-256 (draft-irtf-cfrg-aegis-aead, 256-bit key and
 * nonce, 32-byte tag) runs at four to five times AES-256-GCM's speed in
 * libsodium and is preferred; AES-256-GCM (also needs carry-less multiply)
 * stays for peers that offer it but not AEGIS (docs/PERFORMANCE.md).
 * Identity blocks are always sealed with ChaCha. */
enum sec_cipher { SEC_CHACHA20_POLY1305 = 0, SEC_AES256_GCM = 1, SEC_AEGIS256 = 2, SEC__CIPHER_END };

enum { SEC_CIPHERS_BASE = 1u << SEC_CHACHA20_POLY1305 };

static const char *const sec_cipher_names[SEC__CIPHER_END] = {
	"chacha20-poly1305", "aes-256-gcm", "aegis-256"
};

static size_t sec_tag_bytes(uint8_t cipher)
{
	return cipher == SEC_AEGIS256 ? SEC_TAG_MAX_BYTES : SEC_TAG_BYTES;
}

static const char *const sec_mode_names[SEC__MODE_END] = { "insecure", "secret", "certificate" };

struct sec_serial {
	uint8_t len;
	uint8_t b[SEC_SERIAL_MAX_BYTES];
};

/* What a verified peer certificate grants. */
struct sec_grant {
	uint32_t ips[SEC_CERT_IPS_MAX];
	uint8_t n_ips;
	uint32_t route_net[SEC_CERT_ROUTES_MAX];
	uint8_t route_len[SEC_CERT_ROUTES_MAX];
	uint8_t n_routes;
	struct sec_serial serial;
	char name[64];
	int64_t not_after_s;            /* Unix time the certificate expires (notAfter) */
};

/* The mbedTLS contexts of the secure modes, out of line (2.1 KB). */
struct sec_ctx {
	mbedtls_x509_crt ca, own;
	mbedtls_pk_context key;
	struct sec_grant own_grant;
	struct sec_serial *revoked;     /* SEC_REVOKED_MAX entries */
	unsigned n_revoked;
	uint32_t crl_gen;               /* bumped by each list put in force (dht_maint follows it) */
	int64_t own_warned_s;           /* when we last warned that our certificate ends soon */
	char crl_path[256];
	struct timespec crl_mtime;      /* of the file last read, whether it parsed or not */
};

struct sec_creds {
	enum sec_mode mode;
	uint8_t salt[SEC_KEY_BYTES];    /* HKDF salt: the secret, or SHA-256 of the CA cert */
	uint8_t mac1_key[SEC_KEY_BYTES];/* gates every handshake start: members only */
	bool admission;                 /* certificate mode: mac1 keyed by network.key, not ca.crt */
	/* From sec_creds_init, which every `ipop up` runs whatever its mode;
	 * NULL only on a simulated node (section 15b), which runs insecure:
	 * no X25519, no certificate, nothing here is read. */
	struct sec_ctx *ctx;
	uint8_t cookie_key[2][SEC_KEY_BYTES];
	uint64_t cookie_rotated_ms;
	uint8_t ciphers;                /* bit per enum sec_cipher this node offers */
};

static const mbedtls_md_info_t *sec_md(void)
{
	return mbedtls_md_info_from_type(MBEDTLS_MD_SHA256);
}

static void sec_sha256(const void *a, size_t alen, const void *b, size_t blen, uint8_t out[32])
{
	mbedtls_sha256_context c;
	mbedtls_sha256_init(&c);
	mbedtls_sha256_starts(&c, 0);
	mbedtls_sha256_update(&c, a, alen);
	if (blen)
		mbedtls_sha256_update(&c, b, blen);
	mbedtls_sha256_finish(&c, out);
	mbedtls_sha256_free(&c);
}

static void sec_hmac(const uint8_t key[SEC_KEY_BYTES], const void *in, size_t len, uint8_t out[32])
{
	mbedtls_md_hmac(sec_md(), key, SEC_KEY_BYTES, in, len, out);
}

/* HKDF-Expand(prk, label || context) to 32 bytes. */
static void sec_expand(const uint8_t prk[SEC_KEY_BYTES], const char *label,
		       const uint8_t ctx[32], uint8_t out[SEC_KEY_BYTES])
{
	uint8_t info[64];
	size_t ll = strlen(label);
	memcpy(info, label, ll);
	if (ctx)
		memcpy(info + ll, ctx, 32);
	mbedtls_hkdf_expand(sec_md(), prk, SEC_KEY_BYTES, info, ll + (ctx ? 32 : 0), out, SEC_KEY_BYTES);
}

static void sec_wipe(void *p, size_t n)
{
	mbedtls_platform_zeroize(p, n);
}

static bool sec_equal(const void *a, const void *b, size_t n)
{
	const volatile uint8_t *x = a, *y = b;
	uint8_t d = 0;
	for (size_t i = 0; i < n; i++)
		d |= x[i] ^ y[i];
	return d == 0;
}

static int sec_rng_cb(void *ctx, unsigned char *out, size_t n)
{
	return mbedtls_ctr_drbg_random(&((struct sec_rng *)ctx)->drbg, out, n);
}

/* X25519 (RFC 7748) is libsodium's: 40 us a key pair or a shared secret
 * against mbedTLS's 1.3 ms, and a responder does both for every HS_INIT it
 * answers (a flood of valid ones cost it 2.6 ms each; docs/SECURITY.md,
 * "Load").  Keys are the RFC's 32-byte little-endian strings either way, so
 * nodes built with the one talk to nodes built with the other. */

/* A fresh X25519 key pair. */
static int sec_x25519_keypair(struct sec_creds *s, struct sec_rng *r, uint8_t priv[32], uint8_t pub[32])
{
	(void)s;
	sec_random(r, priv, 32);
	return crypto_scalarmult_curve25519_base(pub, priv) == 0 ? 0 : -1;
}

/* The shared secret; -1 for a low-order peer key (an all-zero result). */
static int sec_x25519(struct sec_creds *s, struct sec_rng *r, const uint8_t priv[32],
		      const uint8_t peer[32], uint8_t out[32])
{
	(void)s;
	(void)r;
	return crypto_scalarmult_curve25519(out, priv, peer) == 0 ? 0 : -1;
}

/* The nonce is the epoch and the counter, zero-padded to AEGIS's 32 bytes
 * (the RFC 8439 and GCM ciphers take the first 12). */
static void sec_nonce(uint8_t nonce[32], uint32_t epoch, uint64_t counter)
{
	struct wbuf w = wbuf_of(nonce, 32);
	wbuf_u32(&w, epoch);
	wbuf_u64(&w, counter);
	memset(nonce + 12, 0, 20);
}

/* Encrypt len bytes in place-safe fashion to out (len + sec_tag_bytes). */
static void sec_seal(uint8_t cipher, const uint8_t key[SEC_KEY_BYTES], uint32_t epoch,
		     uint64_t counter, const uint8_t *aad, size_t aad_len,
		     const uint8_t *in, size_t len, uint8_t *out)
{
	uint8_t nonce[32];
	sec_nonce(nonce, epoch, counter);
	if (cipher == SEC_AEGIS256)
		crypto_aead_aegis256_encrypt_detached(out, out + len, NULL, in, len, aad, aad_len,
						      NULL, nonce, key);
	else if (cipher == SEC_AES256_GCM)
		crypto_aead_aes256gcm_encrypt_detached(out, out + len, NULL, in, len, aad, aad_len,
						       NULL, nonce, key);
	else
		crypto_aead_chacha20poly1305_ietf_encrypt_detached(out, out + len, NULL, in, len, aad,
								   aad_len, NULL, nonce, key);
}

/* Decrypt len bytes (tag included) to out; false if forged or corrupted. */
static bool sec_open(uint8_t cipher, const uint8_t key[SEC_KEY_BYTES], uint32_t epoch,
		     uint64_t counter, const uint8_t *aad, size_t aad_len,
		     const uint8_t *in, size_t len, uint8_t *out)
{
	size_t tag_len = sec_tag_bytes(cipher);
	if (len < tag_len)
		return false;
	uint8_t nonce[32];
	sec_nonce(nonce, epoch, counter);
	const uint8_t *tag = in + len - tag_len;
	if (cipher == SEC_AEGIS256)
		return crypto_aead_aegis256_decrypt_detached(out, NULL, in, len - tag_len, tag, aad,
							     aad_len, nonce, key) == 0;
	if (cipher == SEC_AES256_GCM)
		return crypto_aead_aes256gcm_decrypt_detached(out, NULL, in, len - tag_len, tag, aad,
							      aad_len, nonce, key) == 0;
	return crypto_aead_chacha20poly1305_ietf_decrypt_detached(out, NULL, in, len - tag_len, tag,
								  aad, aad_len, nonce, key) == 0;
}

/* The record ciphers this process offers: the hardware-backed ones where
 * the CPU has what they need.  IPOP_CIPHER=NAME offers only NAME (and
 * ChaCha, which every node offers): for comparisons, or where AES-NI is
 * emulated slowly. */
static uint8_t sec_ciphers_offered(void)
{
	uint8_t allow = 0xff;           /* bits of the ciphers IPOP_CIPHER lets us offer */
	const char *want = getenv("IPOP_CIPHER");
	if (want && *want) {
		allow = SEC_CIPHERS_BASE;
		for (uint8_t i = 0; i < SEC__CIPHER_END; i++)
			if (!strcmp(want, sec_cipher_names[i]))
				allow |= 1u << i;
		if (allow == SEC_CIPHERS_BASE && strcmp(want, sec_cipher_names[SEC_CHACHA20_POLY1305]))
			log_warn("sec", "IPOP_CIPHER '%s' is none of aegis-256, aes-256-gcm, chacha20-poly1305: "
				 "offering chacha20-poly1305 only", want);
	}
	uint8_t c = SEC_CIPHERS_BASE;
	if (sodium_runtime_has_aesni() && sodium_runtime_has_avx())
		c |= 1u << SEC_AEGIS256;
	if (crypto_aead_aes256gcm_is_available())
		c |= 1u << SEC_AES256_GCM;
	return c & allow;
}

/* Both ends pick from what both offer, fastest first; ChaCha is always there. */
static uint8_t sec_cipher_pick(uint8_t ours, uint8_t theirs)
{
	uint8_t both = ours & theirs;
	if (both & (1u << SEC_AEGIS256))
		return SEC_AEGIS256;
	return (both & (1u << SEC_AES256_GCM)) ? SEC_AES256_GCM : SEC_CHACHA20_POLY1305;
}

/* ---- replay window (RFC 6479 style bitmap) --------------------------- */

struct sec_replay {
	uint64_t top;                   /* highest counter accepted + 1; 0 = none yet */
	uint64_t bits[SEC_REPLAY_WINDOW / 64];
};

/* May counter c still be accepted?  Checked before decryption (cheap), and
 * committed only after the record authenticated. */
static bool sec_replay_ok(const struct sec_replay *w, uint64_t c)
{
	if (c >= w->top)
		return true;
	if (w->top - c > SEC_REPLAY_WINDOW - 64)
		return false;
	uint64_t bit = c % SEC_REPLAY_WINDOW;
	return !(w->bits[bit / 64] >> (bit % 64) & 1);
}

static void sec_replay_commit(struct sec_replay *w, uint64_t c)
{
	if (c >= w->top) {
		/* Clear the words the window slides over. */
		uint64_t from = w->top / 64, to = c / 64;
		if (to - from >= SEC_REPLAY_WINDOW / 64)
			memset(w->bits, 0, sizeof w->bits);
		else
			for (uint64_t i = from + 1; i <= to; i++)
				w->bits[i % (SEC_REPLAY_WINDOW / 64)] = 0;
		if (w->top == 0)
			w->bits[from % (SEC_REPLAY_WINDOW / 64)] = 0;
		w->top = c + 1;
	}
	uint64_t bit = c % SEC_REPLAY_WINDOW;
	w->bits[bit / 64] |= 1ull << (bit % 64);
}

/* ---- cookies and mac1 ------------------------------------------------ */

static void sec_cookie_rotate(struct sec_creds *s, struct sec_rng *r, uint64_t now)
{
	if (s->cookie_rotated_ms && now - s->cookie_rotated_ms < SEC_COOKIE_ROTATE_MS)
		return;
	memcpy(s->cookie_key[1], s->cookie_key[0], SEC_KEY_BYTES);
	sec_random(r, s->cookie_key[0], SEC_KEY_BYTES);
	s->cookie_rotated_ms = now ? now : 1;
}

/* The cookie for a source address: proves the sender receives there. */
static void sec_cookie(const struct sec_creds *s, int which, const struct sockaddr_in *sa,
		       uint8_t out[SEC_MAC_BYTES])
{
	uint8_t in[6], mac[32];
	memcpy(in, &sa->sin_addr.s_addr, 4);
	memcpy(in + 4, &sa->sin_port, 2);
	sec_hmac(s->cookie_key[which], in, sizeof in, mac);
	memcpy(out, mac, SEC_MAC_BYTES);
}

static bool sec_cookie_valid(const struct sec_creds *s, const struct sockaddr_in *sa,
			     const uint8_t cookie[SEC_MAC_BYTES])
{
	uint8_t want[SEC_MAC_BYTES];
	for (int i = 0; i < 2; i++) {
		sec_cookie(s, i, sa, want);
		if (sec_equal(want, cookie, SEC_MAC_BYTES))
			return true;
	}
	return false;
}

static void sec_mac1(const struct sec_creds *s, const uint8_t *msg, size_t len, uint8_t out[SEC_MAC_BYTES])
{
	uint8_t mac[32];
	sec_hmac(s->mac1_key, msg, len, mac);
	memcpy(out, mac, SEC_MAC_BYTES);
}

/* ---- certificates ----------------------------------------------------- */

/* Read a whole small file, NUL-terminated (mbedTLS's PEM parser wants the
 * terminator counted).  Key files must not be readable by group or others. */
static int sec_read_file(const char *path, bool secret, uint8_t **out, size_t *len,
			 char *err, size_t errlen)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0) {
		snprintf(err, errlen, "cannot read %s: %s", path, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	if (secret && (st.st_mode & 077)) {
		snprintf(err, errlen, "%s is readable by group or others (mode %03o); "
			 "fix with: chmod 600 %s", path, (unsigned)(st.st_mode & 0777), path);
		close(fd);
		return -1;
	}
	if (!S_ISREG(st.st_mode) || st.st_size > 65536) {
		snprintf(err, errlen, "%s is not a small regular file", path);
		close(fd);
		return -1;
	}
	*out = calloc(1, (size_t)st.st_size + 1);
	ssize_t r = *out ? read(fd, *out, (size_t)st.st_size) : -1;
	close(fd);
	if (r != st.st_size) {
		snprintf(err, errlen, "cannot read %s: %s", path, r < 0 ? strerror(errno) : "short read");
		free(*out);
		return -1;
	}
	*len = (size_t)st.st_size + 1;
	return 0;
}

static void sec_serial_of(const mbedtls_x509_crt *c, struct sec_serial *s)
{
	size_t n = c->serial.len < SEC_SERIAL_MAX_BYTES ? c->serial.len : SEC_SERIAL_MAX_BYTES;
	s->len = (uint8_t)n;
	memcpy(s->b, c->serial.p, n);
}

/* An X.509 time (UTC) as Unix seconds. */
static int64_t sec_x509_unix(const mbedtls_x509_time *t)
{
	struct tm tm = { .tm_year = t->year - 1900, .tm_mon = t->mon - 1, .tm_mday = t->day,
			 .tm_hour = t->hour, .tm_min = t->min, .tm_sec = t->sec };
	return (int64_t)timegm(&tm);
}

/* The virtual IPs (SAN iPAddress), routed prefixes (SAN URI
 * "ipop:route:A.B.C.D/N") and name (subject CN) a certificate grants, and
 * until when. */
static void sec_grant_of(const mbedtls_x509_crt *c, struct sec_grant *g)
{
	*g = (struct sec_grant){ .not_after_s = sec_x509_unix(&c->valid_to) };
	sec_serial_of(c, &g->serial);
	for (const mbedtls_x509_sequence *s = &c->subject_alt_names; s && s->buf.p; s = s->next) {
		mbedtls_x509_subject_alternative_name san;
		if (mbedtls_x509_parse_subject_alt_name(&s->buf, &san) != 0)
			continue;
		const mbedtls_x509_buf *u = &san.san.unstructured_name;
		if (san.type == MBEDTLS_X509_SAN_IP_ADDRESS && u->len == 4 && g->n_ips < SEC_CERT_IPS_MAX) {
			struct buf b = buf_of(u->p, 4);
			g->ips[g->n_ips++] = buf_u32(&b);
		} else if (san.type == MBEDTLS_X509_SAN_UNIFORM_RESOURCE_IDENTIFIER &&
			   u->len > 11 && u->len < 40 && !memcmp(u->p, "ipop:route:", 11) &&
			   g->n_routes < SEC_CERT_ROUTES_MAX) {
			char cidr[40], *slash;
			memcpy(cidr, u->p + 11, u->len - 11);
			cidr[u->len - 11] = 0;
			struct in_addr ia;
			if ((slash = strchr(cidr, '/'))) {
				*slash = 0;
				int plen = atoi(slash + 1);
				if (inet_pton(AF_INET, cidr, &ia) == 1 && plen >= 0 && plen <= 32) {
					g->route_net[g->n_routes] = ntohl(ia.s_addr);
					g->route_len[g->n_routes++] = (uint8_t)plen;
				}
			}
		}
		mbedtls_x509_free_subject_alt_name(&san);
	}
	for (const mbedtls_x509_name *n = &c->subject; n; n = n->next)
		if (!MBEDTLS_OID_CMP(MBEDTLS_OID_AT_CN, &n->oid) && n->val.len < sizeof g->name) {
			memcpy(g->name, n->val.p, n->val.len);
			g->name[n->val.len] = 0;
		}
}

static bool sec_revoked(const struct sec_creds *s, const struct sec_serial *serial)
{
	for (unsigned i = 0; i < s->ctx->n_revoked; i++)
		if (s->ctx->revoked[i].len == serial->len && !memcmp(s->ctx->revoked[i].b, serial->b, serial->len))
			return true;
	return false;
}

/* Is this certificate (DER) in the revocation list?  false if it does
 * not parse: records are stored only after sec_cert_check passed. */
static bool sec_der_revoked(const struct sec_creds *s, const uint8_t *der, size_t len)
{
	mbedtls_x509_crt crt;
	struct sec_serial serial;
	mbedtls_x509_crt_init(&crt);
	bool parsed = len && mbedtls_x509_crt_parse_der(&crt, der, len) == 0;
	if (parsed)
		sec_serial_of(&crt, &serial);
	mbedtls_x509_crt_free(&crt);
	return parsed && sec_revoked(s, &serial);
}

/* notAfter is the last valid second (RFC 5280 4.1.2.5), as mbedTLS's
 * verify counts it: a link closed a second earlier came straight back up. */
static bool sec_grant_expired(const struct sec_grant *g, int64_t now_s)
{
	return g->not_after_s < now_s;
}

/* Our own certificate ends within SEC_EXPIRY_WARN_S (or has ended). */
static bool sec_own_expiring(const struct sec_creds *s, int64_t now_s)
{
	return s->mode == SEC_CERT && s->ctx->own_grant.not_after_s - now_s <= SEC_EXPIRY_WARN_S;
}

/* "3 d 4 h", "2 h 5 min" or "40 s": how long until a certificate ends. */
static void sec_span_str(int64_t s, char out[32])
{
	if (s >= 86400)
		snprintf(out, 32, "%lld d %lld h", (long long)(s / 86400), (long long)(s % 86400 / 3600));
	else if (s >= 3600)
		snprintf(out, 32, "%lld h %lld min", (long long)(s / 3600), (long long)(s % 3600 / 60));
	else
		snprintf(out, 32, "%lld s", (long long)(s > 0 ? s : 0));
}

static bool sec_grant_has_ip(const struct sec_grant *g, uint32_t ip)
{
	for (unsigned i = 0; i < g->n_ips; i++)
		if (g->ips[i] == ip)
			return true;
	return false;
}

/* The ring address a certificate entitles its holder to: SHA-1 of the
 * certified virtual IP it uses, or for a certificate without IPs SHA-1 of
 * its public key, so that no member can pick its ring position.
 * false if vip is not certified. */
static bool sec_cert_addr(const mbedtls_x509_crt *c, const struct sec_grant *g, uint32_t vip, ring_addr *out)
{
	if (g->n_ips) {
		*out = sec_addr_of_ip(vip);
		return sec_grant_has_ip(g, vip);
	}
	sec_sha1(c->pk_raw.p, c->pk_raw.len, out->b);
	return vip == 0;
}

/* Verify a peer's certificate: issued by our CA, in its validity period,
 * not revoked.  On success fills grant. */
static int sec_cert_check(struct sec_creds *s, const uint8_t *der, size_t len, mbedtls_x509_crt *crt,
			  struct sec_grant *g, const char **why)
{
	uint32_t flags = 0;
	if (mbedtls_x509_crt_parse_der(crt, der, len) != 0) {
		*why = "unparsable certificate";
		return -1;
	}
	if (mbedtls_x509_crt_verify(crt, &s->ctx->ca, NULL, NULL, &flags, NULL, NULL) != 0) {
		*why = flags & MBEDTLS_X509_BADCERT_EXPIRED ? "certificate expired" :
		       flags & MBEDTLS_X509_BADCERT_FUTURE ? "certificate not yet valid" :
		       "certificate not issued by this network's CA";
		return -1;
	}
	if (!mbedtls_pk_can_do(&crt->pk, MBEDTLS_PK_ECDSA)) {
		*why = "certificate key is not ECDSA";
		return -1;
	}
	sec_grant_of(crt, g);
	if (sec_revoked(s, &g->serial)) {
		*why = "certificate revoked";
		return -1;
	}
	return 0;
}

static int sec_sign(struct sec_creds *s, struct sec_rng *r, const uint8_t hash[32],
		    uint8_t *sig, size_t *sig_len)
{
	return mbedtls_pk_sign(&s->ctx->key, MBEDTLS_MD_SHA256, hash, 32, sig, SEC_SIG_MAX_BYTES, sig_len,
			       sec_rng_cb, r) ? -1 : 0;
}

static bool sec_verify(mbedtls_x509_crt *crt, const uint8_t hash[32], const uint8_t *sig, size_t len)
{
	return mbedtls_pk_verify(&crt->pk, MBEDTLS_MD_SHA256, hash, 32, sig, len) == 0;
}

/* Parse a revocation list: one certificate serial in hex per line (as
 * 'ipop ca revoke' writes them); '#' starts a comment.  Fills out
 * (SEC_REVOKED_MAX entries) and *n; on error out holds a part. */
static int sec_crl_parse(const char *path, const char *text, struct sec_serial *out, unsigned *n,
			 char *err, size_t errlen)
{
	int lineno = 0;
	*n = 0;
	for (const char *p = text; *p;) {
		const char *nl = strchr(p, '\n');
		size_t len = nl ? (size_t)(nl - p) : strlen(p);
		char line[128];
		lineno++;
		snprintf(line, sizeof line, "%.*s", (int)(len < 127 ? len : 127), p);
		p += len + (nl ? 1 : 0);
		char *hash = strchr(line, '#');
		if (hash)
			*hash = 0;
		char tok[64];
		if (sscanf(line, "%63s", tok) != 1)
			continue;
		struct sec_serial ser = { .len = (uint8_t)(strlen(tok) / 2) };
		if (*n >= SEC_REVOKED_MAX || ser.len == 0 || ser.len > SEC_SERIAL_MAX_BYTES ||
		    !buf_unhex(tok, ser.b, ser.len)) {
			snprintf(err, errlen, "%s:%d: expected a certificate serial in hex (at most %d entries)",
				 path, lineno, SEC_REVOKED_MAX);
			return -1;
		}
		out[(*n)++] = ser;
	}
	return 0;
}

/* Read and parse the list into a fresh array, and swap it in only when the
 * whole file parsed: a list cut short (an editor's half-written file, a
 * typo) must not drop the revocations it no longer reaches. */
static int sec_crl_load(struct sec_creds *s, char *err, size_t errlen)
{
	uint8_t *text;
	size_t len;
	unsigned n;
	struct sec_serial *fresh = calloc(SEC_REVOKED_MAX, sizeof *fresh);
	if (!fresh) {
		snprintf(err, errlen, "revocation list %s: out of memory", s->ctx->crl_path);
		return -1;
	}
	int rc = sec_read_file(s->ctx->crl_path, false, &text, &len, err, errlen);
	if (rc == 0) {
		rc = sec_crl_parse(s->ctx->crl_path, (const char *)text, fresh, &n, err, errlen);
		free(text);
	}
	if (rc == 0) {
		struct sec_serial *old = s->ctx->revoked;
		s->ctx->revoked = fresh;
		s->ctx->n_revoked = n;
		s->ctx->crl_gen++;
		fresh = old;
	}
	free(fresh);
	return rc;
}

/* Re-read the revocation list if its file changed.  1: a new list is in
 * force, 0: same file, -1: unreadable or malformed, and the old list stays
 * in force whole.  The mtime of a bad file is kept too, so that it costs
 * one warning, not one every tick, until it is replaced. */
static int sec_crl_refresh(struct sec_creds *s, char *err, size_t errlen)
{
	struct stat st;
	if (!s->ctx->crl_path[0])
		return 0;
	if (stat(s->ctx->crl_path, &st) < 0) {
		bool told = s->ctx->crl_mtime.tv_nsec == -1;
		s->ctx->crl_mtime = (struct timespec){ .tv_nsec = -1 };   /* no file: told once */
		snprintf(err, errlen, "cannot read revocation list %s: %s", s->ctx->crl_path, strerror(errno));
		return told ? 0 : -1;
	}
	if (st.st_mtim.tv_sec == s->ctx->crl_mtime.tv_sec && st.st_mtim.tv_nsec == s->ctx->crl_mtime.tv_nsec)
		return 0;
	s->ctx->crl_mtime = st.st_mtim;
	return sec_crl_load(s, err, errlen) < 0 ? -1 : 1;
}

/* A secret file holds 64 hex digits (what 'ipop genkey' writes). */
static int sec_read_key_file(const char *path, uint8_t key[SEC_KEY_BYTES], char *err, size_t errlen)
{
	uint8_t *text;
	size_t len;
	if (sec_read_file(path, true, &text, &len, err, errlen) < 0)
		return -1;
	char *t = (char *)text;
	t[strcspn(t, " \t\r\n")] = 0;
	bool ok = buf_unhex(t, key, SEC_KEY_BYTES);
	sec_wipe(text, len);
	free(text);
	if (!ok) {
		snprintf(err, errlen, "%s: expected 64 hex digits (create one with: ipop genkey --out %s)", path, path);
		return -1;
	}
	return 0;
}

/* A shared secret file: the network secret itself. */
static int sec_load_secret(struct sec_creds *s, const char *path, char *err, size_t errlen)
{
	uint8_t psk[SEC_KEY_BYTES];
	if (sec_read_key_file(path, psk, err, errlen) < 0)
		return -1;
	s->mode = SEC_PSK;
	sec_expand(psk, "ipop-v2 salt", NULL, s->salt);
	sec_expand(psk, "ipop-v2 mac1", NULL, s->mac1_key);
	sec_wipe(psk, sizeof psk);
	return 0;
}

static int sec_parse_pem(const char *path, bool secret, mbedtls_x509_crt *crt, mbedtls_pk_context *pk,
			 struct sec_rng *r, char *err, size_t errlen)
{
	uint8_t *data;
	size_t len;
	if (sec_read_file(path, secret, &data, &len, err, errlen) < 0)
		return -1;
	int rc = crt ? mbedtls_x509_crt_parse(crt, data, len)
		     : mbedtls_pk_parse_key(pk, data, len, NULL, 0, sec_rng_cb, r);
	sec_wipe(data, len);
	free(data);
	if (rc != 0) {
		char msg[128];
		mbedtls_strerror(rc, msg, sizeof msg);
		snprintf(err, errlen, "cannot parse %s: %s", path, msg);
		return -1;
	}
	return 0;
}

/* Certificate mode's salt and mac1 key, from s->ctx->ca.  mac1 gates every
 * handshake, and a responder that lets an HS_INIT through spends two X25519
 * and an ECDSA signature on it (section 06).  ca.crt is public, so a mac1
 * key made from it alone lets anyone make a node do that work.  `ipop ca
 * init` therefore also makes a random admission secret, network.key, that
 * `ipop cert issue` hands out with every certificate; mac1 is keyed by it,
 * bound to the CA:
 *     mac1_key = HKDF-Expand(PRK = admission, "ipop-v2 admit" || SHA-256(DER(ca.crt)))
 * A CA made before (no network.key; admission_path missing) keeps the old
 * public key, and `ipop up` warns.  Every node of a network must make the
 * same choice.  The salt stays the CA's hash either way.  0, or -1. */
static int sec_cert_keys(struct sec_creds *s, const char *admission_path, char *err, size_t errlen)
{
	const mbedtls_x509_buf *ca = &s->ctx->ca.raw;
	s->mode = SEC_CERT;
	sec_sha256("ipop-v2 ca", 10, ca->p, ca->len, s->salt);
	s->admission = admission_path && access(admission_path, F_OK) == 0;
	if (!s->admission) {
		sec_sha256("ipop-v2 mac1", 12, ca->p, ca->len, s->mac1_key);
		return 0;
	}
	uint8_t secret[SEC_KEY_BYTES], ca_hash[32];
	if (sec_read_key_file(admission_path, secret, err, errlen) < 0)
		return -1;
	sec_sha256(ca->p, ca->len, NULL, 0, ca_hash);
	sec_expand(secret, "ipop-v2 admit", ca_hash, s->mac1_key);
	sec_wipe(secret, sizeof secret);
	return 0;
}

/* A certificate directory holds ca.crt, node.crt and node.key, and
 * network.key from a CA of ipop 0.2.1 or later (what 'ipop cert issue'
 * writes). */
static int sec_load_cert_dir(struct sec_creds *s, struct sec_rng *r, const char *dir,
			     char *err, size_t errlen)
{
	char path[512];
	snprintf(path, sizeof path, "%s/ca.crt", dir);
	if (sec_parse_pem(path, false, &s->ctx->ca, NULL, r, err, errlen) < 0)
		return -1;
	snprintf(path, sizeof path, "%s/node.crt", dir);
	if (sec_parse_pem(path, false, &s->ctx->own, NULL, r, err, errlen) < 0)
		return -1;
	snprintf(path, sizeof path, "%s/node.key", dir);
	if (sec_parse_pem(path, true, NULL, &s->ctx->key, r, err, errlen) < 0)
		return -1;
	uint32_t flags = 0;
	if (mbedtls_x509_crt_verify(&s->ctx->own, &s->ctx->ca, NULL, NULL, &flags, NULL, NULL) != 0) {
		snprintf(err, errlen, "%s/node.crt is not valid under %s/ca.crt (%s)", dir, dir,
			 flags & MBEDTLS_X509_BADCERT_EXPIRED ? "expired" : "wrong CA");
		return -1;
	}
	if (mbedtls_pk_check_pair(&s->ctx->own.pk, &s->ctx->key, sec_rng_cb, r) != 0) {
		snprintf(err, errlen, "%s/node.key does not match %s/node.crt", dir, dir);
		return -1;
	}
	if (s->ctx->own.raw.len > SEC_CERT_MAX_BYTES) {
		snprintf(err, errlen, "%s/node.crt is too large (%zu bytes, at most %d)", dir,
			 s->ctx->own.raw.len, SEC_CERT_MAX_BYTES);
		return -1;
	}
	sec_grant_of(&s->ctx->own, &s->ctx->own_grant);
	snprintf(path, sizeof path, "%s/" SEC_ADMISSION_FILE, dir);
	return sec_cert_keys(s, path, err, errlen);
}

static int sec_creds_init(struct sec_creds *s)
{
	*s = (struct sec_creds){ .mode = SEC_INSECURE, .ctx = calloc(1, sizeof *s->ctx) };
	if (!s->ctx)
		return -1;
	mbedtls_x509_crt_init(&s->ctx->ca);
	mbedtls_x509_crt_init(&s->ctx->own);
	mbedtls_pk_init(&s->ctx->key);
	s->ctx->revoked = calloc(SEC_REVOKED_MAX, sizeof *s->ctx->revoked);
	if (!s->ctx->revoked || sodium_init() < 0)
		return -1;
	s->ciphers = sec_ciphers_offered();
	return 0;
}

static void sec_creds_free(struct sec_creds *s)
{
	if (s->ctx) {
		mbedtls_x509_crt_free(&s->ctx->ca);
		mbedtls_x509_crt_free(&s->ctx->own);
		mbedtls_pk_free(&s->ctx->key);
		free(s->ctx->revoked);
		sec_wipe(s->ctx, sizeof *s->ctx);
		free(s->ctx);
	}
	sec_wipe(s, sizeof *s);
}

/* ---- issuing credentials (ipop genkey, ca init, cert issue) ----------- */

/* Write a file that must not exist yet; secrets get mode 0600 from the
 * start (open's mode, not a chmod after: no moment where others may read).
 * O_EXCL already refuses a symbolic link in the path's last component, even
 * a dangling one; O_NOFOLLOW says so. */
static int sec_write_new_file(const char *path, const void *data, size_t len, bool secret,
			      char *err, size_t errlen)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, secret ? 0600 : 0644);
	if (fd < 0) {
		snprintf(err, errlen, "cannot create %s: %s%s", path, strerror(errno),
			 errno == EEXIST ? " (refusing to overwrite; remove it first)" : "");
		return -1;
	}
	ssize_t w = write(fd, data, len);
	int e = errno;
	if (close(fd) < 0 || w != (ssize_t)len) {
		snprintf(err, errlen, "cannot write %s: %s", path, strerror(w < 0 ? e : EIO));
		unlink(path);
		return -1;
	}
	return 0;
}

/* A key file: the key as 64 hex digits and a newline, created 0600 and
 * never over an existing file or through a link (ipop genkey --out, the
 * CA's and each node's network.key). */
static int sec_write_key_file(const char *path, const uint8_t key[SEC_KEY_BYTES], char *err, size_t errlen)
{
	char hex[2 * SEC_KEY_BYTES + 2];
	buf_hex(key, SEC_KEY_BYTES, hex);
	strcat(hex, "\n");
	int rc = sec_write_new_file(path, hex, strlen(hex), true, err, errlen);
	sec_wipe(hex, sizeof hex);
	return rc;
}

static int sec_keygen(mbedtls_pk_context *pk, struct sec_rng *r)
{
	if (mbedtls_pk_setup(pk, mbedtls_pk_info_from_type(MBEDTLS_PK_ECKEY)) != 0)
		return -1;
	return mbedtls_ecp_gen_key(MBEDTLS_ECP_DP_SECP256R1, mbedtls_pk_ec(*pk), sec_rng_cb, r) ? -1 : 0;
}

static void sec_x509_time(time_t t, char out[16])
{
	struct tm tm;
	gmtime_r(&t, &tm);
	strftime(out, 16, "%Y%m%d%H%M%S", &tm);
}

/* The SAN list for a node certificate: its IPs and its routed prefixes. */
static mbedtls_x509_san_list *sec_san_list(const struct sec_grant *g, uint8_t ipb[][4], char uris[][48],
					   mbedtls_x509_san_list *nodes)
{
	mbedtls_x509_san_list *head = NULL;
	unsigned k = 0;
	for (int i = (int)g->n_routes - 1; i >= 0; i--) {
		char net[16];
		buf_ip_str(g->route_net[i], net);
		snprintf(uris[i], 48, "ipop:route:%s/%u", net, g->route_len[i]);
		nodes[k].node.type = MBEDTLS_X509_SAN_UNIFORM_RESOURCE_IDENTIFIER;
		nodes[k].node.san.unstructured_name.p = (unsigned char *)uris[i];
		nodes[k].node.san.unstructured_name.len = strlen(uris[i]);
		nodes[k].next = head;
		head = &nodes[k++];
	}
	for (int i = (int)g->n_ips - 1; i >= 0; i--) {
		struct wbuf w = wbuf_of(ipb[i], 4);
		wbuf_u32(&w, g->ips[i]);
		nodes[k].node.type = MBEDTLS_X509_SAN_IP_ADDRESS;
		nodes[k].node.san.unstructured_name.p = ipb[i];
		nodes[k].node.san.unstructured_name.len = 4;
		nodes[k].next = head;
		head = &nodes[k++];
	}
	return head;
}

/* Sign a certificate for subject_key with issuer_key, valid from an hour
 * ago (clocks differ) for valid_s seconds from now; grant is NULL for the
 * CA itself.  PEM into out. */
static int sec_cert_write(struct sec_rng *r, mbedtls_pk_context *subject_key, mbedtls_pk_context *issuer_key,
			  const char *subject, const char *issuer, const struct sec_grant *grant,
			  int64_t valid_s, uint8_t *out, size_t cap)
{
	mbedtls_x509write_cert c;
	uint8_t serial[16], ipb[SEC_CERT_IPS_MAX][4];
	char uris[SEC_CERT_ROUTES_MAX][48], from[16], to[16];
	mbedtls_x509_san_list nodes[SEC_CERT_IPS_MAX + SEC_CERT_ROUTES_MAX];
	time_t now = time(NULL);
	sec_random(r, serial, sizeof serial);
	serial[0] &= 0x7f;      /* a positive INTEGER */
	serial[0] |= 0x40;      /* and exactly 16 octets */
	sec_x509_time(now - 3600, from);
	sec_x509_time(now + (time_t)valid_s, to);
	mbedtls_x509write_crt_init(&c);
	mbedtls_x509write_crt_set_version(&c, MBEDTLS_X509_CRT_VERSION_3);
	mbedtls_x509write_crt_set_md_alg(&c, MBEDTLS_MD_SHA256);
	mbedtls_x509write_crt_set_subject_key(&c, subject_key);
	mbedtls_x509write_crt_set_issuer_key(&c, issuer_key);
	int rc = mbedtls_x509write_crt_set_subject_name(&c, subject);
	rc = rc ? rc : mbedtls_x509write_crt_set_issuer_name(&c, issuer);
	rc = rc ? rc : mbedtls_x509write_crt_set_serial_raw(&c, serial, sizeof serial);
	rc = rc ? rc : mbedtls_x509write_crt_set_validity(&c, from, to);
	rc = rc ? rc : mbedtls_x509write_crt_set_basic_constraints(&c, grant ? 0 : 1, grant ? -1 : 0);
	rc = rc ? rc : mbedtls_x509write_crt_set_key_usage(&c, grant ? MBEDTLS_X509_KU_DIGITAL_SIGNATURE :
							   MBEDTLS_X509_KU_KEY_CERT_SIGN | MBEDTLS_X509_KU_CRL_SIGN);
	mbedtls_x509_san_list *san = grant ? sec_san_list(grant, ipb, uris, nodes) : NULL;
	if (!rc && san)
		rc = mbedtls_x509write_crt_set_subject_alternative_name(&c, san);
	rc = rc ? rc : mbedtls_x509write_crt_pem(&c, out, cap, sec_rng_cb, r);
	mbedtls_x509write_crt_free(&c);
	return rc ? -1 : 0;
}

/* ===================================================================== 05 wire_
 * Overlay messages (docs/PROTOCOL.md is the reference).  Every packet starts
 * with version and type bytes.  Handshake messages and sealed DATA records
 * travel one link; inside a record, PING .. BYE stay on the link and ROUTED
 * carries an inner message across the ring.  Each type has one decoder
 * that fills a typed struct and demands the exact length, and one encoder.
 * Beyond this section only the typed structs travel.
 * To add a message: a type number, a struct, an encode/decode pair, a fuzz
 * case and a round-trip test in tests/unit_core.c.
 * ========================================================================= */

enum wire_type {
	/* Cleartext on the wire: the handshake, and sealed records. */
	WIRE_HS_INIT = 1,       /* initiator: my index, mode, ephemeral key, cookie, mac1 */
	WIRE_HS_COOKIE = 2,     /* responder: prove you receive at your address first */
	WIRE_HS_RESP = 3,       /* responder: my ephemeral key, my sealed identity */
	WIRE_HS_FIN = 4,        /* initiator: my sealed identity */
	WIRE_HS_REJECT = 5,     /* responder: the networks' security modes differ */
	WIRE_DATA = 6,          /* a sealed record holding one message below */
	/* Only inside DATA records. */
	WIRE_PING = 7,          /* keepalive and RTT probe */
	WIRE_PONG = 8,
	WIRE_ROLES = 9,         /* why I keep this link (near/far/leaf bits) */
	WIRE_BYE = 10,          /* I am closing this link, and why */
	WIRE_ROUTED = 11,       /* an inner message routed over the ring */
	WIRE_RELAY = 12,        /* to a relay: pass this record on to the node named */
	WIRE_RELAYED = 13,      /* from a relay: this record comes from the node named */
	WIRE_PUNCH = 14,        /* over a relayed link: I am dialling you directly now */
	WIRE__TYPE_END
};

enum { WIRE_FIRST_INNER = WIRE_PING };

/* Delivery modes: which node a routed message stops at.  Greedy routing moves
 * to the neighbour that minimises the mode's metric and delivers at a local
 * minimum (ring_metric says how each is measured). */
enum wire_mode {
	MODE_EXACT = 1,         /* only the node with address dst; else drop */
	MODE_NEAREST = 2,       /* the node closest to dst either way round */
	MODE_SUCC = 3,          /* the first node at or clockwise after dst */
	MODE_PRED = 4,          /* the first node at or counter-clockwise before dst */
	MODE__END
};

enum wire_inner {
	INNER_CTM_REQ = 1,      /* connect-to-me: please link with me */
	INNER_CTM_REPLY = 2,    /* here I am, and here are my near neighbours */
	INNER_ECHO_REQ = 3,     /* overlay ping */
	INNER_ECHO_REPLY = 4,
	INNER_IP = 5,           /* an IPv4 packet for the node holding its destination */
	INNER_IP_UNREACH = 6,   /* no node holds that destination: the packet's head */
	INNER_DHT = 7,          /* a DHT request, reply or replica (section 08) */
	INNER_IP_STALE = 8,     /* "I do not hold that IP (any more)": the packet's head */
	INNER__END
};

enum wire_routed_flag {
	ROUTED_HAS_VIA = 1,
	ROUTED_DETOUR = 2,      /* sent past the target once, around a missing link */
	ROUTED__FLAGS = 3
};

enum bye_reason {
	BYE_LEAVING = 1,        /* the node is shutting down */
	BYE_DUPLICATE = 2,      /* another link to the same peer won the race */
	BYE_UNNEEDED = 3,       /* neither side has a role for this link */
	BYE_SELF = 4,           /* the link reached its own node */
	BYE_UNEXPECTED = 5,     /* the dialled endpoint is another node */
	BYE_REVOKED = 6,        /* the peer's certificate was revoked */
	BYE_CONFLICT = 7,       /* an older node holds your address: stop */
	BYE_EXPIRED = 8,        /* the peer's certificate has expired */
	BYE__END
};

enum ring_role {
	ROLE_LEAF = 1,          /* bootstrap link of a joining node */
	ROLE_NEAR = 2,          /* one of the 2 closest on either side */
	ROLE_FAR = 4,           /* harmonic long-distance link */
	ROLE_SHORTCUT = 8,      /* direct link for a busy pair */
	ROLE_RELAY = 16,        /* a relayed node's leg to a public node (09) */
	ROLE__ALL = 31
};

enum {
	WIRE_HDR_BYTES = 2,
	WIRE_ENDPOINT_BYTES = 7,
	WIRE_ROUTED_FIXED_BYTES = WIRE_HDR_BYTES + 4 + 2 * RING_ADDR_BYTES + 1 + 2,
	WIRE_ROUTED_ROOM_BYTES = WIRE_ROUTED_FIXED_BYTES + RING_ADDR_BYTES,    /* with a via */
	WIRE_ROUTED_TTL_OFFSET = 4,
	WIRE_ROUTED_HOPS_OFFSET = 5,
};

enum {
	WIRE_HS_INIT_BYTES = WIRE_HDR_BYTES + 4 + 1 + 32 + SEC_MAC_BYTES + SEC_MAC_BYTES,
	WIRE_HS_INIT_MAC1_OFFSET = WIRE_HS_INIT_BYTES - SEC_MAC_BYTES,
	WIRE_HS_INIT_COOKIE_OFFSET = WIRE_HS_INIT_MAC1_OFFSET - SEC_MAC_BYTES,
	WIRE_DATA_HDR_BYTES = WIRE_HDR_BYTES + 4 + 1 + 8,
	WIRE_DATA_OVERHEAD_BYTES = WIRE_DATA_HDR_BYTES + SEC_TAG_MAX_BYTES,
	WIRE_MAX_RECORD_BYTES = WIRE_MAX_PACKET_BYTES + WIRE_DATA_OVERHEAD_BYTES,
	/* RELAY and RELAYED wrap a whole record, so they are the one message
	 * larger than WIRE_MAX_PACKET_BYTES; a relay leg's UDP datagram may then
	 * exceed 1472 bytes and be fragmented by IP (docs/PROTOCOL.md). */
	WIRE_RELAY_HDR_BYTES = WIRE_HDR_BYTES + RING_ADDR_BYTES,
	WIRE_MAX_MSG_BYTES = WIRE_RELAY_HDR_BYTES + WIRE_MAX_RECORD_BYTES,
	WIRE_MAX_WIRE_BYTES = WIRE_MAX_MSG_BYTES + WIRE_DATA_OVERHEAD_BYTES,
};

struct wire_hs_init {
	uint32_t sender;                /* initiator's link index */
	uint8_t mode;                   /* enum sec_mode: both ends must agree */
	uint8_t e[32];                  /* initiator's ephemeral X25519 key */
	uint8_t cookie[SEC_MAC_BYTES];  /* zero until the responder sent one */
	uint8_t mac1[SEC_MAC_BYTES];    /* HMAC of the above under the network's key */
};

struct wire_hs_cookie {
	uint32_t receiver;
	uint8_t cookie[SEC_MAC_BYTES];
};

struct wire_hs_resp {
	uint32_t sender, receiver;
	uint8_t e[32];
	uint16_t len;
	const uint8_t *sealed;          /* the responder's identity block, sealed */
};

struct wire_hs_fin {
	uint32_t receiver;
	uint16_t len;
	const uint8_t *sealed;          /* the initiator's identity block, sealed */
};

enum wire_reject_reason {
	REJECT_MODE_MISMATCH = 1,       /* the networks' security modes differ */
	REJECT_REFUSED = 2,             /* your identity failed my checks (revoked, wrong CA, ...) */
};

struct wire_hs_reject {
	uint32_t receiver;
	uint8_t reason;
	uint8_t mode;                   /* the responder's mode */
};

struct wire_data {
	uint32_t receiver;
	uint8_t epoch;                  /* low bits of the sender's key epoch */
	uint64_t counter;               /* nonce and replay-window position */
	const uint8_t *body;            /* ciphertext and tag, or plaintext when insecure */
	size_t len;
};

/* The plaintext of a sealed handshake block: who I am, how I see you, and
 * for certificate networks my certificate and a signature over the transcript. */
struct wire_identity {
	struct peer_info info;
	struct endpoint observed;
	uint16_t cert_len;
	const uint8_t *cert;
	uint8_t sig_len;
	const uint8_t *sig;
	uint8_t ciphers;                /* record AEADs offered (bit per enum sec_cipher) */
};

/* RELAY and RELAYED: a record of a relayed link, and the node at its far end. */
struct wire_relay {
	ring_addr addr;
	const uint8_t *rec;
	size_t len;
};

struct wire_ping {
	uint32_t seq;
	uint64_t t_us;                  /* sender's clock, echoed back in the pong */
};

struct wire_routed {
	uint8_t mode, flags, ttl, hops;
	ring_addr src, dst, via;        /* via: route here first, then on to dst */
	uint8_t inner;
	uint16_t len;
	const uint8_t *payload;
	/* payload again when WIRE_ROUTED_ROOM_BYTES before it are ours to
	 * write, else NULL: ring_forward then puts the header there instead of
	 * copying the packet behind one (a copy per packet sent). */
	uint8_t *writable;
};

struct wire_ctm_req {
	uint32_t token;
	uint8_t want;                   /* role the requester will give the link */
	ring_addr reply_via;            /* requester's first hop: reaches it for sure */
	struct peer_info from;
};

struct wire_ctm_reply {
	uint32_t token;
	uint8_t want;
	struct peer_info from;
	uint8_t n_neighbours;
	struct peer_info neighbours[RING_CTM_NEIGHBOURS_MAX];
};

struct wire_echo {
	uint32_t id;
	uint64_t t_us;
	uint8_t req_hops;               /* reply only: hops the request took */
};

/* Ring addresses compare as 160-bit big-endian numbers. */
static bool wire_addr_eq(const ring_addr *a, const ring_addr *b)
{
	return memcmp(a->b, b->b, RING_ADDR_BYTES) == 0;
}

static int wire_addr_cmp(const ring_addr *a, const ring_addr *b)
{
	return memcmp(a->b, b->b, RING_ADDR_BYTES);
}

enum wire_verdict { WIRE_OK, WIRE_SHORT, WIRE_BAD_VERSION, WIRE_BAD_TYPE };

/* Classify a packet by its two header bytes before trusting anything else.
 * Outer packets are handshake messages or DATA; inner ones come out of DATA. */
static enum wire_verdict wire_classify(const uint8_t *p, size_t len, bool inner, uint8_t *type)
{
	if (len < WIRE_HDR_BYTES)
		return WIRE_SHORT;
	if (p[0] != WIRE_VERSION)
		return WIRE_BAD_VERSION;
	uint8_t lo = inner ? WIRE_FIRST_INNER : WIRE_HS_INIT, hi = inner ? WIRE__TYPE_END : WIRE_FIRST_INNER;
	if (p[1] < lo || p[1] >= hi)
		return WIRE_BAD_TYPE;
	*type = p[1];
	return WIRE_OK;
}

static struct buf wire_body(const uint8_t *p, size_t len)
{
	struct buf b = buf_of(p, len);
	buf_u8(&b);
	buf_u8(&b);
	return b;
}

static void wire_header_put(struct wbuf *w, uint8_t type)
{
	wbuf_u8(w, WIRE_VERSION);
	wbuf_u8(w, type);
}

static void wire_endpoint_get(struct buf *b, struct endpoint *e)
{
	e->proto = buf_u8(b);
	e->ip = buf_u32(b);
	e->port = buf_u16(b);
	if (e->proto != PROTO_UDP && e->proto != PROTO_TCP)
		b->bad = true;
}

static void wire_endpoint_put(struct wbuf *w, const struct endpoint *e)
{
	wbuf_u8(w, e->proto);
	wbuf_u32(w, e->ip);
	wbuf_u16(w, e->port);
}

static void wire_peer_info_get(struct buf *b, struct peer_info *pi)
{
	buf_bytes(b, pi->addr.b, RING_ADDR_BYTES);
	pi->vip = buf_u32(b);
	pi->instance = buf_u64(b);
	pi->started = buf_u32(b);
	pi->n_endpoints = buf_u8(b);
	if (pi->n_endpoints > LINK_ENDPOINTS_MAX) {
		b->bad = true;
		pi->n_endpoints = 0;
	}
	for (unsigned i = 0; i < pi->n_endpoints; i++)
		wire_endpoint_get(b, &pi->endpoints[i]);
}

static void wire_peer_info_put(struct wbuf *w, const struct peer_info *pi)
{
	wbuf_bytes(w, pi->addr.b, RING_ADDR_BYTES);
	wbuf_u32(w, pi->vip);
	wbuf_u64(w, pi->instance);
	wbuf_u32(w, pi->started);
	wbuf_u8(w, pi->n_endpoints);
	for (unsigned i = 0; i < pi->n_endpoints && i < LINK_ENDPOINTS_MAX; i++)
		wire_endpoint_put(w, &pi->endpoints[i]);
}

/* The decoder's last step: every byte consumed, nothing short. */
static int wire_finish(const struct buf *b)
{
	return (b->bad || b->p != b->end) ? -EBADMSG : 0;
}

static int wire_hs_init_decode(const uint8_t *p, size_t len, struct wire_hs_init *m)
{
	struct buf b = wire_body(p, len);
	m->sender = buf_u32(&b);
	m->mode = buf_u8(&b);
	buf_bytes(&b, m->e, sizeof m->e);
	buf_bytes(&b, m->cookie, sizeof m->cookie);
	buf_bytes(&b, m->mac1, sizeof m->mac1);
	if (m->mode >= SEC__MODE_END)
		b.bad = true;
	return wire_finish(&b);
}

/* mac1 is left zero here: it covers the encoded bytes before it. */
static ssize_t wire_hs_init_encode(uint8_t *out, size_t cap, const struct wire_hs_init *m)
{
	struct wbuf w = wbuf_of(out, cap);
	wire_header_put(&w, WIRE_HS_INIT);
	wbuf_u32(&w, m->sender);
	wbuf_u8(&w, m->mode);
	wbuf_bytes(&w, m->e, sizeof m->e);
	wbuf_bytes(&w, m->cookie, sizeof m->cookie);
	wbuf_bytes(&w, m->mac1, sizeof m->mac1);
	return wbuf_done(&w);
}

static int wire_hs_cookie_decode(const uint8_t *p, size_t len, struct wire_hs_cookie *m)
{
	struct buf b = wire_body(p, len);
	m->receiver = buf_u32(&b);
	buf_bytes(&b, m->cookie, sizeof m->cookie);
	return wire_finish(&b);
}

static ssize_t wire_hs_cookie_encode(uint8_t *out, size_t cap, const struct wire_hs_cookie *m)
{
	struct wbuf w = wbuf_of(out, cap);
	wire_header_put(&w, WIRE_HS_COOKIE);
	wbuf_u32(&w, m->receiver);
	wbuf_bytes(&w, m->cookie, sizeof m->cookie);
	return wbuf_done(&w);
}

static int wire_hs_resp_decode(const uint8_t *p, size_t len, struct wire_hs_resp *m)
{
	struct buf b = wire_body(p, len);
	m->sender = buf_u32(&b);
	m->receiver = buf_u32(&b);
	buf_bytes(&b, m->e, sizeof m->e);
	m->len = buf_u16(&b);
	m->sealed = buf_view(&b, m->len);
	return wire_finish(&b);
}

static ssize_t wire_hs_resp_encode(uint8_t *out, size_t cap, const struct wire_hs_resp *m)
{
	struct wbuf w = wbuf_of(out, cap);
	wire_header_put(&w, WIRE_HS_RESP);
	wbuf_u32(&w, m->sender);
	wbuf_u32(&w, m->receiver);
	wbuf_bytes(&w, m->e, sizeof m->e);
	wbuf_u16(&w, m->len);
	wbuf_bytes(&w, m->sealed, m->len);
	return wbuf_done(&w);
}

static int wire_hs_fin_decode(const uint8_t *p, size_t len, struct wire_hs_fin *m)
{
	struct buf b = wire_body(p, len);
	m->receiver = buf_u32(&b);
	m->len = buf_u16(&b);
	m->sealed = buf_view(&b, m->len);
	return wire_finish(&b);
}

static ssize_t wire_hs_fin_encode(uint8_t *out, size_t cap, const struct wire_hs_fin *m)
{
	struct wbuf w = wbuf_of(out, cap);
	wire_header_put(&w, WIRE_HS_FIN);
	wbuf_u32(&w, m->receiver);
	wbuf_u16(&w, m->len);
	wbuf_bytes(&w, m->sealed, m->len);
	return wbuf_done(&w);
}

static int wire_hs_reject_decode(const uint8_t *p, size_t len, struct wire_hs_reject *m)
{
	struct buf b = wire_body(p, len);
	m->receiver = buf_u32(&b);
	m->reason = buf_u8(&b);
	m->mode = buf_u8(&b);
	if (m->reason < REJECT_MODE_MISMATCH || m->reason > REJECT_REFUSED || m->mode >= SEC__MODE_END)
		b.bad = true;
	return wire_finish(&b);
}

static ssize_t wire_hs_reject_encode(uint8_t *out, size_t cap, const struct wire_hs_reject *m)
{
	struct wbuf w = wbuf_of(out, cap);
	wire_header_put(&w, WIRE_HS_REJECT);
	wbuf_u32(&w, m->receiver);
	wbuf_u8(&w, m->reason);
	wbuf_u8(&w, m->mode);
	return wbuf_done(&w);
}

/* A DATA record: the header, then at least the tag (secure) or one byte. */
static int wire_data_decode(const uint8_t *p, size_t len, struct wire_data *m)
{
	struct buf b = wire_body(p, len);
	m->receiver = buf_u32(&b);
	m->epoch = buf_u8(&b);
	m->counter = buf_u64(&b);
	m->body = b.p;
	m->len = b.bad ? 0 : (size_t)(b.end - b.p);
	return b.bad || m->len == 0 ? -EBADMSG : 0;
}

static void wire_data_header_put(uint8_t out[WIRE_DATA_HDR_BYTES], const struct wire_data *m)
{
	struct wbuf w = wbuf_of(out, WIRE_DATA_HDR_BYTES);
	wire_header_put(&w, WIRE_DATA);
	wbuf_u32(&w, m->receiver);
	wbuf_u8(&w, m->epoch);
	wbuf_u64(&w, m->counter);
}

static int wire_identity_decode(const uint8_t *p, size_t len, struct wire_identity *m)
{
	struct buf b = buf_of(p, len);
	wire_peer_info_get(&b, &m->info);
	wire_endpoint_get(&b, &m->observed);
	m->cert_len = buf_u16(&b);
	if (m->cert_len > SEC_CERT_MAX_BYTES)
		b.bad = true;
	m->cert = buf_view(&b, m->cert_len);
	m->sig_len = buf_u8(&b);
	if (m->sig_len > SEC_SIG_MAX_BYTES)
		b.bad = true;
	m->sig = buf_view(&b, m->sig_len);
	m->ciphers = buf_u8(&b);
	if (!(m->ciphers & SEC_CIPHERS_BASE))
		b.bad = true;           /* every node can do ChaCha: anything else is garbage */
	return wire_finish(&b);
}

static ssize_t wire_identity_encode(uint8_t *out, size_t cap, const struct wire_identity *m)
{
	struct wbuf w = wbuf_of(out, cap);
	wire_peer_info_put(&w, &m->info);
	wire_endpoint_put(&w, &m->observed);
	wbuf_u16(&w, m->cert_len);
	wbuf_bytes(&w, m->cert, m->cert_len);
	wbuf_u8(&w, m->sig_len);
	wbuf_bytes(&w, m->sig, m->sig_len);
	wbuf_u8(&w, m->ciphers);
	return wbuf_done(&w);
}

/* PING and PONG share one layout. */
static int wire_ping_decode(const uint8_t *p, size_t len, struct wire_ping *m)
{
	struct buf b = wire_body(p, len);
	m->seq = buf_u32(&b);
	m->t_us = buf_u64(&b);
	return wire_finish(&b);
}

static ssize_t wire_ping_encode(uint8_t *out, size_t cap, uint8_t type,
				const struct wire_ping *m)
{
	struct wbuf w = wbuf_of(out, cap);
	wire_header_put(&w, type);
	wbuf_u32(&w, m->seq);
	wbuf_u64(&w, m->t_us);
	return wbuf_done(&w);
}

/* ROLES and BYE carry one byte each. */
static int wire_byte_decode(const uint8_t *p, size_t len, uint8_t *v)
{
	struct buf b = wire_body(p, len);
	*v = buf_u8(&b);
	return wire_finish(&b);
}

static ssize_t wire_byte_encode(uint8_t *out, size_t cap, uint8_t type, uint8_t v)
{
	struct wbuf w = wbuf_of(out, cap);
	wire_header_put(&w, type);
	wbuf_u8(&w, v);
	return wbuf_done(&w);
}

static int wire_relay_decode(const uint8_t *p, size_t len, struct wire_relay *m)
{
	struct buf b = wire_body(p, len);
	buf_bytes(&b, m->addr.b, RING_ADDR_BYTES);
	m->rec = b.p;
	m->len = b.bad ? 0 : (size_t)(b.end - b.p);
	return b.bad || m->len < WIRE_HDR_BYTES || m->len > WIRE_MAX_RECORD_BYTES ? -EBADMSG : 0;
}

static ssize_t wire_relay_encode(uint8_t *out, size_t cap, uint8_t type, const struct wire_relay *m)
{
	struct wbuf w = wbuf_of(out, cap);
	wire_header_put(&w, type);
	wbuf_bytes(&w, m->addr.b, RING_ADDR_BYTES);
	wbuf_bytes(&w, m->rec, m->len);
	return wbuf_done(&w);
}

/* The receiver index of an outer packet other than HS_INIT (HS_RESP names
 * its sender first); false when the packet is too short to hold one. */
static bool wire_outer_receiver(const uint8_t *p, size_t len, uint32_t *idx)
{
	size_t off = WIRE_HDR_BYTES + (p[1] == WIRE_HS_RESP ? 4 : 0);
	if (len < off + 4)
		return false;
	struct buf b = buf_of(p + off, 4);
	*idx = buf_u32(&b);
	return true;
}

static int wire_routed_decode(const uint8_t *p, size_t len, struct wire_routed *r)
{
	struct buf b = wire_body(p, len);
	r->mode = buf_u8(&b);
	r->flags = buf_u8(&b);
	r->ttl = buf_u8(&b);
	r->hops = buf_u8(&b);
	buf_bytes(&b, r->src.b, RING_ADDR_BYTES);
	buf_bytes(&b, r->dst.b, RING_ADDR_BYTES);
	memset(r->via.b, 0, RING_ADDR_BYTES);
	if (r->flags & ROUTED_HAS_VIA)
		buf_bytes(&b, r->via.b, RING_ADDR_BYTES);
	r->inner = buf_u8(&b);
	r->len = buf_u16(&b);
	r->payload = buf_view(&b, r->len);
	r->writable = NULL;             /* the caller's buffer: not ours to write */
	if (r->mode < MODE_EXACT || r->mode >= MODE__END || (r->flags & ~ROUTED__FLAGS) ||
	    r->inner < INNER_CTM_REQ || r->inner >= INNER__END)
		b.bad = true;
	return wire_finish(&b);
}

static size_t wire_routed_head_bytes(const struct wire_routed *r)
{
	return WIRE_ROUTED_FIXED_BYTES + (r->flags & ROUTED_HAS_VIA ? RING_ADDR_BYTES : 0);
}

/* The message's header alone, wire_routed_head_bytes long. */
static inline void wire_routed_head_put(struct wbuf *w, const struct wire_routed *r)
{
	wire_header_put(w, WIRE_ROUTED);
	wbuf_u8(w, r->mode);
	wbuf_u8(w, r->flags);
	wbuf_u8(w, r->ttl);
	wbuf_u8(w, r->hops);
	wbuf_bytes(w, r->src.b, RING_ADDR_BYTES);
	wbuf_bytes(w, r->dst.b, RING_ADDR_BYTES);
	if (r->flags & ROUTED_HAS_VIA)
		wbuf_bytes(w, r->via.b, RING_ADDR_BYTES);
	wbuf_u8(w, r->inner);
	wbuf_u16(w, r->len);
}

static ssize_t wire_routed_encode(uint8_t *out, size_t cap, const struct wire_routed *r)
{
	struct wbuf w = wbuf_of(out, cap);
	wire_routed_head_put(&w, r);
	wbuf_bytes(&w, r->payload, r->len);
	return wbuf_done(&w);
}

static int wire_ctm_req_decode(const uint8_t *p, size_t len, struct wire_ctm_req *m)
{
	struct buf b = buf_of(p, len);
	m->token = buf_u32(&b);
	m->want = buf_u8(&b);
	buf_bytes(&b, m->reply_via.b, RING_ADDR_BYTES);
	wire_peer_info_get(&b, &m->from);
	if (m->want & ~ROLE__ALL)
		b.bad = true;
	return wire_finish(&b);
}

static ssize_t wire_ctm_req_encode(uint8_t *out, size_t cap, const struct wire_ctm_req *m)
{
	struct wbuf w = wbuf_of(out, cap);
	wbuf_u32(&w, m->token);
	wbuf_u8(&w, m->want);
	wbuf_bytes(&w, m->reply_via.b, RING_ADDR_BYTES);
	wire_peer_info_put(&w, &m->from);
	return wbuf_done(&w);
}

static int wire_ctm_reply_decode(const uint8_t *p, size_t len, struct wire_ctm_reply *m)
{
	struct buf b = buf_of(p, len);
	m->token = buf_u32(&b);
	m->want = buf_u8(&b);
	wire_peer_info_get(&b, &m->from);
	m->n_neighbours = buf_u8(&b);
	if (m->n_neighbours > RING_CTM_NEIGHBOURS_MAX || (m->want & ~ROLE__ALL)) {
		b.bad = true;
		m->n_neighbours = 0;
	}
	for (unsigned i = 0; i < m->n_neighbours; i++)
		wire_peer_info_get(&b, &m->neighbours[i]);
	return wire_finish(&b);
}

static ssize_t wire_ctm_reply_encode(uint8_t *out, size_t cap, const struct wire_ctm_reply *m)
{
	struct wbuf w = wbuf_of(out, cap);
	wbuf_u32(&w, m->token);
	wbuf_u8(&w, m->want);
	wire_peer_info_put(&w, &m->from);
	wbuf_u8(&w, m->n_neighbours);
	for (unsigned i = 0; i < m->n_neighbours && i < RING_CTM_NEIGHBOURS_MAX; i++)
		wire_peer_info_put(&w, &m->neighbours[i]);
	return wbuf_done(&w);
}

/* ECHO_REQ has no req_hops byte; ECHO_REPLY has one. */
static int wire_echo_decode(const uint8_t *p, size_t len, bool reply, struct wire_echo *m)
{
	struct buf b = buf_of(p, len);
	m->id = buf_u32(&b);
	m->t_us = buf_u64(&b);
	m->req_hops = reply ? buf_u8(&b) : 0;
	return wire_finish(&b);
}

static ssize_t wire_echo_encode(uint8_t *out, size_t cap, bool reply, const struct wire_echo *m)
{
	struct wbuf w = wbuf_of(out, cap);
	wbuf_u32(&w, m->id);
	wbuf_u64(&w, m->t_us);
	if (reply)
		wbuf_u8(&w, m->req_hops);
	return wbuf_done(&w);
}

/* ===================================================================== 05b -
 * Shared state: the link and the node.  Types only, no functions: the
 * link (section 06's unit), and each section's state struct, which the
 * node holds by value, so that one static struct node is a whole process
 * (or, in section 15b, one of many).  A section keeps its state in its
 * struct here and touches another's only through that section's functions
 * or hooks.  The limits that size these structs are here with them; the
 * others stay with the section that enforces them.
 * ========================================================================= */

enum link_state {
	LINK_CONNECTING,        /* TCP connect in progress */
	LINK_AWAIT_INIT,        /* accepted TCP stream, no HS_INIT yet */
	LINK_AWAIT_RESP,        /* HS_INIT sent */
	LINK_AWAIT_FIN,         /* HS_RESP sent */
	LINK_UP,
	LINK_CLOSED,
	LINK__STATE_END
};

static const char *const link_state_names[LINK__STATE_END] = {
	[LINK_CONNECTING] = "connecting",
	[LINK_AWAIT_INIT] = "await_init",
	[LINK_AWAIT_RESP] = "await_resp",
	[LINK_AWAIT_FIN] = "await_fin",
	[LINK_UP] = "up",
	[LINK_CLOSED] = "closed",
};

enum {
	LINK_REKEY_MS = 120000,         /* ratchet each direction's key this often */
	LINK_REKEY_GRACE_MS = 10000,    /* keep the previous receive key for stragglers */
	LINK_FIN_CACHE_MS = 10000,      /* resend our HS_FIN if HS_RESP repeats until then */
	/* After we close an up link with a BYE, the peer keeps routing over it
	 * until the BYE arrives: up to a round trip of messages are already on
	 * their way.  A closed link takes those for this long (a round trip
	 * near LINK_DEAD_MS would have closed the link as dead), then is freed.
	 * A TCP link reads on until the peer's BYE or end of stream: closing
	 * its socket at once lost what the peer had sent meanwhile (a reset),
	 * as when a duplicate TCP link gives way to a UDP one (t_ring lost 1
	 * ping in 200 in about 1 run of 12). */
	LINK_DRAIN_MS = 2000,
};

/* Handshake secrets and transcript: allocated with the link, wiped and
 * freed once it is up (link_hs_finish).  Only the AWAIT_* handlers, which
 * check the state first, read them. */
struct link_hs_scratch {
	uint8_t e_priv[32], e_pub[32];
	uint8_t h[32];                  /* transcript hash so far */
	uint8_t ck[32];                 /* HKDF-Extract(salt, X25519(e_i, e_r)) */
	uint8_t cookie[SEC_MAC_BYTES];
	bool has_cookie;
	uint64_t resp_resent_ms;        /* responder: the last HS_RESP resent (link_hs_fin_lost) */
};

/* Handshake state; the retransmit cache outlives the scratch (HS_FIN is
 * resent on an up link). */
struct link_hs {
	struct link_hs_scratch *s;      /* NULL once up: 160 bytes an up link does without */
	uint8_t *cached;                /* our last handshake packet, for retransmits */
	size_t cached_len;
	uint64_t cached_until_ms;
	int tries;
};

struct link_keys {
	uint8_t tx[SEC_KEY_BYTES], rx[SEC_KEY_BYTES], rx_prev[SEC_KEY_BYTES];
	uint32_t tx_epoch, rx_epoch;
	uint8_t cipher;                 /* enum sec_cipher, agreed in the handshake */
	uint64_t tx_epoch_ms, rx_prev_until_ms;
	struct sec_replay replay;
};

/* A TCP link's stream, out of line: most links are UDP (all of a
 * simulated node's), and 48 bytes less put struct link in musl's 496-byte
 * size class instead of 576. */
struct link_tcp {
	size_t rlen;
	uint8_t *wq;                    /* bytes not yet written */
	size_t wq_len, wq_off, wq_cap;
	bool want_writable;
	uint8_t rbuf[WIRE_TCP_FRAME_HDR_BYTES + WIRE_MAX_WIRE_BYTES];   /* one partial frame */
};

struct link {
	/* What every scan reads (link_find_*, ring_next_hop, ring_side_nearest)
	 * comes first, within the first two cache lines, peer.addr included:
	 * a node walks its ~20 links per routed message, each a cache miss in
	 * a large simulation. */
	struct link *next;              /* node->links */
	enum link_state state;
	uint8_t proto;
	bool peer_known;
	uint8_t local_roles, peer_roles;
	uint32_t local_idx, peer_idx;   /* receiver indices in every message */
	uint64_t last_rx_ms;
	uint64_t rtt_spike_ms;          /* last sign the peer stalled (LINK_SPIKE_MS); 0: never */
	struct peer_info peer;          /* valid when peer_known */
	struct node *node;
	bool initiator;
	bool confirmed;                 /* the peer proved it accepted us (see link_on_hs_reject) */
	bool half_open;                 /* an unasked UDP or relayed responder, not up yet:
	                                * counted in node->n_half_open */
	int fd;                         /* UDP: shared socket; TCP: owned stream; relay: -1 */
	struct sockaddr_in remote;
	ring_addr relay_via;            /* relay: the peer our records pass through */
	uint32_t upgrade_backoff_ms;    /* (4-byte fields sit in the holes 8-byte ones leave:
	                                * 488 bytes, in musl's 496-byte size class) */
	uint64_t relay_last_ms;         /* when records of relayed links last used this one */
	uint64_t upgrade_ms;            /* relay: next try to go direct (section 09) */
	uint64_t unheard_ms;            /* relay: our first record since the far end's last; stale
	                                * when <= last_rx_ms (link_relay_sent) */
	struct sec_grant *grant;        /* what the peer's certificate allows; certificate mode only */
	ring_addr expect;               /* the node this dial is meant to reach */
	bool expect_set;
	uint8_t want_roles;             /* roles to take on once up */
	uint8_t punch_ttl;              /* UDP dial: its hellos leave with this TTL (section 09),
	                                * until the peer answers or dials us; 0: none */
	uint8_t other_relay_n;          /* relay: the far end's newest records in a row that came
	                                * through another relay than ours (link_relay_follow) */
	struct endpoint observed;       /* how the peer sees us */
	uint32_t ping_seq;
	uint64_t created_ms, up_ms;
	uint64_t refused_ms;            /* the peer's host said its port is closed (ICMP), see link_udp_errors */
	uint64_t drain_until_ms;        /* closed by our BYE: routes the peer's stragglers till then */
	uint64_t ping_rx_ms;            /* the peer's last PING: it keeps the link alive for both */
	double rtt_ms;                  /* smoothed, < 0 until the first pong */
	double rtt_floor_ms;            /* the lowest sample, creeping up 1% a pong; < 0 at first */
	uint64_t ping_tx_mark;          /* tx_packets at the last keepalive tick */
	uint64_t tx_packets, rx_packets, tx_bytes, rx_bytes;
	struct ev_timer timer;          /* handshake retry/timeout, then keepalive */
	struct link_hs hs;
	struct link_keys *keys;         /* secure modes only: an insecure link (a simulated one)
	                                * does without these 384 bytes */
	uint64_t tx_counter;            /* records sent; the nonce, continuing across epochs */
	struct link_tcp *tcp;           /* TCP only: the stream's buffers */
};

/* musl's malloc serves 496 bytes from one size class: a link must fit its
 * 488 usable bytes, or every link costs the next class.  A new per-link
 * fact goes in a hole or a side struct (the certificate's end: grant). */
#if UINTPTR_MAX == UINT64_MAX
_Static_assert(sizeof(struct link) <= 488, "struct link outgrew musl's 496-byte size class");
#endif

/* An address we sent a first packet to (a dial, a probe, a link's last record). */
struct link_contact {
	uint32_t ip;
	uint16_t port;
	uint64_t ms;
};

struct listener {
	uint8_t proto;
	int fd;
	struct sockaddr_in sa;
};

enum {
	/* Peers whose IP traffic is counted for shortcuts.  A node talks to tens
	 * of peers at once, seldom hundreds; 256 slots with 8-slot probing keep a
	 * per-packet lookup to at most 8 compares.  Full: the quietest entry of
	 * the probe window whose peer we have no link to is evicted. */
	RING_SC_SLOTS = 256,
	RING_SC_PROBE = 8,
	RING_SC_WINDOW_MS = 2000,      /* the rate's time constant: a flow counts within ~2 s */
	RING_SC_RETRY_MS = 5000,       /* between connect-to-me requests for one shortcut */
	RING_SC_MAX_LIMIT = 64,        /* --shortcut-max's ceiling: well under LINK_TABLE_MAX */
	RING_SC_PPS_DEFAULT = 20,      /* a chat or ssh session stays routed; a transfer does not */
	RING_SC_MAX_DEFAULT = 8,
	RING_SC_IDLE_DEFAULT_S = 30,
	RING_SLOW_HOLD_MS = 15000,     /* a stalled neighbour is passed over this long */
	RING_SLOW_QUEUE_BYTES = LINK_TCP_WQUEUE_BYTES / 4,     /* a TCP link backing up */
	RING_PNS_CANDIDATES = 3,       /* far candidates probed to compare RTTs */
	RING_PNS_PROBE_MS = 1000,      /* the probes' answers, at most; all in: at once */
	RING_FAR_PARALLEL = 3,         /* far requests under way at once */
	RING_FAR_REPLY_MS = 3000,      /* a far request's reply, or another request */
	RING_CTM_DIAL_DELAY_MS = 250,  /* our dial after a connect-to-me reply, at the first tick after */
	RING_DEFER_MAX = 8,            /* such dials waiting; more dial at once */
	/* Our connect-to-me requests awaiting their reply, by token: only a
	 * reply to one of them is dialled (anyone may route us a reply).  A
	 * node asks twice per probe (RING_PROBE_MS, or every 100 ms after a
	 * loss), up to RING_FAR_PARALLEL far requests and a shortcut or two:
	 * 32 covers 5 s of that; the oldest makes room. */
	RING_ASKED_MAX = 32,
	RING_ASKED_MS = 5000,          /* a reply later than this answers nothing */
	/* A request we answer makes us dial the requester's endpoints (both
	 * ends dial, to punch NATs): a reflector for whoever forges them.
	 * Dial-backs that start a new link are rationed: per requester a burst
	 * of 2 and one per probe period (a node asks twice per probe), at most
	 * RING_ANSWER_SOURCES requesters tracked (the most idle makes room);
	 * and in all a burst of 16 and 8 a second, many times the joins a node
	 * answers even in a flash crowd.  An unrationed request is still
	 * answered: the requester dials us itself. */
	RING_ANSWER_SOURCES = 16,
	RING_ANSWER_SOURCE_BURST = 2,
	RING_ANSWER_SOURCE_EVERY_MS = RING_PROBE_MS,
	RING_ANSWER_BURST = 16,
	RING_ANSWER_EVERY_MS = 125,
	RING_REACHABLE_MS = 600000,    /* an unasked-for UDP link this recent: others reach us */
	/* A joined node dials one of its rendezvous peers (bootstraps and
	 * remembered peers) it holds no link to, every RING_MERGE_MS on average
	 * in a small network, and asks for its neighbours through it: two rings
	 * a partition left behind find each other within about one period of
	 * the heal.  The period grows with N so that the bootstraps of a large
	 * network see a few such dials a second, not hundreds. */
	RING_MERGE_MS = 10000,
	RING_MERGE_PER_NODE_MS = 500,  /* ... plus this per node beyond RING_MERGE_FREE_NODES */
	RING_MERGE_FREE_NODES = 20,
	RING_REMEMBER_MAX = 16,        /* peers that worked, kept on disk for a restart */
	RING_REMEMBER_SAVE_MS = 30000, /* a changed list is written at most this often */
};

/* One peer's IP traffic, both directions (ring_sc_count). */
struct ring_sc_peer {
	ring_addr addr;
	bool used;
	uint32_t packets;               /* since the last tick */
	double pps;                     /* decayed rate, packets per second */
	uint64_t last_ms;               /* the last tick that saw a packet */
	uint64_t dial_ms;               /* the last connect-to-me for a shortcut */
};

/* Shortcuts (section 07): configuration, the traffic table, counters. */
struct ring_shortcuts {
	unsigned pps;                   /* --shortcut-pps: 0 disables shortcuts */
	unsigned max;                   /* --shortcut-max */
	uint64_t idle_ms;               /* --shortcut-idle */
	uint64_t last_tick_ms;
	uint64_t opened, idled, trimmed, refused;
	struct ring_sc_peer *peers;      /* RING_SC_SLOTS, from the first packet counted: 14 KB
	                                * that a node carrying no IP traffic (a router, or
	                                * a simulated node) does without */
};

/* A far candidate (proximity neighbour selection): probed, and dialled
 * only if its RTT is the lowest. */
struct ring_pns_cand {
	ring_addr addr;
	uint32_t token;                 /* its probe's sender index (link_probe) */
	int32_t rtt_us;                 /* -1 until the probe's answer */
	struct endpoint ep;             /* the endpoint that answered */
	uint8_t cookie[SEC_MAC_BYTES];  /* and its cookie, for the dial */
};

enum ring_far_state {
	FAR_FREE,
	FAR_ASKED,                      /* the connect-to-me is out; awaiting its reply */
	FAR_PROBING,                    /* the candidates' probes are out */
	FAR_DIALLING,                   /* the lowest RTT won; its link is coming up */
};

/* A far request under way, from the connect-to-me to the chosen link. */
struct ring_far_req {
	uint8_t state;
	uint8_t n, winner;              /* candidates, and the one chosen */
	uint32_t token;                 /* the connect-to-me's */
	uint64_t until_ms;              /* this state's deadline */
	uint64_t probed_us;             /* when the probes left */
	struct peer_info replier;       /* cand[0]: dialled as any peer if no probe is answered */
	struct ring_pns_cand cand[RING_PNS_CANDIDATES];
};

/* Our dial to a connect-to-me's answerer, waiting to see whether its own
 * dial gets through first (ring_defer_dial). */
struct ring_deferred {
	struct peer_info pi;
	uint8_t want;
	uint64_t at_ms;
};

/* A connect-to-me request of ours that a reply may answer (ring_asked_take). */
struct ring_asked {
	uint32_t token;                 /* 0: a free slot */
	uint64_t until_ms;
};

/* A requester's dial-back ration: its next dial's due time, as a generic
 * cell rate (ring_rate_take). */
struct ring_answerer {
	ring_addr src;
	uint64_t due_ms;
};

/* Ring upkeep state, owned by section 07. */
/* The last next hop chosen: a burst of packets to one destination in one
 * millisecond asks ring_next_hop the same question. */
struct ring_hop_memo {
	ring_addr target;
	uint8_t mode;
	uint32_t links_gen;
	uint64_t now_ms;
	struct link *hop;               /* a good-class hop, or NULL: no memo */
};

/* The usable links' peer addresses, contiguous and in slot order, rebuilt
 * when links_gen moves: routing and the neighbour scans read these 32-byte
 * entries instead of each link's own cache line.  In a 100k simulation the
 * load of every link's state was four fifths of ring_next_hop's time. */
_Static_assert(LINK_TABLE_MAX <= 65536, "ring_view_ent.slot is 16 bits");
struct ring_view_ent {
	ring_addr addr;
	uint16_t slot;                  /* the link: node->link_slots[slot] (22 bytes, not 32) */
};

struct ring_view {
	struct ring_view_ent *e;
	unsigned n, cap;
	uint32_t links_gen;
	bool valid;
};

struct ring_state {
	struct ring_shortcuts sc;
	struct ring_hop_memo memo;
	struct ring_view view;
	struct ring_far_req far[RING_FAR_PARALLEL];
	struct ring_deferred *deferred;   /* RING_DEFER_MAX while any wait, else NULL */
	unsigned n_deferred;
	struct ring_asked asked[RING_ASKED_MAX];
	struct ring_answerer answerers[RING_ANSWER_SOURCES];
	uint64_t answer_due_ms;         /* all dial-backs' ration (RING_ANSWER_BURST) */
	struct ev_timer tick;
	uint64_t next_probe_ms;
	uint64_t next_boot_ms, boot_backoff_ms;
	double n_estimate;
	bool joined;
	uint64_t inbound_ms;            /* the last UDP link a peer began unasked (ring_reachable) */
	struct endpoint boot[BOOTSTRAP_MAX];
	unsigned n_boot;
	/* Peers we linked with, most recent first: rejoin and merge
	 * through them when the bootstraps are gone (ring_remember). */
	struct endpoint remembered[RING_REMEMBER_MAX];
	unsigned n_remembered;
	char remember_path[288];        /* "": not kept on disk */
	bool remember_dirty;
	uint64_t remember_saved_ms, next_merge_ms;
	unsigned merge_next;
	/* The link the routed message in hand arrived on (NULL: our own): who
	 * sent it to us, as opposed to the src it claims (ring_on_routed). */
	struct link *rx;
};

enum {
	NAT_OBSERVATIONS_MAX = 16,      /* distinct (reporter, endpoint) pairs kept */
	NAT_PLANS_MAX = 16,             /* peers being linked, with their fallbacks */
	/* Past the host's router (its NAT) and dead at the next router, which
	 * on the internet is not the peer's NAT: sites are routers apart. */
	NAT_PUNCH_TTL = 2,
	NAT_HOPS_PROBED = 3,            /* routers inside the site told apart (nat_probe_hops) */
	NAT_RELAYS_KNOWN = 4,           /* public nodes remembered as standby relays (section 09):
	                                 * a network has a few, and one dead is passed over */
};

/* A peer we are dialling, and what to try when the dial fails: its TCP
 * endpoints, then a relayed link through one of its neighbours. */
struct nat_plan {
	struct peer_info target;
	uint8_t want;
	bool tcp_tried, await_relay;
	uint8_t next_public;            /* the public relay (nat_state.relays) to try next */
	unsigned next_cand;
	uint64_t until_ms;
	unsigned n_cand;
	struct peer_info cand[RING_CTM_NEIGHBOURS_MAX];
};

/* Section 09's state: what peers told us about our public address, and
 * the fallback plans of dials under way.  Allocated by nat_start: a
 * simulated node (section 15b) does without its 850 bytes. */
struct nat_state {
	struct node *node;              /* the owner, for the tick */
	struct endpoint seen[NAT_OBSERVATIONS_MAX];
	struct endpoint local[NAT_OBSERVATIONS_MAX];  /* our listener each was seen through */
	ring_addr reporter[NAT_OBSERVATIONS_MAX];
	unsigned n_seen, next;
	struct nat_plan *plans;         /* NAT_PLANS_MAX, from nat_start: 20 KB a simulated node
	                                * (section 15b) does without */
	struct ev_timer tick;
	struct endpoint own[LINK_ENDPOINTS_MAX];      /* our listeners' endpoints (nat_collect_own) */
	unsigned n_own;
	int kind;                       /* enum nat_kind, as last classified */
	int ifaddr_fd;                  /* netlink: interface addresses came or went; -1: none */
	struct ev_timer ifaddr_timer;   /* ... collect ours again once the burst settles */
	uint8_t punch_ttl;              /* a first dialer's hellos' TTL (ring_punch_ttl) */
	struct endpoint hops_to;        /* our public endpoint, whose distance nat_probe_hops measures */
	struct peer_info relays[NAT_RELAYS_KNOWN];    /* public nodes heard of: standby relays */
	unsigned n_relays, next_relay;
};

/* The DHT's state, owned by section 08. */
struct dht_state {
	struct dht_record *records;     /* records_cap slots, grown up to DHT_RECORDS_MAX */
	unsigned n_records, records_cap;
	struct dht_pending *pending;    /* pending_cap slots, grown up to DHT_PENDING_MAX */
	unsigned n_pending, pending_cap;
	struct dht_cert *certs;         /* DHT_CERTS_CACHED verified owner certificates, or NULL */
	uint32_t *keys;                 /* keys_cap slots: record index + 1 by key hash (dht_index_) */
	unsigned keys_cap, keys_used;
	struct dht_owner *owners;       /* owners_cap slots: records held per owner */
	unsigned owners_cap, owners_used;
	bool started;                   /* dht_start ran (both arrays wait for a first use) */
	uint32_t links_epoch;           /* bumped when links come or go, or go quiet */
	uint32_t quiet_sig;             /* which up links were quiet at the last dht_maint */
	uint32_t crl_gen;               /* sec_ctx.crl_gen whose revocations the records were checked
	                                * against (dht_drop_revoked) */
	struct ev_timer maint;
};

struct ip_route {
	uint32_t net;
	uint8_t len;
};

/* --ip auto: the address lease, owned by section 10 (ip_lease_). */
struct ip_lease {
	bool on;
	uint8_t state;                  /* enum ip_lease_state */
	uint32_t candidate;             /* the address being claimed or held */
	unsigned tries, renewals;
	uint32_t gen;                   /* bumped per claim: late replies are ignored */
	uint64_t started_ms;
	struct ev_timer timer;
	char path[256];                 /* state file: address and ring address */
};

enum { IP_ADDR_MEMO = 64 };

struct ip_addr_memo {
	uint32_t ip;
	bool valid;
	ring_addr addr;
};

/* The virtual IP layer's state, owned by section 10. */
struct ip_state {
	/* Both arrays are allocated on first use: a node carrying no IP traffic
	 * (a router, a simulated node) does without their 1.9 KB. */
	struct ip_addr_memo *addr_memo; /* IP_ADDR_MEMO: SHA-1 of recent source IPs */
	struct ip_route *routes;        /* IP_ROUTES_MAX: --route-for, IPs we hold besides our own */
	unsigned n_routes;
	struct ip_map *cache;           /* IP_MAP_CACHE_MAX slots */
	unsigned n_cache;
	struct ev_timer publish;
	unsigned publish_rounds;
	bool local;                     /* this host has an interface on the network */
	uint32_t net, mask;             /* the virtual network, from --ip A.B.C.D/P */
	int mtu;
	struct ip_lease lease;
	unsigned dns_pending;           /* resolver lookups in flight */
	uint64_t dns_answers[16];       /* by rcode */
	uint64_t unreach_window_ms;     /* ICMP error rate limit */
	unsigned unreach_in_window;
	uint64_t tx_packets, rx_packets, tx_bytes, rx_bytes;
};

/* User mode's state, owned by sections 12-14. */
enum {
	LW_ACKS_HELD = 8,               /* flows whose ACKs one input batch thins */
	LW_ACK_BYTES = 40,              /* IPv4 and TCP headers, no options, no data */
};

struct lw_state {
	struct netif netif;
	bool started;
	struct ev_timer timer;
	struct pbuf *inq, *inq_tail;    /* packets for lwIP, chained through p->next */
	unsigned n_inq;
	struct ev_timer input_timer;
	struct lw_pkt *pkt_free;        /* recycled input buffers, LW_PKT_FREE_MAX at most */
	struct lw_pkt *spare;           /* where the link layer opens the next record (lw_rx_plain) */
	unsigned n_pkt_free;
	uint64_t last_input_ms;         /* when a packet for lwIP last arrived */
	unsigned n_relays;
	struct lw_relay *dirty;         /* relays with bytes for their socket this turn */
	bool in_batch;                  /* lw_input_flush is feeding lwIP: pure ACKs wait */
	unsigned n_acks;
	uint8_t acks[LW_ACKS_HELD][LW_ACK_BYTES];       /* the newest pure ACK per flow */
	int socks_fd;                   /* -1: no SOCKS server */
	struct socks_client **negotiating;      /* oldest first; SOCKS_NEGOTIATING_MAX, allocated
	                                         * by the first client */
	unsigned n_negotiating;
	char *socks_auth;               /* --socks-auth: "user:password" lines, or NULL */
	struct endpoint socks;
	struct fwd_spec *fwd;           /* -L and -R */
	unsigned n_fwd;
	struct fwd_pipe *pipes;         /* namespace mode's -R connections, a list */
	unsigned n_pipes;
};

/* The tap device's state, owned by section 11. */
struct tap_state {
	int fd;                         /* -1 without a tap */
	char name[16];                  /* IFNAMSIZ */
	uint8_t kernel_mac[6];          /* the interface's own MAC: frames we write go there */
	uint8_t gw_mac[6];              /* the virtual gateway every virtual IP resolves to */
	bool vnet;                      /* frames carry a virtio-net header (offloads on) */
	bool veth;                      /* namespace mode without /dev/net/tun: fd is a packet socket */
	int ns_fd[2];                   /* namespace mode: its user and network namespace (ipop exec), or -1 */
	uint64_t tso_frames, tso_segments, gro_frames, gro_segments;
	uint8_t *rx;                    /* room + TAP_RX_BYTES: the frame tap_readable reads into */
	uint8_t *gro;                   /* a TCP super-frame being built (section 11) */
	size_t gro_len, gro_hlen;
	unsigned gro_segs;
	uint16_t gro_mss;
	bool gro_ended;
};

enum { LINK_SEC_TICK_MS = 2000 }; /* revocation list check and cookie rotation */

enum {
	LINK_BATCH = 64,                /* datagrams per sendmmsg/recvmmsg */
	LINK_GSO_MAX_BYTES = 60000,     /* one UDP_SEGMENT message: under 64 KiB */
	/* and at most UDP_MAX_SEGMENTS segments (64 before Linux 6.9): a turn's
	 * ACKs to one peer, 100 bytes each, made messages of 600, the kernel
	 * said EINVAL, and the node sent one datagram per syscall from then
	 * on: half the user-mode throughput, in whichever direction a node
	 * had acknowledged a download before (issue 20). */
	LINK_GSO_MAX_SEGS = 64,
	LINK_GSO_REFUSALS_MAX = 3,      /* refusals before UDP_SEGMENT is given up */
	LINK_RX_SLOT_BYTES = 65536,     /* a UDP_GRO datagram: up to 64 KiB of records */
	LINK_RX_TURN_BYTES = 262144,    /* read per wake-up, at most about (link_rx_slots) */
};

/* UDP datagrams queued in one loop turn, sent together at its end (section
 * 06, "batching").  Buffers are allocated on first use. */
struct link_tx {
	uint8_t *buf;                   /* LINK_BATCH * WIRE_MAX_WIRE_BYTES */
	size_t used;
	unsigned n;
	bool no_gso;                    /* the kernel refused UDP_SEGMENT too often */
	unsigned gso_refusals;
	int fd[LINK_BATCH];
	struct sockaddr_in to[LINK_BATCH];
	struct iovec iov[LINK_BATCH];
	uint16_t seg[LINK_BATCH];       /* segment size; a shorter segment ends a message */
	bool ended[LINK_BATCH];
	struct mmsghdr msgs[LINK_BATCH];
	union {
		char buf[CMSG_SPACE(sizeof(uint16_t))];
		struct cmsghdr align;
	} cmsg[LINK_BATCH];
};

struct link_rx {
	uint8_t *buf;                   /* LINK_BATCH * LINK_RX_SLOT_BYTES */
	struct mmsghdr msgs[LINK_BATCH];
	struct iovec iov[LINK_BATCH];
	struct sockaddr_in from[LINK_BATCH];
	union {                         /* a UDP_GRO control message per datagram */
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} ctl[LINK_BATCH];
	size_t avg_bytes;               /* per datagram lately, a decaying maximum (link_rx_slots) */
};

/* Every upward call in one table: a lower section reports a fact, or asks a
 * question, through the pointer a higher section installed at its start,
 * so sections stay in dependency order and tests can watch one alone.
 * NULL: nobody listens (a bare link layer in a unit test, a node without
 * NAT traversal in the simulator). */
struct node_up {
	/* links (06) -> the ring (07), installed by ring_start */
	void (*link_up)(struct node *n, struct link *l);
	void (*link_down)(struct node *n, struct link *l, uint8_t bye_reason);
	void (*link_roles)(struct node *n, struct link *l);
	void (*routed)(struct node *n, struct link *l, const uint8_t *pkt, size_t len);
	/* Another process claims our address; proven: its certificate grants it. */
	void (*conflict)(struct node *n, const struct peer_info *other, bool proven);
	/* An HS_COOKIE answered an RTT probe of ours (link_probe): true if the
	 * token was one; the cookie lets a dial to `from` skip its round trip. */
	bool (*probe_reply)(struct node *n, uint32_t token, const struct sockaddr_in *from,
			    const uint8_t cookie[SEC_MAC_BYTES]);
	/* links (06) -> NAT traversal (09), installed by nat_start */
	void (*dial_failed)(struct node *n, struct link *l);   /* a dial's handshake timed out */
	void (*punch)(struct node *n, struct link *l);         /* a relayed peer dials us now */
	/* A router said a datagram of ours to dst ran out of TTL (ICMP time
	 * exceeded, link_udp_errors). */
	void (*ttl_expired)(struct node *n, const struct sockaddr_in *dst);
	/* the ring (07) -> the DHT (08), the IP layer (10), the simulator and
	 * the CLI (15b, 16) */
	void (*deliver_dht)(struct node *n, const struct wire_routed *r);
	void (*links_changed)(struct node *n);
	/* Inner messages for the IP layer, and the ones routing could not deliver. */
	void (*deliver_ip)(struct node *n, const struct wire_routed *r);
	void (*undeliverable)(struct node *n, const struct wire_routed *r);
	void (*echo_reply)(struct node *n, uint32_t id, uint64_t rtt_us, uint8_t hops);
	void (*boot_resolve)(struct node *n);   /* look bootstrap host names up again (section 16b) */
	/* Another node holds our ring address: true if the owner of our
	 * address (section 10's lease) takes another instead.  yield: the
	 * claim is proven and older; else we may move only if we hold nothing. */
	bool (*readdress)(struct node *n, bool yield);
	/* the ring (07) -> NAT traversal (09) */
	void (*linked)(struct node *n, struct link *l);         /* up, after the ring took it */
	void (*dialing)(struct node *n, const struct peer_info *pi, uint8_t want);
	void (*ctm_reply)(struct node *n, const struct wire_ctm_reply *m);
	void (*ctm_req)(struct node *n, const struct wire_ctm_req *m);  /* answered, dialled back */
	/* A peer we link directly that links target, for a message greedy
	 * routing brings to a dead end beside target; NULL: none known. */
	struct link *(*toward)(struct node *n, const ring_addr *target);
	/* the IP layer (10) -> the local interface (11 tap, 12 lwIP) */
	int (*write_local)(struct node *n, const uint8_t *pkt, size_t len);
	void (*flush_local)(struct node *n);    /* at the end of a loop turn, if set */
	/* Where a record is opened: a buffer the local stack may keep if the
	 * record holds an IP packet for it (section 12), or NULL: the stack. */
	uint8_t *(*rx_plain)(struct node *n);
	int (*local_addr_set)(struct node *n); /* the interface takes a leased address */
};

struct node {
	struct ev_loop loop;
	struct sec_rng rng;
	struct sec_creds sec;
	uint64_t rekey_ms;
	struct ev_timer sec_timer;
	struct log_drops drops;
	struct peer_info self;          /* our address, virtual IP, endpoints */
	uint8_t vip_prefix;
	struct listener listeners[LISTEN_MAX];
	unsigned n_listeners;
	int udp_dial_fd;                /* ephemeral UDP socket when no UDP listener */
	struct link_tx *tx;             /* allocated on first use: a simulated node */
	struct link_rx *rx;             /* (section 15b) has neither */
	bool tcp_pending;               /* some TCP link has queued frames to write */
	struct link *links;
	unsigned n_links;
	uint32_t links_gen;             /* bumped when a link comes up, goes, or changes class */
	bool reap_pending;              /* a link closed since link_reap last freed all */
	struct link **unproven;         /* accepted TCP links not yet up, oldest first; allocated
	                                 * (LINK_UNPROVEN_MAX) by the first accept */
	unsigned n_unproven;
	uint64_t reap_drain_ms;         /* the earliest end of a closed link's drain; 0: none */
	struct link **link_slots;       /* by local_idx % LINK_TABLE_MAX (link_find_index) */
	unsigned n_link_slots;          /* grows by doubling up to LINK_TABLE_MAX */
	struct node_up up;              /* every upward call (struct node_up) */
	struct link_contact *contacts;  /* LINK_CONTACT_SLOTS once link_contacts_start ran, else NULL */
	struct ring_state ring;
	struct dht_state dht;
	struct nat_state *nat;          /* NULL until nat_start */
	struct ip_state ip;
	struct tap_state tap;
	struct lw_state lw;
	struct ctl *ctl;
	uint64_t start_ms;
	uint64_t counters_routed, counters_delivered;
	uint64_t relayed_packets, relayed_bytes;        /* records we passed on for others */
	const ring_addr *relay_rx;      /* the relay the record in hand came through (link_relay_input) */
	int exit_code;                  /* set by whoever stops the loop for good */
	char name[64];                  /* --name: published as name:N -> virtual IP */
	pid_t ns_child;                 /* namespace mode: the command we run, or 0 */
	uint64_t reject_logged_ms;      /* rate limit for handshake refusal lines */
	uint64_t *hs_bucket;            /* LINK_HS_BUCKETS, from the first HS_INIT (link_hs_admit) */
	uint64_t hs_bucket_seed;
	unsigned n_half_open;           /* responder links with half_open set */
	unsigned rx_opening;            /* link_on_data calls under way (nested: RELAYED) */
	/* A simulated node's transport (section 15b): every UDP datagram goes
	 * here instead of a socket.  NULL for a real node. */
	int (*udp_send)(struct node *n, const struct sockaddr_in *to, const uint8_t *pkt, size_t len);
};

/* ===================================================================== 06 link_
 * Links: one authenticated, encrypted conversation with one peer over UDP
 * (a remote endpoint on a shared socket) or TCP (its own stream, frames with
 * a 2-byte length).  Every link starts with a handshake (docs/SECURITY.md):
 *
 *   I -> R  HS_INIT   idx_i, mode, e_i, cookie, mac1(network key)
 *   R -> I  HS_COOKIE (UDP, no valid cookie yet: R keeps no state)
 *   R -> I  HS_RESP   idx_r, e_r, seal(k_resp, identity_r + sig(h1r))
 *   I -> R  HS_FIN    seal(k_fin, identity_i + sig(h2))
 *   then    DATA      idx, epoch, counter, seal(k_dir, message)
 *
 * with ck = HKDF-Extract(salt, X25519(e_i, e_r)), salt = the network secret
 * or the CA certificate's hash, and every key expanded from ck and the
 * transcript hash.  A link's state names what it awaits:
 *
 *   initiator:  CONNECTING (TCP) -> AWAIT_RESP --HS_RESP/send FIN--> UP
 *   responder:  (UDP: nothing) / AWAIT_INIT (TCP) --HS_INIT--> AWAIT_FIN
 *               --HS_FIN--> UP
 *   any:        -> CLOSED (freed by link_reap at the end of the loop turn;
 *               an up link we closed as a duplicate or unneeded first
 *               drains the peer's routed messages in flight, LINK_DRAIN_MS)
 *
 * Messages after the handshake carry the receiver's link index, so a packet
 * finds its link with one lookup (the index's low bits are its slot in the
 * node's table) and a peer may change address (roam).
 * Crossing dials make two links; link_resolve_duplicate keeps the one
 * dialled by the lower ring address, so both ends choose the same survivor.
 * Keys ratchet forward (HKDF) every rekey interval; the replay window spans
 * epochs.  Link code reports facts to the ring through n->up; it never
 * decides roles.  struct link and the node are in section 05b.  To add a
 * link message: a wire_ type above WIRE_FIRST_INNER and a
 * case in link_on_up_packet.
 * ========================================================================= */

static void link_addr_short(const ring_addr *a, char out[13])
{
	buf_hex(a->b, 6, out);
}

static void link_endpoint_uri(const struct endpoint *e, char out[40])
{
	char ip[16];
	buf_ip_str(e->ip, ip);
	snprintf(out, 40, "%s://%s:%u", e->proto == PROTO_TCP ? "tcp" : "udp", ip, e->port);
}

static struct endpoint link_endpoint_of(uint8_t proto, const struct sockaddr_in *sa)
{
	return (struct endpoint){ .proto = proto, .ip = ntohl(sa->sin_addr.s_addr),
				  .port = ntohs(sa->sin_port) };
}

static struct sockaddr_in link_sockaddr_of(const struct endpoint *e)
{
	struct sockaddr_in sa = { .sin_family = AF_INET };
	sa.sin_addr.s_addr = htonl(e->ip);
	sa.sin_port = htons(e->port);
	return sa;
}

static bool link_sockaddr_eq(const struct sockaddr_in *a, const struct sockaddr_in *b)
{
	return a->sin_addr.s_addr == b->sin_addr.s_addr && a->sin_port == b->sin_port;
}

/* "udp://127.0.0.1:4000 (3f2a1b2c4d5e)" for log lines. */
/* Where a link's records go: udp://IP:PORT, tcp://IP:PORT or relay://VIA
 * (VIA: the relay's short ring address). */
static void link_uri(const struct link *l, char out[40])
{
	char via[13];
	if (l->proto == PROTO_RELAY) {
		link_addr_short(&l->relay_via, via);
		snprintf(out, 40, "relay://%s", via);
		return;
	}
	struct endpoint e = link_endpoint_of(l->proto, &l->remote);
	link_endpoint_uri(&e, out);
}

static void link_describe(const struct link *l, char out[64])
{
	char uri[40], id[13] = "?";
	link_uri(l, uri);
	if (l->peer_known)
		link_addr_short(&l->peer.addr, id);
	snprintf(out, 64, "%s (%s)", uri, id);
}

static void link_drop(struct link *l, enum drop_reason why)
{
	char who[64];
	link_describe(l, who);
	log_drop(&l->node->drops, why, ev_now(&l->node->loop), who);
}

static void link_drop_from(struct node *n, enum drop_reason why, uint8_t proto,
			   const struct sockaddr_in *from)
{
	char who[40];
	struct endpoint e = link_endpoint_of(proto, from);
	link_endpoint_uri(&e, who);
	log_drop(&n->drops, why, ev_now(&n->loop), who);
}

/* ---- the overlay never carries itself ------------------------------------
 * A link whose underlay address lies inside the virtual network would run
 * through ipop itself: its packets enter our tap, are routed over the very
 * links the ring is made of, and it dies with any of them, taking relays
 * and routes along (a wildcard listener once advertised the tap's own
 * address, and peers dialled it).  So no such address is advertised,
 * learnt, accepted or dialled: one of the virtual network (--ip's prefix),
 * a virtual IP we hold or route for, a linked peer's virtual IP; nor, with an interface of ours, an address whose kernel
 * route leaves through that interface (a route the user added into the
 * overlay).  A router-only node knows no prefix; the others' checks cover it. */
static bool link_overlay_ip(const struct node *n, uint32_t ip)
{
	if (!ip)
		return false;
	if ((n->ip.mask && (ip & n->ip.mask) == n->ip.net) || ip == n->self.vip)
		return true;
	for (unsigned i = 0; i < n->ip.n_routes; i++) {
		uint32_t mask = n->ip.routes[i].len ? ~0u << (32 - n->ip.routes[i].len) : 0;
		if ((ip & mask) == n->ip.routes[i].net)
			return true;
	}
	for (const struct link *l = n->links; l; l = l->next)
		if (l->peer_known && l->peer.vip == ip)
			return true;
	return false;
}

/* Would a datagram to ip leave through our own tap?  The kernel's answer:
 * the source address a connected UDP socket gets is the interface's. */
static bool link_route_via_tap(const struct node *n, uint32_t ip)
{
	if (!n->ip.local || n->tap.fd < 0 || !n->self.vip)
		return false;
	struct sockaddr_in to = link_sockaddr_of(&(struct endpoint){ PROTO_UDP, ip, 9 }), src;
	socklen_t sl = sizeof src;
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	bool via = fd >= 0 && connect(fd, (struct sockaddr *)&to, sizeof to) == 0 &&
		   getsockname(fd, (struct sockaddr *)&src, &sl) == 0 &&
		   link_overlay_ip(n, ntohl(src.sin_addr.s_addr));
	if (fd >= 0)
		close(fd);
	return via;
}

/* May a link run to or from this underlay address?  Counted when not. */
static bool link_underlay_ok(struct node *n, uint8_t proto, const struct sockaddr_in *sa)
{
	uint32_t ip = ntohl(sa->sin_addr.s_addr);
	if (!link_overlay_ip(n, ip) && !link_route_via_tap(n, ip))
		return true;
	link_drop_from(n, DROP_OVERLAY_ENDPOINT, proto, sa);
	return false;
}

/* Drop the endpoints a peer advertised inside the overlay (an older node
 * may still send them), so we neither dial nor pass them on. */
static void link_scrub_endpoints(const struct node *n, struct peer_info *pi)
{
	uint8_t k = 0;
	for (uint8_t i = 0; i < pi->n_endpoints; i++)
		if (!link_overlay_ip(n, pi->endpoints[i].ip) && pi->endpoints[i].ip != pi->vip)
			pi->endpoints[k++] = pi->endpoints[i];
	pi->n_endpoints = k;
}

/* Our receiver index is ours to choose: its low bits name the link's slot
 * in n->link_slots, the high bits are random.  Every record names its link
 * with one array read instead of a walk over the link list, which was a
 * third of a large simulation's time (a node holds ~20 links spread over
 * memory: a cache miss each).  LINK_TABLE_MAX links fit the bits; 20 bits
 * stay random, and records authenticate anyway. */
enum { LINK_SLOT_MASK = LINK_TABLE_MAX - 1, LINK_SLOTS_MIN = 16 };
_Static_assert((LINK_TABLE_MAX & LINK_SLOT_MASK) == 0, "LINK_TABLE_MAX is a power of two");

static struct link *link_slot_of(struct node *n, uint32_t idx)
{
	uint32_t i = idx & LINK_SLOT_MASK;
	struct link *l = i < n->n_link_slots ? n->link_slots[i] : NULL;
	return l && l->local_idx == idx ? l : NULL;
}

/* Every link of n, closed ones not yet reaped included, in slot order, for
 * scans whose answer does not depend on the order.  The slot table is an
 * array of pointers: the CPU fetches several links at once, where following
 * next pointers waits for each link's cache miss in turn (link_became_up's
 * duplicate check was a ninth of a 20k-node simulation). */
#define link_for_each(n, l)                                                          \
	for (unsigned link_each_i_ = 0; link_each_i_ < (n)->n_link_slots; link_each_i_++) \
		if (!((l) = (n)->link_slots[link_each_i_])) {                             \
		} else

/* A free slot for a new link (growing the table), or -ENOMEM. */
static int link_slot_take(struct node *n, struct link *l)
{
	unsigned i = 0;
	while (i < n->n_link_slots && n->link_slots[i])
		i++;
	if (i == n->n_link_slots) {
		unsigned cap = n->n_link_slots ? n->n_link_slots * 2 : LINK_SLOTS_MIN;
		struct link **t = cap <= LINK_TABLE_MAX ? realloc(n->link_slots, cap * sizeof *t) : NULL;
		if (!t)
			return -ENOMEM;
		memset(t + n->n_link_slots, 0, (cap - n->n_link_slots) * sizeof *t);
		n->link_slots = t;
		n->n_link_slots = cap;
	}
	n->link_slots[i] = l;
	return (int)i;
}

static struct link *link_find_index(struct node *n, uint32_t idx)
{
	struct link *l = link_slot_of(n, idx);
	return l && l->state != LINK_CLOSED ? l : NULL;
}

/* A closed link still taking the peer's messages in flight (LINK_DRAIN_MS). */
static struct link *link_find_draining(struct node *n, uint32_t idx)
{
	struct link *l = link_slot_of(n, idx);
	return l && l->state == LINK_CLOSED && l->drain_until_ms > ev_now(&n->loop) ? l : NULL;
}

/* A live or pending link to the node with this ring address. */
static struct link *link_find_peer(struct node *n, const ring_addr *a, bool up_only)
{
	for (struct link *l = n->links; l; l = l->next) {
		if (l->state == LINK_CLOSED || (up_only && l->state != LINK_UP))
			continue;
		if ((l->peer_known && wire_addr_eq(&l->peer.addr, a)) ||
		    (!l->peer_known && l->expect_set && wire_addr_eq(&l->expect, a)))
			return l;
	}
	return NULL;
}

static bool link_secure(const struct link *l)
{
	return l->node->sec.mode != SEC_INSECURE;
}

/* Handshakes over UDP and relays are retransmitted; TCP delivers or fails. */
static bool link_lossy(const struct link *l)
{
	return l->proto != PROTO_TCP;
}

static int64_t link_timer_fn(struct ev_loop *loop, struct ev_timer *t);

static struct link *link_new(struct node *n, uint8_t proto, int fd,
			     const struct sockaddr_in *remote, bool initiator)
{
	if (n->n_links >= LINK_TABLE_MAX)
		return NULL;
	struct link *l = calloc(1, sizeof *l);
	if (!l)
		return NULL;
	if (proto == PROTO_TCP && !(l->tcp = calloc(1, sizeof *l->tcp))) {
		free(l);
		return NULL;
	}
	if (!(l->hs.s = calloc(1, sizeof *l->hs.s)) ||
	    (n->sec.mode != SEC_INSECURE && !(l->keys = calloc(1, sizeof *l->keys))) ||
	    (n->sec.mode == SEC_CERT && !(l->grant = calloc(1, sizeof *l->grant)))) {
		free(l->hs.s);
		free(l->keys);
		free(l->tcp);
		free(l);
		return NULL;
	}
	l->node = n;
	l->proto = proto;
	l->fd = fd;
	l->remote = *remote;
	l->initiator = initiator;
	l->rtt_ms = -1;
	l->rtt_floor_ms = -1;
	l->created_ms = ev_now(&n->loop);
	int slot = link_slot_take(n, l);
	if (slot < 0) {
		free(l->hs.s);
		free(l->keys);
		free(l->grant);
		free(l->tcp);
		free(l);
		return NULL;
	}
	do
		l->local_idx = ((uint32_t)sec_random_u64(&n->rng) & ~(uint32_t)LINK_SLOT_MASK) | (uint32_t)slot;
	while (l->local_idx == 0);
	ev_timer_init(&l->timer, link_timer_fn);
	l->next = n->links;
	n->links = l;
	n->n_links++;
	return l;
}

static void link_hs_wipe(struct link *l)
{
	free(l->hs.cached);
	if (l->hs.s)
		sec_wipe(l->hs.s, sizeof *l->hs.s);
	free(l->hs.s);
	memset(&l->hs, 0, sizeof l->hs);
}

static void link_tcp_close_fd(struct link *l)
{
	if (l->fd < 0)
		return;
	ev_fd_forget(&l->node->loop, l->fd);
	close(l->fd);
	l->fd = -1;
}

static void link_tx_flush(struct node *n);

/* Free closed links; called once per loop turn, after every callback, so a
 * handler may close any link, its own included, without a use-after-free. */
static void link_reap(struct node *n)
{
	link_tx_flush(n);       /* the end of a loop turn: what it queued leaves now */
	uint64_t now = ev_now(&n->loop);
	if (!n->reap_pending && (!n->reap_drain_ms || now < n->reap_drain_ms))
		return;         /* most turns close nothing: no walk over every link */
	n->reap_pending = false;        /* (a drain is 2 s: walking on every turn */
	n->reap_drain_ms = 0;           /* until it ended was a tenth of a 100k run) */
	for (struct link **pp = &n->links; *pp;) {
		struct link *l = *pp;
		if (l->state != LINK_CLOSED || l->drain_until_ms > now) {
			if (l->state == LINK_CLOSED && (!n->reap_drain_ms || l->drain_until_ms < n->reap_drain_ms))
				n->reap_drain_ms = l->drain_until_ms;
			pp = &l->next;
			continue;
		}
		*pp = l->next;
		n->n_links--;
		if (link_slot_of(n, l->local_idx) == l)
			n->link_slots[l->local_idx & LINK_SLOT_MASK] = NULL;
		if (l->proto == PROTO_TCP)
			link_tcp_close_fd(l);   /* a drain that ran out */
		link_hs_wipe(l);
		if (l->keys)
			sec_wipe(l->keys, sizeof *l->keys);
		free(l->keys);
		free(l->grant);
		if (l->tcp)
			free(l->tcp->wq);
		free(l->tcp);
		free(l);
	}
}

/* A node's end of a loop turn (ev_loop.turn_end): IP's deferred local
 * writes first (they may make lwIP send), then the send batch leaves and
 * closed links are freed. */
static void link_turn_end(struct ev_loop *loop)
{
	struct node *n = container_of(loop, struct node, loop);
	if (n->up.flush_local)
		n->up.flush_local(n);
	link_reap(n);
}

/* Free every link, draining ones too, and the slot table: the node goes. */
static void link_free_all(struct node *n)
{
	for (struct link *l = n->links; l; l = l->next) {
		l->state = LINK_CLOSED;
		l->drain_until_ms = 0;
	}
	n->reap_pending = true;
	n->n_unproven = 0;
	free(n->unproven);
	n->unproven = NULL;
	link_reap(n);
	free(n->link_slots);
	n->link_slots = NULL;
	free(n->hs_bucket);
	n->hs_bucket = NULL;
	n->n_link_slots = 0;
}

/* ---- sending ---------------------------------------------------------- */

static void link_tcp_watch(struct link *l);

/* Write queued TCP bytes; keep the rest for EPOLLOUT.  0, or -errno. */
static int link_tcp_flush(struct link *l)
{
	struct link_tcp *t = l->tcp;
	while (t->wq_off < t->wq_len) {
		ssize_t w = send(l->fd, t->wq + t->wq_off, t->wq_len - t->wq_off, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		if (w < 0)
			return -errno;
		t->wq_off += (size_t)w;
	}
	if (t->wq_off == t->wq_len)
		t->wq_off = t->wq_len = 0;
	link_tcp_watch(l);
	return 0;
}

static int link_tcp_enqueue(struct link *l, const uint8_t *pkt, size_t len)
{
	struct link_tcp *t = l->tcp;
	size_t need = t->wq_len + WIRE_TCP_FRAME_HDR_BYTES + len;
	if (need - t->wq_off > LINK_TCP_WQUEUE_BYTES)
		return -ENOBUFS;
	if (need > t->wq_cap) {
		if (t->wq_off) {        /* slide the unsent tail to the front first */
			memmove(t->wq, t->wq + t->wq_off, t->wq_len - t->wq_off);
			t->wq_len -= t->wq_off;
			t->wq_off = 0;
			need = t->wq_len + WIRE_TCP_FRAME_HDR_BYTES + len;
		}
		size_t cap = t->wq_cap ? t->wq_cap : 4096;
		while (cap < need)
			cap *= 2;
		uint8_t *q = realloc(t->wq, cap);
		if (!q)
			return -ENOMEM;
		t->wq = q;
		t->wq_cap = cap;
	}
	t->wq[t->wq_len] = (uint8_t)(len >> 8);
	t->wq[t->wq_len + 1] = (uint8_t)len;
	memcpy(t->wq + t->wq_len + 2, pkt, len);
	t->wq_len += WIRE_TCP_FRAME_HDR_BYTES + len;
	/* Written at the end of the loop turn (link_tx_flush), with the rest of
	 * the turn's frames: one send() for many records. */
	l->node->tcp_pending = true;
	return 0;
}

/* ---- batching ----------------------------------------------------------
 * A loop turn that reads 64 frames from the tap device must not make 64
 * sendto calls: UDP records are queued and leave in one sendmmsg at the end
 * of the turn (link_reap), or when the queue fills.  Consecutive records of
 * one size to one address share a message with UDP_SEGMENT (GSO), so the
 * kernel's UDP and IP layers run once for the lot.  A record larger than
 * 1472 bytes (a RELAY) goes alone: GSO segments may not be fragmented. */

static void link_tx_drop(struct node *n, unsigned count)
{
	for (unsigned i = 0; i < count; i++)
		log_drop(&n->drops, DROP_TX_ERROR, ev_now(&n->loop), "udp send");
}

/* A message the kernel refused as GSO: its segments one by one. */
static void link_tx_unbatch(struct node *n, unsigned i)
{
	struct link_tx *t = n->tx;
	const uint8_t *p = t->iov[i].iov_base;
	size_t left = t->iov[i].iov_len;
	while (left) {
		size_t len = left < t->seg[i] ? left : t->seg[i];
		if (sendto(t->fd[i], p, len, MSG_DONTWAIT, (struct sockaddr *)&t->to[i], sizeof t->to[i]) < 0)
			link_tx_drop(n, 1);
		p += len;
		left -= len;
	}
}

/* The kernel refused a UDP_SEGMENT message: after a few, send datagrams
 * one by one for good (said once: it halves what a link can carry). */
static void link_tx_gso_refused(struct node *n, int err)
{
	struct link_tx *t = n->tx;
	if (++t->gso_refusals < LINK_GSO_REFUSALS_MAX || t->no_gso)
		return;
	t->no_gso = true;
	log_warn("link", "the kernel refuses UDP segmentation offload (%s): sending datagrams one by one",
		 strerror(err));
}

/* Write every TCP link's queued frames (those still connecting wait). */
static void link_tcp_flush_all(struct node *n)
{
	n->tcp_pending = false;
	for (struct link *l = n->links; l; l = l->next)
		if (l->proto == PROTO_TCP && l->state != LINK_CLOSED && l->state != LINK_CONNECTING &&
		    l->tcp->wq_len > l->tcp->wq_off && !l->tcp->want_writable && link_tcp_flush(l) < 0)
			link_drop(l, DROP_TX_ERROR);    /* the stream's error event closes it */
}

/* Send everything queued: one sendmmsg per run of one socket. */
/* Errors the socket reports once to the next send or receive (sk_err):
 * with IP_RECVERR, an ICMP error an earlier datagram provoked (section 06). */
static bool link_udp_soft_error(int e)
{
	return e == ECONNREFUSED || e == EHOSTUNREACH || e == ENETUNREACH || e == EHOSTDOWN;
}

/* One system call for a batch.  musl's sendmmsg is a loop of sendmsg calls
 * on 64-bit hosts, since its msghdr pads int fields where the kernel has
 * size_t ones (a user-mode download sent 61,000 ACK datagrams a second,
 * each its own call).  Our headers are built with their padding zeroed, and
 * on a little-endian host the layouts then agree. */
static int link_sendmmsg(int fd, struct mmsghdr *m, unsigned n, int flags)
{
#if defined(SYS_sendmmsg) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	return (int)syscall(SYS_sendmmsg, fd, m, n, flags);
#else
	return sendmmsg(fd, m, n, flags);
#endif
}

static void link_tx_flush(struct node *n)
{
	if (n->tcp_pending)
		link_tcp_flush_all(n);
	struct link_tx *t = n->tx;
	if (!t)
		return;
	for (unsigned i = 0; i < t->n; i++) {
		struct msghdr *h = &t->msgs[i].msg_hdr;
		*h = (struct msghdr){ .msg_name = &t->to[i], .msg_namelen = sizeof t->to[i],
				      .msg_iov = &t->iov[i], .msg_iovlen = 1 };
		if (t->iov[i].iov_len > t->seg[i]) {
			h->msg_control = t->cmsg[i].buf;
			h->msg_controllen = sizeof t->cmsg[i].buf;
			memset(t->cmsg[i].buf, 0, sizeof t->cmsg[i].buf);     /* padding too: link_sendmmsg */
			struct cmsghdr *c = CMSG_FIRSTHDR(h);
			c->cmsg_level = SOL_UDP;
			c->cmsg_type = UDP_SEGMENT;
			c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
			memcpy(CMSG_DATA(c), &t->seg[i], sizeof(uint16_t));
		}
	}
	int soft = 0;
	for (unsigned i = 0; i < t->n;) {
		unsigned end = i;
		while (end < t->n && t->fd[end] == t->fd[i])
			end++;
		while (i < end) {
			int r = link_sendmmsg(t->fd[i], &t->msgs[i], end - i, MSG_DONTWAIT);
			if (r > 0) {
				i += (unsigned)r;
			} else if (r < 0 && (errno == EINTR || (link_udp_soft_error(errno) && soft++ < 8))) {
				continue;       /* an ICMP error from an earlier datagram, reported here once */
			} else if (t->iov[i].iov_len > t->seg[i] && (errno == EIO || errno == EINVAL ||
								   errno == ENOPROTOOPT)) {
				link_tx_gso_refused(n, errno);  /* an old kernel, or a path MTU below a segment */
				link_tx_unbatch(n, i++);
			} else {
				link_tx_drop(n, 1);     /* a full buffer drops, as sendto would */
				i++;
			}
		}
	}
	t->n = 0;
	t->used = 0;
}

/* Room for a datagram of len bytes in the batch, taken: at the end of the
 * last message's GSO train when it fits there, else as a new message.
 * The caller writes the datagram there before anything else is queued.
 * NULL: simulated (section 15b) or no memory for a batch. */
static uint8_t *link_udp_slot(struct node *n, int fd, const struct sockaddr_in *to, size_t len)
{
	if (n->udp_send)
		return NULL;
	if (!n->tx)
		n->tx = calloc(1, sizeof *n->tx);
	struct link_tx *t = n->tx;
	if (!t || (!t->buf && !(t->buf = malloc(LINK_BATCH * WIRE_MAX_WIRE_BYTES))))
		return NULL;
	uint8_t *at = t->buf + t->used;
	if (t->n) {
		unsigned i = t->n - 1;
		if (!t->no_gso && !t->ended[i] && t->fd[i] == fd && len <= t->seg[i] &&
		    t->seg[i] <= WIRE_MAX_RECORD_BYTES && t->iov[i].iov_len + len <= LINK_GSO_MAX_BYTES &&
		    t->iov[i].iov_len < (size_t)t->seg[i] * LINK_GSO_MAX_SEGS &&
		    t->used + len <= LINK_BATCH * WIRE_MAX_WIRE_BYTES && link_sockaddr_eq(&t->to[i], to)) {
			t->used += len;
			t->iov[i].iov_len += len;
			t->ended[i] = len < t->seg[i];
			return at;
		}
	}
	if (t->n == LINK_BATCH || t->used + len > LINK_BATCH * WIRE_MAX_WIRE_BYTES) {
		link_tx_flush(n);
		at = t->buf + t->used;
	}
	unsigned i = t->n++;
	t->iov[i] = (struct iovec){ at, len };
	t->used += len;
	t->fd[i] = fd;
	t->to[i] = *to;
	t->seg[i] = (uint16_t)len;
	t->ended[i] = false;
	return at;
}

/* Queue one datagram; 0, or -errno. */
static int link_udp_queue(struct node *n, int fd, const struct sockaddr_in *to, const uint8_t *pkt,
			  size_t len)
{
	if (n->udp_send)        /* simulated (section 15b): no socket, no batch */
		return n->udp_send(n, to, pkt, len);
	uint8_t *slot = link_udp_slot(n, fd, to, len);
	if (slot) {
		memcpy(slot, pkt, len);
		return 0;
	}
	ssize_t w = sendto(fd, pkt, len, MSG_DONTWAIT, (const struct sockaddr *)to, sizeof *to);
	return w < 0 ? -errno : 0;
}

/* One datagram with a TTL of its own (a punch, section 09), past the batch:
 * the TTL rides in a cmsg, since the socket serves every link. */
static void link_udp_send_ttl(struct node *n, int fd, const struct sockaddr_in *to, const uint8_t *pkt,
			      size_t len, int ttl)
{
	if (n->udp_send) {      /* simulated: no TTL */
		n->udp_send(n, to, pkt, len);
		return;
	}
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} ctl;
	memset(&ctl, 0, sizeof ctl);
	struct iovec iov = { (void *)pkt, len };
	struct msghdr m = { .msg_name = (void *)to, .msg_namelen = sizeof *to, .msg_iov = &iov, .msg_iovlen = 1,
			    .msg_control = ctl.buf, .msg_controllen = sizeof ctl.buf };
	struct cmsghdr *c = CMSG_FIRSTHDR(&m);
	c->cmsg_level = IPPROTO_IP;
	c->cmsg_type = IP_TTL;
	c->cmsg_len = CMSG_LEN(sizeof ttl);
	memcpy(CMSG_DATA(c), &ttl, sizeof ttl);
	for (int soft = 0; sendmsg(fd, &m, MSG_DONTWAIT) < 0; soft++)
		if (errno != EINTR && (!link_udp_soft_error(errno) || soft >= 8)) {
			link_tx_drop(n, 1);
			return;
		}
}

static int link_send(struct link *l, const uint8_t *msg, size_t len);

/* A direct up link to this peer: the only kind that may carry relays. */
static struct link *link_find_direct(struct node *n, const ring_addr *a)
{
	for (struct link *l = n->links; l; l = l->next)
		if (l->state == LINK_UP && l->proto != PROTO_RELAY && wire_addr_eq(&l->peer.addr, a))
			return l;
	return NULL;
}

static void link_relay_sent(struct link *l);

/* A relayed link's record goes to its relay inside a RELAY message. */
static int link_relay_send(struct link *l, const uint8_t *pkt, size_t len)
{
	struct link *via = link_find_direct(l->node, &l->relay_via);
	link_relay_sent(l);
	if (!via)
		return -ENETUNREACH;    /* the keepalive will notice and move or close us */
	struct wire_relay m = { .addr = l->peer_known ? l->peer.addr : l->expect, .rec = pkt, .len = len };
	uint8_t msg[WIRE_MAX_MSG_BYTES];
	ssize_t mlen = wire_relay_encode(msg, sizeof msg, WIRE_RELAY, &m);
	if (mlen < 0)
		return -EMSGSIZE;
	via->relay_last_ms = ev_now(&l->node->loop);
	return link_send(via, msg, (size_t)mlen);
}

/* Put bytes on the wire as they are; a failure is counted, never fatal. */
/* Count a datagram sent, or its failure; returns rc. */
static int link_sent(struct link *l, int rc, size_t len)
{
	if (rc == 0) {
		l->tx_packets++;
		l->tx_bytes += len;
	} else {
		link_drop(l, rc == -ENOBUFS ? DROP_TX_QUEUE_FULL : DROP_TX_ERROR);
	}
	return rc;
}

static int link_send_raw(struct link *l, const uint8_t *pkt, size_t len)
{
	int rc;
	if (l->state == LINK_CLOSED)
		return -ENOTCONN;
	if (l->proto == PROTO_UDP) {
		rc = link_udp_queue(l->node, l->fd, &l->remote, pkt, len);
	} else if (l->proto == PROTO_RELAY) {
		rc = link_relay_send(l, pkt, len);
	} else {
		rc = link_tcp_enqueue(l, pkt, len);
	}
	return link_sent(l, rc, len);
}

/* Where link_send builds a record of len bytes: straight in the UDP batch
 * when the link has one (a copy per record saved), else in the caller's
 * buffer, for link_send_raw. */
static uint8_t *link_record_at(struct link *l, size_t len, uint8_t *own)
{
	uint8_t *slot = l->proto == PROTO_UDP ? link_udp_slot(l->node, l->fd, &l->remote, len) : NULL;
	return slot ? slot : own;
}

/* Ratchet the send key: k' = HKDF-Expand(k, "rekey").  The old key is gone,
 * so records sent before cannot be decrypted from a later compromise. */
static void link_rekey_tx(struct link *l)
{
	uint64_t now = ev_now(&l->node->loop);
	if (now - l->keys->tx_epoch_ms < l->node->rekey_ms)
		return;
	uint8_t next[SEC_KEY_BYTES];
	sec_expand(l->keys->tx, "ipop-v2 rekey", NULL, next);
	memcpy(l->keys->tx, next, sizeof next);
	sec_wipe(next, sizeof next);
	l->keys->tx_epoch++;
	l->keys->tx_epoch_ms = now;
}

/* Send one message on an up link inside a DATA record. */
static int link_send(struct link *l, const uint8_t *msg, size_t len)
{
	uint8_t rec[WIRE_MAX_WIRE_BYTES];
	if (l->state != LINK_UP)
		return -ENOTCONN;
	if (len > (l->proto == PROTO_RELAY ? WIRE_MAX_PACKET_BYTES : WIRE_MAX_MSG_BYTES)) {
		link_drop(l, DROP_TOO_BIG);
		return -EMSGSIZE;       /* relayed records must fit inside a RELAY */
	}
	bool secure = link_secure(l);
	if (secure)
		link_rekey_tx(l);
	size_t rec_len = WIRE_DATA_HDR_BYTES + len + (secure ? sec_tag_bytes(l->keys->cipher) : 0);
	uint8_t *at = link_record_at(l, rec_len, rec);
	struct wire_data d = { .receiver = l->peer_idx, .epoch = secure ? (uint8_t)l->keys->tx_epoch : 0,
			       .counter = l->tx_counter++ };
	wire_data_header_put(at, &d);
	if (secure)
		sec_seal(l->keys->cipher, l->keys->tx, l->keys->tx_epoch, d.counter, at, WIRE_DATA_HDR_BYTES,
			 msg, len, at + WIRE_DATA_HDR_BYTES);
	else
		memcpy(at + WIRE_DATA_HDR_BYTES, msg, len);
	return at == rec ? link_send_raw(l, rec, rec_len) : link_sent(l, 0, rec_len);
}

static int link_send_byte(struct link *l, uint8_t type, uint8_t v)
{
	uint8_t pkt[8];
	ssize_t len = wire_byte_encode(pkt, sizeof pkt, type, v);
	return len < 0 ? -EMSGSIZE : link_send(l, pkt, (size_t)len);
}

static void link_send_ping(struct link *l, uint8_t type, uint32_t seq, uint64_t t_us)
{
	struct wire_ping m = { .seq = seq, .t_us = t_us };
	uint8_t pkt[32];
	ssize_t len = wire_ping_encode(pkt, sizeof pkt, type, &m);
	if (len > 0)
		link_send(l, pkt, (size_t)len);
}

/* Keep a copy of a handshake packet we may have to send again. */
static void link_hs_cache(struct link *l, const uint8_t *pkt, size_t len)
{
	free(l->hs.cached);
	l->hs.cached = malloc(len);
	l->hs.cached_len = l->hs.cached ? len : 0;
	if (l->hs.cached)
		memcpy(l->hs.cached, pkt, len);
	l->hs.cached_until_ms = ev_now(&l->node->loop) + LINK_FIN_CACHE_MS;
}

static void link_hs_resend(struct link *l)
{
	if (l->hs.cached && ev_now(&l->node->loop) < l->hs.cached_until_ms)
		link_send_raw(l, l->hs.cached, l->hs.cached_len);
}

/* ---- contacts -------------------------------------------------------------
 * A NAT or stateful firewall lets a stranger's first packet in only through
 * a hole we opened by sending to it.  So that the ring can tell a link a
 * peer began unasked (ring_reachable) from one that came through our hole,
 * the link layer remembers, once asked to (link_contacts_start), the
 * addresses it sent a dial or probe to, or had a link with, for longer than
 * a NAT keeps a hole.  A direct-mapped table: a collision forgets an older
 * address, which can only make a node think itself less reachable. */
static bool link_contacts_start(struct node *n)
{
	return n->contacts || (n->contacts = calloc(LINK_CONTACT_SLOTS, sizeof *n->contacts));
}

static struct link_contact *link_contact_slot(struct node *n, const struct sockaddr_in *sa)
{
	uint64_t h = ((uint64_t)sa->sin_addr.s_addr << 16 | sa->sin_port) * 0x9E3779B97F4A7C15ull;
	return &n->contacts[h >> 56];   /* the top 8 bits: LINK_CONTACT_SLOTS = 256 */
}

static void link_note_contact(struct node *n, const struct sockaddr_in *to)
{
	if (n->contacts)
		*link_contact_slot(n, to) = (struct link_contact){ .ip = to->sin_addr.s_addr,
								   .port = to->sin_port, .ms = ev_now(&n->loop) };
}

static bool link_contacted(struct node *n, const struct sockaddr_in *sa)
{
	const struct link_contact *c = n->contacts ? link_contact_slot(n, sa) : NULL;
	return c && c->ms && c->ip == sa->sin_addr.s_addr && c->port == sa->sin_port &&
	       ev_now(&n->loop) - c->ms < LINK_CONTACT_MS;
}

/* ---- teardown ----------------------------------------------------------- */

static void link_relays_lost(struct node *n, const ring_addr *via);

/* An accepted TCP link came up or goes: it is no longer unproven. */
static void link_unproven_forget(struct node *n, struct link *l)
{
	if (l->proto != PROTO_TCP || l->initiator)
		return;
	for (unsigned i = 0; i < n->n_unproven; i++)
		if (n->unproven[i] == l) {
			n->n_unproven--;
			memmove(&n->unproven[i], &n->unproven[i + 1], (n->n_unproven - i) * sizeof *n->unproven);
			return;
		}
}

static void link_tcp_event(struct ev_loop *loop, int fd, void *arg, uint32_t events);
static int link_tcp_flush(struct link *l);

/* A TCP link we closed with a BYE: once the BYE (and all queued before it)
 * is written, say so with a FIN; meanwhile and after, read what the peer
 * still sends (link_tcp_drain_event). */
static void link_tcp_drain_watch(struct link *l)
{
	struct link_tcp *t = l->tcp;
	bool queued = t->wq_off < t->wq_len;
	if (!queued)
		shutdown(l->fd, SHUT_WR);
	ev_fd_watch(&l->node->loop, l->fd, EPOLLIN | (queued ? EPOLLOUT : 0), link_tcp_event, l);
}

static void link_tcp_drain_start(struct link *l)
{
	if (link_tcp_flush(l) < 0) {
		l->drain_until_ms = 0;
		return link_tcp_close_fd(l);
	}
	link_tcp_drain_watch(l);
}

/* A responder link a stranger's HS_INIT made, until it is up or closed
 * (LINK_HALF_OPEN_MAX, link_half_open_make_room). */
static void link_half_open_end(struct link *l)
{
	if (!l->half_open)
		return;
	l->half_open = false;
	l->node->n_half_open--;
}

static void link_half_open_begin(struct link *l)
{
	l->half_open = true;
	l->node->n_half_open++;
}

/* Tear a link down.  A BYE goes out only on an up link, and only when the
 * peer did not close first: a peer that never finished the handshake holds
 * no state worth telling.  reason 0 means the link failed (dead, reset). */
static void link_teardown(struct link *l, uint8_t reason, bool tell_peer)
{
	if (l->state == LINK_CLOSED)
		return;
	bool was_up = l->state == LINK_UP;
	struct node *n = l->node;
	link_unproven_forget(n, l);
	if (l->proto == PROTO_UDP && !l->half_open)     /* (a stranger's unfinished dial is no contact) */
		link_note_contact(n, &l->remote);       /* our records kept its hole open */
	link_half_open_end(l);
	if (was_up && tell_peer && reason)
		link_send_byte(l, WIRE_BYE, reason);
	/* Only a link that gives way to another (a duplicate, one no role
	 * needs) drains: a revoked, expired or conflicting peer's stragglers
	 * are not routed on, and a leaving node is gone. */
	if (was_up && tell_peer && (reason == BYE_DUPLICATE || reason == BYE_UNNEEDED))
		l->drain_until_ms = ev_now(&n->loop) + LINK_DRAIN_MS;
	l->state = LINK_CLOSED;
	n->links_gen++;
	n->reap_pending = true;
	ev_timer_cancel(&n->loop, &l->timer);
	if (l->proto == PROTO_TCP && l->fd >= 0 && l->drain_until_ms)
		link_tcp_drain_start(l);
	else if (l->proto == PROTO_TCP)
		link_tcp_close_fd(l);
	if (was_up && n->up.link_down)
		n->up.link_down(n, l, reason);
	if (l->proto != PROTO_RELAY && l->peer_known)
		link_relays_lost(n, &l->peer.addr);
}

static void link_close(struct link *l, uint8_t reason)
{
	link_teardown(l, reason, true);
}

/* Milliseconds to the node's next keepalive tick.  Every link of a node
 * pings on the same 1 s grid (its phase set by the node's start time), so
 * the node wakes once per second for all of them, not once per link: with
 * a thousand processes on two cores, wake-ups are most of an idle node's
 * cost (docs/SCALING.md). */
static int64_t link_keepalive_delay(const struct node *n)
{
	uint64_t now = ev_now(&n->loop);
	return (int64_t)(LINK_KEEPALIVE_MS - (now - n->start_ms) % LINK_KEEPALIVE_MS);
}

/* An ICMP "port unreachable" for the peer came after the last record from
 * it (link_udp_errors): the link counts as quiet and is asked again. */
static bool link_refused_pending(const struct link *l)
{
	return l->refused_ms && l->refused_ms >= l->last_rx_ms;
}

/* ---- relay roaming --------------------------------------------------------
 * A relay keeps no state for the links it carries, so a relayed link can
 * change relays without a new handshake: its records only need another
 * peer that both ends link directly.  When our link to a relay closes, or
 * its host refuses a datagram (ICMP, link_refused), or the relay or the
 * relayed link goes quiet (keepalive tick), or a relayed link that carries
 * traffic hears nothing for two round trips and a margin (link_relay_sent),
 * the relayed link sends a PING through every other peer we link directly
 * and heard from lately (LINK_RELAY_PROBES_MAX at most); those that also
 * link the far end pass it on.  Each end sends through the relay of the
 * newest record it authenticated (link_relay_follow), as a UDP link follows
 * its peer's address, so both settle within a round trip on a relay that
 * carries both ways, keys and indices unchanged.  Closing the link and
 * making it again through the ring took 3.5-6.5 s.  Two ends that move at
 * once to different relays settle on one (link_relay_follow).  A relay
 * that replays or forges a record moves nothing: records authenticate end
 * to end.  No timer is added: the
 * checks ride on the keepalive tick and on records sent. */

enum {
	/* Peers a failing relayed link tries at once.  A node links ~20
	 * peers; the ones both ends of a relayed link share are the few public
	 * nodes and ring neighbours around them.  8 PINGs of 45 bytes, once a
	 * failure (a quiet link: once a keepalive tick until it is dead). */
	LINK_RELAY_PROBES_MAX = 8,
	/* A relayed link that carries traffic and heard nothing for two round
	 * trips and this much more asks through other relays (link_relay_sent).
	 * A peer answers a ping, a TCP segment or a request within a round trip;
	 * 300 ms more covers a busy peer's scheduling, and leaves room in the
	 * second a failover may take for the probes' round trip. */
	LINK_UNHEARD_MARGIN_MS = 300,
};

/* Heard from within LINK_QUIET_MS, and no ICMP refusal since. */
static bool link_heard_lately(const struct link *l)
{
	return ev_now(&l->node->loop) - l->last_rx_ms <= LINK_QUIET_MS && !link_refused_pending(l);
}

/* Could d carry the records of the relayed link l?  A direct up link to
 * neither end of l, heard from lately. */
static bool link_relay_candidate(const struct link *l, const struct link *d)
{
	return d->state == LINK_UP && d->proto != PROTO_RELAY && d->peer_known &&
	       !wire_addr_eq(&d->peer.addr, &l->peer.addr) && link_heard_lately(d);
}

/* PING the far end of l through each candidate relay.  l's records keep
 * their relay if it is still a candidate, else go through the first one
 * until an answer names the relay that carries (link_relay_follow).  why
 * goes in an info line, or NULL for a debug line (a busy link that heard
 * nothing for a moment asks often).  Returns the number of candidates tried. */
static unsigned link_relay_roam(struct link *l, const char *why)
{
	struct node *n = l->node;
	ring_addr was = l->relay_via, first = was;
	bool keep = false;
	unsigned tried = 0;
	struct link *d;
	char who[64];
	if (l->state != LINK_UP)
		return 0;
	l->unheard_ms = ev_now(&n->loop);       /* the probes start link_relay_sent's clock again */
	link_describe(l, who);
	link_for_each(n, d) {
		if (tried == LINK_RELAY_PROBES_MAX || !link_relay_candidate(l, d))
			continue;
		keep |= wire_addr_eq(&d->peer.addr, &was);
		if (!tried++)
			first = d->peer.addr;
		l->relay_via = d->peer.addr;
		link_send_ping(l, WIRE_PING, ++l->ping_seq, ev_now_us(&n->loop));
	}
	l->relay_via = keep ? was : first;
	if (tried)
		log_msg(why ? LOG_INFO : LOG_DEBUG, "link", "%s: %s; asking through %u peer%s", who,
			why ? why : "nothing heard lately", tried, tried == 1 ? "" : "s");
	return tried;
}

/* A record of the relayed link l with this counter authenticated, and came
 * through the relay link_relay_input noted.  If it is the newest the far end
 * sent (the highest counter yet, not one overtaken on the way), that relay
 * is the one the far end uses now: our records go back the same way.  Two
 * ends that both follow at once trade relays for ever (a record of each
 * crosses the other's: seen, a switch every few packets), so the end with
 * the higher ring address follows only once LINK_RELAY_FOLLOW_AFTER of the
 * far end's newest records in a row came through another relay: the lower
 * end follows at once, and both settle on the higher end's relay; if that
 * one does not reach the far end, the higher end moves a few records later
 * (milliseconds on a busy link, seconds of keepalives on an idle one). */
enum { LINK_RELAY_FOLLOW_AFTER = 4 };

static void link_relay_follow(struct link *l, uint64_t counter)
{
	struct node *n = l->node;
	const ring_addr *via = n->relay_rx;
	if (!via || (l->keys && l->keys->replay.top != counter + 1))
		return;
	if (wire_addr_eq(&l->relay_via, via)) {
		l->other_relay_n = 0;
		return;
	}
	if (wire_addr_cmp(&n->self.addr, &l->peer.addr) > 0 && ++l->other_relay_n < LINK_RELAY_FOLLOW_AFTER)
		return;
	l->other_relay_n = 0;
	char who[64], to[13];
	l->relay_via = *via;
	link_describe(l, who);
	link_addr_short(via, to);
	log_debug("link", "%s now relayed through %s", who, to);
}

/* A record of the relayed link l goes out.  If the far end said nothing
 * since our first record after its last one, for two round trips and
 * LINK_UNHEARD_MARGIN_MS more, the path through the relay may be dead
 * (a relay that vanished without an ICMP word, or lost the far end): ask
 * through the other relays at once, instead of waiting LINK_QUIET_MS and
 * a keepalive tick.  Only a link that carries traffic gets here between
 * ticks, so an idle node pays nothing; a one-way flow, which hears only
 * pongs, pays a round of probes every LINK_UNHEARD_MARGIN_MS or so. */
static void link_relay_sent(struct link *l)
{
	uint64_t now = ev_now(&l->node->loop);
	if (l->state != LINK_UP)
		return;
	if (l->unheard_ms <= l->last_rx_ms) {
		l->unheard_ms = now;
		return;
	}
	uint64_t limit = (uint64_t)(2 * (l->rtt_ms > 0 ? l->rtt_ms : 0)) + LINK_UNHEARD_MARGIN_MS;
	if (now - l->unheard_ms >= limit)
		link_relay_roam(l, NULL);
}

/* Should the relayed link l look for another relay?  Its relay's link is
 * gone or quiet, or nothing came through it for LINK_QUIET_MS: the relay
 * may have lost the far end. */
static bool link_relay_failing(const struct link *l)
{
	const struct link *via = link_find_direct(l->node, &l->relay_via);
	return !via || !link_heard_lately(via) || !link_heard_lately(l);
}

/* The relay at via failed: gone (our link to it closed), or its host
 * refused a datagram once (not yet sure).  Its relayed links move to other
 * relays; one with no candidate closes if the relay is gone, or else
 * waits for the refusal to be confirmed. */
static void link_relays_failed(struct node *n, const ring_addr *via, bool gone)
{
	struct link *r;
	link_for_each(n, r)
		if (r->proto == PROTO_RELAY && r->state != LINK_CLOSED && wire_addr_eq(&r->relay_via, via) &&
		    !link_relay_roam(r, gone ? "its relay is gone" : "its relay's host refused a datagram") &&
		    gone)
			link_teardown(r, 0, false);
}

/* Our link to a relay is gone: every link we relayed through it moves or
 * closes.  (A node that relays for others keeps nothing to clean: its part
 * is stateless.) */
static void link_relays_lost(struct node *n, const ring_addr *via)
{
	if (!link_find_direct(n, via))         /* else a duplicate closed; another direct link remains */
		link_relays_failed(n, via, true);
}

/* ---- timers: keepalive, handshake retries ------------------------------- */

/* One end of a link pinging is enough: the other hears the PING, answers
 * it, and skips its own.  Whichever end's tick comes first keeps pinging,
 * so an idle link carries 2 packets a second instead of 4.  The quiet end
 * still notices a dead peer: with no PING in an interval it pings itself,
 * and LINK_DEAD_MS of silence closes the link as before. */
static int64_t link_keepalive(struct link *l)
{
	uint64_t now = ev_now(&l->node->loop);
	if (now - l->last_rx_ms >= LINK_DEAD_MS) {
		char who[64];
		link_describe(l, who);
		log_info("link", "%s dead: silent for %llu ms", who,
			 (unsigned long long)(now - l->last_rx_ms));
		link_close(l, 0);
		return EV_TIMER_STOP;
	}
	/* Both ends ping until each has an RTT, and while the link carries
	 * traffic: routing weighs a busy link's RTT (section 07), and the end
	 * that only answers pings would never measure it. */
	bool busy = l->tx_packets - l->ping_tx_mark > LINK_BUSY_PACKETS;
	l->ping_tx_mark = l->tx_packets;
	if (l->proto == PROTO_RELAY && link_relay_failing(l) && link_relay_roam(l, NULL))
		return link_keepalive_delay(l->node);   /* its probes are this tick's pings */
	bool refused = link_refused_pending(l);
	if (!l->ping_rx_ms || now - l->ping_rx_ms >= LINK_KEEPALIVE_MS || l->rtt_ms < 0 || busy || refused)
		link_send_ping(l, WIRE_PING, ++l->ping_seq, ev_now_us(&l->node->loop));
	return link_keepalive_delay(l->node);
}

static void link_hs_init_send(struct link *l);

static int64_t link_hs_timeout(struct link *l)
{
	uint64_t age = ev_now(&l->node->loop) - l->created_ms;
	/* A responder resends HS_RESP only when the initiator retransmits its
	 * HS_INIT (link_on_hs_init): resending unasked made each HS_INIT an
	 * outsider sent worth six answers. */
	if (link_lossy(l) && l->initiator && ++l->hs.tries < LINK_HELLO_TRIES) {
		link_hs_init_send(l);
		return LINK_HELLO_RETRY_MS;
	}
	if (l->proto == PROTO_TCP && age < LINK_HANDSHAKE_TIMEOUT_MS)
		return (int64_t)(LINK_HANDSHAKE_TIMEOUT_MS - age);
	if (l->initiator)       /* a silent responder: down, or not of our network */
		link_drop(l, DROP_HS_TIMEOUT);
	link_close(l, 0);
	if (l->initiator && l->expect_set && l->node->up.dial_failed)
		l->node->up.dial_failed(l->node, l);
	return EV_TIMER_STOP;
}

static int64_t link_timer_fn(struct ev_loop *loop, struct ev_timer *t)
{
	struct link *l = container_of(t, struct link, timer);
	(void)loop;
	switch (l->state) {
	case LINK_UP:
		return link_keepalive(l);
	case LINK_CONNECTING:
	case LINK_AWAIT_INIT:
	case LINK_AWAIT_RESP:
	case LINK_AWAIT_FIN:
		return link_hs_timeout(l);
	default:
		return EV_TIMER_STOP;
	}
}

/* ---- becoming up ------------------------------------------------------- */

static int link_transport_rank(const struct link *l)
{
	return l->proto == PROTO_UDP ? 2 : l->proto == PROTO_TCP ? 1 : 0;
}

/* The losing link's dial may have wanted a role (a shortcut asked for by
 * connect-to-me): the survivor inherits the wish, so it is not lost. */
static void link_close_duplicate(struct link *loser, struct link *winner)
{
	winner->want_roles |= loser->want_roles;
	link_close(loser, BYE_DUPLICATE);
}

/* Two processes claim one address, and both links are up: which to close.
 * In certificate networks both identities were proven by the certificate
 * (one certificate run twice): the older process keeps the address, as
 * both ends agree.  Elsewhere a claimed start time proves nothing (a member
 * may report 1): the newcomer is refused, unless the old link has gone
 * quiet, when its process most likely died and this is its restart. */
static struct link *link_conflict_loser(struct link *l, struct link *o)
{
	if (l->node->sec.mode != SEC_CERT)
		return link_heard_lately(o) ? l : o;
	bool l_younger = l->peer.started > o->peer.started ||
			 (l->peer.started == o->peer.started && l->peer.instance > o->peer.instance);
	return l_younger ? l : o;
}

/* Two up links to one peer: keep the one dialled by the lower ring address,
 * so both ends pick the same survivor.  When the same node dialled both, only
 * that node closes the newer one (the other waits for its BYE).
 * Returns false when l itself was closed. */
static bool link_resolve_duplicate(struct link *l)
{
	struct node *n = l->node;
	struct link *o;
	link_for_each(n, o) {
		if (o == l || o->state != LINK_UP || !wire_addr_eq(&o->peer.addr, &l->peer.addr))
			continue;
		if (o->peer.instance != l->peer.instance) {
			struct link *loser = link_conflict_loser(l, o);
			link_close(loser, BYE_CONFLICT);
			return loser != l;
		}
		if (l->proto != o->proto) {
			/* Both ends see the same transports: direct beats relayed, and
			 * UDP beats TCP (no head-of-line blocking; and only UDP links
			 * teach us the public endpoint that hole punching needs). */
			struct link *loser = link_transport_rank(l) < link_transport_rank(o) ? l : o;
			link_close_duplicate(loser, loser == l ? o : l);
			return loser != l;
		}
		const ring_addr *li = l->initiator ? &n->self.addr : &l->peer.addr;
		const ring_addr *oi = o->initiator ? &n->self.addr : &o->peer.addr;
		int c = wire_addr_cmp(li, oi);
		if (c != 0) {
			struct link *loser = c < 0 ? o : l;
			link_close_duplicate(loser, loser == l ? o : l);
			return loser != l;
		}
		if (l->initiator) {
			link_close_duplicate(l, o);
			return false;
		}
	}
	return true;
}

static void link_became_up(struct link *l)
{
	struct node *n = l->node;
	l->state = LINK_UP;
	link_unproven_forget(n, l);
	link_half_open_end(l);
	n->links_gen++;
	l->up_ms = l->last_rx_ms = ev_now(&n->loop);
	if (l->keys)
		l->keys->tx_epoch_ms = l->up_ms;
	l->hs.tries = 0;
	ev_timer_arm(&n->loop, &l->timer, (uint64_t)link_keepalive_delay(n));
	char who[64];
	link_describe(l, who);
	log_info("link", "up: %s, %s, %s%s%s%s%s", who, l->initiator ? "dialled" : "accepted",
		 sec_mode_names[n->sec.mode], l->grant && l->grant->name[0] ? " of " : "",
		 l->grant ? l->grant->name : "", l->keys ? ", " : "",
		 l->keys ? sec_cipher_names[l->keys->cipher] : "");
	/* Dials still under way to this peer are left to finish: the peer may
	 * already count them as up, and link_resolve_duplicate settles it the
	 * same way on both ends. */
	if (!link_resolve_duplicate(l))
		return;
	if (n->up.link_up)
		n->up.link_up(n, l);
}

/* ===================================================================== 06b link_
 * Links, continued: how a link is made and what it carries.  The handshake
 * (HS_INIT, HS_COOKIE, HS_RESP, HS_FIN; docs/SECURITY.md section 4) and its
 * admission (per-IP rate, half-open cap), sealed records and their replay
 * window, relayed links (a link's records inside another link's), the
 * input dispatch every packet passes, ICMP errors on the UDP socket, and
 * TCP streams (accepting, framing, the unproven-stream cap, draining).
 * One room with section 06, split for length: the same prefix, the same
 * state (struct link, section 05b); 06 holds what these build on.
 * ========================================================================= */

/* ---- handshake -------------------------------------------------------- */

/* h = SHA-256(h || data): the transcript both ends hash identically. */
static void link_mix(uint8_t h[32], const void *data, size_t len)
{
	sec_sha256(h, 32, data, len, h);
}

/* h0 binds the protocol and the network's mode; then HS_INIT's fixed part. */
static void link_transcript_init(struct link *l, const uint8_t *init_pkt)
{
	uint8_t mode = (uint8_t)l->node->sec.mode;
	sec_sha256("ipop-v2 handshake", 17, &mode, 1, l->hs.s->h);
	link_mix(l->hs.s->h, init_pkt, WIRE_HS_INIT_COOKIE_OFFSET);
}

static void link_mix_resp(struct link *l, uint32_t idx_r, const uint8_t e_r[32])
{
	uint8_t b[36];
	struct wbuf w = wbuf_of(b, sizeof b);
	wbuf_u32(&w, idx_r);
	wbuf_bytes(&w, e_r, 32);
	link_mix(l->hs.s->h, b, sizeof b);
}

/* Our identity block, signed over the transcript so far when we hold a
 * certificate, and sealed under key (plain when insecure).  Returns the
 * sealed length, or -1. */
static ssize_t link_identity_seal(struct link *l, const uint8_t key[32], uint8_t *out, size_t cap)
{
	struct node *n = l->node;
	uint8_t plain[WIRE_MAX_PACKET_BYTES], sig[SEC_SIG_MAX_BYTES];
	size_t sig_len = 0;
	/* Through a relay we see no address of the peer's: "observed" stays
	 * 0.0.0.0:0, which section 09 ignores. */
	uint8_t proto = l->proto == PROTO_RELAY ? PROTO_UDP : l->proto;
	struct wire_identity id = { .info = n->self, .observed = link_endpoint_of(proto, &l->remote),
				    .ciphers = n->sec.ciphers | SEC_CIPHERS_BASE };
	if (n->sec.mode == SEC_CERT) {
		if (sec_sign(&n->sec, &n->rng, l->hs.s->h, sig, &sig_len) < 0)
			return -1;
		id.cert = n->sec.ctx->own.raw.p;
		id.cert_len = (uint16_t)n->sec.ctx->own.raw.len;
		id.sig = sig;
		id.sig_len = (uint8_t)sig_len;
	}
	ssize_t len = wire_identity_encode(plain, sizeof plain, &id);
	if (len < 0 || (size_t)len + SEC_TAG_BYTES > cap)
		return -1;
	if (!link_secure(l)) {
		memcpy(out, plain, (size_t)len);
		return len;
	}
	sec_seal(SEC_CHACHA20_POLY1305, key, 0, 0, l->hs.s->h, 32, plain, (size_t)len, out);
	sec_wipe(plain, sizeof plain);
	return len + SEC_TAG_BYTES;
}

/* What a certificate network demands of a peer's identity; NULL if it holds. */
static const char *link_cert_refusal(struct link *l, const struct wire_identity *id)
{
	struct node *n = l->node;
	mbedtls_x509_crt crt;
	const char *why = NULL;
	mbedtls_x509_crt_init(&crt);
	if (sec_cert_check(&n->sec, id->cert, id->cert_len, &crt, l->grant, &why) < 0)
		goto out;
	if (!sec_verify(&crt, l->hs.s->h, id->sig, id->sig_len)) {
		why = "bad handshake signature";
		goto out;
	}
	ring_addr want;
	if (!sec_cert_addr(&crt, l->grant, id->info.vip, &want))
		why = "virtual IP not in its certificate";
	else if (!wire_addr_eq(&want, &id->info.addr))
		why = "ring address does not match its certificate";
out:
	mbedtls_x509_crt_free(&crt);
	return why;
}

/* Open and check the peer's identity block; on success the peer is known. */
static bool link_identity_accept(struct link *l, const uint8_t key[32], const uint8_t *sealed, size_t len)
{
	struct node *n = l->node;
	uint8_t plain[WIRE_MAX_RECORD_BYTES];
	struct wire_identity id;
	const char *why = NULL;
	size_t plen = link_secure(l) ? len - SEC_TAG_BYTES : len;
	if (len > sizeof plain || (link_secure(l) && len < SEC_TAG_BYTES)) {
		why = "malformed identity";
	} else if (link_secure(l) && !sec_open(SEC_CHACHA20_POLY1305, key, 0, 0, l->hs.s->h, 32, sealed, len, plain)) {
		link_drop(l, DROP_AUTH_FAILED);
		return false;
	} else if (!link_secure(l)) {
		memcpy(plain, sealed, len);
	}
	if (!why && wire_identity_decode(plain, plen, &id) < 0)
		why = "malformed identity";
	else if (!why && n->sec.mode == SEC_CERT)
		why = link_cert_refusal(l, &id);       /* first: a claim counts only if proven */
	else if (!why && (id.cert_len || id.sig_len))
		why = "unexpected certificate";
	if (!why && wire_addr_eq(&id.info.addr, &n->self.addr)) {
		link_drop(l, DROP_SELF_LINK);
		if (id.info.instance != n->self.instance && n->up.conflict)
			n->up.conflict(n, &id.info, n->sec.mode == SEC_CERT);
		return false;
	}
	if (!why && l->expect_set && !wire_addr_eq(&id.info.addr, &l->expect)) {
		log_debug("link", "dialled endpoint answered as another node");
		return false;
	}
	if (why) {
		char who[64], line[160];
		link_describe(l, who);
		snprintf(line, sizeof line, "%s: %s", who, why);
		log_drop(&n->drops, DROP_REFUSED, ev_now(&n->loop), line);
		return false;
	}
	l->peer = id.info;
	link_scrub_endpoints(n, &l->peer);
	l->peer_known = true;
	l->observed = id.observed;
	if (l->keys)
		l->keys->cipher = sec_cipher_pick(n->sec.ciphers, id.ciphers);
	return true;
}

static void link_hs_init_send(struct link *l)
{
	struct node *n = l->node;
	struct wire_hs_init m = { .sender = l->local_idx, .mode = (uint8_t)n->sec.mode };
	memcpy(m.e, l->hs.s->e_pub, 32);
	if (l->hs.s->has_cookie)
		memcpy(m.cookie, l->hs.s->cookie, sizeof m.cookie);
	uint8_t pkt[WIRE_HS_INIT_BYTES];
	if (wire_hs_init_encode(pkt, sizeof pkt, &m) != WIRE_HS_INIT_BYTES)
		return;
	if (link_secure(l))
		sec_mac1(&n->sec, pkt, WIRE_HS_INIT_MAC1_OFFSET, pkt + WIRE_HS_INIT_MAC1_OFFSET);
	if (l->proto == PROTO_UDP)
		link_note_contact(n, &l->remote);
	if (l->punch_ttl)
		link_udp_send_ttl(n, l->fd, &l->remote, pkt, sizeof pkt, l->punch_ttl);
	else
		link_send_raw(l, pkt, sizeof pkt);
}

/* Initiator: a fresh ephemeral key, the transcript's start, HS_INIT. */
static void link_hs_begin(struct link *l)
{
	struct node *n = l->node;
	if (link_secure(l) && sec_x25519_keypair(&n->sec, &n->rng, l->hs.s->e_priv, l->hs.s->e_pub) < 0) {
		link_close(l, 0);
		return;
	}
	struct wire_hs_init m = { .sender = l->local_idx, .mode = (uint8_t)n->sec.mode };
	memcpy(m.e, l->hs.s->e_pub, 32);
	uint8_t pkt[WIRE_HS_INIT_BYTES];
	wire_hs_init_encode(pkt, sizeof pkt, &m);
	link_transcript_init(l, pkt);
	l->state = LINK_AWAIT_RESP;
	link_hs_init_send(l);
	ev_timer_arm(&n->loop, &l->timer, link_lossy(l) ? LINK_HELLO_RETRY_MS : LINK_HANDSHAKE_TIMEOUT_MS);
}

/* ck = HKDF-Extract(salt, X25519(ours, theirs)). */
static int link_hs_chain(struct link *l, const uint8_t peer_e[32])
{
	struct node *n = l->node;
	uint8_t dh[32];
	if (!link_secure(l))
		return 0;
	if (sec_x25519(&n->sec, &n->rng, l->hs.s->e_priv, peer_e, dh) < 0)
		return -1;
	mbedtls_hkdf_extract(sec_md(), n->sec.salt, SEC_KEY_BYTES, dh, sizeof dh, l->hs.s->ck);
	sec_wipe(dh, sizeof dh);
	return 0;
}

/* Transport keys from the final transcript; the scratch is wiped after. */
static void link_hs_finish(struct link *l)
{
	if (link_secure(l)) {
		uint8_t i2r[32], r2i[32];
		sec_expand(l->hs.s->ck, "ipop-v2 i2r", l->hs.s->h, i2r);
		sec_expand(l->hs.s->ck, "ipop-v2 r2i", l->hs.s->h, r2i);
		memcpy(l->keys->tx, l->initiator ? i2r : r2i, 32);
		memcpy(l->keys->rx, l->initiator ? r2i : i2r, 32);
		sec_wipe(i2r, 32);
		sec_wipe(r2i, 32);
	}
	uint8_t *cached = l->hs.cached;
	size_t cached_len = l->hs.cached_len;
	uint64_t until = l->hs.cached_until_ms;
	l->hs.cached = NULL;
	link_hs_wipe(l);
	if (l->initiator) {     /* keep HS_FIN: a lost one is resent on a repeated HS_RESP */
		l->hs.cached = cached;
		l->hs.cached_len = cached_len;
		l->hs.cached_until_ms = until;
	} else {
		free(cached);
	}
}

/* Responder: answer a valid HS_INIT with our sealed identity. */
static void link_hs_respond(struct link *l, const struct wire_hs_init *m, const uint8_t *init_pkt)
{
	struct node *n = l->node;
	uint8_t pkt[WIRE_MAX_RECORD_BYTES], sealed[WIRE_MAX_PACKET_BYTES], k[32];
	l->peer_idx = m->sender;
	link_transcript_init(l, init_pkt);
	if (link_secure(l) && (sec_x25519_keypair(&n->sec, &n->rng, l->hs.s->e_priv, l->hs.s->e_pub) < 0 ||
			       link_hs_chain(l, m->e) < 0)) {
		link_drop(l, DROP_REFUSED);
		link_close(l, 0);
		return;
	}
	link_mix_resp(l, l->local_idx, l->hs.s->e_pub);
	sec_expand(l->hs.s->ck, "ipop-v2 resp", l->hs.s->h, k);
	ssize_t slen = link_identity_seal(l, k, sealed, sizeof sealed);
	struct wire_hs_resp r = { .sender = l->local_idx, .receiver = m->sender, .len = (uint16_t)slen,
				  .sealed = sealed };
	memcpy(r.e, l->hs.s->e_pub, 32);
	ssize_t len = slen < 0 ? -1 : wire_hs_resp_encode(pkt, sizeof pkt, &r);
	sec_wipe(k, sizeof k);
	if (len < 0) {
		link_close(l, 0);
		return;
	}
	link_mix(l->hs.s->h, sealed, (size_t)slen);
	l->state = LINK_AWAIT_FIN;
	link_hs_cache(l, pkt, (size_t)len);
	link_send_raw(l, pkt, (size_t)len);
	/* Over UDP the initiator retransmits HS_INIT for LINK_HELLO_TRIES
	 * intervals; each one brings our HS_RESP again.  Then it gave up. */
	ev_timer_arm(&n->loop, &l->timer, link_lossy(l) ? LINK_HELLO_TRIES * LINK_HELLO_RETRY_MS :
		     LINK_HANDSHAKE_TIMEOUT_MS);
}

/* A mode mismatch is a configuration error on one side: say so plainly. */
static void link_send_reject(struct node *n, int fd, const struct sockaddr_in *to, struct link *stream,
			     uint32_t receiver, uint8_t reason)
{
	struct wire_hs_reject r = { .receiver = receiver, .reason = reason, .mode = (uint8_t)n->sec.mode };
	uint8_t pkt[16];
	ssize_t len = wire_hs_reject_encode(pkt, sizeof pkt, &r);
	if (len < 0)
		return;
	if (stream)
		link_send_raw(stream, pkt, (size_t)len);
	else    /* queued like any datagram (it leaves at the end of the turn); a simulated node has no socket */
		link_udp_queue(n, fd, to, pkt, (size_t)len);
}

static void link_send_cookie(struct node *n, int fd, const struct sockaddr_in *to, uint32_t receiver)
{
	struct wire_hs_cookie c = { .receiver = receiver };
	sec_cookie(&n->sec, 0, to, c.cookie);
	uint8_t pkt[32];
	ssize_t len = wire_hs_cookie_encode(pkt, sizeof pkt, &c);
	if (len > 0)    /* queued, as in link_send_reject */
		link_udp_queue(n, fd, to, pkt, (size_t)len);
}

/* ---- handshake admission ----------------------------------------------
 * What an HS_INIT that passed mac1 and the cookie (TCP: the connection
 * handshake) may cost us.  The source address is proven first, so a
 * spoofed sender spends no one else's share:
 *  - per source IP, a token bucket of LINK_HS_PER_IP_PER_S, LINK_HS_BURST
 *    deep, over every HS_INIT answered, retransmits included (GCRA: a
 *    bucket holds the time at which it is full again, and admits while
 *    that lies less than LINK_HS_BURST intervals ahead);
 *  - at most LINK_HALF_OPEN_MAX unasked responder links await HS_FIN, so a
 *    flood never takes the link slots our own dials need;
 *  - a responder never resends HS_RESP on its own (link_hs_timeout): only
 *    a retransmitted HS_INIT, which passes the bucket again, brings it back.
 * An insecure (or simulated) node skips the bucket: its handshake costs a
 * hash, not public-key work. */

_Static_assert(LINK_HS_BUCKETS == 1 << 10, "link_hs_bucket takes the hash's top 10 bits");

static uint64_t *link_hs_bucket(struct node *n, uint32_t ip)
{
	if (!n->hs_bucket) {
		if (!(n->hs_bucket = calloc(LINK_HS_BUCKETS, sizeof *n->hs_bucket)))
			return NULL;
		n->hs_bucket_seed = sec_random_u64(&n->rng) | 1;        /* odd: a bijection */
	}
	uint64_t h = ((uint64_t)ip ^ (n->hs_bucket_seed >> 40)) * n->hs_bucket_seed;
	return &n->hs_bucket[h >> 54];
}

/* May this source IP have one more handshake answered now?  Loopback is
 * exempt: its senders are this host's own processes, which the bucket
 * cannot tell apart (every node of a test ring or of `make scale` shares
 * 127.0.0.1, and 64 of them joining at once were held to 5 handshakes a
 * second: t_ring's ring took 16-30 s instead of 3), and a local user has
 * cheaper ways to load the host than handshakes. */
static bool link_hs_admit(struct node *n, const struct sockaddr_in *from)
{
	enum { INTERVAL_MS = 1000 / LINK_HS_PER_IP_PER_S };
	if (n->sec.mode == SEC_INSECURE || (ntohl(from->sin_addr.s_addr) >> 24) == 127)
		return true;
	uint64_t *full_at = link_hs_bucket(n, from->sin_addr.s_addr), now = ev_now(&n->loop);
	if (!full_at)
		return false;
	uint64_t t = *full_at > now ? *full_at : now;
	if (t - now > (uint64_t)(LINK_HS_BURST - 1) * INTERVAL_MS)
		return false;
	*full_at = t + INTERVAL_MS;
	return true;
}

/* Room for one more half-open responder: at the cap, the oldest goes.  A
 * member's HS_FIN comes a round trip after its HS_RESP, so only a flood of
 * LINK_HALF_OPEN_MAX admitted HS_INITs within one round trip displaces it.
 * The walk over every link happens at most at the admitted rate. */
static void link_half_open_make_room(struct node *n)
{
	if (n->n_half_open < LINK_HALF_OPEN_MAX)
		return;
	struct link *oldest = NULL;
	for (struct link *l = n->links; l; l = l->next)     /* newest first */
		if (l->half_open && (!oldest || l->created_ms <= oldest->created_ms))
			oldest = l;
	if (!oldest)
		return;
	link_drop(oldest, DROP_HALF_OPEN);
	link_close(oldest, 0);
}

/* A UDP responder link already made for this HS_INIT (a retransmit). */
static struct link *link_find_responder(struct node *n, int fd, const struct sockaddr_in *from,
					uint32_t peer_idx)
{
	for (struct link *l = n->links; l; l = l->next)
		if (l->state != LINK_CLOSED && !l->initiator && l->proto == PROTO_UDP && l->fd == fd &&
		    l->peer_idx == peer_idx && link_sockaddr_eq(&l->remote, from))
			return l;
	return NULL;
}

/* Whose handshake allowance an HS_INIT spends: its source address, or for
 * a relayed one (which has none) the relay's: every relayed HS_INIT shared
 * the bucket of 0.0.0.0, so one member relaying a flood held back every
 * relayed joiner. */
static const struct sockaddr_in *link_hs_source(struct node *n, const struct link *stream,
						const struct sockaddr_in *from)
{
	struct link *via = stream && stream->proto == PROTO_RELAY ? link_find_direct(n, &stream->relay_via) : NULL;
	return via ? &via->remote : from;
}

/* HS_INIT: every check that needs no state comes first, so a stranger or a
 * spoofed source costs an HMAC, never a link record. */
static void link_on_hs_init(struct node *n, struct link *stream, int fd, const struct sockaddr_in *from,
			    const uint8_t *pkt, size_t len)
{
	struct wire_hs_init m;
	uint8_t proto = stream ? PROTO_TCP : PROTO_UDP;
	uint8_t mac[SEC_MAC_BYTES];
	if (wire_hs_init_decode(pkt, len, &m) < 0)
		return link_drop_from(n, DROP_MALFORMED, proto, from);
	if (m.mode != n->sec.mode) {
		link_drop_from(n, DROP_MODE_MISMATCH, proto, from);
		return link_send_reject(n, fd, from, stream, m.sender, REJECT_MODE_MISMATCH);
	}
	if (n->sec.mode != SEC_INSECURE) {
		sec_mac1(&n->sec, pkt, WIRE_HS_INIT_MAC1_OFFSET, mac);
		if (!sec_equal(mac, m.mac1, sizeof mac))
			return link_drop_from(n, DROP_NOT_MEMBER, proto, from);
	}
	if (!stream && !sec_cookie_valid(&n->sec, from, m.cookie))
		return link_send_cookie(n, fd, from, m.sender);
	if (!link_hs_admit(n, link_hs_source(n, stream, from))) {
		link_drop_from(n, DROP_HS_RATE, proto, from);
		if (stream)
			link_close(stream, 0);
		return;
	}
	if (stream && stream->proto == PROTO_RELAY) {
		link_half_open_make_room(n);    /* only once admitted: a relayed */
		link_half_open_begin(stream);   /* stranger displaces no one */
	}
	struct link *l = stream;
	if (!l) {
		struct link *old = link_find_responder(n, fd, from, m.sender);
		if (old) {
			if (old->state == LINK_AWAIT_FIN)
				link_hs_resend(old);
			return;
		}
		if (!link_underlay_ok(n, PROTO_UDP, from))
			return;
		link_half_open_make_room(n);
		if (!(l = link_new(n, PROTO_UDP, fd, from, false)))
			return link_drop_from(n, DROP_LINK_TABLE_FULL, proto, from);
		link_half_open_begin(l);
	} else if (l->state != LINK_AWAIT_INIT) {
		return link_drop(l, DROP_WRONG_STATE);
	}
	link_hs_respond(l, &m, pkt);
}

static void link_on_hs_cookie(struct link *l, const struct wire_hs_cookie *m)
{
	if (l->state != LINK_AWAIT_RESP || !l->initiator)
		return link_drop(l, DROP_WRONG_STATE);
	memcpy(l->hs.s->cookie, m->cookie, sizeof l->hs.s->cookie);
	l->hs.s->has_cookie = true;
	l->punch_ttl = 0;       /* the peer answered: both NATs let us through */
	link_hs_init_send(l);
}

/* Initiator: check the responder, answer with HS_FIN, and we are up. */
static void link_on_hs_resp(struct link *l, const struct wire_hs_resp *m)
{
	struct node *n = l->node;
	uint8_t k[32], sealed[WIRE_MAX_PACKET_BYTES], pkt[WIRE_MAX_RECORD_BYTES];
	if (l->state == LINK_UP && l->initiator && m->sender == l->peer_idx)
		return link_hs_resend(l);       /* our HS_FIN was lost */
	if (l->state != LINK_AWAIT_RESP)
		return link_drop(l, DROP_WRONG_STATE);
	if (link_hs_chain(l, m->e) < 0) {
		link_drop(l, DROP_REFUSED);
		return link_close(l, 0);
	}
	link_mix_resp(l, m->sender, m->e);
	sec_expand(l->hs.s->ck, "ipop-v2 resp", l->hs.s->h, k);
	bool ok = link_identity_accept(l, k, m->sealed, m->len);
	sec_wipe(k, sizeof k);
	if (!ok)
		return link_close(l, 0);
	l->peer_idx = m->sender;
	link_mix(l->hs.s->h, m->sealed, m->len);
	sec_expand(l->hs.s->ck, "ipop-v2 fin", l->hs.s->h, k);
	ssize_t slen = link_identity_seal(l, k, sealed, sizeof sealed);
	sec_wipe(k, sizeof k);
	struct wire_hs_fin f = { .receiver = m->sender, .len = (uint16_t)slen, .sealed = sealed };
	ssize_t len = slen < 0 ? -1 : wire_hs_fin_encode(pkt, sizeof pkt, &f);
	if (len < 0)
		return link_close(l, 0);
	link_mix(l->hs.s->h, sealed, (size_t)slen);
	link_hs_cache(l, pkt, (size_t)len);
	link_send_raw(l, pkt, (size_t)len);
	link_hs_finish(l);
	link_became_up(l);
	(void)n;
}

/* Responder: the initiator proved itself; we are up. */
static void link_on_hs_fin(struct link *l, const struct wire_hs_fin *m)
{
	uint8_t k[32];
	if (l->state == LINK_UP && !l->initiator)
		return;                         /* a resent HS_FIN */
	if (l->state != LINK_AWAIT_FIN)
		return link_drop(l, DROP_WRONG_STATE);
	sec_expand(l->hs.s->ck, "ipop-v2 fin", l->hs.s->h, k);
	bool ok = link_identity_accept(l, k, m->sealed, m->len);
	sec_wipe(k, sizeof k);
	if (!ok) {
		/* The initiator counts itself up already: tell it, or it waits 4 s. */
		link_send_reject(l->node, l->fd, &l->remote, l->proto != PROTO_UDP ? l : NULL, l->peer_idx,
				 REJECT_REFUSED);
		return link_close(l, 0);
	}
	link_mix(l->hs.s->h, m->sealed, m->len);
	l->confirmed = true;
	link_hs_finish(l);
	link_became_up(l);
}

/* A reject counts only before the responder has shown it accepted us: an
 * authenticated record confirms the link, and nothing unauthenticated can
 * close a confirmed one. */
static void link_on_hs_reject(struct link *l, const struct wire_hs_reject *m)
{
	struct node *n = l->node;
	bool early = l->state == LINK_AWAIT_RESP || (l->state == LINK_UP && !l->confirmed);
	if (!l->initiator || !early || (m->reason == REJECT_MODE_MISMATCH) != (l->state == LINK_AWAIT_RESP))
		return link_drop(l, DROP_WRONG_STATE);
	char who[64];
	link_describe(l, who);
	uint64_t now = ev_now(&n->loop);
	if (!n->reject_logged_ms || now - n->reject_logged_ms >= LOG_DROP_INTERVAL_MS) {
		n->reject_logged_ms = now;
		if (m->reason == REJECT_MODE_MISMATCH)
			log_err("link", "%s runs in %s mode and this node in %s mode: every node of a network "
				"needs the same security (--secret-file, --cert-dir or --insecure)", who,
				sec_mode_names[m->mode], sec_mode_names[n->sec.mode]);
		else
			log_err("link", "%s refused this node's credentials (certificate revoked, expired or "
				"from another CA?)", who);
	}
	link_close(l, 0);
}

/* ---- records ------------------------------------------------------------ */

/* The receive key for a record's epoch byte: the current one, the next one
 * (the peer ratcheted; derived into next), or the previous one in its grace. */
static const uint8_t *link_rx_key(struct link *l, uint8_t epoch, uint8_t next[32], bool *advance)
{
	*advance = false;
	if (epoch == (uint8_t)l->keys->rx_epoch)
		return l->keys->rx;
	if (epoch == (uint8_t)(l->keys->rx_epoch + 1)) {
		sec_expand(l->keys->rx, "ipop-v2 rekey", NULL, next);
		*advance = true;
		return next;
	}
	if (epoch == (uint8_t)(l->keys->rx_epoch - 1) && l->keys->rx_epoch > 0 &&
	    ev_now(&l->node->loop) < l->keys->rx_prev_until_ms)
		return l->keys->rx_prev;
	return NULL;
}

static void link_rx_advance(struct link *l, const uint8_t next[32])
{
	memcpy(l->keys->rx_prev, l->keys->rx, 32);
	memcpy(l->keys->rx, next, 32);
	l->keys->rx_epoch++;
	l->keys->rx_prev_until_ms = ev_now(&l->node->loop) + LINK_REKEY_GRACE_MS;
}

static void link_on_up_packet(struct link *l, uint8_t type, const uint8_t *pkt, size_t len);

/* Open a DATA record: epoch key, replay check, authenticate, then commit. */
/* A record's plaintext into plain (WIRE_MAX_WIRE_BYTES), its length into
 * *plen; false (counted) when it does not authenticate or is a replay. */
static bool link_data_open(struct link *l, const struct wire_data *d, const uint8_t *pkt, uint8_t *plain,
			   size_t *plen)
{
	uint8_t next[32];
	bool advance = false;
	if (!link_secure(l)) {
		memcpy(plain, d->body, d->len);
		*plen = d->len;
		return true;
	}
	const uint8_t *key = link_rx_key(l, d->epoch, next, &advance);
	size_t tag_len = sec_tag_bytes(l->keys->cipher);
	if (!key || d->len < tag_len + WIRE_HDR_BYTES)
		return link_drop(l, DROP_AUTH_FAILED), false;
	if (!sec_replay_ok(&l->keys->replay, d->counter))
		return link_drop(l, DROP_REPLAY), false;
	uint32_t epoch = advance ? l->keys->rx_epoch + 1 : (uint8_t)d->epoch == (uint8_t)l->keys->rx_epoch
			 ? l->keys->rx_epoch : l->keys->rx_epoch - 1;
	if (!sec_open(l->keys->cipher, key, epoch, d->counter, pkt, WIRE_DATA_HDR_BYTES, d->body, d->len, plain))
		return link_drop(l, DROP_AUTH_FAILED), false;
	sec_replay_commit(&l->keys->replay, d->counter);
	if (advance)
		link_rx_advance(l, next);
	*plen = d->len - tag_len;
	return true;
}

/* A record on a link we closed, sent before the peer had our BYE: routed
 * messages go on their way (the ring no longer routes over this link, so
 * they leave by another), the peer's BYE ends the drain, the rest (pings,
 * roles) no longer matter. */
static void link_on_straggler(struct link *l, const struct wire_data *d, const uint8_t *pkt)
{
	uint8_t plain[WIRE_MAX_WIRE_BYTES], type;
	size_t plen;
	if (!link_data_open(l, d, pkt, plain, &plen) || wire_classify(plain, plen, true, &type) != WIRE_OK)
		return;
	if (type == WIRE_BYE) {
		l->drain_until_ms = 0;
		l->node->reap_pending = true;
	}
	else if (type == WIRE_ROUTED && l->node->up.routed)
		l->node->up.routed(l->node, l, plain, plen);
}

/* A responder awaiting HS_FIN got a DATA record: the initiator counts the
 * link up, so its HS_FIN was lost.  Our HS_RESP once more makes it resend
 * that (link_on_hs_resp); without this, since HS_RESP is no longer resent
 * unasked, the link was a black hole until the keepalive declared it dead
 * (4 s).  Only the initiator knows our index, so nobody else triggers it;
 * at most once per LINK_HELLO_RETRY_MS. */
static void link_hs_fin_lost(struct link *l)
{
	uint64_t now = ev_now(&l->node->loop);
	if (!l->hs.s || now - l->hs.s->resp_resent_ms < LINK_HELLO_RETRY_MS)
		return;
	l->hs.s->resp_resent_ms = now;
	link_hs_resend(l);
}

static void link_on_data_in(struct link *l, const struct wire_data *d, const uint8_t *pkt,
			    const struct sockaddr_in *from, uint8_t *plain);

/* A record opens in the local stack's buffer (up.rx_plain), but not one
 * inside another (RELAYED): that one's bytes are in the buffer. */
static void link_on_data(struct link *l, const struct wire_data *d, const uint8_t *pkt,
			 const struct sockaddr_in *from)
{
	struct node *n = l->node;
	uint8_t own[WIRE_MAX_WIRE_BYTES];
	uint8_t *plain = !n->rx_opening && n->up.rx_plain ? n->up.rx_plain(n) : NULL;
	n->rx_opening++;
	link_on_data_in(l, d, pkt, from, plain ? plain : own);
	n->rx_opening--;
}

static void link_on_data_in(struct link *l, const struct wire_data *d, const uint8_t *pkt,
			    const struct sockaddr_in *from, uint8_t *plain)
{
	uint8_t type;
	size_t plen;
	if (l->state == LINK_AWAIT_FIN && !l->initiator)
		link_hs_fin_lost(l);
	if (l->state != LINK_UP)
		return link_drop(l, DROP_WRONG_STATE);
	if (!link_data_open(l, d, pkt, plain, &plen))
		return;
	if (l->proto == PROTO_UDP && !link_sockaddr_eq(&l->remote, from))
		l->remote = *from;      /* authenticated: follow the peer to its new address */
	else if (l->proto == PROTO_RELAY)
		link_relay_follow(l, d->counter);       /* and a relayed peer to its relay */
	l->last_rx_ms = ev_now(&l->node->loop);
	l->confirmed = true;
	if (l->initiator && l->hs.cached)
		link_hs_wipe(l);        /* the peer has our HS_FIN */
	switch (wire_classify(plain, plen, true, &type)) {
	case WIRE_OK:
		return link_on_up_packet(l, type, plain, plen);
	case WIRE_BAD_TYPE:
		return link_drop(l, DROP_BAD_TYPE);
	default:
		return link_drop(l, DROP_MALFORMED);
	}
}

/* Is an RTT sample a sharp rise over the link's floor?  Pure, for tests. */
static bool link_rtt_spiked(double floor_ms, double sample_ms)
{
	return floor_ms >= 0 && sample_ms > LINK_SPIKE_FACTOR * floor_ms + LINK_SPIKE_MS;
}

static void link_on_pong(struct link *l, const struct wire_ping *m)
{
	uint64_t now = ev_now_us(&l->node->loop);
	if (m->t_us > now)
		return;
	double sample = (double)(now - m->t_us) / 1000.0;
	l->rtt_ms = l->rtt_ms < 0 ? sample : 0.875 * l->rtt_ms + 0.125 * sample;
	if (link_rtt_spiked(l->rtt_floor_ms, sample)) {
		l->rtt_spike_ms = ev_now(&l->node->loop);
		l->node->links_gen++;
	}
	/* The floor creeps up so that a path that really got longer (a roam)
	 * stops counting as a spike after a few minutes of pongs. */
	l->rtt_floor_ms = l->rtt_floor_ms < 0 || sample < l->rtt_floor_ms ? sample
									   : l->rtt_floor_ms * 1.01 + 0.001;
}

/* A peer's PING arrives on its 1 s grid; one far past it means the peer
 * stalled, which the end that only answers pings sees no other way. */
static void link_on_ping(struct link *l)
{
	uint64_t now = ev_now(&l->node->loop);
	if (l->ping_rx_ms && now - l->ping_rx_ms > LINK_KEEPALIVE_MS + LINK_SPIKE_MS &&
	    now - l->ping_rx_ms < 2 * LINK_KEEPALIVE_MS) {
		l->rtt_spike_ms = now;
		l->node->links_gen++;
	}
	l->ping_rx_ms = now;
}

static void link_on_bye(struct link *l, uint8_t reason)
{
	char who[64];
	link_describe(l, who);
	log_info("link", "peer closed %s (reason %u)", who, reason);
	struct node *n = l->node;
	link_teardown(l, reason, false);
	if (reason == BYE_CONFLICT && n->up.conflict)
		n->up.conflict(n, NULL, false);      /* a peer's word: proves nothing */
}

static void link_on_roles(struct link *l, uint8_t roles)
{
	if (roles & ~ROLE__ALL) {
		link_drop(l, DROP_MALFORMED);
		return;
	}
	l->peer_roles = roles;
	if (l->node->up.link_roles)
		l->node->up.link_roles(l->node, l);
}

/* ---- relayed links ------------------------------------------------------
 * When no direct path exists (symmetric NATs on both sides, UDP blocked),
 * two nodes link through a peer R both reach.  The relayed link is a link
 * like any other: its own end-to-end handshake and keys, roles, keepalives;
 * only its transport differs.  Its records travel to R inside RELAY
 * messages on our direct link to R, and R passes each on as RELAYED on its
 * direct link to the far end, naming the sender it authenticated.  R keeps
 * no state per relayed link and cannot read or forge what it carries.
 * ------------------------------------------------------------------------- */

static void link_input(struct node *n, struct link *stream, int fd, const struct sockaddr_in *from,
		       const uint8_t *pkt, size_t len);

static const ring_addr *link_far_addr(const struct link *l)
{
	return l->peer_known ? &l->peer.addr : &l->expect;
}

/* Dial a peer through a relay we link directly. */
static struct link *link_dial_relay(struct node *n, const ring_addr *via, const ring_addr *peer,
				    uint8_t want)
{
	struct sockaddr_in none = { .sin_family = AF_INET };
	struct link *l = link_new(n, PROTO_RELAY, -1, &none, true);
	if (!l) {
		log_drop(&n->drops, DROP_LINK_TABLE_FULL, ev_now(&n->loop), "relay dial");
		return NULL;
	}
	l->relay_via = *via;
	l->expect = *peer;
	l->expect_set = true;
	l->want_roles = want;
	link_hs_begin(l);
	return l;
}

/* We are the relay: pass a record on between two peers we link directly.
 * Relayed links never carry relays, so a record takes at most two legs. */
static void link_relay_forward(struct link *from, const struct wire_relay *m)
{
	struct node *n = from->node;
	struct link *to = from->proto == PROTO_RELAY ? NULL : link_find_direct(n, &m->addr);
	if (!to)
		return link_drop(from, DROP_NO_ROUTE);
	struct wire_relay out = { .addr = from->peer.addr, .rec = m->rec, .len = m->len };
	uint8_t msg[WIRE_MAX_MSG_BYTES];
	ssize_t len = wire_relay_encode(msg, sizeof msg, WIRE_RELAYED, &out);
	if (len < 0)
		return;
	from->relay_last_ms = to->relay_last_ms = ev_now(&n->loop);
	if (link_send(to, msg, (size_t)len) == 0) {
		n->relayed_packets++;
		n->relayed_bytes += m->len;
	}
}

/* An HS_INIT through a relay: the responder link it makes, or NULL when it
 * repeats one we answered (then our answer goes again). */
static struct link *link_relay_responder(struct link *via, const struct wire_relay *m)
{
	struct node *n = via->node;
	struct wire_hs_init hi;
	if (wire_hs_init_decode(m->rec, m->len, &hi) < 0) {
		link_drop(via, DROP_MALFORMED);
		return NULL;
	}
	for (struct link *l = n->links; l; l = l->next)
		if (l->proto == PROTO_RELAY && !l->initiator && l->state != LINK_CLOSED &&
		    l->peer_idx == hi.sender && wire_addr_eq(&l->relay_via, &via->peer.addr) &&
		    wire_addr_eq(link_far_addr(l), &m->addr)) {
			if (l->state == LINK_AWAIT_FIN)
				link_hs_resend(l);
			return NULL;
		}
	struct sockaddr_in none = { .sin_family = AF_INET };
	struct link *l = link_new(n, PROTO_RELAY, -1, &none, false);
	if (!l) {
		log_drop(&n->drops, DROP_LINK_TABLE_FULL, ev_now(&n->loop), "relay accept");
		return NULL;
	}
	/* The relay vouches for the sender's address; the handshake checks the
	 * identity against it (expect), so a lying relay gets nowhere. */
	l->relay_via = via->peer.addr;
	l->expect = m->addr;
	l->expect_set = true;
	l->state = LINK_AWAIT_INIT;
	return l;
}

/* A relayed link we closed with a BYE (a duplicate, or one a direct link
 * replaced) takes the far end's DATA records sent before the BYE reached
 * it for LINK_DRAIN_MS: their routed messages go on their way, as a UDP
 * link's do (link_dispatch hands them to link_on_straggler). */
static bool link_relay_draining(const struct link *l, const struct wire_relay *m)
{
	return m->rec[1] == WIRE_DATA && l->drain_until_ms > ev_now(&l->node->loop);
}

/* A record of one of our relayed links, arrived from its relay. */
static void link_relay_input(struct link *via, const struct wire_relay *m)
{
	struct node *n = via->node;
	struct sockaddr_in none = { .sin_family = AF_INET };
	struct link *l;
	uint32_t idx;
	if (via->proto == PROTO_RELAY)
		return link_drop(via, DROP_MALFORMED);
	via->relay_last_ms = ev_now(&n->loop);
	if (m->rec[1] == WIRE_HS_INIT) {
		if (!(l = link_relay_responder(via, m)))
			return;
	} else if (!wire_outer_receiver(m->rec, m->len, &idx) || !(l = link_slot_of(n, idx)) ||
		   l->proto != PROTO_RELAY || !wire_addr_eq(link_far_addr(l), &m->addr) ||
		   (l->state == LINK_CLOSED && !link_relay_draining(l, m))) {
		return link_drop(via, DROP_UNKNOWN_SENDER);
	}
	/* Through any relay: the far end may have moved to another (relay
	 * roaming, section 06); link_on_data follows it once it authenticates. */
	n->relay_rx = &via->peer.addr;
	link_input(n, l, -1, &none, m->rec, m->len);
	n->relay_rx = NULL;
	if (l->state == LINK_AWAIT_INIT)        /* the HS_INIT failed its checks */
		link_teardown(l, 0, false);
}

/* A message that came out of an authenticated record. */
static void link_on_up_packet(struct link *l, uint8_t type, const uint8_t *pkt, size_t len)
{
	struct wire_ping ping;
	struct wire_relay relay;
	uint8_t v;
	switch (type) {
	case WIRE_RELAY:
	case WIRE_RELAYED:
		if (wire_relay_decode(pkt, len, &relay) < 0)
			goto malformed;
		if (type == WIRE_RELAY)
			link_relay_forward(l, &relay);
		else
			link_relay_input(l, &relay);
		return;
	case WIRE_PUNCH:
		if (wire_byte_decode(pkt, len, &v) < 0)
			goto malformed;
		if (l->proto == PROTO_RELAY && l->node->up.punch)
			l->node->up.punch(l->node, l);
		return;
	case WIRE_PING:
	case WIRE_PONG:
		if (wire_ping_decode(pkt, len, &ping) < 0)
			goto malformed;
		if (type == WIRE_PING) {
			link_on_ping(l);
			link_send_ping(l, WIRE_PONG, ping.seq, ping.t_us);
		} else
			link_on_pong(l, &ping);
		return;
	case WIRE_ROLES:
	case WIRE_BYE:
		if (wire_byte_decode(pkt, len, &v) < 0)
			goto malformed;
		if (type == WIRE_ROLES)
			link_on_roles(l, v);
		else
			link_on_bye(l, v);
		return;
	case WIRE_ROUTED:
		if (l->node->up.routed)
			l->node->up.routed(l->node, l, pkt, len);
		return;
	}
malformed:
	link_drop(l, DROP_MALFORMED);
}

/* ---- input dispatch ------------------------------------------------------ */

/* The link a handshake reply or record names: on TCP the stream's own link,
 * which must carry that index; on UDP a lookup by index.  Handshake replies
 * must also come from the address we dialled; records may roam. */
static struct link *link_for_index(struct node *n, struct link *stream, int fd, uint32_t idx,
				   const struct sockaddr_in *from, bool handshake)
{
	struct link *l = stream ? stream : link_find_index(n, idx);
	if (!l || l->local_idx != idx || (!stream && (l->proto != PROTO_UDP || l->fd != fd)) ||
	    (handshake && !stream && !link_sockaddr_eq(&l->remote, from))) {
		link_drop_from(n, DROP_UNKNOWN_SENDER, stream ? PROTO_TCP : PROTO_UDP, from);
		return NULL;
	}
	return l;
}

/* Decode a handshake reply or record and hand it to its link. */
static void link_dispatch(struct node *n, struct link *stream, int fd, const struct sockaddr_in *from,
			  uint8_t type, const uint8_t *pkt, size_t len)
{
	struct wire_hs_cookie c;
	struct wire_hs_resp r;
	struct wire_hs_fin f;
	struct wire_hs_reject j;
	struct wire_data d;
	struct link *l;
	bool bad;
	switch (type) {
	case WIRE_HS_COOKIE:
		if (!(bad = wire_hs_cookie_decode(pkt, len, &c) < 0) && !stream && n->up.probe_reply &&
		    n->up.probe_reply(n, c.receiver, from, c.cookie))
			break;
		if (!bad && (l = link_for_index(n, stream, fd, c.receiver, from, true)))
			link_on_hs_cookie(l, &c);
		break;
	case WIRE_HS_RESP:
		if (!(bad = wire_hs_resp_decode(pkt, len, &r) < 0) &&
		    (l = link_for_index(n, stream, fd, r.receiver, from, true)))
			link_on_hs_resp(l, &r);
		break;
	case WIRE_HS_FIN:
		if (!(bad = wire_hs_fin_decode(pkt, len, &f) < 0) &&
		    (l = link_for_index(n, stream, fd, f.receiver, from, true)))
			link_on_hs_fin(l, &f);
		break;
	case WIRE_HS_REJECT:
		if (!(bad = wire_hs_reject_decode(pkt, len, &j) < 0) &&
		    (l = link_for_index(n, stream, fd, j.receiver, from, true)))
			link_on_hs_reject(l, &j);
		break;
	default:
		if ((bad = wire_data_decode(pkt, len, &d) < 0))
			break;
		if (stream && stream->state == LINK_CLOSED)     /* a relayed or TCP link draining */
			link_on_straggler(stream, &d, pkt);
		else if (!stream && (l = link_find_draining(n, d.receiver)) && l->proto == PROTO_UDP &&
			 l->fd == fd)
			link_on_straggler(l, &d, pkt);
		else if ((l = link_for_index(n, stream, fd, d.receiver, from, false))) {
			l->rx_packets++;
			l->rx_bytes += len;
			link_on_data(l, &d, pkt, from);
		}
		break;
	}
	if (bad)
		link_drop_from(n, DROP_MALFORMED, stream ? PROTO_TCP : PROTO_UDP, from);
}

/* One packet off the wire: classify before trusting, then dispatch.
 * stream is the link the transport already names (a TCP stream's, or a
 * relayed link's); NULL for UDP, where from and the packet's index tell. */
static void link_input(struct node *n, struct link *stream, int fd, const struct sockaddr_in *from,
		       const uint8_t *pkt, size_t len)
{
	uint8_t type;
	uint8_t proto = stream ? PROTO_TCP : PROTO_UDP;
	if (len > WIRE_MAX_WIRE_BYTES)          /* callers cap it too; this is the contract */
		return link_drop_from(n, DROP_BAD_FRAME, proto, from);
	switch (wire_classify(pkt, len, false, &type)) {
	case WIRE_OK:
		break;
	case WIRE_BAD_VERSION:
		return link_drop_from(n, DROP_BAD_VERSION, proto, from);
	case WIRE_BAD_TYPE:
		return link_drop_from(n, DROP_BAD_TYPE, proto, from);
	default:
		return link_drop_from(n, DROP_MALFORMED, proto, from);
	}
	if (type == WIRE_HS_INIT)
		link_on_hs_init(n, stream, fd, from, pkt, len);
	else
		link_dispatch(n, stream, fd, from, type, pkt, len);
}

/* One datagram off a UDP socket. */
static void link_udp_datagram(struct node *n, int fd, const struct sockaddr_in *from, socklen_t fl,
			      const uint8_t *pkt, size_t len)
{
	if (fl != sizeof *from || from->sin_family != AF_INET)
		return;
	if (len > WIRE_MAX_WIRE_BYTES)
		return link_drop_from(n, DROP_BAD_FRAME, PROTO_UDP, from);
	link_input(n, NULL, fd, from, pkt, len);
}

/* The segment size of a datagram the kernel coalesced (UDP_GRO), else 0. */
static size_t link_gro_size(const struct msghdr *m)
{
	for (const struct cmsghdr *c = CMSG_FIRSTHDR(m); c; c = CMSG_NXTHDR((struct msghdr *)m, (struct cmsghdr *)c))
		if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO && c->cmsg_len >= CMSG_LEN(sizeof(int))) {
			int size;
			memcpy(&size, CMSG_DATA(c), sizeof size);
			return size > 0 ? (size_t)size : 0;
		}
	return 0;
}

/* A received buffer is one datagram, or with UDP_GRO a train of segments of
 * one size (the last may be shorter) from one sender: the records a peer's
 * UDP_SEGMENT send carried, delivered in one piece so the kernel skipped
 * cutting and queueing each. */
static void link_udp_received(struct node *n, int fd, const struct msghdr *m, const uint8_t *buf, size_t len)
{
	const struct sockaddr_in *from = m->msg_name;
	size_t seg = link_gro_size(m);
	if (m->msg_flags & MSG_TRUNC)
		return link_drop_from(n, DROP_BAD_FRAME, PROTO_UDP, from);
	if (!seg || seg >= len)
		return link_udp_datagram(n, fd, from, m->msg_namelen, buf, len);
	for (size_t off = 0; off < len; off += seg)
		link_udp_datagram(n, fd, from, m->msg_namelen, buf + off, len - off < seg ? len - off : seg);
}

/* ---- ICMP errors ---------------------------------------------------------
 * With IP_RECVERR the kernel queues an error for each ICMP message our UDP
 * datagrams provoke, naming the datagram's destination.  "Port unreachable"
 * from a peer's host means its process is gone (a crash, SIGKILL): the
 * link turns quiet at once, so routing and the DHT stop using it, and a
 * PING LINK_REFUSED_CONFIRM_MS later asks again; a second refusal closes
 * it, seconds before LINK_DEAD_MS of silence would.  Anything heard from
 * the peer clears the mark.  An off-path attacker forging ICMP must guess
 * both ends' addresses and ports, and gains a reroute or a re-dial. */

/* <linux/errqueue.h>'s struct sock_extended_err (a fixed kernel ABI; musl
 * ships no kernel headers). */
struct link_ee {
	uint32_t ee_errno;
	uint8_t ee_origin, ee_type, ee_code, ee_pad;
	uint32_t ee_info, ee_data;
};

enum { LINK_EE_ORIGIN_ICMP = 2, LINK_ICMP_UNREACH = 3, LINK_ICMP_PORT_UNREACH = 3, LINK_ICMP_TIME_EXCEEDED = 11 };

static void link_refused(struct node *n, int fd, const struct sockaddr_in *dst)
{
	uint64_t now = ev_now(&n->loop);
	for (struct link *l = n->links; l; l = l->next) {
		if (l->proto != PROTO_UDP || l->fd != fd || l->state != LINK_UP || !link_sockaddr_eq(&l->remote, dst))
			continue;
		if (link_refused_pending(l) && now - l->refused_ms >= LINK_REFUSED_CONFIRM_MS) {
			char who[64];
			link_describe(l, who);
			log_info("link", "%s dead: its port is closed (ICMP port unreachable, twice)", who);
			link_close(l, 0);
			continue;
		}
		if (link_refused_pending(l))
			continue;               /* already asked */
		l->refused_ms = now;    /* link_keepalive asks again after the confirm delay */
		n->links_gen++;
		ev_timer_arm(&n->loop, &l->timer, LINK_REFUSED_CONFIRM_MS);
		if (l->peer_known)      /* what we relay through it would be lost meanwhile */
			link_relays_failed(n, &l->peer.addr, false);
	}
}

static void link_udp_errors(struct node *n, int fd)
{
	for (int i = 0; i < 64; i++) {
		struct sockaddr_in dst;
		uint8_t data[64];
		union {
			char buf[CMSG_SPACE(sizeof(struct link_ee) + sizeof(struct sockaddr_in))];
			struct cmsghdr align;
		} ctl;
		struct iovec iov = { data, sizeof data };
		struct msghdr m = { .msg_name = &dst, .msg_namelen = sizeof dst, .msg_iov = &iov, .msg_iovlen = 1,
				    .msg_control = ctl.buf, .msg_controllen = sizeof ctl.buf };
		if (recvmsg(fd, &m, MSG_ERRQUEUE | MSG_DONTWAIT) < 0)
			return;
		for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
			if (c->cmsg_level != IPPROTO_IP || c->cmsg_type != IP_RECVERR)
				continue;
			struct link_ee ee;
			memcpy(&ee, CMSG_DATA(c), sizeof ee);
			if (ee.ee_origin != LINK_EE_ORIGIN_ICMP || m.msg_namelen != sizeof dst ||
			    dst.sin_family != AF_INET)
				continue;
			if (ee.ee_type == LINK_ICMP_UNREACH && ee.ee_code == LINK_ICMP_PORT_UNREACH)
				link_refused(n, fd, &dst);
			else if (ee.ee_type == LINK_ICMP_TIME_EXCEEDED && n->up.ttl_expired)
				n->up.ttl_expired(n, &dst);
		}
	}
}

/* ---- UDP reads -------------------------------------------------------- */

/* How many datagrams to ask the next recvmmsg for: LINK_BATCH, or fewer
 * when the last ones were coalesced trains, so that a wake-up reads about
 * LINK_RX_TURN_BYTES.  What a turn reads goes on (to lwIP and its socket,
 * or the tap) only once the reading stops; 64 trains of 60 KB were up to
 * the whole TCP window of a flow into a user-mode node, which the sender
 * then waited for in full before the window reopened. */
static unsigned link_rx_slots(const struct link_rx *x, size_t left)
{
	size_t k = x->avg_bytes ? left / x->avg_bytes : LINK_BATCH;
	return k < 1 ? 1 : k > LINK_BATCH ? LINK_BATCH : (unsigned)k;
}

/* Up to LINK_BATCH datagrams per recvmmsg, a few calls per wake-up at most
 * and about LINK_RX_TURN_BYTES, so one busy socket cannot starve the rest
 * and its data moves on in steps. */
static void link_udp_readable(struct ev_loop *loop, int fd, void *arg, uint32_t events)
{
	struct node *n = arg;
	enum { SLOT = LINK_RX_SLOT_BYTES };
	(void)loop;
	if (events & EPOLLERR)
		link_udp_errors(n, fd);
	if (!n->rx)
		n->rx = calloc(1, sizeof *n->rx);
	struct link_rx *x = n->rx;
	/* 4 MiB of address space; pages are only resident once a datagram
	 * (or a coalesced train) has been written into them. */
	if (!x || (!x->buf && !(x->buf = malloc(LINK_BATCH * SLOT))))
		return;
	size_t left = LINK_RX_TURN_BYTES;
	for (int round = 0; round < 4; round++) {
		unsigned want = link_rx_slots(x, left);
		for (unsigned i = 0; i < want; i++) {
			x->iov[i] = (struct iovec){ x->buf + i * SLOT, SLOT };
			x->msgs[i].msg_hdr = (struct msghdr){ .msg_name = &x->from[i],
							      .msg_namelen = sizeof x->from[i],
							      .msg_iov = &x->iov[i], .msg_iovlen = 1,
							      .msg_control = x->ctl[i].buf,
							      .msg_controllen = sizeof x->ctl[i].buf };
		}
		int r = recvmmsg(fd, x->msgs, want, MSG_DONTWAIT, NULL);
		if (r < 0 && link_udp_soft_error(errno)) {
			link_udp_errors(n, fd);         /* reported once, then gone: read on */
			continue;
		}
		if (r <= 0)
			return;
		size_t got = 0;
		for (int i = 0; i < r; i++) {
			got += x->msgs[i].msg_len;
			link_udp_received(n, fd, &x->msgs[i].msg_hdr, x->iov[i].iov_base, x->msgs[i].msg_len);
		}
		size_t avg = got / (unsigned)r, decayed = x->avg_bytes - x->avg_bytes / 8;
		x->avg_bytes = avg > decayed ? avg : decayed;   /* a keepalive amid trains: still trains */
		if ((unsigned)r < want || got >= left)
			return;
		left -= got;
	}
}

/* ---- TCP streams: framing, connecting, draining -------------------------- */

/* Take whole frames out of the TCP read buffer.  false: close the link. */
static bool link_tcp_frames(struct link *l)
{
	struct link_tcp *t = l->tcp;
	struct node *n = l->node;
	for (;;) {
		ssize_t r = recv(l->fd, t->rbuf + t->rlen,
				 WIRE_TCP_FRAME_HDR_BYTES + WIRE_MAX_WIRE_BYTES - t->rlen, MSG_DONTWAIT);
		if (r == 0)
			return false;
		if (r < 0)
			return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
		t->rlen += (size_t)r;
		while (t->rlen >= WIRE_TCP_FRAME_HDR_BYTES && (l->state != LINK_CLOSED || l->drain_until_ms)) {
			size_t flen = (size_t)t->rbuf[0] << 8 | t->rbuf[1];
			if (flen == 0 || flen > WIRE_MAX_WIRE_BYTES) {
				link_drop(l, DROP_BAD_FRAME);
				return false;
			}
			if (t->rlen < WIRE_TCP_FRAME_HDR_BYTES + flen)
				break;
			link_input(n, l, l->fd, &l->remote, t->rbuf + 2, flen);
			t->rlen -= WIRE_TCP_FRAME_HDR_BYTES + flen;
			memmove(t->rbuf, t->rbuf + WIRE_TCP_FRAME_HDR_BYTES + flen, t->rlen);
		}
		if (l->state == LINK_CLOSED && !l->drain_until_ms)
			return true;
	}
}

static void link_tcp_connected(struct link *l)
{
	int err = 0;
	socklen_t el = sizeof err;
	getsockopt(l->fd, SOL_SOCKET, SO_ERROR, &err, &el);
	if (err) {
		log_debug("link", "tcp connect failed: %s", strerror(err));
		link_close(l, 0);
		return;
	}
	link_hs_begin(l);
	link_tcp_watch(l);
}

/* Our BYE went out: the rest of our queue, then the peer's stragglers,
 * until its BYE (link_on_straggler ends the drain) or end of stream. */
static void link_tcp_drain_event(struct link *l, uint32_t events)
{
	bool more = true;
	if ((events & EPOLLOUT) && link_tcp_flush(l) < 0)
		more = false;
	if (more && (events & (EPOLLIN | EPOLLERR | EPOLLHUP)))
		more = link_tcp_frames(l) && l->drain_until_ms;
	if (!more) {
		l->drain_until_ms = 0;
		l->node->reap_pending = true;
		return link_tcp_close_fd(l);
	}
	link_tcp_drain_watch(l);
}

static void link_tcp_event(struct ev_loop *loop, int fd, void *arg, uint32_t events)
{
	struct link *l = arg;
	(void)loop;
	(void)fd;
	if (l->state == LINK_CLOSED)
		return link_tcp_drain_event(l, events);
	if (l->state == LINK_CONNECTING && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
		link_tcp_connected(l);
		return;
	}
	if ((events & EPOLLOUT) && link_tcp_flush(l) < 0) {
		link_close(l, 0);
		return;
	}
	if ((events & (EPOLLIN | EPOLLERR | EPOLLHUP)) && !link_tcp_frames(l)) {
		if (l->state != LINK_CLOSED) {
			char who[64];
			link_describe(l, who);
			log_debug("link", "%s: stream closed", who);
			link_close(l, 0);
		}
	}
}

static void link_tcp_watch(struct link *l)
{
	if (l->state == LINK_CLOSED || l->fd < 0)
		return;
	bool want = l->state == LINK_CONNECTING || l->tcp->wq_len > l->tcp->wq_off;
	if (want == l->tcp->want_writable)
		return;
	l->tcp->want_writable = want;
	ev_fd_watch(&l->node->loop, l->fd, EPOLLIN | (want ? EPOLLOUT : 0), link_tcp_event, l);
}

/* ---- unproven TCP streams ---------------------------------------------------
 * Anyone may open TCP streams to our listener and say nothing; each holds a
 * descriptor and a link until LINK_HANDSHAKE_TIMEOUT_MS.  At most
 * LINK_UNPROVEN_MAX are held, LINK_UNPROVEN_PER_IP_MAX per source address;
 * past either, the oldest one (of that source, or of all) is closed for the
 * new one.  Refusing the new one instead would let a flood that keeps the
 * table full shut out every joiner for as long as it lasts; evicting the
 * oldest means a joiner is lost only if LINK_UNPROVEN_MAX streams arrive
 * within its one round trip, and an address's own flood pushes out only
 * its own streams. */

static void link_unproven_evict(struct node *n, struct link *l)
{
	char who[64];
	link_describe(l, who);
	log_drop(&n->drops, DROP_PENDING_EVICTED, ev_now(&n->loop), who);
	link_close(l, 0);
}

/* The stream to close so that one more from ip fits, or NULL. */
static struct link *link_unproven_victim(struct node *n, uint32_t ip)
{
	struct link *oldest_of_ip = NULL;
	unsigned of_ip = 0;
	for (unsigned i = 0; i < n->n_unproven; i++)
		if (n->unproven[i]->remote.sin_addr.s_addr == ip && !of_ip++)
			oldest_of_ip = n->unproven[i];
	if (of_ip >= LINK_UNPROVEN_PER_IP_MAX)
		return oldest_of_ip;
	return n->n_unproven >= LINK_UNPROVEN_MAX ? n->unproven[0] : NULL;
}

static bool link_unproven_add(struct node *n, struct link *l)
{
	if (!n->unproven && !(n->unproven = calloc(LINK_UNPROVEN_MAX, sizeof *n->unproven)))
		return false;
	struct link *victim = link_unproven_victim(n, l->remote.sin_addr.s_addr);
	if (victim)
		link_unproven_evict(n, victim);
	n->unproven[n->n_unproven++] = l;
	return true;
}

/* accept4 failed.  Out of descriptors, the listener rests (ev_fd_rest) and
 * the oldest unproven stream goes, so that the control socket and our own
 * dials find a descriptor meanwhile.  True: no more to accept now. */
static bool link_tcp_accept_failed(struct node *n, int lfd)
{
	bool out_of_fds = errno == EMFILE || errno == ENFILE;
	bool stop = ev_accept_failed(&n->loop, lfd, &n->drops, DROP_FD_LIMIT, "tcp accept");
	if (out_of_fds && n->n_unproven)
		link_unproven_evict(n, n->unproven[0]);
	return stop;
}

static void link_tcp_accept(struct ev_loop *loop, int lfd, void *arg, uint32_t events)
{
	struct node *n = arg;
	(void)events;
	for (int i = 0; i < 64; i++) {
		struct sockaddr_in sa;
		socklen_t sl = sizeof sa;
		int fd = accept4(lfd, (struct sockaddr *)&sa, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0 && link_tcp_accept_failed(n, lfd))
			return;
		if (fd < 0)
			continue;
		if (sa.sin_family == AF_INET && !link_underlay_ok(n, PROTO_TCP, &sa)) {
			close(fd);
			continue;
		}
		int one = 1;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		struct link *l = sa.sin_family == AF_INET ? link_new(n, PROTO_TCP, fd, &sa, false) : NULL;
		if (!l || ev_fd_watch(loop, fd, EPOLLIN, link_tcp_event, l) < 0) {
			log_drop(&n->drops, DROP_LINK_TABLE_FULL, ev_now(loop), "tcp accept");
			if (l) {
				l->state = LINK_CLOSED;
				l->fd = -1;     /* closed here: the reaper must not close it again */
				n->reap_pending = true;
			}
			close(fd);
			continue;
		}
		l->state = LINK_AWAIT_INIT;
		if (!link_unproven_add(n, l)) {
			link_close(l, 0);
			continue;
		}
		ev_timer_arm(loop, &l->timer, LINK_HANDSHAKE_TIMEOUT_MS);
	}
}

/* ---- dialling, probes, certificate checks, start --------------------------- */

/* Bursts from a fast local sender (a TCP window's worth of packets) must not
 * overflow the kernel's default ~200 KB UDP buffers between two loop turns.
 * The kernel caps the request at net.core.[rw]mem_max unless we may force. */
static void link_udp_buffers(int fd)
{
	int size = LINK_UDP_BUFFER_BYTES;
	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0)
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
	if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size) < 0)
		setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
	/* Accept coalesced trains (link_udp_received splits them); older
	 * kernels refuse the option and deliver datagram by datagram. */
	int one = 1;
	if (!getenv("IPOP_NO_OFFLOAD"))
		setsockopt(fd, SOL_UDP, UDP_GRO, &one, sizeof one);
	setsockopt(fd, IPPROTO_IP, IP_RECVERR, &one, sizeof one);     /* link_udp_errors */
}

static bool link_listens(const struct node *n, uint8_t proto)
{
	for (unsigned i = 0; i < n->n_listeners; i++)
		if (n->listeners[i].proto == proto)
			return true;
	return false;
}

static int link_udp_dial_socket(struct node *n)
{
	for (unsigned i = 0; i < n->n_listeners; i++)
		if (n->listeners[i].proto == PROTO_UDP)
			return n->listeners[i].fd;
	if (n->udp_dial_fd >= 0)
		return n->udp_dial_fd;
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	link_udp_buffers(fd);
	if (ev_fd_watch(&n->loop, fd, EPOLLIN, link_udp_readable, n) < 0) {
		close(fd);
		return -EMFILE;
	}
	n->udp_dial_fd = fd;
	return fd;
}

static int link_tcp_dial_socket(const struct sockaddr_in *sa)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	if (connect(fd, (const struct sockaddr *)sa, sizeof *sa) < 0 && errno != EINPROGRESS) {
		int e = errno;
		close(fd);
		return -e;
	}
	return fd;
}

/* Start a handshake towards an endpoint; expect (may be NULL) is the ring
 * address the dial must reach, want the roles to take on once up.  A
 * cookie the peer gave us (link_probe) goes in the first HS_INIT and saves
 * the cookie round trip.  punch_ttl: see struct link. */
static struct link *link_dial_ttl(struct node *n, const struct endpoint *ep, const ring_addr *expect,
				  uint8_t want, const uint8_t *cookie, uint8_t punch_ttl)
{
	struct sockaddr_in sa = link_sockaddr_of(ep);
	if (!link_underlay_ok(n, ep->proto, &sa))
		return NULL;
	int fd = ep->proto == PROTO_UDP ? link_udp_dial_socket(n) : link_tcp_dial_socket(&sa);
	if (fd < 0)
		return NULL;
	struct link *l = link_new(n, ep->proto, fd, &sa, true);
	if (!l) {
		if (ep->proto == PROTO_TCP)
			close(fd);
		log_drop(&n->drops, DROP_LINK_TABLE_FULL, ev_now(&n->loop), "dial");
		return NULL;
	}
	l->want_roles = want;
	if (expect) {
		l->expect = *expect;
		l->expect_set = true;
	}
	if (ep->proto == PROTO_UDP) {
		if (cookie) {
			memcpy(l->hs.s->cookie, cookie, SEC_MAC_BYTES);
			l->hs.s->has_cookie = true;
		}
		l->punch_ttl = punch_ttl;
		link_hs_begin(l);
	} else {
		l->state = LINK_CONNECTING;
		link_tcp_watch(l);
		ev_timer_arm(&n->loop, &l->timer, LINK_HANDSHAKE_TIMEOUT_MS);
	}
	return l;
}

static struct link *link_dial(struct node *n, const struct endpoint *ep,
			      const ring_addr *expect, uint8_t want, const uint8_t *cookie)
{
	return link_dial_ttl(n, ep, expect, want, cookie, 0);
}

/* The peer is dialling us now (it answered our connect-to-me, or sent
 * PUNCH), so its NAT has seen its packets leave: a dial of ours to it that
 * still sends its hellos at a punch TTL may send them at the usual one.
 * Left at the punch TTL they die before the peer's NAT, and reach nobody
 * when the peer cannot dial our mapping (we are behind a symmetric NAT):
 * the answer then went unheard whenever a dial of ours was already under
 * way, and a full cone peer stayed relayed (t_natlab's F-S pair: 2 runs
 * in 40 past 30 s).  The tries start over: a round of hellos at the usual
 * TTL. */
static void link_punch_lift(struct link *l)
{
	if (l->state != LINK_AWAIT_RESP || !l->punch_ttl)
		return;
	l->punch_ttl = 0;
	l->hs.tries = 0;
	link_hs_init_send(l);
	ev_timer_arm(&l->node->loop, &l->timer, LINK_HELLO_RETRY_MS);
}

/* An RTT probe: an HS_INIT without a cookie, whose sender index is a token
 * and not a link.  The responder answers with HS_COOKIE and keeps nothing
 * (link_on_hs_init checks the cookie before it makes a link), so a probe
 * costs each end one datagram and no state; the answer comes back through
 * up.probe_reply.  Proximity neighbour selection (section 07) measures
 * its far candidates this way instead of linking with all of them. */
static void link_probe(struct node *n, const struct sockaddr_in *to, uint32_t token)
{
	int fd = link_udp_dial_socket(n);
	struct wire_hs_init m = { .sender = token, .mode = (uint8_t)n->sec.mode };
	uint8_t pkt[WIRE_HS_INIT_BYTES];
	if (fd < 0 || !link_underlay_ok(n, PROTO_UDP, to) ||
	    wire_hs_init_encode(pkt, sizeof pkt, &m) != WIRE_HS_INIT_BYTES)
		return;
	if (n->sec.mode != SEC_INSECURE)
		sec_mac1(&n->sec, pkt, WIRE_HS_INIT_MAC1_OFFSET, pkt + WIRE_HS_INIT_MAC1_OFFSET);
	link_note_contact(n, to);
	link_udp_queue(n, fd, to, pkt, sizeof pkt);
}

/* Close up links whose peer's certificate is revoked (when the list
 * changed) or has expired: the handshake checked both, but a link lives
 * on for days, and its peer's re-dial is refused by that same check. */
static void link_certs_recheck(struct node *n, bool crl_changed)
{
	int64_t now_s = (int64_t)time(NULL);
	for (struct link *l = n->links; l; l = l->next) {
		if (l->state != LINK_UP || !l->grant || !l->grant->serial.len)
			continue;
		bool revoked = crl_changed && sec_revoked(&n->sec, &l->grant->serial);
		if (!revoked && !sec_grant_expired(l->grant, now_s))
			continue;
		char who[64];
		link_describe(l, who);
		log_warn("sec", "closing %s: its certificate %s", who, revoked ? "is revoked" : "has expired");
		link_close(l, revoked ? BYE_REVOKED : BYE_EXPIRED);
	}
}

/* Our own certificate: peers refuse it once it ends, so say so a week
 * ahead and then daily (ipop status shows it too). */
static void link_own_cert_check(struct node *n)
{
	struct sec_ctx *c = n->sec.ctx;
	int64_t now_s = (int64_t)time(NULL), left_s = c->own_grant.not_after_s - now_s;
	char span[32];
	if (!sec_own_expiring(&n->sec, now_s) || now_s - c->own_warned_s < SEC_EXPIRY_REPEAT_S)
		return;
	c->own_warned_s = now_s;
	sec_span_str(left_s, span);
	if (sec_grant_expired(&c->own_grant, now_s))
		log_err("sec", "this node's certificate has expired: peers refuse it; issue a new one "
			"('ipop cert issue') and restart");
	else
		log_warn("sec", "this node's certificate expires in %s: issue a new one ('ipop cert issue') "
			 "and restart before then", span);
}

/* Every LINK_SEC_TICK_MS: rotate the cookie secret, re-read the revocation
 * list, close links whose certificate it now revokes or which expired, and
 * warn if our own certificate ends soon. */
static int64_t link_sec_tick(struct ev_loop *loop, struct ev_timer *t)
{
	struct node *n = container_of(t, struct node, sec_timer);
	char err[300];
	sec_cookie_rotate(&n->sec, &n->rng, ev_now(loop));
	if (n->sec.mode != SEC_CERT)
		return LINK_SEC_TICK_MS;
	int changed = sec_crl_refresh(&n->sec, err, sizeof err);
	if (changed < 0)
		log_warn("sec", "%s (keeping the previous list, %u serials)", err, n->sec.ctx->n_revoked);
	if (changed > 0)
		log_info("sec", "revocation list %s: %u serials", n->sec.ctx->crl_path, n->sec.ctx->n_revoked);
	if (changed > 0 && sec_revoked(&n->sec, &n->sec.ctx->own_grant.serial))
		log_err("sec", "this node's own certificate is revoked by %s: peers will refuse it",
			n->sec.ctx->crl_path);
	link_certs_recheck(n, changed > 0);
	link_own_cert_check(n);
	return LINK_SEC_TICK_MS;
}

static void link_start(struct node *n)
{
	n->loop.turn_end = link_turn_end;
	if (!n->rekey_ms)
		n->rekey_ms = LINK_REKEY_MS;
	sec_cookie_rotate(&n->sec, &n->rng, ev_now(&n->loop));
	ev_timer_init(&n->sec_timer, link_sec_tick);
	ev_timer_arm(&n->loop, &n->sec_timer, LINK_SEC_TICK_MS);
}

/* ===================================================================== 07 ring_
 * The ring: 160-bit arithmetic, connection roles, greedy routing and joins.
 *
 * Roles (enum ring_role) are per link and per side: local_roles say why this
 * node keeps the link, peer_roles why the peer does (told by ROLES).  A link
 * with no role on either side is closed after a grace period.
 *   near  the RING_NEAR_PER_SIDE closest peers clockwise and counter-clockwise,
 *         recomputed whenever a link comes up or goes down;
 *   far   about log2(N)/2 links to targets at harmonically distributed
 *         distances (Symphony/Brunet), N estimated from near spacing;
 *   leaf  a joining node's links to its bootstrap peers, dropped once it has
 *         near links on both sides;
 *   shortcut  a direct link to a peer whose IP traffic with us passes
 *         --shortcut-pps (section 10 counts packets, ring_sc_count), until
 *         --shortcut-idle passes without one; at most --shortcut-max.
 * Far links go, among candidates of equal ring progress, to the lowest RTT,
 * measured by a stateless probe (link_probe) before any of them is dialled.
 * Routing is greedy over every up link by the delivery mode's metric; each
 * hop strictly lowers the metric, so paths cannot loop (TTL is a backstop).
 * Among links that lower it, a stalled (slow) or silent (quiet) neighbour is
 * taken only when no better one does.
 * Joins and repairs: every RING_PROBE_MS (and at once after a near link dies)
 * a node routes connect-to-me requests to its own successor (SUCC of addr+1)
 * and predecessor (PRED of addr-1).  The node that answers replies with its
 * near peers and dials the requester; the requester dials it too unless
 * that dial arrived first (ring_defer_dial), so NATs get punched from both
 * sides without a duplicate link for every answer.  Any member may route
 * us connect-to-me messages listing endpoints of its choice, so a reply is
 * acted on only if it answers a request of ours (ring_asked_take), dials
 * back are rationed (ring_answer_rationed), and a peer's endpoints are
 * dialled only in address scopes we live in (ring_endpoint_dialable).
 * To add an inner message: a wire_ type, a ring_on_* handler, a case in
 * ring_deliver.
 * ========================================================================= */

/* Ring arithmetic works on five big-endian 32-bit words: routing computes
 * a metric per link per message, and byte loops were a tenth of a large
 * simulation's time. */
enum { RING_WORDS = RING_ADDR_BYTES / 4 };
_Static_assert(RING_ADDR_BYTES % 4 == 0, "ring addresses are whole words");

static uint32_t ring_word(const ring_addr *a, int i)
{
	const uint8_t *p = a->b + 4 * i;
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void ring_word_put(ring_addr *a, int i, uint32_t w)
{
	uint8_t *p = a->b + 4 * i;
	p[0] = (uint8_t)(w >> 24);
	p[1] = (uint8_t)(w >> 16);
	p[2] = (uint8_t)(w >> 8);
	p[3] = (uint8_t)w;
}

static ring_addr ring_sub(const ring_addr *a, const ring_addr *b)
{
	ring_addr r;
	uint64_t borrow = 0;
	for (int i = RING_WORDS - 1; i >= 0; i--) {
		uint64_t d = (uint64_t)ring_word(a, i) - ring_word(b, i) - borrow;
		borrow = d >> 63;
		ring_word_put(&r, i, (uint32_t)d);
	}
	return r;
}

static ring_addr ring_add(const ring_addr *a, const ring_addr *b)
{
	ring_addr r;
	uint64_t carry = 0;
	for (int i = RING_WORDS - 1; i >= 0; i--) {
		uint64_t s = (uint64_t)ring_word(a, i) + ring_word(b, i) + carry;
		ring_word_put(&r, i, (uint32_t)s);
		carry = s >> 32;
	}
	return r;
}

static ring_addr ring_one(void)
{
	ring_addr one = { { 0 } };
	one.b[RING_ADDR_BYTES - 1] = 1;
	return one;
}

/* Distance travelled clockwise from `from` to `to`. */
static ring_addr ring_cw(const ring_addr *from, const ring_addr *to)
{
	return ring_sub(to, from);
}

/* The shorter way round. */
static ring_addr ring_dist(const ring_addr *a, const ring_addr *b)
{
	ring_addr x = ring_cw(a, b), y = ring_cw(b, a);
	return wire_addr_cmp(&x, &y) <= 0 ? x : y;
}

/* True when x lies strictly inside the clockwise arc from a to b.  Kept for
 * range checks (DHT hand-over by arcs); the unit tests pin it down. */
__attribute__((unused))
static bool ring_between(const ring_addr *a, const ring_addr *x, const ring_addr *b)
{
	ring_addr ax = ring_cw(a, x), ab = ring_cw(a, b);
	return !wire_addr_eq(a, x) && wire_addr_cmp(&ax, &ab) < 0;
}

/* How far node x is from being the node a routed message stops at:
 * SUCC measures clockwise from the target (the first node at or after it
 * scores lowest), PRED counter-clockwise, the others the shorter way. */
static ring_addr ring_metric(uint8_t mode, const ring_addr *x, const ring_addr *target)
{
	switch (mode) {
	case MODE_SUCC:
		return ring_cw(target, x);
	case MODE_PRED:
		return ring_cw(x, target);
	default:
		return ring_dist(x, target);
	}
}

/* The address as a fraction of the ring, from its top 64 bits. */
static double ring_fraction(const ring_addr *a)
{
	struct buf b = buf_of(a->b, 8);
	return (double)buf_u64(&b) / 18446744073709551616.0;
}

static void ring_addr_hex(const ring_addr *a, char out[2 * RING_ADDR_BYTES + 1])
{
	buf_hex(a->b, RING_ADDR_BYTES, out);
}

static bool ring_link_usable(const struct link *l)
{
	return l->state == LINK_UP && l->peer_known;
}

/* ---- roles ---------------------------------------------------------- */

static const char *const ring_role_names[] = { "leaf", "near", "far", "shortcut", "relay" };

/* The role status shows first: near > shortcut > far > relay > leaf. */
static const char *ring_role_main(uint8_t roles)
{
	if (roles & ROLE_NEAR) return "near";
	if (roles & ROLE_SHORTCUT) return "shortcut";
	if (roles & ROLE_FAR) return "far";
	if (roles & ROLE_RELAY) return "relay";
	if (roles & ROLE_LEAF) return "leaf";
	return "none";
}

static bool ring_sc_only(const struct link *l);
static void ring_sc_enforce_cap(struct node *n);

/* A link that loses its near or far role here may be left a shortcut
 * only, one more for the cap: trim now, not at the next tick (the cap
 * was passed for up to RING_TICK_MS, seen by t_shortcut's 250 ms poll). */
static void ring_roles_set(struct link *l, uint8_t roles)
{
	if (l->local_roles == roles)
		return;
	bool was_sc_only = ring_sc_only(l);
	l->local_roles = roles;
	if (ring_link_usable(l))
		link_send_byte(l, WIRE_ROLES, roles);
	if (!was_sc_only && ring_sc_only(l) && l->node->ring.sc.pps)
		ring_sc_enforce_cap(l->node);
}

/* Give l these roles too: at once if it is up, else when it comes up. */
static void ring_roles_add(struct link *l, uint8_t roles)
{
	l->want_roles |= roles;
	if (l->state == LINK_UP)
		ring_roles_set(l, l->local_roles | roles);
}

/* Every change to which links are usable (up, closed) bumps links_gen
 * (section 06), and a closed link is freed only after: an entry never
 * outlives its link.  Out of memory, the view holds the links that fit:
 * routing and the neighbour choice see fewer links, never a stale one. */
static const struct ring_view *ring_view(struct node *n)
{
	struct ring_view *v = &n->ring.view;
	if (v->valid && v->links_gen == n->links_gen)
		return v;
	if (v->cap < n->n_links) {
		unsigned cap = n->n_links + 4;
		struct ring_view_ent *e = realloc(v->e, cap * sizeof *e);
		if (e) {
			v->e = e;
			v->cap = cap;
		} else
			log_warn("ring", "out of memory: routing sees %u of %u links", v->cap, n->n_links);
	}
	v->n = 0;
	for (unsigned s = 0; s < n->n_link_slots && v->n < v->cap; s++) {
		struct link *l = n->link_slots[s];
		if (l && ring_link_usable(l))
			v->e[v->n++] = (struct ring_view_ent){ .addr = l->peer.addr, .slot = (uint16_t)s };
	}
	v->links_gen = n->links_gen;
	v->valid = true;
	return v;
}

static void ring_free(struct node *n)
{
	free(n->ring.sc.peers);
	n->ring.sc.peers = NULL;
	free(n->ring.view.e);
	n->ring.view = (struct ring_view){ 0 };
	free(n->ring.deferred);
	n->ring.deferred = NULL;
	n->ring.n_deferred = 0;
}

/* The `want` closest distinct peers on one side, closest first.  Distances
 * are clockwise from us (right) or to us (left). */
static unsigned ring_side_nearest(struct node *n, bool right, ring_addr *out, unsigned want)
{
	ring_addr dist[RING_NEAR_PER_SIDE];
	unsigned k = 0;
	const struct ring_view *v = ring_view(n);
	for (unsigned s = 0; s < v->n; s++) {
		const ring_addr *a = &v->e[s].addr;
		ring_addr d = right ? ring_cw(&n->self.addr, a) : ring_cw(a, &n->self.addr);
		unsigned i = k;
		bool dup = false;
		for (unsigned j = 0; j < k; j++)
			dup |= wire_addr_eq(&out[j], a);
		if (dup)
			continue;
		while (i > 0 && wire_addr_cmp(&d, &dist[i - 1]) < 0)
			i--;
		if (i >= want)
			continue;
		unsigned last = k < want ? k : want - 1;
		for (unsigned j = last; j > i; j--) {
			dist[j] = dist[j - 1];
			out[j] = out[j - 1];
		}
		dist[i] = d;
		out[i] = *a;
		if (k < want)
			k++;
	}
	return k;
}

static bool ring_in_set(const ring_addr *a, const ring_addr *set, unsigned k)
{
	for (unsigned i = 0; i < k; i++)
		if (wire_addr_eq(a, &set[i]))
			return true;
	return false;
}

/* Would a peer at address a be one of our near neighbours? */
static bool ring_would_be_near(struct node *n, const ring_addr *a)
{
	ring_addr side[RING_NEAR_PER_SIDE];
	for (int right = 0; right <= 1; right++) {
		unsigned k = ring_side_nearest(n, right, side, RING_NEAR_PER_SIDE);
		if (k < RING_NEAR_PER_SIDE)
			return true;
		ring_addr da = right ? ring_cw(&n->self.addr, a) : ring_cw(a, &n->self.addr);
		ring_addr dk = right ? ring_cw(&n->self.addr, &side[k - 1]) : ring_cw(&side[k - 1], &n->self.addr);
		if (wire_addr_cmp(&da, &dk) < 0)
			return true;
	}
	return false;
}

/* Give the near role to exactly the closest peers on each side; once a
 * node has both sides it is in the ring and its leaf links fade. */
static void ring_near_recompute(struct node *n)
{
	ring_addr right[RING_NEAR_PER_SIDE], left[RING_NEAR_PER_SIDE];
	unsigned kr = ring_side_nearest(n, true, right, RING_NEAR_PER_SIDE);
	unsigned kl = ring_side_nearest(n, false, left, RING_NEAR_PER_SIDE);
	bool joined = kr > 0 && kl > 0;
	if (joined && !n->ring.joined)
		log_info("ring", "joined the ring");
	n->ring.joined = joined;
	struct link *l;
	link_for_each(n, l) {
		if (!ring_link_usable(l))
			continue;
		bool near = ring_in_set(&l->peer.addr, right, kr) || ring_in_set(&l->peer.addr, left, kl);
		uint8_t roles = (uint8_t)((l->local_roles & ~ROLE_NEAR) | (near ? ROLE_NEAR : 0));
		if (joined)
			roles &= (uint8_t)~ROLE_LEAF;
		ring_roles_set(l, roles);
	}
}

/* N from the spacing of our near peers: k gaps span a fraction f of the ring. */
static double ring_estimate_n(struct node *n)
{
	ring_addr right[RING_NEAR_PER_SIDE], left[RING_NEAR_PER_SIDE];
	unsigned kr = ring_side_nearest(n, true, right, RING_NEAR_PER_SIDE);
	unsigned kl = ring_side_nearest(n, false, left, RING_NEAR_PER_SIDE);
	if (kr < RING_NEAR_PER_SIDE || kl < RING_NEAR_PER_SIDE)
		return kr + kl + 1;
	ring_addr dr = ring_cw(&n->self.addr, &right[kr - 1]);
	ring_addr dl = ring_cw(&left[kl - 1], &n->self.addr);
	double f = ring_fraction(&dr) + ring_fraction(&dl);
	if (f <= 0 || f >= 1)
		return kr + kl + 1;
	return (kr + kl) / f;
}

/* Far links wanted for N nodes: about half of log2 N (Brunet). */
static unsigned ring_far_target(double n_est)
{
	if (n_est < 8)
		return 0;
	unsigned t = (unsigned)ceil(log2(n_est) / 2);
	return t > RING_FAR_MAX ? RING_FAR_MAX : t;
}

/* ---- routing -------------------------------------------------------- */

/* A link that has missed a keepalive: its peer may have crashed, and
 * LINK_DEAD_MS will tell.  Until then every message greedy routing sends
 * that way is lost, so routing passes it over while another link still
 * makes progress: a crashed node black-holes traffic for about
 * LINK_QUIET_MS instead of LINK_DEAD_MS (docs/SCALING.md, churn). */
static bool ring_link_quiet(const struct node *n, const struct link *l)
{
	return ev_now(&n->loop) - l->last_rx_ms > LINK_QUIET_MS ||
	       link_refused_pending(l);
}

/* A neighbour that stalled lately (section 06 saw a pong, or the peer's
 * PING, far later than the link's floor) or whose TCP queue backs up:
 * packets sent that way wait behind it.  A stall is remembered for
 * RING_SLOW_HOLD_MS, since a paused or CPU-starved process stalls in bursts
 * and a keepalive samples it once a second. */
static bool ring_link_slow(const struct node *n, const struct link *l)
{
	uint64_t now = ev_now(&n->loop);
	return (l->rtt_spike_ms && now - l->rtt_spike_ms < RING_SLOW_HOLD_MS) ||
	       (l->proto == PROTO_TCP && l->tcp->wq_len - l->tcp->wq_off > RING_SLOW_QUEUE_BYTES);
}

enum ring_hop_class { HOP_GOOD, HOP_SLOW, HOP_QUIET, HOP__CLASSES };

/* How routing ranks a link: a quiet one last, a slow one after every good
 * one, except that a slow link to the target itself is still the way there. */
static enum ring_hop_class ring_hop_class(const struct node *n, const struct link *l, const ring_addr *m)
{
	static const ring_addr zero;
	if (ring_link_quiet(n, l))
		return HOP_QUIET;
	return ring_link_slow(n, l) && !wire_addr_eq(m, &zero) ? HOP_SLOW : HOP_GOOD;
}

/* The up link that lowers the metric most, or NULL when no neighbour is
 * closer than this node.  Links are compared by their entries in the ring
 * view, in slot order; a link itself is read only to class it.  A slow link is the choice only when no good link
 * lowers the metric at all, a quiet one only when no other does.  Every
 * choice still lowers the metric, so paths stay loop-free.
 * NEAREST never takes a quiet link: the message may end wherever greedy
 * routing stops, and here beats a likely black hole.  Next to a crashed
 * node's keys the quiet link is always the only progress, so until
 * LINK_DEAD_MS closed it every DHT request for those keys was lost (t_dht
 * case 3: 80% of gets timed out for 4.3-5.4 s although two copies lived);
 * here is the next nearest node, which holds a copy. */
static struct link *ring_next_hop(struct node *n, uint8_t mode, const ring_addr *target)
{
	if (wire_addr_eq(target, &n->self.addr))
		return NULL;            /* our own metric is 0 in every mode: every packet for us */
	struct ring_hop_memo *mo = &n->ring.memo;
	uint64_t now = ev_now(&n->loop);
	if (mo->hop && mo->links_gen == n->links_gen && mo->now_ms == now && mo->mode == mode &&
	    wire_addr_eq(&mo->target, target) && !(mo->hop->proto == PROTO_TCP && ring_link_slow(n, mo->hop)))
		return mo->hop;         /* a TCP queue that filled since is the one class change left */
	ring_addr self = ring_metric(mode, &n->self.addr, target);
	ring_addr best[HOP__CLASSES] = { self, self, self };
	struct link *hop[HOP__CLASSES] = { NULL, NULL, NULL };
	const struct ring_view *v = ring_view(n);
	/* Most often the link with the lowest metric is good, and is the
	 * answer: found from the view alone, with one link read. */
	const struct ring_view_ent *first = NULL;
	for (unsigned i = 0; i < v->n; i++) {
		ring_addr m = ring_metric(mode, &v->e[i].addr, target);
		if (wire_addr_cmp(&m, &best[HOP_GOOD]) < 0) {
			best[HOP_GOOD] = m;
			first = &v->e[i];
		}
	}
	if (first && ring_hop_class(n, n->link_slots[first->slot], &best[HOP_GOOD]) == HOP_GOOD)
		hop[HOP_GOOD] = n->link_slots[first->slot];
	else {
		best[HOP_GOOD] = self;
		for (unsigned i = 0; i < v->n; i++) {
			ring_addr m = ring_metric(mode, &v->e[i].addr, target);
			struct link *l = n->link_slots[v->e[i].slot];
			enum ring_hop_class c = ring_hop_class(n, l, &m);
			if (wire_addr_cmp(&m, &best[c]) < 0) {
				best[c] = m;
				hop[c] = l;
			}
		}
	}
	*mo = (struct ring_hop_memo){ .target = *target, .mode = mode, .links_gen = n->links_gen,
				      .now_ms = now, .hop = hop[HOP_GOOD] };
	if (mode == MODE_NEAREST)
		return hop[HOP_GOOD] ? hop[HOP_GOOD] : hop[HOP_SLOW];
	return hop[HOP_GOOD] ? hop[HOP_GOOD] : hop[HOP_SLOW] ? hop[HOP_SLOW] : hop[HOP_QUIET];
}

static void ring_drop(struct node *n, enum drop_reason why, const ring_addr *src)
{
	char who[2 * RING_ADDR_BYTES + 1];
	ring_addr_hex(src, who);
	log_drop(&n->drops, why, ev_now(&n->loop), who);
}

/* The message for f: its header written in front of the payload when the
 * payload's buffer has room (f->writable), else header and payload encoded
 * into buf (WIRE_MAX_PACKET_BYTES).  -1 if it would not fit in a record. */
static ssize_t ring_encode(const struct wire_routed *f, uint8_t *buf, uint8_t **msg)
{
	size_t head = wire_routed_head_bytes(f);
	*msg = buf;
	if (!f->writable || head + f->len > WIRE_MAX_PACKET_BYTES)
		return wire_routed_encode(buf, WIRE_MAX_PACKET_BYTES, f);
	*msg = f->writable - head;
	struct wbuf w = wbuf_of(*msg, head);
	wire_routed_head_put(&w, f);
	return wbuf_done(&w) < 0 ? -1 : (ssize_t)(head + f->len);
}

static void ring_forward(struct node *n, struct link *hop, const struct wire_routed *r)
{
	if (r->ttl == 0) {
		ring_drop(n, DROP_TTL_EXPIRED, &r->src);
		return;
	}
	struct wire_routed f = *r;
	f.ttl--;
	f.hops = (uint8_t)(f.hops < 255 ? f.hops + 1 : 255);
	uint8_t buf[WIRE_MAX_PACKET_BYTES], *msg;
	ssize_t len = ring_encode(&f, buf, &msg);
	if (len < 0)
		return ring_drop(n, DROP_TOO_BIG, &r->src);
	n->counters_routed++;
	link_send(hop, msg, (size_t)len);
}

static void ring_deliver(struct node *n, const struct wire_routed *r);

/* Greedy routing stopped here, next to a target we have no link to (a
 * firewall between ring neighbours, or a link not up yet).  Once per
 * message, go where a link to it is: a peer known to hold one (section
 * 09: a relay candidate of our dial to the target), else the target's
 * neighbour on its far side, which likely has one.  Only the first is sure
 * where the target is reached only through relays: the far neighbour may
 * be as cut off from it as we are, and route back here (a node behind a
 * UDP-blocking firewall lost half its pings for the 3.5 s its relayed
 * links took to form). */
static struct link *ring_detour_hop(struct node *n, const ring_addr *target)
{
	struct link *known = n->up.toward ? n->up.toward(n, target) : NULL;
	if (known)
		return known;
	ring_addr right = ring_cw(&n->self.addr, target), left = ring_cw(target, &n->self.addr);
	uint8_t mode = wire_addr_cmp(&right, &left) <= 0 ? MODE_SUCC : MODE_PRED;
	ring_addr one = ring_one();
	ring_addr past = mode == MODE_SUCC ? ring_add(target, &one) : ring_sub(target, &one);
	return ring_next_hop(n, mode, &past);
}

/* Forward towards via (if set) or dst, or deliver here. */
static void ring_route(struct node *n, struct wire_routed *r)
{
	if ((r->flags & ROUTED_HAS_VIA) && wire_addr_eq(&r->via, &n->self.addr))
		r->flags &= (uint8_t)~ROUTED_HAS_VIA;
	bool via = r->flags & ROUTED_HAS_VIA;
	const ring_addr *target = via ? &r->via : &r->dst;
	uint8_t mode = via ? MODE_EXACT : r->mode;
	struct link *hop = ring_next_hop(n, mode, target);
	if (hop) {
		ring_forward(n, hop, r);
		return;
	}
	if (mode == MODE_EXACT && !wire_addr_eq(target, &n->self.addr) && !(r->flags & ROUTED_DETOUR) &&
	    (hop = ring_detour_hop(n, target))) {
		r->flags |= ROUTED_DETOUR;
		ring_forward(n, hop, r);
		return;
	}
	if (mode == MODE_EXACT && !wire_addr_eq(target, &n->self.addr)) {
		ring_drop(n, DROP_NO_ROUTE, &r->src);
		if (n->up.undeliverable)
			n->up.undeliverable(n, r);
		return;
	}
	ring_deliver(n, r);
}

/* Originate a routed message; via may be NULL. */
static void ring_send(struct node *n, uint8_t mode, const ring_addr *dst, const ring_addr *via,
		      uint8_t inner, const uint8_t *payload, size_t len)
{
	struct wire_routed r = {
		.mode = mode, .ttl = RING_MAX_HOPS, .src = n->self.addr, .dst = *dst,
		.inner = inner, .len = (uint16_t)len, .payload = payload,
	};
	if (via && !wire_addr_eq(via, &n->self.addr)) {
		r.flags = ROUTED_HAS_VIA;
		r.via = *via;
	}
	ring_route(n, &r);
}

/* An IP packet to the node at dst.  writable: pkt itself, if
 * WIRE_ROUTED_ROOM_BYTES before it may take the header, else NULL. */
static void ring_send_ip(struct node *n, const ring_addr *dst, const uint8_t *pkt, size_t len,
			 uint8_t *writable)
{
	struct wire_routed r = {
		.mode = MODE_EXACT, .ttl = RING_MAX_HOPS, .src = n->self.addr, .dst = *dst,
		.inner = INNER_IP, .len = (uint16_t)len, .payload = pkt, .writable = writable,
	};
	ring_route(n, &r);
}

/* ---- traffic counts and the shortcut cap ----------------------------------
 * Section 10 reports every IP packet to or from a peer (ring_sc_count): one
 * probe of a small hash table and an increment.  Each tick turns the counts
 * into a decayed rate (ring_rate_decay), and ring_sc_upkeep (below) acts on
 * the rates.  The cap counts links kept only as shortcuts, by either end,
 * plus requests under way; a newcomer takes the least used one's place. */

/* The rate after elapsed_ms in which `packets` were seen: an exponential
 * moving average with time constant window_ms, so a steady flow of r pps
 * converges to r and a stopped one decays by 1/e per window. */
static double ring_rate_decay(double pps, uint32_t packets, uint64_t elapsed_ms, uint64_t window_ms)
{
	if (!elapsed_ms)
		return pps;
	double keep = exp(-(double)elapsed_ms / (double)window_ms);
	return pps * keep + (1.0 - keep) * packets * 1000.0 / (double)elapsed_ms;
}

/* Which of n shortcuts to trim for a newcomer at pps: the least used, when
 * the newcomer carries more than twice its rate (the margin keeps two
 * similar flows from trading one slot back and forth); -1: none. */
static int ring_sc_victim(const double *rates, unsigned n, double pps)
{
	int v = -1;
	for (unsigned i = 0; i < n; i++)
		if (v < 0 || rates[i] < rates[v])
			v = (int)i;
	return v >= 0 && pps > 2 * rates[v] ? v : -1;
}

/* A link kept only as a shortcut, by either end: what the cap counts.  An
 * up link's wish counts too: one that won a duplicate race inherits it
 * (link_close_duplicate) before its roles catch up. */
static bool ring_sc_only(const struct link *l)
{
	uint8_t r = l->state == LINK_UP ? l->local_roles | l->peer_roles | (l->want_roles & ROLE_SHORTCUT)
					: l->want_roles;
	return l->state != LINK_CLOSED && (r & ROLE_SHORTCUT) && !(r & ~ROLE_SHORTCUT);
}

/* SHA-1 addresses are uniform: their first bytes are a fine hash.  The
 * per-packet path is the first loop; only a new peer pays for the second. */
static struct ring_sc_peer *ring_sc_find(struct node *n, const ring_addr *a, bool add)
{
	unsigned h = (unsigned)(a->b[0] | a->b[1] << 8);
	if (!n->ring.sc.peers && (!add || !(n->ring.sc.peers = calloc(RING_SC_SLOTS, sizeof *n->ring.sc.peers))))
		return NULL;
	for (unsigned i = 0; i < RING_SC_PROBE; i++) {
		struct ring_sc_peer *p = &n->ring.sc.peers[(h + i) % RING_SC_SLOTS];
		if (p->used && wire_addr_eq(&p->addr, a))
			return p;
	}
	if (!add)
		return NULL;
	struct ring_sc_peer *free_slot = NULL, *quiet = NULL;
	for (unsigned i = 0; i < RING_SC_PROBE && !free_slot; i++) {
		struct ring_sc_peer *p = &n->ring.sc.peers[(h + i) % RING_SC_SLOTS];
		if (!p->used)
			free_slot = p;
		else if ((!quiet || p->pps < quiet->pps) && !link_find_peer(n, &p->addr, false))
			quiet = p;
	}
	struct ring_sc_peer *p = free_slot ? free_slot : quiet;
	if (!p)
		return NULL;
	*p = (struct ring_sc_peer){ .addr = *a, .used = true, .last_ms = ev_now(&n->loop) };
	return p;
}

/* Section 10's report: one IP packet to or from the node at a. */
static void ring_sc_count(struct node *n, const ring_addr *a)
{
	struct ring_sc_peer *p;
	if (n->ring.sc.pps && (p = ring_sc_find(n, a, true)))
		p->packets++;
}

/* A peer's traffic rate, or -1 when it is not counted. */
static double ring_sc_rate(struct node *n, const ring_addr *a)
{
	struct ring_sc_peer *p = ring_sc_find(n, a, false);
	return p ? p->pps : -1;
}

/* Stop keeping the peer of l as a shortcut, on l and on any parallel dial
 * to it; close those links if nothing else keeps them. */
static void ring_sc_drop(struct node *n, struct link *l, const char *why)
{
	char who[64];
	link_describe(l, who);
	log_info("ring", "shortcut %s closes: %s", who, why);
	ring_addr a = l->peer_known ? l->peer.addr : l->expect;
	for (struct link *o = n->links; o; o = o->next) {
		if (o->state == LINK_CLOSED || !wire_addr_eq(o->peer_known ? &o->peer.addr : &o->expect, &a))
			continue;
		o->want_roles &= (uint8_t)~ROLE_SHORTCUT;
		ring_roles_set(o, o->local_roles & (uint8_t)~ROLE_SHORTCUT);
		if (!o->local_roles && !(o->peer_roles & ~ROLE_SHORTCUT))
			link_close(o, BYE_UNNEEDED);
	}
}

/* Parallel dials to one peer's endpoints are one shortcut. */
static bool ring_sc_listed(const struct link *l, struct link *const *links, unsigned k)
{
	const ring_addr *a = l->peer_known ? &l->peer.addr : &l->expect;
	for (unsigned i = 0; i < k; i++)
		if (wire_addr_eq(links[i]->peer_known ? &links[i]->peer.addr : &links[i]->expect, a))
			return true;
	return false;
}

/* The shortcut-only links and their rates; returns how many, and counts
 * our requests still under way in *pending. */
static unsigned ring_sc_collect(struct node *n, struct link **links, double *rates, unsigned *pending)
{
	unsigned k = 0;
	uint64_t now = ev_now(&n->loop);
	for (struct link *l = n->links; l && k < RING_SC_MAX_LIMIT * 2; l = l->next)
		if (ring_sc_only(l) && !ring_sc_listed(l, links, k)) {
			double r = l->peer_known ? ring_sc_rate(n, &l->peer.addr) : 0;
			links[k] = l;
			rates[k++] = r > 0 ? r : 0;
		}
	*pending = 0;
	for (unsigned i = 0; n->ring.sc.peers && i < RING_SC_SLOTS; i++) {
		const struct ring_sc_peer *p = &n->ring.sc.peers[i];
		*pending += p->used && p->dial_ms && now - p->dial_ms < RING_SC_RETRY_MS &&
			    !link_find_peer(n, &p->addr, false);
	}
	return k;
}

/* Room for one more shortcut, for a peer at pps: under the cap, or once
 * the least used shortcut is trimmed. */
static bool ring_sc_room(struct node *n, double pps)
{
	struct link *links[RING_SC_MAX_LIMIT * 2];
	double rates[RING_SC_MAX_LIMIT * 2];
	unsigned pending, k = ring_sc_collect(n, links, rates, &pending);
	while (k + pending >= n->ring.sc.max) {
		int v = ring_sc_victim(rates, k, pps);
		if (v < 0)
			return false;
		n->ring.sc.trimmed++;
		ring_sc_drop(n, links[v], "trimmed for a busier peer");
		links[v] = links[--k];
		rates[v] = rates[k];
	}
	return true;
}

/* Shortcuts the peers asked for may pass the cap: trim the least used.
 * A shortcut whose peer left the traffic table (evicted) counts as idle. */
static void ring_sc_enforce_cap(struct node *n)
{
	for (struct link *l = n->links; l; l = l->next)
		if (ring_link_usable(l) && (l->local_roles & ROLE_SHORTCUT) && !ring_sc_find(n, &l->peer.addr, false))
			ring_sc_drop(n, l, "no traffic counted");
	struct link *links[RING_SC_MAX_LIMIT * 2];
	double rates[RING_SC_MAX_LIMIT * 2];
	unsigned pending, k = ring_sc_collect(n, links, rates, &pending);
	while (k > n->ring.sc.max) {
		int v = ring_sc_victim(rates, k, INFINITY);
		n->ring.sc.trimmed++;
		ring_sc_drop(n, links[v], "over --shortcut-max");
		links[v] = links[--k];
		rates[v] = rates[k];
	}
}

/* ===================================================================== 07b ring_
 * The ring, continued: joining and keeping it.  Connect-to-me requests and
 * replies (joins, repairs, far-link candidates, shortcuts asked for), the
 * dials they lead to and what limits them (tokens, rations, scopes), the
 * claims on our address, overlay echo, the periodic upkeep, rendezvous
 * (bootstraps, remembered peers, merging split rings), shortcuts, and the
 * hooks through which links report to the ring.  One room with section 07,
 * split for length: the same prefix and state (struct ring_state, 05b);
 * 07 holds the arithmetic, roles and routing these use.
 * ========================================================================= */

/* ---- connect-to-me -------------------------------------------------- */

static uint8_t ring_punch_ttl(struct node *n, const struct peer_info *pi, const struct endpoint *ep);
static bool ring_unasked_poisons(struct node *n, const struct peer_info *pi, const struct endpoint *ep,
				bool probe);

static bool ring_public_ip(uint32_t ip)        /* host order */
{
	uint8_t a = ip >> 24, b = (ip >> 16) & 0xff;
	return !(a == 0 || a == 10 || a == 127 || (a == 100 && (b & 0xc0) == 64) || (a == 169 && b == 254) ||
		 (a == 172 && (b & 0xf0) == 16) || (a == 192 && b == 168) || a >= 224);
}

/* Where an address lives.  A peer's endpoints are its word only (its own
 * in a handshake, a third party's in connect-to-me messages), and a dial
 * sends six handshakes and then tries TCP: forged endpoints made any member
 * aim us at services on our host (loopback), our LAN or hosts in general. */
enum ring_scope {
	RING_SCOPE_NEVER,       /* 0/8, multicast, reserved, broadcast: nobody's endpoint */
	RING_SCOPE_LOOPBACK,    /* 127/8: this host */
	RING_SCOPE_LINK_LOCAL,  /* 169.254/16: this link */
	RING_SCOPE_PRIVATE,     /* RFC 1918 and the CGN range: a site */
	RING_SCOPE_PUBLIC,
};

static enum ring_scope ring_scope_of(uint32_t ip)
{
	uint8_t a = ip >> 24, b = (ip >> 16) & 0xff;
	if (a == 0 || a >= 224)
		return RING_SCOPE_NEVER;
	if (a == 127)
		return RING_SCOPE_LOOPBACK;
	if (a == 169 && b == 254)
		return RING_SCOPE_LINK_LOCAL;
	return ring_public_ip(ip) ? RING_SCOPE_PUBLIC : RING_SCOPE_PRIVATE;
}

/* Our own endpoints: the listeners' addresses (a wildcard's, per interface),
 * as section 09 collected them, or as we advertise them. */
static const struct endpoint *ring_own_endpoints(const struct node *n, unsigned *k)
{
	*k = n->nat ? n->nat->n_own : n->self.n_endpoints;
	return n->nat ? n->nat->own : n->self.endpoints;
}

/* The scopes this node lives in, as a mask: the public one, and those of
 * its own listeners and of the bootstraps its user gave it.  Loopback tests
 * run whole rings on 127.0.0.1, NAT'd sites link over private addresses:
 * a peer's endpoint in such a scope is one we could have been given. */
static unsigned ring_scopes_ours(const struct node *n)
{
	unsigned mask = 1u << RING_SCOPE_PUBLIC, k;
	const struct endpoint *own = ring_own_endpoints(n, &k);
	for (unsigned i = 0; i < k; i++)
		mask |= 1u << ring_scope_of(own[i].ip);
	for (unsigned i = 0; i < n->n_listeners; i++)
		mask |= 1u << ring_scope_of(ntohl(n->listeners[i].sa.sin_addr.s_addr));
	for (unsigned i = 0; i < n->ring.n_boot; i++)
		mask |= 1u << ring_scope_of(n->ring.boot[i].ip);
	return mask & ~(1u << RING_SCOPE_NEVER);
}

/* ep is one of our listeners (a wildcard one: on any of our addresses). */
static bool ring_endpoint_ours(const struct node *n, const struct endpoint *ep)
{
	unsigned k;
	const struct endpoint *own = ring_own_endpoints(n, &k);
	for (unsigned i = 0; i < k; i++)
		if (own[i].ip == ep->ip && own[i].port == ep->port)
			return true;
	for (unsigned i = 0; i < n->n_listeners; i++) {
		uint32_t ip = ntohl(n->listeners[i].sa.sin_addr.s_addr);
		if (ntohs(n->listeners[i].sa.sin_port) == ep->port &&
		    (ip == ep->ip || (!ip && ring_scope_of(ep->ip) == RING_SCOPE_LOOPBACK)))
			return true;
	}
	return false;
}

/* ep is on this host: at one of our own addresses, on any port. */
static bool ring_endpoint_on_host(const struct node *n, const struct endpoint *ep)
{
	unsigned k;
	const struct endpoint *own = ring_own_endpoints(n, &k);
	for (unsigned i = 0; i < k; i++)
		if (own[i].ip == ep->ip)
			return true;
	for (unsigned i = 0; i < n->n_listeners; i++)
		if (ntohl(n->listeners[i].sa.sin_addr.s_addr) == ep->ip)
			return true;
	return false;
}

/* May we dial (or probe) a peer's endpoint?  Only within a scope we live
 * in (our own addresses are this host's, as loopback is), and never
 * ourselves; a refusal is counted. */
static bool ring_endpoint_dialable(struct node *n, const struct endpoint *ep)
{
	enum ring_scope s = ring_endpoint_on_host(n, ep) ? RING_SCOPE_LOOPBACK : ring_scope_of(ep->ip);
	if ((ring_scopes_ours(n) >> s & 1) && !ring_endpoint_ours(n, ep))
		return true;
	char who[40];
	link_endpoint_uri(ep, who);
	log_drop(&n->drops, DROP_DIAL_SCOPE, ev_now(&n->loop), who);
	return false;
}

/* Dial pi's endpoints at once (every one of them: one may be the hole a NAT
 * opens), on one transport: only_proto, or else the first of UDP and TCP
 * that we listen on and pi has, or else whatever pi has.  answer: pi is
 * dialling us now (we asked it to connect, or it sent PUNCH), so our
 * packets meet its NAT open; any other dial must not reach a NAT'd pi's
 * NAT before pi's own packets leave it (ring_punch_ttl,
 * ring_unasked_poisons).  Returns the number of dials started. */
static unsigned ring_dial_endpoints(struct node *n, const struct peer_info *pi, uint8_t want,
				   uint8_t only_proto, bool answer)
{
	static const uint8_t order[4] = { PROTO_UDP, PROTO_TCP, PROTO_TCP, PROTO_UDP };
	unsigned dialled = 0, held = 0;  /* held: left for pi to dial (ring_unasked_poisons) */
	for (unsigned pass = 0; pass < 4 && !dialled && !held; pass++) {
		uint8_t proto = order[pass];
		if ((only_proto && proto != only_proto) || (pass < 2 && !link_listens(n, proto)))
			continue;
		for (unsigned i = 0; i < pi->n_endpoints && dialled < RING_DIAL_ENDPOINTS_MAX; i++) {
			const struct endpoint *ep = &pi->endpoints[i];
			if (ep->proto != proto || ep->port == 0 || !ring_endpoint_dialable(n, ep))
				continue;
			if (!answer && ring_unasked_poisons(n, pi, ep, false)) {
				held++;
				continue;
			}
			if (link_dial_ttl(n, ep, &pi->addr, want, NULL, answer ? 0 : ring_punch_ttl(n, pi, ep)))
				dialled++;
		}
	}
	return dialled;
}

/* Dials to a peer are under way, but its info may be newer than theirs (it
 * learned its public endpoint since): dial the UDP endpoints not yet tried,
 * or the punch that needs them comes only with the next probe.  When pi
 * dials us now (answer), the dials under way drop their punch TTL. */
static void ring_dial_fresh(struct node *n, const struct peer_info *pi, uint8_t want, bool answer)
{
	for (unsigned i = 0; i < pi->n_endpoints; i++) {
		const struct endpoint *ep = &pi->endpoints[i];
		if (ep->proto != PROTO_UDP || !ep->port)
			continue;
		struct sockaddr_in sa = link_sockaddr_of(ep);
		struct link *tried = NULL;
		for (struct link *l = n->links; l && !tried; l = l->next)
			if (l->state != LINK_CLOSED && l->proto == PROTO_UDP && l->initiator &&
			    link_sockaddr_eq(&l->remote, &sa))
				tried = l;
		if (tried && answer)
			link_punch_lift(tried);
		else if (!tried && !(!answer && ring_unasked_poisons(n, pi, ep, false)) &&
			 ring_endpoint_dialable(n, ep))
			link_dial_ttl(n, ep, &pi->addr, want, NULL, answer ? 0 : ring_punch_ttl(n, pi, ep));
	}
}

/* Dial a peer unless a link to it exists or is under way; want is the role
 * we will give the link, answer as for ring_dial_endpoints. */
static void ring_dial_as(struct node *n, const struct peer_info *pi, uint8_t want, bool answer)
{
	if (wire_addr_eq(&pi->addr, &n->self.addr))
		return;
	struct link *l = link_find_peer(n, &pi->addr, false);
	if (l) {
		ring_roles_add(l, want);
		if (l->state != LINK_UP)
			ring_dial_fresh(n, pi, want, answer);
		return;
	}
	if (n->up.dialing)
		n->up.dialing(n, pi, want);
	ring_dial_endpoints(n, pi, want, 0, answer);
}

static void ring_dial(struct node *n, const struct peer_info *pi, uint8_t want)
{
	ring_dial_as(n, pi, want, false);
}

/* pi answered our connect-to-me and is dialling us. */
static void ring_dial_answer(struct node *n, const struct peer_info *pi, uint8_t want)
{
	ring_dial_as(n, pi, want, true);
}

/* Our near peers' infos, for a connect-to-me reply; skips the requester
 * itself, but not another node with its address: that one it must hear of. */
static uint8_t ring_near_infos(struct node *n, struct peer_info *out, const struct peer_info *except)
{
	uint8_t k = 0;
	for (struct link *l = n->links; l && k < RING_CTM_NEIGHBOURS_MAX; l = l->next) {
		if (!ring_link_usable(l) || !(l->local_roles & ROLE_NEAR) ||
		    (wire_addr_eq(&l->peer.addr, &except->addr) && l->peer.instance == except->instance))
			continue;
		bool dup = false;
		for (uint8_t j = 0; j < k; j++)
			dup |= wire_addr_eq(&out[j].addr, &l->peer.addr);
		if (!dup)
			out[k++] = l->peer;
	}
	return k;
}

/* A request of ours goes out under token (0: draw one): a reply may
 * answer it until RING_ASKED_MS passes; the slot expiring first makes room. */
static uint32_t ring_asked_note(struct node *n, uint32_t token)
{
	while (!token)
		token = (uint32_t)sec_random_u64(&n->rng);
	struct ring_asked *slot = &n->ring.asked[0];
	for (unsigned i = 1; i < RING_ASKED_MAX; i++)
		if (n->ring.asked[i].until_ms < slot->until_ms)
			slot = &n->ring.asked[i];
	*slot = (struct ring_asked){ .token = token, .until_ms = ev_now(&n->loop) + RING_ASKED_MS };
	return token;
}

/* Does a reply answer a request of ours?  Each request is answered once,
 * by the node it reached. */
static bool ring_asked_take(struct node *n, uint32_t token)
{
	uint64_t now = ev_now(&n->loop);
	for (unsigned i = 0; i < RING_ASKED_MAX; i++) {
		struct ring_asked *a = &n->ring.asked[i];
		if (a->token && a->token == token && a->until_ms > now) {
			*a = (struct ring_asked){ 0 };
			return true;
		}
	}
	return false;
}

/* A generic cell rate: the next event is due at *due_ms; one may run
 * ahead of schedule by burst - 1 intervals. */
static bool ring_rate_take(uint64_t *due_ms, uint64_t now, uint64_t every_ms, unsigned burst)
{
	uint64_t t = *due_ms > now ? *due_ms : now;
	if (t - now > (burst - 1) * every_ms)
		return false;
	*due_ms = t + every_ms;
	return true;
}

/* The requester's ration: its slot, or the most idle one (a slot whose due
 * time has passed holds a full ration: evicting it forgets nothing). */
static struct ring_answerer *ring_answerer_of(struct node *n, const ring_addr *src)
{
	struct ring_answerer *idle = &n->ring.answerers[0];
	for (unsigned i = 0; i < RING_ANSWER_SOURCES; i++) {
		struct ring_answerer *a = &n->ring.answerers[i];
		if (wire_addr_eq(&a->src, src))
			return a;
		if (a->due_ms < idle->due_ms)
			idle = a;
	}
	*idle = (struct ring_answerer){ .src = *src };
	return idle;
}

/* May a request from q's sender make us dial it?  Always onto a link we
 * hold or are making (no new dial: ring_dial_as); else within its ration
 * and everyone's (RING_ANSWER_*). */
static bool ring_answer_rationed(struct node *n, const struct wire_ctm_req *q)
{
	if (link_find_peer(n, &q->from.addr, false))
		return false;
	uint64_t now = ev_now(&n->loop);
	struct ring_answerer *a = ring_answerer_of(n, &q->from.addr);
	if (ring_rate_take(&a->due_ms, now, RING_ANSWER_SOURCE_EVERY_MS, RING_ANSWER_SOURCE_BURST) &&
	    ring_rate_take(&n->ring.answer_due_ms, now, RING_ANSWER_EVERY_MS, RING_ANSWER_BURST))
		return false;
	char who[13];
	link_addr_short(&q->from.addr, who);
	log_drop(&n->drops, DROP_CTM_RATIONED, now, who);
	return true;
}

static void ring_ctm_send(struct node *n, uint8_t mode, const ring_addr *target,
			  uint8_t want, uint32_t token)
{
	struct link *first = ring_next_hop(n, mode, target);
	if (!first)
		return;         /* we are the answer: nothing to connect to */
	token = ring_asked_note(n, token);
	struct wire_ctm_req m = { .token = token, .want = want, .reply_via = first->peer.addr,
				  .from = n->self };
	uint8_t payload[WIRE_MAX_PACKET_BYTES];
	ssize_t len = wire_ctm_req_encode(payload, sizeof payload, &m);
	if (len > 0)
		ring_send(n, mode, target, NULL, INNER_CTM_REQ, payload, (size_t)len);
}

/* A peer's own word on itself (the "from" of its connect-to-me messages):
 * its virtual IP may be newer than the handshake's (--ip auto leases it
 * after joining).  Only the same process's links are refreshed. */
static void ring_peer_refresh(struct node *n, const struct peer_info *from)
{
	for (struct link *l = n->links; l; l = l->next)
		if (l->state == LINK_UP && l->peer_known && wire_addr_eq(&l->peer.addr, &from->addr) &&
		    l->peer.instance == from->instance)
			l->peer.vip = from->vip;
}

/* Peers reach us without our opening the way: within RING_REACHABLE_MS a
 * UDP link came up that a peer began from a public address we had not
 * contacted (link_contacted: no dial, probe or link of ours there in the
 * last 5 minutes), so no NAT or firewall of ours needs a punch.  A peer on
 * a private network proves nothing for the rest of the world.  A simulated
 * network (no NAT section) is open. */
static bool ring_reachable(struct node *n)
{
	return !n->nat || (n->ring.inbound_ms && ev_now(&n->loop) - n->ring.inbound_ms < RING_REACHABLE_MS);
}

/* The TTL of our hellos to ep unless we answer the peer's dial (0: the
 * usual).  From behind a NAT to a NAT'd peer's public endpoint, a hello
 * that reaches the peer's NAT before the peer's own dial has left through
 * it is, to a NAT that accepts packets for itself (Linux masquerade without
 * an input firewall), a packet for the NAT: its conntrack entry then holds
 * the tuple the peer's mapping needs, masquerade moves the mapping to
 * another port, and neither side's packets ever match (t_nat step 2).  A
 * TTL that opens our own NAT but runs out before the peer's (the routers
 * between sites) leaves our NAT open for the peer's dial, which then meets
 * a clean NAT at its end.  Every hello of such a dial goes at that TTL
 * until the peer answers: one at the usual TTL, if the peer never dials,
 * could not pass its NAT anyway, and would poison it for the next try (an
 * upgrade's punch) for the 30 s the entry lives, renewed by every retry.
 * One-sided dials (a connect-to-me reply's neighbours) fail so, and the
 * fallbacks (TCP, a relay, its upgrade) take over.  A reachable node has
 * no NAT to open (ring_unasked_poisons). */
static uint8_t ring_punch_ttl(struct node *n, const struct peer_info *pi, const struct endpoint *ep)
{
	if (ep->proto != PROTO_UDP || ring_reachable(n) || !ring_public_ip(ep->ip))
		return 0;
	for (unsigned i = 0; i < pi->n_endpoints; i++)
		if (!ring_public_ip(pi->endpoints[i].ip))     /* its own, behind a NAT */
			return n->nat->punch_ttl;
	return 0;
}

/* pi is behind a NAT: it lists a private endpoint beside its public ones. */
static bool ring_behind_nat(const struct peer_info *pi)
{
	bool pub = false, priv = false;
	for (unsigned i = 0; i < pi->n_endpoints; i++) {
		bool p = ring_public_ip(pi->endpoints[i].ip);
		pub |= p;
		priv |= !p;
	}
	return pub && priv;
}

/* Would a datagram of ours that pi did not ask for, sent to its public
 * endpoint ep, harm it?  At a NAT that takes packets for itself (Linux
 * masquerade without an input firewall) it leaves a conntrack entry that
 * makes the NAT map pi's own packets to us to another port: pi then looks
 * symmetric to its peers and stops advertising its mapping, and loses the
 * direct links a cone NAT gets (seen: a public node's dial-back moved a
 * host's mapping 4000 -> 55540).  From a reachable node such a datagram
 * does nothing useful either: pi dials us, and gets through.  So a
 * reachable first dialer leaves it out (a NAT'd one sends its first tries
 * with a punch TTL instead, ring_punch_ttl), and so does an RTT probe,
 * which pi never answers through its NAT anyway.  A public host that also
 * lists a private address looks the same: it dials us, and goes unprobed. */
static bool ring_unasked_poisons(struct node *n, const struct peer_info *pi, const struct endpoint *ep,
				bool probe)
{
	return ep->proto == PROTO_UDP && ring_public_ip(ep->ip) && ring_behind_nat(pi) &&
	       (probe || ring_reachable(n));
}

static void ring_note_inbound(struct node *n, const struct link *up)
{
	if (up->initiator || up->proto != PROTO_UDP || !n->contacts ||
	    !ring_public_ip(ntohl(up->remote.sin_addr.s_addr)) || link_contacted(n, &up->remote))
		return;
	n->ring.inbound_ms = ev_now(&n->loop);
}

static void ring_on_ctm_req(struct node *n, const struct wire_routed *r)
{
	struct wire_ctm_req q;
	if (wire_ctm_req_decode(r->payload, r->len, &q) < 0 ||
	    !wire_addr_eq(&q.from.addr, &r->src)) {
		ring_drop(n, DROP_MALFORMED, &r->src);
		return;
	}
	if (wire_addr_eq(&q.from.addr, &n->self.addr))
		return;
	uint8_t want = 0;
	if (q.want & ROLE_SHORTCUT) {
		if (!link_find_peer(n, &q.from.addr, false) && !ring_sc_room(n, ring_sc_rate(n, &q.from.addr))) {
			n->ring.sc.refused++;   /* our cap is full of busier shortcuts; it retries */
			return;
		}
		/* Ours too from the start (unless we make none), so our cap counts
		 * it at once and our idle timer ends it; the slot is its clock. */
		if (n->ring.sc.pps && ring_sc_find(n, &q.from.addr, true))
			want = ROLE_SHORTCUT;
	}
	ring_peer_refresh(n, &q.from);
	struct wire_ctm_reply m = { .token = q.token, .want = q.want, .from = n->self };
	m.n_neighbours = ring_near_infos(n, m.neighbours, &q.from);
	uint8_t payload[WIRE_MAX_PACKET_BYTES];
	ssize_t len = wire_ctm_reply_encode(payload, sizeof payload, &m);
	if (len > 0)
		ring_send(n, MODE_EXACT, &q.from.addr, &q.reply_via, INNER_CTM_REPLY, payload, (size_t)len);
	/* Both ends dial, to punch NATs; but a far requester probes us first
	 * and dials only if we win (section 12), so when peers reach us
	 * unasked there is nothing to punch, and our link would mostly lose. */
	if ((q.want != ROLE_FAR || !ring_reachable(n)) && !ring_answer_rationed(n, &q)) {
		ring_dial(n, &q.from, want);
		if (n->up.ctm_req)    /* its first hop links it: a relay candidate */
			n->up.ctm_req(n, &q);
	}
}

/* A claim on our ring address (our virtual IP) that proves nothing: a BYE
 * "conflict", a neighbour list, or a secret network's handshake, where any
 * member may say anything.  Obeying it let any member stop any node, so we
 * count it, warn now and then, and keep our address; peers that linked us
 * first keep refusing the newcomer (link_conflict_loser). */
static void ring_conflict_unproven(struct node *n)
{
	char ip[16];
	buf_ip_str(n->self.vip, ip);
	uint64_t now = ev_now(&n->loop);
	bool quiet = n->drops.last_log_ms[DROP_ADDRESS_CLAIM] &&
		     now - n->drops.last_log_ms[DROP_ADDRESS_CLAIM] < LOG_DROP_INTERVAL_MS;
	log_drop(&n->drops, DROP_ADDRESS_CLAIM, now, "a peer");
	if (n->ring.next_boot_ms < now + RING_CLAIM_BACKOFF_MS)
		n->ring.next_boot_ms = now + RING_CLAIM_BACKOFF_MS;     /* a refused newcomer: no churn */
	if (!quiet)
		log_warn("ring", "a peer says another node holds %s%s; that is unproven here, so this node "
			 "keeps it (if you started two nodes with one address, stop one)",
			 n->self.vip ? "virtual IP " : "our ring address", n->self.vip ? ip : "");
}

/* Another process claims our ring address.  Only a proven claim (its
 * certificate grants the address, checked on a direct link) from an older
 * process makes us yield: a --ip auto node draws another address, others
 * stop with a clear message (one certificate started twice).  A node that
 * holds no lease yet moves on any claim: it gives nothing up. */
static void ring_on_conflict(struct node *n, const struct peer_info *other, bool proven)
{
	char ip[16], addr[2 * RING_ADDR_BYTES + 1];
	buf_ip_str(n->self.vip, ip);
	ring_addr_hex(&n->self.addr, addr);
	bool younger = !other || n->self.started > other->started ||
		       (n->self.started == other->started && n->self.instance > other->instance);
	if (proven && !younger) {
		log_drop(&n->drops, DROP_SELF_LINK, ev_now(&n->loop), "a newer node that claims our address");
		return;
	}
	if (n->up.readdress && n->up.readdress(n, proven))
		return;
	if (!proven)
		return ring_conflict_unproven(n);
	if (n->self.vip)
		log_err("ring", "another node already holds virtual IP %s (ring address %s); "
			"choose another --ip", ip, addr);
	else
		log_err("ring", "another node already holds ring address %s; restart to draw a new one", addr);
	n->exit_code = EXIT_FAIL;
	n->loop.stop = true;
}

static bool ring_is_conflict(struct node *n, const struct peer_info *pi)
{
	return wire_addr_eq(&pi->addr, &n->self.addr) && pi->instance != n->self.instance;
}

/* Proximity neighbour selection: the node that answered a far request
 * and its near neighbours make the same ring progress (they sit a node or
 * two apart around the far target), so probe up to RING_PNS_CANDIDATES of
 * them (link_probe: one round trip, no link) and dial the lowest RTT
 * (ring_pns_decide).  Dialling them all to compare keepalive RTTs cost
 * two handshakes and two closes per far link, a third of a joining node's
 * messages (docs/SCALING.md). */
static void ring_pns_add(struct node *n, struct ring_far_req *f, const struct peer_info *pi)
{
	struct ring_pns_cand *c = &f->cand[f->n++];
	*c = (struct ring_pns_cand){ .addr = pi->addr, .token = (uint32_t)sec_random_u64(&n->rng),
				     .rtt_us = -1 };
	for (unsigned i = 0, sent = 0; i < pi->n_endpoints && sent < RING_DIAL_ENDPOINTS_MAX; i++) {
		const struct endpoint *ep = &pi->endpoints[i];
		if (ep->proto != PROTO_UDP || ep->port == 0 || ring_unasked_poisons(n, pi, ep, true) ||
		    !ring_endpoint_dialable(n, ep))
			continue;
		struct sockaddr_in sa = link_sockaddr_of(ep);
		link_probe(n, &sa, c->token);
		sent++;
	}
}

static void ring_pns_start(struct node *n, struct ring_far_req *f, const struct wire_ctm_reply *m)
{
	if (!link_listens(n, PROTO_UDP)) {     /* probes are UDP: a TCP-only node takes the replier */
		f->n = 1;
		f->cand[0] = (struct ring_pns_cand){ .addr = m->from.addr, .rtt_us = -1 };
		f->winner = 0;
		f->state = FAR_DIALLING;
		f->until_ms = ev_now(&n->loop) + LINK_HANDSHAKE_TIMEOUT_MS;
		ring_dial_answer(n, &m->from, ROLE_FAR);
		return;
	}
	f->n = 0;
	f->probed_us = ev_now_us(&n->loop);
	f->replier = m->from;
	ring_pns_add(n, f, &m->from);
	for (unsigned i = 0; i < m->n_neighbours && f->n < RING_PNS_CANDIDATES; i++) {
		const struct peer_info *c = &m->neighbours[i];
		bool seen = wire_addr_eq(&c->addr, &n->self.addr);
		for (unsigned j = 0; j < f->n && !seen; j++)
			seen = wire_addr_eq(&c->addr, &f->cand[j].addr);
		if (!seen)
			ring_pns_add(n, f, c);
	}
	f->state = FAR_PROBING;
	f->until_ms = ev_now(&n->loop) + RING_PNS_PROBE_MS;
}

/* A link the peer at addr has begun with us: one we know is its, or a
 * handshake in progress from one of its UDP endpoints eps (its identity
 * comes with HS_FIN). */
static struct link *ring_link_begun(struct node *n, const ring_addr *addr, const struct endpoint *eps,
				    unsigned n_eps)
{
	struct link *l = link_find_peer(n, addr, false);
	if (l)
		return l;
	link_for_each(n, l) {
		if (l->state == LINK_CLOSED || l->initiator || l->proto != PROTO_UDP || l->peer_known)
			continue;
		for (unsigned i = 0; i < n_eps; i++) {
			struct sockaddr_in sa = link_sockaddr_of(&eps[i]);
			if (eps[i].proto == PROTO_UDP && link_sockaddr_eq(&l->remote, &sa))
				return l;
		}
	}
	return NULL;
}

/* The answerer of our connect-to-me dials us as it replies (both ends dial,
 * which punches NATs: section 09), and its handshake is usually under way
 * by the time the routed reply arrives, or soon after.  Dialling at once
 * made a second link for link_resolve_duplicate to close: a fifth of a
 * joining node's handshakes.  So our dial waits RING_CTM_DIAL_DELAY_MS (to
 * the tick after) and is dropped if the answerer's link has begun; behind a
 * NAT that stopped its dial, ours goes out that much later and meets the
 * hole its dial opened on its side. */
static void ring_defer_dial(struct node *n, const struct peer_info *pi, uint8_t want)
{
	struct ring_state *r = &n->ring;
	if (wire_addr_eq(&pi->addr, &n->self.addr))
		return;
	if (link_find_peer(n, &pi->addr, false) || r->n_deferred == RING_DEFER_MAX)
		return ring_dial_answer(n, pi, want);
	for (unsigned i = 0; i < r->n_deferred; i++)
		if (wire_addr_eq(&r->deferred[i].pi.addr, &pi->addr)) {
			r->deferred[i].want |= want;
			return;
		}
	if (!r->deferred && !(r->deferred = calloc(RING_DEFER_MAX, sizeof *r->deferred)))
		return ring_dial_answer(n, pi, want);
	if (n->up.dialing)    /* the plan now, so the reply's neighbours become its relays */
		n->up.dialing(n, pi, want);
	r->deferred[r->n_deferred++] = (struct ring_deferred){ .pi = *pi, .want = want,
							       .at_ms = ev_now(&n->loop) + RING_CTM_DIAL_DELAY_MS };
}

static void ring_deferred_upkeep(struct node *n)
{
	struct ring_state *r = &n->ring;
	uint64_t now = ev_now(&n->loop);
	for (unsigned i = 0; i < r->n_deferred;) {
		struct ring_deferred d = r->deferred[i];
		if (now < d.at_ms) {
			i++;
			continue;
		}
		r->deferred[i] = r->deferred[--r->n_deferred];
		struct link *l = ring_link_begun(n, &d.pi.addr, d.pi.endpoints, d.pi.n_endpoints);
		if (!l)
			ring_dial_answer(n, &d.pi, d.want);
		else
			ring_roles_add(l, d.want);
	}
	if (!r->n_deferred) {
		free(r->deferred);
		r->deferred = NULL;
	}
}

/* The far request a connect-to-me reply answers, if still waiting. */
static struct ring_far_req *ring_far_waiting(struct node *n, uint32_t token)
{
	for (unsigned i = 0; i < RING_FAR_PARALLEL; i++) {
		struct ring_far_req *f = &n->ring.far[i];
		if (f->state == FAR_ASKED && f->token == token)
			return f;
	}
	return NULL;
}

static void ring_on_ctm_reply(struct node *n, const struct wire_routed *r)
{
	struct wire_ctm_reply m;
	if (wire_ctm_reply_decode(r->payload, r->len, &m) < 0 || !wire_addr_eq(&m.from.addr, &r->src)) {
		ring_drop(n, DROP_MALFORMED, &r->src);
		return;
	}
	for (unsigned i = 0; i < m.n_neighbours; i++)
		if (ring_is_conflict(n, &m.neighbours[i]))
			ring_on_conflict(n, &m.neighbours[i], false);   /* counted, whoever sent it */
	if (!ring_asked_take(n, m.token)) {
		char who[13];
		link_addr_short(&r->src, who);
		log_drop(&n->drops, DROP_CTM_UNASKED, ev_now(&n->loop), who);
		return;         /* not ours to dial: anyone may route us a reply */
	}
	ring_peer_refresh(n, &m.from);
	uint8_t want = 0;
	struct ring_far_req *f = (m.want & ROLE_FAR) ? ring_far_waiting(n, m.token) : NULL;
	if (f)
		ring_pns_start(n, f, &m);
	struct ring_sc_peer *p = (m.want & ROLE_SHORTCUT) ? ring_sc_find(n, &m.from.addr, false) : NULL;
	if (p && p->dial_ms && ev_now(&n->loop) - p->dial_ms < RING_SC_RETRY_MS)
		want |= ROLE_SHORTCUT;
	if (!f || want)         /* a far answer is probed, and dialled if it wins */
		ring_defer_dial(n, &m.from, want);
	for (unsigned i = 0; i < m.n_neighbours; i++)
		if (!wire_addr_eq(&m.neighbours[i].addr, &n->self.addr) &&
		    ring_would_be_near(n, &m.neighbours[i].addr))
			ring_dial(n, &m.neighbours[i], 0);
	if (n->up.ctm_reply)  /* after the dials: the replier can relay for them */
		n->up.ctm_reply(n, &m);
}

/* ---- overlay echo --------------------------------------------------- */

static void ring_echo_send(struct node *n, const ring_addr *dst, uint32_t id)
{
	struct wire_echo m = { .id = id, .t_us = ev_now_us(&n->loop) };
	uint8_t payload[32];
	ssize_t len = wire_echo_encode(payload, sizeof payload, false, &m);
	if (len > 0)
		ring_send(n, MODE_EXACT, dst, NULL, INNER_ECHO_REQ, payload, (size_t)len);
}

static void ring_on_echo(struct node *n, const struct wire_routed *r, bool reply)
{
	struct wire_echo m;
	if (wire_echo_decode(r->payload, r->len, reply, &m) < 0) {
		ring_drop(n, DROP_MALFORMED, &r->src);
		return;
	}
	if (reply) {
		uint64_t now = ev_now_us(&n->loop);
		if (n->up.echo_reply)
			n->up.echo_reply(n, m.id, now > m.t_us ? now - m.t_us : 0, m.req_hops);
		return;
	}
	m.req_hops = r->hops;
	uint8_t payload[32];
	ssize_t len = wire_echo_encode(payload, sizeof payload, true, &m);
	if (len > 0)
		ring_send(n, MODE_EXACT, &r->src, NULL, INNER_ECHO_REPLY, payload, (size_t)len);
}

static void ring_deliver(struct node *n, const struct wire_routed *r)
{
	n->counters_delivered++;
	switch (r->inner) {
	case INNER_CTM_REQ:
		ring_on_ctm_req(n, r);
		break;
	case INNER_CTM_REPLY:
		ring_on_ctm_reply(n, r);
		break;
	case INNER_ECHO_REQ:
	case INNER_ECHO_REPLY:
		ring_on_echo(n, r, r->inner == INNER_ECHO_REPLY);
		break;
	case INNER_IP:
	case INNER_IP_UNREACH:
	case INNER_IP_STALE:
		if (n->up.deliver_ip)
			n->up.deliver_ip(n, r);
		break;
	case INNER_DHT:
		if (n->up.deliver_dht)
			n->up.deliver_dht(n, r);
		break;
	}
}

/* ---- upkeep --------------------------------------------------------- */

static void ring_probe(struct node *n)
{
	uint64_t now = ev_now(&n->loop);
	ring_addr one = ring_one();
	ring_addr after = ring_add(&n->self.addr, &one), before = ring_sub(&n->self.addr, &one);
	ring_ctm_send(n, MODE_SUCC, &after, 0, 0);
	ring_ctm_send(n, MODE_PRED, &before, 0, 0);
	/* Jitter keeps a thousand nodes started together from probing in step. */
	n->ring.next_probe_ms = now + RING_PROBE_MS / 2 + (sec_random_u64(&n->rng) % RING_PROBE_MS);
}

/* Probe soon, but never more than once per 100 ms. */
static void ring_probe_soon(struct node *n)
{
	uint64_t soon = ev_now(&n->loop) + 100;
	if (n->ring.next_probe_ms > soon)
		n->ring.next_probe_ms = soon;
}

static unsigned ring_count_role(struct node *n, uint8_t role, struct link **one)
{
	unsigned c = 0;
	struct link *l;
	link_for_each(n, l)
		if (ring_link_usable(l) && (l->local_roles & role)) {
			c++;
			*one = l;
		}
	return c;
}

/* Ask for one more far link at a harmonically distributed distance:
 * d = N^(u-1) of the ring for u uniform in [0,1). */
static void ring_far_request(struct node *n, struct ring_far_req *f, double n_est)
{
	double frac = exp(log(n_est) * (sec_random_unit(&n->rng) - 1.0));
	ring_addr off;
	sec_random(&n->rng, off.b, sizeof off.b);
	uint64_t top = frac >= 1.0 ? UINT64_MAX : (uint64_t)(frac * 18446744073709551616.0);
	struct wbuf w = wbuf_of(off.b, 8);
	wbuf_u64(&w, top);
	ring_addr target = ring_add(&n->self.addr, &off);
	*f = (struct ring_far_req){ .state = FAR_ASKED, .token = (uint32_t)sec_random_u64(&n->rng),
				    .until_ms = ev_now(&n->loop) + RING_FAR_REPLY_MS };
	ring_ctm_send(n, MODE_NEAREST, &target, ROLE_FAR, f->token);
}

/* Up to RING_FAR_PARALLEL far requests at once: one at a time, each a
 * routed request, its probes and a dial, a node that wants 9 far links
 * (N = 100 000) took half a minute to get them. */
static void ring_far_upkeep(struct node *n)
{
	n->ring.n_estimate = ring_estimate_n(n);
	if (!n->ring.joined)
		return;
	unsigned want = ring_far_target(n->ring.n_estimate);
	struct link *one = NULL;
	unsigned have = ring_count_role(n, ROLE_FAR, &one);
	uint64_t now = ev_now(&n->loop);
	if (have > want + 1 && one) {
		ring_roles_set(one, one->local_roles & (uint8_t)~ROLE_FAR);
		return;
	}
	unsigned pending = 0;
	struct ring_far_req *free_slot = NULL;
	for (unsigned i = 0; i < RING_FAR_PARALLEL; i++) {
		struct ring_far_req *f = &n->ring.far[i];
		if (f->state == FAR_ASKED && now >= f->until_ms)
			f->state = FAR_FREE;                    /* no reply: it was lost */
		if (f->state != FAR_FREE)
			pending++;
		else
			free_slot = f;
	}
	if (have + pending < want && free_slot)
		ring_far_request(n, free_slot, n->ring.n_estimate);
}

static void ring_close_unneeded(struct node *n)
{
	uint64_t now = ev_now(&n->loop);
	struct link *l;
	link_for_each(n, l)
		if (ring_link_usable(l) && !l->local_roles && !l->peer_roles &&
		    now - l->up_ms > LINK_UNNEEDED_GRACE_MS &&
		    now - l->relay_last_ms > LINK_UNNEEDED_GRACE_MS)     /* relays need their legs */
			link_close(l, BYE_UNNEEDED);
}

/* ---- rendezvous: bootstraps, remembered peers, merging split rings -------- */

/* Rendezvous peer i: the bootstraps first, then the remembered peers. */
static const struct endpoint *ring_rendezvous(const struct node *n, unsigned i)
{
	return i < n->ring.n_boot ? &n->ring.boot[i] : &n->ring.remembered[i - n->ring.n_boot];
}

/* A link to that endpoint exists or is being made, or it is one of ours. */
static bool ring_endpoint_busy(const struct node *n, const struct endpoint *ep)
{
	struct sockaddr_in sa = link_sockaddr_of(ep);
	for (const struct link *l = n->links; l; l = l->next)
		if (l->state != LINK_CLOSED && l->proto == ep->proto && link_sockaddr_eq(&l->remote, &sa))
			return true;
	for (unsigned i = 0; i < n->self.n_endpoints; i++)
		if (n->self.endpoints[i].ip == ep->ip && n->self.endpoints[i].port == ep->port)
			return true;
	return false;
}

/* A link came up: its endpoint worked, remember it first.  A UDP peer
 * sends from its listening socket, so its address is worth dialling either
 * way; an accepted TCP link comes from a port nobody listens on. */
static void ring_remember(struct node *n, const struct link *l)
{
	if (l->proto == PROTO_RELAY || (l->proto == PROTO_TCP && !l->initiator) || ring_behind_nat(&l->peer))
		return;                 /* a NAT's mapping: dialled unasked, it poisons (ring_punch_ttl) */
	struct endpoint e = link_endpoint_of(l->proto, &l->remote), *r = n->ring.remembered;
	unsigned k = n->ring.n_remembered, at = k < RING_REMEMBER_MAX ? k : RING_REMEMBER_MAX - 1;
	for (unsigned i = 0; i < k; i++)
		if (r[i].proto == e.proto && r[i].ip == e.ip && r[i].port == e.port)
			at = i;
	if (at == 0 && k)
		return;                 /* already the newest: nothing to write */
	memmove(r + 1, r, at * sizeof *r);
	r[0] = e;
	n->ring.n_remembered = k > at ? k : at + 1;
	n->ring.remember_dirty = true;
}

/* Write the remembered peers (a temporary file renamed over the old one:
 * a crash leaves the previous list, never half of one). */
static void ring_remember_save(struct node *n)
{
	char tmp[300], uri[40];
	if (!n->ring.remember_path[0] || !n->ring.remember_dirty)
		return;
	n->ring.remember_dirty = false;
	n->ring.remember_saved_ms = ev_now(&n->loop);
	snprintf(tmp, sizeof tmp, "%s.tmp", n->ring.remember_path);
	FILE *f = fopen(tmp, "w");
	if (!f) {
		log_debug("ring", "cannot write %s: %s", tmp, strerror(errno));
		return;
	}
	fprintf(f, "# ipop: peers this node linked to, newest first; read at start\n");
	for (unsigned i = 0; i < n->ring.n_remembered; i++) {
		link_endpoint_uri(&n->ring.remembered[i], uri);
		fprintf(f, "%s\n", uri);
	}
	if (fclose(f) != 0 || rename(tmp, n->ring.remember_path) < 0)
		log_debug("ring", "cannot write %s: %s", n->ring.remember_path, strerror(errno));
}

/* Ask for our neighbours through a just-made link to a rendezvous peer:
 * the request is routed from there, so if that peer is in another ring
 * (a partition healed), that ring's nodes nearest to us answer and link
 * with us, and the two rings zip together from here. */
static void ring_merge_ask(struct node *n, struct link *l)
{
	ring_addr one = ring_one();
	ring_addr target[2] = { ring_add(&n->self.addr, &one), ring_sub(&n->self.addr, &one) };
	static const uint8_t modes[2] = { MODE_SUCC, MODE_PRED };
	for (int i = 0; i < 2; i++) {
		struct wire_ctm_req m = { .token = ring_asked_note(n, 0), .reply_via = l->peer.addr, .from = n->self };
		uint8_t payload[WIRE_MAX_PACKET_BYTES];
		ssize_t len = wire_ctm_req_encode(payload, sizeof payload, &m);
		if (len <= 0)
			return;
		struct wire_routed r = { .mode = modes[i], .ttl = RING_MAX_HOPS, .src = n->self.addr,
					 .dst = target[i], .inner = INNER_CTM_REQ, .len = (uint16_t)len,
					 .payload = payload };
		ring_forward(n, l, &r);
	}
}

static uint64_t ring_merge_period(struct node *n)
{
	double extra = n->ring.n_estimate > RING_MERGE_FREE_NODES ? n->ring.n_estimate - RING_MERGE_FREE_NODES : 0;
	double ms = RING_MERGE_MS + extra * RING_MERGE_PER_NODE_MS;
	return (uint64_t)(ms * (0.5 + sec_random_unit(&n->rng)));     /* jitter: 0.5 to 1.5 periods */
}

/* Joined: now and then dial the next rendezvous peer we hold no link to. */
static void ring_merge_upkeep(struct node *n)
{
	uint64_t now = ev_now(&n->loop);
	unsigned total = n->ring.n_boot + n->ring.n_remembered;
	if (!n->ring.joined || !total || now < n->ring.next_merge_ms)
		return;
	bool first = !n->ring.next_merge_ms;
	n->ring.next_merge_ms = now + ring_merge_period(n);
	if (first)
		return;                 /* we just joined through them */
	for (unsigned tries = 0; tries < total; tries++) {
		const struct endpoint *ep = ring_rendezvous(n, n->ring.merge_next++ % total);
		if (!ring_endpoint_busy(n, ep)) {
			link_dial(n, ep, NULL, ROLE_LEAF, NULL);
			return;
		}
	}
}

/* With no link at all, dial the bootstrap peers (their names looked up
 * again: a host may have moved) and the remembered ones, backing off to 30 s. */
static void ring_bootstrap_upkeep(struct node *n)
{
	uint64_t now = ev_now(&n->loop);
	if (n->links || !(n->ring.n_boot + n->ring.n_remembered) || now < n->ring.next_boot_ms)
		return;
	if (n->up.boot_resolve)
		n->up.boot_resolve(n);
	for (unsigned i = 0; i < n->ring.n_boot + n->ring.n_remembered; i++)
		if (!ring_endpoint_busy(n, ring_rendezvous(n, i)))
			link_dial(n, ring_rendezvous(n, i), NULL, ROLE_LEAF, NULL);
	uint64_t b = n->ring.boot_backoff_ms ? n->ring.boot_backoff_ms * 2 : 1000;
	n->ring.boot_backoff_ms = b > RING_BOOT_RETRY_MAX_MS ? RING_BOOT_RETRY_MAX_MS : b;
	n->ring.next_boot_ms = now + n->ring.boot_backoff_ms;
}

/* A candidate that may get the far role: answered, not slow, and neither
 * a near neighbour nor already far (another request may have chosen it). */
static bool ring_pns_eligible(struct node *n, const struct ring_pns_cand *c)
{
	struct link *l = link_find_peer(n, &c->addr, false);
	return c->rtt_us >= 0 &&
	       !(l && (((l->local_roles | l->want_roles) & (ROLE_NEAR | ROLE_FAR)) ||
		       (l->state == LINK_UP && ring_link_slow(n, l))));
}

/* The far role to a candidate: on the link it began with us if there is
 * one (a replier that is not reachable dials back, ring_on_ctm_req), else
 * a dial to the endpoint that answered the probe, with its cookie. */
static void ring_pns_give(struct node *n, const struct ring_pns_cand *c)
{
	struct link *l = ring_link_begun(n, &c->addr, &c->ep, c->rtt_us >= 0);
	if (l)
		ring_roles_add(l, ROLE_FAR);
	else if (c->rtt_us >= 0)
		link_dial(n, &c->ep, &c->addr, ROLE_FAR, c->cookie);
}

/* Every probe answered, or RING_PNS_PROBE_MS passed: the lowest RTT gets
 * the far role.  With no answer at all (a NAT or firewall the probes do
 * not cross) the replier does, on the link its dial-back began or by a
 * dial of ours with the NAT section's fallbacks (TCP, relays). */
static void ring_pns_decide(struct node *n, struct ring_far_req *f)
{
	int best = -1;
	for (unsigned i = 0; i < f->n; i++)
		if (ring_pns_eligible(n, &f->cand[i]) && (best < 0 || f->cand[i].rtt_us < f->cand[best].rtt_us))
			best = (int)i;
	f->state = FAR_DIALLING;
	f->until_ms = ev_now(&n->loop) + LINK_HANDSHAKE_TIMEOUT_MS;
	if (best >= 0) {
		const struct ring_pns_cand *c = &f->cand[best];
		char addr[2 * RING_ADDR_BYTES + 1];
		ring_addr_hex(&c->addr, addr);
		log_debug("ring", "far link to %.12s: %.3f ms, the lowest RTT of %u candidates", addr,
			  c->rtt_us / 1000.0, f->n);
		f->winner = (uint8_t)best;
		return ring_pns_give(n, c);
	}
	const struct peer_info *r = &f->replier;
	struct link *l = ring_link_begun(n, &r->addr, r->endpoints, r->n_endpoints);
	f->winner = 0;
	if (l && ((l->local_roles | l->want_roles) & (ROLE_NEAR | ROLE_FAR)))
		f->state = FAR_FREE;
	else if (l)
		ring_roles_add(l, ROLE_FAR);
	else
		ring_dial_answer(n, r, ROLE_FAR);
}

static bool ring_pns_all_answered(const struct ring_far_req *f)
{
	for (unsigned i = 0; i < f->n; i++)
		if (f->cand[i].rtt_us < 0)
			return false;
	return true;
}

/* up.probe_reply: a far candidate's probe came back.  Its first answer
 * counts; a second endpoint's, or one after the choice, is ours all the
 * same (not an unknown sender). */
static bool ring_on_probe_reply(struct node *n, uint32_t token, const struct sockaddr_in *from,
				const uint8_t cookie[SEC_MAC_BYTES])
{
	for (unsigned i = 0; i < RING_FAR_PARALLEL; i++) {
		struct ring_far_req *f = &n->ring.far[i];
		for (unsigned j = 0; j < f->n; j++) {
			struct ring_pns_cand *c = &f->cand[j];
			if (c->token != token)
				continue;
			if (f->state == FAR_PROBING && c->rtt_us < 0) {
				uint64_t rtt = ev_now_us(&n->loop) - f->probed_us;
				c->rtt_us = rtt > INT32_MAX ? INT32_MAX : (int32_t)rtt;
				c->ep = (struct endpoint){ .proto = PROTO_UDP, .ip = ntohl(from->sin_addr.s_addr),
							   .port = ntohs(from->sin_port) };
				memcpy(c->cookie, cookie, SEC_MAC_BYTES);
				if (ring_pns_all_answered(f))
					ring_pns_decide(n, f);
			}
			return true;
		}
	}
	return false;
}

/* Probes out of time are decided on what answered; a chosen link that is
 * up (its role counted from now on) or failed frees the request. */
static void ring_pns_upkeep(struct node *n)
{
	uint64_t now = ev_now(&n->loop);
	for (unsigned i = 0; i < RING_FAR_PARALLEL; i++) {
		struct ring_far_req *f = &n->ring.far[i];
		if (f->state == FAR_PROBING && now >= f->until_ms) {
			ring_pns_decide(n, f);
		} else if (f->state == FAR_DIALLING) {
			const struct ring_pns_cand *c = &f->cand[f->winner];
			struct link *l = ring_link_begun(n, &c->addr, &c->ep, c->rtt_us >= 0);
			if (!l || l->state == LINK_UP || now >= f->until_ms)
				f->state = FAR_FREE;
		}
	}
}

/* ---- shortcuts --------------------------------------------------------
 * A peer whose IP traffic passes --shortcut-pps gets a direct link through
 * the same path as a ring neighbour: a connect-to-me routed to its address
 * with want = ROLE_SHORTCUT, both ends dialling, TCP and relays as
 * fallbacks (section 09).  Greedy routing then finds the peer one hop away
 * by itself.  The role goes after --shortcut-idle without a packet, and
 * ring_close_unneeded closes a link nobody keeps. */

static void ring_sc_want(struct node *n, struct ring_sc_peer *p, struct link *l)
{
	uint64_t now = ev_now(&n->loop);
	if (l && !ring_link_usable(l))
		return;                 /* a dial is under way */
	if (l && ((l->local_roles & (ROLE_SHORTCUT | ROLE_NEAR | ROLE_FAR)) || (l->peer_roles & (ROLE_NEAR | ROLE_FAR))))
		return;                 /* already one hop, and kept for the ring by one end */
	if (!l && p->dial_ms && now - p->dial_ms < RING_SC_RETRY_MS)
		return;
	if (!ring_sc_room(n, p->pps))
		return;
	char who[13];
	link_addr_short(&p->addr, who);
	log_info("ring", "shortcut to %s: %.0f packets/s %s", who, p->pps,
		 l ? "on the link we have" : "over the ring: asking for a link");
	n->ring.sc.opened++;
	if (l) {
		l->want_roles |= ROLE_SHORTCUT;
		ring_roles_set(l, l->local_roles | ROLE_SHORTCUT);
		return;
	}
	p->dial_ms = now;
	ring_ctm_send(n, MODE_EXACT, &p->addr, ROLE_SHORTCUT, 0);
}

static void ring_sc_peer_upkeep(struct node *n, struct ring_sc_peer *p, uint64_t now)
{
	struct link *l = link_find_peer(n, &p->addr, false);
	bool idle = now - p->last_ms >= n->ring.sc.idle_ms;
	if (l && ((l->local_roles | l->want_roles) & ROLE_SHORTCUT) && idle) {
		n->ring.sc.idled++;
		ring_sc_drop(n, l, "idle");
	} else if (!idle && p->pps >= n->ring.sc.pps) {
		ring_sc_want(n, p, l);
	}
	if (!l && idle && p->pps < 0.01)
		p->used = false;
}

/* Once a tick: counts become rates, rates become shortcuts. */
static void ring_sc_upkeep(struct node *n)
{
	struct ring_shortcuts *sc = &n->ring.sc;
	uint64_t now = ev_now(&n->loop), elapsed = now - sc->last_tick_ms;
	sc->last_tick_ms = now;
	if (!sc->pps) {                 /* turned off (SIGHUP): ours go now */
		for (struct link *l = n->links; l; l = l->next)
			if (l->state != LINK_CLOSED && ((l->local_roles | l->want_roles) & ROLE_SHORTCUT))
				ring_sc_drop(n, l, "shortcuts turned off");
		free(sc->peers);                /* rates start afresh when turned on */
		sc->peers = NULL;
		return;
	}
	for (unsigned i = 0; sc->peers && i < RING_SC_SLOTS; i++) {
		struct ring_sc_peer *p = &sc->peers[i];
		if (!p->used)
			continue;
		p->pps = ring_rate_decay(p->pps, p->packets, elapsed, RING_SC_WINDOW_MS);
		if (p->packets)
			p->last_ms = now;
		p->packets = 0;
		ring_sc_peer_upkeep(n, p, now);
	}
	/* Without counted traffic we hold no shortcut of our own, and a peer's
	 * is checked against the cap as it comes (ring_on_roles, link up). */
	if (sc->peers)
		ring_sc_enforce_cap(n);
}

static int64_t ring_tick(struct ev_loop *loop, struct ev_timer *t)
{
	struct node *n = container_of(t, struct node, ring.tick);
	ring_bootstrap_upkeep(n);
	ring_merge_upkeep(n);
	if (ev_now(loop) - n->ring.remember_saved_ms >= RING_REMEMBER_SAVE_MS)
		ring_remember_save(n);
	ring_sc_upkeep(n);
	ring_close_unneeded(n);
	ring_pns_upkeep(n);
	ring_far_upkeep(n);
	ring_deferred_upkeep(n);
	if (ev_now(loop) >= n->ring.next_probe_ms)
		ring_probe(n);
	uint64_t next = n->ring.next_probe_ms > ev_now(loop) ? n->ring.next_probe_ms - ev_now(loop) : 0;
	return next < RING_TICK_MS ? (int64_t)next : RING_TICK_MS;
}

/* ---- link hooks ----------------------------------------------------- */

static void ring_on_link_up(struct node *n, struct link *l)
{
	if (n->up.links_changed)
		n->up.links_changed(n);
	n->ring.boot_backoff_ms = 0;
	ring_note_inbound(n, l);
	ring_remember(n, l);
	bool merge = n->ring.joined && (l->want_roles & ROLE_LEAF);
	l->local_roles = l->want_roles;
	link_send_byte(l, WIRE_ROLES, l->local_roles);
	ring_near_recompute(n);
	if (ring_sc_only(l) && n->ring.sc.pps)
		ring_sc_enforce_cap(n);
	if (!n->ring.joined || (l->local_roles & ROLE_NEAR))
		ring_probe_soon(n);
	if (merge)
		ring_merge_ask(n, l);
	if (n->up.linked)
		n->up.linked(n, l);
}

static void ring_on_link_down(struct node *n, struct link *l, uint8_t reason)
{
	if (n->up.links_changed)
		n->up.links_changed(n);
	ring_near_recompute(n);
	if ((l->local_roles & ROLE_NEAR) || reason == BYE_LEAVING || reason == 0)
		ring_probe_soon(n);
}

/* Peer roles matter to ring_close_unneeded, and to the shortcut cap: a
 * peer may make a link we already have its shortcut without asking. */
static void ring_on_roles(struct node *n, struct link *l)
{
	if ((l->peer_roles & ROLE_SHORTCUT) && n->ring.sc.pps)
		ring_sc_enforce_cap(n);
}

static void ring_on_routed(struct node *n, struct link *l, const uint8_t *pkt, size_t len)
{
	struct wire_routed r;
	if (wire_routed_decode(pkt, len, &r) < 0) {
		link_drop(l, DROP_MALFORMED);
		return;
	}
	n->ring.rx = l;
	ring_route(n, &r);
	n->ring.rx = NULL;
}

/* Tell every neighbour we are going; they drop us at once. */
static void ring_leave(struct node *n)
{
	n->up.link_down = NULL;
	for (struct link *l = n->links; l; l = l->next)
		link_close(l, BYE_LEAVING);
}

/* Join again under another ring address: every link closes (peers learned
 * the old address in the handshake) and the bootstrap peers are dialled
 * afresh.  For auto-addressed nodes whose saved address proved taken. */
static void ring_rejoin(struct node *n, const ring_addr *addr)
{
	for (struct link *l = n->links; l; l = l->next)
		if (l->state != LINK_CLOSED)
			link_close(l, BYE_LEAVING);
	n->self.addr = *addr;
	n->self.instance = sec_random_u64(&n->rng);
	n->ring.joined = false;
	memset(n->ring.far, 0, sizeof n->ring.far);     /* chosen for the old address */
	free(n->ring.deferred);
	n->ring.deferred = NULL;
	n->ring.n_deferred = 0;
	n->ring.next_boot_ms = 0;
	n->ring.boot_backoff_ms = 0;
}

static void ring_start(struct node *n)
{
	n->up.link_up = ring_on_link_up;
	n->up.link_down = ring_on_link_down;
	n->up.link_roles = ring_on_roles;
	n->up.routed = ring_on_routed;
	n->up.conflict = ring_on_conflict;
	n->up.probe_reply = ring_on_probe_reply;
	if (!n->ring.sc.max)            /* cli_ sets all three; tests may not */
		n->ring.sc = (struct ring_shortcuts){ .pps = RING_SC_PPS_DEFAULT, .max = RING_SC_MAX_DEFAULT,
						      .idle_ms = RING_SC_IDLE_DEFAULT_S * 1000 };
	n->ring.sc.last_tick_ms = ev_now(&n->loop);
	ev_timer_init(&n->ring.tick, ring_tick);
	ev_timer_arm(&n->loop, &n->ring.tick, 0);
}

/* ===================================================================== 08 dht_
 * A DHT in the ring: records under string keys ("ip:10.128.7.5",
 * "name:alice"), stored at the node nearest SHA-1(key) and replicated to the
 * next nearest, DHT_REPLICAS copies in all.  put overwrites, create only
 * fills an empty (or expired, or own) slot, get reads; every record carries
 * a lease (TTL) that its owner refreshes.  Each node re-checks its records
 * DHT_MAINT_MS after its links changed or one went quiet: it pushes each to
 * the nodes that should hold it (itself and its live links nearest the key)
 * and drops those it should no longer hold, so records follow joins, leaves
 * and crashes.  A node that leaves hands its records over first; a record
 * not pushed for DHT_REPUBLISH_MS is pushed again (a REPLICA may be lost);
 * a neighbour told by RELEASE that three nodes are nearer drops its copy;
 * a request without reply is sent again every DHT_RETRY_MS.
 * In certificate networks a record is signed by its owner and carries the
 * owner's certificate; holders and readers check it, and keys that claim an
 * address ("ip:A.B.C.D", "name:N") must be granted by that certificate.
 * A new revocation list drops the records of the owners it revokes.
 * The signature covers the lease as an absolute expiry in Unix time and the
 * owner's write (PUT or CREATE), so no holder extends a record or turns a
 * claim into an overwrite; verified certificates are cached (dht_cert_get).
 * Readers take only OK replies for the key they asked, signed in
 * certificate networks.  A holder keeps at most dht_owner_quota records of
 * one owner (REPLICAs count against their owner), takes REPLICAs only
 * straight from a neighbour among the key's nearest, and RELEASE only
 * straight from its sender: routed source addresses prove nothing.
 * Storage is one array, indexed by key and by owner (dht_index_): a node
 * holds a few records per virtual IP, but a flood must not cost a scan of
 * DHT_RECORDS_MAX records per message.
 * To add an operation: a dht_op, a case in dht_on_message, a ctl command.
 * ========================================================================= */

enum {
	DHT_REPLICAS = 3,               /* copies of each record: survives two failures */
	DHT_VALUE_MAX_BYTES = 1024,
	DHT_KEY_MAX_BYTES = 96,
	DHT_TTL_MAX_S = 86400,
	DHT_RECORDS_MAX = 65536,        /* per node; new keys are refused past it */
	DHT_MAINT_MS = 500,             /* expiry, quiet links, retries: a scan of the tables, no traffic */
	DHT_HANDOVER_MS = 200,          /* links changed: push records this soon (see dht_links_changed) */
	DHT_REQUEST_TIMEOUT_MS = 3000,
	DHT_RETRY_MS = 1000,            /* resend a request unanswered this long: 2 tries more in the 3 s */
	DHT_REPUBLISH_MS = 30000,       /* push a record again after this long without a push */
	DHT_RELEASE_WINDOW_MS = 2000,   /* RELEASE counts this long after our push: the answer to it */
	DHT_PENDING_MAX = 1024,         /* outstanding lookups: CLI requests and IP mappings */
	DHT_CLOCK_SKEW_S = 300,         /* a signed expiry may lie this far past now + DHT_TTL_MAX_S */
	DHT_CERT_REFUSED_MS = 60000,    /* a certificate that failed: not checked again this long */
	DHT_CERTS_CACHED = 32,          /* owners whose records a node holds or reads at once: a few
					 * per holder neighbourhood; a miss costs one chain check */
	/* Records one owner may have a node hold: ip:, name: and host: for its
	 * own address, a lease claim under way, and a few keys of its own
	 * (ipop dht put) ... */
	DHT_OWNER_OWN_KEYS = 8,
	/* ... plus one ip: record per routed IP (certificate networks: per IP
	 * its certificate routes); a small ring holds all of them on every node. */
	DHT_OWNER_RECORDS_MAX = DHT_OWNER_OWN_KEYS + (IP_ROUTES_MAX << (32 - IP_ROUTE_MIN_PREFIX)),
};

enum dht_op { DHT_PUT = 1, DHT_CREATE = 2, DHT_GET = 3, DHT_REPLY = 4, DHT_REPLICA = 5, DHT_RELEASE = 6,
	      DHT__OP_END };

enum dht_status { DHT_OK = 0, DHT_NOT_FOUND = 1, DHT_EXISTS = 2, DHT_REFUSED = 3, DHT_FULL = 4 };

static const char *const dht_status_names[] = { "ok", "not found", "exists", "refused", "full" };

/* One wire layout for every DHT message; unused fields are empty. */
struct wire_dht {
	uint8_t op, status;
	uint32_t token;
	uint8_t key_len;
	const uint8_t *key;
	ring_addr owner;
	uint32_t ttl_s;
	uint8_t wop;                    /* the owner's write, PUT or CREATE (signed); else 0 */
	uint64_t expires;               /* certificate networks: lease end, Unix s (signed); else 0 */
	uint16_t value_len;
	const uint8_t *value;
	uint16_t cert_len;
	const uint8_t *cert;
	uint8_t sig_len;
	const uint8_t *sig;
};

static int dht_decode(const uint8_t *p, size_t len, struct wire_dht *m)
{
	struct buf b = buf_of(p, len);
	m->op = buf_u8(&b);
	m->status = buf_u8(&b);
	m->token = buf_u32(&b);
	m->key_len = buf_u8(&b);
	m->key = buf_view(&b, m->key_len);
	buf_bytes(&b, m->owner.b, RING_ADDR_BYTES);
	m->ttl_s = buf_u32(&b);
	m->wop = buf_u8(&b);
	m->expires = buf_u64(&b);
	m->value_len = buf_u16(&b);
	m->value = buf_view(&b, m->value_len);
	m->cert_len = buf_u16(&b);
	m->cert = buf_view(&b, m->cert_len);
	m->sig_len = buf_u8(&b);
	m->sig = buf_view(&b, m->sig_len);
	if (m->op < DHT_PUT || m->op >= DHT__OP_END || m->status > DHT_FULL || m->key_len == 0 ||
	    m->key_len > DHT_KEY_MAX_BYTES || m->value_len > DHT_VALUE_MAX_BYTES ||
	    m->cert_len > SEC_CERT_MAX_BYTES || m->sig_len > SEC_SIG_MAX_BYTES || m->ttl_s > DHT_TTL_MAX_S ||
	    (m->wop && m->wop != DHT_PUT && m->wop != DHT_CREATE))
		b.bad = true;
	return wire_finish(&b);
}

static ssize_t dht_encode(uint8_t *out, size_t cap, const struct wire_dht *m)
{
	struct wbuf w = wbuf_of(out, cap);
	wbuf_u8(&w, m->op);
	wbuf_u8(&w, m->status);
	wbuf_u32(&w, m->token);
	wbuf_u8(&w, m->key_len);
	wbuf_bytes(&w, m->key, m->key_len);
	wbuf_bytes(&w, m->owner.b, RING_ADDR_BYTES);
	wbuf_u32(&w, m->ttl_s);
	wbuf_u8(&w, m->wop);
	wbuf_u64(&w, m->expires);
	wbuf_u16(&w, m->value_len);
	wbuf_bytes(&w, m->value, m->value_len);
	wbuf_u16(&w, m->cert_len);
	wbuf_bytes(&w, m->cert, m->cert_len);
	wbuf_u8(&w, m->sig_len);
	wbuf_bytes(&w, m->sig, m->sig_len);
	return wbuf_done(&w);
}

struct dht_record {
	char key[DHT_KEY_MAX_BYTES + 1];
	ring_addr hash;                 /* SHA-1(key): where it lives on the ring */
	ring_addr owner;
	uint64_t expires_ms;
	uint64_t expires;               /* the signed lease end (Unix s), or 0 */
	uint8_t wop;                    /* the owner's signed write */
	uint32_t links_epoch;           /* node->dht.links_epoch when last pushed */
	uint64_t pushed_ms;             /* when last pushed (DHT_REPUBLISH_MS) */
	uint16_t value_len, cert_len;
	uint8_t sig_len;
	uint8_t *blob;                  /* value, then cert; one allocation */
	uint8_t sig[SEC_SIG_MAX_BYTES];
};

/* A local request waiting for its reply. */
struct dht_pending {
	uint32_t token;
	uint64_t deadline_ms;
	uint64_t sent_ms;               /* last (re)sent: DHT_RETRY_MS */
	ring_addr hash;                 /* SHA-1(key): a reply must be for it */
	uint8_t *msg;                   /* the encoded request, sent again as is */
	uint16_t msg_len;
	void (*done)(struct node *n, void *arg, const struct wire_dht *reply);
	void *arg;
};

static ring_addr dht_hash(const char *key, size_t len)
{
	ring_addr a;
	sec_sha1(key, len, a.b);
	return a;
}

/* ---- indexes ------------------------------------------------------------
 * Two open-addressing tables over ring addresses with linear probing; SHA-1
 * addresses are uniform, so their first bytes are the hash.  keys: record
 * index + 1 by the record's key hash (0 empty, DHT_SLOT_GONE removed);
 * owners: records held per owner (an owner with none keeps its slot).  Both
 * are rebuilt from the records when half full, which drops removed slots:
 * a load of at most 1/2 keeps probes short, and rebuilds cost O(1) per
 * change amortized. */

enum { DHT_SLOT_GONE = UINT32_MAX };

struct dht_owner {
	ring_addr addr;
	uint32_t records;
};

static unsigned dht_slot_home(const ring_addr *a, unsigned cap)
{
	unsigned h = (unsigned)a->b[0] << 24 | (unsigned)a->b[1] << 16 | (unsigned)a->b[2] << 8 | a->b[3];
	return h & (cap - 1);
}

/* Room for 4 entries per record (and a first few): load 1/4 after a rebuild. */
static unsigned dht_slots_for(unsigned n)
{
	unsigned cap = 16;
	while (cap < 4 * n)
		cap *= 2;
	return cap;
}

static uint32_t *dht_key_slot(struct dht_state *d, const ring_addr *hash, const char *key, size_t len)
{
	unsigned mask = d->keys_cap - 1;
	for (unsigned j = d->keys_cap ? dht_slot_home(hash, d->keys_cap) : 0; d->keys_cap; j = (j + 1) & mask) {
		uint32_t v = d->keys[j];
		if (!v)
			return NULL;
		if (v == DHT_SLOT_GONE)
			continue;
		const struct dht_record *r = &d->records[v - 1];
		if (wire_addr_eq(&r->hash, hash) && strlen(r->key) == len && !memcmp(r->key, key, len))
			return &d->keys[j];
	}
	return NULL;
}

static struct dht_owner *dht_owner_slot(struct dht_state *d, const ring_addr *owner)
{
	for (unsigned j = d->owners_cap ? dht_slot_home(owner, d->owners_cap) : 0; d->owners_cap;
	     j = (j + 1) & (d->owners_cap - 1)) {
		struct dht_owner *o = &d->owners[j];
		static const ring_addr none;
		if (!o->records && wire_addr_eq(&o->addr, &none))
			return o;       /* the free slot where it would go */
		if (wire_addr_eq(&o->addr, owner))
			return o;
	}
	return NULL;
}

/* Both tables afresh, sized for the records held; -ENOMEM leaves the old. */
static int dht_index_rebuild(struct dht_state *d)
{
	unsigned cap = dht_slots_for(d->n_records + 1);
	uint32_t *keys = calloc(cap, sizeof *keys);
	struct dht_owner *owners = calloc(cap, sizeof *owners);
	if (!keys || !owners) {
		free(keys);
		free(owners);
		return -ENOMEM;
	}
	free(d->keys);
	free(d->owners);
	d->keys = keys;
	d->owners = owners;
	d->keys_cap = d->owners_cap = cap;
	d->keys_used = d->owners_used = 0;
	for (unsigned i = 0; i < d->n_records; i++) {
		const struct dht_record *r = &d->records[i];
		unsigned j = dht_slot_home(&r->hash, cap);
		while (keys[j])
			j = (j + 1) & (cap - 1);
		keys[j] = i + 1;
		d->keys_used++;
		struct dht_owner *o = dht_owner_slot(d, &r->owner);
		if (!o->records)
			d->owners_used++;
		o->addr = r->owner;
		o->records++;
	}
	return 0;
}

/* Room for one more record in both tables: 0 or -ENOMEM. */
static int dht_index_room(struct dht_state *d)
{
	if (2 * (d->keys_used + 1) <= d->keys_cap && 2 * (d->owners_used + 1) <= d->owners_cap)
		return 0;
	return dht_index_rebuild(d);
}

static struct dht_record *dht_find(struct dht_state *d, const char *key, size_t len)
{
	ring_addr hash;
	if (!d->n_records)
		return NULL;
	sec_sha1(key, len, hash.b);
	uint32_t *slot = dht_key_slot(d, &hash, key, len);
	return slot ? &d->records[*slot - 1] : NULL;
}

/* How many records of this owner we hold (dht_owner_quota). */
static unsigned dht_owned(struct dht_state *d, const ring_addr *owner)
{
	struct dht_owner *o = dht_owner_slot(d, owner);
	return o && wire_addr_eq(&o->addr, owner) ? o->records : 0;
}

/* Count a record for its owner; after dht_index_room. */
static void dht_owner_add(struct dht_state *d, const ring_addr *owner, int delta)
{
	struct dht_owner *o = dht_owner_slot(d, owner);
	if (!o)
		return;
	if (!wire_addr_eq(&o->addr, owner)) {
		if (delta < 0)
			return;
		o->addr = *owner;
		d->owners_used++;
	}
	o->records = (uint32_t)((int)o->records + delta);
}

/* Index record r, just appended; after dht_index_room. */
static void dht_index_add(struct dht_state *d, const struct dht_record *r)
{
	unsigned j = dht_slot_home(&r->hash, d->keys_cap);
	while (d->keys[j] && d->keys[j] != DHT_SLOT_GONE)
		j = (j + 1) & (d->keys_cap - 1);
	if (!d->keys[j])
		d->keys_used++;
	d->keys[j] = (uint32_t)(r - d->records) + 1;
	dht_owner_add(d, &r->owner, 1);
}

/* Double a slot array, up to max slots; 0, or -ENOSPC at max, or -ENOMEM.
 * Arrays start small and grow: a node holds a few records, and a simulation
 * (section 15b) holds up to a million nodes, where DHT_RECORDS_MAX slots up
 * front would reserve 16 MB each.  Callers hold no slot pointer across it. */
static int dht_grow(void **arr, unsigned *cap, unsigned max, size_t size)
{
	if (*cap >= max)
		return -ENOSPC;
	unsigned c = *cap ? *cap * 2 : 4;
	c = c > max ? max : c;
	uint8_t *p = realloc(*arr, (size_t)c * size);
	if (!p)
		return -ENOMEM;
	memset(p + (size_t)*cap * size, 0, (size_t)(c - *cap) * size);
	*arr = p;
	*cap = c;
	return 0;
}

/* Remove r; the last record takes its slot (and its index entry follows). */
static void dht_record_free(struct dht_state *d, struct dht_record *r)
{
	uint32_t *slot = dht_key_slot(d, &r->hash, r->key, strlen(r->key));
	struct dht_record *last = &d->records[d->n_records - 1];
	if (slot)
		*slot = DHT_SLOT_GONE;
	dht_owner_add(d, &r->owner, -1);
	free(r->blob);
	if (r != last && (slot = dht_key_slot(d, &last->hash, last->key, strlen(last->key))))
		*slot = (uint32_t)(r - d->records) + 1;
	*r = *last;
	d->n_records--;
}

/* The signature covers what a reader relies on (key, owner, value), how
 * long (the lease's end in Unix time: a holder cannot extend it), and the
 * owner's write (a CREATE, which must not overwrite another owner's record,
 * cannot be replayed as a PUT). */
static void dht_sig_hash(const struct wire_dht *m, uint8_t out[32])
{
	mbedtls_sha256_context c;
	uint8_t lease[9];
	struct wbuf w = wbuf_of(lease, sizeof lease);
	wbuf_u8(&w, m->wop);
	wbuf_u64(&w, m->expires);
	mbedtls_sha256_init(&c);
	mbedtls_sha256_starts(&c, 0);
	mbedtls_sha256_update(&c, (const uint8_t *)"ipop-v2 dht lease", 17);
	mbedtls_sha256_update(&c, &m->key_len, 1);
	mbedtls_sha256_update(&c, m->key, m->key_len);
	mbedtls_sha256_update(&c, m->owner.b, RING_ADDR_BYTES);
	mbedtls_sha256_update(&c, lease, sizeof lease);
	mbedtls_sha256_update(&c, m->value, m->value_len);
	mbedtls_sha256_finish(&c, out);
	mbedtls_sha256_free(&c);
}

/* The wall clock, for signed lease ends: certificates need it right anyway. */
static uint64_t dht_unix_now(void)
{
	return (uint64_t)time(NULL);
}

/* A verified owner certificate: the chain is checked once per certificate,
 * each record then costs one signature check. */
struct dht_cert {
	uint8_t id[32];                 /* SHA-256 of the certificate's bytes; zero: free slot */
	mbedtls_x509_crt crt;
	struct sec_grant grant;
	uint64_t used_ms;
	uint64_t refused_until_ms;      /* failed its check: refused without another until then */
};

/* The cached slot for id, else the least recently used one, emptied. */
static struct dht_cert *dht_cert_slot(struct dht_state *d, const uint8_t id[32], bool *hit)
{
	struct dht_cert *lru = &d->certs[0];
	for (unsigned i = 0; i < DHT_CERTS_CACHED; i++) {
		if (!memcmp(d->certs[i].id, id, 32)) {
			*hit = true;
			return &d->certs[i];
		}
		if (d->certs[i].used_ms < lru->used_ms)
			lru = &d->certs[i];
	}
	*hit = false;
	mbedtls_x509_crt_free(&lru->crt);
	*lru = (struct dht_cert){ 0 };
	return lru;
}

/* An owner's certificate, verified (our CA, valid now, not revoked), or
 * NULL.  A cached one is checked again for expiry and revocation only; one
 * that failed is refused for DHT_CERT_REFUSED_MS without a chain check.
 * That stops a certificate sent again, not one altered per message (each
 * is new here, a chain check, ~1 ms): see docs/SECURITY.md section 11. */
static struct dht_cert *dht_cert_get(struct node *n, const uint8_t *der, size_t len)
{
	struct dht_state *d = &n->dht;
	uint8_t id[32];
	const char *why;
	bool hit;
	if (!len || (!d->certs && !(d->certs = calloc(DHT_CERTS_CACHED, sizeof *d->certs))))
		return NULL;
	sec_sha256("ipop-v2 dht cert", 16, der, len, id);
	struct dht_cert *c = dht_cert_slot(d, id, &hit);
	uint64_t now = ev_now(&n->loop);
	c->used_ms = now + 1;
	if (hit && c->refused_until_ms > now)
		return NULL;
	if (hit && !c->refused_until_ms)
		return mbedtls_x509_time_is_past(&c->crt.valid_to) || sec_revoked(&n->sec, &c->grant.serial) ? NULL : c;
	mbedtls_x509_crt_free(&c->crt);
	mbedtls_x509_crt_init(&c->crt);
	memcpy(c->id, id, 32);
	c->refused_until_ms = 0;
	if (sec_cert_check(&n->sec, der, len, &c->crt, &c->grant, &why) == 0)
		return c;
	mbedtls_x509_crt_free(&c->crt);
	mbedtls_x509_crt_init(&c->crt);
	c->refused_until_ms = now + DHT_CERT_REFUSED_MS;
	return NULL;
}

static void dht_certs_free(struct dht_state *d)
{
	for (unsigned i = 0; d->certs && i < DHT_CERTS_CACHED; i++)
		mbedtls_x509_crt_free(&d->certs[i].crt);
	free(d->certs);
	d->certs = NULL;
}

/* May this certificate's holder own this key?  "ip:A.B.C.D" needs A.B.C.D
 * among its IPs or routed prefixes; "name:N" needs the name N. */
static bool dht_key_granted(const struct sec_grant *g, const char *key)
{
	struct in_addr ia;
	if (!strncmp(key, "ip:", 3)) {
		if (inet_pton(AF_INET, key + 3, &ia) != 1)
			return false;
		uint32_t ip = ntohl(ia.s_addr);
		if (sec_grant_has_ip(g, ip))
			return true;
		for (unsigned i = 0; i < g->n_routes; i++) {
			uint32_t mask = g->route_len[i] ? ~0u << (32 - g->route_len[i]) : 0;
			if ((ip & mask) == g->route_net[i])
				return true;
		}
		return false;
	}
	if (!strncmp(key, "name:", 5))
		return g->name[0] && !strcmp(g->name, key + 5);
	return true;
}

/* Is owner the ring address this certificate entitles its holder to? */
static bool dht_cert_owns(const struct dht_cert *c, const ring_addr *owner)
{
	ring_addr a;
	for (unsigned i = 0; i < c->grant.n_ips; i++)
		if ((a = sec_addr_of_ip(c->grant.ips[i]), wire_addr_eq(&a, owner)))
			return true;
	return !c->grant.n_ips && sec_cert_addr(&c->crt, &c->grant, 0, &a) && wire_addr_eq(&a, owner);
}

/* A signed lease: a write the owner made (a PUT or CREATE arrives as
 * itself), not ended, and no longer than any lease may be. */
static bool dht_lease_signed_ok(const struct wire_dht *m)
{
	uint64_t now = dht_unix_now();
	if (m->wop != DHT_PUT && m->wop != DHT_CREATE)
		return false;
	if ((m->op == DHT_PUT || m->op == DHT_CREATE) && m->op != m->wop)
		return false;
	return m->expires > now && m->expires <= now + DHT_TTL_MAX_S + DHT_CLOCK_SKEW_S;
}

/* Records one owner may have us hold: DHT_OWNER_OWN_KEYS per certified IP
 * plus one per IP its certificate routes, at most DHT_OWNER_RECORDS_MAX. */
static unsigned dht_owner_quota(const struct sec_grant *g)
{
	uint64_t k = (uint64_t)DHT_OWNER_OWN_KEYS * (g->n_ips ? g->n_ips : 1);
	for (unsigned i = 0; i < g->n_routes; i++)
		k += (uint64_t)1 << (32 - g->route_len[i]);
	return k < DHT_OWNER_RECORDS_MAX ? (unsigned)k : DHT_OWNER_RECORDS_MAX;
}

/* Certificate networks, the checks that cost no signature: the record's
 * certificate is ours (cached), its ring address is the owner, it may own
 * this key, and the signed lease has not ended.  NULL: refused. */
static struct dht_cert *dht_cert_for(struct node *n, const struct wire_dht *m, const char *key)
{
	struct dht_cert *c = dht_cert_get(n, m->cert, m->cert_len);
	if (!c || !dht_cert_owns(c, &m->owner) || !dht_key_granted(&c->grant, key) || !dht_lease_signed_ok(m))
		return NULL;
	return c;
}

static bool dht_signed_by(struct dht_cert *c, const struct wire_dht *m)
{
	uint8_t h[32];
	dht_sig_hash(m, h);
	return sec_verify(&c->crt, h, m->sig, m->sig_len);
}

/* Certificate networks: the record is signed by its owner (dht_cert_for
 * and the signature).  Other networks: membership (the link) is the
 * authority. */
static bool dht_authorized(struct node *n, const struct wire_dht *m, const char *key)
{
	struct dht_cert *c;
	return n->sec.mode != SEC_CERT || ((c = dht_cert_for(n, m, key)) && dht_signed_by(c, m));
}

/* A REPLICA of the very record we hold (same signature, same lease): its
 * signature was checked when we stored it. */
static bool dht_same_signed(const struct dht_record *r, const struct wire_dht *m)
{
	return m->sig_len && r->sig_len == m->sig_len && !memcmp(r->sig, m->sig, m->sig_len) &&
	       r->expires == m->expires && r->wop == m->wop && wire_addr_eq(&r->owner, &m->owner) &&
	       r->value_len == m->value_len && !memcmp(r->blob, m->value, m->value_len) &&
	       r->cert_len == m->cert_len && !memcmp(r->blob + r->value_len, m->cert, m->cert_len);
}

/* When the lease ends on our clock: ttl_s from now, and in certificate
 * networks never past the signed end. */
static uint64_t dht_lease_end_ms(struct node *n, const struct wire_dht *m, uint64_t now)
{
	uint64_t ttl_s = m->ttl_s, unix_now = dht_unix_now();
	if (n->sec.mode == SEC_CERT && m->expires - unix_now < ttl_s)
		ttl_s = m->expires - unix_now;  /* dht_lease_signed_ok: expires > unix_now */
	return now + ttl_s * 1000;
}

static enum dht_status dht_store(struct node *n, const struct wire_dht *m, bool create)
{
	struct dht_state *d = &n->dht;
	char key[DHT_KEY_MAX_BYTES + 1];
	struct dht_cert *c = NULL;
	memcpy(key, m->key, m->key_len);
	key[m->key_len] = 0;
	if (strlen(key) != m->key_len)
		return DHT_REFUSED;
	struct dht_record *r = dht_find(d, key, m->key_len);
	if (r && m->op == DHT_REPLICA && dht_same_signed(r, m))
		return DHT_OK;          /* held as is: replication stops here */
	if (n->sec.mode == SEC_CERT && !(c = dht_cert_for(n, m, key)))
		return DHT_REFUSED;
	unsigned quota = c ? dht_owner_quota(&c->grant) : DHT_OWNER_RECORDS_MAX;
	uint64_t now = ev_now(&n->loop), expires = dht_lease_end_ms(n, m, now);
	if (r && create && r->expires_ms > now && !wire_addr_eq(&r->owner, &m->owner))
		return DHT_EXISTS;
	if (r && m->op == DHT_REPLICA && r->expires_ms >= expires)
		return DHT_OK;          /* ours is as fresh: replication stops here */
	if ((!r || !wire_addr_eq(&r->owner, &m->owner)) && dht_owned(d, &m->owner) >= quota)
		return DHT_FULL;        /* this owner has its share: the others keep their room */
	if (c && !dht_signed_by(c, m))
		return DHT_REFUSED;     /* last: the costly check, after every cheap refusal */
	if (!r && d->n_records == d->records_cap &&
	    dht_grow((void **)&d->records, &d->records_cap, DHT_RECORDS_MAX, sizeof *d->records) < 0)
		return DHT_FULL;
	uint8_t *blob = malloc((size_t)m->value_len + m->cert_len + 1);
	if (!blob || dht_index_room(d) < 0) {
		free(blob);
		return DHT_FULL;
	}
	if (r && !wire_addr_eq(&r->owner, &m->owner)) {
		dht_owner_add(d, &r->owner, -1);
		dht_owner_add(d, &m->owner, 1);
	}
	if (!r) {
		r = &d->records[d->n_records++];
		*r = (struct dht_record){ .hash = dht_hash(key, m->key_len), .owner = m->owner };
		memcpy(r->key, key, m->key_len + 1);
		dht_index_add(d, r);
	}
	free(r->blob);
	r->blob = blob;
	if (m->value_len)               /* empty fields may be NULL */
		memcpy(blob, m->value, m->value_len);
	if (m->cert_len)
		memcpy(blob + m->value_len, m->cert, m->cert_len);
	r->value_len = m->value_len;
	r->cert_len = m->cert_len;
	r->sig_len = m->sig_len;
	if (m->sig_len)
		memcpy(r->sig, m->sig, m->sig_len);
	r->owner = m->owner;
	r->expires_ms = expires;
	r->expires = m->expires;
	r->wop = m->wop;
	r->links_epoch = d->links_epoch - 1;    /* push to the other holders soon */
	return DHT_OK;
}

static struct wire_dht dht_wire_of(const struct dht_record *r, uint8_t op, uint64_t now)
{
	return (struct wire_dht){
		.op = op, .key_len = (uint8_t)strlen(r->key), .key = (const uint8_t *)r->key,
		.owner = r->owner, .ttl_s = (uint32_t)((r->expires_ms - now) / 1000), /* floor: copies never outlive */
		.wop = r->wop, .expires = r->expires, .value_len = r->value_len, .value = r->blob,
		.cert_len = r->cert_len, .cert = r->blob + r->value_len, .sig_len = r->sig_len, .sig = r->sig,
	};
}

/* -EMSGSIZE when the message (value, certificate, signature) does not fit
 * one routed packet: in certificate networks that leaves ~800 value bytes. */
static int dht_send(struct node *n, uint8_t mode, const ring_addr *dst, const struct wire_dht *m)
{
	uint8_t payload[WIRE_MAX_PACKET_BYTES];
	ssize_t len = dht_encode(payload, sizeof payload - WIRE_ROUTED_FIXED_BYTES - RING_ADDR_BYTES, m);
	if (len <= 0)
		return -EMSGSIZE;
	ring_send(n, mode, dst, NULL, INNER_DHT, payload, (size_t)len);
	return 0;
}

/* The up links that, with us (unless we leave), are the DHT_REPLICAS nodes
 * nearest to key.  A quiet link does not count: its peer has most likely
 * crashed (LINK_QUIET_MS), and counting it handed records to the dead for
 * LINK_DEAD_MS, while the node that should hold them, which sees a live
 * neighbour in its place, never got one. */
static unsigned dht_holders(struct node *n, const ring_addr *key, bool leaving, struct link **out,
			    bool *self_in)
{
	ring_addr dist[DHT_REPLICAS];
	unsigned k = 0;
	*self_in = false;
	ring_addr ds = ring_dist(&n->self.addr, key);
	for (struct link *l = n->links; l; l = l->next) {
		if (!ring_link_usable(l) || ring_link_quiet(n, l))
			continue;
		bool dup = false;
		for (unsigned j = 0; j < k; j++)
			dup |= out[j] && wire_addr_eq(&out[j]->peer.addr, &l->peer.addr);
		if (dup)
			continue;
		ring_addr dl = ring_dist(&l->peer.addr, key);
		unsigned i = k;
		while (i > 0 && wire_addr_cmp(&dl, &dist[i - 1]) < 0)
			i--;
		if (i >= DHT_REPLICAS)
			continue;
		for (unsigned j = (k < DHT_REPLICAS ? k : DHT_REPLICAS - 1); j > i; j--) {
			dist[j] = dist[j - 1];
			out[j] = out[j - 1];
		}
		dist[i] = dl;
		out[i] = l;
		if (k < DHT_REPLICAS)
			k++;
	}
	/* We count when fewer than DHT_REPLICAS links are nearer than we are. */
	unsigned nearer = 0;
	for (unsigned i = 0; i < k; i++)
		nearer += wire_addr_cmp(&dist[i], &ds) < 0;
	*self_in = !leaving && nearer < DHT_REPLICAS;
	return k < DHT_REPLICAS - (*self_in ? 1 : 0) ? k : DHT_REPLICAS - (*self_in ? 1 : 0);
}

/* Push a record to the nodes that should hold it; false if we should not. */
static bool dht_push(struct node *n, struct dht_record *r, uint64_t now, bool leaving)
{
	struct link *holders[DHT_REPLICAS] = { 0 };
	bool self_in;
	unsigned k = dht_holders(n, &r->hash, leaving, holders, &self_in);
	struct wire_dht m = dht_wire_of(r, DHT_REPLICA, now);
	for (unsigned i = 0; i < k; i++)
		dht_send(n, MODE_EXACT, &holders[i]->peer.addr, &m);
	r->links_epoch = n->dht.links_epoch;
	r->pushed_ms = now;
	return self_in;
}

/* Take pending request i out of the table; the caller runs its done(). */
static struct dht_pending dht_pending_take(struct dht_state *d, unsigned i)
{
	struct dht_pending p = d->pending[i];
	d->pending[i] = d->pending[--d->n_pending];
	free(p.msg);
	p.msg = NULL;
	return p;
}

/* May a reader believe this OK reply?  Certificate networks: only as the
 * owner signed it (a holder, or anyone on the route, could answer anything).
 * Other networks: members are trusted with the DHT (SECURITY.md 11). */
static bool dht_reply_believed(struct node *n, const struct wire_dht *reply)
{
	char key[DHT_KEY_MAX_BYTES + 1];
	if (reply->status != DHT_OK || n->sec.mode != SEC_CERT)
		return true;
	memcpy(key, reply->key, reply->key_len);
	key[reply->key_len] = 0;
	return strlen(key) == reply->key_len && dht_authorized(n, reply, key);
}

/* A reply answers the pending request with its token and for its key (a
 * token seen on the route would otherwise answer any key); an OK reply we
 * cannot believe is dropped, and the request waits for the true answer. */
static void dht_pending_done(struct node *n, const struct wire_routed *rt, const struct wire_dht *reply)
{
	struct dht_state *d = &n->dht;
	ring_addr hash = dht_hash((const char *)reply->key, reply->key_len);
	for (unsigned i = 0; i < d->n_pending; i++) {
		if (d->pending[i].token != reply->token || !wire_addr_eq(&d->pending[i].hash, &hash))
			continue;
		if (!dht_reply_believed(n, reply))
			return ring_drop(n, DROP_AUTH_FAILED, &rt->src);
		struct dht_pending p = dht_pending_take(d, i);
		p.done(n, p.arg, reply);
		return;
	}
}

/* A request delivered here, the node nearest the key: answer it. */
static void dht_on_request(struct node *n, const struct wire_routed *rt, const struct wire_dht *m)
{
	struct wire_dht reply = { .op = DHT_REPLY, .token = m->token, .key_len = m->key_len, .key = m->key };
	uint64_t now = ev_now(&n->loop);
	if (m->op == DHT_GET) {
		struct dht_record *r = dht_find(&n->dht, (const char *)m->key, m->key_len);
		if (r && r->expires_ms > now) {
			reply = dht_wire_of(r, DHT_REPLY, now);
			reply.token = m->token;
		} else {
			reply.status = DHT_NOT_FOUND;
		}
	} else if (!wire_addr_eq(&m->owner, &rt->src)) {
		reply.status = DHT_REFUSED;     /* one may only write as oneself */
	} else {
		reply.status = (uint8_t)dht_store(n, m, m->op == DHT_CREATE);
		struct dht_record *r = dht_find(&n->dht, (const char *)m->key, m->key_len);
		if (reply.status == DHT_OK && r) {
			dht_push(n, r, now, false);
			reply = dht_wire_of(r, DHT_REPLY, now);  /* the writer checks it is its own */
			reply.token = m->token;
		}
	}
	dht_send(n, MODE_EXACT, &rt->src, &reply);
}

/* The link a message came straight over from its sender, or NULL: a
 * ROUTED src proves nothing (any member can write any), the link does. */
static struct link *dht_sender_link(struct node *n, const struct wire_routed *rt)
{
	struct link *l = n->ring.rx;
	return l && wire_addr_eq(&l->peer.addr, &rt->src) && ring_link_usable(l) ? l : NULL;
}

/* Does this neighbour push this key for a reason?  It holds it, or held it
 * until we or other nodes joined nearer: it is among the DHT_REPLICAS + 1
 * nodes nearest the key that we see (our live links and us).  A node that
 * joins next to a key learns of the nearer ones as its links form, so the
 * old holders it hears from first still rank; RELEASE sends the fourth
 * its way (dht_release_check). */
static bool dht_replica_from_holder(struct node *n, const struct link *from, const ring_addr *key)
{
	ring_addr df = ring_dist(&from->peer.addr, key), ds = ring_dist(&n->self.addr, key);
	unsigned nearer = wire_addr_cmp(&ds, &df) < 0;
	for (struct link *l = n->links; l; l = l->next) {
		if (l == from || !ring_link_usable(l) || ring_link_quiet(n, l) ||
		    wire_addr_eq(&l->peer.addr, &from->peer.addr))
			continue;
		ring_addr dl = ring_dist(&l->peer.addr, key);
		nearer += wire_addr_cmp(&dl, &df) < 0;
	}
	return nearer <= DHT_REPLICAS;
}

/* A REPLICA came from a neighbour that we see three live nodes nearer to
 * the key than (us or our links): it holds a copy it should not.  It cannot
 * know: with RING_NEAR_PER_SIDE = 2 a node sees at most two nodes between
 * itself and the key, so the fourth nearest takes itself for the third and
 * keeps a copy pushed to it in error (a holder that had not yet linked to a
 * new neighbour) until the lease ends.  Tell it to drop its copy. */
static void dht_release_check(struct node *n, struct link *from, const struct wire_routed *rt,
			      const struct wire_dht *m)
{
	if (ring_link_quiet(n, from))
		return;         /* we cannot rank a node we do not see */
	struct link *holders[DHT_REPLICAS] = { 0 };
	bool self_in;
	ring_addr hash = dht_hash((const char *)m->key, m->key_len);
	unsigned k = dht_holders(n, &hash, false, holders, &self_in);
	if (k + self_in < DHT_REPLICAS)
		return;
	for (unsigned i = 0; i < k; i++)
		if (holders[i] == from)
			return;
	struct wire_dht rel = { .op = DHT_RELEASE, .key_len = m->key_len, .key = m->key };
	dht_send(n, MODE_EXACT, &rt->src, &rel);
}

/* A REPLICA: stored only when it comes straight from a neighbour that
 * holds the key (dht_replica_from_holder), else anyone could fill our
 * store with records routed to us.  Refused or not, a neighbour we see
 * three live nodes nearer than is told to drop its copy: one we refuse
 * (four or more nearer) is the surest surplus, and its own push is the
 * only time it hears of it (it pushes again only when its links change). */
static void dht_on_replica(struct node *n, const struct wire_routed *rt, const struct wire_dht *m)
{
	struct link *from = dht_sender_link(n, rt);
	ring_addr hash = dht_hash((const char *)m->key, m->key_len);
	if (from && dht_replica_from_holder(n, from, &hash))
		dht_store(n, m, false);
	else
		ring_drop(n, DROP_REFUSED, &rt->src);
	if (from)
		dht_release_check(n, from, rt, m);
}

/* A neighbour sees three nodes nearer to the key than us: drop our copy.
 * It has just received the copy from us, so the record lives on; a RELEASE
 * that answers no recent push of ours, or that did not come straight from
 * its sender, is ignored. */
static void dht_on_release(struct node *n, const struct wire_routed *rt, const struct wire_dht *m)
{
	struct link *from = dht_sender_link(n, rt);
	struct dht_record *r = dht_find(&n->dht, (const char *)m->key, m->key_len);
	if (r && from && ev_now(&n->loop) - r->pushed_ms <= DHT_RELEASE_WINDOW_MS)
		dht_record_free(&n->dht, r);
}

static void dht_deliver(struct node *n, const struct wire_routed *r)
{
	struct wire_dht m;
	if (dht_decode(r->payload, r->len, &m) < 0)
		return ring_drop(n, DROP_MALFORMED, &r->src);
	switch (m.op) {
	case DHT_REPLY:
		return dht_pending_done(n, r, &m);
	case DHT_REPLICA:
		return dht_on_replica(n, r, &m);
	case DHT_RELEASE:
		return dht_on_release(n, r, &m);
	default:
		return dht_on_request(n, r, &m);
	}
}

/* Start a request; done() runs with the reply, or with NULL on timeout. */
static int dht_request(struct node *n, uint8_t op, const char *key, const uint8_t *value, size_t vlen,
		       uint32_t ttl_s, void (*done)(struct node *, void *, const struct wire_dht *), void *arg)
{
	struct dht_state *d = &n->dht;
	size_t klen = strlen(key);
	if (!d->started)
		return -ENODEV;
	if (klen == 0 || klen > DHT_KEY_MAX_BYTES || vlen > DHT_VALUE_MAX_BYTES || ttl_s > DHT_TTL_MAX_S)
		return -EINVAL;
	if (done && d->n_pending == d->pending_cap &&
	    dht_grow((void **)&d->pending, &d->pending_cap, DHT_PENDING_MAX, sizeof *d->pending) < 0)
		return -EBUSY;
	uint32_t token = (uint32_t)sec_random_u64(&n->rng);
	struct wire_dht m = { .op = op, .token = token, .key_len = (uint8_t)klen, .key = (const uint8_t *)key,
			      .owner = n->self.addr, .ttl_s = ttl_s, .value_len = (uint16_t)vlen, .value = value };
	uint8_t sig[SEC_SIG_MAX_BYTES], h[32];
	size_t sig_len = 0;
	if (op != DHT_GET && n->sec.mode == SEC_CERT) {
		m.wop = op;
		m.expires = dht_unix_now() + ttl_s;
		dht_sig_hash(&m, h);
		if (sec_sign(&n->sec, &n->rng, h, sig, &sig_len) == 0) {
			m.cert = n->sec.ctx->own.raw.p;
			m.cert_len = (uint16_t)n->sec.ctx->own.raw.len;
			m.sig = sig;
			m.sig_len = (uint8_t)sig_len;
		}
	}
	uint8_t payload[WIRE_MAX_PACKET_BYTES];
	ssize_t len = dht_encode(payload, sizeof payload - WIRE_ROUTED_FIXED_BYTES - RING_ADDR_BYTES, &m);
	if (len <= 0)
		return -EMSGSIZE;
	ring_addr hash = dht_hash(key, klen);
	if (done) {             /* without done: fire and forget (publications) */
		uint8_t *copy = malloc((size_t)len);
		if (!copy)
			return -ENOMEM;
		memcpy(copy, payload, (size_t)len);
		uint64_t now = ev_now(&n->loop);
		d->pending[d->n_pending++] = (struct dht_pending){ .token = token, .done = done, .arg = arg,
			.deadline_ms = now + DHT_REQUEST_TIMEOUT_MS, .sent_ms = now, .hash = hash,
			.msg = copy, .msg_len = (uint16_t)len };
	}
	ring_send(n, MODE_NEAREST, &hash, NULL, INNER_DHT, payload, (size_t)len);
	return 0;
}

/* Time out requests past their deadline; send the others again when
 * unanswered for DHT_RETRY_MS.  A request or its reply is lost when it meets
 * a node as it leaves or crashes; the retry, routed afresh, goes around it.
 * A late reply to an earlier try is answered like any other: the token. */
static void dht_pending_upkeep(struct node *n, uint64_t now)
{
	struct dht_state *d = &n->dht;
	for (unsigned i = 0; i < d->n_pending;) {
		struct dht_pending *p = &d->pending[i];
		if (p->deadline_ms <= now) {
			struct dht_pending gone = dht_pending_take(d, i);
			gone.done(n, gone.arg, NULL);
			continue;
		}
		if (now - p->sent_ms >= DHT_RETRY_MS) {
			p->sent_ms = now;
			ring_send(n, MODE_NEAREST, &p->hash, NULL, INNER_DHT, p->msg, p->msg_len);
		}
		i++;
	}
}

/* Which up links are quiet, as a sum of their addresses' first 32 bits
 * (SHA-1 addresses are uniform, so two sets rarely sum alike).  A link
 * going quiet (or waking) changes who should hold which record, and nothing
 * else reports it: links_epoch moves only when links come and go, which for
 * a crashed peer is LINK_DEAD_MS later. */
static uint32_t dht_quiet_sig(struct node *n)
{
	uint32_t sig = 0;
	struct link *l;
	link_for_each(n, l)
		if (ring_link_usable(l) && ring_link_quiet(n, l))
			sig += ((uint32_t)l->peer.addr.b[0] << 24 | (uint32_t)l->peer.addr.b[1] << 16 |
				(uint32_t)l->peer.addr.b[2] << 8 | l->peer.addr.b[3]) | 1;
	return sig;
}

/* Milliseconds to the next DHT_MAINT_MS step of the node's keepalive grid
 * (link_keepalive_delay: every 1 s from the node's start): every other
 * check shares the keepalives' wake-up, and idle wake-ups are most of an
 * idle node's cost (docs/SCALING.md). */
static int64_t dht_maint_delay(const struct node *n)
{
	return (int64_t)(DHT_MAINT_MS - (ev_now(&n->loop) - n->start_ms) % DHT_MAINT_MS);
}

/* A new revocation list is in force: drop the records of the owners it
 * revokes.  Their links closed and dht_store refuses their new records
 * (sec_cert_check), but what we hold would be served until its lease ends,
 * up to DHT_TTL_MAX_S: a revoked node's name and routes lived on a day. */
static void dht_drop_revoked(struct node *n)
{
	struct dht_state *d = &n->dht;
	unsigned dropped = 0;
	d->crl_gen = n->sec.ctx->crl_gen;
	for (unsigned i = 0; i < d->n_records;) {
		struct dht_record *r = &d->records[i];
		if (sec_der_revoked(&n->sec, r->blob + r->value_len, r->cert_len)) {
			dht_record_free(d, r);
			dropped++;
		} else {
			i++;
		}
	}
	if (dropped)
		log_info("dht", "dropped %u record(s) whose owner's certificate is revoked", dropped);
}

static int64_t dht_maint(struct ev_loop *loop, struct ev_timer *t)
{
	struct node *n = container_of(t, struct node, dht.maint);
	struct dht_state *d = &n->dht;
	uint64_t now = ev_now(loop);
	dht_pending_upkeep(n, now);
	if (n->sec.mode == SEC_CERT && d->crl_gen != n->sec.ctx->crl_gen)
		dht_drop_revoked(n);
	if (!d->n_records)
		return dht_maint_delay(n);      /* a scan of every link for nothing to push */
	uint32_t quiet = dht_quiet_sig(n);
	if (quiet != d->quiet_sig) {
		d->quiet_sig = quiet;
		d->links_epoch++;
	}
	for (unsigned i = 0; i < d->n_records;) {
		struct dht_record *r = &d->records[i];
		bool due = r->links_epoch != d->links_epoch || now - r->pushed_ms >= DHT_REPUBLISH_MS;
		if (r->expires_ms <= now || (due && !dht_push(n, r, now, false)))
			dht_record_free(d, r);  /* expired, or handed to nearer nodes */
		else
			i++;
	}
	return dht_maint_delay(n);
}

/* We leave: hand every record to the DHT_REPLICAS nodes nearest its key
 * but us, before the BYEs go.  The two other holders would push it to the
 * new third only once they see our BYE; a record we alone held (a write
 * whose REPLICAs were still on the way) would be lost. */
static void dht_leave(struct node *n)
{
	uint64_t now = ev_now(&n->loop);
	for (unsigned i = 0; i < n->dht.n_records; i++)
		if (n->dht.records[i].expires_ms > now)
			dht_push(n, &n->dht.records[i], now, true);
}

/* Links changed: records may belong elsewhere now.  Push them soon, not at
 * the next DHT_MAINT_MS: a node that just joined next to a key is where
 * gets for it land, and until a holder hands the record over it answers
 * "not found".  Under churn (10% of a thousand nodes a minute) that gap
 * made reads fail; DHT_HANDOVER_MS also batches a burst of link changes. */
static void dht_links_changed(struct node *n)
{
	struct dht_state *d = &n->dht;
	d->links_epoch++;
	if (ev_timer_armed(&d->maint) && d->maint.when_ms > ev_now(&n->loop) + DHT_HANDOVER_MS)
		ev_timer_arm(&n->loop, &d->maint, DHT_HANDOVER_MS);
}

/* A requester that went away: drop its pending requests unanswered. */
static void dht_forget(struct node *n, void *arg)
{
	struct dht_state *d = &n->dht;
	for (unsigned i = 0; i < d->n_pending;)
		if (d->pending[i].arg == arg)
			dht_pending_take(d, i);
		else
			i++;
}

/* The record and request arrays are allocated by their first record and
 * first request: most nodes of a large simulation hold neither. */
static void dht_start(struct node *n)
{
	n->dht.started = true;
	n->up.deliver_dht = dht_deliver;
	n->up.links_changed = dht_links_changed;
	ev_timer_init(&n->dht.maint, dht_maint);
	ev_timer_arm(&n->loop, &n->dht.maint, dht_maint_delay(n));
}

static void dht_stop(struct node *n)
{
	while (n->dht.n_records)
		dht_record_free(&n->dht, &n->dht.records[0]);
	while (n->dht.pending && n->dht.n_pending)
		dht_pending_take(&n->dht, 0);
	free(n->dht.records);
	free(n->dht.pending);
	dht_certs_free(&n->dht);
	free(n->dht.keys);
	free(n->dht.owners);
	n->dht.keys = NULL;
	n->dht.owners = NULL;
	n->dht.keys_cap = n->dht.keys_used = n->dht.owners_cap = n->dht.owners_used = 0;
	n->dht.records = NULL;
	n->dht.pending = NULL;
	n->dht.records_cap = n->dht.pending_cap = 0;
	n->dht.started = false;
}

/* ===================================================================== 09 nat_
 * Crossing NATs without a server.  Every handshake tells the peer the
 * endpoint its packets came from (the identity block's "observed"), so a
 * node behind a NAT learns its public endpoint from its peers, adds it to
 * the endpoints it advertises, and classifies its NAT from how the mapping
 * varies across peers.  Connect-to-me makes both ends dial every endpoint
 * of the other at once from their listening sockets, which punches holes
 * through endpoint-independent ("cone") NATs.  When every direct dial to a
 * peer fails, a UDP dial falls back to the peer's TCP endpoints, and then
 * to a relayed link (section 06) through one of the peer's near neighbours
 * that we link directly, or dial for the purpose.  Until a link is up,
 * routing hands what dead-ends beside the peer to such a candidate
 * (nat_toward).  A relayed link keeps trying to go direct (both ends dial
 * at once, on a PUNCH, over UDP and TCP), with backoff; when a direct link
 * comes up it replaces the relayed one.  A node with relayed links keeps a
 * spare relay linked, for relay roaming (section 06) to move to.  Of two
 * ends that dial at once, the one that dials first (it answers a
 * connect-to-me or sends the PUNCH) sends its first hellos with a TTL that
 * opens its own NAT and dies before the peer's (ring_punch_ttl): a Linux
 * NAT without an input firewall takes an early hello for itself and then
 * moves its host's mapping to another port.  The TTL is one more than the
 * routers between us and our NAT, which nat_probe_hops counts.
 * ========================================================================= */

enum {
	NAT_PLAN_MS = 30000,            /* a dial's fallback plan lives this long */
	NAT_TICK_MS = 1000,
	NAT_UPGRADE_FIRST_MS = 1000,    /* first try to turn a relayed link direct: its
					 * handshake just told both ends each other's
					 * current endpoints */
	NAT_UPGRADE_MAX_MS = 120000,    /* and the backoff's cap */
};

enum nat_kind {
	NAT_UNKNOWN, NAT_NONE, NAT_CONE, NAT_PORT_PRESERVING, NAT_SYMMETRIC_STEP, NAT_SYMMETRIC
};

static const char *const nat_kind_names[] = {
	"unknown", "none (public address)", "endpoint-independent mapping", "port-preserving",
	"symmetric with a regular port step (predictable)", "symmetric (random ports per peer)",
};

enum {
	NAT_STEP_MAX = 16,              /* larger steps are not told from random ports */
	NAT_PREDICT = 2,                /* predicted endpoints advertised for a stepping NAT */
};


static bool nat_endpoint_eq(const struct endpoint *a, const struct endpoint *b)
{
	return a->proto == b->proto && a->ip == b->ip && a->port == b->port;
}

/* Seen as one of our own endpoints: no NAT between that peer and us.  A
 * wildcard listener's observations carry 0.0.0.0 as the local address;
 * the interface addresses we collected tell.  Such a peer (one on our LAN)
 * says nothing about the NAT the rest of the world sees us through, so
 * the classification leaves it out. */
static bool nat_seen_as_own(const struct nat_state *s, unsigned i)
{
	if (nat_endpoint_eq(&s->seen[i], &s->local[i]))
		return true;
	for (unsigned j = 0; s->local[i].ip == 0 && j < s->n_own; j++)
		if (s->own[j].ip == s->seen[i].ip && s->own[j].port == s->seen[i].port)
			return true;
	return false;
}

/* The first observation through a NAT (not our own endpoint), or -1. */
static int nat_first_mapped(const struct nat_state *s)
{
	for (unsigned i = 0; i < s->n_seen; i++)
		if (!nat_seen_as_own(s, i))
			return (int)i;
	return -1;
}

/* A symmetric NAT that hands out ports in a regular step (+1, +2, ...) maps
 * our next peer to the highest port seen plus the step.  The step, or 0 when
 * the mapped ports (sorted, one public IP, one listener) are not evenly
 * spaced: at least three are needed to see a step twice. */
static int nat_port_step(const struct nat_state *s, uint16_t *top)
{
	uint16_t ports[NAT_OBSERVATIONS_MAX];
	unsigned k = 0;
	int f = nat_first_mapped(s);
	for (unsigned i = 0; f >= 0 && i < s->n_seen; i++) {
		if (nat_seen_as_own(s, i))
			continue;
		if (s->seen[i].ip != s->seen[f].ip || !nat_endpoint_eq(&s->local[i], &s->local[f]))
			return 0;
		unsigned j = k++;
		for (; j > 0 && ports[j - 1] > s->seen[i].port; j--)   /* insertion sort */
			ports[j] = ports[j - 1];
		ports[j] = s->seen[i].port;
	}
	if (k < 3)
		return 0;
	int step = ports[1] - ports[0];
	for (unsigned i = 2; i < k; i++)
		if (ports[i] - ports[i - 1] != step)
			return 0;
	if (step <= 0 || step > NAT_STEP_MAX)
		return 0;
	*top = ports[k - 1];
	return step;
}

/* The listener a UDP link uses: what we would advertise for it. */
static struct endpoint nat_local_of(struct node *n, const struct link *l)
{
	for (unsigned i = 0; i < n->n_listeners; i++)
		if (n->listeners[i].fd == l->fd)
			return link_endpoint_of(PROTO_UDP, &n->listeners[i].sa);
	return (struct endpoint){ .proto = PROTO_UDP };
}

static bool nat_advertised(const struct node *n, const struct endpoint *e)
{
	for (unsigned i = 0; i < n->self.n_endpoints; i++)
		if (nat_endpoint_eq(&n->self.endpoints[i], e))
			return true;
	return false;
}

/* From the observations: is our mapping the same for every peer? */
static enum nat_kind nat_classify(const struct node *n)
{
	const struct nat_state *s = n->nat;
	if (!s || !s->n_seen)           /* no nat_start (out of memory): nothing learnt */
		return NAT_UNKNOWN;
	bool same = true, port_kept = true;
	int f = nat_first_mapped(s);
	if (f < 0)
		return NAT_NONE;        /* every peer sees us as we are */
	for (unsigned i = 0; i < s->n_seen; i++) {
		if (nat_seen_as_own(s, i))
			continue;
		same &= nat_endpoint_eq(&s->seen[i], &s->seen[f]);
		port_kept &= s->seen[i].port == s->local[i].port;
	}
	uint16_t top;
	if (!same)
		return nat_port_step(s, &top) ? NAT_SYMMETRIC_STEP : NAT_SYMMETRIC;
	unsigned reporters = 0;         /* one peer's word says nothing about variation */
	for (unsigned i = 0; i < s->n_seen; i++) {
		if (nat_seen_as_own(s, i))
			continue;
		bool seen_before = false;
		for (unsigned j = 0; j < i; j++)
			seen_before |= wire_addr_eq(&s->reporter[j], &s->reporter[i]);
		reporters += !seen_before;
	}
	if (reporters < 2)
		return NAT_UNKNOWN;
	return port_kept ? NAT_PORT_PRESERVING : NAT_CONE;
}

/* What we advertise: the public endpoints peers can dial (the observed
 * ones, most recent first; for a stepping symmetric NAT the predicted next
 * ones; none for a random symmetric NAT, whose mappings serve one peer
 * each), then our listeners' own endpoints, which peers on our LAN reach. */
static void nat_advertise(struct node *n)
{
	struct nat_state *s = n->nat;
	struct endpoint out[LINK_ENDPOINTS_MAX];
	unsigned k = 0;
	uint16_t top = 0;
	s->kind = nat_classify(n);
	int step = s->kind == NAT_SYMMETRIC_STEP ? nat_port_step(s, &top) : 0;
	for (int i = 1; step && i <= NAT_PREDICT; i++)
		out[k++] = (struct endpoint){ .proto = PROTO_UDP, .ip = s->seen[nat_first_mapped(s)].ip,
					      .port = (uint16_t)(top + i * step) };
	for (unsigned i = s->n_seen; !step && s->kind != NAT_SYMMETRIC && i-- > 0 &&
	     k < LINK_ENDPOINTS_MAX - s->n_own;) {
		bool dup = false;
		for (unsigned j = 0; j < k; j++)
			dup |= nat_endpoint_eq(&out[j], &s->seen[i]);
		if (!dup && !nat_seen_as_own(s, i))
			out[k++] = s->seen[i];
	}
	for (unsigned i = 0; i < s->n_own && k < LINK_ENDPOINTS_MAX; i++) {
		bool dup = false;       /* seen as itself: a public address */
		for (unsigned j = 0; j < k; j++)
			dup |= nat_endpoint_eq(&out[j], &s->own[i]);
		if (!dup)
			out[k++] = s->own[i];
	}
	memcpy(n->self.endpoints, out, k * sizeof out[0]);
	n->self.n_endpoints = (uint8_t)k;
}

/* How many routers lie between us and our NAT, for ring_punch_ttl: a
 * datagram to our own public address goes as far as the NAT that owns it,
 * so with TTLs 1, 2, ... each router before that NAT answers "time
 * exceeded" (nat_on_ttl_expired) and the NAT takes the rest for itself.
 * Routers that send no such ICMP look like none: the punch TTL stays low. */
static void nat_probe_hops(struct node *n, int fd, const struct endpoint *pub)
{
	struct nat_state *s = n->nat;
	struct sockaddr_in to = link_sockaddr_of(pub);
	s->hops_to = *pub;
	s->punch_ttl = NAT_PUNCH_TTL;
	for (int ttl = 1; ttl <= NAT_HOPS_PROBED; ttl++)
		link_udp_send_ttl(n, fd, &to, NULL, 0, ttl);
}

static void nat_on_ttl_expired(struct node *n, const struct sockaddr_in *dst)
{
	struct nat_state *s = n->nat;
	struct endpoint e = link_endpoint_of(PROTO_UDP, dst);
	if (!nat_endpoint_eq(&e, &s->hops_to) || s->punch_ttl >= NAT_PUNCH_TTL + NAT_HOPS_PROBED)
		return;
	s->punch_ttl++;
	log_info("nat", "a router lies between us and our NAT: punches leave with TTL %d", s->punch_ttl);
}

/* A UDP link came up: note how the peer sees us, and advertise anew. */
static void nat_learn_endpoint(struct node *n, struct link *l)
{
	struct nat_state *s = n->nat;
	struct endpoint local = nat_local_of(n, l);
	if (l->proto != PROTO_UDP || l->observed.proto != PROTO_UDP || !l->observed.ip || !local.port ||
	    link_overlay_ip(n, l->observed.ip))
		return;                 /* only what our listeners are seen as is worth telling */
	for (unsigned i = 0; i < s->n_seen; i++)
		if (wire_addr_eq(&s->reporter[i], &l->peer.addr) && nat_endpoint_eq(&s->seen[i], &l->observed))
			return;
	unsigned slot = s->n_seen < NAT_OBSERVATIONS_MAX ? s->n_seen++ : s->next++ % NAT_OBSERVATIONS_MAX;
	s->seen[slot] = l->observed;
	s->local[slot] = local;
	s->reporter[slot] = l->peer.addr;
	bool own_ip = l->observed.ip == local.ip;
	for (unsigned i = 0; i < s->n_own; i++)
		own_ip |= l->observed.ip == s->own[i].ip;
	if (!own_ip && l->observed.ip != s->hops_to.ip)
		nat_probe_hops(n, l->fd, &l->observed);
	bool known = nat_advertised(n, &l->observed);
	int before = s->kind;
	nat_advertise(n);
	if (known && s->kind == before)
		return;
	/* Neighbours may hold our old endpoints (a TCP link can beat the UDP one
	 * that taught us this): tell them again, so their dials punch through. */
	ring_probe_soon(n);
	char uri[40], who[64];
	link_endpoint_uri(&l->observed, uri);
	link_describe(l, who);
	log_info("nat", "seen as %s by %s; NAT: %s", uri, who, nat_kind_names[s->kind]);
}

/* ---- our own endpoints, and following the machine's -------------------------
 * What we advertise besides the public endpoints: each listener's address,
 * or for a wildcard listener every IPv4 interface address but loopback's
 * (loopback if there is no other), never one inside the overlay (section
 * 06, link_overlay_ip) nor our tap's.  Interfaces change under a running
 * node (a laptop moves, DHCP renumbers, a tunnel comes up): a netlink
 * socket tells us, and once a burst of changes settles we collect again. */
enum {
	NAT_IFADDR_SETTLE_MS = 300,     /* an interface change comes as several messages */
	NAT_RTMGRP_IPV4_IFADDR = 0x10,  /* <linux/rtnetlink.h>, not on musl's include path */
	NAT_NETLINK_ROUTE = 0,
};

struct nat_sockaddr_nl {                /* <linux/netlink.h>'s sockaddr_nl */
	sa_family_t nl_family;
	unsigned short nl_pad;
	uint32_t nl_pid, nl_groups;
};

static void nat_own_add(struct endpoint *out, unsigned *k, struct endpoint e)
{
	for (unsigned i = 0; i < *k; i++)
		if (nat_endpoint_eq(&out[i], &e))
			return;
	if (*k < LINK_ENDPOINTS_MAX)
		out[(*k)++] = e;
}

static bool nat_if_usable(const struct node *n, const struct ifaddrs *it)
{
	if (!it->ifa_addr || it->ifa_addr->sa_family != AF_INET || !(it->ifa_flags & IFF_UP))
		return false;
	uint32_t ip = ntohl(((const struct sockaddr_in *)(const void *)it->ifa_addr)->sin_addr.s_addr);
	bool tap = n->tap.fd >= 0 && n->tap.name[0] && !strcmp(it->ifa_name, n->tap.name);
	return (ip >> 24) != 127 && !tap && !link_overlay_ip(n, ip);
}

/* For a wildcard listener: every usable interface address with its port. */
static void nat_own_wildcard(const struct node *n, struct endpoint e, struct endpoint *out, unsigned *k)
{
	struct ifaddrs *ifs = NULL;
	unsigned before = *k;
	if (getifaddrs(&ifs) == 0) {
		for (const struct ifaddrs *it = ifs; it; it = it->ifa_next)
			if (nat_if_usable(n, it))
				nat_own_add(out, k, (struct endpoint){ e.proto, ntohl(((const struct sockaddr_in *)
						(const void *)it->ifa_addr)->sin_addr.s_addr), e.port });
		freeifaddrs(ifs);
	}
	if (*k == before)
		nat_own_add(out, k, (struct endpoint){ e.proto, 0x7f000001u, e.port });
}

static unsigned nat_collect_own(const struct node *n, struct endpoint out[LINK_ENDPOINTS_MAX])
{
	unsigned k = 0;
	for (unsigned i = 0; i < n->n_listeners; i++) {
		struct endpoint e = link_endpoint_of(n->listeners[i].proto, &n->listeners[i].sa);
		if (e.ip == 0)
			nat_own_wildcard(n, e, out, &k);
		else if (!link_overlay_ip(n, e.ip))
			nat_own_add(out, &k, e);
	}
	return k;
}

static bool nat_own_same(const struct nat_state *s, const struct endpoint *e, unsigned k)
{
	if (k != s->n_own)
		return false;
	for (unsigned i = 0; i < k; i++)
		if (!nat_endpoint_eq(&s->own[i], &e[i]))
			return false;
	return true;
}

/* Interfaces settled: advertise the new set.  What peers told us we are
 * seen as may be stale with it (a new uplink, a new NAT), so the
 * observations start over from the UDP links still up, and the
 * neighbours hear of the change at the next probe. */
static int64_t nat_ifaddr_settled(struct ev_loop *loop, struct ev_timer *t)
{
	struct nat_state *s = container_of(t, struct nat_state, ifaddr_timer);
	struct node *n = s->node;
	struct endpoint own[LINK_ENDPOINTS_MAX];
	unsigned k = nat_collect_own(n, own);
	(void)loop;
	if (nat_own_same(s, own, k))
		return EV_TIMER_STOP;
	memcpy(s->own, own, sizeof own);
	s->n_own = k;
	s->n_seen = s->next = 0;
	for (struct link *l = n->links; l; l = l->next)
		if (l->state == LINK_UP && l->proto == PROTO_UDP)
			nat_learn_endpoint(n, l);
	nat_advertise(n);
	ring_probe_soon(n);
	char uri[40] = "none";
	if (k)
		link_endpoint_uri(&own[0], uri);
	log_info("nat", "interface addresses changed: now %u local endpoint(s), first %s", k, uri);
	return EV_TIMER_STOP;
}

static void nat_ifaddr_readable(struct ev_loop *loop, int fd, void *arg, uint32_t events)
{
	struct nat_state *s = arg;
	char buf[8192];
	(void)events;
	while (recv(fd, buf, sizeof buf, MSG_DONTWAIT) > 0)
		;                       /* what changed does not matter: we look again */
	if (!ev_timer_armed(&s->ifaddr_timer))
		ev_timer_arm(loop, &s->ifaddr_timer, NAT_IFADDR_SETTLE_MS);
}

/* Listen for address changes; without netlink (a sandbox) the set stays. */
static void nat_watch_interfaces(struct node *n)
{
	struct nat_state *s = n->nat;
	struct nat_sockaddr_nl sa = { .nl_family = AF_NETLINK, .nl_groups = NAT_RTMGRP_IPV4_IFADDR };
	ev_timer_init(&s->ifaddr_timer, nat_ifaddr_settled);
	s->ifaddr_fd = socket(AF_NETLINK, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, NAT_NETLINK_ROUTE);
	if (s->ifaddr_fd >= 0 && (bind(s->ifaddr_fd, (struct sockaddr *)&sa, sizeof sa) < 0 ||
				  ev_fd_watch(&n->loop, s->ifaddr_fd, EPOLLIN, nat_ifaddr_readable, s) < 0)) {
		close(s->ifaddr_fd);
		s->ifaddr_fd = -1;
	}
	if (s->ifaddr_fd < 0)
		log_debug("nat", "no netlink (%s): interface changes are not followed", strerror(errno));
}

/* ---- standby relays ----------------------------------------------------------
 * A node with relayed links keeps direct links to NAT_RELAY_LEGS public
 * nodes, with the relay role when the ring gives them none: its relay
 * and a warm spare.  When the relay dies, the relayed links move to the
 * spare within a round trip (relay roaming, section 06).  With one, they
 * had nowhere to go, and waited seconds for the ring to make them again
 * (a site whose ring neighbours are all behind NATs relays everything
 * through its bootstrap, and lost 5 s of traffic when the bootstrap
 * died).  Public nodes are remembered from connect-to-me answers and
 * links, so a node short of a spare dials one, a tick at a time.
 * Public: every endpoint
 * it advertises is a public address (a node behind a NAT also advertises
 * its private listener); anyone can link it, so it can relay for anyone. */

enum { NAT_RELAY_LEGS = 2 };            /* the relay and one spare */

static bool nat_public_peer(const struct peer_info *pi)
{
	for (unsigned i = 0; i < pi->n_endpoints; i++)
		if (!ring_public_ip(pi->endpoints[i].ip))
			return false;
	return pi->n_endpoints > 0;
}

/* Remember a public node as a spare relay to dial (the oldest gives way). */
static void nat_relay_note(struct node *n, const struct peer_info *pi)
{
	struct nat_state *s = n->nat;
	if (!nat_public_peer(pi) || wire_addr_eq(&pi->addr, &n->self.addr))
		return;
	for (unsigned i = 0; i < s->n_relays; i++)
		if (wire_addr_eq(&s->relays[i].addr, &pi->addr)) {
			s->relays[i] = *pi;
			return;
		}
	unsigned slot = s->n_relays < NAT_RELAYS_KNOWN ? s->n_relays++ : s->next_relay++ % NAT_RELAYS_KNOWN;
	s->relays[slot] = *pi;
}

/* Do we hold a relayed link? */
static bool nat_relayed(struct node *n)
{
	struct link *l;
	link_for_each(n, l)
		if (l->state == LINK_UP && l->proto == PROTO_RELAY)
			return true;
	return false;
}

/* A direct link to a public node: a leg our relayed links can stand on. */
static bool nat_is_leg(const struct link *l)
{
	return l->state == LINK_UP && l->proto != PROTO_RELAY && nat_public_peer(&l->peer);
}

/* The public nodes we stand on, at most NAT_RELAY_LEGS, those marked
 * already first.  Nodes, not links: a UDP and a TCP link to the one
 * bootstrap are one leg (counted as two, the spare was never dialled). */
static unsigned nat_leg_peers(struct node *n, ring_addr *out)
{
	unsigned k = 0;
	struct link *l;
	for (int any = 0; any < 2; any++)
		link_for_each(n, l)
			if (k < NAT_RELAY_LEGS && nat_is_leg(l) && (any || (l->local_roles & ROLE_RELAY)) &&
			    !ring_in_set(&l->peer.addr, out, k))
				out[k++] = l->peer.addr;
	return k;
}

/* The legs carry the relay role while we hold a relayed link, and only
 * then.  The role is told to the peer (ROLES): the public node has no
 * role of its own for the link and closed it as unneeded after
 * LINK_UNNEEDED_GRACE_MS, so the spare was gone when the relay died. */
static void nat_legs_mark(struct node *n, const ring_addr *legs, unsigned k)
{
	struct link *l;
	link_for_each(n, l) {
		if (l->state != LINK_UP)
			continue;               /* a spare being dialled keeps its wish */
		bool leg = nat_is_leg(l) && ring_in_set(&l->peer.addr, legs, k);
		if (leg && !(l->local_roles & ROLE_RELAY)) {
			ring_roles_add(l, ROLE_RELAY);
		} else if (!leg && ((l->local_roles | l->want_roles) & ROLE_RELAY)) {
			l->want_roles &= (uint8_t)~ROLE_RELAY;
			ring_roles_set(l, l->local_roles & (uint8_t)~ROLE_RELAY);
		}
	}
}

/* Short of a spare: dial the next public node we know and do not link. */
static void nat_standby_upkeep(struct node *n)
{
	struct nat_state *s = n->nat;
	ring_addr legs[NAT_RELAY_LEGS];
	bool relayed = nat_relayed(n);
	unsigned k = relayed ? nat_leg_peers(n, legs) : 0;
	nat_legs_mark(n, legs, k);
	if (!relayed || k >= NAT_RELAY_LEGS)
		return;
	for (unsigned i = 0; i < s->n_relays; i++) {
		const struct peer_info *pi = &s->relays[(s->next_relay + i) % s->n_relays];
		struct link *l = link_find_peer(n, &pi->addr, false);
		if (l && l->state != LINK_UP)
			return;                 /* a dial under way: one spare at a time */
		if (l)
			continue;               /* linked (relayed: its upgrade tries TCP too) */
		char who[13];
		link_addr_short(&pi->addr, who);
		log_info("nat", "relayed links with one public link: dialling %s as a spare relay", who);
		s->next_relay += i + 1;         /* the next tick tries the one after */
		ring_dial(n, pi, ROLE_RELAY);
		return;
	}
}

/* ---- fallback plans: TCP, then relays ------------------------------------ */

static struct nat_plan *nat_plan_find(struct node *n, const ring_addr *a)
{
	uint64_t now = ev_now(&n->loop);
	for (unsigned i = 0; i < NAT_PLANS_MAX; i++) {
		struct nat_plan *p = &n->nat->plans[i];
		if (p->until_ms > now && wire_addr_eq(&p->target.addr, a))
			return p;
	}
	return NULL;
}

/* ring_dial is starting: remember the peer, so a failure has a plan. */
static void nat_on_dialing(struct node *n, const struct peer_info *pi, uint8_t want)
{
	uint64_t now = ev_now(&n->loop);
	struct nat_plan *p = nat_plan_find(n, &pi->addr), *oldest = &n->nat->plans[0];
	if (!p) {
		for (unsigned i = 0; i < NAT_PLANS_MAX && !p; i++) {
			struct nat_plan *q = &n->nat->plans[i];
			if (q->until_ms <= now)
				p = q;
			else if (q->until_ms < oldest->until_ms)
				oldest = q;
		}
		p = p ? p : oldest;
		*p = (struct nat_plan){ .target = *pi };
	}
	p->target = *pi;
	p->want |= want;
	p->until_ms = now + NAT_PLAN_MS;
}

/* One more relay candidate for a plan, unless known or the plan is full. */
static void nat_plan_add_cand(struct node *n, struct nat_plan *p, const struct peer_info *c)
{
	if (p->n_cand == RING_CTM_NEIGHBOURS_MAX || wire_addr_eq(&c->addr, &n->self.addr) ||
	    wire_addr_eq(&c->addr, &p->target.addr))
		return;
	for (unsigned i = 0; i < p->n_cand; i++)
		if (wire_addr_eq(&p->cand[i].addr, &c->addr))
			return;
	p->cand[p->n_cand++] = *c;
}

/* A connect-to-me reply lists the peer's near neighbours: the nodes that
 * can relay for us if no direct path exists.  And the peer links each of
 * them: it can relay for our dials to them (called once those began).
 * Without it two ring neighbours that met only through others' replies
 * knew no relay for each other, and never linked. */
static void nat_on_ctm_reply(struct node *n, const struct wire_ctm_reply *m)
{
	struct nat_plan *p = nat_plan_find(n, &m->from.addr);
	if (p) {
		p->n_cand = 0;
		p->next_cand = 0;
		for (unsigned i = 0; i < m->n_neighbours; i++)
			nat_plan_add_cand(n, p, &m->neighbours[i]);
	}
	for (unsigned i = 0; i < m->n_neighbours; i++)
		if ((p = nat_plan_find(n, &m->neighbours[i].addr)))
			nat_plan_add_cand(n, p, &m->from);
	nat_relay_note(n, &m->from);
	for (unsigned i = 0; i < m->n_neighbours; i++)
		nat_relay_note(n, &m->neighbours[i]);
}

/* A connect-to-me request we answer names the requester's first hop
 * (reply_via), a peer it links: a relay candidate for our dial back.
 * Known by address only, so it is relayed through if we link it, never
 * dialled for the purpose. */
static void nat_on_ctm_req(struct node *n, const struct wire_ctm_req *m)
{
	struct nat_plan *p = nat_plan_find(n, &m->from.addr);
	if (p)
		nat_plan_add_cand(n, p, &(struct peer_info){ .addr = m->reply_via });
}

/* up.toward: while a link to target is being made, a relay candidate we
 * link directly (one of target's near neighbours, from its connect-to-me
 * answers) carries what greedy routing brings here for it. */
static struct link *nat_toward(struct node *n, const ring_addr *target)
{
	struct nat_plan *p = nat_plan_find(n, target);
	for (unsigned i = 0; p && i < p->n_cand; i++) {
		struct link *d = link_find_direct(n, &p->cand[i].addr);
		if (d && !wire_addr_eq(&d->peer.addr, target) && link_heard_lately(d))
			return d;
	}
	return NULL;
}

/* The peer's neighbours did not relay: try a public node we link, the
 * next one each time (a public node links nearly everyone; if it does not
 * link the peer, the relayed dial fails and the plan moves on). */
static bool nat_try_public_relay(struct node *n, struct nat_plan *p)
{
	struct nat_state *s = n->nat;
	char who[13], via[13];
	for (unsigned i = 0; i < s->n_relays; i++) {
		const struct peer_info *c = &s->relays[(p->next_public + i) % s->n_relays];
		if (wire_addr_eq(&c->addr, &p->target.addr) || !link_find_direct(n, &c->addr))
			continue;
		p->next_public = (uint8_t)((p->next_public + i + 1) % s->n_relays);
		link_addr_short(&p->target.addr, who);
		link_addr_short(&c->addr, via);
		log_info("nat", "no direct path to %s: relaying through the public node %s", who, via);
		link_dial_relay(n, &c->addr, &p->target.addr, p->want);
		return true;
	}
	return false;
}

/* Relay through the first candidate we link directly; with none linked,
 * dial one, and come back when it is up (nat_on_link_up). */
static void nat_try_relay(struct node *n, struct nat_plan *p)
{
	char who[13], via[13];
	link_addr_short(&p->target.addr, who);
	p->await_relay = false;
	for (unsigned i = p->next_cand; i < p->n_cand; i++) {
		const struct peer_info *c = &p->cand[i];
		if (wire_addr_eq(&c->addr, &p->target.addr) || !link_find_direct(n, &c->addr))
			continue;
		p->next_cand = i + 1;
		link_addr_short(&c->addr, via);
		log_info("nat", "no direct path to %s: relaying through %s", who, via);
		link_dial_relay(n, &c->addr, &p->target.addr, p->want);
		return;
	}
	for (unsigned i = p->next_cand; i < p->n_cand; i++) {
		const struct peer_info *c = &p->cand[i];
		if (wire_addr_eq(&c->addr, &p->target.addr) || wire_addr_eq(&c->addr, &n->self.addr) ||
		    !c->n_endpoints)
			continue;
		link_addr_short(&c->addr, via);
		log_info("nat", "no direct path to %s: linking %s to relay through it", who, via);
		p->next_cand = i + 1;   /* once a round: a candidate we cannot reach (its
					 * endpoints outside our scopes, a firewall) was
					 * asked again at every failure, and the round never
					 * ended in a public relay (t_sites' heal, 1 in 3) */
		p->await_relay = true;
		ring_dial(n, c, 0);
		return;
	}
	/* Every candidate tried: the next failure starts over, since paths
	 * change (a partition heals, a relay comes back).  A plan that ring
	 * dials keep alive never expires, and once spent it left two ring
	 * neighbours unlinked for good.  Meanwhile a public node may relay. */
	p->next_cand = 0;
	if (nat_try_public_relay(n, p))
		return;
	log_info("nat", "no direct path to %s and no relay known; routing through the ring", who);
}

/* Every dial to a peer timed out: take the plan's next step. */
static void nat_on_dial_failed(struct node *n, struct link *l)
{
	struct nat_plan *p = nat_plan_find(n, &l->expect);
	if (!p || link_find_peer(n, &l->expect, false))
		return;                 /* no plan, or another attempt is still running */
	if (l->proto == PROTO_UDP && !p->tcp_tried) {
		p->tcp_tried = true;
		if (ring_dial_endpoints(n, &p->target, p->want, PROTO_TCP, false))
			return;
	}
	nat_try_relay(n, p);
}

/* ---- upgrading relayed links ----------------------------------------------- */

/* Dial the peer of a relayed link directly on each transport it offers:
 * UDP punches through cone NATs, TCP gets through a firewall that passes
 * only TCP.  (UDP alone left a site that may send UDP only to its
 * bootstrap relayed through it to every public node: when the bootstrap
 * died, no relay was left.) */
static void nat_dial_direct(struct node *n, struct link *l, bool answer)
{
	ring_dial_endpoints(n, &l->peer, l->local_roles, PROTO_UDP, answer);
	ring_dial_endpoints(n, &l->peer, l->local_roles, PROTO_TCP, answer);
}

/* Dial the peer of a relayed link directly, and tell it to dial us at the
 * same moment: two punches that cross open both NATs (cone NATs; a
 * symmetric NAT maps the direct dial to a new port, so it fails there). */
static void nat_upgrade(struct node *n, struct link *l)
{
	link_send_byte(l, WIRE_PUNCH, 0);
	nat_dial_direct(n, l, false);
}

static void nat_on_punch(struct node *n, struct link *l)
{
	nat_dial_direct(n, l, true);
}

static int64_t nat_tick(struct ev_loop *loop, struct ev_timer *t)
{
	struct node *n = container_of(t, struct nat_state, tick)->node;
	uint64_t now = ev_now(loop);
	for (struct link *l = n->links; l; l = l->next) {
		if (l->proto != PROTO_RELAY || l->state != LINK_UP || now < l->upgrade_ms)
			continue;
		/* Both ends would do this; the lower address alone asks. */
		if (wire_addr_cmp(&n->self.addr, &l->peer.addr) < 0 && !link_find_direct(n, &l->peer.addr))
			nat_upgrade(n, l);
		l->upgrade_backoff_ms = l->upgrade_backoff_ms * 2 > NAT_UPGRADE_MAX_MS ? NAT_UPGRADE_MAX_MS
										: l->upgrade_backoff_ms * 2;
		l->upgrade_ms = now + l->upgrade_backoff_ms;
	}
	nat_standby_upkeep(n);
	return NAT_TICK_MS;
}

static void nat_on_link_up(struct node *n, struct link *l)
{
	char who[13], via[13];
	if (l->proto == PROTO_RELAY) {
		link_addr_short(&l->peer.addr, who);
		link_addr_short(&l->relay_via, via);
		log_info("nat", "relayed link to %s through %s is up", who, via);
		l->upgrade_backoff_ms = NAT_UPGRADE_FIRST_MS;
		l->upgrade_ms = ev_now(&n->loop) + NAT_UPGRADE_FIRST_MS;
	} else {
		nat_learn_endpoint(n, l);
		nat_relay_note(n, &l->peer);
	}
	for (unsigned i = 0; i < NAT_PLANS_MAX; i++) {
		struct nat_plan *p = &n->nat->plans[i];
		if (p->until_ms <= ev_now(&n->loop))
			continue;
		if (wire_addr_eq(&p->target.addr, &l->peer.addr)) {
			p->until_ms = 0;        /* linked: the plan is done */
			continue;
		}
		if (!p->await_relay || l->proto == PROTO_RELAY || link_find_peer(n, &p->target.addr, false))
			continue;
		for (unsigned c = 0; c < p->n_cand; c++)
			if (wire_addr_eq(&p->cand[c].addr, &l->peer.addr)) {
				p->next_cand = c;       /* the candidate we asked to link: relay now */
				nat_try_relay(n, p);
				break;
			}
	}
}

static void nat_start(struct node *n)
{
	if (!n->nat && (n->nat = calloc(1, sizeof *n->nat))) {
		n->nat->node = n;
		n->nat->ifaddr_fd = -1;
		n->nat->punch_ttl = NAT_PUNCH_TTL;
	}
	if (!n->nat || (!n->nat->plans && !(n->nat->plans = calloc(NAT_PLANS_MAX, sizeof *n->nat->plans)))) {
		log_warn("nat", "out of memory: no fallbacks (TCP, relays) for failed dials");
		return;
	}
	if (!link_contacts_start(n))
		log_warn("nat", "out of memory: far requests will always be dialled back");
	n->up.linked = nat_on_link_up;
	n->up.dialing = nat_on_dialing;
	n->up.ctm_reply = nat_on_ctm_reply;
	n->up.ctm_req = nat_on_ctm_req;
	n->up.toward = nat_toward;
	n->up.dial_failed = nat_on_dial_failed;
	n->up.punch = nat_on_punch;
	n->up.ttl_expired = nat_on_ttl_expired;
	n->nat->n_own = n->self.n_endpoints;
	memcpy(n->nat->own, n->self.endpoints, sizeof n->nat->own);
	nat_watch_interfaces(n);
	ev_timer_init(&n->nat->tick, nat_tick);
	ev_timer_arm(&n->loop, &n->nat->tick, NAT_TICK_MS);
}

/* ===================================================================== 10 ip_
 * The virtual IP layer: IPv4 packets between the local stack (the tap
 * device now, lwIP in user mode later) and the ring.  A packet for virtual
 * IP D travels as INNER_IP, routed EXACT to the ring address D maps to:
 * SHA-1(D), unless a node routes for D (--route-for, for VMs or containers
 * behind it) and published "ip:D" -> its address in the DHT (Brunet-ARP).
 * Mappings are looked up on the first packet, cached for IP_MAP_TTL_MS
 * (packets wait in a small queue meanwhile), and corrected when the node
 * we sent to answers INNER_IP_STALE (the IP moved).  The receiver checks
 * that the source IP maps to the ring address the packet came from: that
 * catches stale mappings, not a lying member (the routed source is its
 * sender's word, issue 24).  Sources outside the network are dropped, and
 * lookups begun by packets from the ring are capped (ip_lookup_room).
 * Where routing dead-ends (no node holds D), that node returns the packet's
 * head as INNER_IP_UNREACH and the sender's stack gets ICMP host-unreachable,
 * as from a LAN router.  Only IPv4 is carried.
 * The MTU: a 1500-byte IPv4 path carries 1472 bytes of UDP payload; a record
 * costs up to 47 (15 header + AEGIS's 32-byte tag), the routed header 49,
 * so IP packets up to 1376 bytes fit; the default 1360 leaves 16 bytes of
 * room and keeps outer packets unfragmented.
 * ========================================================================= */

enum {
	IP_MTU_DEFAULT = 1360,
	IP_MTU_MIN = 576,               /* RFC 791's minimum datagram every host takes */
	IP_MTU_MAX = WIRE_MAX_PACKET_BYTES - WIRE_ROUTED_FIXED_BYTES,
	IP_HDR_MIN_BYTES = 20,
	IP_UNREACH_PER_S = 10,          /* ICMP errors generated per second, at most */
	IP_UNREACH_QUOTE_BYTES = 28,    /* RFC 792: the header and 64 bits of data */
	IP_PROTOCOL_ICMP = 1,
	IP_PROTOCOL_TCP = 6,
	IP_MAP_TTL_MS = 10000,          /* how long a looked-up mapping is trusted */
	IP_MAP_RECHECK_MS = 1000,       /* a mismatching source older than this is looked up again */
	IP_PUBLISH_TTL_S = 60,          /* lease of our "ip:X" records ... */
	IP_PUBLISH_EVERY_MS = 20000,    /* ... renewed three times per lease */
};

/* A packet waiting for its mapping: outbound to ip, or inbound from it. */
struct ip_queued {
	bool inbound;
	ring_addr from;                 /* inbound: the ring address it came from */
	size_t len;
	uint8_t data[];
};

struct ip_map {
	uint32_t ip;
	bool resolved;
	bool refreshing;                /* a lookup is in flight; the old mapping still serves */
	bool ring_asked;                /* ... begun by a packet from the ring, from asker */
	bool ring_only;                 /* only packets from the ring used it: kept if a record is found */
	ring_addr asker;
	ring_addr addr;                 /* valid when resolved */
	uint64_t resolved_ms, expires_ms;
	struct ip_queued *queue[IP_MAP_QUEUE_MAX];
	unsigned n_queued;
};

struct ip_head {
	uint8_t ihl_bytes, proto, ttl;
	uint16_t total_len;
	uint32_t src, dst;
};

/* RFC 791 header checks: version 4, a sane header length, and a total length
 * that matches what we hold. */
static bool ip_parse(const uint8_t *p, size_t len, struct ip_head *h)
{
	struct buf b = buf_of(p, len);
	uint8_t vihl = buf_u8(&b);
	buf_u8(&b);
	h->total_len = buf_u16(&b);
	buf_u32(&b);
	h->ttl = buf_u8(&b);
	h->proto = buf_u8(&b);
	buf_u16(&b);
	h->src = buf_u32(&b);
	h->dst = buf_u32(&b);
	h->ihl_bytes = (uint8_t)((vihl & 15) * 4);
	return !b.bad && (vihl >> 4) == 4 && h->ihl_bytes >= IP_HDR_MIN_BYTES &&
	       h->total_len >= h->ihl_bytes && h->total_len == len;
}

/* RFC 1071 sum of len bytes added to sum.  The one's complement sum does
 * not depend on byte order (RFC 1071 2.B), so words are loaded in host
 * order and the folded result is stored the same way: ip_sum_fold's value,
 * written with memcpy, is the checksum field.  The body goes 32 bytes a
 * step in four-lane vectors (SSE2 on x86-64, NEON on arm64, plain words
 * elsewhere): each 32-bit lane adds its halves into two accumulators,
 * so no carry is lost and no step waits for the last one's; a lane gains
 * under 2^17 a step and is emptied every IP_SUM_BLOCK_BYTES, long before
 * 2^32.  It is three times the 8-bytes-a-step loop's speed: every TCP
 * segment lwIP sends is summed here (lw_checksums_put). */
typedef uint32_t ip_sum_lanes __attribute__((vector_size(16)));

enum { IP_SUM_BLOCK_BYTES = 65536 };

static uint64_t ip_sum_block(const uint8_t *p, size_t len)
{
	ip_sum_lanes lo = { 0, 0, 0, 0 }, hi = { 0, 0, 0, 0 };
	for (size_t i = 0; i + 32 <= len; i += 32) {
		ip_sum_lanes a, b;
		memcpy(&a, p + i, 16);
		memcpy(&b, p + i + 16, 16);
		lo += (a & 0xffff) + (b & 0xffff);
		hi += (a >> 16) + (b >> 16);
	}
	uint64_t s = 0;
	for (int k = 0; k < 4; k++)
		s += lo[k] + ((uint64_t)hi[k] << 16);
	return s;
}

static uint64_t ip_sum_add(uint64_t sum, const uint8_t *p, size_t len)
{
	uint64_t s = 0;
	for (size_t block; len >= 32; p += block, len -= block) {
		block = (len < IP_SUM_BLOCK_BYTES ? len : IP_SUM_BLOCK_BYTES) & ~(size_t)31;
		s += ip_sum_block(p, block);
	}
	for (; len >= 4; p += 4, len -= 4) {
		uint32_t w;
		memcpy(&w, p, 4);
		s += w;
	}
	uint32_t t = 0;
	memcpy(&t, p, len);             /* the tail, zero-padded as RFC 1071 pads */
	s += t;
	sum += s;
	return sum + (sum < s);         /* the end-around carry */
}

static uint16_t ip_sum_fold(uint64_t sum)
{
	sum = (sum & 0xffffffffu) + (sum >> 32);
	sum = (sum & 0xffffffffu) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

/* The checksum of len bytes as a number (the field's big-endian value). */
static uint16_t ip_checksum(const uint8_t *p, size_t len)
{
	return ntohs(ip_sum_fold(ip_sum_add(0, p, len)));
}

/* A 20-byte IPv4 header of our own making (no options, not fragmented,
 * TTL 64), its checksum filled in: every packet ipop writes itself (DNS
 * answers, ICMP errors; the tests' packets) starts here. */
static void ip_head_put(uint8_t p[IP_HDR_MIN_BYTES], uint8_t tos, size_t total, uint8_t proto,
			uint32_t src, uint32_t dst)
{
	struct wbuf w = wbuf_of(p, IP_HDR_MIN_BYTES);
	wbuf_u8(&w, 0x45);
	wbuf_u8(&w, tos);
	wbuf_u16(&w, (uint16_t)total);
	wbuf_u32(&w, 0);               /* identification, flags, fragment offset */
	wbuf_u8(&w, 64);
	wbuf_u8(&w, proto);
	wbuf_u16(&w, 0);
	wbuf_u32(&w, src);
	wbuf_u32(&w, dst);
	uint16_t c = ip_checksum(p, IP_HDR_MIN_BYTES);
	p[10] = (uint8_t)(c >> 8);
	p[11] = (uint8_t)c;
}

static bool ip_on_net(const struct ip_state *ip, uint32_t a)
{
	return (a & ip->mask) == ip->net;
}

static void ip_drop(struct node *n, enum drop_reason why, uint32_t a)
{
	char who[16];
	buf_ip_str(a, who);
	log_drop(&n->drops, why, ev_now(&n->loop), who);
}

static bool ip_route_has(const struct ip_state *ip, uint32_t a)
{
	for (unsigned i = 0; i < ip->n_routes; i++) {
		uint32_t mask = ip->routes[i].len ? ~0u << (32 - ip->routes[i].len) : 0;
		if ((a & mask) == ip->routes[i].net)
			return true;
	}
	return false;
}

/* Do we hold this IP: our own, or one we route for? */
static bool ip_held_here(const struct node *n, uint32_t a)
{
	return a == n->self.vip || ip_route_has(&n->ip, a);
}

static struct ip_map *ip_map_find(struct node *n, uint32_t ip)
{
	for (unsigned i = 0; i < n->ip.n_cache; i++)
		if (n->ip.cache[i].ip == ip)
			return &n->ip.cache[i];
	return NULL;
}

static void ip_map_drop(struct node *n, struct ip_map *m)
{
	for (unsigned i = 0; i < m->n_queued; i++)
		free(m->queue[i]);
	*m = n->ip.cache[--n->ip.n_cache];
}

/* A fresh entry; when full, the entry that expires first makes room. */
static struct ip_map *ip_map_new(struct node *n, uint32_t ip)
{
	if (n->ip.n_cache >= IP_MAP_CACHE_MAX) {
		struct ip_map *old = &n->ip.cache[0];
		for (unsigned i = 1; i < n->ip.n_cache; i++)
			if (n->ip.cache[i].expires_ms < old->expires_ms)
				old = &n->ip.cache[i];
		ip_map_drop(n, old);
	}
	struct ip_map *m = &n->ip.cache[n->ip.n_cache++];
	*m = (struct ip_map){ .ip = ip };
	return m;
}

static void ip_queue(struct node *n, struct ip_map *m, bool inbound, const ring_addr *from,
		     const uint8_t *pkt, size_t len)
{
	struct ip_queued *q = m->n_queued < IP_MAP_QUEUE_MAX ? malloc(sizeof *q + len) : NULL;
	if (!q)
		return ip_drop(n, DROP_TX_QUEUE_FULL, m->ip);
	q->inbound = inbound;
	if (from)
		q->from = *from;
	q->len = len;
	memcpy(q->data, pkt, len);
	m->queue[m->n_queued++] = q;
}

static void ip_resolve(struct node *n, struct ip_map *m);

/* writable: as ring_send_ip's. */
static void ip_send(struct node *n, const ring_addr *to, const uint8_t *pkt, size_t len, uint8_t *writable)
{
	n->ip.tx_packets++;
	n->ip.tx_bytes += len;
	ring_sc_count(n, to);           /* a busy peer gets a shortcut (section 07) */
	ring_send_ip(n, to, pkt, len, writable);
}

static void ip_to_local(struct node *n, const uint8_t *pkt, size_t len)
{
	n->ip.rx_packets++;
	n->ip.rx_bytes += len;
	if (!n->up.write_local || n->up.write_local(n, pkt, len) < 0)
		log_drop(&n->drops, DROP_LOCAL_WRITE, ev_now(&n->loop), "local stack");
}

/* The address the *.ipop resolver answers on: the net's last host address
 * (10.128.255.254 in a /16), which no leased address takes.  0 if the net
 * has no room for one (/31, /32). */
static uint32_t ip_gateway(const struct ip_state *ip)
{
	return ~ip->mask < 3 ? 0 : (ip->net | ~ip->mask) - 1;
}

/* ---- dns_: the *.ipop resolver on the gateway address ---------------------
 * Tap nodes answer DNS (RFC 1035) on the virtual gateway address: A records
 * for NAME.ipop from the DHT's "name:NAME" records (our own name at once),
 * NODATA for other types of those names, NXDOMAIN when nobody published the
 * name, REFUSED for names outside .ipop (we recurse for nobody) and FORMERR
 * or NOTIMP for what is not one standard query.  A query is one UDP
 * datagram of at most DNS_MSG_MAX_BYTES; the answer echoes its question.
 * Lookups wait for the DHT in a bounded table of heap copies. */

enum {
	DNS_PORT = 53,
	DNS_HDR_BYTES = 12,
	DNS_MSG_MAX_BYTES = 512,        /* RFC 1035 4.2.1: UDP messages without EDNS */
	DNS_NAME_MAX_BYTES = 253,       /* dotted, without the root's dot */
	DNS_LABEL_MAX_BYTES = 63,
	DNS_TYPE_A = 1,
	DNS_CLASS_IN = 1,
	DNS_TTL_S = 10,                 /* as long as a looked-up mapping is trusted */
	DNS_PENDING_MAX = 64,           /* lookups in flight; more get SERVFAIL */
	UDP_HDR_BYTES = 8,
	IP_PROTOCOL_UDP = 17,
};

enum dns_rcode { DNS_NOERROR = 0, DNS_FORMERR = 1, DNS_SERVFAIL = 2, DNS_NXDOMAIN = 3, DNS_NOTIMP = 4,
		 DNS_REFUSED = 5 };

struct dns_query {
	uint16_t id, flags, qtype, qclass;
	char name[DNS_NAME_MAX_BYTES + 1];  /* lowercase; bytes other than [a-z0-9_-] are '?' */
	size_t question_end;            /* header + question: echoed in the answer */
};

/* RFC 1035 4.1: a header, then one question: labels (no compression: a
 * lone question never needs it), QTYPE, QCLASS.  Returns 0, or the rcode to
 * answer with (FORMERR, NOTIMP); -1 for a datagram not worth an answer (a
 * response, or too short to carry an id). */
static int dns_parse_query(const uint8_t *p, size_t len, struct dns_query *q)
{
	struct buf b = buf_of(p, len);
	q->id = buf_u16(&b);
	q->flags = buf_u16(&b);
	uint16_t qd = buf_u16(&b);
	buf_u16(&b);
	buf_u16(&b);
	buf_u16(&b);
	q->name[0] = 0;
	q->question_end = 0;
	if (b.bad || (q->flags & 0x8000) || len > DNS_MSG_MAX_BYTES)
		return -1;
	if (((q->flags >> 11) & 15) != 0)
		return DNS_NOTIMP;      /* not a standard query */
	if (qd != 1)
		return DNS_FORMERR;
	size_t nlen = 0;
	for (uint8_t l = buf_u8(&b); l && !b.bad; l = buf_u8(&b)) {
		const uint8_t *label = buf_view(&b, l);
		/* A pointer (0xc0 and up) is longer than any label: refused here too. */
		if (l > DNS_LABEL_MAX_BYTES || !label || nlen + (nlen != 0) + l > DNS_NAME_MAX_BYTES)
			return DNS_FORMERR;
		if (nlen)
			q->name[nlen++] = '.';
		for (unsigned i = 0; i < l; i++) {
			int c = tolower(label[i]);
			q->name[nlen++] = (char)(isalnum(c) || c == '-' || c == '_' ? c : '?');
		}
		q->name[nlen] = 0;      /* a name even when a later label fails */
	}
	q->name[nlen] = 0;
	q->qtype = buf_u16(&b);
	q->qclass = buf_u16(&b);
	if (b.bad)
		return DNS_FORMERR;
	q->question_end = (size_t)(b.p - p);
	return 0;
}

/* The answer to a parsed query: header, the question as asked, and one A
 * record when ip is nonzero.  Without a whole question (FORMERR, NOTIMP)
 * only the header goes back.  Bytes written, or -1 if cap is too small. */
static ssize_t dns_answer(uint8_t *out, size_t cap, const uint8_t *query, const struct dns_query *q,
			  uint8_t rcode, uint32_t ip)
{
	struct wbuf w = wbuf_of(out, cap);
	bool question = q->question_end > DNS_HDR_BYTES;
	wbuf_u16(&w, q->id);
	/* QR, opcode 0, AA, RD as asked, RA 0: authoritative for .ipop only. */
	wbuf_u16(&w, (uint16_t)(0x8000 | 0x0400 | (q->flags & 0x0100) | (rcode & 15)));
	wbuf_u16(&w, question);
	wbuf_u16(&w, ip != 0);
	wbuf_u16(&w, 0);
	wbuf_u16(&w, 0);
	if (question)
		wbuf_bytes(&w, query + DNS_HDR_BYTES, q->question_end - DNS_HDR_BYTES);
	if (ip) {
		wbuf_u16(&w, 0xc000 | DNS_HDR_BYTES);  /* the name: a pointer to the question's */
		wbuf_u16(&w, DNS_TYPE_A);
		wbuf_u16(&w, DNS_CLASS_IN);
		wbuf_u32(&w, DNS_TTL_S);
		wbuf_u16(&w, 4);
		wbuf_u32(&w, ip);
	}
	return wbuf_done(&w);
}

/* "alice.ipop" -> "alice"; NULL when the name is not one label under .ipop. */
static const char *dns_ipop_label(const char *name, char out[DNS_LABEL_MAX_BYTES + 1])
{
	size_t l = strlen(name);
	if (l <= 5 || strcmp(name + l - 5, ".ipop") || l - 5 > DNS_LABEL_MAX_BYTES)
		return NULL;
	memcpy(out, name, l - 5);
	out[l - 5] = 0;
	return strchr(out, '.') || strchr(out, '?') ? NULL : out;
}

/* A lookup waiting for the DHT: the query and where to answer. */
struct dns_pending {
	uint32_t client_ip;
	uint16_t client_port;
	uint16_t len;
	uint8_t query[DNS_MSG_MAX_BYTES];
};

/* RFC 768: the checksum over the pseudo-header and the datagram. */
static uint16_t dns_udp_checksum(uint32_t src, uint32_t dst, const uint8_t *udp, size_t len)
{
	uint8_t pseudo[12 + UDP_HDR_BYTES + DNS_MSG_MAX_BYTES + 64];
	struct wbuf w = wbuf_of(pseudo, sizeof pseudo);
	wbuf_u32(&w, src);
	wbuf_u32(&w, dst);
	wbuf_u8(&w, 0);
	wbuf_u8(&w, IP_PROTOCOL_UDP);
	wbuf_u16(&w, (uint16_t)len);
	wbuf_bytes(&w, udp, len);
	ssize_t n = wbuf_done(&w);
	uint16_t c = n < 0 ? 0 : ip_checksum(pseudo, (size_t)n);
	return c ? c : 0xffff;          /* 0 means "no checksum" */
}

/* Wrap a DNS message in UDP and IPv4 from the gateway and hand it to the
 * local stack. */
static void dns_send(struct node *n, uint32_t dst, uint16_t dport, const uint8_t *msg, size_t mlen)
{
	uint8_t pkt[IP_HDR_MIN_BYTES + UDP_HDR_BYTES + DNS_MSG_MAX_BYTES + 64];
	uint32_t src = ip_gateway(&n->ip);
	size_t total = IP_HDR_MIN_BYTES + UDP_HDR_BYTES + mlen;
	if (total > sizeof pkt)
		return;
	ip_head_put(pkt, 0, total, IP_PROTOCOL_UDP, src, dst);
	struct wbuf w = wbuf_of(pkt + IP_HDR_MIN_BYTES, sizeof pkt - IP_HDR_MIN_BYTES);
	wbuf_u16(&w, DNS_PORT);
	wbuf_u16(&w, dport);
	wbuf_u16(&w, (uint16_t)(UDP_HDR_BYTES + mlen));
	wbuf_u16(&w, 0);
	wbuf_bytes(&w, msg, mlen);
	if (wbuf_done(&w) < 0 || !n->up.write_local)
		return;
	uint16_t c = dns_udp_checksum(src, dst, pkt + IP_HDR_MIN_BYTES, UDP_HDR_BYTES + mlen);
	pkt[IP_HDR_MIN_BYTES + 6] = (uint8_t)(c >> 8);
	pkt[IP_HDR_MIN_BYTES + 7] = (uint8_t)c;
	n->up.write_local(n, pkt, total);
}

static void dns_reply(struct node *n, const struct dns_pending *d, const struct dns_query *q, uint8_t rcode,
		      uint32_t ip)
{
	uint8_t out[DNS_MSG_MAX_BYTES + 16];    /* the question plus one A record */
	ssize_t len = dns_answer(out, sizeof out, d->query, q, rcode, ip);
	if (len > 0)
		dns_send(n, d->client_ip, d->client_port, out, (size_t)len);
	n->ip.dns_answers[rcode & 15]++;
}

static void dns_resolved(struct node *n, void *arg, const struct wire_dht *reply)
{
	struct dns_pending *d = arg;
	struct dns_query q;
	n->ip.dns_pending--;
	if (dns_parse_query(d->query, d->len, &q) == 0) {
		if (!reply)
			dns_reply(n, d, &q, DNS_SERVFAIL, 0);
		else if (reply->status != DHT_OK || reply->value_len != 4)
			dns_reply(n, d, &q, DNS_NXDOMAIN, 0);
		else if (q.qtype != DNS_TYPE_A)
			dns_reply(n, d, &q, DNS_NOERROR, 0);    /* the name exists: no data of this type */
		else
			dns_reply(n, d, &q, DNS_NOERROR, (uint32_t)reply->value[0] << 24 |
				  (uint32_t)reply->value[1] << 16 | (uint32_t)reply->value[2] << 8 | reply->value[3]);
	}
	free(d);
}

/* One query from the local stack: answer now (our name, errors) or look
 * the name up. */
static void dns_on_query(struct node *n, uint32_t client, uint16_t port, const uint8_t *msg, size_t len)
{
	struct dns_pending d0 = { .client_ip = client, .client_port = port };
	struct dns_query q;
	char label[DNS_LABEL_MAX_BYTES + 1], key[DNS_LABEL_MAX_BYTES + 8];
	if (len > sizeof d0.query)
		return;
	memcpy(d0.query, msg, len);
	d0.len = (uint16_t)len;
	int rc = dns_parse_query(msg, len, &q);
	if (rc < 0)
		return;
	if (rc > 0)
		return dns_reply(n, &d0, &q, (uint8_t)rc, 0);
	if (q.qclass != DNS_CLASS_IN || !dns_ipop_label(q.name, label))
		return dns_reply(n, &d0, &q, strlen(q.name) > 5 && !strcmp(q.name + strlen(q.name) - 5, ".ipop") ?
				 DNS_NXDOMAIN : DNS_REFUSED, 0);
	if (n->name[0] && n->self.vip && !strcmp(label, n->name))
		return dns_reply(n, &d0, &q, DNS_NOERROR, q.qtype == DNS_TYPE_A ? n->self.vip : 0);
	struct dns_pending *d = n->ip.dns_pending < DNS_PENDING_MAX ? malloc(sizeof *d) : NULL;
	snprintf(key, sizeof key, "name:%s", label);
	if (d)
		*d = d0;
	if (!d || dht_request(n, DHT_GET, key, NULL, 0, 0, dns_resolved, d) < 0) {
		free(d);
		return dns_reply(n, &d0, &q, DNS_SERVFAIL, 0);
	}
	n->ip.dns_pending++;
}

/* A packet from the local stack for the gateway address: DNS, or dropped. */
static void dns_gateway_packet(struct node *n, const uint8_t *pkt, size_t len, const struct ip_head *h)
{
	struct buf b = buf_of(pkt + h->ihl_bytes, len - h->ihl_bytes);
	uint16_t sport = buf_u16(&b), dport = buf_u16(&b), ulen = buf_u16(&b);
	buf_u16(&b);
	if (h->proto != IP_PROTOCOL_UDP || b.bad || dport != DNS_PORT || ulen < UDP_HDR_BYTES ||
	    ulen > len - h->ihl_bytes)
		return ip_drop(n, DROP_NOT_FOR_US, h->dst);
	dns_on_query(n, h->src, sport, b.p, ulen - UDP_HDR_BYTES);
}

/* ---- ip_: packets both ways, lookups, publishing, routes ------------------ */

/* A packet from the local stack: ours to send, or dropped and counted. */
/* A packet from the local stack.  writable: pkt itself when the caller
 * left WIRE_ROUTED_ROOM_BYTES free before it (ring_send_ip), else NULL. */
static void ip_from_local(struct node *n, const uint8_t *pkt, size_t len, uint8_t *writable)
{
	struct ip_head h;
	if (!ip_parse(pkt, len, &h))
		return log_drop(&n->drops, DROP_BAD_IP, ev_now(&n->loop), "local stack");
	if (!ip_held_here(n, h.src))
		return ip_drop(n, DROP_SPOOFED_SOURCE, h.src);
	if (h.dst && h.dst == ip_gateway(&n->ip))
		return dns_gateway_packet(n, pkt, len, &h);
	if (!ip_on_net(&n->ip, h.dst) || h.dst == (n->ip.net | ~n->ip.mask))
		return ip_drop(n, DROP_OFF_NET, h.dst);
	struct ip_map *m = ip_map_find(n, h.dst);
	uint64_t now = ev_now(&n->loop);
	if (m)
		m->ring_only = false;
	if (m && m->resolved) {
		/* Past its expiry the mapping still serves while a lookup refreshes it:
		 * a flow never waits for the DHT once it has started. */
		if (m->expires_ms <= now && !m->refreshing)
			ip_resolve(n, m);
		if ((m = ip_map_find(n, h.dst)))
			ip_send(n, &m->addr, pkt, len, writable);
		return;
	}
	if (!m) {
		m = ip_map_new(n, h.dst);
		ip_resolve(n, m);
		m = ip_map_find(n, h.dst);      /* a synchronous answer may have moved it */
		if (m && m->resolved)
			return ip_send(n, &m->addr, pkt, len, writable);
	}
	if (m)
		ip_queue(n, m, false, NULL, pkt, len);
}

/* RFC 792 destination unreachable, code 1 (host), quoting the packet's head;
 * it comes from the unreachable address, as a LAN's last hop would say it. */
static void ip_icmp_host_unreachable(struct node *n, const uint8_t *quote, size_t qlen)
{
	struct ip_head q;
	uint8_t pkt[IP_HDR_MIN_BYTES + 8 + IP_UNREACH_QUOTE_BYTES];
	struct buf b = buf_of(quote, qlen);
	if (qlen < IP_HDR_MIN_BYTES || qlen > IP_UNREACH_QUOTE_BYTES || (buf_u8(&b) >> 4) != 4)
		return;
	buf_bytes(&b, pkt, 11);        /* skip to the addresses */
	q.src = buf_u32(&b);
	q.dst = buf_u32(&b);
	if (!ip_held_here(n, q.src))
		return;
	size_t total = IP_HDR_MIN_BYTES + 8 + qlen;
	ip_head_put(pkt, 0xc0, total, IP_PROTOCOL_ICMP, q.dst, q.src);  /* DSCP CS6: network control */
	struct wbuf w = wbuf_of(pkt + IP_HDR_MIN_BYTES, sizeof pkt - IP_HDR_MIN_BYTES);
	wbuf_u8(&w, 3);                /* destination unreachable */
	wbuf_u8(&w, 1);                /* host unreachable */
	wbuf_u16(&w, 0);
	wbuf_u32(&w, 0);
	wbuf_bytes(&w, quote, qlen);
	uint16_t c = ip_checksum(pkt + IP_HDR_MIN_BYTES, total - IP_HDR_MIN_BYTES);
	pkt[IP_HDR_MIN_BYTES + 2] = (uint8_t)(c >> 8);
	pkt[IP_HDR_MIN_BYTES + 3] = (uint8_t)c;
	if (n->up.write_local)
		n->up.write_local(n, pkt, total);
}

/* A packet from the ring whose source IP is mapped: deliver it if the
 * mapping names the node it came from. */
static void ip_check_mapped(struct node *n, struct ip_map *m, const ring_addr *from,
			    const uint8_t *pkt, size_t len)
{
	if (wire_addr_eq(&m->addr, from))
		return ip_to_local(n, pkt, len);
	ip_drop(n, DROP_SOURCE_MISMATCH, m->ip);
}

/* Tell a sender that we do not hold the IP it sent to (it moved). */
static void ip_stale_send(struct node *n, const struct wire_routed *r)
{
	size_t q = r->len < IP_UNREACH_QUOTE_BYTES ? r->len : IP_UNREACH_QUOTE_BYTES;
	ring_send(n, MODE_EXACT, &r->src, NULL, INNER_IP_STALE, r->payload, q);
}

/* SHA-1 of a source IP, remembered: every packet received asks for one, and
 * a hash per packet was a third of an unencrypted packet's instructions
 * (make perfcheck). */
static ring_addr ip_addr_of(struct node *n, uint32_t ip)
{
	if (!n->ip.addr_memo && !(n->ip.addr_memo = calloc(IP_ADDR_MEMO, sizeof *n->ip.addr_memo)))
		return sec_addr_of_ip(ip);      /* out of memory: the same answer, unmemoised */
	struct ip_addr_memo *m = &n->ip.addr_memo[(ip ^ ip >> 11 ^ ip >> 23) % IP_ADDR_MEMO];
	if (!m->valid || m->ip != ip) {
		m->ip = ip;
		m->addr = sec_addr_of_ip(ip);
		m->valid = true;
	}
	return m->addr;
}

/* May a packet from src begin one more lookup?  Each holds a DHT slot and
 * a queue.  The per-sender share keys on the routed source, which is only
 * the sender's word (issue 24): a member cycling sources can fill the 64,
 * but no more, so the DHT's table and the queues stay bounded. */
static bool ip_lookup_room(const struct node *n, const ring_addr *src)
{
	unsigned all = 0, theirs = 0;
	for (unsigned i = 0; i < n->ip.n_cache; i++) {
		const struct ip_map *m = &n->ip.cache[i];
		if (m->refreshing && m->ring_asked) {
			all++;
			theirs += wire_addr_eq(&m->asker, src);
		}
	}
	return all < IP_LOOKUPS_FROM_RING_MAX && theirs < IP_LOOKUPS_PER_SENDER;
}

/* A packet from the ring whose source maps elsewhere, or nowhere yet: hold
 * it and look the source up (again: an old answer may be out of date). */
static void ip_lookup_source(struct node *n, struct ip_map *m, const struct wire_routed *r, uint32_t src)
{
	bool begin = !m || !m->refreshing;
	if (begin && !ip_lookup_room(n, &r->src))
		return ip_drop(n, DROP_LOOKUPS_FULL, src);
	if (!m) {
		m = ip_map_new(n, src);
		m->ring_only = true;
	}
	m->resolved = false;
	ip_queue(n, m, true, &r->src, r->payload, r->len);
	if (!begin)
		return;
	m->ring_asked = true;
	m->asker = r->src;
	ip_resolve(n, m);
}

/* A packet that arrived over the ring: check, then hand it to our stack.
 * A source outside the virtual network is nobody's: we send only inside
 * it (DROP_OFF_NET), so no reply could reach it either. */
static void ip_on_packet(struct node *n, const struct wire_routed *r)
{
	struct ip_head h;
	if (!ip_parse(r->payload, r->len, &h))
		return ring_drop(n, DROP_BAD_IP, &r->src);
	if (!n->ip.local || !ip_held_here(n, h.dst)) {
		ip_drop(n, DROP_NOT_FOR_US, h.dst);
		return ip_stale_send(n, r);
	}
	if (!ip_on_net(&n->ip, h.src))
		return ip_drop(n, DROP_OFF_NET_SOURCE, h.src);
	ring_sc_count(n, &r->src);
	ring_addr claimed = ip_addr_of(n, h.src);
	if (wire_addr_eq(&claimed, &r->src))
		return ip_to_local(n, r->payload, r->len);
	/* A source behind another node (--route-for): its mapping must agree. */
	uint64_t now = ev_now(&n->loop);
	struct ip_map *m = ip_map_find(n, h.src);
	if (m && m->resolved && (wire_addr_eq(&m->addr, &r->src) || now - m->resolved_ms < IP_MAP_RECHECK_MS)) {
		if (m->expires_ms <= now && !m->refreshing)
			ip_resolve(n, m);
		if ((m = ip_map_find(n, h.src)))
			ip_check_mapped(n, m, &r->src, r->payload, r->len);
		return;
	}
	ip_lookup_source(n, m, r, h.src);
}

/* The quoted head of a packet we sent: its destination. */
static bool ip_quote_dst(const struct wire_routed *r, uint32_t *dst)
{
	struct buf b = buf_of(r->payload, r->len);
	uint8_t skip[16];
	buf_bytes(&b, skip, 16);
	*dst = buf_u32(&b);
	return !b.bad;
}

static void ip_deliver(struct node *n, const struct wire_routed *r)
{
	uint32_t dst;
	struct ip_map *m;
	if (r->inner == INNER_IP)
		return ip_on_packet(n, r);
	if (r->inner == INNER_IP_STALE) {
		/* Forget where dst was; the next packet looks it up again. */
		if (ip_quote_dst(r, &dst) && (m = ip_map_find(n, dst)) && m->resolved)
			ip_map_drop(n, m);
		return;
	}
	if (n->ip.local)
		ip_icmp_host_unreachable(n, r->payload, r->len);
}

/* Routing dead-ended here: tell the sender, at most IP_UNREACH_PER_S a second. */
static void ip_undeliverable(struct node *n, const struct wire_routed *r)
{
	uint64_t now = ev_now(&n->loop);
	if (r->inner != INNER_IP)
		return;
	if (now - n->ip.unreach_window_ms >= 1000) {
		n->ip.unreach_window_ms = now;
		n->ip.unreach_in_window = 0;
	}
	if (n->ip.unreach_in_window++ >= IP_UNREACH_PER_S)
		return;
	size_t q = r->len < IP_UNREACH_QUOTE_BYTES ? r->len : IP_UNREACH_QUOTE_BYTES;
	if (wire_addr_eq(&r->src, &n->self.addr))
		ip_icmp_host_unreachable(n, r->payload, q);     /* we are the dead end */
	else
		ring_send(n, MODE_EXACT, &r->src, NULL, INNER_IP_UNREACH, r->payload, q);
}

/* The DHT answered (or did not, reply NULL): settle the mapping, flush. */
static void ip_resolved(struct node *n, void *arg, const struct wire_dht *reply)
{
	uint32_t ip = (uint32_t)(uintptr_t)arg;
	struct ip_map *m = ip_map_find(n, ip);
	if (!m)
		return;
	uint64_t now = ev_now(&n->loop);
	bool had = m->resolved, found = reply && reply->status == DHT_OK && reply->value_len == RING_ADDR_BYTES;
	m->resolved = true;
	m->refreshing = m->ring_asked = false;
	m->resolved_ms = now;
	m->expires_ms = now + IP_MAP_TTL_MS;
	if (found)
		memcpy(m->addr.b, reply->value, RING_ADDR_BYTES);
	else if (!reply && had)
		m->expires_ms = now + IP_MAP_TTL_MS / 2;        /* no answer: keep what worked */
	else
		m->addr = sec_addr_of_ip(ip);   /* nobody routes for it: SHA-1 */
	/* A source nobody routes for, that only the ring sent from: its packets
	 * fail the check below, and keeping the entry would let any member fill
	 * the cache that every packet we send searches. */
	bool forget = m->ring_only && !found;
	unsigned nq = m->n_queued;
	struct ip_queued *q[IP_MAP_QUEUE_MAX];
	memcpy(q, m->queue, sizeof q);
	ring_addr to = m->addr;
	m->n_queued = 0;
	for (unsigned i = 0; i < nq; i++) {
		if (!q[i]->inbound)
			ip_send(n, &to, q[i]->data, q[i]->len, NULL);
		else if ((m = ip_map_find(n, ip)))
			ip_check_mapped(n, m, &q[i]->from, q[i]->data, q[i]->len);
		free(q[i]);
	}
	if (forget && (m = ip_map_find(n, ip)) && m->ring_only && !m->refreshing)
		ip_map_drop(n, m);
}

static void ip_resolve(struct node *n, struct ip_map *m)
{
	char key[24];
	snprintf(key, sizeof key, "ip:%u.%u.%u.%u", m->ip >> 24, (m->ip >> 16) & 255, (m->ip >> 8) & 255,
		 m->ip & 255);
	m->refreshing = true;
	if (!m->resolved)
		m->expires_ms = ev_now(&n->loop) + DHT_REQUEST_TIMEOUT_MS;
	if (dht_request(n, DHT_GET, key, NULL, 0, 0, ip_resolved, (void *)(uintptr_t)m->ip) < 0)
		ip_resolved(n, (void *)(uintptr_t)m->ip, NULL);
}

/* Publish "ip:X" -> our ring address for every IP we route for. */
static void ip_publish(struct node *n, const struct ip_route *r)
{
	uint32_t count = r->len >= 32 ? 1 : 1u << (32 - r->len);
	for (uint32_t i = 0; i < count; i++) {
		char key[24];
		uint32_t ip = r->net + i;
		snprintf(key, sizeof key, "ip:%u.%u.%u.%u", ip >> 24, (ip >> 16) & 255, (ip >> 8) & 255, ip & 255);
		dht_request(n, DHT_PUT, key, n->self.addr.b, RING_ADDR_BYTES, IP_PUBLISH_TTL_S, NULL, NULL);
	}
}

/* Publish our routed IPs and name: at once when we join, then every 20 s. */
static int64_t ip_publish_tick(struct ev_loop *loop, struct ev_timer *t)
{
	struct node *n = container_of(t, struct node, ip.publish);
	(void)loop;
	if (!n->ring.joined)
		return 200;
	for (unsigned i = 0; i < n->ip.n_routes; i++)
		ip_publish(n, &n->ip.routes[i]);
	if (n->name[0] && n->self.vip) {
		char key[80];
		uint8_t v[4];
		struct wbuf w = wbuf_of(v, 4);
		wbuf_u32(&w, n->self.vip);
		snprintf(key, sizeof key, "name:%s", n->name);
		dht_request(n, DHT_PUT, key, v, 4, IP_PUBLISH_TTL_S, NULL, NULL);
		/* The reverse, "host:A.B.C.D" -> NAME, labels maps (ipop map). */
		char ip[16];
		buf_ip_str(n->self.vip, ip);
		snprintf(key, sizeof key, "host:%s", ip);
		dht_request(n, DHT_PUT, key, (const uint8_t *)n->name, strlen(n->name), IP_PUBLISH_TTL_S, NULL, NULL);
	}
	/* The first round may land before the near links settle: repeat soon. */
	return ++n->ip.publish_rounds < 3 ? 1000 : IP_PUBLISH_EVERY_MS;
}

/* Room for one more routed prefix: false when IP_ROUTES_MAX are held or
 * the array cannot be allocated. */
static bool ip_route_room(struct ip_state *ip)
{
	if (ip->n_routes >= IP_ROUTES_MAX)
		return false;
	return ip->routes || (ip->routes = calloc(IP_ROUTES_MAX, sizeof *ip->routes));
}

/* A routed prefix is at most /IP_ROUTE_MIN_PREFIX: 0, or -1 and the reason
 * in one line.  Nodes check it at start; 'ipop cert issue' checks it too,
 * so that no certificate grants a prefix no node will route. */
static int ip_route_width_check(uint32_t net, uint8_t len, char *err, size_t errlen)
{
	char a[16];
	if (len >= IP_ROUTE_MIN_PREFIX)
		return 0;
	buf_ip_str(net, a);
	snprintf(err, errlen, "--route-for %s/%u is too wide: at most /%d (%d addresses), each one a DHT record",
		 a, len, IP_ROUTE_MIN_PREFIX, 1 << (32 - IP_ROUTE_MIN_PREFIX));
	return -1;
}

/* Start or stop routing for a prefix (--route-for, 'ipop route'). */
static int ip_route_set(struct node *n, uint32_t net, uint8_t len, bool add)
{
	for (unsigned i = 0; i < n->ip.n_routes; i++) {
		if (n->ip.routes[i].net != net || n->ip.routes[i].len != len)
			continue;
		if (!add)
			n->ip.routes[i] = n->ip.routes[--n->ip.n_routes];
		return 0;
	}
	if (!add)
		return -ENOENT;
	if (len < IP_ROUTE_MIN_PREFIX || !ip_route_room(&n->ip))
		return -ENOSPC;
	n->ip.routes[n->ip.n_routes++] = (struct ip_route){ net, len };
	ip_publish(n, &n->ip.routes[n->ip.n_routes - 1]);
	return 0;
}

/* ---- ip_lease_: --ip auto, an address leased from the DHT ----------------
 * As IPOP's DHCP over the DHT: a node claims a free address of --net with an
 * atomic create of "ip:A.B.C.D" -> its ring address, so of two claimants of
 * one address only one succeeds at the node holding the key.  The record is
 * the lease (IP_PUBLISH_TTL_S), renewed by creating it again (its owner
 * may), and it is also the mapping ip_resolve looks up: an auto node's ring
 * address is random, not SHA-1 of its IP.  Address and ring address are
 * kept in a state file, so a restarted node renews its own lease at once.
 * Two claims made while the ring is still forming can both land (at two
 * different "nearest" nodes); replication then keeps one, and the early
 * renewals (ip_lease_checks_ms) tell the other to draw again.  A node whose
 * saved ring address turns out to be in use (a copied state file) joins
 * again under a random one.  Candidates: the saved address, then
 * SHA-256(ring address, try) over the net's host addresses, never the
 * network, broadcast or gateway address.
 *   WAIT_JOIN --joined (or alone, or 5 s)--> CLAIMING --create ok--> HELD
 *   CLAIMING --exists--> CLAIMING (next candidate); HELD --exists--> CLAIMING */

enum ip_lease_state { IP_LEASE_WAIT_JOIN, IP_LEASE_CLAIMING, IP_LEASE_HELD };

enum {
	IP_LEASE_JOIN_WAIT_MS = 5000,   /* claim anyway when the ring has not formed by then */
	IP_LEASE_POLL_MS = 200,         /* join check while waiting */
	IP_LEASE_RETRY_MS = 1000,       /* after a request that got no answer */
	IP_LEASE_TRIES_MAX = 64,        /* candidates in a row; then pause: the net may be full */
	IP_LEASE_PAUSE_MS = 10000,
};

/* Renewal delays after a claim: the first ones catch a double claim while
 * replicas settle; then every IP_PUBLISH_EVERY_MS (three per lease). */
static const uint32_t ip_lease_checks_ms[] = { 2000, 3000, 5000, 10000 };

/* Candidate `try` for the node at ring address a: a host address of the
 * net, never the network (offset 0), gateway or broadcast address; 0 if
 * the net has no such address. */
static uint32_t ip_lease_pick(uint32_t net, uint32_t mask, const ring_addr *a, unsigned try)
{
	uint32_t span = ~mask;          /* the last offset: broadcast */
	if (span < 3)
		return 0;
	uint8_t t[4] = { (uint8_t)(try >> 24), (uint8_t)(try >> 16), (uint8_t)(try >> 8), (uint8_t)try }, h[32];
	sec_sha256(a->b, RING_ADDR_BYTES, t, sizeof t, h);
	uint32_t r = (uint32_t)h[0] << 24 | (uint32_t)h[1] << 16 | (uint32_t)h[2] << 8 | h[3];
	return (net & mask) | (1 + r % (span - 2));     /* offsets 1 .. span-2 */
}

static bool ip_lease_usable(const struct ip_state *ip, uint32_t a)
{
	uint32_t off = a & ~ip->mask;
	return ip_on_net(ip, a) && off != 0 && off != ~ip->mask && a != ip_gateway(ip);
}

/* The state file: "ip A.B.C.D" and "addr HEX" lines (and "net", which must
 * match).  Missing or foreign values stay 0 / unset. */
static void ip_lease_load(const char *path, const struct ip_state *ip, uint32_t *vip, ring_addr *addr,
			  bool *have_addr)
{
	char line[128], net[32], want[32], v[64];
	FILE *f = fopen(path, "r");
	*vip = 0;
	*have_addr = false;
	if (!f)
		return;
	buf_ip_str(ip->net, net);
	snprintf(want, sizeof want, "%s/%d", net, __builtin_popcount(ip->mask));
	bool same_net = true;
	uint32_t saved = 0;
	struct in_addr ia;
	while (fgets(line, sizeof line, f)) {
		if (sscanf(line, "net %31s", v) == 1)
			same_net = !strcmp(v, want);
		else if (sscanf(line, "ip %15s", v) == 1 && inet_pton(AF_INET, v, &ia) == 1)
			saved = ntohl(ia.s_addr);
		else if (sscanf(line, "addr %40s", v) == 1 && buf_unhex(v, addr->b, RING_ADDR_BYTES))
			*have_addr = true;
	}
	fclose(f);
	if (same_net && ip_lease_usable(ip, saved))
		*vip = saved;
}

/* Write the state file whole (a temporary file renamed over it), private. */
static void ip_lease_save(struct node *n)
{
	const struct ip_lease *ls = &n->ip.lease;
	char tmp[300], ip[16], net[16], addr[2 * RING_ADDR_BYTES + 1];
	if (!ls->path[0])
		return;
	snprintf(tmp, sizeof tmp, "%s.tmp", ls->path);
	buf_ip_str(n->self.vip, ip);
	buf_ip_str(n->ip.net, net);
	ring_addr_hex(&n->self.addr, addr);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	FILE *f = fd < 0 ? NULL : fdopen(fd, "w");
	if (f) {
		fprintf(f, "# ipop --ip auto: this node's leased address; delete the file to draw another\n"
			"net %s/%d\nip %s\naddr %s\n", net, __builtin_popcount(n->ip.mask), ip, addr);
		if (fclose(f) == 0 && rename(tmp, ls->path) == 0)
			return;
	} else if (fd >= 0) {
		close(fd);
	}
	log_warn("ip", "cannot write state file %s: %s (the address may change on restart)", ls->path,
		 strerror(errno));
	unlink(tmp);
}

static void ip_lease_reply(struct node *n, void *arg, const struct wire_dht *reply);

/* Create (or renew) "ip:CANDIDATE" -> our ring address. */
static void ip_lease_claim(struct node *n)
{
	struct ip_lease *ls = &n->ip.lease;
	char key[24], ip[16];
	buf_ip_str(ls->candidate, ip);
	snprintf(key, sizeof key, "ip:%s", ip);
	ls->gen++;
	if (dht_request(n, DHT_CREATE, key, n->self.addr.b, RING_ADDR_BYTES, IP_PUBLISH_TTL_S, ip_lease_reply,
			(void *)(uintptr_t)ls->gen) < 0)
		ev_timer_arm(&n->loop, &ls->timer, IP_LEASE_RETRY_MS);
}

/* The create succeeded: the address is ours (again) until the lease ends. */
static void ip_lease_granted(struct node *n)
{
	struct ip_lease *ls = &n->ip.lease;
	uint64_t next = ls->renewals < ARRAY_LEN(ip_lease_checks_ms) ? ip_lease_checks_ms[ls->renewals] :
			IP_PUBLISH_EVERY_MS;
	ls->renewals++;
	ev_timer_arm(&n->loop, &ls->timer, next);
	if (ls->state == IP_LEASE_HELD)
		return;
	char ip[16];
	buf_ip_str(ls->candidate, ip);
	ls->state = IP_LEASE_HELD;
	ls->tries = 0;
	n->self.vip = ls->candidate;
	log_info("ip", "leased %s/%d (--ip auto)", ip, __builtin_popcount(n->ip.mask));
	ip_lease_save(n);
	if (n->up.local_addr_set && n->up.local_addr_set(n) < 0)
		log_err("ip", "the interface did not take %s", ip);
	n->ip.publish_rounds = 0;
	ev_timer_arm(&n->loop, &n->ip.publish, 0);      /* publish our name now */
}

/* Someone else holds the candidate: draw the next one. */
static void ip_lease_taken(struct node *n)
{
	struct ip_lease *ls = &n->ip.lease;
	char ip[16];
	buf_ip_str(ls->candidate, ip);
	if (ls->state == IP_LEASE_HELD) {
		log_warn("ip", "another node holds %s (claimed while the ring formed): drawing another address", ip);
		n->self.vip = 0;
	} else {
		log_info("ip", "%s is taken: trying another address", ip);
	}
	ls->state = IP_LEASE_CLAIMING;
	ls->renewals = 0;
	uint64_t delay = 0;
	if (++ls->tries % IP_LEASE_TRIES_MAX == 0) {
		log_warn("ip", "%d addresses in a row were taken: is --net full?  Trying again in %d s",
			 IP_LEASE_TRIES_MAX, IP_LEASE_PAUSE_MS / 1000);
		delay = IP_LEASE_PAUSE_MS;
	}
	ls->candidate = ip_lease_pick(n->ip.net, n->ip.mask, &n->self.addr, ls->tries);
	ev_timer_arm(&n->loop, &ls->timer, delay);
}

static void ip_lease_reply(struct node *n, void *arg, const struct wire_dht *reply)
{
	struct ip_lease *ls = &n->ip.lease;
	if ((uint32_t)(uintptr_t)arg != ls->gen)
		return;                 /* an answer for an address we moved on from */
	if (reply && reply->status == DHT_OK)
		ip_lease_granted(n);
	else if (reply && (reply->status == DHT_EXISTS || reply->status == DHT_REFUSED))
		ip_lease_taken(n);
	else                            /* no answer, or the holder is full: ask again */
		ev_timer_arm(&n->loop, &ls->timer, IP_LEASE_RETRY_MS);
}

static int64_t ip_lease_tick(struct ev_loop *loop, struct ev_timer *t)
{
	struct node *n = container_of(t, struct node, ip.lease.timer);
	struct ip_lease *ls = &n->ip.lease;
	if (ls->state == IP_LEASE_WAIT_JOIN) {
		bool waited = ev_now(loop) - ls->started_ms >= IP_LEASE_JOIN_WAIT_MS;
		if (!n->ring.joined && n->ring.n_boot && !waited)
			return IP_LEASE_POLL_MS;
		ls->state = IP_LEASE_CLAIMING;
	}
	ip_lease_claim(n);
	return EV_TIMER_STOP;           /* the reply arms the next step */
}

/* Our saved ring address is in use by an older node (a copied state file):
 * join again under a random address and claim afresh.  Deferred to the
 * timer: the conflict hook runs inside link code, which must not see every
 * link close under it. */
static int64_t ip_lease_rejoin(struct ev_loop *loop, struct ev_timer *t)
{
	struct node *n = container_of(t, struct node, ip.lease.timer);
	struct ip_lease *ls = &n->ip.lease;
	ring_addr a;
	sec_random(&n->rng, a.b, RING_ADDR_BYTES);
	ring_rejoin(n, &a);
	n->self.vip = 0;
	ls->state = IP_LEASE_WAIT_JOIN;
	ls->renewals = 0;
	ls->gen++;
	ls->started_ms = ev_now(loop);
	t->fn = ip_lease_tick;
	return IP_LEASE_POLL_MS;
}

static bool ip_lease_readdress(struct node *n, bool yield)
{
	struct ev_timer *t = &n->ip.lease.timer;
	if (!yield && n->ip.lease.state == IP_LEASE_HELD)
		return false;           /* an unproven claim takes no lease away */
	if (t->fn == ip_lease_rejoin)
		return true;            /* already on its way */
	log_warn("ip", "another node runs with our saved ring address (a copied state file?): "
		 "joining again as a new node");
	t->fn = ip_lease_rejoin;
	ev_timer_arm(&n->loop, t, 0);
	return true;
}

static void ip_lease_start(struct node *n)
{
	struct ip_lease *ls = &n->ip.lease;
	ev_timer_init(&ls->timer, ip_lease_tick);
	ls->started_ms = ev_now(&n->loop);
	ls->state = IP_LEASE_WAIT_JOIN;
	if (!ls->candidate)
		ls->candidate = ip_lease_pick(n->ip.net, n->ip.mask, &n->self.addr, 0);
	n->up.readdress = ip_lease_readdress;
	ev_timer_arm(&n->loop, &ls->timer, IP_LEASE_POLL_MS);
}

static void ip_stop(struct node *n)
{
	while (n->ip.n_cache)
		ip_map_drop(n, &n->ip.cache[0]);
	free(n->ip.cache);
	free(n->ip.addr_memo);
	free(n->ip.routes);
	n->ip.cache = NULL;
	n->ip.addr_memo = NULL;
	n->ip.routes = NULL;
	n->ip.n_routes = 0;
}

static void ip_start(struct node *n, int mtu)
{
	n->ip.cache = calloc(IP_MAP_CACHE_MAX, sizeof *n->ip.cache);
	ev_timer_init(&n->ip.publish, ip_publish_tick);
	ev_timer_arm(&n->loop, &n->ip.publish, 200);
	n->ip.mask = n->vip_prefix ? ~0u << (32 - n->vip_prefix) : 0;
	n->ip.net = (n->self.vip ? n->self.vip : n->ip.net) & n->ip.mask;  /* --ip, or --net */
	n->ip.mtu = mtu ? mtu : IP_MTU_DEFAULT;
	n->up.deliver_ip = ip_deliver;
	n->up.undeliverable = ip_undeliverable;
	if (n->ip.lease.on)
		ip_lease_start(n);
}

/* ===================================================================== 11 tap_
 * The tap device (privileged mode): an Ethernet interface whose IP packets
 * ipop carries.  ARP never leaves the host: ipop answers the kernel's ARP
 * requests for every address of the virtual network with one virtual
 * gateway MAC, so the kernel needs no static entries.  Frames we write carry
 * the gateway MAC as source and the interface's own MAC as destination.
 * Frames other than IPv4 and ARP (IPv6, ...) are dropped and counted.
 * The kernel headers are not on musl's path, so the few TUN constants are
 * defined here (linux/if_tun.h).
 * ========================================================================= */

enum {
	TAP_TUNSETIFF = 0x400454ca,     /* _IOW('T', 202, int) */
	TAP_TUNGETIFF = 0x800454d2,     /* _IOR('T', 210, unsigned int) */
	TAP_TUNSETOFFLOAD = 0x400454d0, /* _IOW('T', 208, unsigned int) */
	TAP_IFF_TAP = 0x0002,
	TAP_IFF_NO_PI = 0x1000,
	TAP_IFF_VNET_HDR = 0x4000,
	TAP_TUN_F_CSUM = 0x01,          /* we finish checksums the kernel left partial */
	TAP_TUN_F_TSO4 = 0x02,          /* we cut TCP super-frames into segments */
	TAP_VNET_HDR_BYTES = 10,        /* struct virtio_net_hdr */
	TAP_VNET_F_NEEDS_CSUM = 1,
	TAP_VNET_GSO_TCPV4 = 1,
	TAP_VNET_GSO_UDP_L4 = 5,        /* a UDP_SEGMENT send (QUIC): veth hands them over as they are */
	TAP_ETH_HDR_BYTES = 14,
	TAP_ETH_P_IP = 0x0800,
	TAP_ETH_P_ARP = 0x0806,
	TAP_ARP_BYTES = 28,
	TAP_FRAMES_PER_WAKE = 64,       /* bounded so the overlay socket is not starved */
};

static const uint8_t tap_gw_mac[6] = { 0x02, 0x69, 0x70, 0x6f, 0x70, 0x01 }; /* "ipop", local bit */

/* With offloads on, every frame we write starts with a virtio-net header;
 * ours is all zeros: a whole frame, checksums done. */
static int tap_write_frame(struct node *n, const uint8_t *frame, size_t len)
{
	static const uint8_t none[TAP_VNET_HDR_BYTES];
	struct iovec v[2] = { { (void *)none, sizeof none }, { (void *)frame, len } };
	size_t want = len + (n->tap.vnet ? sizeof none : 0);
	ssize_t w = n->tap.vnet ? writev(n->tap.fd, v, 2) : write(n->tap.fd, frame, len);
	return w == (ssize_t)want ? 0 : -EIO;
}

/* Internet checksums (RFC 1071) for the offloads below, as big-endian
 * partial sums the callers chain (pseudo-header, header, payload); the
 * summing is section 10's ip_sum_add, 32 bytes a step.  Every segment
 * cut from a TSO super-frame is summed here: a byte pair at a time it was
 * 13 % of the sender's CPU.  p starts at an even offset of the stream. */
static uint32_t tap_csum_add(uint32_t sum, const uint8_t *p, size_t len)
{
	return sum + ntohs((uint16_t)~ip_sum_fold(ip_sum_add(0, p, len)));
}

static uint16_t tap_csum_fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

static void tap_put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

/* ---- receive coalescing ---------------------------------------------------
 * The mirror of TSO: consecutive segments of one TCP flow delivered in one
 * loop turn are written as one super-frame (GRO), so the receiving stack
 * runs once per 64 KiB.  Only plain in-order data segments join: the same
 * addresses, ports, TTL, TOS, ack, window and options, ACK alone (PSH may
 * end a run), each as long as the first but the last.  The kernel finishes
 * the checksum (NEEDS_CSUM); the records carrying them were authenticated. */

/* An IP datagram's length field caps a super-frame.  The sender's kernel
 * cuts TSO frames of 48 segments of 1,308 bytes (MTU 1360 with timestamps):
 * 62,836 bytes of IP, which must fit in one super-frame or the last
 * segment goes alone and the kernel's receive path runs twice per frame. */
enum { TAP_GRO_MAX_BYTES = TAP_ETH_HDR_BYTES + 65535 };

static uint32_t tap_get32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* The TCP header length of a packet that may join a super-frame, or 0. */
static size_t tap_gro_candidate(const uint8_t *pkt, size_t len)
{
	if (len < 40 || pkt[0] != 0x45 || pkt[9] != 6 || (pkt[6] & 0x3f) || pkt[7])
		return 0;               /* IPv4 without options, TCP, not a fragment */
	size_t thl = (size_t)(pkt[32] >> 4) * 4;
	uint8_t fl = pkt[33];
	if (thl < 20 || 20 + thl >= len || (size_t)(pkt[2] << 8 | pkt[3]) != len ||
	    (fl & ~0x08) != 0x10)
		return 0;               /* data, and flags ACK (or ACK+PSH) only */
	return thl;
}

static void tap_gro_flush(struct node *n)
{
	struct tap_state *t = &n->tap;
	if (!t->gro_len)
		return;
	uint8_t *f = t->gro + TAP_VNET_HDR_BYTES, *ip = f + TAP_ETH_HDR_BYTES;
	size_t iplen = t->gro_len - TAP_ETH_HDR_BYTES;
	memset(t->gro, 0, TAP_VNET_HDR_BYTES);
	if (t->gro_segs > 1) {
		tap_put16(ip + 2, (uint16_t)iplen);
		ip[10] = ip[11] = 0;
		tap_put16(ip + 10, tap_csum_fold(tap_csum_add(0, ip, 20)));
		uint32_t sum = tap_csum_add(0, ip + 12, 8) + 6 + (uint32_t)(iplen - 20);
		tap_put16(ip + 36, (uint16_t)~tap_csum_fold(sum));     /* the partial sum, for the kernel */
		uint8_t *h = t->gro;
		size_t cstart = TAP_ETH_HDR_BYTES + 20;
		h[0] = TAP_VNET_F_NEEDS_CSUM;
		h[1] = TAP_VNET_GSO_TCPV4;
		h[2] = (uint8_t)t->gro_hlen, h[3] = (uint8_t)(t->gro_hlen >> 8);
		h[4] = (uint8_t)t->gro_mss, h[5] = (uint8_t)(t->gro_mss >> 8);
		h[6] = (uint8_t)cstart, h[7] = (uint8_t)(cstart >> 8);
		h[8] = 16;
		t->gro_frames++;
		t->gro_segments += t->gro_segs;
	}
	if (write(t->fd, t->gro, TAP_VNET_HDR_BYTES + t->gro_len) != (ssize_t)(TAP_VNET_HDR_BYTES + t->gro_len))
		log_drop(&n->drops, DROP_LOCAL_WRITE, ev_now(&n->loop), t->name);
	t->gro_len = 0;
}

/* Append to the super-frame being built, or start one; false when the
 * packet must go alone (after the super-frame, to keep the order). */
static bool tap_gro_add(struct node *n, const uint8_t *pkt, size_t len)
{
	struct tap_state *t = &n->tap;
	size_t thl = tap_gro_candidate(pkt, len);
	if (!thl || (!t->gro && !(t->gro = malloc(TAP_VNET_HDR_BYTES + TAP_ETH_HDR_BYTES + 65536))))
		return false;
	size_t hlen = 20 + thl, plen = len - hlen;
	uint8_t *f = t->gro + TAP_VNET_HDR_BYTES, *g = f + TAP_ETH_HDR_BYTES;
	if (t->gro_len) {
		size_t gplen = t->gro_len - t->gro_hlen;
		if (!t->gro_ended && plen <= t->gro_mss && TAP_ETH_HDR_BYTES + hlen == t->gro_hlen &&
		    t->gro_len + plen <= TAP_GRO_MAX_BYTES && pkt[1] == g[1] && pkt[8] == g[8] &&
		    !memcmp(pkt + 12, g + 12, 8) && !memcmp(pkt + 20, g + 20, 4) &&      /* addrs, ports */
		    tap_get32(pkt + 24) == tap_get32(g + 24) + (uint32_t)gplen &&       /* next in order */
		    !memcmp(pkt + 28, g + 28, 4) && !memcmp(pkt + 34, g + 34, 2) &&      /* ack, window */
		    !memcmp(pkt + 40, g + 40, thl - 20) && !(g[33] & 0x08)) {           /* options; no PSH yet */
			memcpy(f + t->gro_len, pkt + hlen, plen);
			t->gro_len += plen;
			t->gro_segs++;
			g[33] |= pkt[33] & 0x08;
			t->gro_ended = plen < t->gro_mss || (pkt[33] & 0x08);
			return true;
		}
		tap_gro_flush(n);
	}
	memcpy(f, n->tap.kernel_mac, 6);
	memcpy(f + 6, n->tap.gw_mac, 6);
	f[12] = TAP_ETH_P_IP >> 8;
	f[13] = TAP_ETH_P_IP & 255;
	memcpy(g, pkt, len);
	t->gro_len = TAP_ETH_HDR_BYTES + len;
	t->gro_hlen = TAP_ETH_HDR_BYTES + hlen;
	t->gro_mss = (uint16_t)plen;
	t->gro_segs = 1;
	t->gro_ended = (pkt[33] & 0x08) != 0;
	return true;
}

static int tap_write_ip(struct node *n, const uint8_t *pkt, size_t len)
{
	uint8_t frame[TAP_ETH_HDR_BYTES + WIRE_MAX_PACKET_BYTES];
	if (len > WIRE_MAX_PACKET_BYTES)
		return -EMSGSIZE;
	if (n->tap.vnet && tap_gro_add(n, pkt, len))
		return 0;
	tap_gro_flush(n);
	memcpy(frame, n->tap.kernel_mac, 6);
	memcpy(frame + 6, n->tap.gw_mac, 6);
	frame[12] = TAP_ETH_P_IP >> 8;
	frame[13] = TAP_ETH_P_IP & 255;
	memcpy(frame + TAP_ETH_HDR_BYTES, pkt, len);
	return tap_write_frame(n, frame, TAP_ETH_HDR_BYTES + len);
}

/* RFC 826: answer "who has T?" for any other address on the virtual network
 * with the gateway MAC. */
static void tap_on_arp(struct node *n, const uint8_t *f, size_t len)
{
	struct buf b = buf_of(f + TAP_ETH_HDR_BYTES, len - TAP_ETH_HDR_BYTES);
	uint16_t htype = buf_u16(&b), ptype = buf_u16(&b);
	uint8_t hlen = buf_u8(&b), plen = buf_u8(&b);
	uint16_t op = buf_u16(&b);
	uint8_t sha[6];
	buf_bytes(&b, sha, 6);
	uint32_t spa = buf_u32(&b);
	buf_bytes(&b, (uint8_t[6]){ 0 }, 6);
	uint32_t tpa = buf_u32(&b);
	if (b.bad || htype != 1 || ptype != TAP_ETH_P_IP || hlen != 6 || plen != 4 || op != 1 ||
	    tpa == n->self.vip || !ip_on_net(&n->ip, tpa))
		return;
	uint8_t reply[TAP_ETH_HDR_BYTES + TAP_ARP_BYTES];
	struct wbuf w = wbuf_of(reply, sizeof reply);
	wbuf_bytes(&w, sha, 6);
	wbuf_bytes(&w, n->tap.gw_mac, 6);
	wbuf_u16(&w, TAP_ETH_P_ARP);
	wbuf_u16(&w, 1);
	wbuf_u16(&w, TAP_ETH_P_IP);
	wbuf_u8(&w, 6);
	wbuf_u8(&w, 4);
	wbuf_u16(&w, 2);               /* reply */
	wbuf_bytes(&w, n->tap.gw_mac, 6);
	wbuf_u32(&w, tpa);
	wbuf_bytes(&w, sha, 6);
	wbuf_u32(&w, spa);
	tap_gro_flush(n);
	if (tap_write_frame(n, reply, sizeof reply) < 0)
		log_drop(&n->drops, DROP_LOCAL_WRITE, ev_now(&n->loop), "tap arp");
}

/* A frame from the device.  Its buffer leaves WIRE_ROUTED_ROOM_BYTES free
 * before it (tap_readable, tap_vnet_frame): the routed header goes there
 * (ip_from_local's writable). */
static void tap_frame(struct node *n, uint8_t *f, size_t len)
{
	if (len < TAP_ETH_HDR_BYTES)
		return;
	uint16_t type = (uint16_t)(f[12] << 8 | f[13]);
	if (type == TAP_ETH_P_ARP)
		tap_on_arp(n, f, len);
	else if (type == TAP_ETH_P_IP)
		ip_from_local(n, f + TAP_ETH_HDR_BYTES, len - TAP_ETH_HDR_BYTES, f + TAP_ETH_HDR_BYTES);
	else
		log_drop(&n->drops, DROP_NOT_IPV4, ev_now(&n->loop), n->tap.name);
}

/* ---- offloads ------------------------------------------------------------
 * With IFF_VNET_HDR and TUNSETOFFLOAD the kernel hands us TCP super-frames
 * of up to 64 KiB (TSO) with the checksum left partial, instead of 45
 * frames of one MTU: one read instead of 45, and the sending TCP stack runs
 * once per 64 KiB.  We cut them into MTU-sized segments here, as a NIC
 * would, so the overlay still carries ordinary IP packets. */

/* The kernel left the L4 checksum partial: the pseudo-header's sum is in
 * the checksum field; add the bytes from start on and store the result. */
static bool tap_finish_csum(uint8_t *f, size_t len, size_t start, size_t off)
{
	if (start + off + 2 > len)
		return false;
	tap_put16(f + start + off, tap_csum_fold(tap_csum_add(0, f + start, len - start)));
	return true;
}

/* One TCP/IPv4 segment of a super-frame: headers copied, lengths, IP id,
 * sequence number, flags and both checksums made right for it. */
static void tap_tso_segment(struct node *n, const uint8_t *f, size_t hlen, size_t ip_off, size_t tcp_off,
			    const uint8_t *payload, size_t plen, unsigned k, bool last, uint8_t *out)
{
	memcpy(out, f, hlen);
	memcpy(out + hlen, payload, plen);
	uint8_t *ip = out + ip_off, *tcp = out + tcp_off;
	size_t ihl = tcp_off - ip_off;
	tap_put16(ip + 2, (uint16_t)(hlen - ip_off + plen));
	tap_put16(ip + 4, (uint16_t)((ip[4] << 8 | ip[5]) + k));
	ip[10] = ip[11] = 0;
	tap_put16(ip + 10, tap_csum_fold(tap_csum_add(0, ip, ihl)));
	uint32_t seq = (uint32_t)tcp[4] << 24 | (uint32_t)tcp[5] << 16 | (uint32_t)tcp[6] << 8 | tcp[7];
	seq += (uint32_t)(payload - (f + hlen));
	tcp[4] = (uint8_t)(seq >> 24), tcp[5] = (uint8_t)(seq >> 16), tcp[6] = (uint8_t)(seq >> 8), tcp[7] = (uint8_t)seq;
	if (!last)
		tcp[13] &= (uint8_t)~0x09;      /* FIN and PSH only on the last segment */
	if (k)
		tcp[13] &= (uint8_t)~0x80;      /* CWR only on the first */
	size_t l4 = hlen - tcp_off + plen;
	uint32_t sum = tap_csum_add(0, ip + 12, 8) + 6 + (uint32_t)l4;
	tcp[16] = tcp[17] = 0;
	tap_put16(tcp + 16, tap_csum_fold(tap_csum_add(sum, tcp, l4)));
	tap_frame(n, out, hlen + plen);
}

/* One UDP/IPv4 datagram of a UDP_SEGMENT super-frame: headers copied,
 * lengths, IP id and both checksums made right for it. */
static void tap_uso_segment(struct node *n, const uint8_t *f, size_t hlen, size_t ip_off, size_t udp_off,
			    const uint8_t *payload, size_t plen, unsigned k, uint8_t *out)
{
	memcpy(out, f, hlen);
	memcpy(out + hlen, payload, plen);
	uint8_t *ip = out + ip_off, *udp = out + udp_off;
	size_t ihl = udp_off - ip_off, l4 = 8 + plen;
	tap_put16(ip + 2, (uint16_t)(ihl + l4));
	tap_put16(ip + 4, (uint16_t)((ip[4] << 8 | ip[5]) + k));
	ip[10] = ip[11] = 0;
	tap_put16(ip + 10, tap_csum_fold(tap_csum_add(0, ip, ihl)));
	tap_put16(udp + 4, (uint16_t)l4);
	udp[6] = udp[7] = 0;
	uint16_t sum = tap_csum_fold(tap_csum_add(tap_csum_add(0, ip + 12, 8) + 17 + (uint32_t)l4, udp, l4));
	tap_put16(udp + 6, sum ? sum : 0xffff);         /* 0 would mean "none" */
	tap_frame(n, out, hlen + plen);
}

/* A frame read with its virtio-net header: cut, or finish, then handle. */
static void tap_vnet_frame(struct node *n, uint8_t *buf, size_t len)
{
	if (len < TAP_VNET_HDR_BYTES + TAP_ETH_HDR_BYTES)
		return;
	uint8_t flags = buf[0], gso = buf[1];
	uint16_t gso_size = (uint16_t)(buf[4] | buf[5] << 8);                /* little-endian */
	uint16_t cstart = (uint16_t)(buf[6] | buf[7] << 8), coff = (uint16_t)(buf[8] | buf[9] << 8);
	uint8_t *f = buf + TAP_VNET_HDR_BYTES;
	len -= TAP_VNET_HDR_BYTES;
	if ((gso & 0x7f) == 0) {
		if ((flags & TAP_VNET_F_NEEDS_CSUM) && !tap_finish_csum(f, len, cstart, coff))
			return log_drop(&n->drops, DROP_BAD_IP, ev_now(&n->loop), n->tap.name);
		return tap_frame(n, f, len);
	}
	size_t ip_off = TAP_ETH_HDR_BYTES, ihl = len > ip_off ? (size_t)(f[ip_off] & 15) * 4 : 0;
	size_t tcp_off = ip_off + ihl;
	bool udp = (gso & 0x7f) == TAP_VNET_GSO_UDP_L4;
	if (((gso & 0x7f) != TAP_VNET_GSO_TCPV4 && !udp) || len < tcp_off + 20 || ihl < 20 || !gso_size ||
	    f[ip_off + 9] != (udp ? 17 : 6))
		return log_drop(&n->drops, DROP_BAD_IP, ev_now(&n->loop), "tap super-frame");
	size_t hlen = tcp_off + (udp ? 8 : (size_t)(f[tcp_off + 12] >> 4) * 4);
	if (hlen > len || hlen < tcp_off + (udp ? 8 : 20))
		return log_drop(&n->drops, DROP_BAD_IP, ev_now(&n->loop), "tap super-frame");
	uint8_t room[WIRE_ROUTED_ROOM_BYTES + TAP_ETH_HDR_BYTES + 60 + 60 + IP_MTU_MAX];
	uint8_t *out = room + WIRE_ROUTED_ROOM_BYTES;
	size_t plen = len - hlen;
	/* The kernel cuts for the interface's MTU; a larger segment would not
	 * fit the overlay's packets. */
	if (hlen + gso_size > sizeof room - WIRE_ROUTED_ROOM_BYTES || hlen - ip_off + gso_size > (size_t)n->ip.mtu)
		return log_drop(&n->drops, DROP_BAD_IP, ev_now(&n->loop), "tap super-frame");
	n->tap.tso_frames++;
	unsigned k = 0;
	for (size_t off = 0; off < plen; off += gso_size, k++) {
		size_t seg = plen - off < gso_size ? plen - off : gso_size;
		if (udp)
			tap_uso_segment(n, f, hlen, ip_off, tcp_off, f + hlen + off, seg, k, out);
		else
			tap_tso_segment(n, f, hlen, ip_off, tcp_off, f + hlen + off, seg, k, off + seg == plen, out);
	}
	n->tap.tso_segments += k;
}

/* A frame off the device: a virtio-net header, Ethernet, and up to 64 KiB
 * of IP (a TSO super-frame); allocated with the first read. */
enum { TAP_RX_BYTES = TAP_VNET_HDR_BYTES + TAP_ETH_HDR_BYTES + 65536 };

static void tap_readable(struct ev_loop *loop, int fd, void *arg, uint32_t events)
{
	struct node *n = arg;
	(void)loop;
	(void)events;
	if (!n->tap.rx && !(n->tap.rx = malloc(WIRE_ROUTED_ROOM_BYTES + TAP_RX_BYTES)))
		return;
	uint8_t *frame = n->tap.rx + WIRE_ROUTED_ROOM_BYTES;   /* room for tap_frame */
	for (int i = 0; i < TAP_FRAMES_PER_WAKE; i++) {
		ssize_t r = read(fd, frame, TAP_RX_BYTES);
		if (r <= 0)
			return;
		if (n->tap.vnet)
			tap_vnet_frame(n, frame, (size_t)r);
		else
			tap_frame(n, frame, (size_t)r);
	}
}

static int tap_ioctl(int sock, unsigned long req, struct ifreq *ifr, const char *what,
		     char *err, size_t errlen)
{
	if (ioctl(sock, req, ifr) == 0)
		return 0;
	snprintf(err, errlen, "cannot %s on %s: %s%s", what, ifr->ifr_name, strerror(errno),
		 errno == EPERM ? " (needs root or CAP_NET_ADMIN)" : "");
	return -1;
}

static void tap_sockaddr(struct sockaddr *sa, uint32_t ip)
{
	struct sockaddr_in in = { .sin_family = AF_INET };
	in.sin_addr.s_addr = htonl(ip);
	memcpy(sa, &in, sizeof in);
}

/* Address, netmask, MTU, up: what 'ip addr add' and 'ip link set up' would do. */
static int tap_configure(struct node *n, char *err, size_t errlen)
{
	int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	struct ifreq ifr = { 0 };
	int rc = -1;
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", n->tap.name);
	if (sock < 0)
		goto out;
	if (n->self.vip) {              /* --ip auto: not before the lease */
		tap_sockaddr(&ifr.ifr_addr, n->self.vip);
		if (tap_ioctl(sock, SIOCSIFADDR, &ifr, "set the address", err, errlen) < 0)
			goto out;
		tap_sockaddr(&ifr.ifr_netmask, n->ip.mask);
		if (tap_ioctl(sock, SIOCSIFNETMASK, &ifr, "set the netmask", err, errlen) < 0)
			goto out;
	}
	ifr.ifr_mtu = n->ip.mtu;
	if (tap_ioctl(sock, SIOCSIFMTU, &ifr, "set the MTU", err, errlen) < 0 ||
	    tap_ioctl(sock, SIOCGIFHWADDR, &ifr, "read the MAC address", err, errlen) < 0)
		goto out;
	memcpy(n->tap.kernel_mac, ifr.ifr_hwaddr.sa_data, 6);
	if (tap_ioctl(sock, SIOCGIFFLAGS, &ifr, "read the flags", err, errlen) < 0)
		goto out;
	ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
	rc = tap_ioctl(sock, SIOCSIFFLAGS, &ifr, "bring up", err, errlen);
out:
	if (sock >= 0)
		close(sock);
	return rc;
}

/* Only IPv4 is carried: ask the kernel not to chatter IPv6 (router
 * solicitations, DAD) on the interface.  Best effort. */
static void tap_disable_ipv6(const char *name)
{
	char path[96];
	snprintf(path, sizeof path, "/proc/sys/net/ipv6/conf/%s/disable_ipv6", name);
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd >= 0) {
		if (write(fd, "1", 1) != 1)
			log_debug("tap", "cannot disable IPv6 on %s", name);
		close(fd);
	}
}

/* Create and configure the device: no event loop involved, so namespace
 * mode's child can do it too.  -EPERM when we lack the privilege, -ENODEV
 * when the host has no tun device (a container), so that the caller can
 * fall back; -EIO for the rest. */
static int tap_create(struct node *n, const char *name, char *err, size_t errlen)
{
	struct ifreq ifr = { 0 };
	n->tap.fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
	int e = errno;
	if (n->tap.fd >= 0) {
		snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", name);
		ifr.ifr_flags = TAP_IFF_TAP | TAP_IFF_NO_PI | TAP_IFF_VNET_HDR;
		if (ioctl(n->tap.fd, TAP_TUNSETIFF, &ifr) < 0) {
			e = errno;
			close(n->tap.fd);
			n->tap.fd = -1;
		}
	}
	if (n->tap.fd < 0) {
		snprintf(err, errlen, "cannot open %s%s: %s%s", strchr(name, '%') ? "a tap device" : "tap device ",
			 strchr(name, '%') ? "" : name, strerror(e),
			 e == EPERM || e == EACCES ? " (needs root or CAP_NET_ADMIN, and access to /dev/net/tun)" :
			 e == EBUSY ? " (another program holds that name; choose another with --dev)" : "");
		return e == EPERM || e == EACCES ? -EPERM : e == ENOENT || e == ENODEV || e == ENXIO ? -ENODEV : -EIO;
	}
	snprintf(n->tap.name, sizeof n->tap.name, "%s", ifr.ifr_name);
	memcpy(n->tap.gw_mac, tap_gw_mac, 6);
	if (tap_configure(n, err, errlen) < 0) {
		e = errno;
		close(n->tap.fd);
		n->tap.fd = -1;
		return e == EPERM ? -EPERM : -EIO;
	}
	tap_disable_ipv6(n->tap.name);
	return 0;
}

/* A leased address (--ip auto) arrived, or changed. */
static int tap_addr_set(struct node *n)
{
	char err[200];
	if (tap_configure(n, err, sizeof err) == 0)
		return 0;
	log_err("tap", "%s", err);
	return -1;
}

/* The device is ours: its frames go through this node. */
static int tap_attach(struct node *n)
{
	/* Offloads: the device may come from a namespace child, so ask it; a
	 * veth's packet socket always has them (PACKET_VNET_HDR). */
	struct ifreq ifr = { 0 };
	unsigned off = TAP_TUN_F_CSUM | TAP_TUN_F_TSO4;
	n->tap.vnet = n->tap.veth || (ioctl(n->tap.fd, TAP_TUNGETIFF, &ifr) == 0 && (ifr.ifr_flags & TAP_IFF_VNET_HDR));
	if (getenv("IPOP_NO_OFFLOAD"))  /* for benchmarks: the frames keep their header */
		off = 0;
	if (n->tap.vnet && !n->tap.veth && ioctl(n->tap.fd, TAP_TUNSETOFFLOAD, off) < 0)
		log_info("tap", "no offloads on %s: %s", n->tap.name, strerror(errno));
	if (ev_fd_watch(&n->loop, n->tap.fd, EPOLLIN, tap_readable, n) < 0)
		return -1;
	n->ip.local = true;
	n->up.write_local = tap_write_ip;
	n->up.flush_local = tap_gro_flush;
	n->up.local_addr_set = tap_addr_set;
	return 0;
}

static int tap_open(struct node *n, const char *name, char *err, size_t errlen)
{
	int rc = tap_create(n, name, err, errlen);
	if (rc == 0 && tap_attach(n) < 0) {
		snprintf(err, errlen, "cannot watch tap device %s", n->tap.name);
		close(n->tap.fd);
		n->tap.fd = -1;
		return -1;
	}
	return rc;
}

/* ---- namespace mode ------------------------------------------------------
 * Unprivileged, for programs that need a real kernel interface (MPI, anything
 * that listens): a child makes a user and network namespace, creates the tap
 * there, hands its fd and the two namespaces back over a socketpair and runs
 * the command, or with none exits: the namespaces live on in our fds, and
 * `ipop exec` (section 16c) enters them through the control socket.  The
 * overlay sockets stay with us in the host's namespace.
 * Inside, the user keeps its own uid, not 0: Open MPI refuses to run as
 * root, and files made there belong to the user as outside.  The child
 * holds every capability in its namespace until it execs the command, long
 * enough to make the device and open ping and low ports to that uid. */

struct tap_ns_msg {
	int status;                     /* 0, or -1 with err set */
	bool veth;                      /* the device is an AF_PACKET socket on a veth, not a tap */
	uint8_t mac[6];
	char name[16];
	char err[300];
};

static int tap_ns_write(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	ssize_t w = fd < 0 ? -1 : write(fd, text, strlen(text));
	if (fd >= 0)
		close(fd);
	return w == (ssize_t)strlen(text) ? 0 : -1;
}

/* The network namespace is the user's alone: its programs may ping (ICMP
 * datagram sockets) and listen on any port, as root could.  Best effort. */
static void tap_ns_open_up(gid_t gid)
{
	char range[64];
	snprintf(range, sizeof range, "%u %u\n", (unsigned)gid, (unsigned)gid);
	if (tap_ns_write("/proc/sys/net/ipv4/ping_group_range", range) < 0)
		log_debug("tap", "cannot allow ping in the namespace: %s", strerror(errno));
	if (tap_ns_write("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0\n") < 0)
		log_debug("tap", "cannot open low ports in the namespace: %s", strerror(errno));
}

/* A fresh user namespace in which we keep our uid and gid, owning a fresh
 * network namespace; until exec we hold every capability in both. */
static int tap_ns_enter(uid_t uid, gid_t gid, char *err, size_t errlen)
{
	char map[64];
	if (unshare(CLONE_NEWUSER | CLONE_NEWNET) < 0) {
		snprintf(err, errlen, "cannot create a user and network namespace: %s (unprivileged user "
			 "namespaces are off on this host; use --mode user)", strerror(errno));
		return -1;
	}
	snprintf(map, sizeof map, "%u %u 1\n", (unsigned)uid, (unsigned)uid);
	if (tap_ns_write("/proc/self/setgroups", "deny") < 0 || tap_ns_write("/proc/self/uid_map", map) < 0)
		goto fail;
	snprintf(map, sizeof map, "%u %u 1\n", (unsigned)gid, (unsigned)gid);
	if (tap_ns_write("/proc/self/gid_map", map) < 0)
		goto fail;
	tap_ns_open_up(gid);
	int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	struct ifreq ifr = { .ifr_name = "lo" };
	if (sock >= 0 && ioctl(sock, SIOCGIFFLAGS, &ifr) == 0) {
		ifr.ifr_flags |= IFF_UP;
		ioctl(sock, SIOCSIFFLAGS, &ifr);
	}
	if (sock >= 0)
		close(sock);
	return 0;
fail:
	snprintf(err, errlen, "cannot map our user id into the namespace: %s", strerror(errno));
	return -1;
}

/* ---- namespace mode without /dev/net/tun ----------------------------------
 * Where users may not open /dev/net/tun (mode 0600 on many hosts), the child
 * makes a veth pair in the namespace instead: the programs' end, ipop0, gets
 * the virtual IP; an AF_PACKET socket on the other end, ipop0p, is the fd the
 * node gets.  With PACKET_VNET_HDR its frames carry the virtio-net header a
 * tap's do, so the frame code above serves both.  The pair is made with one
 * rtnetlink request, written here by hand (musl has no Linux uapi headers). */

enum {
	TAP_NL_BYTES = 256,             /* the one request: about 100 bytes */
	TAP_NETLINK_ROUTE = 0,
	TAP_RTM_NEWLINK = 16,
	TAP_NLM_F_REQUEST = 1, TAP_NLM_F_ACK = 4, TAP_NLM_F_EXCL = 0x200, TAP_NLM_F_CREATE = 0x400,
	TAP_NLMSG_ERROR = 2,
	TAP_IFLA_IFNAME = 3, TAP_IFLA_MTU = 4, TAP_IFLA_LINKINFO = 18,
	TAP_IFLA_INFO_KIND = 1, TAP_IFLA_INFO_DATA = 2, TAP_VETH_INFO_PEER = 1,
	TAP_SOL_PACKET = 263, TAP_PACKET_VNET_HDR = 15, TAP_PACKET_IGNORE_OUTGOING = 23,
	TAP_ETH_P_ALL = 0x0003,
	TAP_PACKET_BUF_BYTES = 4 << 20, /* socket buffers: a burst of super-frames */
};

struct tap_nl_hdr {                     /* struct nlmsghdr */
	uint32_t len;
	uint16_t type, flags;
	uint32_t seq, pid;
};

struct tap_nl_ifinfo {                  /* struct ifinfomsg */
	uint8_t family, pad;
	uint16_t type;
	int32_t index;
	uint32_t flags, change;
};

struct tap_nl {
	uint8_t buf[TAP_NL_BYTES];
	size_t len;
};

static void *tap_nl_put(struct tap_nl *m, const void *data, size_t len)
{
	void *at = m->buf + m->len;
	memcpy(at, data, len);
	m->len += (len + 3) & ~(size_t)3;
	return at;
}

/* An attribute (struct rtattr); tap_nl_close sets its length once what
 * nests in it is written. */
static size_t tap_nl_attr(struct tap_nl *m, uint16_t type, const void *data, size_t len)
{
	size_t at = m->len;
	uint16_t hdr[2] = { (uint16_t)(4 + len), type };
	tap_nl_put(m, hdr, 4);
	if (len)
		tap_nl_put(m, data, len);
	return at;
}

static void tap_nl_close(struct tap_nl *m, size_t at)
{
	uint16_t len = (uint16_t)(m->len - at);
	memcpy(m->buf + at, &len, 2);
}

/* RTM_NEWLINK: veth name, peer name, both with our MTU. */
static void tap_nl_veth_request(struct tap_nl *m, const char *name, const char *peer, uint32_t mtu)
{
	struct tap_nl_hdr h = { .type = TAP_RTM_NEWLINK, .seq = 1,
				.flags = TAP_NLM_F_REQUEST | TAP_NLM_F_ACK | TAP_NLM_F_CREATE | TAP_NLM_F_EXCL };
	struct tap_nl_ifinfo ifi = { .family = AF_UNSPEC };
	m->len = 0;
	tap_nl_put(m, &h, sizeof h);
	tap_nl_put(m, &ifi, sizeof ifi);
	tap_nl_attr(m, TAP_IFLA_IFNAME, name, strlen(name) + 1);
	tap_nl_attr(m, TAP_IFLA_MTU, &mtu, 4);
	size_t info = tap_nl_attr(m, TAP_IFLA_LINKINFO, NULL, 0);
	tap_nl_attr(m, TAP_IFLA_INFO_KIND, "veth", 5);
	size_t data = tap_nl_attr(m, TAP_IFLA_INFO_DATA, NULL, 0);
	size_t p = tap_nl_attr(m, TAP_VETH_INFO_PEER, NULL, 0);
	tap_nl_put(m, &ifi, sizeof ifi);
	tap_nl_attr(m, TAP_IFLA_IFNAME, peer, strlen(peer) + 1);
	tap_nl_attr(m, TAP_IFLA_MTU, &mtu, 4);
	tap_nl_close(m, p);
	tap_nl_close(m, data);
	tap_nl_close(m, info);
	uint32_t total = (uint32_t)m->len;
	memcpy(m->buf, &total, 4);
}

/* Make the pair; 0, or -errno as the kernel answered. */
static int tap_nl_veth(const char *name, const char *peer, uint32_t mtu)
{
	struct tap_nl m = { 0 };        /* the padding goes to the kernel too */
	int32_t ans[8];                 /* nlmsghdr, then nlmsgerr's error */
	tap_nl_veth_request(&m, name, peer, mtu);
	int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, TAP_NETLINK_ROUTE);
	if (fd < 0)
		return -errno;
	ssize_t r = send(fd, m.buf, m.len, 0) == (ssize_t)m.len ? recv(fd, ans, sizeof ans, 0) : -1;
	int e = r < 0 ? -errno : (size_t)r < 20 || ((struct tap_nl_hdr *)ans)->type != TAP_NLMSG_ERROR ? -EPROTO :
		ans[4];
	close(fd);
	return e;
}

/* The node's end: an AF_PACKET socket on the peer with virtio-net headers.
 * A packet socket never hears its own sends; PACKET_IGNORE_OUTGOING (Linux
 * 4.20) also mutes anything else the kernel sends out of the peer, so it is
 * asked for but not required. */
static int tap_packet_open(const char *peer, char *err, size_t errlen)
{
	int one = 1, buf = TAP_PACKET_BUF_BYTES;
	struct sockaddr_ll sa = { .sll_family = AF_PACKET, .sll_protocol = htons(TAP_ETH_P_ALL),
				  .sll_ifindex = (int)if_nametoindex(peer) };
	int fd = socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);   /* deaf until bound */
	if (fd >= 0)
		setsockopt(fd, TAP_SOL_PACKET, TAP_PACKET_IGNORE_OUTGOING, &one, sizeof one);
	if (fd < 0 || !sa.sll_ifindex ||
	    setsockopt(fd, TAP_SOL_PACKET, TAP_PACKET_VNET_HDR, &one, sizeof one) < 0 ||
	    bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
		snprintf(err, errlen, "cannot open a packet socket on %s: %s", peer, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);       /* up to rmem_max */
	setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
	return fd;
}

/* Bring an interface up (the peer: no address, no IPv6). */
static int tap_link_up(const char *name)
{
	int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	struct ifreq ifr = { 0 };
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", name);
	int rc = sock < 0 || ioctl(sock, SIOCGIFFLAGS, &ifr) < 0 ? -1 : 0;
	ifr.ifr_flags |= IFF_UP;
	if (rc == 0)
		rc = ioctl(sock, SIOCSIFFLAGS, &ifr);
	if (sock >= 0)
		close(sock);
	return rc;
}

/* In the child, instead of tap_create: the pair, configured, and the
 * packet socket as n->tap.fd. */
static int tap_ns_veth(struct node *n, const char *name, char *err, size_t errlen)
{
	char peer[IFNAMSIZ];
	snprintf(peer, sizeof peer, "%sp", name);
	int rc = tap_nl_veth(name, peer, (uint32_t)n->ip.mtu);
	if (rc < 0) {
		snprintf(err, errlen, "/dev/net/tun is closed to users here (or absent), and making a veth pair "
			 "failed too: %s (use --mode user)", strerror(-rc));
		return -1;
	}
	snprintf(n->tap.name, sizeof n->tap.name, "%s", name);
	memcpy(n->tap.gw_mac, tap_gw_mac, 6);
	if (tap_configure(n, err, errlen) < 0 || tap_link_up(peer) < 0)
		return -1;
	tap_disable_ipv6(name);
	tap_disable_ipv6(peer);
	n->tap.fd = tap_packet_open(peer, err, errlen);
	return n->tap.fd < 0 ? -1 : 0;
}

enum {
	TAP_NS_FDS = 3,                 /* the device, the user namespace, the network namespace */
	TAP_NS_LISTEN_MAX = 16,         /* and a listener per -R (CLI_FWD_MAX) */
	TAP_NS_BACKLOG = 64,
};

/* What the node asks the child to make besides the device: TCP listeners
 * on these ports of the namespace (-R), theirs to accept on. */
struct tap_ns_listen {
	unsigned n;
	uint16_t port[TAP_NS_LISTEN_MAX];
	int fd[TAP_NS_LISTEN_MAX];      /* out: -1 until made */
};

/* execvp; on failure its errno, except that a command no PATH directory
 * has is ENOENT even when one of them was closed to us (musl's execvp
 * says EACCES then, where a shell says "not found": $PATH often names a
 * directory of root's that nobody may search). */
static int tap_ns_execvp(char *const argv[])
{
	execvp(argv[0], argv);
	int e = errno;
	const char *path = getenv("PATH");
	if (e != EACCES || strchr(argv[0], '/') || !path)
		return e;
	for (const char *p = path, *end; *p; p = *end ? end + 1 : end) {
		char full[PATH_MAX];
		struct stat st;
		end = strchrnul(p, ':');
		snprintf(full, sizeof full, "%.*s/%s", end > p ? (int)(end - p) : 1, end > p ? p : ".", argv[0]);
		if (stat(full, &st) == 0)
			return EACCES;  /* there, but not ours to run */
	}
	return ENOENT;
}

/* Send m, and with it nfds fds when m says all went well. */
static int tap_ns_send(int sock, const struct tap_ns_msg *m, const int *fds, unsigned nfds)
{
	char cbuf[CMSG_SPACE((TAP_NS_FDS + TAP_NS_LISTEN_MAX) * sizeof(int))] = { 0 };
	struct iovec iov = { .iov_base = (void *)m, .iov_len = sizeof *m };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	if (m->status == 0) {
		mh.msg_control = cbuf;
		mh.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
		struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
		memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
	}
	return sendmsg(sock, &mh, 0) < 0 ? -1 : 0;
}

/* A listener on the namespace's port (any address: the virtual IP and
 * its loopback), for -R; -1 with err said. */
static int tap_ns_listener(uint16_t port, char *err, size_t errlen)
{
	int one = 1, fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
	if (fd >= 0 && setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) == 0 &&
	    bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0 && listen(fd, TAP_NS_BACKLOG) == 0)
		return fd;
	snprintf(err, errlen, "-R: cannot listen on port %u in the namespace: %s", port, strerror(errno));
	if (fd >= 0)
		close(fd);
	return -1;
}

/* The child: namespace, tap, listeners, fds to the parent, then the
 * command if any. */
static void tap_ns_child(struct node *n, int sock, uid_t uid, gid_t gid, char *const argv[],
			 const struct tap_ns_listen *ls)
{
	struct tap_ns_msg m = { 0 };
	sigset_t all;
	sigfillset(&all);
	sigprocmask(SIG_UNBLOCK, &all, NULL);
	signal(SIGPIPE, SIG_DFL);
	m.status = tap_ns_enter(uid, gid, m.err, sizeof m.err);
	int rc = m.status < 0 ? 0 : tap_create(n, "ipop0", m.err, sizeof m.err);
	if (rc == -EPERM || rc == -ENODEV) {    /* /dev/net/tun is closed to us, or absent */
		m.veth = true;
		rc = tap_ns_veth(n, "ipop0", m.err, sizeof m.err);
	}
	if (rc < 0)
		m.status = -1;
	memcpy(m.mac, n->tap.kernel_mac, 6);
	snprintf(m.name, sizeof m.name, "%s", n->tap.name);
	int fds[TAP_NS_FDS + TAP_NS_LISTEN_MAX] = { n->tap.fd, open("/proc/self/ns/user", O_RDONLY | O_CLOEXEC),
						     open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC) };
	if (m.status == 0 && (fds[1] < 0 || fds[2] < 0)) {
		m.status = -1;
		snprintf(m.err, sizeof m.err, "cannot open the namespace's /proc/self/ns: %s", strerror(errno));
	}
	for (unsigned i = 0; i < ls->n && m.status == 0; i++)
		if ((fds[TAP_NS_FDS + i] = tap_ns_listener(ls->port[i], m.err, sizeof m.err)) < 0)
			m.status = -1;
	if (tap_ns_send(sock, &m, fds, TAP_NS_FDS + ls->n) < 0 || m.status < 0)
		_exit(126);
	if (!argv)
		_exit(0);               /* no command: the namespaces live on in the parent's fds */
	close(sock);
	close(n->tap.fd);
	int e = tap_ns_execvp(argv);
	fprintf(stderr, "ipop: cannot run %s: %s\n", argv[0], strerror(e));
	_exit(e == ENOENT ? 127 : 126);
}

/* Start the command (argv, or NULL for none) in its namespace; adopt the
 * tap, the namespaces and the listeners (ls) it made for us. */
static int tap_ns_spawn(struct node *n, char *const argv[], struct tap_ns_listen *ls, char *err, size_t errlen)
{
	int sp[2];
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sp) < 0) {
		snprintf(err, errlen, "socketpair: %s", strerror(errno));
		return -1;
	}
	uid_t uid = geteuid();
	gid_t gid = getegid();
	pid_t pid = fork();
	if (pid == 0) {
		close(sp[0]);
		tap_ns_child(n, sp[1], uid, gid, argv, ls);
	}
	close(sp[1]);
	struct tap_ns_msg m;
	char cbuf[CMSG_SPACE((TAP_NS_FDS + TAP_NS_LISTEN_MAX) * sizeof(int))];
	struct iovec iov = { .iov_base = &m, .iov_len = sizeof m };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf };
	ssize_t r = pid < 0 ? -1 : recvmsg(sp[0], &mh, MSG_CMSG_CLOEXEC);
	close(sp[0]);
	struct cmsghdr *c = r == (ssize_t)sizeof m ? CMSG_FIRSTHDR(&mh) : NULL;
	if (r != (ssize_t)sizeof m || m.status < 0 || !c || c->cmsg_type != SCM_RIGHTS ||
	    c->cmsg_len != CMSG_LEN((TAP_NS_FDS + ls->n) * sizeof(int))) {
		for (size_t k = 0; c && c->cmsg_type == SCM_RIGHTS && CMSG_LEN((k + 1) * sizeof(int)) <= c->cmsg_len; k++) {
			int fd;
			memcpy(&fd, CMSG_DATA(c) + k * sizeof(int), sizeof fd);
			close(fd);      /* what did arrive */
		}
		snprintf(err, errlen, "%s", r == (ssize_t)sizeof m && m.err[0] ? m.err : "namespace setup failed");
		if (pid > 0)
			waitpid(pid, NULL, 0);
		return -1;
	}
	int fds[TAP_NS_FDS + TAP_NS_LISTEN_MAX];
	memcpy(fds, CMSG_DATA(c), (TAP_NS_FDS + ls->n) * sizeof(int));
	memcpy(ls->fd, fds + TAP_NS_FDS, ls->n * sizeof(int));
	n->tap.fd = fds[0];
	n->tap.veth = m.veth;
	n->tap.ns_fd[0] = fds[1];
	n->tap.ns_fd[1] = fds[2];
	memcpy(n->tap.kernel_mac, m.mac, 6);
	memcpy(n->tap.gw_mac, tap_gw_mac, 6);
	snprintf(n->tap.name, sizeof n->tap.name, "%s", m.name);
	if (argv)
		n->ns_child = pid;
	else
		waitpid(pid, NULL, 0);  /* done once it sent them */
	return tap_attach(n);
}

/* The node ends: nobody may enter its namespaces any more. */
static void tap_ns_close(struct node *n)
{
	for (int i = 0; i < 2; i++)
		if (n->tap.ns_fd[i] >= 0) {
			close(n->tap.ns_fd[i]);
			n->tap.ns_fd[i] = -1;
		}
}

static void tap_close(struct node *n)
{
	if (n->tap.fd < 0)
		return;
	ev_fd_forget(&n->loop, n->tap.fd);
	close(n->tap.fd);              /* a non-persistent tap vanishes with its fd */
	n->tap.fd = -1;
	free(n->tap.gro);
	n->tap.gro = NULL;
	free(n->tap.rx);
	n->tap.rx = NULL;
}

/* ===================================================================== 12 lw_
 * User mode: lwIP inside the process owns the node's virtual IP, so a node
 * without root still has a TCP/IP stack on the network: it answers ping,
 * and TCP to and from it works.  lwIP runs NO_SYS on this event loop: its
 * one netif hands IP packets to section 10 and takes them from it, and a
 * timer drives sys_check_timeouts().  lwIP keeps global state, so a process
 * runs one user-mode node.
 * A relay joins one local socket to one lwIP TCP connection (SOCKS,
 * -L and -R all use it).  Backpressure: data from lwIP is acknowledged to
 * the peer (tcp_recved) only once written to the socket, and the socket is
 * read only while lwIP has send buffer, so one connection holds at most
 * TCP_WND (1 MiB) plus the socket buffers, whatever the sender does, and
 * its send ring (TCP_SND_BUF, 1 MiB of address space; pages are touched
 * only as far as uploads reach).  Bytes for lwIP stay in that ring until
 * acknowledged, so lwIP's segments point into it instead of copies, and a
 * relay is freed only once they are acknowledged (or the pcb is gone).
 * ========================================================================= */

enum {
	LW_TIMER_MAX_MS = 250,
	LW_CONNECT_TIMEOUT_MS = 10000,  /* SOCKS/-L connect attempts give up after this */
	LW_RELAYS_MAX = 1024,           /* concurrent relayed connections; more are refused */
	LW_READ_CHUNK_BYTES = 65535,    /* tcp_write takes a u16 length */
	LW_UNSENT_MAX_BYTES = 4 * LW_READ_CHUNK_BYTES,     /* lw_relay_room */
	LW_FLUSH_IOVS = 256,            /* pbufs per sendmsg to a relay's socket */
	/* A relay's bytes for lwIP wait in its ring until acknowledged; lwIP
	 * holds no more than its send buffer, so that is the ring's size. */
	LW_SEND_RING_BYTES = TCP_SND_BUF,
	LW_INPUT_QUEUE_MAX = 4096,      /* packets waiting for lwIP between loop turns */
	/* Input buffers kept for reuse.  lwIP frees an in-order packet as
	 * soon as the relay has copied it, so a turn needs one turn's input
	 * of them: with UDP GRO that is up to the whole input queue (a cap
	 * of 256 made musl map and unmap 32 KiB groups 1,100 times a second
	 * during a download).  Once input stops for LW_IDLE_TRIM_MS, LW_PKT_FREE_IDLE
	 * stay, so an idle node keeps 96 KB of them, not 6 MB. */
	LW_PKT_FREE_MAX = LW_INPUT_QUEUE_MAX,
	LW_PKT_FREE_IDLE = 64,
	LW_IDLE_TRIM_MS = 1000,
};

/* One packet for lwIP in a buffer of ours: lwIP frees it through
 * lw_pkt_free, which keeps it for the next packet.  A malloc per packet
 * made musl's allocator map and unmap groups all the time (TLB shootdowns:
 * about half the CPU of a download). */
struct lw_pkt {
	struct pbuf_custom pc;          /* first: lwIP's pbuf is ours */
	struct lw_state *lw;
	struct lw_pkt *next;            /* on lw->pkt_free */
	uint8_t data[WIRE_MAX_WIRE_BYTES];      /* a whole record opens here (lw_rx_plain) */
};

/* ---- lwIP's heap (MEM_CUSTOM_ALLOCATOR in vendor/lwipopts.h) --------------
 * lwIP allocates a pbuf or a segment per packet.  Straight from musl's
 * malloc, an ACK's buffer freed right after it left was often the last
 * object of its group, and musl unmapped the group: some 700 munmaps a
 * second during a download, each with a TLB shootdown (a fifth of the
 * user-mode node's CPU on this VM).  Freed blocks of three common sizes
 * wait here for the next packet instead, lw_heap_keep of a size at most:
 * an upload keeps some 800 segments in flight, each three small blocks
 * (the segment, its header pbuf and the pbuf pointing into the relay's
 * ring), and with 1024 small ones kept the churn past the cache still
 * cost 4 % of the machine in an iperf3 through -L; four uploads need four
 * times that (with 4096 kept, 4 streams ran at 4.8-7.4 Gbit/s, with 16384
 * at 7.1).  Keeping them costs no peak memory (they were in use at the
 * peak), and an idle node trims the cache to LW_HEAP_KEEP_IDLE
 * (lw_idle_trim).
 * lwIP runs in one thread and its calls carry no node: one static cache. */

enum { LW_HEAP_CLASSES = 3, LW_HEAP_KEEP_IDLE = 64 };

static const uint16_t lw_heap_sizes[LW_HEAP_CLASSES] = { 256, 768, 1792 };
static const uint16_t lw_heap_keep[LW_HEAP_CLASSES] = { 16384, 1024, 1024 };   /* up to 4 MiB of small ones */

struct lw_heap_hdr {                    /* 16 bytes: keeps malloc's alignment */
	struct lw_heap_hdr *next;       /* while cached */
	uint32_t cls;                   /* LW_HEAP_CLASSES: a size past the classes */
	uint32_t pad;
};

static struct {
	struct lw_heap_hdr *free[LW_HEAP_CLASSES];
	unsigned n_free[LW_HEAP_CLASSES];
} lw_heap;

void *ipop_lwip_malloc(size_t size)
{
	unsigned c = 0;
	while (c < LW_HEAP_CLASSES && size > lw_heap_sizes[c])
		c++;
	struct lw_heap_hdr *h = c < LW_HEAP_CLASSES ? lw_heap.free[c] : NULL;
	if (h) {
		lw_heap.free[c] = h->next;
		lw_heap.n_free[c]--;
	} else if (!(h = malloc(sizeof *h + (c < LW_HEAP_CLASSES ? lw_heap_sizes[c] : size)))) {
		return NULL;
	}
	h->cls = c;
	return h + 1;
}

void ipop_lwip_free(void *p)
{
	if (!p)
		return;
	struct lw_heap_hdr *h = (struct lw_heap_hdr *)p - 1;
	unsigned c = h->cls;
	if (c < LW_HEAP_CLASSES && lw_heap.n_free[c] < lw_heap_keep[c]) {
		h->next = lw_heap.free[c];
		lw_heap.free[c] = h;
		lw_heap.n_free[c]++;
		return;
	}
	free(h);
}

static void lw_heap_trim(unsigned keep)
{
	for (unsigned c = 0; c < LW_HEAP_CLASSES; c++)
		while (lw_heap.n_free[c] > keep) {
			struct lw_heap_hdr *h = lw_heap.free[c];
			lw_heap.free[c] = h->next;
			lw_heap.n_free[c]--;
			free(h);
		}
}

void *ipop_lwip_calloc(size_t n, size_t size)
{
	if (size && n > SIZE_MAX / size)
		return NULL;
	void *p = ipop_lwip_malloc(n * size);
	if (p)
		memset(p, 0, n * size);
	return p;
}

/* lwIP's port layer: its clock and random numbers (RFC 6528 ISNs below). */
u32_t sys_now(void);
u32_t sys_now(void)
{
	return (u32_t)(ev_clock_us() / 1000);
}

uint32_t ipop_lwip_rand(void)
{
	uint32_t r = 0;
	while (getrandom(&r, sizeof r, 0) < 0 && errno == EINTR)
		;
	return r;
}

/* RFC 6528: ISN = M + F(4-tuple, secret), M a 4-microsecond clock.  lwIP's
 * hook has no context argument, so the secret is a function-local static,
 * drawn once from getrandom. */
u32_t ipop_lwip_tcp_isn(const ip_addr_t *local_ip, u16_t local_port, const ip_addr_t *remote_ip,
			u16_t remote_port)
{
	static uint8_t secret[32];
	static bool have;
	if (!have) {
		while (getrandom(secret, sizeof secret, 0) < 0 && errno == EINTR)
			;
		have = true;
	}
	uint8_t tuple[12], h[32];
	memcpy(tuple, &local_ip->addr, 4);
	memcpy(tuple + 4, &remote_ip->addr, 4);
	memcpy(tuple + 8, &local_port, 2);
	memcpy(tuple + 10, &remote_port, 2);
	sec_sha256(secret, sizeof secret, tuple, sizeof tuple, h);
	return (u32_t)(ev_clock_us() / 4) + ((u32_t)h[0] << 24 | (u32_t)h[1] << 16 | (u32_t)h[2] << 8 | h[3]);
}

/* lwIP leaves the IP header's and TCP's checksums to us
 * (lw_checksum_flags): its 16-bit loop was 11 % of an upload's user
 * instructions, and 1 % of the machine's for the 20-byte headers alone;
 * ip_sum_add goes 32 bytes a step over a packet that the copy just
 * brought into the cache. */
static void lw_checksums_put(uint8_t *pkt, size_t len)
{
	size_t ihl = (size_t)(pkt[0] & 0x0f) * 4;
	if (len < IP_HDR_MIN_BYTES || ihl < IP_HDR_MIN_BYTES || len < ihl)
		return;
	pkt[10] = pkt[11] = 0;
	uint16_t h = ip_sum_fold(ip_sum_add(0, pkt, ihl));
	memcpy(pkt + 10, &h, 2);
	if (pkt[9] != IP_PROTOCOL_TCP || len < ihl + 20 || (pkt[6] & 0x3f) || pkt[7])
		return;                 /* not TCP, or a fragment (lwIP sends none) */
	size_t tlen = len - ihl;
	uint8_t pseudo[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, IP_PROTOCOL_TCP, (uint8_t)(tlen >> 8), (uint8_t)tlen };
	memcpy(pseudo, pkt + 12, 8);    /* source and destination address */
	pkt[ihl + 16] = pkt[ihl + 17] = 0;
	uint16_t c = ip_sum_fold(ip_sum_add(ip_sum_add(0, pseudo, sizeof pseudo), pkt + ihl, tlen));
	memcpy(pkt + ihl + 16, &c, 2);
}

/* ---- ACK thinning -----------------------------------------------------
 * lwIP acknowledges every second segment.  A download brings tens of
 * segments per loop turn, and each ACK cost a record here and a record
 * plus a tap write at the sender: the sender's node was what held a
 * download.  While one input batch is fed to lwIP, a pure ACK (no data,
 * no options, flags ACK alone) waits; a newer one of the same flow with a
 * higher ack number replaces it, as a receiver with GRO would have sent
 * one ACK for the lot (RFC 5681 allows ACKing every second segment; the
 * sender's kernel counts acknowledged bytes, not ACKs).  A duplicate ACK
 * or window update (the same ack number as the one waiting) is not merged
 * but sent, after it: fast retransmit counts them.  A waiting one is only
 * ever replaced by a higher ack number, which makes it moot.  Anything
 * else lwIP sends, and the end of the batch, sends what waits first, so
 * the order on the wire is kept. */

static bool lw_ack_is_pure(const uint8_t *pkt, size_t len)
{
	return len == LW_ACK_BYTES && pkt[0] == 0x45 && pkt[9] == IP_PROTOCOL_TCP &&
	       !(pkt[6] & 0x3f) && !pkt[7] && pkt[32] == 0x50 && pkt[33] == 0x10;
}

static uint32_t lw_ack_number(const uint8_t *pkt)
{
	struct buf b = buf_of(pkt + 28, 4);
	return buf_u32(&b);
}

static bool lw_ack_same_flow(const uint8_t *a, const uint8_t *b)
{
	return !memcmp(a + 12, b + 12, 8) && !memcmp(a + 20, b + 20, 4);   /* addresses, ports */
}

static void lw_acks_flush(struct node *n)
{
	uint8_t acks[LW_ACKS_HELD][LW_ACK_BYTES];      /* a copy: sending must not see new ones */
	unsigned k = n->lw.n_acks;
	memcpy(acks, n->lw.acks, k * LW_ACK_BYTES);
	n->lw.n_acks = 0;
	for (unsigned i = 0; i < k; i++)
		ip_from_local(n, acks[i], LW_ACK_BYTES, NULL);
}

/* Keep a pure ACK back; false if it must go now. */
static bool lw_ack_hold(struct node *n, const uint8_t *pkt)
{
	struct lw_state *lw = &n->lw;
	for (unsigned i = 0; i < lw->n_acks; i++) {
		if (!lw_ack_same_flow(lw->acks[i], pkt))
			continue;
		if ((int32_t)(lw_ack_number(pkt) - lw_ack_number(lw->acks[i])) <= 0)
			return false;   /* a duplicate or window update: counted by the sender */
		memcpy(lw->acks[i], pkt, LW_ACK_BYTES);
		return true;
	}
	if (lw->n_acks == LW_ACKS_HELD)
		return false;
	memcpy(lw->acks[lw->n_acks++], pkt, LW_ACK_BYTES);
	return true;
}

/* A packet lwIP sends: copied once, behind room for the routed header
 * (ip_from_local's writable). */
static err_t lw_netif_output(struct netif *netif, struct pbuf *p, const ip4_addr_t *ipaddr)
{
	struct node *n = netif->state;
	uint8_t buf[WIRE_ROUTED_ROOM_BYTES + WIRE_MAX_PACKET_BYTES], *pkt = buf + WIRE_ROUTED_ROOM_BYTES;
	(void)ipaddr;
	if (p->tot_len > WIRE_MAX_PACKET_BYTES)
		return ERR_BUF;
	pbuf_copy_partial(p, pkt, p->tot_len, 0);
	lw_checksums_put(pkt, p->tot_len);
	if (n->lw.in_batch && lw_ack_is_pure(pkt, p->tot_len) && lw_ack_hold(n, pkt))
		return ERR_OK;
	lw_acks_flush(n);
	ip_from_local(n, pkt, p->tot_len, pkt);
	return ERR_OK;
}

static err_t lw_netif_init(struct netif *netif)
{
	struct node *n = netif->state;
	netif->name[0] = 'i';
	netif->name[1] = 'p';
	netif->output = lw_netif_output;
	netif->mtu = (u16_t)n->ip.mtu;
	netif->flags = NETIF_FLAG_LINK_UP;
	return ERR_OK;
}

/* Which checksums lwIP computes and checks.  With secure links every
 * packet on the input queue passed the link's AEAD or was made in this
 * process (lwIP's own packets to itself, section 10's DNS answers and ICMP
 * errors), so checking its IP, TCP, UDP and ICMP checksums again finds
 * nothing: about a tenth of a download's user instructions.  Outgoing checksums
 * are always made, IP's and TCP's by lw_checksums_put: the far end's
 * kernel checks them. */
static u16_t lw_checksum_flags(const struct node *n)
{
	u16_t gen = NETIF_CHECKSUM_GEN_UDP | NETIF_CHECKSUM_GEN_ICMP;
	if (n->sec.mode != SEC_INSECURE)
		return gen;
	return gen | NETIF_CHECKSUM_CHECK_IP | NETIF_CHECKSUM_CHECK_UDP | NETIF_CHECKSUM_CHECK_TCP |
	       NETIF_CHECKSUM_CHECK_ICMP;
}

/* Hand queued packets to lwIP, from the event loop: never from inside an
 * lwIP call, which is not reentrant. */
static int64_t lw_input_flush(struct ev_loop *loop, struct ev_timer *t)
{
	struct node *n = container_of(t, struct node, lw.input_timer);
	(void)loop;
	/* Detach the queue first: lwIP may send to ourselves while it works,
	 * and those packets start a new queue for the next turn. */
	struct pbuf *list = n->lw.inq;
	n->lw.inq = n->lw.inq_tail = NULL;
	n->lw.n_inq = 0;
	NETIF_SET_CHECKSUM_CTRL(&n->lw.netif, lw_checksum_flags(n));
	n->lw.in_batch = true;
	while (list) {
		struct pbuf *p = list;
		list = p->next;
		p->next = NULL;
		if (n->lw.netif.input(p, &n->lw.netif) != ERR_OK)
			pbuf_free(p);
	}
	n->lw.in_batch = false;
	lw_acks_flush(n);
	return EV_TIMER_STOP;
}

static void lw_pkt_free(struct pbuf *p)
{
	struct lw_pkt *k = (struct lw_pkt *)p;
	struct lw_state *lw = k->lw;
	if (lw->n_pkt_free >= LW_PKT_FREE_MAX) {
		free(k);
		return;
	}
	k->next = lw->pkt_free;
	lw->pkt_free = k;
	lw->n_pkt_free++;
}

/* A buffer from the free list if it has one. */
static struct lw_pkt *lw_pkt_take(struct lw_state *lw)
{
	struct lw_pkt *k = lw->pkt_free;
	if (k) {
		lw->pkt_free = k->next;
		lw->n_pkt_free--;
	} else if (!(k = malloc(sizeof *k))) {
		return NULL;
	}
	k->lw = lw;
	k->pc.custom_free_function = lw_pkt_free;
	return k;
}

/* The link layer opens each record in the spare buffer, so that an IP
 * packet for us is taken in where it was decrypted (lw_pkt_new) instead
 * of copied: a copy of every byte a user-mode node receives. */
static uint8_t *lw_rx_plain(struct node *n)
{
	if (!n->lw.spare)
		n->lw.spare = lw_pkt_take(&n->lw);
	return n->lw.spare ? n->lw.spare->data : NULL;
}

/* A pbuf holding pkt: the spare buffer itself when pkt was opened there,
 * else a copy. */
static struct pbuf *lw_pkt_new(struct lw_state *lw, const uint8_t *pkt, size_t len)
{
	struct lw_pkt *k = lw->spare;
	if (k && pkt >= k->data && pkt + len <= k->data + sizeof k->data) {
		lw->spare = NULL;
		return pbuf_alloced_custom(PBUF_RAW, (u16_t)len, PBUF_REF, &k->pc, (void *)(uintptr_t)pkt,
					   (u16_t)len);
	}
	if (len > sizeof k->data) {     /* not from the overlay: none so far */
		struct pbuf *p = pbuf_alloc(PBUF_RAW, (u16_t)len, PBUF_RAM);
		if (p)
			pbuf_take(p, pkt, (u16_t)len);
		return p;
	}
	if (!(k = lw_pkt_take(lw)))
		return NULL;
	memcpy(k->data, pkt, len);
	return pbuf_alloced_custom(PBUF_RAW, (u16_t)len, PBUF_REF, &k->pc, k->data, sizeof k->data);
}

/* A packet from the ring for our virtual IP: queued for lwIP.  A packet to
 * ourselves arrives here while lwIP is still sending it, hence the queue. */
static int lw_write_ip(struct node *n, const uint8_t *pkt, size_t len)
{
	if (n->lw.n_inq >= LW_INPUT_QUEUE_MAX)
		return -ENOBUFS;
	struct pbuf *p = lw_pkt_new(&n->lw, pkt, len);
	if (!p)
		return -ENOMEM;
	if (n->lw.inq_tail)
		n->lw.inq_tail->next = p;
	else
		n->lw.inq = p;
	n->lw.inq_tail = p;
	n->lw.n_inq++;
	n->lw.last_input_ms = ev_now(&n->loop);
	if (!ev_timer_armed(&n->lw.input_timer))
		ev_timer_arm(&n->loop, &n->lw.input_timer, 0);
	return 0;
}

/* No input for a second: give the buffers a transfer needed back. */
static void lw_idle_trim(struct lw_state *lw, uint64_t now)
{
	if (now - lw->last_input_ms < LW_IDLE_TRIM_MS)
		return;
	while (lw->n_pkt_free > LW_PKT_FREE_IDLE) {
		struct lw_pkt *k = lw->pkt_free;
		lw->pkt_free = k->next;
		lw->n_pkt_free--;
		free(k);
	}
	lw_heap_trim(LW_HEAP_KEEP_IDLE);
}

static int64_t lw_tick(struct ev_loop *loop, struct ev_timer *t)
{
	struct node *n = container_of(t, struct node, lw.timer);
	(void)loop;
	lw_idle_trim(&n->lw, ev_now(&n->loop));
	sys_check_timeouts();
	u32_t next = sys_timeouts_sleeptime();
	return next > LW_TIMER_MAX_MS ? LW_TIMER_MAX_MS : (next ? next : 1);
}

/* A leased address (--ip auto) arrived, or changed. */
static int lw_addr_set(struct node *n)
{
	ip4_addr_t ip;
	ip.addr = htonl(n->self.vip);
	netif_set_ipaddr(&n->lw.netif, &ip);
	return 0;
}

static void lw_flush_dirty(struct node *n);

static void lw_start(struct node *n)
{
	ip4_addr_t ip, mask, gw;
	lwip_init();
	ip.addr = htonl(n->self.vip);
	mask.addr = htonl(n->ip.mask);
	gw.addr = 0;
	netif_add(&n->lw.netif, &ip, &mask, &gw, n, lw_netif_init, ip4_input);
	netif_set_default(&n->lw.netif);
	NETIF_SET_CHECKSUM_CTRL(&n->lw.netif, lw_checksum_flags(n));
	netif_set_up(&n->lw.netif);
	n->lw.started = true;
	n->ip.local = true;
	n->up.write_local = lw_write_ip;
	n->up.flush_local = lw_flush_dirty;
	n->up.rx_plain = lw_rx_plain;
	n->up.local_addr_set = lw_addr_set;
	ev_timer_init(&n->lw.timer, lw_tick);
	ev_timer_arm(&n->loop, &n->lw.timer, LW_TIMER_MAX_MS);
	ev_timer_init(&n->lw.input_timer, lw_input_flush);
}

/* ---- relays: a local socket <-> an lwIP TCP connection ------------------ */

/* What lwIP gave a relay and its socket has not taken yet: lwIP's pbufs
 * themselves, written out with sendmsg.  Copied into one buffer first,
 * they cost a copy of every byte a user-mode node receives. */
struct lw_held {
	struct pbuf **q;                /* a ring of pbuf chains, the oldest at first */
	unsigned first, n, cap;
	size_t off;                     /* bytes of the oldest already written */
};

struct lw_relay {
	struct node *n;
	int fd;
	struct tcp_pcb *pcb;
	struct lw_held held;            /* from lwIP, not yet written to fd */
	size_t out_len;                 /* bytes in held */
	uint8_t *ring;                  /* from fd, LW_SEND_RING_BYTES: lwIP's segments point here */
	size_t ring_head, ring_len;     /* oldest byte lwIP has not seen acknowledged; bytes held */
	bool fd_eof, pcb_eof, reading;
	bool fd_connecting;             /* -R: the local connect is still in progress */
	uint8_t *early;                 /* SOCKS: client bytes that came with the request */
	size_t early_len;
	void (*on_connect)(struct lw_relay *r, err_t err);  /* outbound connects */
	void *owner;                    /* the SOCKS client, if any */
	struct ev_timer timer;          /* connect timeout */
	struct lw_relay *dirty_next;    /* on n->lw.dirty */
	bool dirty;
};

static bool lw_held_push(struct lw_held *h, struct pbuf *p)
{
	if (h->n == h->cap) {
		unsigned cap = h->cap ? 2 * h->cap : 64;
		struct pbuf **q = malloc(cap * sizeof *q);
		if (!q)
			return false;
		for (unsigned i = 0; i < h->n; i++)
			q[i] = h->q[(h->first + i) % h->cap];
		free(h->q);
		*h = (struct lw_held){ .q = q, .n = h->n, .cap = cap, .off = h->off };
	}
	h->q[(h->first + h->n++) % h->cap] = p;
	return true;
}

/* Up to max iovecs over the held bytes, oldest first. */
static int lw_held_iov(const struct lw_held *h, struct iovec *iov, int max)
{
	int k = 0;
	size_t skip = h->off;
	for (unsigned i = 0; i < h->n && k < max; i++)
		for (struct pbuf *q = h->q[(h->first + i) % h->cap]; q && k < max; q = q->next) {
			if (skip >= q->len) {
				skip -= q->len;
				continue;
			}
			iov[k++] = (struct iovec){ (uint8_t *)q->payload + skip, q->len - skip };
			skip = 0;
		}
	return k;
}

/* w bytes were written: free the chains they finish. */
static void lw_held_consume(struct lw_held *h, size_t w)
{
	while (w && h->n) {
		struct pbuf *p = h->q[h->first];
		size_t left = p->tot_len - h->off;
		if (w < left) {
			h->off += w;
			return;
		}
		w -= left;
		pbuf_free(p);
		h->first = (h->first + 1) % h->cap;
		h->n--;
		h->off = 0;
	}
}

/* Nothing held reaches the local end any more. */
static void lw_relay_drop_out(struct lw_relay *r)
{
	lw_held_consume(&r->held, SIZE_MAX);
	free(r->held.q);
	r->held = (struct lw_held){ 0 };
	r->out_len = 0;
}

/* Free a relay; ERR_ABRT if its pcb had to be aborted (a callback that
 * freed it must then return ERR_ABRT to lwIP). */
static err_t lw_relay_free(struct lw_relay *r)
{
	struct node *n = r->n;
	err_t rc = ERR_OK;
	for (struct lw_relay **pp = &n->lw.dirty; r->dirty && *pp; pp = &(*pp)->dirty_next)
		if (*pp == r) {
			*pp = r->dirty_next;
			break;
		}
	if (r->pcb) {
		tcp_arg(r->pcb, NULL);
		tcp_recv(r->pcb, NULL);
		tcp_sent(r->pcb, NULL);
		tcp_err(r->pcb, NULL);
		/* Unacknowledged segments point into the ring, freed below:
		 * only an abort drops them now (lw_relay_done waits for the
		 * acknowledgements, so this is an error path). */
		if (r->ring_len || tcp_close(r->pcb) != ERR_OK) {
			tcp_abort(r->pcb);
			rc = ERR_ABRT;
		}
	}
	if (r->fd >= 0) {
		ev_fd_forget(&n->loop, r->fd);
		close(r->fd);
	}
	ev_timer_cancel(&n->loop, &r->timer);
	lw_relay_drop_out(r);
	free(r->ring);
	free(r->early);
	free(r);
	n->lw.n_relays--;
	return rc;
}

static void lw_relay_event(struct ev_loop *loop, int fd, void *arg, uint32_t events);

static void lw_relay_watch(struct lw_relay *r)
{
	if (r->fd_eof && r->pcb_eof && !r->out_len) {
		ev_fd_forget(&r->n->loop, r->fd);      /* only acknowledgements are awaited */
		return;
	}
	uint32_t ev = (r->reading && !r->fd_eof ? EPOLLIN : 0) | (r->out_len ? EPOLLOUT : 0);
	ev_fd_watch(&r->n->loop, r->fd, ev, lw_relay_event, r);
}

static bool lw_relay_done(const struct lw_relay *r)
{
	return r->fd_eof && r->pcb_eof && !r->out_len && (!r->ring_len || !r->pcb);
}

/* Write what lwIP gave us to the socket; acknowledge what was written. */
static void lw_relay_flush(struct lw_relay *r)
{
	size_t done = 0;
	if (r->fd_connecting)
		return;                 /* kept until the socket is connected */
	while (r->out_len) {
		struct iovec iov[LW_FLUSH_IOVS];
		struct msghdr m = { .msg_iov = iov, .msg_iovlen = (size_t)lw_held_iov(&r->held, iov, LW_FLUSH_IOVS) };
		ssize_t w = sendmsg(r->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
			/* The local end is gone (EPIPE, ECONNRESET): nothing it was
			 * sent will be read.  Kept, the bytes made EPOLLOUT fire
			 * forever, a busy loop, and lwIP's side never closed. */
			lw_relay_drop_out(r);
			r->fd_eof = r->pcb_eof = true;
			return;         /* lw_relay_done: the caller frees it */
		}
		if (w <= 0)
			break;
		lw_held_consume(&r->held, (size_t)w);
		r->out_len -= (size_t)w;
		done += (size_t)w;
	}
	for (size_t left = done; left && r->pcb;) {
		u16_t chunk = left > 0xffff ? 0xffff : (u16_t)left;
		tcp_recved(r->pcb, chunk);
		left -= chunk;
	}
	if (!r->out_len && r->pcb_eof)
		shutdown(r->fd, SHUT_WR);
	lw_relay_watch(r);
}

/* Where the next bytes for lwIP go in the ring, and how many fit there
 * without wrapping. */
static size_t lw_ring_space(const struct lw_relay *r, size_t *at)
{
	size_t tail = (r->ring_head + r->ring_len) % LW_SEND_RING_BYTES;
	*at = tail;
	if (r->ring_len == LW_SEND_RING_BYTES)
		return 0;
	return tail >= r->ring_head ? LW_SEND_RING_BYTES - tail : r->ring_head - tail;
}

/* Hand len bytes at the ring's tail to lwIP without a copy: its segments
 * point into the ring until acknowledged (lw_relay_sent).  Copying them
 * (TCP_WRITE_FLAG_COPY) cost a 1.4 KB malloc per segment, which made musl
 * map and unmap memory all the time: a third of an upload's CPU. */
static err_t lw_ring_write(struct lw_relay *r, size_t at, size_t len)
{
	err_t e = tcp_write(r->pcb, r->ring + at, (u16_t)len, 0);
	if (e == ERR_OK)
		r->ring_len += len;
	return e;
}

/* How many bytes lwIP and the ring can take now.  lwIP could take its
 * whole send buffer, but tcp_write walks the queue of bytes written and
 * not yet sent on every call (lwIP's own todo): with 1 MiB waiting there,
 * that walk was 3 % of a transfer's CPU.  A relay keeps at most
 * LW_UNSENT_MAX_BYTES unsent, well over what the window lets out between
 * two acknowledgements, which refill it (lw_relay_sent). */
static size_t lw_relay_room(const struct lw_relay *r)
{
	u32_t unsent = r->pcb->snd_lbb - r->pcb->snd_nxt;
	size_t snd = tcp_sndbuf(r->pcb), ring = LW_SEND_RING_BYTES - r->ring_len;
	size_t fresh = unsent < LW_UNSENT_MAX_BYTES ? LW_UNSENT_MAX_BYTES - unsent : 0;
	size_t room = snd < ring ? snd : ring;
	return room < fresh ? room : fresh;
}

/* Read from the socket only as much as lwIP can take now. */
static void lw_relay_pump(struct lw_relay *r)
{
	if (!r->ring && !(r->ring = malloc(LW_SEND_RING_BYTES)))
		r->fd_eof = true;       /* no memory: give up this stream */
	while (r->pcb && !r->fd_eof) {
		size_t at, room = lw_ring_space(r, &at);
		size_t take = lw_relay_room(r);
		room = room < take ? room : take;
		room = room < LW_READ_CHUNK_BYTES ? room : LW_READ_CHUNK_BYTES;
		if (room == 0) {
			r->reading = false;    /* resumed by lw_relay_sent */
			break;
		}
		ssize_t got = recv(r->fd, r->ring + at, room, MSG_DONTWAIT);
		if (got < 0 && (errno == EAGAIN || errno == EINTR)) {
			r->reading = true;
			break;
		}
		if (got <= 0) {
			r->fd_eof = true;
			tcp_shutdown(r->pcb, 0, 1);
			break;
		}
		if (lw_ring_write(r, at, (size_t)got) != ERR_OK) {
			r->fd_eof = true;       /* lwIP out of memory: give up this stream */
			break;
		}
	}
	if (r->pcb)
		tcp_output(r->pcb);
	lw_relay_watch(r);
}

static void lw_relay_event(struct ev_loop *loop, int fd, void *arg, uint32_t events)
{
	struct lw_relay *r = arg;
	(void)loop;
	(void)fd;
	if ((events & (EPOLLHUP | EPOLLERR)) && r->fd_eof && !r->fd_connecting) {
		lw_relay_drop_out(r);   /* shut both ways: nothing more reaches the local end */
		r->pcb_eof = true;
	}
	if (events & EPOLLOUT)
		lw_relay_flush(r);
	if (events & (EPOLLIN | EPOLLHUP | EPOLLERR))
		lw_relay_pump(r);
	if (lw_relay_done(r))
		lw_relay_free(r);
}

static err_t lw_relay_recv(void *arg, struct tcp_pcb *pcb, struct pbuf *p, err_t err)
{
	struct lw_relay *r = arg;
	(void)pcb;
	if (!r) {
		if (p)
			pbuf_free(p);
		return ERR_OK;
	}
	if (!p || err != ERR_OK) {
		r->pcb_eof = true;
		lw_relay_flush(r);
		if (p)
			pbuf_free(p);
		return lw_relay_done(r) ? lw_relay_free(r) : ERR_OK;
	}
	if (r->pcb_eof) {               /* the local end is gone: dropped, never acknowledged */
		pbuf_free(p);
		return ERR_OK;
	}
	if (!lw_held_push(&r->held, p))
		return ERR_MEM;         /* lwIP keeps p and offers it again */
	r->out_len += p->tot_len;
	if (!r->dirty) {                /* written at the end of the turn, all at once */
		r->dirty = true;
		r->dirty_next = r->n->lw.dirty;
		r->n->lw.dirty = r;
	}
	return ERR_OK;
}

/* The end of a loop turn: one send per relay for all the segments lwIP
 * handed it, instead of one per segment. */
static void lw_flush_dirty(struct node *n)
{
	struct lw_relay *r;
	while ((r = n->lw.dirty)) {
		n->lw.dirty = r->dirty_next;
		r->dirty = false;
		lw_relay_flush(r);
		if (lw_relay_done(r))
			lw_relay_free(r);
	}
}

/* lwIP got len more bytes acknowledged: their ring space is free.  A full
 * relay reads again only once 64 KiB fit: resuming on every ACK (two
 * segments) meant a 2.6 KB recv per ACK, and as many window updates from
 * the local kernel. */
static err_t lw_relay_sent(void *arg, struct tcp_pcb *pcb, u16_t len)
{
	struct lw_relay *r = arg;
	(void)pcb;
	if (!r)
		return ERR_OK;
	size_t n = len < r->ring_len ? len : r->ring_len;    /* a FIN is no ring byte */
	r->ring_head = (r->ring_head + n) % LW_SEND_RING_BYTES;
	r->ring_len -= n;
	if (!r->reading && !r->fd_eof && lw_relay_room(r) >= LW_READ_CHUNK_BYTES)
		lw_relay_pump(r);
	return lw_relay_done(r) ? lw_relay_free(r) : ERR_OK;
}

/* lwIP already freed the pcb. */
static void lw_relay_err(void *arg, err_t err)
{
	struct lw_relay *r = arg;
	if (!r)
		return;
	r->pcb = NULL;
	if (r->on_connect) {
		void (*cb)(struct lw_relay *, err_t) = r->on_connect;
		r->on_connect = NULL;
		cb(r, err);
		return;
	}
	r->pcb_eof = r->fd_eof = true;
	lw_relay_free(r);
}

static void lw_relay_attach(struct lw_relay *r, struct tcp_pcb *pcb)
{
	r->pcb = pcb;
	tcp_arg(pcb, r);
	tcp_recv(pcb, lw_relay_recv);
	tcp_sent(pcb, lw_relay_sent);
	tcp_err(pcb, lw_relay_err);
}

/* SOCKS: the client's bytes that came with its request go first. */
static err_t lw_relay_early(struct lw_relay *r)
{
	size_t at;
	if (!r->ring && !(r->ring = malloc(LW_SEND_RING_BYTES)))
		return ERR_MEM;
	if (lw_ring_space(r, &at) < r->early_len)
		return ERR_MEM;
	memcpy(r->ring + at, r->early, r->early_len);
	return lw_ring_write(r, at, r->early_len);
}

/* Start relaying once both ends are connected. */
static void lw_relay_run(struct lw_relay *r)
{
	ev_timer_cancel(&r->n->loop, &r->timer);
	r->fd_connecting = false;
	r->reading = true;
	if (r->early && r->pcb && lw_relay_early(r) != ERR_OK)
		r->fd_eof = true;
	free(r->early);
	r->early = NULL;
	lw_relay_flush(r);
	lw_relay_pump(r);
}

static int64_t lw_relay_connect_timeout(struct ev_loop *loop, struct ev_timer *t);

static struct lw_relay *lw_relay_new(struct node *n, int fd)
{
	if (n->lw.n_relays >= LW_RELAYS_MAX)
		return NULL;
	struct lw_relay *r = calloc(1, sizeof *r);
	if (!r)
		return NULL;
	r->n = n;
	r->fd = fd;
	ev_timer_init(&r->timer, lw_relay_connect_timeout);
	n->lw.n_relays++;
	return r;
}

static err_t lw_relay_connected(void *arg, struct tcp_pcb *pcb, err_t err)
{
	struct lw_relay *r = arg;
	(void)pcb;
	if (r && r->on_connect) {
		void (*cb)(struct lw_relay *, err_t) = r->on_connect;
		r->on_connect = NULL;
		cb(r, err);
	}
	return ERR_OK;
}

static int64_t lw_relay_connect_timeout(struct ev_loop *loop, struct ev_timer *t)
{
	struct lw_relay *r = container_of(t, struct lw_relay, timer);
	(void)loop;
	if (r->on_connect) {
		void (*cb)(struct lw_relay *, err_t) = r->on_connect;
		r->on_connect = NULL;
		if (r->pcb) {
			tcp_arg(r->pcb, NULL);
			tcp_abort(r->pcb);
			r->pcb = NULL;
		}
		cb(r, ERR_TIMEOUT);
	}
	return EV_TIMER_STOP;
}

/* Dial ip:port in the virtual network through lwIP; on_connect reports. */
static int lw_relay_dial(struct lw_relay *r, uint32_t ip, uint16_t port,
			 void (*on_connect)(struct lw_relay *r, err_t err))
{
	struct tcp_pcb *pcb = tcp_new();
	ip_addr_t dst;
	if (!pcb)
		return -ENOMEM;
	dst.addr = htonl(ip);
	r->on_connect = on_connect;
	lw_relay_attach(r, pcb);
	ev_timer_arm(&r->n->loop, &r->timer, LW_CONNECT_TIMEOUT_MS);
	if (tcp_connect(pcb, &dst, port, lw_relay_connected) != ERR_OK) {
		r->on_connect = NULL;
		return -EIO;
	}
	return 0;
}

/* A datagram (at most a packet's worth) from an lwIP UDP port: SOCKS UDP
 * ASSOCIATE and udp/ forwards send this way. */
static void lw_udp_sendto(struct udp_pcb *pcb, const uint8_t *d, size_t len, uint32_t ip, uint16_t port)
{
	struct pbuf *p = pbuf_alloc(PBUF_TRANSPORT, (u16_t)len, PBUF_RAM);
	if (!p)
		return;
	pbuf_take(p, d, (u16_t)len);
	ip_addr_t dst;
	dst.addr = htonl(ip);
	udp_sendto(pcb, p, &dst, port);
	pbuf_free(p);
}

/* ===================================================================== 13 socks_
 * A SOCKS5 server (RFC 1928) for user mode: local programs reach virtual
 * IPs through it (CONNECT).  Each client keeps its input until a message is
 * whole, so TCP may split or merge them; every failure answers with the
 * RFC's reply code and closes.  With --socks-auth it requires RFC 1929
 * logins; without, it listens on loopback unless --socks-public says so.  Names ("alice",
 * "alice.ipop") are looked up in the DHT (name:alice).  UDP ASSOCIATE
 * relays datagrams to IPv4 virtual hosts (names in UDP headers: not yet).
 * ========================================================================= */

enum socks_reply {
	SOCKS_OK = 0, SOCKS_FAILURE = 1, SOCKS_NET_UNREACHABLE = 3, SOCKS_HOST_UNREACHABLE = 4,
	SOCKS_REFUSED = 5, SOCKS_TTL_EXPIRED = 6, SOCKS_BAD_COMMAND = 7, SOCKS_BAD_ADDRESS = 8,
};

enum socks_state { SOCKS_AWAIT_GREETING, SOCKS_AWAIT_LOGIN, SOCKS_AWAIT_REQUEST, SOCKS_RESOLVING };

enum { SOCKS_VERSION = 5, SOCKS_CMD_CONNECT = 1, SOCKS_CMD_UDP_ASSOCIATE = 3, SOCKS_ATYP_IPV4 = 1,
       SOCKS_ATYP_NAME = 3, SOCKS_ATYP_IPV6 = 4 };

struct socks_client {
	struct node *n;
	int fd;
	enum socks_state state;
	uint8_t in[1 + 1 + 255 + 1 + 255]; /* the longest message: an RFC 1929 login */
	size_t in_len;
	uint16_t port;                  /* SOCKS_RESOLVING: the port asked for */
	struct ev_timer timer;          /* negotiation must finish in time */
};

enum {
	SOCKS_NEGOTIATE_TIMEOUT_MS = 10000,
	/* Clients still negotiating (greeting, login, request, name lookup):
	 * one local round trip each, or a DHT lookup for a name.  A browser
	 * opening a page's connections at once by name stays well under 64.
	 * Past it the oldest negotiation is closed for the new client, so idle
	 * connections (another local user's, or --socks-public's outsiders)
	 * cannot lock a legitimate client out; established relays are apart. */
	SOCKS_NEGOTIATING_MAX = 64,
};

static void socks_negotiating_forget(struct socks_client *c)
{
	struct lw_state *lw = &c->n->lw;
	for (unsigned i = 0; i < lw->n_negotiating; i++)
		if (lw->negotiating[i] == c) {
			lw->n_negotiating--;
			memmove(&lw->negotiating[i], &lw->negotiating[i + 1],
				(lw->n_negotiating - i) * sizeof *lw->negotiating);
			return;
		}
}

static void socks_client_free(struct socks_client *c)
{
	socks_negotiating_forget(c);
	dht_forget(c->n, c);
	if (c->fd >= 0) {
		ev_fd_forget(&c->n->loop, c->fd);
		close(c->fd);
	}
	ev_timer_cancel(&c->n->loop, &c->timer);
	free(c);
}

static void socks_reply(int fd, uint8_t code, uint32_t ip, uint16_t port)
{
	uint8_t r[10] = { SOCKS_VERSION, code, 0, SOCKS_ATYP_IPV4 };
	struct wbuf w = wbuf_of(r + 4, 6);
	wbuf_u32(&w, ip);
	wbuf_u16(&w, port);
	if (send(fd, r, sizeof r, MSG_NOSIGNAL | MSG_DONTWAIT) != (ssize_t)sizeof r)
		return;                 /* the client is gone; nothing to tell */
}

static uint8_t socks_code_of(err_t err)
{
	return err == ERR_RST ? SOCKS_REFUSED : SOCKS_HOST_UNREACHABLE;
}

static void socks_connected(struct lw_relay *r, err_t err)
{
	struct node *n = r->n;
	if (err != ERR_OK) {
		socks_reply(r->fd, socks_code_of(err), 0, 0);
		lw_relay_free(r);
		return;
	}
	socks_reply(r->fd, SOCKS_OK, n->self.vip, r->pcb ? r->pcb->local_port : 0);
	lw_relay_run(r);
}

/* Bytes a request needs, by its address type; 0 while unknown. */
static size_t socks_request_len(const uint8_t *p, size_t len)
{
	if (len < 5)
		return 0;
	switch (p[3]) {
	case SOCKS_ATYP_IPV4: return 10;
	case SOCKS_ATYP_NAME: return 4 + 1 + (size_t)p[4] + 2;
	case SOCKS_ATYP_IPV6: return 22;
	default: return 4;
	}
}

/* A whole CONNECT request: 0 and the destination, 1 and a name to look up
 * ("alice" or "alice.ipop"), or -reply code. */
static int socks_parse_request(struct node *n, const uint8_t *p, size_t len, uint32_t *ip, uint16_t *port,
			       char name[256])
{
	struct buf b = buf_of(p, len);
	uint8_t ver = buf_u8(&b), cmd = buf_u8(&b);
	buf_u8(&b);
	uint8_t atyp = buf_u8(&b);
	if (ver != SOCKS_VERSION)
		return -SOCKS_FAILURE;
	if (atyp == SOCKS_ATYP_IPV4) {
		*ip = buf_u32(&b);
	} else if (atyp == SOCKS_ATYP_NAME) {
		uint8_t nl = buf_u8(&b);
		buf_bytes(&b, name, nl);
		name[nl] = 0;
		struct in_addr ia;
		if (inet_pton(AF_INET, name, &ia) != 1) {
			size_t l = strlen(name);
			if (l > 5 && !strcmp(name + l - 5, ".ipop"))
				name[l - 5] = 0;
			*port = buf_u16(&b);
			if (cmd == SOCKS_CMD_UDP_ASSOCIATE && !b.bad)
				return 2;       /* the client's own address: not checked */
			if (cmd != SOCKS_CMD_CONNECT)
				return -SOCKS_BAD_COMMAND;
			return b.bad || !*name || strlen(name) != (size_t)strcspn(name, " \t\r\n") ? -SOCKS_FAILURE : 1;
		}
		*ip = ntohl(ia.s_addr);
	} else {
		return -SOCKS_BAD_ADDRESS;
	}
	*port = buf_u16(&b);
	if (b.bad)
		return -SOCKS_FAILURE;
	if (cmd == SOCKS_CMD_UDP_ASSOCIATE)
		return 2;               /* the address is the client's own: not checked */
	if (cmd != SOCKS_CMD_CONNECT)
		return -SOCKS_BAD_COMMAND;
	if (!ip_on_net(&n->ip, *ip))
		return -SOCKS_NET_UNREACHABLE;
	return 0;
}

/* ---- UDP ASSOCIATE (RFC 1928 section 7) ----------------------------------
 * A UDP socket on loopback takes the client's datagrams (a SOCKS UDP header,
 * then data) and sends the data from an lwIP UDP port to the virtual host;
 * replies come back with the header naming their source.  The association
 * lasts as long as the client's TCP connection.  Datagrams count only from
 * the TCP client's IP address, and from the port its request named (if not
 * 0) or else the port of its first datagram.  So another host cannot take
 * the relay over, nor another local user when the client names its port;
 * a client on 127.0.0.1 that names port 0 (many do) can be raced by a
 * local user sending first (docs/SECURITY.md section 10.1).
 * A datagram may name its destination (a --name) instead: the association
 * keeps a few names it looked up (SOCKS_UDP_NAMES_MAX, for
 * SOCKS_UDP_NAME_TTL_MS); while one lookup runs, the datagram that asked
 * waits, and others for names not known are dropped, as UDP may. */

enum {
	SOCKS_UDP_HDR_BYTES = 10,       /* RSV RSV FRAG ATYP=1 ADDR(4) PORT(2) */
	SOCKS_UDP_NAME_BYTES = 64,      /* a --name and its NUL */
	SOCKS_UDP_NAMES_MAX = 8,        /* a job talks to a few hosts by name */
	SOCKS_UDP_NAME_TTL_MS = 60000,  /* then asked again: --ip auto may move a name */
	SOCKS_UDP_UNKNOWN_TTL_MS = 5000,        /* a name nobody holds: its datagrams dropped, not asked */
};

struct socks_udp_name {
	char name[SOCKS_UDP_NAME_BYTES];        /* "" when free */
	uint32_t ip;
	uint64_t until_ms;
};

struct socks_udp {
	struct node *n;
	int tcp_fd, udp_fd;
	struct udp_pcb *pcb;
	struct sockaddr_in client;      /* the TCP client's IP; the port once known, else 0 */
	bool have_client;               /* client's port known: replies can go out */
	struct socks_udp_name names[SOCKS_UDP_NAMES_MAX];
	char resolving[SOCKS_UDP_NAME_BYTES];   /* the name being looked up, or "" */
	uint8_t *held;                  /* the datagram that asked for it: data, port */
	size_t held_len;
	uint16_t held_port;
};

/* A name is printable ASCII, no blanks: what a lookup could find. */
static bool socks_udp_name_ok(const char *name, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (name[i] <= ' ' || name[i] > '~')
			return false;
	return len > 0;
}

/* Where a client datagram goes: an IPv4 address, or (ip 0) a name with
 * ".ipop" dropped; its port and where its data starts.  -1: malformed, or
 * a fragment (FRAG != 0: never reassembled, RFC 1928 allows dropping). */
static int socks_udp_header(const uint8_t *d, size_t len, uint32_t *ip, char name[SOCKS_UDP_NAME_BYTES],
			    uint16_t *port, size_t *data_at)
{
	struct buf b = buf_of(d, len);
	uint16_t rsv = buf_u16(&b);
	uint8_t frag = buf_u8(&b), atyp = buf_u8(&b), nl = 0;
	struct in_addr ia;
	*ip = 0;
	name[0] = 0;
	if (atyp == SOCKS_ATYP_IPV4) {
		*ip = buf_u32(&b);
	} else if (atyp == SOCKS_ATYP_NAME && (nl = buf_u8(&b)) < SOCKS_UDP_NAME_BYTES) {
		buf_bytes(&b, name, nl);
		name[nl] = 0;
	} else {
		return -1;
	}
	*port = buf_u16(&b);
	if (b.bad || rsv || frag || (atyp == SOCKS_ATYP_NAME && !socks_udp_name_ok(name, nl)))
		return -1;
	*data_at = len - (size_t)(b.end - b.p);
	if (nl > 5 && !strcmp(name + nl - 5, ".ipop"))
		name[nl - 5] = 0;
	if (name[0] && inet_pton(AF_INET, name, &ia) == 1) {
		*ip = ntohl(ia.s_addr);
		name[0] = 0;
	}
	return 0;
}

static void socks_udp_free(struct socks_udp *u)
{
	struct ev_loop *loop = &u->n->loop;
	dht_forget(u->n, u);            /* a lookup's answer must not find u freed */
	free(u->held);
	ev_fd_forget(loop, u->tcp_fd);
	ev_fd_forget(loop, u->udp_fd);
	close(u->tcp_fd);
	close(u->udp_fd);
	if (u->pcb)
		udp_remove(u->pcb);
	free(u);
}

/* From the virtual network: header + data, to the client. */
static void socks_udp_from_lwip(void *arg, struct udp_pcb *pcb, struct pbuf *p, const ip_addr_t *addr, u16_t port)
{
	struct socks_udp *u = arg;
	uint8_t d[SOCKS_UDP_HDR_BYTES + WIRE_MAX_PACKET_BYTES];
	(void)pcb;
	if (u->have_client && p->tot_len <= WIRE_MAX_PACKET_BYTES) {
		struct wbuf w = wbuf_of(d, SOCKS_UDP_HDR_BYTES);
		wbuf_u16(&w, 0);
		wbuf_u8(&w, 0);
		wbuf_u8(&w, SOCKS_ATYP_IPV4);
		wbuf_u32(&w, ntohl(addr->addr));
		wbuf_u16(&w, port);
		pbuf_copy_partial(p, d + SOCKS_UDP_HDR_BYTES, p->tot_len, 0);
		sendto(u->udp_fd, d, SOCKS_UDP_HDR_BYTES + p->tot_len, MSG_DONTWAIT,
		       (struct sockaddr *)&u->client, sizeof u->client);
	}
	pbuf_free(p);
}

/* The data on to the virtual host; only to addresses in our network. */
static void socks_udp_send(struct socks_udp *u, uint32_t ip, uint16_t port, const uint8_t *data, size_t len)
{
	if (ip_on_net(&u->n->ip, ip))
		lw_udp_sendto(u->pcb, data, len, ip, port);
}

static struct socks_udp_name *socks_udp_name_find(struct socks_udp *u, const char *name)
{
	uint64_t now = ev_now(&u->n->loop);
	for (unsigned i = 0; i < SOCKS_UDP_NAMES_MAX; i++)
		if (u->names[i].name[0] && u->names[i].until_ms > now && !strcmp(u->names[i].name, name))
			return &u->names[i];
	return NULL;
}

/* Keep a looked-up name (ip 0: not found), in place of the one that
 * expires first. */
static void socks_udp_name_keep(struct socks_udp *u, const char *name, uint32_t ip)
{
	struct socks_udp_name *slot = &u->names[0];
	for (unsigned i = 1; i < SOCKS_UDP_NAMES_MAX; i++)
		if (u->names[i].until_ms < slot->until_ms)
			slot = &u->names[i];
	snprintf(slot->name, sizeof slot->name, "%s", name);
	slot->ip = ip;
	slot->until_ms = ev_now(&u->n->loop) + (ip ? SOCKS_UDP_NAME_TTL_MS : SOCKS_UDP_UNKNOWN_TTL_MS);
}

/* The DHT answered "name:N" for the datagram that waits, or did not. */
static void socks_udp_resolved(struct node *n, void *arg, const struct wire_dht *reply)
{
	struct socks_udp *u = arg;
	(void)n;
	uint32_t ip = 0;
	if (reply && reply->status == DHT_OK && reply->value_len == 4) {
		struct buf b = buf_of(reply->value, 4);
		ip = buf_u32(&b);
	}
	socks_udp_name_keep(u, u->resolving, ip);       /* unknown ones too: no lookup per datagram */
	if (ip)
		socks_udp_send(u, ip, u->held_port, u->held, u->held_len);
	u->resolving[0] = 0;
	free(u->held);
	u->held = NULL;
}

/* A datagram for a name not known yet: it waits for one lookup at a time. */
static void socks_udp_lookup(struct socks_udp *u, const char *name, uint16_t port, const uint8_t *data, size_t len)
{
	char key[SOCKS_UDP_NAME_BYTES + 8];
	if (u->resolving[0] || !(u->held = malloc(len ? len : 1)))
		return;                 /* dropped: another lookup runs */
	memcpy(u->held, data, len);
	u->held_len = len;
	u->held_port = port;
	snprintf(u->resolving, sizeof u->resolving, "%s", name);
	snprintf(key, sizeof key, "name:%s", name);
	if (dht_request(u->n, DHT_GET, key, NULL, 0, 0, socks_udp_resolved, u) < 0)
		socks_udp_resolved(u->n, u, NULL);
}

/* From the client: unfragmented, to an IPv4 address in our network or a name. */
static void socks_udp_from_client(struct socks_udp *u)
{
	uint8_t d[SOCKS_UDP_HDR_BYTES + SOCKS_UDP_NAME_BYTES + WIRE_MAX_PACKET_BYTES];
	char name[SOCKS_UDP_NAME_BYTES];
	struct sockaddr_in from;
	socklen_t fl = sizeof from;
	uint32_t ip;
	uint16_t port;
	size_t at;
	/* MSG_TRUNC: the datagram's real length, so one too long for a packet
	 * is dropped, not forwarded cut short. */
	ssize_t r = recvfrom(u->udp_fd, d, sizeof d, MSG_DONTWAIT | MSG_TRUNC, (struct sockaddr *)&from, &fl);
	if (r < 0 || (size_t)r > sizeof d ||
	    socks_udp_header(d, (size_t)r, &ip, name, &port, &at) < 0 || (size_t)r - at > WIRE_MAX_PACKET_BYTES)
		return;
	if (from.sin_addr.s_addr != u->client.sin_addr.s_addr ||
	    (u->client.sin_port && from.sin_port != u->client.sin_port))
		return;                 /* not our client */
	if (!name[0] && !ip_on_net(&u->n->ip, ip))
		return;
	u->client = from;
	u->have_client = true;
	struct socks_udp_name *known = name[0] ? socks_udp_name_find(u, name) : NULL;
	if (name[0] && !known)
		socks_udp_lookup(u, name, port, d + at, (size_t)r - at);
	else if (!known || known->ip)
		socks_udp_send(u, known ? known->ip : ip, port, d + at, (size_t)r - at);
}

static void socks_udp_event(struct ev_loop *loop, int fd, void *arg, uint32_t events)
{
	struct socks_udp *u = arg;
	char junk[256];
	(void)loop;
	(void)events;
	if (fd == u->udp_fd) {
		for (int i = 0; i < 64; i++)
			socks_udp_from_client(u);
		return;
	}
	ssize_t r = recv(fd, junk, sizeof junk, MSG_DONTWAIT);
	if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR))
		socks_udp_free(u);      /* the TCP connection ended: so does the association */
}

/* Answer UDP ASSOCIATE with a relay socket on the address the client used;
 * port: where the client said it sends from (0: not known yet). */
static int socks_udp_start(struct socks_client *c, uint16_t port)
{
	struct sockaddr_in local;
	socklen_t ll = sizeof local, pl = sizeof local;
	struct socks_udp *u = calloc(1, sizeof *u);
	if (!u || getsockname(c->fd, (struct sockaddr *)&local, &ll) < 0 ||
	    getpeername(c->fd, (struct sockaddr *)&u->client, &pl) < 0)
		goto fail;
	u->client.sin_port = htons(port);
	u->have_client = port != 0;
	u->n = c->n;
	u->tcp_fd = c->fd;
	local.sin_port = 0;
	u->udp_fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	ll = sizeof local;
	if (u->udp_fd < 0 || bind(u->udp_fd, (struct sockaddr *)&local, sizeof local) < 0 ||
	    getsockname(u->udp_fd, (struct sockaddr *)&local, &ll) < 0 || !(u->pcb = udp_new()) ||
	    udp_bind(u->pcb, IP_ADDR_ANY, 0) != ERR_OK)
		goto fail;
	udp_recv(u->pcb, socks_udp_from_lwip, u);
	ev_fd_forget(&c->n->loop, c->fd);
	c->fd = -1;                     /* the association owns the TCP socket now */
	if (ev_fd_watch(&u->n->loop, u->tcp_fd, EPOLLIN, socks_udp_event, u) < 0 ||
	    ev_fd_watch(&u->n->loop, u->udp_fd, EPOLLIN, socks_udp_event, u) < 0) {
		socks_udp_free(u);
		return -1;
	}
	socks_reply(u->tcp_fd, SOCKS_OK, ntohl(local.sin_addr.s_addr), ntohs(local.sin_port));
	return -1;                      /* negotiation over */
fail:
	if (u) {
		if (u->udp_fd > 0)
			close(u->udp_fd);
		if (u->pcb)
			udp_remove(u->pcb);
		free(u);
	}
	socks_reply(c->fd, SOCKS_FAILURE, 0, 0);
	return -1;
}

static void socks_consume(struct socks_client *c, size_t used)
{
	memmove(c->in, c->in + used, c->in_len - used);
	c->in_len -= used;
}

/* Greeting (RFC 1928 section 3): "no authentication", or username and
 * password (RFC 1929) when --socks-auth is set, which is then required. */
static int socks_on_greeting(struct socks_client *c)
{
	if (c->in_len < 2 || c->in_len < 2u + c->in[1])
		return 0;
	uint8_t want = c->n->lw.socks_auth ? 2 : 0;
	bool offered = false;
	for (unsigned i = 0; i < c->in[1]; i++)
		offered |= c->in[2 + i] == want;
	uint8_t r[2] = { SOCKS_VERSION, offered ? want : 0xff };
	if (c->in[0] != SOCKS_VERSION || send(c->fd, r, 2, MSG_NOSIGNAL | MSG_DONTWAIT) != 2 || !offered)
		return -1;
	socks_consume(c, 2u + c->in[1]);
	c->state = want ? SOCKS_AWAIT_LOGIN : SOCKS_AWAIT_REQUEST;
	return 1;
}

/* RFC 1929: VER=1, ULEN, UNAME, PLEN, PASSWD; compared in constant time
 * against every line of the --socks-auth file. */
static int socks_on_login(struct socks_client *c)
{
	const uint8_t *p = c->in;
	if (c->in_len < 2 || c->in_len < 3u + p[1] || c->in_len < 3u + p[1] + p[2 + p[1]])
		return 0;
	size_t ul = p[1], pl = p[2 + ul];
	char cred[2 * 256 + 2];
	memcpy(cred, p + 2, ul);
	cred[ul] = ':';
	memcpy(cred + ul + 1, p + 3 + ul, pl);
	size_t cl = ul + 1 + pl;
	bool ok = false;
	for (const char *line = c->n->lw.socks_auth; line && *line;) {
		size_t ll = strcspn(line, "\n");
		ok |= ll == cl && sec_equal(line, cred, cl);
		line += ll + (line[ll] == '\n');
	}
	sec_wipe(cred, sizeof cred);
	uint8_t r[2] = { 1, ok && p[0] == 1 ? 0 : 1 };
	if (send(c->fd, r, 2, MSG_NOSIGNAL | MSG_DONTWAIT) != 2 || r[1])
		return -1;
	socks_consume(c, 3 + ul + pl);
	c->state = SOCKS_AWAIT_REQUEST;
	return 1;
}

/* Hand the socket to a relay and dial; the negotiation is over after this.
 * Bytes the client sent right behind its request go out once connected. */
static void socks_dial(struct socks_client *c, uint32_t ip, uint16_t port)
{
	struct lw_relay *r = ip_on_net(&c->n->ip, ip) ? lw_relay_new(c->n, c->fd) : NULL;
	if (!r) {
		socks_reply(c->fd, ip_on_net(&c->n->ip, ip) ? SOCKS_FAILURE : SOCKS_NET_UNREACHABLE, 0, 0);
		return;
	}
	size_t need = socks_request_len(c->in, c->in_len);
	if (need && c->in_len > need && (r->early = malloc(c->in_len - need))) {
		r->early_len = c->in_len - need;
		memcpy(r->early, c->in + need, r->early_len);
	}
	ev_fd_forget(&c->n->loop, c->fd);
	c->fd = -1;                     /* the relay owns the socket from here */
	if (lw_relay_dial(r, ip, port, socks_connected) < 0) {
		socks_reply(r->fd, SOCKS_FAILURE, 0, 0);
		lw_relay_free(r);
	}
}

/* The DHT answered "name:N" (a 4-byte IPv4 address), or did not. */
static void socks_resolved(struct node *n, void *arg, const struct wire_dht *reply)
{
	struct socks_client *c = arg;
	(void)n;
	if (reply && reply->status == DHT_OK && reply->value_len == 4) {
		struct buf b = buf_of(reply->value, 4);
		socks_dial(c, buf_u32(&b), c->port);
	} else {
		socks_reply(c->fd, SOCKS_HOST_UNREACHABLE, 0, 0);
	}
	socks_client_free(c);
}

static int socks_on_request(struct socks_client *c)
{
	size_t need = socks_request_len(c->in, c->in_len);
	if (c->state == SOCKS_RESOLVING || !need || c->in_len < need)
		return 0;
	uint32_t ip;
	uint16_t port;
	char name[256], key[300];
	int rc = socks_parse_request(c->n, c->in, need, &ip, &port, name);
	if (rc < 0) {
		socks_reply(c->fd, (uint8_t)-rc, 0, 0);
		return -1;
	}
	if (rc == 0) {
		socks_dial(c, ip, port);
		return -1;
	}
	if (rc == 2)
		return socks_udp_start(c, port);
	snprintf(key, sizeof key, "name:%s", name);
	c->state = SOCKS_RESOLVING;
	c->port = port;
	if (dht_request(c->n, DHT_GET, key, NULL, 0, 0, socks_resolved, c) < 0) {
		socks_reply(c->fd, SOCKS_HOST_UNREACHABLE, 0, 0);
		return -1;
	}
	return 0;
}

static void socks_client_event(struct ev_loop *loop, int fd, void *arg, uint32_t events)
{
	struct socks_client *c = arg;
	(void)loop;
	(void)events;
	ssize_t got = recv(fd, c->in + c->in_len, sizeof c->in - c->in_len, MSG_DONTWAIT);
	if (got < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (got <= 0)
		return socks_client_free(c);
	c->in_len += (size_t)got;
	int rc = 1;
	while (rc > 0)
		rc = c->state == SOCKS_AWAIT_GREETING ? socks_on_greeting(c) :
		     c->state == SOCKS_AWAIT_LOGIN ? socks_on_login(c) : socks_on_request(c);
	if (rc < 0 || c->in_len == sizeof c->in)
		socks_client_free(c);
}

static int64_t socks_client_timeout(struct ev_loop *loop, struct ev_timer *t)
{
	(void)loop;
	socks_client_free(container_of(t, struct socks_client, timer));
	return EV_TIMER_STOP;
}

/* Count c among the negotiating clients, closing the oldest if they are
 * SOCKS_NEGOTIATING_MAX already. */
static bool socks_negotiating_add(struct socks_client *c)
{
	struct lw_state *lw = &c->n->lw;
	if (!lw->negotiating && !(lw->negotiating = calloc(SOCKS_NEGOTIATING_MAX, sizeof *lw->negotiating)))
		return false;
	if (lw->n_negotiating >= SOCKS_NEGOTIATING_MAX) {
		log_drop(&c->n->drops, DROP_LOCAL_EVICTED, ev_now(&c->n->loop), "socks client");
		socks_client_free(lw->negotiating[0]);
	}
	lw->negotiating[lw->n_negotiating++] = c;
	return true;
}

static void socks_accept(struct ev_loop *loop, int lfd, void *arg, uint32_t events)
{
	struct node *n = arg;
	(void)events;
	for (int i = 0; i < 64; i++) {
		int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0 && ev_accept_failed(loop, lfd, &n->drops, DROP_FD_LIMIT, "socks accept"))
			return;
		if (fd < 0)
			continue;
		struct socks_client *c = calloc(1, sizeof *c);
		if (!c || ev_fd_watch(loop, fd, EPOLLIN, socks_client_event, c) < 0) {
			free(c);
			close(fd);
			continue;
		}
		c->n = n;
		c->fd = fd;
		ev_timer_init(&c->timer, socks_client_timeout);
		if (!socks_negotiating_add(c)) {
			socks_client_free(c);
			continue;
		}
		ev_timer_arm(loop, &c->timer, SOCKS_NEGOTIATE_TIMEOUT_MS);
	}
}

/* A TCP listener for SOCKS or -L; err says which call failed and why. */
static int socks_listen_tcp(struct node *n, const struct endpoint *ep, ev_fd_fn *fn, void *arg,
			    const char *what, char *err, size_t errlen)
{
	struct sockaddr_in sa = link_sockaddr_of(ep);
	int one = 1, fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd >= 0)
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, 128) < 0 ||
	    ev_fd_watch(&n->loop, fd, EPOLLIN, fn, arg) < 0) {
		char ip[16];
		buf_ip_str(ep->ip, ip);
		snprintf(err, errlen, "cannot listen for %s on %s:%u: %s", what, ip, ep->port, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	return fd;
}

/* ===================================================================== 14 fwd_
 * Port forwards for user mode, like ssh's: -L [BIND:]PORT:VIP:VPORT makes a
 * local TCP port reach a virtual host; -R VPORT:HOST:PORT makes a local
 * service reachable at this node's virtual IP.  Both are relays (section
 * 12); -R accepts in lwIP and connects out locally.  Namespace mode has -R
 * too, as a plain socket pipe (fwd_pipe).
 * ========================================================================= */

struct fwd_udp_session;

struct fwd_spec {
	struct node *n;
	bool remote;                    /* -R */
	bool udp;                       /* udp/ prefix: datagrams, not a stream */
	struct udp_pcb *upcb;           /* -R udp/: our virtual port */
	struct fwd_udp_session *sess;   /* udp/: one per client (FWD_UDP_SESSIONS_MAX) */
	unsigned n_sess;
	struct endpoint local;          /* -L: where we listen; -R: what we connect to */
	uint32_t vip;                   /* -L: the virtual host */
	uint16_t vport;                 /* -L: its port; -R: our virtual port */
	int fd;                         /* -L listener */
	struct tcp_pcb *pcb;            /* -R listener */
};

static void fwd_local_connected(struct ev_loop *loop, int fd, void *arg, uint32_t events)
{
	struct lw_relay *r = arg;
	int e = 0;
	socklen_t el = sizeof e;
	(void)loop;
	(void)events;
	getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &el);
	if (e) {
		log_info("fwd", "-R: local service refused: %s", strerror(e));
		lw_relay_free(r);
		return;
	}
	lw_relay_run(r);
}

/* -R: a connection to our virtual port; connect out to the local service. */
static err_t fwd_remote_accept(void *arg, struct tcp_pcb *pcb, err_t err)
{
	struct fwd_spec *f = arg;
	if (err != ERR_OK || !pcb)
		return ERR_VAL;
	struct sockaddr_in sa = link_sockaddr_of(&f->local);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	struct lw_relay *r = fd < 0 ? NULL : lw_relay_new(f->n, fd);
	if (!r || (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS)) {
		if (r)
			lw_relay_free(r);
		else if (fd >= 0)
			close(fd);
		tcp_abort(pcb);
		return ERR_ABRT;
	}
	lw_relay_attach(r, pcb);
	r->fd_connecting = true;
	ev_fd_watch(&f->n->loop, fd, EPOLLOUT, fwd_local_connected, r);
	return ERR_OK;
}

static void fwd_dialled(struct lw_relay *r, err_t err)
{
	if (err != ERR_OK) {
		log_info("fwd", "-L: the virtual host did not accept (%s)", lwip_strerr(err));
		lw_relay_free(r);
		return;
	}
	lw_relay_run(r);
}

static void fwd_local_accept(struct ev_loop *loop, int lfd, void *arg, uint32_t events)
{
	struct fwd_spec *f = arg;
	(void)events;
	for (int i = 0; i < 64; i++) {
		int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0 && ev_accept_failed(loop, lfd, &f->n->drops, DROP_FD_LIMIT, "-L accept"))
			return;
		if (fd < 0)
			continue;
		struct lw_relay *r = lw_relay_new(f->n, fd);
		if (!r) {
			close(fd);
			continue;
		}
		if (lw_relay_dial(r, f->vip, f->vport, fwd_dialled) < 0)
			lw_relay_free(r);
	}
}

/* ---- udp/ forwards: a session per client, so replies find their way back.
 * -L udp/: a local socket; each local client gets its own lwIP UDP port.
 * -R udp/: our virtual port; each remote peer gets its own local socket
 * connected to the service.  The least recently used session makes room. */

enum { FWD_UDP_SESSIONS_MAX = 64 };

struct fwd_udp_session {
	struct fwd_spec *f;
	bool used;
	struct sockaddr_in peer;        /* -L: the local client; -R: the virtual peer */
	struct udp_pcb *pcb;            /* -L */
	int fd;                         /* -R: connected to the local service */
	uint64_t last_ms;
};

static void fwd_udp_session_end(struct fwd_udp_session *u)
{
	if (u->pcb)
		udp_remove(u->pcb);
	if (u->fd >= 0) {
		ev_fd_forget(&u->f->n->loop, u->fd);
		close(u->fd);
	}
	u->used = false;
	u->pcb = NULL;
	u->fd = -1;
}

static struct fwd_udp_session *fwd_udp_session_find(struct fwd_spec *f, const struct sockaddr_in *peer)
{
	struct fwd_udp_session *lru = &f->sess[0];
	for (unsigned i = 0; i < FWD_UDP_SESSIONS_MAX; i++) {
		struct fwd_udp_session *u = &f->sess[i];
		if (u->used && link_sockaddr_eq(&u->peer, peer)) {
			u->last_ms = ev_now(&f->n->loop);
			return u;
		}
		if (!u->used || (lru->used && u->last_ms < lru->last_ms))
			lru = u;
	}
	if (lru->used)
		fwd_udp_session_end(lru);
	*lru = (struct fwd_udp_session){ .f = f, .used = true, .peer = *peer, .fd = -1,
					 .last_ms = ev_now(&f->n->loop) };
	return lru;
}

/* -L: a reply from the virtual host, to the local client of this session. */
static void fwd_udp_from_vip(void *arg, struct udp_pcb *pcb, struct pbuf *p, const ip_addr_t *addr, u16_t port)
{
	struct fwd_udp_session *u = arg;
	uint8_t d[WIRE_MAX_PACKET_BYTES];
	(void)pcb, (void)addr, (void)port;
	if (p->tot_len <= sizeof d) {
		pbuf_copy_partial(p, d, p->tot_len, 0);
		sendto(u->f->fd, d, p->tot_len, MSG_DONTWAIT, (struct sockaddr *)&u->peer, sizeof u->peer);
	}
	pbuf_free(p);
}

static void fwd_udp_local_readable(struct ev_loop *loop, int fd, void *arg, uint32_t events)
{
	struct fwd_spec *f = arg;
	uint8_t d[WIRE_MAX_PACKET_BYTES];
	(void)loop, (void)events;
	for (int i = 0; i < 64; i++) {
		struct sockaddr_in from;
		socklen_t fl = sizeof from;
		ssize_t r = recvfrom(fd, d, sizeof d, MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
		if (r < 0)
			return;
		struct fwd_udp_session *u = fwd_udp_session_find(f, &from);
		if (!u->pcb && (!(u->pcb = udp_new()) || udp_bind(u->pcb, IP_ADDR_ANY, 0) != ERR_OK)) {
			fwd_udp_session_end(u);
			continue;
		}
		udp_recv(u->pcb, fwd_udp_from_vip, u);
		lw_udp_sendto(u->pcb, d, (size_t)r, f->vip, f->vport);
	}
}

/* -R: the local service answered; back to the virtual peer. */
static void fwd_udp_service_readable(struct ev_loop *loop, int fd, void *arg, uint32_t events)
{
	struct fwd_udp_session *u = arg;
	uint8_t d[WIRE_MAX_PACKET_BYTES];
	(void)loop, (void)events;
	for (int i = 0; i < 64; i++) {
		ssize_t r = recv(fd, d, sizeof d, MSG_DONTWAIT);
		if (r < 0)
			return;
		lw_udp_sendto(u->f->upcb, d, (size_t)r, ntohl(u->peer.sin_addr.s_addr), ntohs(u->peer.sin_port));
	}
}

/* -R: a datagram to our virtual port, for the local service. */
static void fwd_udp_from_remote(void *arg, struct udp_pcb *pcb, struct pbuf *p, const ip_addr_t *addr, u16_t port)
{
	struct fwd_spec *f = arg;
	uint8_t d[WIRE_MAX_PACKET_BYTES];
	struct sockaddr_in peer = { .sin_family = AF_INET, .sin_port = htons(port) };
	peer.sin_addr.s_addr = addr->addr;
	(void)pcb;
	size_t len = p->tot_len <= sizeof d ? p->tot_len : 0;
	pbuf_copy_partial(p, d, (u16_t)len, 0);
	pbuf_free(p);
	struct fwd_udp_session *u = fwd_udp_session_find(f, &peer);
	if (u->fd < 0) {
		struct sockaddr_in svc = link_sockaddr_of(&f->local);
		u->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (u->fd < 0 || connect(u->fd, (struct sockaddr *)&svc, sizeof svc) < 0 ||
		    ev_fd_watch(&f->n->loop, u->fd, EPOLLIN, fwd_udp_service_readable, u) < 0) {
			fwd_udp_session_end(u);
			return;
		}
	}
	if (len && send(u->fd, d, len, MSG_DONTWAIT) < 0)
		log_debug("fwd", "-R udp/: local service: %s", strerror(errno));
}

static int fwd_udp_start(struct node *n, struct fwd_spec *f, char *err, size_t errlen)
{
	if (!(f->sess = calloc(FWD_UDP_SESSIONS_MAX, sizeof *f->sess))) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	for (unsigned i = 0; i < FWD_UDP_SESSIONS_MAX; i++)
		f->sess[i].fd = -1;
	if (f->remote) {
		if (!(f->upcb = udp_new()) || udp_bind(f->upcb, IP_ADDR_ANY, f->vport) != ERR_OK) {
			snprintf(err, errlen, "-R udp/: cannot use virtual port %u", f->vport);
			return -1;
		}
		udp_recv(f->upcb, fwd_udp_from_remote, f);
		return 0;
	}
	struct sockaddr_in sa = link_sockaddr_of(&f->local);
	f->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (f->fd < 0 || bind(f->fd, (struct sockaddr *)&sa, sizeof sa) < 0 ||
	    ev_fd_watch(&n->loop, f->fd, EPOLLIN, fwd_udp_local_readable, f) < 0) {
		char ip[16];
		buf_ip_str(f->local.ip, ip);
		snprintf(err, errlen, "-L udp/: cannot listen on %s:%u: %s", ip, f->local.port, strerror(errno));
		return -1;
	}
	return 0;
}

/* ---- -R in namespace mode -------------------------------------------------
 * The namespace child listens on the port in the namespace
 * (tap_ns_listener); we accept there and connect to HOST:PORT from the
 * host's namespace, then copy bytes both ways: how a host's own sshd
 * becomes reachable at the virtual IP without root (-R 22:127.0.0.1:22),
 * so that mpirun's ssh lands on every host.  Each direction has one buffer;
 * a side is read only while its buffer is empty, so a slow reader holds a
 * fast writer back.  An end that closes is passed on as a half close.
 * A side with nothing to wait for leaves epoll (a closed or reset socket
 * would wake the loop forever); a connect gets FWD_CONNECT_TIMEOUT_MS.
 * Any member may connect, so connections are counted per source virtual
 * IP as well as in all, and those over either are refused (fwd_refused).
 * None is closed for being idle: an MPI job's ssh sessions are. */

enum {
	FWD_PIPE_BYTES = 65536,         /* per direction */
	FWD_PIPES_MAX = 256,            /* concurrent connections; more are refused */
	FWD_PIPES_PER_SOURCE = 32,      /* from one virtual IP: an mpirun holds one per host */
	FWD_CONNECT_TIMEOUT_MS = 10000,
};

struct fwd_pipe {
	struct node *n;
	struct fwd_pipe *next;
	int fd[2];                      /* 0: accepted in the namespace, 1: to the host's service */
	uint32_t source;                /* fd[0]'s peer: a virtual IP */
	bool connecting;                /* fd[1]'s connect is under way */
	bool eof[2], shut[2];           /* fd[i] sent its last; fd[!i] was told so */
	size_t len[2], off[2];          /* buf[i]: bytes from fd[i] for fd[!i] */
	uint8_t *buf[2];
	struct ev_timer timer;          /* the connect's deadline */
};

static void fwd_pipe_event(struct ev_loop *loop, int fd, void *arg, uint32_t events);

static void fwd_pipe_free(struct fwd_pipe *p)
{
	struct node *n = p->n;
	for (struct fwd_pipe **pp = &n->lw.pipes; *pp; pp = &(*pp)->next)
		if (*pp == p) {
			*pp = p->next;
			break;
		}
	n->lw.n_pipes--;
	ev_timer_cancel(&n->loop, &p->timer);
	for (int i = 0; i < 2; i++) {
		ev_fd_forget(&n->loop, p->fd[i]);
		if (p->fd[i] >= 0)
			close(p->fd[i]);
		free(p->buf[i]);
	}
	free(p);
}

/* Copy what can go from fd[i] to fd[!i] now; -1 when the connection broke. */
static int fwd_pipe_move(struct fwd_pipe *p, int i)
{
	for (;;) {
		while (p->off[i] < p->len[i]) {
			ssize_t w = send(p->fd[!i], p->buf[i] + p->off[i], p->len[i] - p->off[i],
					 MSG_NOSIGNAL | MSG_DONTWAIT);
			if (w < 0 && (errno == EAGAIN || errno == EINTR))
				return 0;
			if (w <= 0)
				return -1;
			p->off[i] += (size_t)w;
		}
		p->off[i] = p->len[i] = 0;
		if (p->eof[i]) {
			if (!p->shut[i])
				shutdown(p->fd[!i], SHUT_WR);
			p->shut[i] = true;
			return 0;
		}
		ssize_t r = recv(p->fd[i], p->buf[i], FWD_PIPE_BYTES, MSG_DONTWAIT);
		if (r < 0 && (errno == EAGAIN || errno == EINTR))
			return 0;
		if (r < 0)
			return -1;
		if (r == 0)
			p->eof[i] = true;
		p->len[i] = (size_t)r;
	}
}

/* Read a side while its buffer is empty (the namespace's only once the
 * service is connected); write one while the other's is not.  -1 if a
 * side cannot be watched. */
static int fwd_pipe_watch(struct fwd_pipe *p)
{
	for (int i = 0; i < 2; i++) {
		uint32_t ev = (!p->eof[i] && p->len[i] == 0 && !p->connecting ? EPOLLIN : 0) |
			      (p->len[!i] > p->off[!i] || (i == 1 && p->connecting) ? EPOLLOUT : 0);
		if (!ev)
			ev_fd_forget(&p->n->loop, p->fd[i]);
		else if (ev_fd_watch(&p->n->loop, p->fd[i], ev, fwd_pipe_event, p) < 0)
			return -1;
	}
	return 0;
}

/* The service answered the connect: 0, or -1 (logged) if it refused. */
static int fwd_pipe_connected(struct fwd_pipe *p)
{
	int e = 0;
	socklen_t el = sizeof e;
	getsockopt(p->fd[1], SOL_SOCKET, SO_ERROR, &e, &el);
	if (e) {
		log_info("fwd", "-R: the local service refused: %s", strerror(e));
		return -1;
	}
	p->connecting = false;
	ev_timer_cancel(&p->n->loop, &p->timer);
	return 0;
}

static void fwd_pipe_event(struct ev_loop *loop, int fd, void *arg, uint32_t events)
{
	struct fwd_pipe *p = arg;
	(void)loop;
	(void)events;
	if (p->connecting && (fd != p->fd[1] || fwd_pipe_connected(p) < 0))
		return fwd_pipe_free(p);        /* only fd[1] is watched while connecting */
	if (fwd_pipe_move(p, 0) < 0 || fwd_pipe_move(p, 1) < 0 || (p->shut[0] && p->shut[1]) ||
	    fwd_pipe_watch(p) < 0)
		fwd_pipe_free(p);
}

static int64_t fwd_pipe_timeout(struct ev_loop *loop, struct ev_timer *t)
{
	struct fwd_pipe *p = container_of(t, struct fwd_pipe, timer);
	(void)loop;
	log_info("fwd", "-R: the local service did not answer in %d s", FWD_CONNECT_TIMEOUT_MS / 1000);
	fwd_pipe_free(p);
	return EV_TIMER_STOP;
}

/* Whether one more pipe may open for a client at source. */
static bool fwd_pipe_room(const struct node *n, uint32_t source)
{
	unsigned same = 0;
	for (const struct fwd_pipe *p = n->lw.pipes; p; p = p->next)
		same += p->source == source;
	return n->lw.n_pipes < FWD_PIPES_MAX && same < FWD_PIPES_PER_SOURCE;
}

/* A pipe from fd (accepted) to the service at sa, its connect under way;
 * NULL (fd closed, why logged) when over the limits or out of resources. */
static struct fwd_pipe *fwd_pipe_new(struct node *n, int fd, const struct sockaddr_in *sa)
{
	struct sockaddr_in from = { 0 };
	socklen_t fl = sizeof from;
	getpeername(fd, (struct sockaddr *)&from, &fl);
	uint32_t source = ntohl(from.sin_addr.s_addr);
	struct fwd_pipe *p = fwd_pipe_room(n, source) ? calloc(1, sizeof *p) : NULL;
	if (!p) {
		log_drop(&n->drops, DROP_FWD_REFUSED, ev_now(&n->loop), "-R accept");
		close(fd);
		return NULL;
	}
	*p = (struct fwd_pipe){ .n = n, .fd = { fd, socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0) },
				.source = source, .connecting = true,
				.buf = { malloc(FWD_PIPE_BYTES), malloc(FWD_PIPE_BYTES) } };
	p->next = n->lw.pipes;
	n->lw.pipes = p;
	n->lw.n_pipes++;
	ev_timer_init(&p->timer, fwd_pipe_timeout);
	ev_timer_arm(&n->loop, &p->timer, FWD_CONNECT_TIMEOUT_MS);
	if (p->fd[1] < 0 || !p->buf[0] || !p->buf[1] ||
	    (connect(p->fd[1], (const struct sockaddr *)sa, sizeof *sa) < 0 && errno != EINPROGRESS) ||
	    fwd_pipe_watch(p) < 0) {
		log_info("fwd", "-R: cannot reach the local service: %s", strerror(errno));
		fwd_pipe_free(p);
		return NULL;
	}
	return p;
}

/* Connections to the namespace's port: each to the host's service. */
static void fwd_ns_accept(struct ev_loop *loop, int lfd, void *arg, uint32_t events)
{
	struct fwd_spec *f = arg;
	struct sockaddr_in sa = link_sockaddr_of(&f->local);
	(void)events;
	for (;;) {
		int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0 && ev_accept_failed(loop, lfd, &f->n->drops, DROP_FD_LIMIT, "-R accept"))
			return;
		if (fd >= 0)
			fwd_pipe_new(f->n, fd, &sa);
	}
}

/* -R in namespace mode: f->fd is the listener the namespace child made. */
static int fwd_ns_start(struct node *n, struct fwd_spec *f, char *err, size_t errlen)
{
	f->n = n;
	if (ev_fd_watch(&n->loop, f->fd, EPOLLIN, fwd_ns_accept, f) == 0)
		return 0;
	snprintf(err, errlen, "-R %u: cannot watch the namespace's listener", f->vport);
	return -1;
}

static int fwd_start(struct node *n, struct fwd_spec *f, char *err, size_t errlen)
{
	f->n = n;
	if (f->udp)
		return fwd_udp_start(n, f, err, errlen);
	if (!f->remote) {
		f->fd = socks_listen_tcp(n, &f->local, fwd_local_accept, f, "-L", err, errlen);
		return f->fd < 0 ? -1 : 0;
	}
	struct tcp_pcb *pcb = tcp_new();
	if (!pcb || tcp_bind(pcb, IP_ADDR_ANY, f->vport) != ERR_OK) {
		snprintf(err, errlen, "-R: cannot listen on virtual port %u", f->vport);
		if (pcb)
			tcp_close(pcb);
		return -1;
	}
	f->pcb = tcp_listen(pcb);
	tcp_arg(f->pcb, f);
	tcp_accept(f->pcb, fwd_remote_accept);
	return 0;
}

/* ===================================================================== 15 ctl_
 * The control socket: a per-user unix stream socket (mode 0600) on which the
 * CLI asks a running node one question per connection, as one text line:
 *   "status json" | "status text" | "ping TARGET TIMEOUT_MS" | "map" | "ns"
 * and reads the answer until the node closes ("ns" answers "ok" with the
 * namespace fds beside it, SCM_RIGHTS).  Clients are a fixed table;
 * the answer is written without blocking, so a stuck client costs one slot
 * until its idle timer closes it.  --metrics scrapes (HTTP/1.0) use the same
 * table and writer.  To add a command: a ctl_cmd_* function and a line in
 * ctl_execute.
 * ========================================================================= */

enum {
	CTL_IDLE_TIMEOUT_MS = 10000,
	CTL_METRICS_TIMEOUT_MS = 5000,  /* a scrape sends its request at once */
	/* --metrics clients among the CTL_CLIENTS_MAX slots: a Prometheus
	 * server scrapes over one connection every 15 s; two redundant ones and
	 * a curl by hand are 3.  Past 8 the oldest is closed for the new one,
	 * so a flood on a public --metrics port leaves 56 slots to `ipop`. */
	CTL_METRICS_CLIENTS_MAX = 8,
};

struct ctl_client {
	struct ctl *ctl;
	int fd;                         /* -1: slot free */
	char in[CTL_LINE_MAX_BYTES];
	size_t in_len;
	struct buf_str out;
	size_t out_off;
	uint32_t ping_id;               /* nonzero while an echo is outstanding */
	bool http;                      /* a --metrics client: HTTP/1.0, not a command line */
	uint64_t since_ms;              /* accepted then: the oldest metrics client goes first */
	struct ev_timer timer;          /* idle or ping timeout */
};

struct ctl {
	struct node *node;
	int fd;
	int metrics_fd;                 /* --metrics listener, or -1 */
	char path[108];                 /* sizeof sun_path */
	uint32_t next_ping_id;
	struct ctl_client clients[CTL_CLIENTS_MAX];
};

/* A target is a 40-hex ring address or a dotted virtual IPv4 address. */
static int ctl_parse_target(const char *s, ring_addr *out)
{
	struct in_addr ia;
	if (buf_unhex(s, out->b, RING_ADDR_BYTES))
		return 0;
	if (inet_pton(AF_INET, s, &ia) == 1) {
		*out = sec_addr_of_ip(ntohl(ia.s_addr));
		return 0;
	}
	return -EINVAL;
}

static void ctl_client_close(struct ctl_client *c)
{
	struct ev_loop *loop = &c->ctl->node->loop;
	ev_fd_forget(loop, c->fd);
	close(c->fd);
	c->fd = -1;
	c->ping_id = 0;
	ev_timer_cancel(loop, &c->timer);
	dht_forget(c->ctl->node, c);
	buf_str_free(&c->out);
}

static void ctl_client_event(struct ev_loop *loop, int fd, void *arg, uint32_t events);

/* Write what we can; close once everything is out. */
static void ctl_client_flush(struct ctl_client *c)
{
	while (c->out_off < c->out.len) {
		ssize_t w = send(c->fd, c->out.s + c->out_off, c->out.len - c->out_off, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EAGAIN) {
			ev_fd_watch(&c->ctl->node->loop, c->fd, EPOLLOUT, ctl_client_event, c);
			return;
		}
		if (w <= 0)
			break;
		c->out_off += (size_t)w;
	}
	ctl_client_close(c);
}

static const char *ctl_transport_name(const struct link *l)
{
	return l->proto == PROTO_RELAY ? "relay" : l->proto == PROTO_TCP ? "tcp" : "udp";
}

/* A relayed link's relay: its virtual IP when it has one, else its short address. */
static void ctl_relay_name(const struct link *l, char out[16])
{
	struct link *via = link_find_direct(l->node, &l->relay_via);
	if (via && via->peer.vip)
		buf_ip_str(via->peer.vip, out);
	else
		link_addr_short(&l->relay_via, out);
}

static void ctl_json_link(struct buf_str *o, const struct link *l, uint64_t now)
{
	char addr[2 * RING_ADDR_BYTES + 1] = "", ip[16], uri[40];
	uint8_t roles = l->local_roles | l->peer_roles;
	link_uri(l, uri);
	if (l->peer_known)
		ring_addr_hex(&l->peer.addr, addr);
	else if (l->expect_set)
		ring_addr_hex(&l->expect, addr);
	buf_printf(o, "{\"type\":\"%s\",\"roles\":[", ring_role_main(roles));
	for (unsigned i = 0, first = 1; i < ARRAY_LEN(ring_role_names); i++)
		if (roles & (1u << i)) {
			buf_printf(o, "%s\"%s\"", first ? "" : ",", ring_role_names[i]);
			first = 0;
		}
	buf_printf(o, "],\"local_roles\":%u,\"peer_roles\":%u,", l->local_roles, l->peer_roles);
	buf_printf(o, addr[0] ? "\"address\":\"%s\"," : "\"address\":null,", addr);
	if (l->peer_known && l->peer.vip) {
		buf_ip_str(l->peer.vip, ip);
		buf_printf(o, "\"ip\":\"%s\",", ip);
	} else {
		buf_printf(o, "\"ip\":null,");
	}
	buf_printf(o, "\"uri\":\"%s\",\"state\":\"%s\",\"direction\":\"%s\",", uri,
		   link_state_names[l->state], l->initiator ? "out" : "in");
	buf_printf(o, "\"transport\":\"%s\",\"path\":\"%s\",", ctl_transport_name(l),
		   l->proto == PROTO_RELAY ? "relayed" : "direct");
	if (l->state == LINK_UP && link_secure(l))
		buf_printf(o, "\"cipher\":\"%s\",", sec_cipher_names[l->keys->cipher]);
	else
		buf_printf(o, "\"cipher\":null,");
	if (l->proto == PROTO_RELAY) {
		char via[2 * RING_ADDR_BYTES + 1], name[16];
		ring_addr_hex(&l->relay_via, via);
		ctl_relay_name(l, name);
		buf_printf(o, "\"relay_via\":\"%s\",\"relay_via_name\":\"%s\",", via, name);
	}
	if (l->rtt_ms >= 0)
		buf_printf(o, "\"rtt_ms\":%.3f,", l->rtt_ms);
	else
		buf_printf(o, "\"rtt_ms\":null,");
	buf_printf(o, "\"slow\":%s,", l->state == LINK_UP && ring_link_slow(l->node, l) ? "true" : "false");
	double pps = l->peer_known ? ring_sc_rate(l->node, &l->peer.addr) : -1;
	if (pps >= 0)       /* why a shortcut exists: the IP traffic with its peer */
		buf_printf(o, "\"rate_pps\":%.1f,", pps);
	else
		buf_printf(o, "\"rate_pps\":null,");
	buf_printf(o, "\"age_ms\":%llu,\"tx_packets\":%llu,\"rx_packets\":%llu,\"tx_bytes\":%llu,"
		   "\"rx_bytes\":%llu}", (unsigned long long)(now - l->created_ms),
		   (unsigned long long)l->tx_packets, (unsigned long long)l->rx_packets,
		   (unsigned long long)l->tx_bytes, (unsigned long long)l->rx_bytes);
}

/* A user's string (a path) as a JSON string. */
static void ctl_json_string(struct buf_str *o, const char *s)
{
	buf_printf(o, "\"");
	for (; *s; s++)
		if (*s == '"' || *s == '\\' || (unsigned char)*s < 0x20)
			buf_printf(o, "\\u%04x", (unsigned char)*s);
		else
			buf_printf(o, "%c", *s);
	buf_printf(o, "\"");
}

static void ctl_json_listen(struct buf_str *o, const struct node *n)
{
	buf_printf(o, "\"listen\":[");
	for (unsigned i = 0; i < n->n_listeners; i++) {
		char uri[40];
		struct endpoint e = link_endpoint_of(n->listeners[i].proto, &n->listeners[i].sa);
		link_endpoint_uri(&e, uri);
		buf_printf(o, "%s\"%s\"", i ? "," : "", uri);
	}
	buf_printf(o, "],\"bootstrap\":[");
	for (unsigned i = 0; i < n->ring.n_boot; i++) {
		char uri[40];
		link_endpoint_uri(&n->ring.boot[i], uri);
		buf_printf(o, "%s\"%s\"", i ? "," : "", uri);
	}
	buf_printf(o, "],\"crl\":");
	if (n->sec.ctx->crl_path[0])
		ctl_json_string(o, n->sec.ctx->crl_path);
	else
		buf_printf(o, "null");
	buf_printf(o, ",");
}

static void ctl_status_json(struct node *n, struct buf_str *o)
{
	char addr[2 * RING_ADDR_BYTES + 1], ip[16];
	uint64_t now = ev_now(&n->loop);
	ring_addr_hex(&n->self.addr, addr);
	buf_printf(o, "{\"address\":\"%s\",", addr);
	if (n->self.vip) {
		buf_ip_str(n->self.vip, ip);
		buf_printf(o, "\"ip\":\"%s\",\"prefix\":%u,", ip, n->vip_prefix);
	} else {
		buf_printf(o, "\"ip\":null,");
	}
	buf_printf(o, "\"pid\":%d,\"uptime_s\":%llu,\"joined\":%s,\"n_estimate\":%.1f,",
		   (int)getpid(), (unsigned long long)((now - n->start_ms) / 1000),
		   n->ring.joined ? "true" : "false", n->ring.n_estimate);
	ctl_json_listen(o, n);
	if (n->tap.fd >= 0)
		buf_printf(o, "\"interface\":{\"name\":\"%s\",\"device\":\"%s\",\"mtu\":%d,\"offload\":%s,"
			   "\"tso_frames\":%llu,\"tso_segments\":%llu,\"gro_frames\":%llu,\"gro_segments\":%llu},",
			   n->tap.name, n->tap.veth ? "veth" : "tap", n->ip.mtu, n->tap.vnet ? "true" : "false", (unsigned long long)n->tap.tso_frames,
			   (unsigned long long)n->tap.tso_segments, (unsigned long long)n->tap.gro_frames,
			   (unsigned long long)n->tap.gro_segments);
	else
		buf_printf(o, "\"interface\":null,");
	buf_printf(o, "\"mode\":\"%s\",\"security\":\"%s\",\"ciphers\":[", n->tap.ns_fd[0] >= 0 ? "ns" :
		   n->tap.fd >= 0 ? "tap" : n->lw.started ? "user" : "none", sec_mode_names[n->sec.mode]);
	for (int c = SEC__CIPHER_END - 1, first = 1; c >= 0 && n->sec.mode != SEC_INSECURE; c--)
		if (n->sec.ciphers & (1u << c)) {
			buf_printf(o, "%s\"%s\"", first ? "" : ",", sec_cipher_names[c]);
			first = 0;
		}
	buf_printf(o, "],");
	if (n->sec.mode == SEC_CERT)
		buf_printf(o, "\"cert_expires\":%lld,\"cert_expiring\":%s,",
			   (long long)n->sec.ctx->own_grant.not_after_s,
			   sec_own_expiring(&n->sec, (int64_t)time(NULL)) ? "true" : "false");
	const struct ring_shortcuts *sc = &n->ring.sc;
	buf_printf(o, "\"shortcuts\":{\"pps\":%u,\"max\":%u,\"idle_s\":%llu,\"opened\":%llu,\"idle\":%llu,"
		   "\"trimmed\":%llu,\"refused\":%llu},", sc->pps, sc->max, (unsigned long long)(sc->idle_ms / 1000),
		   (unsigned long long)sc->opened, (unsigned long long)sc->idled,
		   (unsigned long long)sc->trimmed, (unsigned long long)sc->refused);
	if (n->lw.socks_fd >= 0) {
		char sip[16];
		buf_ip_str(n->lw.socks.ip, sip);
		buf_printf(o, "\"socks\":\"%s:%u\",\"relays\":%u,", sip, n->lw.socks.port, n->lw.n_relays);
	}
	buf_printf(o, "\"ip_traffic\":{\"tx_packets\":%llu,\"rx_packets\":%llu,\"tx_bytes\":%llu,"
		   "\"rx_bytes\":%llu},", (unsigned long long)n->ip.tx_packets, (unsigned long long)n->ip.rx_packets,
		   (unsigned long long)n->ip.tx_bytes, (unsigned long long)n->ip.rx_bytes);
	buf_printf(o, "\"dht_records\":%u,\"dht_pending\":%u,\"ip_map\":%u,\"nat\":\"%s\",\"endpoints\":[",
		   n->dht.n_records, n->dht.n_pending, n->ip.n_cache, nat_kind_names[nat_classify(n)]);
	for (unsigned i = 0; i < n->self.n_endpoints; i++) {
		char uri[40];
		link_endpoint_uri(&n->self.endpoints[i], uri);
		buf_printf(o, "%s\"%s\"", i ? "," : "", uri);
	}
	buf_printf(o, "],");
	buf_printf(o, "\"connections\":[");
	bool first = true;
	for (const struct link *l = n->links; l; l = l->next) {
		if (l->state == LINK_CLOSED)
			continue;
		buf_printf(o, first ? "" : ",");
		ctl_json_link(o, l, now);
		first = false;
	}
	buf_printf(o, "],\"counters\":{\"routed\":%llu,\"delivered\":%llu,\"relayed_packets\":%llu,"
		   "\"relayed_bytes\":%llu},\"drops\":{",
		   (unsigned long long)n->counters_routed, (unsigned long long)n->counters_delivered,
		   (unsigned long long)n->relayed_packets, (unsigned long long)n->relayed_bytes);
	for (int i = 0; i < DROP__COUNT; i++)
		buf_printf(o, "%s\"%s\":%llu", i ? "," : "", drop_names[i],
			   (unsigned long long)n->drops.count[i]);
	buf_printf(o, "}}\n");
}

static void ctl_text_link(struct buf_str *o, const struct link *l)
{
	char addr[13] = "?", ip[16] = "-", uri[40], rtt[16] = "-";
	if (l->proto == PROTO_RELAY) {
		char via[16];
		ctl_relay_name(l, via);
		snprintf(uri, sizeof uri, "relay via %s", via);
	} else {
		link_uri(l, uri);
	}
	if (l->peer_known)
		link_addr_short(&l->peer.addr, addr);
	if (l->peer_known && l->peer.vip)
		buf_ip_str(l->peer.vip, ip);
	if (l->rtt_ms >= 0)
		snprintf(rtt, sizeof rtt, "%.3f", l->rtt_ms);
	char why[32] = "";
	double pps = l->peer_known ? ring_sc_rate(l->node, &l->peer.addr) : -1;
	if ((l->local_roles | l->peer_roles) & ROLE_SHORTCUT)
		snprintf(why, sizeof why, pps >= 0 ? "  %.0f pkt/s" : "  (peer's)", pps);
	if (l->state == LINK_UP && ring_link_slow(l->node, l))
		snprintf(why + strlen(why), sizeof why - strlen(why), "  slow");
	buf_printf(o, "  %-8s %-12s %-15s %-26s %-11s %3s %8s %9llu %9llu%s\n",
		   ring_role_main(l->local_roles | l->peer_roles), addr, ip, uri,
		   link_state_names[l->state], l->initiator ? "out" : "in", rtt,
		   (unsigned long long)l->tx_packets, (unsigned long long)l->rx_packets, why);
}

/* Our certificate's end, with a warning within SEC_EXPIRY_WARN_S. */
static void ctl_text_cert(struct buf_str *o, const struct node *n)
{
	const struct sec_grant *g = &n->sec.ctx->own_grant;
	int64_t now_s = (int64_t)time(NULL);
	time_t end = (time_t)g->not_after_s;
	struct tm tm;
	char when[32], span[32];
	gmtime_r(&end, &tm);
	strftime(when, sizeof when, "%Y-%m-%d %H:%M UTC", &tm);
	sec_span_str(g->not_after_s - now_s, span);
	buf_printf(o, "cert      %s, ends %s", g->name[0] ? g->name : "(no name)", when);
	if (sec_grant_expired(g, now_s))
		buf_printf(o, " -- WARNING: expired, peers refuse it");
	else if (sec_own_expiring(&n->sec, now_s))
		buf_printf(o, " -- WARNING: in %s", span);
	buf_printf(o, "\n");
}

static void ctl_status_text(struct node *n, struct buf_str *o)
{
	char addr[2 * RING_ADDR_BYTES + 1], ip[20] = "none (router only)";
	uint64_t now = ev_now(&n->loop);
	ring_addr_hex(&n->self.addr, addr);
	if (n->self.vip)
		buf_ip_str(n->self.vip, ip);
	buf_printf(o, "address   %s\nip        %s\nuptime    %llu s\nring      %s, about %.0f nodes\n",
		   addr, ip, (unsigned long long)((now - n->start_ms) / 1000),
		   n->ring.joined ? "joined" : "joining", n->ring.n_estimate);
	for (unsigned i = 0; i < n->n_listeners; i++) {
		char uri[40];
		struct endpoint e = link_endpoint_of(n->listeners[i].proto, &n->listeners[i].sa);
		link_endpoint_uri(&e, uri);
		buf_printf(o, "listen    %s\n", uri);
	}
	if (n->tap.fd >= 0)
		buf_printf(o, "interface %s%s, mtu %d; ip packets out %llu, in %llu\n", n->tap.name,
			   n->tap.ns_fd[0] < 0 ? "" : n->tap.veth ? " (namespace, veth: no /dev/net/tun for us)" :
			   " (namespace, tap)", n->ip.mtu,
			   (unsigned long long)n->ip.tx_packets, (unsigned long long)n->ip.rx_packets);
	if (n->sec.mode == SEC_CERT)
		ctl_text_cert(o, n);
	buf_printf(o, "nat       %s\nendpoints", nat_kind_names[nat_classify(n)]);
	for (unsigned i = 0; i < n->self.n_endpoints; i++) {
		char uri[40];
		link_endpoint_uri(&n->self.endpoints[i], uri);
		buf_printf(o, " %s", uri);
	}
	buf_printf(o, "\n\nconnections (%u)\n  %-8s %-12s %-15s %-26s %-11s %3s %8s %9s %9s\n",
		   n->n_links, "TYPE", "ADDRESS", "IP", "PATH", "STATE", "DIR", "RTT ms", "TX pkts", "RX pkts");
	for (const struct link *l = n->links; l; l = l->next)
		if (l->state != LINK_CLOSED)
			ctl_text_link(o, l);
	const struct ring_shortcuts *sc = &n->ring.sc;
	if (sc->pps)
		buf_printf(o, "\nshortcuts over %u pkt/s, at most %u, closed after %llu s idle; opened %llu, "
			   "idle %llu, trimmed %llu, refused %llu\n", sc->pps, sc->max,
			   (unsigned long long)(sc->idle_ms / 1000), (unsigned long long)sc->opened,
			   (unsigned long long)sc->idled, (unsigned long long)sc->trimmed,
			   (unsigned long long)sc->refused);
	else
		buf_printf(o, "\nshortcuts off (--shortcut-pps 0)\n");
	if (n->relayed_packets)
		buf_printf(o, "\nrelayed   %llu packets, %llu bytes for peers without a direct path\n",
			   (unsigned long long)n->relayed_packets, (unsigned long long)n->relayed_bytes);
	buf_printf(o, "\ndrops    ");
	bool any = false;
	for (int i = 0; i < DROP__COUNT; i++)
		if (n->drops.count[i]) {
			buf_printf(o, " %s=%llu", drop_names[i], (unsigned long long)n->drops.count[i]);
			any = true;
		}
	buf_printf(o, "%s\n", any ? "" : " none");
}

static void ctl_cmd_ping(struct ctl_client *c, const char *target, const char *timeout)
{
	struct ctl *ctl = c->ctl;
	ring_addr dst;
	char *end;
	long ms = timeout ? strtol(timeout, &end, 10) : -1;
	if (!target || ctl_parse_target(target, &dst) < 0 || ms <= 0 ||
	    ms > CTL_PING_TIMEOUT_MAX_MS || *end) {
		buf_printf(&c->out, "error usage: ping TARGET TIMEOUT_MS\n");
		ctl_client_flush(c);
		return;
	}
	c->ping_id = ++ctl->next_ping_id ? ctl->next_ping_id : ++ctl->next_ping_id;
	ev_timer_arm(&ctl->node->loop, &c->timer, (uint64_t)ms);
	ring_echo_send(ctl->node, &dst, c->ping_id);
}

static void ctl_dht_done(struct node *n, void *arg, const struct wire_dht *reply)
{
	struct ctl_client *c = arg;
	(void)n;
	if (!reply) {
		buf_printf(&c->out, "timeout\n");
	} else if (reply->status != DHT_OK) {
		buf_printf(&c->out, "error %s\n", dht_status_names[reply->status]);
	} else if (reply->owner.b[0] || reply->value_len || reply->ttl_s) {
		char owner[2 * RING_ADDR_BYTES + 1], *hex = malloc(2u * reply->value_len + 1);
		ring_addr_hex(&reply->owner, owner);
		if (hex) {
			buf_hex(reply->value, reply->value_len, hex);
			buf_printf(&c->out, "value %u %s %s\n", reply->ttl_s, owner, hex);
			free(hex);
		}
	} else {
		buf_printf(&c->out, "ok\n");
	}
	ctl_client_flush(c);
}

/* A write's OK reply carries the stored record (for the signature check):
 * the user asked for "ok". */
static void ctl_dht_written(struct node *n, void *arg, const struct wire_dht *reply)
{
	struct ctl_client *c = arg;
	if (!reply || reply->status != DHT_OK)
		return ctl_dht_done(n, arg, reply);
	buf_printf(&c->out, "ok\n");
	ctl_client_flush(c);
}

/* "dht get KEY" | "dht put|create TTL KEY HEXVALUE" */
static void ctl_cmd_dht(struct ctl_client *c, char **a, int na)
{
	struct node *n = c->ctl->node;
	uint8_t value[DHT_VALUE_MAX_BYTES];
	size_t vlen = 0;
	long ttl = 0;
	int rc = -EINVAL;
	if (na == 2 && !strcmp(a[1], "get")) {
		rc = dht_request(n, DHT_GET, a[2], NULL, 0, 0, ctl_dht_done, c);
	} else if (na == 4 && (!strcmp(a[1], "put") || !strcmp(a[1], "create"))) {
		ttl = strtol(a[2], NULL, 10);
		vlen = strlen(a[4]) / 2;
		if (vlen <= sizeof value && buf_unhex(a[4], value, vlen) && ttl > 0)
			rc = dht_request(n, !strcmp(a[1], "put") ? DHT_PUT : DHT_CREATE, a[3], value, vlen,
					 (uint32_t)ttl, ctl_dht_written, c);
	}
	if (rc < 0) {
		buf_printf(&c->out, "error %s\n", rc == -EBUSY ? "busy" :
			   rc == -EMSGSIZE ? "too large for one packet (value plus certificate)" : "usage");
		ctl_client_flush(c);
	}
}

/* "route add|del A.B.C.D/N": start or stop routing for a prefix. */
static void ctl_cmd_route(struct ctl_client *c, const char *op, const char *cidr)
{
	struct node *n = c->ctl->node;
	char ip[20], tail;
	unsigned len;
	struct in_addr ia;
	int rc = -EINVAL;
	if (sscanf(cidr, "%19[0-9.]/%u%c", ip, &len, &tail) == 2 && len <= 32 && inet_pton(AF_INET, ip, &ia) == 1 &&
	    (!strcmp(op, "add") || !strcmp(op, "del"))) {
		uint32_t net = ntohl(ia.s_addr) & (len ? ~0u << (32 - len) : 0);
		char key[24];
		snprintf(key, sizeof key, "ip:%s", ip);
		if (n->sec.mode == SEC_CERT && !strcmp(op, "add") && !dht_key_granted(&n->sec.ctx->own_grant, key))
			rc = -EPERM;
		else
			rc = ip_route_set(n, net, (uint8_t)len, !strcmp(op, "add"));
	}
	buf_printf(&c->out, rc == 0 ? "ok\n" : rc == -ENOENT ? "error not routed here\n" :
		   rc == -ENOSPC ? "error too many routes, or wider than /24\n" :
		   rc == -EPERM ? "error not granted by this node's certificate\n" : "error usage\n");
	ctl_client_flush(c);
}

/* What a link is on a map.  Today the main ring role; a relayed link (when
 * section 09 has them) will say "relayed" here, and the map draws any kind. */
static const char *ctl_link_kind(const struct link *l)
{
	if (l->proto == PROTO_RELAY)
		return "relayed";       /* drawn as such whatever its role */
	return ring_role_main(l->local_roles | l->peer_roles);
}

/* "map": the ring as this node knows it, one line per node for ipop map:
 *   self ADDRESS IP|- NAME|-
 *   link KIND ADDRESS IP|-      (one per up link) */
static void ctl_map(struct node *n, struct buf_str *o)
{
	char addr[2 * RING_ADDR_BYTES + 1], ip[16] = "-";
	ring_addr_hex(&n->self.addr, addr);
	if (n->self.vip)
		buf_ip_str(n->self.vip, ip);
	buf_printf(o, "self %s %s %s\n", addr, ip, n->name[0] ? n->name : "-");
	for (const struct link *l = n->links; l; l = l->next) {
		if (l->state != LINK_UP || !l->peer_known)
			continue;
		ring_addr_hex(&l->peer.addr, addr);
		snprintf(ip, sizeof ip, "-");
		if (l->peer.vip)
			buf_ip_str(l->peer.vip, ip);
		buf_printf(o, "link %s %s %s\n", ctl_link_kind(l), addr, ip);
	}
}

/* One line and fds beside it (SCM_RIGHTS). */
static int ctl_send_fds(int fd, const char *line, const int *fds, unsigned nfds)
{
	char cbuf[CMSG_SPACE(2 * sizeof(int))] = { 0 };
	struct iovec iov = { .iov_base = (void *)line, .iov_len = strlen(line) };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			     .msg_controllen = CMSG_SPACE(nfds * sizeof(int)) };
	struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
	if (nfds > 2)
		return -1;
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
	memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
	return sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT) == (ssize_t)iov.iov_len ? 0 : -1;
}

/* "ns": the namespace-mode node's user and network namespaces, as two fds
 * beside the line "ok", for ipop exec to join.  Only for our own uid: the
 * socket is 0600, but --control may put it anywhere; and not for root
 * either, whose process in a user namespace the user owns would keep its
 * real uid 0 under the user's ptrace (a way to root).  Root runs ipop exec
 * as the user (setpriv, su). */
static void ctl_cmd_ns(struct ctl_client *c)
{
	struct node *n = c->ctl->node;
	struct ucred cred;
	socklen_t len = sizeof cred;
	if (n->tap.ns_fd[0] < 0)
		buf_printf(&c->out, "error this node has no namespace (start it with --mode ns)\n");
	else if (getsockopt(c->fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0 || cred.uid != geteuid())
		buf_printf(&c->out, "error the namespace is for its owner (uid %u) only: run ipop exec as that user\n",
			   (unsigned)geteuid());
	else if (ctl_send_fds(c->fd, "ok\n", n->tap.ns_fd, 2) < 0)
		buf_printf(&c->out, "error cannot pass the namespace: %s\n", strerror(errno));
	ctl_client_flush(c);            /* closes: after "ok" there is nothing to send */
}

static void ctl_execute(struct ctl_client *c, char *line)
{
	char *save = NULL, *a[6] = { 0 };
	int na = 0;
	for (char *t = strtok_r(line, " \t\r", &save); t && na < 6; t = strtok_r(NULL, " \t\r", &save))
		a[na++] = t;
	char *cmd = a[0], *a1 = a[1], *a2 = a[2];
	if (cmd && !strcmp(cmd, "dht") && na >= 2) {
		ctl_cmd_dht(c, a, na - 1);
		return;
	}
	if (cmd && !strcmp(cmd, "route") && na == 3) {
		ctl_cmd_route(c, a[1], a[2]);
		return;
	}
	if (cmd && !strcmp(cmd, "status") && a1 && !strcmp(a1, "json"))
		ctl_status_json(c->ctl->node, &c->out);
	else if (cmd && !strcmp(cmd, "status"))
		ctl_status_text(c->ctl->node, &c->out);
	else if (cmd && !strcmp(cmd, "map"))
		ctl_map(c->ctl->node, &c->out);
	else if (cmd && !strcmp(cmd, "ns")) {
		ctl_cmd_ns(c);
		return;
	}
	else if (cmd && !strcmp(cmd, "ping")) {
		ctl_cmd_ping(c, a1, a2);
		return;
	} else
		buf_printf(&c->out, "error unknown command\n");
	ctl_client_flush(c);
}

static void ctl_metrics_request(struct ctl_client *c);

static void ctl_client_readable(struct ctl_client *c)
{
	ssize_t r = recv(c->fd, c->in + c->in_len, sizeof c->in - 1 - c->in_len, MSG_DONTWAIT);
	if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
		ctl_client_close(c);
		return;
	}
	if (r < 0)
		return;
	c->in_len += (size_t)r;
	c->in[c->in_len] = 0;
	if (c->http)
		return ctl_metrics_request(c);
	char *nl = strchr(c->in, '\n');
	if (nl) {
		*nl = 0;
		ev_fd_watch(&c->ctl->node->loop, c->fd, 0, ctl_client_event, c);
		ctl_execute(c, c->in);
	} else if (c->in_len == sizeof c->in - 1) {
		buf_printf(&c->out, "error line too long\n");
		ctl_client_flush(c);
	}
}

static void ctl_client_event(struct ev_loop *loop, int fd, void *arg, uint32_t events)
{
	struct ctl_client *c = arg;
	(void)loop;
	(void)fd;
	if (events & EPOLLOUT)
		ctl_client_flush(c);
	else if (events & (EPOLLIN | EPOLLHUP | EPOLLERR))
		ctl_client_readable(c);
}

static int64_t ctl_client_timeout(struct ev_loop *loop, struct ev_timer *t)
{
	struct ctl_client *c = container_of(t, struct ctl_client, timer);
	(void)loop;
	if (c->fd < 0)
		return EV_TIMER_STOP;
	if (c->ping_id) {
		c->ping_id = 0;
		buf_printf(&c->out, "timeout\n");
		ctl_client_flush(c);
	} else {
		ctl_client_close(c);
	}
	return EV_TIMER_STOP;
}

static void ctl_echo_reply(struct node *n, uint32_t id, uint64_t rtt_us, uint8_t hops)
{
	struct ctl *ctl = n->ctl;
	for (unsigned i = 0; i < CTL_CLIENTS_MAX; i++) {
		struct ctl_client *c = &ctl->clients[i];
		if (c->fd < 0 || c->ping_id != id)
			continue;
		c->ping_id = 0;
		ev_timer_cancel(&n->loop, &c->timer);
		buf_printf(&c->out, "reply %u %llu\n", hops, (unsigned long long)rtt_us);
		ctl_client_flush(c);
		return;
	}
}

/* A new metrics client is coming: if CTL_METRICS_CLIENTS_MAX are connected,
 * close the oldest. */
static void ctl_metrics_make_room(struct ctl *ctl)
{
	struct ctl_client *oldest = NULL;
	unsigned count = 0;
	for (unsigned i = 0; i < CTL_CLIENTS_MAX; i++) {
		struct ctl_client *c = &ctl->clients[i];
		if (c->fd < 0 || !c->http)
			continue;
		count++;
		if (!oldest || c->since_ms < oldest->since_ms)
			oldest = c;
	}
	if (count < CTL_METRICS_CLIENTS_MAX)
		return;
	struct node *n = ctl->node;
	log_drop(&n->drops, DROP_LOCAL_EVICTED, ev_now(&n->loop), "metrics client");
	ctl_client_close(oldest);
}

static void ctl_accept(struct ev_loop *loop, int lfd, void *arg, uint32_t events)
{
	struct ctl *ctl = arg;
	(void)events;
	int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (fd < 0) {
		ev_accept_failed(loop, lfd, &ctl->node->drops, DROP_FD_LIMIT,
				 lfd == ctl->metrics_fd ? "metrics accept" : "control accept");
		return;
	}
	if (lfd == ctl->metrics_fd)
		ctl_metrics_make_room(ctl);
	for (unsigned i = 0; i < CTL_CLIENTS_MAX; i++) {
		struct ctl_client *c = &ctl->clients[i];
		if (c->fd >= 0)
			continue;
		if (ev_fd_watch(loop, fd, EPOLLIN, ctl_client_event, c) < 0)
			break;
		c->fd = fd;
		c->in_len = 0;
		c->out_off = 0;
		c->http = lfd == ctl->metrics_fd;
		c->since_ms = ev_now(loop);
		ev_timer_arm(loop, &c->timer, c->http ? CTL_METRICS_TIMEOUT_MS : CTL_IDLE_TIMEOUT_MS);
		return;
	}
	close(fd);                      /* table full: the CLI sees EOF and says so */
}

/* ---- --metrics: counters for Prometheus over HTTP/1.0 ------------------
 * A scraper connects, sends "GET /metrics HTTP/1.x" and headers, and reads
 * the text exposition format (version 0.0.4) until we close.  Metrics
 * clients share the control clients' table, CTL_METRICS_CLIENTS_MAX of its
 * slots at most (the oldest goes for a new one), their non-blocking writer
 * and their timer; a request larger
 * than one control line, or slower than CTL_METRICS_TIMEOUT_MS, is dropped.
 * To add a metric: one ctl_metric call in ctl_metrics_text. */

__attribute__((format(printf, 5, 6)))
static void ctl_metric(struct buf_str *o, const char *name, const char *type, const char *help,
		       const char *fmt, ...)
{
	char line[256];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(line, sizeof line, fmt, ap);
	va_end(ap);
	if (help)
		buf_printf(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
	buf_printf(o, "%s%s\n", name, line);
}

static void ctl_metrics_links(struct node *n, struct buf_str *o)
{
	uint64_t tx = 0, rx = 0, txb = 0, rxb = 0;
	static const char *const kinds[] = { "near", "far", "shortcut", "relay", "relayed", "leaf", "none" };
	unsigned by_kind[ARRAY_LEN(kinds)] = { 0 }, up = 0;
	for (const struct link *l = n->links; l; l = l->next) {
		tx += l->tx_packets, rx += l->rx_packets, txb += l->tx_bytes, rxb += l->rx_bytes;
		if (l->state != LINK_UP)
			continue;
		up++;
		for (unsigned k = 0; k < ARRAY_LEN(kinds); k++)
			by_kind[k] += !strcmp(ctl_link_kind(l), kinds[k]);
	}
	ctl_metric(o, "ipop_links", "gauge", "Links by state (up or in a handshake).", "{state=\"up\"} %u", up);
	ctl_metric(o, "ipop_links", "gauge", NULL, "{state=\"handshake\"} %u", n->n_links - up);
	for (unsigned k = 0; k < ARRAY_LEN(kinds); k++)
		ctl_metric(o, "ipop_links_up", "gauge", k ? NULL : "Up links by kind.", "{kind=\"%s\"} %u", kinds[k],
			   by_kind[k]);
	ctl_metric(o, "ipop_link_packets_total", "counter", "Overlay packets on current links.",
		   "{direction=\"tx\"} %llu", (unsigned long long)tx);
	ctl_metric(o, "ipop_link_packets_total", "counter", NULL, "{direction=\"rx\"} %llu", (unsigned long long)rx);
	ctl_metric(o, "ipop_link_bytes_total", "counter", "Overlay bytes on current links.",
		   "{direction=\"tx\"} %llu", (unsigned long long)txb);
	ctl_metric(o, "ipop_link_bytes_total", "counter", NULL, "{direction=\"rx\"} %llu", (unsigned long long)rxb);
}

static void ctl_metrics_text(struct node *n, struct buf_str *o)
{
	static const char *const rcodes[] = { "noerror", "formerr", "servfail", "nxdomain", "notimp", "refused" };
	ctl_metric(o, "ipop_uptime_seconds", "gauge", "Seconds since the node started.", " %llu",
		   (unsigned long long)((ev_now(&n->loop) - n->start_ms) / 1000));
	ctl_metric(o, "ipop_ring_joined", "gauge", "1 once the node has neighbours on both sides.", " %d",
		   n->ring.joined);
	ctl_metric(o, "ipop_ring_size_estimate", "gauge", "Nodes in the ring, estimated from neighbour gaps.",
		   " %.1f", n->ring.n_estimate);
	ctl_metrics_links(n, o);
	ctl_metric(o, "ipop_routed_total", "counter", "Overlay packets forwarded for others.", " %llu",
		   (unsigned long long)n->counters_routed);
	ctl_metric(o, "ipop_delivered_total", "counter", "Overlay packets delivered here.", " %llu",
		   (unsigned long long)n->counters_delivered);
	ctl_metric(o, "ipop_ip_packets_total", "counter", "Virtual IP packets.", "{direction=\"tx\"} %llu",
		   (unsigned long long)n->ip.tx_packets);
	ctl_metric(o, "ipop_ip_packets_total", "counter", NULL, "{direction=\"rx\"} %llu",
		   (unsigned long long)n->ip.rx_packets);
	ctl_metric(o, "ipop_ip_bytes_total", "counter", "Virtual IP bytes.", "{direction=\"tx\"} %llu",
		   (unsigned long long)n->ip.tx_bytes);
	ctl_metric(o, "ipop_ip_bytes_total", "counter", NULL, "{direction=\"rx\"} %llu",
		   (unsigned long long)n->ip.rx_bytes);
	ctl_metric(o, "ipop_dht_records", "gauge", "DHT records held here.", " %u", n->dht.n_records);
	ctl_metric(o, "ipop_dht_pending", "gauge", "DHT requests waiting for a reply.", " %u", n->dht.n_pending);
	ctl_metric(o, "ipop_ip_leased", "gauge", "1 while --ip auto holds its lease.", " %d",
		   n->ip.lease.on && n->self.vip != 0);
	for (unsigned i = 0; i < ARRAY_LEN(rcodes); i++)
		ctl_metric(o, "ipop_dns_answers_total", "counter", i ? NULL : "*.ipop resolver answers by rcode.",
			   "{rcode=\"%s\"} %llu", rcodes[i], (unsigned long long)n->ip.dns_answers[i]);
	for (int i = 0; i < DROP__COUNT; i++)
		ctl_metric(o, "ipop_drops_total", "counter", i ? NULL : "Dropped packets by reason.",
			   "{reason=\"%s\"} %llu", drop_names[i], (unsigned long long)n->drops.count[i]);
	if (n->lw.started)
		ctl_metric(o, "ipop_relays", "gauge", "User mode TCP relays open.", " %u", n->lw.n_relays);
}

/* The request so far: answer once its headers end; GET / or /metrics only. */
static void ctl_metrics_request(struct ctl_client *c)
{
	struct buf_str body = { 0 };
	if (!strstr(c->in, "\r\n\r\n") && !strstr(c->in, "\n\n")) {
		if (c->in_len == sizeof c->in - 1)
			ctl_client_close(c);    /* headers larger than we take */
		return;
	}
	ev_fd_watch(&c->ctl->node->loop, c->fd, 0, ctl_client_event, c);
	bool get = !strncmp(c->in, "GET ", 4), ok = get && (!strncmp(c->in + 4, "/metrics", 8) ||
							    !strncmp(c->in + 4, "/ ", 2));
	if (ok)
		ctl_metrics_text(c->ctl->node, &body);
	else
		buf_printf(&body, "%s\n", get ? "not found: try /metrics" : "only GET");
	buf_printf(&c->out, "HTTP/1.0 %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n%s",
		   ok ? "200 OK" : get ? "404 Not Found" : "405 Method Not Allowed",
		   ok ? "text/plain; version=0.0.4; charset=utf-8" : "text/plain", body.len, body.s ? body.s : "");
	buf_str_free(&body);
	ctl_client_flush(c);
}

static int ctl_metrics_open(struct ctl *ctl, const struct endpoint *ep, char *err, size_t errlen)
{
	ctl->metrics_fd = socks_listen_tcp(ctl->node, ep, ctl_accept, ctl, "--metrics", err, errlen);
	return ctl->metrics_fd < 0 ? -1 : 0;
}

/* /tmp is shared: another user may have made ipop-UID before us, as a
 * directory of theirs (they could swap our socket for theirs, or answer
 * our `ipop status` and read what `ipop dht put` sends), a symbolic link,
 * or a directory anyone may write to.  Only a directory of our own that no
 * one else may write to will do; a node (create) makes it, or tightens one
 * that others may only read or enter to 0700.  (The sticky /tmp lets no
 * one else rename or remove our entry once checked.)  On failure err says
 * why. */
static int ctl_dir_check(const char *dir, bool create, char *err, size_t errlen)
{
	struct stat st;
	const char *fix = "remove it, or use --control PATH";
	bool made = !create || mkdir(dir, 0700) == 0 || errno == EEXIST;
	int seen = made ? lstat(dir, &st) : -1;
	if (!create && seen < 0 && errno == ENOENT)
		return 0;               /* no node has run: connecting says so */
	if (!made)
		snprintf(err, errlen, "cannot create the control socket directory %s: %s (use --control PATH)",
			 dir, strerror(errno));
	else if (seen < 0)
		snprintf(err, errlen, "cannot check the control socket directory %s: %s (use --control PATH)",
			 dir, strerror(errno));
	else if (S_ISLNK(st.st_mode) || !S_ISDIR(st.st_mode))
		snprintf(err, errlen, "the control socket directory %s is %s, not a directory of ours: %s",
			 dir, S_ISLNK(st.st_mode) ? "a symbolic link" : "a file", fix);
	else if (st.st_uid != getuid())
		snprintf(err, errlen, "the control socket directory %s belongs to uid %u, not to us (uid %u): %s",
			 dir, (unsigned)st.st_uid, (unsigned)getuid(), "another user may have made it; use --control PATH");
	else if (st.st_mode & 022)
		snprintf(err, errlen, "the control socket directory %s is writable by others (mode %04o): %s",
			 dir, (unsigned)(st.st_mode & 07777), fix);
	else if (create && (st.st_mode & 077) && chmod(dir, 0700) < 0)
		snprintf(err, errlen, "cannot make the control socket directory %s private: %s (use --control PATH)",
			 dir, strerror(errno));
	else
		return 0;
	return -1;
}

/* The per-user default: $XDG_RUNTIME_DIR/ipop.sock, else /tmp/ipop-UID/ipop.sock,
 * once ctl_dir_check passed (create: a node starting makes the directory). */
static int ctl_default_path(char *out, size_t cap, bool create, char *err, size_t errlen)
{
	const char *rt = getenv("XDG_RUNTIME_DIR");
	if (rt && *rt) {
		snprintf(out, cap, "%s/ipop.sock", rt);
		return 0;
	}
	char dir[64];
	snprintf(dir, sizeof dir, "/tmp/ipop-%u", (unsigned)getuid());
	if (ctl_dir_check(dir, create, err, errlen) < 0)
		return -1;
	snprintf(out, cap, "%s/ipop.sock", dir);
	return 0;
}

static int ctl_connect(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof sa.sun_path)
		return -ENAMETOOLONG;
	strcpy(sa.sun_path, path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
		int e = errno;
		close(fd);
		return -e;
	}
	return fd;
}

/* Bind the control socket; refuse if a live node already answers there.
 * On failure err says which call failed and why. */
static int ctl_open(struct ctl *ctl, struct node *n, const char *path, char *err, size_t errlen)
{
	*ctl = (struct ctl){ .node = n, .fd = -1, .metrics_fd = -1 };
	for (unsigned i = 0; i < CTL_CLIENTS_MAX; i++) {
		ctl->clients[i] = (struct ctl_client){ .ctl = ctl, .fd = -1 };
		ev_timer_init(&ctl->clients[i].timer, ctl_client_timeout);
	}
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof sa.sun_path) {
		snprintf(err, errlen, "control socket path too long: %s", path);
		return -ENAMETOOLONG;
	}
	int live = ctl_connect(path);
	if (live >= 0) {
		close(live);
		snprintf(err, errlen, "another ipop node is running on control socket %s "
			 "(stop it, or give this one --control PATH)", path);
		return -EADDRINUSE;
	}
	unlink(path);                   /* a stale socket from a crashed node */
	strcpy(sa.sun_path, path);
	ctl->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	mode_t old = umask(0177);
	int rc = ctl->fd < 0 ? -1 : bind(ctl->fd, (struct sockaddr *)&sa, sizeof sa);
	umask(old);
	if (rc < 0 || listen(ctl->fd, 16) < 0 ||
	    ev_fd_watch(&n->loop, ctl->fd, EPOLLIN, ctl_accept, ctl) < 0) {
		snprintf(err, errlen, "cannot open control socket %s: %s", path, strerror(errno));
		if (ctl->fd >= 0)
			close(ctl->fd);
		ctl->fd = -1;
		return -EIO;
	}
	snprintf(ctl->path, sizeof ctl->path, "%s", path);
	n->ctl = ctl;
	n->up.echo_reply = ctl_echo_reply;
	return 0;
}

static void ctl_close(struct ctl *ctl)
{
	for (unsigned i = 0; i < CTL_CLIENTS_MAX; i++)
		if (ctl->clients[i].fd >= 0)
			ctl_client_close(&ctl->clients[i]);
	if (ctl->fd >= 0) {
		ev_fd_forget(&ctl->node->loop, ctl->fd);
		close(ctl->fd);
		unlink(ctl->path);
	}
	if (ctl->metrics_fd >= 0) {
		ev_fd_forget(&ctl->node->loop, ctl->metrics_fd);
		close(ctl->metrics_fd);
	}
	ctl->fd = ctl->metrics_fd = -1;
}

/* ===================================================================== 15b sim_
 * `ipop simulate`: many nodes in one process, in virtual time, over an
 * in-memory network.  Each simulated node is a whole struct node running
 * the same link, ring and DHT code as `ipop up`, in insecure mode (no
 * X25519, no AEAD; handshakes, cookies, roles, keepalives all run).  Only
 * three things differ, each a hook the sections above already offer:
 *   transport  node->udp_send takes every datagram (link_udp_queue) and puts
 *              it in the delivery queue with the pair's latency (1-50 ms,
 *              fixed per pair, from the seed); delivery calls link_input.
 *   time       each node keeps its own ev_loop timer heap; the simulator
 *              keeps the nodes in a heap ordered by their earliest timer, and
 *              runs whichever comes first, a timer or a delivery, after
 *              setting that node's clock (loop.now_ms) to the virtual time.
 *   randomness each node's CTR-DRBG is seeded from (seed, node number), and
 *              the harness draws from its own splitmix64: a seed gives the
 *              same run, event for event.
 * Node i listens on 10.0.0.0 + i + 1, port SIM_PORT, and bootstraps from two
 * random nodes started before it, as tests/scale.py does.  The harness joins
 * N nodes at --join-rate, lets the ring settle, routes echo probes between
 * random pairs, puts DHT records, replaces --churn of the nodes per minute
 * for --duration s (alternately crashed and shut down), then reads the
 * records back and probes again.
 * To add a measurement: a field in struct sim_stats, a line in sim_report.
 * ========================================================================= */

enum {
	SIM_NODES_MAX = 4000000,        /* node numbers fit 10.0.0.0/8 with room */
	SIM_BASE_IP = 0x0A000000,       /* node i is 10.0.0.0 + i + 1 */
	SIM_PORT = 4000,
	SIM_FD = INT_MAX,               /* a simulated node's "socket": never a real fd, never used */
	SIM_LATENCY_MIN_MS = 1,
	SIM_LATENCY_SPAN_MS = 50,       /* one-way latency of a pair: 1..50 ms */
	SIM_SETTLE_MS = 15000,          /* after the last join, at most: see sim_settled */
	SIM_SETTLE_STEP_MS = 1000,
	SIM_WAIT_STEP_MS = 100,         /* checks for a measurement's last answer */
	SIM_PROBE_TIMEOUT_MS = 3000,    /* as tests/scale.py's pings */
	SIM_PROBE_SPREAD_MS = 2000,     /* a measurement's probes start over this long */
	SIM_IDLE_MS = 5000,             /* the idle-traffic window, at most */
	SIM_IDLE_NODE_S = 200000,       /* ... long enough for this many node-seconds */
	SIM_DHT_TTL_S = 3600,
	SIM_DHT_WAIT_MS = 3000,         /* after the puts, before churn: replicas pushed */
	SIM_JOIN_SECONDS_MAX = 20,      /* default join rate: N / 20 per s, at least 1000 */
	SIM_AFTER_CHURN_MS = 10000,     /* churn stops; then reads and probes */
	SIM_MEMBER_AGE_MS = 10000,      /* churn probes: both ends up this long */
	SIM_CHURN_PROBES_PER_S = 50,
	SIM_PROGRESS_MS = 5000,         /* virtual time between --progress lines */
	SIM_PKT_SMALL = 128,            /* datagram buffers kept for reuse: keepalives, roles */
	SIM_PKT_LARGE = 640,            /* handshakes, routed requests and replies */
	SIM_SLAB_NODES = 256,           /* nodes allocated at once: see sim_node_alloc */
};

struct sim;

struct sim_node {
	struct node n;
	struct sim *sim;
	struct sim_node *next_free;     /* on sim->free_nodes */
	uint32_t idx;
	uint64_t born_ms;
};

/* A datagram in flight; the queue is a min-heap on (when, seq). */
struct sim_pkt;

/* A heap entry carries its keys, so sifting reads the heap array only: with
 * 100 000 nodes, ~200 000 datagrams are in flight, and following each
 * entry's pointer to compare was a cache miss per level (14 % of the run). */
struct sim_qent {
	uint64_t when_ms, seq;
	struct sim_pkt *p;
};

struct sim_pkt {
	union {
		uint64_t when_ms;
		struct sim_pkt *next_free;      /* on a free list */
	};
	uint64_t seq;
	uint32_t from, to;
	uint16_t len, cap;
	uint8_t data[];
};

/* An echo probe: sent from src to dst, answered or not. */
struct sim_probe {
	uint32_t src, dst;
	uint64_t sent_ms;
	int hops;                       /* -1 until the reply */
	bool counted;                   /* churn: both ends alive throughout */
};

struct sim_stats {
	uint64_t control_pkts, keepalive_pkts, lost_pkts, bytes;
	uint64_t folded_pkts;           /* keepalives and their answers applied without a delivery */
	uint64_t handshakes;            /* HS_FINs sent: links made, duplicates and losers included */
};

struct sim_slot {
	uint64_t key;                   /* the node's earliest timer */
	uint32_t idx;
};

struct sim {
	uint64_t seed, rng;             /* splitmix64 state for the harness */
	uint64_t now_ms, seq;
	struct sim_node **nodes;        /* by number; NULL once gone */
	uint32_t n_nodes, cap, n_alive;
	uint32_t *alive;                /* numbers of live nodes, any order */
	uint32_t *alive_pos;            /* each number's slot in alive */
	struct sim_slot *heap;          /* nodes with timers, earliest first */
	uint32_t *heap_pos;             /* by number: slot in heap, or UINT32_MAX */
	uint32_t heap_len;
	struct sim_qent *q;             /* datagrams in flight: a min-heap on (when, seq) */
	size_t q_len, q_cap, q_peak;
	struct sim_pkt *free_small, *free_large;        /* malloc was a seventh of a 100k run */
	struct sim_node *slab, *free_nodes;             /* sim_node_alloc */
	unsigned slab_left;
	bool exact_keepalives;          /* --exact-keepalives: deliver every one as a datagram */
	struct sim_stats st;
	struct sim_probe *probes;
	uint32_t n_probes, probes_cap;
	char **dht_keys;
	uint32_t n_keys;
	bool *dht_found;                /* this read round's answers, by key */
	bool progress;                  /* --progress: a line on stderr per SIM_PROGRESS_MS */
	uint64_t next_progress_ms, t0_us;
	uint32_t dht_put_ok;
	uint32_t n_answered;            /* probes with a reply */
	uint32_t n_found;               /* this read round's records found */
	uint64_t events;
};

static uint64_t sim_proc_kb(const char *field);

/* --progress: where a long run is, on stderr (stdout keeps the report). */
static void sim_progress(struct sim *s)
{
	s->next_progress_ms = s->now_ms + SIM_PROGRESS_MS;
	fprintf(stderr, "ipop simulate: %.0f s virtual, %u nodes, %llu events, %zu in flight, RSS %llu kB, "
		"%.1f s wall\n", (double)s->now_ms / 1000, s->n_alive, (unsigned long long)s->events, s->q_len,
		(unsigned long long)sim_proc_kb("VmRSS:"), (double)(ev_clock_us() - s->t0_us) / 1e6);
}

static uint64_t sim_mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static uint64_t sim_rand(struct sim *s)
{
	s->rng += 0x9e3779b97f4a7c15ull;
	return sim_mix(s->rng);
}

static uint32_t sim_rand_below(struct sim *s, uint32_t n)
{
	return (uint32_t)(sim_rand(s) % n);
}

/* mbedTLS asks for entropy only when seeding (reseeding is switched off). */
static int sim_entropy(void *ctx, unsigned char *out, size_t len)
{
	uint64_t *st = ctx;
	for (size_t i = 0; i < len; i++) {
		if (i % 8 == 0)
			*st = sim_mix(*st);
		out[i] = (uint8_t)(*st >> (8 * (i % 8)));
	}
	return 0;
}

static int sim_rng_seed(struct sec_rng *r, uint64_t seed, uint32_t idx)
{
	uint64_t st = seed ^ sim_mix(idx + 1);
	static const char pers[] = "ipop sim rng";
	mbedtls_ctr_drbg_init(&r->drbg);
	if (mbedtls_ctr_drbg_seed(&r->drbg, sim_entropy, &st, (const unsigned char *)pers, sizeof pers - 1))
		return -EIO;
	mbedtls_ctr_drbg_set_reseed_interval(&r->drbg, INT_MAX);
	return 0;
}

/* ---- the node heap: each node keyed by its earliest timer --------------
 * Entries carry their key: comparing through the node structs would touch
 * two of them per step, and at 100,000 nodes every touch misses the cache. */

static uint64_t sim_node_key(const struct sim *s, uint32_t i)
{
	const struct ev_loop *l = &s->nodes[i]->n.loop;
	return l->heap_len ? l->heap[0]->when_ms : UINT64_MAX;
}

static bool sim_heap_less(const struct sim_slot *a, const struct sim_slot *b)
{
	return a->key < b->key || (a->key == b->key && a->idx < b->idx);
}

static void sim_heap_set(struct sim *s, uint32_t pos, struct sim_slot e)
{
	s->heap[pos] = e;
	s->heap_pos[e.idx] = pos;
}

static void sim_heap_fix(struct sim *s, uint32_t pos)
{
	struct sim_slot e = s->heap[pos];
	while (pos > 0 && sim_heap_less(&e, &s->heap[(pos - 1) / 2])) {
		sim_heap_set(s, pos, s->heap[(pos - 1) / 2]);
		pos = (pos - 1) / 2;
	}
	for (;;) {
		uint32_t c = 2 * pos + 1;
		if (c >= s->heap_len)
			break;
		if (c + 1 < s->heap_len && sim_heap_less(&s->heap[c + 1], &s->heap[c]))
			c++;
		if (!sim_heap_less(&s->heap[c], &e))
			break;
		sim_heap_set(s, pos, s->heap[c]);
		pos = c;
	}
	sim_heap_set(s, pos, e);
}

static void sim_heap_remove(struct sim *s, uint32_t i)
{
	uint32_t pos = s->heap_pos[i];
	if (pos == UINT32_MAX)
		return;
	s->heap_pos[i] = UINT32_MAX;
	struct sim_slot last = s->heap[--s->heap_len];
	if (last.idx == i)
		return;
	sim_heap_set(s, pos, last);
	sim_heap_fix(s, pos);
}

/* After a node ran: its earliest timer may have moved. */
static void sim_node_resched(struct sim *s, uint32_t i)
{
	uint32_t *pos = &s->heap_pos[i];
	uint64_t key = sim_node_key(s, i);
	if (key == UINT64_MAX) {
		sim_heap_remove(s, i);
		return;
	}
	if (*pos == UINT32_MAX)
		*pos = s->heap_len++;
	else if (s->heap[*pos].key == key)
		return;
	s->heap[*pos] = (struct sim_slot){ .key = key, .idx = i };
	sim_heap_fix(s, *pos);
}

/* ---- the network -------------------------------------------------------- */

static bool sim_q_less(const struct sim_qent *a, const struct sim_qent *b)
{
	return a->when_ms < b->when_ms || (a->when_ms == b->when_ms && a->seq < b->seq);
}

static int sim_q_push(struct sim *s, struct sim_pkt *p)
{
	if (s->q_len == s->q_cap) {
		size_t cap = s->q_cap ? s->q_cap * 2 : 4096;
		struct sim_qent *q = realloc(s->q, cap * sizeof *q);
		if (!q)
			return -ENOMEM;
		s->q = q;
		s->q_cap = cap;
	}
	struct sim_qent e = { .when_ms = p->when_ms, .seq = p->seq, .p = p };
	size_t i = s->q_len++;
	while (i > 0 && sim_q_less(&e, &s->q[(i - 1) / 2])) {
		s->q[i] = s->q[(i - 1) / 2];
		i = (i - 1) / 2;
	}
	s->q[i] = e;
	if (s->q_len > s->q_peak)
		s->q_peak = s->q_len;
	return 0;
}

static struct sim_pkt *sim_q_pop(struct sim *s)
{
	struct sim_pkt *top = s->q[0].p;
	struct sim_qent last = s->q[--s->q_len];
	size_t i = 0;
	for (;;) {
		size_t c = 2 * i + 1;
		if (c >= s->q_len)
			break;
		if (c + 1 < s->q_len && sim_q_less(&s->q[c + 1], &s->q[c]))
			c++;
		if (!sim_q_less(&s->q[c], &last))
			break;
		s->q[i] = s->q[c];
		i = c;
	}
	if (s->q_len)
		s->q[i] = last;
	return top;
}

static struct sockaddr_in sim_sockaddr(uint32_t idx)
{
	struct endpoint e = { .proto = PROTO_UDP, .ip = SIM_BASE_IP + idx + 1, .port = SIM_PORT };
	return link_sockaddr_of(&e);
}

/* One-way latency of a pair: fixed for the run, the same both ways. */
static uint64_t sim_latency_ms(const struct sim *s, uint32_t a, uint32_t b)
{
	uint64_t lo = a < b ? a : b, hi = a < b ? b : a;
	return SIM_LATENCY_MIN_MS + sim_mix(s->seed ^ (lo << 32 | hi)) % SIM_LATENCY_SPAN_MS;
}

/* The mean RTT of a random pair: twice the mean of 1..50 ms. */
#define SIM_PAIR_RTT_MS (2.0 * SIM_LATENCY_MIN_MS + (SIM_LATENCY_SPAN_MS - 1))

/* Insecure records are plain: a keepalive is a DATA record holding PING or PONG. */
static bool sim_is_keepalive(const uint8_t *pkt, size_t len)
{
	return len > WIRE_DATA_HDR_BYTES + 1 && pkt[1] == WIRE_DATA &&
	       (pkt[WIRE_DATA_HDR_BYTES + 1] == WIRE_PING || pkt[WIRE_DATA_HDR_BYTES + 1] == WIRE_PONG);
}

static struct sim_pkt *sim_pkt_new(struct sim *s, size_t len)
{
	struct sim_pkt **list = len <= SIM_PKT_SMALL ? &s->free_small : len <= SIM_PKT_LARGE ? &s->free_large : NULL;
	size_t cap = len <= SIM_PKT_SMALL ? SIM_PKT_SMALL : len <= SIM_PKT_LARGE ? SIM_PKT_LARGE : len;
	struct sim_pkt *p = list && *list ? *list : malloc(sizeof *p + cap);
	if (p && list && *list == p)
		*list = p->next_free;
	if (p)
		p->cap = (uint16_t)cap;
	return p;
}

static void sim_pkt_free(struct sim *s, struct sim_pkt *p)
{
	struct sim_pkt **list = p->cap == SIM_PKT_SMALL ? &s->free_small : p->cap == SIM_PKT_LARGE ? &s->free_large : NULL;
	if (!list)
		return free(p);
	p->next_free = *list;
	*list = p;
}

/* A keepalive between two live nodes whose link is up and measured at both
 * ends is not delivered: its effects are applied at once, on both ends, as
 * the PING and its PONG would apply them (liveness stamps, counters; the
 * PONG's RTT sample would equal the one already held, latencies being fixed
 * per pair).  Keepalives were ~70 % of the datagrams of an idle simulated
 * network.  A PING to a dead or departed node still travels, and is lost,
 * so failure detection runs unchanged; --exact-keepalives turns this off. */
static bool sim_keepalive_fold(struct sim *s, struct sim_node *from, uint32_t to, const uint8_t *pkt,
			       size_t len)
{
	struct sim_node *dn = s->nodes[to];
	struct wire_data d;
	if (s->exact_keepalives || !dn || pkt[WIRE_DATA_HDR_BYTES + 1] != WIRE_PING ||
	    wire_data_decode(pkt, len, &d) < 0)
		return false;
	struct link *b = link_find_index(&dn->n, d.receiver);
	if (!b || b->local_idx != d.receiver || b->state != LINK_UP || b->rtt_ms < 0 || !b->confirmed)
		return false;
	struct link *a = link_find_index(&from->n, b->peer_idx);
	if (!a || a->local_idx != b->peer_idx || a->peer_idx != d.receiver || a->state != LINK_UP ||
	    a->rtt_ms < 0 || !a->confirmed)
		return false;
	dn->n.loop.now_ms = s->now_ms;
	b->rx_packets++;
	b->rx_bytes += len;
	b->last_rx_ms = s->now_ms;
	link_on_ping(b);
	b->tx_packets++;                /* the PONG */
	b->tx_bytes += len;
	a->rx_packets++;
	a->rx_bytes += len;
	a->last_rx_ms = s->now_ms;
	s->st.keepalive_pkts++;         /* the PONG; the PING is counted by the caller */
	s->st.bytes += len;
	s->st.folded_pkts += 2;
	return true;
}

/* node->udp_send: the datagram leaves for the delivery queue. */
static int sim_udp_send(struct node *n, const struct sockaddr_in *to, const uint8_t *pkt, size_t len)
{
	struct sim_node *sn = container_of(n, struct sim_node, n);
	struct sim *s = sn->sim;
	uint32_t ip = ntohl(to->sin_addr.s_addr);
	if (ip <= SIM_BASE_IP || ip - SIM_BASE_IP - 1 >= s->n_nodes || ntohs(to->sin_port) != SIM_PORT)
		return -EHOSTUNREACH;
	uint32_t dst = ip - SIM_BASE_IP - 1;
	bool keepalive = sim_is_keepalive(pkt, len);
	s->st.handshakes += pkt[1] == WIRE_HS_FIN;
	if (keepalive)
		s->st.keepalive_pkts++;
	else
		s->st.control_pkts++;
	s->st.bytes += len;
	if (keepalive && sim_keepalive_fold(s, sn, dst, pkt, len))
		return 0;
	struct sim_pkt *p = sim_pkt_new(s, len);
	if (!p)
		return -ENOMEM;
	p->when_ms = s->now_ms + sim_latency_ms(s, sn->idx, dst);
	p->seq = s->seq++;
	p->from = sn->idx;
	p->to = dst;
	p->len = (uint16_t)len;
	memcpy(p->data, pkt, len);
	if (sim_q_push(s, p) < 0) {
		sim_pkt_free(s, p);
		return -ENOMEM;
	}
	return 0;
}

/* ---- nodes -------------------------------------------------------------- */

static void sim_on_echo_reply(struct node *n, uint32_t id, uint64_t rtt_us, uint8_t hops);

/* A zeroed node from a slab of SIM_SLAB_NODES, or one a stopped node left.
 * malloc rounds a 4 KB node up to its size class (musl: 5.4 KB), a third
 * more per node; slabs hold them end to end.  Slabs are never returned:
 * the process ends with the simulation. */
static struct sim_node *sim_node_alloc(struct sim *s)
{
	struct sim_node *sn = s->free_nodes;
	if (sn) {
		s->free_nodes = sn->next_free;
		memset(sn, 0, sizeof *sn);
		return sn;
	}
	if (!s->slab_left) {
		if (!(s->slab = calloc(SIM_SLAB_NODES, sizeof *s->slab)))
			return NULL;
		s->slab_left = SIM_SLAB_NODES;
	}
	s->slab_left--;
	return s->slab++;
}

static void sim_node_release(struct sim *s, struct sim_node *sn)
{
	sn->next_free = s->free_nodes;
	s->free_nodes = sn;
}

/* A node as cli_node_init makes one, minus sockets and credentials:
 * insecure mode, a random ring address, one UDP "listener". */
static struct sim_node *sim_node_new(struct sim *s, uint32_t idx)
{
	struct sim_node *sn = sim_node_alloc(s);
	if (!sn)
		return NULL;
	struct node *n = &sn->n;
	*n = (struct node){ .udp_dial_fd = -1, .tap.fd = -1, .tap.ns_fd = { -1, -1 }, .lw.socks_fd = -1,
			    .udp_send = sim_udp_send };
	n->loop = (struct ev_loop){ .epfd = -1, .now_ms = s->now_ms, .max_wait_ms = 1000, .virtual_time = true };
	if (sim_rng_seed(&n->rng, s->seed, idx) < 0) {
		sim_node_release(s, sn);
		return NULL;
	}
	sn->sim = s;
	sn->idx = idx;
	s->heap_pos[idx] = UINT32_MAX;
	sn->born_ms = s->now_ms;
	n->rekey_ms = LINK_REKEY_MS;
	sec_cookie_rotate(&n->sec, &n->rng, s->now_ms);
	n->start_ms = s->now_ms;
	sec_random(&n->rng, n->self.addr.b, RING_ADDR_BYTES);
	n->self.instance = sec_random_u64(&n->rng);
	n->self.started = (uint32_t)(1700000000 + s->now_ms / 1000);
	struct sockaddr_in sa = sim_sockaddr(idx);
	n->listeners[0] = (struct listener){ .proto = PROTO_UDP, .fd = SIM_FD, .sa = sa };
	n->n_listeners = 1;
	n->self.endpoints[0] = link_endpoint_of(PROTO_UDP, &sa);
	n->self.n_endpoints = 1;
	return sn;
}

static void sim_alive_add(struct sim *s, uint32_t idx)
{
	s->alive_pos[idx] = s->n_alive;
	s->alive[s->n_alive++] = idx;
}

static void sim_alive_remove(struct sim *s, uint32_t idx)
{
	uint32_t pos = s->alive_pos[idx], last = s->alive[--s->n_alive];
	s->alive[pos] = last;
	s->alive_pos[last] = pos;
}

/* Start node number n_nodes, bootstrapping from up to two live nodes. */
static int sim_node_start(struct sim *s)
{
	if (s->n_nodes == s->cap)
		return -ENOSPC;
	uint32_t idx = s->n_nodes;
	struct sim_node *sn = sim_node_new(s, idx);
	if (!sn)
		return -ENOMEM;
	struct node *n = &sn->n;
	for (unsigned i = 0; i < 2 && i < s->n_alive; i++) {
		uint32_t b = s->alive[sim_rand_below(s, s->n_alive)];
		n->ring.boot[n->ring.n_boot++] = (struct endpoint){ .proto = PROTO_UDP, .ip = SIM_BASE_IP + b + 1,
								    .port = SIM_PORT };
		if (i == 1 && n->ring.boot[0].ip == n->ring.boot[1].ip)
			n->ring.n_boot--;
	}
	s->nodes[s->n_nodes++] = sn;
	sim_alive_add(s, idx);
	n->loop.turn_end = link_turn_end;       /* no link_start: no socket, no cookie timer */
	ring_start(n);
	dht_start(n);
	n->up.echo_reply = sim_on_echo_reply;
	sim_node_resched(s, idx);
	return 0;
}

static void sim_node_free(struct sim *s, uint32_t idx)
{
	struct sim_node *sn = s->nodes[idx];
	struct node *n = &sn->n;
	sim_heap_remove(s, idx);
	link_free_all(n);
	dht_stop(n);
	ring_free(n);
	free(n->loop.heap);
	mbedtls_ctr_drbg_free(&n->rng.drbg);
	sim_node_release(s, sn);
	s->nodes[idx] = NULL;
}

/* A node goes: crashed (silent) or shut down (BYE on every link, as on SIGTERM). */
static void sim_node_stop(struct sim *s, uint32_t idx, bool graceful)
{
	struct node *n = &s->nodes[idx]->n;
	n->loop.now_ms = s->now_ms;
	if (graceful)
		ring_leave(n);
	sim_alive_remove(s, idx);
	sim_node_free(s, idx);
}

/* ---- running ------------------------------------------------------------ */

static void sim_deliver(struct sim *s, struct sim_pkt *p)
{
	struct sim_node *sn = s->nodes[p->to];
	if (!sn) {
		s->st.lost_pkts++;
		sim_pkt_free(s, p);
		return;
	}
	uint32_t to = p->to;
	struct sockaddr_in from = sim_sockaddr(p->from);
	sn->n.loop.now_ms = s->now_ms;
	link_input(&sn->n, NULL, SIM_FD, &from, p->data, p->len);
	sim_pkt_free(s, p);
	/* No link_reap here: closed links wait for the node's next timer (a
	 * keepalive tick at most 1 s away); every scan skips them meanwhile,
	 * and walking a node's links per datagram was a fifth of the run. */
	sim_node_resched(s, to);
}

/* Run every event up to and including `until`; the clock ends there. */
static void sim_run_until(struct sim *s, uint64_t until)
{
	for (;;) {
		uint64_t tp = s->q_len ? s->q[0].when_ms : UINT64_MAX;
		uint64_t tn = s->heap_len ? s->heap[0].key : UINT64_MAX;
		uint64_t t = tp < tn ? tp : tn;
		if (t > until)
			break;
		s->now_ms = t;
		if (s->progress && t >= s->next_progress_ms)
			sim_progress(s);
		s->events++;
		if (tp <= tn) {
			sim_deliver(s, sim_q_pop(s));
			continue;
		}
		uint32_t i = s->heap[0].idx;
		struct node *n = &s->nodes[i]->n;
		n->loop.now_ms = t;
		ev_run_timers(&n->loop);
		ev_turn_end(&n->loop);
		sim_node_resched(s, i);
	}
	s->now_ms = until;
}

/* ---- measurements --------------------------------------------------------- */

static void sim_on_echo_reply(struct node *n, uint32_t id, uint64_t rtt_us, uint8_t hops)
{
	struct sim *s = container_of(n, struct sim_node, n)->sim;
	(void)rtt_us;           /* wall-clock based: a simulation reports hops only */
	if (id < s->n_probes && s->probes[id].hops < 0 &&
	    s->now_ms - s->probes[id].sent_ms <= SIM_PROBE_TIMEOUT_MS) {
		s->probes[id].hops = hops;
		s->n_answered++;
	}
}

static struct sim_node *sim_random_alive(struct sim *s)
{
	return s->nodes[s->alive[sim_rand_below(s, s->n_alive)]];
}

static void sim_probe_send(struct sim *s)
{
	if (s->n_alive < 2 || s->n_probes == s->probes_cap)
		return;
	struct sim_node *a = sim_random_alive(s), *b;
	do
		b = sim_random_alive(s);
	while (b == a);
	uint32_t id = s->n_probes++;
	s->probes[id] = (struct sim_probe){ .src = a->idx, .dst = b->idx, .sent_ms = s->now_ms, .hops = -1,
					    .counted = true };
	a->n.loop.now_ms = s->now_ms;
	ring_echo_send(&a->n, &b->n.self.addr, id);
	ev_turn_end(&a->n.loop);
	sim_node_resched(s, a->idx);
}

/* Probe results from first to the end: success, hops mean / p99 / max. */
struct sim_hops {
	uint32_t sent, ok;
	double mean;
	int p50, p90, p99, max;
	uint32_t hist[RING_MAX_HOPS + 1];
};

static struct sim_hops sim_hops_of(const struct sim *s, uint32_t first)
{
	struct sim_hops h = { .p50 = -1, .p90 = -1, .p99 = -1, .max = -1 };
	uint64_t sum = 0;
	for (uint32_t i = first; i < s->n_probes; i++) {
		const struct sim_probe *p = &s->probes[i];
		if (!p->counted)
			continue;
		h.sent++;
		if (p->hops < 0)
			continue;
		h.ok++;
		sum += (uint64_t)p->hops;
		h.hist[p->hops > RING_MAX_HOPS ? RING_MAX_HOPS : p->hops]++;
	}
	h.mean = h.ok ? (double)sum / h.ok : 0;
	uint32_t acc = 0;
	for (int k = 0; k <= RING_MAX_HOPS; k++) {
		acc += h.hist[k];
		if (h.hist[k])
			h.max = k;
		if (h.p50 < 0 && acc * 2 >= h.ok && h.ok)
			h.p50 = k;
		if (h.p90 < 0 && acc * 10 >= h.ok * 9ull && h.ok)
			h.p90 = k;
		if (h.p99 < 0 && acc * 100 >= h.ok * 99ull && h.ok)
			h.p99 = k;
	}
	return h;
}

/* count probes spread evenly over spread_ms, then wait for the last reply. */
/* Run to `until`, or less: in steps of SIM_WAIT_STEP_MS until *have
 * reaches want.  A measurement's wait ends with its last answer; waiting
 * out every timeout was a third of a 100k run's virtual time. */
static void sim_run_until_count(struct sim *s, uint64_t until, const uint32_t *have, uint32_t want)
{
	while (s->now_ms < until && *have < want)
		sim_run_until(s, s->now_ms + SIM_WAIT_STEP_MS < until ? s->now_ms + SIM_WAIT_STEP_MS : until);
}

static void sim_probe_round(struct sim *s, uint32_t count, uint64_t spread_ms)
{
	uint64_t start = s->now_ms;
	uint32_t want = s->n_answered;
	for (uint32_t i = 0; i < count; i++) {
		sim_run_until(s, start + spread_ms * i / (count ? count : 1));
		want += s->n_probes < s->probes_cap;
		sim_probe_send(s);
	}
	sim_run_until_count(s, start + spread_ms + SIM_PROBE_TIMEOUT_MS, &s->n_answered, want);
}

static void sim_on_dht_put(struct node *n, void *arg, const struct wire_dht *reply)
{
	struct sim *s = container_of(n, struct sim_node, n)->sim;
	(void)arg;
	if (reply && reply->status == DHT_OK)
		s->dht_put_ok++;
}

static void sim_on_dht_get(struct node *n, void *arg, const struct wire_dht *reply)
{
	struct sim *s = container_of(n, struct sim_node, n)->sim;
	uint32_t k = (uint32_t)(uintptr_t)arg - 1;
	if (reply && reply->status == DHT_OK && k < s->n_keys && reply->value_len == strlen(s->dht_keys[k]) &&
	    !memcmp(reply->value, s->dht_keys[k], reply->value_len) && !s->dht_found[k]) {
		s->dht_found[k] = true;
		s->n_found++;
	}
}

/* Put n_keys records from random nodes, each valued with its own key. */
static void sim_dht_put_all(struct sim *s)
{
	for (uint32_t k = 0; k < s->n_keys; k++) {
		struct node *n = &sim_random_alive(s)->n;
		n->loop.now_ms = s->now_ms;
		dht_request(n, DHT_PUT, s->dht_keys[k], (const uint8_t *)s->dht_keys[k], strlen(s->dht_keys[k]),
			    SIM_DHT_TTL_S, sim_on_dht_put, NULL);
		ev_turn_end(&n->loop);
		sim_node_resched(s, container_of(n, struct sim_node, n)->idx);
		if (k % 16 == 15)
			sim_run_until(s, s->now_ms + 1);
	}
}

/* Read every record back through a random live node, all at once; one
 * retry 2 s later for those not found (as tests/scale.py does). */
static uint32_t sim_dht_get_all(struct sim *s)
{
	uint32_t found = 0;
	memset(s->dht_found, 0, s->n_keys * sizeof *s->dht_found);
	s->n_found = 0;
	for (int round = 0; round < 2 && found < s->n_keys; round++) {
		if (round == 1)
			sim_run_until(s, s->now_ms + 2000);     /* the retry, 2 s later */
		for (uint32_t k = 0; k < s->n_keys; k++) {
			if (s->dht_found[k])
				continue;
			struct sim_node *sn = sim_random_alive(s);
			sn->n.loop.now_ms = s->now_ms;
			dht_request(&sn->n, DHT_GET, s->dht_keys[k], NULL, 0, 0, sim_on_dht_get,
				    (void *)(uintptr_t)(k + 1));
			ev_turn_end(&sn->n.loop);
			sim_node_resched(s, sn->idx);
			if (k % 16 == 15)
				sim_run_until(s, s->now_ms + 1);
		}
		sim_run_until_count(s, s->now_ms + DHT_REQUEST_TIMEOUT_MS + 500, &s->n_found, s->n_keys);
		found = 0;
		for (uint32_t k = 0; k < s->n_keys; k++)
			found += s->dht_found[k];
	}
	return found;
}

/* ---- ring checks --------------------------------------------------------- */

struct sim_ranked {
	ring_addr addr;
	uint32_t idx;
};

static int sim_ranked_cmp(const void *a, const void *b)
{
	return wire_addr_cmp(&((const struct sim_ranked *)a)->addr, &((const struct sim_ranked *)b)->addr);
}

static bool sim_has_up(struct node *n, const ring_addr *a)
{
	return link_find_peer(n, a, true) != NULL;
}

/* Live nodes whose up links include their RING_NEAR_PER_SIDE true
 * successors and predecessors (tests/lib.py's rule). */
static uint32_t sim_ring_consistent(struct sim *s)
{
	uint32_t m = s->n_alive, good = 0;
	struct sim_ranked *r = malloc((size_t)(m ? m : 1) * sizeof *r);
	if (!r)
		return 0;
	for (uint32_t i = 0; i < m; i++)
		r[i] = (struct sim_ranked){ .addr = s->nodes[s->alive[i]]->n.self.addr, .idx = s->alive[i] };
	qsort(r, m, sizeof *r, sim_ranked_cmp);
	for (uint32_t i = 0; i < m; i++) {
		struct node *n = &s->nodes[r[i].idx]->n;
		bool ok = true;
		for (uint32_t k = 1; k <= RING_NEAR_PER_SIDE && k < m && ok; k++)
			ok = sim_has_up(n, &r[(i + k) % m].addr) && sim_has_up(n, &r[(i + m - k) % m].addr);
		good += ok;
	}
	free(r);
	return good;
}

struct sim_links {
	double mean;
	uint32_t p50, max;
	double far_mean;                /* far roles we hold, per node */
	uint32_t far_short;             /* nodes holding fewer than they want */
	double far_rtt_ms;              /* mean RTT of far links: proximity selection at work */
	uint64_t link_bytes;            /* struct link records, all nodes */
	uint64_t dht_bytes;             /* record and pending slots, all nodes */
};

static int sim_u32_cmp(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return x < y ? -1 : x > y;
}

static struct sim_links sim_links_of(struct sim *s)
{
	struct sim_links r = { 0 };
	uint32_t *c = calloc(s->n_alive ? s->n_alive : 1, sizeof *c);
	uint64_t sum = 0, far_links = 0;
	if (!c)
		return r;
	for (uint32_t i = 0; i < s->n_alive; i++) {
		struct node *n = &s->nodes[s->alive[i]]->n;
		unsigned far = 0;
		for (struct link *l = n->links; l; l = l->next) {
			c[i] += l->state == LINK_UP;
			r.link_bytes += sizeof *l;
			if (l->state != LINK_UP || !(l->local_roles & ROLE_FAR))
				continue;
			far++;
			uint32_t peer = ntohl(l->remote.sin_addr.s_addr) - SIM_BASE_IP - 1;
			r.far_rtt_ms += 2.0 * (double)sim_latency_ms(s, s->alive[i], peer);
		}
		r.far_mean += far;
		far_links += far;
		r.far_short += far < ring_far_target(ring_estimate_n(n));
		r.dht_bytes += (uint64_t)n->dht.records_cap * sizeof *n->dht.records +
			       (uint64_t)n->dht.pending_cap * sizeof *n->dht.pending;
		sum += c[i];
	}
	qsort(c, s->n_alive, sizeof *c, sim_u32_cmp);
	r.mean = s->n_alive ? (double)sum / s->n_alive : 0;
	r.far_mean = s->n_alive ? r.far_mean / s->n_alive : 0;
	r.far_rtt_ms = far_links ? r.far_rtt_ms / (double)far_links : 0;
	r.p50 = s->n_alive ? c[s->n_alive / 2] : 0;
	r.max = s->n_alive ? c[s->n_alive - 1] : 0;
	free(c);
	return r;
}

/* VmRSS or VmHWM in kB, from /proc/self/status; 0 if unreadable. */
static uint64_t sim_proc_kb(const char *field)
{
	char line[256];
	uint64_t kb = 0;
	FILE *f = fopen("/proc/self/status", "r");
	if (!f)
		return 0;
	while (fgets(line, sizeof line, f))
		if (!strncmp(line, field, strlen(field)))
			kb = strtoull(line + strlen(field) + 1, NULL, 10);
	fclose(f);
	return kb;
}

/* ---- the run ------------------------------------------------------------- */

struct sim_opts {
	uint32_t nodes;
	double churn;                   /* fraction of the nodes replaced per minute */
	uint64_t seed;
	double duration_s;              /* of the churn phase */
	double join_rate;               /* nodes started per virtual second */
	uint32_t probes, dht_keys;
	bool json, progress, exact_keepalives;
};

struct sim_result {
	double join_s, settle_s;        /* virtual */
	uint64_t join_control_pkts, join_keepalive_pkts, join_handshakes;
	uint32_t consistent, consistent_after;
	struct sim_links links;
	double idle_pkts_per_node_s, idle_control_per_node_s;
	double join_node_s;             /* node-seconds lived during join and settle */
	double join_msgs_per_node;      /* control datagrams beyond idle upkeep, per node */
	struct sim_hops hops, hops_churn, hops_after;
	uint32_t dht_put_ok, dht_found;
	uint32_t replaced;
	double churn_rate_real;         /* replacements per minute / nodes */
	uint64_t rss_kb, hwm_kb;
	double wall_join_s, wall_total_s;
	uint64_t events;
	size_t q_peak;
};

static double sim_wall_s(uint64_t t0_us)
{
	return (double)(ev_clock_us() - t0_us) / 1e6;
}

static int sim_setup(struct sim *s, const struct sim_opts *o)
{
	uint64_t replace = (uint64_t)ceil(o->churn * o->nodes * o->duration_s / 60.0) + 2;
	*s = (struct sim){ .seed = sim_mix(o->seed), .rng = o->seed, .n_keys = o->dht_keys,
			   .progress = o->progress, .exact_keepalives = o->exact_keepalives,
			   .t0_us = ev_clock_us() };
	s->cap = (uint32_t)(o->nodes + replace > SIM_NODES_MAX ? SIM_NODES_MAX : o->nodes + replace);
	s->probes_cap = 3 * o->probes + (uint32_t)(SIM_CHURN_PROBES_PER_S * o->duration_s) + 16;
	s->nodes = calloc(s->cap, sizeof *s->nodes);
	s->alive = calloc(s->cap, sizeof *s->alive);
	s->alive_pos = calloc(s->cap, sizeof *s->alive_pos);
	s->heap = calloc(s->cap, sizeof *s->heap);
	s->heap_pos = calloc(s->cap, sizeof *s->heap_pos);
	s->probes = calloc(s->probes_cap, sizeof *s->probes);
	s->dht_keys = calloc(s->n_keys + 1, sizeof *s->dht_keys);
	s->dht_found = calloc(s->n_keys + 1, sizeof *s->dht_found);
	if (!s->nodes || !s->alive || !s->alive_pos || !s->heap || !s->heap_pos || !s->probes || !s->dht_keys || !s->dht_found)
		return -ENOMEM;
	for (uint32_t k = 0; k < s->n_keys; k++) {
		char key[48];
		snprintf(key, sizeof key, "sim:%llu:%u", (unsigned long long)o->seed, k);
		if (!(s->dht_keys[k] = strdup(key)))
			return -ENOMEM;
	}
	return 0;
}

/* Settled: every node holds its true ring neighbours, and 99 % hold the far
 * links they want.  Measuring starts then, or after SIM_SETTLE_MS; at
 * N = 100 000 each settle second costs ~3 M events. */
static bool sim_settled(struct sim *s)
{
	if (sim_ring_consistent(s) != s->n_alive)
		return false;
	struct sim_links l = sim_links_of(s);
	return (uint64_t)l.far_short * 100 <= s->n_alive;
}

/* Start the nodes at join_rate, each from two random earlier ones. */
static int sim_join(struct sim *s, const struct sim_opts *o, struct sim_result *r)
{
	for (uint32_t i = 0; i < o->nodes; i++) {
		sim_run_until(s, (uint64_t)(i * 1000.0 / o->join_rate));
		int rc = sim_node_start(s);
		if (rc < 0)
			return rc;
	}
	r->join_s = (double)s->now_ms / 1000;
	uint64_t start = s->now_ms;
	do
		sim_run_until(s, s->now_ms + SIM_SETTLE_STEP_MS);
	while (s->now_ms - start < SIM_SETTLE_MS && !sim_settled(s));
	r->settle_s = (double)(s->now_ms - start) / 1000;
	r->join_control_pkts = s->st.control_pkts;
	r->join_keepalive_pkts = s->st.keepalive_pkts;
	r->join_handshakes = s->st.handshakes;
	for (uint32_t i = 0; i < s->n_nodes; i++)
		r->join_node_s += (double)(s->now_ms - s->nodes[i]->born_ms) / 1000;
	return 0;
}

static bool sim_member(const struct sim *s, uint32_t idx)
{
	return s->nodes[idx] && s->now_ms - s->nodes[idx]->born_ms >= SIM_MEMBER_AGE_MS;
}

/* A churn probe counts when both ends outlive it (tests/scale.py's rule):
 * died_ms holds each number's death time, 0 while alive. */
static void sim_churn_probe(struct sim *s)
{
	for (int tries = 0; tries < 8; tries++) {
		uint32_t a = s->alive[sim_rand_below(s, s->n_alive)], b = s->alive[sim_rand_below(s, s->n_alive)];
		if (a == b || !sim_member(s, a) || !sim_member(s, b))
			continue;
		uint32_t id = s->n_probes;
		if (id == s->probes_cap)
			return;
		s->n_probes++;
		s->probes[id] = (struct sim_probe){ .src = a, .dst = b, .sent_ms = s->now_ms, .hops = -1,
						    .counted = true };
		struct node *n = &s->nodes[a]->n;
		n->loop.now_ms = s->now_ms;
		ring_echo_send(n, &s->nodes[b]->n.self.addr, id);
		ev_turn_end(&n->loop);
		sim_node_resched(s, a);
		return;
	}
}

static int sim_churn(struct sim *s, const struct sim_opts *o, struct sim_result *r, uint64_t *died_ms)
{
	uint64_t start = s->now_ms, end = start + (uint64_t)(o->duration_s * 1000);
	double every_ms = 60000.0 / (o->churn * o->nodes);
	uint64_t probe_every = 1000 / SIM_CHURN_PROBES_PER_S;
	uint32_t first = s->n_probes;
	double next_kill = (double)start + every_ms;
	uint64_t next_probe = start;
	while (s->now_ms < end) {
		uint64_t t = next_probe < (uint64_t)next_kill ? next_probe : (uint64_t)next_kill;
		if (t >= end)
			break;
		sim_run_until(s, t);
		if (t == next_probe) {
			sim_churn_probe(s);
			next_probe += probe_every;
			continue;
		}
		uint32_t victim = s->alive[sim_rand_below(s, s->n_alive)];
		died_ms[victim] = s->now_ms;
		sim_node_stop(s, victim, r->replaced % 2 == 1);  /* SIGKILL, SIGTERM, ... */
		int rc = sim_node_start(s);
		if (rc < 0)
			return rc;
		r->replaced++;
		next_kill += every_ms;
	}
	sim_run_until(s, end + SIM_PROBE_TIMEOUT_MS);
	for (uint32_t i = first; i < s->n_probes; i++) {
		struct sim_probe *p = &s->probes[i];
		uint64_t until = p->sent_ms + SIM_PROBE_TIMEOUT_MS;
		p->counted = !(died_ms[p->src] && died_ms[p->src] <= until) &&
			     !(died_ms[p->dst] && died_ms[p->dst] <= until);
	}
	r->hops_churn = sim_hops_of(s, first);
	r->churn_rate_real = o->duration_s > 0 ? r->replaced / (o->duration_s / 60.0) / o->nodes : 0;
	return 0;
}

static int sim_run(struct sim *s, const struct sim_opts *o, struct sim_result *r)
{
	uint64_t t0 = ev_clock_us();
	int rc = sim_setup(s, o);
	if (rc < 0 || (rc = sim_join(s, o, r)) < 0)
		return rc;
	r->wall_join_s = sim_wall_s(t0);
	r->consistent = sim_ring_consistent(s);
	r->links = sim_links_of(s);
	r->rss_kb = sim_proc_kb("VmRSS:");
	uint64_t before = s->st.control_pkts + s->st.keepalive_pkts, ctl_before = s->st.control_pkts;
	/* Idle: what upkeep costs, over 200 000 node-seconds (1 to 5 s) */
	uint64_t idle_ms = (uint64_t)fmax(1000, fmin(SIM_IDLE_MS, SIM_IDLE_NODE_S * 1000.0 / s->n_alive));
	sim_run_until(s, s->now_ms + idle_ms);
	double node_s = (double)s->n_alive * (double)idle_ms / 1000;
	r->idle_pkts_per_node_s = (double)(s->st.control_pkts + s->st.keepalive_pkts - before) / node_s;
	r->idle_control_per_node_s = (double)(s->st.control_pkts - ctl_before) / node_s;
	/* Joining costs what the join phase sent beyond the upkeep (probes,
	 * far-link checks, DHT hand-over) its nodes would have sent anyway. */
	r->join_msgs_per_node = ((double)r->join_control_pkts - r->idle_control_per_node_s * r->join_node_s) /
				o->nodes;
	sim_probe_round(s, o->probes, SIM_PROBE_SPREAD_MS);
	r->hops = sim_hops_of(s, 0);
	sim_dht_put_all(s);
	sim_run_until(s, s->now_ms + SIM_DHT_WAIT_MS);
	r->dht_put_ok = s->dht_put_ok;
	if (o->churn > 0 && o->duration_s > 0) {
		uint64_t *died = calloc(s->cap, sizeof *died);
		if (!died)
			return -ENOMEM;
		rc = sim_churn(s, o, r, died);
		free(died);
		if (rc < 0)
			return rc;
		sim_run_until(s, s->now_ms + SIM_AFTER_CHURN_MS);
	}
	r->dht_found = sim_dht_get_all(s);
	r->consistent_after = sim_ring_consistent(s);
	uint32_t first = s->n_probes;
	sim_probe_round(s, o->probes, SIM_PROBE_SPREAD_MS);
	r->hops_after = sim_hops_of(s, first);
	r->hwm_kb = sim_proc_kb("VmHWM:");
	r->events = s->events;
	r->q_peak = s->q_peak;
	r->wall_total_s = sim_wall_s(t0);
	return 0;
}

/* ---- report and command line --------------------------------------------- */

static void sim_report_hops(struct buf_str *b, bool json, const char *name, const struct sim_hops *h)
{
	double rate = h->sent ? 100.0 * h->ok / h->sent : 0;
	if (json)
		buf_printf(b, "\"%s\":{\"sent\":%u,\"ok\":%u,\"success_pct\":%.3f,\"hops_mean\":%.3f,"
			   "\"hops_p50\":%d,\"hops_p90\":%d,\"hops_p99\":%d,\"hops_max\":%d},", name, h->sent, h->ok,
			   rate, h->mean, h->p50, h->p90, h->p99, h->max);
	else
		buf_printf(b, "%-22s %u/%u ok (%.2f %%), hops mean %.2f p50 %d p90 %d p99 %d max %d\n", name,
			   h->ok, h->sent, rate, h->mean, h->p50, h->p90, h->p99, h->max);
}

/* Text for people, or one JSON object (--json) for scripts.  Wall-clock
 * figures are the only ones a seed does not fix. */
static void sim_report(const struct sim *s, const struct sim_opts *o, const struct sim_result *r)
{
	struct buf_str b = { 0 };
	double n0 = o->nodes, mem = (double)r->rss_kb * 1024 / n0;
	double join_msgs = r->join_msgs_per_node;
	if (o->json) {
		buf_printf(&b, "{\"nodes\":%u,\"seed\":%llu,\"churn\":%g,\"duration_s\":%g,\"join_rate\":%g,"
			   "\"log2n\":%.3f,\"join_s\":%.1f,\"join_msgs_per_node\":%.2f,"
			   "\"join_control_per_node\":%.2f,\"join_keepalives_per_node\":%.2f,\"ring_consistent\":%u,"
			   "\"links_mean\":%.2f,\"links_p50\":%u,\"links_max\":%u,\"join_links_made_per_node\":%.2f,"
			   "\"far_mean\":%.2f,\"far_short\":%u,\"far_rtt_ms\":%.2f,\"pair_rtt_ms\":%.2f,"
			   "\"idle_pkts_per_node_s\":%.2f,\"idle_control_per_node_s\":%.3f,",
			   o->nodes, (unsigned long long)o->seed, o->churn, o->duration_s, o->join_rate, log2(n0),
			   r->join_s, join_msgs, (double)r->join_control_pkts / n0, (double)r->join_keepalive_pkts / n0,
			   r->consistent, r->links.mean, r->links.p50, r->links.max, (double)r->join_handshakes / n0,
			   r->links.far_mean,
			   r->links.far_short, r->links.far_rtt_ms, SIM_PAIR_RTT_MS, r->idle_pkts_per_node_s,
			   r->idle_control_per_node_s);
		sim_report_hops(&b, true, "routing", &r->hops);
		if (r->replaced)
			sim_report_hops(&b, true, "routing_churn", &r->hops_churn);
		sim_report_hops(&b, true, "routing_after", &r->hops_after);
		buf_printf(&b, "\"replaced\":%u,\"churn_real\":%.4f,\"dht_keys\":%u,\"dht_put_ok\":%u,"
			   "\"dht_found\":%u,\"ring_consistent_after\":%u,\"alive\":%u,\"events\":%llu,"
			   "\"struct_node_bytes\":%zu,\"link_bytes_per_node\":%.0f,\"dht_bytes_per_node\":%.0f,"
			   "\"queue_peak\":%zu,\"rss_kb\":%llu,\"hwm_kb\":%llu,\"mem_per_node_bytes\":%.0f,"
			   "\"wall_join_s\":%.2f,\"wall_total_s\":%.2f}\n",
			   r->replaced, r->churn_rate_real, o->dht_keys, r->dht_put_ok, r->dht_found,
			   r->consistent_after, s->n_alive, (unsigned long long)r->events, sizeof(struct sim_node),
			   (double)r->links.link_bytes / n0, (double)r->links.dht_bytes / n0, r->q_peak,
			   (unsigned long long)r->rss_kb, (unsigned long long)r->hwm_kb, mem, r->wall_join_s,
			   r->wall_total_s);
	} else {
		buf_printf(&b, "ipop simulate: %u nodes, seed %llu, churn %g/min for %g s, joins %g/s\n",
			   o->nodes, (unsigned long long)o->seed, o->churn, o->duration_s, o->join_rate);
		buf_printf(&b, "%-22s %.1f s virtual (+%.0f s settle), %.2f s wall\n", "join", r->join_s,
			   r->settle_s, r->wall_join_s);
		buf_printf(&b, "%-22s %.1f per node beyond upkeep (all sent in join + settle: %.1f control, "
			   "%.1f keepalive)\n", "join messages", join_msgs, (double)r->join_control_pkts / n0,
			   (double)r->join_keepalive_pkts / n0);
		buf_printf(&b, "%-22s %u/%u nodes hold their 2+2 true neighbours\n", "ring", r->consistent, o->nodes);
		buf_printf(&b, "%-22s mean %.2f p50 %u max %u (%.1f made in join + settle)\n", "up links per node",
			   r->links.mean, r->links.p50, r->links.max, (double)r->join_handshakes / n0);
		buf_printf(&b, "%-22s mean %.2f per node; %u nodes hold fewer than they want; RTT %.1f ms "
			   "(any pair: %.1f ms)\n", "far links", r->links.far_mean, r->links.far_short,
			   r->links.far_rtt_ms, SIM_PAIR_RTT_MS);
		buf_printf(&b, "%-22s %.2f datagrams sent per node per s (%.2f not keepalives)\n", "idle traffic",
			   r->idle_pkts_per_node_s, r->idle_control_per_node_s);
		buf_printf(&b, "%-22s %.0f B (RSS %llu kB after the join; struct node %zu B, links %.0f B, "
			   "DHT slots %.0f B per node)\n", "memory per node", mem, (unsigned long long)r->rss_kb,
			   sizeof(struct sim_node), (double)r->links.link_bytes / n0, (double)r->links.dht_bytes / n0);
		buf_printf(&b, "%-22s log2 N = %.2f\n", "routing", log2(n0));
		sim_report_hops(&b, false, "  no churn", &r->hops);
		if (r->replaced) {
			buf_printf(&b, "%-22s %u replaced (%.1f %% of the nodes per minute)\n", "churn", r->replaced,
				   100 * r->churn_rate_real);
			sim_report_hops(&b, false, "  during churn", &r->hops_churn);
		}
		sim_report_hops(&b, false, "  at the end", &r->hops_after);
		buf_printf(&b, "%-22s %u/%u put, %u/%u read back at the end\n", "dht records", r->dht_put_ok,
			   o->dht_keys, r->dht_found, o->dht_keys);
		buf_printf(&b, "%-22s %u/%u nodes hold their 2+2 true neighbours\n", "ring at the end",
			   r->consistent_after, s->n_alive);
		buf_printf(&b, "%-22s %llu events, queue peak %zu, peak RSS %llu kB, %.2f s wall\n", "cost",
			   (unsigned long long)r->events, r->q_peak, (unsigned long long)r->hwm_kb, r->wall_total_s);
	}
	if (b.s)
		fputs(b.s, stdout);
	buf_str_free(&b);
}

static const char sim_usage[] =
	"usage: ipop simulate --nodes N [--churn RATE] [--duration SECONDS] [--seed S]\n"
	"                     [--join-rate R] [--probes P] [--dht-keys K] [--json]\n"
	"                     [--progress] [--exact-keepalives]\n"
	"\n"
	"Run N nodes in one process, in virtual time, over an in-memory network:\n"
	"the ring, join, routing and DHT code of 'ipop up' in insecure mode, with\n"
	"1-50 ms per pair of nodes.  The same seed gives the same numbers.\n"
	"  --nodes N          nodes to join (2 to 4000000)\n"
	"  --churn RATE       fraction of the nodes replaced per minute (0 to 1;\n"
	"                     default 0), half crashed, half shut down\n"
	"  --duration SECONDS length of the churn phase (default 60 with --churn)\n"
	"  --seed S           random seed (default 1)\n"
	"  --join-rate R      nodes started per virtual second (default N/20,\n"
	"                     at least 1000)\n"
	"  --probes P         echo probes between random pairs per measurement\n"
	"                     (default 10000)\n"
	"  --dht-keys K       DHT records put before churn, read back after (default 1000)\n"
	"  --json             one JSON object instead of text\n"
	"  --progress         a line on stderr every 5 virtual seconds\n"
	"  --exact-keepalives deliver every keepalive between live nodes as a\n"
	"                     datagram (default: applied at once, at both ends)\n"
	"Reports hops (mean, p99, max), join messages, links and memory per node,\n"
	"routing success and DHT survival.  Exit status 0, 1 on failure, 2 on usage.\n";

static int sim_number(const char *flag, const char *v, double lo, double hi, double *out)
{
	char *end;
	errno = 0;
	double d = v ? strtod(v, &end) : 0;
	if (!v || errno || end == v || *end || !(d >= lo && d <= hi)) {
		fprintf(stderr, "ipop: simulate: %s needs a number from %.10g to %.10g%s%s%s\n", flag, lo, hi,
			v ? " (got '" : "", v ? v : "", v ? "')" : "");
		return -1;
	}
	*out = d;
	return 0;
}

static int sim_parse_args(struct sim_opts *o, int argc, char **argv, bool *help)
{
	*o = (struct sim_opts){ .seed = 1, .probes = 10000, .dht_keys = 1000, .duration_s = -1 };
	*help = false;
	for (int i = 0; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
		double d;
		if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
			*help = true;
			return 0;
		} else if (!strcmp(a, "--json")) {
			o->json = true;
			continue;
		} else if (!strcmp(a, "--progress")) {
			o->progress = true;
			continue;
		} else if (!strcmp(a, "--exact-keepalives")) {
			o->exact_keepalives = true;
			continue;
		} else if (!strcmp(a, "--nodes")) {
			if (sim_number(a, v, 2, SIM_NODES_MAX, &d) < 0)
				return -1;
			o->nodes = (uint32_t)d;
		} else if (!strcmp(a, "--churn")) {
			if (sim_number(a, v, 0, 1, &o->churn) < 0)
				return -1;
		} else if (!strcmp(a, "--duration")) {
			if (sim_number(a, v, 0, 86400, &o->duration_s) < 0)
				return -1;
		} else if (!strcmp(a, "--seed")) {
			if (sim_number(a, v, 0, 9007199254740992.0, &d) < 0)
				return -1;
			o->seed = (uint64_t)d;
		} else if (!strcmp(a, "--join-rate")) {
			if (sim_number(a, v, 0.01, 1e6, &o->join_rate) < 0)
				return -1;
		} else if (!strcmp(a, "--probes")) {
			if (sim_number(a, v, 0, 1e7, &d) < 0)
				return -1;
			o->probes = (uint32_t)d;
		} else if (!strcmp(a, "--dht-keys")) {
			if (sim_number(a, v, 0, 1e6, &d) < 0)
				return -1;
			o->dht_keys = (uint32_t)d;
		} else {
			fprintf(stderr, "ipop: simulate: unknown option '%s' (see 'ipop simulate --help')\n", a);
			return -1;
		}
		i++;
	}
	if (!o->nodes) {
		fprintf(stderr, "ipop: simulate: --nodes N is required (see 'ipop simulate --help')\n");
		return -1;
	}
	if (o->duration_s < 0)
		o->duration_s = o->churn > 0 ? 60 : 0;
	if (!o->join_rate)
		o->join_rate = fmax(1000, (double)o->nodes / SIM_JOIN_SECONDS_MAX);
	return 0;
}

/* `ipop simulate ARGS`: argv holds the arguments after the command. */
static int sim_main(int argc, char **argv)
{
	struct sim_opts o;
	bool help;
	if (sim_parse_args(&o, argc, argv, &help) < 0)
		return EXIT_USAGE;
	if (help) {
		fputs(sim_usage, stdout);
		return EXIT_OK;
	}
	log_cfg.level = LOG_ERROR;      /* a million nodes' link lines are noise */
	static struct sim s;
	struct sim_result r = { 0 };
	int rc = sim_run(&s, &o, &r);
	if (rc < 0) {
		fprintf(stderr, "ipop: simulate: %s after %u nodes\n", strerror(-rc), s.n_nodes);
		return EXIT_FAIL;
	}
	sim_report(&s, &o, &r);
	return EXIT_OK;             /* the process ends: the nodes need no freeing */
}

/* ===================================================================== 16 cli_
 * Flags, the config file, subcommands and main.  One table (cli_flags) lists
 * every flag with the commands that take it; a config file holds the same
 * long names as keys ("listen = udp://0.0.0.0:4000", one per line, repeatable
 * keys repeat), applied where --config stands on the command line.
 * Errors a user can cause print one line naming the cause and the fix, and
 * exit with a code from enum exit_code.  To add a flag: a cli_key, a row in
 * cli_flags, a case in cli_apply, a line in the command's usage text.
 * ========================================================================= */

enum cli_cmd {
	CMD_UP = 1, CMD_STATUS = 2, CMD_PING = 4, CMD_GENKEY = 8, CMD_CA_INIT = 16,
	CMD_CERT_ISSUE = 32, CMD_CA_REVOKE = 64, CMD_DHT_GET = 128, CMD_DHT_PUT = 256, CMD_DHT_CREATE = 512,
	CMD_ROUTE = 1024, CMD_NC = 2048, CMD_RESOLVE = 4096, CMD_MAP = 8192, CMD_EXEC = 16384,
};

enum { CMD_DHT = CMD_DHT_GET | CMD_DHT_PUT | CMD_DHT_CREATE };

enum cli_key {
	KEY_LISTEN, KEY_BOOTSTRAP, KEY_IP, KEY_CONTROL, KEY_CONFIG, KEY_LOG_LEVEL,
	KEY_VERBOSE, KEY_QUIET, KEY_JSON, KEY_COUNT, KEY_INTERVAL, KEY_WAIT, KEY_HELP,
	KEY_SECRET_FILE, KEY_CERT_DIR, KEY_CRL, KEY_INSECURE, KEY_OUT, KEY_CA, KEY_ROUTE_FOR,
	KEY_NAME, KEY_DAYS, KEY_VALID_FOR, KEY_CERT, KEY_SERIAL, KEY_MODE, KEY_DEV, KEY_MTU, KEY_TTL,
	KEY_SOCKS, KEY_SOCKS_PUBLIC, KEY_LOCAL_FWD, KEY_REMOTE_FWD, KEY_SOCKS_AUTH,
	KEY_NET, KEY_STATE_FILE, KEY_DNS, KEY_SVG, KEY_METRICS,
	KEY_SHORTCUT_PPS, KEY_SHORTCUT_MAX, KEY_SHORTCUT_IDLE,
};

enum cli_mode { MODE_AUTO, MODE_TAP, MODE_USER, MODE_NS, MODE_NONE };

static const char *const cli_mode_names[] = { "auto", "tap", "user", "ns", "none" };

enum { CLI_FWD_MAX = 16 };

struct cli_flag {
	const char *name;
	char short_name;
	bool takes_value;
	bool in_config;                 /* allowed as a config-file key */
	enum cli_key key;
	unsigned cmds;
};

static const struct cli_flag cli_flags[] = {
	{ "listen", 0, true, true, KEY_LISTEN, CMD_UP },
	{ "bootstrap", 0, true, true, KEY_BOOTSTRAP, CMD_UP },
	{ "ip", 0, true, true, KEY_IP, CMD_UP | CMD_CERT_ISSUE },
	{ "net", 0, true, true, KEY_NET, CMD_UP },
	{ "state-file", 0, true, true, KEY_STATE_FILE, CMD_UP },
	{ "dns", 0, false, true, KEY_DNS, CMD_UP },
	{ "metrics", 0, true, true, KEY_METRICS, CMD_UP },
	{ "shortcut-pps", 0, true, true, KEY_SHORTCUT_PPS, CMD_UP },
	{ "shortcut-max", 0, true, true, KEY_SHORTCUT_MAX, CMD_UP },
	{ "shortcut-idle", 0, true, true, KEY_SHORTCUT_IDLE, CMD_UP },
	{ "svg", 0, true, false, KEY_SVG, CMD_MAP },
	{ "secret-file", 0, true, true, KEY_SECRET_FILE, CMD_UP },
	{ "cert-dir", 0, true, true, KEY_CERT_DIR, CMD_UP },
	{ "crl", 0, true, true, KEY_CRL, CMD_UP },
	{ "insecure", 0, false, true, KEY_INSECURE, CMD_UP },
	{ "mode", 0, true, true, KEY_MODE, CMD_UP },
	{ "socks", 0, true, true, KEY_SOCKS, CMD_UP | CMD_NC },
	{ "socks-public", 0, false, true, KEY_SOCKS_PUBLIC, CMD_UP },
	{ "socks-auth", 0, true, true, KEY_SOCKS_AUTH, CMD_UP },
	{ "local-forward", 'L', true, true, KEY_LOCAL_FWD, CMD_UP },
	{ "remote-forward", 'R', true, true, KEY_REMOTE_FWD, CMD_UP },
	{ "dev", 0, true, true, KEY_DEV, CMD_UP },
	{ "mtu", 0, true, true, KEY_MTU, CMD_UP },
	{ "out", 'o', true, false, KEY_OUT, CMD_GENKEY | CMD_CA_INIT | CMD_CERT_ISSUE },
	{ "ca", 0, true, false, KEY_CA, CMD_CERT_ISSUE | CMD_CA_REVOKE },
	{ "route-for", 0, true, true, KEY_ROUTE_FOR, CMD_CERT_ISSUE | CMD_UP },
	{ "name", 0, true, true, KEY_NAME, CMD_CA_INIT | CMD_CERT_ISSUE | CMD_UP },
	{ "days", 0, true, false, KEY_DAYS, CMD_CA_INIT | CMD_CERT_ISSUE },
	{ "valid-for", 0, true, false, KEY_VALID_FOR, CMD_CERT_ISSUE },
	{ "cert", 0, true, false, KEY_CERT, CMD_CA_REVOKE },
	{ "serial", 0, true, false, KEY_SERIAL, CMD_CA_REVOKE },
	{ "control", 0, true, true, KEY_CONTROL, CMD_UP | CMD_STATUS | CMD_PING | CMD_DHT | CMD_ROUTE | CMD_RESOLVE |
	  CMD_MAP | CMD_EXEC | CMD_NC },
	{ "ttl", 0, true, false, KEY_TTL, CMD_DHT_PUT | CMD_DHT_CREATE },
	{ "config", 0, true, false, KEY_CONFIG, CMD_UP },
	{ "log-level", 0, true, true, KEY_LOG_LEVEL, CMD_UP },
	{ "verbose", 'v', false, false, KEY_VERBOSE, CMD_UP },
	{ "quiet", 'q', false, false, KEY_QUIET, CMD_UP },
	{ "json", 0, false, false, KEY_JSON, CMD_STATUS },
	{ "count", 'c', true, false, KEY_COUNT, CMD_PING },
	{ "interval", 'i', true, false, KEY_INTERVAL, CMD_PING },
	{ "wait", 'W', true, false, KEY_WAIT, CMD_PING },
	{ "help", 'h', false, false, KEY_HELP, ~0u },
};

struct cli_uri {
	uint8_t proto;
	char host[256];
	uint16_t port;
};

struct cli_opts {
	enum cli_cmd cmd;
	struct cli_uri listen[LISTEN_MAX];
	unsigned n_listen;
	struct cli_uri boot[BOOTSTRAP_MAX];
	unsigned n_boot;
	bool has_ip, ip_auto, has_net;
	uint32_t ip, net;
	uint8_t prefix, net_len;
	char state_file[256];
	bool dns;
	char svg[256];                  /* map --svg FILE */
	bool has_metrics;
	struct endpoint metrics;        /* --metrics ADDR:PORT */
	long sc_pps, sc_max, sc_idle_s; /* --shortcut-*: 0 (max, idle) or unset (pps): the default */
	bool sc_pps_set;
	int argc;                       /* the arguments after the command: SIGHUP parses them again */
	char **argv;
	char control[108];
	int log_level;
	bool json, help;
	long count;
	double interval_s, wait_s;
	const char *target;
	char **exec_argv;               /* up --mode ns ... -- CMD ARGS; exec -- CMD ARGS */
	const char *args[2];            /* dht KEY [VALUE] */
	int n_args;
	int config_depth;
	char secret_file[256], cert_dir[256], crl[256], out[256], ca_dir[256], cert[256], name[64];
	bool insecure;
	enum cli_mode mode;
	char socks[64];
	char socks_auth[256];
	bool socks_public;
	struct fwd_spec fwd[CLI_FWD_MAX];
	unsigned n_fwd;
	char dev[16];
	long mtu;
	struct sec_grant grant;         /* cert issue: --ip, --route-for, --name */
	long days;
	int64_t valid_s;                /* cert issue --valid-for; 0: --days */
	struct sec_serial serial;
};

static const char cli_usage_main[] =
	"usage: ipop COMMAND [OPTIONS]\n"
	"\n"
	"A virtual IP network over a self-organising peer-to-peer ring.\n"
	"\n"
	"commands:\n"
	"  up       run a node in the foreground\n"
	"  status   show a running node's address, connections and counters\n"
	"  ping     send overlay echo requests to a virtual IP or ring address\n"
	"  genkey   write a new network secret (ipop genkey --out net.key)\n"
	"  ca init  create a network certificate authority\n"
	"  cert issue  issue a node certificate binding its virtual IP(s)\n"
	"  ca revoke   add a certificate to the network's revocation list\n"
	"  dht      get, put or create a DHT record through the running node\n"
	"  route    add or del a prefix this node routes for (VMs behind it)\n"
	"  nc       join stdin/stdout to a virtual host's TCP port (ssh ProxyCommand)\n"
	"  resolve  print the virtual IP a name (--name) stands for\n"
	"  map      draw the ring as the running node knows it (--svg FILE)\n"
	"  exec     run a command in a namespace-mode node's network (mpirun, sshd)\n"
	"  simulate run N nodes in virtual time: hops, join cost, churn, DHT\n"
	"  version  print the version\n"
	"\n"
	"'ipop COMMAND --help' describes each command.  See ipop(1).\n";

static const char cli_usage_up[] =
	"usage: ipop up (--secret-file FILE | --cert-dir DIR [--crl FILE] | --insecure)\n"
	"               [--ip A.B.C.D[/PREFIX] | --ip auto --net CIDR]\n"
	"               [--listen URI]... [--bootstrap URI]...\n"
	"               [--config FILE] [--control PATH] [-v|-q] [--log-level LEVEL]\n"
	"               [--mode ns ... -- CMD [ARGS...]]\n"
	"\n"
	"Run a node in the foreground until SIGINT or SIGTERM (a graceful leave).\n"
	"SIGHUP re-reads the config file: bootstrap, crl, log-level and shortcut-*\n"
	"apply at once.\n"
	"Every link is authenticated and encrypted; choose how members prove it:\n"
	"  --secret-file FILE a shared network secret (create: ipop genkey --out net.key)\n"
	"  --cert-dir DIR     ca.crt, node.crt, node.key, network.key from 'ipop cert\n"
	"                     issue'; the virtual IP comes from the certificate\n"
	"  --crl FILE         revoked certificate serials, re-read when it changes\n"
	"  --insecure         no authentication or encryption (all nodes must agree)\n"
	"\n"
	"A node with a virtual IP gives this host an interface on the network:\n"
	"  --mode auto|tap|user|ns|none  auto (default): a tap device when permitted,\n"
	"                     else user mode; tap: fail without the privilege; user:\n"
	"                     lwIP in-process, reached by SOCKS5 and forwards; ns: no\n"
	"                     root needed: a new user and network namespace with a\n"
	"                     real interface, for the command after '--' and for\n"
	"                     'ipop exec'; none: only route\n"
	"  --socks ADDR:PORT  user mode SOCKS5 server (default 127.0.0.1:1080; off)\n"
	"  --socks-auth FILE  require RFC 1929 logins: 'user:password' lines (mode 600)\n"
	"  --socks-public     allow a non-loopback --socks address without logins\n"
	"  -L [udp/][BIND:]PORT:VIP:VPORT  forward a local port to a virtual host\n"
	"  -R [udp/]VPORT:HOST:PORT  expose a local service on this node's virtual IP\n"
	"                     (namespace mode too, TCP: -R 22:127.0.0.1:22 for mpirun)\n"
	"  --dev NAME         tap device name (default ipop%d: ipop0, ipop1, ...)\n"
	"  --mtu N            interface MTU (default 1360: fits a 1500-byte path)\n"
	"  --name NAME        publish NAME for this node's IP (SOCKS resolves NAME\n"
	"                     and NAME.ipop; tap nodes answer DNS for NAME.ipop on\n"
	"                     the gateway address, the net's last host address)\n"
	"  --metrics ADDR:PORT  serve counters for Prometheus (HTTP GET /metrics);\n"
	"                     PORT alone listens on 127.0.0.1\n"
	"  --dns              point this host's resolver at the gateway for .ipop\n"
	"                     names (resolvectl; else print the line to add)\n"
	"  --route-for CIDR   also hold these IPs (VMs, containers behind this host;\n"
	"                     published in the DHT; repeatable; at most /24 each)\n"
	"  --shortcut-pps N   link directly to a peer whose IP traffic with us passes\n"
	"                     N packets/s (default 20; 0: never)\n"
	"  --shortcut-max N   keep at most N shortcut links, trimming the least used\n"
	"                     (default 8, 1 to 64)\n"
	"  --shortcut-idle S  close a shortcut after S seconds without traffic\n"
	"                     (default 30)\n"
	"\n"
	"  --ip A.B.C.D[/P]   this node's virtual IP (ring address = SHA-1 of it);\n"
	"                     without it the node only routes (random ring address)\n"
	"  --ip auto          lease a free address of --net from the DHT; kept across\n"
	"                     restarts in the state file; another one on conflict\n"
	"  --net CIDR         the virtual network, e.g. 10.128.0.0/16 (for --ip auto;\n"
	"                     its last address, .255.254 in a /16, is the gateway)\n"
	"  --state-file FILE  where --ip auto keeps its lease (default\n"
	"                     $XDG_STATE_HOME/ipop/ or ~/.local/state/ipop/, one file\n"
	"                     per network)\n"
	"  --listen URI       udp://HOST:PORT or tcp://HOST:PORT; repeatable\n"
	"                     (default udp://0.0.0.0:4000 and tcp://0.0.0.0:4000)\n"
	"  --bootstrap URI    a peer to join through, same form; repeatable\n"
	"  --config FILE      read options from FILE: 'key = value' lines whose keys\n"
	"                     are the long option names (listen, bootstrap, ip, ...)\n"
	"  --control PATH     control socket (default $XDG_RUNTIME_DIR/ipop.sock,\n"
	"                     else /tmp/ipop-UID/ipop.sock)\n"
	"  -v, -q             more or less logging; --log-level error|warn|info|debug\n";

static const char cli_usage_genkey[] =
	"usage: ipop genkey --out FILE\n"
	"\n"
	"Write a new random network secret (64 hex digits) to FILE, created with\n"
	"mode 0600; an existing FILE (or a symbolic link) is refused, never\n"
	"overwritten.  Give it to every node with --secret-file.  Without --out the\n"
	"secret goes to standard output.\n";

static const char cli_usage_ca_init[] =
	"usage: ipop ca init --out DIR [--name NAME] [--days N]\n"
	"\n"
	"Create a network certificate authority in DIR: ca.key (keep it safe and\n"
	"offline), ca.crt and network.key, the admission secret every node gets\n"
	"with its certificate (handshakes need it; ca.crt alone gets no answer).\n"
	"ECDSA P-256; valid N days (default 3650).\n";

static const char cli_usage_cert_issue[] =
	"usage: ipop cert issue --ca DIR --ip A.B.C.D [--ip ...] [--route-for CIDR]...\n"
	"                       [--name NAME] [--days N | --valid-for DURATION] --out DIR\n"
	"\n"
	"Issue a node certificate: writes node.key, node.crt and copies of ca.crt and\n"
	"network.key to the --out DIR, ready for 'ipop up --cert-dir DIR'.  The\n"
	"certificate binds the node's virtual IPs, the prefixes it may route for (each\n"
	"at most /24), and its name.  Valid N days (default 365), or for DURATION\n"
	"(90s, 30m, 12h, 400d).  Nodes close links whose peer's certificate has\n"
	"expired, and warn a week ahead of their own.\n";

static const char cli_usage_ca_revoke[] =
	"usage: ipop ca revoke --ca DIR (--cert FILE | --serial HEX)\n"
	"\n"
	"Add a certificate's serial to DIR/crl.txt.  Copy that file to every node\n"
	"and run them with --crl FILE: it is re-read when it changes, and links of\n"
	"revoked certificates close.\n";

static const char cli_usage_dht[] =
	"usage: ipop dht get KEY [--control PATH]\n"
	"       ipop dht put KEY VALUE [--ttl SECONDS] [--control PATH]\n"
	"       ipop dht create KEY VALUE [--ttl SECONDS] [--control PATH]\n"
	"\n"
	"Read or write the overlay's DHT through the running node (for debugging).\n"
	"put overwrites; create succeeds only if the key is free (or ours).  Records\n"
	"expire after their TTL (default 300 s) unless written again.  Exit 1 when\n"
	"the key is not found or already taken.\n";

static const char cli_usage_route[] =
	"usage: ipop route add|del A.B.C.D/N [--control PATH]\n"
	"\n"
	"Start or stop routing for a prefix on the running node (like --route-for):\n"
	"for VMs or containers behind this host.  Each IP is published in the DHT;\n"
	"when an IP moves to another node ('route del' here, 'route add' there),\n"
	"senders follow within seconds.  At most /24.\n";

static const char cli_usage_resolve[] =
	"usage: ipop resolve NAME [--control PATH]\n"
	"\n"
	"Look NAME (or NAME.ipop) up in the overlay's DHT through the running node\n"
	"and print the virtual IP it was published for (ipop up --name NAME).\n"
	"Exit 1 when nobody published it.\n";

static const char cli_usage_map[] =
	"usage: ipop map [--svg FILE] [--control PATH]\n"
	"\n"
	"The ring as the running node knows it: itself and the nodes it has links\n"
	"to, placed on a circle by ring address, each link drawn by kind (near,\n"
	"far, shortcut, relayed, leaf) and labelled with virtual IPs and names.\n"
	"--svg FILE writes an SVG picture (- for standard output); without it the\n"
	"node's answer is printed as text.\n";

static const char cli_usage_nc[] =
	"usage: ipop nc [--socks ADDR:PORT] [--control PATH] HOST PORT\n"
	"\n"
	"Join standard input and output to TCP PORT of virtual host HOST (a virtual\n"
	"IP or a --name), through the SOCKS5 server of a user-mode node on this host\n"
	"(default 127.0.0.1:1080).  Without one (a tap node, or a program run with\n"
	"ipop exec) it connects directly, names looked up by the node on the control\n"
	"socket.  For ssh:  ssh -o ProxyCommand='ipop nc %h %p' user@h2\n";

static const char cli_usage_exec[] =
	"usage: ipop exec [--control PATH] [--] CMD [ARGS...]\n"
	"\n"
	"Run CMD inside the network of a running namespace-mode node of this user\n"
	"(ipop up --mode ns, with or without a command of its own): CMD sees the\n"
	"node's interface and virtual IP, keeps the user's uid, environment and\n"
	"working directory, and its exit status is exec's.  For MPI and ssh:\n"
	"  ipop exec -- mpirun --host 10.128.0.1,10.128.0.2 ./job\n"
	"Exit status: CMD's; 126 or 127 if CMD cannot run; 1 if the node has no\n"
	"namespace or refuses (another user); 3 if no node answers.\n";

static const char cli_usage_status[] =
	"usage: ipop status [--json] [--control PATH]\n"
	"\n"
	"Show the running node's ring address, virtual IP, connections (type,\n"
	"peer, transport, RTT, traffic) and drop counters.  --json for scripts.\n";

static const char cli_usage_ping[] =
	"usage: ipop ping [-c COUNT] [-i SECONDS] [-W SECONDS] [--control PATH] TARGET\n"
	"\n"
	"Send overlay echo requests through the running node to TARGET, a virtual\n"
	"IP or a 40-hex-digit ring address; print round-trip time and hop count.\n"
	"  -c COUNT     stop after COUNT replies or timeouts (default: until ^C)\n"
	"  -i SECONDS   wait between requests (default 1)\n"
	"  -W SECONDS   how long to wait for each reply (default 2)\n";

static void cli_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void cli_fail(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("ipop: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}

/* "udp://HOST:PORT" or "tcp://HOST:PORT"; port 1..65535 (0 allowed to listen). */
static int cli_parse_uri(const char *s, struct cli_uri *u, bool listening)
{
	const char *rest;
	if (!strncmp(s, "udp://", 6))
		u->proto = PROTO_UDP;
	else if (!strncmp(s, "tcp://", 6))
		u->proto = PROTO_TCP;
	else
		return -EINVAL;
	rest = s + 6;
	const char *colon = strrchr(rest, ':');
	if (!colon || colon == rest || (size_t)(colon - rest) >= sizeof u->host)
		return -EINVAL;
	memcpy(u->host, rest, (size_t)(colon - rest));
	u->host[colon - rest] = 0;
	char *end;
	errno = 0;
	long port = strtol(colon + 1, &end, 10);
	if (errno || *end || colon[1] == 0 || port < (listening ? 0 : 1) || port > 65535)
		return -EINVAL;
	u->port = (uint16_t)port;
	return 0;
}

static int cli_parse_ip(const char *s, struct cli_opts *o)
{
	char ipbuf[32];
	const char *slash = strchr(s, '/');
	size_t len = slash ? (size_t)(slash - s) : strlen(s);
	if (len >= sizeof ipbuf)
		return -EINVAL;
	memcpy(ipbuf, s, len);
	ipbuf[len] = 0;
	struct in_addr ia;
	if (inet_pton(AF_INET, ipbuf, &ia) != 1)
		return -EINVAL;
	long prefix = 16;
	if (slash) {
		char *end;
		prefix = strtol(slash + 1, &end, 10);
		if (*end || slash[1] == 0 || prefix < 1 || prefix > 32)
			return -EINVAL;
	}
	o->ip = ntohl(ia.s_addr);
	if (o->ip == 0)
		return -EINVAL;
	o->has_ip = true;
	o->prefix = (uint8_t)prefix;
	return 0;
}

static int cli_parse_level(const char *s)
{
	for (int i = 0; i < (int)ARRAY_LEN(log_level_names); i++)
		if (!strcmp(s, log_level_names[i]))
			return i;
	return -1;
}

static int cli_parse_seconds(const char *s, double *out, double max)
{
	char *end;
	double v = strtod(s, &end);
	if (*end || s == end || !(v >= 0.001) || v > max)
		return -EINVAL;
	*out = v;
	return 0;
}

static int cli_load_config(struct cli_opts *o, const char *path);

static int cli_resolve(const struct cli_uri *u, struct endpoint *ep, char *err, size_t errlen)
{
	struct addrinfo hints = { .ai_family = AF_INET }, *res = NULL;
	int rc = getaddrinfo(u->host, NULL, &hints, &res);
	if (rc != 0 || !res) {
		snprintf(err, errlen, "cannot resolve host '%s': %s", u->host, gai_strerror(rc));
		return -1;
	}
	const struct sockaddr_in *sa = (const struct sockaddr_in *)(void *)res->ai_addr;
	*ep = (struct endpoint){ .proto = u->proto, .ip = ntohl(sa->sin_addr.s_addr), .port = u->port };
	freeaddrinfo(res);
	return 0;
}

static int cli_port(const char *s, uint16_t *port)
{
	char *end;
	long p = strtol(s, &end, 10);
	if (*end || !*s || p < 1 || p > 65535)
		return -1;
	*port = (uint16_t)p;
	return 0;
}

static int cli_ipv4(const char *s, uint32_t *ip)
{
	struct in_addr ia;
	if (inet_pton(AF_INET, s, &ia) != 1)
		return -1;
	*ip = ntohl(ia.s_addr);
	return 0;
}

/* -L [BIND:]PORT:VIP:VPORT and -R VPORT:HOST:PORT, as ssh spells them. */
static int cli_parse_forward(struct cli_opts *o, const char *v0, bool remote)
{
	char buf[160], *part[4];
	int k = 0;
	bool udp = !strncmp(v0, "udp/", 4);
	const char *v = udp ? v0 + 4 : v0;
	if (strlen(v) >= sizeof buf || o->n_fwd >= CLI_FWD_MAX)
		goto bad;
	strcpy(buf, v);
	for (char *save = NULL, *t = strtok_r(buf, ":", &save); t && k < 4; t = strtok_r(NULL, ":", &save))
		part[k++] = t;
	struct fwd_spec *f = &o->fwd[o->n_fwd];
	*f = (struct fwd_spec){ .remote = remote, .udp = udp, .fd = -1,
				.local = { .proto = udp ? PROTO_UDP : PROTO_TCP, .ip = 0x7f000001u } };
	if (remote) {
		struct cli_uri u = { .proto = PROTO_TCP };
		char e[300];
		if (k != 3 || cli_port(part[0], &f->vport) < 0 || cli_port(part[2], &u.port) < 0 ||
		    strlen(part[1]) >= sizeof u.host)
			goto bad;
		strcpy(u.host, part[1]);
		if (cli_resolve(&u, &f->local, e, sizeof e) < 0) {
			cli_fail("-R %s: %s", v, e);
			return -1;
		}
	} else {
		int i = k == 4 ? 1 : 0;
		if ((k != 3 && k != 4) || (k == 4 && cli_ipv4(part[0], &f->local.ip) < 0) ||
		    cli_port(part[i], &f->local.port) < 0 || cli_ipv4(part[i + 1], &f->vip) < 0 ||
		    cli_port(part[i + 2], &f->vport) < 0)
			goto bad;
	}
	o->n_fwd++;
	return 0;
bad:
	cli_fail("bad %s '%s': %s", remote ? "-R" : "-L", v0, remote ?
		 "[udp/]VPORT:HOST:PORT, like -R 22:127.0.0.1:22" :
		 "[udp/][BIND:]PORT:VIP:VPORT, like -L 8080:10.128.0.2:80");
	return -1;
}

/* --socks ADDR:PORT | PORT | off; the default in user mode is 127.0.0.1:1080. */
static int cli_parse_socks(const char *s, struct endpoint *ep, bool *off)
{
	char host[64];
	const char *colon = strrchr(s, ':');
	*off = !strcmp(s, "off");
	*ep = (struct endpoint){ .proto = PROTO_TCP, .ip = 0x7f000001u, .port = 1080 };
	if (*off || !*s)
		return 0;
	if (!colon)
		return cli_port(s, &ep->port);
	snprintf(host, sizeof host, "%.*s", (int)(colon - s), s);
	return cli_ipv4(host, &ep->ip) < 0 || cli_port(colon + 1, &ep->port) < 0 ? -1 : 0;
}

static int cli_path(const struct cli_flag *f, const char *v, char out[256])
{
	if (!*v || strlen(v) >= 256) {
		cli_fail("bad --%s '%s': a path of 1 to 255 bytes", f->name, v);
		return -1;
	}
	strcpy(out, v);
	return 0;
}

/* Names go into certificate subjects and DNS-like lookups: keep them plain. */
static int cli_name(struct cli_opts *o, const char *v)
{
	size_t n = strlen(v);
	if (n == 0 || n >= sizeof o->name || strspn(v, "abcdefghijklmnopqrstuvwxyz"
	    "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.") != n) {
		cli_fail("bad --name '%s': 1 to 63 letters, digits, '-', '_' or '.'", v);
		return -1;
	}
	strcpy(o->name, v);
	return 0;
}

static int cli_grant_ip(struct cli_opts *o, const char *v)
{
	struct in_addr ia;
	if (inet_pton(AF_INET, v, &ia) != 1 || ia.s_addr == 0) {
		cli_fail("bad --ip '%s': an IPv4 address like 10.128.0.5", v);
		return -1;
	}
	if (o->grant.n_ips >= SEC_CERT_IPS_MAX) {
		cli_fail("too many --ip values (at most %d per certificate)", SEC_CERT_IPS_MAX);
		return -1;
	}
	o->grant.ips[o->grant.n_ips++] = ntohl(ia.s_addr);
	return 0;
}

static int cli_grant_route(struct cli_opts *o, const char *v)
{
	char ip[20];
	unsigned plen;
	struct in_addr ia;
	char tail;
	if (sscanf(v, "%19[0-9.]/%u%c", ip, &plen, &tail) != 2 || plen > 32 ||
	    inet_pton(AF_INET, ip, &ia) != 1 || o->grant.n_routes >= SEC_CERT_ROUTES_MAX) {
		cli_fail("bad --route-for '%s': a prefix like 10.128.7.0/24 (at most %d)", v, SEC_CERT_ROUTES_MAX);
		return -1;
	}
	uint32_t net = ntohl(ia.s_addr), mask = plen ? ~0u << (32 - plen) : 0;
	o->grant.route_net[o->grant.n_routes] = net & mask;
	o->grant.route_len[o->grant.n_routes++] = (uint8_t)plen;
	return 0;
}

/* --valid-for 90s, 30m, 12h or 400d: a certificate's lifetime to the
 * second, for short-lived credentials (and tests of expiry). */
static int cli_parse_valid_for(struct cli_opts *o, const char *v)
{
	static const struct { char unit; int64_t s; } units[] = { { 's', 1 }, { 'm', 60 }, { 'h', 3600 },
								 { 'd', 86400 } };
	char *end;
	long long k = strtoll(v, &end, 10);
	for (unsigned i = 0; i < sizeof units / sizeof units[0]; i++)
		if (*v >= '0' && *v <= '9' && end[0] == units[i].unit && !end[1] && k >= 1 &&
		    k <= 36500LL * 86400 / units[i].s) {
			o->valid_s = k * units[i].s;
			return 0;
		}
	cli_fail("bad --valid-for '%s': a number and a unit (s, m, h, d), e.g. 90s or 30d, at most 36500d", v);
	return -1;
}

/* --net 10.128.0.0/16: the network --ip auto draws from. */
static int cli_parse_net(struct cli_opts *o, const char *v)
{
	char ip[20], tail;
	unsigned plen;
	struct in_addr ia;
	if (sscanf(v, "%19[0-9.]/%u%c", ip, &plen, &tail) != 2 || plen < 1 || plen > 30 ||
	    inet_pton(AF_INET, ip, &ia) != 1) {
		cli_fail("bad --net '%s': a prefix like 10.128.0.0/16 (/1 to /30)", v);
		return -1;
	}
	o->net = ntohl(ia.s_addr) & ~0u << (32 - plen);
	o->net_len = (uint8_t)plen;
	o->has_net = true;
	return 0;
}

/* The run-time flags: addresses, control socket, logging, ping options. */
static int cli_apply_basic(struct cli_opts *o, const struct cli_flag *f, const char *v)
{
	char *end;
	switch (f->key) {
	case KEY_LISTEN:
	case KEY_BOOTSTRAP: {
		bool l = f->key == KEY_LISTEN;
		unsigned *cnt = l ? &o->n_listen : &o->n_boot;
		if (*cnt >= (l ? LISTEN_MAX : BOOTSTRAP_MAX)) {
			cli_fail("too many --%s values (at most %d)", f->name, l ? LISTEN_MAX : BOOTSTRAP_MAX);
			return -1;
		}
		if (cli_parse_uri(v, l ? &o->listen[*cnt] : &o->boot[*cnt], l) < 0) {
			cli_fail("bad --%s '%s': expected udp://HOST:PORT or tcp://HOST:PORT", f->name, v);
			return -1;
		}
		(*cnt)++;
		return 0;
	}
	case KEY_IP:
		if (o->cmd == CMD_CERT_ISSUE)
			return cli_grant_ip(o, v);
		if (!strcmp(v, "auto")) {
			o->ip_auto = true;
			o->has_ip = false;
			return 0;
		}
		o->ip_auto = false;
		if (cli_parse_ip(v, o) < 0) {
			cli_fail("bad --ip '%s': expected an IPv4 address like 10.128.0.5 or 10.128.0.5/16", v);
			return -1;
		}
		return 0;
	case KEY_CONTROL:
		if (strlen(v) >= sizeof o->control || !*v) {
			cli_fail("bad --control '%s': a path of at most %zu bytes", v, sizeof o->control - 1);
			return -1;
		}
		strcpy(o->control, v);
		return 0;
	case KEY_CONFIG:
		return cli_load_config(o, v);
	case KEY_LOG_LEVEL:
		if ((o->log_level = cli_parse_level(v)) < 0) {
			cli_fail("bad --log-level '%s': one of error, warn, info, debug", v);
			return -1;
		}
		return 0;
	case KEY_VERBOSE:
		o->log_level = o->log_level < LOG_DEBUG ? o->log_level + 1 : LOG_DEBUG;
		return 0;
	case KEY_QUIET:
		o->log_level = o->log_level > LOG_ERROR ? o->log_level - 1 : LOG_ERROR;
		return 0;
	case KEY_JSON:
		o->json = true;
		return 0;
	case KEY_COUNT:
		o->count = strtol(v, &end, 10);
		if (*end || !*v || o->count < 1) {
			cli_fail("bad -c '%s': a positive count", v);
			return -1;
		}
		return 0;
	case KEY_INTERVAL:
	case KEY_WAIT:
		if (cli_parse_seconds(v, f->key == KEY_WAIT ? &o->wait_s : &o->interval_s,
				      f->key == KEY_WAIT ? CTL_PING_TIMEOUT_MAX_MS / 1000 : 3600) < 0) {
			cli_fail("bad -%c '%s': seconds, from 0.001 to %d", f->short_name, v,
				 f->key == KEY_WAIT ? CTL_PING_TIMEOUT_MAX_MS / 1000 : 3600);
			return -1;
		}
		return 0;
	case KEY_HELP:
		o->help = true;
		return 0;
	default:
		return -1;
	}
}

/* Credentials, modes, front ends, certificate issuing. */
static int cli_apply_more(struct cli_opts *o, const struct cli_flag *f, const char *v)
{
	char *end;
	switch (f->key) {
	case KEY_INSECURE:
		if (v && *v && strcmp(v, "true") && strcmp(v, "yes")) {
			cli_fail("bad insecure value '%s': write just 'insecure' (or leave the key out)", v);
			return -1;
		}
		o->insecure = true;
		return 0;
	case KEY_SECRET_FILE:
	case KEY_CERT_DIR:
	case KEY_CRL:
	case KEY_OUT:
	case KEY_CA:
	case KEY_CERT:
		return cli_path(f, v, f->key == KEY_SECRET_FILE ? o->secret_file : f->key == KEY_CERT_DIR ?
				o->cert_dir : f->key == KEY_CRL ? o->crl : f->key == KEY_OUT ? o->out :
				f->key == KEY_CA ? o->ca_dir : o->cert);
	case KEY_ROUTE_FOR:
		return cli_grant_route(o, v);
	case KEY_VALID_FOR:
		return cli_parse_valid_for(o, v);
	case KEY_TTL:
		o->days = strtol(v, &end, 10);
		if (*end || !*v || o->days < 1 || o->days > DHT_TTL_MAX_S) {
			cli_fail("bad --ttl '%s': seconds, 1 to %d", v, DHT_TTL_MAX_S);
			return -1;
		}
		return 0;
	case KEY_MODE:
		for (int m = MODE_AUTO; m <= MODE_NONE; m++)
			if (!strcmp(v, cli_mode_names[m])) {
				o->mode = (enum cli_mode)m;
				return 0;
			}
		cli_fail("bad --mode '%s': auto, tap, user, ns or none", v);
		return -1;
	case KEY_SOCKS:
		if (strlen(v) >= sizeof o->socks || !*v) {
			cli_fail("bad --socks '%s': ADDR:PORT, PORT or off", v);
			return -1;
		}
		strcpy(o->socks, v);
		return 0;
	case KEY_SOCKS_PUBLIC:
		o->socks_public = true;
		return 0;
	case KEY_SOCKS_AUTH:
		return cli_path(f, v, o->socks_auth);
	case KEY_LOCAL_FWD:
	case KEY_REMOTE_FWD:
		return cli_parse_forward(o, v, f->key == KEY_REMOTE_FWD);
	case KEY_DEV:
		if (!*v || strlen(v) >= sizeof o->dev || strchr(v, '/') || strchr(v, ' ')) {
			cli_fail("bad --dev '%s': an interface name of 1 to 15 characters", v);
			return -1;
		}
		strcpy(o->dev, v);
		return 0;
	case KEY_MTU:
		o->mtu = strtol(v, &end, 10);
		if (*end || !*v || o->mtu < IP_MTU_MIN || o->mtu > IP_MTU_MAX) {
			cli_fail("bad --mtu '%s': %d to %d (the default %d fits any 1500-byte path)", v,
				 IP_MTU_MIN, IP_MTU_MAX, IP_MTU_DEFAULT);
			return -1;
		}
		return 0;
	case KEY_NAME:
		return cli_name(o, v);
	case KEY_DAYS:
		o->days = strtol(v, &end, 10);
		if (*end || !*v || o->days < 1 || o->days > 36500) {
			cli_fail("bad --days '%s': a whole number of days, 1 to 36500", v);
			return -1;
		}
		return 0;
	case KEY_SERIAL:
		o->serial.len = (uint8_t)(strlen(v) / 2);
		if (!o->serial.len || o->serial.len > SEC_SERIAL_MAX_BYTES || !buf_unhex(v, o->serial.b, o->serial.len)) {
			cli_fail("bad --serial '%s': the certificate serial in hex", v);
			return -1;
		}
		return 0;
	default:
		return -1;
	}
}

/* The zero-configuration flags: leases, resolver, metrics, map. */
static int cli_apply_zeroconf(struct cli_opts *o, const struct cli_flag *f, const char *v)
{
	switch (f->key) {
	case KEY_NET:
		return cli_parse_net(o, v);
	case KEY_STATE_FILE:
		return cli_path(f, v, o->state_file);
	case KEY_METRICS: {
		bool off;
		if (cli_parse_socks(v, &o->metrics, &off) < 0 || !*v) {
			cli_fail("bad --metrics '%s': ADDR:PORT, PORT (on 127.0.0.1) or off", v);
			return -1;
		}
		o->has_metrics = !off;
		return 0;
	}
	case KEY_SVG:
		return cli_path(f, v, o->svg);
	case KEY_DNS:
		if (v && *v && strcmp(v, "true") && strcmp(v, "yes")) {
			cli_fail("bad dns value '%s': write just 'dns' (or leave the key out)", v);
			return -1;
		}
		o->dns = true;
		return 0;
	default:
		return -1;
	}
}

/* The shortcut flags: whole numbers in a range. */
static int cli_apply_shortcut(struct cli_opts *o, const struct cli_flag *f, const char *v)
{
	static const struct { long lo, hi; const char *what; } range[] = {
		[KEY_SHORTCUT_PPS - KEY_SHORTCUT_PPS] = { 0, 1000000, "packets per second, 0 to 1000000 (0: no shortcuts)" },
		[KEY_SHORTCUT_MAX - KEY_SHORTCUT_PPS] = { 1, RING_SC_MAX_LIMIT, "links, 1 to 64" },
		[KEY_SHORTCUT_IDLE - KEY_SHORTCUT_PPS] = { 1, 86400, "seconds, 1 to 86400" },
	};
	unsigned i = (unsigned)(f->key - KEY_SHORTCUT_PPS);
	char *end;
	long x = strtol(v, &end, 10);
	if (*end || !*v || x < range[i].lo || x > range[i].hi) {
		cli_fail("bad --%s '%s': %s", f->name, v, range[i].what);
		return -1;
	}
	*(f->key == KEY_SHORTCUT_PPS ? &o->sc_pps : f->key == KEY_SHORTCUT_MAX ? &o->sc_max : &o->sc_idle_s) = x;
	o->sc_pps_set |= f->key == KEY_SHORTCUT_PPS;
	return 0;
}

/* Apply one flag or config key; on error print one line and return -1. */
static int cli_apply(struct cli_opts *o, const struct cli_flag *f, const char *v)
{
	if (f->key >= KEY_SHORTCUT_PPS)
		return cli_apply_shortcut(o, f, v);
	if (f->key >= KEY_NET)
		return cli_apply_zeroconf(o, f, v);
	return f->key <= KEY_HELP ? cli_apply_basic(o, f, v) : cli_apply_more(o, f, v);
}

static const struct cli_flag *cli_flag_find(const char *name, char short_name, unsigned cmd)
{
	for (unsigned i = 0; i < ARRAY_LEN(cli_flags); i++) {
		const struct cli_flag *f = &cli_flags[i];
		if (!(f->cmds & cmd))
			continue;
		if ((name && !strcmp(f->name, name)) || (!name && short_name && f->short_name == short_name))
			return f;
	}
	return NULL;
}

static char *cli_trim(char *s)
{
	while (isspace((unsigned char)*s))
		s++;
	char *e = s + strlen(s);
	while (e > s && isspace((unsigned char)e[-1]))
		*--e = 0;
	return s;
}

/* One config line: "key = value", "key value" or "key" for a switch. */
static int cli_config_line(struct cli_opts *o, char *line, const char *path, int lineno)
{
	char *hash = strchr(line, '#');
	if (hash)
		*hash = 0;
	char *s = cli_trim(line);
	if (!*s)
		return 0;
	size_t klen = strcspn(s, " \t=");
	char *v = s + klen;
	v += strspn(v, " \t");
	if (*v == '=')
		v++;
	s[klen] = 0;
	const struct cli_flag *f = cli_flag_find(s, 0, CMD_UP);
	if (!f || !f->in_config) {
		cli_fail("%s:%d: unknown key '%s' (keys are the long options of 'ipop up')", path, lineno, s);
		return -1;
	}
	v = cli_trim(v);
	if (f->takes_value && !*v) {
		cli_fail("%s:%d: key '%s' needs a value", path, lineno, f->name);
		return -1;
	}
	return cli_apply(o, f, v);
}

static int cli_load_config(struct cli_opts *o, const char *path)
{
	FILE *fp = fopen(path, "r");
	if (!fp) {
		cli_fail("cannot read config file %s: %s", path, strerror(errno));
		return -1;
	}
	char line[1024];
	int lineno = 0, rc = 0;
	while (rc == 0 && fgets(line, sizeof line, fp)) {
		lineno++;
		if (!strchr(line, '\n') && !feof(fp)) {
			cli_fail("%s:%d: line too long", path, lineno);
			rc = -1;
		} else {
			rc = cli_config_line(o, line, path, lineno);
		}
	}
	if (rc == 0 && ferror(fp)) {
		cli_fail("cannot read config file %s: %s", path, strerror(errno));
		rc = -1;
	}
	fclose(fp);
	return rc;
}

/* Parse "--name value", "--name=value", "-x value", switches and the one
 * positional argument (ping's target); up's and exec's command after "--"
 * (exec's also at its first word that is no option, as env(1) takes it).
 * -1 on error (already printed). */
static int cli_parse_args(struct cli_opts *o, int argc, char **argv, const char *cmdname)
{
	for (int i = 0; i < argc; i++) {
		char *a = argv[i], *val = NULL;
		const struct cli_flag *f = NULL;
		if (!strcmp(a, "--") && (o->cmd == CMD_UP || o->cmd == CMD_EXEC)) {
			o->exec_argv = i + 1 < argc ? &argv[i + 1] : NULL;
			break;
		}
		if (o->cmd == CMD_EXEC && a[0] != '-') {
			o->exec_argv = &argv[i];
			break;
		}
		if (a[0] == '-' && a[1] == '-' && a[2]) {
			char name[64];
			char *eq = strchr(a + 2, '=');
			size_t len = eq ? (size_t)(eq - a - 2) : strlen(a + 2);
			snprintf(name, sizeof name, "%.*s", (int)(len < 63 ? len : 63), a + 2);
			f = cli_flag_find(name, 0, o->cmd);
			val = eq ? eq + 1 : NULL;
		} else if (a[0] == '-' && a[1] && a[1] != '-') {
			/* -c5 carries its value; -vv repeats a switch. */
			f = cli_flag_find(NULL, a[1], o->cmd);
			if (f && a[2] && f->takes_value) {
				val = a + 2;
			} else if (f && a[2]) {
				for (const char *p = a + 2; *p; p++)
					if (*p != a[1]) {
						cli_fail("%s: unknown option '%s' (see 'ipop %s --help')", cmdname, a, cmdname);
						return -1;
					}
				for (const char *p = a + 2; *p; p++)
					cli_apply(o, f, NULL);
			}
		} else if (o->cmd == CMD_PING && !o->target) {
			o->target = a;
			continue;
		} else if ((o->cmd & CMD_DHT || o->cmd == CMD_ROUTE || o->cmd == CMD_NC || o->cmd == CMD_RESOLVE) &&
			   o->n_args < (o->cmd == CMD_DHT_PUT || o->cmd == CMD_DHT_CREATE || o->cmd == CMD_NC ? 2 : 1)) {
			o->args[o->n_args++] = a;
			continue;
		} else {
			cli_fail("%s: unexpected argument '%s' (see 'ipop %s --help')", cmdname, a, cmdname);
			return -1;
		}
		if (!f) {
			cli_fail("%s: unknown option '%s' (see 'ipop %s --help')", cmdname, a, cmdname);
			return -1;
		}
		if (f->takes_value && !val) {
			if (i + 1 >= argc) {
				cli_fail("%s: option '%s' needs a value", cmdname, a);
				return -1;
			}
			val = argv[++i];
		} else if (!f->takes_value && val) {
			cli_fail("%s: option '--%s' takes no value", cmdname, f->name);
			return -1;
		}
		if (cli_apply(o, f, val) < 0)
			return -1;
	}
	return 0;
}


/* ===================================================================== 16b cli_
 * ipop up: from parsed options to a running node.  Listeners, credentials,
 * identity and the --ip auto lease, the interface (tap, namespace, user
 * mode), remembered peers and bootstraps, the fd limit, signals (SIGHUP
 * reloads what can change without touching links), and the main loop.
 * Continues section 16 (same prefix, struct cli_opts); split for length.
 * ========================================================================= */

/* ---- node setup (ipop up) ------------------------------------------ */

static int cli_listener_open(struct node *n, const struct endpoint *ep, char *err, size_t errlen)
{
	char uri[40];
	link_endpoint_uri(ep, uri);
	struct listener *L = &n->listeners[n->n_listeners];
	L->proto = ep->proto;
	L->sa = link_sockaddr_of(ep);
	L->fd = socket(AF_INET, (ep->proto == PROTO_UDP ? SOCK_DGRAM : SOCK_STREAM) |
			   SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	int one = 1;
	if (L->fd >= 0 && ep->proto == PROTO_TCP) /* TIME_WAIT only; two listeners still clash */
		setsockopt(L->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (L->fd >= 0 && ep->proto == PROTO_UDP)
		link_udp_buffers(L->fd);
	socklen_t sl = sizeof L->sa;
	if (L->fd < 0 || bind(L->fd, (struct sockaddr *)&L->sa, sizeof L->sa) < 0 ||
	    (ep->proto == PROTO_TCP && listen(L->fd, 128) < 0) ||
	    getsockname(L->fd, (struct sockaddr *)&L->sa, &sl) < 0) {
		int e = errno;
		snprintf(err, errlen, "cannot listen on %s: %s%s", uri, strerror(e),
			 e == EADDRINUSE ? " (another program holds that port; choose another with --listen)" :
			 e == EACCES ? " (ports below 1024 need privileges; choose a higher one)" : "");
		if (L->fd >= 0)
			close(L->fd);
		return -1;
	}
	ev_fd_watch(&n->loop, L->fd, EPOLLIN, ep->proto == PROTO_UDP ? link_udp_readable : link_tcp_accept, n);
	n->n_listeners++;
	return 0;
}

/* Without --listen: UDP and TCP on port 4000 of every address.  TCP is
 * what a peer at a site that lets no UDP out can still reach (as tinc
 * listens on both), so a public node must offer it without being told;
 * if another program holds TCP port 4000 the node runs on UDP alone. */
static int cli_default_listeners(struct node *n, char *err, size_t errlen)
{
	struct endpoint udp = { PROTO_UDP, 0, 4000 }, tcp = { PROTO_TCP, 0, 4000 };
	char why[300];
	if (cli_listener_open(n, &udp, err, errlen) < 0)
		return -1;
	if (cli_listener_open(n, &tcp, why, sizeof why) < 0)
		log_warn("cli", "%s: links over TCP are not accepted", why);
	return 0;
}

/* What we advertise at the start (nat_start keeps it up to date). */
static void cli_self_endpoints(struct node *n)
{
	n->self.n_endpoints = (uint8_t)nat_collect_own(n, n->self.endpoints);
}

struct cli_run;
static int cli_signals_open(struct cli_run *r, int *sfd);

static void cli_node_free(struct node *n)
{
	for (struct link *l = n->links; l; l = l->next)
		link_close(l, 0);
	link_free_all(n);
	for (unsigned i = 0; i < n->n_listeners; i++)
		close(n->listeners[i].fd);
	if (n->udp_dial_fd >= 0)
		close(n->udp_dial_fd);
	if (n->tx)
		free(n->tx->buf);
	if (n->rx)
		free(n->rx->buf);
	free(n->tx);
	free(n->rx);
	if (n->nat && n->nat->ifaddr_fd >= 0)
		close(n->nat->ifaddr_fd);
	if (n->nat)
		free(n->nat->plans);
	free(n->nat);
	n->nat = NULL;
	free(n->contacts);
	n->contacts = NULL;
	ring_free(n);
	tap_close(n);
	tap_ns_close(n);
	if (n->lw.socks_fd > 0)
		close(n->lw.socks_fd);
	while (n->lw.n_negotiating)     /* each leaves the list as it goes */
		socks_client_free(n->lw.negotiating[0]);
	free(n->lw.negotiating);
	n->lw.negotiating = NULL;
	for (unsigned i = 0; i < n->lw.n_fwd; i++) {
		if (n->lw.fwd[i].fd >= 0)
			close(n->lw.fwd[i].fd);
		for (unsigned j = 0; n->lw.fwd[i].sess && j < FWD_UDP_SESSIONS_MAX; j++)
			if (n->lw.fwd[i].sess[j].fd >= 0)
				close(n->lw.fwd[i].sess[j].fd);
		free(n->lw.fwd[i].sess);
	}
	free(n->lw.fwd);
	while (n->lw.pipes)
		fwd_pipe_free(n->lw.pipes);
	if (n->lw.socks_auth)
		sec_wipe(n->lw.socks_auth, strlen(n->lw.socks_auth));
	free(n->lw.socks_auth);
	ip_stop(n);
	dht_stop(n);
	sec_creds_free(&n->sec);
	sec_rng_free(&n->rng);
	ev_fini(&n->loop);
}

/* User mode: lwIP owns the virtual IP; SOCKS and forwards reach it. */
static int cli_node_user_mode(struct node *n, const struct cli_opts *o, char *err, size_t errlen)
{
	bool off;
	lw_start(n);
	n->lw.socks_fd = -1;
	if (cli_parse_socks(o->socks, &n->lw.socks, &off) < 0) {
		snprintf(err, errlen, "bad --socks '%s': ADDR:PORT, PORT or off", o->socks);
		return -2;
	}
	if (o->socks_auth[0]) {
		uint8_t *text;
		size_t len;
		if (sec_read_file(o->socks_auth, true, &text, &len, err, errlen) < 0)
			return -1;
		n->lw.socks_auth = (char *)text;        /* user:password lines */
	}
	if (!off && (n->lw.socks.ip >> 24) != 127 && !o->socks_public && !n->lw.socks_auth) {
		snprintf(err, errlen, "--socks %s is reachable from other hosts: require logins with "
			 "--socks-auth FILE, or add --socks-public if an open proxy is what you want", o->socks);
		return -2;
	}
	if (!off && (n->lw.socks_fd = socks_listen_tcp(n, &n->lw.socks, socks_accept, n, "SOCKS", err, errlen)) < 0) {
		snprintf(err + strlen(err), errlen - strlen(err), " (choose another with --socks ADDR:PORT, or --socks off)");
		return -1;
	}
	n->lw.fwd = calloc(CLI_FWD_MAX, sizeof *n->lw.fwd);
	for (unsigned i = 0; n->lw.fwd && i < o->n_fwd; i++) {
		n->lw.fwd[i] = o->fwd[i];
		if (fwd_start(n, &n->lw.fwd[i], err, errlen) < 0)
			return -1;
		n->lw.n_fwd++;
	}
	return 0;
}

/* Namespace mode: the device and namespaces come from a child; say how to
 * get in when no command was given. */
static int cli_ns_start(struct node *n, const struct cli_opts *o, char *err, size_t errlen)
{
	char ip[16];
	struct tap_ns_listen ls = { 0 };
	for (unsigned i = 0; i < o->n_fwd; i++) {
		if (!o->fwd[i].remote || o->fwd[i].udp) {
			snprintf(err, errlen, "namespace mode takes -R VPORT:HOST:PORT (TCP) only: programs in the "
				 "namespace reach virtual hosts directly, without -L or --socks");
			return -2;
		}
		ls.port[ls.n++] = o->fwd[i].vport;
	}
	if (o->socks[0]) {
		snprintf(err, errlen, "--socks is for user mode: in namespace mode, run programs with ipop exec");
		return -2;
	}
	int rc = tap_ns_spawn(n, o->exec_argv, &ls, err, errlen);
	n->lw.fwd = rc == 0 ? calloc(CLI_FWD_MAX, sizeof *n->lw.fwd) : NULL;
	for (unsigned i = 0; rc == 0 && i < ls.n; i++) {
		if (!n->lw.fwd) {
			close(ls.fd[i]);
			continue;
		}
		n->lw.fwd[i] = o->fwd[i];
		n->lw.fwd[i].fd = ls.fd[i];
		n->lw.n_fwd++;
		rc = fwd_ns_start(n, &n->lw.fwd[i], err, errlen);
	}
	buf_ip_str(n->self.vip, ip);
	if (rc == 0 && !o->exec_argv)
		log_info("cli", "namespace ready: %s has %s; run programs in it with: ipop exec%s%s -- CMD",
			 n->tap.name, ip, o->control[0] ? " --control " : "", o->control);
	return rc;
}

/* The local interface: a tap when the node has a virtual IP and may open one. */
static int cli_node_interface(struct node *n, const struct cli_opts *o, char *err, size_t errlen)
{
	ip_start(n, (int)o->mtu);
	for (unsigned i = 0; i < o->grant.n_routes; i++) {
		struct ip_route r = { o->grant.route_net[i], o->grant.route_len[i] };
		char net[16];
		buf_ip_str(r.net, net);
		if (ip_route_width_check(r.net, r.len, err, errlen) < 0)
			return -2;
		if (n->sec.mode == SEC_CERT) {
			char key[24], key2[24], last[16];
			buf_ip_str(r.net | (r.len < 32 ? ~0u >> r.len : 0), last);
			snprintf(key, sizeof key, "ip:%s", net);
			snprintf(key2, sizeof key2, "ip:%s", last);
			if (!dht_key_granted(&n->sec.ctx->own_grant, key) || !dht_key_granted(&n->sec.ctx->own_grant, key2)) {
				snprintf(err, errlen, "--route-for %s/%u is not granted by this node's certificate "
					 "(issue one with 'ipop cert issue --route-for')", net, r.len);
				return -2;
			}
		}
		if (n->ip.n_routes && ip_route_has(&n->ip, r.net))
			continue;
		if (!ip_route_room(&n->ip)) {    /* at most SEC_CERT_ROUTES_MAX here: out of memory */
			snprintf(err, errlen, "--route-for %s/%u: out of memory", net, r.len);
			return -1;
		}
		n->ip.routes[n->ip.n_routes++] = r;
	}
	if ((o->mode != MODE_NS && o->exec_argv) || (o->mode == MODE_NS && !n->self.vip)) {
		snprintf(err, errlen, "--mode ns needs --ip (and a command after '--' needs --mode ns): "
			 "ipop up --mode ns --ip 10.128.0.5/16 ... [-- CMD]");
		return -2;
	}
	if (o->mode == MODE_NS)
		return cli_ns_start(n, o, err, errlen);
	if ((!n->self.vip && !n->ip.lease.on) || o->mode == MODE_NONE) {
		if (o->n_fwd || o->socks[0]) {
			snprintf(err, errlen, "-L, -R and --socks need a virtual IP (--ip) and user mode");
			return -2;
		}
		return 0;
	}
	if (o->mode != MODE_USER) {
		int rc = tap_open(n, o->dev[0] ? o->dev : "ipop%d", err, errlen);
		if (rc == 0 && (o->n_fwd || o->socks[0]))
			log_warn("cli", "tap mode: -L, -R and --socks are for user mode; use the kernel's own "
				 "sockets (ssh -L, socat) on %s", n->tap.name);
		if (rc == 0)
			return 0;
		if ((rc != -EPERM && rc != -ENODEV) || o->mode == MODE_TAP) {
			if (rc == -EPERM)
				snprintf(err + strlen(err), errlen - strlen(err), "; without root, use --mode user");
			return -1;
		}
		log_info("cli", "%s: running in user mode instead (lwIP in-process)", err);
	}
	return cli_node_user_mode(n, o, err, errlen);
}

/* Load the network credentials; -2 for a usage error, -1 for a bad file. */
static int cli_node_creds(struct node *n, const struct cli_opts *o, char *err, size_t errlen)
{
	int chosen = (o->secret_file[0] != 0) + (o->cert_dir[0] != 0) + o->insecure;
	if (chosen != 1) {
		snprintf(err, errlen, "%s", chosen ? "choose one of --secret-file, --cert-dir and --insecure" :
			 "no network credentials: give --secret-file FILE (make one with 'ipop genkey --out net.key'), "
			 "--cert-dir DIR (from 'ipop cert issue'), or --insecure");
		return -2;
	}
	if (o->crl[0] && !o->cert_dir[0]) {
		snprintf(err, errlen, "--crl needs --cert-dir: revocation applies to certificates");
		return -2;
	}
	if (o->secret_file[0])
		return sec_load_secret(&n->sec, o->secret_file, err, errlen);
	if (o->insecure) {
		log_warn("cli", "--insecure: links are neither authenticated nor encrypted; anyone who "
			 "reaches this node can join the network and read its traffic");
		return 0;
	}
	if (sec_load_cert_dir(&n->sec, &n->rng, o->cert_dir, err, errlen) < 0)
		return -1;
	if (!n->sec.admission)
		log_warn("cli", "%s has no " SEC_ADMISSION_FILE ": handshakes are gated by ca.crt alone, so anyone "
			 "with it can make this node do handshake work (docs/SECURITY.md, section 3)", o->cert_dir);
	snprintf(n->sec.ctx->crl_path, sizeof n->sec.ctx->crl_path, "%s", o->crl);
	return sec_crl_refresh(&n->sec, err, errlen) < 0 ? -1 : 0;
}

/* mkdir -p for the state directory; private, like the control socket's. */
static int cli_mkdirs(const char *path)
{
	char d[256];
	snprintf(d, sizeof d, "%s", path);
	for (char *p = d + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = 0;
		if (mkdir(d, 0700) < 0 && errno != EEXIST)
			return -errno;
		*p = '/';
	}
	return mkdir(d, 0700) < 0 && errno != EEXIST ? -errno : 0;
}

/* The --ip auto state file: --state-file, else one per network (its prefix
 * and a hash of its credentials) under $XDG_STATE_HOME/ipop or
 * ~/.local/state/ipop. */
/* $XDG_STATE_HOME/ipop or ~/.local/state/ipop; false with neither set. */
static bool cli_state_dir(char dir[200])
{
	const char *xdg = getenv("XDG_STATE_HOME"), *home = getenv("HOME");
	if (xdg && *xdg == '/')
		snprintf(dir, 200, "%s/ipop", xdg);
	else if (home && *home == '/')
		snprintf(dir, 200, "%s/.local/state/ipop", home);
	else
		return false;
	return true;
}

static int cli_lease_path(struct node *n, const struct cli_opts *o, char *err, size_t errlen)
{
	char *out = n->ip.lease.path, dir[200], net[16], id[9];
	if (o->state_file[0]) {
		snprintf(out, sizeof n->ip.lease.path, "%s", o->state_file);
		return 0;
	}
	if (!cli_state_dir(dir)) {
		snprintf(err, errlen, "--ip auto: no state directory ($XDG_STATE_HOME and $HOME unset): "
			 "give --state-file FILE");
		return -2;
	}
	int rc = cli_mkdirs(dir);
	if (rc < 0) {
		snprintf(err, errlen, "cannot create state directory %s: %s (or give --state-file FILE)", dir,
			 strerror(-rc));
		return -1;
	}
	uint8_t h[32];
	sec_sha256("ipop state", 10, n->sec.salt, SEC_KEY_BYTES, h);
	buf_hex(h, 4, id);
	buf_ip_str(o->net, net);
	snprintf(out, sizeof n->ip.lease.path, "%s/lease-%s-%u-%s", dir, net, o->net_len, id);
	return 0;
}

/* --ip auto: the saved lease, or a random ring address to claim one with. */
static int cli_node_lease(struct node *n, const struct cli_opts *o, char *err, size_t errlen)
{
	bool have_addr;
	if (n->sec.mode == SEC_CERT) {
		snprintf(err, errlen, "--ip auto is for --secret-file and --insecure networks: in a "
			 "certificate network the certificate names the node's IP");
		return -2;
	}
	if (o->mode == MODE_NS) {
		snprintf(err, errlen, "--ip auto does not work with --mode ns yet: give --ip A.B.C.D");
		return -2;
	}
	int rc = cli_lease_path(n, o, err, errlen);
	if (rc < 0)
		return rc;
	n->vip_prefix = o->net_len;
	n->ip.net = o->net;
	n->ip.mask = ~0u << (32 - o->net_len);
	n->ip.lease.on = true;
	ip_lease_load(n->ip.lease.path, &n->ip, &n->ip.lease.candidate, &n->self.addr, &have_addr);
	if (!have_addr)
		sec_random(&n->rng, n->self.addr.b, RING_ADDR_BYTES);
	return 0;
}

/* The node's virtual IP and ring address: from --ip, from its certificate,
 * or random for a router-only node. */
static int cli_node_identity(struct node *n, const struct cli_opts *o, char *err, size_t errlen)
{
	snprintf(n->name, sizeof n->name, "%s", o->name);
	if (n->sec.mode == SEC_CERT && o->name[0] && strcmp(o->name, n->sec.ctx->own_grant.name)) {
		snprintf(err, errlen, "--name %s is not the name in this node's certificate (%s)", o->name,
			 n->sec.ctx->own_grant.name[0] ? n->sec.ctx->own_grant.name : "none");
		return -2;
	}
	if (n->sec.mode == SEC_CERT && !o->name[0] &&
	    strspn(n->sec.ctx->own_grant.name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.") ==
	    strlen(n->sec.ctx->own_grant.name))
		snprintf(n->name, sizeof n->name, "%s", n->sec.ctx->own_grant.name);
	n->self.vip = o->has_ip ? o->ip : 0;
	n->vip_prefix = o->has_ip ? o->prefix : 16;
	if (o->ip_auto)
		return cli_node_lease(n, o, err, errlen);
	if (o->has_net && o->has_ip && (o->ip & ~0u << (32 - o->net_len)) != o->net) {
		char ip[16], net[16];
		buf_ip_str(o->ip, ip);
		buf_ip_str(o->net, net);
		snprintf(err, errlen, "--ip %s is not in --net %s/%u", ip, net, o->net_len);
		return -2;
	}
	if (o->has_net && o->has_ip)
		n->vip_prefix = o->net_len;
	if (n->sec.mode == SEC_CERT) {
		const struct sec_grant *g = &n->sec.ctx->own_grant;
		if (!o->has_ip && g->n_ips)
			n->self.vip = g->ips[0];
		if (!sec_cert_addr(&n->sec.ctx->own, g, n->self.vip, &n->self.addr)) {
			char ip[16];
			buf_ip_str(n->self.vip, ip);
			snprintf(err, errlen, "--ip %s is not in this node's certificate (%s/node.crt)",
				 n->self.vip ? ip : "(none)", o->cert_dir);
			return -2;
		}
	} else if (n->self.vip) {
		n->self.addr = sec_addr_of_ip(n->self.vip);
	} else {
		sec_random(&n->rng, n->self.addr.b, RING_ADDR_BYTES);
	}
	return 0;
}

/* -2: a usage error (exit 2), -1: anything else (exit 1). */
/* Where this node keeps the peers it linked to (ring_remember): next to
 * the --ip auto state, one file per network and node, so that a restarted
 * node rejoins through them when its bootstraps are gone.  With no state
 * directory nothing is kept; that costs only this convenience. */
static void cli_remember_path(struct node *n, const struct cli_opts *o, char out[288])
{
	char dir[200], id[9], who[24];
	uint8_t h[32];
	out[0] = 0;
	if (n->ip.lease.on) {
		snprintf(out, 288, "%s.peers", n->ip.lease.path);
		return;
	}
	if (o->state_file[0]) {
		snprintf(out, 288, "%s.peers", o->state_file);
		return;
	}
	if (!cli_state_dir(dir) || cli_mkdirs(dir) < 0)
		return;
	sec_sha256("ipop state", 10, n->sec.salt, SEC_KEY_BYTES, h);
	buf_hex(h, 4, id);
	if (n->self.vip)
		buf_ip_str(n->self.vip, who);
	else
		snprintf(who, sizeof who, "router-%u", n->n_listeners ? ntohs(n->listeners[0].sa.sin_port) : 0);
	snprintf(out, 288, "%s/peers-%s-%s", dir, id, who);
}

/* Read the remembered peers: one URI a line, numbers only. */
static void cli_remember_load(struct node *n, const struct cli_opts *o)
{
	char line[300];
	cli_remember_path(n, o, n->ring.remember_path);
	FILE *f = n->ring.remember_path[0] ? fopen(n->ring.remember_path, "r") : NULL;
	while (f && fgets(line, sizeof line, f) && n->ring.n_remembered < RING_REMEMBER_MAX) {
		struct cli_uri u;
		uint32_t ip;
		line[strcspn(line, "\r\n")] = 0;
		if (line[0] == '#' || cli_parse_uri(line, &u, false) < 0 || cli_ipv4(u.host, &ip) < 0 ||
		    link_overlay_ip(n, ip))
			continue;
		n->ring.remembered[n->ring.n_remembered++] = (struct endpoint){ u.proto, ip, u.port };
	}
	if (f)
		fclose(f);
	if (n->ring.n_remembered)
		log_info("cli", "%u remembered peer(s) from %s", n->ring.n_remembered, n->ring.remember_path);
}

/* The running node's bootstrap URIs, for the ring's hook below. */
static struct cli_uri cli_boot_uris[BOOTSTRAP_MAX];

/* Before a node with no link dials its bootstraps: their names again (a
 * host that moved, or DNS that was down at the start).  It blocks, but a
 * node without links has nothing to keep alive; numbers cost nothing. */
static void cli_boot_resolve(struct node *n)
{
	for (unsigned i = 0; i < n->ring.n_boot; i++) {
		struct endpoint ep;
		char err[300];
		if (cli_resolve(&cli_boot_uris[i], &ep, err, sizeof err) == 0)
			n->ring.boot[i] = ep;
		else
			log_warn("cli", "bootstrap %s (trying its last address)", err);
	}
}

static int cli_node_init(struct node *n, const struct cli_opts *o, char *err, size_t errlen)
{
	*n = (struct node){ .udp_dial_fd = -1, .tap.fd = -1, .tap.ns_fd = { -1, -1 }, .lw.socks_fd = -1 };
	if (ev_init(&n->loop) < 0 || sec_rng_init(&n->rng) < 0 || sec_creds_init(&n->sec) < 0) {
		snprintf(err, errlen, "cannot start the event loop or random generator: %s", strerror(errno));
		return -1;
	}
	if (o->ip_auto && !o->has_net) {
		snprintf(err, errlen, "--ip auto needs --net, the network to draw from: "
			 "--ip auto --net 10.128.0.0/16");
		return -2;
	}
	n->start_ms = ev_now(&n->loop);
	n->self.instance = sec_random_u64(&n->rng);
	n->self.started = (uint32_t)time(NULL);
	int rc = cli_node_creds(n, o, err, errlen);
	if (rc < 0 || (rc = cli_node_identity(n, o, err, errlen)) < 0 ||
	    (rc = cli_node_interface(n, o, err, errlen)) < 0)
		return rc;
	for (unsigned i = 0; i < o->n_boot; i++) {
		char e2[300];
		if (cli_resolve(&o->boot[i], &n->ring.boot[i], e2, sizeof e2) < 0) {
			snprintf(err, errlen, "bootstrap %s", e2);
			return -1;
		}
	}
	n->ring.n_boot = o->n_boot;
	memcpy(cli_boot_uris, o->boot, o->n_boot * sizeof o->boot[0]);
	n->up.boot_resolve = cli_boot_resolve;
	for (unsigned i = 0; i < o->n_listen; i++) {
		struct endpoint ep;
		if (cli_resolve(&o->listen[i], &ep, err, errlen) < 0 || cli_listener_open(n, &ep, err, errlen) < 0)
			return -1;
	}
	if (!o->n_listen && cli_default_listeners(n, err, errlen) < 0)
		return -1;
	cli_self_endpoints(n);
	cli_remember_load(n, o);
	return 0;
}

/* Namespace mode: when the command ends, so does the node, with its status. */
static void cli_reap_child(struct node *n)
{
	int st;
	if (!n->ns_child || waitpid(n->ns_child, &st, WNOHANG) != n->ns_child)
		return;
	n->ns_child = 0;
	n->exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
	log_info("cli", "the command exited (status %d): leaving the ring", n->exit_code);
	n->loop.stop = true;
}

/* What the signal handler works with: the node and how it was started. */
struct cli_run {
	struct node *n;
	const struct cli_opts *o;
};

/* New bootstrap peers; false (and a warning) if one does not resolve. */
static bool cli_reload_boot(struct node *n, const struct cli_opts *o)
{
	struct endpoint boot[BOOTSTRAP_MAX];
	char err[300];
	for (unsigned i = 0; i < o->n_boot; i++)
		if (cli_resolve(&o->boot[i], &boot[i], err, sizeof err) < 0) {
			log_warn("cli", "SIGHUP: bootstrap %s: keeping the previous peers", err);
			return false;
		}
	memcpy(n->ring.boot, boot, o->n_boot * sizeof boot[0]);
	memcpy(cli_boot_uris, o->boot, o->n_boot * sizeof o->boot[0]);
	n->ring.n_boot = o->n_boot;
	n->ring.boot_backoff_ms = 0;
	n->ring.next_boot_ms = 0;
	return true;
}

/* SIGHUP: parse the command line, and so the config file, again and apply
 * what changes without touching links: bootstrap peers, the revocation list
 * (read now; links of newly revoked certificates close), the log level.
 * Anything else needs a restart.  A bad file keeps the running settings.
 * Bootstrap host names resolve here, blocking: an operator's action. */
/* --shortcut-pps, -max, -idle, at start and on SIGHUP; the next ring tick
 * applies them (a lower cap trims at once). */
static void cli_shortcuts_set(struct node *n, const struct cli_opts *o)
{
	n->ring.sc.pps = o->sc_pps_set ? (unsigned)o->sc_pps : RING_SC_PPS_DEFAULT;
	n->ring.sc.max = o->sc_max ? (unsigned)o->sc_max : RING_SC_MAX_DEFAULT;
	n->ring.sc.idle_ms = (uint64_t)(o->sc_idle_s ? o->sc_idle_s : RING_SC_IDLE_DEFAULT_S) * 1000;
}

static void cli_reload(struct cli_run *r)
{
	static struct cli_opts o;       /* large: off the stack */
	struct node *n = r->n;
	o = (struct cli_opts){ .cmd = CMD_UP, .log_level = LOG_INFO };
	if (cli_parse_args(&o, r->o->argc, r->o->argv, "up") < 0) {
		log_warn("cli", "SIGHUP: the configuration has an error (above): keeping the running one");
		return;
	}
	if (o.crl[0] && n->sec.mode != SEC_CERT) {
		log_warn("cli", "SIGHUP: crl needs a certificate network: keeping the running configuration");
		return;
	}
	if (!cli_reload_boot(n, &o))
		return;
	log_cfg.level = o.log_level;
	cli_shortcuts_set(n, &o);
	if (strcmp(n->sec.ctx->crl_path, o.crl)) {
		snprintf(n->sec.ctx->crl_path, sizeof n->sec.ctx->crl_path, "%s", o.crl);
		if (!o.crl[0])
			n->sec.ctx->n_revoked = 0;   /* no list any more; an unreadable new one keeps the old */
	}
	n->sec.ctx->crl_mtime = (struct timespec){ 0 };     /* read it now, changed or not */
	ev_timer_arm(&n->loop, &n->sec_timer, 0);
	log_info("cli", "SIGHUP: reloaded: %u bootstrap peer(s), revocation list %s, log level %s, shortcuts "
		 "over %u pkt/s (at most %u, %llu s idle)", n->ring.n_boot,
		 n->sec.ctx->crl_path[0] ? n->sec.ctx->crl_path : "none", log_level_names[log_cfg.level], n->ring.sc.pps,
		 n->ring.sc.max, (unsigned long long)(n->ring.sc.idle_ms / 1000));
}

static void cli_signal_event(struct ev_loop *loop, int fd, void *arg, uint32_t events)
{
	struct signalfd_siginfo si;
	struct cli_run *r = arg;
	(void)events;
	while (read(fd, &si, sizeof si) == (ssize_t)sizeof si) {
		if (si.ssi_signo == SIGCHLD) {
			cli_reap_child(r->n);
		} else if (si.ssi_signo == SIGHUP) {
			cli_reload(r);
		} else if (si.ssi_signo == SIGINT || si.ssi_signo == SIGTERM) {
			log_info("cli", "signal %u: leaving the ring", si.ssi_signo);
			loop->stop = true;
		}
	}
}

static int cli_signals_open(struct cli_run *r, int *sfd)
{
	struct node *n = r->n;
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGCHLD);
	sigaddset(&set, SIGHUP);
	signal(SIGPIPE, SIG_IGN);
	if (sigprocmask(SIG_BLOCK, &set, NULL) < 0)
		return -errno;
	*sfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
	if (*sfd < 0)
		return -errno;
	cli_reap_child(n);              /* a command that ended before we listened */
	return ev_fd_watch(&n->loop, *sfd, EPOLLIN, cli_signal_event, r);
}

static void cli_log_start(const struct node *n)
{
	char addr[2 * RING_ADDR_BYTES + 1], ip[20] = "none (router only)";
	ring_addr_hex(&n->self.addr, addr);
	if (n->self.vip)
		buf_ip_str(n->self.vip, ip);
	log_info("cli", "node %s, virtual ip %s, security: %s", addr, ip, sec_mode_names[n->sec.mode]);
	if (n->tap.fd >= 0)
		log_info("cli", "interface %s: %s/%u, mtu %d", n->tap.name, ip, n->vip_prefix, n->ip.mtu);
	if (n->lw.started) {
		char sip[16];
		buf_ip_str(n->lw.socks.ip, sip);
		log_info("cli", "user mode: %s/%u in lwIP; SOCKS5 %s%s:%u", ip, n->vip_prefix,
			 n->lw.socks_fd >= 0 ? "on " : "off", n->lw.socks_fd >= 0 ? sip : "",
			 n->lw.socks_fd >= 0 ? n->lw.socks.port : 0);
	}
	for (unsigned i = 0; i < n->n_listeners; i++) {
		char uri[40];
		struct endpoint e = link_endpoint_of(n->listeners[i].proto, &n->listeners[i].sa);
		link_endpoint_uri(&e, uri);
		log_info("cli", "listening on %s", uri);
	}
}

/* Run a helper program quietly and wait for it (at startup only). */
static int cli_run_quiet(char *const argv[])
{
	pid_t pid = fork();
	if (pid == 0) {
		int fd = open("/dev/null", O_RDWR);
		if (fd >= 0) {
			dup2(fd, 0);
			dup2(fd, 1);
			dup2(fd, 2);
		}
		execvp(argv[0], argv);
		_exit(127);
	}
	int st;
	if (pid < 0 || waitpid(pid, &st, 0) != pid)
		return -1;
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* --dns: send .ipop queries to the gateway through systemd-resolved when
 * it runs; never by rewriting /etc/resolv.conf behind the user's back. */
static void cli_dns_setup(const struct node *n)
{
	char gw[16], dev[16];
	buf_ip_str(ip_gateway(&n->ip), gw);
	if (n->tap.fd < 0 || !ip_gateway(&n->ip)) {
		log_warn("cli", "--dns is for tap mode (user mode's SOCKS server resolves NAME.ipop itself)");
		return;
	}
	snprintf(dev, sizeof dev, "%s", n->tap.name);
	char *set_dns[] = { "resolvectl", "dns", dev, gw, NULL };
	char *set_domain[] = { "resolvectl", "domain", dev, "~ipop", NULL };
	if (cli_run_quiet(set_dns) == 0 && cli_run_quiet(set_domain) == 0) {
		log_info("cli", "--dns: resolvectl sends *.ipop queries to %s on %s", gw, dev);
		return;
	}
	log_info("cli", "--dns: resolvectl is not available; to resolve NAME.ipop, add the line "
		 "'nameserver %s' to /etc/resolv.conf (it answers only .ipop names)", gw);
}

/* Every link, SOCKS client and control client holds a descriptor.  The
 * usual soft limit (1024) is what a flood of TCP connections would exhaust
 * first, while the hard limit is often far higher: take it, up to the event
 * loop's fd table (EV_FD_MAX).  Called after a --mode ns command started:
 * it keeps the limit it was given (select() users need fds below 1024). */
static void cli_fd_limit_raise(void)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
		return;
	rlim_t want = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > EV_FD_MAX ? EV_FD_MAX : rl.rlim_max;
	if (rl.rlim_cur >= want)
		return;
	rl.rlim_cur = want;
	if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
		log_debug("cli", "cannot raise the descriptor limit: %s", strerror(errno));
}

static int cli_up(struct cli_opts *o)
{
	static struct node node;        /* large; static keeps it off the stack */
	static struct ctl ctl;
	static struct cli_run run;
	run = (struct cli_run){ .n = &node, .o = o };
	char err[1200];
	int sfd = -1;
	log_cfg.level = o->log_level;
	if (!o->control[0] && ctl_default_path(o->control, sizeof o->control, true, err, sizeof err) < 0) {
		cli_fail("%s", err);
		return EXIT_FAIL;
	}
	int rc = cli_node_init(&node, o, err, sizeof err);
	if (rc < 0 || ctl_open(&ctl, &node, o->control, err, sizeof err) < 0) {
		cli_fail("%s", err);
		cli_node_free(&node);
		return rc == -2 ? EXIT_USAGE : EXIT_FAIL;
	}
	if (o->has_metrics && ctl_metrics_open(&ctl, &o->metrics, err, sizeof err) < 0) {
		cli_fail("%s (choose another with --metrics ADDR:PORT)", err);
		ctl_close(&ctl);
		cli_node_free(&node);
		return EXIT_FAIL;
	}
	cli_fd_limit_raise();
	if (o->dns)
		cli_dns_setup(&node);
	if (cli_signals_open(&run, &sfd) < 0) {
		cli_fail("cannot set up signal handling: %s", strerror(errno));
		ctl_close(&ctl);
		cli_node_free(&node);
		return EXIT_FAIL;
	}
	cli_log_start(&node);
	link_start(&node);
	cli_shortcuts_set(&node, o);
	ring_start(&node);
	dht_start(&node);
	nat_start(&node);
	while (!node.loop.stop)
		ev_run_once(&node.loop);        /* ends each turn with link_turn_end */
	if (node.ns_child > 0)
		kill(node.ns_child, SIGTERM);   /* we leave: the command loses its network */
	dht_leave(&node);
	ev_turn_end(&node.loop);        /* the hand-over leaves before the BYEs */
	ring_remember_save(&node);
	ring_leave(&node);
	ctl_close(&ctl);
	cli_node_free(&node);
	close(sfd);
	return node.exit_code;
}

/* ===================================================================== 16c cli_
 * The other subcommands and main: clients of a running node's control
 * socket (status, ping, dht, route, resolve, nc, map), the credential
 * tools (genkey, ca init, cert issue, ca revoke), and the dispatch table
 * main() walks.  Continues sections 16 and 16b; split for length.
 * ========================================================================= */

/* ---- client commands ------------------------------------------------ */

/* Send one line to the node and read the whole answer. */
static int cli_ctl_ask(const char *path, const char *line, struct buf_str *answer, int timeout_ms)
{
	int fd = ctl_connect(path);
	if (fd < 0)
		return fd;
	struct timeval tv = { .tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000 };
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
	size_t len = strlen(line);
	if (send(fd, line, len, MSG_NOSIGNAL) != (ssize_t)len) {
		int e = errno;
		close(fd);
		return -e;
	}
	char chunk[4096];
	ssize_t r;
	while ((r = recv(fd, chunk, sizeof chunk, 0)) > 0)
		buf_printf(answer, "%.*s", (int)r, chunk);
	int e = r < 0 ? errno : 0;
	close(fd);
	return r < 0 ? -e : 0;
}

static int cli_no_node(const char *path, int rc)
{
	cli_fail("no node answers on %s: %s (is 'ipop up' running? for another node use --control PATH)",
		 path, strerror(-rc));
	return EXIT_NO_NODE;
}

/* The default control socket for a client command; -1 (said) when its
 * directory is not safely ours (ctl_dir_check). */
static int cli_control_default(struct cli_opts *o)
{
	char err[300];
	if (ctl_default_path(o->control, sizeof o->control, false, err, sizeof err) == 0)
		return 0;
	cli_fail("%s", err);
	return -1;
}

static int cli_status(struct cli_opts *o)
{
	if (!o->control[0] && cli_control_default(o) < 0)
		return EXIT_FAIL;
	struct buf_str ans = { 0 };
	int rc = cli_ctl_ask(o->control, o->json ? "status json\n" : "status text\n", &ans, 5000);
	if (rc < 0 || !ans.len) {
		buf_str_free(&ans);
		return cli_no_node(o->control, rc < 0 ? rc : -ECONNRESET);
	}
	fwrite(ans.s, 1, ans.len, stdout);
	buf_str_free(&ans);
	return EXIT_OK;
}

/* Set by SIGINT during 'ipop ping'.  One of three mutable file-scope
 * variables, with log_cfg (the log level, section 01) and cli_boot_uris
 * (the running node's bootstrap names, section 16b). */
static volatile sig_atomic_t cli_interrupted;

static void cli_on_sigint(int sig)
{
	(void)sig;
	cli_interrupted = 1;
}

static void cli_sleep_s(double s)
{
	struct timespec ts = { .tv_sec = (time_t)s, .tv_nsec = (long)((s - (double)(time_t)s) * 1e9) };
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR && !cli_interrupted)
		;
}

static int cli_ping(struct cli_opts *o)
{
	ring_addr dst;
	if (!o->target || ctl_parse_target(o->target, &dst) < 0) {
		cli_fail("ping: %s (a virtual IP like 10.128.0.5 or a 40-hex-digit ring address)",
			 o->target ? "bad target" : "missing target");
		return EXIT_USAGE;
	}
	if (!o->control[0] && cli_control_default(o) < 0)
		return EXIT_FAIL;
	long wait_ms = (long)(o->wait_s * 1000), replies = 0, sent = 0;
	char line[128];
	snprintf(line, sizeof line, "ping %s %ld\n", o->target, wait_ms > 0 ? wait_ms : 1);
	struct sigaction sa = { .sa_handler = cli_on_sigint };   /* no SA_RESTART: wake the wait */
	sigaction(SIGINT, &sa, NULL);
	for (long seq = 1; (!o->count || seq <= o->count) && !cli_interrupted; seq++) {
		struct buf_str ans = { 0 };
		int rc = cli_ctl_ask(o->control, line, &ans, (int)wait_ms + 2000);
		if (cli_interrupted) {
			buf_str_free(&ans);
			break;
		}
		if (rc < 0 || !ans.len) {
			buf_str_free(&ans);
			return cli_no_node(o->control, rc < 0 ? rc : -ECONNRESET);
		}
		sent++;
		unsigned hops;
		unsigned long long us;
		if (sscanf(ans.s, "reply %u %llu", &hops, &us) == 2) {
			replies++;
			printf("reply from %s: seq=%ld hops=%u time=%.3f ms\n", o->target, seq, hops, us / 1000.0);
		} else {
			printf("no reply from %s: seq=%ld (%.*s)\n", o->target, seq,
			       (int)strcspn(ans.s, "\n"), ans.s);
		}
		fflush(stdout);
		buf_str_free(&ans);
		if (!o->count || seq < o->count)
			cli_sleep_s(o->interval_s);
	}
	printf("--- %s: %ld sent, %ld received, %.0f%% loss\n", o->target, sent, replies,
	       sent ? 100.0 * (double)(sent - replies) / (double)sent : 0.0);
	return replies ? EXIT_OK : EXIT_FAIL;
}

/* ---- credentials (genkey, ca, cert) ----------------------------------- */

static int cli_genkey(struct cli_opts *o)
{
	static struct sec_rng rng;
	uint8_t key[SEC_KEY_BYTES];
	char hex[2 * SEC_KEY_BYTES + 2], err[300];
	if (sec_rng_init(&rng) < 0) {
		cli_fail("cannot start the random generator");
		return EXIT_FAIL;
	}
	sec_random(&rng, key, sizeof key);
	buf_hex(key, sizeof key, hex);
	strcat(hex, "\n");
	sec_rng_free(&rng);
	int rc = EXIT_OK;
	if (o->out[0]) {
		if (sec_write_key_file(o->out, key, err, sizeof err) < 0) {
			cli_fail("%s", err);
			rc = EXIT_FAIL;
		}
	} else {
		/* 'ipop genkey > net.key' (the shell created the file, perhaps 0644
		 * for a moment: --out does not): make it private at least now. */
		struct stat st;
		if (fstat(STDOUT_FILENO, &st) == 0 && S_ISREG(st.st_mode))
			fchmod(STDOUT_FILENO, 0600);
		if (fputs(hex, stdout) < 0 || fflush(stdout) != 0)
			rc = EXIT_FAIL;
	}
	sec_wipe(key, sizeof key);
	sec_wipe(hex, sizeof hex);
	return rc;
}

/* Load DIR/ca.key and DIR/ca.crt for issuing. */
static int cli_ca_load(const char *dir, mbedtls_pk_context *key, mbedtls_x509_crt *crt,
		       struct sec_rng *r, char *err, size_t errlen)
{
	char path[512];
	snprintf(path, sizeof path, "%s/ca.key", dir);
	if (key && sec_parse_pem(path, true, NULL, key, r, err, errlen) < 0)
		return -1;
	snprintf(path, sizeof path, "%s/ca.crt", dir);
	return sec_parse_pem(path, false, crt, NULL, r, err, errlen);
}

/* Write DIR/name.key (private) and DIR/name.crt. */
static int cli_write_pair(const char *dir, const char *name, mbedtls_pk_context *key,
			  const uint8_t *crt_pem, char *err, size_t errlen)
{
	char path[512];
	uint8_t pem[2048];
	if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
		snprintf(err, errlen, "cannot create %s: %s", dir, strerror(errno));
		return -1;
	}
	if (mbedtls_pk_write_key_pem(key, pem, sizeof pem) != 0) {
		snprintf(err, errlen, "cannot encode the private key");
		return -1;
	}
	snprintf(path, sizeof path, "%s/%s.key", dir, name);
	int rc = sec_write_new_file(path, pem, strlen((char *)pem), true, err, errlen);
	sec_wipe(pem, sizeof pem);
	if (rc < 0)
		return -1;
	snprintf(path, sizeof path, "%s/%s.crt", dir, name);
	return sec_write_new_file(path, crt_pem, strlen((const char *)crt_pem), false, err, errlen);
}

/* The network's admission secret (sec_cert_keys): 64 hex digits, mode 0600. */
static int cli_admission_new(const char *dir, struct sec_rng *r, char *err, size_t errlen)
{
	uint8_t key[SEC_KEY_BYTES];
	char path[512];
	sec_random(r, key, sizeof key);
	snprintf(path, sizeof path, "%s/" SEC_ADMISSION_FILE, dir);
	int rc = sec_write_key_file(path, key, err, errlen);
	sec_wipe(key, sizeof key);
	return rc;
}

/* Hand the CA's admission secret to a node's directory.  A CA without one
 * (made before ipop 0.2.1) still issues, with a warning: its network's
 * mac1 key is the public ca.crt's. */
static int cli_admission_copy(const char *ca_dir, const char *out, char *err, size_t errlen)
{
	char from[512], to[512];
	uint8_t key[SEC_KEY_BYTES];
	snprintf(from, sizeof from, "%s/" SEC_ADMISSION_FILE, ca_dir);
	if (access(from, F_OK) < 0) {
		log_warn("cli", "%s has no " SEC_ADMISSION_FILE " (a CA from before ipop 0.2.1): anyone with "
			 "ca.crt can make this network's nodes do handshake work; see docs/SECURITY.md, "
			 "section 3, to add one", ca_dir);
		return 0;
	}
	if (sec_read_key_file(from, key, err, errlen) < 0)
		return -1;
	snprintf(to, sizeof to, "%s/" SEC_ADMISSION_FILE, out);
	int rc = sec_write_key_file(to, key, err, errlen);
	sec_wipe(key, sizeof key);
	return rc;
}

static int cli_ca_init(struct cli_opts *o)
{
	static struct sec_rng rng;
	mbedtls_pk_context key;
	uint8_t pem[4096];
	char err[600], subject[128];
	if (!o->out[0]) {
		cli_fail("ca init: --out DIR is required (see 'ipop ca init --help')");
		return EXIT_USAGE;
	}
	snprintf(subject, sizeof subject, "CN=%s,O=ipop", o->name[0] ? o->name : "ipop network CA");
	mbedtls_pk_init(&key);
	int rc = sec_rng_init(&rng) < 0 || sec_keygen(&key, &rng) < 0 ||
		 sec_cert_write(&rng, &key, &key, subject, subject, NULL, (o->days ? o->days : 3650) * 86400LL,
				pem, sizeof pem) < 0 ? -1 : 0;
	if (rc < 0)
		snprintf(err, sizeof err, "cannot create the CA key and certificate");
	else
		rc = cli_write_pair(o->out, "ca", &key, pem, err, sizeof err);
	if (rc == 0)
		rc = cli_admission_new(o->out, &rng, err, sizeof err);
	mbedtls_pk_free(&key);
	sec_rng_free(&rng);
	if (rc < 0) {
		cli_fail("ca init: %s", err);
		return EXIT_FAIL;
	}
	printf("created %s/ca.key (keep it private), %s/ca.crt and %s/" SEC_ADMISSION_FILE
	       " (goes to every node with its certificate)\n", o->out, o->out, o->out);
	return EXIT_OK;
}

static int cli_cert_issue(struct cli_opts *o)
{
	static struct sec_rng rng;
	mbedtls_pk_context ca_key, key;
	mbedtls_x509_crt ca;
	uint8_t pem[4096];
	char err[600], subject[128], issuer[256], path[512];
	if (!o->ca_dir[0] || !o->out[0]) {
		cli_fail("cert issue: --ca DIR and --out DIR are required (see 'ipop cert issue --help')");
		return EXIT_USAGE;
	}
	if (o->valid_s && o->days) {
		cli_fail("cert issue: give --days or --valid-for, not both");
		return EXIT_USAGE;
	}
	for (unsigned i = 0; i < o->grant.n_routes; i++)
		if (ip_route_width_check(o->grant.route_net[i], o->grant.route_len[i], err, sizeof err) < 0) {
			cli_fail("cert issue: %s", err);
			return EXIT_USAGE;
		}
	snprintf(subject, sizeof subject, "CN=%s,O=ipop", o->name[0] ? o->name : "ipop node");
	mbedtls_pk_init(&ca_key);
	mbedtls_pk_init(&key);
	mbedtls_x509_crt_init(&ca);
	snprintf(o->grant.name, sizeof o->grant.name, "%s", o->name);
	int rc = sec_rng_init(&rng) < 0 ? -1 : cli_ca_load(o->ca_dir, &ca_key, &ca, &rng, err, sizeof err);
	if (rc == 0 && mbedtls_x509_dn_gets(issuer, sizeof issuer, &ca.subject) < 0)
		rc = -1;
	if (rc == 0 && (sec_keygen(&key, &rng) < 0 ||
			sec_cert_write(&rng, &key, &ca_key, subject, issuer, &o->grant,
				       o->valid_s ? o->valid_s : (o->days ? o->days : 365) * 86400LL,
				       pem, sizeof pem) < 0)) {
		snprintf(err, sizeof err, "cannot create the node key and certificate");
		rc = -1;
	}
	if (rc == 0)
		rc = cli_write_pair(o->out, "node", &key, pem, err, sizeof err);
	snprintf(path, sizeof path, "%s/ca.crt", o->out);
	if (rc == 0) {
		/* Copy the CA certificate as PEM so the directory is self-contained. */
		size_t olen = 0;
		uint8_t capem[2048];
		if (mbedtls_pem_write_buffer("-----BEGIN CERTIFICATE-----\n", "-----END CERTIFICATE-----\n",
					     ca.raw.p, ca.raw.len, capem, sizeof capem, &olen) != 0 ||
		    sec_write_new_file(path, capem, strlen((char *)capem), false, err, sizeof err) < 0)
			rc = -1;
	}
	if (rc == 0)
		rc = cli_admission_copy(o->ca_dir, o->out, err, sizeof err);
	mbedtls_pk_free(&ca_key);
	mbedtls_pk_free(&key);
	mbedtls_x509_crt_free(&ca);
	sec_rng_free(&rng);
	if (rc < 0) {
		cli_fail("cert issue: %s", err);
		return EXIT_FAIL;
	}
	snprintf(path, sizeof path, "%s/" SEC_ADMISSION_FILE, o->out);
	printf("issued %s/node.crt with %s/node.key, %s/ca.crt%s; run: ipop up --cert-dir %s\n",
	       o->out, o->out, o->out, access(path, F_OK) == 0 ? " and " SEC_ADMISSION_FILE : "", o->out);
	return EXIT_OK;
}

/* Append a serial to DIR/crl.txt (mode 0644: the list is public). */
static int cli_ca_revoke(struct cli_opts *o)
{
	char err[600], path[512], line[400], hex[2 * SEC_SERIAL_MAX_BYTES + 1];
	if (!o->ca_dir[0] || (!o->cert[0] && !o->serial.len)) {
		cli_fail("ca revoke: --ca DIR and one of --cert FILE or --serial HEX are required");
		return EXIT_USAGE;
	}
	struct sec_serial serial = o->serial;
	const char *who = "";
	mbedtls_x509_crt crt;
	mbedtls_x509_crt_init(&crt);
	if (o->cert[0]) {
		if (sec_parse_pem(o->cert, false, &crt, NULL, NULL, err, sizeof err) < 0) {
			cli_fail("ca revoke: %s", err);
			mbedtls_x509_crt_free(&crt);
			return EXIT_FAIL;
		}
		sec_serial_of(&crt, &serial);
		who = o->cert;
	}
	buf_hex(serial.b, serial.len, hex);
	snprintf(line, sizeof line, "%s  # %s\n", hex, who);
	mbedtls_x509_crt_free(&crt);
	snprintf(path, sizeof path, "%s/crl.txt", o->ca_dir);
	int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
	if (fd < 0 || write(fd, line, strlen(line)) != (ssize_t)strlen(line)) {
		cli_fail("ca revoke: cannot append to %s: %s", path, strerror(errno));
		if (fd >= 0)
			close(fd);
		return EXIT_FAIL;
	}
	close(fd);
	printf("revoked serial %s in %s; copy it to the nodes' --crl FILE\n", hex, path);
	return EXIT_OK;
}

static int cli_dht(struct cli_opts *o)
{
	if (o->n_args != (o->cmd == CMD_DHT_GET ? 1 : 2)) {
		cli_fail("dht: expected %s (see 'ipop dht --help')", o->cmd == CMD_DHT_GET ? "KEY" : "KEY VALUE");
		return EXIT_USAGE;
	}
	const char *key = o->args[0], *value = o->n_args > 1 ? o->args[1] : "";
	size_t vlen = strlen(value);
	if (strlen(key) > DHT_KEY_MAX_BYTES || vlen > DHT_VALUE_MAX_BYTES || strpbrk(key, " \t\r\n")) {
		cli_fail("dht: keys are 1 to %d bytes without spaces, values at most %d bytes",
			 DHT_KEY_MAX_BYTES, DHT_VALUE_MAX_BYTES);
		return EXIT_USAGE;
	}
	if (!o->control[0] && cli_control_default(o) < 0)
		return EXIT_FAIL;
	char *line = malloc(2 * vlen + DHT_KEY_MAX_BYTES + 64);
	if (!line)
		return EXIT_FAIL;
	int off = sprintf(line, "dht %s ", o->cmd == CMD_DHT_GET ? "get" : o->cmd == CMD_DHT_PUT ? "put" : "create");
	if (o->cmd != CMD_DHT_GET)
		off += sprintf(line + off, "%ld ", o->days ? o->days : 300);
	off += sprintf(line + off, "%s", key);
	if (o->cmd != CMD_DHT_GET) {
		line[off++] = ' ';
		buf_hex((const uint8_t *)value, vlen, line + off);
		off += (int)(2 * vlen);
	}
	strcpy(line + off, "\n");
	struct buf_str ans = { 0 };
	int rc = cli_ctl_ask(o->control, line, &ans, DHT_REQUEST_TIMEOUT_MS + 2000);
	free(line);
	if (rc < 0 || !ans.len) {
		buf_str_free(&ans);
		return cli_no_node(o->control, rc < 0 ? rc : -ECONNRESET);
	}
	unsigned ttl;
	char owner[64], hex[2 * DHT_VALUE_MAX_BYTES + 2];
	uint8_t bytes[DHT_VALUE_MAX_BYTES];
	int code = EXIT_OK;
	if (sscanf(ans.s, "value %u %63s %2049s", &ttl, owner, hex) == 3 && buf_unhex(hex, bytes, strlen(hex) / 2)) {
		size_t vlen2 = strlen(hex) / 2, printable = 0;
		for (size_t i = 0; i < vlen2; i++)
			printable += isprint(bytes[i]) || bytes[i] == '\t';
		if (printable == vlen2)
			fwrite(bytes, 1, vlen2, stdout);
		else
			fputs(hex, stdout);    /* binary (an ip: mapping is a ring address): hex */
		putchar('\n');
	} else if (sscanf(ans.s, "value %u %63s", &ttl, owner) == 2) {
		putchar('\n');                 /* an empty value */
	} else if (!strncmp(ans.s, "ok", 2)) {
		puts("ok");
	} else {
		const char *why = !strncmp(ans.s, "error ", 6) ? ans.s + 6 : ans.s;
		fprintf(stderr, "ipop: dht %s: %.*s\n", key, (int)strcspn(why, "\n"), why);
		code = EXIT_FAIL;
	}
	buf_str_free(&ans);
	return code;
}

static int cli_route(struct cli_opts *o)
{
	if (o->n_args != 1) {
		cli_fail("route: expected a prefix like 10.128.7.0/24 (see 'ipop route --help')");
		return EXIT_USAGE;
	}
	if (!o->control[0] && cli_control_default(o) < 0)
		return EXIT_FAIL;
	char line[128];
	snprintf(line, sizeof line, "route %s %s\n", o->target, o->args[0]);
	struct buf_str ans = { 0 };
	int rc = cli_ctl_ask(o->control, line, &ans, 5000);
	if (rc < 0 || !ans.len) {
		buf_str_free(&ans);
		return cli_no_node(o->control, rc < 0 ? rc : -ECONNRESET);
	}
	int code = strncmp(ans.s, "ok", 2) ? EXIT_FAIL : EXIT_OK;
	if (code)
		fprintf(stderr, "ipop: route %s %s: %.*s\n", o->target, o->args[0],
			(int)strcspn(ans.s + 6, "\n"), ans.s + 6);
	buf_str_free(&ans);
	return code;
}

/* RFC 1928 client side, blocking: greeting, CONNECT, reply. */
/* A CONNECT through the SOCKS server to host (a virtual IP, or a name the
 * server looks up); the connected socket, or -1 with why said.  *refused:
 * no SOCKS server listens there at all. */
static int cli_nc_connect(const struct endpoint *socks, const char *host, uint16_t port, const char **why,
			  bool *refused)
{
	static const char *const replies[] = { "succeeded", "general failure", "not allowed",
		"network unreachable", "host unreachable", "connection refused", "TTL expired",
		"command not supported", "address type not supported" };
	struct sockaddr_in sa = link_sockaddr_of(socks);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	uint8_t req[4 + 1 + 255 + 2] = { SOCKS_VERSION, SOCKS_CMD_CONNECT, 0, SOCKS_ATYP_IPV4 }, r[10];
	struct wbuf w = wbuf_of(req + 4, sizeof req - 4);
	uint32_t ip;
	if (cli_ipv4(host, &ip) == 0) {
		wbuf_u32(&w, ip);
	} else {
		req[3] = SOCKS_ATYP_NAME;
		wbuf_u8(&w, (uint8_t)strlen(host));
		wbuf_bytes(&w, host, strlen(host));
	}
	wbuf_u16(&w, port);
	*why = "no SOCKS server (is a user-mode 'ipop up' running? see --socks)";
	*refused = false;
	if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
		*refused = errno == ECONNREFUSED;
	else if (fd >= 0 && send(fd, "\x05\x01\x00", 3, MSG_NOSIGNAL) == 3 && recv(fd, r, 2, MSG_WAITALL) == 2) {
		*why = "the SOCKS server wants authentication";
		if (r[0] != SOCKS_VERSION || r[1] != 0)
			goto fail;
		*why = "the SOCKS server closed the connection";
		size_t len = 4 + (size_t)wbuf_done(&w);     /* fits: names are at most 255 bytes */
		if (send(fd, req, len, MSG_NOSIGNAL) != (ssize_t)len || recv(fd, r, 10, MSG_WAITALL) != 10)
			goto fail;
		if (r[1] == SOCKS_OK)
			return fd;
		*why = r[1] == SOCKS_HOST_UNREACHABLE && req[3] == SOCKS_ATYP_NAME ?
		       "not found (is a node running with that --name?)" :
		       r[1] < ARRAY_LEN(replies) ? replies[r[1]] : "failure";
	}
fail:
	if (fd >= 0)
		close(fd);
	return -1;
}

/* A name's virtual IP, from the DHT through the node on the control
 * socket: 0, -errno when no node answers, 1 when nobody published it. */
static int cli_lookup_name(const char *control, const char *name, uint32_t *ip)
{
	char line[DHT_KEY_MAX_BYTES + 32], base[DHT_KEY_MAX_BYTES];
	snprintf(base, sizeof base, "%s", name);
	size_t l = strlen(base);
	if (l > 5 && !strcmp(base + l - 5, ".ipop"))
		base[l - 5] = 0;
	snprintf(line, sizeof line, "dht get name:%s\n", base);
	struct buf_str ans = { 0 };
	int rc = cli_ctl_ask(control, line, &ans, DHT_REQUEST_TIMEOUT_MS + 2000);
	if (rc < 0 || !ans.len) {
		buf_str_free(&ans);
		return rc < 0 ? rc : -ECONNRESET;
	}
	unsigned ttl;
	char owner[64], hex[16];
	uint8_t v[4];
	rc = sscanf(ans.s, "value %u %63s %15s", &ttl, owner, hex) == 3 && strlen(hex) == 8 && buf_unhex(hex, v, 4) ?
	     0 : 1;
	if (rc == 0)
		*ip = (uint32_t)v[0] << 24 | (uint32_t)v[1] << 16 | (uint32_t)v[2] << 8 | v[3];
	buf_str_free(&ans);
	return rc;
}

enum { CLI_NC_CONNECT_TIMEOUT_S = 10 };

/* Without a SOCKS server: a plain connection, as on a tap node or inside a
 * namespace-mode node's network (ipop exec), a name looked up first. */
static int cli_nc_direct(struct cli_opts *o, const char *host, uint16_t port, const char **why)
{
	uint32_t ip;
	if (cli_ipv4(host, &ip) < 0) {
		int rc = o->control[0] || cli_control_default(o) == 0 ? cli_lookup_name(o->control, host, &ip) : -ENOENT;
		*why = rc < 0 ? "no SOCKS server on this host, and no node to look the name up (see --socks, --control)" :
		       "not found (is a node running with that --name?)";
		if (rc != 0)
			return -1;
	}
	struct endpoint ep = { .proto = PROTO_TCP, .ip = ip, .port = port };
	struct sockaddr_in sa = link_sockaddr_of(&ep);
	struct timeval tv = { .tv_sec = CLI_NC_CONNECT_TIMEOUT_S };
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd >= 0)
		setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);     /* bounds connect */
	if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0)
		return fd;
	*why = "no SOCKS server on this host, and no route to it from here (user mode: --socks; namespace mode: "
	       "run the program with ipop exec)";
	if (fd >= 0)
		close(fd);
	return -1;
}

/* Copy stdin to the connection and the connection to stdout until both end. */
static int cli_nc(struct cli_opts *o)
{
	struct endpoint socks;
	bool off, refused;
	uint16_t port;
	const char *why;
	if (o->n_args != 2 || !o->args[0][0] || strlen(o->args[0]) > 255 || strpbrk(o->args[0], " \t\r\n") ||
	    cli_port(o->args[1], &port) < 0 || cli_parse_socks(o->socks, &socks, &off) < 0 || off) {
		cli_fail("nc: expected HOST PORT (a virtual IP or a --name), like: ipop nc 10.128.0.5 22");
		return EXIT_USAGE;
	}
	int fd = cli_nc_connect(&socks, o->args[0], port, &why, &refused);
	if (fd < 0 && refused && !o->socks[0])
		fd = cli_nc_direct(o, o->args[0], port, &why);
	if (fd < 0) {
		cli_fail("nc %s %u: %s", o->args[0], port, why);
		return EXIT_FAIL;
	}
	struct pollfd p[2] = { { .fd = STDIN_FILENO, .events = POLLIN }, { .fd = fd, .events = POLLIN } };
	char buf[65536];
	signal(SIGPIPE, SIG_IGN);
	while (p[1].fd >= 0) {
		if (poll(p, 2, -1) < 0 && errno != EINTR)
			break;
		for (int i = 0; i < 2; i++) {
			if (p[i].fd < 0 || !(p[i].revents & (POLLIN | POLLHUP | POLLERR)))
				continue;
			ssize_t r = read(p[i].fd, buf, sizeof buf);
			int out = i == 0 ? fd : STDOUT_FILENO;
			if (r <= 0) {
				if (i == 0)
					shutdown(fd, SHUT_WR);
				p[i].fd = -1;
				continue;
			}
			for (ssize_t off2 = 0; off2 < r;) {
				ssize_t wr = write(out, buf + off2, (size_t)(r - off2));
				if (wr <= 0) {
					close(fd);
					return EXIT_FAIL;
				}
				off2 += wr;
			}
		}
	}
	close(fd);
	return EXIT_OK;
}

/* "alice" or "alice.ipop" -> the IPv4 address in the name:alice record. */
static int cli_resolve_name(struct cli_opts *o)
{
	uint32_t ip;
	if (o->n_args != 1 || strlen(o->args[0]) >= DHT_KEY_MAX_BYTES - 5 || strpbrk(o->args[0], " \t\r\n")) {
		cli_fail("resolve: expected one NAME (see 'ipop resolve --help')");
		return EXIT_USAGE;
	}
	if (!o->control[0] && cli_control_default(o) < 0)
		return EXIT_FAIL;
	int rc = cli_lookup_name(o->control, o->args[0], &ip);
	if (rc < 0)
		return cli_no_node(o->control, rc);
	if (rc > 0) {
		size_t l = strlen(o->args[0]);
		int base = l > 5 && !strcmp(o->args[0] + l - 5, ".ipop") ? (int)l - 5 : (int)l;
		cli_fail("resolve %.*s: not found (is a node running with --name %.*s?)", base, o->args[0], base,
			 o->args[0]);
		return EXIT_FAIL;
	}
	printf("%u.%u.%u.%u\n", ip >> 24, (ip >> 16) & 255, (ip >> 8) & 255, ip & 255);
	return EXIT_OK;
}

/* ---- ipop map: the ring as one node knows it, as SVG ------------------ */

enum {
	MAP_PEERS_MAX = 256,            /* links drawn; a node keeps a few dozen */
	MAP_NAME_LOOKUPS_MAX = 64,      /* "host:IP" lookups, one control connection each */
	MAP_SIZE_PX = 800,
	MAP_RADIUS_PX = 280,
};

struct cli_map_node {
	char kind[16], addr[2 * RING_ADDR_BYTES + 1], ip[16], name[64];
};

/* How each link kind is drawn; kinds not listed (new ones) take the last
 * row's style, so the map never needs to know every kind in advance. */
static const struct {
	const char *kind, *color, *dash;
	double width;
} cli_map_styles[] = {
	{ "near", "#1f77b4", "none", 2.5 },
	{ "far", "#ff7f0e", "7 4", 1.5 },
	{ "shortcut", "#2ca02c", "2 3", 1.5 },
	{ "relayed", "#d62728", "8 3 2 3", 1.5 },
	{ "relay", "#8c564b", "6 2", 1.5 },
	{ "leaf", "#7f7f7f", "1 3", 1.0 },
	{ NULL, "#9467bd", "4 2", 1.0 },
};

static unsigned cli_map_style(const char *kind)
{
	unsigned i = 0;
	while (cli_map_styles[i].kind && strcmp(cli_map_styles[i].kind, kind))
		i++;
	return i;
}

/* XML-escape s for text and attribute values; cut to fit cap. */
static void cli_xml_escape(const char *s, char *out, size_t cap)
{
	size_t o = 0;
	for (; *s; s++) {
		const char *e = *s == '&' ? "&amp;" : *s == '<' ? "&lt;" : *s == '>' ? "&gt;" :
				*s == '"' ? "&quot;" : *s == '\'' ? "&apos;" : NULL;
		char one[2] = { *s, 0 };
		if ((unsigned char)*s < 0x20)
			e = "?";                /* control characters are not XML */
		const char *add = e ? e : one;
		size_t l = strlen(add);
		if (o + l + 1 > cap)
			break;
		memcpy(out + o, add, l);
		o += l;
	}
	out[o] = 0;
}

/* A ring address's place on the circle: its top 32 bits as a fraction of a
 * turn, clockwise from the top. */
static void cli_map_xy(const char *addr, double r, double *x, double *y)
{
	uint8_t top[4] = { 0 };
	char h[9];
	snprintf(h, sizeof h, "%.8s", addr);
	buf_unhex(h, top, 4);
	double turn = ((double)((uint32_t)top[0] << 24 | (uint32_t)top[1] << 16 | top[2] << 8 | top[3])) / 4294967296.0;
	*x = MAP_SIZE_PX / 2.0 + r * sin(2 * M_PI * turn);
	*y = MAP_SIZE_PX / 2.0 - r * cos(2 * M_PI * turn);
}

static void cli_map_label(FILE *f, const struct cli_map_node *m, bool self)
{
	double x, y, lx, ly;
	char ip[64], name[200], short_addr[13];
	cli_map_xy(m->addr, MAP_RADIUS_PX, &x, &y);
	cli_map_xy(m->addr, MAP_RADIUS_PX + 16, &lx, &ly);
	snprintf(short_addr, sizeof short_addr, "%.12s", m->addr);
	cli_xml_escape(strcmp(m->ip, "-") ? m->ip : short_addr, ip, sizeof ip);
	cli_xml_escape(strcmp(m->name, "-") ? m->name : "", name, sizeof name);
	fprintf(f, "  <g class=\"node%s\" data-address=\"%s\">\n"
		"    <circle cx=\"%.1f\" cy=\"%.1f\" r=\"%d\" fill=\"%s\" stroke=\"#222\"/>\n"
		"    <text x=\"%.1f\" y=\"%.1f\" text-anchor=\"%s\" font-size=\"12\">%s%s%s</text>\n  </g>\n",
		self ? " self" : "", m->addr, x, y, self ? 9 : 6, self ? "#d62728" : "#fff", lx, ly + 4,
		lx >= MAP_SIZE_PX / 2.0 ? "start" : "end", ip, name[0] ? " " : "", name);
}

/* The picture: the ring, one line per link from us, nodes on top, a legend
 * of the kinds drawn. */
static void cli_map_svg(FILE *f, const struct cli_map_node *self, const struct cli_map_node *peers, unsigned np)
{
	bool used[ARRAY_LEN(cli_map_styles)] = { false };
	char title[200];
	double sx, sy;
	cli_map_xy(self->addr, MAP_RADIUS_PX, &sx, &sy);
	cli_xml_escape(strcmp(self->ip, "-") ? self->ip : self->addr, title, sizeof title);
	fprintf(f, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
		"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" viewBox=\"0 0 %d %d\">\n"
		"  <title>ipop ring as %s knows it</title>\n"
		"  <rect width=\"100%%\" height=\"100%%\" fill=\"#fff\"/>\n"
		"  <circle cx=\"%d\" cy=\"%d\" r=\"%d\" fill=\"none\" stroke=\"#ccc\"/>\n",
		MAP_SIZE_PX, MAP_SIZE_PX, MAP_SIZE_PX, MAP_SIZE_PX, title, MAP_SIZE_PX / 2, MAP_SIZE_PX / 2,
		MAP_RADIUS_PX);
	for (unsigned i = 0; i < np; i++) {
		double x, y;
		unsigned st = cli_map_style(peers[i].kind);
		char kind[64];
		used[st] = true;
		cli_xml_escape(peers[i].kind, kind, sizeof kind);
		cli_map_xy(peers[i].addr, MAP_RADIUS_PX, &x, &y);
		fprintf(f, "  <line class=\"link %s\" data-kind=\"%s\" data-peer=\"%s\" x1=\"%.1f\" y1=\"%.1f\" "
			"x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"%.1f\" stroke-dasharray=\"%s\"/>\n",
			kind, kind, peers[i].addr, sx, sy, x, y, cli_map_styles[st].color, cli_map_styles[st].width,
			cli_map_styles[st].dash);
	}
	for (unsigned i = 0; i < np; i++)
		cli_map_label(f, &peers[i], false);
	cli_map_label(f, self, true);
	int y = 20;
	for (unsigned i = 0; i < ARRAY_LEN(cli_map_styles); i++) {
		if (!used[i])
			continue;
		fprintf(f, "  <line x1=\"10\" y1=\"%d\" x2=\"40\" y2=\"%d\" stroke=\"%s\" stroke-width=\"%.1f\" "
			"stroke-dasharray=\"%s\"/><text x=\"46\" y=\"%d\" font-size=\"12\">%s</text>\n", y, y,
			cli_map_styles[i].color, cli_map_styles[i].width, cli_map_styles[i].dash, y + 4,
			cli_map_styles[i].kind ? cli_map_styles[i].kind : "other");
		y += 18;
	}
	fprintf(f, "</svg>\n");
}

/* The name a node published for ip ("host:IP"), or "-". */
static void cli_map_name(const char *control, const char *ip, char out[64])
{
	char line[64], owner[64], hex[2 * 63 + 2];
	unsigned ttl;
	struct buf_str ans = { 0 };
	snprintf(out, 64, "-");
	snprintf(line, sizeof line, "dht get host:%s\n", ip);
	if (cli_ctl_ask(control, line, &ans, DHT_REQUEST_TIMEOUT_MS + 2000) == 0 && ans.len &&
	    sscanf(ans.s, "value %u %63s %127s", &ttl, owner, hex) == 3 && strlen(hex) / 2 < 64 &&
	    buf_unhex(hex, (uint8_t *)out, strlen(hex) / 2))
		out[strlen(hex) / 2] = 0;
	buf_str_free(&ans);
}

static int cli_map(struct cli_opts *o)
{
	static struct cli_map_node self, peers[MAP_PEERS_MAX];
	unsigned np = 0, lookups = 0;
	if (!o->control[0] && cli_control_default(o) < 0)
		return EXIT_FAIL;
	struct buf_str ans = { 0 };
	int rc = cli_ctl_ask(o->control, "map\n", &ans, 5000);
	if (rc < 0 || !ans.len || strncmp(ans.s, "self ", 5)) {
		buf_str_free(&ans);
		return cli_no_node(o->control, rc < 0 ? rc : -ECONNRESET);
	}
	if (!o->svg[0]) {
		fputs(ans.s, stdout);
		buf_str_free(&ans);
		return EXIT_OK;
	}
	char *save = NULL;
	for (char *l = strtok_r(ans.s, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
		struct cli_map_node m = { .name = "-" };
		if (sscanf(l, "self %40s %15s %63s", m.addr, m.ip, m.name) == 3)
			self = m;
		else if (np < MAP_PEERS_MAX && sscanf(l, "link %15s %40s %15s", m.kind, m.addr, m.ip) == 3)
			peers[np++] = m;
	}
	buf_str_free(&ans);
	for (unsigned i = 0; i < np && lookups < MAP_NAME_LOOKUPS_MAX; i++)
		if (strcmp(peers[i].ip, "-") && ++lookups)
			cli_map_name(o->control, peers[i].ip, peers[i].name);
	FILE *f = strcmp(o->svg, "-") ? fopen(o->svg, "w") : stdout;
	if (!f) {
		cli_fail("map: cannot write %s: %s", o->svg, strerror(errno));
		return EXIT_FAIL;
	}
	cli_map_svg(f, &self, peers, np);
	if (f != stdout ? fclose(f) != 0 : fflush(f) != 0) {
		cli_fail("map: cannot write %s: %s", o->svg, strerror(errno));
		return EXIT_FAIL;
	}
	return EXIT_OK;
}

/* Ask the node for its namespaces (fds[0] user, fds[1] network): 0, -errno
 * when no node answers, or 1 with the node's refusal in err. */
static int cli_ns_fds(const char *path, int fds[2], char *err, size_t errlen)
{
	int fd = ctl_connect(path);
	if (fd < 0)
		return fd;
	struct timeval tv = { .tv_sec = 5 };
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	char line[256] = { 0 }, cbuf[CMSG_SPACE(2 * sizeof(int))];
	struct iovec iov = { .iov_base = line, .iov_len = sizeof line - 1 };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf };
	ssize_t r = send(fd, "ns\n", 3, MSG_NOSIGNAL) == 3 ? recvmsg(fd, &mh, MSG_CMSG_CLOEXEC) : -1;
	int e = errno;
	close(fd);
	struct cmsghdr *c = r > 0 ? CMSG_FIRSTHDR(&mh) : NULL;
	if (c && c->cmsg_type == SCM_RIGHTS && c->cmsg_len == CMSG_LEN(2 * sizeof(int)) && !strncmp(line, "ok", 2)) {
		memcpy(fds, CMSG_DATA(c), 2 * sizeof(int));
		return 0;
	}
	if (r <= 0)
		return r < 0 ? -e : -ECONNRESET;
	line[strcspn(line, "\n")] = 0;
	snprintf(err, errlen, "%s", strncmp(line, "error ", 6) ? line : line + 6);
	return 1;
}

/* Join the namespace fd names, unless we are in it already (a shell that
 * ipop exec started, running ipop exec again). */
static int cli_setns(int fd, int type, const char *self)
{
	struct stat a, b;
	if (fstat(fd, &a) == 0 && stat(self, &b) == 0 && a.st_ino == b.st_ino && a.st_dev == b.st_dev)
		return 0;
	return setns(fd, type);
}

/* ipop exec: become CMD, inside the node's namespaces. */
static int cli_exec(struct cli_opts *o)
{
	int fds[2];
	char err[300] = "";
	if (!o->exec_argv || !o->exec_argv[0]) {
		cli_fail("exec: expected a command, like: ipop exec -- mpirun --host 10.128.0.1,10.128.0.2 ./job");
		return EXIT_USAGE;
	}
	if (!o->control[0] && cli_control_default(o) < 0)
		return EXIT_FAIL;
	int rc = cli_ns_fds(o->control, fds, err, sizeof err);
	if (rc < 0)
		return cli_no_node(o->control, rc);
	if (rc > 0) {
		cli_fail("exec: %s", err);
		return EXIT_FAIL;
	}
	if (cli_setns(fds[0], CLONE_NEWUSER, "/proc/self/ns/user") < 0 ||
	    cli_setns(fds[1], CLONE_NEWNET, "/proc/self/ns/net") < 0) {
		cli_fail("exec: cannot enter the node's namespace: %s", strerror(errno));
		return EXIT_FAIL;
	}
	close(fds[0]);
	close(fds[1]);
	int e = tap_ns_execvp(o->exec_argv);
	cli_fail("exec: cannot run %s: %s", o->exec_argv[0], strerror(e));
	return e == ENOENT ? 127 : 126;
}

static int cli_main(int argc, char **argv)
{
	static const struct {
		const char *name, *sub;
		enum cli_cmd cmd;
		const char *usage;
		int (*run)(struct cli_opts *o);
	} cmds[] = {
		{ "up", NULL, CMD_UP, cli_usage_up, cli_up },
		{ "status", NULL, CMD_STATUS, cli_usage_status, cli_status },
		{ "ping", NULL, CMD_PING, cli_usage_ping, cli_ping },
		{ "genkey", NULL, CMD_GENKEY, cli_usage_genkey, cli_genkey },
		{ "ca", "init", CMD_CA_INIT, cli_usage_ca_init, cli_ca_init },
		{ "ca", "revoke", CMD_CA_REVOKE, cli_usage_ca_revoke, cli_ca_revoke },
		{ "cert", "issue", CMD_CERT_ISSUE, cli_usage_cert_issue, cli_cert_issue },
		{ "dht", "get", CMD_DHT_GET, cli_usage_dht, cli_dht },
		{ "dht", "put", CMD_DHT_PUT, cli_usage_dht, cli_dht },
		{ "dht", "create", CMD_DHT_CREATE, cli_usage_dht, cli_dht },
		{ "route", "add", CMD_ROUTE, cli_usage_route, cli_route },
		{ "route", "del", CMD_ROUTE, cli_usage_route, cli_route },
		{ "nc", NULL, CMD_NC, cli_usage_nc, cli_nc },
		{ "resolve", NULL, CMD_RESOLVE, cli_usage_resolve, cli_resolve_name },
		{ "map", NULL, CMD_MAP, cli_usage_map, cli_map },
		{ "exec", NULL, CMD_EXEC, cli_usage_exec, cli_exec },
	};
	if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
		fputs(cli_usage_main, argc < 2 ? stderr : stdout);
		return argc < 2 ? EXIT_USAGE : EXIT_OK;
	}
	if (!strcmp(argv[1], "simulate"))      /* its own flags: section 15b */
		return sim_main(argc - 2, argv + 2);
	if (!strcmp(argv[1], "version") || !strcmp(argv[1], "--version")) {
		printf("ipop %s (wire protocol %d)\n", IPOP_VERSION, WIRE_VERSION);
		return EXIT_OK;
	}
	for (unsigned i = 0; i < ARRAY_LEN(cmds); i++) {
		if (strcmp(argv[1], cmds[i].name))
			continue;
		if (cmds[i].sub && (argc < 3 || strcmp(argv[2], cmds[i].sub)))
			continue;
		int skip = cmds[i].sub ? 3 : 2;
		char cmdname[32];
		snprintf(cmdname, sizeof cmdname, "%s%s%s", cmds[i].name, cmds[i].sub ? " " : "",
			 cmds[i].sub ? cmds[i].sub : "");
		static struct cli_opts o;
		o = (struct cli_opts){ .cmd = cmds[i].cmd, .log_level = LOG_INFO, .interval_s = 1, .wait_s = 2,
				       .target = cmds[i].cmd == CMD_ROUTE ? cmds[i].sub : NULL };
		if (cli_parse_args(&o, argc - skip, argv + skip, cmdname) < 0)
			return EXIT_USAGE;
		o.argc = argc - skip;
		o.argv = argv + skip;
		if (o.help) {
			fputs(cmds[i].usage, stdout);
			return EXIT_OK;
		}
		return cmds[i].run(&o);
	}
	if ((!strcmp(argv[1], "dht") || !strcmp(argv[1], "route")) && argc > 2 &&
	    (!strcmp(argv[2], "--help") || !strcmp(argv[2], "-h"))) {
		fputs(!strcmp(argv[1], "dht") ? cli_usage_dht : cli_usage_route, stdout);
		return EXIT_OK;
	}
	if (!strcmp(argv[1], "ca") || !strcmp(argv[1], "cert") || !strcmp(argv[1], "dht") || !strcmp(argv[1], "route")) {
		cli_fail("'%s' needs a subcommand: %s (see 'ipop --help')", argv[1],
			 !strcmp(argv[1], "ca") ? "init or revoke" : !strcmp(argv[1], "dht") ? "get, put or create" :
			 !strcmp(argv[1], "route") ? "add or del" : "issue");
		return EXIT_USAGE;
	}
	cli_fail("unknown command '%s' (see 'ipop --help')", argv[1]);
	return EXIT_USAGE;
}

#ifndef IPOP_NO_MAIN
int main(int argc, char **argv)
{
	return cli_main(argc, argv);
}
#endif
