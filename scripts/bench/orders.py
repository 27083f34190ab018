#!/usr/bin/env python3
"""Group commit against one order per transaction, side by side (called by scripts/bench.sh).

For each backend (SQLite, PostgreSQL, MariaDB) two apps run over one freshly seeded database: `off`
(`--order-batch-max 1`, one transaction per order) and `on` (the defaults). For each workload
(seed 001's orders at 20 concurrent, the flash sale at 500, one client alone) they take turns in
interleaved rounds of equal length (off, on, off, on, ...). Each round records mall-load's JSON
report with its database check, and the CPU time of the app, of PostgreSQL and of the load
generator (the database's CPU: every PostgreSQL process, or mariadbd); a round in which other processes took more than 5 % of the machine is run again
(at most twice). Results are appended to results.jsonl for report.py.
"""

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time
import urllib.request

from procstat import CLK, NCPU, children_ticks, log, machine_busy, ticks


def db_pids(backend):
    """The database server's processes: PostgreSQL's (one per connection), or mariadbd."""
    if backend == "sqlite":
        return []
    command = ["pgrep", "-u", "postgres"] if backend == "postgres" else ["pgrep", "-x", "mariadbd"]
    out = subprocess.run(command, capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def wait_ready(port, proc, logfile):
    for _ in range(600):
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"app on port {port} did not start:\n{pathlib.Path(logfile).read_text()}")


def metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--flash-stock", type=int, default=5000)
    ap.add_argument("--backends", default="sqlite,postgres")
    ap.add_argument("--workloads", default="orders,flash,single")
    ap.add_argument("--on-args", default="", help="extra mall-app flags for the group-commit contender")
    ap.add_argument("--pg-admin", default="postgres://mall:mall@127.0.0.1:5432/test")
    ap.add_argument("--mysql-url", default="mysql://mall:mall@127.0.0.1:3306",
                    help="MariaDB (the bench database is created in it)")
    ap.add_argument("--contenders", default=None,
                    help="name=mall-app flags;name=flags ... (default: off=--order-batch-max 1;on=<--on-args>)")
    ap.add_argument("--group", default="orders", help="the results' group name")
    ap.add_argument("--rotate", action="store_true",
                    help="round r starts with the r-th contender (A B C, B C A, ...): no contender always runs first")
    args = ap.parse_args()
    bin_dir, work, out = pathlib.Path(args.bin), pathlib.Path(args.work), pathlib.Path(args.out)
    results = open(out / "results.jsonl", "a")
    env = dict(os.environ, MALL_LOG_FORMAT="json", MALL_SHUTDOWN_DELAY_MS="0")

    for backend in args.backends.split(","):
        if backend == "sqlite":
            data = work / "orders-data"
            subprocess.run(["rm", "-rf", str(data)], check=True)
            db_args = ["--data-dir", str(data)]
            check_url = f"sqlite://{data}/mall.db?mode=ro"
        elif backend == "mariadb":
            url = args.mysql_url.rstrip("/") + "/mall_orders_bench"
            m = re.match(r"mysql://([^:]+):([^@]+)@([^:/]+):(\d+)", args.mysql_url)
            subprocess.run(
                ["mariadb", "-u", m.group(1), f"-p{m.group(2)}", "-h", m.group(3), "-P", m.group(4), "-e",
                 "DROP DATABASE IF EXISTS mall_orders_bench; CREATE DATABASE mall_orders_bench"], check=True)
            db_args = ["--database-url", url]
            check_url = url
        elif backend == "postgres":
            pg = args.pg_admin.rsplit("/", 1)[0] + "/mall_orders_bench"
            subprocess.run(
                ["psql", "-q", args.pg_admin, "-c", "DROP DATABASE IF EXISTS mall_orders_bench",
                 "-c", "CREATE DATABASE mall_orders_bench"], check=True)
            db_args = ["--database-url", pg]
            check_url = pg
        else:
            sys.exit(f"unknown backend {backend!r}: sqlite, postgres or mariadb")
        subprocess.run([str(bin_dir / "mall-app"), "seed", *db_args, "--seed-stock", "1000000"],
                       check=True, stdout=subprocess.DEVNULL)
        apps = {}
        try:
            measure(args, backend, db_args, check_url, apps, bin_dir, work, out, env, results)
        finally:
            for proc, _ in apps.values():
                proc.terminate()
                proc.wait()


