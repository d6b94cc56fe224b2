//! Reading and writing PEFT adapters: supported layouts, every kind of bad input, and the
//! PEFT export round trip.

use std::path::Path;

use knots::adapters::{AdapterError, ExportInfo, LoraAdapter, write_peft};
use knots::matrix::Matrix;
use knots::merge::{self, MergeError, MergeInput, MergeOptions, MergeParams, Method, Silent};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use safetensors::Dtype;
use serde_json::json;

use crate::common::{
    f32_bytes, fixture, lora_config, random_adapter, random_matrix, write_adapter,
    write_raw_tensors,
};

fn factors(seed: u64, r: usize, o: usize, i: usize) -> (Matrix, Matrix) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (
        random_matrix(&mut rng, r, i, 0.3),
        random_matrix(&mut rng, o, r, 0.3),
    )
}

/// A valid two-module adapter in `dir`.
fn valid_adapter(dir: &Path) {
    let (a, b) = factors(1, 4, 6, 5);
    write_adapter(
        dir,
        &lora_config(4, 8.0, &["q", "v"]),
        &[("layers.0.q", &a, &b), ("layers.0.v", &a, &b)],
    );
}

fn load_err(dir: &Path) -> AdapterError {
    LoraAdapter::load(dir).expect_err("loading should fail")
}

#[test]
fn reads_the_golden_and_peft_written_adapters() {
    let adapter = LoraAdapter::load(&fixture("knots-golden/knots_ties/adapters/task_0")).unwrap();
    assert_eq!(adapter.name, "task_0");
    assert_eq!(adapter.modules.len(), 8);
    let q = &adapter.modules["encoder.layer.0.attention.self.query"];
    assert_eq!(
        (q.a.shape(), q.b.shape(), q.scale),
        ((8, 384), (384, 8), 1.0)
    );
    let again = LoraAdapter::load(&fixture("knots-golden/knots_ta/adapters/task_0")).unwrap();
    assert_ne!(
        adapter.digest, again.digest,
        "different contents, different digests"
    );

    // Written by PEFT itself: a causal-LM adapter (alpha 16, r 8) and a SEQ_CLS one with a head.
    let shout = LoraAdapter::load(&fixture("model-reference/smollm2/adapters/shout")).unwrap();
    assert_eq!(shout.modules.len(), 120);
    let q = &shout.modules["model.layers.0.self_attn.q_proj"];
    assert_eq!(
        (q.a.shape(), q.b.shape(), q.scale),
        ((8, 576), (576, 8), 2.0)
    );
    assert_eq!(
        shout.modules["model.layers.29.self_attn.k_proj"].shape(),
        (192, 576)
    );
    let sentiment =
        LoraAdapter::load(&fixture("model-reference/minilm/adapters/sentiment")).unwrap();
    assert_eq!(sentiment.modules.len(), 12);
    assert!(
        sentiment
            .modules
            .contains_key("bert.encoder.layer.5.attention.self.value")
    );
    assert_eq!(
        sentiment.saved_modules["classifier.weight"].shape,
        vec![2, 384]
    );
    assert_eq!(sentiment.saved_modules["classifier.bias"].shape, vec![2]);
}

#[test]
fn scale_follows_alpha_rank_patterns_and_rslora() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = factors(2, 4, 6, 5);
    let (a2, b2) = factors(3, 2, 6, 5);
    let mut config = lora_config(4, 8.0, &["q", "v"]);
    config["rank_pattern"] = json!({"v": 2});
    config["alpha_pattern"] = json!({"v": 1.0});
    write_adapter(dir.path(), &config, &[("l.q", &a, &b), ("l.v", &a2, &b2)]);
    let adapter = LoraAdapter::load(dir.path()).unwrap();
    assert_eq!(adapter.modules["l.q"].scale, 2.0);
    assert_eq!(adapter.modules["l.v"].scale, 0.5);

    let rs = tempfile::tempdir().unwrap();
    let mut config = lora_config(4, 8.0, &["q"]);
    config["use_rslora"] = json!(true);
    write_adapter(rs.path(), &config, &[("l.q", &a, &b)]);
    assert_eq!(
        LoraAdapter::load(rs.path()).unwrap().modules["l.q"].scale,
        4.0
    );
}

#[test]
fn reads_half_precision_default_suffixed_keys_and_regex_targets() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = factors(4, 2, 3, 3);
    let mut config = lora_config(2, 2.0, &[]);
    config["target_modules"] = json!(r".*\.q");
    std::fs::create_dir_all(dir.path()).unwrap();
    std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).unwrap();
    let f16: Vec<u8> = a
        .as_slice()
        .iter()
        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
        .collect();
    let bf16: Vec<u8> = b
        .as_slice()
        .iter()
        .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
        .collect();
    write_raw_tensors(
        &dir.path().join("adapter_model.safetensors"),
        &[
            (
                "base_model.model.l.q.lora_A.default.weight".into(),
                Dtype::F16,
                vec![2, 3],
                f16,
            ),
            (
                "base_model.model.l.q.lora_B.default.weight".into(),
                Dtype::BF16,
                vec![3, 2],
                bf16,
            ),
        ],
    );
    let adapter = LoraAdapter::load(dir.path()).unwrap();
    let q = &adapter.modules["l.q"];
    assert!(q.a.relative_error(&a) < 1e-3 && q.b.relative_error(&b) < 1e-2);
}

