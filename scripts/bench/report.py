#!/usr/bin/env python3
"""Turns scripts/bench.sh's raw results (bench/results/) into BENCHMARKS.md and an SVG plot."""

import argparse
import json
import os
import pathlib

SEED_QPS = {"stock": 1167, "cart": 1245, "orders": 2471, "mixed": 1862}
SEED_CONCURRENCY = {"stock": 50, "cart": 30, "orders": 20, "mixed": 40}
TARGETS = ("nginx", "nginx-uds", "bare-pingora", "sidecar", "sidecar-uds", "ceiling")

PATHS = {
    "hit": "cache hit: `GET /api/products/1`",
    "pass": "pass-through: `GET /health` (not cached)",
    "gzip": "gzip: `GET /api/products?limit=50`, `Accept-Encoding: gzip` (cached)",
    "uncached": "uncached: `GET /api/products/2` with a `Cookie` (never cached; the app answers)",
}


def svg_bars(groups, title, unit):
    """A grouped horizontal bar chart: groups = [(label, [(series, value)])]."""
    colours = {"sidecar": "#d9480f", "nginx": "#1c7ed6", "ceiling": "#868e96", "bare-pingora": "#2b8a3e"}
    rows = sum(len(s) for _, s in groups)
    height = 40 + rows * 22 + len(groups) * 14
    width = 760
    top = max((v for _, s in groups for _, v in s), default=1) or 1
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<text x="10" y="20" font-size="14" font-weight="bold">{title}</text>',
    ]
    y = 36
    for label, series in groups:
        parts.append(f'<text x="10" y="{y + 12}" font-weight="bold">{label}</text>')
        y += 14
        for name, value in series:
            w = int(440 * value / top)
            parts.append(f'<text x="20" y="{y + 12}">{name}</text>')
            parts.append(f'<rect x="120" y="{y}" width="{w}" height="16" fill="{colours.get(name, "#495057")}"/>')
            parts.append(f'<text x="{126 + w}" y="{y + 12}">{value:,.0f} {unit}</text>')
            y += 22
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


NCPU_BOUND = os.cpu_count() or 2
SEED_ORDERS = 2471  # seed 001's orders scenario, orders per second at 20 concurrent


def median(values):
    v = sorted(values)
    if not v:
        return float("nan")
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


WORKLOADS = {
    "orders": "seed 001 orders (20 concurrent)",
    "flash": "flash sale (500 concurrent, one product)",
    "single": "one client alone",
}


def contender_table(md, out, rows, backends, a, b):
    md.append(f"| backend | workload | {a} QPS | {b} QPS | {b} ÷ {a} | {a} p50 / p99 ms | {b} p50 / p99 ms | app CPU µs/req {a} → {b} | DB CPU µs/req {a} → {b} | checks |")
    md.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for backend in backends:
        for workload, label in WORKLOADS.items():
            per = {}
            for r in rows:
                if r["backend"] == backend and r["workload"] == workload:
                    rep = json.loads((out / r["file"]).read_text())
                    sale = rep.get("flash_sale")
                    qps = sale["orders_per_sec"] if sale else rep["successes"] / rep["seconds"]
                    per.setdefault(r["contender"], {})[r["round"]] = (qps, rep, r)
            if a not in per or b not in per:
                continue
            rounds = sorted(set(per[a]) & set(per[b]))
            ratios = [per[b][k][0] / max(per[a][k][0], 1e-9) for k in rounds]
            def col(c, f):
                return median([f(per[c][k]) for k in rounds])
            problems = [p for c in per for k in per[c] for p in per[c][k][2]["check_problems"]]
            success = min(per[c][k][1]["successes"] / max(per[c][k][1]["requests"], 1) for c in per for k in per[c])
            sold_out = ""
            if workload == "flash":
                sold = [per[c][k][1]["flash_sale"] for c in per for k in per[c]]
                exact = all(s["sold_units"] == s["stock"] for s in sold)
                sold_out = f"sold out exactly in {len(sold)} of {len(sold)} sales" if exact else "not all sold out"
            else:
                sold_out = f"success {100 * success:.1f} % (lowest round)"
            checks = "database check: " + ("ok" if not problems else f"{len(problems)} problems") + (f"; {sold_out}" if sold_out else "")
            db = lambda c: col(c, lambda x: x[2]["db_cpu_us_per_req"] or 0)
            db_col = f"{db(a):,.0f} → {db(b):,.0f}" if backend in ("postgres", "mariadb") else "—"
            md.append(
                f"| {backend} | {label} | {col(a, lambda x: x[0]):,.0f} | {col(b, lambda x: x[0]):,.0f} | "
                f"{median(ratios):.2f}× ({min(ratios):.2f}..{max(ratios):.2f}) | "
                f"{col(a, lambda x: x[1]['p50_ms']):.2f} / {col(a, lambda x: x[1]['p99_ms']):.2f} | "
                f"{col(b, lambda x: x[1]['p50_ms']):.2f} / {col(b, lambda x: x[1]['p99_ms']):.2f} | "
                f"{col(a, lambda x: x[2]['app_cpu_us_per_req']):,.0f} → {col(b, lambda x: x[2]['app_cpu_us_per_req']):,.0f} | "
                f"{db_col} | {checks} |"
            )


