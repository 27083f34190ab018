#!/usr/bin/env python3
"""The proxies side by side (called by scripts/bench.sh): interleaved rounds of wrk.

Each contender is NAME=BASE_URL=PID[,PID...]. For each path (cache hit, pass-through, gzip hit)
every contender first gets a warm-up longer than the app's max-age=5 (so hits are measured in
steady state, after the entries' first refresh, not in the seconds after a fill), then the
contenders take turns in rounds of equal length (A, B, C, A, B, C, ...). Each round records wrk's
output and the CPU time of the contender's processes; a round in which other processes (neither
the contender, the app, nor wrk) took more than 5 % of the machine is run again, at most twice.
Results go to results.jsonl for report.py.
"""

import argparse
import json
import pathlib
import re
import subprocess
import time

from procstat import CLK, NCPU, children_ticks, log, machine_busy, ticks

PATHS = {
    "hit": ("/api/products/1", None),
    "pass": ("/health", None),
    "gzip": ("/api/products?limit=50", "Accept-Encoding: gzip"),
    # A request neither proxy may cache (it carries a cookie): every one reaches the app, which
    # answers from its in-process cache; the upstream hop, both ways (TCP or Unix socket).
    # (Product 2: bare pingora answers product 1 from its map, cookie or not.)
    "uncached": ("/api/products/2", "Cookie: session=bench"),
}


def wrk(url, header, seconds, conns, out=None):
    cmd = ["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", "--latency", url]
    if header:
        cmd[1:1] = ["-H", header]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    if out:
        out.write_text(run.stdout)
    return run.stdout


def parse(text):
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    requests = int(re.search(r"(\d+) requests in", text).group(1))
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    factor = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return rps, requests, float(p99.group(1)) * factor, int(non2xx.group(1)) if non2xx else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=8, help="longer than the app's max-age=5")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--app-pid", type=int, required=True)
    ap.add_argument("--contender", action="append", required=True, help="NAME=BASE_URL=PID[,PID]")
    ap.add_argument("--skip", action="append", default=[], help="NAME:PATH pairs not measured")
    ap.add_argument("--rotate", action="store_true",
                    help="round r starts with the r-th contender (A B C, B C A, ...): no contender always runs first")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    results = open(out / "results.jsonl", "a")
    contenders = []
    for spec in args.contender:
        name, base, pids = spec.split("=", 2)
        contenders.append((name, base, [int(p) for p in pids.split(",") if p]))

    for path, (url_path, header) in PATHS.items():
        here = [c for c in contenders if f"{c[0]}:{path}" not in args.skip]
        for name, base, _ in here:
            log(f"{path}: warming {name} for {args.warmup} s")
            wrk(base + url_path, header, args.warmup, args.connections)
        for rnd in range(1, args.rounds + 1):
            shift = (rnd - 1) % len(here) if args.rotate and here else 0
            for name, base, pids in here[shift:] + here[:shift]:
                for attempt in range(3):
                    log(f"{path} round {rnd}: {name}" + (f" (again: {attempt})" if attempt else ""))
                    own0 = sum(ticks(p) for p in pids)
                    app0 = ticks(args.app_pid)
                    busy0 = machine_busy()
                    kids0 = children_ticks()
                    t0 = time.monotonic()
                    file = f"wrk-{name}-{path}-r{rnd}.txt"
                    text = wrk(base + url_path, header, args.seconds, args.connections, out / file)
                    elapsed = time.monotonic() - t0
                    kids1 = children_ticks()
                    own = sum(ticks(p) for p in pids) - own0
                    app = ticks(args.app_pid) - app0
                    load = kids1 - kids0
                    other = max(machine_busy() - busy0 - own - app - load, 0) / max(elapsed * NCPU * CLK, 1)
                    if other > 0.05 and attempt < 2:
                        log(f"other processes took {other:.0%} of the machine: round run again")
                        continue
                    rps, requests, p99, non2xx = parse(text)
                    results.write(json.dumps({
                        "group": "proxy_round", "target": name, "path": path, "round": rnd,
                        "rps": rps, "p99_ms": p99, "non2xx": non2xx, "file": file,
                        "cpu_us_per_req": own / CLK * 1e6 / max(requests, 1),
                        "other_share": other, "runs": attempt + 1,
                    }) + "\n")
                    results.flush()
                    break


if __name__ == "__main__":
    main()
