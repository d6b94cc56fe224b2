#!/usr/bin/env python3
"""Drives a running `knots serve` with the official `openai` Python client.

Usage: tests/openai_client.py BASE_URL   (e.g. http://127.0.0.1:8123/v1)

The server must serve smollm2-135m-instruct with the adapters `shout` and `shout-half`, and
all-minilm-l6-v2 (see scripts/serve_check.sh, which sets this up). Checks completions and chat, streamed and not, with
`model` naming a merged set and `extra_body` merge parameters, and that errors surface as the
client's typed exceptions; embeddings in the client's default (base64) and float forms; several choices with log-probabilities and penalties; unsupported
fields refused. Exits non-zero on the first failure.
"""

import sys

import openai


def main(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    merged = "shout+shout-half"
    merge = {"merge": {"method": "ties", "density": 0.5, "lambda": 1.0}}

    c = client.completions.create(model=merged, prompt="The capital of France is", max_tokens=8,
                                  temperature=0, extra_body=merge)
    assert c.choices[0].text, c
    assert c.usage.completion_tokens >= 1, c.usage
    print("completion:", repr(c.choices[0].text))

    pieces = [ch.choices[0].text for ch in client.completions.create(
        model=merged, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True,
        extra_body=merge)]
    assert "".join(pieces) == c.choices[0].text, (pieces, c.choices[0].text)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model=merged + "@knots-ties", messages=messages, max_tokens=12,
                                          temperature=0)
    text = chat.choices[0].message.content
    assert text and chat.choices[0].finish_reason in ("stop", "length"), chat
    print("chat:", repr(text))

    stream = client.chat.completions.create(model=merged + "@knots-ties", messages=messages, max_tokens=12,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    streamed, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            streamed.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(streamed) == text, (streamed, text)
    assert usage is not None and usage.completion_tokens >= 1, usage

    # Several choices with log-probabilities, parsed by the client's own types.
    many = client.chat.completions.create(model=merged, messages=messages, max_tokens=6, n=2, seed=5,
                                          temperature=1.0, logprobs=True, top_logprobs=2,
                                          frequency_penalty=0.5, presence_penalty=0.5)
    assert [ch.index for ch in many.choices] == [0, 1], many
    for ch in many.choices:
        tokens = ch.logprobs.content
        assert tokens and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in tokens), ch
    lp = client.completions.create(model=merged, prompt="The capital of France is", max_tokens=4,
                                   temperature=0, logprobs=1, extra_body=merge)
    assert "".join(lp.choices[0].logprobs.tokens) == lp.choices[0].text, lp
    assert len(lp.choices[0].logprobs.top_logprobs[0]) == 1, lp

    # Embeddings: the client asks for base64 unless told otherwise; both forms give the same vectors.
    texts = ["The weather is lovely today.", "Stocks fell sharply."]
    default = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    floats = client.embeddings.create(model="all-minilm-l6-v2", input=texts, encoding_format="float")
    assert [d.index for d in default.data] == [0, 1], default
    for a, b in zip(default.data, floats.data):
        assert len(a.embedding) == 384, len(a.embedding)
        # JSON floats are the shortest text that reads back as the same f32, not the same double.
        assert all(abs(x - y) <= 1e-7 * max(1.0, abs(y)) for x, y in zip(a.embedding, b.embedding)), \
            (a.embedding[:4], b.embedding[:4])
    print("embeddings: base64 and float agree")

    models = [m.id for m in client.models.list()]
    assert "smollm2-135m-instruct" in models and "shout" in models, models

    for call, exc in [
        (lambda: client.completions.create(model="no-such-adapter", prompt="x", max_tokens=1), openai.NotFoundError),
        (lambda: client.completions.create(model=merged, prompt="x", max_tokens=1,
                                           extra_body={"merge": {"density": 0}}), openai.BadRequestError),
        (lambda: client.chat.completions.create(model="shout@nope", messages=messages), openai.BadRequestError),
        (lambda: client.chat.completions.create(model=merged, messages=messages,
                                                response_format={"type": "json_object"}), openai.BadRequestError),
    ]:
        try:
            call()
        except exc as e:
            assert e.body and "message" in e.body, e.body
        else:
            raise AssertionError(f"expected {exc.__name__}")
    print("openai client: all checks passed")


if __name__ == "__main__":
    main(sys.argv[1])
