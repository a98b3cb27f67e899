/*
 * lwIP hook declarations for ipop (included by lwIP via LWIP_HOOK_FILENAME,
 * after lwIP's own headers).  Implemented in ipop.c.
 */
#ifndef IPOP_LWIP_HOOKS_H
#define IPOP_LWIP_HOOKS_H

#include "lwip/arch.h"
#include "lwip/ip_addr.h"

/* RFC 6528-style initial sequence number: keyed hash of the 4-tuple plus a clock.
 * Ports are in host byte order. Called from tcp_connect() and tcp_listen_input(). */
u32_t ipop_lwip_tcp_isn(const ip_addr_t *local_ip, u16_t local_port,
                        const ip_addr_t *remote_ip, u16_t remote_port);

#define LWIP_HOOK_TCP_ISN(local_ip, local_port, remote_ip, remote_port) \
    ipop_lwip_tcp_isn((local_ip), (local_port), (remote_ip), (remote_port))

#endif /* IPOP_LWIP_HOOKS_H */
