#!/usr/bin/env python3
"""Polls a moonroute running bench/relay.lua with MESSAGE sip:version@127.0.0.1:PORT until the
reason phrase equals WANT (or, with --hold, checks that it stays WANT); loopback only.
Prints the seconds it took. Bounded by --timeout."""
import argparse, random, socket, sys, time

p = argparse.ArgumentParser()
p.add_argument("port", type=int)
p.add_argument("want")
p.add_argument("--timeout", type=float, default=5.0)
p.add_argument("--hold", action="store_true", help="the answer must stay WANT for the whole timeout")
p.add_argument("--since", type=float, help="wall-clock time (epoch seconds) to measure from")
a = p.parse_args()

s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
s.settimeout(0.2)
lport = s.getsockname()[1]
start = time.monotonic()
n = 0
while time.monotonic() - start < a.timeout:
    n += 1
    tag = f"{random.getrandbits(48):x}"
    msg = (f"MESSAGE sip:version@127.0.0.1:{a.port} SIP/2.0\r\n"
           f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch=z9hG4bK{tag}{n};rport\r\n"
           f"Max-Forwards: 70\r\nFrom: <sip:probe@127.0.0.1:{lport}>;tag={tag}\r\n"
           f"To: <sip:version@127.0.0.1:{a.port}>\r\nCall-ID: probe-{tag}-{n}\r\n"
           f"CSeq: {n} MESSAGE\r\nContent-Length: 0\r\n\r\n")
    s.sendto(msg.encode(), ("127.0.0.1", a.port))
    try:
        data = s.recv(65535).decode(errors="replace")
    except socket.timeout:
        continue
    reason = data.split("\r\n", 1)[0].split(" ", 2)[-1]
    if a.hold:
        if reason != a.want:
            print(f"changed to {reason!r} after {time.monotonic() - start:.3f} s")
            sys.exit(1)
    elif reason == a.want:
        took = time.time() - a.since if a.since else time.monotonic() - start
        print(f"{took:.3f}")
        sys.exit(0)
    time.sleep(0.01)
if a.hold:
    print(f"stayed {a.want!r} for {a.timeout} s")
    sys.exit(0)
print(f"not {a.want!r} after {a.timeout} s", file=sys.stderr)
sys.exit(1)