def invalidation_section(md, lines):
    stale = [l for l in lines if l["group"] == "staleness"]
    cost = [l for l in lines if l["group"] == "follower"]
    if not stale and not cost:
        return
    md.append("\n## 3b. Invalidation records: staleness after a write, and the follower's cost\n")
    if stale:
        md.append(
            "`tests/tests/read_your_writes.rs` (dev build, one test at a time): two app instances on one database, "
            "the sidecar round-robin in front of them, each app purging the sidecar of the records it follows. "
            "After each admin write through the sidecar, five readers (the product through the sidecar twice, the "
            "list page through the sidecar, each instance directly) read every 5 ms for 400 ms. Staleness is the "
            "latest start, after the write was acknowledged, of a read that got the old value (0 when none did); "
            "the test fails at 100 ms.\n"
        )
        md.append("| topology | writes | p50 ms | p99 ms | max ms |")
        md.append("|---|---:|---:|---:|---:|")
        for l in stale:
            md.append(f"| {l['topology']} | {l['writes']} | {l['p50_ms']:.1f} | {l['p99_ms']:.1f} | {l['max_ms']:.1f} |")
    if cost:
        md.append(
            "\nAn idle instance (release, freshly seeded database) over 20 s: its follower's queries, the app's CPU "
            "and the database server's. The `poll every 10 s` rows are the same app with the poll nearly off, so the "
            "difference is the follower's.\n"
        )
        md.append("| database | follower | queries/s | app CPU ms/s | database CPU ms/s |")
        md.append("|---|---|---:|---:|---:|")
        for l in cost:
            db = "—" if l["db_cpu_ms_per_sec"] is None else f"{l['db_cpu_ms_per_sec']:.1f}"
            md.append(f"| {l['backend']} | {l['label']} | {l['queries_per_sec']:.1f} | {l['app_cpu_ms_per_sec']:.1f} | {db} |")


