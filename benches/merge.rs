//! Merge benchmarks on synthetic adapters of real model shapes:
//! - the factored KnOTS SVD of one module (8 rank-16 adapters) against the dense SVD it replaces;
//! - whole-set merges of 8 rank-16 adapters on SmolLM2-135M's attention (30 layers × q, k, v, o).
//!
//! Run with `cargo bench --bench merge`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use knots::adapters::{AdapterDigest, LoraAdapter, LoraModule};
use knots::matrix::Matrix;
use knots::merge::{self, Factors, MergeInput, MergeOptions, MergeParams, Method, Silent, align};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const ADAPTERS: usize = 8;
const RANK: usize = 16;

fn random(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Matrix {
    Matrix::from_fn(rows, cols, |_, _| rng.random_range(-0.05f32..0.05))
}

/// `ADAPTERS` adapters of rank `RANK` over `modules` (path, O, I).
fn adapters(modules: &[(String, usize, usize)]) -> Vec<LoraAdapter> {
    (0..ADAPTERS)
        .map(|i| {
            let mut rng = ChaCha8Rng::seed_from_u64(i as u64);
            let modules: BTreeMap<_, _> = modules
                .iter()
                .map(|(path, o, inp)| {
                    let lora = LoraModule {
                        a: random(&mut rng, RANK, *inp),
                        b: random(&mut rng, *o, RANK),
                        scale: 1.0,
                    };
                    (path.clone(), lora)
                })
                .collect();
            let config = serde_json::from_str(
                r#"{"peft_type":"LORA","r":16,"lora_alpha":16,"target_modules":"all-linear"}"#,
            )
            .expect("static config");
            LoraAdapter {
                name: format!("task_{i}"),
                path: format!("task_{i}").into(),
                config,
                modules,
                saved_modules: BTreeMap::new(),
                task: None,
                digest: AdapterDigest([i as u8; 32]),
            }
        })
        .collect()
}

fn smollm2_attention() -> Vec<(String, usize, usize)> {
    let mut modules = Vec::new();
    for layer in 0..30 {
        for (name, o) in [
            ("q_proj", 576),
            ("k_proj", 192),
            ("v_proj", 192),
            ("o_proj", 576),
        ] {
            modules.push((format!("model.layers.{layer}.self_attn.{name}"), o, 576));
        }
    }
    modules
}

fn factors(set: &[LoraAdapter], module: &str) -> Vec<(Matrix, Matrix)> {
    set.iter()
        .map(|a| (a.modules[module].b.clone(), a.modules[module].a.clone()))
        .collect()
}

fn bench_alignment(c: &mut Criterion) {
    let mut group = c.benchmark_group("align_one_module");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    for (label, o, i) in [
        ("576x576", 576, 576),
        ("4096x4096", 4096, 4096),
        ("14336x4096", 14336, 4096),
    ] {
        let set = adapters(&[("m".to_string(), o, i)]);
        let f = factors(&set, "m");
        let f: Vec<Factors<'_>> = f
            .iter()
            .map(|(b, a)| Factors { b, a, scale: 1.0 })
            .collect();
        group.bench_function(format!("factored_{label}"), |bch| {
            bch.iter(|| align("m", black_box(&f)).expect("svd"))
        });
        if o == 576 {
            let dense = merge::dense_concat(&f);
            group.bench_function(format!("dense_{label}"), |bch| {
                bch.iter(|| black_box(&dense).thin_svd().expect("svd"))
            });
        }
    }
    group.finish();
}

fn bench_merges(c: &mut Criterion) {
    let set = adapters(&smollm2_attention());
    let inputs: Vec<_> = set.iter().map(MergeInput::new).collect();
    let mut group = c.benchmark_group("merge_smollm2_attention_8x16");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(15));
    for method in [
        Method::Ta,
        Method::KnotsTies,
        Method::KnotsDareTies,
        Method::Ties,
        Method::DareTies,
    ] {
        let params = MergeParams::new(method, MergeOptions::default()).expect("defaults are valid");
        group.bench_function(method.as_str(), |b| {
            b.iter(|| merge::merge(black_box(&inputs), &params, &Silent).expect("merge"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_alignment, bench_merges);
criterion_main!(benches);
