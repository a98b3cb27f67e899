#!/usr/bin/env python3
"""Seed corpora for the fuzz targets of issue 18 (tests/gen_corpus.c makes
fuzz_link, fuzz_wire and fuzz_config's):
  fuzz_dht    one DHT message per operation, and near misses
  fuzz_state  lease and remembered-peers files, as written and damaged
  fuzz_tap    TSO super-frames, GRO packet trains, UDP_GRO control messages
  fuzz_ctl    control lines and --metrics requests
  fuzz_socks  logins and UDP relay datagrams (the CONNECT seeds predate this)
  fuzz_cert   certificates from ./ipop ca init / cert issue (needs ./ipop),
              patches, cert issue flags, revocation lists
Layouts: each tests/fuzz_NAME.c's header comment.  Files named regress*
are inputs that crashed a fuzzer once; they are kept as found, not made here.
Run from the repository root: python3 tests/gen_corpus.py"""
import base64
import os
import shutil
import struct
import subprocess
import tempfile

ROOT = 'tests/corpus'


def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), 'wb') as f:
        f.write(data if isinstance(data, bytes) else data.encode())


# ---- fuzz_dht: op status token key_len key owner ttl value cert sig
def dht_msg(op, st, tok, key, owner, ttl, val, cert, sig):
    return (bytes([op, st]) + struct.pack('>I', tok) + bytes([len(key)]) + key + owner + struct.pack('>I', ttl) +
            struct.pack('>H', len(val)) + val + struct.pack('>H', len(cert)) + cert + bytes([len(sig)]) + sig)


def gen_dht():
    own = bytes(range(20))
    seeds = {
        'put': dht_msg(1, 0, 7, b'ip:10.128.0.5', own, 60, bytes([10, 128, 0, 5]), b'', b''),
        'create-cert': dht_msg(2, 0, 8, b'name:alice', own, 60, bytes([10, 128, 0, 9]), b'\x30\x82' + b'\x01' * 200,
                               b'\x30\x44' + b'\x02' * 68),
        'get': dht_msg(3, 0, 9, b'name:bob', bytes(20), 0, b'', b'', b''),
        'reply-ok': dht_msg(4, 0, 9, b'name:bob', own, 30, bytes([10, 128, 1, 1]), b'', b''),
        'reply-notfound': dht_msg(4, 1, 9, b'ip:10.128.3.3', bytes(20), 0, b'', b'', b''),
        'replica': dht_msg(5, 0, 1, b'ip:10.128.0.7', own, 86400, b'v' * 1024, b'', b''),
        'release': dht_msg(6, 0, 2, b'k' * 96, own, 0, b'', b'', b''),
        'bad-op': dht_msg(7, 0, 2, b'k', own, 0, b'', b'', b''),
        'trailing': dht_msg(3, 0, 9, b'name:bob', bytes(20), 0, b'', b'', b'') + b'\0',
    }
    for k, v in seeds.items():
        put('fuzz_dht', k, v)


# ---- fuzz_state: one file, read as a lease and as remembered peers
def gen_state():
    seeds = {
        'lease': "# ipop --ip auto: this node's leased address; delete the file to draw another\n"
                 "net 10.128.0.0/16\nip 10.128.7.9\naddr 00112233445566778899aabbccddeeff00112233\n",
        'lease-othernet': "net 10.129.0.0/16\nip 10.129.7.9\naddr 00112233445566778899aabbccddeeff00112233\n",
        'lease-gateway': "net 10.128.0.0/16\nip 10.128.255.254\n",
        'lease-noaddr': "ip 10.128.0.77\naddr zz\n",
        'peers': "# ipop: peers this node linked to, newest first; read at start\n"
                 "udp://192.0.2.1:4000\ntcp://198.51.100.7:443\n",
        'peers-bad': "udp://10.128.0.3:4000\nudp://host.example:1\ntcp://1.2.3.4:0\ntcp://1.2.3.4:65536\n"
                     "udp://:5\nhttp://1.2.3.4:5\r\nudp://5.6.7.8:9\r\n",
        'peers-many': "".join("udp://203.0.113.%d:%d\n" % (i, 4000 + i) for i in range(20)),
        'mixed': "net 10.128.0.0/16\nip 10.128.0.1\nudp://192.0.2.9:7\naddr 0000000000000000000000000000000000000001\n",
    }
    for k, v in seeds.items():
        put('fuzz_state', k, v)


# ---- fuzz_tap
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


def put_tap(name, data):
    put('fuzz_tap', name, data)


