#!/usr/bin/env python3
"""Seeds for tests/fuzz_ctl.c: byte 0 = flags (1 HTTP, 2 EOF), then pieces
[u8 length][bytes].  Run from the repository root: python3 tests/gen_corpus_ctl.py"""
import os

OUT = 'tests/corpus/fuzz_ctl'
os.makedirs(OUT, exist_ok=True)


def pieces(text, cut=None):
    b = text.encode()
    parts = [b[i:i + (cut or 255)] for i in range(0, len(b), cut or 255)] or [b'']
    return b''.join(bytes([len(p)]) + p for p in parts)


seeds = {
    'status': (0, 'status\n'),
    'status-json': (0, 'status json\n'),
    'map': (0, 'map\n'),
    'ping-self': (0, 'ping 10.128.0.1 500\n'),
    'ping-hex': (0, 'ping 0123456789abcdef0123456789abcdef01234567 1000\n'),
    'ping-bad': (0, 'ping 10.128.0.2 0\n'),
    'dht-get': (0, 'dht get name:alice\n'),
    'dht-put': (0, 'dht put 60 name:bob 0a800002\n'),
    'dht-create': (0, 'dht create 30 ip:10.128.0.9 00\n'),
    'route-add': (0, 'route add 10.200.1.0/24\n'),
    'route-del': (0, 'route del 10.200.1.0/24\n'),
    'route-bad': (0, 'route add 10.200.1.0/33\n'),
    'unknown': (0, 'frobnicate now\n'),
    'split': (2, 'status js'),
    'metrics': (1, 'GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n'),
    'metrics-root': (1, 'GET / HTTP/1.1\n\n'),
    'metrics-404': (1, 'GET /nope HTTP/1.0\r\n\r\n'),
    'metrics-post': (1, 'POST /metrics HTTP/1.0\r\n\r\n'),
    'metrics-partial': (3, 'GET /metrics HTTP/1.0\r\n'),
}
for name, (flags, text) in seeds.items():
    with open(os.path.join(OUT, name), 'wb') as f:
        f.write(bytes([flags]) + pieces(text, 7 if name in ('split', 'metrics') else None))
with open(os.path.join(OUT, 'too-long'), 'wb') as f:
    f.write(bytes([0]) + pieces('x' * 5000))
