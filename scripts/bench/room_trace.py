#!/usr/bin/env python3
"""Why buyers were let through out of order: reads `mall-load --trace-buyers` files (room.py --trace).

For each file: the buyers let through more than 10 ms out of arrival order (as mall-load counts
them), and for each the reason of the earlier buyers they passed (a buyer can be passed for more
than one reason):
- numbered late: its first request was slow to reach the line, so later buyers got earlier numbers;
- answer after its turn: its first 202 arrived after the turn it named (it returned at once, late);
- woke late: its 202 arrived in time, but its client sent the return more than 5 ms after the turn;
- extra round: it was told to wait again on return (3 or more requests);
- never let through: the sale sold out before it returned.
Then the first request's time from sending to the line's answer and from the answer back (the
answer's moment is its turn less its position, at 1 ms per place: the benchmark's 1,000 a second),
and how many buyers had been let through 100, 200, 300, 500 and 1,000 ms into the sale.

Usage: room_trace.py TRACE.jsonl[.gz]...
"""

import gzip
import json
import sys

SLACK_MS = 10.0


def reason(b):
    rq = b["requests"]
    if b["admitted_ms"] is None:
        return "never let through"
    if len(rq) >= 3:
        return "extra round"
    if len(rq) == 1:
        return "let through at once"
    first = rq[0]
    if first["at_ms"] + first["took_ms"] > first["turn_at_ms"] + 2:
        return "answer after its turn"
    if b["admitted_ms"] > first["turn_at_ms"] + 5:
        return "woke late"
    return "numbered late"


def quantile(values, q):
    values = sorted(values)
    return values[int((len(values) - 1) * q)] if values else float("nan")


def main():
    for path in sys.argv[1:]:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt") as f:
            buyers = [json.loads(line) for line in f]
        arrived = sorted((b for b in buyers if b["arrived_ms"] is not None), key=lambda b: b["arrived_ms"])
        admitted = [b for b in arrived if b["admitted_ms"] is not None]
        passed_for = {}
        for b in admitted:
            for a in arrived:
                if a["arrived_ms"] + SLACK_MS >= b["arrived_ms"]:
                    break
                if a["admitted_ms"] is None or a["admitted_ms"] > b["admitted_ms"] + SLACK_MS:
                    passed_for.setdefault(b["buyer"], set()).add(reason(a))
        counts = {}
        for reasons in passed_for.values():
            for r in reasons:
                counts[r] = counts.get(r, 0) + 1
        share = 100 * len(passed_for) / max(1, len(admitted))
        print(f"{path}: {len(passed_for)} of {len(admitted)} let through out of order ({share:.2f} %); "
              f"the buyers they passed: {dict(sorted(counts.items(), key=lambda kv: -kv[1]))}")
        to_line, back = [], []
        for b in buyers:
            first = b["requests"][0] if b["requests"] else {}
            if first.get("turn_at_ms") is None or first.get("position") is None:
                continue
            answered = first["turn_at_ms"] - first["position"]
            to_line.append(answered - first["at_ms"])
            back.append(first["at_ms"] + first["took_ms"] - answered)
        print("  first request, sent to answered ms: p50 %.1f p90 %.1f p99 %.1f; answered to received: "
              "p50 %.1f p90 %.1f p99 %.1f" % tuple(quantile(v, q) for v in (to_line, back) for q in (.5, .9, .99)))
        # Admissions the line made early on: a stall at the opening shows as fewer buyers let
        # through by each moment, and the deficit lasts (the line's front stops `burst` ahead of
        # the last number while no request reaches it).
        through = sorted(b["admitted_ms"] for b in buyers if b["admitted_ms"] is not None)
        marks = (100, 200, 300, 500, 1000)
        print("  let through by " + ", ".join(f"{m} ms: {sum(1 for t in through if t < m)}" for m in marks))


if __name__ == "__main__":
    main()
