#!/usr/bin/env python3
"""Load benchmark of a running `knots serve`, with llama.cpp and sentence-transformers anchors.

Measures, in this order (the anchors last, while the server is idle):
  decode  single-stream decode tokens/s through /v1/completions, base model and one adapter,
          alternating, --decode-rounds requests each (the median request is reported)
  sweep   1/4/16/32 concurrent streaming clients for --duration seconds per level, once over
          eight adapter sets (client i uses set i % 8; one is a dense TIES merge), once over the
          same sets with that one replaced by a low-rank merge, and once with every client on
          the base model: completion tokens/s, TTFT and inter-token latency p50/p99, errors
  paired  the three sweep groups in turn at --paired-clients clients, --paired-rounds times,
          --paired-duration seconds each: the ratios of sets to base within each round, whose
          runs are seconds apart (the sweep's are minutes apart, and a shared machine's speed
          drifts over minutes); the median round is reported
  embed   all-MiniLM-L6-v2 through /v1/embeddings, batches of 32 (base64, the openai clients'
          default), at 1 and 8 clients
  anchors llama_cpp.Llama on the same GGUF (single-stream decode tokens/s; batched decode of
          as many sequences as each sweep level above 1, one llama_decode per step), and
          SentenceTransformer on the same MiniLM folder (sentences/s), 2 threads each;
          each is skipped with a message when its package is missing

Every measurement is printed as one JSON line; a Markdown summary follows at the end.
Standard library only, plus the optional anchor packages.

Usage (start the server first, e.g.
  target/release/knots serve --model smollm2-135m-instruct,all-minilm-l6-v2 \\
      --adapters models/adapters --port 8123):
  python3 scripts/bench_serve.py --out bench.json
  python3 scripts/bench_serve.py --duration 10 --levels 1,4 --skip-anchors
  python3 scripts/bench_serve.py --skip-server            # anchors only, no server needed
"""

import argparse
import base64
import json
import math
import os
import random
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "all-minilm-l6-v2"
ADAPTER_SETS = [
    "sentiment-lm",
    "news-lm",
    "language-lm",
    "shout",
    "sentiment-lm+news-lm",
    "news-lm+language-lm@ta",
    "sentiment-lm+news-lm+language-lm",  # knots-ties, the default method
    "shout+sentiment-lm@ties",  # dense TIES
]
# The same mix with the dense set replaced by a low-rank merge of the same adapters: what the
# dense ΔW (f32, four times the bytes of the 4-bit base) costs the batch.
LOW_RANK_SETS = ADAPTER_SETS[:-1] + ["shout+sentiment-lm@knots-ta"]
DECODE_ADAPTER = "shout"
# A plain-text prompt (no chat template) so the server and llama.cpp see the same tokens;
# greedy decoding of a 135M model runs on (or loops) well past 128 tokens from here.
DECODE_PROMPT = "Once upon a time, in a small village at the foot of a mountain, there lived a dragon who"
SWEEP_PROMPTS = [
    "The best way to learn a new language is",
    "Here is a short summary of today's news:",
    "My favourite recipe for a rainy day is",
    "The history of the printing press begins",
    "Dear customer, thank you for your review of",
    "Three things every new programmer should know are",
]
REQUEST_TIMEOUT_S = 300
RESULTS: list[dict] = []


def emit(row: dict) -> dict:
    """Prints one result as a JSON line and keeps it for the summary."""
    print(json.dumps(row), flush=True)
    RESULTS.append(row)
    return row


def note(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile, `q` in [0, 1]; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 2)


# ---------------------------------------------------------------- HTTP client


@dataclass
class Stream:
    """One streaming completion as the client saw it (perf_counter times)."""

    sent: float
    chunks: list[float] = field(default_factory=list)  # arrival of each non-empty piece
    completion_tokens: int | None = None
    done: float | None = None  # arrival of `data: [DONE]`
    merge: str = ""  # the x-knots-merge header
    error: str | None = None
    abandoned: bool = False  # closed by the client at the end of the window

    @property
    def ok(self) -> bool:
        return self.error is None and not self.abandoned and self.done is not None

    @property
    def ttft(self) -> float | None:
        return self.chunks[0] - self.sent if self.chunks else None

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:])]


def request(url: str, body: dict) -> urllib.request.Request:
    return urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})


