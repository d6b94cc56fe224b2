//! Adapter directories: `adapter_model.safetensors` files built from their parts (the 8-byte
//! header length, a JSON header of tensor keys, dtypes, shapes and data offsets, the data),
//! mostly valid LoRA pairs with mismatched ranks, shapes, dtypes, names, offsets, non-finite
//! values, saved modules and broken lengths mixed in; with near-valid `adapter_config.json`
//! and `knots_task.json` beside them. Each is loaded with `LoraAdapter::load`.

use std::path::Path;

use knots::adapters::{AdapterError, LoraAdapter};
use knots::merge::ModuleDelta;
use knots::server::error::ApiError;
use proptest::prelude::*;

use super::adapter_config::config_json;
use super::strategies::{Edit, Gen, edit, json_str, json_value, object, pick, pick_str};
use super::{Bytes, Tally, fuzz, scratch_dir};

/// The three files of an adapter directory (`task` absent when `None`).
#[derive(Debug, Clone)]
pub struct AdapterFiles {
    pub config: String,
    pub weights: Bytes,
    pub task: Option<String>,
}

impl AdapterFiles {
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("adapter_config.json"), &self.config)?;
        std::fs::write(dir.join("adapter_model.safetensors"), &self.weights.0)?;
        let task = dir.join("knots_task.json");
        match &self.task {
            Some(t) => std::fs::write(task, t),
            None => match std::fs::remove_file(task) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    }
}

/// How a tensor's values are filled.
#[derive(Debug, Clone)]
enum Fill {
    /// Small finite values.
    Plain(u32),
    /// Small values with one non-finite value (`NaN`, `±inf`) at an index.
    Special(u32, prop::sample::Index, f32),
    Random(u64),
}

/// One tensor: its key, dtype (as written in the header), shape and values, and an edit of
/// its data offsets.
#[derive(Debug, Clone)]
struct Tensor {
    key: String,
    dtype: String,
    shape: Vec<u64>,
    fill: Fill,
    offsets: Option<(i64, i64)>,
}

/// Bits per element of a dtype name (32 for unknown names).
fn bits(dtype: &str) -> u64 {
    match dtype {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
        "F16" | "BF16" | "I16" | "U16" => 16,
        "F64" | "I64" | "U64" | "C64" => 64,
        _ => 32,
    }
}

impl Tensor {
    /// The data bytes: as many as the shape asks for (when that is small), else a few.
    fn data(&self) -> Vec<u8> {
        let n = self
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(bits(&self.dtype)))
            .map(|b| b.div_ceil(8))
            .filter(|&b| b <= 1 << 14)
            .unwrap_or(12) as usize;
        let width = (bits(&self.dtype) / 8).max(1) as usize;
        let value = |i: usize, seed: u32| {
            ((i as u32).wrapping_mul(7919).wrapping_add(seed) % 200) as f32 / 100.0 - 1.0
        };
        let encode = |x: f32| -> Vec<u8> {
            match self.dtype.as_str() {
                "F16" => half::f16::from_f32(x).to_le_bytes().to_vec(),
                "BF16" => half::bf16::from_f32(x).to_le_bytes().to_vec(),
                "F64" => f64::from(x).to_le_bytes().to_vec(),
                _ => x.to_le_bytes().to_vec(),
            }
        };
        let mut out: Vec<u8> = match &self.fill {
            Fill::Random(seed) => (0..n)
                .map(|i| (seed.wrapping_mul(i as u64 + 1) >> 17) as u8)
                .collect(),
            Fill::Plain(seed) => (0..n.div_ceil(width))
                .flat_map(|i| encode(value(i, *seed)))
                .collect(),
            Fill::Special(seed, at, special) => {
                let count = n.div_ceil(width);
                let at = at.index(count.max(1));
                (0..count)
                    .flat_map(|i| encode(if i == at { *special } else { value(i, *seed) }))
                    .collect()
            }
        };
        out.truncate(n);
        out.resize(n, 0);
        out
    }
}

