#!/usr/bin/env python3
"""Seeds for tests/fuzz_tap.c (layout in its header comment).
Run from the repository root: python3 tests/gen_corpus_tap.py"""
import os, struct

OUT = 'tests/corpus/fuzz_tap'
SELF, DST = bytes([10, 128, 0, 1]), bytes([10, 128, 0, 2])


def csum(b):
    if len(b) % 2:
        b += b'\0'
    s = sum(struct.unpack('>%dH' % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff


def ip_tcp(payload, seq, flags=0x10, ident=0x4000, opts=b''):
    thl = 20 + len(opts)
    tcp = struct.pack('>HHIIBBHHH', 40000, 80, seq, 777, (thl // 4) << 4, flags, 512, 0, 0) + opts
    total = 20 + thl + len(payload)
    ip = struct.pack('>BBHHHBBH4s4s', 0x45, 0, total, ident, 0x4000, 64, 6, 0, SELF, DST)
    ip = ip[:10] + struct.pack('>H', csum(ip)) + ip[12:]
    return ip + tcp + payload


def eth(body, typ=0x0800):
    return b'\x02\0\0\0\0\x02' + b'\x02\x69\x70\x6f\x70\x01' + struct.pack('>H', typ) + body


def vnet(flags, gso, hdr_len, gso_size, cstart, coff):
    return struct.pack('<BBHHHH', flags, gso, hdr_len, gso_size, cstart, coff)


def put(name, data):
    with open(os.path.join(OUT, name), 'wb') as f:
        f.write(data)


os.makedirs(OUT, exist_ok=True)
payload = bytes((i * 7) & 255 for i in range(3000))
# TSO: a 3000-byte super-frame cut at 1000 (and one at 1320, the MTU's)
for name, gso_size, flags in (('tso-3seg', 1000, 0x18), ('tso-mtu', 1320, 0x19), ('tso-fin-cwr', 700, 0x99)):
    f = eth(ip_tcp(payload, 1000, flags))
    put(name, bytes([4]) + vnet(1, 1, 54, gso_size, 34, 16) + f)
opts = b'\x01\x01\x08\x0a' + b'\0\0\0\1\0\0\0\2'
put('tso-options', bytes([4]) + vnet(1, 1, 66, 1000, 34, 16) + eth(ip_tcp(payload[:2100], 5, 0x10, opts=opts)))
put('tso-too-big', bytes([4]) + vnet(1, 1, 54, 1400, 34, 16) + eth(ip_tcp(payload, 1)))
put('csum-only', bytes([4]) + vnet(1, 0, 0, 0, 34, 16) + eth(ip_tcp(payload[:100], 9)))
arp = struct.pack('>HHBBH6s4s6s4s', 1, 0x0800, 6, 4, 1, b'\x02\0\0\0\0\x02', SELF, b'\0' * 6, DST)
put('arp', bytes([0]) + vnet(0, 0, 0, 0, 0, 0) + eth(arp, 0x0806))
# GRO: three in-order segments of one flow, then one that may not join
def pkts(*ps):
    return b''.join(struct.pack('>H', len(p)) + p for p in ps)
segs = [ip_tcp(payload[i:i + 1000], 1000 + i) for i in (0, 1000, 2000)]
put('gro-3seg', bytes([5]) + pkts(*segs))
put('gro-psh-end', bytes([5]) + pkts(segs[0], ip_tcp(payload[1000:1500], 2000, 0x18), segs[2]))
put('gro-gap', bytes([5]) + pkts(segs[0], segs[2], segs[1]))
udp = struct.pack('>BBHHHBBH4s4s', 0x45, 0, 28, 1, 0, 64, 17, 0, SELF, DST) + b'\0' * 8
put('gro-mixed', bytes([5]) + pkts(segs[0], udp, segs[1], segs[2][:600]))
# UDP_GRO control messages: [level 0=SOL_UDP][type 0=UDP_GRO][length][data]
put('cmsg-gro', bytes([2, 0, 0, 4]) + struct.pack('<i', 1300))
put('cmsg-other', bytes([2, 1, 2, 4]) + struct.pack('<i', 5) + bytes([0, 0, 4]) + struct.pack('<i', 9))
put('cmsg-negative', bytes([2, 0, 0, 4]) + struct.pack('<i', -3))