def post_json(url: str, body: dict) -> dict:
    with urllib.request.urlopen(request(url, body), timeout=REQUEST_TIMEOUT_S) as r:
        return json.loads(r.read())


def piece_of(event: dict) -> str:
    """The text of a completion or chat chunk ('' when none)."""
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


def stream_completion(base_url: str, body: dict, deadline: float | None = None) -> Stream:
    """Sends one streaming /v1/completions with usage; stops reading (closing the connection,
    which cancels the generation) once `deadline` has passed."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    result = Stream(sent=time.perf_counter())
    try:
        with urllib.request.urlopen(request(base_url + "/v1/completions", body), timeout=REQUEST_TIMEOUT_S) as r:
            result.merge = r.headers.get("x-knots-merge", "")
            for raw in r:
                now = time.perf_counter()
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    result.done = now
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = json.dumps(event["error"])[:200]
                    break
                if event.get("usage"):
                    result.completion_tokens = event["usage"].get("completion_tokens")
                if piece_of(event):
                    result.chunks.append(now)
                if deadline is not None and now > deadline:
                    result.abandoned = True
                    break
    except urllib.error.HTTPError as e:
        result.error = f"HTTP {e.code}: {e.read()[:200].decode(errors='replace')}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        result.error = repr(e)[:200]
    if result.error is None and not result.abandoned and result.done is None:
        result.error = "stream ended without [DONE]"
    return result


def wait_ready(base_url: str, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(base_url + "/ready", timeout=5) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(1)


# ---------------------------------------------------------------- (a) single-stream decode


def decode_row(name: str, s: Stream) -> dict:
    row = {"bench": "decode", "target": name, "ok": s.ok, "error": s.error}
    if s.ok and s.completion_tokens and len(s.chunks) >= 2:
        span = s.chunks[-1] - s.chunks[0]
        row |= {
            "completion_tokens": s.completion_tokens,
            "chunks": len(s.chunks),
            "ttft_ms": ms(s.ttft),
            "decode_tok_s": round((s.completion_tokens - 1) / span, 2) if span > 0 else None,
            "e2e_tok_s": round(s.completion_tokens / (s.chunks[-1] - s.sent), 2),
        }
    return row


def bench_decode(base_url: str, max_tokens: int, rounds: int) -> None:
    """The base and the adapter in alternation, `rounds` requests each, so that both see the same
    moments of a noisy machine; each row is the request with the median decode rate, with every
    request's rate beside it."""
    bodies = {
        model: {"model": model, "prompt": DECODE_PROMPT, "max_tokens": max_tokens, "temperature": 0}
        for model in (BASE_MODEL, DECODE_ADAPTER)
    }
    for body in bodies.values():
        stream_completion(base_url, {**body, "max_tokens": 4})  # warm
    rows: dict[str, list[dict]] = {model: [] for model in bodies}
    for _ in range(rounds):
        for model, body in bodies.items():
            rows[model].append(decode_row(model, stream_completion(base_url, body)))
    for model, runs in rows.items():
        rates = [r.get("decode_tok_s") for r in runs]
        failed = [r for r in runs if r.get("decode_tok_s") is None]
        if failed:
            emit(failed[0] | {"decode_tok_s_runs": rates})
            continue
        median = sorted(runs, key=lambda r: r["decode_tok_s"])[len(runs) // 2]
        emit(median | {"decode_tok_s_runs": rates})


# ---------------------------------------------------------------- (b) concurrency sweep


def warm(base_url: str, models: list[str]) -> None:
    """One short request per model, so merged sets are built before the clock starts."""
    for model in models:
        s = stream_completion(base_url, {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0})
        note(f"warm {model}: {'ok' if s.ok else s.error} {s.merge}")


def client_loop(base_url: str, model: str, index: int, deadline: float, max_tokens: int) -> list[Stream]:
    """Back-to-back streaming completions until `deadline`."""
    streams, n = [], 0
    while time.perf_counter() < deadline:
        prompt = SWEEP_PROMPTS[(index + n) % len(SWEEP_PROMPTS)]
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        s = stream_completion(base_url, body, deadline)
        streams.append(s)
        n += 1
        if s.error:
            time.sleep(0.1)  # a failing server must not turn this into a busy loop
    return streams


def sweep_row(bench: str, group: str, clients: int, window: float, deadline: float, streams: list[Stream]) -> dict:
    finished = [s for s in streams if s.ok and s.done <= deadline]
    ttft = [s.ttft for s in streams if s.ttft is not None and s.chunks[0] <= deadline]
    gaps = [g for s in streams for g in s.gaps()]
    errors = [s for s in streams if s.error]
    chunks_in_window = sum(1 for s in streams for t in s.chunks if t <= deadline)
    return {
        "bench": bench,
        "group": group,
        "clients": clients,
        "window_s": round(window, 2),
        "requests": len(finished),
        "tok_s": round(sum(s.completion_tokens or 0 for s in finished) / window, 2),
        "chunks_s": round(chunks_in_window / window, 2),  # counts work still in flight at the end
        "ttft_p50_ms": ms(percentile(ttft, 0.5)),
        "ttft_p99_ms": ms(percentile(ttft, 0.99)),
        "itl_p50_ms": ms(percentile(gaps, 0.5)),
        "itl_p99_ms": ms(percentile(gaps, 0.99)),
        "errors": len(errors),
        "first_error": errors[0].error if errors else None,
        "merges": sum(1 for s in streams if "outcome=miss" in s.merge or "outcome=coalesced" in s.merge),
    }


def run_level(base_url: str, group: str, models: list[str], clients: int, duration: float, max_tokens: int,
              bench: str = "sweep", **extra) -> dict:
    start = time.perf_counter()
    deadline = start + duration
    with ThreadPoolExecutor(clients) as pool:
        futures = [
            pool.submit(client_loop, base_url, models[i % len(models)], i, deadline, max_tokens) for i in range(clients)
        ]
        streams = [s for f in futures for s in f.result()]
    return emit(sweep_row(bench, group, clients, duration, deadline, streams) | extra)


SWEEP_GROUPS = (("adapter sets", ADAPTER_SETS), ("low-rank sets", LOW_RANK_SETS), ("base", [BASE_MODEL]))


def bench_sweep(base_url: str, levels: list[int], duration: float, max_tokens: int) -> None:
    warm(base_url, ADAPTER_SETS + LOW_RANK_SETS + [BASE_MODEL])
    for group, models in SWEEP_GROUPS:
        for clients in levels:
            run_level(base_url, group, models, clients, duration, max_tokens)


def bench_paired(base_url: str, clients: int, rounds: int, duration: float, max_tokens: int) -> None:
    """Every sweep group at `clients` clients in turn, `rounds` times (rows tagged with the round);
    each round starts one group later than the one before, so no group always goes first."""
    for n in range(rounds):
        turn = n % len(SWEEP_GROUPS)
        for group, models in SWEEP_GROUPS[turn:] + SWEEP_GROUPS[:turn]:
            run_level(base_url, group, models, clients, duration, max_tokens, bench="paired", round=n + 1)


# ---------------------------------------------------------------- (c) embeddings


WORDS = {
    "subject": "the old farmer|my sister|a young engineer|the city council|our neighbour's dog|the new teacher|"
    "a small startup|the orchestra|the local baker|every student|the river|a tired traveller|the committee",
    "verb": "repaired|painted|discussed|ignored|celebrated|measured|delivered|questioned|photographed|"
    "borrowed|rebuilt|explained|organised|tasted|watched",
    "object": "the broken fence|an unusual proposal|the morning train|a bowl of soup|the quarterly report|"
    "the wooden bridge|a forgotten letter|the garden shed|a noisy engine|the museum's collection|"
    "the football match|a difficult question|the winter market",
    "tail": "before the storm arrived|after a long and quiet afternoon|with surprising patience|"
    "near the edge of town|for the third time this week|while everyone else was asleep|"
    "despite the heavy rain|in front of a large crowd|without saying a single word|"
    "because nobody else had time|during the annual festival|at the end of a busy day",
    "joiner": "and then|but later|so that|while|because|although",
}
WORDS = {k: v.split("|") for k, v in WORDS.items()}


def make_sentences(n: int = 256, seed: int = 7) -> list[str]:
    """`n` varied English-like sentences of 6 to 25 words, the same on every run."""
    rng = random.Random(seed)
    pick = lambda kind: rng.choice(WORDS[kind])
    out = []
    while len(out) < n:
        target = rng.randint(5, 25)
        words = f"{pick('subject')} {pick('verb')} {pick('object')}".split()
        while len(words) < target:
            extra = pick("tail") if rng.random() < 0.5 else f"{pick('joiner')} {pick('subject')} {pick('verb')} {pick('object')}"
            if len(words) + len(extra.split()) > 25 or extra in " ".join(words):
                break
            words += extra.split()
        text = " ".join(words)
        out.append(text[0].upper() + text[1:] + ".")
    return out


def bench_embed(base_url: str, sentences: list[str], levels: list[int], duration: float, batch: int = 32) -> None:
    batches = [sentences[i : i + batch] for i in range(0, len(sentences), batch)]
    post_json(base_url + "/v1/embeddings", {"model": EMBED_MODEL, "input": batches[0]})  # warm

    # Clients start no request after the deadline and finish the one in flight; throughput is
    # every sentence embedded over the time until the last reply (a window that dropped the
    # requests in flight at its end would undercount long requests).
    def client(index: int, deadline: float) -> tuple[int, list[float], int, float]:
        done, latencies, errors, n, last = 0, [], 0, index, time.perf_counter()
        while time.perf_counter() < deadline:
            chunk = batches[n % len(batches)]
            n += 1
            started = time.perf_counter()
            try:
                # base64, as the official openai clients ask for unless told otherwise.
                reply = post_json(base_url + "/v1/embeddings",
                                  {"model": EMBED_MODEL, "input": chunk, "encoding_format": "base64"})
                data = reply.get("data", [])
                if len(data) != len(chunk) or any(len(base64.b64decode(d["embedding"])) != 4 * 384 for d in data):
                    raise ValueError(f"expected {len(chunk)} embeddings of 384 floats")
            except (urllib.error.URLError, OSError, ValueError) as e:
                errors += 1
                note(f"embed error: {e!r}"[:200])
                time.sleep(0.1)
                continue
            last = time.perf_counter()
            done += len(chunk)
            latencies.append(last - started)
        return done, latencies, errors, last

    for clients in levels:
        start = time.perf_counter()
        deadline = start + duration
        with ThreadPoolExecutor(clients) as pool:
            parts = list(pool.map(lambda i: client(i, deadline), range(clients)))
        latencies = [x for p in parts for x in p[1]]
        emit({
            "bench": "embed",
            "clients": clients,
            "batch": batch,
            "requests": len(latencies),
            "sentences_s": round(sum(p[0] for p in parts) / (max(p[3] for p in parts) - start), 1),
            "latency_p50_ms": ms(percentile(latencies, 0.5)),
            "latency_p99_ms": ms(percentile(latencies, 0.99)),
            "errors": sum(p[2] for p in parts),
        })


# ---------------------------------------------------------------- (d) anchors


def load_llama(llama_cpp, gguf: Path, threads: int, extra_bufts: bool):
    """`llama_cpp.Llama` on `gguf`. Without `extra_bufts` the model skips ggml's extra buffer
    types (AMX and weight repacking): on AMX CPUs a native build's AMX matmul segfaults on this
    Q4_1 model (ggml_backend_amx_mul_mat, llama-cpp-python 0.3.36), and `Llama` has no switch."""
    import llama_cpp.llama as llama_module

    defaults = llama_module.llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = extra_bufts
        return p

    llama_module.llama_cpp.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_ctx=512, verbose=False)
    finally:
        llama_module.llama_cpp.llama_model_default_params = defaults


