/*
 * lwIP 2.2.1 options for ipop: NO_SYS=1, raw (callback) API only, IPv4 only,
 * TCP + UDP + ICMP, heap from libc malloc, large TCP windows.
 * Port headers: vendor/lwip-port/arch/cc.h; hooks: vendor/ipop_lwip_hooks.h.
 */
#ifndef IPOP_LWIPOPTS_H
#define IPOP_LWIPOPTS_H

/* ---- system / threading ------------------------------------------------ */
#define NO_SYS                      1   /* single-threaded event loop, no OS layer */
#define SYS_LIGHTWEIGHT_PROT        0
#define LWIP_NETCONN                0
#define LWIP_SOCKET                 0
#define LWIP_TIMERS                 1   /* driven by sys_check_timeouts() */
#define LWIP_NETIF_API              0

/* ---- memory: everything from libc malloc ------------------------------ */
/* libc's malloc behind a cache of freed blocks (ipop.c, lw_heap): lwIP
 * allocates a pbuf or segment per packet, and through musl's allocator an
 * ACK's buffer, freed right after it left, was often the last object of its
 * group, so many packets cost an munmap and a TLB shootdown. */
#define MEM_LIBC_MALLOC             0
#define MEM_CUSTOM_ALLOCATOR        1
#define MEM_CUSTOM_MALLOC           ipop_lwip_malloc
#define MEM_CUSTOM_CALLOC           ipop_lwip_calloc
#define MEM_CUSTOM_FREE             ipop_lwip_free
#define MEMP_MEM_MALLOC             1
#define MEM_ALIGNMENT               8
/* With MEMP_MEM_MALLOC the MEMP_NUM_* counts are not enforced (every pool
 * allocation is a malloc); they are still kept consistent with the TCP settings
 * so that the config stays valid if MEMP_MEM_MALLOC is ever turned off. */
#define MEMP_NUM_PBUF               1024
#define MEMP_NUM_RAW_PCB            4
#define MEMP_NUM_UDP_PCB            1024
#define MEMP_NUM_TCP_PCB            1024
#define MEMP_NUM_TCP_PCB_LISTEN     1024
#define MEMP_NUM_REASSDATA          16
#define MEMP_NUM_FRAG_PBUF          64
#define MEMP_NUM_ARP_QUEUE          64
#define PBUF_POOL_SIZE              1024

/* ---- protocols --------------------------------------------------------- */
#define LWIP_IPV4                   1
#define LWIP_IPV6                   0
#define LWIP_ARP                    1   /* only used if an Ethernet (TAP) netif is added */
#define LWIP_ETHERNET               1
#define LWIP_ICMP                   1
#define LWIP_RAW                    0
#define LWIP_UDP                    1
#define LWIP_UDPLITE                0
#define LWIP_TCP                    1
#define LWIP_DHCP                   0
#define LWIP_AUTOIP                 0
#define LWIP_IGMP                   0
#define LWIP_DNS                    0
#define LWIP_ACD                    0
#define IP_FORWARD                  0
#define IP_REASSEMBLY               1
#define IP_FRAG                     1
#define LWIP_NETIF_LOOPBACK         0
#define LWIP_HAVE_LOOPIF            0
#define LWIP_SINGLE_NETIF           0

/* ---- TCP --------------------------------------------------------------- */
#define TCP_MSS                     1360
#define LWIP_WND_SCALE              1
#define TCP_RCV_SCALE               5   /* max window 0xFFFF << 5 ~= 2 MiB >= TCP_WND */
#define TCP_WND                     (1024 * 1024)
#define TCP_SND_BUF                 (1024 * 1024)
/* lwIP requires TCP_SND_QUEUELEN >= 2 * TCP_SND_BUF / TCP_MSS (= 1542) and <= 0xFFFF;
 * use its usual 4x factor: (4 * 1 MiB + MSS - 1) / MSS = 3084 segments. */
#define TCP_SND_QUEUELEN            ((4 * (TCP_SND_BUF) + (TCP_MSS - 1)) / (TCP_MSS))
#define TCP_SNDQUEUELOWAT           ((TCP_SND_QUEUELEN) / 2)
#define MEMP_NUM_TCP_SEG            (TCP_SND_QUEUELEN)
/* TCP_SNDLOWAT is a u16_t and must stay below 0xFFFF - 4 * TCP_MSS; the default
 * (TCP_SND_BUF / 2) would overflow, so set it explicitly. */
#define TCP_SNDLOWAT                32768
#define TCP_OVERSIZE                TCP_MSS
#define TCP_QUEUE_OOSEQ             1
/* The out-of-order queue holds at most one receive window, which a sender
 * fills after a loss at the window's head: the bytes limit costs nothing.
 * Without a pbuf limit, though, a peer sending 1-byte segments scattered
 * over the window queued ~500 k segments (tens of MB) per connection.
 * Full-sized segments fill the window with TCP_WND / TCP_MSS = 771 pbufs
 * (one per segment: ipop hands lwIP one pbuf per packet); twice that
 * leaves room for short segments and IP-reassembled chains.  Past a limit
 * lwIP drops the queue's tail, which the sender retransmits. */
#define TCP_OOSEQ_MAX_BYTES         (TCP_WND)
#define TCP_OOSEQ_MAX_PBUFS         (2 * (TCP_WND) / (TCP_MSS))
#define LWIP_TCP_SACK_OUT           0
#define LWIP_TCP_TIMESTAMPS         0
#define LWIP_TCP_KEEPALIVE          1
/* Half-open connections (SYN received, no final ACK yet) per listener (-R
 * forwards): unbounded, a peer's SYN flood held a pcb each until the SYN-ACK
 * retries ran out.  64, as a small Linux's somaxconn was; a connection that
 * completes leaves the count at once (the accept callback runs then). */
#define TCP_LISTEN_BACKLOG          1
#define TCP_DEFAULT_LISTEN_BACKLOG  64
#define LWIP_TCP_PCB_NUM_EXT_ARGS   0

/* ---- checksums (all on for now; per-netif control allows turning the inbound
 * checks off later for packets that already passed an AEAD check) ---------- */
#define LWIP_CHECKSUM_CTRL_PER_NETIF 1
#define CHECKSUM_GEN_IP             1
#define CHECKSUM_GEN_UDP            1
#define CHECKSUM_GEN_TCP            1
#define CHECKSUM_GEN_ICMP           1
#define CHECKSUM_CHECK_IP           1
#define CHECKSUM_CHECK_UDP          1
#define CHECKSUM_CHECK_TCP          1
#define CHECKSUM_CHECK_ICMP         1
#define LWIP_CHECKSUM_ON_COPY       0

/* ---- netif ------------------------------------------------------------- */
#define LWIP_NETIF_STATUS_CALLBACK  0
#define LWIP_NETIF_LINK_CALLBACK    0
#define LWIP_NETIF_HOSTNAME         0

/* ---- hooks (see ipop_lwip_hooks.h; LWIP_RAND is in arch/cc.h) ------------ */
#define LWIP_HOOK_FILENAME          "ipop_lwip_hooks.h"
#define LWIP_RANDOMIZE_INITIAL_LOCAL_PORTS 1

/* ---- stats / debug (LWIP_DEBUG is tested with #ifdef: leave it undefined) ---- */
#define LWIP_STATS                  0
#define LWIP_STATS_DISPLAY          0
#define LWIP_PERF                   0

#endif /* IPOP_LWIPOPTS_H */
