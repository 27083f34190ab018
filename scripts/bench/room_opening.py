#!/usr/bin/env python3
"""Where a sale's first requests waited: the buyers' clients, the wire, the sidecars, the line.

Reads one round of room.py run with --trace, --access-log and --capture, and prints, for each
pod and each window of the sale's opening (25 ms by default), how many order requests:
- the honest buyers sent (mall-load's trace: when each request was sent);
- reached the pod's socket (the packet capture: packets carrying `POST /api/orders`, the
  attack's among them; a client that queued its request before writing it shows up here late);
- the sidecar began (its access log: the end of the request less its duration; a sidecar busy
  with other connections reads a request that waits in its socket late);
and how many honest buyers had been let through by the end of the window (from the trace).
A request on the wire that the sidecar begins 50 ms later was numbered 50 ms late by the line;
while no request reaches the line, its front is capped `burst` ahead of the last number, and the
admissions it could have made in that time are not made later (BENCHMARKS.md section 5, run 7).

Usage: room_opening.py --report room-room-attacked-r1.json --trace trace-room-attacked-r1.jsonl
       --access-log WORK/room-sidecar-room-0.log WORK/room-sidecar-room-1.log
       [--capture capture-room-attacked-r1.pcap] [--ms 300] [--step 25]
(traces, logs and captures may be gzipped; reading a capture needs tcpdump)
"""

import argparse
import datetime
import gzip
import json
import re
import subprocess


def opener(path):
    return gzip.open(path, "rt") if path.endswith(".gz") else open(path)


def started(log, lo_ms, hi_ms):
    """Start times (Unix ms) of the order requests in a sidecar's access log within [lo, hi)."""
    out = []
    with opener(log) as f:
        for line in f:
            if '"target":"access"' not in line or "/api/orders" not in line:
                continue
            e = json.loads(line)
            if e.get("method") != "POST" or e.get("path") != "/api/orders":
                continue
            end = datetime.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp() * 1000
            begin = end - e["duration_ms"]
            if lo_ms <= begin < hi_ms:
                out.append(begin)
    return out


def on_wire(pcap, ports):
    """(Unix ms, port) of the captured packets that carry the start of an order request."""
    if pcap.endswith(".gz"):
        with gzip.open(pcap, "rb") as f:
            raw = f.read()
        text = subprocess.run(["tcpdump", "-r", "-", "-nn", "-tt", "-A"], input=raw, capture_output=True).stdout
        text = text.decode("latin-1")
    else:
        text = subprocess.run(["tcpdump", "-r", pcap, "-nn", "-tt", "-A"], capture_output=True, text=True,
                              errors="replace").stdout
    out, cur = [], None
    for line in text.splitlines():
        m = re.match(r"^(\d+\.\d+) IP [\d.]+\.\d+ > [\d.]+\.(\d+): Flags", line)
        if m:
            cur = (float(m.group(1)) * 1000, m.group(2)) if m.group(2) in ports else None
        elif cur and "POST /api/orders" in line:
            out.append(cur)
            cur = None
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--report", required=True, help="the round's mall-load JSON (room-<front>-r<n>.json)")
    ap.add_argument("--trace", required=True)
    ap.add_argument("--access-log", nargs="+", required=True, help="the room's sidecar logs, pod 0 first")
    ap.add_argument("--capture")
    ap.add_argument("--ports", default="8501,8502",
                    help="the pods' ports, pod 0 first (room.py: 8501,8502 for the room, 8521,8522 for room-nohold)")
    ap.add_argument("--ms", type=float, default=300)
    ap.add_argument("--step", type=float, default=25)
    args = ap.parse_args()
    origin = json.load(open(args.report))["sale_started_unix_ms"]
    with opener(args.trace) as f:
        buyers = [json.loads(line) for line in f]
    ports = args.ports.split(",")
    if len(ports) != len(args.access_log):
        raise SystemExit(f"--ports names {len(ports)} pods, --access-log {len(args.access_log)}")
    sent = [(r["at_ms"], b["target"]) for b in buyers for r in b["requests"]]
    let_through = sorted(b["admitted_ms"] for b in buyers if b["admitted_ms"] is not None)
    begun = [[t - origin for t in started(log, origin - 1000, origin + args.ms + 1000)] for log in args.access_log]
    wire = None
    if args.capture:
        wire = [(t - origin, ports.index(p)) for t, p in on_wire(args.capture, set(ports))]
    steps = int(args.ms // args.step)
    print(f"ms from the sale's start; per pod: honest sent / on the wire (all) / begun by the sidecar (all)")
    for i in range(steps):
        lo, hi = i * args.step, (i + 1) * args.step
        cells = []
        for pod in range(len(args.access_log)):
            n_sent = sum(1 for t, p in sent if p == pod and lo <= t < hi)
            n_wire = "-" if wire is None else sum(1 for t, p in wire if p == pod and lo <= t < hi)
            n_begun = sum(1 for t in begun[pod] if lo <= t < hi)
            cells.append(f"pod {pod}: {n_sent:3d} / {n_wire:>3} / {n_begun:3d}")
        through = sum(1 for t in let_through if t < hi)
        print(f"{lo:5.0f}-{hi:<5.0f} " + " | ".join(cells) + f" | honest let through by then: {through}")


if __name__ == "__main__":
    main()
