//! Model engine against the transformers/PEFT reference outputs in
//! `tests/fixtures/model-reference` (tolerances from its README). The base models are read from
//! `models/cache/` (`make models` fetches them); each is loaded once per test binary.

mod delta;
mod durability;
mod experiments;
mod fleet;
mod memory;
mod minilm;
mod process;
mod routes;
mod scale_out;
mod serving;
mod shared_state;
mod smollm2;
mod sources;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Device;
use knots::engine::{Encoder, ModelPath, TextModel, resolve};
use safetensors::SafeTensors;

pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
}

pub fn reference(rel: &str) -> PathBuf {
    crate::common::fixture("model-reference").join(rel)
}

pub fn reference_json(rel: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(reference(rel)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// An f32 tensor of a reference safetensors file, flattened.
pub fn reference_tensor(rel: &str, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(reference(rel)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor(name).unwrap();
    view.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn model_path(id: &str) -> ModelPath {
    resolve(id, &models_dir()).unwrap_or_else(|e| panic!("{id}: {e} (run `make models`)"))
}

pub fn smollm2() -> &'static TextModel {
    static MODEL: OnceLock<TextModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        TextModel::load(&model_path("smollm2-135m-instruct"), &Device::Cpu).unwrap()
    })
}

pub fn minilm() -> &'static Encoder {
    static MODEL: OnceLock<Encoder> = OnceLock::new();
    MODEL.get_or_init(|| Encoder::load(&model_path("all-minilm-l6-v2"), &Device::Cpu).unwrap())
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
