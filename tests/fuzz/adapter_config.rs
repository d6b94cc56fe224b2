//! `adapter_config.json`: objects with PEFT's real keys and good, bad and mistyped values,
//! parsed as the reader does (a JSON value, then `AdapterConfig`), queried for every module
//! (targets, rank and alpha patterns, scales, unsupported options) and round-tripped.

use knots::adapters::AdapterConfig;
use proptest::prelude::*;
use proptest::test_runner::TestCaseResult;
use serde_json::Value;

use super::strategies::{
    Gen, field, json_float, json_str, json_value, mutate, object, object_of, pick_str, special_i64,
};
use super::{Bytes, Tally, fuzz};

/// Module paths the config is asked about.
pub const PATHS: &[&str] = &[
    "model.layers.0.self_attn.q_proj",
    "layers.0.v",
    "encoder.layer.3.attention.output.dense",
    "",
];

/// A regular expression or module name, sometimes invalid or costly.
pub fn pattern() -> Gen<String> {
    prop_oneof![
        6 => pick_str(&[
            "q", "v", "q_proj", "v_proj", "layers.0.q", "layers.1.self_attn.v_proj", "dense",
            "attention.output.dense", ".*", ".*\\.(q|v)_proj", "all-linear", "(q|v)",
            "layers\\.0\\..*",
            "^q$", "",
        ]),
        1 => pick_str(&[
            "(", ")", "[", "\\", "*", "a{2,1}", "(?P<x", "(?i)Q", "\\p{Greek}", "a{1000}{1000}",
            "(a*)*b", "((((((((((a))))))))))", "\\b", "$^", "(?-u:\\xff)", "[[:alpha:]]", "\\d+",
            "x{4294967295}",
        ]),
        1 => "[a-z._()|*?\\\\\\[\\]{}0-9^$+-]{0,12}",
        1 => "\\PC{0,8}",
    ]
    .boxed()
}

fn neutral_or_not() -> Gen<String> {
    prop_oneof![
        6 => pick_str(&["false", "null", "[]", "{}"]),
        1 => pick_str(&["true", "\"none\"", "\"all\"", "0", "1", "[1]", "{\"a\":1}", "\"\""]),
    ]
    .boxed()
}

fn uint() -> Gen<String> {
    prop_oneof![
        30 => pick_str(&["1", "2", "4", "8", "16", "64"]),
        3 => special_i64().prop_map(|i| i.to_string()),
        1 => any::<u64>().prop_map(|i| i.to_string()),
        1 => json_float(),
        1 => Just("\"8\"".to_string()),
    ]
    .boxed()
}

fn float() -> Gen<String> {
    prop_oneof![
        20 => json_float(),
        6 => pick_str(&["8", "16", "32", "0", "-1"]),
        1 => Just("\"16\"".to_string()),
    ]
    .boxed()
}

fn boolean() -> Gen<String> {
    prop_oneof![20 => pick_str(&["true", "false"]), 1 => pick_str(&["1", "null", "\"true\""])]
        .boxed()
}

fn patterns(value: Gen<String>) -> Gen<String> {
    prop::collection::vec((pattern(), value), 0..4)
        .prop_map(|kv| object(kv.iter().map(|(k, v)| (k.as_str(), v.as_str()))))
        .boxed()
}

fn names() -> Gen<String> {
    prop::collection::vec(pattern(), 0..4)
        .prop_map(|v| {
            format!(
                "[{}]",
                v.iter().map(|s| json_str(s)).collect::<Vec<_>>().join(",")
            )
        })
        .boxed()
}

