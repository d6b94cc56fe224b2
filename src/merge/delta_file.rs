//! A [`MergedDelta`] as one safetensors file, the payload of the shared merge store. A low-rank
//! module is stored as `<module>.delta_b` (`O × k`) and `<module>.delta_a` (`k × I`), a dense
//! one as `<module>.delta` (`O × I`), all f32; the metadata records the format version.

use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::{MergedDelta, ModuleDelta};
use crate::matrix::Matrix;

/// Bumped whenever the layout or the meaning of the stored values changes; stores key on it.
pub const DELTA_FORMAT_VERSION: u32 = 1;

const VERSION_KEY: &str = "knots_delta_format";

/// A payload that is not a delta of this format.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("not a knots delta file: {0}")]
pub struct DeltaFileError(String);

fn bad(reason: impl Into<String>) -> DeltaFileError {
    DeltaFileError(reason.into())
}

impl MergedDelta {
    /// The safetensors bytes of this delta.
    pub fn encode(&self) -> Result<Vec<u8>, DeltaFileError> {
        let mut tensors: Vec<(String, &Matrix)> = Vec::new();
        for (module, m) in &self.modules {
            match m {
                ModuleDelta::LowRank { b, a } => {
                    tensors.push((format!("{module}.delta_b"), b));
                    tensors.push((format!("{module}.delta_a"), a));
                }
                ModuleDelta::Dense(w) => tensors.push((format!("{module}.delta"), w)),
            }
        }
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, m)| m.as_slice().iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views = tensors
            .iter()
            .zip(&bytes)
            .map(|((name, m), data)| {
                TensorView::new(Dtype::F32, vec![m.rows(), m.cols()], data)
                    .map(|view| (name.clone(), view))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        let metadata = HashMap::from([(VERSION_KEY.to_string(), DELTA_FORMAT_VERSION.to_string())]);
        safetensors::serialize(views, Some(metadata)).map_err(|e| bad(e.to_string()))
    }

    /// Reads a delta written by [`MergedDelta::encode`]; any other content is an error.
    pub fn decode(bytes: &[u8]) -> Result<Self, DeltaFileError> {
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let version = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(VERSION_KEY))
            .ok_or_else(|| bad("no format version"))?;
        if version != &DELTA_FORMAT_VERSION.to_string() {
            return Err(bad(format!(
                "format version {version}, expected {DELTA_FORMAT_VERSION}"
            )));
        }
        let file = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
        for (name, view) in file.tensors() {
            let matrix = matrix(&name, &view)?;
            let (module, slot) = if let Some(m) = name.strip_suffix(".delta_b") {
                (m, 0)
            } else if let Some(m) = name.strip_suffix(".delta_a") {
                (m, 1)
            } else if let Some(m) = name.strip_suffix(".delta") {
                (m, 2)
            } else {
                return Err(bad(format!("unexpected tensor {name}")));
            };
            let entry = parts.entry(module.to_string()).or_default();
            let place = [&mut entry.0, &mut entry.1, &mut entry.2][slot]
                .replace(matrix)
                .is_some();
            if place {
                return Err(bad(format!("tensor {name} appears twice")));
            }
        }
        let modules = parts
            .into_iter()
            .map(|(module, parts)| module_delta(&module, parts).map(|d| (module, d)))
            .collect::<Result<_, _>>()?;
        Ok(Self { modules })
    }
}

/// A module's stored tensors: `delta_b`, `delta_a`, `delta`.
type Parts = (Option<Matrix>, Option<Matrix>, Option<Matrix>);

fn matrix(
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
) -> Result<Matrix, DeltaFileError> {
    let [rows, cols] = view.shape() else {
        return Err(bad(format!("{name} is not a matrix")));
    };
    if view.dtype() != Dtype::F32 {
        return Err(bad(format!("{name} is {:?}, expected F32", view.dtype())));
    }
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Matrix::from_vec(*rows, *cols, values).map_err(|e| bad(format!("{name}: {e}")))
}

fn module_delta(module: &str, parts: Parts) -> Result<ModuleDelta, DeltaFileError> {
    match parts {
        (Some(b), Some(a), None) if b.cols() == a.rows() => Ok(ModuleDelta::LowRank { b, a }),
        (None, None, Some(w)) => Ok(ModuleDelta::Dense(w)),
        _ => Err(bad(format!(
            "module {module} needs delta_b and delta_a of one rank, or delta alone"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> MergedDelta {
        let b = Matrix::from_fn(4, 2, |i, j| (i * 2 + j) as f32 - 3.5);
        let a = Matrix::from_fn(2, 3, |i, j| (i as f32 + 1.0) * (j as f32 - 0.25));
        let w = Matrix::from_fn(3, 3, |i, j| if i == j { -1.5e-7 } else { 2.0 });
        let mut delta = MergedDelta::default();
        delta
            .modules
            .insert("layers.0.q".into(), ModuleDelta::LowRank { b, a });
        delta
            .modules
            .insert("layers.0.o".into(), ModuleDelta::Dense(w));
        delta.modules.insert(
            "layers.1.q".into(),
            ModuleDelta::LowRank {
                b: Matrix::zeros(4, 0),
                a: Matrix::zeros(0, 3),
            },
        );
        delta
    }

    #[test]
    fn round_trip_is_exact() {
        let delta = sample();
        let bytes = delta.encode().unwrap();
        assert_eq!(MergedDelta::decode(&bytes).unwrap(), delta);
    }

    #[test]
    fn other_content_is_refused() {
        let bytes = sample().encode().unwrap();
        assert!(MergedDelta::decode(&bytes[..bytes.len() - 4]).is_err());
        assert!(MergedDelta::decode(b"not safetensors").is_err());
        // A file of another version, and one with a factor missing.
        let m = Matrix::zeros(2, 2);
        let data: Vec<u8> = m.as_slice().iter().flat_map(|x| x.to_le_bytes()).collect();
        let view = TensorView::new(Dtype::F32, vec![2, 2], &data).unwrap();
        for (version, name) in [("2", "m.delta"), ("1", "m.delta_b")] {
            let meta = HashMap::from([(VERSION_KEY.to_string(), version.to_string())]);
            let bytes = safetensors::serialize([(name, view.clone())], Some(meta)).unwrap();
            let err = MergedDelta::decode(&bytes).unwrap_err().to_string();
            assert!(
                err.contains("version 2") || err.contains("module m"),
                "{err}"
            );
        }
    }
}
