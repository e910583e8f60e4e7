#!/usr/bin/env python3
"""Slow TCP clients against moonroute, loopback only: --attackers connections from --from
(127.0.0.2) each send one byte of a never-ending header block every --every seconds, and open a
new connection (after --pause) whenever the server closes theirs. Meanwhile a client on
127.0.0.1 opens a fresh TCP connection every --probe-every seconds and sends an OPTIONS for the
server: the time to its 200 is what the attack must not spoil. Bounded by --duration. Prints
the probe's times and what the attackers saw; exits 1 when a probe got no 200."""
import argparse, socket, statistics, sys, threading, time

p = argparse.ArgumentParser()
p.add_argument("port", type=int)
p.add_argument("--attackers", type=int, default=20)
p.add_argument("--every", type=float, default=2.0)
p.add_argument("--pause", type=float, default=0.05)
p.add_argument("--from", dest="source", default="127.0.0.2")
p.add_argument("--duration", type=float, default=30.0)
p.add_argument("--probe-every", type=float, default=1.0)
a = p.parse_args()
server = ("127.0.0.1", a.port)
end = time.monotonic() + a.duration
head = (f"OPTIONS sip:127.0.0.1:{a.port} SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP {a.source}:9;branch=z9hG4bK-slow\r\nX-Filler: ").encode() + b"a" * 4000
lock = threading.Lock()
seen = {"connections": 0, "refused at once": 0, "held until closed": [], "bytes sent": 0}


def attacker():
    while time.monotonic() < end:
        s = socket.socket()
        s.bind((a.source, 0))
        try:
            s.connect(server)
        except OSError:
            time.sleep(a.pause)
            continue
        opened = time.monotonic()
        with lock:
            seen["connections"] += 1
        s.settimeout(a.every)
        sent = 0
        while time.monotonic() < end:
            try:
                s.send(head[sent:sent + 1])
                sent += 1
                with lock:
                    seen["bytes sent"] += 1
                if s.recv(1) == b"":
                    break
            except socket.timeout:
                continue
            except OSError:
                break
        else:
            s.close()
            return
        held = time.monotonic() - opened
        with lock:
            if held < 0.5:
                seen["refused at once"] += 1
            else:
                seen["held until closed"].append(held)
        s.close()
        time.sleep(a.pause)


def probe(n):
    c = socket.socket()
    c.settimeout(5)
    started = time.monotonic()
    try:
        c.connect(server)
        c.sendall((f"OPTIONS sip:127.0.0.1:{a.port} SIP/2.0\r\n"
                   f"Via: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bK-probe{n}\r\nMax-Forwards: 70\r\n"
                   f"From: <sip:probe@127.0.0.1>;tag=p{n}\r\nTo: <sip:127.0.0.1:{a.port}>\r\n"
                   f"Call-ID: probe-{n}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode())
        answer = c.recv(4096)
        return (time.monotonic() - started) * 1000 if answer.startswith(b"SIP/2.0 200") else None
    except OSError:
        return None
    finally:
        c.close()


threads = [threading.Thread(target=attacker) for _ in range(a.attackers)]
for t in threads:
    t.start()
times, failed, n = [], 0, 0
time.sleep(min(3.0, a.duration / 4))  # let the attackers take their places first
while time.monotonic() < end - a.probe_every:
    n += 1
    took = probe(n)
    if took is None:
        failed += 1
    else:
        times.append(took)
    time.sleep(a.probe_every)
for t in threads:
    t.join()
held = seen.pop("held until closed")
print(f"probe from 127.0.0.1: {len(times)} OPTIONS answered 200, {failed} not; "
      + (f"ms to 200: min {min(times):.1f} median {statistics.median(times):.1f} max {max(times):.1f}"
         if times else ""))
print(f"attackers from {a.source}: " + ", ".join(f"{k} {v}" for k, v in seen.items())
      + f", held then closed {len(held)}"
      + (f" (after {min(held):.1f} to {max(held):.1f} s)" if held else ""))
sys.exit(1 if failed else 0)
