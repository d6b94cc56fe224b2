//! Request bodies: JSON objects with the real field names of every route's body and values of
//! every type, deserialized as the server does (`serde_path_to_error`) into each body type and
//! then validated (`sampling`, `choices`, `prompt`, `messages`, the `model`/`merge` pair).

use knots::engine::MAX_TOP_LOGPROBS;
use knots::server::bundles::{Bundle, BundleConfig};
use knots::server::call::ModelRequest;
use knots::server::error::ApiError;
use knots::server::experiments::{Experiment, ExperimentConfig};
use knots::server::routes::admin::{RegisterRequest, ReloadRequest, WarmRequest};
use knots::server::routes::experiments::Feedback;
use knots::server::spec::MergeField;
use knots::server::wire::{
    ClassifyRequest, EmbeddingsRequest, Endpoint, GenerationRequest, MAX_CHOICES,
    MAX_COMPLETION_LOGPROBS, MAX_LOGIT_BIAS,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseResult;
use serde::de::DeserializeOwned;

use super::strategies::{
    Gen, field, json_float, json_str, json_value, merge_field_json, model_string, mutate, object,
    object_of, object_with, pick_str, served_model, special_f64, special_i64,
};
use super::{Bytes, Tally, fuzz};

fn string() -> Gen<String> {
    prop_oneof![
        4 => "\\PC{0,16}".prop_map(|s| json_str(&s)),
        1 => Just("\"\"".to_string()),
        1 => any::<String>().prop_map(|s| json_str(&s)),
        1 => pick_str(&["\"panic!\"", "\"\\u0000\"", "\"\\ud800\"", "\"a\\nb\""]),
    ]
    .boxed()
}

fn strings(max: usize) -> Gen<String> {
    prop_oneof![
        3 => string(),
        3 => prop::collection::vec(string(), 0..max).prop_map(|v| format!("[{}]", v.join(","))),
        1 => prop::collection::vec(special_i64(), 0..4).prop_map(|v| {
            let ids: Vec<String> = v.iter().map(i64::to_string).collect();
            format!("[{}]", ids.join(","))
        }),
    ]
    .boxed()
}

fn int() -> Gen<String> {
    prop_oneof![
        6 => special_i64().prop_map(|i| i.to_string()),
        1 => any::<u64>().prop_map(|i| i.to_string()),
        1 => json_float(),
        1 => special_i64().prop_map(|i| format!("\"{i}\"")),
    ]
    .boxed()
}

fn float() -> Gen<String> {
    prop_oneof![
        6 => json_float(),
        1 => special_i64().prop_map(|i| i.to_string()),
        1 => special_f64().prop_map(|f| format!("\"{f}\"")),
    ]
    .boxed()
}

fn boolean() -> Gen<String> {
    prop_oneof![
        6 => any::<bool>().prop_map(|b| b.to_string()),
        1 => pick_str(&["null", "0", "1", "\"true\""]),
    ]
    .boxed()
}

pub fn model() -> Gen<String> {
    prop_oneof![3 => model_string(), 1 => served_model()]
        .prop_map(|m| json_str(&m))
        .boxed()
}

fn message() -> Gen<String> {
    let part = object_of(
        vec![
            field(
                "type",
                pick_str(&["\"text\"", "\"text\"", "\"image_url\"", "\"\"", "1"]),
            ),
            field("text", string()),
            field("image_url", json_value()),
        ],
        3,
    );
    let content = prop_oneof![
        3 => string(),
        2 => prop::collection::vec(part, 0..4).prop_map(|v| format!("[{}]", v.join(","))),
        1 => Just("null".to_string()),
    ];
    let role = field(
        "role",
        prop_oneof![
            12 => pick_str(&["\"system\"", "\"user\"", "\"assistant\"", "\"developer\""]),
            1 => pick_str(&["\"tool\"", "\"\"", "\"User\""]),
        ]
        .boxed(),
    );
    let content = field("content", content.boxed());
    object_with(
        vec![role.clone(), content.clone()],
        vec![role, content, field("name", string())],
        2,
    )
}

fn logit_bias() -> Gen<String> {
    let key = prop_oneof![
        4 => (0u32..70_000).prop_map(|k| k.to_string()),
        1 => pick_str(&[
            "-1", "4294967295", "4294967296", "1e3", "", " 1", "+1", "01", "abc", "١",
        ]),
        1 => "\\PC{0,5}",
    ];
    prop_oneof![
        6 => prop::collection::vec((key, float()), 0..6)
            .prop_map(|kv| object(kv.iter().map(|(k, v)| (k.as_str(), v.as_str())))),
        1 => (299usize..303).prop_map(|n| {
            let keys: Vec<String> = (0..n).map(|i| i.to_string()).collect();
            object(keys.iter().map(|k| (k.as_str(), "1")))
        }),
    ]
    .boxed()
}

/// A body of the generation routes (and the compare call).
pub fn generation(model: Gen<String>) -> Gen<String> {
    let tool = pick_str(&[
        "null",
        "[]",
        "[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}]",
        "{}",
        "\"none\"",
        "\"auto\"",
        "\"required\"",
        "{\"type\":\"text\"}",
        "{\"type\":\"json_object\"}",
        "{\"type\":\"json_schema\",\"json_schema\":{}}",
    ]);
    let prompt = field("prompt", strings(3));
    let messages = field(
        "messages",
        prop::collection::vec(message(), 0..4)
            .prop_map(|v| format!("[{}]", v.join(",")))
            .boxed(),
    );
    object_with(
        vec![
            field("model", model.clone()),
            prop_oneof![prompt.clone(), messages.clone()].boxed(),
        ],
        vec![
            field("model", model),
            prompt,
            messages,
            field("max_tokens", int()),
            field("max_completion_tokens", int()),
            field("temperature", float()),
            field("top_p", float()),
            field("top_k", int()),
            field("n", int()),
            field("seed", int()),
            field("stop", strings(6)),
            field("stream", boolean()),
            field(
                "stream_options",
                object_of(vec![field("include_usage", boolean())], 2),
            ),
            field("user", string()),
            field("merge", merge_field_json()),
            field("logprobs", prop_oneof![boolean(), int()].boxed()),
            field("top_logprobs", int()),
            field("frequency_penalty", float()),
            field("presence_penalty", float()),
            field("logit_bias", logit_bias()),
            field("response_format", tool.clone()),
            field("tools", tool.clone()),
            field("tool_choice", tool.clone()),
            field("functions", tool.clone()),
            field("function_call", tool),
            field("echo", boolean()),
            field("suffix", string()),
            field("best_of", int()),
        ],
        12,
    )
}

/// A body of `/v1/embeddings`, `/v1/classify` and the admin and experiment routes.
pub fn other_body(model: Gen<String>) -> Gen<String> {
    object_with(
        vec![field("model", model.clone()), field("input", strings(5))],
        vec![
            field("model", model.clone()),
            field("input", strings(5)),
            field("merge", merge_field_json()),
            field(
                "encoding_format",
                pick_str(&["\"float\"", "\"base64\"", "null", "\"\""]),
            ),
            field("user", string()),
            field(
                "task",
                pick_str(&["\"joint\"", "\"sentiment\"", "\"topic\"", "\"\"", "null"]),
            ),
            field("top_k", int()),
            field("name", model.clone()),
            field(
                "path",
                pick_str(&[
                    "\"/tmp\"",
                    "\"../..\"",
                    "\"\"",
                    "\"a\\u0000b\"",
                    "\"spare/extra\"",
                ]),
            ),
            field("request_id", string()),
            field("score", float()),
            field("tenant", string()),
            field(
                "arms",
                prop::collection::vec(
                    object_of(
                        vec![
                            field("name", model.clone()),
                            field("model", model.clone()),
                            field("weight", float()),
                        ],
                        4,
                    ),
                    0..3,
                )
                .prop_map(|v| format!("[{}]", v.join(",")))
                .boxed(),
            ),
        ],
        7,
    )
}

/// The body's parse as the server does it.
fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    knots::server::wire::parse_json(bytes)
}

