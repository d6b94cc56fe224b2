//! The few ops where candle has a fused kernel without a backward pass. Inference uses the fused
//! kernels; a forward pass through trainable factors (`knots train`) uses composite forms built
//! from differentiable primitives. Both compute the same function.

use candle_core::{D, Device, Tensor};

use super::error::Result;
use super::host;

/// Softmax over the last axis.
pub fn softmax_last(x: &Tensor, grad: bool) -> Result<Tensor> {
    Ok(if grad {
        candle_nn::ops::softmax(x, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(x)?
    })
}

/// Layer normalisation over the last axis.
pub fn layer_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    grad: bool,
) -> Result<Tensor> {
    Ok(if grad {
        candle_nn::ops::layer_norm_slow(x, gamma, beta, eps)?
    } else {
        candle_nn::ops::layer_norm(x, gamma, beta, eps)?
    })
}

/// RMS normalisation over the last axis. Inference on host tensors runs `host::rms_norm` (the
/// sum of squares in sixteen lanes rather than one chain); gradients and other devices use
/// candle's op.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32, grad: bool) -> Result<Tensor> {
    if !grad
        && x.dims().last() == Some(&weight.elem_count())
        && let Some(y) = host::with_slices(&[x, weight], |s| host::rms_norm(s[0], s[1], eps))
    {
        return Ok(Tensor::from_vec(y, x.shape(), x.device())?);
    }
    Ok(if grad {
        candle_nn::ops::rms_norm_slow(x, weight, eps)?
    } else {
        candle_nn::ops::rms_norm(x, weight, eps)?
    })
}

/// [`rms_norm`] of host rows `x: (·, weight.len())` into `out` (see [`host::rms_norm_to`]),
/// through a tensor on `device` where the host cannot (a weight on a GPU).
pub fn rms_norm_rows_to(
    out: &mut Vec<f32>,
    x: &[f32],
    weight: &Tensor,
    eps: f32,
    device: &Device,
) -> Result<()> {
    let width = weight.elem_count();
    if host::with_slice(weight, |w| host::rms_norm_to(out, x, w, eps)).is_some() {
        return Ok(());
    }
    let t = Tensor::from_slice(x, (x.len() / width.max(1), width), device)?;
    *out = rms_norm(&t, weight, eps, false)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(())
}

/// Rotary embedding of `x: (batch, heads, seq, head_dim)` (non-interleaved halves).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, grad: bool) -> Result<Tensor> {
    Ok(if grad {
        candle_nn::rotary_emb::rope_slow(x, cos, sin)?
    } else {
        candle_nn::rotary_emb::rope(x, cos, sin)?
    })
}

/// GELU in its exact (erf) form. Inference on host tensors runs `host::gelu_erf` (a rational erf
/// approximation, within 1e-6 of candle's, vectorisable and parallel); gradients and other
/// devices use candle's op.
pub fn gelu_erf(x: &Tensor, grad: bool) -> Result<Tensor> {
    if !grad && let Some(y) = host::with_slice(x, host::gelu_erf) {
        return Ok(Tensor::from_vec(y, x.shape(), x.device())?);
    }
    Ok(x.gelu_erf()?)
}