def gen_tap():
    payload = bytes((i * 7) & 255 for i in range(3000))
    # TSO: a 3000-byte super-frame cut at 1000 (and one at 1320, the MTU's)
    for name, gso_size, flags in (('tso-3seg', 1000, 0x18), ('tso-mtu', 1320, 0x19), ('tso-fin-cwr', 700, 0x99)):
        f = eth(ip_tcp(payload, 1000, flags))
        put_tap(name, bytes([4]) + vnet(1, 1, 54, gso_size, 34, 16) + f)
    opts = b'\x01\x01\x08\x0a' + b'\0\0\0\1\0\0\0\2'
    put_tap('tso-options', bytes([4]) + vnet(1, 1, 66, 1000, 34, 16) + eth(ip_tcp(payload[:2100], 5, 0x10, opts=opts)))
    put_tap('tso-too-big', bytes([4]) + vnet(1, 1, 54, 1400, 34, 16) + eth(ip_tcp(payload, 1)))
    put_tap('csum-only', bytes([4]) + vnet(1, 0, 0, 0, 34, 16) + eth(ip_tcp(payload[:100], 9)))
    # USO: a UDP_SEGMENT send of 2800 bytes cut at 1000 (GSO_UDP_L4)
    uso = struct.pack('>BBHHHBBH4s4s', 0x45, 0, 28 + 2800, 7, 0, 64, 17, 0, SELF, DST)
    uso = uso[:10] + struct.pack('>H', csum(uso)) + uso[12:] + struct.pack('>HHHH', 40000, 53, 8 + 2800, 0)
    put_tap('uso-3seg', bytes([4]) + vnet(1, 5, 42, 1000, 34, 6) + eth(uso + payload[:2800]))
    arp = struct.pack('>HHBBH6s4s6s4s', 1, 0x0800, 6, 4, 1, b'\x02\0\0\0\0\x02', SELF, b'\0' * 6, DST)
    put_tap('arp', bytes([0]) + vnet(0, 0, 0, 0, 0, 0) + eth(arp, 0x0806))
    # GRO: three in-order segments of one flow, then one that may not join
    def pkts(*ps):
        return b''.join(struct.pack('>H', len(p)) + p for p in ps)
    segs = [ip_tcp(payload[i:i + 1000], 1000 + i) for i in (0, 1000, 2000)]
    put_tap('gro-3seg', bytes([5]) + pkts(*segs))
    put_tap('gro-psh-end', bytes([5]) + pkts(segs[0], ip_tcp(payload[1000:1500], 2000, 0x18), segs[2]))
    put_tap('gro-gap', bytes([5]) + pkts(segs[0], segs[2], segs[1]))
    udp = struct.pack('>BBHHHBBH4s4s', 0x45, 0, 28, 1, 0, 64, 17, 0, SELF, DST) + b'\0' * 8
    put_tap('gro-mixed', bytes([5]) + pkts(segs[0], udp, segs[1], segs[2][:600]))
    # UDP_GRO control messages: [level 0=SOL_UDP][type 0=UDP_GRO][length][data]
    put_tap('cmsg-gro', bytes([2, 0, 0, 4]) + struct.pack('<i', 1300))
    put_tap('cmsg-other', bytes([2, 1, 2, 4]) + struct.pack('<i', 5) + bytes([0, 0, 4]) + struct.pack('<i', 9))
    put_tap('cmsg-negative', bytes([2, 0, 0, 4]) + struct.pack('<i', -3))


# ---- fuzz_ctl: flags (1 HTTP, 2 EOF), then pieces [u8 length][bytes]
def pieces(text, cut=None):
    b = text.encode()
    parts = [b[i:i + (cut or 255)] for i in range(0, len(b), cut or 255)] or [b'']
    return b''.join(bytes([len(p)]) + p for p in parts)


def gen_ctl():
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
        put('fuzz_ctl', name, bytes([flags]) + pieces(text, 7 if name in ('split', 'metrics') else None))
    put('fuzz_ctl', 'too-long', bytes([0]) + pieces('x' * 5000))


