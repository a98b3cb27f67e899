/*
 * Reduced mbedTLS 3.6 configuration for ipop, used as
 *   -DMBEDTLS_CONFIG_FILE='"ipop_mbedtls_config.h"'  (with -I vendor)
 * It replaces mbedtls/mbedtls_config.h entirely. Do not rename it to
 * "mbedtls_config.h": a quoted #include searches the including file's directory
 * first, so build_info.h would silently pick mbedTLS's full default config.
 * IPOP_MBEDTLS_CONFIG_H being defined proves this file is the one in use.
 *
 * Crypto:  AES (+AES-NI, runtime-detected), GCM, ChaCha20-Poly1305,
 *          SHA-1/224/256/384/512, HMAC (MD), HKDF, HMAC_DRBG, CTR_DRBG,
 *          entropy from mbedtls_hardware_poll() only (ipop.c implements it over
 *          getrandom(2)), bignum, ECP secp256r1 + Curve25519, ECDH, ECDSA.
 * PKI:     PK parse/write, X.509 certificate parse/write, CSR parse/write,
 *          CRL parse, PEM, base64, ASN.1.
 * TLS:     TLS 1.2 + DTLS 1.2, client and server; key exchanges PSK,
 *          ECDHE-PSK, ECDHE-ECDSA; DTLS hello-verify cookies, anti-replay.
 *
 * PSA: not needed. In 3.6 only TLS 1.3 requires MBEDTLS_PSA_CRYPTO_C;
 * TLS 1.2/DTLS 1.2 build and run with the legacy crypto API, so both
 * MBEDTLS_PSA_CRYPTO_C and MBEDTLS_USE_PSA_CRYPTO stay off (no
 * psa_crypto_init() call needed).
 */
#ifndef IPOP_MBEDTLS_CONFIG_H
#define IPOP_MBEDTLS_CONFIG_H

/* ---- platform ---------------------------------------------------------- */
#define MBEDTLS_HAVE_ASM
#define MBEDTLS_HAVE_TIME
#define MBEDTLS_HAVE_TIME_DATE          /* X.509 validity checks */
#define MBEDTLS_ERROR_C                 /* mbedtls_strerror() */

/* ---- entropy: only the hardware-poll source (ipop.c: getrandom) -------- */
#define MBEDTLS_ENTROPY_C
#define MBEDTLS_NO_PLATFORM_ENTROPY
#define MBEDTLS_ENTROPY_HARDWARE_ALT
#define MBEDTLS_CTR_DRBG_C
#define MBEDTLS_HMAC_DRBG_C

/* ---- symmetric --------------------------------------------------------- */
#define MBEDTLS_AES_C
#define MBEDTLS_AESNI_C                 /* runtime CPU detection, portable binary */
#define MBEDTLS_GCM_C
#define MBEDTLS_CHACHA20_C
#define MBEDTLS_POLY1305_C
#define MBEDTLS_CHACHAPOLY_C
#define MBEDTLS_CIPHER_C

/* ---- hashes / MAC / KDF ------------------------------------------------ */
#define MBEDTLS_MD_C
#define MBEDTLS_SHA1_C
#define MBEDTLS_SHA224_C
#define MBEDTLS_SHA256_C
#define MBEDTLS_SHA384_C
#define MBEDTLS_SHA512_C
#define MBEDTLS_HKDF_C

/* ---- public key -------------------------------------------------------- */
#define MBEDTLS_BIGNUM_C
#define MBEDTLS_ECP_C
#define MBEDTLS_ECP_DP_SECP256R1_ENABLED
#define MBEDTLS_ECP_DP_CURVE25519_ENABLED
#define MBEDTLS_ECP_NIST_OPTIM
#define MBEDTLS_ECDH_C
#define MBEDTLS_ECDSA_C
#define MBEDTLS_ECDSA_DETERMINISTIC     /* RFC 6979, uses HMAC_DRBG */
#define MBEDTLS_PK_C
#define MBEDTLS_PK_PARSE_C
#define MBEDTLS_PK_WRITE_C

/* ---- encodings --------------------------------------------------------- */
#define MBEDTLS_ASN1_PARSE_C
#define MBEDTLS_ASN1_WRITE_C
#define MBEDTLS_OID_C
#define MBEDTLS_BASE64_C
#define MBEDTLS_PEM_PARSE_C
#define MBEDTLS_PEM_WRITE_C

/* ---- X.509 ------------------------------------------------------------- */
#define MBEDTLS_X509_USE_C
#define MBEDTLS_X509_CRT_PARSE_C
#define MBEDTLS_X509_CRL_PARSE_C
#define MBEDTLS_X509_CSR_PARSE_C
#define MBEDTLS_X509_CREATE_C
#define MBEDTLS_X509_CRT_WRITE_C
#define MBEDTLS_X509_CSR_WRITE_C

/* ---- TLS 1.2 / DTLS 1.2 ----------------------------------------------- */
#define MBEDTLS_SSL_TLS_C
#define MBEDTLS_SSL_CLI_C
#define MBEDTLS_SSL_SRV_C
#define MBEDTLS_SSL_PROTO_TLS1_2
#define MBEDTLS_SSL_PROTO_DTLS
#define MBEDTLS_SSL_DTLS_HELLO_VERIFY
#define MBEDTLS_SSL_DTLS_CLIENT_PORT_REUSE
#define MBEDTLS_SSL_DTLS_ANTI_REPLAY
#define MBEDTLS_SSL_COOKIE_C
#define MBEDTLS_KEY_EXCHANGE_PSK_ENABLED
#define MBEDTLS_KEY_EXCHANGE_ECDHE_PSK_ENABLED
#define MBEDTLS_KEY_EXCHANGE_ECDHE_ECDSA_ENABLED
#define MBEDTLS_SSL_EXTENDED_MASTER_SECRET
#define MBEDTLS_SSL_ENCRYPT_THEN_MAC
#define MBEDTLS_SSL_SERVER_NAME_INDICATION
#define MBEDTLS_SSL_ALL_ALERT_MESSAGES
/* Off on purpose: MBEDTLS_SSL_KEEP_PEER_CERTIFICATE (saves memory; the peer's
 * certificate is verified during the handshake, only its digest is kept),
 * MBEDTLS_SSL_CACHE_C, MBEDTLS_SSL_TICKET_C, MBEDTLS_SSL_RENEGOTIATION,
 * MBEDTLS_SSL_PROTO_TLS1_3 (would need PSA), MBEDTLS_NET_C, MBEDTLS_TIMING_C
 * (the event loop drives the DTLS timer), MBEDTLS_DEBUG_C, RSA, CBC modes. */

#endif /* IPOP_MBEDTLS_CONFIG_H */
