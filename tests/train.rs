//! `knots train` internals on the real base models: LoRA gradients against finite differences,
//! loss going down, seeded runs repeating exactly, and the written adapter loading back.

use candle_core::Tensor;
use knots::adapters::LoraAdapter;
use knots::engine::{Encoder, KvCache, TextModel};
use knots::eval::Example;
use knots::labels::{CausalTask, answer_tokens};
use knots::train::{
    Classification, LoraFactors, TrainConfig, batch_gradients, causal_loss, classification_loss,
    train_causal, train_classifier,
};

use crate::engine::{minilm, reference_json, smollm2};

/// The 40 labelled sentences the `polarity` reference adapter was trained on.
fn polarity_examples() -> Vec<Example> {
    let record = reference_json("minilm/adapters/sentiment/training.json");
    serde_json::from_value::<Vec<Example>>(record["data"].clone()).unwrap()
}

fn labels() -> (Vec<String>, Vec<String>) {
    (
        vec!["negative".into(), "positive".into()],
        vec!["a negative sentence".into(), "a positive sentence".into()],
    )
}

fn small_config(steps: usize) -> TrainConfig {
    TrainConfig {
        batch_size: 8,
        max_steps: Some(steps),
        epochs: 10,
        learning_rate: 2e-3,
        ..TrainConfig::encoder_default()
    }
}