fn module() -> Gen<String> {
    prop_oneof![
        6 => "layers\\.[0-7]\\.(q|v)",
        1 => "model\\.layers\\.[0-3]\\.self_attn\\.q_proj",
        1 => pick_str(&["", "q", "lora_A", "a..b", "layers.0.q.lora_B", "layers.0.k"]),
        1 => "[a-z0-9._]{0,12}",
    ]
    .boxed()
}

fn key() -> Gen<String> {
    prop_oneof![
        4 => (module(), pick_str(&["lora_A", "lora_B"]), pick_str(&["", "", "", "default."]))
            .prop_map(|(m, f, name)| format!("base_model.model.{m}.{f}.{name}weight")),
        1 => (module(), pick_str(&["lora_A", "lora_B"]))
            .prop_map(|(m, f)| format!("{m}.{f}.weight")),
        2 => pick_str(&[
            "base_model.model.classifier.modules_to_save.default.weight",
            "base_model.model.classifier.modules_to_save.default.bias",
            "base_model.model.score.modules_to_save.default.weight",
            "base_model.model.classifier.weight",
            "base_model.model.lora_A.weight",
            "base_model.model.layers.0.q.lora_A.weight.extra",
            "base_model.model.layers.0.q.lora_A.a.b.weight",
            "base_model.model.layers.0.q.lora_embedding_A",
            "__metadata__",
            "",
            "weight",
        ]),
        1 => "\\PC{0,16}",
    ]
    .boxed()
}

fn dtype() -> Gen<String> {
    prop_oneof![
        40 => Just("F32".to_string()),
        6 => pick_str(&["F16", "BF16"]),
        1 => pick_str(&[
            "F64", "I8", "U8", "BOOL", "I16", "U16", "I32", "U32", "I64", "U64", "F8_E4M3",
            "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "C64",
        ]),
        1 => pick_str(&["f32", "", "F128", "FLOAT"]),
    ]
    .boxed()
}

fn fill() -> Gen<Fill> {
    prop_oneof![
        40 => any::<u32>().prop_map(Fill::Plain),
        1 => (
            any::<u32>(),
            any::<prop::sample::Index>(),
            pick(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN]),
        )
            .prop_map(|(s, i, x)| Fill::Special(s, i, x)),
        1 => any::<u64>().prop_map(Fill::Random),
    ]
    .boxed()
}

fn dim() -> Gen<u64> {
    prop_oneof![
        8 => 1u64..7,
        1 => Just(0u64),
        1 => pick(&[1u64 << 20, 1 << 32, 1 << 40, u64::MAX, u64::MAX / 2, 3_000_000_000]),
    ]
    .boxed()
}

fn offsets() -> Gen<Option<(i64, i64)>> {
    prop::option::weighted(
        0.05,
        (
            pick(&[0i64, 0, -1, 1, -4, 4, 1 << 40, -(1 << 40)]),
            pick(&[0i64, -1, 1, -4, 4, 1 << 40, i64::MAX / 2]),
        ),
    )
    .boxed()
}

/// A LoRA module: both factors most of the time; its rank is the file's unless `rank` or
/// `b_rank` says otherwise.
#[derive(Debug, Clone)]
struct Pair {
    module: String,
    /// `""` or an older PEFT's adapter name (`default.`) before `weight`.
    name: String,
    rank: Option<u64>,
    b_rank: Option<u64>,
    shape: (u64, u64),
    dtypes: (String, String),
    fills: (Fill, Fill),
    /// 0: both factors, 1: only `lora_A`, 2: only `lora_B`.
    which: u8,
}

impl Pair {
    fn tensors(&self, file_rank: u64) -> Vec<Tensor> {
        let r = self.rank.unwrap_or(file_rank);
        let k = |f: &str| format!("base_model.model.{}.{f}.{}weight", self.module, self.name);
        let (inp, out) = self.shape;
        let a = Tensor {
            key: k("lora_A"),
            dtype: self.dtypes.0.clone(),
            shape: vec![r, inp],
            fill: self.fills.0.clone(),
            offsets: None,
        };
        let b = Tensor {
            key: k("lora_B"),
            dtype: self.dtypes.1.clone(),
            shape: vec![out, self.b_rank.unwrap_or(r)],
            fill: self.fills.1.clone(),
            offsets: None,
        };
        match self.which {
            1 => vec![a],
            2 => vec![b],
            _ => vec![a, b],
        }
    }
}