/// A config object: mostly PEFT's keys with plausible values.
pub fn config_json() -> Gen<String> {
    let targets = prop_oneof![
        3 => names(),
        2 => pattern().prop_map(|p| json_str(&p)),
    ];
    let mut fields = vec![
        field(
            "peft_type",
            prop_oneof![
                8 => Just("\"LORA\"".to_string()),
                1 => pick_str(&[
                    "\"lora\"", "\"IA3\"", "\"\"", "\"LoRA\"", "\"LORA \"", "1", "null",
                ]),
            ]
            .boxed(),
        ),
        field("r", uint()),
        field("lora_alpha", float()),
        field("target_modules", targets.boxed()),
        field("use_rslora", boolean()),
        field("rank_pattern", patterns(uint())),
        field("alpha_pattern", patterns(float())),
        field("fan_in_fan_out", boolean()),
        field(
            "modules_to_save",
            prop_oneof![names(), Just("null".to_string())].boxed(),
        ),
        field(
            "base_model_name_or_path",
            pick_str(&["\"org/gen-base\"", "\"test/base\"", "null", "\"\""]),
        ),
        field(
            "task_type",
            pick_str(&[
                "\"CAUSAL_LM\"",
                "\"SEQ_CLS\"",
                "\"FEATURE_EXTRACTION\"",
                "null",
            ]),
        ),
        field(
            "bias",
            pick_str(&[
                "\"none\"",
                "\"none\"",
                "\"all\"",
                "\"lora_only\"",
                "null",
                "false",
            ]),
        ),
        field("lora_dropout", float()),
        field("inference_mode", pick_str(&["true", "false"])),
        field("revision", json_value()),
    ];
    for &option in knots::adapters::UNSUPPORTED_OPTIONS {
        fields.push(field(option, neutral_or_not()));
    }
    // The four keys a config needs come first most of the time, so most cases get past them.
    let required = (prop::bool::weighted(0.8), uint(), float(), names());
    (required, object_of(fields, 10))
        .prop_map(|((first, r, alpha, targets), rest)| {
            if !first {
                return rest;
            }
            let head = object([
                ("peft_type", "\"LORA\""),
                ("r", r.as_str()),
                ("lora_alpha", alpha.as_str()),
                ("target_modules", targets.as_str()),
            ]);
            // Later keys of `rest` override these (serde_json keeps the last of a duplicate
            // key in a `Value`).
            match rest.strip_prefix('{') {
                Some("}") => head,
                Some(tail) => format!("{},{tail}", &head[..head.len() - 1]),
                None => rest,
            }
        })
        .boxed()
}

fn case(tally: &Tally, Bytes(bytes): Bytes) -> TestCaseResult {
    let Ok(value) = serde_json::from_slice::<Value>(&bytes) else {
        tally.add("not JSON");
        return Ok(());
    };
    let Ok(config) = serde_json::from_value::<AdapterConfig>(value) else {
        tally.add("not a config");
        return Ok(());
    };
    let unsupported = config.unsupported_option();
    if let Some(reason) = &unsupported {
        prop_assert!(!reason.is_empty());
    }
    for path in PATHS {
        let _ = config.target_modules.matches(path);
        let rank = config.rank_for(path);
        prop_assert!(rank == config.r || config.rank_pattern.values().any(|&r| r == rank));
        let alpha = config.alpha_for(path);
        prop_assert!(
            alpha.to_bits() == config.lora_alpha.to_bits()
                || config
                    .alpha_pattern
                    .values()
                    .any(|a| a.to_bits() == alpha.to_bits())
        );
        let _ = config.scale_for(path);
    }
    // What the reader keeps survives being written back (`write_peft` writes configs), up to
    // serde_json's float parsing, which may be one ulp off without its `float_roundtrip`.
    let fail = |e: serde_json::Error| TestCaseError::fail(e.to_string());
    let written = serde_json::to_vec(&config).map_err(fail)?;
    let again: AdapterConfig = serde_json::from_slice(&written).map_err(fail)?;
    let (a, b) = (
        serde_json::to_value(&again).map_err(fail)?,
        serde_json::to_value(&config).map_err(fail)?,
    );
    prop_assert!(same(&a, &b), "{a} != {b}");
    prop_assert_eq!(again.unsupported_option().is_some(), unsupported.is_some());
    tally.add(if unsupported.is_some() {
        "unsupported"
    } else {
        "accepted"
    });
    Ok(())
}

/// Equal JSON values, floats within a few ulps.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            x == y || (x - y).abs() <= 4.0 * f64::EPSILON * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

#[test]
fn adapter_configs() {
    let tally = Tally::default();
    fuzz("adapter_config", 8_000, 1, mutate(config_json()), |b| {
        case(&tally, b)
    });
    tally.print("adapter_config");
}
