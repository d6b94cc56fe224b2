//! SmolLM2-135M-Instruct from the packaged GGUF: weights, tokenizer, chat template, logits and
//! greedy continuations, base and with the PEFT `shout` adapter.

use std::sync::Arc;

use candle_core::Device;
use knots::adapters::LoraAdapter;
use knots::engine::{
    FinishReason, GgufFile, KvCache, Message, SamplingParams, TextTokenizer, WeightFormat, argmax,
    generate,
};
use knots::merge::MergedDelta;
use serde_json::Value;

use super::{max_abs_diff, model_path, reference, reference_json, reference_tensor, smollm2};

const LOGIT_TOL: f32 = 1e-2;

fn gguf_path() -> std::path::PathBuf {
    match model_path("smollm2-135m-instruct") {
        knots::engine::ModelPath::Gguf(p) => p,
        other => panic!("expected a GGUF, got {other:?}"),
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn gguf_weights_match_probes_after_unpermuting() {
    let gguf = GgufFile::open(&gguf_path()).unwrap();
    let cfg = gguf.llama_config().unwrap();
    assert_eq!(
        (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim()),
        (9, 3, 64)
    );
    assert_eq!(cfg.rope_theta(), 100_000.0);
    assert!(cfg.tie_word_embeddings);
    let store = gguf
        .load_weights(&cfg, &Device::Cpu, WeightFormat::F32)
        .unwrap();
    let probes = reference_json("smollm2/weight_probes.json");
    for (name, probe) in probes["hf_layout"].as_object().unwrap() {
        let t = store.get_any(name).unwrap();
        let shape: Vec<usize> = probe["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.dims(), &shape[..], "{name}");
        let flat: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = probe["first_8"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert!(max_abs_diff(&flat[..8], &want) <= 1e-6, "{name} first_8");
        if let Some(rows) = probe["rows_first_8"].as_object() {
            let cols = shape[1];
            for (row, want) in rows {
                let r: usize = row.parse().unwrap();
                let want: Vec<f32> = want
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect();
                assert!(
                    max_abs_diff(&flat[r * cols..r * cols + 8], &want) <= 1e-6,
                    "{name} row {r}"
                );
            }
        }
    }
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
    ] {
        let full = reference_tensor("smollm2/weight_probes.safetensors", name);
        let ours: Vec<f32> = store
            .get_any(name)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(max_abs_diff(&ours, &full) <= 1e-6, "{name} full matrix");
    }
}

#[test]
fn gguf_tokenizer_matches_reference_ids() {
    let gguf = GgufFile::open(&gguf_path()).unwrap();
    let tok = TextTokenizer::from_gguf(&gguf).unwrap();
    assert_eq!(tok.eos_ids, vec![2]);
    for case in reference_json("smollm2/tokenizer_cases.json")
        .as_array()
        .unwrap()
    {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&case["ids"]),
            "{text:?}"
        );
        assert_eq!(tok.decode(&ids(&case["ids"])).unwrap(), text);
    }
}

#[test]
fn chat_template_renders_the_reference_prompt() {
    let case = reference_json("smollm2/base_chat_1.json");
    let model = smollm2();
    let messages: Vec<Message> =
        serde_json::from_value(case["prompt"]["messages"].clone()).unwrap();
    assert_eq!(
        model.chat.render(&messages).unwrap(),
        case["rendered_text"].as_str().unwrap()
    );
    assert_eq!(
        model.encode_chat(&messages).unwrap(),
        ids(&case["input_ids"])
    );
}

/// Checks final logits and the greedy continuation of one reference case.
fn check_case(name: &str, delta: Option<Arc<MergedDelta>>) {
    let case = reference_json(&format!("smollm2/{name}.json"));
    let model = smollm2();
    let prompt = ids(&case["input_ids"]);
    let rendered = case["rendered_text"].as_str().unwrap();
    assert_eq!(model.tokenizer.encode(rendered, false).unwrap(), prompt);
    let loaded = delta.map(|d| model.load_delta(&d).unwrap());
    let logits: Vec<f32> = model
        .model
        .forward(&prompt, &mut KvCache::default(), loaded.as_deref())
        .unwrap()
        .to_vec1()
        .unwrap();
    let want = reference_tensor(&format!("smollm2/{name}.safetensors"), "final_logits");
    let diff = max_abs_diff(&logits, &want);
    eprintln!("{name}: final logits max abs diff {diff:e}");
    assert!(diff <= LOGIT_TOL, "{name}: max abs diff {diff}");
    assert_eq!(
        argmax(&logits) as u64,
        case["final_logits_argmax"].as_u64().unwrap()
    );

    let greedy = &case["greedy"];
    let want_ids = ids(&greedy["new_ids"]);
    let gaps: Vec<f64> = greedy["top2_logit_gap_per_step"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_f64().unwrap())
        .collect();
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: greedy["max_new_tokens"].as_u64().unwrap() as usize,
        ..SamplingParams::default()
    };
    let mut streamed = Vec::new();
    let out = generate(
        &model.model,
        &model.tokenizer,
        &prompt,
        &params,
        loaded.as_deref(),
        |ev| {
            streamed.extend(ev.id);
            std::ops::ControlFlow::Continue(())
        },
    )
    .unwrap();
    // Identical up to the first near-tie (gap below 2 × the logit tolerance), per the README.
    let sure = gaps
        .iter()
        .position(|g| *g < 2.0 * f64::from(LOGIT_TOL))
        .unwrap_or(gaps.len());
    assert_eq!(
        out.ids[..sure.min(out.ids.len())],
        want_ids[..sure],
        "{name}: greedy ids"
    );
    if sure == gaps.len() {
        assert_eq!(out.ids, want_ids, "{name}");
        let eos = greedy["stopped_at_eos"].as_bool().unwrap();
        assert_eq!(
            out.finish,
            if eos {
                FinishReason::Eos
            } else {
                FinishReason::Length
            }
        );
    }
    let text_ids: Vec<u32> = out
        .ids
        .iter()
        .copied()
        .filter(|id| !model.tokenizer.eos_ids.contains(id))
        .collect();
    assert_eq!(streamed, text_ids, "every token except EOS is streamed");
}

