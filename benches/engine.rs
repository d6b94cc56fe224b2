//! Engine throughput on this machine: SmolLM2 prefill and decode tokens/s for the base model,
//! one adapter (`shout`) and an 8-adapter knots-ties delta of rank 128, and MiniLM sentences/s
//! at batch 32; then the serving engine in process (no HTTP): aggregate decode tokens/s of 1 and
//! 16 concurrent sequences on the quantized base, alone and over 8 adapters. Needs `make models`.
//! Run: `cargo bench --bench engine` (`-- batched` runs only the engine part, and
//! `-- batched NAME` one run of it: `base 1`, `base 16`, `adapter 1`, `adapters 16`, and the
//! serving benchmark's two mixes `sets 16` and `low-rank 16`; `-- pair A B [ROUNDS]` alternates
//! two of them in rounds and reports the median ratio; `-- peak` measures this CPU's int8
//! multiply-add peak, which bounds the quantized projections).

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use candle_core::Device;
use knots::adapters::LoraAdapter;
use knots::engine::{
    Done, Encoder, Engine, EngineError, EngineLimits, Job, LoadedDelta, SamplingParams, Sink,
    TextModel, TokenLogprob, WeightFormat, generate, resolve,
};
use knots::matrix::Matrix;
use knots::merge::{MergeInput, MergeOptions, MergeParams, MergedDelta, Method, Silent, merge};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The allocator of the `knots` binary (src/main.rs), so the numbers are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

/// Counts a job's tokens and reports its end.
struct Counting {
    tokens: Arc<AtomicUsize>,
    done: mpsc::Sender<()>,
}

impl Sink for Counting {
    fn token(&mut self, _: &str, _: Option<TokenLogprob>) -> bool {
        self.tokens.fetch_add(1, Ordering::Relaxed);
        true
    }
    fn closed(&self) -> bool {
        false
    }
    fn done(self: Box<Self>, _: Done) {
        let _ = self.done.send(());
    }
    fn failed(self: Box<Self>, error: EngineError) {
        panic!("job failed: {error}");
    }
}

/// A load for the engine in process: `clients` closed-loop clients, client `i` with
/// `deltas[i % len]` (none when empty).
struct Mix {
    label: &'static str,
    clients: usize,
    deltas: Vec<Arc<LoadedDelta>>,
}

/// Aggregate decode tokens/s of `mix`'s clients, each sending 64-token greedy requests for
/// `secs` seconds after one warm-up round; printed and returned.
fn run_engine(model: &Arc<TextModel>, mix: &Mix, secs: f64) -> f64 {
    let (name, clients, deltas) = (mix.label, mix.clients, &mix.deltas);
    let engine = Engine::start(model.clone(), EngineLimits::default());
    let prompts: Vec<Vec<u32>> = [
        "The history of the city of Paris begins",
        "Write a short poem about the sea.",
        "Explain how a bicycle works.",
        "List three facts about the Moon.",
    ]
    .iter()
    .map(|p| model.encode_plain(p).expect("prompt"))
    .collect();
    let tokens = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    let submit = |i: usize, round: usize| {
        let params = SamplingParams {
            max_tokens: 64,
            ..SamplingParams::default()
        };
        let job = Job {
            tenant: format!("client-{i}"),
            label: name.into(),
            prompt: prompts[(i + round) % prompts.len()].clone(),
            params,
            delta: (!deltas.is_empty()).then(|| deltas[i % deltas.len()].clone()),
            deadline: Instant::now() + Duration::from_secs(600),
            sink: Box::new(Counting {
                tokens: tokens.clone(),
                done: tx.clone(),
            }),
        };
        engine.submit(job).expect("submit");
    };
    // One warm-up round, then closed-loop rounds for the measured time.
    (0..clients).for_each(|i| submit(i, 0));
    (0..clients).for_each(|_| rx.recv().expect("done"));
    tokens.store(0, Ordering::Relaxed);
    let started = Instant::now();
    let cpu_started = process_cpu_seconds();
    let mut sent = 0;
    (0..clients).for_each(|i| submit(i, 1));
    while started.elapsed().as_secs_f64() < secs {
        rx.recv().expect("done");
        sent += 1;
        submit(sent % clients, 2 + sent / clients);
    }
    let done = tokens.load(Ordering::Relaxed) as f64;
    let rate = done / started.elapsed().as_secs_f64();
    // Tokens per CPU-second of the whole process times the worker count: what the rate would be
    // with every thread on a core of its own all the time, whatever the hypervisor steals.
    let cpu = process_cpu_seconds() - cpu_started;
    let threads = candle_core::utils::get_num_threads() as f64;
    let per_cpu = done / cpu * threads;
    println!(
        "engine {name:<30} {clients:>2} clients: {rate:>6.1} tok/s ({per_cpu:.1} tok/s per {threads} CPU-seconds/s)"
    );
    (0..clients).for_each(|_| rx.recv().expect("done"));
    rate
}

