//! Inputs the fuzz targets found crashes with, each kept as a test of its own.

use knots::adapters::{AdapterError, LoraAdapter};
use knots::matrix::Matrix;
use serde_json::{Value, json};

use super::router::{Env, post};
use crate::common::write_adapter;

/// Registering a directory inside the adapter roots that holds no adapter (here the root
/// itself, as `{"path": "<root>//"}`) answered 500: the missing `adapter_config.json` was an
/// internal I/O error. It is a 400 naming `path`.
#[test]
fn registering_a_directory_without_an_adapter_is_a_400() {
    let env = Env::new();
    let empty = env.spare.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let root = format!("{}//", env.spare.display());
    for path in [root, empty.display().to_string()] {
        let (status, body) = env
            .send(&post(
                "/v1/adapters",
                json!({"name": "fresh", "path": path}),
            ))
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["param"], "path", "{body}");
    }
}

/// An adapter whose `lora_alpha / r` does not fit f32 (`"r": 3, "lora_alpha": 1e308`) loaded
/// with an infinite update: merging it in Core Space (`<it>:-1+sentiment@core-iso-cts`)
/// answered 500 when the SVD failed, and alone it served an infinite delta. It is refused at
/// load, naming its `lora_B`, and registering it is a 400.
#[test]
fn an_adapter_whose_scale_overflows_f32_is_refused() {
    let env = Env::new();
    let dir = env.spare.join("huge");
    let a = Matrix::from_vec(3, 1, vec![0.5, -0.25, 1.0]).unwrap();
    let b = Matrix::from_vec(1, 3, vec![-1.0, 0.75, 0.5]).unwrap();
    let config = json!({"peft_type": "LORA", "r": 3, "lora_alpha": 1e308,
        "target_modules": "all-linear", "base_model_name_or_path": "org/enc-base",
        "modules_to_save": ["classifier", "score"]});
    write_adapter(&dir, &config, &[("layers.1.v", &a, &b)]);
    match LoraAdapter::load(&dir) {
        Err(AdapterError::BadTensor { key, .. }) => assert_eq!(key, "layers.1.v.lora_B.weight"),
        other => panic!("{other:?}"),
    }
    let (status, body) = env
        .send(&post("/v1/adapters", json!({"name": "huge", "path": dir})))
        .unwrap();
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    let (status, _) = env
        .send(&post(
            "/v1/merges",
            json!({"model": "huge:-1+sentiment@core-iso-cts"}),
        ))
        .unwrap();
    assert_eq!(status, 404);

    // A scale that fits still loads.
    let config = json!({"peft_type": "LORA", "r": 3, "lora_alpha": 3e30,
        "target_modules": "all-linear", "base_model_name_or_path": "org/enc-base"});
    write_adapter(&dir, &config, &[("layers.1.v", &a, &b)]);
    let scale = LoraAdapter::load(&dir).unwrap().modules["layers.1.v"].scale;
    assert!((scale / 1e30 - 1.0).abs() < 1e-12, "{scale}");
}

/// An encoder adapter saving a scalar `classifier.weight` (shape `[]`) and no bias: classifying
/// with it panicked indexing the weight's first dimension (a 500). A saved classifier that is
/// not a non-empty matrix is no head; without `knots_task.json` the adapter has none (400).
#[test]
fn a_scalar_saved_classifier_is_not_a_head() {
    let env = Env::new();
    let dir = env.spare.join("scalar-head");
    // The file the fuzzer wrote: the 301-byte header, then three f32 values of -1.
    let header = concat!(
        r#"{"base_model.model.layers.0.v.lora_A.weight":"#,
        r#"{"dtype":"F32","shape":[1,1],"data_offsets":[0,4]},"#,
        r#""base_model.model.layers.0.v.lora_B.weight":"#,
        r#"{"dtype":"F32","shape":[1,1],"data_offsets":[4,8]},"#,
        r#""base_model.model.classifier.modules_to_save.default.weight":"#,
        r#"{"dtype":"F32","shape":[],"data_offsets":[8,12]}}"#,
    );
    assert_eq!(header.len(), 0x12d);
    let mut weights = (header.len() as u64).to_le_bytes().to_vec();
    weights.extend_from_slice(header.as_bytes());
    weights.extend_from_slice(&[0x00, 0x00, 0x80, 0xbf].repeat(3));
    let config = concat!(
        r#"{"peft_type":"LORA","r":1,"lora_alpha":4,"target_modules":"all-linear","#,
        r#""base_model_name_or_path":"org/enc-base","modules_to_save":["classifier","score"]}"#,
    );
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), &weights).unwrap();
    let (status, body) = env
        .send(&post(
            "/v1/adapters",
            json!({"name": "scalar-head", "path": dir}),
        ))
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let classify = json!({"input": ["positive", "a"], "model": "scalar-head", "task": null});
    let (status, body) = env.send(&post("/v1/classify", classify)).unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (status, &body["error"]["param"]),
        (400, &json!("model")),
        "{body}"
    );
}
