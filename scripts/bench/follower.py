#!/usr/bin/env python3
"""What the invalidation follower costs an idle instance (called by scripts/bench.sh).

For SQLite and MariaDB (the 50 ms poll) and PostgreSQL (LISTEN, a catch-up a second), one app is
started on a freshly seeded database and left idle; over `--seconds` its CPU time and its
follower's queries (`cache_invalidation_queries_total`) are counted, and the database server's CPU
too (PostgreSQL's processes, mariadbd). The app
also runs its other background tasks (metrics, expiry); the `--invalidation-poll-ms 10000` row is
the same app with the follower nearly idle, so the difference is the follower's. Results go to
results.jsonl for report.py.
"""

import argparse
import json
import pathlib
import re
import subprocess
import time

from orders import db_pids, metrics, wait_ready
from procstat import CLK, log, ticks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--pg-admin", default="postgres://mall:mall@127.0.0.1:5432/test")
    ap.add_argument("--mysql-admin", default="mysql://mall:mall@127.0.0.1:3306/test")
    args = ap.parse_args()
    bin_dir, work, out = pathlib.Path(args.bin), pathlib.Path(args.work), pathlib.Path(args.out)
    results = open(out / "results.jsonl", "a")
    pg = args.pg_admin.rsplit("/", 1)[0] + "/mall_follower_bench"
    subprocess.run(["psql", "-q", args.pg_admin, "-c", "DROP DATABASE IF EXISTS mall_follower_bench",
                    "-c", "CREATE DATABASE mall_follower_bench"], check=True)
    data = work / "follower-data"
    subprocess.run(["rm", "-rf", str(data)], check=True)
    my = args.mysql_admin.rsplit("/", 1)[0] + "/mall_follower_bench"
    subprocess.run(["mysql", "-umall", "-pmall", "-h127.0.0.1", "-e",
                    "DROP DATABASE IF EXISTS mall_follower_bench; CREATE DATABASE mall_follower_bench"], check=True)
    backends = (("sqlite", ["--data-dir", str(data)]), ("postgres", ["--database-url", pg]),
                ("mariadb", ["--database-url", my]))
    for backend, db_args in backends:
        for label, extra in (("follower", []), ("poll every 10 s", ["--invalidation-poll-ms", "10000"])):
            if backend == "postgres" and extra:
                continue
            logfile = work / f"follower-{backend}.log"
            proc = subprocess.Popen(
                [str(bin_dir / "mall-app"), "serve", "--listen", "127.0.0.1:3401", "--seed", *db_args, *extra],
                stdout=open(logfile, "w"), stderr=subprocess.STDOUT)
            try:
                wait_ready(3401, proc, logfile)
                time.sleep(2)
                log(f"idle follower on {backend} ({label}), {args.seconds:.0f} s")
                server_pids = db_pids(backend)
                q0 = queries(metrics(3401))
                app0 = ticks(proc.pid)
                server0 = {p: ticks(p) for p in server_pids}
                time.sleep(args.seconds)
                app_cpu = (ticks(proc.pid) - app0) / CLK
                server_cpu = sum(ticks(p) - t for p, t in server0.items()) / CLK
                q1 = queries(metrics(3401))
            finally:
                proc.terminate()
                proc.wait()
            results.write(json.dumps({
                "group": "follower", "backend": backend, "label": label, "seconds": args.seconds,
                "queries_per_sec": (q1 - q0) / args.seconds,
                "app_cpu_ms_per_sec": 1000 * app_cpu / args.seconds,
                "db_cpu_ms_per_sec": 1000 * server_cpu / args.seconds if server_pids else None,
            }) + "\n")
            results.flush()


def queries(text):
    m = re.search(r"^cache_invalidation_queries_total (\S+)", text, re.M)
    return float(m.group(1)) if m else 0.0


if __name__ == "__main__":
    main()
