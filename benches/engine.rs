//! Engine throughput on this machine: SmolLM2 prefill and decode tokens/s for the base model,
//! one adapter (`shout`) and an 8-adapter knots-ties delta of rank 128, and MiniLM sentences/s
//! at batch 32. Needs `make models`. Run: `cargo bench --bench engine`.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use knots::adapters::LoraAdapter;
use knots::engine::{Encoder, SamplingParams, TextModel, generate, resolve};
use knots::matrix::Matrix;
use knots::merge::{MergeInput, MergeOptions, MergeParams, MergedDelta, Method, Silent, merge};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Eight rank-16 adapters on q, k, v, o of every layer, shaped like `shout`.
fn eight_adapters(template: &LoraAdapter) -> Vec<LoraAdapter> {
    (0..8u64)
        .map(|i| {
            let mut rng = ChaCha8Rng::seed_from_u64(i);
            let mut a = template.clone();
            a.name = format!("synthetic-{i}");
            let modules: BTreeMap<_, _> = a
                .modules
                .iter()
                .map(|(path, m)| {
                    let (o, inp) = m.shape();
                    let mut m = m.clone();
                    m.a = Matrix::from_fn(16, inp, |_, _| rng.random_range(-0.05..0.05));
                    m.b = Matrix::from_fn(o, 16, |_, _| rng.random_range(-0.05..0.05));
                    (path.clone(), m)
                })
                .collect();
            a.modules = modules;
            a
        })
        .collect()
}

fn run_generation(model: &TextModel, name: &str, delta: Option<Arc<MergedDelta>>) {
    let loaded = delta.map(|d| model.load_delta(&d).expect("delta"));
    let prompt = model
        .encode_plain(&"The history of the city of Paris begins ".repeat(8))
        .expect("prompt");
    let params = SamplingParams {
        max_tokens: 64,
        ..SamplingParams::default()
    };
    // Warm-up, then the measured run.
    let _ = generate(
        &model.model,
        &model.tokenizer,
        &prompt,
        &params,
        loaded.as_deref(),
        |_| ControlFlow::Continue(()),
    );
    let out = generate(
        &model.model,
        &model.tokenizer,
        &prompt,
        &params,
        loaded.as_deref(),
        |_| ControlFlow::Continue(()),
    )
    .expect("generate");
    let decoded = out.ids.len().saturating_sub(1);
    println!(
        "smollm2 {name:<28} prefill {:>4} tok {:>7.1} tok/s   decode {:>3} tok {:>6.1} tok/s",
        out.prompt_tokens,
        out.prompt_tokens as f64 / out.prefill_secs,
        decoded,
        decoded as f64 / out.decode_secs
    );
}

fn main() {
    let models = root().join("models");
    let text = TextModel::load(
        &resolve("smollm2-135m-instruct", &models).expect("model"),
        &Device::Cpu,
    )
    .expect("load");
    let shout_dir = root().join("tests/fixtures/model-reference/smollm2/adapters/shout");
    let shout = LoraAdapter::load(&shout_dir).expect("shout");
    run_generation(&text, "base", None);
    run_generation(&text, "one adapter (r=8)", Some(Arc::new(shout.delta())));
    let adapters = eight_adapters(&shout);
    let inputs: Vec<MergeInput<'_>> = adapters.iter().map(MergeInput::new).collect();
    let params = MergeParams::new(Method::KnotsTies, MergeOptions::default()).expect("params");
    let started = Instant::now();
    let merged = merge(&inputs, &params, &Silent).expect("merge");
    let rank = merged
        .modules
        .values()
        .filter_map(|m| m.rank())
        .max()
        .unwrap_or(0);
    println!(
        "knots-ties merge of 8 rank-16 adapters: {:.2} s, rank {rank}",
        started.elapsed().as_secs_f64()
    );
    run_generation(
        &text,
        "8-adapter knots-ties (r=128)",
        Some(Arc::new(merged)),
    );

    let encoder = Encoder::load(
        &resolve("all-minilm-l6-v2", &models).expect("model"),
        &Device::Cpu,
    )
    .expect("load");
    let base = [
        "A man is eating food.",
        "The girl is carrying a baby.",
        "Two men pushed carts through the woods.",
        "The new movie is awesome and everyone should see it this weekend.",
    ];
    let batch: Vec<&str> = base.iter().cycle().take(32).copied().collect();
    let _ = encoder.embed(&batch, None);
    let rounds = 10;
    let started = Instant::now();
    for _ in 0..rounds {
        encoder.embed(&batch, None).expect("embed");
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "minilm batch 32: {:.1} sentences/s ({:.1} ms per batch)",
        (32 * rounds) as f64 / secs,
        secs * 1000.0 / rounds as f64
    );
}