def anchor_llama_cpp(gguf: Path, max_tokens: int, threads: int, extra_bufts: bool = False) -> None:
    try:
        import llama_cpp
    except ImportError:
        note("llama_cpp not installed: skipping the llama.cpp anchor (pip install llama-cpp-python)")
        return
    llm = load_llama(llama_cpp, gguf, threads, extra_bufts)
    prompt = llm.tokenize(DECODE_PROMPT.encode())
    times = generate_times(llm, prompt, 4)  # warm
    started = time.perf_counter()
    times = generate_times(llm, prompt, max_tokens)
    span = times[-1] - times[0]
    emit({
        "bench": "anchor",
        "anchor": "llama.cpp",
        "version": llama_cpp.__version__,
        "threads": threads,
        "extra_bufts": extra_bufts,
        "prompt_tokens": len(prompt),
        "completion_tokens": len(times),
        "ttft_ms": ms(times[0] - started),
        "decode_tok_s": round((len(times) - 1) / span, 2) if span > 0 else None,
    })


def anchor_llama_cpp_batched(gguf: Path, levels: list[int], steps: int, threads: int, extra_bufts: bool = False) -> None:
    """llama.cpp's own batched decode on the same GGUF: `S` sequences, each the sweep's first
    prompt, prefilled in one batch, then `steps` greedy steps of one token per sequence in one
    `llama_decode` each, with every sequence's logits (as a knots step). Steady decode only,
    with no arrivals or prefills between steps, so it is an upper bound on what llama.cpp's
    batching gives a server. The rate is over the steps after the first four (half, for fewer
    than eight)."""
    try:
        import llama_cpp
        import numpy as np
        from llama_cpp._utils import suppress_stdout_stderr as quiet
    except ImportError:
        note("llama_cpp not installed: skipping the llama.cpp batched anchor")
        return
    llm = load_llama(llama_cpp, gguf, threads, extra_bufts)
    warm = min(4, steps // 2)  # steps before the timed ones
    vocab = llama_cpp.llama_n_vocab(llama_cpp.llama_model_get_vocab(llm.model))
    prompt = llm.tokenize(SWEEP_PROMPTS[0].encode())
    for seqs in levels:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = seqs * 256 * math.ceil((len(prompt) + steps + 16) / 256)  # whole cells per sequence
        params.n_batch = params.n_ubatch = max(512, seqs * len(prompt))
        params.n_seq_max = seqs
        params.n_threads = params.n_threads_batch = threads
        with quiet(disable=False):  # a context logs its set-up whatever the log level
            ctx = llama_cpp.llama_init_from_model(llm.model, params)
        batch = llama_cpp.llama_batch_init(params.n_batch, 0, seqs)
        try:
            def decode(tokens: list[tuple[int, int, int, bool]]) -> np.ndarray:
                """One `llama_decode` of (token, position, sequence, logits?) rows; the logits
                rows asked for, in order."""
                for i, (token, pos, seq, logits) in enumerate(tokens):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
                    batch.seq_id[i][0], batch.logits[i] = seq, logits
                batch.n_tokens = len(tokens)
                if llama_cpp.llama_decode(ctx, batch) != 0:
                    raise RuntimeError(f"llama_decode failed at {seqs} sequences")
                outputs = sum(1 for t in tokens if t[3])
                return np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(outputs, vocab))

            logits = decode([(t, i, s, i == len(prompt) - 1) for s in range(seqs) for i, t in enumerate(prompt)])
            started = time.perf_counter()
            for step in range(steps):
                if step == warm:
                    started = time.perf_counter()
                nxt = logits.argmax(axis=1)
                logits = decode([(int(nxt[s]), len(prompt) + step, s, True) for s in range(seqs)])
            span = time.perf_counter() - started
        finally:
            llama_cpp.llama_batch_free(batch)
            with quiet(disable=False):
                llama_cpp.llama_free(ctx)
        emit({
            "bench": "anchor",
            "anchor": f"llama.cpp, {seqs} sequences",
            "version": llama_cpp.__version__,
            "threads": threads,
            "extra_bufts": extra_bufts,
            "sequences": seqs,
            "steps": steps - warm,
            "decode_tok_s": round(seqs * (steps - warm) / span, 2),
        })


