#!/usr/bin/env python3
"""Load test of a running `knots serve`: requests/s and p50/p99 latency for the base model, a
cached merged set, and cold merged sets (a new weight per request, so every request merges).

Usage: scripts/bench_server.py BASE_URL SET [--requests N] [--concurrency C] [--max-tokens T]
  e.g. scripts/bench_server.py http://127.0.0.1:8123 shout+shout-half
"""

import argparse
import json
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def post(url: str, body: dict) -> tuple[float, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        r.read()
        headers = dict(r.headers)
    return time.perf_counter() - started, headers


def scenario(name: str, url: str, bodies: list[dict], concurrency: int) -> dict:
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda b: post(url, b), bodies))
    wall = time.perf_counter() - started
    latencies = sorted(r[0] for r in results)
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3
    merge_ms = [float(h.get("x-knots-merge", "").split("ms=")[-1]) for _, h in results if "ms=" in h.get("x-knots-merge", "")]
    row = {"scenario": name, "requests": len(bodies), "rps": len(bodies) / wall, "p50_ms": p(0.5), "p99_ms": p(0.99),
           "mean_merge_ms": statistics.mean(merge_ms) if merge_ms else None}
    print(json.dumps(row))
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base_url")
    ap.add_argument("set")
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=1)
    a = ap.parse_args()
    url = a.base_url.rstrip("/") + "/v1/completions"
    body = lambda model: {"model": model, "prompt": "The capital of France is", "max_tokens": a.max_tokens, "temperature": 0}
    post(url, body(a.set))  # warm the cached set
    scenario("base", url, [body(a.base) for _ in range(a.requests)], a.concurrency)
    scenario("cached set", url, [body(a.set) for _ in range(a.requests)], a.concurrency)
    first, rest = a.set.split("+", 1)
    cold = [body(f"{first}:{1 + (i + 1) / 1000}+{rest}") for i in range(a.requests)]
    scenario("cold set", url, cold, a.concurrency)


if __name__ == "__main__":
    main()