fn pair() -> Gen<Pair> {
    (
        module(),
        pick_str(&["", "", "", "", "default."]),
        prop::option::weighted(0.05, 1u64..5),
        prop::option::weighted(0.05, dim()),
        (1u64..7, 1u64..7),
        (dtype(), dtype()),
        (fill(), fill()),
        prop_oneof![30 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
    )
        .prop_map(
            |(module, name, rank, b_rank, shape, dtypes, fills, which)| Pair {
                module,
                name,
                rank,
                b_rank,
                shape,
                dtypes,
                fills,
                which,
            },
        )
        .boxed()
}

fn loose_tensor() -> Gen<Tensor> {
    (
        key(),
        dtype(),
        prop::collection::vec(dim(), 0..4),
        fill(),
        offsets(),
    )
        .prop_map(|(key, dtype, shape, fill, offsets)| Tensor {
            key,
            dtype,
            shape,
            fill,
            offsets,
        })
        .boxed()
}

/// A `modules_to_save` tensor (a classification head), of any shape now and then.
fn saved_tensor() -> Gen<Tensor> {
    (
        pick_str(&["classifier", "score"]),
        pick_str(&["weight", "bias"]),
        prop_oneof![
            6 => prop::collection::vec(1u64..5, 1..3),
            1 => Just(vec![]),
            1 => prop::collection::vec(dim(), 0..3),
        ],
        dtype(),
        fill(),
    )
        .prop_map(|(m, p, shape, dtype, fill)| Tensor {
            key: format!("base_model.model.{m}.modules_to_save.default.{p}"),
            dtype,
            shape,
            fill,
            offsets: None,
        })
        .boxed()
}

/// How the file around the header and data is damaged.
#[derive(Debug, Clone)]
enum Frame {
    Intact,
    LengthDelta(i64),
    Length(u64),
    Edit(Edit),
}

fn frame() -> Gen<Frame> {
    prop_oneof![
        50 => Just(Frame::Intact),
        1 => pick(&[-1i64, 1, -8, 8, 100]).prop_map(Frame::LengthDelta),
        1 => pick(&[0u64, 1, 2, u64::MAX, 100_000_001, 1 << 40]).prop_map(Frame::Length),
        2 => edit().prop_map(Frame::Edit),
    ]
    .boxed()
}

/// The header's `__metadata__` entry, if any.
fn metadata() -> Gen<Option<String>> {
    prop::option::weighted(
        0.2,
        prop_oneof![
            6 => Just("{\"format\":\"pt\"}".to_string()),
            1 => pick_str(&["{\"a\":1}", "\"pt\"", "null", "{}", "[]"]),
            1 => json_value(),
        ],
    )
    .boxed()
}

/// A safetensors file from its parts.
fn build(tensors: &[Tensor], metadata: Option<&str>, padding: usize, frame: Frame) -> Vec<u8> {
    let mut data = Vec::new();
    let mut entries = Vec::new();
    for t in tensors {
        let bytes = t.data();
        let (start, end) = (data.len() as i64, (data.len() + bytes.len()) as i64);
        data.extend_from_slice(&bytes);
        let (start, end) = match t.offsets {
            Some((ds, de)) => (start.saturating_add(ds), end.saturating_add(de)),
            None => (start, end),
        };
        let shape: Vec<String> = t.shape.iter().map(u64::to_string).collect();
        let info = format!(
            "{{\"dtype\":{},\"shape\":[{}],\"data_offsets\":[{start},{end}]}}",
            json_str(&t.dtype),
            shape.join(",")
        );
        entries.push((t.key.clone(), info));
    }
    if let Some(m) = metadata {
        entries.insert(0, ("__metadata__".to_string(), m.to_string()));
    }
    let mut header = object(entries.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    header.push_str(&" ".repeat(padding));
    let len = match frame {
        Frame::LengthDelta(d) => (header.len() as u64).wrapping_add_signed(d),
        Frame::Length(n) => n,
        _ => header.len() as u64,
    };
    let mut file = len.to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.extend_from_slice(&data);
    match frame {
        Frame::Edit(e) => e.apply(file),
        _ => file,
    }
}

/// A weights file, the rank its LoRA pairs share, and whether it saves a head.
fn weights() -> Gen<(Vec<u8>, u64, bool)> {
    let structured = (
        1u64..4,
        prop_oneof![12 => prop::collection::vec(pair(), 1..4), 1 => Just(vec![])],
        prop::option::weighted(0.15, prop::collection::vec(loose_tensor(), 1..3)),
        prop::option::weighted(0.3, prop::collection::vec(saved_tensor(), 1..3)),
        metadata(),
        prop::sample::select(vec![0usize, 0, 0, 0, 1, 7]),
        frame(),
        any::<u64>(),
    )
        .prop_map(|(rank, pairs, loose, saved, meta, pad, frame, shuffle)| {
            let mut tensors: Vec<Tensor> = pairs.iter().flat_map(|p| p.tensors(rank)).collect();
            tensors.extend(loose.into_iter().flatten());
            let heads = saved.is_some();
            tensors.extend(saved.into_iter().flatten());
            // Data order is not key order.
            let n = tensors.len();
            if n > 1 {
                tensors.swap(shuffle as usize % n, (shuffle >> 32) as usize % n);
            }
            (build(&tensors, meta.as_deref(), pad, frame), rank, heads)
        });
    prop_oneof![
        30 => structured,
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| (b, 1, false)),
        1 => json_value().prop_map(|h| {
            let mut f = (h.len() as u64).to_le_bytes().to_vec();
            f.extend_from_slice(h.as_bytes());
            (f, 1, false)
        }),
    ]
    .boxed()
}

/// A config for a file whose pairs have rank `{r}` (filled in later): mostly valid, with one
/// of its values off now and then, or any config.
fn config() -> Gen<String> {
    let r = prop_oneof![
        20 => Just("{r}".to_string()),
        1 => pick_str(&["0", "1", "2", "3", "-1", "1.5", "\"2\""]),
    ];
    let alpha = prop_oneof![
        8 => pick_str(&["4", "8", "16.0"]),
        1 => pick_str(&["0", "-2", "1e308", "5e-324"]),
    ];
    let all = pick_str(&[
        r#""all-linear""#,
        r#"".*""#,
        r#"["q","v","q_proj"]"#,
        r#"".*\\.(q|v|q_proj)""#,
    ]);
    let some = pick_str(&[r#"["q"]"#, "[]", r#""(""#, r#"["layers.0.v"]"#]);
    let targets = prop_oneof![12 => all, 1 => some];
    let extra = prop_oneof![
        20 => Just(""),
        1 => pick(&[
            r#","rank_pattern":{"v":1}"#,
            r#","alpha_pattern":{"q":0}"#,
            r#","use_rslora":true"#,
            r#","bias":"all""#,
            r#","use_dora":true"#,
            r#","peft_type":"IA3""#,
            r#","rank_pattern":{"(":2}"#,
            r#","rank_pattern":{"q":0}"#,
            r#","modules_to_save":[]"#,
        ]),
    ];
    let near_valid = (r, alpha, targets, extra).prop_map(|(r, alpha, targets, extra)| {
        format!(r#"{{"peft_type":"LORA","r":{r},"lora_alpha":{alpha},"target_modules":{targets},"#)
            + r#""base_model_name_or_path":"org/gen-base"{saved}"#
            + extra
            + "}"
    });
    prop_oneof![12 => near_valid, 1 => config_json()].boxed()
}

fn task() -> Gen<Option<String>> {
    prop::option::weighted(
        0.4,
        prop_oneof![
            4 => pick_str(&[
                "{\"task\":\"t\",\"labels\":[\"negative\",\"positive\"]}",
                "{\"labels\":[\"a\"]}",
                "{\"task\":\"t\",\"labels\":[\"a\",\"b\"],\"label_texts\":[\"x\"]}",
                "{\"task\":null,\"labels\":[]}",
                "{\"labels\":\"a\"}",
                "{}",
                "",
                "{\"task\":\"t\",\"labels\":[\"a\"],\"extra\":1}",
            ]),
            1 => json_value(),
        ],
    )
    .boxed()
}

/// The files of an adapter directory, mostly near-valid: the config's `r` is the pairs' rank,
/// and a file with a saved head usually names it in `modules_to_save`.
pub fn adapter_files() -> Gen<AdapterFiles> {
    (weights(), config(), task(), prop::bool::weighted(0.9))
        .prop_map(|((weights, rank, heads), config, task, name_heads)| {
            let saved = if heads && name_heads {
                ",\"modules_to_save\":[\"classifier\",\"score\"]"
            } else {
                ""
            };
            let config = config
                .replace("{r}", &rank.to_string())
                .replace("{saved}", saved);
            AdapterFiles {
                config,
                weights: Bytes(weights),
                task,
            }
        })
        .boxed()
}

/// Loads `dir` and checks what a load promises: consistent factors, or an error that names
/// the directory's file and is a client error.
pub fn load_and_check(tally: &Tally, dir: &Path) -> Result<Option<LoraAdapter>, TestCaseError> {
    match LoraAdapter::load(dir) {
        Ok(adapter) => {
            tally.add("loaded");
            prop_assert!(!adapter.modules.is_empty());
            for (path, m) in &adapter.modules {
                prop_assert_eq!(m.a.rows(), m.b.cols(), "{}", path);
                prop_assert_eq!(m.rank(), adapter.config.rank_for(path), "{}", path);
                prop_assert!(m.a.cols() > 0 && m.b.rows() > 0);
                prop_assert!(
                    m.a.as_slice()
                        .iter()
                        .chain(m.b.as_slice())
                        .all(|x| x.is_finite())
                );
                prop_assert!(adapter.config.target_modules.matches(path), "{}", path);
                prop_assert_eq!(m.scale.to_bits(), adapter.config.scale_for(path).to_bits());
            }
            for (key, saved) in &adapter.saved_modules {
                let n = saved
                    .shape
                    .iter()
                    .try_fold(1usize, |a, &d| a.checked_mul(d));
                prop_assert_eq!(n, Some(saved.data.len()), "{}", key);
            }
            let delta = adapter.delta();
            prop_assert_eq!(delta.modules.len(), adapter.modules.len());
            for (path, m) in &delta.modules {
                let finite = match m {
                    ModuleDelta::LowRank { b, a } => b
                        .as_slice()
                        .iter()
                        .chain(a.as_slice())
                        .all(|x| x.is_finite()),
                    ModuleDelta::Dense(w) => w.as_slice().iter().all(|x| x.is_finite()),
                };
                prop_assert!(finite, "the update of {} is not finite", path);
            }
            Ok(Some(adapter))
        }
        Err(e) => {
            let debug = format!("{e:?}");
            let kind = debug.split([' ', '{', '(']).next().unwrap_or_default();
            match &e {
                AdapterError::Safetensors { reason, .. } => {
                    let reason: String = reason
                        .split([':', '`'])
                        .next()
                        .unwrap_or_default()
                        .chars()
                        .take(40)
                        .collect();
                    tally.add(format!("{kind} ({})", reason.trim()));
                }
                _ => tally.add(kind),
            }
            let shown = e.to_string();
            prop_assert!(shown.contains(&dir.display().to_string()), "{shown}");
            prop_assert!(!matches!(e, AdapterError::Io { .. }), "{shown}");
            prop_assert_eq!(ApiError::from(e).status().as_u16(), 400);
            Ok(None)
        }
    }
}

#[test]
fn adapter_files_load_or_fail_cleanly() {
    let root = scratch_dir();
    let dir = root.path().join("adapter");
    let tally = Tally::default();
    fuzz("safetensors", 15_000, 1, adapter_files(), |files| {
        files
            .write(&dir)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        load_and_check(&tally, &dir).map(drop)
    });
    tally.print("safetensors");
}