def waiting_room_section(md, lines):
    full = [l for l in lines if l["group"] == "room_sale"]
    sales = [l for l in lines if l["group"] == "waiting_room"]
    if not sales and not full:
        return
    md.append("\n## 5. Flash sale: the waiting room against today's 429 limit\n")
    if full:
        f0 = full[0]
        md.append(
            f"`scripts/bench/room.py` (release): two app instances on one freshly seeded PostgreSQL and the local "
            f"Redis, each behind two sidecars, one with the waiting room on `POST /api/orders` and one with today's "
            f"sale-window limit there (the same budget, {f0['budget']:g} per second, shared through Redis). Each "
            f"round, `mall-load --scenario flash-sale --buyers {f0['buyers']:,} --arrival-seconds "
            f"{f0['arrival_seconds']:g}` sells a new product of {f0['stock']:,} units: buyer i arrives at i × "
            f"{f0['arrival_seconds']:g} s / {f0['buyers']:,} at one pod or the other and buys one unit until let "
            "through (honouring tickets, and `Retry-After` on 429), leaving once it is sold out. The fronts take "
            "turns in interleaved rounds; medians over rounds, with the range.\n"
        )
        md.append(
            "Unfair admissions are counted three ways: any inversion (a buyer let through while one who arrived "
            "earlier was let through later or never), and only inversions larger than 10 ms and 100 ms both ways. "
            "Buyers arrive 0.6 ms apart here, less than the jitter of the network, the scheduler and the timers of "
            "5,000 tasks on two cores, so the first figure is mostly that jitter.\n"
        )
        md.append("| front | rounds | orders | unfair: any / >10 ms / >100 ms | app requests per order | let-through p50 / p99 ms | longest wait ms | tickets | 429 answers | database check |")
        md.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for front, label in (("room", "waiting room"), ("limit", "429 limit"),
                             ("room-attacked", "waiting room, attacked"),
                             ("room-attacked-nohold", "waiting room, attacked, refusals answered at once"),
                             ("room-attacked-wait-ms", "waiting room, attacked, buyers sleeping the wait (no turn time)"),
                             ("room-attacked-shared", "waiting room, attacked, attackers in the buyers' runtime"),
                             ("room-accounts", "waiting room, the attackers' accounts buying honestly")):
            rows = [l for l in full if l["front"] == front]
            if not rows:
                continue
            def med(k):
                return median([r[k] for r in rows])
            def rng(k, scale=1.0, fmt="{:.1f}"):
                v = [r[k] * scale for r in rows]
                return f"{fmt.format(median(v))} ({fmt.format(min(v))}..{fmt.format(max(v))})"
            problems = sum(len(r["check_problems"]) for r in rows)
            md.append(
                f"| {label} | {len(rows)} | {med('orders'):,.0f} | {100 * med('unfair_fraction'):.1f} % / "
                f"{100 * med('unfair_fraction_10ms'):.2f} % / {100 * med('unfair_fraction_100ms'):.2f} % "
                f"(>10 ms: {rng('unfair_fraction_10ms', 100.0, '{:.2f}')}) | "
                f"{rng('app_requests_per_order', 1.0, '{:.2f}')} | {med('admitted_p50_ms'):.1f} / {med('admitted_p99_ms'):.1f} | "
                f"{med('longest_wait_ms'):,.0f} | {med('tickets'):,.0f} | {med('rate_limited'):,.0f} | "
                f"{'ok' if not problems else f'{problems} problems'} |"
            )
    attacked = [l for l in full if l["front"] == "room-attacked"]
    calm = [l for l in full if l["front"] == "room"]
    if attacked and calm:
        a0 = attacked[0]
        md.append(
            f"\nUnder attack (issue 34): beside the honest buyers, {a0['attackers']} accounts send ticketless orders "
            f"four at a time as fast as they can until the sale sells out ({a0.get('attacker_requests', 0) // max(a0['attackers'], 1):,} "
            "each on average), and "
            f"{a0['anonymous']} clients without credentials send orders in a loop until the sale ends. The honest buyers "
            "against the same room's unattacked rounds (ratios of medians, with the range of the per-round ratios):\n"
        )
        md.append("| measure | unattacked | attacked | ratio (range) |")
        md.append("|---|---:|---:|---|")
        for key, label in (("orders_per_second", "honest orders per second"), ("wait_p50_ms", "wait p50 ms"),
                           ("wait_p99_ms", "wait p99 ms"), ("unfair_fraction_10ms", "unfair beyond 10 ms")):
            if key not in calm[0] or key not in a0:
                continue
            base, hit = median([r[key] for r in calm]), median([r[key] for r in attacked])
            ratios = [b[key] / c[key] for c, b in zip(calm, attacked) if c[key]]
            rr = f"{median(ratios):.3f} ({min(ratios):.3f}..{max(ratios):.3f})" if ratios else "—"
            md.append(f"| {label} | {base:.4g} | {hit:.4g} | {rr} |")
        md.append(
            f"\nAttackers: at most {max(r['attacker_orders_max'] for r in attacked)} order per account in any round; "
            f"their answers {attacked[-1]['attacker_statuses']}, the anonymous clients' {attacked[-1]['anonymous_statuses']} "
            "(last round).\n"
        )
    if not sales:
        return
    s0 = sales[0]
    md.append(
        f"\nAt reduced size, `tests/tests/waiting_room.rs` (dev build): two pods (a sidecar in front of its own app each) on one "
        f"PostgreSQL and one Redis; {s0['buyers']} buyers arriving 40 ms apart, alternately at each pod, for a product "
        f"with {s0['stock']} units, at a budget of {s0['admit_per_second']:g} admissions per second. Behind the room "
        "buyers wait for the turn their ticket names; behind the 429 limit (the same budget, shared through Redis) "
        "they wait `Retry-After` and try again. Fairness is the fraction of admitted buyers let through while "
        "someone who arrived earlier was still waiting (or never got in); load is the order requests that reached "
        "an app per order created; p99 is the admitted order request's.\n"
    )
    md.append("| front | orders | unfair admissions | app requests per order | admitted p99 ms | longest wait ms | tickets |")
    md.append("|---|---:|---:|---:|---:|---:|---:|")
    for l in sales:
        md.append(
            f"| {l['front']} | {l['orders']} | {100 * l['fairness']:.1f} % | {l['app_requests_per_order']:.2f} | "
            f"{l['p99_ms']:.1f} | {l['longest_wait_ms']:,} | {l['tickets']:,} |"
        )