def generate_times(llm, prompt: list[int], max_tokens: int) -> list[float]:
    """Greedy decoding; the arrival time of each generated token (EOS excluded)."""
    times = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        if token == llm.token_eos():
            break
        times.append(time.perf_counter())
        if len(times) >= max_tokens:
            break
    return times


def anchor_sentence_transformers(minilm_dir: Path, sentences: list[str], threads: int, min_s: float = 3.0) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the folder is local; never reach for a hub
    try:
        import sentence_transformers
        import torch
    except ImportError:
        note("sentence_transformers not installed: skipping its anchor (pip install sentence-transformers)")
        return
    torch.set_num_threads(threads)
    model = sentence_transformers.SentenceTransformer(str(minilm_dir), device="cpu")
    model.encode(sentences[:32], batch_size=32)  # warm
    passes, started = 0, time.perf_counter()
    while passes == 0 or time.perf_counter() - started < min_s:
        vectors = model.encode(sentences, batch_size=32)
        passes += 1
    elapsed = time.perf_counter() - started
    emit({
        "bench": "anchor",
        "anchor": "sentence-transformers",
        "version": sentence_transformers.__version__,
        "torch": torch.__version__,
        "threads": threads,
        "batch": 32,
        "dim": int(vectors.shape[1]),
        "sentences_s": round(passes * len(sentences) / elapsed, 1),
    })


