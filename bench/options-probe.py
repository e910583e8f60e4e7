#!/usr/bin/env python3
"""Sends OPTIONS sip:127.0.0.1:PORT over UDP every --interval seconds until a 200 arrives;
loopback only. Prints the seconds from --since (wall-clock epoch seconds, e.g. when the server
was started) or from the probe's own start, and the number of OPTIONS sent. Bounded by
--timeout; exits 1 when no 200 came."""
import argparse, random, socket, sys, time

p = argparse.ArgumentParser()
p.add_argument("port", type=int)
p.add_argument("--timeout", type=float, default=60.0)
p.add_argument("--interval", type=float, default=0.005)
p.add_argument("--since", type=float, help="wall-clock time (epoch seconds) to measure from")
a = p.parse_args()

since = a.since if a.since else time.time()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
s.settimeout(a.interval)
lport = s.getsockname()[1]
tag = f"{random.getrandbits(48):x}"
start = time.monotonic()
n = 0
while time.monotonic() - start < a.timeout:
    n += 1
    msg = (f"OPTIONS sip:127.0.0.1:{a.port} SIP/2.0\r\n"
           f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch=z9hG4bK{tag}{n};rport\r\n"
           f"Max-Forwards: 70\r\nFrom: <sip:probe@127.0.0.1:{lport}>;tag={tag}\r\n"
           f"To: <sip:127.0.0.1:{a.port}>\r\nCall-ID: probe-{tag}-{n}\r\n"
           f"CSeq: {n} OPTIONS\r\nContent-Length: 0\r\n\r\n")
    s.sendto(msg.encode(), ("127.0.0.1", a.port))
    deadline = time.monotonic() + a.interval
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        s.settimeout(left)
        try:
            data = s.recv(65535).decode(errors="replace")
        except (socket.timeout, OSError):
            break
        if data.startswith("SIP/2.0 200"):
            print(f"{time.time() - since:.3f} s ({n} OPTIONS sent)")
            sys.exit(0)
print(f"no 200 to OPTIONS within {a.timeout} s ({n} sent)")
sys.exit(1)
