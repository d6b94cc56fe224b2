//! DARE: drop each entry with probability `p` and rescale the survivors by `1/(1−p)`, so the
//! expected update is unchanged. Masks come from a ChaCha stream keyed by (seed, adapter digest,
//! module path): the same set gives the same merge in any order and after any restart.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha12Rng;
use sha2::{Digest, Sha256};

use crate::adapters::AdapterDigest;

/// Where a mask is drawn from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DareKey<'a> {
    pub seed: u64,
    pub adapter: &'a AdapterDigest,
    pub module: &'a str,
}

/// Applies DARE with drop probability `p` to `values` in place. `p = 0` leaves them untouched.
pub(crate) fn apply(values: &mut [f32], p: f64, key: DareKey<'_>) {
    if p <= 0.0 {
        return;
    }
    let rescale = rescale(p);
    let mut keep = keeper(p, key);
    for x in values {
        if keep() {
            *x *= rescale;
        } else {
            *x = 0.0;
        }
    }
}

/// The factor DARE scales kept entries by.
pub(crate) fn rescale(p: f64) -> f32 {
    (1.0 / (1.0 - p)) as f32
}

/// The mask [`apply`] uses for `len` entries: 1 where an entry is kept, 0 where it is dropped
/// (the same stream, so the same mask, for the device merge).
pub(crate) fn keep_mask(len: usize, p: f64, key: DareKey<'_>) -> Vec<u8> {
    let mut keep = keeper(p, key);
    (0..len).map(|_| u8::from(keep())).collect()
}

/// Draws whether the next entry is kept.
fn keeper(p: f64, key: DareKey<'_>) -> impl FnMut() -> bool {
    let mut rng = ChaCha12Rng::from_seed(stream_seed(key));
    // Keep when a uniform u32 falls below (1 − p)·2³², exact to 2⁻³².
    let keep_below = ((1.0 - p) * 4_294_967_296.0).round() as u64;
    move || u64::from(rng.next_u32()) < keep_below
}

fn stream_seed(key: DareKey<'_>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"knots-dare-v1");
    h.update(key.seed.to_le_bytes());
    h.update(key.adapter.0);
    h.update(key.module.as_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: AdapterDigest = AdapterDigest([7; 32]);

    fn key(seed: u64, module: &str) -> DareKey<'_> {
        DareKey {
            seed,
            adapter: &DIGEST,
            module,
        }
    }

    #[test]
    fn drops_about_p_and_rescales_the_rest() {
        let mut v = vec![1.0f32; 100_000];
        apply(&mut v, 0.3, key(1, "m"));
        let kept = v.iter().filter(|&&x| x != 0.0).count() as f64 / v.len() as f64;
        assert!((kept - 0.7).abs() < 0.01, "kept fraction {kept}");
        assert!(v.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.7).abs() < 1e-6));
    }

    #[test]
    fn masks_depend_on_seed_and_module_only() {
        let draw = |seed, module| {
            let mut v = vec![1.0f32; 64];
            apply(&mut v, 0.5, key(seed, module));
            v
        };
        assert_eq!(draw(3, "a"), draw(3, "a"));
        assert_ne!(draw(3, "a"), draw(4, "a"));
        assert_ne!(draw(3, "a"), draw(3, "b"));
    }

    #[test]
    fn p_zero_is_the_identity() {
        let mut v = vec![0.5f32, -2.0, 3.0];
        apply(&mut v, 0.0, key(0, "m"));
        assert_eq!(v, vec![0.5, -2.0, 3.0]);
    }
}