/// CPU time this process has used, all threads together.
fn process_cpu_seconds() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// The serving benchmark's eight sets (`scripts/bench_serve.sh`): four adapters, two knots-ties
/// merges, a task-arithmetic merge and a dense TIES merge; with `low_rank`, the TIES merge is a
/// knots-ta one instead (the benchmark's low-rank mix).
fn serving_sets(models: &Path, low_rank: bool) -> Vec<Arc<MergedDelta>> {
    let load = |name: &str| LoraAdapter::load(&models.join("adapters").join(name)).expect(name);
    let [sentiment, news, language, shout] =
        ["sentiment-lm", "news-lm", "language-lm", "shout"].map(load);
    let merged = |set: &[&LoraAdapter], method: Method| {
        let inputs: Vec<MergeInput<'_>> = set.iter().map(|a| MergeInput::new(a)).collect();
        let params = MergeParams::new(method, MergeOptions::default()).expect("params");
        Arc::new(merge(&inputs, &params, &Silent).expect("merge"))
    };
    let last = if low_rank {
        Method::KnotsTa
    } else {
        Method::Ties
    };
    vec![
        Arc::new(sentiment.delta()),
        Arc::new(news.delta()),
        Arc::new(language.delta()),
        Arc::new(shout.delta()),
        merged(&[&sentiment, &news], Method::KnotsTies),
        merged(&[&news, &language], Method::Ta),
        merged(&[&sentiment, &news, &language], Method::KnotsTies),
        merged(&[&shout, &sentiment], last),
    ]
}

/// The in-process mixes, by name: `base 1`, `base 16`, `adapter 1`, `adapters 16`, and the
/// serving benchmark's `sets 16` and `low-rank 16`.
const MIXES: [&str; 6] = [
    "base 1",
    "base 16",
    "adapter 1",
    "adapters 16",
    "sets 16",
    "low-rank 16",
];

/// The mix called `name` (one of [`MIXES`]) on `model`, its deltas loaded.
fn mix(model: &TextModel, models: &Path, shout: &LoraAdapter, name: &str) -> Mix {
    let load = |d: MergedDelta| model.load_delta(&Arc::new(d)).expect("delta");
    let serving = |low_rank: bool| -> Vec<Arc<LoadedDelta>> {
        (serving_sets(models, low_rank).iter())
            .map(|d| model.load_delta(d).expect("delta"))
            .collect()
    };
    let (label, clients, deltas) = match name {
        "base 1" => ("base", 1, Vec::new()),
        "base 16" => ("base", 16, Vec::new()),
        "adapter 1" => ("one adapter (shout)", 1, vec![load(shout.delta())]),
        "adapters 16" => (
            "8 rank-16 adapters",
            16,
            eight_adapters(shout)
                .iter()
                .map(|a| load(a.delta()))
                .collect(),
        ),
        "sets 16" => ("8 sets (one dense TIES)", 16, serving(false)),
        "low-rank 16" => ("8 low-rank sets", 16, serving(true)),
        other => panic!("no mix {other:?}; the mixes: {MIXES:?}"),
    };
    Mix {
        label,
        clients,
        deltas,
    }
}

/// SmolLM2 with its quantized weights as the server loads them.
fn serving_model(models: &Path) -> Arc<TextModel> {
    Arc::new(
        TextModel::load_serving(
            &resolve("smollm2-135m-instruct", models).expect("model"),
            &Device::Cpu,
            WeightFormat::Native,
        )
        .expect("load"),
    )
}

/// The serving engine on the quantized base, every mix or only the one called `only`, for 20 s
/// each: 1 and 16 clients on the base alone, with one adapter, over 8 adapters, and over the
/// serving benchmark's two mixes of 8 sets.
fn batched(models: &Path, shout: &LoraAdapter, only: Option<&str>) {
    let model = serving_model(models);
    for name in MIXES.iter().filter(|&&n| only.is_none_or(|o| o == n)) {
        run_engine(&model, &mix(&model, models, shout, name), 20.0);
    }
}

