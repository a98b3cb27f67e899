/*
 * lwIP architecture header for ipop: Linux (musl or glibc), x86-64 / any
 * little- or big-endian 64-bit host, NO_SYS=1 raw API, single-threaded.
 *
 * The port supplies (in ipop.c):
 *   u32_t sys_now(void);             CLOCK_MONOTONIC milliseconds
 *   uint32_t ipop_lwip_rand(void);   random source for LWIP_RAND()
 *   u32_t ipop_lwip_tcp_isn(...);    TCP ISN hook (see ipop_lwip_hooks.h)
 *   ipop_lwip_malloc/calloc/free     lwIP's heap (lwipopts.h, MEM_CUSTOM_ALLOCATOR)
 */
#ifndef IPOP_LWIP_ARCH_CC_H
#define IPOP_LWIP_ARCH_CC_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* Byte order from the compiler; lwIP's own detection is only a default. */
#if defined(__BYTE_ORDER__) && (__BYTE_ORDER__ == __ORDER_BIG_ENDIAN__)
#  ifndef BYTE_ORDER
#    define BYTE_ORDER BIG_ENDIAN
#  endif
#else
#  ifndef BYTE_ORDER
#    define BYTE_ORDER LITTLE_ENDIAN
#  endif
#  define lwip_htons(x) ((u16_t)__builtin_bswap16((u16_t)(x)))
#  define lwip_htonl(x) ((u32_t)__builtin_bswap32((u32_t)(x)))
#endif

/* ipop.c also includes the system's <arpa/inet.h>/<netinet/in.h>: keep lwIP from
 * #defining htons()/ntohl()/... over the libc ones (glibc defines them as macros
 * when optimising, which would be a redefinition error under -Werror). */
#define LWIP_DONT_PROVIDE_BYTEORDER_FUNCTIONS 1

/* errno: use the C library's (only relevant to the socket API, which is off). */
#define LWIP_ERRNO_STDINCLUDE 1

/* No struct timeval from lwIP (sockets are off anyway). */
#define LWIP_TIMEVAL_PRIVATE 0

/* Diagnostics and assertions. */
#define LWIP_PLATFORM_DIAG(x) do { printf x; } while (0)
#define LWIP_PLATFORM_ASSERT(x) do { \
        fprintf(stderr, "lwIP assertion \"%s\" failed at %s:%d\n", (x), __FILE__, __LINE__); \
        fflush(stderr); abort(); } while (0)

/* Random numbers: supplied by ipop.c (getrandom-backed). */
uint32_t ipop_lwip_rand(void);
#define LWIP_RAND() ((u32_t)ipop_lwip_rand())

/* lwIP's heap: malloc with a cache of freed blocks in front (ipop.c, lw_heap). */
void *ipop_lwip_malloc(size_t size);
void *ipop_lwip_calloc(size_t n, size_t size);
void ipop_lwip_free(void *p);

/* NO_SYS=1 + SYS_LIGHTWEIGHT_PROT=0: protection is a no-op, but the type must exist. */
typedef int sys_prot_t;

#endif /* IPOP_LWIP_ARCH_CC_H */