#[test]
fn modules_to_save_are_kept_as_saved_tensors() {
    let dir = tempfile::tempdir().unwrap();
    valid_adapter(dir.path());
    let mut config = lora_config(4, 8.0, &["q", "v"]);
    config["modules_to_save"] = json!(["classifier", "score"]);
    std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).unwrap();
    let (a, b) = factors(1, 4, 6, 5);
    let head = Matrix::from_fn(2, 6, |i, j| (i * 6 + j) as f32);
    write_raw_tensors(
        &dir.path().join("adapter_model.safetensors"),
        &[
            (
                "base_model.model.layers.0.q.lora_A.weight".into(),
                Dtype::F32,
                vec![4, 5],
                f32_bytes(&a),
            ),
            (
                "base_model.model.layers.0.q.lora_B.weight".into(),
                Dtype::F32,
                vec![6, 4],
                f32_bytes(&b),
            ),
            (
                "base_model.model.classifier.weight".into(),
                Dtype::F32,
                vec![2, 6],
                f32_bytes(&head),
            ),
        ],
    );
    let adapter = LoraAdapter::load(dir.path()).unwrap();
    let saved = &adapter.saved_modules["classifier.weight"];
    assert_eq!(
        (saved.shape.as_slice(), saved.data[7]),
        (&[2usize, 6][..], 7.0)
    );
}

/// Each bad input gives its own typed error naming the file (and the key where there is one).
#[test]
fn bad_adapters_give_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let case = |name: &str, edit: &dyn Fn(&Path)| {
        let path = dir.path().join(name);
        valid_adapter(&path);
        edit(&path);
        let err = load_err(&path);
        assert!(
            err.to_string().contains(name),
            "{name}: error should name the file: {err}"
        );
        err
    };
    let set_config = |p: &Path, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut c = lora_config(4, 8.0, &["q", "v"]);
        edit(&mut c);
        std::fs::write(p.join("adapter_config.json"), c.to_string()).unwrap();
    };
    let (a, b) = factors(1, 4, 6, 5);
    let weights = |p: &Path, tensors: &[(&str, Vec<usize>, Vec<u8>)]| {
        let t: Vec<_> = tensors
            .iter()
            .map(|(k, s, d)| (k.to_string(), Dtype::F32, s.clone(), d.clone()))
            .collect();
        write_raw_tensors(&p.join("adapter_model.safetensors"), &t);
    };

    let err = case("no_config", &|p| {
        std::fs::remove_file(p.join("adapter_config.json")).unwrap()
    });
    assert!(matches!(err, AdapterError::Io { .. }), "{err}");
    let err = case("no_weights", &|p| {
        std::fs::remove_file(p.join("adapter_model.safetensors")).unwrap()
    });
    assert!(matches!(err, AdapterError::Io { .. }), "{err}");
    let err = case("bad_json", &|p| {
        std::fs::write(p.join("adapter_config.json"), "{\"r\": 4,").unwrap()
    });
    assert!(matches!(err, AdapterError::Json { .. }), "{err}");
    let err = case("ia3", &|p| {
        set_config(p, &|c| c["peft_type"] = json!("IA3"))
    });
    assert!(
        matches!(err, AdapterError::Unsupported { .. }) && err.to_string().contains("IA3"),
        "{err}"
    );
    let err = case("dora", &|p| set_config(p, &|c| c["use_dora"] = json!(true)));
    assert!(err.to_string().contains("use_dora"), "{err}");
    let err = case("rank", &|p| set_config(p, &|c| c["r"] = json!(8)));
    assert!(
        matches!(
            err,
            AdapterError::RankMismatch {
                expected: 8,
                found: 4,
                ..
            }
        ),
        "{err}"
    );
    let err = case("untargeted", &|p| {
        set_config(p, &|c| c["target_modules"] = json!(["q"]))
    });
    assert!(
        matches!(err, AdapterError::Untargeted { ref module, .. } if module == "layers.0.v"),
        "{err}"
    );
    let err = case("a_only", &|p| {
        weights(
            p,
            &[(
                "base_model.model.layers.0.q.lora_A.weight",
                vec![4, 5],
                f32_bytes(&a),
            )],
        )
    });
    assert!(
        matches!(
            err,
            AdapterError::MissingFactor {
                missing: "lora_B",
                ..
            }
        ),
        "{err}"
    );
    let err = case("shapes", &|p| {
        weights(
            p,
            &[
                (
                    "base_model.model.layers.0.q.lora_A.weight",
                    vec![4, 5],
                    f32_bytes(&a),
                ),
                (
                    "base_model.model.layers.0.q.lora_B.weight",
                    vec![4, 6],
                    f32_bytes(&b),
                ),
            ],
        )
    });
    assert!(matches!(err, AdapterError::BadTensor { .. }), "{err}");
    let err = case("nan", &|p| {
        let mut bad = a.clone();
        bad.as_mut_slice()[3] = f32::NAN;
        weights(
            p,
            &[
                (
                    "base_model.model.layers.0.q.lora_A.weight",
                    vec![4, 5],
                    f32_bytes(&bad),
                ),
                (
                    "base_model.model.layers.0.q.lora_B.weight",
                    vec![6, 4],
                    f32_bytes(&b),
                ),
            ],
        )
    });
    assert!(
        matches!(err, AdapterError::NonFinite { index: 3, ref key, .. } if key.contains("lora_A")),
        "{err}"
    );
    let err = case("truncated", &|p| {
        let file = p.join("adapter_model.safetensors");
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() - 7]).unwrap();
    });
    assert!(matches!(err, AdapterError::Safetensors { .. }), "{err}");
    let err = case("garbage", &|p| {
        std::fs::write(p.join("adapter_model.safetensors"), b"not a tensor file").unwrap()
    });
    assert!(matches!(err, AdapterError::Safetensors { .. }), "{err}");
    let err = case("stray_key", &|p| {
        weights(
            p,
            &[
                (
                    "base_model.model.layers.0.q.lora_A.weight",
                    vec![4, 5],
                    f32_bytes(&a),
                ),
                (
                    "base_model.model.layers.0.q.lora_B.weight",
                    vec![6, 4],
                    f32_bytes(&b),
                ),
                (
                    "base_model.model.layers.0.q.lora_magnitude_vector",
                    vec![6, 4],
                    f32_bytes(&b),
                ),
            ],
        )
    });
    assert!(
        matches!(err, AdapterError::UnexpectedKey { ref key, .. } if key.contains("magnitude")),
        "{err}"
    );
    let err = case("empty", &|p| weights(p, &[]));
    assert!(matches!(err, AdapterError::Empty { .. }), "{err}");
}

