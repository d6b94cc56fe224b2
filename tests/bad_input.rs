//! A matrix of bad requests: each gets the right 4xx and an OpenAI error body naming the field,
//! the server stays healthy, and no merge is cached for any of them.

use knots::server::state::Limits;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::server::{client, get, start};

/// (what, path, key, raw body, status, param when the error names one)
type Case = (
    &'static str,
    &'static str,
    &'static str,
    String,
    u16,
    Option<&'static str>,
);

const OP: &str = "sk-operator";
const ACME: &str = "sk-acme-user";

fn completion(extra: Value) -> String {
    let mut body = json!({"model": "math+code", "prompt": "hi", "max_tokens": 2});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body.to_string()
}

fn chat(extra: Value) -> String {
    let mut body = json!({"model": "math+code", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body.to_string()
}

/// Fields that would change the answer in ways knots does not implement, and checked ranges of
/// the ones it does: each a 400 naming the field.
fn sampling_cases() -> Vec<Case> {
    let (c, ch) = ("/v1/completions", "/v1/chat/completions");
    let cases: Vec<(&'static str, &'static str, String, &'static str)> = vec![
        ("n above sixteen", c, completion(json!({"n": 17})), "n"),
        ("n zero", ch, chat(json!({"n": 0})), "n"),
        (
            "JSON mode",
            ch,
            chat(json!({"response_format": {"type": "json_object"}})),
            "response_format",
        ),
        (
            "tools",
            ch,
            chat(json!({"tools": [{"type": "function", "function": {"name": "f"}}]})),
            "tools",
        ),
        (
            "tool_choice required",
            ch,
            chat(json!({"tool_choice": "required"})),
            "tool_choice",
        ),
        (
            "functions",
            ch,
            chat(json!({"functions": [{"name": "f"}]})),
            "functions",
        ),
        ("echo", c, completion(json!({"echo": true})), "echo"),
        ("suffix", c, completion(json!({"suffix": "end"})), "suffix"),
        (
            "best_of three",
            c,
            completion(json!({"best_of": 3})),
            "best_of",
        ),
        (
            "completion logprobs six",
            c,
            completion(json!({"logprobs": 6})),
            "logprobs",
        ),
        (
            "completion logprobs true",
            c,
            completion(json!({"logprobs": true})),
            "logprobs",
        ),
        (
            "completion top_logprobs",
            c,
            completion(json!({"top_logprobs": 2})),
            "top_logprobs",
        ),
        (
            "chat logprobs a number",
            ch,
            chat(json!({"logprobs": 3})),
            "logprobs",
        ),
        (
            "chat top_logprobs 21",
            ch,
            chat(json!({"logprobs": true, "top_logprobs": 21})),
            "top_logprobs",
        ),
        (
            "chat top_logprobs without logprobs",
            ch,
            chat(json!({"top_logprobs": 2})),
            "top_logprobs",
        ),
        (
            "frequency_penalty three",
            c,
            completion(json!({"frequency_penalty": 3.0})),
            "frequency_penalty",
        ),
        (
            "presence_penalty below -2",
            ch,
            chat(json!({"presence_penalty": -2.5})),
            "presence_penalty",
        ),
        (
            "logit_bias key not a token id",
            c,
            completion(json!({"logit_bias": {"hello": 1}})),
            "logit_bias",
        ),
        (
            "logit_bias above 100",
            c,
            completion(json!({"logit_bias": {"5": 200}})),
            "logit_bias",
        ),
    ];
    cases
        .into_iter()
        .map(|(what, path, body, param)| (what, path, OP, body, 400, Some(param)))
        .collect()
}

fn model(m: &str) -> String {
    json!({"model": m, "prompt": "hi", "max_tokens": 2}).to_string()
}

fn cases() -> Vec<Case> {
    let c = "/v1/completions";
    let long_name = "a".repeat(10_000);
    let too_many = (0..17)
        .map(|i| format!("a{i}"))
        .collect::<Vec<_>>()
        .join("+");
    let long_prompt = "word ".repeat(70);
    vec![
        ("malformed JSON", c, OP, "{".into(), 400, Some("body")),
        ("empty body", c, OP, "".into(), 400, Some("body")),
        ("array body", c, OP, "[]".into(), 400, Some("body")),
        (
            "missing model",
            c,
            OP,
            json!({"prompt": "x"}).to_string(),
            400,
            Some("model"),
        ),
        (
            "model not a string",
            c,
            OP,
            json!({"model": 5, "prompt": "x"}).to_string(),
            400,
            Some("model"),
        ),
        (
            "prompt not a string",
            c,
            OP,
            json!({"model": "gen", "prompt": 5}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "max_tokens a string",
            c,
            OP,
            completion(json!({"max_tokens": "many"})),
            400,
            Some("max_tokens"),
        ),
        (
            "negative max_tokens",
            c,
            OP,
            completion(json!({"max_tokens": -5})),
            400,
            Some("max_tokens"),
        ),
        (
            "zero max_tokens",
            c,
            OP,
            completion(json!({"max_tokens": 0})),
            400,
            Some("max_tokens"),
        ),
        (
            "temperature too high",
            c,
            OP,
            completion(json!({"temperature": 3.0})),
            400,
            Some("temperature"),
        ),
        (
            "temperature a string",
            c,
            OP,
            completion(json!({"temperature": "hot"})),
            400,
            Some("temperature"),
        ),
        (
            "top_p zero",
            c,
            OP,
            completion(json!({"top_p": 0.0})),
            400,
            Some("top_p"),
        ),
        (
            "five stop sequences",
            c,
            OP,
            completion(json!({"stop": ["a", "b", "c", "d", "e"]})),
            400,
            Some("stop"),
        ),
        ("unknown adapter", c, OP, model("nope"), 404, None),
        (
            "another tenant's adapter",
            c,
            ACME,
            model("globex/secret"),
            404,
            None,
        ),
        (
            "dot-dot name",
            c,
            OP,
            model("../etc/passwd"),
            400,
            Some("model"),
        ),
        ("nested slash", c, OP, model("a/b/c"), 400, Some("model")),
        (
            "percent-encoded dots",
            c,
            OP,
            model("%2e%2e"),
            400,
            Some("model"),
        ),
        ("NUL in name", c, OP, model("ma\0th"), 400, Some("model")),
        (
            "10000-character name",
            c,
            OP,
            model(&long_name),
            400,
            Some("model"),
        ),
        (
            "set above the limit",
            c,
            OP,
            model(&too_many),
            400,
            Some("model"),
        ),
        (
            "duplicate adapters",
            c,
            OP,
            model("math+math"),
            400,
            Some("model"),
        ),
        (
            "density 0",
            c,
            OP,
            completion(json!({"merge": {"density": 0.0}})),
            400,
            Some("merge.density"),
        ),
        (
            "density 2",
            c,
            OP,
            completion(json!({"merge": {"density": 2.0}})),
            400,
            Some("merge.density"),
        ),
        (
            "density NaN",
            c,
            OP,
            completion(json!({"merge": {"density": "NaN"}})),
            400,
            Some("merge.density"),
        ),
        (
            "lambda a string",
            c,
            OP,
            completion(json!({"merge": {"lambda": "big"}})),
            400,
            Some("merge.lambda"),
        ),
        (
            "dare_p 1",
            c,
            OP,
            completion(json!({"merge": {"method": "dare", "dare_p": 1.0}})),
            400,
            Some("merge.dare_p"),
        ),
        (
            "unknown method in model",
            c,
            OP,
            model("math+code@knots"),
            400,
            Some("model"),
        ),
        (
            "unknown merge.method",
            c,
            OP,
            completion(json!({"merge": {"method": "knots"}})),
            400,
            Some("merge.method"),
        ),
        (
            "unknown merge field",
            c,
            OP,
            completion(json!({"merge": {"densty": 0.3}})),
            400,
            Some("merge.densty"),
        ),
        (
            "weight not a number",
            c,
            OP,
            model("math:x+code"),
            400,
            Some("model"),
        ),
        (
            "infinite weight",
            c,
            OP,
            model("math:inf+code"),
            400,
            Some("model"),
        ),
        (
            "conflicting methods",
            c,
            OP,
            json!({"model": "math+code@ta", "prompt": "x", "merge": {"method": "ties"}})
                .to_string(),
            400,
            Some("merge.method"),
        ),
        (
            "prompt beyond the context",
            c,
            OP,
            json!({"model": "math", "prompt": long_prompt, "max_tokens": 2}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "body over the limit",
            c,
            OP,
            json!({"model": "gen", "prompt": "x".repeat(2 << 20)}).to_string(),
            413,
            None,
        ),
        ("empty model", c, OP, model(""), 400, Some("model")),
        (
            "adapters of different bases",
            c,
            OP,
            model("math+sentiment"),
            400,
            Some("model"),
        ),
        (
            "merge on a base model",
            c,
            OP,
            json!({"model": "gen", "prompt": "x", "merge": {"lambda": 0.5}}).to_string(),
            400,
            Some("merge"),
        ),
        ("unknown bundle", c, OP, model("bundle:nope"), 404, None),
        ("unknown experiment", c, OP, model("exp:nope"), 404, None),
        (
            "no messages",
            "/v1/chat/completions",
            OP,
            json!({"model": "math", "messages": []}).to_string(),
            400,
            Some("messages"),
        ),
        (
            "unknown role",
            "/v1/chat/completions",
            OP,
            json!({"model": "math", "messages": [{"role": "wizard", "content": "x"}]}).to_string(),
            400,
            Some("messages[0].role"),
        ),
        (
            "content a number",
            "/v1/chat/completions",
            OP,
            json!({"model": "math", "messages": [{"role": "user", "content": 5}]}).to_string(),
            400,
            Some("messages[0].content"),
        ),
        (
            "embeddings on a generator",
            "/v1/embeddings",
            OP,
            json!({"model": "gen", "input": "x"}).to_string(),
            400,
            Some("model"),
        ),
        (
            "no inputs",
            "/v1/embeddings",
            OP,
            json!({"model": "sentiment", "input": []}).to_string(),
            400,
            Some("input"),
        ),
        (
            "classify top_k 0",
            "/v1/classify",
            OP,
            json!({"model": "sentiment", "input": "x", "top_k": 0}).to_string(),
            400,
            Some("top_k"),
        ),
        (
            "classify unknown task",
            "/v1/classify",
            OP,
            json!({"model": "sentiment", "input": "x", "task": "weather"}).to_string(),
            400,
            Some("task"),
        ),
        (
            "feedback for an unknown request",
            "/v1/experiments/ab/feedback",
            OP,
            json!({"request_id": "cmpl-x", "score": 1.0}).to_string(),
            404,
            None,
        ),
        (
            "register outside the roots",
            "/v1/adapters",
            OP,
            json!({"name": "etc", "path": "../../etc"}).to_string(),
            400,
            Some("path"),
        ),
        (
            "register a bad name",
            "/v1/adapters",
            OP,
            json!({"name": "../x", "path": "."}).to_string(),
            400,
            Some("name"),
        ),
        ("no API key", c, "", model("math"), 401, None),
        ("unknown route", "/v1/nothing", OP, "{}".into(), 404, None),
    ]
}

#[tokio::test]
async fn every_bad_request_gets_its_4xx_and_leaves_no_trace() {
    let s = start(Limits::default()).await;
    let mut cases = cases();
    cases.extend(sampling_cases());
    assert!(cases.len() >= 60);
    let mut wrong = Vec::new();
    for (what, path, key, body, status, param) in cases {
        let mut req = client()
            .post(format!("{}{path}", s.url))
            .header("content-type", "application/json")
            .body(body);
        if !key.is_empty() {
            req = req.bearer_auth(key);
        }
        let r = req.send().await.unwrap();
        let got = r.status();
        let text = r.text().await.unwrap();
        let err: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let body_ok = err["error"]["message"].is_string() && err["error"]["type"].is_string();
        let param_ok = param.is_none() || err["error"]["param"].as_str() == param;
        if got != StatusCode::from_u16(status).unwrap() || !body_ok || !param_ok {
            wrong.push(format!(
                "{what}: expected {status} {param:?}, got {got} {text}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} cases answered wrongly:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    let (st, _) = get(&s, "/health", OP).await;
    assert_eq!(st, 200, "still healthy");
    s.state.cache.sync().await;
    assert_eq!(s.state.cache.len(), 0, "no bad request left a cache entry");
    let (st, _, _) = crate::server::post(
        &s,
        "/v1/completions",
        OP,
        json!({"model": "math+code", "prompt": "x", "max_tokens": 1}),
    )
    .await;
    assert_eq!(st, 200, "and still serving");
    s.stop().await.unwrap();
}

#[tokio::test]
async fn bodies_not_sent_as_json_are_415() {
    let s = start(Limits::default()).await;
    let body = json!({"model": "math+code", "prompt": "hi", "max_tokens": 2}).to_string();
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        for path in ["/v1/completions", "/v1/embeddings", "/v1/merges"] {
            let mut req = client()
                .post(format!("{}{path}", s.url))
                .bearer_auth(OP)
                .body(body.clone());
            if let Some(t) = content_type {
                req = req.header("content-type", t);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 415, "{content_type:?} to {path}");
            let err: Value = r.json().await.unwrap();
            assert_eq!(err["error"]["code"], "unsupported_media_type", "{err}");
        }
    }
    let r = client()
        .post(format!("{}/v1/completions", s.url))
        .bearer_auth(OP)
        .header("content-type", "application/json; charset=utf-8")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "JSON with a charset is JSON");
    s.stop().await.unwrap();
}