/// Central differences of the loss for the entries of one factor with the largest analytic
/// gradient, compared with candle's backward pass.
#[test]
fn lora_gradients_match_finite_differences() {
    let encoder: &Encoder = minilm();
    let registry = encoder.model.registry();
    let cfg = TrainConfig::encoder_default();
    let device = encoder.model.device();
    let factors = LoraFactors::new(registry, &cfg.targets, 4, 4.0, 7, device).unwrap();
    // Non-zero B everywhere, so A's gradient is not zero either.
    for var in factors.vars().iter().skip(1).step_by(2) {
        var.set(&(Tensor::randn(0f32, 0.05, var.shape(), device).unwrap()))
            .unwrap();
    }
    let examples = polarity_examples();
    let texts: Vec<&str> = examples[..4].iter().map(|e| e.text.as_str()).collect();
    let gold: Vec<u32> = examples[..4].iter().map(|e| e.label as u32).collect();
    let (_, label_texts) = labels();
    let label_texts: Vec<&str> = label_texts.iter().map(String::as_str).collect();
    let heads = encoder.embed(&label_texts, None).unwrap();
    let loss_at = |f: &LoraFactors| -> Tensor {
        let delta = f.trainable(registry).unwrap();
        classification_loss(encoder, &delta, &heads, 20.0, &texts, &gold).unwrap()
    };
    let loss = loss_at(&factors);
    let grads = loss.backward().unwrap();
    let h = 1e-2f32;
    let mut checked = 0;
    for (module, factor_b) in [(0, false), (0, true), (5, false), (17, true)] {
        let grad: Vec<f32> = grads
            .get(factors.var(module, factor_b).as_tensor())
            .expect("every factor gets a gradient")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut order: Vec<usize> = (0..grad.len()).collect();
        order.sort_by(|&i, &j| grad[j].abs().total_cmp(&grad[i].abs()));
        for &i in &order[..2] {
            factors.perturb(module, factor_b, i, h).unwrap();
            let up = loss_at(&factors).to_scalar::<f32>().unwrap();
            factors.perturb(module, factor_b, i, -2.0 * h).unwrap();
            let down = loss_at(&factors).to_scalar::<f32>().unwrap();
            factors.perturb(module, factor_b, i, h).unwrap();
            let numeric = (up - down) / (2.0 * h);
            let rel = (numeric - grad[i]).abs() / grad[i].abs().max(1e-4);
            eprintln!(
                "module {module} {} [{i}]: analytic {:e} numeric {numeric:e} rel {rel:.2e}",
                if factor_b { "B" } else { "A" },
                grad[i]
            );
            assert!(
                rel < 0.05,
                "gradient mismatch: analytic {} numeric {numeric}",
                grad[i]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 8);
}

/// A batch split into micro-batches of 1 and 2 examples gives the loss and gradients of one
/// pass over the whole batch.
#[test]
fn micro_batches_sum_to_the_batch_gradient() {
    let encoder: &Encoder = minilm();
    let registry = encoder.model.registry();
    let device = encoder.model.device();
    let factors = LoraFactors::new(registry, &["query".to_string()], 4, 4.0, 3, device).unwrap();
    for var in factors.vars().iter().skip(1).step_by(2) {
        var.set(&(Tensor::randn(0f32, 0.05, var.shape(), device).unwrap()))
            .unwrap();
    }
    let examples = polarity_examples();
    let (_, label_texts) = labels();
    let label_texts: Vec<&str> = label_texts.iter().map(String::as_str).collect();
    let heads = encoder.embed(&label_texts, None).unwrap();
    let mut loss = |delta: &knots::engine::LoadedDelta, batch: &[usize]| {
        let texts: Vec<&str> = batch.iter().map(|&i| examples[i].text.as_str()).collect();
        let gold: Vec<u32> = batch.iter().map(|&i| examples[i].label as u32).collect();
        classification_loss(encoder, delta, &heads, 20.0, &texts, &gold)
    };
    let vars = factors.vars();
    let delta = factors.trainable(registry).unwrap();
    let batch = [0, 5, 11, 23, 31];
    let (whole, whole_grads) = batch_gradients(&vars, &delta, &batch, 5, &mut loss).unwrap();
    for micro in [1, 2] {
        let (value, grads) = batch_gradients(&vars, &delta, &batch, micro, &mut loss).unwrap();
        assert!(
            (value - whole).abs() < 1e-5,
            "micro {micro}: loss {value} vs {whole}"
        );
        for var in &vars {
            let a = grads
                .get(var.as_tensor())
                .expect("every factor gets a gradient");
            let b = whole_grads.get(var.as_tensor()).unwrap();
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            let scale = b.abs().unwrap().max_all().unwrap();
            let (diff, scale) = (
                diff.to_scalar::<f32>().unwrap(),
                scale.to_scalar::<f32>().unwrap(),
            );
            assert!(scale > 0.0, "the gradient is not trivially zero");
            assert!(
                diff <= 1e-4 * scale,
                "micro {micro}: gradient differs by {diff} (scale {scale})"
            );
        }
    }
}

#[test]
fn classifier_training_lowers_the_loss_and_repeats_with_its_seed() {
    let encoder = minilm();
    let examples = polarity_examples();
    let (train, val) = examples.split_at(32);
    let (labels, label_texts) = labels();
    let task = Classification {
        task: "polarity",
        labels: &labels,
        label_texts: &label_texts,
        train,
        val,
    };
    let cfg = small_config(8);
    let (factors, record) =
        train_classifier(encoder, "all-minilm-l6-v2", &task, &cfg, &mut |_| {}).unwrap();
    assert_eq!(record.loss_curve.len(), 8);
    let first: f32 = record.loss_curve[..2].iter().sum::<f32>() / 2.0;
    let last: f32 = record.loss_curve[6..].iter().sum::<f32>() / 2.0;
    eprintln!(
        "loss {first} -> {last}, val accuracy {} (base {})",
        record.val_accuracy, record.base_val_accuracy
    );
    assert!(
        last < 0.8 * first,
        "loss did not fall: {:?}",
        record.loss_curve
    );
    assert!(record.val_accuracy >= record.base_val_accuracy);

    let (_, again) =
        train_classifier(encoder, "all-minilm-l6-v2", &task, &cfg, &mut |_| {}).unwrap();
    assert_eq!(again.loss_curve, record.loss_curve, "same seed, same run");

    // The export is a PEFT adapter our reader loads, with the same update.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("polarity");
    let delta = factors.to_delta().unwrap();
    knots::adapters::write_peft(&delta, &out, &Default::default()).unwrap();
    let read = LoraAdapter::load(&out).unwrap().delta();
    assert_eq!(read.modules.len(), 24);
    for (module, d) in &delta.modules {
        let (a, b) = (d.to_dense(), read.modules[module].to_dense());
        let err = a
            .as_slice()
            .iter()
            .zip(b.as_slice())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-6, "{module}: {err}");
    }
}

#[test]
fn causal_training_lowers_the_label_word_loss() {
    let model: &TextModel = smollm2();
    let examples = polarity_examples();
    let train: Vec<Example> = examples.iter().step_by(5).cloned().collect();
    let words = vec!["negative".to_string(), "positive".to_string()];
    let task = CausalTask {
        task: "polarity",
        prompt: "Is this sentence negative or positive? Answer with one word.\n{text}",
        label_words: &words,
        train: &train,
        val: &train[..2],
    };
    let answers = answer_tokens(model, &words).unwrap();
    assert_ne!(answers[0], answers[1]);
    let cfg = TrainConfig {
        batch_size: 4,
        max_steps: Some(3),
        epochs: 4,
        learning_rate: 2e-3,
        ..TrainConfig::causal_default()
    };
    let (factors, record) =
        train_causal(model, "smollm2-135m-instruct", &task, &cfg, &mut |_| {}).unwrap();
    eprintln!("causal loss curve {:?}", record.loss_curve);
    let refs: Vec<&Example> = train.iter().collect();
    let before = {
        let zero = LoraFactors::new(
            model.model.registry(),
            &cfg.targets,
            8,
            16.0,
            0,
            model.model.device(),
        )
        .unwrap();
        let delta = zero.trainable(model.model.registry()).unwrap();
        causal_loss(model, &delta, &task, &answers, &refs)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let delta = factors.trainable(model.model.registry()).unwrap();
    let after = causal_loss(model, &delta, &task, &answers, &refs)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(after < before, "loss {before} -> {after}");

    // The differentiable forward and the inference forward of the exported update agree.
    let registry = model.model.registry();
    let exported = registry
        .convert(&factors.to_delta().unwrap(), model.model.device())
        .unwrap();
    let ids = model.encode_plain("The weather today is").unwrap();
    let logits = |d: &knots::engine::LoadedDelta| -> Vec<f32> {
        let out = model
            .model
            .forward(&ids, &mut KvCache::default(), Some(d))
            .unwrap();
        out.to_vec1().unwrap()
    };
    let diff = crate::engine::max_abs_diff(&logits(&delta), &logits(&exported));
    eprintln!("training vs inference forward: max abs diff {diff:e}");
    assert!(
        diff < 1e-3,
        "training and inference forwards differ by {diff}"
    );
}