# ---- fuzz_socks: byte 0 (cut; odd: logins required), then the client's bytes
def gen_socks():
    req = b'\x05\x01\x00\x01' + bytes([10, 128, 0, 5]) + struct.pack('>H', 80)
    hdr = b'\x00\x00\x00\x01' + bytes([10, 128, 0, 9]) + struct.pack('>H', 53)
    seeds = {
        'login_ok': bytes([9]) + b'\x05\x02\x00\x02' + b'\x01\x05alice\x06secret' + req,
        'login_bad': bytes([7]) + b'\x05\x01\x02' + b'\x01\x05alice\x06secreT' + req,
        'login_colon': bytes([3]) + b'\x05\x01\x02' + b'\x01\x03bob\x03p:w' + req,
        'login_empty_pw': bytes([1]) + b'\x05\x01\x02' + b'\x01\x05carol\x00' + req,
        'login_v2': bytes([5]) + b'\x05\x01\x02' + b'\x02\x05alice\x06secret',
        'greet_noauth_offered': bytes([1]) + b'\x05\x01\x00',
        'greet_v4': bytes([2]) + b'\x04\x01\x00' + req,
        'udp_dgram': bytes([0]) + hdr + b'query',
        'udp_dgram_frag': bytes([0]) + b'\x00\x00\x01\x01' + bytes([10, 128, 0, 9]) + struct.pack('>H', 53) + b'q',
        'udp_dgram_offnet': bytes([0]) + b'\x00\x00\x00\x01' + bytes([192, 0, 2, 1]) + struct.pack('>H', 53) + b'q',
    }
    for k, v in seeds.items():
        put('fuzz_socks', k, v)


# ---- fuzz_cert: byte 0 = mode (0 DER, 1 PATCH, 2 PEM, 3 ISSUE, 4 CRL)
def gen_cert():
    if not os.access('./ipop', os.X_OK):
        print('gen_corpus.py: no ./ipop (run make): fuzz_cert seeds left as they are')
        return
    d = tempfile.mkdtemp(prefix='ipop-gen-corpus-')
    try:
        run = lambda *a: subprocess.run(['./ipop', *a], check=True, stdout=subprocess.DEVNULL)
        run('ca', 'init', '--out', d + '/ca')
        run('cert', 'issue', '--ca', d + '/ca', '--out', d + '/n1', '--name', 'alice', '--ip', '10.128.0.5',
            '--ip', '10.128.0.6', '--route-for', '10.200.0.0/24')
        run('cert', 'issue', '--ca', d + '/ca', '--out', d + '/n2')
        run('ca', 'revoke', '--ca', d + '/ca', '--cert', d + '/n1/node.crt')
        pem = lambda p: open(p, 'rb').read()
        der = lambda p: base64.b64decode(b''.join(pem(p).split(b'-----')[2].split()))
        put('fuzz_cert', 'der-node', b'\0' + der(d + '/n1/node.crt'))
        put('fuzz_cert', 'der-node-noip', b'\0' + der(d + '/n2/node.crt'))
        put('fuzz_cert', 'der-ca', b'\0' + der(d + '/ca/ca.crt'))
        put('fuzz_cert', 'pem-node', b'\2' + pem(d + '/n1/node.crt'))
        put('fuzz_cert', 'pem-chain', b'\2' + pem(d + '/n1/node.crt') + pem(d + '/ca/ca.crt'))
        put('fuzz_cert', 'crl-revoke', b'\4' + pem(d + '/ca/crl.txt'))
    finally:
        shutil.rmtree(d)
    put('fuzz_cert', 'patch-none', b'\1')
    put('fuzz_cert', 'patch-serial', b'\1' + bytes([0, 15, 1]))
    put('fuzz_cert', 'patch-san', b'\1' + bytes([1, 0x40, 0x20, 1, 0x41, 0x7f]))
    put('fuzz_cert', 'issue-full', b'\3--name alice --ip 10.128.0.5 --ip 10.128.0.6 --route-for 10.200.0.0/24 --days 30')
    put('fuzz_cert', 'issue-max', b'\3--name ' + b'n' * 63 + b''.join(b' --ip 10.128.0.%d' % i for i in range(1, 9)) +
        b''.join(b' --route-for 10.%d.0.0/16' % i for i in range(200, 208)))
    put('fuzz_cert', 'issue-none', b'\3')
    put('fuzz_cert', 'issue-wide', b'\3--route-for 0.0.0.0/0 --ip 255.255.255.255')
    put('fuzz_cert', 'crl-comments', b'\4# list\n\n  0a0b  \n7f # x\n' + b'ff' * 20 + b'\n')
    put('fuzz_cert', 'crl-bad', b'\4' + b'ff' * 21 + b'\n')
    put('fuzz_cert', 'crl-odd', b'\4abc\n')
    put('fuzz_cert', 'crl-good', b'\4@\n')
    put('fuzz_cert', 'crl-good-2', b'\4# revoked\n0102\n@  # fuzz-node\n')


if __name__ == '__main__':
    for gen in (gen_dht, gen_state, gen_tap, gen_ctl, gen_socks, gen_cert):
        gen()
