//! Helpers shared by the integration tests: fixture paths, synthetic adapters, tensor files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use knots::adapters::{AdapterConfig, AdapterDigest, LoraAdapter, LoraModule};
use knots::matrix::Matrix;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{Value, json};

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// Every tensor of a safetensors file as an f32 matrix (1-D tensors become one row).
pub fn read_matrices(path: &Path) -> BTreeMap<String, Matrix> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let file = SafeTensors::deserialize(&bytes).unwrap();
    file.tensors()
        .into_iter()
        .map(|(key, view)| {
            assert_eq!(view.dtype(), Dtype::F32, "{key}");
            let data: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let (rows, cols) = match view.shape() {
                [r, c] => (*r, *c),
                [n] => (1, *n),
                other => panic!("{key}: unexpected shape {other:?}"),
            };
            (key, Matrix::from_vec(rows, cols, data).unwrap())
        })
        .collect()
}

/// Writes tensors (given as raw little-endian bytes with a dtype and shape) to a safetensors file.
pub fn write_raw_tensors(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, dtype, shape, data)| {
            (
                k.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

pub fn f32_bytes(m: &Matrix) -> Vec<u8> {
    m.as_slice().iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes a PEFT adapter directory with `config` and f32 factors `modules[path] = (a, b)`.
pub fn write_adapter(dir: &Path, config: &Value, modules: &[(&str, &Matrix, &Matrix)]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
    let mut tensors = Vec::new();
    for (path, a, b) in modules {
        for (factor, m) in [("lora_A", a), ("lora_B", b)] {
            let key = format!("base_model.model.{path}.{factor}.weight");
            tensors.push((key, Dtype::F32, vec![m.rows(), m.cols()], f32_bytes(m)));
        }
    }
    write_raw_tensors(&dir.join("adapter_model.safetensors"), &tensors);
}

pub fn lora_config(r: usize, alpha: f64, targets: &[&str]) -> Value {
    json!({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets,
           "bias": "none", "use_dora": false, "base_model_name_or_path": "test/base"})
}

pub fn random_matrix(rng: &mut ChaCha8Rng, rows: usize, cols: usize, scale: f32) -> Matrix {
    Matrix::from_fn(rows, cols, |_, _| scale * rng.random_range(-1.0f32..1.0))
}

/// An in-memory adapter with random factors of rank `r` for each `(path, O, I)`.
pub fn random_adapter(
    name: &str,
    seed: u64,
    r: usize,
    alpha: f64,
    modules: &[(&str, usize, usize)],
) -> LoraAdapter {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let config: AdapterConfig = serde_json::from_value(lora_config(r, alpha, &["proj"])).unwrap();
    let modules = modules
        .iter()
        .map(|&(path, o, i)| {
            let a = random_matrix(&mut rng, r, i, 0.5);
            let b = random_matrix(&mut rng, o, r, 0.5);
            (
                path.to_string(),
                LoraModule {
                    a,
                    b,
                    scale: alpha / r as f64,
                },
            )
        })
        .collect();
    let mut digest = [0u8; 32];
    digest[..8].copy_from_slice(&seed.to_le_bytes());
    LoraAdapter {
        name: name.to_string(),
        path: PathBuf::from(name),
        config,
        modules,
        saved_modules: BTreeMap::new(),
        task: None,
        digest: AdapterDigest(digest),
    }
}

/// The largest relative Frobenius error over the modules of two deltas with the same modules.
pub fn max_relative_error(
    got: &knots::merge::MergedDelta,
    want: &knots::merge::MergedDelta,
) -> f64 {
    assert_eq!(
        got.modules.keys().collect::<Vec<_>>(),
        want.modules.keys().collect::<Vec<_>>()
    );
    got.modules
        .iter()
        .map(|(k, m)| m.to_dense().relative_error(&want.modules[k].to_dense()))
        .fold(0.0, f64::max)
}
