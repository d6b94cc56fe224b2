#!/usr/bin/env python3
"""Soak test of `knots serve` on loopback: a bounded load for a fixed time, then a report.

Usage: scripts/soak.py [--binary target/release/knots] [--seconds 600] [--clients 16]
                       [--merge-cache-bytes 536870912] [--out target/soak.json]

Starts the server (SmolLM2 and MiniLM, the committed adapters, an in-memory state store) on a free
loopback port and runs CLIENTS threads for SECONDS. Each request picks one of 200 distinct adapter
sets (merged sets over four methods with varied weights, single adapters and the base, generation
and embeddings), so the merge cache keeps evicting; 5% of streamed requests disconnect after the
first chunk, and 5% of requests are bad on purpose (malformed JSON, a wrong content type, an
unknown adapter, max_tokens beyond the context, a bad merge parameter) and must get a 4xx.
Resident memory and the merge cache's bytes are sampled every 15 s; warm-up ends at the first
sample after the first fifth of the run where the merge cache holds at least 90% of its budget
(its steady state). The resident size swings with the working set (a merge's dense buffers come
and go), so besides the point values at warm-up and at the end, growth is judged on the peaks:
the largest sample of the second half of the steady window against the largest of the first
half. A leak raises the later peak; a swinging working set does not. Exits non-zero when a request gets a 5xx or fails unexpectedly, a bad request is not a 4xx,
resident memory grows more than 10% after warm-up, or the merge cache reports more bytes than
its budget.
"""

import argparse
import http.client
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LM = ["sentiment-lm", "news-lm", "language-lm", "shout"]
ENC = ["sentiment", "news", "intent", "nli", "fact_check", "polarity", "quote_topic", "digits"]
METHODS = ["ties", "dare-ties", "knots-ties", "ta"]
WEIGHTS = ["0.3", "0.5", "0.7", "0.9", "1"]


def sets(rng: random.Random) -> list[tuple[str, str]]:
    """200 distinct (route, model) pairs: generation and embedding sets."""
    out: set[tuple[str, str]] = {("gen", "smollm2-135m-instruct"), ("emb", "all-minilm-l6-v2")}
    out |= {("gen", a) for a in LM} | {("emb", a) for a in ENC}
    while len(out) < 200:
        route, names = ("gen", LM) if rng.random() < 0.7 else ("emb", ENC)
        members = rng.sample(names, rng.choice([2, 3]))
        model = "+".join(f"{m}:{rng.choice(WEIGHTS)}" for m in members) + "@" + rng.choice(METHODS)
        out.add((route, model))
    return sorted(out)


BAD = [
    ("/v1/completions", "application/json", b"{not json"),
    ("/v1/completions", "text/plain", json.dumps({"model": "shout", "prompt": "x"}).encode()),
    ("/v1/completions", "application/json", json.dumps({"model": "no-such-adapter", "prompt": "x"}).encode()),
    ("/v1/completions", "application/json",
     json.dumps({"model": "shout", "prompt": "x", "max_tokens": 10**12}).encode()),
    ("/v1/chat/completions", "application/json",
     json.dumps({"model": "shout+news-lm", "messages": [{"role": "user", "content": "x"}],
                 "merge": {"density": 7}}).encode()),
    ("/v1/embeddings", "application/json", json.dumps({"model": "sentiment", "input": []}).encode()),
]


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []

    def add(self, kind: str, failure: str | None = None) -> None:
        with self.lock:
            self.counts[kind] += 1
            if failure and len(self.failures) < 20:
                self.failures.append(failure)


def request(port: int, path: str, body: bytes, content_type: str = "application/json",
            stream_cut: bool = False) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", path, body=body, headers={"content-type": content_type})
        resp = conn.getresponse()
        if stream_cut:
            resp.read(64)  # the first chunk, then hang up mid-stream
            conn.sock.close()
            return resp.status
        resp.read()
        return resp.status
    finally:
        conn.close()