#[test]
fn sets_with_disagreeing_shapes_are_rejected_naming_the_module() {
    let x = random_adapter("x", 1, 2, 2.0, &[("m", 4, 5)]);
    let y = random_adapter("y", 2, 2, 2.0, &[("m", 4, 6)]);
    let inputs = [MergeInput::new(&x), MergeInput::new(&y)];
    let err = merge::merge(&inputs, &MergeParams::default(), &Silent).unwrap_err();
    assert!(
        matches!(err, MergeError::ShapeMismatch { ref module, .. } if module == "m"),
        "{err}"
    );
    let dup = [MergeInput::new(&x), MergeInput::new(&x)];
    assert!(matches!(
        merge::merge(&dup, &MergeParams::default(), &Silent),
        Err(MergeError::DuplicateAdapter { .. })
    ));
    assert_eq!(
        merge::merge(&[], &MergeParams::default(), &Silent),
        Err(MergeError::NoAdapters)
    );
}

#[test]
fn different_ranks_and_modules_merge() {
    let x = random_adapter("x", 1, 2, 4.0, &[("q", 6, 5), ("v", 6, 5)]);
    let y = random_adapter("y", 2, 5, 5.0, &[("q", 6, 5)]);
    let inputs = [MergeInput::new(&x), MergeInput::new(&y)];
    let ta = merge::merge(
        &inputs,
        &MergeParams::new(Method::Ta, MergeOptions::default()).unwrap(),
        &Silent,
    )
    .unwrap();
    assert_eq!(ta.modules["q"].rank(), Some(7));
    // Only x updates v, so the sum there is x's own update.
    assert!(
        ta.modules["v"]
            .to_dense()
            .relative_error(&x.delta().modules["v"].to_dense())
            < 1e-6
    );
    let knots = merge::merge(&inputs, &MergeParams::default(), &Silent).unwrap();
    assert_eq!(
        (knots.modules["q"].rank(), knots.modules["v"].rank()),
        (Some(6), Some(2))
    );
}

/// A merged PEFT export, read back with the adapter reader, reproduces the merged delta.
#[test]
fn peft_export_round_trips() {
    let x = random_adapter(
        "x",
        1,
        2,
        4.0,
        &[("layers.0.q", 6, 5), ("layers.0.v", 6, 5)],
    );
    let y = random_adapter("y", 2, 3, 3.0, &[("layers.0.q", 6, 5)]);
    let inputs = [MergeInput::new(&x), MergeInput::new(&y)];
    let delta = merge::merge(&inputs, &MergeParams::default(), &Silent).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    write_peft(&delta, &out, &ExportInfo::default()).unwrap();
    let back = LoraAdapter::load(&out).unwrap();
    assert_eq!(back.config.r, 5, "the most common rank");
    assert_eq!(back.config.rank_for("layers.0.v"), 2);
    assert!(crate::common::max_relative_error(&back.delta(), &delta) < 1e-6);
    // A second export to the same place is refused and leaves the first intact.
    let err = write_peft(&delta, &out, &ExportInfo::default()).unwrap_err();
    assert!(matches!(err, AdapterError::OutputExists { .. }), "{err}");
    assert!(LoraAdapter::load(&out).is_ok());
}