def measure(args, backend, db_args, check_url, apps, bin_dir, work, out, env, results):
    spec = args.contenders or f"off=--order-batch-max 1;on={args.on_args}"
    contenders = [(c.split("=", 1)[0], 3301 + i, c.split("=", 1)[1].split()) for i, c in enumerate(spec.split(";"))]
    for contender, port, extra in contenders:
        logfile = work / f"orders-{backend}-{contender}.log"
        # NAME=value words are the contender's environment (the OTEL_* variables), the rest flags.
        own_env = dict(env, **dict(w.split("=", 1) for w in extra if re.match(r"^[A-Z][A-Z0-9_]*=", w)))
        flags = [w for w in extra if not re.match(r"^[A-Z][A-Z0-9_]*=", w)]
        proc = subprocess.Popen(
            [str(bin_dir / "mall-app"), "serve", "--listen", f"127.0.0.1:{port}", *db_args, *flags],
            stdout=open(logfile, "w"), stderr=subprocess.STDOUT, env=own_env)
        wait_ready(port, proc, logfile)
        apps[contender] = (proc, port)

    workloads = {
        "orders": ["--scenario", "orders", "--concurrency", "20"],
        "flash": ["--scenario", "flash-sale", "--concurrency", "500", "--flash-stock", str(args.flash_stock)],
        "single": ["--scenario", "orders", "--concurrency", "1"],
    }
    for workload, load_args in ((w, workloads[w]) for w in args.workloads.split(",")):
        for rnd in range(1, args.rounds + 1):
            order = list(apps.items())
            shift = (rnd - 1) % len(order) if args.rotate else 0
            for contender, (proc, port) in order[shift:] + order[:shift]:
                for attempt in range(3):
                    name = f"orders-{backend}-{workload}-{contender}-r{rnd}.json"
                    log(f"{backend} {workload} round {rnd}: {args.group} {contender}"
                        + (f" (again: {attempt})" if attempt else ""))
                    server_pids = db_pids(backend)
                    app0 = ticks(proc.pid)
                    server0 = {p: ticks(p) for p in server_pids}
                    busy0 = machine_busy()
                    kids0 = children_ticks()
                    t0 = time.monotonic()
                    run = subprocess.run(
                        [str(bin_dir / "mall-load"), "--target", f"http://127.0.0.1:{port}",
                         *load_args, "--duration", str(args.seconds), "--json",
                         "--check-database", check_url],
                        capture_output=True, text=True, env=env)
                    elapsed = time.monotonic() - t0
                    kids1 = children_ticks()
                    busy = machine_busy() - busy0
                    app_cpu = ticks(proc.pid) - app0
                    server_cpu = sum(ticks(p) - t for p, t in server0.items()) if server_pids else 0
                    load_cpu = kids1 - kids0
                    if run.returncode == 2 or not run.stdout.strip():
                        sys.exit(f"mall-load failed: {run.stderr}")
                    (out / name).write_text(run.stdout)
                    report = json.loads(run.stdout)
                    other = max(busy - app_cpu - server_cpu - load_cpu, 0) / max(elapsed * NCPU * CLK, 1)
                    if other > 0.05 and attempt < 2:
                        log(f"other processes took {other:.0%} of the machine: round run again")
                        continue
                    requests = max(report["requests"], 1)
                    results.write(json.dumps({
                        "group": args.group, "backend": backend, "workload": workload,
                        "contender": contender, "round": rnd, "file": name,
                        "app_cpu_us_per_req": app_cpu / CLK * 1e6 / requests,
                        "db_cpu_us_per_req": server_cpu / CLK * 1e6 / requests if server_pids else None,
                        "load_cpu_us_per_req": load_cpu / CLK * 1e6 / requests,
                        "other_share": other, "runs": attempt + 1,
                        "check_problems": report.get("check", {}).get("problems", []),
                    }) + "\n")
                    results.flush()
                    break
    last = contenders[-1][0]
    text = metrics(apps[last][1])
    buckets = {}
    for line in text.splitlines():
        m = re.match(r'order_batch_size_bucket\{le="([^"]+)"\} (\S+)', line)
        if m:
            buckets[m.group(1)] = float(m.group(2))
    count = re.search(r"^order_batch_size_count (\S+)", text, re.M)
    total = re.search(r"^order_batch_size_sum (\S+)", text, re.M)
    results.write(json.dumps({
        "group": "order_batches" if args.group == "orders" else f"{args.group}_batches",
        "contender": last, "backend": backend, "buckets": buckets,
        "count": float(count.group(1)) if count else 0, "sum": float(total.group(1)) if total else 0,
    }) + "\n")
    results.flush()


if __name__ == "__main__":
    main()
