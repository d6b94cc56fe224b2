//! Merge benchmarks on synthetic adapters of real model shapes:
//! - the factored KnOTS SVD of one module (8 rank-16 adapters) against the dense SVD it replaces;
//! - whole-set merges of 8 rank-16 adapters on SmolLM2-135M's attention (30 layers × q, k, v, o);
//! - 8 rank-16 adapters on ViT-L/14's attention (96 modules of 1024 × 1024): KnOTS-TIES and every
//!   Core Space method, cold and again with a warm alignment cache, and `knots merge` end to end
//!   (read the PEFT files, merge, write a PEFT adapter);
//! - `knots merge` end to end on 6 rank-16 adapters at Llama-3-8B's attention shapes, one timed
//!   run per method with its peak resident memory (only when the filter names `llama3`).
//!
//! - the shared merge store: computing a merge against fetching it (read, verify, decode) from a
//!   directory store, or an S3 store named by `KNOTS_BENCH_S3` (`s3://bucket/prefix`, with the
//!   `AWS_*` variables), for SmolLM2-sized sets and a Llama-3-8B-shaped one (only when the
//!   filter names `store`).
//!
//! Run with `cargo bench --bench merge` (or `-- vit_l14`, `-- llama3`, `-- store`).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use knots::adapters::{AdapterDigest, ExportInfo, LoraAdapter, LoraModule, write_peft};
use knots::cli::merge::{Format, MergeArgs, MergeFlags};
use knots::matrix::Matrix;
use knots::merge::{
    self, AlignmentCache, Factors, MergeInput, MergeKey, MergeOptions, MergeParams, MergedDelta,
    Method, ModuleDelta, Silent, align,
};
use knots::server::backend::{BaseInfo, BaseKind};
use knots::server::merge_store::MergeStore;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The allocator of the `knots` binary (src/main.rs), so the numbers are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ADAPTERS: usize = 8;
const RANK: usize = 16;

/// The methods timed at ViT-L/14 and Llama-3-8B shapes.
const LARGE_METHODS: [Method; 7] = [
    Method::KnotsTies,
    Method::CoreTa,
    Method::CoreTies,
    Method::CoreDareTies,
    Method::CoreTsv,
    Method::CoreIsoC,
    Method::CoreIsoCts,
];