def client(port: int, pool: list[tuple[str, str]], stop_at: float, seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    while time.time() < stop_at:
        if rng.random() < 0.05:
            path, ctype, body = rng.choice(BAD)
            try:
                status = request(port, path, body, ctype)
            except OSError as e:
                tally.add("bad_request_failed", f"{path}: {e}")
                continue
            ok = 400 <= status < 500
            tally.add("bad_request_4xx" if ok else f"bad_request_{status}",
                      None if ok else f"bad request to {path} got {status}")
            continue
        route, model = rng.choice(pool)
        cut = False
        if route == "gen":
            stream = rng.random() < 0.5
            cut = stream and rng.random() < 0.1
            body = {"model": model, "prompt": "Tell me about the sea.", "max_tokens": rng.randint(1, 12),
                    "temperature": 0.7, "stream": stream}
            path = "/v1/completions"
        else:
            body = {"model": model, "input": [f"text number {rng.randint(0, 999)}"] * rng.randint(1, 8)}
            path = "/v1/embeddings"
        try:
            status = request(port, path, json.dumps(body).encode(), stream_cut=cut)
        except OSError as e:
            tally.add("transport_error", f"{model}: {e}")
            continue
        if cut:
            tally.add("disconnected")
        elif status == 200:
            tally.add("ok")
        elif status == 429:
            tally.add("overloaded_429")
        else:
            tally.add(f"status_{status}", f"{path} {model}: {status}")


def resident(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    return json.loads(conn.getresponse().read())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=str(ROOT / "target/release/knots"))
    ap.add_argument("--seconds", type=int, default=600)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--merge-cache-bytes", type=int, default=512 << 20)
    ap.add_argument("--out", default=str(ROOT / "target/soak.json"))
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(Path(args.out).with_suffix(".log"), "w")
    server = subprocess.Popen(
        [args.binary, "serve", "--model", "smollm2-135m-instruct,all-minilm-l6-v2",
         "--adapters", "models/adapters", "--port", str(port), "--state-db", ":memory:",
         "--merge-cache-bytes", str(args.merge_cache_bytes), "--alignment-cache-bytes", str(64 << 20)],
        cwd=ROOT, stdout=log, stderr=log)
    try:
        for _ in range(600):
            try:
                get_json(port, "/ready")
                break
            except (OSError, ValueError):
                time.sleep(0.5)
        pool = sets(random.Random(1))
        tally = Tally()
        start = time.time()
        stop_at = start + args.seconds
        threads = [threading.Thread(target=client, args=(port, pool, stop_at, i, tally))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        samples = []  # (seconds since start, resident bytes, merge cache bytes)
        while any(t.is_alive() for t in threads):
            time.sleep(15)
            try:
                cached = get_json(port, "/v1/merges").get("bytes", 0)
            except (OSError, ValueError):
                cached = 0
            samples.append((round(time.time() - start), resident(server.pid), cached))
        for t in threads:
            t.join()
        end = resident(server.pid)
        steady = [s for s in samples
                  if s[0] >= args.seconds / 5 and s[2] >= 0.9 * args.merge_cache_bytes]
        warm_at = steady[0] if steady else next((s for s in samples if s[0] >= args.seconds / 5), samples[-1])
        warm = warm_at[1]
        merges = get_json(port, "/v1/merges")
        alive = server.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=60)
    growth = (end - warm) / warm if warm else float("inf")
    steady_window = [x for x in samples if x[0] >= warm_at[0]]
    half = len(steady_window) // 2
    first_peak = max((x[1] for x in steady_window[:half]), default=warm)
    second_peak = max((x[1] for x in steady_window[half:]), default=end)
    peak_growth = (second_peak - first_peak) / first_peak if first_peak else float("inf")
    report = {
        "seconds": round(time.time() - start), "clients": args.clients, "distinct_sets": len(pool),
        "requests": sum(tally.counts.values()), "by_class": dict(sorted(tally.counts.items())),
        "warm_up_ends_at_seconds": warm_at[0],
        "resident_warm_bytes": warm, "resident_end_bytes": end, "resident_growth": round(growth, 4),
        "resident_peak_first_half_bytes": first_peak, "resident_peak_second_half_bytes": second_peak,
        "resident_peak_growth": round(peak_growth, 4),
        "samples_seconds_resident_cache": samples,
        "merge_cache_bytes": merges.get("bytes"), "merge_cache_budget": args.merge_cache_bytes,
        "server_alive_at_end": alive, "failures": tally.failures,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    unexpected = sum(n for k, n in tally.counts.items()
                     if k not in ("ok", "disconnected", "overloaded_429", "bad_request_4xx"))
    passed = (unexpected == 0 and alive and peak_growth <= 0.10
              and merges.get("bytes", 0) <= args.merge_cache_bytes)
    print("soak passed" if passed else "soak FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