# ---------------------------------------------------------------- summary


def fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(a, b) -> float | None:
    return round(a / b, 3) if a and b else None


def paired_ratios(rows: list[dict]) -> list[list]:
    """Per round, each group's streamed tokens/s over the base's; the median round of each."""
    rounds: dict[int, dict[str, float]] = {}
    for r in rows:
        rounds.setdefault(r["round"], {})[r["group"]] = r["chunks_s"]
    clients = rows[0]["clients"] if rows else None
    out = []
    for group in ("adapter sets", "low-rank sets"):
        values = [ratio(g.get(group), g.get("base")) for g in rounds.values()]
        values = [v for v in values if v is not None]
        if values:
            label = f"{clients} clients, paired rounds: {group} / base (median of {', '.join(map(str, values))})"
            out.append([label, percentile(values, 0.5)])
    return out


def summary(results: list[dict]) -> str:
    by = lambda bench: [r for r in results if r["bench"] == bench]
    parts = []
    decode = {r["target"]: r for r in by("decode")}
    anchors = {r["anchor"]: r for r in by("anchor")}
    if decode:
        parts.append("### Single-stream decode (/v1/completions, greedy)\n\n" + table(
            ["target", "completion tokens", "TTFT ms", "decode tok/s", "end-to-end tok/s", "error"],
            [[k, r.get("completion_tokens"), r.get("ttft_ms"), r.get("decode_tok_s"), r.get("e2e_tok_s"), r["error"]]
             for k, r in decode.items()]))
    if by("sweep"):
        parts.append("### Concurrency sweep (max_tokens 64, streaming)\n\n" + table(
            ["group", "clients", "completed tok/s", "streamed tok/s", "requests", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
             "ITL p99 ms", "errors", "merges"],
            [[r["group"], r["clients"], r["tok_s"], r["chunks_s"], r["requests"], r["ttft_p50_ms"], r["ttft_p99_ms"],
              r["itl_p50_ms"], r["itl_p99_ms"], r["errors"], r["merges"]] for r in by("sweep")]))
    if by("paired"):
        parts.append("### Paired rounds (the sweep groups in turn)\n\n" + table(
            ["round", "group", "clients", "completed tok/s", "streamed tok/s", "errors"],
            [[r["round"], r["group"], r["clients"], r["tok_s"], r["chunks_s"], r["errors"]] for r in by("paired")]))
    if by("embed"):
        parts.append("### Embeddings (/v1/embeddings, all-MiniLM-L6-v2, batch 32)\n\n" + table(
            ["clients", "sentences/s", "requests", "latency p50 ms", "latency p99 ms", "errors"],
            [[r["clients"], r["sentences_s"], r["requests"], r["latency_p50_ms"], r["latency_p99_ms"], r["errors"]]
             for r in by("embed")]))
    if anchors:
        parts.append("### Anchors (2 threads, server idle)\n\n" + table(
            ["anchor", "version", "metric", "value"],
            [[k, r["version"], "decode tok/s" if "decode_tok_s" in r else "sentences/s",
              r.get("decode_tok_s", r.get("sentences_s"))] for k, r in anchors.items()]))
    base_tps = decode.get(BASE_MODEL, {}).get("decode_tok_s")
    embed_1 = next((r["sentences_s"] for r in by("embed") if r["clients"] == 1), None)
    # Streamed tokens/s: requests still running at the window's end count too.
    sweep = {(r["group"], r["clients"]): r["chunks_s"] for r in by("sweep")}
    llama_16 = anchors.get("llama.cpp, 16 sequences", {}).get("decode_tok_s")
    ratios = [
        ["adapter / base decode", ratio(decode.get(DECODE_ADAPTER, {}).get("decode_tok_s"), base_tps)],
        ["16 clients over 8 sets / single stream", ratio(sweep.get(("adapter sets", 16)), base_tps)],
        ["16 clients: sets / base", ratio(sweep.get(("adapter sets", 16)), sweep.get(("base", 16)))],
        ["16 clients: low-rank sets / base", ratio(sweep.get(("low-rank sets", 16)), sweep.get(("base", 16)))],
        ["knots / llama.cpp decode", ratio(base_tps, anchors.get("llama.cpp", {}).get("decode_tok_s"))],
        ["llama.cpp: 16 sequences / single stream", ratio(llama_16, anchors.get("llama.cpp", {}).get("decode_tok_s"))],
        ["16 clients over 8 sets / llama.cpp 16 sequences", ratio(sweep.get(("adapter sets", 16)), llama_16)],
        ["16 clients, base / llama.cpp 16 sequences", ratio(sweep.get(("base", 16)), llama_16)],
        ["knots (1 client) / sentence-transformers", ratio(embed_1, anchors.get("sentence-transformers", {}).get("sentences_s"))],
    ]
    ratios += paired_ratios(by("paired"))
    ratios = [r for r in ratios if r[1] is not None]
    if ratios:
        parts.append("### Ratios\n\n" + table(["ratio", "value"], ratios))
    return "\n\n".join(parts)