/// A refusal must be a 4xx naming a field.
fn refused(e: &ApiError) -> TestCaseResult {
    prop_assert!(e.status().is_client_error(), "{e:?}");
    if let ApiError::BadRequest { param, message } = e {
        prop_assert!(param.as_deref().is_some_and(|p| !p.is_empty()), "{e:?}");
        prop_assert!(!message.is_empty());
    }
    let body = e.body();
    prop_assert!(body["error"]["message"].is_string(), "{body}");
    Ok(())
}

fn check<T>(r: Result<T, ApiError>) -> Result<Option<T>, TestCaseError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) => refused(&e).map(|()| None),
    }
}

fn generation_case(tally: &Tally, req: &GenerationRequest) -> TestCaseResult {
    if let Some(n) = check(req.choices())? {
        prop_assert!((1..=MAX_CHOICES).contains(&n));
    }
    check(req.refuse_unsupported())?;
    for endpoint in [Endpoint::Completion, Endpoint::Chat] {
        if let Some(s) = check(req.sampling(256, endpoint))? {
            tally.add("valid sampling");
            prop_assert!(s.max_tokens >= 1);
            prop_assert!((0.0..=2.0).contains(&s.temperature));
            prop_assert!(s.top_p > 0.0 && s.top_p <= 1.0);
            prop_assert!(s.top_k.is_none_or(|k| k >= 1));
            prop_assert!(s.stop.len() <= 4 && s.stop.iter().all(|s| !s.is_empty()));
            prop_assert!((-2.0..=2.0).contains(&s.frequency_penalty));
            prop_assert!((-2.0..=2.0).contains(&s.presence_penalty));
            prop_assert!(s.logit_bias.len() <= MAX_LOGIT_BIAS);
            prop_assert!(
                s.logit_bias
                    .iter()
                    .all(|(_, b)| (-100.0..=100.0).contains(b))
            );
            let most = match endpoint {
                Endpoint::Completion => MAX_COMPLETION_LOGPROBS,
                Endpoint::Chat => MAX_TOP_LOGPROBS,
            };
            prop_assert!(s.logprobs.is_none_or(|k| k <= most));
        }
    }
    check(req.prompt())?;
    if let Some(messages) = check(req.messages())? {
        prop_assert!(!messages.is_empty());
        for m in messages {
            prop_assert!(["system", "user", "assistant"].contains(&m.role.as_str()));
        }
    }
    if let Some(model) = check(req.model())?
        && check(ModelRequest::parse(&model, req.merge.clone()))?.is_some()
    {
        tally.add("valid model and merge");
    }
    let _ = req.merge_field();
    Ok(())
}

