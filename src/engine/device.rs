//! `--device cpu | cuda | cuda:N` to a candle device.

use candle_core::Device;

use super::error::{EngineError, Result};

/// Parses a device name; CUDA needs the crate's `cuda` feature.
pub fn parse_device(spec: &str) -> Result<Device> {
    let err = |message: &str| EngineError::Device {
        spec: spec.to_string(),
        message: message.to_string(),
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0).map_err(|e| err(&e.to_string())),
        _ => {
            let ordinal = spec
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| err("expected cpu, cuda or cuda:N"))?;
            cuda(ordinal).map_err(|e| err(&e.to_string()))
        }
    }
}

fn cuda(ordinal: usize) -> candle_core::Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        return Err(candle_core::Error::Msg(
            "this build has no CUDA support (build with --features cuda) or no GPU".into(),
        ));
    }
    Device::new_cuda(ordinal)
}

/// Makes `device`'s CUDA context current on the calling thread (nothing to do on the CPU).
///
/// The driver keeps the current context per thread. cudarc makes it current before most calls,
/// but not before every one, so work issued from a thread that never had it (a new worker or
/// blocking-pool thread of the server) can fail with `CUDA_ERROR_INVALID_CONTEXT`. Every thread
/// that may touch the device calls this when it starts.
pub fn bind_to_thread(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        cuda.cuda_stream()
            .context()
            .bind_to_thread()
            .map_err(|e| EngineError::Device {
                spec: format!("{:?}", device.location()),
                message: format!("making the CUDA context current: {e}"),
            })?;
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    Ok(())
}