# ---------------------------------------------------------------- main


def default_gguf() -> Path | None:
    found = sorted((REPO / "models/cache/smollm2-135m-instruct").glob("*.gguf"))
    return found[0] if found else None


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8123", help="the knots server")
    ap.add_argument("--gguf", type=Path, default=default_gguf(), help="GGUF for the llama.cpp anchor")
    ap.add_argument("--minilm-dir", type=Path, default=REPO / "models/cache/all-minilm-l6-v2",
                    help="sentence-transformers folder for the MiniLM anchor")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per sweep level")
    ap.add_argument("--embed-duration", type=float, default=10.0, help="seconds per embedding level")
    ap.add_argument("--levels", default="1,4,16,32", help="concurrent clients per sweep level")
    ap.add_argument("--embed-levels", default="1,8", help="concurrent clients per embedding level")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens of sweep requests")
    ap.add_argument("--paired-clients", type=int, default=16, help="concurrent clients of the paired rounds")
    ap.add_argument("--paired-rounds", type=int, default=3, help="paired rounds (0: none)")
    ap.add_argument("--paired-duration", type=float, default=10.0, help="seconds per group and paired round")
    ap.add_argument("--decode-tokens", type=int, default=128, help="max_tokens of the single-stream decode")
    ap.add_argument("--decode-rounds", type=int, default=5,
                    help="single-stream requests per target, base and adapter alternating (the median is reported)")
    ap.add_argument("--threads", type=int, default=2, help="threads for the anchors")
    ap.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the server's /ready")
    ap.add_argument("--llama-extra-bufts", action="store_true",
                    help="let llama.cpp use AMX / repacked weights (its AMX path crashes on some CPUs)")
    ap.add_argument("--skip-anchors", action="store_true", help="no llama.cpp / sentence-transformers runs")
    ap.add_argument("--skip-server", action="store_true", help="anchors only")
    ap.add_argument("--out", type=Path, help="write all results as JSON here")
    return ap.parse_args()