fn case(tally: &Tally, Bytes(bytes): Bytes) -> TestCaseResult {
    if let Some(req) = check(parse::<GenerationRequest>(&bytes))? {
        tally.add("generation body");
        generation_case(tally, &req)?;
    }
    if let Some(req) = check(parse::<EmbeddingsRequest>(&bytes))? {
        tally.add("embeddings body");
        check(ModelRequest::parse(&req.model, req.merge))?;
        let _ = req.input.into_vec();
    }
    if let Some(req) = check(parse::<ClassifyRequest>(&bytes))? {
        tally.add("classify body");
        check(ModelRequest::parse(&req.model, req.merge))?;
    }
    if let Some(merge) = check(parse::<MergeField>(&bytes))? {
        check(ModelRequest::parse("math+code", Some(merge)))?;
    }
    if let Some(req) = check(parse::<WarmRequest>(&bytes))? {
        check(ModelRequest::parse(&req.model, req.merge))?;
    }
    check(parse::<RegisterRequest>(&bytes))?;
    check(parse::<ReloadRequest>(&bytes))?;
    check(parse::<Feedback>(&bytes))?;
    if let Some(c) = check(parse::<BundleConfig>(&bytes))? {
        let _ = Bundle::from_config(c);
    }
    if let Some(c) = check(parse::<ExperimentConfig>(&bytes))?
        && let Ok(e) = Experiment::from_config(c)
    {
        let arm = e.pick(Some("user"));
        prop_assert!(e.arms.iter().any(|a| a.name == arm.name));
    }
    Ok(())
}

#[test]
fn request_bodies() {
    let tally = Tally::default();
    fuzz(
        "request_json",
        20_000,
        1,
        mutate(prop_oneof![3 => generation(model()), 1 => other_body(model())].boxed()),
        |b| case(&tally, b),
    );
    tally.print("request_json");
}