/// Mixes `a` and `b` alternating for `rounds` rounds of 8 s each (`a b`, then `b a`, ...), and
/// the median of the rounds' ratios `a / b`: on a machine whose speed drifts between runs, the
/// ratio of neighbouring runs is steadier than either rate.
fn pair(models: &Path, shout: &LoraAdapter, a: &str, b: &str, rounds: usize) {
    let model = serving_model(models);
    let (ma, mb) = (mix(&model, models, shout, a), mix(&model, models, shout, b));
    let mut ratios: Vec<f64> = (0..rounds)
        .map(|round| {
            let (ra, rb) = if round % 2 == 0 {
                let ra = run_engine(&model, &ma, 8.0);
                (ra, run_engine(&model, &mb, 8.0))
            } else {
                let rb = run_engine(&model, &mb, 8.0);
                (run_engine(&model, &ma, 8.0), rb)
            };
            ra / rb
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    println!(
        "{a} / {b}: median {:.3} of {} rounds ({})",
        ratios[ratios.len() / 2],
        ratios.len(),
        ratios
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// Independent chains per thread: enough to cover the multiply's latency, so the loop runs at
/// its throughput.
#[cfg(target_arch = "x86_64")]
const CHAINS: usize = 12;

/// `rounds` of [`CHAINS`] independent `vpdpbusd` (64 int8 multiply-adds each).
///
/// # Safety
/// The CPU has AVX-512F, AVX-512BW and AVX-512 VNNI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dpbusd_rounds(rounds: usize) -> i32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_epi8(3), _mm512_set1_epi8(5));
    let mut acc = [_mm512_setzero_si512(); CHAINS];
    for _ in 0..rounds {
        for chain in acc.iter_mut() {
            *chain = _mm512_dpbusd_epi32(*chain, a, b);
        }
    }
    _mm512_reduce_add_epi32(
        acc.iter()
            .fold(_mm512_setzero_si512(), |s, &c| _mm512_add_epi32(s, c)),
    )
}

/// `rounds` of [`CHAINS`] independent `vpmaddubsw` (32 int8 multiply-adds each, the pairs
/// summed into 16 bits), each chain feeding its result back as the next unsigned operand.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn maddubs_rounds(rounds: usize) -> i32 {
    use std::arch::x86_64::*;
    let b = _mm256_set1_epi8(1);
    let mut acc: [__m256i; CHAINS] = std::array::from_fn(|c| _mm256_set1_epi8(c as i8));
    for _ in 0..rounds {
        for chain in acc.iter_mut() {
            *chain = _mm256_maddubs_epi16(*chain, b);
        }
    }
    let sum = acc
        .iter()
        .fold(_mm256_setzero_si256(), |s, &c| _mm256_add_epi16(s, c));
    _mm256_extract_epi16::<0>(sum)
}

/// The int8 multiply-add peak of this CPU, on one thread and on two, with independent chains (a
/// single dependent chain measures latency instead): `vpdpbusd` with AVX-512 VNNI, else
/// `vpmaddubsw` with AVX2 (the instructions the packed kernels multiply with).
fn peak() {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        const ROUNDS: usize = 50_000_000;
        // The instruction, its multiply-adds, and one thread's rounds of it.
        let (name, macs, rounds): (&str, f64, fn() -> i32) =
            if has!("avx512vnni") && has!("avx512bw") {
                // SAFETY: the features were checked.
                ("vpdpbusd", 64.0, || unsafe { dpbusd_rounds(ROUNDS) })
            } else if has!("avx2") {
                // SAFETY: the feature was checked.
                ("vpmaddubsw", 32.0, || unsafe { maddubs_rounds(ROUNDS) })
            } else {
                println!("peak: this CPU has neither AVX-512 VNNI nor AVX2");
                return;
            };
        for threads in [1, 2] {
            let started = Instant::now();
            let sums: Vec<i32> = std::thread::scope(|s| {
                let runs: Vec<_> = (0..threads).map(|_| s.spawn(rounds)).collect();
                runs.into_iter()
                    .map(|r| r.join().expect("thread"))
                    .collect()
            });
            let seconds = started.elapsed().as_secs_f64();
            std::hint::black_box(sums);
            let per_second = (threads * ROUNDS * CHAINS) as f64 / seconds;
            println!(
                "peak {threads} thread(s): {:.2} G {name}/s = {:.0} G int8 multiply-adds/s \
                 = {:.0} G int8 op/s",
                per_second / 1e9,
                per_second * macs / 1e9,
                per_second * macs * 2.0 / 1e9
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("peak: measured on x86-64 CPUs only");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "peak") {
        return peak();
    }
    let models = root().join("models");
    let shout_dir = root().join("tests/fixtures/model-reference/smollm2/adapters/shout");
    let shout = LoraAdapter::load(&shout_dir).expect("shout");
    if let Some(at) = args.iter().position(|a| a == "batched") {
        return batched(&models, &shout, args.get(at + 1).map(String::as_str));
    }
    if let Some(at) = args.iter().position(|a| a == "pair") {
        let (Some(a), Some(b)) = (args.get(at + 1), args.get(at + 2)) else {
            panic!("pair needs two mixes, of {MIXES:?}, and optionally a round count");
        };
        let rounds = args.get(at + 3).map_or(5, |r| r.parse().expect("rounds"));
        return pair(&models, &shout, a, b, rounds.max(1));
    }
    let text = TextModel::load(
        &resolve("smollm2-135m-instruct", &models).expect("model"),
        &Device::Cpu,
    )
    .expect("load");
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

    let encoder = Encoder::load_serving(
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
    batched(&models, &shout, None);
}