def main() -> int:
    a = parse_args()
    base_url = a.url.rstrip("/")
    sentences = make_sentences()
    if not a.skip_server:
        if not wait_ready(base_url, a.wait):
            note(f"no server ready at {base_url} (use --skip-server for the anchors alone)")
            return 1
        bench_decode(base_url, a.decode_tokens, a.decode_rounds)
        bench_sweep(base_url, [int(x) for x in a.levels.split(",")], a.duration, a.max_tokens)
        bench_paired(base_url, a.paired_clients, a.paired_rounds, a.paired_duration, a.max_tokens)
        bench_embed(base_url, sentences, [int(x) for x in a.embed_levels.split(",")], a.embed_duration)
    if not a.skip_anchors:
        if a.gguf and a.gguf.is_file():
            anchor_llama_cpp(a.gguf, a.decode_tokens, a.threads, a.llama_extra_bufts)
            levels = [int(x) for x in a.levels.split(",") if int(x) > 1]
            anchor_llama_cpp_batched(a.gguf, levels, a.max_tokens, a.threads, a.llama_extra_bufts)
        else:
            note(f"no GGUF at {a.gguf}: skipping the llama.cpp anchor")
        anchor_sentence_transformers(a.minilm_dir, sentences, a.threads)
    print("\n" + summary(RESULTS))
    if a.out:
        a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "results": RESULTS}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