#[test]
fn base_plain_prompt_matches_reference() {
    check_case("base_plain_1", None);
}

#[test]
fn base_chat_prompt_matches_reference() {
    check_case("base_chat_1", None);
}

#[test]
fn shout_adapter_matches_peft_reference() {
    let adapter = LoraAdapter::load(&reference("smollm2/adapters/shout")).unwrap();
    check_case("shout_chat_1", Some(Arc::new(adapter.delta())));
}

#[test]
fn chat_generation_streams_text_and_honours_stop_sequences() {
    let model = smollm2();
    let prompt = model
        .encode_chat(&[Message::user("What is the capital of France?")])
        .unwrap();
    let params = SamplingParams {
        max_tokens: 12,
        stop: vec![" of".into()],
        ..SamplingParams::default()
    };
    let mut streamed = String::new();
    let out = generate(
        &model.model,
        &model.tokenizer,
        &prompt,
        &params,
        None,
        |ev| {
            streamed.push_str(ev.text);
            std::ops::ControlFlow::Continue(())
        },
    )
    .unwrap();
    // Greedy text is "The capital of France is Paris."; the stop sequence cuts it.
    assert_eq!(out.finish, FinishReason::Stop);
    assert_eq!(out.text, "The capital");
    assert_eq!(streamed, out.text);
}

#[test]
fn cancelled_generation_and_oversized_prompts() {
    let model = smollm2();
    let prompt = model.encode_plain("The capital of France is").unwrap();
    let params = SamplingParams {
        max_tokens: 20,
        temperature: 0.8,
        top_p: 0.9,
        top_k: Some(40),
        seed: Some(7),
        ..SamplingParams::default()
    };
    let mut n = 0;
    let out = generate(
        &model.model,
        &model.tokenizer,
        &prompt,
        &params,
        None,
        |_| {
            n += 1;
            if n == 3 {
                std::ops::ControlFlow::Break(())
            } else {
                std::ops::ControlFlow::Continue(())
            }
        },
    )
    .unwrap();
    assert_eq!((out.finish, out.ids.len()), (FinishReason::Cancelled, 3));
    let short = SamplingParams {
        max_tokens: 6,
        ..params.clone()
    };
    let run = || {
        generate(
            &model.model,
            &model.tokenizer,
            &prompt,
            &short,
            None,
            |_| std::ops::ControlFlow::Continue(()),
        )
        .unwrap()
        .ids
    };
    assert_eq!(run(), run(), "same seed, same tokens");

    let long = vec![504u32; model.model.context_length() + 1];
    let err = generate(&model.model, &model.tokenizer, &long, &short, None, |_| {
        std::ops::ControlFlow::Continue(())
    })
    .unwrap_err();
    assert!(
        matches!(err, knots::engine::EngineError::PromptTooLong { .. }),
        "{err}"
    );
}

/// `knots logits` (what scripts/gpu_check.sh compares across devices) gives the reference's
/// final logits and greedy tokens, on the serving engine's step path.
#[test]
fn the_logits_command_matches_the_reference() {
    let case = reference_json("smollm2/base_plain_1.json");
    let prompt: Vec<String> = ids(&case["input_ids"]).iter().map(u32::to_string).collect();
    let want_ids = ids(&case["greedy"]["new_ids"]);
    let greedy = want_ids.len().min(8);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_knots"))
        .args(["logits", "--model"])
        .arg(gguf_path())
        .args(["--dtype", "f32", "--greedy", &greedy.to_string()])
        .args(["--prompt-ids", &prompt.join(",")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let logits: Vec<f32> = json["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let want = reference_tensor("smollm2/base_plain_1.safetensors", "final_logits");
    let diff = max_abs_diff(&logits, &want);
    assert!(diff <= LOGIT_TOL, "max abs diff {diff}");
    let gaps = case["greedy"]["top2_logit_gap_per_step"]
        .as_array()
        .unwrap();
    let sure = gaps
        .iter()
        .position(|g| g.as_f64().unwrap() < 2.0 * f64::from(LOGIT_TOL))
        .unwrap_or(gaps.len())
        .min(greedy);
    assert_eq!(ids(&json["greedy_ids"])[..sure], want_ids[..sure]);
    assert!(json["decode_tokens_per_sec"].as_f64().unwrap() > 0.0);
}