def bound_section(md, rows, contender):
    """What the machine allows: the CPU every process spends on one order, against two cores."""
    parts = []
    for backend in ("sqlite", "postgres", "mariadb"):
        per = [r for r in rows if r["backend"] == backend and r["workload"] == "orders" and r["contender"] == contender]
        if not per:
            continue
        total = median([r["app_cpu_us_per_req"] + (r["db_cpu_us_per_req"] or 0) + r["load_cpu_us_per_req"] for r in per])
        load = median([r["load_cpu_us_per_req"] for r in per])
        parts.append(
            f"{backend} {total:,.0f} µs per order (of which the load generator {load:,.0f}), so at most "
            f"{NCPU_BOUND * 1e6 / total:,.0f} orders/s ({NCPU_BOUND * 1e6 / total / SEED_ORDERS:.2f}× seed 001)"
        )
    if parts:
        md.append(
            f"\nThe bound, seed 001's orders with `{contender}`: the app, the database and the load generator share "
            f"{NCPU_BOUND} cores, and their CPU per order, summed, is {'; '.join(parts)}. A run below that is waiting, "
            "not computing; one at it can only go faster by spending less CPU per order.\n"
        )


def orders_arrays_section(md, out, lines):
    rows = [l for l in lines if l["group"] == "orders_arrays"]
    if not rows:
        return
    md.append("\n## 2c. Orders on PostgreSQL and MariaDB: array-parameter batches against multi-row statements\n")
    md.append(
        "Two apps with group commit over one freshly seeded database per backend: `rows` runs the batch as the "
        "multi-row statements whose text depends on the batch size (`--order-batch-arrays false`, the "
        "default), `arrays` takes the batch as one array parameter per statement (`--order-batch-arrays true`: on "
        "PostgreSQL `unnest` / `= ANY` over array literals, on MariaDB a JSON array read by `JSON_TABLE`; one text "
        "per statement, prepared once per connection). Interleaved rounds of equal length, as in 2b; the ratio is "
        "arrays ÷ rows per round. Seed 001's orders figure is 2,471/s at 20 concurrent, so 2× is 4,942/s.\n"
    )
    contender_table(md, out, rows, ("postgres", "mariadb"), "rows", "arrays")
    for b in (l for l in lines if l["group"] == "orders_arrays_batches"):
        if b["count"]:
            md.append(
                f"\nBatches that formed with arrays on {b['backend']} (all rounds): {b['count']:,.0f} batches, "
                f"{b['sum'] / b['count']:.1f} orders each on average.\n"
            )