fn random(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Matrix {
    Matrix::from_fn(rows, cols, |_, _| rng.random_range(-0.05f32..0.05))
}

/// `ADAPTERS` adapters of rank `RANK` over `modules` (path, O, I).
fn adapters(modules: &[(String, usize, usize)]) -> Vec<LoraAdapter> {
    adapters_n(ADAPTERS, modules)
}

/// `count` adapters of rank `RANK` over `modules` (path, O, I).
fn adapters_n(count: usize, modules: &[(String, usize, usize)]) -> Vec<LoraAdapter> {
    (0..count)
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

/// Attention projections `(name, O)` of `layers` layers with input width `width`.
fn attention(
    layers: usize,
    width: usize,
    projections: &[(&str, usize)],
) -> Vec<(String, usize, usize)> {
    let mut modules = Vec::new();
    for layer in 0..layers {
        for &(name, o) in projections {
            modules.push((format!("model.layers.{layer}.self_attn.{name}"), o, width));
        }
    }
    modules
}

fn smollm2_attention() -> Vec<(String, usize, usize)> {
    let p = [
        ("q_proj", 576),
        ("k_proj", 192),
        ("v_proj", 192),
        ("o_proj", 576),
    ];
    attention(30, 576, &p)
}

/// ViT-L/14: 24 layers, q, k, v and out of 1024 × 1024.
fn vit_l14_attention() -> Vec<(String, usize, usize)> {
    let p = [
        ("q_proj", 1024),
        ("k_proj", 1024),
        ("v_proj", 1024),
        ("o_proj", 1024),
    ];
    attention(24, 1024, &p)
}

/// Llama-3-8B: 32 layers, q and o 4096 × 4096, k and v 1024 × 4096 (grouped-query attention).
fn llama3_8b_attention() -> Vec<(String, usize, usize)> {
    let p = [
        ("q_proj", 4096),
        ("k_proj", 1024),
        ("v_proj", 1024),
        ("o_proj", 4096),
    ];
    attention(32, 4096, &p)
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

/// Cold merges, merges with the alignment already cached, and `knots merge` end to end.
fn bench_vit_l14(c: &mut Criterion) {
    let set = adapters(&vit_l14_attention());
    let inputs: Vec<_> = set.iter().map(MergeInput::new).collect();
    let mut group = c.benchmark_group("vit_l14_attention_8x16");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    for method in LARGE_METHODS {
        let params = MergeParams::new(method, MergeOptions::default()).expect("defaults are valid");
        group.bench_function(format!("cold/{method}"), |b| {
            b.iter(|| merge::merge(black_box(&inputs), &params, &Silent).expect("merge"))
        });
        // Another λ: only what follows the alignment (and, for KnOTS-TIES, the trim) runs
        // again.
        let other = MergeParams {
            lambda: 0.7,
            ..params
        };
        // A new density on every merge as well: TIES selects its trim thresholds again.
        for retrim in [false, true] {
            if retrim && !method.uses_ties() {
                continue;
            }
            let name = if retrim { "cached_density" } else { "cached" };
            group.bench_function(format!("{name}/{method}"), |b| {
                // Filled here, so a filter that skips this benchmark skips the merge too.
                let cache = AlignmentCache::new(4 << 30);
                merge::merge_cached(&inputs, &params, &Silent, Some(&cache)).expect("merge");
                let mut density = 0.3;
                b.iter(|| {
                    let mut changed = other;
                    if retrim {
                        density += 1e-6;
                        changed.density = density;
                    }
                    merge::merge_cached(black_box(&inputs), &changed, &Silent, Some(&cache))
                        .expect("merge")
                })
            });
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let paths = write_adapters(&set, dir.path());
    drop(set);
    for method in LARGE_METHODS {
        let out = dir.path().join("merged");
        group.bench_function(format!("end_to_end/{method}"), |b| {
            b.iter(|| {
                let _ = std::fs::remove_dir_all(&out);
                knots::cli::merge::run(&merge_args(&paths, &out, method)).expect("knots merge")
            })
        });
    }
    group.finish();
}

/// `knots merge` end to end at Llama-3-8B's attention shapes: one run per method, with the
/// process's peak resident memory during it (run alone: `cargo bench --bench merge -- llama3`).
fn bench_llama3(_: &mut Criterion) {
    if !std::env::args().skip(1).any(|a| a.contains("llama3")) {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let paths = write_adapters(&adapters_n(6, &llama3_8b_attention()), dir.path());
    println!("llama3_8b_attention_6x16: knots merge end to end, one run each");
    for method in LARGE_METHODS {
        let out = dir.path().join("merged");
        let _ = std::fs::remove_dir_all(&out);
        reset_peak_memory();
        let started = Instant::now();
        knots::cli::merge::run(&merge_args(&paths, &out, method)).expect("knots merge");
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "  {:<16} {seconds:6.2} s   peak resident {:5.2} GB",
            method.as_str(),
            peak_memory_bytes() as f64 / 1e9
        );
    }
}

/// Merge compute time against store fetch time (run alone: `cargo bench --bench merge -- store`).
fn bench_store(_: &mut Criterion) {
    if !std::env::args().skip(1).any(|a| a.contains("store")) {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut stores = vec![format!("file://{}", dir.path().display())];
    stores.extend(std::env::var("KNOTS_BENCH_S3").ok());
    let base = BaseInfo {
        id: "base".into(),
        kind: BaseKind::Generator,
        context_length: 1,
        aliases: Vec::new(),
        weights: Vec::new(),
    };
    let cases = [
        (
            "smollm2_attention_8x16",
            adapters(&smollm2_attention()),
            Method::KnotsTies,
        ),
        (
            "smollm2_attention_8x16",
            adapters(&smollm2_attention()),
            Method::Ties,
        ),
        (
            "llama3_8b_attention_6x16",
            adapters_n(6, &llama3_8b_attention()),
            Method::KnotsTies,
        ),
    ];
    println!("merge store: compute vs fetch (fetch: median of 5)");
    for (shape, set, method) in cases {
        let inputs: Vec<_> = set.iter().map(MergeInput::new).collect();
        let params = MergeParams::new(method, MergeOptions::default()).expect("defaults are valid");
        let started = Instant::now();
        let delta = std::sync::Arc::new(merge::merge(&inputs, &params, &Silent).expect("merge"));
        let compute = started.elapsed().as_secs_f64();
        let members = set.iter().map(|a| (a.name.clone(), a.digest, 1.0));
        let key = MergeKey::new("base", members, &params).expect("key");
        for uri in &stores {
            let store = MergeStore::open(uri, std::slice::from_ref(&base)).expect("store");
            runtime
                .block_on(store.save(&key, delta.clone(), compute * 1e3))
                .expect("save");
            let mut times: Vec<f64> = (0..5)
                .map(|_| {
                    let started = Instant::now();
                    let fetched = runtime.block_on(store.fetch(&key)).expect("fetch");
                    let seconds = started.elapsed().as_secs_f64();
                    assert!(fetched.is_some_and(|f| f.delta == *delta));
                    seconds
                })
                .collect();
            times.sort_by(f64::total_cmp);
            println!(
                "  {shape:<26} {:<10} {:>7.1} MB  compute {compute:7.3} s  fetch {:7.3} s ({:.0}x)  {}",
                method.as_str(),
                delta.bytes() as f64 / 1e6,
                times[2],
                compute / times[2],
                uri.split(':').next().unwrap_or(""),
            );
        }
    }
}

fn merge_args(paths: &[PathBuf], out: &Path, method: Method) -> MergeArgs {
    MergeArgs {
        adapters: paths.to_vec(),
        out: out.to_path_buf(),
        merge: MergeFlags {
            method: Some(method),
            ..MergeFlags::default()
        },
        weights: None,
        format: Format::Peft,
        rank: None,
    }
}

/// Writes each adapter as PEFT files under `dir` and returns their directories.
fn write_adapters(set: &[LoraAdapter], dir: &Path) -> Vec<PathBuf> {
    set.iter()
        .map(|adapter| {
            let modules = adapter
                .modules
                .iter()
                .map(|(path, m)| {
                    let b = m.b.clone();
                    (path.clone(), ModuleDelta::LowRank { b, a: m.a.clone() })
                })
                .collect();
            let path = dir.join(&adapter.name);
            let info = ExportInfo {
                base_model_name_or_path: None,
                task_type: None,
                fan_in_fan_out: false,
                records: Vec::new(),
            };
            write_peft(&MergedDelta { modules }, &path, &info).expect("write adapter");
            path
        })
        .collect()
}

/// Resets the kernel's high-water mark of this process's resident memory.
fn reset_peak_memory() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_memory_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

criterion_group!(
    benches,
    bench_alignment,
    bench_merges,
    bench_vit_l14,
    bench_llama3,
    bench_store
);
criterion_main!(benches);
