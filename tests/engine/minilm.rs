//! all-MiniLM-L6-v2: sentence embeddings like sentence-transformers, and the PEFT SEQ_CLS
//! `sentiment` adapter's classifier logits like transformers + PEFT.

use std::sync::Arc;

use knots::adapters::LoraAdapter;
use knots::engine::{DEFAULT_TEXT_SCALE, Head, Scope, classify, head_logits};

use super::{max_abs_diff, minilm, reference, reference_json, reference_tensor};

fn sentences(case: &serde_json::Value) -> Vec<String> {
    serde_json::from_value(case["sentences"].clone()).unwrap()
}

#[test]
fn embeddings_match_sentence_transformers() {
    let case = reference_json("minilm/embeddings.json");
    let texts = sentences(&case);
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let encoder = minilm();
    let want_ids: Vec<Vec<u32>> = serde_json::from_value(case["input_ids"].clone()).unwrap();
    assert_eq!(encoder.encode(&texts).unwrap(), want_ids);
    // One padded batch, as a server would run it.
    let ours: Vec<f32> = encoder
        .embed(&texts, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want = reference_tensor("minilm/embeddings.safetensors", "embeddings");
    let diff = max_abs_diff(&ours, &want);
    eprintln!("minilm embeddings max abs diff {diff:e}");
    assert!(diff <= 1e-5, "max abs diff {diff}");
    for (a, b) in ours.chunks(384).zip(want.chunks(384)) {
        let cos: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        assert!(cos >= 0.9999, "cosine {cos}");
    }
}

#[test]
fn sentiment_adapter_logits_match_peft() {
    let case = reference_json("minilm/sentiment_logits.json");
    let texts = sentences(&case);
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let encoder = minilm();
    let adapter = LoraAdapter::load(&reference("minilm/adapters/sentiment")).unwrap();
    let labels = vec!["negative".to_string(), "positive".to_string()];
    let head =
        Head::from_saved("sentiment", &adapter.saved_modules, Some(labels), encoder).unwrap();
    let delta = encoder.load_delta(&Arc::new(adapter.delta())).unwrap();
    assert_eq!(delta.modules(), 12);

    let logits = head_logits(encoder, &[&head], &texts, Some(&delta))
        .unwrap()
        .remove(0);
    let flat: Vec<f32> = logits.concat();
    let want = reference_tensor("minilm/sentiment_logits.safetensors", "logits");
    let diff = max_abs_diff(&flat, &want);
    eprintln!("sentiment logits max abs diff {diff:e}");
    assert!(diff <= 1e-4, "max abs diff {diff}");

    // Without the LoRA the head sees the base pooler output (the reference's debug tensor).
    let off: Vec<f32> = head_logits(encoder, &[&head], &texts, None)
        .unwrap()
        .remove(0)
        .concat();
    let want_off = reference_tensor(
        "minilm/sentiment_logits.safetensors",
        "logits_lora_off_head_on",
    );
    assert!(max_abs_diff(&off, &want_off) <= 1e-4);

    let predicted: Vec<String> = serde_json::from_value(case["predicted"].clone()).unwrap();
    let ranked = classify(
        encoder,
        &[head],
        &Scope::Task("sentiment".into()),
        &texts,
        Some(&delta),
        2,
    )
    .unwrap();
    let ours: Vec<&str> = ranked.iter().map(|r| r[0].label.as_str()).collect();
    assert_eq!(ours, predicted);
    assert!(
        ranked
            .iter()
            .all(|r| (r[0].score + r[1].score - 1.0).abs() < 1e-5)
    );
}

#[test]
fn label_text_heads_score_per_task_and_jointly() {
    let encoder = minilm();
    let topics = Head::from_label_texts(
        "topic",
        vec!["food".into(), "animals".into(), "movies".into()],
        DEFAULT_TEXT_SCALE,
        encoder,
    )
    .unwrap();
    let mood = Head::from_label_texts(
        "mood",
        vec!["happy".into(), "sad".into()],
        DEFAULT_TEXT_SCALE,
        encoder,
    )
    .unwrap();
    let texts = [
        "A man is eating a piece of bread.",
        "A man is riding a horse.",
        "The new movie is awesome.",
    ];
    let heads = [topics, mood];
    let per_task = classify(
        encoder,
        &heads,
        &Scope::Task("topic".into()),
        &texts,
        None,
        1,
    )
    .unwrap();
    let labels: Vec<&str> = per_task.iter().map(|r| r[0].label.as_str()).collect();
    assert_eq!(labels, ["food", "animals", "movies"]);
    let joint = classify(encoder, &heads, &Scope::Joint, &texts, None, 5).unwrap();
    assert!(joint.iter().all(|r| r.len() == 5), "the union has 5 labels");
    assert!(joint[0].iter().any(|s| s.task == "mood"));
    assert!(
        classify(
            encoder,
            &heads,
            &Scope::Task("nope".into()),
            &texts,
            None,
            1
        )
        .is_err()
    );
}