def orders_section(md, out, lines):
    rows = [l for l in lines if l["group"] == "orders"]
    if not rows:
        return
    md.append("\n## 2b. Orders: group commit against one order per transaction\n")
    md.append(
        "Two apps over one freshly seeded database per backend: `off` places each order in its own transaction "
        "(`--order-batch-max 1`, the path before group commit), `on` runs the defaults (set-based batches of up to 64 "
        "orders, no flush wait, one writer). They take turns in interleaved rounds of equal "
        "length (off, on, off, on, ...) under `mall-load ... --check-database`; a round in which other processes took "
        "more than 5 % of the machine is run again. QPS counts created orders per second (for the flash sale: until "
        "sold out). The ratio is on ÷ off per round: median (min..max). CPU is µs per request of the app and of "
        "the database server (all of PostgreSQL's processes, or mariadbd).\n"
    )
    contender_table(md, out, rows, ("sqlite", "postgres", "mariadb"), "off", "on")
    bound_section(md, rows, "on")
    flash = [l for l in rows if l["workload"] == "flash" and l["contender"] == "on"]
    if flash:
        parts = []
        for backend in ("sqlite", "postgres", "mariadb"):
            reps = [json.loads((out / r["file"]).read_text()) for r in flash if r["backend"] == backend]
            if reps:
                qps = median([r["requests"] / r["seconds"] for r in reps])
                parts.append(f"{backend}: 500 ÷ {qps:,.0f} req/s = {1000 * 500 / qps:.0f} ms")
        md.append(
            "\nThe flash sale is a closed loop of 500 buyers, so by Little's law the mean time per order is 500 divided "
            f"by the requests answered per second ({'; '.join(parts)}): an order p99 of 50 ms with 500 buyers waiting "
            "on each other would need over 10,000 orders per second on these two cores, which the app, the database "
            "and the load generator share.\n"
        )
    for b in (l for l in lines if l["group"] == "order_batches"):
        if not b["count"]:
            continue
        prev, parts = 0.0, []
        for le, cum in sorted(b["buckets"].items(), key=lambda kv: float(kv[0])):
            if cum > prev:
                parts.append(f"≤{le}: {cum - prev:,.0f}")
            prev = cum
        md.append(
            f"\nBatches that formed on {b['backend']} (the `order_batch_size` histogram of the `on` app over all its "
            f"rounds): {b['count']:,.0f} batches, {b['sum'] / b['count']:.1f} orders each on average; {', '.join(parts)}.\n"
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--machine", default="")
    ap.add_argument("--versions", default="")
    ap.add_argument("--seconds", default="10")
    ap.add_argument("--connections", default="64")
    args = ap.parse_args()
    out = pathlib.Path(args.results)
    lines = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines() if l.strip()]

    rounds = [l for l in lines if l["group"] == "proxy_round"]
    proxies = {}
    for key in sorted({(r["target"], r["path"]) for r in rounds}):
        rs = [r for r in rounds if (r["target"], r["path"]) == key]
        proxies[key] = {
            "rps": median([r["rps"] for r in rs]),
            "p99_ms": median([r["p99_ms"] for r in rs]),
            "cpu_us_per_req": median([r["cpu_us_per_req"] for r in rs]),
            "non2xx": sum(r["non2xx"] for r in rs),
            "socket_errors": "",
            "by_round": {r["round"]: r["rps"] for r in rs},
        }

    cpu_by_round = {
        (r["target"], r["path"], r["round"]): r["cpu_us_per_req"] for r in rounds
    }

    def vs(target, path, ref_target, key="rps"):
        """Median and min..max of the per-round ratios of `key` to `ref_target`'s."""
        mine, ref = proxies.get((target, path)), proxies.get((ref_target, path))
        if not mine or not ref:
            return ""
        if key == "rps":
            pairs = [(mine["by_round"][k], ref["by_round"][k]) for k in mine["by_round"] if k in ref["by_round"]]
        else:
            pairs = [
                (cpu_by_round[(target, path, k)], cpu_by_round[(ref_target, path, k)])
                for k in mine["by_round"]
                if (ref_target, path, k) in cpu_by_round
            ]
        ratios = [a / b for a, b in pairs if b]
        if not ratios:
            return ""
        return f"{median(ratios):.2f}× ({min(ratios):.2f}..{max(ratios):.2f})"

    def vs_nginx(target, path):
        return vs(target, path, "nginx")

    md = []
    md.append("# Benchmarks\n")
    md.append(
        "Produced by `scripts/bench.sh` in one run on one machine; everything below was measured side by side, so "
        "compare the ratios, not the absolute numbers (these machines are shared and noisy). Rerun it to reproduce: "
        "it installs nginx and wrk, builds the release binaries, and rewrites this file and `bench/results/`.\n"
    )
    md.append(f"- Machine: {args.machine}\n- Versions: {args.versions}\n- Each measurement: {args.seconds} s\n")

    md.append("\n## 1. The sidecar against nginx, bare pingora and the machine's ceiling\n")
    n_rounds = max((r["round"] for r in rounds), default=0)
    md.append(
        f"`wrk -t2 -c{args.connections} -d{args.seconds}s --latency URL` against each, all in front of the same mall app "
        "(release build, SQLite), in interleaved rounds (nginx, bare pingora, sidecar, ceiling, nginx, ...; "
        f"{n_rounds} rounds per path) after an 8 s warm-up per contender, longer than the app's `max-age=5`, so hits are "
        "measured in steady state (entries already refreshed), not in the seconds after a fill. A round in which other "
        "processes took more than 5 % of the machine is run again. nginx 1.22 (Debian) does the sidecar's job: "
        "`proxy_cache` with `proxy_cache_lock`, `gzip` (level 6, 1 KB minimum), upstream `keepalive 64`, 2 workers; "
        "the sidecar runs `sidecar/sidecar.example.toml` with 2 threads (two single-thread workers, each with its own "
        "SO_REUSEPORT socket and upstream pool; fresh hits answered from its store in `request_filter`, gzip hits from a "
        "compressed copy made once per entry), rate limits and the access log off (nginx's is off too). Bare pingora "
        "(`sidecar/src/bin/bare_pingora.rs`) is pingora's floor: a `ProxyHttp` answering the hit from a map in "
        "`request_filter` and passing everything else to one keep-alive peer, in the sidecar's worker layout (it has no "
        "gzip path); `docs/benchmarks.md` has the profiles that say where each one's time goes. The ceiling is a bare hyper server (`loadgen/src/bin/fixed_body.rs`) answering a fixed "
        "product-sized body. Values are medians over the rounds; ÷ nginx is the median (min..max) of the per-round "
        "req/s ratios; CPU per request is the contender's processes' user + system time over the round divided by "
        "the requests it served.\n"
    )
    md.append("| path | proxy | req/s | ÷ nginx | ÷ bare pingora | p99 ms | CPU µs/req | CPU ÷ bare pingora |")
    md.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for path, label in PATHS.items():
        for target in TARGETS:
            w = proxies.get((target, path))
            if not w:
                continue
            ratio = vs_nginx(target, path) if target != "nginx" else "1.00×"
            bare = vs(target, path, "bare-pingora") if target != "bare-pingora" else "1.00×"
            bare_cpu = vs(target, path, "bare-pingora", "cpu") if target != "bare-pingora" else "1.00×"
            md.append(
                f"| {label} | {target} | {w['rps']:,.0f} | {ratio} | {bare} | {w['p99_ms']:.2f} | "
                f"{w['cpu_us_per_req']:.1f} | {bare_cpu} |"
            )
    bad = {k: v for k, v in proxies.items() if v["non2xx"]}
    for (target, path), w in bad.items():
        md.append(f"- {target} / {path}: {w['non2xx']} non-2xx responses")
    md.append(
        "\nWhere the sidecar trails nginx, compare it with bare pingora in the same rounds: bare pingora is the same "
        "pingora HTTP/1 path with none of the sidecar's work (a three-field header, no metrics, no cache lookup), so "
        "what it cannot reach is pingora's floor and the gap between it and the sidecar is ours. The perf profiles "
        "behind that split (kernel share, pingora's parse and serialise, each sidecar hook's share) and a before/after "
        "of the sidecar's fast path are in `docs/benchmarks.md`.\n"
    )
    if any(t == "sidecar-uds" for t, _ in proxies):
        md.append(
            "\nThe hop to the app, over loopback TCP or the app's Unix socket (`-uds`: the app listens on both, "
            "`MALL_LISTEN_SOCKET`; the sidecar with `upstream.local`, nginx with `server unix:...` and the same "
            "keep-alive pool), same rounds; ratios per round, Unix socket ÷ TCP:\n"
        )
        md.append("| path | proxy | req/s UDS ÷ TCP | proxy CPU µs/req UDS ÷ TCP |")
        md.append("|---|---|---:|---:|")
        for path in ("pass", "uncached"):
            for proxy in ("sidecar", "nginx"):
                if (f"{proxy}-uds", path) in proxies:
                    md.append(
                        f"| {path} | {proxy} | {vs(proxy + '-uds', path, proxy)} | "
                        f"{vs(proxy + '-uds', path, proxy, 'cpu')} |"
                    )
    memory = {l["target"]: l for l in lines if l["group"] == "memory"}
    if memory:
        md.append(
            "\nMemory, the resident set of each proxy's processes (nginx: master and workers), measured before the rounds: "
            "idle after start, after `curl` has fetched products 1..1,000 through it (each cached), and as a 3 s "
            "`wrk -c256` on `/health` ends. nginx keeps its cache in files (in the kernel's page cache, which no "
            "process is charged for); the sidecar keeps entries, their client-ready headers and their compressed "
            "copies in its own memory.\n"
        )
        md.append("| proxy | idle MiB | 1,000 entries cached MiB | after 256 connections MiB |")
        md.append("|---|---:|---:|---:|")
        for target in ("nginx", "bare-pingora", "sidecar"):
            m = memory.get(target)
            if m:
                md.append(
                    f"| {target} | {m['idle_kib'] / 1024:.1f} | {m['cached_kib'] / 1024:.1f} | {m['conns_kib'] / 1024:.1f} |"
                )
    md.append("\n![req/s by path and proxy](bench/results/proxies.svg)\n")
    groups = []
    for path in PATHS:
        series = [(t, proxies[(t, path)]["rps"]) for t in TARGETS if (t, path) in proxies]
        groups.append((path, series))
    (out / "proxies.svg").write_text(svg_bars(groups, "Requests per second, median of the rounds (higher is better)", "req/s"))

    md.append("\n## 2. The mall app: seed 001's scenarios\n")
    md.append(
        f"`mall-load --scenario S --duration {args.seconds} --json` against one app instance directly (release, "
        "2 worker threads), at seed 001's concurrency; the seed's numbers are its Go service's. Success counts 2xx only. "
        "PostgreSQL is reached over loopback with sqlx's default `sslmode=prefer`, so with TLS (Debian's server has it on); "
        "load generator, app and database share the machine's two CPUs.\n"
    )
    md.append("| scenario (concurrency) | backend | QPS (2xx) | success | p50 ms | p99 ms | p99.9 ms | vs seed 001 |")
    md.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for scenario in SEED_QPS:
        for backend in ("sqlite", "postgres", "postgres-redis"):
            f = out / f"load-{backend}-{scenario}.json"
            if not f.exists():
                continue
            r = json.loads(f.read_text())
            ok_qps = r["successes"] / r["seconds"]
            md.append(
                f"| {scenario} ({SEED_CONCURRENCY[scenario]}) | {backend} | {ok_qps:,.0f} | {r['success_rate']:.1%} | "
                f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p999_ms']:.2f} | {ok_qps / SEED_QPS[scenario]:.2f}× of {SEED_QPS[scenario]:,} |"
            )

    orders_section(md, out, lines)
    orders_arrays_section(md, out, lines)

    md.append("\n## 3. The caches\n")
    caches = {l["cache"]: l for l in lines if l["group"] == "app_cache"}
    if "on" in caches and "off" in caches:
        on, off = caches["on"], caches["off"]
        per_on = 1000 * on["db_ops"] / on["requests"]
        per_off = 1000 * off["db_ops"] / off["requests"]
        ratio = on["hits"] / max(on["hits"] + on["misses"], 1)
        md.append(
            "`mall-load --scenario products --zipf --requests 20000 --concurrency 32` against one app on PostgreSQL, "
            "with its in-process cache on and off (`--cache-bytes 0`); queries counted by the app's "
            "`db_operations_total`.\n"
        )
        md.append("| app cache | DB queries per 1,000 reads | product cache hit ratio |")
        md.append("|---|---:|---:|")
        md.append(f"| on | {per_on:,.1f} | {ratio:.1%} |")
        md.append(f"| off | {per_off:,.1f} | — |")
        if per_off:
            md.append(f"\nThe cache removes {1 - per_on / per_off:.0%} of the database queries (seed 000's target: −70 %).\n")
    z = next((l for l in lines if l["group"] == "sidecar_zipf"), None)
    if z:
        total = z["hits"] + z["misses"]
        md.append(
            f"Through the sidecar, the same Zipf-distributed reads over 1,000 products hit its cache "
            f"{z['hits'] / max(total, 1):.1%} of the time ({z['hits']:,} of {total:,} cacheable lookups; entries live "
            "the app's `max-age=5`; seed targets: ≥ 85 %, phase 2 ≥ 99 %).\n"
        )
    wire = next((l for l in lines if l["group"] == "wire"), None)
    if wire:
        md.append(
            f"A 50-product catalog page is {wire['plain_bytes']:,} bytes as identity and {wire['gzip_bytes']:,} bytes gzipped "
            f"({1 - wire['gzip_bytes'] / wire['plain_bytes']:.0%} fewer bytes on the wire; seed target −20 %).\n"
        )
        if "br_bytes" in wire:
            md.append("| coding (fresh hit, level 6) | bytes | of identity | of gzip |")
            md.append("|---|---:|---:|---:|")
            for coding in ("plain", "gzip", "zstd", "br"):
                b = wire[f"{coding}_bytes"]
                md.append(
                    f"| {'identity' if coding == 'plain' else coding} | {b:,} | {b / wire['plain_bytes']:.1%} | "
                    f"{b / wire['gzip_bytes']:.2f}× |"
                )
            md.append(
                "\nbr is made once per entry (quality 9 for level 6) and only for fresh hits; misses stream gzip or "
                "zstd (docs/sidecar.md).\n"
            )
    invalidation_section(md, lines)
    # Section 4 comes from the pods benchmark (tests/tests/pods.rs), not from this run: keep it.
    previous = pathlib.Path(__file__).resolve().parents[2] / "BENCHMARKS.md"
    if previous.exists():
        text = previous.read_text()
        start = text.find("## 4. Pods")
        end = min(i for i in (text.find("## 5. Flash sale"), text.find("## How to read and rerun")) if i != -1)
        if start != -1 and end > start:
            md.append("\n" + text[start:end].rstrip() + "\n")
    waiting_room_section(md, lines)
    md.append("\n## How to read and rerun\n")
    md.append(
        "Raw outputs (wrk text, mall-load JSON) are in `bench/results/`. `scripts/bench.sh` reruns everything "
        "(`BENCH_SECONDS`, `BENCH_ROUNDS`, `BENCH_CONNECTIONS`, `BENCH_FLASH_STOCK` adjust it); the load generator alone is `mall-load --help`.\n"
    )
    print("\n".join(md))


if __name__ == "__main__":
    main()
