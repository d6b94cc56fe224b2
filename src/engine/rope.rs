//! Rotary position embeddings (the Hugging Face "rotate half" layout) with the default and the
//! Llama-3 frequency schedules, and the causal mask.

use candle_core::{Device, Tensor};
use serde::Deserialize;

use super::error::{EngineError, Result};
use super::host;

/// `rope_scaling` / `rope_parameters` from a Hugging Face config.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RopeScaling {
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

/// Precomputed `cos` and `sin`, `max_positions × head_dim/2`.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(
        head_dim: usize,
        theta: f64,
        scaling: Option<&RopeScaling>,
        max_positions: usize,
        device: &Device,
    ) -> Result<Self> {
        let mut inv_freq: Vec<f64> = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
            .collect();
        match scaling.and_then(|s| s.rope_type.as_deref()) {
            None | Some("default") => {}
            Some("llama3") => llama3_schedule(&mut inv_freq, scaling.cloned().unwrap_or_default())?,
            Some(other) => {
                return Err(EngineError::Unsupported {
                    message: format!("rope scaling {other:?}"),
                });
            }
        }
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv_freq {
                // Angles in f32, as transformers computes them.
                let angle = (p as f32) * (*f as f32);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, half), device)?,
            sin: Tensor::from_vec(sin, (max_positions, half), device)?,
        })
    }

    /// Rotates `x: (batch, heads, seq, head_dim)` for positions `offset..offset + seq`.
    pub fn apply(&self, x: &Tensor, offset: usize, grad: bool) -> Result<Tensor> {
        let seq = x.dim(2)?;
        let cos = self.cos.narrow(0, offset, seq)?.to_dtype(x.dtype())?;
        let sin = self.sin.narrow(0, offset, seq)?.to_dtype(x.dtype())?;
        super::ops::rope(&x.contiguous()?, &cos, &sin, grad)
    }
}

/// `cos` and `sin` rows for arbitrary positions (`u32`), for [`rope_rows`].
#[derive(Debug, Clone)]
pub struct RowAngles {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The angles of each position in `positions`.
    pub fn rows(&self, positions: &Tensor) -> Result<RowAngles> {
        Ok(RowAngles {
            cos: self.cos.index_select(positions, 0)?,
            sin: self.sin.index_select(positions, 0)?,
        })
    }
}

/// Rotates `x: (rows, heads·head_dim)`, row `i` at the position `angles` was built with at `i`.
pub fn rope_rows(x: &Tensor, heads: usize, angles: &RowAngles) -> Result<Tensor> {
    let (rows, width) = x.dims2()?;
    let on_host = host::with_slice(x, |x| {
        let mut y = x.to_vec();
        rope_on_host(&mut y, rows, heads, angles).then_some(y)
    });
    if let Some(Some(y)) = on_host {
        return Ok(Tensor::from_vec(y, (rows, width), x.device())?);
    }
    let x = x.reshape((1, rows, heads, width / heads.max(1)))?;
    let (cos, sin) = (
        angles.cos.to_dtype(x.dtype())?,
        angles.sin.to_dtype(x.dtype())?,
    );
    let y = candle_nn::rotary_emb::rope_thd(&x.contiguous()?, &cos, &sin)?;
    Ok(y.reshape((rows, width))?)
}

/// [`rope_rows`] of host values, in place: `x: (rows, heads·head_dim)`. Returns whether it
/// did (angles in host memory, sizes that fit), and leaves `x` alone otherwise.
pub fn rope_on_host(x: &mut [f32], rows: usize, heads: usize, angles: &RowAngles) -> bool {
    host::with_slices(&[&angles.cos, &angles.sin], |s| {
        host::rope_rows(x, s[0], s[1], rows, heads)
    })
    .unwrap_or(false)
}

/// [`rope_rows`] of host values in place, through tensors on `device` where the host cannot
/// (angles on a GPU).
pub fn rope_in_place(
    x: &mut [f32],
    rows: usize,
    heads: usize,
    angles: &RowAngles,
    device: &Device,
) -> Result<()> {
    if !rope_on_host(x, rows, heads, angles) {
        let t = Tensor::from_slice(x, (rows, x.len() / rows.max(1)), device)?;
        let y = rope_rows(&t, heads, angles)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        x.copy_from_slice(&y);
    }
    Ok(())
}

fn llama3_schedule(inv_freq: &mut [f64], s: RopeScaling) -> Result<()> {
    let missing = |name: &str| EngineError::Unsupported {
        message: format!("llama3 rope scaling without {name}"),
    };
    let factor = s.factor.ok_or_else(|| missing("factor"))?;
    let low = s
        .low_freq_factor
        .ok_or_else(|| missing("low_freq_factor"))?;
    let high = s
        .high_freq_factor
        .ok_or_else(|| missing("high_freq_factor"))?;
    let old_ctx = s
        .original_max_position_embeddings
        .ok_or_else(|| missing("original_max_position_embeddings"))? as f64;
    let low_wavelen = old_ctx / low;
    let high_wavelen = old_ctx / high;
    for f in inv_freq.iter_mut() {
        let wavelen = 2.0 * std::f64::consts::PI / *f;
        if wavelen > low_wavelen {
            *f /= factor;
        } else if wavelen >= high_wavelen {
            let smooth = (old_ctx / wavelen - low) / (high - low);
            *f = (1.0 - smooth) * *f / factor + smooth * *f;
        }
    }
    Ok(())
}

/// Additive causal mask `(seq, offset + seq)`: query `i` (at position `offset + i`) sees keys
/// `0..=offset + i`.
pub fn causal_mask(seq: usize, offset: usize, device: &Device) -> Result<Tensor> {
    let total = offset + seq;
    let data: Vec<f32> = (0..seq)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(data, (seq, total), device)?)
}
